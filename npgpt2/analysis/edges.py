"""Edges of the computational graph: edge attribution patching (EAP, EAP-IG) and exact edge patching.

The graph of the EAP and ACDC papers. Upstream nodes write into the residual stream: the input
embeddings ("embed": token plus position), every head's output ("L3H5": z[h] @ W_O[h]) and every
MLP's output ("mlp3"). Downstream inputs read from it: every head's query, key and value input,
separately ("L3H5" with input "q", "k", "v"), every MLP's input ("mlp3", input "mlp") and the logits
("logits"). An edge runs from a node to an input of a later component: a head of layer l reads the
embeddings, the heads and the MLPs of layers before l; the MLP of layer l also reads layer l's heads;
the logits read every node. gpt2-small has 32,491 edges.

Each downstream input has its own copy of the residual stream: patching an edge changes what that
one input sees (through its own layer norm), not the residual stream others read.

    edge_attribution(model, clean, corrupted, metric)      EAP: (clean out - corrupted out) .
                                                             d metric / d input, on the corrupted run
    edge_attribution(..., method="eap-ig", ig_steps=5)     the gradient averaged over inputs between
                                                             corrupted and clean embeddings
    patch_edges(model, clean, corrupted, edges, metric)    exact: every edge outside ``edges`` carries
                                                             its corrupted value (ACDC's evaluation)
    circuit_faithfulness(...), greedy_circuit(scores, n)
"""

from __future__ import annotations

from functools import lru_cache
from types import SimpleNamespace

import numpy as np
import pandas as pd

from .. import metrics as metrics_module
from .. import ops


# ----------------------------------------------------------------------------------------------
# The graph
# ----------------------------------------------------------------------------------------------
def _nodes(cfg) -> list[tuple[str, int]]:
    """Upstream nodes in the order the forward pass writes them: (name, layer); embed has layer -1."""
    nodes = [("embed", -1)]
    for l in range(cfg.n_layer):
        nodes += [(f"L{l}H{h}", l) for h in range(cfg.n_head)] + [(f"mlp{l}", l)]
    return nodes


def _inputs(cfg) -> list[tuple[str, str, int]]:
    """Downstream inputs in the order the forward pass reads them: (component, input, layer)."""
    inputs = []
    for l in range(cfg.n_layer):
        inputs += [(f"L{l}H{h}", x, l) for x in "qkv" for h in range(cfg.n_head)] + [(f"mlp{l}", "mlp", l)]
    return inputs + [("logits", "logits", cfg.n_layer)]


def _reads(node: tuple[str, int], target: tuple[str, str, int]) -> bool:
    """Does the input ``target`` read the node's output?"""
    name, layer = node
    _, kind, target_layer = target
    if kind in "qkv":  # a head reads what was written before its layer
        return layer < target_layer
    if kind == "mlp":  # an MLP also reads its own layer's heads
        return layer < target_layer or (layer == target_layer and not name.startswith("mlp"))
    return True  # the logits read everything


def graph_edges(cfg) -> pd.DataFrame:
    """Every edge of the graph: columns upstream, downstream, input (q, k, v, mlp or logits)."""
    return pd.DataFrame(list(_edge_list(cfg.n_layer, cfg.n_head)), columns=["upstream", "downstream", "input"])


@lru_cache(maxsize=8)
def _edge_list(n_layer: int, n_head: int) -> tuple[tuple[str, str, str], ...]:
    """Every edge (upstream, downstream, input), downstream inputs in the forward pass's order."""
    size = SimpleNamespace(n_layer=n_layer, n_head=n_head)
    return tuple((u[0], d[0], d[1]) for d in _inputs(size) for u in _nodes(size) if _reads(u, d))


def _edge_mask(cfg) -> np.ndarray:
    """[input, node] True where the edge exists (read-only: made once for each size)."""
    return _edge_mask_of(cfg.n_layer, cfg.n_head)


@lru_cache(maxsize=8)
def _edge_mask_of(n_layer: int, n_head: int) -> np.ndarray:
    size = SimpleNamespace(n_layer=n_layer, n_head=n_head)
    mask = np.array([[_reads(u, d) for u in _nodes(size)] for d in _inputs(size)])
    mask.flags.writeable = False
    return mask


