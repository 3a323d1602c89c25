"""Many patched runs of one corrupted batch, computed together: the engine of the exact patching
sweeps (patching.py).

A patched run is the corrupted prompts' forward pass with one activation of one layer replaced,
in part, by the clean run's. Three things make a sweep of them cheap, none of which changes the
numbers (the tests compare every sweep with a plain loop of ``run_with_hooks``, one patch per run):

* A patch that copies values equal to the corrupted run's (positions before the first token where
  clean and corrupted prompts differ, say) changes nothing: it scores the corrupted run.
* A run patched at layer l starts at layer l, from the corrupted run's residual stream there, and
  recomputes only the positions from the first one the patch changes (p0): attention is causal,
  so the earlier positions keep the corrupted run's activations, and their keys and values, which
  the recomputed positions read from the corrupted run (``CorruptedPrefix``, a key/value cache).
  A metric that says which logits it reads (``Metric.logits_read``, as ``logit_diff`` does) gets
  only those computed, in the patched runs and in the corrupted run; any other metric gets every
  logit (the corrupted run's before p0).
* With such a metric (and no hooks of the model's own), a run joins where its patch enters the
  residual stream: a patch of resid_pre at block l, of resid_post or mlp_out after it, and one
  inside block l (resid_mid, attn_out, or a head's z, q, k, v or pattern) after block l too,
  once the patched heads' attention and block l's MLP are computed for it alone: the other
  heads of block l are the corrupted run's (``_joins``). No hook is needed then.
* Runs go in batches, several copies of the corrupted prompts each patched at its own place:
  sorted by p0, then by layer, and cut into chunks (a chunk recomputes from its first run's p0, so
  a run whose p0 is much later starts a new one; at most ``TARGET_ROWS`` rows, and less memory
  than ``memory_budget()``). In a chunk, the copies of a run patched at layer l join the batch at
  block l (or l + 1, above): each block reads its weights once for every run of the chunk that
  has reached it.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from .. import fast, memory, metrics, ops
from ..hooks import block_hook

TARGET_ROWS = 2048  # most rows (prompt copies x positions) of a batched pass's last layer
MOST_REDUNDANT = 4 / 3  # a run of a batched pass recomputes at most this many times the positions it needs
MAX_CHUNK_BYTES = 1 << 30  # the most working memory one pass may take


def kind(activation: str) -> str:
    """Which layout an activation has: "pattern" [batch, head, dest_pos, src_pos], "head"
    [batch, pos, head, d_head] (z, q, k, v) or "resid" [batch, pos, d_model]."""
    return "pattern" if activation == "pattern" else "head" if activation in ("z", "q", "k", "v") else "resid"


POS_AXIS = {"resid": 1, "head": 1, "pattern": 2}  # the axis of an activation that runs along the queries


def memory_budget() -> int:
    """The most bytes one batched pass may hold: an eighth of the memory available, at most
    ``MAX_CHUNK_BYTES``, at least 64 MB."""
    available = memory.available_bytes()
    available = 8 << 30 if available is None else available  # (unknown: assume 8 GB)
    return int(max(64 << 20, min(MAX_CHUNK_BYTES, available // 8)))


def run_bytes(cfg, batch: int, n_pos: int, n_new: int, itemsize: int, all_logits: bool) -> int:
    """Working memory of one patched run of a ``batch`` of ``n_pos``-token prompts recomputing
    ``n_new`` positions: per recomputed row, the activations of a block at d_model (residual
    stream, layer norms, q|k|v, z, outputs: about 12 x d_model) and at d_mlp (3 x d_mlp), the
    attention scores and pattern of every head (2 x n_head x n_pos), the keys and values over all
    positions (2 x d_model x n_pos / n_new), and every logit (2 x d_vocab) when the metric may read
    any of them."""
    per_row = 12 * cfg.d_model + 3 * cfg.d_mlp + 2 * cfg.n_head * n_pos + 2 * cfg.d_model * n_pos / n_new
    if all_logits:
        per_row += 2 * cfg.d_vocab
    return int(batch * n_new * per_row * itemsize)


class CorruptedPrefix:
    """The corrupted run's keys and values at positions [0, p0), as a key/value cache for a batch
    of ``copies`` patched runs that recompute positions p0 on: a forward pass given it as
    ``past_kv`` appends each layer's new keys and values after these (the part of
    ``kv_cache.KeyValueCache`` a forward pass calls: ``length``, ``keys_mask``, ``extend``,
    ``advance``). The prompts carry no padding. ``then``: (layer, k, v), the patched runs' own
    keys and values [copies x batch, n, head, d_head] at positions [p0, p0 + n) of that one layer,
    after the corrupted run's (``length`` is then p0 + n)."""

    def __init__(self, corrupted, p0: int, copies: int, then=None):
        self.corrupted, self.p0, self.copies, self.then = corrupted, p0, copies, then
        self.length = p0 + (0 if then is None else then[1].shape[1])

    def keys_mask(self, mask, shape, start, stop):
        return None  # no padding

    def extend(self, l: int, k: np.ndarray, v: np.ndarray):
        """k, v [copies x batch, n_new, head, d_head] -> [copies x batch, length + n_new, head, d_head]"""
        if self.then is not None and self.then[0] != l:
            raise ValueError(f"this prefix holds layer {self.then[0]}'s recomputed keys and values, not layer {l}'s")

        def joined(name, new, own):
            past = self.corrupted[f"blocks.{l}.attn.hook_{name}"][:, : self.p0]  # [batch, p0, head, d_head]
            out = np.empty((new.shape[0], self.length + new.shape[1], *new.shape[2:]), new.dtype)
            out.reshape(self.copies, -1, *out.shape[1:])[:, :, : self.p0] = past
            if own is not None:
                out[:, self.p0: self.length] = own
            out[:, self.length:] = new
            return out

        own = (None, None) if self.then is None else self.then[1:]
        return joined("k", k, own[0]), joined("v", v, own[1])

    def advance(self, pos: int) -> None:
        pass


