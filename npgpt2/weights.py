"""safetensors files -> named NumPy arrays -> the weights of the forward pass.

Two steps, kept apart so each can be read on its own:

1. ``read_safetensors`` lets the ``safetensors`` library check a file (well-formed header, every tensor's
   bytes present), then maps each tensor straight from disk with ``mmap``: nothing is copied, so
   loading gpt2-small takes milliseconds and pages are read only when the forward pass touches them.
   Pickled checkpoints (``pytorch_model.bin``) are never read.
2. ``weights_from_state_dict`` turns Hugging Face key names into a ``GPT2Weights``, checking every
   key and shape against the config.

The forward pass keeps GPT-2's own layout, because it is the fast one: ``c_attn`` is one
[d_model, 3*d_model] matrix so q, k and v come out of a single matmul. Hugging Face's ``Conv1D``
stores weights as [in, out], so every linear layer is ``x @ W + b``, no transpose. TransformerLens's
per-head views (``W_Q`` [n_head, d_model, d_head], ...) are reshapes of these arrays, see ``model.py``.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import struct
from dataclasses import dataclass, fields

import numpy as np

from .config import GPT2Config


class WeightsError(ValueError):
    """A checkpoint file is missing, damaged, or does not fit the config."""


# safetensors dtype tag -> NumPy dtype of the stored bytes
_STORED_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,  # NumPy has no bfloat16: read the bits, widen in `to_compute_dtype`
}


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Map every tensor of one ``.safetensors`` file into memory, without copying.

    Returns {key: read-only array} in the stored dtype (bfloat16 comes back as its uint16 bits).
    """
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightsError(f"weights file {path} does not exist")
    try:
        # safetensors validates the header and that the file holds every tensor's bytes
        # (a truncated download fails here).
        with safe_open(path, framework="numpy") as f:
            keys = set(f.keys())
    except Exception as e:  # the library raises its own SafetensorError
        raise WeightsError(f"{path} is not a complete safetensors file: {e}") from None

    with open(path, "rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(header_len))
    data_start = 8 + header_len
    if os.path.getsize(path) == data_start:  # only empty tensors; mmap refuses empty files
        raw = np.zeros(0, dtype=np.uint8)
    else:
        with open(path, "rb") as fh:  # the mapping outlives the file handle
            mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        # a plain, read-only np.ndarray over the mapped file (np.memmap would make every slice and
        # every result computed from the weights an np.memmap too)
        raw = np.frombuffer(mapped, dtype=np.uint8)
    tensors = {}
    for key in keys:
        info = header[key]
        if info["dtype"] not in _STORED_DTYPES:
            raise WeightsError(
                f"{path}: tensor {key} has dtype {info['dtype']}; expected one of "
                f"{sorted(_STORED_DTYPES)}"
            )
        begin, end = info["data_offsets"]
        dtype = _STORED_DTYPES[info["dtype"]]
        tensors[key] = raw[data_start + begin : data_start + end].view(dtype).reshape(info["shape"])
    return tensors


def read_checkpoint(paths: list[str | os.PathLike]) -> dict[str, np.ndarray]:
    """Read one or several (sharded) safetensors files into one {key: array} dict."""
    state: dict[str, np.ndarray] = {}
    for path in paths:
        for key, value in read_safetensors(path).items():
            if key in state:
                raise WeightsError(f"tensor {key} appears in more than one shard ({path})")
            state[key] = value
    return state


def to_compute_dtype(key: str, array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Stored tensor -> compute dtype. float32 stays memory-mapped when the compute dtype is float32."""
    if array.dtype == np.uint16:  # bfloat16 bits: they are the top half of a float32
        array = (array.astype(np.uint32) << 16).view(np.float32)
    if array.dtype != dtype:
        array = array.astype(dtype)
    # One reduction finds any NaN or inf (they propagate through a sum); only then look closer.
    if not np.isfinite(np.add.reduce(array, axis=None)):
        bad = ~np.isfinite(array)
        if bad.any():
            where = tuple(int(i) for i in np.argwhere(bad)[0])
            raise WeightsError(
                f"tensor {key} holds {int(bad.sum())} non-finite values (NaN or inf), "
                f"the first at index {where}"
            )
    return array


@dataclass
class BlockWeights:
    """The weights of one transformer block, in GPT-2's own layout (``x @ W + b``)."""

    ln1_w: np.ndarray | None  # [d_model]; None once folded into the next matmul
    ln1_b: np.ndarray | None  # [d_model]
    W_qkv: np.ndarray  # [d_model, 3*d_model]: columns are q | k | v, each head after head
    b_qkv: np.ndarray  # [3*d_model]
    W_O: np.ndarray  # [d_model, d_model]: rows are (head, d_head), i.e. concat(z) @ W_O; per head (model.W_O) [head, d_head, d_model]
    b_O: np.ndarray  # [d_model]
    ln2_w: np.ndarray | None  # [d_model]
    ln2_b: np.ndarray | None  # [d_model]
    W_in: np.ndarray  # [d_model, d_mlp]
    b_in: np.ndarray  # [d_mlp]
    W_out: np.ndarray  # [d_mlp, d_model]
    b_out: np.ndarray  # [d_model]


@dataclass
class GPT2Weights:
    W_E: np.ndarray  # [d_vocab, d_model] token embedding
    W_pos: np.ndarray  # [n_ctx, d_model] learned position embedding
    blocks: list[BlockWeights]
    ln_final_w: np.ndarray | None  # [d_model]
    ln_final_b: np.ndarray | None  # [d_model]
    W_U: np.ndarray  # [d_model, d_vocab]; GPT-2 ties it to W_E (a transposed view, no copy)
    b_U: np.ndarray | None  # [d_vocab]; GPT-2 has none (None means zero)

    def arrays(self):
        """Yield (name, array) for every weight, with TransformerLens-style names."""
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "blocks":
                for layer, block in enumerate(value):
                    for bf in fields(block):
                        array = getattr(block, bf.name)
                        if array is not None:
                            yield f"blocks.{layer}.{bf.name}", array
            elif value is not None:
                yield f.name, value

    def tied(self) -> bool:
        """Is the unembedding the embedding, transposed (GPT-2's tie)? Then they are one array."""
        return self.W_U is not None and np.may_share_memory(self.W_U, self.W_E)

    def n_params(self) -> int:
        """The number of weights, a tied unembedding counted once."""
        tied = self.tied()
        return sum(a.size for name, a in self.arrays() if not (tied and name == "W_U"))


# Hugging Face key (without the optional "transformer." prefix) -> (block field, shape builder)
_BLOCK_KEYS = {
    "ln_1.weight": ("ln1_w", lambda c: (c.d_model,)),
    "ln_1.bias": ("ln1_b", lambda c: (c.d_model,)),
    "attn.c_attn.weight": ("W_qkv", lambda c: (c.d_model, 3 * c.d_model)),
    "attn.c_attn.bias": ("b_qkv", lambda c: (3 * c.d_model,)),
    "attn.c_proj.weight": ("W_O", lambda c: (c.d_model, c.d_model)),
    "attn.c_proj.bias": ("b_O", lambda c: (c.d_model,)),
    "ln_2.weight": ("ln2_w", lambda c: (c.d_model,)),
    "ln_2.bias": ("ln2_b", lambda c: (c.d_model,)),
    "mlp.c_fc.weight": ("W_in", lambda c: (c.d_model, c.d_mlp)),
    "mlp.c_fc.bias": ("b_in", lambda c: (c.d_mlp,)),
    "mlp.c_proj.weight": ("W_out", lambda c: (c.d_mlp, c.d_model)),
    "mlp.c_proj.bias": ("b_out", lambda c: (c.d_model,)),
}
_TOP_KEYS = {
    "wte.weight": lambda c: (c.d_vocab, c.d_model),
    "wpe.weight": lambda c: (c.n_ctx, c.d_model),
    "ln_f.weight": lambda c: (c.d_model,),
    "ln_f.bias": lambda c: (c.d_model,),
}
# Stored by the original checkpoints but not weights: the causal-mask buffers.
_IGNORED = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")


def weights_from_state_dict(
    state: dict[str, np.ndarray], config: GPT2Config, dtype="float32"
) -> GPT2Weights:
    """Hugging Face GPT-2 state dict (either key style) -> ``GPT2Weights`` in ``dtype``.

    Accepts the hub layout (``wte.weight``, ``h.0.attn.c_attn.weight`` ...) and the layout newer
    transformers saves (``transformer.`` prefix, maybe ``lm_head.weight``). Every expected key must
    be present with its exact shape; unknown keys are refused, since they mean a different model.
    """
    dtype = np.dtype(dtype)
    plain = {}
    for key, value in state.items():
        name = key[len("transformer.") :] if key.startswith("transformer.") else key
        if name in plain:
            raise WeightsError(f"tensor {name} is stored twice (with and without 'transformer.')")
        plain[name] = value

    expected = {k: f(config) for k, f in _TOP_KEYS.items()}
    for layer in range(config.n_layer):
        for suffix, (_, shape) in _BLOCK_KEYS.items():
            expected[f"h.{layer}.{suffix}"] = shape(config)
    optional = {"lm_head.weight": (config.d_vocab, config.d_model)}

    missing = [k for k in expected if k not in plain]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise WeightsError(
            f"checkpoint is missing {', '.join(missing[:5])}{more}; expected shape "
            f"{list(expected[missing[0]])} for {missing[0]}"
        )
    unknown = [k for k in plain if k not in expected and k not in optional and not _IGNORED.fullmatch(k)]
    if unknown:
        raise WeightsError(
            f"checkpoint holds tensors a GPT-2 does not have: {', '.join(sorted(unknown)[:5])}"
        )
    for key, shape in {**expected, **optional}.items():
        if key in plain and tuple(plain[key].shape) != tuple(shape):
            raise WeightsError(
                f"tensor {key} has shape {list(plain[key].shape)}; expected {list(shape)} "
                f"for config n_layer={config.n_layer}, n_embd={config.n_embd}, "
                f"vocab_size={config.vocab_size}, n_ctx={config.n_ctx}"
            )

    def get(key):
        return to_compute_dtype(key, plain[key], dtype)

    blocks = [
        BlockWeights(**{field: get(f"h.{layer}.{suffix}") for suffix, (field, _) in _BLOCK_KEYS.items()})
        for layer in range(config.n_layer)
    ]
    W_E = get("wte.weight")
    W_U = get("lm_head.weight").T if "lm_head.weight" in plain else W_E.T
    return GPT2Weights(
        W_E=W_E,
        W_pos=get("wpe.weight"),
        blocks=blocks,
        ln_final_w=get("ln_f.weight"),
        ln_final_b=get("ln_f.bias"),
        W_U=W_U,
        b_U=None,
    )
