"""The transformer blocks once more, arranged for speed: the numbers of model.py, on every core.

Read model.py to learn GPT-2; this file only rearranges the same arithmetic. The model runs it in
place of its loop over ``_block`` when nobody looks inside: no hook, no activation cache, no
padding, and blockwise attention (``model.fast_path = False`` turns it off). A key/value cache is
fine: each layer's new keys and values go into it, and attention reads them from there. The two give
the same bits: model.py computes its products (``linear``) and its blockwise attention
(``attention``) in the pieces used here, because BLAS rounds a row of a product differently
depending on the rows beside it and on its thread count.

What changes, and why it is faster:

* Rows in tiles. The residual stream's rows (batch x position) are cut into an even number of
  tiles (``_tiles``): of at most ``TILE`` rows at gpt2-small's width and wider, taller in narrower
  models, so that a tile's [tile, d_mlp] hidden layer is about the same size (it stays in the
  processor's cache) and a narrow model does not pay NumPy's cost per call on many thin tiles.
  One tile goes through the end of one block and the start of the next in one go: attention
  output projection, residual add, layer norm, MLP, residual add, the next block's layer norm and
  q/k/v projection. Then attention runs one (batch row, head) at a time, a block of
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

Gradients too. A call that asks for them with nobody looking inside (``value_and_grad`` with no
hook) runs ``blocks`` with a tape (``_Tape``): what backward.py would read from the hook points
(layer norms' normalized values and scales, q|k|v, z, the MLP's post, and GELU's slope at its
pre, computed beside its exponential) and each head's
attention pattern, a causal half in blocks of queries, kept layer by layer. ``blocks_backward``
then reads the blocks from the last to the first as backward.py's ``_block_backward`` does, on the
pool; the tests compare the two as they compare the forwards.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from functools import lru_cache

import numpy as np

from . import ops
from .threads import get_num_threads, own_blas, ranges, worker_pool

MIN_ROWS = 128  # fewer rows (batch x position) than this: the textbook blocks are as fast or faster
TILE = 256  # the most rows of the residual stream in a tile, at gpt2-small's width (768) and wider
TILE_ELEMENTS = TILE * 4 * 768  # narrower models: tiles whose MLP hidden layer is about this size
QUERY_BLOCK = ops.QUERY_BLOCK  # queries per attention block (as model.py's blockwise attention)
VOCAB_BLOCK = 2048  # columns of the unembedding per task


class _Workspace:
    """The buffers of one forward pass of ``batch`` x ``pos`` rows, reused by later calls."""

    def __init__(self, batch: int, pos: int, n_head: int, d_model: int, d_mlp: int, dtype, keys: int | None = None):
        rows = batch * pos
        keys = pos if keys is None else keys  # the key positions attention sees: pos, and a cache's before them
        self.resid = np.empty((rows, d_model), dtype)  # the residual stream, updated in place
        self.branch = np.empty((rows, d_model), dtype)  # layer-norm outputs, then branch outputs
        self.qkv = np.empty((rows, 3 * d_model), dtype)  # q | k | v of the current block
        self.z = np.empty((rows, d_model), dtype)  # attention's heads' outputs, side by side
        self.pre = np.empty((rows, d_mlp), dtype)  # MLP hidden layer before GELU
        self.post = np.empty((rows, d_mlp), dtype)  # and after
        self.scores = np.empty((batch * n_head, QUERY_BLOCK * keys), dtype)  # one block's scores per head
        self.d_scores = None  # and their gradients, made by the first backward pass
        # where a block's intermediates go when nothing is kept for a backward pass: shared by all
        # layers, and the layer norms' outputs go into ``branch``
        self.attn_in = self.mlp_in = self.branch
        self.norm1 = self.scale1 = self.norm2 = self.scale2 = self.pattern = None

    def layer(self, l: int) -> "_Workspace":
        return self  # (a _Tape's layer(l) has the same fields, one set per layer)


class _Tape:
    """What the backward pass reads of one forward pass, kept by ``blocks`` layer by layer:
    ``layers[l]`` has the fields of ``_Workspace`` (qkv, z, pre, post, the layer norms' outputs
    attn_in and mlp_in) and the layer norms' normalized values and scales (norm1, scale1, norm2,
    scale2) and each head's attention pattern, all [rows, ...]. Its ``pre`` ends up holding GELU's
    slope at pre (``ops.gelu_new(slope=)``), which is all the backward pass needs of it. Made for one call and dropped with
    it (~75 MB a layer at 1024 tokens, float32: kept from call to call it would cost more memory
    than the time it saves)."""

    def __init__(self, batch: int, pos: int, n_layer: int, n_head: int, d_model: int, d_mlp: int, dtype):
        self.layers = [_TapeLayer(batch, pos, n_head, d_model, d_mlp, dtype) for _ in range(n_layer)]

    def layer(self, l: int) -> "_TapeLayer":
        return self.layers[l]


class _TapeLayer:
    def __init__(self, batch: int, pos: int, n_head: int, d_model: int, d_mlp: int, dtype):
        rows = batch * pos
        # each (batch row, head)'s attention pattern, its blocks of queries one after the other,
        # each block against the keys it sees (``_query_blocks``): a causal half, not [pos, pos]
        self.pattern = np.empty((batch * n_head, _query_blocks(pos)[-1][2]), dtype)
        self.norm1, self.norm2 = np.empty((rows, d_model), dtype), np.empty((rows, d_model), dtype)
        self.scale1, self.scale2 = np.empty((rows, 1), dtype), np.empty((rows, 1), dtype)
        self.attn_in, self.mlp_in = np.empty((rows, d_model), dtype), np.empty((rows, d_model), dtype)
        self.qkv = np.empty((rows, 3 * d_model), dtype)
        self.z = np.empty((rows, d_model), dtype)
        self.pre, self.post = np.empty((rows, d_mlp), dtype), np.empty((rows, d_mlp), dtype)


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


def pays(shape) -> bool:
    """Is a [batch, pos] input large enough for this file's threads to pay? (With a few rows, the
    products only read the weights, and the two threads of BLAS do that as well as ours.)"""
    return shape[0] * shape[1] >= MIN_ROWS


def blocks(model, resid: np.ndarray, start: int, stop: int, hook=None, past_kv=None) -> np.ndarray:
    """Blocks [start, stop) of ``model``, as ``model._block`` would run them with no hooks.
    resid [batch, pos, d_model] -> [batch, pos, d_model] (a new array)

    ``hook``: the call's Run; when it saves for a backward pass, what ``blocks_backward`` will read
    is kept on a tape, ``hook.tape``. ``past_kv``: a key/value cache holding earlier positions
    (as ``model.forward`` takes it, with no padding); each layer's new keys and values go into it
    (``extend``) and attention reads all of them."""
    cfg = model.cfg
    batch, pos, d_model = resid.shape
    if start == stop:
        return resid
    offset = 0 if past_kv is None else past_kv.length  # positions before these, in the cache
    key = (batch, pos, cfg.n_head, d_model, cfg.d_mlp, resid.dtype, offset + pos)
    tape = None
    if hook is not None and hook.save:  # (never with past_kv: the gradients refuse one)
        tape = hook.tape = _Tape(batch, pos, cfg.n_layer, cfg.n_head, d_model, cfg.d_mlp, resid.dtype)
    ws = _acquire(key)
    at = ws if tape is None else tape  # where layer l's intermediates go: at.layer(l)
    try:
        np.copyto(ws.resid, resid.reshape(-1, d_model))
        tiles = _tiles(batch * pos, _width(cfg))
        head_groups = _head_groups(batch * cfg.n_head)
        with worker_pool() as run:
            run(lambda r: _rows(model, ws, at, r, None, start), tiles)  # block `start` begins
            for l in range(start, stop):
                kv = None if past_kv is None else _extend(model, past_kv, l, at.layer(l).qkv, batch, pos)
                run(lambda tasks: _attention(model, ws, at.layer(l), pos, tasks, kv), head_groups)
                following = l + 1 if l + 1 < stop else None
                run(lambda r: _rows(model, ws, at, r, l, following), tiles)  # block l ends, l + 1 begins
        return ws.resid.reshape(batch, pos, d_model).copy()
    finally:
        _release(key, ws)


def unembed(model, resid: np.ndarray, hook=None) -> np.ndarray:
    """The final layer norm and the unembedding, as ``model._unembed`` with no hooks.
    resid [batch, pos, d_model] -> logits [batch, pos, d_vocab]

    The layer norm goes by row tiles; the product by blocks of ``VOCAB_BLOCK`` columns of W_U, all
    rows at once, so that each part of the large W_U is read from memory once. ``hook``: the
    call's Run; when it saves for a backward pass, the layer norm's normalized value and scale go
    into ``hook.saved`` under their hook points' names, as ``model._unembed`` would put them.
    """
    w = model.weights
    *lead, d_model = resid.shape
    x = resid.reshape(-1, d_model)  # [rows, d_model]
    normalized = np.empty_like(x)  # the layer norm's output
    eps = model.cfg.layer_norm_epsilon
    kept = hook is not None and hook.save
    if kept:
        norm_kept, scale_kept = np.empty_like(x), np.empty((x.shape[0], 1), x.dtype)
        hook.saved["ln_final.hook_normalized"] = norm_kept.reshape(*lead, d_model)
        hook.saved["ln_final.hook_scale"] = scale_kept.reshape(*lead, 1)

    def norm(rows):
        ops.layer_norm(x[rows], w.ln_final_w, w.ln_final_b, eps, out=normalized[rows],
                       normalized=norm_kept[rows] if kept else None, scale=scale_kept[rows] if kept else None)

    with worker_pool() as run:
        run(norm, _tiles(x.shape[0], d_model))
    return linear(normalized, w.W_U, w.b_U, by="columns").reshape(*lead, -1)


def linear(x: np.ndarray, W: np.ndarray, b: np.ndarray | None = None, by: str = "rows") -> np.ndarray:
    """x @ W + b computed as the fast path computes it, for the textbook path (model.py) to give the
    same bits: ``ops.linear`` on pieces, each on a thread of the pool with BLAS on one thread.
    x [..., n_in], W [n_in, n_out], b [n_out] -> [..., n_out]

    BLAS rounds a row of a product differently depending on the rows around it and on its own
    thread count, so a call with hooks, doing each product whole, would differ in the last bits from
    one without. by="rows": x's rows in the tiles ``blocks`` uses (``_tiles``); by="columns": W's
    columns in blocks of ``VOCAB_BLOCK``, all rows at once, as ``unembed`` does (or, when W has
    only one such block, the rows in tiles). Below
    ``MIN_ROWS`` rows the fast path is not taken, and this is ``ops.linear`` (under ``own_blas``).
    """
    if by not in ("rows", "columns"):
        raise ValueError(f"by={by!r}: expected 'rows' or 'columns'")
    rows = x.reshape(-1, x.shape[-1])  # [rows, n_in]
    if not pays((1, rows.shape[0])):
        with own_blas():
            return ops.linear(x, W, b)
    out = np.empty((rows.shape[0], W.shape[1]), np.result_type(x, W))  # [rows, n_out]
    if by == "columns" and W.shape[1] > VOCAB_BLOCK:
        pieces = [(slice(None), slice(c, c + VOCAB_BLOCK)) for c in range(0, W.shape[1], VOCAB_BLOCK)]
    else:  # by rows (and a small vocabulary's one block of columns)
        pieces = [(r, slice(None)) for r in _tiles(rows.shape[0], min(W.shape))]

    def product(piece):
        r, c = piece
        ops.linear(rows[r], W[:, c], None if b is None else b[c], out=out[r, c])

    with worker_pool() as run:
        run(product, pieces)
    return out.reshape(*x.shape[:-1], W.shape[1])


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, padding: np.ndarray | None = None, kept: bool = False):
    """``ops.causal_attention`` (``kept``: ``ops.causal_attention_kept``) computed as the fast path
    computes it, for the textbook path (model.py) to give the same bits: the heads in the pieces
    ``_head_pieces`` makes, each on a thread of the pool, BLAS on one thread. Arguments and results as theirs: q [batch, head,
    query_pos, d_head] (divided by sqrt(d_head)), k, v [batch, head, key_pos, d_head] -> z
    [batch, head, query_pos, d_head] (``kept``: (scores, pattern, z), scores and pattern [batch,
    head, query_pos, key_pos]). Below ``MIN_ROWS`` rows: ``ops.causal_attention(_kept)`` itself
    (under ``own_blas``)."""
    batch, n_head, pos = q.shape[:3]
    whole = ops.causal_attention_kept if kept else ops.causal_attention
    if not pays((batch, pos)):
        with own_blas():
            return whole(q, k, v, padding=padding)
    z = np.empty(q.shape, np.result_type(q, v))
    if kept:
        scores = np.empty(q.shape[:3] + (k.shape[2],), np.result_type(q, k))
        pattern = np.empty_like(scores)

    def heads(at):
        result = whole(q[at], k[at], v[at], padding=None if padding is None else padding[at[0]])
        if kept:
            scores[at], pattern[at], z[at] = result
        else:
            z[at] = result

    with worker_pool() as run:
        run(heads, _head_pieces(batch, n_head, pos, k.shape[2]))
    return (scores, pattern, z) if kept else z


def gelu_new(x: np.ndarray) -> np.ndarray:
    """``ops.gelu_new`` by row tiles, each on a thread of the pool (an elementwise function: the
    same bits however it is cut), for the textbook path's MLP. Below ``MIN_ROWS`` rows:
    ``ops.gelu_new`` itself. [..., d_mlp] -> [..., d_mlp]"""
    rows = x.reshape(-1, x.shape[-1])  # [rows, d_mlp]
    if not pays((1, rows.shape[0])):
        return ops.gelu_new(x)
    out = np.empty_like(rows)
    with worker_pool() as run:  # (tiles as a block's: d_mlp is 4 d_model)
        run(lambda r: ops.gelu_new(rows[r], out=out[r]), _tiles(rows.shape[0], max(1, rows.shape[1] // 4)))
    return out.reshape(x.shape)


def matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` (numpy's, stacked dimensions and all) under ``own_blas``: for the products of
    attention's textbook steps, whose bits must not depend on what other threads are doing."""
    with own_blas():
        return a @ b


