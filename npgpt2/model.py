"""GPT-2's forward pass, top to bottom, with a hook point at every named activation.

Read ``GPT2.forward`` first: embedding, then ``n_layer`` blocks of (layer norm -> attention -> add,
layer norm -> MLP -> add), then the final layer norm and the unembedding. Every intermediate passes
through ``self._hook(name, array)``, which

* calls the hook functions registered for that name (they may observe or replace the array), and
* stores the array in the activation cache when one is being collected,

and otherwise returns the array untouched. The names and shapes are TransformerLens's
(``blocks.3.attn.hook_pattern`` is [batch, head, query_pos, key_pos]), so a breakpoint anywhere in
this file shows plain NumPy arrays with the names an interpretability paper would use.
"""

from __future__ import annotations

import contextlib
import math
import difflib
import re
from typing import Callable, Iterable

import numpy as np

from . import ops
from .config import GPT2Config
from .tokenizer import Tokenizer
from .weights import GPT2Weights

HookFn = Callable[[np.ndarray, "HookPoint"], "np.ndarray | None"]


class HookError(ValueError):
    """A hook name that does not exist, or a hook that returned an array of the wrong shape."""


class InputError(ValueError):
    """Input the model cannot take: empty, wrong type or shape, token ids out of range, too long."""


def is_text(input) -> bool:
    """A str, or a non-empty list/tuple of str (rather than token ids)."""
    return isinstance(input, str) or (isinstance(input, (list, tuple)) and len(input) > 0
                                      and all(isinstance(t, str) for t in input))


class HookPoint:
    """The second argument a hook function receives: which activation it is looking at."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def layer(self) -> int | None:
        """The block index for ``blocks.{l}...`` names, else None."""
        m = re.match(r"blocks\.(\d+)\.", self.name)
        return int(m.group(1)) if m else None

    def __repr__(self):
        return f"HookPoint({self.name!r})"


_BLOCK_HOOKS = (
    "hook_resid_pre",  # [batch, pos, d_model] the residual stream entering the block
    "ln1.hook_scale",  # [batch, pos, 1]
    "ln1.hook_normalized",  # [batch, pos, d_model] centred and divided by the scale, before w and b
    "attn.hook_q",  # [batch, pos, head, d_head]
    "attn.hook_k",  # [batch, pos, head, d_head]
    "attn.hook_v",  # [batch, pos, head, d_head]
    "attn.hook_attn_scores",  # [batch, head, query_pos, key_pos] q.k / sqrt(d_head), future = -inf
    "attn.hook_pattern",  # [batch, head, query_pos, key_pos] softmax of the scores
    "attn.hook_z",  # [batch, pos, head, d_head] pattern-weighted values
    "attn.hook_result",  # [batch, pos, head, d_model] each head's output (no b_O); only when asked
    "hook_attn_out",  # [batch, pos, d_model]
    "hook_resid_mid",  # [batch, pos, d_model]
    "ln2.hook_scale",
    "ln2.hook_normalized",
    "mlp.hook_pre",  # [batch, pos, d_mlp]
    "mlp.hook_post",  # [batch, pos, d_mlp]
    "hook_mlp_out",  # [batch, pos, d_model]
    "hook_resid_post",  # [batch, pos, d_model]
)


# Computed only when asked for by name (or by a list or predicate that matches it): not part of
# the default run_with_cache, as in TransformerLens. cache.compute_head_results() derives it from z.
_ON_REQUEST = ("attn.hook_result",)


class KeyValueCache:
    """Keys and values of the positions seen so far, for incremental decoding.

    ``keys[l]`` and ``values[l]`` are [batch, head, n_ctx, d_head] buffers; the first ``length``
    positions are filled. ``layer(l)`` gives the filled part. Preallocated so that one step writes
    one new position instead of copying the whole history.
    """

    def __init__(self, cfg: GPT2Config, batch: int, dtype):
        shape = (batch, cfg.n_head, cfg.n_ctx, cfg.d_head)
        self.keys = [np.empty(shape, dtype) for _ in range(cfg.n_layer)]
        self.values = [np.empty(shape, dtype) for _ in range(cfg.n_layer)]
        self.length = 0
        self.capacity = cfg.n_ctx
        self.batch = batch

    def layer(self, l: int) -> tuple[np.ndarray, np.ndarray]:
        """(keys, values) of layer ``l`` so far, each [batch, head, length, d_head]."""
        return self.keys[l][:, :, : self.length], self.values[l][:, :, : self.length]

    def _append(self, l: int, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Write this step's k, v ([batch, pos, head, d_head]) after the stored ones and return all."""
        end = self.length + k.shape[1]
        self.keys[l][:, :, self.length : end] = k.transpose(0, 2, 1, 3)
        self.values[l][:, :, self.length : end] = v.transpose(0, 2, 1, 3)
        return self.keys[l][:, :, :end], self.values[l][:, :, :end]