def first_changed_positions(clean_cache, corrupted, runs) -> np.ndarray:
    """For each run (activation, layer, index into the activation [batch, ...]): the first query
    position whose computation the patch changes (-1: the patch copies the corrupted run's own
    values, and changes nothing)."""
    differs = {}  # hook name -> clean != corrupted
    out = np.empty(len(runs), dtype=np.int64)
    for i, (activation, layer, where) in enumerate(runs):
        name = f"blocks.{layer}.{block_hook(activation)}"
        if name not in differs:
            differs[name] = np.asarray(clean_cache[name] != corrupted[name])
        changed = np.zeros_like(differs[name])
        changed[where] = differs[name][where]
        axis = POS_AXIS[kind(activation)]
        by_pos = changed.any(axis=tuple(a for a in range(changed.ndim) if a != axis))  # [pos]
        out[i] = by_pos.argmax() if by_pos.any() else -1
    return out


def plan(model, tokens, clean_cache, metric, runs, chunk_size=None) -> "Plan":
    """How ``patched_values`` will run ``runs``: the corrupted run once (its logits, and the
    activations, keys and values the patched runs read), each run's first changed position and
    the batches."""
    batch, n_pos = tokens.shape
    cfg = model.cfg
    first_layer = min((layer for _, layer, _ in runs), default=0)
    names = {f"blocks.{layer}.{block_hook(a)}" for a, layer, _ in runs}
    names |= {f"blocks.{l}.{h}" for l in range(first_layer, cfg.n_layer)
              for h in ("hook_resid_pre", "attn.hook_k", "attn.hook_v")}
    reads = _reads(metric, batch, n_pos, cfg.d_vocab)
    own_hooks = not model._new_run().idle()
    if reads is not None and not own_hooks:  # what ``_joins`` reads to put the patches into the residual stream
        names |= {f"blocks.{layer}.{h}" for a, layer, _ in runs for h in _DIRECT_NEEDS[a]}
    if reads is None:
        corrupted_logits, corrupted = model.run_with_cache(tokens, names_filter=sorted(names))
    else:  # only the logits the metric reads
        resid, corrupted = model.run_with_cache(tokens, names_filter=sorted(names), stop_at_layer=cfg.n_layer)
        corrupted_logits = reads.read(model, resid[None], 0, None)[0]  # [batch, columns]
    starts = first_changed_positions(clean_cache, corrupted, runs)
    if own_hooks:  # a hook of the model's own may read positions by number: give it them all
        starts[starts > 0] = 0
    live = sorted((i for i in range(len(runs)) if starts[i] >= 0), key=lambda i: (starts[i], runs[i][1]))
    chunks = _chunks(live, runs, starts, chunk_size, cfg, batch, n_pos, model.dtype.itemsize, reads is None)
    return Plan(corrupted_logits, corrupted, reads, starts, chunks, own_hooks)


