"""Weight processing, as TransformerLens does it: rewrite the weights so the model computes the same
log-probabilities while its parts are easier to read.

* ``fold_ln``: each layer norm's gain and bias move into the matmul that reads it (W_Q/W_K/W_V,
  W_in, W_U), whose input-side mean is then removed; the layer norms keep only "centre and divide
  by the scale". ``hook_normalized`` (taken before gain and bias) is unchanged by this.
* ``center_writing_weights``: everything that writes to the residual stream (W_E, W_pos, W_O, b_O,
  W_out, b_out) has its mean over d_model removed: every reader centres its input anyway.
* ``center_unembed``: W_U (and b_U) lose their mean over the vocabulary, which shifts each
  position's logits by a constant: softmax does not see it.
* ``fold_value_biases``: b_V moves into b_O (b_O += sum_h b_V[h] @ W_O[h]), exact because each
  attention pattern row sums to 1.
* ``refactor_factored_attn_matrices``: only the products W_QK = W_Q W_K^T and W_OV = W_V W_O fix
  what a head does, so each pair is refactored into an even, orthogonal one (TransformerLens's, from
  "A Mathematical Framework for Transformer Circuits"): with the biases appended as a (d_model+1)th
  input row, W_QK's SVD U S V^T gives W_Q = U sqrt(S), W_K = V sqrt(S); W_OV's gives W_V = U S and
  W_O = V^T (a rotation: z has the norm of the head's output), b_V folded into b_O first. The
  signs of singular vectors are arbitrary: a column of W_Q and of W_K (or of W_V and a row of W_O)
  may flip together against TransformerLens's, leaving every product unchanged.

Each function returns new arrays (the loaded ones are read-only memory maps) and leaves the
forward pass's layout as it is.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .config import GPT2Config
from .weights import GPT2Weights


def _fold(w, b, W, bias):
    """Fold a layer norm's gain ``w`` and bias ``b`` into the linear map (W, bias) that reads it,
    then remove W's mean over its input (d_model) axis. W: [d_model, n_out], bias: [n_out]."""
    bias = (bias if bias is not None else 0) + b @ W
    W = w[:, None] * W
    return W - W.mean(axis=0, keepdims=True), bias


def apply_fold_ln(weights: GPT2Weights) -> GPT2Weights:
    """``fold_ln``: every layer norm's gain and bias moved into the weights that read it."""
    if weights.ln_final_w is None:
        raise ValueError("the layer norms are already folded")
    blocks = []
    for blk in weights.blocks:
        W_qkv, b_qkv = _fold(blk.ln1_w, blk.ln1_b, blk.W_qkv, blk.b_qkv)
        W_in, b_in = _fold(blk.ln2_w, blk.ln2_b, blk.W_in, blk.b_in)
        blocks.append(dataclasses.replace(blk, W_qkv=W_qkv, b_qkv=b_qkv, W_in=W_in, b_in=b_in,
                                          ln1_w=None, ln1_b=None, ln2_w=None, ln2_b=None))
    W_U, b_U = _fold(weights.ln_final_w, weights.ln_final_b, weights.W_U, weights.b_U)
    return dataclasses.replace(weights, blocks=blocks, W_U=W_U, b_U=b_U, ln_final_w=None,
                               ln_final_b=None)


def apply_center_writing_weights(weights: GPT2Weights) -> GPT2Weights:
    """``center_writing_weights``: the mean over d_model removed from everything that writes to the residual stream."""
    def centred(x):  # remove the mean over the last (d_model) axis
        return x - x.mean(axis=-1, keepdims=True)

    blocks = [dataclasses.replace(b, W_O=centred(b.W_O), b_O=centred(b.b_O),
                                  W_out=centred(b.W_out), b_out=centred(b.b_out))
              for b in weights.blocks]
    # W_U keeps the uncentred embedding (it was a view of it, and the unembedding reads no stream)
    return dataclasses.replace(weights, W_E=centred(weights.W_E), W_pos=centred(weights.W_pos),
                               blocks=blocks, W_U=np.array(weights.W_U))


def apply_center_unembed(weights: GPT2Weights) -> GPT2Weights:
    """``center_unembed``: W_U and b_U centred over the vocabulary."""
    W_U = weights.W_U - weights.W_U.mean(axis=-1, keepdims=True)
    b_U = None if weights.b_U is None else weights.b_U - weights.b_U.mean()
    return dataclasses.replace(weights, W_U=W_U, b_U=b_U)


def apply_fold_value_biases(weights: GPT2Weights, cfg: GPT2Config) -> GPT2Weights:
    """``fold_value_biases``: b_V moved into b_O."""
    D = cfg.d_model
    blocks = []
    for b in weights.blocks:
        b_V = b.b_qkv[2 * D :]  # [n_head * d_head], head after head, as W_O's rows
        b_qkv = np.concatenate([b.b_qkv[: 2 * D], np.zeros_like(b_V)])
        blocks.append(dataclasses.replace(b, b_qkv=b_qkv, b_O=b.b_O + b_V @ b.W_O))
    return dataclasses.replace(weights, blocks=blocks)


