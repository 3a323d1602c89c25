"""Differentiable metrics on the logits: the scalars that gradients, attribution and patching are
taken of.

A metric is called on logits [batch, pos, d_vocab] and returns a float; ``metric.grad(logits)``
returns d metric / d logits, an array shaped like the logits. Any object with ``__call__`` and
``grad`` works wherever a metric is taken (``model.value_and_grad``, ``run_with_cache(incl_bwd=True,
metric=...)``, patching). One that also says which logits it reads (``logits_read(batch)``: one
position a row, and there some columns or all) has gradient runs make only those logits.

    loss(tokens, mask)            mean next-token cross-entropy (nats), padding skipped
    logit_diff(" Mary", " John")  logit[answer] - logit[wrong] at the last position, batch mean
    logprob(" Paris"), prob(" Paris")
    normalized(metric, clean_value, corrupted_value)   0 = corrupted behaviour, 1 = clean
"""

from __future__ import annotations

import numpy as np

from . import ops
from .threads import get_num_threads, ranges, worker_pool


class Metric:
    """A scalar function of the logits with its gradient. Subclasses define ``value`` and ``grad``."""

    def __call__(self, logits: np.ndarray) -> float:
        return float(self.value(_checked(logits)))

    def value(self, logits: np.ndarray) -> float:
        """The metric of ``logits`` [batch, pos, d_vocab]: a float."""
        raise NotImplementedError

    def grad(self, logits: np.ndarray) -> np.ndarray:
        """d metric / d logits, shaped as ``logits``."""
        raise NotImplementedError

    def value_and_grad(self, logits: np.ndarray) -> tuple[float, np.ndarray]:
        """Both at once (a metric may share work between them)."""
        return self(logits), self.grad(logits)

    def logits_read(self, batch: int):
        """Which logits of a batch of ``batch`` rows the metric reads: None (any of them), or
        (pos [batch], columns): one position per row, and there the vocabulary ``columns`` (an
        array of token ids; None: all). A forward pass made only for this metric (a gradient)
        computes just those; the rest of its logits are zero."""
        return None


_SHARED = 1 << 21  # logits (numbers) from which the loss's softmax is shared among the threads


def _pieces(batch: int, pos: int, parts: int) -> list[tuple[slice, slice]]:
    """[batch, pos] in about ``parts`` pieces (batch rows, positions): whole rows when there are
    several, else positions of the one row."""
    if batch > 1:
        return [(slice(r.start, r.stop), slice(None)) for r in ranges(batch, min(batch, parts))]
    return [(slice(None), slice(r.start, r.stop)) for r in ranges(pos, min(pos, parts))]


def _checked(logits) -> np.ndarray:
    logits = np.asarray(logits)
    if logits.ndim != 3:
        raise ValueError(f"a metric takes logits [batch, pos, d_vocab]; got shape {logits.shape}")
    return logits


def _token_ids(tokens, name: str) -> np.ndarray:
    """One token (an id, or a string that is one GPT-2 token) or one per batch row -> int ids."""
    from .tokenizer import Tokenizer

    items = [tokens] if isinstance(tokens, (str, int, np.integer)) else list(np.asarray(tokens, dtype=object).ravel())
    ids = []
    for t in items:
        if isinstance(t, str):
            encoded = Tokenizer().encode(t)
            if len(encoded) != 1:
                raise ValueError(f"{name}={t!r} is {len(encoded)} tokens, not one (a leading space is "
                                 "usually part of the token: ' Mary')")
            t = encoded[0]
        ids.append(int(t))
    return np.array(ids, dtype=np.int64) if len(ids) > 1 else np.array(ids[0], dtype=np.int64)


def _rows(ids: np.ndarray, batch: int, name: str) -> np.ndarray:
    if ids.ndim and ids.shape[0] != batch:
        raise ValueError(f"{name} has {ids.shape[0]} tokens for a batch of {batch}: give one, or one per row")
    return np.broadcast_to(ids, (batch,))