@dataclass
class Plan:
    """What ``plan`` decided: the corrupted run, and which runs go in which batch."""

    corrupted_logits: np.ndarray  # [batch, pos, d_vocab]; [batch, columns] when the metric says which it reads
    corrupted: object  # the corrupted run's ActivationCache
    reads: "_Reads | None"  # the logits the metric reads (None: all)
    starts: np.ndarray  # [runs]: each run's first changed position, -1 for a run that changes nothing
    chunks: list  # [[run, ...], ...]: the batched passes, by layer, each from its earliest run's start
    own_hooks: bool  # the model has hooks of its own (every position is computed for them)


def patched_values(model, tokens, clean_cache, metric, runs, chunk_size=None, progress=True,
                   desc="patching") -> np.ndarray:
    """The metric of each patched run: runs [(activation, layer, index)] -> values [len(runs)].

    tokens: the corrupted prompts [batch, pos]; ``clean_cache`` holds each run's activation;
    index: a tuple indexing the activation [batch, ...] (slice(None) over the batch), the entries
    patched from the clean run. chunk_size: most runs per batched pass (None: by rows and memory,
    see ``run_bytes``)."""
    from tqdm.auto import tqdm

    p = plan(model, tokens, clean_cache, metric, runs, chunk_size)
    values = np.empty(len(runs))
    with tqdm(total=len(runs), desc=desc, disable=not progress, leave=False) as bar:
        bar.update(int((p.starts < 0).sum()))
        for chunk in p.chunks:
            for i, value in zip(chunk, _run_chunk(model, [runs[i] for i in chunk], int(p.starts[chunk].min()),
                                                  clean_cache, p.corrupted, p.corrupted_logits, metric, p.reads,
                                                  p.own_hooks)):
                values[i] = value
            bar.update(len(chunk))
    if (p.starts < 0).any():  # the patches that change nothing score the corrupted run
        values[p.starts < 0] = float(metric(p.corrupted_logits if p.reads is None else p.reads.logits(p.corrupted_logits)))
    return values


def _chunks(live, runs, starts, chunk_size, cfg, batch, n_pos, itemsize, all_logits):
    """``live`` (sorted by first changed position, then layer) cut into batches: a batch recomputes
    the positions from its first run's start, so a run that would recompute more than
    1 / ``MOST_REDUNDANT`` times the positions it needs starts a new one; so does a run that would
    take the last layer past ``TARGET_ROWS`` rows, ``chunk_size`` runs or the memory budget."""
    chunks, chunk, limit = [], [], 0
    budget = memory_budget()
    for i in live:
        if chunk and (len(chunk) >= limit or n_pos - starts[i] < (n_pos - starts[chunk[0]]) / MOST_REDUNDANT):
            chunks.append(chunk)
            chunk = []
        if not chunk:
            n_new = n_pos - int(starts[i])  # the positions this chunk recomputes
            if chunk_size is not None:
                limit = chunk_size
            else:
                by_rows = math.ceil(TARGET_ROWS / (batch * n_new))
                by_memory = budget // run_bytes(cfg, batch, n_pos, n_new, itemsize, all_logits)
                limit = max(1, min(by_rows, by_memory))
        chunk.append(i)
    if chunk:
        chunks.append(chunk)
    return [sorted(chunk, key=lambda i: runs[i][1]) for chunk in chunks]  # by layer: the order they join in


