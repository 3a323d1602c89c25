"""TransformerLens's module-style names for reading a model: ``model.blocks[3].attn.W_Q``,
``model.blocks[3].mlp.W_in``, ``model.embed.W_E``, ``model.unembed.W_U``, ``model.ln_final.w``,
``model.OV`` / ``model.QK`` (FactoredMatrix over [layer, head]), ``model.get_token_position`` and
``model.loss_fn``.

npgpt2 has no modules: these are read-only windows onto ``model.W_Q[l]`` and friends (views.py)
and onto ``model.weights``. Asking for a name that is not there raises an ``AttributeError`` that
lists the names that are (and the closest one); assigning to one says where weights are edited.
Hook points appear under their TransformerLens names too (``model.blocks[0].attn.hook_pattern`` is
the ``HookPoint`` "blocks.0.attn.hook_pattern"); hooks are added through the model.
"""

from __future__ import annotations

import difflib

import numpy as np

from .factored_matrix import FactoredMatrix
from .inputs import InputError
from .views import WeightViews  # noqa: F401  (model.py imports both from here)

# What each kind of module shows: attribute -> how to get it from (model, layer).
_ATTN = {name: (lambda m, l, name=name: getattr(m, name)[l])
         for name in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O")}
_ATTN.update(OV=lambda m, l: m.OV[l], QK=lambda m, l: m.QK[l])
_MLP = {name: (lambda m, l, name=name: getattr(m, name)[l]) for name in ("W_in", "b_in", "W_out", "b_out")}
_LN = {"ln1": {"w": lambda m, l: m.weights.blocks[l].ln1_w, "b": lambda m, l: m.weights.blocks[l].ln1_b},
       "ln2": {"w": lambda m, l: m.weights.blocks[l].ln2_w, "b": lambda m, l: m.weights.blocks[l].ln2_b},
       "ln_final": {"w": lambda m, l: m.weights.ln_final_w, "b": lambda m, l: m.weights.ln_final_b}}
_EMBED = {"W_E": lambda m, l: m.W_E}
_POS_EMBED = {"W_pos": lambda m, l: m.W_pos}
_UNEMBED = {"W_U": lambda m, l: m.W_U, "b_U": lambda m, l: m.b_U}

# What other architectures (or TransformerLens's other modules) have and GPT-2 does not.
_ABSENT = {
    "W_gate": "GPT-2's MLP is not gated", "b_gate": "GPT-2's MLP is not gated",
    "W_qkv": "npgpt2 keeps GPT-2's fused weight at model.weights.blocks[l].W_qkv [d_model, 3 * d_model]",
    "rotary_sin": "GPT-2 has no rotary embeddings", "rotary_cos": "GPT-2 has no rotary embeddings",
}


# torch / TransformerLens model names a port reaches for, and what to use instead
_GRADIENTS = "gradients come from npgpt2.value_and_grad(model, metric, input) (or run_with_cache(..., incl_bwd=True)), returned, never stored"
_TORCH_NAMES = {
    "cuda": "npgpt2 runs on the CPU with NumPy (model.to('cpu') and model.cpu() return the model)",
    "half": "npgpt2 computes in float32 or float64: npgpt2.from_pretrained(name, dtype='float64')",
    "bfloat16": "npgpt2 computes in float32 or float64: npgpt2.from_pretrained(name, dtype='float64')",
    "double": "load in float64: npgpt2.from_pretrained(name, dtype='float64')",
    "float": "models load in float32 unless asked: npgpt2.from_pretrained(name, dtype='float32')",
    "parameters": "the arrays are model.weights.arrays() (GPT-2's layout) or model.state_dict() (TransformerLens's names)",
    "named_parameters": "model.state_dict().items() gives (TransformerLens name, array)",
    "zero_grad": _GRADIENTS, "requires_grad_": _GRADIENTS,
    "mod_dict": "npgpt2 has no modules: model.hook_dict holds the hook points, model.blocks[l] the weights by TransformerLens's names",
    "set_tokenizer": "pass tokenizer= when building GPT2(cfg, weights, tokenizer); from_pretrained reads the checkpoint's own",
    "device": "npgpt2 runs on the CPU: model.cfg.device is 'cpu'",
}


class _Module:
    """A read-only stand-in for one TransformerLens module: its weights and hook points by name."""

    __slots__ = ("_model", "_layer", "_path", "_fields", "_children", "_hooks", "_call")

    def __init__(self, model, layer, path: str, fields: dict, children: dict | None = None,
                 hooks: tuple[str, ...] = (), call=None):
        object.__setattr__(self, "_call", call)  # what calling it does, if anything
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_layer", layer)
        object.__setattr__(self, "_path", path)  # e.g. "blocks[3].attn"
        object.__setattr__(self, "_fields", fields)
        object.__setattr__(self, "_children", children or {})
        object.__setattr__(self, "_hooks", hooks)  # hook point names under this module

    def _names(self) -> list[str]:
        return list(self._fields) + list(self._children) + [h.rsplit(".", 1)[-1] for h in self._hooks]

    def __getattr__(self, name: str):
        if name in self._fields:
            return self._fields[name](self._model, self._layer)
        if name in self._children:
            return self._children[name]
        for hook in self._hooks:
            if hook.rsplit(".", 1)[-1] == name:
                return self._model.hook_dict[hook]
        if name.startswith("__"):
            raise AttributeError(name)
        reason = f" ({_ABSENT[name]})" if name in _ABSENT else ""
        same_but_case = [n for n in self._names() if n.lower() == name.lower()]
        close = same_but_case or difflib.get_close_matches(name, self._names(), n=2, cutoff=0.6)
        hint = f"; did you mean {' or '.join(close)}?" if close and not reason else ""
        raise AttributeError(f"model.{self._path} has no {name!r}{reason}{hint}; it has {', '.join(self._names())}")

    def __setattr__(self, name: str, value) -> None:
        how = ("model.set_weight(...)" if hasattr(self._model, "set_weight")
               else "model.weights (GPT-2's layout; see npgpt2/weights.py)")
        raise AttributeError(f"model.{self._path}.{name} is read-only: these are views for reading; "
                             f"edit weights through {how}")

    def __dir__(self):
        return self._names()

    def __call__(self, *args, **kwargs):
        if self._call is None:
            raise TypeError(f"model.{self._path} is not callable: npgpt2 has no modules to call. Run the model "
                            "(start_at_layer/stop_at_layer run part of it) or use its arrays; model.embed, "
                            "model.pos_embed and model.unembed (final layer norm + unembedding) can be called")
        return self._call(*args, **kwargs)

    def __repr__(self):
        return f"<model.{self._path}: {', '.join(self._names())}>"


class _Blocks:
    """``model.blocks``: indexable and iterable like TransformerLens's ModuleList."""

    __slots__ = ("_model",)

    def __init__(self, model):
        self._model = model

    def __len__(self) -> int:
        return self._model.cfg.n_layer

    def __getitem__(self, l):
        n = len(self)
        if isinstance(l, slice):
            return [self[i] for i in range(n)[l]]
        if not isinstance(l, (int, np.integer)) or isinstance(l, bool) or not -n <= l < n:
            raise IndexError(f"model.blocks[{l!r}]: expected a layer index in 0..{n - 1} (or -{n}..-1)")
        return _block(self._model, int(l) % n)

    def __iter__(self):
        return (self[l] for l in range(len(self)))

    def __repr__(self):
        return f"<model.blocks: {len(self)} blocks>"


def _hooks_under(model, prefix: str) -> tuple[str, ...]:
    """Hook names directly under ``prefix`` (``prefix + "hook_x"``, no further dots)."""
    return tuple(n for n in model.hook_names() if n.startswith(prefix) and "." not in n[len(prefix):])


def _block(model, l: int) -> _Module:
    p = f"blocks.{l}."
    children = {
        "attn": _Module(model, l, f"blocks[{l}].attn", _ATTN, hooks=_hooks_under(model, p + "attn.")),
        "mlp": _Module(model, l, f"blocks[{l}].mlp", _MLP, hooks=_hooks_under(model, p + "mlp.")),
        "ln1": _Module(model, l, f"blocks[{l}].ln1", _LN["ln1"], hooks=_hooks_under(model, p + "ln1.")),
        "ln2": _Module(model, l, f"blocks[{l}].ln2", _LN["ln2"], hooks=_hooks_under(model, p + "ln2.")),
    }
    return _Module(model, l, f"blocks[{l}]", {}, children, hooks=_hooks_under(model, p))


class ModuleAccessors:
    """The TransformerLens-style reading half of ``GPT2``. Expects ``self.cfg``, ``self.weights``,
    the ``W_*`` views (views.py), ``hook_names``/``hook_dict`` (hooks.py) and ``to_tokens``."""

    @property
    def blocks(self) -> _Blocks:
        """``model.blocks[l].attn.W_Q`` [head, d_model, d_head], ``.mlp.W_in``, ``.ln1.w``, ... (read-only)"""
        return _Blocks(self)

    @property
    def embed(self) -> _Module:
        """``model.embed(tokens)``: W_E[tokens], [batch, pos] -> [batch, pos, d_model];
        ``model.embed.W_E`` [d_vocab, d_model]."""
        return _Module(self, None, "embed", _EMBED, hooks=("hook_embed",),
                       call=lambda tokens: self.W_E[self.validate_tokens(tokens)])

    @property
    def pos_embed(self) -> _Module:
        """``model.pos_embed(tokens, past_kv_pos_offset=0)``: the position embeddings of the
        tokens' positions, [batch, pos] -> [batch, pos, d_model]; ``model.pos_embed.W_pos`` [n_ctx, d_model]."""
        def call(tokens, past_kv_pos_offset: int = 0):
            tokens = self.validate_tokens(tokens, past_kv_pos_offset)
            positions = self.W_pos[past_kv_pos_offset:past_kv_pos_offset + tokens.shape[1]]
            return np.broadcast_to(positions, tokens.shape + positions.shape[-1:])

        return _Module(self, None, "pos_embed", _POS_EMBED, hooks=("hook_pos_embed",), call=call)

    @property
    def unembed(self) -> _Module:
        """``model.unembed(resid)``: the final layer norm, then the unembedding,
        [batch, pos, d_model] -> [batch, pos, d_vocab]. (TransformerLens's ``unembed`` module is the
        unembedding alone; here the layer norm is included, so do not apply ``ln_final`` first.)
        ``model.unembed.W_U`` [d_model, d_vocab], ``.b_U`` [d_vocab]."""
        return _Module(self, None, "unembed", _UNEMBED, call=lambda resid: self._unembed(self._new_run(), resid))

    @property
    def ln_final(self) -> _Module:
        """``model.ln_final.w`` / ``.b`` [d_model] and its hook points"""
        return _Module(self, None, "ln_final", _LN["ln_final"], hooks=_hooks_under(self, "ln_final."))

    @property
    def OV(self) -> FactoredMatrix:
        """W_V @ W_O per head, [layer, head, d_model, d_model], factored (TransformerLens's ``model.OV``)."""
        return FactoredMatrix(self.W_V, self.W_O)

    @property
    def QK(self) -> FactoredMatrix:
        """W_Q @ W_K^T per head, [layer, head, d_model (query side), d_model (key side)], factored."""
        return FactoredMatrix(self.W_Q, self.W_K.swapaxes(-1, -2))

    def get_token_position(self, single_token, input, mode: str = "first", prepend_bos=None) -> int:
        """The position of ``single_token`` (a one-token str, or an id) in ``input`` (a text, or ids
        [pos] / [1, pos]): its first occurrence (``mode="first"``) or last (``"last"``).
        ``prepend_bos`` counts as ``to_tokens``'s (None: the model's default)."""
        if mode not in ("first", "last"):
            raise ValueError(f"mode={mode!r}: expected 'first' or 'last'")
        if isinstance(input, str):
            if prepend_bos is None:
                prepend_bos = bool(getattr(self.cfg, "default_prepend_bos", False))
            tokens = self.to_tokens(input, prepend_bos=prepend_bos)
        else:
            tokens = self.validate_tokens(input)
        if tokens.shape[0] != 1:
            raise InputError(f"get_token_position takes one sequence; got tokens of shape {tokens.shape}")
        token = self.to_single_token(single_token) if isinstance(single_token, str) else int(np.asarray(single_token))
        found = np.nonzero(tokens[0] == token)[0]
        if not len(found):
            raise InputError(f"token {self.tokenizer.token_str(token)!r} (id {token}) does not occur in "
                             f"{[self.tokenizer.token_str(t) for t in tokens[0]]}")
        return int(found[0] if mode == "first" else found[-1])

    def loss_fn(self, logits, tokens, attention_mask=None, per_token: bool = False):
        """TransformerLens's ``model.loss_fn``: ``utils.lm_cross_entropy_loss`` on given logits."""
        from .utils import lm_cross_entropy_loss

        return lm_cross_entropy_loss(logits, tokens, attention_mask=attention_mask, per_token=per_token)

    # TransformerLens's switches ---------------------------------------------------------------
    def set_use_attn_result(self, use_attn_result: bool) -> None:
        """TransformerLens's switch: with True, a default ``run_with_cache`` keeps each head's
        output ``blocks.{l}.attn.hook_result`` [batch, pos, head, d_model] (``cfg.use_attn_result``)."""
        self.cfg.use_attn_result = use_attn_result

    def enable_compatibility_mode(self, disable_warnings: bool = False, no_processing: bool = False,
                                  fold_ln: bool = True, center_writing_weights: bool = True,
                                  center_unembed: bool = True, fold_value_biases: bool = True,
                                  refactor_factored_attn_matrices: bool = False):
        """TransformerLens's TransformerBridge call: process the weights as its ``from_pretrained``
        does (the same keywords and defaults; ``no_processing=True`` leaves them alone). Returns the
        model. ``disable_warnings`` is accepted and does nothing (there are none to disable)."""
        if no_processing:
            return self
        return self.process_weights(fold_ln=fold_ln, center_writing_weights=center_writing_weights,
                                    center_unembed=center_unembed, fold_value_biases=fold_value_biases,
                                    refactor_factored_attn_matrices=refactor_factored_attn_matrices)

    def to(self, device_or_dtype=None, print_details: bool = False, *, dtype=None, device=None):
        """TransformerLens's ``model.to("cpu")``: npgpt2 runs on the CPU with NumPy, so "cpu" returns
        the model; another device is an error. For another dtype, load again with
        ``npgpt2.from_pretrained(name, dtype="float64")``."""
        if dtype is not None:
            raise ValueError(f"model.to(dtype={dtype!r}): npgpt2 does not convert a loaded model; load it in the "
                             "dtype you want, npgpt2.from_pretrained(name, dtype='float64')")
        name = str(device if device_or_dtype is None else device_or_dtype)
        if name.split(":")[0] != "cpu":
            raise ValueError(f"model.to({name!r}): npgpt2 runs on the CPU with NumPy; the only device is 'cpu' "
                             "(for float64, load with npgpt2.from_pretrained(..., dtype='float64'))")
        return self

    def cpu(self):
        """torch's ``model.cpu()``: npgpt2 is on the CPU already; returns the model."""
        return self

    def set_use_split_qkv_input(self, use: bool) -> None:
        """TransformerLens's switch for hook_q_input/k/v: npgpt2 has none, so only False is taken
        (True says which hook points to use instead)."""
        self.cfg.use_split_qkv_input = use

    def set_use_attn_in(self, use: bool) -> None:
        """TransformerLens's switch for hook_attn_in: only False is taken (see ``set_use_split_qkv_input``)."""
        self.cfg.use_attn_in = use

    def set_use_hook_mlp_in(self, use: bool) -> None:
        """TransformerLens's switch for hook_mlp_in: only False is taken (see ``set_use_split_qkv_input``)."""
        self.cfg.use_hook_mlp_in = use

    def __getattr__(self, name: str):  # only for names that are not there
        prop = getattr(type(self), name, None)
        if isinstance(prop, property):  # a property that raised AttributeError itself: let it say why
            return prop.fget(self)
        if name in _TORCH_NAMES:
            raise AttributeError(f"{type(self).__name__} has no {name!r}: {_TORCH_NAMES[name]}")
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def eval(self):
        """TransformerLens's (torch's) ``model.eval()``: GPT-2 has no dropout here, so nothing changes;
        returns the model."""
        return self

    def train(self, mode: bool = True):
        """torch's ``model.train()``: nothing changes (no dropout); returns the model. Training is
        ``npgpt2.training``."""
        return self