def attention_backward(d_z: np.ndarray, q: np.ndarray, k: np.ndarray, v: np.ndarray, z: np.ndarray,
                       padding: np.ndarray | None = None):
    """``ops.causal_attention_backward``, its heads in the pieces ``attention`` uses, each on a
    thread of the pool, BLAS on one thread (below ``MIN_ROWS`` rows: itself, under ``own_blas``).
    Arguments and results as its: d_z, z [batch, head, query_pos, d_head]; q (divided by
    sqrt(d_head)), k, v [batch, head, key_pos, d_head] -> (d_q, d_k, d_v), shaped as q, k, v."""
    batch, n_head, pos = q.shape[:3]
    if not pays((batch, pos)):
        with own_blas():
            return ops.causal_attention_backward(d_z, q, k, v, z, padding=padding)
    d_q = np.empty(q.shape, np.result_type(q, k))
    d_k, d_v = np.empty(k.shape, d_q.dtype), np.empty(v.shape, np.result_type(q, v))

    def heads(at):
        d_q[at], d_k[at], d_v[at] = ops.causal_attention_backward(
            d_z[at], q[at], k[at], v[at], z[at], padding=None if padding is None else padding[at[0]])

    with worker_pool() as run:
        run(heads, _head_pieces(batch, n_head, pos, k.shape[2]))
    return d_q, d_k, d_v