def _run_chunk(model, runs, p0, clean_cache, corrupted, corrupted_logits, metric, reads, own_hooks=False):
    """One batched pass: the runs [(activation, layer, index)] (sorted by layer), each a copy of the
    corrupted prompts recomputed from position ``p0``. -> the metric of each run.

    Each run joins the batch where its patch first changes the residual stream (``_joins``):
    the copies of a run patched at layer l join at block l, or, when the metric says which
    logits it reads and the model has no hooks of its own, with the patch already applied to the
    residual stream: at block l for resid_pre, after block l for resid_post, mlp_out, resid_mid,
    attn_out and a head's z, q, k, v or pattern (the patched heads' attention and block l's MLP
    computed for them alone: the other heads' work in block l is the corrupted run's).

    When the metric reads one position r >= p0 of every prompt (and the model has no hooks of its
    own), the last block computes position r alone: the other positions' keys and values are all
    it needs of them (``_last_block_at``)."""
    batch = corrupted_logits.shape[0]
    n_layer = model.cfg.n_layer
    direct = reads is not None and not own_hooks  # the patches go into the residual stream, no hooks
    r = reads.one_position() if direct else None
    r = None if r is None or r < p0 else r
    joins = _joins(model, runs, p0, clean_cache, corrupted, direct, r)  # [(block, run's position in runs, start)]
    copy_of = {i: c for c, (_, i, _) in enumerate(joins)}  # run -> its copy in the batch
    x = None  # [copies x batch, n_new (or 1: position r alone), d_model]
    layers = sorted({block for block, _, _ in joins})
    for layer, until in zip(layers, layers[1:] + [n_layer]):  # blocks [layer, until) with the copies joined so far
        before = 0 if x is None else x.shape[0] // batch  # the copies that joined earlier
        joining = [(i, start) for block, i, start in joins if block == layer]
        start = np.concatenate([start for _, start in joining])  # [joining x batch, n_new (or 1), d_model]
        x = start if x is None else np.concatenate([x, start])
        copies = x.shape[0] // batch
        if layer == n_layer:
            break
        hooks = [] if direct else _patch_hooks([runs[i] for i, _ in joining], before, copies, batch, p0, clean_cache)
        prefix = CorruptedPrefix(corrupted, p0, copies) if p0 else None
        if until < n_layer or r is None and reads is not None:
            x = model.run_with_hooks(x, fwd_hooks=hooks, start_at_layer=layer, past_kv=prefix,
                                     stop_at_layer=until)  # [copies x batch, n_new, d_model]
        elif reads is None:  # every logit: the corrupted run's before p0, the patched runs' from p0
            logits = model.run_with_hooks(x, fwd_hooks=hooks, start_at_layer=layer, past_kv=prefix)
            logits = logits.reshape(copies, batch, *logits.shape[1:])  # [copies, batch, n_new, d_vocab]
            values = [metric(np.concatenate([corrupted_logits[:, :p0], logits[c]], axis=1)) for c in range(copies)]
            return [values[copy_of[i]] for i in range(len(runs))]
        else:  # the last block at position r alone
            if layer < n_layer - 1:
                x = model(x, start_at_layer=layer, past_kv=prefix, stop_at_layer=n_layer - 1)
            x = _last_block_at(model, x, r - p0, corrupted, p0, copies)  # [copies x batch, 1, d_model], at position r
    read = reads.read(model, x.reshape(copies, batch, *x.shape[1:]), p0 if r is None else r, corrupted_logits)
    values = [metric(reads.logits(read[c])) for c in range(copies)]
    return [values[copy_of[i]] for i in range(len(runs))]


