"""The logit lens: read the residual stream after each layer as if it were the last."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .. import ops


def logit_lens(model, input, cache=None, incl_mid: bool = False, prepend_bos: bool | None = None,
               return_logits: bool = False):
    """For each layer and position: the probability and rank of the token that actually comes next,
    and the top predicted token, from the residual stream at that layer put through the final layer
    norm and the unembedding.

    Layers are labelled as TransformerLens's ``accumulated_resid`` labels them: ``0_pre`` (the
    embeddings), ``1_pre`` (after block 0), ..., ``final_post`` (after the last block: exactly the
    model's own output), with ``{l}_mid`` between attention and MLP when ``incl_mid``.

    Returns a tidy DataFrame with columns batch, layer (label), layer_index, position, token,
    next_token, next_prob, next_rank, top_token, top_prob; with ``return_logits`` also the logits
    [layer, batch, pos, d_vocab].
    """
    tokens, _ = model.tokens_and_mask(input, prepend_bos=prepend_bos)
    if cache is None:
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: "resid" in n)
    stack, labels = cache.accumulated_resid(incl_mid=incl_mid, apply_ln=True, return_labels=True)
    w = model.weights
    logits = ops.linear(stack, w.W_U, w.b_U)  # [layer, batch, pos, d_vocab]
    logp = ops.log_softmax(logits.astype(np.float64))
    n_layer, batch, pos = logp.shape[:3]
    top = logp.argmax(-1)
    nxt = np.concatenate([tokens[:, 1:], np.zeros((batch, 1), np.int64)], axis=1)  # [batch, pos]
    nxt_logp = np.take_along_axis(logp, np.broadcast_to(nxt[None, :, :, None], (n_layer, batch, pos, 1)), -1)[..., 0]
    nxt_rank = (logp > nxt_logp[..., None]).sum(-1)
    tok = model.tokenizer.token_str
    L, B, P = np.meshgrid(np.arange(n_layer), np.arange(batch), np.arange(pos), indexing="ij")
    has_next = (P < pos - 1).ravel()
    df = pd.DataFrame({
        "batch": B.ravel(),
        "layer": pd.Categorical(np.array(labels)[L.ravel()], categories=labels, ordered=True),
        "layer_index": L.ravel(),
        "position": P.ravel(),
        "token": [tok(t) for t in tokens[B.ravel(), P.ravel()]],
        "next_token": [tok(t) if h else None for t, h in zip(nxt[B.ravel(), P.ravel()], has_next)],
        "next_prob": np.where(has_next, np.exp(nxt_logp).ravel(), np.nan),
        "next_rank": pd.array(np.where(has_next, nxt_rank.ravel(), 0), dtype="Int64"),
        "top_token": [tok(t) for t in top.ravel()],
        "top_prob": np.exp(logp.max(-1)).ravel(),
    })
    df.loc[~has_next, "next_rank"] = pd.NA
    return (df, logits) if return_logits else df
