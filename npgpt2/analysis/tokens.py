"""What the model predicts at each position of a prompt, as tables."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .. import ops


def _prompt_tokens(model, prompt, prepend_bos: bool | None) -> np.ndarray:
    """A text or token ids -> one row of ids [pos]."""
    tokens, _ = model.tokens_and_mask(prompt, prepend_bos=prepend_bos)
    if tokens.shape[0] != 1:
        raise ValueError(f"expected one prompt; got a batch of {tokens.shape[0]}")
    return tokens[0]


def _entropy(logp: np.ndarray) -> np.ndarray:
    """Entropy in nats of each distribution given by log-probabilities over the last axis."""
    p = np.exp(logp)
    return -(p * np.where(p > 0, logp, 0.0)).sum(-1)


def prob_css(p) -> str:
    """The CSS that colours a table cell by a probability: the 0..1 map of ``npgpt2.style`` (the
    attention view's), text in black or white to read on it; empty for a missing value."""
    from .. import style

    if p is None or pd.isna(p):
        return ""
    colour = style.sequential_rgb(p)
    return f"background-color: {colour}; color: {style.text_colour_on(colour)}"


def style_probs(df: pd.DataFrame, columns=None, digits: int = 3):
    """``df`` as a pandas Styler (Jupyter shows it as a coloured table): the probability
    ``columns`` (default: all) coloured by ``prob_css``, numbers shown with ``digits`` decimals.
    Needs jinja2 (pandas' optional dependency for Stylers)."""
    columns = list(df.columns) if columns is None else [c for c in columns if c in df.columns]
    # tokens such as <|endoftext|> are text, not markup: escape them in the cells and the labels
    return (df.style.map(prob_css, subset=columns)
            .format(precision=digits, na_rep="", escape="html")
            .format_index(escape="html", axis=0).format_index(escape="html", axis=1))


def next_token_table(model, prompt, k: int = 5, prepend_bos: bool | None = None, style: bool = False):
    """One row per position j of the prompt: the token there, the token that actually comes next,
    the model's probability / log-probability / rank for it, the entropy of the prediction, and
    its top-k predicted tokens with their probabilities.

    The last position has no next token in the prompt: its ``next_*`` columns are empty.
    Columns: position, token_id, token, next_token_id, next_token, next_prob, next_logprob,
    next_rank (0 = the model's top choice), entropy (nats), top1 .. top{k}, top1_prob ...
    ``style=True`` returns a pandas Styler of the same table, the probabilities coloured.
    """
    tokens = _prompt_tokens(model, prompt, prepend_bos)
    logp = ops.log_softmax(model(tokens[None])[0].astype(np.float64))  # [pos, d_vocab]
    n = len(tokens)
    top = np.argsort(-logp, axis=-1, kind="stable")[:, :k]
    rows = []
    for j in range(n):
        row = {"position": j, "token_id": int(tokens[j]), "token": model.tokenizer.token_str(tokens[j])}
        if j + 1 < n:
            nxt = int(tokens[j + 1])
            row.update(next_token_id=nxt, next_token=model.tokenizer.token_str(nxt),
                       next_prob=float(np.exp(logp[j, nxt])), next_logprob=float(logp[j, nxt]),
                       next_rank=int((logp[j] > logp[j, nxt]).sum()))
        else:
            row.update(next_token_id=pd.NA, next_token=None, next_prob=np.nan, next_logprob=np.nan,
                       next_rank=pd.NA)
        row["entropy"] = float(_entropy(logp[j]))
        for r in range(k):
            row[f"top{r + 1}"] = model.tokenizer.token_str(top[j, r])
            row[f"top{r + 1}_prob"] = float(np.exp(logp[j, top[j, r]]))
        rows.append(row)
    df = pd.DataFrame(rows).astype({"next_token_id": "Int64", "next_rank": "Int64"})
    if style:
        return style_probs(df, ["next_prob"] + [f"top{r + 1}_prob" for r in range(k)])
    return df


def prompt_token_probs(model, prompt, prepend_bos: bool | None = None, style: bool = False):
    """P(next token = token_i | the prompt up to position j), for every prompt token i (rows) and
    every position j (columns).

    Rows are labelled (i, token_i), columns (j, token_j): the columns are *positions* of one forward
    pass, not layers. Column j is the model's prediction after reading tokens 0..j, looked up at the
    prompt's own tokens. The diagonal just above the main one (row j + 1, column j) is the
    probability given to the token that really came next; the other entries say how much
    probability the model puts, at position j, on tokens that happen to occur elsewhere in the
    prompt (earlier ones: copying; later ones: anticipation). It says nothing about how the
    prediction is built up across layers: see ``logit_lens`` for that. ``style=True`` returns a
    pandas Styler of the table, each cell coloured by its probability.
    """
    tokens = _prompt_tokens(model, prompt, prepend_bos)
    probs = np.exp(ops.log_softmax(model(tokens[None])[0].astype(np.float64)))  # [pos, d_vocab]
    strs = [model.tokenizer.token_str(t) for t in tokens]
    index = pd.MultiIndex.from_arrays([np.arange(len(tokens)), strs], names=["i", "token_i"])
    columns = pd.MultiIndex.from_arrays([np.arange(len(tokens)), strs], names=["position", "token"])
    df = pd.DataFrame(probs[:, tokens].T, index=index, columns=columns)
    return style_probs(df) if style else df
