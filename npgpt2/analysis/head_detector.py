"""Find attention heads of a known kind by comparing their patterns with a detection pattern
(TransformerLens's ``head_detector``, same signature and scores), and measure induction."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from .. import ops
from ..inputs import InputError, is_text

HEAD_NAMES = ("previous_token_head", "duplicate_token_head", "induction_head")


def get_previous_token_head_detection_pattern(tokens: np.ndarray) -> np.ndarray:
    """[pos, pos]: 1 where a query attends to the position just before it."""
    n = np.asarray(tokens).shape[-1]
    return np.eye(n, k=-1)


def get_duplicate_token_head_detection_pattern(tokens: np.ndarray) -> np.ndarray:
    """[pos, pos]: 1 where an earlier position holds the same token as the query."""
    t = np.asarray(tokens).reshape(-1)
    same = (t[:, None] == t[None, :]).astype(float)
    np.fill_diagonal(same, 0)
    return np.tril(same)


def get_induction_head_detection_pattern(tokens: np.ndarray) -> np.ndarray:
    """[pos, pos]: 1 on the token *after* an earlier occurrence of the query's token."""
    dup = get_duplicate_token_head_detection_pattern(tokens)
    shifted = np.zeros_like(dup)
    shifted[:, 1:] = dup[:, :-1]
    return np.tril(shifted)


_PATTERNS = {
    "previous_token_head": get_previous_token_head_detection_pattern,
    "duplicate_token_head": get_duplicate_token_head_detection_pattern,
    "induction_head": get_induction_head_detection_pattern,
}


def compute_head_attention_similarity_score(attention_pattern: np.ndarray, detection_pattern: np.ndarray, *,
                                            exclude_bos: bool, exclude_current_token: bool,
                                            error_measure: str) -> float:
    """How well one head's pattern [q, k] matches a detection pattern [q, k].

    "mul": the share of the head's attention that falls where the detection pattern is 1.
    "abs": 1 - (mean absolute difference * size), rounded to 3 decimals (1 = perfect match).
    """
    pattern = np.array(attention_pattern, dtype=np.float64)
    if error_measure == "mul":
        if exclude_bos:
            pattern[:, 0] = 0
        if exclude_current_token:
            np.fill_diagonal(pattern, 0)
        return float((pattern * detection_pattern).sum() / pattern.sum())
    diff = np.abs(pattern - detection_pattern)
    if exclude_bos:
        diff[:, 0] = 0
    if exclude_current_token:
        np.fill_diagonal(diff, 0)
    return 1 - round(float(diff.mean() * len(diff)), 3)


def detect_head(model, seq, detection_pattern, heads=None, cache=None, *, exclude_bos: bool = False,
                exclude_current_token: bool = False, error_measure: str = "mul",
                prepend_bos: bool | None = None) -> np.ndarray:
    """Score every head (or the given ``heads``) against a detection pattern: [n_layer, n_head],
    -1 for heads not scored.

    seq: a text, a list of texts (scores averaged), or token ids [pos] / [1, pos].
    detection_pattern: one of ``HEAD_NAMES`` or a lower-triangular [pos, pos] array.
    heads: [(layer, head), ...] or {layer: [heads]}.
    Texts get a BOS as ``prepend_bos`` says (None: ``model.cfg.default_prepend_bos``, False unless
    set); pass ids to choose exactly.
    """
    if is_text(seq) and not isinstance(seq, str):
        return np.mean([detect_head(model, s, detection_pattern, heads, None, exclude_bos=exclude_bos,
                                    exclude_current_token=exclude_current_token, error_measure=error_measure,
                                    prepend_bos=prepend_bos)
                        for s in seq], axis=0)
    if error_measure not in ("mul", "abs"):
        raise ValueError(f"error_measure={error_measure!r}: expected 'mul' or 'abs'")
    tokens, _ = model.tokens_and_mask(seq, prepend_bos=prepend_bos)
    if tokens.shape[0] != 1:
        raise InputError(f"detect_head takes one sequence (or a list of texts); got a batch of {tokens.shape[0]}")
    n = tokens.shape[1]
    if isinstance(detection_pattern, str):
        if detection_pattern not in _PATTERNS:
            raise ValueError(f"unknown head type {detection_pattern!r}; expected one of {', '.join(HEAD_NAMES)} "
                             "or a [pos, pos] array")
        detection_pattern = _PATTERNS[detection_pattern](tokens[0])
    detection_pattern = np.asarray(detection_pattern, dtype=np.float64)
    if not 1 < n < model.cfg.n_ctx:
        raise InputError(f"the sequence has {n} tokens; expected between 2 and {model.cfg.n_ctx - 1}")
    if detection_pattern.shape != (n, n) or np.triu(detection_pattern, 1).any():
        raise ValueError(f"the detection pattern must be lower-triangular of shape ({n}, {n}) for a "
                         f"{n}-token sequence; got shape {detection_pattern.shape}")
    if error_measure == "mul" and not set(np.unique(detection_pattern)) <= {0.0, 1.0}:
        warnings.warn("a detection pattern with values other than 0 and 1 used with error_measure='mul'")
    if cache is None:
        _, cache = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_pattern"))
    layer_heads = _layer_heads(model, heads)
    scores = -np.ones((model.cfg.n_layer, model.cfg.n_head))
    for layer, hs in layer_heads.items():
        patterns = cache["pattern", layer][0]  # [head, q, k]
        for h in hs:
            scores[layer, h] = compute_head_attention_similarity_score(
                patterns[h], detection_pattern, exclude_bos=exclude_bos,
                exclude_current_token=exclude_current_token, error_measure=error_measure)
    return scores


