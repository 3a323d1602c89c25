"""Text generation: one new position per step, with the keys and values of earlier ones cached.

The prompt runs through the model once, filling a ``KeyValueCache``; each later step feeds just the
token chosen last, whose queries attend to all cached keys. Hooks registered on the model (or given
as ``fwd_hooks``) fire at every step, so a person can steer or ablate while generating; at step t
the activations have pos = 1 (the prompt step: pos = prompt length).
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Iterator

import numpy as np

from . import ops
from .inputs import InputError, check_mask, is_text
from .kv_cache import KeyValueCache

if TYPE_CHECKING:  # the model calls this module, not the other way round
    from .model import GPT2


class ContextLimitWarning(UserWarning):
    """Generation stopped early because the sequence reached the model's context length."""


def _check_sampling(max_new_tokens, temperature, top_k, top_p):
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: expected a positive integer")
    if temperature is None or not 0 <= temperature < math.inf:  # NaN fails too
        raise ValueError(f"temperature={temperature!r}: expected 0 (greedy) or a positive finite number")
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


def generate_stream(model: GPT2, input, max_new_tokens: int = 20, temperature: float | None = None,
                    top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                    stop_at_eos: bool = True, eos_token_id: int | list[int] | None = None,
                    do_sample: bool | None = None, prepend_bos: bool | None = None,
                    padding_side: str | None = None, attention_mask=None, fwd_hooks=(),
                    use_past_kv_cache: bool | None = None, verbose: bool = False, use_kv_cache: bool | None = None) -> Iterator:
    """Yield each new token as it is chosen: an int for one prompt, an int64 array [batch] for a
    batch.

    input: text, a list of texts, or token ids [batch, pos] / [pos]. Texts of different lengths are
        padded on the left (so that every prompt ends at the last position) and each gives exactly
        what it gives alone: padding gets no attention and positions count from each prompt's first
        real token. Left-padded ids need their ``attention_mask`` [batch, pos] (1 = real token).
    temperature, do_sample: greedy (argmax) by default, reproducibly. ``do_sample=True`` samples at
        ``temperature`` (1.0 unless given), reproducibly for a ``seed``; ``do_sample=False`` is
        greedy whatever the temperature; with ``do_sample`` unset, a temperature > 0 samples.
        (TransformerLens samples by default; npgpt2 is greedy unless asked.)
    top_k, top_p: restrict sampling to the k most likely tokens / the nucleus of probability p.
    stop_at_eos: stop once every sequence has produced an end token (later tokens of a finished
        sequence repeat it). eos_token_id: the end token, or a list of them (then finished rows are
        filled with <|endoftext|>); <|endoftext|> by default.
    prepend_bos: for text, as in ``to_tokens`` (None: ``model.cfg.default_prepend_bos``).
    padding_side: None or "left": prompts are always padded on the left for generation.
    fwd_hooks: [(name, fn)] fired at every step of this generation, and only there (see
        ``GPT2.run_with_hooks``).
    use_past_kv_cache: False recomputes the whole prefix at every step (slow; the same tokens).
        ``use_kv_cache`` is its older name.
    verbose: a progress bar (tqdm) over the steps.

    Stops with a ``ContextLimitWarning`` when the sequence reaches n_ctx.
    """
    tokens, mask = _prompt(model, input, prepend_bos, padding_side, attention_mask)
    yield from _steps(model, tokens, mask, _single(input), max_new_tokens, temperature=temperature, top_k=top_k,
                      top_p=top_p, seed=seed, stop_at_eos=stop_at_eos, eos_token_id=eos_token_id,
                      do_sample=do_sample, fwd_hooks=fwd_hooks, use_past_kv_cache=use_past_kv_cache,
                      verbose=verbose, use_kv_cache=use_kv_cache)