# what the corrupted run must keep at a run's layer for ``_joins`` to put its patch into the
# residual stream, beside the patched activation itself
_DIRECT_NEEDS = {
    "resid_pre": (), "resid_post": (), "resid_mid": (), "mlp_out": ("hook_resid_mid",), "attn_out": ("hook_resid_pre",),
    "z": ("hook_resid_mid",), "pattern": ("hook_resid_mid", "attn.hook_z", "attn.hook_v"),
    **{a: ("hook_resid_mid", "attn.hook_z", "attn.hook_q", "attn.hook_k", "attn.hook_v") for a in "qkv"},
}


def _joins(model, runs, p0, clean_cache, corrupted, direct, r=None):
    """Where each run joins the batch and with what: [(block, i, start)], sorted by block, ``start``
    [batch, n_new, d_model] the residual stream entering that block (``n_layer``: leaving the last)
    at positions p0 on (after the last block, at position ``r`` alone when one is given).

    ``direct`` False: every run joins at its layer with the corrupted run's residual stream, a
    hook to patch it there (``_patch_hooks``). ``direct``: the patch is already in the residual
    stream; the runs whose patch is inside block l (resid_mid, attn_out, and a head's z, q, k, v,
    pattern) go through the rest of block l here, those of one layer together."""
    cfg = model.cfg

    def at(l, hook):  # the corrupted run's [batch, pos, ...] activation at block l, positions p0 on
        return corrupted[f"blocks.{l}.{hook}"][:, p0:]

    def patched(activation, l, where):  # the patched run's activation from p0: [batch, n_new, d_model]
        return _patched(corrupted, clean_cache, f"blocks.{l}.{block_hook(activation)}", where)[:, p0:]

    joins, mids = [], defaultdict(list)  # mids: layer -> [(i, resid_mid)], to go through that layer's MLP
    for i, (activation, l, where) in enumerate(runs):
        if not direct:
            joins.append((l, i, at(l, "hook_resid_pre")))
        elif activation in ("resid_pre", "resid_post"):
            joins.append((l + (activation == "resid_post"), i, patched(activation, l, where)))
        elif activation == "mlp_out":
            joins.append((l + 1, i, at(l, "hook_resid_mid") + patched(activation, l, where)))
        elif activation == "resid_mid":
            mids[l].append((i, patched(activation, l, where)))
        elif activation == "attn_out":
            mids[l].append((i, at(l, "hook_resid_pre") + patched(activation, l, where)))
        else:  # a head's z, q, k, v or pattern: the heads it touches, their z, into W_O
            head_axis = 1 if activation == "pattern" else 2
            heads = np.atleast_1d(np.arange(cfg.n_head)[where[head_axis]])
            z = _heads_z(model, activation, l, where, heads, p0, clean_cache, corrupted)  # [batch, n_new, heads, d_head]
            dz = (z - at(l, "attn.hook_z")[:, :, heads]).reshape(*z.shape[:2], -1)  # [batch, n_new, heads x d_head]
            W_O = model.weights.blocks[l].W_O.reshape(cfg.n_head, cfg.d_head, cfg.d_model)[heads]
            mids[l].append((i, at(l, "hook_resid_mid") + dz @ W_O.reshape(-1, cfg.d_model)))
    last = cfg.n_layer - 1
    if r is not None:  # after the last block only position r is read
        joins = [(block, i, start[:, r - p0: r - p0 + 1] if block > last else start) for block, i, start in joins]
        mids[last] = [(i, resid_mid[:, r - p0: r - p0 + 1]) for i, resid_mid in mids.get(last, [])]
    for l, group in mids.items():  # block l's MLP, for every run that joins after it at once
        if not group:
            continue
        resid_mid = np.concatenate([start for _, start in group])  # [runs x batch, n_new, d_model]
        resid_post = _rest_of_block(model, l, resid_mid).reshape(len(group), -1, *resid_mid.shape[1:])
        joins += [(l + 1, i, resid_post[k]) for k, (i, _) in enumerate(group)]
    return sorted(joins, key=lambda j: (j[0], j[1]))


