"""The key/value cache: keys and values of the positions seen so far, for incremental decoding.

A new position's query must attend to every earlier key, but the earlier keys and values do not
change when a token is added (attention is causal), so they are kept instead of recomputed.
"""

from __future__ import annotations

import numpy as np

from .config import GPT2Config


class KeyValueCache:
    """Keys and values of every layer for the first ``length`` positions of a batch.

    ``keys[l]`` and ``values[l]`` are [batch, head, n_ctx, d_head] buffers, preallocated so that one
    step writes one new position instead of copying the whole history. ``layer(l)`` gives the
    filled part. A forward pass with ``past_kv`` must run every layer (it refuses
    ``start_at_layer``/``stop_at_layer`` that skip one), so all layers always hold ``length``
    positions.

    It also keeps the attention mask of those positions once one of them is padding (a batch of
    left-padded prompts): later steps must go on hiding the padding keys, and count positions from
    each row's first real token.
    """

    def __init__(self, cfg: GPT2Config, batch: int, dtype):
        shape = (batch, cfg.n_head, cfg.n_ctx, cfg.d_head)
        self.keys = [np.empty(shape, dtype) for _ in range(cfg.n_layer)]
        self.values = [np.empty(shape, dtype) for _ in range(cfg.n_layer)]
        self.length = 0
        self.mask = None  # [batch, n_ctx] 1 = real token, 0 = padding; None while there is no padding
        self.capacity = cfg.n_ctx
        self.batch = batch
        self.n_layer = cfg.n_layer

    def layer(self, l: int) -> tuple[np.ndarray, np.ndarray]:
        """(keys, values) of layer ``l`` so far, each [batch, head, length, d_head]."""
        return self.keys[l][:, :, : self.length], self.values[l][:, :, : self.length]

    def extend(self, l: int, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Write this call's keys and values of layer ``l`` ([batch, pos, head, d_head], as
        ``hook_k``/``hook_v``) after the stored ones, and return all of them, [batch, length + pos,
        head, d_head]. ``length`` itself moves on only when the whole forward pass has finished
        (``advance``)."""
        end = self.length + k.shape[1]
        self.keys[l][:, :, self.length : end] = k.transpose(0, 2, 1, 3)
        self.values[l][:, :, self.length : end] = v.transpose(0, 2, 1, 3)
        return self.keys[l][:, :, :end].transpose(0, 2, 1, 3), self.values[l][:, :, :end].transpose(0, 2, 1, 3)

    def keys_mask(self, mask: np.ndarray | None, shape: tuple[int, int], start: int, stop: int) -> np.ndarray | None:
        """For a call of ``shape`` (batch, pos) running layers [start, stop): refuse it if this cache
        cannot serve it (``check``); record its attention mask ([batch, pos]; None = all real) after
        the stored one, and return the mask of every key, [batch, length + pos], or None while no
        key is padding."""
        self.check(*shape, start, stop)
        if mask is not None and not mask.all() and self.mask is None:
            self.mask = np.ones((self.batch, self.capacity), dtype=np.int64)
        if self.mask is None:
            return None
        end = self.length + shape[1]
        self.mask[:, self.length : end] = 1 if mask is None else mask
        return self.mask[:, :end]

    def check(self, batch: int, pos: int, start: int, stop: int) -> None:
        """Refuse a call this cache cannot serve correctly (before anything is written)."""
        from .inputs import InputError

        if (start, stop) != (0, self.n_layer):
            raise InputError(
                f"a key/value cache needs every layer to run; got layers [{start}, {stop}) of "
                f"{self.n_layer} (start_at_layer/stop_at_layer cannot be used with past_kv)")
        if self.batch != batch:
            raise InputError(f"the key/value cache holds a batch of {self.batch}; got {batch} sequences")
        if self.length + pos > self.capacity:
            raise InputError(f"{self.length} cached + {pos} new positions exceed n_ctx={self.capacity}")

    def advance(self, pos: int) -> None:
        """Count ``pos`` more positions as held (after every layer has appended them)."""
        self.length += pos