def _prompt(model: GPT2, input, prepend_bos, padding_side, attention_mask):
    """The prompts as left-padded ids [batch, pos] and their mask (None when nothing is padding)."""
    if padding_side not in (None, "left"):
        raise InputError(f"padding_side={padding_side!r}: generation pads prompts on the left (so that "
                         "every prompt ends at the last position); pass None or 'left'")
    if is_text(input) and attention_mask is not None:
        raise InputError("attention_mask goes with token ids; for texts it is made by the tokenizer")
    tokens, mask = model.tokens_and_mask(input, prepend_bos=prepend_bos, padding_side="left")
    mask = check_mask(attention_mask, tokens.shape) if attention_mask is not None else mask
    if mask is not None and not mask[:, -1].all():
        raise InputError("the prompts' attention_mask has padding at the last position: pad prompts on "
                         "the left for generation (model.to_tokens(texts, padding_side='left'))")
    return tokens, (None if mask is None or mask.all() else mask)


def _kv_choice(use_past_kv_cache: bool | None, use_kv_cache: bool | None) -> bool:
    """use_past_kv_cache (TransformerLens's name) or use_kv_cache (the older one); True if neither."""
    if use_past_kv_cache is not None and use_kv_cache is not None and bool(use_past_kv_cache) != bool(use_kv_cache):
        raise ValueError(f"use_past_kv_cache={use_past_kv_cache!r} and use_kv_cache={use_kv_cache!r} "
                         "disagree; pass use_past_kv_cache only")
    choice = use_past_kv_cache if use_past_kv_cache is not None else use_kv_cache
    return True if choice is None else bool(choice)


def _stop_tokens(model: GPT2, eos_token_id) -> tuple[list[int], int]:
    """(the tokens that end a sequence, the token that fills a finished row)."""
    eot = model.tokenizer.eot_token
    if eos_token_id is None:
        return [eot], eot
    ids = [eos_token_id] if isinstance(eos_token_id, (int, np.integer)) else list(eos_token_id)
    if not ids or not all(isinstance(t, (int, np.integer)) and 0 <= t < model.cfg.d_vocab for t in ids):
        raise ValueError(f"eos_token_id={eos_token_id!r}: expected a token id in [0, {model.cfg.d_vocab}) "
                         "or a non-empty list of them")
    fill = int(ids[0]) if isinstance(eos_token_id, (int, np.integer)) else eot
    return [int(t) for t in ids], fill


def _temperature(temperature, do_sample) -> float:
    """The temperature ``sample`` gets: 0 means greedy."""
    if do_sample is not None and not isinstance(do_sample, (bool, np.bool_)):
        raise ValueError(f"do_sample={do_sample!r}: expected True, False or None")
    if do_sample is False:
        return 0.0
    if do_sample:
        if temperature is not None and temperature <= 0:
            raise ValueError(f"do_sample=True with temperature={temperature!r}: sampling needs a "
                             "temperature > 0 (or do_sample=False for greedy decoding)")
        return 1.0 if temperature is None else temperature
    return 0.0 if temperature is None else temperature


def _steps(model: GPT2, tokens, mask, single, max_new_tokens=20, *, temperature=None, top_k=None, top_p=None,
           seed=None, stop_at_eos=True, eos_token_id=None, do_sample=None, fwd_hooks=(), use_past_kv_cache=None,
           verbose=False, use_kv_cache=None) -> Iterator:
    """The generation loop of ``generate_stream``, from prompts already tokenized (left-padded ids
    [batch, pos] and their mask, or None)."""
    use_kv_cache = _kv_choice(use_past_kv_cache, use_kv_cache)
    temperature = _temperature(temperature, do_sample)
    _check_sampling(max_new_tokens, temperature, top_k, top_p)
    batch, n_prompt = tokens.shape
    n_ctx = model.cfg.n_ctx
    if n_prompt >= n_ctx:
        raise InputError(f"the prompt has {n_prompt} tokens, leaving no room in the context of "
                         f"n_ctx={n_ctx}; truncate it, e.g. tokens[:, -{n_ctx - 1}:]")
    rng = np.random.default_rng(seed)
    stops, fill = _stop_tokens(model, eos_token_id)
    finished = np.zeros(batch, dtype=bool)

    fwd_hooks = model._expand(fwd_hooks)  # checked now, fired only while a step is computed
    kv = KeyValueCache(model.cfg, batch, model.dtype) if use_kv_cache else None
    sequence, step_input, step_mask = tokens, tokens, mask  # the prompt step carries the padding
    steps = range(max_new_tokens)
    if verbose:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="generate", unit="token")
    for step in steps:
        if sequence.shape[1] >= n_ctx:
            warnings.warn(f"generation stopped after {step} new tokens: the sequence reached the "
                          f"context length n_ctx={n_ctx}", ContextLimitWarning, stacklevel=3)
            return
        # The hooks of this step: the model's, the caller's ``with model.hooks()`` block (if the
        # caller is inside one now), and fwd_hooks. Between steps the stream leaves no hook behind.
        run = model._new_run(fwd_hooks)
        if kv is not None:
            resid = model._forward(run, step_input, attention_mask=step_mask, past_kv=kv,
                                   stop_at_layer=model.cfg.n_layer)
        else:  # the whole sequence again, with the prompt's padding (new tokens are real)
            full_mask = None if mask is None else np.pad(mask, ((0, 0), (0, sequence.shape[1] - n_prompt)),
                                                         constant_values=1)
            resid = model._forward(run, sequence, attention_mask=full_mask, stop_at_layer=model.cfg.n_layer)
        logits = model._unembed(run, resid[:, -1:])[:, 0]  # only the last position is needed
        next_tokens = sample(logits, temperature, top_k, top_p, rng).astype(np.int64)
        if stop_at_eos:
            next_tokens = np.where(finished, fill, next_tokens)
            finished |= np.isin(next_tokens, stops)
        sequence = np.concatenate([sequence, next_tokens[:, None]], axis=1)
        step_input, step_mask = next_tokens[:, None], None
        yield int(next_tokens[0]) if single else next_tokens
        if stop_at_eos and finished.all():
            return