class Loss(Metric):
    """Mean next-token cross-entropy in nats: logits at position p predict tokens[:, p + 1].

    mask [batch, pos] (1 = real token, 0 = padding) drops the predictions whose target, or the
    position predicting it, is padding (left padding's last pad predicts the first real token); weights
    [batch, pos - 1] weigh each prediction (then the value is sum(w * nll) / sum(w)).
    """

    def __init__(self, tokens, mask=None, weights=None):
        self.tokens = np.atleast_2d(np.asarray(tokens))
        batch, pos = self.tokens.shape
        if pos < 2:
            raise ValueError("the loss needs at least 2 tokens (one to predict from, one to predict)")
        w = np.ones((batch, pos - 1))
        if mask is not None:
            mask = np.atleast_2d(np.asarray(mask))
            if mask.shape != self.tokens.shape:
                raise ValueError(f"mask has shape {mask.shape}; expected {self.tokens.shape}, the tokens' shape")
            w = w * ((mask[:, 1:] > 0) & (mask[:, :-1] > 0))
        if weights is not None:
            weights = np.asarray(weights, dtype=np.float64)
            if weights.shape != (batch, pos - 1):
                raise ValueError(f"weights has shape {weights.shape}; expected {(batch, pos - 1)}, one "
                                 "per prediction")
            w = w * weights
        if w.sum() <= 0:
            raise ValueError("the loss has no target to average over (everything is masked)")
        self.weights = w / w.sum()  # [batch, pos - 1], summing to 1

    def _check(self, logits):
        if logits.shape[:2] != self.tokens.shape:
            raise ValueError(f"logits of shape {logits.shape} for tokens of shape {self.tokens.shape}")

    def value(self, logits):
        self._check(logits)
        nll = ops.cross_entropy(logits[:, :-1], self.tokens[:, 1:])  # [batch, pos - 1]
        return float((nll.astype(np.float64) * self.weights).sum())

    def grad(self, logits):
        logits = _checked(logits)
        self._check(logits)
        d_logits = np.zeros_like(logits)
        d_logits[:, :-1] = ops.cross_entropy_backward(logits[:, :-1], self.tokens[:, 1:],
                                                      self.weights.astype(logits.dtype))
        return d_logits

    def value_and_grad(self, logits, out=None):
        """One softmax for both: nll = log(sum exp) - logit[target], grad = softmax - onehot.
        ``out``: where to write the gradient (it may be ``logits`` itself, which is then overwritten)."""
        logits = _checked(logits)
        self._check(logits)
        d_logits = np.zeros_like(logits) if out is None else out
        nll = np.empty(self.weights.shape, logits.dtype)  # [batch, pos - 1]
        weights = self.weights.astype(logits.dtype)[..., None]  # [batch, pos - 1, 1]

        def predictions(at):  # the predictions at[0] (batch rows), at[1] (positions): each on its own
            probs = d_logits[:, :-1][at]  # [rows, positions, d_vocab], worked on in place
            np.subtract(logits[:, :-1][at], logits[:, :-1][at].max(axis=-1, keepdims=True), out=probs)
            targets = self.tokens[:, 1:, None][at]
            target_logit = np.take_along_axis(probs, targets, axis=-1)  # [rows, positions, 1], shifted
            np.exp(probs, out=probs)
            total = probs.sum(axis=-1, keepdims=True)  # [rows, positions, 1]
            nll[at] = (np.log(total) - target_logit)[..., 0]
            probs *= weights[at] / total  # weights * softmax
            np.put_along_axis(probs, targets, np.take_along_axis(probs, targets, axis=-1) - weights[at], axis=-1)

        if logits.size < _SHARED:  # small: on this thread (short NumPy calls on two would wait for each other)
            predictions((slice(None), slice(None)))
        else:
            with worker_pool() as run:  # (every prediction's softmax is its own: shared among the threads)
                run(predictions, _pieces(*nll.shape, 2 * get_num_threads()))
        d_logits[:, -1] = 0  # the last position predicts nothing
        return float((nll.astype(np.float64) * self.weights).sum()), d_logits


class _AtPosition(Metric):
    """A metric read at position ``pos``: one for all rows, or one per row (e.g. each prompt's
    last real token when they are padded)."""

    def _at(self, batch: int):
        return np.arange(batch), _rows(self.pos, batch, "pos")

    def logits_read(self, batch: int):
        return self._at(batch)[1], None  # every column (a softmax over them), at one position a row


