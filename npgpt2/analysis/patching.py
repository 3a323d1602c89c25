"""Activation patching: put activations from a clean run into a corrupted run, one piece at a time,
and measure how much of the clean behaviour comes back.

The functions carry TransformerLens's names, argument order and output shapes
(``get_act_patch_resid_pre(model, corrupted_tokens, clean_cache, patching_metric)`` -> [layer, pos]),
so code from the TransformerLens demos ports by changing an import; ``index_df`` cuts a sweep down
to the patches given. Each value is what one forward pass with that one patch gives, but the
sweeps run far less (patch_runs.py): a patch that copies the corrupted run's own values is not
run; the others start where the patch enters the residual stream and at the first position they
change (the corrupted run's residual stream, keys and values before it), compute only the logits
the metric reads (``Metric.logits_read``), and go through the model's blocks many at once.

``patching_metric(logits) -> float`` sees logits [batch, pos, d_vocab] of the corrupted prompts.
``logit_diff_metric`` and ``normalized_metric`` build the usual ones.
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd

from .. import metrics
from . import patch_runs
from ..hooks import block_hook
from ..inputs import InputError

# short activation name -> hook point inside block l
_HOOKS = {short: block_hook(short) for short in ("resid_pre", "resid_mid", "resid_post", "attn_out",
                                                  "mlp_out", "z", "q", "k", "v", "pattern")}
# axis name -> which axis of the activation [batch, ...] it indexes
_AXES = {
    ("resid", "pos"): 1,  # [batch, pos, d_model]
    ("head", "pos"): 1, ("head", "head"): 2,  # [batch, pos, head, d_head]
    ("pattern", "head_index"): 1, ("pattern", "dest_pos"): 2, ("pattern", "src_pos"): 3,  # [b, h, q, k]
}


_kind = patch_runs.kind
_NDIM = {"resid": 3, "head": 4, "pattern": 4}  # axes of each kind of activation, the batch's first


def logit_diff_metric(answer_tokens, wrong_tokens=None, pos: int = -1) -> metrics.LogitDiff:
    """A metric: mean over the batch of logit[answer] - logit[wrong] at position ``pos``.
    ``answer_tokens``, ``wrong_tokens``: ids [batch] (or one id for all); or ``answer_tokens`` alone
    as the TransformerLens demos hold them, [batch, 2]: each row the right token, then the wrong
    one. Differentiable: it has ``.grad(logits)`` (see ``npgpt2.metrics``)."""
    if wrong_tokens is None:
        pairs = np.asarray(answer_tokens)
        if pairs.ndim != 2 or pairs.shape[1] != 2:
            raise ValueError(f"answer_tokens of shape {pairs.shape} without wrong_tokens: expected [batch, 2] "
                             "(each row: the right token, then the wrong one), or give wrong_tokens")
        answer_tokens, wrong_tokens = pairs[:, 0], pairs[:, 1]
    return metrics.LogitDiff(answer_tokens, wrong_tokens, pos)


def normalized_metric(metric, clean_value: float, corrupted_value: float) -> metrics.Normalized:
    """(metric - corrupted) / (clean - corrupted): 0 means the corrupted behaviour, 1 the clean."""
    return metrics.Normalized(metric, clean_value, corrupted_value)


def _check_runs(model, corrupted_tokens, clean_cache) -> np.ndarray:
    tokens = model.validate_tokens(corrupted_tokens)
    clean_shape = clean_cache["hook_embed"].shape[:2] if "hook_embed" in clean_cache else \
        clean_cache["resid_pre", 0].shape[:2]
    if tuple(clean_shape) != tokens.shape:
        raise InputError(f"the clean run has [batch, pos] = {list(clean_shape)} but the corrupted tokens "
                         f"are {list(tokens.shape)}: clean and corrupted prompts must have the same "
                         "number of tokens (pad or rephrase them)")
    return tokens


def generic_activation_patch(model, corrupted_tokens, clean_cache, patching_metric, activation_name: str,
                             index_axis_names=None, corrupted_cache=None, max_batch: int | None = None,
                             progress: bool = True, index_df: pd.DataFrame | None = None,
                             return_index_df: bool = False, chunk_size: int | None = None):
    """Patch ``activation_name`` from the clean run into the corrupted run at every index of the
    given axes and return the metric for each: an array [layer, <other axes>].

    index_axis_names: always "layer" first; ("layer",) alone patches the whole activation.
    index_df: instead, the patches to make, one per row (TransformerLens's argument; it takes the
        place of index_axis_names): columns named as axes, "layer" first, e.g. a few (layer, head)
        pairs. The result is then 1-D, one metric per row, in the rows' order.
    return_index_df: also return the patches as such a DataFrame: (result, index_df).
    activation_name: resid_pre, resid_mid, resid_post, attn_out, mlp_out (axes layer, pos);
        z, q, k, v (axes layer, head / layer, pos, head); pattern (layer, head_index /
        layer, head_index, dest_pos / layer, head_index, dest_pos, src_pos).
    chunk_size: most patched runs stacked into one batch (each joins it at its layer). Default:
        from the prompt batch, the positions a run recomputes, the model's widths and the memory
        available: at most ``patch_runs.TARGET_ROWS`` (2048) rows (prompt copies x recomputed
        positions) at the batch's last layer, fewer if their working memory (``patch_runs.run_bytes``: each row's activations at
        d_model and d_mlp, the attention scores over every position, the keys and values, and
        every logit unless the metric says which it reads) would pass ``patch_runs.memory_budget()``
        (an eighth of the memory available, at most 1 GB).
    max_batch: the same bound counted in prompt copies (chunk_size = max_batch // batch), the
        older spelling.
    corrupted_cache: accepted for TransformerLens's signature; the sweep runs the corrupted
        prompts once itself (it needs their logits, keys and values).
    progress: show a progress bar over the patched runs.

    How it runs (the numbers are those of one full forward pass per patch; ``patch_runs``):
    a patch that copies values equal to the corrupted run's changes nothing and scores the
    corrupted run; each other patch's run starts at its layer from the corrupted residual stream
    (with a metric that declares its logits, where the patch enters the residual stream: after
    block l for a patch inside it) and recomputes only the positions from the first one it
    changes (attention is causal: the earlier positions keep the corrupted run's activations,
    keys and values); several runs go in one batch, each joining it where it starts.
    """
    (out,) = _sweeps(model, corrupted_tokens, clean_cache, patching_metric, [(activation_name, index_axis_names)],
                     max_batch=max_batch, progress=progress, index_df=index_df, return_index_df=return_index_df,
                     chunk_size=chunk_size)
    return out


def axis_sizes(model, n_pos: int) -> dict:
    """The length of each axis a sweep may index, for prompts of ``n_pos`` tokens."""
    return {"layer": model.cfg.n_layer, "pos": n_pos, "dest_pos": n_pos, "src_pos": n_pos,
            "head": model.cfg.n_head, "head_index": model.cfg.n_head}


def _sweeps(model, corrupted_tokens, clean_cache, patching_metric, specs, max_batch=None, progress=True,
            index_df=None, return_index_df=False, chunk_size=None, corrupted_cache=None):
    """Several sweeps at once (``generic_activation_patch`` for each (activation, index_axis_names)
    of ``specs``), their patched runs batched together: a list of their results."""
    for activation_name, _ in specs:
        if activation_name not in _HOOKS:
            raise ValueError(f"unknown activation {activation_name!r}; expected one of {', '.join(_HOOKS)}")
    tokens = _check_runs(model, corrupted_tokens, clean_cache)
    batch, n_pos = tokens.shape
    sizes = axis_sizes(model, n_pos)
    if max_batch is not None and chunk_size is None:
        chunk_size = max(1, max_batch // batch)
    if chunk_size is not None and (not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1):
        raise ValueError(f"chunk_size={chunk_size!r}: expected a whole number of patched runs >= 1")
    runs, layouts = patched_runs(specs, index_df, sizes)
    desc = f"patching {specs[0][0]}" if len(specs) == 1 else f"patching {', '.join(a for a, _ in specs)}"
    values = patch_runs.patched_values(model, tokens, clean_cache, patching_metric, runs, chunk_size, progress, desc)
    results, first = [], 0
    for n, axes, patches in layouts:
        out = values[first:first + n]
        first += n
        out = out if index_df is not None else out.reshape([sizes[a] for a in axes])
        if return_index_df:
            out = (out, pd.DataFrame([(l, *idx) for l, idx in patches], columns=axes))
        results.append(out)
    return results


def patched_runs(specs, index_df, sizes):
    """The patched runs of sweeps ``specs`` [(activation, index_axis_names)]: ([(activation, layer,
    index into the activation [batch, ...])], [(runs of each sweep, its axes, its patches)])."""
    runs, layouts = [], []
    for activation_name, index_axis_names in specs:
        kind = _kind(activation_name)
        patches, axes = _patches(index_axis_names, index_df, kind, activation_name, sizes)  # [(layer, (i, ...))]
        for layer, idx in patches:
            where = [slice(None)] * _NDIM[kind]
            for axis_name, i in zip(axes[1:], idx):
                where[_AXES[(kind, axis_name)]] = i
            runs.append((activation_name, layer, tuple(where)))
        layouts.append((len(patches), axes, patches))
    return runs, layouts


def _patches(index_axis_names, index_df, kind, activation_name, sizes):
    """The patches to make, [(layer, (index along each further axis, ...))], and the axes' names:
    every combination of ``index_axis_names`` (layer by layer), or the rows of ``index_df``."""
    if index_axis_names is None and index_df is None:
        raise ValueError("give index_axis_names (every combination) or index_df (one patch per row)")
    axes = list(index_axis_names if index_df is None else index_df.columns)
    if axes[0] != "layer" or any((kind, a) not in _AXES for a in axes[1:]):
        given = "index_axis_names" if index_df is None else "index_df's columns"
        raise ValueError(f"{given} {tuple(axes)} do not fit activation {activation_name!r}"
                         f"{'' if axes[0] == 'layer' else ' (the first must be layer)'}")
    if index_df is None:
        return [(layer, idx) for layer in range(sizes["layer"])
                for idx in itertools.product(*[range(sizes[a]) for a in axes[1:]])], axes
    for a in axes:
        values = index_df[a].to_numpy()
        if not np.issubdtype(values.dtype, np.integer) or values.min() < 0 or values.max() >= sizes[a]:
            bad = values[(values < 0) | (values >= sizes[a])] if np.issubdtype(values.dtype, np.integer) else values
            raise ValueError(f"index_df column {a!r} holds {bad[0].item()!r}: expected whole numbers 0..{sizes[a] - 1}")
    rows = index_df.to_numpy()
    return [(int(r[0]), tuple(int(i) for i in r[1:])) for r in rows], axes


def _patcher(activation_name, index_axis_names, doc):
    def fn(model, corrupted_tokens, clean_cache, patching_metric, **kwargs):
        return generic_activation_patch(model, corrupted_tokens, clean_cache, patching_metric,
                                        activation_name, index_axis_names, **kwargs)

    fn.__doc__ = (f"{doc}\n\nPatch clean ``{activation_name}`` into the corrupted run at each "
                  f"({', '.join(index_axis_names)}); returns the metric [{', '.join(index_axis_names)}].")
    return fn


# Every sweep: name, the activation it patches, the axes of its result, what it is. Each gives two
# functions: get_act_patch_{name} (exact) and get_attr_patch_{name} (attribution, further below).
SWEEPS = {
    "resid_pre": ("resid_pre", ("layer", "pos"), "Residual stream entering each layer."),
    "resid_mid": ("resid_mid", ("layer", "pos"), "Residual stream between attention and MLP."),
    "attn_out": ("attn_out", ("layer", "pos"), "Output of each attention layer."),
    "mlp_out": ("mlp_out", ("layer", "pos"), "Output of each MLP layer."),
    "attn_head_out_all_pos": ("z", ("layer", "head"), "Each head's output (z), all positions."),
    "attn_head_q_all_pos": ("q", ("layer", "head"), "Each head's queries, all positions."),
    "attn_head_k_all_pos": ("k", ("layer", "head"), "Each head's keys, all positions."),
    "attn_head_v_all_pos": ("v", ("layer", "head"), "Each head's values, all positions."),
    "attn_head_pattern_all_pos": ("pattern", ("layer", "head_index"), "Each head's attention pattern, all positions."),
    "attn_head_out_by_pos": ("z", ("layer", "pos", "head"), "Each head's output at each position."),
    "attn_head_q_by_pos": ("q", ("layer", "pos", "head"), "Each head's query at each position."),
    "attn_head_k_by_pos": ("k", ("layer", "pos", "head"), "Each head's key at each position."),
    "attn_head_v_by_pos": ("v", ("layer", "pos", "head"), "Each head's value at each position."),
    "attn_head_pattern_by_pos": ("pattern", ("layer", "head_index", "dest_pos"),
                                 "Each head's attention pattern row at each destination."),
    "attn_head_pattern_dest_src_pos": ("pattern", ("layer", "head_index", "dest_pos", "src_pos"),
                                       "Each single attention weight."),
}
def _publish(name: str, fn) -> None:
    fn.__name__ = fn.__qualname__ = name
    globals()[name] = fn


for _name, (_activation, _axes, _doc) in SWEEPS.items():
    _publish(f"get_act_patch_{_name}", _patcher(_activation, _axes, _doc))


def _every(model, corrupted_tokens, clean_cache, metric, names, **kwargs) -> list:
    """The results of the sweeps ``names`` (keys of ``SWEEPS``), their patched runs batched together."""
    return _sweeps(model, corrupted_tokens, clean_cache, metric, [SWEEPS[n][:2] for n in names], **kwargs)


def get_act_patch_block_every(model, corrupted_tokens, clean_cache, metric, **kwargs) -> np.ndarray:
    """resid_pre, attn_out and mlp_out patched by (layer, pos): [3, layer, pos]."""
    return np.stack(_every(model, corrupted_tokens, clean_cache, metric, ("resid_pre", "attn_out", "mlp_out"), **kwargs))


def get_act_patch_attn_head_all_pos_every(model, corrupted_tokens, clean_cache, metric, **kwargs) -> np.ndarray:
    """Head output, q, k, v and pattern patched by (layer, head) over all positions: [5, layer, head]."""
    return np.stack(_every(model, corrupted_tokens, clean_cache, metric, (
        "attn_head_out_all_pos", "attn_head_q_all_pos", "attn_head_k_all_pos", "attn_head_v_all_pos",
        "attn_head_pattern_all_pos"), **kwargs))


def get_act_patch_attn_head_by_pos_every(model, corrupted_tokens, clean_cache, metric, **kwargs) -> np.ndarray:
    """Head output, q, k, v and pattern patched by (layer, pos, head): [5, layer, pos, head], in
    TransformerLens's order. The pattern row is patched at each destination position (its sweep,
    [layer, head_index, dest_pos], transposed to [layer, pos, head])."""
    *by_pos, pattern = _every(model, corrupted_tokens, clean_cache, metric, (
        "attn_head_out_by_pos", "attn_head_q_by_pos", "attn_head_k_by_pos", "attn_head_v_by_pos",
        "attn_head_pattern_by_pos"), **kwargs)
    return np.stack(by_pos + [pattern.transpose(0, 2, 1)])


# ----------------------------------------------------------------------------------------------
# Attribution patching: the same sweeps estimated from one corrupted forward + backward pass
# ----------------------------------------------------------------------------------------------
def generic_attribution_patch(model, corrupted_tokens, clean_cache, patching_metric, activation_name: str,
                              index_axis_names) -> np.ndarray:
    """Attribution patching (Nanda, 2023): the first-order estimate of what patching
    ``activation_name`` from the clean run into the corrupted run at each index would do to the
    metric. For each index, sum over the patched slice of (clean - corrupted) * d metric / d activation,
    the gradient taken on the corrupted run. Same axes and shape as ``generic_activation_patch``, but
    the values are *changes* of the metric (the exact sweep's values minus the corrupted run's metric).

    patching_metric: differentiable (``npgpt2.metrics``; ``logit_diff_metric`` and
    ``normalized_metric`` make such metrics).
    """
    if activation_name not in _HOOKS:
        raise ValueError(f"unknown activation {activation_name!r}; expected one of {', '.join(_HOOKS)}")
    names = [f"blocks.{layer}.{_HOOKS[activation_name]}" for layer in range(model.cfg.n_layer)]
    corrupted = _corrupted_gradients(model, corrupted_tokens, clean_cache, patching_metric, names)
    return _attribution(model, clean_cache, corrupted, activation_name, index_axis_names)


def _corrupted_gradients(model, corrupted_tokens, clean_cache, metric, names):
    """The corrupted run's activations at ``names`` and the metric's gradients there (one forward
    and one backward pass)."""
    if not callable(getattr(metric, "grad", None)):
        raise TypeError("attribution patching needs a differentiable metric, one with grad(logits): use "
                        "patching.logit_diff_metric, patching.normalized_metric or npgpt2.metrics")
    tokens = _check_runs(model, corrupted_tokens, clean_cache)
    _, corrupted = model.run_with_cache(tokens, names_filter=names, incl_bwd=True, metric=metric)
    return corrupted


def _attribution(model, clean_cache, corrupted, activation_name, index_axis_names) -> np.ndarray:
    """sum over the patched slice of (clean - corrupted) * gradient, per index: [layer, <axes>]."""
    kind = _kind(activation_name)
    axes = list(index_axis_names)
    if axes[0] != "layer" or any((kind, a) not in _AXES for a in axes[1:]):
        raise ValueError(f"index_axis_names {tuple(axes)} do not fit activation {activation_name!r}")
    kept = [_AXES[(kind, a)] for a in axes[1:]]  # the activation's axes that index the result
    per_layer = []
    for layer in range(model.cfg.n_layer):
        name = f"blocks.{layer}.{_HOOKS[activation_name]}"
        terms = (clean_cache[name] - corrupted[name]) * corrupted[name + "_grad"]  # each entry's first-order effect
        summed = terms.sum(axis=tuple(i for i in range(terms.ndim) if i not in kept))
        per_layer.append(np.transpose(summed, np.argsort(np.argsort(kept))))  # in index_axis_names' order
    return np.stack(per_layer)


def _attributor(activation_name, index_axis_names, doc):
    def fn(model, corrupted_tokens, clean_cache, patching_metric):
        return generic_attribution_patch(model, corrupted_tokens, clean_cache, patching_metric,
                                         activation_name, index_axis_names)

    fn.__doc__ = (f"{doc}\n\nAttribution-patching estimate of patching clean ``{activation_name}`` into the "
                  f"corrupted run at each ({', '.join(index_axis_names)}): the change of the metric, "
                  f"[{', '.join(index_axis_names)}]. See ``generic_attribution_patch``.")
    return fn


# one estimate for each exact sweep: same name with attr for act, same arguments and shape
for _name, (_activation, _axes, _doc) in SWEEPS.items():
    _publish(f"get_attr_patch_{_name}", _attributor(_activation, _axes, _doc))


def get_attr_patch_all(model, corrupted_tokens, clean_cache, patching_metric) -> dict[str, np.ndarray]:
    """Every attribution sweep from one corrupted forward + backward pass: {sweep name: array}, the
    names as in ``get_attr_patch_{name}`` ("resid_pre", "attn_head_out_all_pos", ...)."""
    activations = {activation for activation, _, _ in SWEEPS.values()}
    names = [f"blocks.{l}.{_HOOKS[a]}" for l in range(model.cfg.n_layer) for a in activations]
    corrupted = _corrupted_gradients(model, corrupted_tokens, clean_cache, patching_metric, names)
    return {name: _attribution(model, clean_cache, corrupted, activation, axes)
            for name, (activation, axes, _) in SWEEPS.items()}


def get_attr_patch_block_every(model, corrupted_tokens, clean_cache, metric) -> np.ndarray:
    """resid_pre, attn_out and mlp_out, estimated by (layer, pos): [3, layer, pos]."""
    return np.stack([f(model, corrupted_tokens, clean_cache, metric) for f in
                     (get_attr_patch_resid_pre, get_attr_patch_attn_out, get_attr_patch_mlp_out)])


def get_attr_patch_attn_head_all_pos_every(model, corrupted_tokens, clean_cache, metric) -> np.ndarray:
    """Head output, q, k, v and pattern, estimated by (layer, head) over all positions: [5, layer, head]."""
    return np.stack([f(model, corrupted_tokens, clean_cache, metric) for f in (
        get_attr_patch_attn_head_out_all_pos, get_attr_patch_attn_head_q_all_pos,
        get_attr_patch_attn_head_k_all_pos, get_attr_patch_attn_head_v_all_pos,
        get_attr_patch_attn_head_pattern_all_pos)])


def attribution_vs_exact(model, corrupted_tokens, clean_cache, metric, activation: str = "resid_pre",
                         str_tokens=None, **kwargs) -> pd.DataFrame:
    """Both sweeps of one activation side by side: a row per index with ``exact`` (the patched
    metric), ``exact_change`` (minus the corrupted run's metric) and ``attribution`` (the estimate of
    that change); ``df.attrs["correlation"]`` is their Pearson correlation.

    activation: a sweep's name without its prefix, e.g. "resid_pre", "attn_head_out_all_pos".
    kwargs go to the exact sweep (max_batch, progress).
    """
    if activation not in SWEEPS:
        raise ValueError(f"activation={activation!r}: expected one of {', '.join(SWEEPS)}")
    axes = SWEEPS[activation][1]
    exact = globals()[f"get_act_patch_{activation}"](model, corrupted_tokens, clean_cache, metric, **kwargs)
    attribution = globals()[f"get_attr_patch_{activation}"](model, corrupted_tokens, clean_cache, metric)
    corrupted_value = float(metric(model(_check_runs(model, corrupted_tokens, clean_cache))))
    df = patching_frame(exact, axes, str_tokens, value_name="exact")
    df["exact_change"] = df["exact"] - corrupted_value
    df["attribution"] = attribution.ravel()
    df.attrs["corrupted_metric"] = corrupted_value
    df.attrs["correlation"] = float(np.corrcoef(df["exact_change"], df["attribution"])[0, 1])
    return df


def patching_frame(result: np.ndarray, index_axis_names=("layer", "pos"), str_tokens=None,
                   value_name: str = "metric") -> pd.DataFrame:
    """A patching result as a tidy DataFrame: one row per patch, a column per axis (with the token
    for position axes when ``str_tokens`` is given) and the metric."""
    names = list(index_axis_names)
    if result.ndim != len(names):
        raise ValueError(f"result has {result.ndim} axes but {len(names)} names were given: {names}")
    grids = np.meshgrid(*[np.arange(n) for n in result.shape], indexing="ij")
    df = pd.DataFrame({name: g.ravel() for name, g in zip(names, grids)})
    if str_tokens is not None:
        for name in names:
            if name.endswith("pos"):
                df[name.replace("pos", "token")] = [str_tokens[i] for i in df[name]]
    df[value_name] = result.ravel()
    return df
