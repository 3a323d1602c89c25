"""The pure functions GPT-2 is made of. No state, no hooks: arrays in, arrays out.

Each works on any leading batch dimensions and keeps the input's float dtype (float32 or float64).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

_GELU_C = math.sqrt(2.0 / math.pi)


def linear(x: np.ndarray, W: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """x @ W + b.  [..., n_in] @ [n_in, n_out] + [n_out] -> [..., n_out]

    The leading dimensions are flattened first so BLAS sees one large matmul, not one per batch row.
    """
    out = (x.reshape(-1, x.shape[-1]) @ W).reshape(*x.shape[:-1], W.shape[-1])
    if b is not None:
        out += b
    return out


def center(x: np.ndarray) -> np.ndarray:
    """Subtract the mean over the last axis.  [..., d] -> [..., d]"""
    return x - x.mean(axis=-1, keepdims=True)


def ln_scale(x_centered: np.ndarray, eps: float) -> np.ndarray:
    """The layer-norm divisor sqrt(mean(x^2) + eps) of an already centred x.  [..., d] -> [..., 1]"""
    return np.sqrt(np.mean(x_centered * x_centered, axis=-1, keepdims=True) + eps)


def layer_norm(x: np.ndarray, w: np.ndarray | None, b: np.ndarray | None, eps: float) -> np.ndarray:
    """(x - mean) / sqrt(var + eps) * w + b over the last axis.  [..., d] -> [..., d]

    ``w``/``b`` may be None (a layer norm whose gain and bias were folded into the next matmul).
    """
    x = center(x)
    x = x / ln_scale(x, eps)
    return affine(x, w, b)


def affine(x: np.ndarray, w: np.ndarray | None, b: np.ndarray | None) -> np.ndarray:
    """x * w + b, skipping a missing (folded) gain or bias.  [..., d] -> [..., d]"""
    x = x if w is None else x * w
    return x if b is None else x + b


def gelu_new(x: np.ndarray) -> np.ndarray:
    """GPT-2's tanh approximation of GELU: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).

    [...] -> [...]. Written with in-place steps so a [pos, d_mlp] activation costs one new array.
    """
    inner = x * x
    inner *= 0.044715 * x
    inner += x
    inner *= _GELU_C
    np.tanh(inner, out=inner)
    inner += 1.0
    inner *= x
    inner *= 0.5
    return inner


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """exp(x) / sum(exp(x)) along ``axis``, shifted by the max for stability.  [...] -> [...]

    Entries of -inf get probability 0 (as long as each row has one finite entry).
    """
    out = x - x.max(axis=axis, keepdims=True)
    np.exp(out, out=out)
    out /= out.sum(axis=axis, keepdims=True)
    return out


def log_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """log(softmax(x)) computed without forming softmax.  [...] -> [...]"""
    shifted = x - x.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


@lru_cache(maxsize=16)
def causal_mask(n_query: int, n_key: int, dtype) -> np.ndarray:
    """Additive causal mask: 0 where query i may see key j, -inf where j lies in its future.

    [n_query, n_key]. Queries are the last ``n_query`` of the ``n_key`` positions (with a key/value
    cache from earlier steps, n_key > n_query).
    """
    mask = np.triu(np.full((n_query, n_key), -np.inf, dtype), k=n_key - n_query + 1)  # j > i + offset
    mask.flags.writeable = False  # shared between calls (cached)
    return mask


def causal_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, block: int = 64) -> np.ndarray:
    """softmax(q k^T + causal_mask) v, a block of queries at a time, never forming the whole
    [query_pos, key_pos] score matrix.

    q: [batch, head, query_pos, d_head], already divided by sqrt(d_head); k, v: [batch, head,
    key_pos, d_head], the queries being the last query_pos positions. -> [batch, head, query_pos, d_head].

    Each block of queries is multiplied only with the keys it may see, and its scores, pattern and
    output are finished before the next block: the numbers of the eager computation (model.py), for
    about half the arithmetic and a block-sized working set. The model uses it when no one asks for
    the scores or the pattern.
    """
    n_q, n_k = q.shape[2], k.shape[2]
    offset = n_k - n_q
    k_t = k.swapaxes(-1, -2)  # [batch, head, d_head, key_pos]
    if n_q > block:  # several blocks will read it: lay it out once for fast products
        k_t = np.ascontiguousarray(k_t)
    z = np.empty(q.shape, dtype=np.result_type(q, v))  # [batch, head, query_pos, d_head]
    for start in range(0, n_q, block):
        stop = min(start + block, n_q)
        visible = offset + stop  # keys 0 .. visible-1 are in the past of this block's last query
        scores = q[:, :, start:stop] @ k_t[..., :visible]  # [batch, head, block, visible]
        scores += causal_mask(stop - start, visible, scores.dtype)
        z[:, :, start:stop] = softmax(scores) @ v[:, :, :visible]
    return z
