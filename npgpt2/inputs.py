"""Input handling: text -> token ids, and the checks that give bad input a clear error.

Kept apart from the forward pass (model.py) so that stepping through the maths does not step
through validation. ``TokenInput`` is the part of ``GPT2`` that turns what a person passes into
int64 token ids [batch, pos] and back; its ``_prepare_call`` does everything a forward pass needs
before the maths starts (a ``Call``: the checked tokens, their positions, the masks, the layers to
run, which attention path each layer takes), so the forward pass reads as the maths alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from . import fast, memory, ops

if TYPE_CHECKING:
    from .kv_cache import KeyValueCache


class InputError(ValueError):
    """Input the model cannot take: empty, wrong type or shape, token ids out of range, too long."""


def is_text(input) -> bool:
    """A str, or a non-empty list/tuple of str (rather than token ids)."""
    return isinstance(input, str) or (isinstance(input, (list, tuple)) and len(input) > 0
                                      and all(isinstance(t, str) for t in input))


PADDING_SIDES = ("right", "left")


def check_padding_side(padding_side) -> str:
    """None -> "right" (the default); "right" or "left" as given; anything else an error."""
    if padding_side is None:
        return "right"
    if padding_side not in PADDING_SIDES:
        raise InputError(f"padding_side={padding_side!r}: expected 'right' or 'left'")
    return padding_side


def check_mask(attention_mask, shape) -> np.ndarray | None:
    """An attention mask (1 = real token, 0 = padding) -> int64 [batch, pos] of the given shape,
    or None."""
    if attention_mask is None:
        return None
    mask = np.asarray(attention_mask)
    if mask.ndim == 1:
        mask = mask[None]
    if mask.shape != tuple(shape):
        raise InputError(f"attention_mask has shape {mask.shape}; expected {tuple(shape)}, the shape of the tokens")
    if mask.dtype.kind not in "biuf":
        raise InputError(f"attention_mask has dtype {mask.dtype}; it must hold 0 (padding) and 1 (real token) only")
    if not np.isin(mask, (0, 1)).all():
        bad = mask[~np.isin(mask, (0, 1))].flat[0].item()
        raise InputError(f"attention_mask must hold 0 (padding) and 1 (real token) only; it holds {bad}")
    return mask.astype(np.int64, copy=False)


def only_right_padding(mask: np.ndarray) -> bool:
    """Is every row real tokens first, then padding (1 ... 1 0 ... 0)? Then causality alone keeps
    the padding out of every real token's view, and the positions are 0, 1, 2 ... as without it."""
    return bool((np.diff(mask, axis=1) <= 0).all())


def position_ids(keys_mask: np.ndarray | None, shape: tuple[int, int], offset: int = 0) -> np.ndarray:
    """The position of each new token, [batch, pos], counted from its row's first real token.

    keys_mask: [batch, offset + pos], 1 = real token, 0 = padding, over the cached positions and
    the new ones (None: no padding). As transformers' ``position_ids = cumsum(mask) - 1``: with left
    padding a prompt's first real token is at position 0, exactly as when it runs alone; padding
    gets position 0. Without padding, or with right padding only: offset, offset + 1, ...
    """
    batch, pos = shape
    if keys_mask is None or only_right_padding(keys_mask):
        return np.broadcast_to(np.arange(offset, offset + pos), (batch, pos))
    return np.maximum(np.cumsum(keys_mask, axis=1) - 1, 0)[:, -pos:]


def padding_mask(keys_mask: np.ndarray | None, dtype) -> np.ndarray | None:
    """Additive mask that hides padding keys: [batch, 1, 1, key_pos], 0 for a real key, -inf for
    padding; added to the attention scores with the causal mask. None when no real token could see
    padding anyway (no padding, or right padding only), which keeps the plain causal path.

    A query that sees only padding (a padding position itself) gets a pattern row of zeros (see
    ``ops.softmax``): it reads nothing, and nothing real reads it."""
    if keys_mask is None or only_right_padding(keys_mask):
        return None
    return np.where(keys_mask > 0, 0, -np.inf).astype(dtype)[:, None, None, :]