class LogitDiff(_AtPosition):
    """Batch mean of logit[answer] - logit[wrong] at position ``pos``."""

    def __init__(self, answer, wrong, pos=-1):
        self.answer, self.wrong, self.pos = _token_ids(answer, "answer"), _token_ids(wrong, "wrong"), np.asarray(pos)

    def value(self, logits):
        rows, pos = self._at(logits.shape[0])
        at = logits[rows, pos].astype(np.float64)  # [batch, d_vocab]
        return float(np.mean(at[rows, _rows(self.answer, len(rows), "answer")]
                             - at[rows, _rows(self.wrong, len(rows), "wrong")]))

    def logits_read(self, batch: int):
        return self._at(batch)[1], np.union1d(_rows(self.answer, batch, "answer"), _rows(self.wrong, batch, "wrong"))

    def grad(self, logits):
        logits = _checked(logits)
        batch = logits.shape[0]
        rows, pos = self._at(batch)
        d_logits = np.zeros_like(logits)
        np.add.at(d_logits, (rows, pos, _rows(self.answer, batch, "answer")), 1.0 / batch)
        np.add.at(d_logits, (rows, pos, _rows(self.wrong, batch, "wrong")), -1.0 / batch)
        return d_logits


class LogProb(_AtPosition):
    """Batch mean of log P(token) at position ``pos``."""

    def __init__(self, token, pos=-1):
        self.token, self.pos = _token_ids(token, "token"), np.asarray(pos)

    def _row_logprobs(self, logits) -> np.ndarray:
        """log P(token) of each row, [batch] (float64)."""
        rows, pos = self._at(logits.shape[0])
        logp = ops.log_softmax(logits[rows, pos].astype(np.float64))  # [batch, d_vocab]
        return logp[rows, _rows(self.token, len(rows), "token")]

    def value(self, logits):
        return float(np.mean(self._row_logprobs(logits)))

    def grad(self, logits):
        logits = _checked(logits)
        batch = logits.shape[0]
        rows, pos = self._at(batch)
        d_logits = np.zeros_like(logits)
        # d log p_t / d logits = onehot(t) - softmax: minus the cross-entropy's gradient
        d_logits[rows, pos] = -ops.cross_entropy_backward(
            logits[rows, pos], _rows(self.token, batch, "token").copy(), np.full(batch, 1.0 / batch, logits.dtype))
        return d_logits


class Prob(LogProb):
    """Batch mean of P(token) at position ``pos``."""

    def value(self, logits):
        return float(np.mean(np.exp(self._row_logprobs(logits))))

    def grad(self, logits):
        d_logits = super().grad(logits)  # d log p / d logits; d p = p d log p
        rows, pos = self._at(logits.shape[0])
        d_logits[rows, pos] *= np.exp(self._row_logprobs(logits)).astype(d_logits.dtype)[:, None]
        return d_logits


class Normalized(Metric):
    """(metric - corrupted_value) / (clean_value - corrupted_value): 0 is the corrupted behaviour,
    1 the clean one."""

    def __init__(self, metric, clean_value: float, corrupted_value: float):
        if clean_value == corrupted_value:
            raise ValueError(f"the clean and corrupted runs both score {clean_value}: nothing to normalise by")
        self.metric, self.clean, self.corrupted = metric, float(clean_value), float(corrupted_value)

    def value(self, logits):
        return (self.metric(logits) - self.corrupted) / (self.clean - self.corrupted)

    def grad(self, logits):
        return check_metric(self.metric).grad(logits) / (self.clean - self.corrupted)

    def logits_read(self, batch: int):
        return logits_read_by(self.metric, batch)


loss, logit_diff, logprob, prob, normalized = Loss, LogitDiff, LogProb, Prob, Normalized


def logits_read_by(metric, batch: int):
    """``metric.logits_read(batch)`` for a metric that says which logits it reads (see
    ``Metric.logits_read``); None (all of them) for one that does not."""
    read = getattr(metric, "logits_read", None)
    return None if read is None else read(batch)


def check_metric(metric):
    """A metric usable for gradients, or a ``TypeError`` naming what it lacks."""
    if not callable(metric) or not callable(getattr(metric, "grad", None)):
        missing = "grad(logits) method" if callable(metric) else "__call__ and grad(logits)"
        raise TypeError(f"the metric {metric!r} has no {missing}: gradients need d metric / d logits. "
                        "Use one of npgpt2.metrics (loss, logit_diff, logprob, prob, normalized) or "
                        "give your object a grad(logits) returning an array shaped like the logits")
    return metric