# ----------------------------------------------------------------------------------------------
# Node outputs and input gradients, from a run's cache
# ----------------------------------------------------------------------------------------------
def _is_output_hook(name: str) -> bool:
    """The hook points the nodes' outputs are read from."""
    return name.endswith(("hook_embed", "hook_pos_embed", "attn.hook_z", "hook_mlp_out"))


def _node_outputs(model, cache, minus=None) -> np.ndarray:
    """What each node writes into the residual stream: [node, batch, pos, d_model]; less what it
    writes in the run of ``minus`` (a second cache) when given, in the same array. A head's output
    is z[h] @ W_O[h] (``attn.hook_result``, made here from ``hook_z``: of a difference, the
    difference of the z's goes through W_O)."""
    n_head = model.cfg.n_head
    embed = cache["hook_embed"]
    batch, pos, d_model = embed.shape
    out = np.empty((len(_nodes(model.cfg)),) + embed.shape, embed.dtype)

    def change(name):  # the cache's activation, less minus's
        return cache[name] if minus is None else cache[name] - minus[name]

    out[0] = change("hook_embed")  # node 0, the embeddings: token plus position
    out[0] += change("hook_pos_embed")
    for l in range(model.cfg.n_layer):  # in the order of _nodes: the layer's heads, then its MLP
        first = 1 + l * (n_head + 1)
        z = change(f"blocks.{l}.attn.hook_z")  # [batch, pos, head, d_head]
        z_heads = z.transpose(2, 0, 1, 3).reshape(n_head, batch * pos, -1)  # [head, rows, d_head]
        W_O = model.weights.blocks[l].W_O.reshape(n_head, -1, d_model)  # [head, d_head, d_model]
        np.matmul(z_heads, W_O, out=out[first:first + n_head].reshape(n_head, batch * pos, d_model))
        out[first + n_head] = change(f"blocks.{l}.hook_mlp_out")
    return out


