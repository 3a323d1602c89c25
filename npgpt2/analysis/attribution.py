"""Direct logit attribution: how much each component's direct write into the residual stream
raises the logit of an answer (or the difference between an answer and a wrong answer)."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

_LABEL = re.compile(r"(?:(\d+)_(attn|mlp)_out|L(\d+)H(\d+)|L(\d+)N(\d+))$")


def _answer_ids(model, answer, batch: int, what: str) -> np.ndarray:
    """An answer (id, one-token string, or one per prompt) -> ids [batch]."""
    items = answer if isinstance(answer, (list, tuple, np.ndarray)) else [answer] * batch
    if len(items) != batch:
        raise ValueError(f"{what} has {len(items)} entries for {batch} prompts")
    ids = [model.to_single_token(a) if isinstance(a, str) else a for a in items]
    return model.validate_tokens(np.asarray(ids, dtype=np.int64))[0]


def _describe(label: str) -> dict:
    m = _LABEL.match(label)
    row = {"component": label, "type": label, "layer": pd.NA, "head": pd.NA, "neuron": pd.NA}
    if m and m.group(1) is not None:
        row.update(type=m.group(2), layer=int(m.group(1)))
    elif m and m.group(3) is not None:
        row.update(type="head", layer=int(m.group(3)), head=int(m.group(4)))
    elif m and m.group(5) is not None:
        row.update(type="neuron", layer=int(m.group(5)), neuron=int(m.group(6)))
    return row


def direct_logit_attribution(model, cache, tokens, answer, wrong_answer=None, by: str = "layer",
                             pos=-1) -> pd.DataFrame:
    """Each component's direct contribution to the answer's logit (minus the wrong answer's).

    model, cache: from ``model.run_with_cache(tokens)``. tokens: [batch, pos] (for the batch size).
    answer, wrong_answer: a token id or one-token string, or one per prompt.
    by: "layer" (embed, pos_embed, each attention layer, each MLP), "head" (every head, each MLP,
        embed, pos_embed, the summed biases) or "neuron" (every head and every MLP neuron).
    pos: the position read (default the last), or one per prompt (e.g. the last real token of
        right-padded prompts).

    Method: the final layer norm's scale is frozen at its value in this run, so the stream it
    normalises is a sum of the components' centred writes divided by that scale; each component's
    attribution is that term dotted with the answer's unembedding direction, times the final gain.
    The row ``final_ln_bias+b_U`` holds what no component writes (the final layer norm's bias and
    b_U along the direction), so the rows add up exactly to the logit (difference) the model
    produces; ``df.attrs["logit_diff"]`` holds that value per prompt.

    Returns one row per component, sorted by the mean attribution over the prompts (largest first),
    with columns component, type, layer, head, neuron, attribution (mean) and prompt_0, prompt_1, ...
    """
    tokens = model.validate_tokens(tokens)
    batch, n_pos = tokens.shape
    if np.ndim(pos) and len(np.asarray(pos)) not in (1, batch):
        raise ValueError(f"pos has {len(np.asarray(pos))} entries for {batch} prompts: give one, or one per prompt")
    positions = np.broadcast_to(np.asarray(pos).reshape(-1) if np.ndim(pos) else np.asarray(pos),
                                (batch,)).astype(np.int64) % n_pos
    right = _answer_ids(model, answer, batch, "answer")
    direction = model.tokens_to_residual_directions(right)  # [batch, d_model]
    wrong = None
    if wrong_answer is not None:
        wrong = _answer_ids(model, wrong_answer, batch, "wrong_answer")
        direction = direction - model.tokens_to_residual_directions(wrong)
    w = model.weights
    const = np.zeros(batch)
    if w.ln_final_b is not None:
        const = const + direction @ w.ln_final_b
    if w.b_U is not None:
        const = const + w.b_U[right] - (w.b_U[wrong] if wrong is not None else 0)
    if w.ln_final_w is not None:
        direction = direction * w.ln_final_w

    attrs, labels = None, None
    for p in np.unique(positions):
        rows = positions == p
        if by == "layer":
            stack, labels = cache.decompose_resid(pos_slice=int(p), return_labels=True)
        elif by in ("head", "neuron"):
            stack, labels = cache.get_full_resid_decomposition(
                pos_slice=int(p), expand_neurons=by == "neuron", return_labels=True)
        else:
            raise ValueError(f"by={by!r}: expected 'layer', 'head' or 'neuron'")
        scaled = cache.apply_ln_to_stack(stack, None, pos_slice=int(p))  # [component, batch, d_model]
        part = np.einsum("cbd,bd->cb", scaled[:, rows], direction[rows])
        if attrs is None:
            attrs = np.zeros((len(labels), batch))
        attrs[:, rows] = part
    attrs = np.concatenate([attrs, const[None]])
    labels = list(labels) + ["final_ln_bias+b_U"]

    logits = cache.apply_ln_to_stack(cache.accumulated_resid(None)[-1:], None)[0]  # normalised
    final = logits[np.arange(batch), positions]
    logit_diff = np.einsum("bd,bd->b", final, direction) + const

    df = pd.DataFrame([_describe(l) for l in labels])
    df["attribution"] = attrs.mean(axis=1)
    for b in range(batch):
        df[f"prompt_{b}"] = attrs[:, b]
    df = df.sort_values("attribution", ascending=False, kind="stable").reset_index(drop=True)
    df.attrs["logit_diff"] = logit_diff.tolist()  # a list: pandas compares attrs when combining frames
    return df
