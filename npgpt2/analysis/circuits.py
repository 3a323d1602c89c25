"""Circuits in the weights: each head's QK and OV matrices, kept factored (d_model x d_head times
d_head x d_model, never a d_model x d_model array unless asked), their top singular directions read
as vocabulary tokens, and composition scores between heads of different layers."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..factored_matrix import FactoredMatrix  # noqa: F401  (its old import path)

def qk_circuit(model) -> FactoredMatrix:
    """W_Q W_K^T per head: [layer, head, d_model (query side), d_model (key side)]."""
    return FactoredMatrix(model.W_Q, model.W_K.swapaxes(-1, -2))


def ov_circuit(model) -> FactoredMatrix:
    """W_V W_O per head: [layer, head, d_model (read), d_model (written)]."""
    return FactoredMatrix(model.W_V, model.W_O)


def _check_head(model, layer, head):
    if not 0 <= layer < model.cfg.n_layer or not 0 <= head < model.cfg.n_head:
        raise ValueError(f"head ({layer}, {head}) is out of range: layers 0..{model.cfg.n_layer - 1}, "
                         f"heads 0..{model.cfg.n_head - 1}")


def singular_directions(model, layer: int, head: int, circuit: str = "OV", k: int = 3,
                        top_tokens: int = 8) -> pd.DataFrame:
    """The top ``k`` singular directions of one head's OV or QK circuit, read as tokens.

    For OV: ``reads`` = tokens whose embeddings (W_E) align most with the input singular vector,
    ``writes`` = tokens whose unembeddings (W_U) align most with the output singular vector (what
    the head copies from what). For QK: ``query`` and ``key`` sides, both read through W_E.
    """
    _check_head(model, layer, head)
    if circuit not in ("OV", "QK"):
        raise ValueError(f"circuit={circuit!r}: expected 'OV' or 'QK'")
    fm = (ov_circuit if circuit == "OV" else qk_circuit)(model)[layer, head]
    U, S, V = fm.svd()
    tok = model.tokenizer.token_str
    E = model.W_E
    rows = []
    for i in range(min(k, len(S))):
        u, v = U[:, i], V[:, i]
        left = E @ u
        right = (v @ model.W_U) if circuit == "OV" else (E @ v)
        # a singular pair is defined up to a joint sign: report the sign that makes the right side positive
        sign = 1.0 if right.max() >= -right.min() else -1.0
        left, right = left * sign, right * sign
        names = ("reads", "writes") if circuit == "OV" else ("query", "key")
        rows.append({"layer": layer, "head": head, "circuit": circuit, "rank": i, "singular_value": float(S[i]),
                     names[0]: [tok(t) for t in np.argsort(-left)[:top_tokens]],
                     names[1]: [tok(t) for t in np.argsort(-right)[:top_tokens]]})
    return pd.DataFrame(rows)


def composition_scores(model, mode: str = "Q") -> np.ndarray:
    """How much each head reads what an earlier head writes: ||left @ right||_F / (||left||_F ||right||_F)
    with left = the earlier head's OV and right = the later head's QK (mode "Q": through its
    queries), QK^T ("K": through its keys) or OV ("V": through its values).

    [layer1, head1, layer2, head2]; NaN unless layer1 < layer2. Computed on the d_head-sized middle
    factors only.
    """
    if mode not in ("Q", "K", "V"):
        raise ValueError(f"mode={mode!r}: expected 'Q', 'K' or 'V'")
    ov = ov_circuit(model)
    right = {"Q": qk_circuit(model), "K": qk_circuit(model).T, "V": ov}[mode]
    # ||A1 B1 A2 B2|| = ||R1 (B1 A2) R2^T|| with A1 = Q1 R1 and B2^T = Q2 R2 (Q's orthonormal)
    _, R1 = np.linalg.qr(ov.A)  # [L, H, r, r]
    _, R2 = np.linalg.qr(right.B.swapaxes(-1, -2))  # [L, H, r, r]
    left_norm, right_norm = ov.norm(), right.norm()  # [L, H]
    L, H = model.cfg.n_layer, model.cfg.n_head
    out = np.full((L, H, L, H), np.nan)
    for l1 in range(L):
        for l2 in range(l1 + 1, L):
            middle = ov.B[l1][:, None] @ right.A[l2][None]  # [H1, H2, r, r]
            core = R1[l1][:, None] @ middle @ R2[l2][None].swapaxes(-1, -2)
            out[l1, :, l2, :] = np.linalg.norm(core, axis=(-2, -1)) / (left_norm[l1][:, None] * right_norm[l2][None])
    return out


def composition_frame(model, modes=("Q", "K", "V")) -> pd.DataFrame:
    """Composition scores of every pair (earlier head -> later head) for each mode, tidy and sorted
    (largest first): columns mode, layer1, head1, layer2, head2, score."""
    frames = []
    for mode in modes:
        s = composition_scores(model, mode)
        l1, h1, l2, h2 = np.nonzero(~np.isnan(s))
        frames.append(pd.DataFrame({"mode": mode, "layer1": l1, "head1": h1, "layer2": l2, "head2": h2,
                                    "score": s[l1, h1, l2, h2]}))
    return pd.concat(frames).sort_values("score", ascending=False, kind="stable").reset_index(drop=True)
