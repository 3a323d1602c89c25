"""The transformer blocks once more, arranged for speed: the numbers of model.py, on every core.

Read model.py to learn GPT-2; this file only rearranges the same arithmetic. The model runs it in
place of its loop over ``_block`` when nobody looks inside: no hook, no cache, no gradient, no
key/value cache, and blockwise attention (``model.fast_path = False`` turns it off). The tests
compare the two (float32 within 1e-5, float64 within 1e-12).

What changes, and why it is faster:

* Rows in tiles. The residual stream's rows (batch x position) are cut into an even number of
  tiles of at most ``TILE`` rows (``_tiles``). One tile goes through the end of one block and the
  start of the next in one go: attention output projection, residual add, layer norm, MLP (whose
  [tile, d_mlp] hidden layer stays in the processor's last-level cache), residual add, the next block's layer
  norm and q/k/v projection. Then attention runs one (batch row, head) at a time, a block of
  queries against the keys they may see (as ``ops.causal_attention``).
* Threads. Tiles and heads are independent, so a pool of threads takes them (threads.py), each
  with a single-threaded BLAS: elementwise work (layer norm, GELU, softmax), which NumPy runs on one
  core, now runs on all of them, as the matrix products do.
* No fresh memory. Every intermediate is written into buffers kept from one call to the next
  (``_Workspace``), with ``out=`` arguments and in-place steps. Memory a process touches for the
  first time costs a page fault per page; a forward pass at 1024 tokens would otherwise touch
  ~400 MB of it.

The tiles are the same whatever the number of threads, so every thread count gives the same
numbers, bit for bit.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict

import numpy as np

from . import ops
from .threads import get_num_threads, worker_pool

TILE = 256  # the most rows of the residual stream in a tile
QUERY_BLOCK = 128  # queries per attention block
VOCAB_BLOCK = 2048  # columns of the unembedding per task


class _Workspace:
    """The buffers of one forward pass of ``batch`` x ``pos`` rows, reused by later calls."""

    def __init__(self, batch: int, pos: int, n_head: int, d_model: int, d_mlp: int, dtype):
        rows = batch * pos
        self.resid = np.empty((rows, d_model), dtype)  # the residual stream, updated in place
        self.branch = np.empty((rows, d_model), dtype)  # layer-norm outputs, then branch outputs
        self.qkv = np.empty((rows, 3 * d_model), dtype)  # q | k | v of the current block
        self.z = np.empty((rows, d_model), dtype)  # attention's heads' outputs, side by side
        self.pre = np.empty((rows, d_mlp), dtype)  # MLP hidden layer before GELU
        self.post = np.empty((rows, d_mlp), dtype)  # and after
        self.scores = np.empty((batch * n_head, QUERY_BLOCK * pos), dtype)  # one block's scores per head


_workspaces: "OrderedDict[tuple, list[_Workspace]]" = OrderedDict()  # shape -> idle workspaces
_workspaces_lock = threading.Lock()
_KEEP_SHAPES = 2  # workspaces of the most recent shapes are kept; older ones are freed


def _acquire(key: tuple) -> _Workspace:
    with _workspaces_lock:
        idle = _workspaces.get(key)
        if idle:
            _workspaces.move_to_end(key)
            return idle.pop()
    return _Workspace(*key)


def _release(key: tuple, ws: _Workspace) -> None:
    with _workspaces_lock:
        _workspaces.setdefault(key, []).append(ws)
        _workspaces.move_to_end(key)
        while len(_workspaces) > _KEEP_SHAPES:
            _workspaces.popitem(last=False)


def blocks(model, resid: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Blocks [start, stop) of ``model``, as ``model._block`` would run them with no hooks.
    resid [batch, pos, d_model] -> [batch, pos, d_model] (a new array)"""
    cfg = model.cfg
    batch, pos, d_model = resid.shape
    if start == stop:
        return resid
    key = (batch, pos, cfg.n_head, d_model, cfg.d_mlp, resid.dtype)
    ws = _acquire(key)
    try:
        np.copyto(ws.resid, resid.reshape(-1, d_model))
        tiles = _tiles(batch * pos)
        head_groups = _head_groups(batch * cfg.n_head)
        with worker_pool() as run:
            run(lambda r: _rows(model, ws, r, None, start), tiles)  # block `start` begins
            for l in range(start, stop):
                run(lambda heads: [_attention(model, ws, l, pos, task) for task in heads], head_groups)
                following = l + 1 if l + 1 < stop else None
                run(lambda r: _rows(model, ws, r, l, following), tiles)  # block l ends, l + 1 begins
        return ws.resid.reshape(batch, pos, d_model).copy()
    finally:
        _release(key, ws)


