"""Mean loss and perplexity of a model on a token sequence, with a sliding window: the method of
transformers' perplexity guide ("Perplexity of fixed-length models").

Windows of ``window`` tokens (n_ctx by default) start every ``stride`` tokens. Each token is scored
once, in the first window that reaches it: a window scores only its last ``end - previous end``
tokens, so with stride < window every scored token (after the first window) sees at least
``window - stride`` tokens of context. The first token of the sequence is never scored (nothing
predicts it). Perplexity is exp(mean loss).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .data import DataError


@dataclass
class Perplexity:
    loss: float  # mean next-token cross-entropy over the scored tokens, nats
    perplexity: float  # exp(loss)
    n_tokens: int  # tokens scored
    n_windows: int
    window: int
    stride: int


def sliding_windows(n: int, window: int, stride: int):
    """(begin, end, n_scored) of each window over n tokens, as the perplexity guide's loop."""
    prev_end = 0
    for begin in range(0, n, stride):
        end = min(begin + window, n)
        yield begin, end, end - prev_end
        prev_end = end
        if end == n:
            break


def _exp(loss: float) -> float:
    """exp(loss), inf past what a float holds (a mean loss above ~709.8 nats)."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def perplexity(model, tokens, window: int | None = None, stride: int | None = None) -> Perplexity:
    """Loss and perplexity of ``model`` on ``tokens`` (1-D ids, or a ``TokenDataset``)."""
    tokens = np.asarray(getattr(tokens, "tokens", tokens), dtype=np.int64).reshape(-1)
    window = model.cfg.n_ctx if window is None else int(window)
    stride = window if stride is None else int(stride)
    if not 2 <= window <= model.cfg.n_ctx:
        raise DataError(f"window={window}: expected 2..{model.cfg.n_ctx} (the model's n_ctx)")
    if not 1 <= stride <= window:
        raise DataError(f"stride={stride}: expected 1..{window} (the window)")
    if tokens.size < 2:
        raise DataError(f"the text holds {tokens.size} token(s): expected at least 2 to score one")
    total, count, n_windows = 0.0, 0, 0
    for begin, end, n_new in sliding_windows(tokens.size, window, stride):
        nll = model.loss(tokens[None, begin:end], per_token=True)[0]  # [end - begin - 1]: targets begin+1..end-1
        scored = nll[-n_new:] if n_new < end - begin else nll  # the first window scores all it can
        total += float(np.sum(scored, dtype=np.float64))
        count += scored.size
        n_windows += 1
    loss = total / count
    return Perplexity(loss, _exp(loss), count, n_windows, window, stride)