def _head_pieces(batch: int, n_head: int, pos: int, keys: int | None = None) -> list[tuple[slice, slice]]:
    """The pieces ``attention`` and ``attention_backward`` share out: (batch rows, heads) slices
    into [batch, head, ...] arrays, as ``_head_batches`` cuts them."""
    return [(slice(rows.start, rows.stop), slice(hs.start, hs.stop))
            for group in _head_groups(batch * n_head) for rows, hs in _head_batches(group, n_head, pos, keys)]


def linear_backward(d_out: np.ndarray, x: np.ndarray, W: np.ndarray, transpose_dW: bool = False,
                    weights: bool = True, columns: np.ndarray | None = None):
    """``ops.linear_backward`` on the pool: d_x by row tiles, d_W and d_b by blocks of
    ``VOCAB_BLOCK`` output columns (a single block: in two halves of its input rows), each product
    on one thread, so that every thread count gives
    the same numbers. Below ``MIN_ROWS`` rows, or for a gradient with only a few non-zero
    ``columns`` (as ``ops.linear_backward`` takes them): ``ops.linear_backward``, under ``own_blas``.
    d_out [..., n_out], x [..., n_in], W [n_in, n_out] -> (d_x [..., n_in], d_W, d_b)"""
    if columns is not None or not pays((1, int(np.prod(x.shape[:-1])))):
        with own_blas():
            return ops.linear_backward(d_out, x, W, transpose_dW=transpose_dW, weights=weights, columns=columns)
    d_out_rows = d_out.reshape(-1, d_out.shape[-1])  # [rows, n_out]
    x_rows = x.reshape(-1, x.shape[-1])  # [rows, n_in]
    d_x = np.empty(x_rows.shape, np.result_type(d_out, W))
    jobs = [lambda r=r: np.matmul(d_out_rows[r], W.T, out=d_x[r]) for r in _tiles(len(x_rows), min(W.shape))]
    d_W = d_b = None
    if weights:
        d_W = np.empty(W.shape[::-1] if transpose_dW else W.shape, d_x.dtype)  # (as ops.linear_backward)
        d_b = np.empty(W.shape[1], d_x.dtype)

        def part(c, s):  # d_W's output columns c and input rows s (and d_b's columns c, once)
            if transpose_dW:
                np.matmul(d_out_rows[:, c].T, x_rows[:, s], out=d_W[c, s])
            else:
                np.matmul(x_rows[:, s].T, d_out_rows[:, c], out=d_W[s, c])
            if s.start == 0:
                d_out_rows[:, c].sum(axis=0, out=d_b[c])

        blocks = [slice(c0, c0 + VOCAB_BLOCK) for c0 in range(0, W.shape[1], VOCAB_BLOCK)]
        # one block of columns (a small vocabulary): its input rows in two halves, work for two threads
        inputs = _slices(W.shape[0], -(-W.shape[0] // 2)) if len(blocks) == 1 else [slice(0, W.shape[0])]
        jobs += [lambda c=c, s=s: part(c, s) for c in blocks for s in inputs]
    with worker_pool() as run:
        run(lambda job: job(), jobs)
    return d_x.reshape(x.shape), (d_W.T if transpose_dW and weights else d_W), d_b


@lru_cache(maxsize=64)
def _tiles(n_rows: int, width: int) -> tuple[slice, ...]:
    """The row tiles: an even number (work for two or more threads), each of at most ``TILE`` rows,
    or, in a model narrower than gpt2-small, of at most TILE_ELEMENTS // (4 * width) rows (a
    [tile, d_mlp] hidden layer of about the same size). ``width``: the model's d_model, which is
    the narrower side of each of a block's weight matrices (``min(W.shape)``: that is how
    ``linear`` knows it). They depend on the shapes only, never on the number of threads."""
    most = max(TILE, TILE_ELEMENTS // (4 * width))
    n_tiles = 2 * max(1, math.ceil(n_rows / (2 * most)))
    size = math.ceil(n_rows / n_tiles)
    return tuple(slice(start, min(start + size, n_rows)) for start in range(0, n_rows, size))


def _width(cfg) -> int:
    """The ``width`` of ``_tiles`` for a model: the narrower side of its block weights, d_model.
    (In a model whose MLP is narrower than d_model, ``n_inner < n_embd``, no single width is every
    product's narrower side: there ``linear`` can tile a product otherwise than ``blocks`` does,
    and a call with hooks can differ from a plain call in the last bits.)"""
    return min(cfg.d_model, cfg.d_mlp)


def _head_groups(n_tasks: int) -> tuple[range, ...]:
    """(batch row, head) tasks in contiguous groups, two per thread: fewer hand-overs to the pool
    when each head's work is small. (Which thread runs a head changes none of its arithmetic.)"""
    return ranges(n_tasks, min(n_tasks, 2 * get_num_threads()))


def _rows(model, ws: _Workspace, at, rows: slice, ending: int | None, beginning: int | None) -> None:
    """One tile of rows: the rest of block ``ending`` after attention, then the start of block
    ``beginning`` up to its q, k, v (either may be None). Layer l's intermediates go to
    ``at.layer(l)`` (the workspace's shared buffers, or a tape's)."""
    resid, branch = ws.resid[rows], ws.branch[rows]  # [tile, d_model]
    eps = model.cfg.layer_norm_epsilon
    if ending is not None:
        w, a = model.weights.blocks[ending], at.layer(ending)
        ops.linear(a.z[rows], w.W_O, w.b_O, out=branch)  # attention output
        resid += branch  # resid_mid
        mlp_in = ops.layer_norm(resid, w.ln2_w, w.ln2_b, eps, out=a.mlp_in[rows], **_kept(a.norm2, a.scale2, rows))
        pre = ops.linear(mlp_in, w.W_in, w.b_in, out=a.pre[rows])  # [tile, d_mlp]
        # (a tape keeps GELU's slope, all the backward pass needs of pre, in pre's place)
        post = ops.gelu_new(pre, out=a.post[rows], slope=None if a.norm2 is None else pre)  # [tile, d_mlp]
        ops.linear(post, w.W_out, w.b_out, out=branch)  # MLP output
        resid += branch  # resid_post
    if beginning is not None:
        w, a = model.weights.blocks[beginning], at.layer(beginning)
        attn_in = ops.layer_norm(resid, w.ln1_w, w.ln1_b, eps, out=a.attn_in[rows], **_kept(a.norm1, a.scale1, rows))
        ops.linear(attn_in, w.W_qkv, w.b_qkv, out=a.qkv[rows])  # [tile, 3 * d_model]


def _kept(normalized, scale, rows) -> dict:
    """layer_norm's arguments that keep its normalized value and scale (for a tape), or none."""
    return {} if normalized is None else {"normalized": normalized[rows], "scale": scale[rows]}


def _extend(model, past_kv, l: int, qkv: np.ndarray, batch: int, pos: int):
    """Layer l's new keys and values (in ``qkv``, [rows, 3 * d_model]) written into ``past_kv``
    after the positions it holds, as model.py's ``_attention`` writes them: -> (k, v), every
    position's, [batch, key_pos, head, d_head]."""
    qkv = qkv.reshape(batch, pos, 3, model.cfg.n_head, model.cfg.d_head)  # [batch, pos, 3, head, d_head]
    return past_kv.extend(l, qkv[:, :, 1], qkv[:, :, 2])


def _attention(model, ws: _Workspace, a, pos: int, tasks: range, kv=None) -> None:
    """Causal attention of the (batch row, head) ``tasks`` of a layer whose q|k|v are in ``a.qkv``:
    writes their z into a.z. Heads go together, [batch rows, heads, queries, d_head] at a time
    (``_head_batches``): with short sequences, one NumPy call for many small heads costs less than
    one each. Every head's arithmetic is the same either way. ``kv``: (k, v) [batch, key_pos, head,
    d_head], every position's keys and values when a cache holds key_pos - pos earlier ones
    (``_extend``); the queries are the last pos positions."""
    keys = pos if kv is None else kv[0].shape[1]
    offset = keys - pos  # a query's position in the sequence, minus its row in q
    for group, tasks_here, by_head in _head_views(model, a, pos, tasks, keys):
        q, z = by_head(a.qkv, 0), by_head(a.z, 0)
        k, v = (by_head(a.qkv, 1), by_head(a.qkv, 2)) if kv is None else (by_head(kv[0]), by_head(kv[1]))
        for start, stop, end in _query_blocks(pos):  # queries start..stop-1 see keys 0..offset+stop-1
            visible = offset + stop
            if a.pattern is None:  # one block's scores at a time, in the workspace
                scores = ws.scores[tasks_here, : (stop - start) * visible]
            else:  # kept for the backward pass (never with a cache)
                scores = a.pattern[tasks_here, end - (stop - start) * stop: end]
            scores = scores.reshape(*group, stop - start, visible)  # [rows, heads, block, visible]
            np.matmul(q[..., start:stop, :] / math.sqrt(model.cfg.d_head), k[..., :visible, :].swapaxes(-1, -2), out=scores)
            scores += ops.causal_mask(stop - start, visible, scores.dtype)
            ops.softmax(scores, out=scores)  # the pattern, in place
            np.matmul(scores, v[..., :visible, :], out=z[..., start:stop, :])


def _head_views(model, a, pos: int, tasks: range, keys: int | None = None):
    """For each piece of ``tasks`` that ``_head_batches`` makes: ((batch rows, heads), the slice of
    tasks it covers, and ``by_head(x, part)``, which views part ``part`` (0, 1, 2 for q, k, v) of
    an [rows, parts * d_model] array as [batch rows, heads, pos, d_head]; ``by_head(x)`` views a
    [batch, key_pos, head, d_head] array (a cache's keys or values) as [batch rows, heads, key_pos,
    d_head]. ``keys``: the key positions (pos, unless a cache holds earlier ones)."""
    n_head = model.cfg.n_head
    d_model = model.cfg.n_embd
    d_head = d_model // n_head
    for batch_rows, heads in _head_batches(tasks, n_head, pos, keys):
        rows = slice(batch_rows.start * pos, batch_rows.stop * pos)
        tasks_here = slice(batch_rows.start * n_head + heads.start, (batch_rows.stop - 1) * n_head + heads.stop)

        def by_head(x, part=None, rows=rows, batch_rows=batch_rows, heads=heads):  # a view, no copy
            if part is None:  # [batch, key_pos, head, d_head]
                return x[batch_rows.start: batch_rows.stop, :, heads.start: heads.stop].transpose(0, 2, 1, 3)
            cols = slice(part * d_model + heads.start * d_head, part * d_model + heads.stop * d_head)
            return x[rows, cols].reshape(len(batch_rows), pos, len(heads), d_head).transpose(0, 2, 1, 3)

        yield (len(batch_rows), len(heads)), tasks_here, by_head


HEAD_BATCH_ELEMENTS = 1 << 17  # heads go together while their scores of a block of queries are no more


def _head_batches(tasks: range, n_head: int, pos: int, keys: int | None = None):
    """``tasks`` (batch row x n_head + head) as (range of batch rows, range of heads) pieces whose
    scores for a block of queries stay within ``HEAD_BATCH_ELEMENTS``: several whole batch rows
    when all their heads fit (short sequences), else part of one batch row's heads (several heads
    at 128 tokens, one at 1024). ``keys``: the key positions, when a cache holds more than ``pos``."""
    keys = pos if keys is None else keys
    most = max(1, HEAD_BATCH_ELEMENTS // (min(pos, QUERY_BLOCK) * keys))  # heads in one piece
    task = tasks.start
    while task < tasks.stop:
        b, h = divmod(task, n_head)
        whole_rows = min(most // n_head, (tasks.stop - task) // n_head) if h == 0 else 0
        if whole_rows >= 1:
            yield range(b, b + whole_rows), range(n_head)
            task += whole_rows * n_head
        else:
            stop = min(tasks.stop - b * n_head, n_head, h + most)
            yield range(b, b + 1), range(h, stop)
            task = b * n_head + stop


@lru_cache(maxsize=8)
def _query_blocks(pos: int) -> tuple[tuple[int, int, int], ...]:
    """The blocks of ``QUERY_BLOCK`` queries of a sequence of ``pos``: (start, stop, end) for the
    queries start..stop-1 (which see keys 0..stop-1), end being where their [stop - start, stop]
    scores end when the blocks' scores are laid one after the other."""
    blocks, end = [], 0
    for start in range(0, pos, QUERY_BLOCK):
        stop = min(start + QUERY_BLOCK, pos)
        end += (stop - start) * stop
        blocks.append((start, stop, end))
    return tuple(blocks)


def blocks_backward(model, tape: _Tape, d_resid: np.ndarray, start: int, stop: int, param_grads: bool):
    """Blocks [start, stop) backwards, from what ``blocks`` kept on ``tape``: backward.py's
    ``_block_backward`` for a call with no hooks, arranged as ``blocks`` is.
    d_resid [batch, pos, d_model], leaving block stop - 1 -> (d_resid entering block start (a new
    array), {l: BlockWeights of d metric / d weight} or None when not ``param_grads``)

    Everything goes to the pool, as in the forward: per block, the rows in tiles from d_resid_post
    back to d_z (MLP, GELU, second layer norm, attention output), then attention by (batch row,
    head), then the rows again back to d_resid_pre (q/k/v, first layer norm) beside the weights'
    gradients (each a product summed over all rows, split into slices of its input dimension).
    """
    from .weights import BlockWeights

    cfg = model.cfg
    batch, pos, d_model = d_resid.shape
    key = (batch, pos, cfg.n_head, d_model, cfg.d_mlp, d_resid.dtype, pos)  # (as the forward's)
    ws = _acquire(key)
    if ws.d_scores is None:
        ws.d_scores, ws.d_mid = np.empty_like(ws.scores), np.empty_like(ws.branch)
    grads = {} if param_grads else None
    try:
        d = ws.resid  # d metric / d residual stream, updated in place from block to block
        np.copyto(d, d_resid.reshape(-1, d_model))
        tiles = list(enumerate(_tiles(batch * pos, _width(cfg))))
        head_groups = _head_groups(batch * cfg.n_head)
        # the gradients that flow through the block, in the workspace's buffers:
        d_post, d_z, d_qkv = ws.pre, ws.z, ws.qkv  # d_post becomes d_pre in place; d_z, then d_attn_in
        d_resid_post, d_resid_mid = ws.branch, ws.d_mid  # kept for the weights' gradients
        for l in reversed(range(start, stop)):
            w, a = model.weights.blocks[l], tape.layer(l)
            sums = [{} for _ in tiles]  # each tile's part of the biases' and gains' gradients

            def mlp_rows(tile):  # d_resid_post -> d_resid_mid -> d_z, on one tile of rows
                i, r = tile
                d_resid_post[r] = d[r]
                np.matmul(d[r], w.W_out.T, out=d_post[r])  # mlp_out = post @ W_out + b_out
                d_post[r] *= a.pre[r]  # d_pre: GELU's slope, kept by the forward in pre's place
                np.matmul(d_post[r], w.W_in.T, out=d_z[r])  # d_mlp_in (d_z's rows, not yet needed)
                d_x, d_gain, d_bias = ops.layer_norm_backward(d_z[r], a.norm2[r], a.scale2[r], w.ln2_w, param_grads)
                d[r] += d_x  # d_resid_mid
                d_resid_mid[r] = d[r]
                np.matmul(d[r], w.W_O.T, out=d_z[r])  # attn_out = concat(z) @ W_O + b_O
                if param_grads:
                    sums[i].update(ln2_w=d_gain, ln2_b=d_bias, b_out=d_resid_post[r].sum(axis=0),
                                   b_in=d_post[r].sum(axis=0), b_O=d_resid_mid[r].sum(axis=0))

            def attn_rows(tile):  # d_q|d_k|d_v -> d_resid_pre, on one tile of rows
                i, r = tile
                d_attn_in = np.matmul(d_qkv[r], w.W_qkv.T, out=d_z[r])  # (d_z's rows, no longer needed)
                d_x, d_gain, d_bias = ops.layer_norm_backward(d_attn_in, a.norm1[r], a.scale1[r], w.ln1_w, param_grads)
                d[r] += d_x
                if param_grads:
                    sums[i].update(ln1_w=d_gain, ln1_b=d_bias, b_qkv=d_qkv[r].sum(axis=0))

            # the weights' gradients, d W = input^T @ d output summed over the rows, go beside the
            # attention and the rows (they read what those leave alone), each once its d output is made
            products = {"W_out": (a.post, d_resid_post), "W_in": (a.mlp_in, d_post),
                        "W_O": (a.z, d_resid_mid), "W_qkv": (a.attn_in, d_qkv)} if param_grads else {}
            g = {name: np.empty(getattr(w, name).shape, d.dtype) for name in products}

            def weight_jobs(*names):
                return [lambda x=products[name][0][:, s], d_out=products[name][1], out=g[name][s]:
                        np.matmul(x.T, d_out, out=out) for name in names if name in products
                        for s in _slices(products[name][0].shape[1])]

            with worker_pool() as run:
                run(mlp_rows, tiles)  # makes d_resid_post, d_post (d_pre), d_resid_mid, d_z
                run(lambda job: job(), weight_jobs("W_out", "W_in", "W_O") + [
                    lambda tasks=tasks: _attention_backward(model, ws, a, pos, tasks) for tasks in head_groups])
                run(lambda job: job(), weight_jobs("W_qkv") + [lambda tile=tile: attn_rows(tile) for tile in tiles])
            if param_grads:
                for name in sums[0]:  # the tiles' parts, added in tile order
                    g[name] = None if getattr(w, name) is None else sum(part[name] for part in sums)
                grads[l] = BlockWeights(**g)
            tape.layers[l] = None  # read: its memory can go back while the other layers' gradients come
        return d.reshape(batch, pos, d_model).copy(), grads
    finally:
        _release(key, ws)


def _slices(n: int, size: int = 384) -> tuple[slice, ...]:
    """[0, n) in an even number of slices of about ``size`` (a weight gradient's rows, one slice per
    task: an even number, so that two threads finish together)."""
    return tuple(slice(r.start, r.stop) for r in ranges(n, 2 * max(1, round(n / (2 * size)))))


def _attention_backward(model, ws: _Workspace, a, pos: int, tasks: range) -> None:
    """``_attention`` of the (batch row, head) ``tasks``, backwards (as ops.causal_attention_backward),
    in the same pieces: from their d_z in ws.z and what the tape keeps in ``a`` (the patterns too),
    writes their d_q, d_k, d_v into ws.qkv."""
    for group, tasks_here, by_head in _head_views(model, a, pos, tasks):
        q, k, v, z = by_head(a.qkv, 0), by_head(a.qkv, 1), by_head(a.qkv, 2), by_head(a.z, 0)
        d_z = by_head(ws.z, 0)  # [rows, heads, pos, d_head]
        d_q, d_k, d_v = by_head(ws.qkv, 0), by_head(ws.qkv, 1), by_head(ws.qkv, 2)  # views into d_q | d_k | d_v
        d_k[...] = 0  # keys and values collect from every block of queries that sees them
        d_v[...] = 0
        root = math.sqrt(model.cfg.d_head)
        for start, stop, end in _query_blocks(pos):  # queries start..stop-1 see keys 0..stop-1
            pattern = a.pattern[tasks_here, end - (stop - start) * stop: end].reshape(*group, stop - start, stop)
            d_v[..., :stop, :] += pattern.swapaxes(-1, -2) @ d_z[..., start:stop, :]  # z = pattern @ v
            d_scores = ws.d_scores[tasks_here, : (stop - start) * stop].reshape(*group, stop - start, stop)
            np.matmul(d_z[..., start:stop, :], v[..., :stop, :].swapaxes(-1, -2), out=d_scores)  # d_pattern
            # softmax backward: pattern * (d_pattern - sum(pattern * d_pattern)), that sum being d_z . z
            d_scores -= (d_z[..., start:stop, :] * z[..., start:stop, :]).sum(axis=-1, keepdims=True)
            d_scores *= pattern
            # scores = (q / sqrt(d_head)) @ k.T
            np.matmul(d_scores, k[..., :stop, :], out=d_q[..., start:stop, :])
            d_q[..., start:stop, :] /= root
            d_k[..., :stop, :] += d_scores.swapaxes(-1, -2) @ (q[..., start:stop, :] / root)
