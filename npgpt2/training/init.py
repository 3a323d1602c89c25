"""A new, untrained GPT-2: GPT-2's initialisation (as transformers' GPT2PreTrainedModel and nanoGPT do
it), for training from scratch.

Every weight matrix and both embeddings ~ N(0, 0.02); the two projections that write into the
residual stream (``attn.c_proj``, ``mlp.c_proj``) ~ N(0, 0.02 / sqrt(2 n_layer)); biases 0; layer-norm
gains 1.
"""

from __future__ import annotations

import numpy as np

from ..config import GPT2Config
from ..weights import weights_from_state_dict


def init_state_dict(config: GPT2Config, seed: int = 0, std: float = 0.02) -> dict[str, np.ndarray]:
    """GPT-2's initial weights, keyed as the hub stores them (float32)."""
    rng = np.random.default_rng(seed)
    d, d_mlp = config.d_model, config.d_mlp
    proj_std = std / np.sqrt(2 * config.n_layer)

    def normal(shape, s=std):
        return (rng.standard_normal(shape) * s).astype(np.float32)

    state = {"wte.weight": normal((config.d_vocab, d)), "wpe.weight": normal((config.n_ctx, d)),
             "ln_f.weight": np.ones(d, np.float32), "ln_f.bias": np.zeros(d, np.float32)}
    for l in range(config.n_layer):
        p = f"h.{l}."
        state.update({
            p + "ln_1.weight": np.ones(d, np.float32), p + "ln_1.bias": np.zeros(d, np.float32),
            p + "attn.c_attn.weight": normal((d, 3 * d)), p + "attn.c_attn.bias": np.zeros(3 * d, np.float32),
            p + "attn.c_proj.weight": normal((d, d), proj_std), p + "attn.c_proj.bias": np.zeros(d, np.float32),
            p + "ln_2.weight": np.ones(d, np.float32), p + "ln_2.bias": np.zeros(d, np.float32),
            p + "mlp.c_fc.weight": normal((d, d_mlp)), p + "mlp.c_fc.bias": np.zeros(d_mlp, np.float32),
            p + "mlp.c_proj.weight": normal((d_mlp, d), proj_std), p + "mlp.c_proj.bias": np.zeros(d, np.float32),
        })
    return state


def new_model(config: GPT2Config, seed: int = 0, dtype: str = "float32", tokenizer=None, name: str = "untrained",
              std: float = 0.02):
    """An untrained ``GPT2`` of this shape (GPT-2's BPE tokenizer unless one is given).
    std: the weights' standard deviation (GPT-2's 0.02; TransformerLens starts small models at
    0.8 / sqrt(d_model))."""
    from ..model import GPT2

    weights = weights_from_state_dict(init_state_dict(config, seed, std), config, dtype=np.dtype(dtype))
    return GPT2(config, weights, tokenizer, name=name)