def _heads_z(model, activation, l, where, heads, p0, clean_cache, corrupted) -> np.ndarray:
    """The z of ``heads`` in block l with one of their activations patched (z, q, k, v or pattern;
    ``where`` indexes it), at positions p0 on: the attention of model.py for those heads alone.
    -> [batch, n_new, heads, d_head]"""
    def act(name):  # block l's corrupted activation, patched if it is the one named
        hook = f"blocks.{l}.attn.hook_{name}"
        return _patched(corrupted, clean_cache, hook, where) if name == activation else corrupted[hook]

    if activation == "z":
        return act("z")[:, p0:, heads]
    v = act("v")[:, :, heads].transpose(0, 2, 1, 3)  # [batch, heads, pos, d_head]
    if activation == "pattern":
        z = act("pattern")[:, heads, p0:] @ v  # [batch, heads, n_new, d_head]
    else:
        q = act("q")[:, p0:, heads].transpose(0, 2, 1, 3) / math.sqrt(model.cfg.d_head)  # [batch, heads, n_new, d_head]
        z = ops.causal_attention(q, act("k")[:, :, heads].transpose(0, 2, 1, 3), v)
    return z.transpose(0, 2, 1, 3)


def _patched(corrupted, clean_cache, name: str, where: tuple) -> np.ndarray:
    """The corrupted run's activation ``name`` with the clean run's entries at ``where``: a new array."""
    act = np.array(corrupted[name])
    act[where] = clean_cache[name][where]
    return act


def _rest_of_block(model, l, resid_mid):
    """Block l after its attention: resid_mid + MLP(layer norm 2 (resid_mid)), as model.py's
    ``_block`` computes it.  [..., d_model] -> [..., d_model]"""
    w = model.weights.blocks[l]
    mlp_in = ops.layer_norm(resid_mid, w.ln2_w, w.ln2_b, model.cfg.layer_norm_epsilon)
    post = fast.gelu_new(fast.linear(mlp_in, w.W_in, w.b_in))
    return resid_mid + fast.linear(post, w.W_out, w.b_out)


def _last_block_at(model, x, i, corrupted, p0, copies):
    """The last block at one recomputed position i of ``copies`` patched runs: the earlier
    positions' keys and values (its first layer norm and the k and v columns of W_qkv) are all it
    needs of them. x [copies x batch, n_new, d_model] entering it, from position p0 ->
    [copies x batch, 1, d_model] leaving it, at position p0 + i."""
    if not len(x):
        return x[:, :1]
    l = model.cfg.n_layer - 1
    w, cfg = model.weights.blocks[l], model.cfg
    then = None
    if i:
        normalized = ops.layer_norm(x[:, :i], w.ln1_w, w.ln1_b, cfg.layer_norm_epsilon)  # [rows, i, d_model]
        kv = ops.linear(normalized, w.W_qkv[:, cfg.d_model:], w.b_qkv[cfg.d_model:])  # [rows, i, 2 d_model]
        kv = kv.reshape(*kv.shape[:2], 2, cfg.n_head, cfg.d_head)
        then = (l, kv[:, :, 0], kv[:, :, 1])
    prefix = CorruptedPrefix(corrupted, p0, copies, then) if p0 or then else None
    return model.run_with_hooks(x[:, i: i + 1], start_at_layer=l, stop_at_layer=l + 1, past_kv=prefix)