@dataclass
class Call:
    """What one forward pass works on, made ready before its maths starts (``_prepare_call``)."""

    tokens: np.ndarray | None  # [batch, pos] int64; None when the input is a residual stream without tokens
    attention_mask: np.ndarray | None  # [batch, pos] 1 = real token, 0 = padding; None: all real
    resid: np.ndarray | None  # [batch, pos, d_model]: with start_at_layer, the residual stream given
    positions: np.ndarray | None  # [batch, pos]: each token's position, counted from its row's first real token
    start: int  # the blocks run are [start, stop)
    stop: int
    past_kv: KeyValueCache | None  # the cache this call's keys and values are appended to
    mask: np.ndarray | None  # [query_pos, key_pos] or [batch, 1, query_pos, key_pos]: 0 where a query may
    # see a key, -inf for a key in its future or padding; added to the scores (None: no layer needs it)
    padding: np.ndarray | None  # [batch, 1, 1, key_pos]: -inf at padding keys; None when no query sees padding
    eager: frozenset  # the layers whose attention runs the textbook way, every step named
    fast: bool  # nobody looks inside: fast.py runs the blocks and the unembedding


class TokenInput:
    """Tokens in and out. Expects ``self.cfg``, ``self.tokenizer``, ``self.dtype`` and ``self.W_U``
    (and, for ``_prepare_call``, ``self.fast_path`` and ``self.attn_implementation``)."""

    def _prepare_call(self, run, input, attention_mask=None, past_kv=None, start_at_layer=None,
                      stop_at_layer=None, tokens=None, prepend_bos=None, padding_side=None) -> Call:
        """Everything ``forward`` does before its maths (the arguments are ``forward``'s): check the
        input and turn it into token ids, count the positions (after a key/value cache's, and from
        each row's first real token), build the masks, and choose the attention path of each layer
        (``run``: the call's hooks.Run) and whether fast.py runs the blocks."""
        start = self._check_layer(start_at_layer, "start_at_layer", 0)
        stop = self._check_layer(stop_at_layer, "stop_at_layer", self.cfg.n_layer)
        offset = past_kv.length if past_kv is not None else 0  # positions already in the cache
        resid = None
        if start_at_layer is None:
            tokens, mask = self._prepare(input, attention_mask, offset, prepend_bos, padding_side)  # [batch, pos]
        else:  # the input is the residual stream entering block `start`
            resid = self._check_residual(input, start)  # [batch, pos, d_model]
            tokens, mask = (None, check_mask(attention_mask, resid.shape[:2])) if tokens is None else self._prepare(tokens, attention_mask, offset)
        shape = tokens.shape if resid is None else resid.shape[:2]  # (batch, pos)
        keys_mask = past_kv.keys_mask(mask, shape, start, stop) if past_kv is not None else mask  # [batch, key_pos] or None
        padding = padding_mask(keys_mask, self.dtype)  # [batch, 1, 1, key_pos] or None
        positions = position_ids(keys_mask, shape, offset) if resid is None else None  # [batch, pos]

        implementation = self.attn_implementation
        eager = frozenset(l for l in range(start, stop) if implementation == "eager" or run.hooked(
            f"blocks.{l}.attn.hook_attn_scores", f"blocks.{l}.attn.hook_pattern"))
        scores_mask = None
        if eager:  # the causal mask, and the padding's on top: [query_pos, key_pos] or [batch, 1, query_pos, key_pos]
            scores_mask = ops.causal_mask(shape[1], offset + shape[1], self.dtype)
            scores_mask = scores_mask if padding is None else scores_mask + padding
        quick = (self.fast_path and run.idle() and padding is None
                 and implementation == "blockwise" and fast.pays(shape))
        memory.check(self, run, shape[0], shape[1], offset + shape[1])  # before anything large is made
        return Call(tokens, mask, resid, positions, start, stop, past_kv, scores_mask, padding, eager, quick)

    def to_tokens(self, input, prepend_bos: bool | None = None, return_mask: bool = False,
                  padding_side: str | None = None):
        """Text (or a list of texts) -> token ids, int64 [batch, pos].

        Texts of unequal length are padded with <|endoftext|>: on the right (``padding_side="right"``,
        the default) or on the left (``"left"``, what batched generation needs: every prompt ends
        at the last position). With ``return_mask=True`` the attention mask [batch, pos] (1 = real
        token, 0 = padding) is returned too; pass it on as ``attention_mask`` with the ids (the
        model takes it from here itself when it is given the texts).

        prepend_bos=False is what GPT-2 and Hugging Face do. Set it to True to put <|endoftext|>
        first: then the first real token has something to attend to other than itself, which many
        interpretability results (and TransformerLens's default) assume, and its prediction is made.
        None (the default) takes ``model.cfg.default_prepend_bos`` (False unless set).
        """
        texts = [input] if isinstance(input, str) else input
        if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
            raise InputError(f"to_tokens takes a str or a list of str, got {type(input).__name__}")
        if not texts:
            raise InputError("to_tokens got an empty list of texts")
        side = check_padding_side(padding_side)
        bos = [self.tokenizer.eot_token] if self.resolve_prepend_bos(prepend_bos) else []
        ids = [bos + self.tokenizer.encode(t) for t in texts]
        for t, seq in zip(texts, ids):
            if not seq:
                raise InputError(f"text {t!r} has no tokens; pass prepend_bos=True or a non-empty text")
        pos = max(len(s) for s in ids)
        tokens = np.full((len(ids), pos), self.tokenizer.eot_token, dtype=np.int64)
        mask = np.zeros((len(ids), pos), dtype=np.int64)
        for i, seq in enumerate(ids):
            where = slice(0, len(seq)) if side == "right" else slice(pos - len(seq), pos)
            tokens[i, where] = seq
            mask[i, where] = 1
        return (tokens, mask) if return_mask else tokens

    def resolve_prepend_bos(self, prepend_bos) -> bool:
        """``prepend_bos`` as given, or the model's default (``cfg.default_prepend_bos``) for None."""
        if prepend_bos is None:
            return self.cfg.default_prepend_bos
        if not isinstance(prepend_bos, (bool, np.bool_)):
            raise InputError(f"prepend_bos={prepend_bos!r}: expected True, False or None (the model's default)")
        return bool(prepend_bos)

    def to_str_tokens(self, input, prepend_bos: bool | None = None):
        """Text or token ids -> the string of each token (a list, or a list of lists for a batch).

        A list of texts gives one list per text, each tokenized on its own (no padding), as in
        TransformerLens; a single token id gives a one-item list."""
        if isinstance(input, (list, tuple)) and input and all(isinstance(t, str) for t in input):
            return [self.to_str_tokens(t, prepend_bos=prepend_bos) for t in input]
        if np.ndim(input) == 0 and not isinstance(input, str):
            input = np.asarray(input).reshape(1)
        if isinstance(input, str):
            input = self.to_tokens(input, prepend_bos=prepend_bos)
        tokens = self.validate_tokens(input)
        rows = [[self.tokenizer.token_str(t) for t in row] for row in tokens]
        return rows[0] if len(rows) == 1 else rows

    def to_string(self, tokens):
        """Token ids -> text: a str for one id or [pos], a list of str for [batch, pos]."""
        arr = np.asarray(tokens)
        if arr.ndim == 0:
            arr = arr.reshape(1)
        checked = self.validate_tokens(arr)
        texts = [self.tokenizer.decode(row) for row in checked]
        return texts[0] if arr.ndim == 1 else texts

    def tokens_and_mask(self, input, prepend_bos: bool | None = None, offset: int = 0,
                        padding_side: str | None = None):
        """Text, a list of texts, or token ids -> (validated int64 tokens [batch, pos], the padding
        mask for texts or None for ids). ``prepend_bos`` and ``padding_side`` apply to text only."""
        if is_text(input):
            tokens, mask = self.to_tokens(input, prepend_bos=prepend_bos, return_mask=True,
                                          padding_side=padding_side)
            return self.validate_tokens(tokens, offset), mask
        return self.validate_tokens(input, offset), None

    def _prepare(self, input, attention_mask, offset: int = 0, prepend_bos: bool | None = None,
                 padding_side: str | None = None):
        """Any accepted input -> (checked int64 tokens [batch, pos], attention mask or None)."""
        tokens, mask = self.tokens_and_mask(input, prepend_bos, offset, padding_side)
        attention_mask = mask if attention_mask is None else attention_mask
        return tokens, check_mask(attention_mask, tokens.shape)

    def validate_tokens(self, tokens, offset: int = 0) -> np.ndarray:
        """Token ids -> int64 [batch, pos], or an ``InputError`` saying what is wrong with them.

        ``offset``: positions already in a key/value cache, counted against n_ctx."""
        arr = np.asarray(tokens)
        if arr.dtype == object or arr.dtype.kind not in "iu":
            raise InputError(f"token ids must be integers; got an array of dtype {arr.dtype} "
                             "(pass text, or integer ids)")
        if arr.ndim == 1:
            arr = arr[None]
        if arr.ndim != 2:
            raise InputError(f"token ids must have shape [batch, pos] or [pos]; got shape {arr.shape}")
        if arr.size == 0:
            raise InputError(f"empty input: token array of shape {arr.shape}")
        lo, hi = arr.min(), arr.max()
        if lo < 0 or hi >= self.cfg.d_vocab:
            bad = lo if lo < 0 else hi
            raise InputError(f"token id {bad} is out of range for vocab_size {self.cfg.d_vocab}")
        if offset + arr.shape[1] > self.cfg.n_ctx:
            raise InputError(
                f"sequence of {offset + arr.shape[1]} tokens is longer than the context of "
                f"n_ctx={self.cfg.n_ctx}; truncate it, e.g. tokens[:, -{self.cfg.n_ctx}:]")
        return arr.astype(np.int64, copy=False)

    def _check_residual(self, resid, layer: int) -> np.ndarray:
        resid = np.asarray(resid)
        if resid.ndim != 3 or resid.shape[-1] != self.cfg.d_model:
            raise InputError(f"with start_at_layer={layer} the input is the residual stream "
                             f"[batch, pos, {self.cfg.d_model}]; got shape {resid.shape}")
        return resid.astype(self.dtype, copy=False)

    def _check_layer(self, value, name: str, default: int) -> int:
        if value is None:
            return default
        n = self.cfg.n_layer
        if not isinstance(value, (int, np.integer)) or not -n <= value <= n:
            raise InputError(f"{name}={value!r} is out of range for a model of {n} layers")
        return int(value) if value >= 0 else n + int(value)

    def to_single_token(self, text: str) -> int:
        """The id of a text that is exactly one token; an error naming the split otherwise."""
        ids = self.tokenizer.encode(text)
        if len(ids) != 1:
            raise InputError(f"{text!r} is {len(ids)} tokens {[self.tokenizer.token_str(i) for i in ids]}, "
                             "not one (a leading space is usually part of the token: ' Mary')")
        return self.validate_tokens(ids)[0, 0].item()

    def tokens_to_residual_directions(self, tokens) -> np.ndarray:
        """The unembedding column of each token: its direction in the residual stream.
        A token (id or one-token string) -> [d_model]; ids [...] -> [..., d_model]."""
        if isinstance(tokens, str):
            tokens = self.to_single_token(tokens)
        ids = np.asarray(tokens)
        if ids.dtype.kind not in "iu" or ids.size == 0 or ids.min() < 0 or ids.max() >= self.cfg.d_vocab:
            raise InputError(f"expected token ids in [0, {self.cfg.d_vocab}); got {tokens!r}")
        return np.moveaxis(self.W_U[:, ids], 0, -1)


def read_text_file(path, error: type[Exception] = InputError, what: str = "") -> str:
    """A UTF-8 text file's contents; ``error`` (naming the file, and ``what`` it is) when it
    cannot be read or is not UTF-8."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise error(f"{what}{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise error(f"cannot read {what}{path}: {e.strerror}") from None
