"""Text generation: one new position per step, with the keys and values of earlier ones cached.

The prompt runs through the model once, filling a ``KeyValueCache``; each later step feeds just the
token chosen last, whose queries attend to all cached keys. Hooks registered on the model (or given
as ``fwd_hooks``) fire at every step, so a person can steer or ablate while generating; at step t
the activations have pos = 1 (the prompt step: pos = prompt length).
"""

from __future__ import annotations

import warnings
from typing import Iterator

import numpy as np

from . import ops
from .inputs import InputError, is_text
from .kv_cache import KeyValueCache
from .model import GPT2


class ContextLimitWarning(UserWarning):
    """Generation stopped early because the sequence reached the model's context length."""


def _check_sampling(max_new_tokens, temperature, top_k, top_p):
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: expected a positive integer")
    if temperature is None or temperature < 0:
        raise ValueError(f"temperature={temperature!r}: expected 0 (greedy) or a positive number")
    if top_k is not None and (not isinstance(top_k, (int, np.integer)) or top_k < 1):
        raise ValueError(f"top_k={top_k!r}: expected an integer >= 1 (or None for no limit)")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p!r}: expected a number in (0, 1] (or None for no limit)")


def sample(logits: np.ndarray, temperature: float = 0.0, top_k: int | None = None,
           top_p: float | None = None, rng: np.random.Generator | None = None) -> np.ndarray:
    """Choose the next token of each row.  logits [batch, d_vocab] -> token ids [batch]

    temperature 0 is greedy (argmax). Otherwise the logits are divided by the temperature, cut to the
    ``top_k`` most likely tokens and to the smallest set whose probability reaches ``top_p``
    (nucleus), and a token is drawn from what is left.
    """
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.astype(np.float64) / temperature
    if top_k is not None and top_k < logits.shape[-1]:  # exactly k tokens, even among ties
        keep = np.argpartition(-logits, top_k - 1, axis=-1)[:, :top_k]
        kept = np.full_like(logits, -np.inf)
        np.put_along_axis(kept, keep, np.take_along_axis(logits, keep, axis=-1), axis=-1)
        logits = kept
    probs = ops.softmax(logits)
    if top_p is not None and top_p < 1:
        order = np.argsort(-probs, axis=-1, kind="stable")
        sorted_probs = np.take_along_axis(probs, order, axis=-1)
        # keep a token if the tokens ranked before it hold less than top_p (so at least one)
        keep_sorted = np.cumsum(sorted_probs, axis=-1) - sorted_probs < top_p
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, axis=-1)
        probs = np.where(keep, probs, 0.0)
        probs /= probs.sum(-1, keepdims=True)
    rng = rng if rng is not None else np.random.default_rng()
    cumulative = np.cumsum(probs, axis=-1)
    draws = rng.random((probs.shape[0], 1)) * cumulative[:, -1:]
    return (cumulative <= draws).sum(-1).clip(max=probs.shape[-1] - 1)


def generate_stream(model: GPT2, input, max_new_tokens: int = 20, temperature: float = 0.0,
                    top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                    stop_at_eos: bool = True, prepend_bos: bool = False, fwd_hooks=(),
                    use_kv_cache: bool = True) -> Iterator:
    """Yield each new token as it is chosen: an int for one prompt, an int64 array [batch] for a
    batch of equal-length prompts.

    input: text, a list of texts with the same number of tokens, or token ids [batch, pos] / [pos].
    temperature: 0 = greedy (the default: reproducible); > 0 samples, reproducibly for a ``seed``.
    top_k, top_p: restrict sampling to the k most likely tokens / the nucleus of probability p.
    stop_at_eos: stop once every sequence has produced <|endoftext|> (later tokens of a finished
        sequence are <|endoftext|>).
    fwd_hooks: [(name, fn)] fired at every step of this generation, and only there (see
        ``GPT2.run_with_hooks``).
    use_kv_cache: False recomputes the whole prefix at every step (slow; for checking).

    Stops with a ``ContextLimitWarning`` when the sequence reaches n_ctx.
    """
    _check_sampling(max_new_tokens, temperature, top_k, top_p)
    single = _single(input)
    tokens, mask = model.tokens_and_mask(input, prepend_bos=prepend_bos)
    if mask is not None and not mask.all():
        raise InputError("the prompts have different numbers of tokens; generate them one at a "
                         "time or give prompts of equal token length")
    batch, n_prompt = tokens.shape
    n_ctx = model.cfg.n_ctx
    if n_prompt >= n_ctx:
        raise InputError(f"the prompt has {n_prompt} tokens, leaving no room in the context of "
                         f"n_ctx={n_ctx}; truncate it, e.g. tokens[:, -{n_ctx - 1}:]")
    rng = np.random.default_rng(seed)
    eos = model.tokenizer.eot_token
    finished = np.zeros(batch, dtype=bool)

    fwd_hooks = model._expand(fwd_hooks)  # checked now, fired only while a step is computed
    kv = KeyValueCache(model.cfg, batch, model.dtype) if use_kv_cache else None
    sequence = tokens
    step_input = tokens
    for step in range(max_new_tokens):
        if sequence.shape[1] >= n_ctx:
            warnings.warn(f"generation stopped after {step} new tokens: the sequence reached the "
                          f"context length n_ctx={n_ctx}", ContextLimitWarning, stacklevel=2)
            return
        # The hooks of this step: the model's, the caller's ``with model.hooks()`` block (if the
        # caller is inside one now), and fwd_hooks. Between steps the stream leaves no hook behind.
        run = model._new_run(fwd_hooks)
        if kv is not None:
            resid = model._forward(run, step_input, past_kv=kv, stop_at_layer=model.cfg.n_layer)
        else:
            resid = model._forward(run, sequence, stop_at_layer=model.cfg.n_layer)
        logits = model._unembed(run, resid[:, -1:])[:, 0]  # only the last position is needed
        next_tokens = sample(logits, temperature, top_k, top_p, rng).astype(np.int64)
        if stop_at_eos:
            next_tokens = np.where(finished, eos, next_tokens)
            finished |= next_tokens == eos
        sequence = np.concatenate([sequence, next_tokens[:, None]], axis=1)
        step_input = next_tokens[:, None]
        yield int(next_tokens[0]) if single else next_tokens
        if stop_at_eos and finished.all():
            return


def _single(input) -> bool:
    """One prompt (a str, or ids [pos]) rather than a batch (a list of texts, or ids [batch, pos])."""
    return isinstance(input, str) or (not is_text(input) and np.ndim(input) == 1)


def generate(model: GPT2, input, max_new_tokens: int = 20, return_type: str = "str", **kwargs):
    """Continue a prompt. Greedy by default (temperature=0).

    Returns the prompt plus continuation: text (``return_type="str"``; a list for a batch) or token
    ids (``"tokens"``: [pos] for one prompt, [batch, pos] for a batch). Other arguments as in
    ``generate_stream``.
    """
    if return_type not in ("str", "tokens"):
        raise ValueError(f"return_type={return_type!r}: expected 'str' or 'tokens'")
    prompt, _ = model.tokens_and_mask(input, prepend_bos=kwargs.get("prepend_bos", False))
    new = [np.atleast_1d(t) for t in generate_stream(model, input, max_new_tokens, **kwargs)]
    out = np.concatenate([prompt, np.stack(new, axis=1)], axis=1) if new else prompt
    single = _single(input)
    if return_type == "tokens":
        return out[0] if single else out
    texts = [model.to_string(row) for row in out]
    return texts[0] if single else texts
