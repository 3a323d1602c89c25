"""The pure functions GPT-2 is made of. No state, no hooks: arrays in, arrays out.

Each works on any leading batch dimensions and keeps the input's float dtype (float32 or float64).
Beside each forward function ``f`` stands ``f_backward``: given the gradient of a scalar with
respect to f's output (``d_out``) and what the forward saw, it returns the gradient with respect to
f's inputs (the chain rule, one step). backward.py chains them from the logits back to the tokens.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

_GELU_C = math.sqrt(2.0 / math.pi)


def linear(x: np.ndarray, W: np.ndarray, b: np.ndarray | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """x @ W + b.  [..., n_in] @ [n_in, n_out] + [n_out] -> [..., n_out]

    The leading dimensions are flattened first so BLAS sees one large matmul, not one per batch row.
    ``out``: an array of the result's shape to write into (no new memory).
    """
    if out is None:
        out = (x.reshape(-1, x.shape[-1]) @ W).reshape(*x.shape[:-1], W.shape[-1])
    else:
        np.matmul(x, W, out=out)
    if b is not None:
        out += b
    return out


def linear_backward(d_out: np.ndarray, x: np.ndarray, W: np.ndarray, transpose_dW: bool = False,
                    weights: bool = True, columns: np.ndarray | None = None):
    """Gradients of x @ W + b.  d_out [..., n_out], x [..., n_in], W [n_in, n_out]
    -> (d_x [..., n_in], d_W [n_in, n_out], d_b [n_out])

    transpose_dW: compute d_W laid out as [n_out, n_in] (returned as its transposed view), for a W
    that is itself a transposed view, such as the tied unembedding W_E.T.
    weights=False: only d_x (d_W and d_b are None), when only activations' gradients are wanted.
    columns: the only outputs whose gradient may be non-zero (``nonzero_columns``), for a d_out
    that is zero elsewhere; only they take part (a metric of two logits reads 2 of W_U's 50257
    columns back, not all of them).
    """
    if columns is not None:
        d_x, d_W_part, d_b_part = linear_backward(d_out[..., columns], x, W[:, columns], weights=weights)
        if not weights:
            return d_x, None, None
        d_W = np.zeros(W.shape[::-1] if transpose_dW else W.shape, d_W_part.dtype)
        d_b = np.zeros(W.shape[1], d_b_part.dtype)
        (d_W.T if transpose_dW else d_W)[:, columns] = d_W_part
        d_b[columns] = d_b_part
        return d_x, (d_W.T if transpose_dW else d_W), d_b
    d_out_rows = d_out.reshape(-1, d_out.shape[-1])  # [rows, n_out]
    x_rows = x.reshape(-1, x.shape[-1])  # [rows, n_in]
    d_x = (d_out_rows @ W.T).reshape(x.shape)  # each input feeds every output through W
    if not weights:
        return d_x, None, None
    # summed over every row (batch and position)
    d_W = (d_out_rows.T @ x_rows).T if transpose_dW else x_rows.T @ d_out_rows
    return d_x, d_W, d_out_rows.sum(axis=0)


def nonzero_columns(d_out: np.ndarray, at_most: float = 0.25) -> np.ndarray | None:
    """The last axis's indices where d_out [..., n] is non-zero somewhere, when they are at most
    ``at_most`` of all (else None: use every column)."""
    rows = d_out.reshape(-1, d_out.shape[-1])
    if np.count_nonzero(rows[-1]) > at_most * rows.shape[1]:  # (a dense gradient, such as the loss's, shows at once)
        return None
    used = np.flatnonzero(np.any(rows != 0, axis=0))
    return used if len(used) <= at_most * rows.shape[1] else None


def center(x: np.ndarray) -> np.ndarray:
    """Subtract the mean over the last axis.  [..., d] -> [..., d]"""
    return x - x.mean(axis=-1, keepdims=True)


def center_backward(d_centred: np.ndarray) -> np.ndarray:
    """Gradient of ``center``: the same centring (its Jacobian I - 1/d is symmetric).  [..., d] -> [..., d]"""
    return d_centred - d_centred.mean(axis=-1, keepdims=True)


def ln_scale(x_centered: np.ndarray, eps: float) -> np.ndarray:
    """The layer-norm divisor sqrt(mean(x^2) + eps) of an already centred x.  [..., d] -> [..., 1]"""
    return np.sqrt(np.mean(x_centered * x_centered, axis=-1, keepdims=True) + eps)


def ln_scale_backward(d_scale: np.ndarray, normalized: np.ndarray) -> np.ndarray:
    """Gradient of ``ln_scale`` with respect to the centred x, written with normalized = x / scale:
    d scale / d x_i = x_i / (d * scale) = normalized_i / d.  d_scale [..., 1] -> [..., d]"""
    return d_scale * normalized / normalized.shape[-1]


def divide_backward(d_normalized: np.ndarray, normalized: np.ndarray, scale: np.ndarray):
    """Gradients of normalized = centred / scale.  -> (d_centred [..., d], d_scale [..., 1])"""
    d_centred = d_normalized / scale
    d_scale = -(d_normalized * normalized).sum(axis=-1, keepdims=True) / scale  # d (c/s) / ds = -c/s^2
    return d_centred, d_scale


def layer_norm(x: np.ndarray, w: np.ndarray | None, b: np.ndarray | None, eps: float,
               out: np.ndarray | None = None, normalized: np.ndarray | None = None,
               scale: np.ndarray | None = None) -> np.ndarray:
    """(x - mean) / sqrt(var + eps) * w + b over the last axis.  [..., d] -> [..., d]

    ``w``/``b`` may be None (a layer norm whose gain and bias were folded into the next matmul).
    ``out``: an array shaped like x, other than x, to write into. ``normalized`` [..., d] and
    ``scale`` [..., 1]: arrays to keep (x - mean) / scale and the scale in, for a backward pass
    (``layer_norm_backward``).
    """
    out = np.subtract(x, x.mean(axis=-1, keepdims=True), out=out)  # centred (as ``center``)
    divisor = ln_scale(out, eps)  # [..., 1]
    out /= divisor
    if scale is not None:
        scale[...] = divisor
    if normalized is not None:
        normalized[...] = out
    if w is not None:  # (as ``affine``, in place)
        out *= w
    if b is not None:
        out += b
    return out


def layer_norm_backward(d_out: np.ndarray, normalized: np.ndarray, scale: np.ndarray, w: np.ndarray | None,
                        weights: bool = True):
    """Gradients of ``layer_norm``, from what its forward computed: normalized = (x - mean) / scale
    [..., d] and scale [..., 1].  d_out [..., d] -> (d_x [..., d], d_w [d] or None, d_b [d])
    (``weights=False``: d_x only, the others None)

    The three steps of the forward undone in reverse (the gain and bias: affine_backward; the
    division by a scale that depends on x too: divide_backward and ln_scale_backward; the centring:
    center_backward) come to one expression, d_x = (d_n - mean(d_n) - n mean(d_n n)) / scale with
    d_n = d_out * w and n the normalized value (whose mean is 0). The model's backward takes the
    steps one by one instead, so that hooks can see ``hook_normalized``'s and ``hook_scale``'s
    gradients in between.
    """
    d_n = d_out if w is None else d_out * w  # [..., d]
    d_x = d_n - d_n.mean(axis=-1, keepdims=True)
    d_x -= normalized * (d_n * normalized).mean(axis=-1, keepdims=True)
    d_x /= scale
    if not weights:
        return d_x, None, None
    _, d_w, d_b = affine_backward(d_out, normalized, w)
    return d_x, d_w, d_b


def affine(x: np.ndarray, w: np.ndarray | None, b: np.ndarray | None) -> np.ndarray:
    """x * w + b, skipping a missing (folded) gain or bias.  [..., d] -> [..., d]"""
    x = x if w is None else x * w
    return x if b is None else x + b


def affine_backward(d_out: np.ndarray, x: np.ndarray, w: np.ndarray | None):
    """Gradients of x * w + b.  d_out, x [..., d] -> (d_x [..., d], d_w [d] or None, d_b [d])"""
    rows = tuple(range(d_out.ndim - 1))  # every axis but the last: the gain is shared by all rows
    d_w = None if w is None else (d_out * x).sum(axis=rows)
    return (d_out if w is None else d_out * w), d_w, d_out.sum(axis=rows)


def gelu_new(x: np.ndarray, out: np.ndarray | None = None, slope: np.ndarray | None = None) -> np.ndarray:
    """GPT-2's tanh approximation of GELU: 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3).

    [...] -> [...]. Computed as x / (1 + exp(-2u)), the same function (0.5 (1 + tanh(u)) is the
    logistic sigmoid of 2u): NumPy's exp costs about half its tanh, and where GELU is near 0
    (negative x) the quotient keeps digits that 1 + tanh(u), near 0 there, would cancel. Where
    exp(-2u) overflows (x below about -10) it is inf, and x / inf is GELU's limit, -0.
    Written with in-place steps so a [pos, d_mlp] activation costs one new array (or none:
    ``out``, an array shaped like x, other than x, receives the result). ``slope``: an array shaped
    like x (x itself may be it: it is written last) that receives d gelu / dx at x, for a backward
    pass, computed here while exp(-2u) is at hand (``gelu_new_backward`` recomputes it).
    """
    if slope is not None:
        return _gelu_and_slope(x, out, slope)[0]
    x_squared = np.multiply(x, x, out=out)
    denominator = _exp_minus_2u(x, x_squared, out=x_squared)
    denominator += 1.0  # 1 + exp(-2u)
    return np.divide(x, denominator, out=denominator)


def gelu_new_backward(d_out: np.ndarray, x: np.ndarray, overwrite: bool = False) -> np.ndarray:
    """Gradient of ``gelu_new`` at its input x.  d_out, x [...] -> d_x [...]
    (``overwrite=True``: written into d_out's memory, which no one else may be holding)

    With e = exp(-2u) and s = 1 / (1 + e) (the sigmoid of 2u, whose own slope is s (1 - s)),
    gelu = x s, so d gelu / dx = s + x s (1 - s) 2 du/dx = s + gelu (1 - s) 2 du/dx, with
    du/dx = sqrt(2/pi) (1 + 3 * 0.044715 x^2). 1 - s is taken as 1 / (1 + 1 / e), which is exact
    to a few roundings where s is near 1 (1 - s would be the difference of two numbers near 1).
    """
    _, slope = _gelu_and_slope(x)
    if overwrite:
        d_out *= slope
        return d_out
    slope *= d_out
    return slope


def _exp_minus_2u(x: np.ndarray, x_squared: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """exp(-2u) at x, given x^2: -2u = -2 sqrt(2/pi) (x + 0.044715 x^3).  [...] -> [...]"""
    e = np.multiply(x_squared, 0.044715, out=out)
    e *= x
    e += x
    e *= -2 * _GELU_C  # -2u, rounded as u is in the tanh form (the exponential magnifies its roundings)
    with np.errstate(over="ignore"):  # (inf where x < about -10: see gelu_new)
        return np.exp(e, out=e)


def _gelu_and_slope(x: np.ndarray, out: np.ndarray | None = None, slope: np.ndarray | None = None):
    """(gelu_new(x), d gelu_new / dx at x), as ``gelu_new_backward`` derives them, written into
    ``out`` and ``slope`` (new arrays where None; slope may be x itself).  [...] -> ([...], [...])"""
    x_squared = np.multiply(x, x)
    e = _exp_minus_2u(x, x_squared)  # exp(-2u)
    denominator = e + 1.0
    gelu = np.divide(x, denominator, out=out)  # gelu_new's steps, so its bits
    s = np.reciprocal(denominator, out=denominator)
    with np.errstate(divide="ignore", over="ignore"):  # (inf where exp(-2u) underflows, x above about 10: 1 - s = 0)
        one_minus_s = np.reciprocal(e, out=e)
    one_minus_s += 1.0
    np.reciprocal(one_minus_s, out=one_minus_s)
    two_du = x_squared
    two_du *= 6 * 0.044715 * _GELU_C
    two_du += 2 * _GELU_C  # 2 du/dx
    slope = np.multiply(two_du, one_minus_s, out=two_du if slope is None else slope)  # (x is read no more)
    slope *= gelu
    slope += s
    return gelu, slope


def softmax(x: np.ndarray, axis: int = -1, out: np.ndarray | None = None) -> np.ndarray:
    """exp(x) / sum(exp(x)) along ``axis``, shifted by the max for stability.  [...] -> [...]

    Entries of -inf get probability 0; a row that is -inf throughout (an attention query that sees
    only padding) becomes zeros, as TransformerLens makes it, rather than NaN. ``out``: an array
    shaped like x to write into (x itself is allowed: softmax in place).
    """
    top = x.max(axis=axis, keepdims=True)  # [..., 1]
    if not np.isfinite(top).all():  # rows of -inf only: shift by 0 instead (their exps are all 0)
        top = np.where(np.isfinite(top), top, 0)
    out = np.subtract(x, top, out=out)  # the largest entry becomes 0: exp cannot overflow
    out = out if out.dtype.kind == "f" else out.astype(np.float64)  # (integer input)
    np.exp(out, out=out)
    total = out.sum(axis=axis, keepdims=True)  # [..., 1]
    out /= np.where(total > 0, total, 1) if not total.all() else total
    return out


def softmax_backward(d_out: np.ndarray, out: np.ndarray, axis: int = -1) -> np.ndarray:
    """Gradient of ``softmax`` from its output p: d_x_i = p_i (d_out_i - sum_j p_j d_out_j).  [...] -> [...]

    (Its Jacobian is diag(p) - p p^T.) An entry with p = 0, such as a masked key, gets gradient 0.
    """
    return out * (d_out - (d_out * out).sum(axis=axis, keepdims=True))


def log_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """log(softmax(x)) computed without forming softmax.  [...] -> [...]"""
    shifted = x - x.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


def cross_entropy(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log softmax(logits)[target] of each row, from the log of the sum of exps (no softmax formed).
    logits [..., d_vocab], targets [...] int -> [...]"""
    return -np.take_along_axis(log_softmax(logits), targets[..., None], axis=-1)[..., 0]


def cross_entropy_backward(logits: np.ndarray, targets: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Gradient of sum_n weights_n * cross_entropy(logits_n, targets_n) with respect to the logits:
    weights_n * (softmax(logits_n) - onehot(targets_n)).
    logits [..., d_vocab], targets [...] int, weights [...] -> [..., d_vocab]"""
    d_logits = softmax(logits)
    np.put_along_axis(d_logits, targets[..., None],
                      np.take_along_axis(d_logits, targets[..., None], axis=-1) - 1.0, axis=-1)
    d_logits *= weights[..., None]
    return d_logits


def embedding_backward(d_embed: np.ndarray, tokens: np.ndarray, n_vocab: int, out=None) -> np.ndarray:
    """Gradient of the lookup W_E[tokens]: each position's gradient added to its token's row.
    d_embed [batch, pos, d_model], tokens [batch, pos] -> d_W_E [n_vocab, d_model]
    (added into ``out`` when given, e.g. the tied unembedding's gradient)"""
    d_W_E = np.zeros((n_vocab, d_embed.shape[-1]), dtype=d_embed.dtype) if out is None else out
    ids = tokens.reshape(-1)
    order = np.argsort(ids, kind="stable")  # the positions of each token side by side
    seen, first = np.unique(ids[order], return_index=True)
    # a token seen twice adds twice: sum each run of equal tokens
    d_W_E[seen] += np.add.reduceat(d_embed.reshape(-1, d_embed.shape[-1])[order], first, axis=0)
    return d_W_E


# Queries per block of the blockwise attention (here and in fast.py): a query's scores are summed
# over the keys its block sees, so one block size everywhere gives one set of bits everywhere.
QUERY_BLOCK = 128


@lru_cache(maxsize=16)
def causal_mask(n_query: int, n_key: int, dtype) -> np.ndarray:
    """Additive causal mask: 0 where query i may see key j, -inf where j lies in its future.

    [n_query, n_key]. Queries are the last ``n_query`` of the ``n_key`` positions (with a key/value
    cache from earlier steps, n_key > n_query).
    """
    mask = np.triu(np.full((n_query, n_key), -np.inf, dtype), k=n_key - n_query + 1)  # j > i + offset
    mask.flags.writeable = False  # shared between calls (cached)
    return mask


def causal_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, block: int = QUERY_BLOCK,
                     padding: np.ndarray | None = None) -> np.ndarray:
    """softmax(q k^T + causal_mask) v, a block of queries at a time, never forming the whole
    [query_pos, key_pos] score matrix.

    q: [batch, head, query_pos, d_head], already divided by sqrt(d_head); k, v: [batch, head,
    key_pos, d_head], the queries being the last query_pos positions. -> [batch, head, query_pos, d_head].

    Each block of queries is multiplied only with the keys it may see, and its scores, pattern and
    output are finished before the next block: the numbers of the eager computation (model.py), for
    about half the arithmetic and a block-sized working set. The model uses it when no one asks for
    the scores or the pattern. ``padding``: [batch, 1, 1, key_pos], -inf at padding keys (see
    ``inputs.padding_mask``), added to the scores too.
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
        if padding is not None:
            scores += padding[..., :visible]
        z[:, :, start:stop] = softmax(scores) @ v[:, :, :visible]
    return z


def causal_attention_kept(q: np.ndarray, k: np.ndarray, v: np.ndarray, block: int = QUERY_BLOCK,
                          padding: np.ndarray | None = None):
    """``causal_attention`` that also hands back the whole scores and pattern, for a cache that keeps
    them: -> (scores, pattern, z), scores and pattern [batch, head, query_pos, key_pos] as the eager
    computation makes them (scores -inf and pattern 0 where a key lies in a query's future), z as
    ``causal_attention``'s (``padding`` too). A block of queries at a time, against only the keys
    it may see: half the products and exponentials of the eager path, and no temporary as large as
    the scores.
    """
    n_q, n_k = q.shape[2], k.shape[2]
    offset = n_k - n_q
    dtype = np.result_type(q, k)
    scores = np.empty(q.shape[:2] + (n_q, n_k), dtype)  # [batch, head, query_pos, key_pos]
    pattern = np.empty_like(scores)
    z = np.empty(q.shape, dtype=np.result_type(q, v))  # [batch, head, query_pos, d_head]
    k_t = np.ascontiguousarray(k.swapaxes(-1, -2))  # [batch, head, d_head, key_pos]
    for start in range(0, n_q, block):
        stop = min(start + block, n_q)
        visible = offset + stop
        seen = scores[:, :, start:stop, :visible]  # [batch, head, block, visible]
        np.matmul(q[:, :, start:stop], k_t[..., :visible], out=seen)
        seen += causal_mask(stop - start, visible, dtype)
        if padding is not None:
            seen += padding[..., :visible]
        scores[:, :, start:stop, visible:] = -np.inf
        p = softmax(seen, out=pattern[:, :, start:stop, :visible])
        pattern[:, :, start:stop, visible:] = 0
        z[:, :, start:stop] = p @ v[:, :, :visible]
    return scores, pattern, z


def causal_attention_backward(d_z: np.ndarray, q: np.ndarray, k: np.ndarray, v: np.ndarray,
                              z: np.ndarray, block: int = QUERY_BLOCK, padding: np.ndarray | None = None):
    """Gradients of ``causal_attention``, recomputing each block's pattern instead of storing it.
    d_z, z [batch, head, query_pos, d_head] (z: the forward's output); q (already divided by
    sqrt(d_head)), k, v, padding as in the forward.  -> (d_q, d_k, d_v), shaped as q, k, v

    Per block of queries: pattern = softmax(q k^T + mask) again; then z = pattern v gives
    d_pattern = d_z v^T and d_v += pattern^T d_z; the softmax gives d_scores (its row sum
    sum_k pattern d_pattern is d_z . z, a product over d_head instead of over the keys);
    scores = q k^T gives d_q = d_scores k and d_k += d_scores^T q. Keys and values collect from
    every block that sees them.
    """
    n_q, n_k = q.shape[2], k.shape[2]
    offset = n_k - n_q
    d_q = np.empty_like(q)
    d_k = np.zeros(k.shape, dtype=np.result_type(q, k))
    d_v = np.zeros(v.shape, dtype=np.result_type(q, v))
    for start in range(0, n_q, block):
        stop = min(start + block, n_q)
        visible = offset + stop
        q_blk, k_vis, v_vis = q[:, :, start:stop], k[:, :, :visible], v[:, :, :visible]
        scores = q_blk @ k_vis.swapaxes(-1, -2)  # [batch, head, block, visible]
        scores += causal_mask(stop - start, visible, scores.dtype)
        if padding is not None:
            scores += padding[..., :visible]
        pattern = softmax(scores)  # [batch, head, block, visible]
        d_z_blk = d_z[:, :, start:stop]  # [batch, head, block, d_head]
        d_v[:, :, :visible] += pattern.swapaxes(-1, -2) @ d_z_blk
        row_sums = (d_z_blk * z[:, :, start:stop]).sum(axis=-1, keepdims=True)  # [batch, head, block, 1]
        d_scores = d_z_blk @ v_vis.swapaxes(-1, -2)  # d_pattern, [batch, head, block, visible]
        d_scores -= row_sums
        d_scores *= pattern  # = softmax_backward(d_pattern, pattern)
        d_q[:, :, start:stop] = d_scores @ k_vis
        d_k[:, :, :visible] += d_scores.swapaxes(-1, -2) @ q_blk
    return d_q, d_k, d_v