class GPT2:
    """GPT-2 in NumPy. Build one with ``npgpt2.from_pretrained(name)``.

    ``cfg`` holds the shape, ``weights`` the arrays (GPT-2's own layout), ``tokenizer`` the BPE.
    TransformerLens-named weight views (``W_Q``, ``W_O``, ``W_in`` ...) are properties.
    """

    def __init__(self, cfg: GPT2Config, weights: GPT2Weights, tokenizer: Tokenizer | None = None,
                 name: str | None = None):
        self.cfg = cfg
        self.weights = weights
        self.tokenizer = tokenizer if tokenizer is not None else Tokenizer()
        self.name = name or "gpt2"
        self.source: str | None = None  # where the files came from (set by the loader)
        self.files = None  # their local paths (hub.CheckpointFiles, set by the loader)
        self.processing = {"fold_ln": False, "center_writing_weights": False,
                           "center_unembed": False, "fold_value_biases": False}
        self._hook_names = self._list_hook_names()
        self._points = {n: HookPoint(n) for n in self._hook_names}
        self._hooks: dict[str, list[HookFn]] = {}
        self._cache: dict[str, np.ndarray] | None = None  # being collected by run_with_cache
        self._cache_names: frozenset[str] = frozenset()

    @classmethod
    def from_pretrained(cls, name: str = "gpt2", **kwargs) -> "GPT2":
        """See ``npgpt2.from_pretrained``."""
        from .loading import from_pretrained

        return from_pretrained(name, **kwargs)

    @property
    def config(self) -> GPT2Config:
        return self.cfg

    @property
    def dtype(self) -> np.dtype:
        return self.weights.W_E.dtype

    def __repr__(self):
        c = self.cfg
        return (f"GPT2({self.name!r}: n_layer={c.n_layer}, n_head={c.n_head}, d_model={c.d_model}, "
                f"d_vocab={c.d_vocab}, n_ctx={c.n_ctx}, dtype={self.dtype})")

    # ------------------------------------------------------------------------------------------
    # The forward pass
    # ------------------------------------------------------------------------------------------
    def forward(self, input, return_type: str | None = "logits", *, attention_mask=None,
                past_kv: KeyValueCache | None = None, start_at_layer: int | None = None,
                stop_at_layer: int | None = None, tokens=None):
        """Run GPT-2.

        input: text, a list of texts (right-padded, see ``to_tokens``), or token ids [batch, pos]
            (or [pos]). With ``start_at_layer=l`` it is instead the residual stream entering block l,
            [batch, pos, d_model], and ``tokens`` supplies the ids for the loss.
        return_type: "logits" -> [batch, pos, d_vocab]; "loss" -> scalar; "both" -> (logits, loss);
            None -> nothing (run for the hooks' sake).
        attention_mask: [batch, pos] 1 for real tokens, 0 for right padding; the loss skips padding.
            Taken from the tokenizer when ``input`` is a list of texts.
        past_kv: a ``KeyValueCache`` holding earlier positions; the new positions are appended to it.
        start_at_layer / stop_at_layer: run blocks [start, stop) only. With ``stop_at_layer`` the
            residual stream leaving the last block run is returned, [batch, pos, d_model].
        """
        cfg, w = self.cfg, self.weights
        n_layer = cfg.n_layer
        start = self._check_layer(start_at_layer, "start_at_layer", 0)
        stop = self._check_layer(stop_at_layer, "stop_at_layer", n_layer)
        offset = past_kv.length if past_kv is not None else 0

        if start_at_layer is None:
            tokens, mask = self._prepare(input, attention_mask, offset)
            batch, pos = tokens.shape
            embed = self._hook("hook_embed", w.W_E[tokens])  # [batch, pos, d_model]
            pos_embed = self._hook(  # [batch, pos, d_model]
                "hook_pos_embed", np.repeat(w.W_pos[None, offset : offset + pos], batch, axis=0))
            resid = embed + pos_embed
        else:
            resid = self._check_residual(input, start)
            tokens, mask = (None, None) if tokens is None else self._prepare(tokens, attention_mask, offset)
            batch, pos = resid.shape[:2]
        if past_kv is not None and past_kv.length + pos > past_kv.capacity:
            raise InputError(f"{past_kv.length} cached + {pos} new positions exceed n_ctx={cfg.n_ctx}")
        if past_kv is not None and past_kv.batch != batch:
            raise InputError(f"the key/value cache holds a batch of {past_kv.batch}; got {batch} sequences")

        for l in range(start, stop):
            resid = self._block(l, resid, past_kv)
        if past_kv is not None:
            past_kv.length += pos
        if stop_at_layer is not None:
            return resid

        logits = self.unembed(resid)  # [batch, pos, d_vocab]
        if return_type == "logits":
            return logits
        if return_type is None:
            return None
        if tokens is None:
            raise InputError("the loss needs token ids: pass tokens=... together with start_at_layer")
        loss = self._loss_from_logits(logits, tokens, mask, per_token=False)
        if return_type == "loss":
            return loss
        if return_type == "both":
            return logits, loss
        raise ValueError(f"return_type={return_type!r}: expected 'logits', 'loss', 'both' or None")

    __call__ = forward

    def unembed(self, resid: np.ndarray) -> np.ndarray:
        """Final layer norm, then the unembedding.  [batch, pos, d_model] -> [batch, pos, d_vocab]"""
        w = self.weights
        x = self._layer_norm("ln_final", resid, w.ln_final_w, w.ln_final_b)
        return ops.linear(x, w.W_U, w.b_U)

    def _block(self, l: int, resid: np.ndarray, past_kv: KeyValueCache | None) -> np.ndarray:
        """One transformer block.  [batch, pos, d_model] -> [batch, pos, d_model]"""
        blk = self.weights.blocks[l]
        resid_pre = self._hook(f"blocks.{l}.hook_resid_pre", resid)
        x = self._layer_norm(f"blocks.{l}.ln1", resid_pre, blk.ln1_w, blk.ln1_b)
        attn_out = self._hook(f"blocks.{l}.hook_attn_out", self._attention(l, x, past_kv))
        resid_mid = self._hook(f"blocks.{l}.hook_resid_mid", resid_pre + attn_out)
        x = self._layer_norm(f"blocks.{l}.ln2", resid_mid, blk.ln2_w, blk.ln2_b)
        mlp_out = self._hook(f"blocks.{l}.hook_mlp_out", self._mlp(l, x))
        return self._hook(f"blocks.{l}.hook_resid_post", resid_mid + mlp_out)

    def _layer_norm(self, prefix: str, x: np.ndarray, w, b) -> np.ndarray:
        """ops.layer_norm, with its scale and normalized output exposed.  [b, p, d] -> [b, p, d]"""
        x = ops.center(x)
        scale = self._hook(f"{prefix}.hook_scale", ops.ln_scale(x, self.cfg.eps))  # [b, p, 1]
        normalized = self._hook(f"{prefix}.hook_normalized", x / scale)  # [b, p, d]
        return ops.affine(normalized, w, b)

    def _attention(self, l: int, x: np.ndarray, past_kv: KeyValueCache | None) -> np.ndarray:
        """Causal multi-head self-attention.  [batch, pos, d_model] -> [batch, pos, d_model]"""
        blk, cfg = self.weights.blocks[l], self.cfg
        batch, pos, d_model = x.shape
        n_head, d_head = cfg.n_head, cfg.d_head
        name = f"blocks.{l}.attn."

        qkv = ops.linear(x, blk.W_qkv, blk.b_qkv)  # [batch, pos, 3 * d_model]
        q, k, v = (qkv[..., i * d_model : (i + 1) * d_model].reshape(batch, pos, n_head, d_head)
                   for i in range(3))  # each [batch, pos, head, d_head]
        q = self._hook(name + "hook_q", q)
        k = self._hook(name + "hook_k", k)
        v = self._hook(name + "hook_v", v)
        if past_kv is not None:  # keys/values of all positions so far: [batch, head, key_pos, d_head]
            keys, values = past_kv._append(l, k, v)
        else:
            keys, values = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)

        q = q.transpose(0, 2, 1, 3) / math.sqrt(d_head)  # [batch, head, query_pos, d_head]
        # (dividing q rather than the scores gives the same numbers, d_head being a power of two)
        if self._wants(name + "hook_attn_scores") or self._wants(name + "hook_pattern"):
            # q.k for every (query, key) pair; a query never sees later keys: their score is -inf
            scores = self._hook(name + "hook_attn_scores", ops.causal_scores(q, keys))  # [b, h, q, k]
            pattern = self._hook(name + "hook_pattern", ops.softmax(scores))  # rows sum to 1
            z = pattern @ values  # [batch, head, q, k] @ [batch, head, k, d_head]
        else:  # the same computation, skipping the masked half (see ops.causal_attention)
            z = ops.causal_attention(q, keys, values)  # [batch, head, query_pos, d_head]
        z = self._hook(name + "hook_z", z.transpose(0, 2, 1, 3))  # [batch, pos, head, d_head]
        if self._wants(name + "hook_result"):
            # Each head's write into the residual stream: z[h] @ W_O[h]. Summing them (plus b_O) is
            # the attention output, so a hook that edits one head's result edits the output.
            W_O = blk.W_attn_out.reshape(n_head, d_head, d_model)  # [head, d_head, d_model]
            # [batch, head, pos, d_head] @ [head, d_head, d_model] -> [batch, pos, head, d_model]
            result = (z.transpose(0, 2, 1, 3) @ W_O).transpose(0, 2, 1, 3)
            result = self._hook(name + "hook_result", result)
            return result.sum(axis=2) + blk.b_O
        return ops.linear(z.reshape(batch, pos, d_model), blk.W_attn_out, blk.b_O)

    def _mlp(self, l: int, x: np.ndarray) -> np.ndarray:
        """The feed-forward layer.  [batch, pos, d_model] -> [batch, pos, d_model]"""
        blk = self.weights.blocks[l]
        pre = self._hook(f"blocks.{l}.mlp.hook_pre", ops.linear(x, blk.W_in, blk.b_in))  # [b, p, d_mlp]
        post = self._hook(f"blocks.{l}.mlp.hook_post", ops.gelu_new(pre))  # [b, p, d_mlp]
        return ops.linear(post, blk.W_out, blk.b_out)

    # ------------------------------------------------------------------------------------------
    # Hooks and the activation cache
    # ------------------------------------------------------------------------------------------
    def _hook(self, name: str, act: np.ndarray) -> np.ndarray:
        fns = self._hooks.get(name)
        if fns:
            point = self._points[name]
            for fn in fns:
                out = fn(act, point)
                if out is not None:
                    act = self._checked_replacement(name, act, out)
        if self._cache is not None and name in self._cache_names:
            self._cache[name] = act
        return act

    @staticmethod
    def _checked_replacement(name: str, act: np.ndarray, out) -> np.ndarray:
        out = np.asarray(out)
        if out.shape != act.shape:
            raise HookError(f"hook on {name} returned shape {out.shape}; expected {act.shape} "
                            "(the shape it was given)")
        return out.astype(act.dtype, copy=False)

    def _wants(self, name: str) -> bool:
        """Is anyone listening at ``name``? (for activations computed only on request)"""
        return name in self._hooks or (self._cache is not None and name in self._cache_names)

    def hook_names(self) -> list[str]:
        """Every hook point, in the order the forward pass reaches them."""
        return list(self._hook_names)

    def _list_hook_names(self) -> tuple[str, ...]:
        names = ["hook_embed", "hook_pos_embed"]
        for l in range(self.cfg.n_layer):
            names += [f"blocks.{l}.{h}" for h in _BLOCK_HOOKS]
        return tuple(names + ["ln_final.hook_scale", "ln_final.hook_normalized"])

    def resolve_hook_names(self, names) -> list[str]:
        """A name, a list of names, or a predicate on names -> the matching hook names.

        Unknown names raise ``HookError`` with the closest real names.
        """
        if names is None:
            return list(self._hook_names)
        if callable(names):
            return [n for n in self._hook_names if names(n)]
        if isinstance(names, str):
            names = [names]
        names = list(names)
        for n in names:
            if n not in self._points:
                close = difflib.get_close_matches(str(n), self._hook_names, n=3, cutoff=0.5)
                hint = f"; did you mean {', '.join(close)}?" if close else "; see model.hook_names()"
                raise HookError(f"unknown hook point {n!r}{hint}")
        return names

    def add_hook(self, name, fn: HookFn) -> None:
        """Register ``fn(activation, hook)`` at a name (or every name a predicate accepts)."""
        if not callable(fn):
            raise HookError(f"hook for {name!r} is {type(fn).__name__}, not a function")
        for n in self.resolve_hook_names(name):
            self._hooks.setdefault(n, []).append(fn)

    def reset_hooks(self) -> None:
        """Remove every hook."""
        self._hooks = {}

    @contextlib.contextmanager
    def hooks(self, fwd_hooks: Iterable[tuple] = (), reset_hooks_end: bool = True):
        """Context manager: the hooks are active inside the block, and removed on leaving it,
        even when the block raises."""
        saved = {n: list(fns) for n, fns in self._hooks.items()}
        try:
            for name, fn in fwd_hooks:
                self.add_hook(name, fn)
            yield self
        finally:
            if reset_hooks_end:
                self._hooks = saved

    def run_with_hooks(self, input, fwd_hooks: Iterable[tuple] = (), return_type="logits",
                       reset_hooks_end: bool = True, **kwargs):
        """``forward`` with ``fwd_hooks`` = [(name or predicate, fn), ...] active.

        ``fn(activation, hook)`` returns None to only look, or an array of the same shape to replace
        the activation from there on.
        """
        with self.hooks(fwd_hooks, reset_hooks_end=reset_hooks_end):
            return self.forward(input, return_type=return_type, **kwargs)

    def run_with_cache(self, input, names_filter=None, return_type="logits", **kwargs):
        """``forward``, keeping activations: returns (output, ActivationCache).

        names_filter: None (every hook point but ``attn.hook_result``), a name, a list of names, or
        a predicate on names. Only the requested activations are kept. ``attn.hook_result``
        ([batch, pos, head, d_model] per layer, the largest) is computed only when it is requested.
        """
        from .cache import ActivationCache

        wanted = frozenset(self.resolve_hook_names(names_filter))
        if names_filter is None:  # "everything the forward pass computes anyway"
            wanted -= {n for n in wanted if n.endswith(_ON_REQUEST)}
        self._cache, self._cache_names = {}, wanted
        try:
            out = self.forward(input, return_type=return_type, **kwargs)
            store = self._cache
        finally:
            self._cache, self._cache_names = None, frozenset()
        return out, ActivationCache(store, self)

    # ------------------------------------------------------------------------------------------
    # Generation (see generate.py)
    # ------------------------------------------------------------------------------------------
    def generate(self, input, max_new_tokens: int = 20, **kwargs):
        """Continue a prompt; see ``npgpt2.generate.generate``."""
        from .generate import generate

        return generate(self, input, max_new_tokens=max_new_tokens, **kwargs)

    def generate_stream(self, input, max_new_tokens: int = 20, **kwargs):
        """Yield new tokens as they are produced; see ``npgpt2.generate.generate_stream``."""
        from .generate import generate_stream

        return generate_stream(self, input, max_new_tokens=max_new_tokens, **kwargs)

    # ------------------------------------------------------------------------------------------
    # Tokens
    # ------------------------------------------------------------------------------------------
    def to_tokens(self, input, prepend_bos: bool = False, return_mask: bool = False):
        """Text (or a list of texts) -> token ids, int64 [batch, pos].

        Texts of unequal length are right-padded with <|endoftext|>; with ``return_mask=True`` the
        attention mask [batch, pos] (1 = real token, 0 = padding) is returned too.

        prepend_bos=False is what GPT-2 and Hugging Face do. Set it to True to put <|endoftext|>
        first: then the first real token has something to attend to other than itself, which many
        interpretability results (and TransformerLens's default) assume, and its prediction is made.
        """
        texts = [input] if isinstance(input, str) else input
        if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
            raise InputError(f"to_tokens takes a str or a list of str, got {type(input).__name__}")
        if not texts:
            raise InputError("to_tokens got an empty list of texts")
        bos = [self.tokenizer.eot_token] if prepend_bos else []
        ids = [bos + self.tokenizer.encode(t) for t in texts]
        for t, seq in zip(texts, ids):
            if not seq:
                raise InputError(f"text {t!r} has no tokens; pass prepend_bos=True or a non-empty text")
        pos = max(len(s) for s in ids)
        tokens = np.full((len(ids), pos), self.tokenizer.eot_token, dtype=np.int64)
        mask = np.zeros((len(ids), pos), dtype=np.int64)
        for i, seq in enumerate(ids):
            tokens[i, : len(seq)] = seq
            mask[i, : len(seq)] = 1
        return (tokens, mask) if return_mask else tokens

    def to_str_tokens(self, input, prepend_bos: bool = False):
        """Text or token ids -> the string of each token (a list, or a list of lists for a batch)."""
        if isinstance(input, str):
            input = self.to_tokens(input, prepend_bos=prepend_bos)
        tokens = self.validate_tokens(input)
        rows = [[self.tokenizer.token_str(t) for t in row] for row in tokens]
        return rows[0] if len(rows) == 1 else rows

    def to_string(self, tokens):
        """Token ids -> text: a str for [pos], a list of str for [batch, pos]."""
        arr = np.asarray(tokens)
        checked = self.validate_tokens(arr)
        texts = [self.tokenizer.decode(row) for row in checked]
        return texts[0] if arr.ndim == 1 else texts

    def tokens_and_mask(self, input, prepend_bos: bool = False, offset: int = 0):
        """Text, a list of texts, or token ids -> (validated int64 tokens [batch, pos], the padding
        mask for texts or None for ids)."""
        if is_text(input):
            tokens, mask = self.to_tokens(input, prepend_bos=prepend_bos, return_mask=True)
            return self.validate_tokens(tokens, offset), mask
        return self.validate_tokens(input, offset), None

    def _prepare(self, input, attention_mask, offset: int = 0):
        """Any accepted input -> (checked int64 tokens [batch, pos], attention mask or None)."""
        tokens, mask = self.tokens_and_mask(input, offset=offset)
        attention_mask = mask if attention_mask is None else attention_mask
        if attention_mask is not None:
            attention_mask = np.asarray(attention_mask)
            if attention_mask.ndim == 1:
                attention_mask = attention_mask[None]
            if attention_mask.shape != tokens.shape:
                raise InputError(f"attention_mask has shape {attention_mask.shape}; expected "
                                 f"{tokens.shape}, the shape of the tokens")
        return tokens, attention_mask

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

    # ------------------------------------------------------------------------------------------
    # Loss
    # ------------------------------------------------------------------------------------------
    def loss(self, input, per_token: bool = False, attention_mask=None):
        """Mean next-token cross-entropy (nats). ``per_token=True`` -> [batch, pos - 1], with NaN
        where the target is padding (so ``np.nanmean`` gives the mean)."""
        tokens, mask = self._prepare(input, attention_mask)
        logits = self.forward(tokens)
        return self._loss_from_logits(logits, tokens, mask, per_token)

    @staticmethod
    def _loss_from_logits(logits, tokens, mask, per_token: bool):
        if tokens.shape[1] < 2:
            raise InputError("the loss needs at least 2 tokens (one to predict from, one to predict)")
        logp = ops.log_softmax(logits[:, :-1])  # [batch, pos - 1, d_vocab]
        nll = -np.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]  # [batch, pos - 1]
        if mask is not None:
            nll = np.where(np.asarray(mask)[:, 1:] > 0, nll, np.nan)
        if per_token:
            return nll
        return float(np.nanmean(nll))

    # ------------------------------------------------------------------------------------------
    # Weights under TransformerLens's names (views where the layout allows, stacked over layers)
    # ------------------------------------------------------------------------------------------
    def _per_head(self, part: int) -> np.ndarray:
        D, H, Dh = self.cfg.d_model, self.cfg.n_head, self.cfg.d_head
        return np.stack([b.W_qkv[:, part * D : (part + 1) * D].reshape(D, H, Dh).transpose(1, 0, 2)
                         for b in self.weights.blocks])

    def _per_head_bias(self, part: int) -> np.ndarray:
        D, H, Dh = self.cfg.d_model, self.cfg.n_head, self.cfg.d_head
        return np.stack([b.b_qkv[part * D : (part + 1) * D].reshape(H, Dh) for b in self.weights.blocks])

    W_E = property(lambda self: self.weights.W_E, doc="[d_vocab, d_model]")
    W_pos = property(lambda self: self.weights.W_pos, doc="[n_ctx, d_model]")
    W_U = property(lambda self: self.weights.W_U, doc="[d_model, d_vocab]")
    b_U = property(lambda self: self.weights.b_U if self.weights.b_U is not None
                   else np.zeros(self.cfg.d_vocab, self.dtype), doc="[d_vocab]")
    W_Q = property(lambda self: self._per_head(0), doc="[n_layer, n_head, d_model, d_head]")
    W_K = property(lambda self: self._per_head(1), doc="[n_layer, n_head, d_model, d_head]")
    W_V = property(lambda self: self._per_head(2), doc="[n_layer, n_head, d_model, d_head]")
    b_Q = property(lambda self: self._per_head_bias(0), doc="[n_layer, n_head, d_head]")
    b_K = property(lambda self: self._per_head_bias(1), doc="[n_layer, n_head, d_head]")
    b_V = property(lambda self: self._per_head_bias(2), doc="[n_layer, n_head, d_head]")
    W_O = property(lambda self: np.stack([b.W_attn_out.reshape(self.cfg.n_head, self.cfg.d_head, -1)
                                          for b in self.weights.blocks]),
                   doc="[n_layer, n_head, d_head, d_model]")
    b_O = property(lambda self: np.stack([b.b_O for b in self.weights.blocks]), doc="[n_layer, d_model]")
    W_in = property(lambda self: np.stack([b.W_in for b in self.weights.blocks]),
                    doc="[n_layer, d_model, d_mlp]")
    b_in = property(lambda self: np.stack([b.b_in for b in self.weights.blocks]), doc="[n_layer, d_mlp]")
    W_out = property(lambda self: np.stack([b.W_out for b in self.weights.blocks]),
                     doc="[n_layer, d_mlp, d_model]")
    b_out = property(lambda self: np.stack([b.b_out for b in self.weights.blocks]),
                     doc="[n_layer, d_model]")

    def process_weights(self, fold_ln: bool = False, center_writing_weights: bool = False,
                        center_unembed: bool = False, fold_value_biases: bool = False) -> "GPT2":
        """Rewrite the weights in place, keeping the log-probabilities (see ``npgpt2.processing``).
        Returns the model. ``self.processing`` records what has been applied."""
        from .processing import process_weights

        asked = dict(fold_ln=fold_ln, center_writing_weights=center_writing_weights,
                     center_unembed=center_unembed, fold_value_biases=fold_value_biases)
        again = [k for k, v in asked.items() if v and self.processing.get(k)]
        if again:
            raise ValueError(f"already applied to this model: {', '.join(again)}")
        self.weights = process_weights(self.weights, self.cfg, **asked)
        self.processing = {k: self.processing.get(k, False) or v for k, v in asked.items()}
        return self

    def accumulated_bias(self, layer: int, mlp_input: bool = False,
                         include_mlp_biases: bool = True) -> np.ndarray:
        """Sum of the output biases written into the residual stream before ``layer``: each b_O,
        and each b_out with ``include_mlp_biases``; ``mlp_input`` adds layer ``layer``'s b_O.
        [d_model]"""
        total = np.zeros(self.cfg.d_model, self.dtype)
        for blk in self.weights.blocks[:layer]:
            total = total + blk.b_O + (blk.b_out if include_mlp_biases else 0)
        if mlp_input:
            total = total + self.weights.blocks[layer].b_O
        return total

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

    def n_params(self) -> int:
        """Number of parameters (a tied unembedding counted once)."""
        total = sum(a.size for _, a in self.weights.arrays())
        if np.may_share_memory(self.weights.W_U, self.weights.W_E):
            total -= self.weights.W_U.size
        return total