def unembed(model, resid: np.ndarray) -> np.ndarray:
    """The final layer norm and the unembedding, as ``model._unembed`` with no hooks.
    resid [batch, pos, d_model] -> logits [batch, pos, d_vocab]

    The layer norm goes by row tiles; the product by blocks of ``VOCAB_BLOCK`` columns of W_U, all
    rows at once, so that each part of the large W_U is read from memory once.
    """
    w = model.weights
    *lead, d_model = resid.shape
    x = resid.reshape(-1, d_model)  # [rows, d_model]
    normalized = np.empty_like(x)
    logits = np.empty((x.shape[0], w.W_U.shape[1]), x.dtype)  # [rows, d_vocab]
    eps = model.cfg.layer_norm_epsilon

    def norm(rows):
        ops.layer_norm(x[rows], w.ln_final_w, w.ln_final_b, eps, out=normalized[rows])

    def product(c0):
        cols = slice(c0, c0 + VOCAB_BLOCK)
        ops.linear(normalized, w.W_U[:, cols], None if w.b_U is None else w.b_U[cols], out=logits[:, cols])

    with worker_pool() as run:
        run(norm, _tiles(x.shape[0]))
        run(product, range(0, logits.shape[1], VOCAB_BLOCK))
    return logits.reshape(*lead, -1)


def _tiles(n_rows: int) -> list[slice]:
    """The row tiles: an even number (work for two or more threads), of at most ``TILE`` rows each.
    They depend on the number of rows only, never on the number of threads."""
    n_tiles = 2 * max(1, math.ceil(n_rows / (2 * TILE)))
    size = math.ceil(n_rows / n_tiles)
    return [slice(start, min(start + size, n_rows)) for start in range(0, n_rows, size)]


def _head_groups(n_tasks: int) -> list[range]:
    """(batch row, head) tasks in contiguous groups, two per thread: fewer hand-overs to the pool
    when each head's work is small. (Which thread runs a head changes none of its arithmetic.)"""
    n_groups = min(n_tasks, 2 * get_num_threads())
    bounds = np.linspace(0, n_tasks, n_groups + 1).round().astype(int)
    return [range(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def _rows(model, ws: _Workspace, rows: slice, ending: int | None, beginning: int | None) -> None:
    """One tile of rows: the rest of block ``ending`` after attention, then the start of block
    ``beginning`` up to its q, k, v (either may be None)."""
    resid, branch = ws.resid[rows], ws.branch[rows]  # [tile, d_model]
    eps = model.cfg.layer_norm_epsilon
    if ending is not None:
        w = model.weights.blocks[ending]
        ops.linear(ws.z[rows], w.W_attn_out, w.b_O, out=branch)  # attention output
        resid += branch  # resid_mid
        ops.layer_norm(resid, w.ln2_w, w.ln2_b, eps, out=branch)  # MLP input
        pre = ops.linear(branch, w.W_in, w.b_in, out=ws.pre[rows])  # [tile, d_mlp]
        post = ops.gelu_new(pre, out=ws.post[rows])  # [tile, d_mlp]
        ops.linear(post, w.W_out, w.b_out, out=branch)  # MLP output
        resid += branch  # resid_post
    if beginning is not None:
        w = model.weights.blocks[beginning]
        ops.layer_norm(resid, w.ln1_w, w.ln1_b, eps, out=branch)  # attention input
        ops.linear(branch, w.W_qkv, w.b_qkv, out=ws.qkv[rows])  # [tile, 3 * d_model]


def _attention(model, ws: _Workspace, l: int, pos: int, task: int) -> None:
    """Causal attention of one (batch row, head): writes its z into ws.z."""
    n_head = model.cfg.n_head
    d_model = ws.z.shape[1]
    d_head = d_model // n_head
    b, h = divmod(task, n_head)
    rows, cols = slice(b * pos, (b + 1) * pos), slice(h * d_head, (h + 1) * d_head)
    q = ws.qkv[rows, cols]  # [pos, d_head] (views into q | k | v)
    k_t = ws.qkv[rows, d_model:][:, cols].T  # [d_head, pos]
    v = ws.qkv[rows, 2 * d_model:][:, cols]  # [pos, d_head]
    z = ws.z[rows, cols]  # [pos, d_head]
    for start in range(0, pos, QUERY_BLOCK):
        stop = min(start + QUERY_BLOCK, pos)  # queries start..stop-1 see keys 0..stop-1
        scores = ws.scores[task, : (stop - start) * stop].reshape(stop - start, stop)  # [block, stop]
        np.matmul(q[start:stop] / math.sqrt(d_head), k_t[:, :stop], out=scores)
        scores += ops.causal_mask(stop - start, stop, scores.dtype)
        ops.softmax(scores, out=scores)  # the pattern, in place
        np.matmul(scores, v[:stop], out=z[start:stop])