def _patch_hooks(joining, first, copies, batch, p0, clean_cache):
    """The hooks that patch the runs ``joining`` at their layer: copies ``first``, ``first`` + 1, ...
    of a batch of ``copies`` copies, from position ``p0`` on."""
    by_activation = defaultdict(list)  # activation -> [(copy, index)]
    for copy, (activation, _, where) in enumerate(joining, start=first):
        by_activation[activation].append((copy, where))
    layer = joining[0][1] if joining else None  # (one layer: the runs that join there)
    hooks = []
    for activation, patches in by_activation.items():
        name = f"blocks.{layer}.{block_hook(activation)}"
        axis = POS_AXIS[kind(activation)]
        clean = clean_cache[name][(slice(None),) * axis + (slice(p0, None),)]  # from position p0 on
        shifted = [(copy, _shift(where, axis, p0)) for copy, where in patches]

        def patch(act, hook, clean=clean, shifted=shifted):
            act = act.reshape(copies, batch, *act.shape[1:]).copy()  # [copies, batch, ...]
            for copy, where in shifted:
                act[copy][where] = clean[where]
            return act.reshape(copies * batch, *act.shape[2:])

        hooks.append((name, patch))
    return hooks


def _shift(where: tuple, axis: int, p0: int) -> tuple:
    """An index into an activation, for the same activation from position ``p0`` on (along ``axis``)."""
    i = where[axis]
    return where if isinstance(i, slice) else where[:axis] + (i - p0,) + where[axis + 1:]


class _Reads:
    """The logits a metric says it reads (``Metric.logits_read``): position ``pos[b]`` of each
    prompt b, there the vocabulary ``columns``."""

    def __init__(self, pos: np.ndarray, columns: np.ndarray, d_vocab: int, n_pos: int):
        self.pos, self.columns, self.d_vocab, self.n_pos = pos, columns, d_vocab, n_pos

    def read(self, model, resid, p0, corrupted_read) -> np.ndarray:
        """resid [copies, batch, n_new, d_model], from position p0 -> the read logits of each copy,
        [copies, batch, columns] (``corrupted_read`` [batch, columns], the corrupted run's, where a
        prompt's read position is before p0)."""
        w = model.weights
        batch = resid.shape[1]
        rows = np.arange(batch)
        late = self.pos >= p0
        out = np.empty((resid.shape[0], batch, len(self.columns)), resid.dtype)
        if not late.all():
            out[:, ~late] = corrupted_read[~late]
        if late.any():
            x = resid[:, rows[late], self.pos[late] - p0]  # [copies, late rows, d_model]
            normalized = ops.layer_norm(x, w.ln_final_w, w.ln_final_b, model.cfg.layer_norm_epsilon)
            b_U = None if w.b_U is None else w.b_U[self.columns]
            out[:, late] = ops.linear(normalized, w.W_U[:, self.columns], b_U)
        return out

    def one_position(self) -> int | None:
        """The position every prompt's metric reads, if they read the same one (else None)."""
        return int(self.pos[0]) if (self.pos == self.pos[0]).all() else None

    def logits(self, read: np.ndarray) -> np.ndarray:
        """[batch, columns] (or whole logits [batch, pos, d_vocab], of which those are taken) ->
        logits [batch, pos, d_vocab] holding them, zero elsewhere (what ``Metric.logits_read``
        promises a metric that declares it)."""
        rows = np.arange(len(read))
        if read.ndim == 3:
            read = read[rows, self.pos][:, self.columns]
        logits = np.zeros((len(read), self.n_pos, self.d_vocab), read.dtype)
        logits[rows[:, None], self.pos[:, None], self.columns[None, :]] = read
        return logits


def _reads(metric, batch: int, n_pos: int, d_vocab: int) -> _Reads | None:
    read = metrics.logits_read_by(metric, batch)
    if read is None:
        return None
    pos, columns = np.asarray(read[0]), read[1]
    if np.any((pos < -n_pos) | (pos >= n_pos)):
        raise ValueError(f"the metric reads position {pos[(pos < -n_pos) | (pos >= n_pos)][0]}; the prompts have "
                         f"{n_pos} positions (0 to {n_pos - 1}, or -1 to -{n_pos} from the end)")
    pos = pos % n_pos
    columns = np.arange(d_vocab) if columns is None else np.asarray(columns)
    return _Reads(pos.astype(np.int64), columns.astype(np.int64), d_vocab, n_pos)