def _single(input) -> bool:
    """One prompt (a str, or ids [pos]) rather than a batch (a list of texts, or ids [batch, pos])."""
    return isinstance(input, str) or (not is_text(input) and np.ndim(input) == 1)


RETURN_TYPES = ("input", "str", "tokens")


def generate(model: GPT2, input, max_new_tokens: int = 20, return_type: str = "input",
             prepend_bos: bool | None = None, padding_side: str | None = None, attention_mask=None,
             stop_at_eos: bool = True, eos_token_id=None, **kwargs):
    """Continue a prompt, or a batch of them. Greedy by default (see ``generate_stream`` for the
    sampling options, ``do_sample``, ``stop_at_eos``, ``eos_token_id``, ``fwd_hooks``, ``verbose``).

    Returns the prompt plus continuation, as TransformerLens does:
    * ``return_type="input"`` (the default): text for text input, token ids for ids;
    * ``"str"``: text (a list for a batch), without the left padding, a prepended <|endoftext|>,
      and, with ``stop_at_eos``, the end token and what fills the row after it;
    * ``"tokens"``: ids, [pos] for one prompt, [batch, pos] for a batch: the left-padded prompts
      (padding is <|endoftext|>), then the new tokens (a finished row repeats its end token).
    """
    if return_type not in RETURN_TYPES:
        raise ValueError(f"return_type={return_type!r}: expected 'input', 'str' or 'tokens'")
    if return_type == "input":
        return_type = "str" if is_text(input) else "tokens"
    prompt, mask = _prompt(model, input, prepend_bos, padding_side, attention_mask)
    single = _single(input)
    new = [np.atleast_1d(t) for t in _steps(model, prompt, mask, single, max_new_tokens, stop_at_eos=stop_at_eos,
                                            eos_token_id=eos_token_id, **kwargs)]
    out = np.concatenate([prompt, np.stack(new, axis=1)], axis=1) if new else prompt
    if return_type == "tokens":
        return out[0] if single else out
    starts = np.zeros(len(out), dtype=int) if mask is None else (mask == 0).sum(axis=1)  # left padding
    if is_text(input) and model.resolve_prepend_bos(prepend_bos):
        starts = starts + 1  # the <|endoftext|> put in front
    stops = _stop_tokens(model, eos_token_id)[0] if stop_at_eos else []
    texts = []
    for row, begin in zip(out, starts):
        generated = row[prompt.shape[1]:]
        ended = np.flatnonzero(np.isin(generated, stops))
        end = prompt.shape[1] + (ended[0] if len(ended) else len(generated))
        texts.append(model.to_string(row[begin:end]))
    return texts[0] if single else texts