def _input_gradients(model, cache, steps: int = 1):
    """d metric / d (each downstream input's own copy of the residual stream), in the order of
    ``_inputs``: yields one array per layer, [3 * n_head + 1, batch, pos, d_model] (the heads' q,
    k and v inputs, then the MLP's), then the logits' [1, batch, pos, d_model].

    A head's query input q_h = ln1(x) @ W_Q[h] + b_Q[h]: its gradient is d q_h @ W_Q[h]^T taken back
    through the layer norm; likewise keys, values, and the MLP's input through ln2 and W_in. The
    logits' input is the final residual stream, which only the final layer norm reads.

    ``steps``: the cache's batch is that many batches stacked (EAP-IG's steps); their gradients are
    summed, the batch being one of them. The layers' arrays share one buffer: use each before
    taking the next.
    """
    w, n_head = model.weights, model.cfg.n_head
    stacked = cache["blocks.0.ln1.hook_normalized"].shape  # [steps * batch, pos, d_model]
    shape = (stacked[0] // steps,) + stacked[1:]  # [batch, pos, d_model]
    d_model = shape[-1]
    d_head = d_model // n_head

    def summed(x):  # [steps * batch, pos, d_model] -> [batch, pos, d_model]
        return x.reshape((steps,) + shape).sum(axis=0)

    grads = np.empty((3 * n_head + 1,) + shape, cache["blocks.0.ln1.hook_normalized"].dtype)
    for l in range(model.cfg.n_layer):
        b = w.blocks[l]
        d_qkv = np.stack([cache[f"blocks.{l}.attn.hook_{x}_grad"] for x in "qkv"])  # [3, steps * batch, pos, head, d_head]
        d_heads = d_qkv.transpose(0, 3, 1, 2, 4).reshape(3 * n_head, -1, d_head)  # [3 * head, rows, d_head]
        normalized, scale = (cache[f"blocks.{l}.ln1.hook_{x}"].reshape(-1, d_model if x == "normalized" else 1)
                             for x in ("normalized", "scale"))  # [rows, d_model], [rows, 1]
        # (normalized * gain) @ W_qkv, what the forward added the biases to: q|k|v less b_qkv and ln1's bias through W_qkv
        qkv = np.stack([cache[f"blocks.{l}.attn.hook_{x}"] for x in "qkv"])  # [3, steps * batch, pos, head, d_head]
        projected = qkv.transpose(0, 3, 1, 2, 4).reshape(3 * n_head, -1, d_head)  # [3 * head, rows, d_head]
        bias = (0 if b.b_qkv is None else b.b_qkv) + (0 if b.ln1_b is None else b.ln1_b @ b.W_qkv)  # [3 * d_model]
        projected -= np.reshape(bias, (-1, 1, d_head)).astype(projected.dtype)
        _head_input_gradients(d_heads, projected, b.W_qkv, normalized, scale, b.ln1_w, steps,
                              out=grads[:-1].reshape(3 * n_head, -1, d_model))
        d_mlp_in = ops.linear(cache[f"blocks.{l}.mlp.hook_pre_grad"], b.W_in.T)  # [steps * batch, pos, d_model]
        ln2 = (cache[f"blocks.{l}.ln2.hook_normalized"], cache[f"blocks.{l}.ln2.hook_scale"], b.ln2_w)
        grads[-1] = summed(ops.layer_norm_backward(d_mlp_in, *ln2, weights=False)[0])
        yield grads
    yield summed(cache[f"blocks.{model.cfg.n_layer - 1}.hook_resid_post_grad"])[None]


def _head_input_gradients(d_heads, projected, W_qkv, normalized, scale, gain, steps: int, out: np.ndarray) -> np.ndarray:
    """Every head's q, k and v inputs' gradients, back through their shared first layer norm.
    d_heads [3 * head, rows, d_head] (d q_h, then d k_h, then d v_h), projected [3 * head, rows,
    d_head] (the forward's (normalized * gain) @ W_h: q_h, k_h, v_h less their biases), W_qkv
    [d_model, 3 * d_model], normalized [rows, d_model], scale [rows, 1], gain [d_model] or None
    -> out [3 * head, rows / steps, d_model], the rows' ``steps`` stacked groups summed.

    ``ops.layer_norm_backward`` of d_n = d_head @ W_h^T, arranged for 3 * n_head gradients that
    share one layer norm: d_x = (d_n * gain - mean(d_n * gain) - n mean(d_n * gain * n)) / scale.
    The gain goes into W_h^T and the division by the row's scale into d_head before the product;
    both means come from d_head's few columns (d_head @ (W_h^T 1) / d_model, and d_head . projected).
    The product and the first mean are linear in d_head, so the steps are summed before them; only
    the last term is summed as it stands.
    """
    n, rows, d_head = d_heads.shape
    d_model = W_qkv.shape[0]
    W_gained = W_qkv if gain is None else W_qkv * gain[:, None]  # [d_model, 3 * d_model]
    W_t = W_gained.reshape(d_model, n, d_head).transpose(1, 2, 0)  # [3 * head, d_head, d_model]: W_Q[h]^T ... (a view)
    d_scaled = d_heads / scale  # [3 * head, rows, d_head]
    along_n = (d_scaled * projected).sum(axis=-1) / d_model  # mean(d_n * gain * n) / scale, [3 * head, rows]
    d_scaled = d_scaled.reshape(n, steps, rows // steps, d_head).sum(axis=1)  # [3 * head, rows / steps, d_head]
    d_x = np.matmul(d_scaled, W_t, out=out)  # d_n * gain / scale, [3 * head, rows / steps, d_model]
    d_x -= d_scaled @ W_gained.reshape(d_model, n, d_head).mean(axis=0)[..., None]  # its mean over d_model
    along_n = along_n.reshape(n, steps, rows // steps)  # [3 * head, steps, rows / steps]
    normalized = normalized.reshape(steps, rows // steps, d_model)
    # less n * mean(d_n * gain * n) / scale, each step with its own n
    if steps == 1:  # a head at a time (no temporary as large as out)
        for h in range(n):
            d_x[h] -= along_n[h, 0, :, None] * normalized[0]
    else:  # for each row, its steps' n weighted by every head's along_n: one small product a row
        d_x -= np.matmul(along_n.transpose(2, 0, 1), normalized.transpose(1, 0, 2)).transpose(1, 0, 2)
    return d_x
def _scores(grads, change_rows: np.ndarray, mask: np.ndarray, out: np.ndarray) -> None:
    """Add each input's gradient . each node's change into ``out`` [input, node]. grads: the arrays
    ``_input_gradients`` yields, one per layer and the logits' (each used before the next). A
    layer's inputs read only the nodes before them (``mask``, the edges: the nodes an input reads
    come first): only those products are taken, for each run of inputs that read the same nodes
    (a layer's q, k and v inputs; its MLP's, which reads the layer's heads too)."""
    i = 0
    for g in grads:  # a layer's inputs at a time
        rows = g.reshape(len(g), -1)  # [inputs, batch * pos * d_model]
        seen = mask[i:i + len(g)].sum(axis=1)  # [inputs]: how many nodes each reads
        starts = np.flatnonzero(np.diff(seen, prepend=-1))  # where a run of equal counts begins
        for a, b in zip(starts, list(starts[1:]) + [len(g)]):
            out[i + a:i + b, :seen[a]] += rows[a:b] @ change_rows[:seen[a]].T
        i += len(g)


def _is_gradient_hook(name: str) -> bool:
    """The hook points whose activations and gradients give the inputs' gradients."""
    return name.endswith(("attn.hook_q", "attn.hook_k", "attn.hook_v", "mlp.hook_pre", "hook_normalized",
                          "hook_scale", "hook_resid_post"))


# ----------------------------------------------------------------------------------------------
# Edge attribution
# ----------------------------------------------------------------------------------------------
def edge_attribution(model, clean_tokens, corrupted_tokens, metric, method: str = "eap",
                     ig_steps: int = 5) -> pd.DataFrame:
    """A score for every edge: the first-order estimate of what giving that one edge its clean value
    in the corrupted run does to the metric. Columns upstream, downstream, input, score; sorted by
    |score|, largest first.

    "eap" (Syed et al., 2023): (clean output of upstream - corrupted output) . d metric / d (the
    downstream input), the gradient taken on the corrupted run.
    "eap-ig" (Hanna et al., 2024): the same, with the gradient averaged over ``ig_steps`` runs whose
    token embeddings lie between the corrupted and the clean ones (alpha = 1/steps ... 1).
    metric: differentiable (``npgpt2.metrics``), on the logits of the (corrupted-shaped) batch.
    """
    if method not in ("eap", "eap-ig"):
        raise ValueError(f"method={method!r}: expected 'eap' or 'eap-ig'")
    if method == "eap-ig" and (not isinstance(ig_steps, (int, np.integer)) or ig_steps < 1):
        raise ValueError(f"ig_steps={ig_steps!r}: expected a positive integer")
    metric = metrics_module.check_metric(metric)
    clean, corrupted = _check_pair(model, clean_tokens, corrupted_tokens)
    outputs_only = {"names_filter": _is_output_hook, "stop_at_layer": model.cfg.n_layer}  # (no logits needed)
    _, clean_cache = model.run_with_cache(clean, **outputs_only)
    if method == "eap":  # the corrupted run's outputs and gradients from one forward + backward
        _, corrupted_cache = model.run_with_cache(corrupted, names_filter=lambda n: _is_gradient_hook(n) or _is_output_hook(n),
                                                  incl_bwd=True, metric=metric)
    else:
        _, corrupted_cache = model.run_with_cache(corrupted, **outputs_only)
    change = _node_outputs(model, clean_cache, minus=corrupted_cache)  # [node, batch, pos, d_model]
    change_rows = change.reshape(len(change), -1)
    scores = np.zeros((len(_inputs(model.cfg)), len(change)))  # [input, node]
    mask = _edge_mask(model.cfg)  # [input, node]
    if method == "eap":
        _scores(_input_gradients(model, corrupted_cache), change_rows, mask, scores)
    else:  # the mean over the steps of gradient . change = (the steps' gradients summed) . change / steps
        for grads in _integrated_input_gradients(model, corrupted, clean_cache["hook_embed"],
                                                 corrupted_cache["hook_embed"], metric, ig_steps):
            _scores(grads, change_rows, mask, scores)
        scores /= ig_steps

    nodes, inputs = _nodes(model.cfg), _inputs(model.cfg)
    d_index, u_index = np.nonzero(mask)
    node_names = np.array([name for name, _ in nodes], dtype=object)  # (indexed by the edges below)
    input_names = np.array([name for name, _, _ in inputs], dtype=object)
    input_kinds = np.array([kind for _, kind, _ in inputs], dtype=object)
    df = pd.DataFrame({"upstream": node_names[u_index], "downstream": input_names[d_index],
                       "input": input_kinds[d_index], "score": scores[d_index, u_index]})
    df.attrs["method"] = method
    return df.reindex(df["score"].abs().sort_values(ascending=False).index).reset_index(drop=True)


_IG_ROWS = 2048  # the most rows (batch x pos) of one run of EAP-IG's interpolated inputs


def _integrated_input_gradients(model, corrupted, clean_embed, corrupted_embed, metric, steps: int):
    """The inputs' gradients (as ``_input_gradients`` yields them, a layer at a time) on the runs
    whose token embeddings lie at alpha = 1/steps, 2/steps ... 1 of the way from the corrupted ones
    to the clean ones: yields, for each run, its steps' gradients summed.

    Several steps go in one run, their batches stacked (up to ``_IG_ROWS`` rows): one pass over
    the weights for all of them. The metric is taken on each step's own slice of the logits, and
    their sum is differentiated: each step's activations get their own step's gradient.
    """
    batch = len(corrupted)
    per_run = max(1, _IG_ROWS // corrupted.size)
    alphas = np.arange(1, steps + 1) / steps
    for first in range(0, steps, per_run):
        run_alphas = alphas[first:first + per_run]
        between = np.concatenate([corrupted_embed + a * (clean_embed - corrupted_embed) for a in run_alphas])
        with model.hooks([("hook_embed", lambda act, hook: between)]):
            _, cache = model.run_with_cache(np.tile(corrupted, (len(run_alphas), 1)), names_filter=_is_gradient_hook,
                                            incl_bwd=True, metric=_PerStep(metric, batch))
        yield _input_gradients(model, cache, steps=len(run_alphas))  # each [inputs, batch, pos, d_model]


class _PerStep:
    """A metric over a stack of batches of ``batch`` rows: the sum of ``metric`` on each."""

    def __init__(self, metric, batch: int):
        self.metric, self.batch = metric, batch

    def _slices(self, logits):
        return [slice(s, s + self.batch) for s in range(0, len(logits), self.batch)]

    def __call__(self, logits) -> float:
        return sum(float(self.metric(logits[s])) for s in self._slices(logits))

    def grad(self, logits) -> np.ndarray:
        return np.concatenate([np.asarray(self.metric.grad(logits[s]), dtype=logits.dtype) for s in self._slices(logits)])

    def logits_read(self, batch: int):
        """The metric's logits (``Metric.logits_read``) in each batch of the stack."""
        read = metrics_module.logits_read_by(self.metric, self.batch)
        return None if read is None else (np.tile(read[0], batch // self.batch), read[1])


def _check_pair(model, clean_tokens, corrupted_tokens):
    from ..inputs import InputError

    clean, clean_mask = model.tokens_and_mask(clean_tokens)
    corrupted, corrupted_mask = model.tokens_and_mask(corrupted_tokens)
    for which, mask in (("clean", clean_mask), ("corrupted", corrupted_mask)):
        if mask is not None and not np.all(mask):  # padded: the runs below take no mask
            lengths = sorted(set(np.asarray(mask).sum(axis=1).tolist()))
            raise InputError(f"the {which} prompts have different numbers of tokens ({', '.join(map(str, lengths))}): "
                             "edges are scored without an attention mask, so padding would be read as "
                             "tokens (and a metric at position -1 would read padding); give prompts of one length")
    if clean.shape != corrupted.shape:
        raise InputError(f"clean tokens {list(clean.shape)} and corrupted tokens {list(corrupted.shape)} must "
                         "have the same [batch, pos]")
    return clean, corrupted


# ----------------------------------------------------------------------------------------------
# Exact edge patching
# ----------------------------------------------------------------------------------------------
def run_with_edge_values(model, tokens, values: dict) -> np.ndarray:
    """Logits of ``tokens`` with some edges carrying given values instead of their upstream node's.

    values: {(upstream, downstream, input): array [batch, pos, d_model]}. The downstream input then
    reads its residual stream plus (value - what the upstream node wrote in this run).
    """
    cfg, w = model.cfg, model.weights
    nodes, inputs = _nodes(cfg), _inputs(cfg)
    node_index = {name: i for i, (name, _) in enumerate(nodes)}
    input_index = {(name, kind): i for i, (name, kind, _) in enumerate(inputs)}
    sourced: dict[int, list[tuple[int, np.ndarray]]] = {}  # input -> [(node, value)]
    for (up, down, kind), value in values.items():
        if (down, kind) not in input_index or up not in node_index:
            raise ValueError(f"no edge {up} -> {down} ({kind}); see graph_edges(model.cfg)")
        if not _reads(nodes[node_index[up]], inputs[input_index[(down, kind)]]):
            raise ValueError(f"{down} ({kind}) does not read {up}: no such edge")
        sourced.setdefault(input_index[(down, kind)], []).append((node_index[up], np.asarray(value)))

    written: dict[int, np.ndarray] = {}  # node -> what it wrote in this run
    seen: dict[str, np.ndarray] = {}

    def delta(i):
        """What input i sees on top of the shared residual stream."""
        return sum(value - written[u] for u, value in sourced.get(i, []))

    def keep(name):
        def hook(act, point):
            seen[name] = act
        return hook

    def write_embed(act, point):
        written[0] = seen["hook_embed"] + act

    def write_heads(l):
        def hook(result, point):
            for h in range(cfg.n_head):
                written[node_index[f"L{l}H{h}"]] = result[:, :, h]
        return hook

    def write_mlp(l):
        def hook(act, point):
            written[node_index[f"mlp{l}"]] = act
        return hook

    def head_inputs(l, kind, W, b):
        def hook(act, point):  # act [batch, pos, head, d_head]
            out = None
            for h in range(cfg.n_head):
                i = input_index[(f"L{l}H{h}", kind)]
                if i in sourced:
                    out = act.copy() if out is None else out
                    x = ops.layer_norm(seen[f"blocks.{l}.hook_resid_pre"] + delta(i), w.blocks[l].ln1_w,
                                       w.blocks[l].ln1_b, cfg.eps)
                    out[:, :, h] = x @ W[l, h] + b[l, h]
            return out
        return hook

    def normalized_input(i, resid_name):
        def hook(act, point):
            if i in sourced:
                x = ops.center(seen[resid_name] + delta(i))
                return x / ops.ln_scale(x, cfg.eps)
        return hook

    hooks = [("hook_embed", keep("hook_embed")), ("hook_pos_embed", write_embed)]
    for l in range(cfg.n_layer):
        b = f"blocks.{l}."
        hooks += [(b + "hook_resid_pre", keep(b + "hook_resid_pre"))]
        hooks += [(b + f"attn.hook_{x}", head_inputs(l, x, W, bias))
                  for x, W, bias in (("q", model.W_Q, model.b_Q), ("k", model.W_K, model.b_K), ("v", model.W_V, model.b_V))]
        hooks += [(b + "attn.hook_result", write_heads(l)), (b + "hook_resid_mid", keep(b + "hook_resid_mid")),
                  (b + "ln2.hook_normalized", normalized_input(input_index[(f"mlp{l}", "mlp")], b + "hook_resid_mid")),
                  (b + "hook_mlp_out", write_mlp(l))]
    last = f"blocks.{cfg.n_layer - 1}.hook_resid_post"
    hooks += [(last, keep(last)), ("ln_final.hook_normalized", normalized_input(len(inputs) - 1, last))]
    return model.run_with_hooks(tokens, fwd_hooks=hooks)


def patch_edges(model, clean_tokens, corrupted_tokens, edges, metric, keep: str = "circuit") -> float:
    """The metric of the clean run with edges patched from the corrupted run.

    edges: a DataFrame with upstream, downstream, input columns (``edge_attribution``'s, or rows of
    ``graph_edges``), or a list of such triples.
    keep="circuit": every edge *not* in ``edges`` carries its corrupted value (ACDC's evaluation of a
    circuit); keep="rest": only the given edges carry their corrupted values.
    """
    if keep not in ("circuit", "rest"):
        raise ValueError(f"keep={keep!r}: expected 'circuit' or 'rest'")
    clean, corrupted = _check_pair(model, clean_tokens, corrupted_tokens)
    given = {tuple(e) for e in (edges[["upstream", "downstream", "input"]].itertuples(index=False)
                                if isinstance(edges, pd.DataFrame) else edges)}
    every = _edge_set(model.cfg.n_layer, model.cfg.n_head)
    unknown = given - every
    if unknown:
        raise ValueError(f"not edges of this model's graph: {sorted(unknown)[:3]}")
    corrupted_edges = every - given if keep == "circuit" else given
    return _run_with_corrupted_edges(model, clean, _corrupted_outputs(model, corrupted), corrupted_edges, metric)


@lru_cache(maxsize=8)
def _edge_set(n_layer: int, n_head: int) -> frozenset:
    """Every edge of the graph, as a set."""
    return frozenset(_edge_list(n_layer, n_head))


def _corrupted_outputs(model, corrupted) -> dict[str, np.ndarray]:
    """What each node writes into the residual stream in the corrupted run: {node name: [batch, pos, d_model]}."""
    _, corrupted_cache = model.run_with_cache(corrupted, names_filter=_is_output_hook)
    return dict(zip([n for n, _ in _nodes(model.cfg)], _node_outputs(model, corrupted_cache)))


def _run_with_corrupted_edges(model, clean, outputs, edges, metric) -> float:
    """The metric of the clean run with ``edges`` carrying the corrupted run's ``outputs``."""
    return float(metric(run_with_edge_values(model, clean, {e: outputs[e[0]] for e in edges})))


def circuit_faithfulness(model, clean_tokens, corrupted_tokens, edges, metric) -> float:
    """(metric of the circuit - corrupted metric) / (clean metric - corrupted metric): 1 when the
    circuit alone restores the clean behaviour, 0 when it does nothing."""
    clean, corrupted, clean_value, corrupted_value = _faithfulness_ends(model, clean_tokens, corrupted_tokens, metric)
    return (patch_edges(model, clean, corrupted, edges, metric) - corrupted_value) / (clean_value - corrupted_value)


def _faithfulness_ends(model, clean_tokens, corrupted_tokens, metric):
    """What a faithfulness is measured between: (clean tokens, corrupted tokens, the clean run's
    metric, the corrupted run's), refused when the two metrics are equal."""
    clean, corrupted = _check_pair(model, clean_tokens, corrupted_tokens)
    clean_value, corrupted_value = float(metric(model(clean))), float(metric(model(corrupted)))
    if clean_value == corrupted_value:
        raise ValueError(f"the clean and corrupted runs give the same metric ({clean_value:.6g}): there is no "
                         "difference for a circuit to restore, so faithfulness is undefined (are the prompts the same?)")
    return clean, corrupted, clean_value, corrupted_value


def greedy_circuit(scores: pd.DataFrame, n_edges: int) -> pd.DataFrame:
    """The ``n_edges`` edges of largest |score|, less those whose downstream component no longer
    reaches the logits (its output feeds no kept edge), pruned until none is left."""
    kept = scores.reindex(scores["score"].abs().sort_values(ascending=False).index).head(n_edges)
    while True:
        useful = {"logits"}  # components whose output reaches the logits through kept edges
        changed = True
        while changed:
            before = len(useful)
            useful |= set(kept.loc[kept["downstream"].isin(useful), "upstream"])
            changed = len(useful) != before
        pruned = kept[kept["downstream"].isin(useful)]
        if len(pruned) == len(kept):
            return pruned.reset_index(drop=True)
        kept = pruned


def smallest_circuit(model, clean_tokens, corrupted_tokens, scores: pd.DataFrame, metric, target: float = 0.8,
                     step: int = 10, progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The smallest ``greedy_circuit`` of ``scores`` (``edge_attribution``'s table), trying the top
    ``step``, 2 ``step``, ... edges, whose exact ``circuit_faithfulness`` reaches ``target``.
    -> (edges: ``greedy_circuit``'s table of the first size that reaches it, or of every edge when
    none does; curve: one row per size tried, columns top_edges, edges (after pruning), faithfulness)

    Each size tried costs one patched forward pass (the clean and corrupted runs are made once): on
    gpt2-small's 32,491 edges, a target never reached means thousands of them; ``progress`` shows a bar.
    A circuit found by attribution is a hypothesis; its faithfulness, exact, is the finding."""
    from tqdm.auto import tqdm

    if not isinstance(step, (int, np.integer)) or step < 1:
        raise ValueError(f"step={step!r}: expected a positive number of edges")
    if not np.isfinite(target):
        raise ValueError(f"target={target!r}: expected a finite faithfulness, such as 0.8")
    clean, corrupted, clean_value, corrupted_value = _faithfulness_ends(model, clean_tokens, corrupted_tokens, metric)
    rows = []
    for size in tqdm(range(step, len(scores) + step, step), desc="circuit sizes", disable=not progress, leave=False):
        edges = greedy_circuit(scores, min(size, len(scores)))
        faithfulness = ((patch_edges(model, clean, corrupted, edges, metric) - corrupted_value)
                        / (clean_value - corrupted_value))
        rows.append({"top_edges": min(size, len(scores)), "edges": len(edges), "faithfulness": faithfulness})
        if faithfulness >= target:
            break
    return edges, pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------
# Path patching
# ----------------------------------------------------------------------------------------------
def _receiver_inputs(model, receivers) -> list[tuple[str, str]]:
    """'logits', 'mlp3', ('L9H6', 'v') or 'L9H6' (its q, k and v) -> [(component, input)]."""
    out = []
    for r in [receivers] if isinstance(receivers, (str, tuple)) else receivers:
        if isinstance(r, tuple):
            out.append(tuple(r))
        elif r == "logits":
            out.append(("logits", "logits"))
        elif r.startswith("mlp"):
            out.append((r, "mlp"))
        else:
            out += [(r, x) for x in "qkv"]
    known = {(name, kind) for name, kind, _ in _inputs(model.cfg)}
    unknown = [r for r in out if r not in known]
    if unknown:
        raise ValueError(f"unknown receiver {unknown[0]}: expected 'logits', 'mlp{{l}}', 'L{{l}}H{{h}}' or "
                         "('L{l}H{h}', 'q' | 'k' | 'v')")
    return out


def path_patch(model, clean_tokens, corrupted_tokens, metric, senders, receivers) -> float:
    """The metric of the clean run in which the ``receivers`` read the ``senders``' corrupted outputs
    through their direct paths, everything else running clean (Wang et al., 2022: the effect of the
    senders on the metric through the receivers alone).

    senders: node names ('L9H9', 'mlp3', 'embed'). receivers: 'logits', 'mlp{l}', 'L{l}H{h}' (its
    q, k and v inputs) or ('L{l}H{h}', 'v'). Only edges that exist are patched (a sender must come
    before its receiver). Unlike the IOI paper's version, the MLPs between sender and receiver do not
    carry the change: the paths are the direct edges.
    """
    senders = [senders] if isinstance(senders, str) else list(senders)
    return patch_edges(model, clean_tokens, corrupted_tokens, _path_edges(model, senders, receivers), metric,
                       keep="rest")


def _path_edges(model, senders, receivers) -> list[tuple[str, str, str]]:
    """The edges from ``senders`` into ``receivers`` that exist (``path_patch``'s arguments)."""
    nodes = dict(_nodes(model.cfg))
    unknown = [s for s in senders if s not in nodes]
    if unknown:
        raise ValueError(f"unknown sender {unknown[0]!r}: expected 'embed', 'L{{l}}H{{h}}' or 'mlp{{l}}'")
    layers = {name: layer for name, kind, layer in _inputs(model.cfg)}
    return [(s, r, kind) for s in senders for r, kind in _receiver_inputs(model, receivers)
            if _reads((s, nodes[s]), (r, kind, layers[r]))]


def path_patch_heads(model, clean_tokens, corrupted_tokens, metric, receivers, heads=None,
                     progress: bool = True) -> np.ndarray:
    """``path_patch`` from each single head into ``receivers``: [layer, head] of metric values, NaN for
    heads that come too late to reach them (the IOI paper's sender sweep).

    heads: the senders to patch, as names ("L9H9") or (layer, head) pairs; default every head. The
    others are NaN. Each costs a forward pass (the corrupted run is made once for all of them).
    """
    from tqdm.auto import tqdm

    cfg = model.cfg
    heads = None if heads is None else list(heads)
    every = [(l, h) for l in range(cfg.n_layer) for h in range(cfg.n_head)]
    names = {f"L{l}H{h}": (l, h) for l, h in every}
    chosen = every if heads is None else [names.get(f"L{head[0]}H{head[1]}" if isinstance(head, tuple) else head)
                                          for head in heads]
    if None in chosen:
        bad = heads[chosen.index(None)]
        raise ValueError(f"head {bad!r} is not in the model: expected a name 'L{{layer}}H{{head}}' or a "
                         f"(layer, head) pair, layer 0..{cfg.n_layer - 1}, head 0..{cfg.n_head - 1}")
    clean, corrupted = _check_pair(model, clean_tokens, corrupted_tokens)
    edges = {(l, h): _path_edges(model, [f"L{l}H{h}"], receivers) for l, h in chosen}
    out = np.full((cfg.n_layer, cfg.n_head), np.nan)
    outputs = _corrupted_outputs(model, corrupted) if any(edges.values()) else None
    for (l, h), head_edges in tqdm(edges.items(), desc="path patching", disable=not progress, leave=False):
        if head_edges:
            out[l, h] = _run_with_corrupted_edges(model, clean, outputs, head_edges, metric)
    return out

