"""GPT2Config: the handful of numbers that fix a GPT-2's shape, and the known sizes.

The field names follow Hugging Face's ``config.json`` (``n_layer``, ``n_head``, ``n_embd`` ...);
TransformerLens's names (``d_model``, ``n_heads``, ``d_head`` ...) are provided as read-only
aliases so that code written for either reads naturally.
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import asdict, dataclass, field, fields

import numpy as np

# name a person types -> Hugging Face hub repository
ALIASES = {
    "gpt2": "openai-community/gpt2",
    "gpt2-small": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
    "distilgpt2": "distilbert/distilgpt2",
}

# (n_layer, n_head, n_embd) of the published checkpoints; all share n_ctx 1024 and vocab 50257.
KNOWN_SIZES = {
    "gpt2": (12, 12, 768),
    "gpt2-medium": (24, 16, 1024),
    "gpt2-large": (36, 20, 1280),
    "gpt2-xl": (48, 25, 1600),
    "distilgpt2": (6, 12, 768),
}


class ConfigError(ValueError):
    """config.json describes a model this implementation cannot run faithfully."""


# the fields that are settings rather than shape: assignable on a made config
SETTINGS = ("default_prepend_bos", "use_attn_result")

# TransformerLens switches for hook points npgpt2 does not have: False (the only value) reads and
# sets; True is refused, saying where the same activation is
SWITCHES_NOT_HERE = {
    "use_split_qkv_input": "npgpt2 has no hook_q_input/hook_k_input/hook_v_input: q, k and v all read "
                           "blocks.{l}.ln1.hook_normalized (times ln1.w plus ln1.b); hook blocks.{l}.attn.hook_q/k/v instead",
    "use_attn_in": "npgpt2 has no hook_attn_in: attention reads blocks.{l}.ln1.hook_normalized (times ln1.w "
                   "plus ln1.b), the layer norm of blocks.{l}.hook_resid_pre",
    "use_hook_mlp_in": "npgpt2 has no hook_mlp_in: the MLP reads blocks.{l}.ln2.hook_normalized (times ln2.w "
                       "plus ln2.b), the layer norm of blocks.{l}.hook_resid_mid",
    "use_hook_tokens": "npgpt2 has no hook_tokens: pass the tokens you want (model.to_tokens gives them)",
}

# TransformerLens config fields whose value npgpt2 keeps on the model, not on its config
KEPT_ELSEWHERE = {
    "dtype": "the model's dtype is model.dtype (load with npgpt2.from_pretrained(name, dtype='float64') for float64)",
    "model_name": "the name the model was loaded by is model.name",
    "tokenizer_name": "the tokenizer is model.tokenizer (GPT-2's BPE, shipped with npgpt2); the checkpoint's name is model.name",
    "n_params": "model.n_params() counts the parameters",
    "seed": "npgpt2 models are loaded, not initialised at random; npgpt2.training.new_model(cfg, seed=...) makes a new one",
}


@dataclass
class GPT2Config:
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_ctx: int = 1024
    vocab_size: int = 50257
    layer_norm_epsilon: float = 1e-5
    n_inner: int | None = None  # MLP width; None means 4 * n_embd
    activation_function: str = "gelu_new"
    # Put <|endoftext|> in front of text when a call does not say (``prepend_bos=None``). False, as
    # GPT-2 and Hugging Face do; True gives TransformerLens's tokens and positions. Not part of the
    # shape: settable on a model's config (``model.cfg.default_prepend_bos = True``), ignored by ==.
    default_prepend_bos: bool = field(default=False, compare=False)
    # Keep each head's output, ``blocks.{l}.attn.hook_result``, in a default ``run_with_cache``
    # (TransformerLens's ``cfg.use_attn_result``; ``model.set_use_attn_result(True)``). Otherwise it
    # is computed only when asked for by name, being the largest activation. Settable, ignored by ==.
    use_attn_result: bool = field(default=False, compare=False)

    def __setattr__(self, name, value):
        if name in SETTINGS:
            if not isinstance(value, (bool, np.bool_)):
                raise ConfigError(f"{name}={value!r}: expected True or False")
            value = bool(value)
        elif name == "device":
            self._check_device(value)
            return
        elif name in SWITCHES_NOT_HERE:
            if value is not False:
                raise ConfigError(f"{name}={value!r}: {SWITCHES_NOT_HERE[name]}")
            return
        elif name in self.__dict__ or isinstance(getattr(type(self), name, None), property):
            raise AttributeError(f"GPT2Config.{name} cannot be changed (the weights have this shape); "
                                 f"only {' and '.join(SETTINGS)} can")  # the shape is fixed once made
        elif name not in {f.name for f in fields(self)}:
            raise AttributeError(self._unknown(name))
        object.__setattr__(self, name, value)

    def __getattr__(self, name):  # only for names that are not there
        if name.startswith("__"):
            raise AttributeError(name)
        if name in KEPT_ELSEWHERE:
            raise AttributeError(f"GPT2Config has no {name!r}: {KEPT_ELSEWHERE[name]}")
        close = difflib.get_close_matches(name, self._known(), n=3, cutoff=0.6)
        raise AttributeError(f"GPT2Config has no field {name!r}" + (f"; did you mean {', '.join(close)}?" if close else ""))

    def _known(self) -> list[str]:
        """Every field and property name."""
        return [f.name for f in fields(self)] + [n for n, v in vars(type(self)).items() if isinstance(v, property)]

    def _unknown(self, name: str) -> str:
        """Why ``name`` cannot be set: no such field (with the closest names)."""
        close = difflib.get_close_matches(name, self._known(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; the settable ones are {', '.join(SETTINGS)}"
        return f"GPT2Config has no setting {name!r}{hint}"

    @staticmethod
    def _check_device(value) -> None:
        if str(value).split(":")[0] != "cpu":
            raise ConfigError(f"device={str(value)!r}: npgpt2 runs on the CPU with NumPy; the only device is 'cpu'")

    @property
    def device(self) -> str:
        """TransformerLens's ``cfg.device``: always "cpu" (setting "cpu" is accepted, nothing else)."""
        return "cpu"

    def __hash__(self):
        return hash(tuple(getattr(self, f.name) for f in fields(self) if f.compare))

    def __post_init__(self):
        for name in ("n_layer", "n_head", "n_embd", "n_ctx", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"config {name}={value!r}: expected a positive integer")
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"config n_embd={self.n_embd} is not divisible by n_head={self.n_head}"
            )
        if self.activation_function != "gelu_new":
            raise ConfigError(
                f"config activation_function={self.activation_function!r}: only 'gelu_new' "
                "(GPT-2's tanh approximation) is implemented"
            )

    # TransformerLens's names -------------------------------------------------------------
    @property
    def d_model(self) -> int:
        """TransformerLens's name for ``n_embd``: the residual stream's width."""
        return self.n_embd

    @property
    def n_heads(self) -> int:
        """TransformerLens's name for ``n_head``."""
        return self.n_head

    @property
    def n_layers(self) -> int:
        """TransformerLens's name for ``n_layer``."""
        return self.n_layer

    @property
    def d_head(self) -> int:
        """Each head's width, ``n_embd // n_head``."""
        return self.n_embd // self.n_head

    @property
    def d_mlp(self) -> int:
        """The MLP's width (``n_inner``, 4 x ``n_embd`` when unset)."""
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @property
    def d_vocab(self) -> int:
        """TransformerLens's name for ``vocab_size``."""
        return self.vocab_size

    @property
    def act_fn(self) -> str:
        """TransformerLens's name for ``activation_function``: "gelu_new"."""
        return self.activation_function

    @property
    def d_vocab_out(self) -> int:
        """The unembedding's width: ``vocab_size`` (TransformerLens's field)."""
        return self.vocab_size

    @property
    def positional_embedding_type(self) -> str:
        """GPT-2 learns a vector per position: "standard" (TransformerLens's field)."""
        return "standard"

    @property
    def original_architecture(self) -> str:
        """The Hugging Face class of this layout (TransformerLens's field)."""
        return "GPT2LMHeadModel"

    # GPT-2's architecture in TransformerLens's config fields (read-only facts)
    @property
    def normalization_type(self) -> str:
        """Layer norm with gain and bias: "LN" (as TransformerLens 4 reports, folded or not)."""
        return "LN"

    attn_only = parallel_attn_mlp = gated_mlp = final_rms = property(
        lambda self: False, doc="False: GPT-2 has MLPs, runs attention then the MLP, ungated, with layer norms")
    n_key_value_heads = rotary_dim = property(lambda self: None, doc="None: every head has its own keys; no rotary embedding")
    tokenizer_prepends_bos = property(lambda self: False, doc="False: GPT-2's tokenizer adds no BOS itself")

    @property
    def attention_dir(self) -> str:
        """Each position attends to itself and earlier ones: "causal"."""
        return "causal"

    use_split_qkv_input = use_attn_in = use_hook_mlp_in = use_hook_tokens = property(
        lambda self: False, doc="TransformerLens switches for hook points npgpt2 has not (see SWITCHES_NOT_HERE): False")

    @property
    def eps(self) -> float:
        """The layer norms' epsilon (``layer_norm_epsilon``)."""
        return self.layer_norm_epsilon

    def to_dict(self) -> dict:
        """The fields as a dict (what ``config.json`` holds)."""
        return asdict(self)

    @classmethod
    def from_hf_dict(cls, d: dict) -> "GPT2Config":
        """Build from a Hugging Face ``config.json`` dict, refusing what this model cannot run."""
        model_type = d.get("model_type", "gpt2")
        if model_type != "gpt2":
            raise ConfigError(f"config model_type={model_type!r}: expected 'gpt2'")
        # Variants that change the computation and are not implemented: refuse, never ignore.
        refused = {
            "scale_attn_by_inverse_layer_idx": False,
            "scale_attn_weights": True,
            "add_cross_attention": False,
        }
        for key, supported in refused.items():
            if key in d and bool(d[key]) != supported:
                raise ConfigError(
                    f"config {key}={d[key]!r}: only {key}={supported} is implemented"
                )
        n_ctx = d.get("n_positions", d.get("n_ctx", 1024))
        if "n_ctx" in d and "n_positions" in d and d["n_ctx"] != d["n_positions"]:
            raise ConfigError(
                f"config n_ctx={d['n_ctx']} differs from n_positions={d['n_positions']}"
            )
        kwargs = dict(
            n_layer=d.get("n_layer", 12),
            n_head=d.get("n_head", 12),
            n_embd=d.get("n_embd", 768),
            n_ctx=n_ctx,
            vocab_size=d.get("vocab_size", 50257),
            layer_norm_epsilon=float(d.get("layer_norm_epsilon", 1e-5)),
            n_inner=d.get("n_inner"),
            activation_function=d.get("activation_function", "gelu_new"),
        )
        return cls(**kwargs)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "GPT2Config":
        with open(path, encoding="utf-8") as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path} is not valid JSON: {e}") from None
        return cls.from_hf_dict(d)

    def to_hf_dict(self) -> dict:
        """The ``config.json`` Hugging Face transformers writes for this shape."""
        return {
            "model_type": "gpt2",
            "architectures": ["GPT2LMHeadModel"],
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "n_embd": self.n_embd,
            "n_positions": self.n_ctx,
            "n_ctx": self.n_ctx,
            "vocab_size": self.vocab_size,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "n_inner": self.n_inner,
            "activation_function": self.activation_function,
            # <|endoftext|>, when the vocabulary has it
            **({"bos_token_id": 50256, "eos_token_id": 50256} if self.vocab_size > 50256 else {}),
        }