def _svd_of_product(A: np.ndarray, B: np.ndarray):
    """The thin SVD of A @ B without forming it, as TransformerLens's FactoredMatrix does: A [..., m,
    r], B [..., r, n] -> (U [..., m, r], S [..., r], V [..., n, r]) with A @ B = U diag(S) V^T."""
    Ua, Sa, Vha = np.linalg.svd(A, full_matrices=False)
    Ub, Sb, Vhb = np.linalg.svd(B, full_matrices=False)
    middle = Sa[..., :, None] * (Vha @ Ub) * Sb[..., None, :]  # [..., r, r]
    Um, Sm, Vhm = np.linalg.svd(middle)
    return Ua @ Um, Sm, (Vhm @ Vhb).swapaxes(-1, -2)


def apply_refactor_factored_attn_matrices(weights: GPT2Weights, cfg: GPT2Config) -> GPT2Weights:
    """TransformerLens's ``refactor_factored_attn_matrices``: each head's W_Q, W_K (with their
    biases) and W_V, W_O rewritten as balanced factors of the same W_QK = U S V^T (W_Q = U sqrt(S),
    W_K = V sqrt(S)) and W_OV (W_V = U S, W_O = V^T, orthonormal rows), b_V folded into b_O. What
    each head computes is unchanged. The SVDs run in float64."""
    D, H, Dh = cfg.d_model, cfg.n_head, cfg.d_head
    blocks = []
    for b in weights.blocks:
        W = b.W_qkv.astype(np.float64).reshape(D, 3, H, Dh).transpose(1, 2, 0, 3)  # [q|k|v, head, d_model, d_head]
        bias = b.b_qkv.astype(np.float64).reshape(3, H, Dh)  # [q|k|v, head, d_head]
        # QK: the biases as an extra input row, so that (x W_Q + b_Q)(y W_K + b_K)^T is kept
        W_Q_eff = np.concatenate([W[0], bias[0][:, None, :]], axis=1)  # [head, d_model + 1, d_head]
        W_K_eff = np.concatenate([W[1], bias[1][:, None, :]], axis=1)  # [head, d_model + 1, d_head]
        U, S, V = _svd_of_product(W_Q_eff, W_K_eff.swapaxes(-1, -2))
        W_Q_eff, W_K_eff = U * np.sqrt(S)[:, None, :], V * np.sqrt(S)[:, None, :]
        # OV: b_V into b_O, then W_V W_O = U S V^T
        W_O = b.W_O.astype(np.float64).reshape(H, Dh, D)  # [head, d_head, d_model]
        b_O = b.b_O + np.einsum("hd,hdm->m", bias[2], W_O)  # [d_model]
        U, S, V = _svd_of_product(W[2], W_O)
        W_V, W_O = U * S[:, None, :], V.swapaxes(-1, -2)  # [head, d_model, d_head], [head, d_head, d_model]
        W_qkv = np.stack([W_Q_eff[:, :-1], W_K_eff[:, :-1], W_V])  # [q|k|v, head, d_model, d_head]
        b_qkv = np.stack([W_Q_eff[:, -1], W_K_eff[:, -1], np.zeros((H, Dh))])  # [q|k|v, head, d_head]
        dtype = b.W_qkv.dtype
        blocks.append(dataclasses.replace(
            b, W_qkv=W_qkv.transpose(2, 0, 1, 3).reshape(D, 3 * D).astype(dtype), b_qkv=b_qkv.reshape(3 * D).astype(dtype),
            W_O=W_O.reshape(D, D).astype(dtype), b_O=b_O.astype(dtype)))
    return dataclasses.replace(weights, blocks=blocks)


def process_weights(weights: GPT2Weights, cfg: GPT2Config, fold_ln: bool = False,
                    center_writing_weights: bool = False, center_unembed: bool = False,
                    fold_value_biases: bool = False, refactor_factored_attn_matrices: bool = False) -> GPT2Weights:
    """Apply the chosen steps in TransformerLens's order (fold, centre writers, centre unembed,
    fold value biases, refactor the attention matrices)."""
    if fold_ln:
        weights = apply_fold_ln(weights)
    if center_writing_weights:
        weights = apply_center_writing_weights(weights)
    if center_unembed:
        weights = apply_center_unembed(weights)
    if fold_value_biases:
        weights = apply_fold_value_biases(weights, cfg)
    if refactor_factored_attn_matrices:
        weights = apply_refactor_factored_attn_matrices(weights, cfg)
    return weights
