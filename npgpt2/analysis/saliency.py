"""Which prompt tokens a prediction leans on: gradient x input and integrated gradients, taken at
the token embeddings (``hook_embed``).

gradient x input   score_i = grad_i . x_i, with grad = d metric / d x at the prompt itself: a
                   first-order guess at what removing token i's embedding would do.
integrated         score_i = (x_i - b_i) . mean over alpha of d metric / d x at b + alpha (x - b),
gradients          the gradient averaged along the straight line from a baseline b to the prompt
                   (Sundararajan et al., 2017). Its scores add up to metric(x) - metric(b)
                   (completeness); the table's attrs report how closely, for the steps taken.

The embeddings scored are the token embeddings W_E[tokens] alone (the position embeddings stay as
they are), unless ``include_position=True``, which scores token plus position embedding (then a
zero baseline also zeroes the positions). That path starts at a residual stream of zeros, where the
first layer norm jumps from 0 to x/|x| within alpha ~ 1e-4: integrated gradients then need far more
steps than the token-only default, and a warning says so when the scores miss completeness by more
than 1%.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from .. import metrics as metrics_module

_METHODS = ("grad_x_input", "integrated_gradients")
_BASELINES = ("zero", "eot")


def token_saliency(model, prompt, metric=None, method: str = "grad_x_input", steps: int = 32,
                   baseline: str = "zero", include_position: bool = False, prepend_bos: bool | None = None,
                   batch_size: int = 16) -> pd.DataFrame:
    """One row per prompt token: position, token, score, share (|score| / sum of |score|).

    prompt: a text or token ids [pos] (one prompt).
    metric: what the scores explain (see ``npgpt2.metrics``); default: the log-probability of the
        model's own top prediction at the last position. Given a batch of identical prompts it must
        be the mean over the rows (every metric in ``npgpt2.metrics`` is).
    method: "grad_x_input" or "integrated_gradients" (with ``steps`` points along the line, at the
        midpoints of ``steps`` equal intervals).
    baseline: "zero" (embeddings of zeros) or "eot" (<|endoftext|>'s embedding at every position);
        integrated gradients only.
    df.attrs: metric (its value at the prompt), and for integrated gradients baseline_metric,
    sum_of_scores and completeness_error (|sum - (metric - baseline_metric)| / |metric - baseline_metric|).
    """
    if method not in _METHODS:
        raise ValueError(f"method={method!r}: expected one of {', '.join(_METHODS)}")
    if baseline not in _BASELINES:
        raise ValueError(f"baseline={baseline!r}: expected one of {', '.join(_BASELINES)}")
    if not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps={steps!r}: expected a positive integer")
    tokens, _ = model.tokens_and_mask(prompt, prepend_bos=prepend_bos)
    if tokens.shape[0] != 1:
        raise ValueError(f"token_saliency explains one prompt; got a batch of {tokens.shape[0]}")
    if metric is None:
        top = int(model(tokens)[0, -1].argmax())
        metric = metrics_module.logprob(top)
    metric = metrics_module.check_metric(metric)
    pos = tokens.shape[1]
    w = model.weights
    x = w.W_E[tokens[0]] + (w.W_pos[:pos] if include_position else 0)  # [pos, d_model]: what is scored
    value = float(metric(model(tokens)))
    attrs = {"metric": value, "method": method,
             "embeddings": "token + position" if include_position else "token only"}

    if method == "grad_x_input":
        grad = _gradients(model, tokens, metric, x[None], include_position, batch_size)[0]  # [pos, d_model]
        scores = (grad * x).sum(-1)
    else:
        eot = w.W_E[model.tokenizer.eot_token] + (w.W_pos[:pos] if include_position else 0)
        b = np.zeros_like(x) if baseline == "zero" else np.broadcast_to(eot, x.shape)  # [pos, d_model]
        alphas = (np.arange(steps) + 0.5) / steps  # midpoints
        path = b[None] + alphas[:, None, None] * (x - b)[None]  # [steps, pos, d_model]
        grads = _gradients(model, tokens, metric, path, include_position, batch_size)  # [steps, pos, d_model]
        scores = ((x - b) * grads.mean(0)).sum(-1)
        base_value = float(metric(_run_at(model, tokens, b[None], include_position)))
        total = float(scores.sum())
        error = abs(total - (value - base_value)) / max(abs(value - base_value), 1e-12)
        attrs.update(baseline=baseline, steps=int(steps), baseline_metric=base_value, sum_of_scores=total,
                     completeness_error=error)
        if error > 0.01:
            warnings.warn(f"integrated gradients: the scores add up to {total:.4g}, not metric - baseline = "
                          f"{value - base_value:.4g} ({error:.1%} off); take more steps", stacklevel=2)
    magnitude = np.abs(scores).sum()
    df = pd.DataFrame({"position": np.arange(pos), "token": model.to_str_tokens(tokens),
                       "score": scores, "share": np.abs(scores) / magnitude if magnitude > 0 else 0.0})
    df.attrs.update(attrs)
    return df


def _embedding_hooks(points: np.ndarray, include_position: bool):
    """Forward hooks that put ``points`` [batch, pos, d_model] where the scored embeddings are."""
    if include_position:  # the sum of the two is replaced: token embedding := point, position := 0
        return [("hook_embed", lambda act, hook: points.astype(act.dtype)),
                ("hook_pos_embed", lambda act, hook: np.zeros_like(act))]
    return [("hook_embed", lambda act, hook: points.astype(act.dtype))]


def _run_at(model, tokens, points, include_position):
    batch_tokens = np.repeat(tokens, len(points), axis=0)
    return model.run_with_hooks(batch_tokens, fwd_hooks=_embedding_hooks(points, include_position))


def _gradients(model, tokens, metric, points, include_position, batch_size):
    """d metric / d embedding at each of ``points`` [n, pos, d_model] -> [n, pos, d_model]."""
    grads = []
    for start in range(0, len(points), batch_size):
        chunk = points[start:start + batch_size]
        batch_tokens = np.repeat(tokens, len(chunk), axis=0)
        with model.hooks(_embedding_hooks(chunk, include_position)):
            _, cache = model.run_with_cache(batch_tokens, names_filter="hook_embed", incl_bwd=True, metric=metric)
        # the metric is the mean over the chunk's rows: each row's own gradient is len(chunk) times it
        grads.append(cache["hook_embed_grad"] * len(chunk))
    return np.concatenate(grads)