def _layer_heads(model, heads) -> dict[int, list[int]]:
    n_layer, n_head = model.cfg.n_layer, model.cfg.n_head
    if heads is None:
        return {l: list(range(n_head)) for l in range(n_layer)}
    pairs = [(l, h) for l, hs in heads.items() for h in hs] if isinstance(heads, dict) else list(heads)
    out: dict[int, list[int]] = {}
    for l, h in pairs:
        if not (0 <= l < n_layer and 0 <= h < n_head):
            raise InputError(f"head ({l}, {h}) is out of range: layers 0..{n_layer - 1}, heads 0..{n_head - 1}")
        out.setdefault(l, []).append(h)
    return out


def repeated_tokens(model, seq_len: int = 50, n_repeats: int = 2, batch: int = 1, seed: int = 0,
                    prepend_bos: bool = True) -> np.ndarray:
    """Random tokens repeated: [batch, (bos) + seq_len * n_repeats]. A model with induction heads
    predicts every repeat far better than the first copy."""
    if seq_len < 1 or n_repeats < 2:
        raise ValueError(f"seq_len={seq_len}, n_repeats={n_repeats}: expected seq_len >= 1 and n_repeats >= 2")
    total = seq_len * n_repeats + (1 if prepend_bos else 0)
    if total > model.cfg.n_ctx:
        raise InputError(f"{total} tokens exceed n_ctx={model.cfg.n_ctx}; use a shorter seq_len")
    rng = np.random.default_rng(seed)
    high = min(model.cfg.d_vocab, model.tokenizer.eot_token)  # ordinary tokens, not <|endoftext|>
    body = np.tile(rng.integers(0, high, (batch, seq_len)), (1, n_repeats))
    if prepend_bos:
        body = np.concatenate([np.full((batch, 1), model.tokenizer.eot_token % model.cfg.d_vocab), body], axis=1)
    return body.astype(np.int64)


def induction_scores(model, seq_len: int = 50, n_repeats: int = 2, batch: int = 4, seed: int = 0):
    """Induction on repeated random tokens.

    Returns (scores [n_layer, n_head], loss_by_position): a head's score is its mean attention,
    over every position in the repeats, to the token right after that position's token occurred
    one period earlier (the induction target; 1 = a perfect induction head). ``loss_by_position``
    is a DataFrame of the per-token loss (mean over the batch) with the copy each position is in:
    the drop from copy 0 to the repeats is what induction buys.
    """
    tokens = repeated_tokens(model, seq_len, n_repeats, batch, seed)
    logits, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_pattern"))
    offset = 1  # the BOS
    n = tokens.shape[1]
    q = np.arange(offset + seq_len, n)  # queries in the repeats
    target = q - seq_len + 1  # the token after the same token, one period back
    scores = np.stack([cache["pattern", l][:, :, q, target].mean(axis=(0, 2)) for l in range(model.cfg.n_layer)])
    nll = ops.cross_entropy(logits[:, :-1].astype(np.float64), tokens[:, 1:]).mean(0)  # [n - 1]
    pos = np.arange(1, n)  # the position of the predicted token
    loss = pd.DataFrame({"position": pos, "copy": (pos - offset) // seq_len, "loss": nll})
    return scores, loss
