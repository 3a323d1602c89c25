"""The exact sweeps, batched, against one patched run at a time (float64, 1e-12).

The reference is written here and shares nothing with the sweeps but ``run_with_hooks``: for
each index, a full forward pass of the corrupted prompts with one hook that copies the clean
activation's slice in. The sweeps instead skip patches that change nothing, start at the patched
layer, recompute only the positions from the first one a patch changes and stack many patched
runs in one batch; none of that may change a number. Three prompts, corrupted at different
positions; metrics that declare the logits they read (at the last position, at a position per
prompt, some before the corruption) and one that reads every logit; chunk sizes that do not
divide the number of runs; index_df subsets.
"""

import numpy as np
import pandas as pd
import pytest

from npgpt2.analysis import patching
from conftest import TINY

L, H, POS = TINY.n_layer, TINY.n_head, 8
TOL = 1e-12

# sweep name -> (hook inside block l, axes after layer with their sizes, the index an entry patches)
REFERENCE = {
    "resid_pre": ("hook_resid_pre", (POS,), lambda p: (slice(None), p)),
    "resid_mid": ("hook_resid_mid", (POS,), lambda p: (slice(None), p)),
    "attn_out": ("hook_attn_out", (POS,), lambda p: (slice(None), p)),
    "mlp_out": ("hook_mlp_out", (POS,), lambda p: (slice(None), p)),
    "attn_head_out_all_pos": ("attn.hook_z", (H,), lambda h: (slice(None), slice(None), h)),
    "attn_head_q_all_pos": ("attn.hook_q", (H,), lambda h: (slice(None), slice(None), h)),
    "attn_head_k_all_pos": ("attn.hook_k", (H,), lambda h: (slice(None), slice(None), h)),
    "attn_head_v_all_pos": ("attn.hook_v", (H,), lambda h: (slice(None), slice(None), h)),
    "attn_head_pattern_all_pos": ("attn.hook_pattern", (H,), lambda h: (slice(None), h)),
    "attn_head_out_by_pos": ("attn.hook_z", (POS, H), lambda p, h: (slice(None), p, h)),
    "attn_head_q_by_pos": ("attn.hook_q", (POS, H), lambda p, h: (slice(None), p, h)),
    "attn_head_k_by_pos": ("attn.hook_k", (POS, H), lambda p, h: (slice(None), p, h)),
    "attn_head_v_by_pos": ("attn.hook_v", (POS, H), lambda p, h: (slice(None), p, h)),
    "attn_head_pattern_by_pos": ("attn.hook_pattern", (H, POS), lambda h, d: (slice(None), h, d)),
    "attn_head_pattern_dest_src_pos": ("attn.hook_pattern", (H, POS, POS), lambda h, d, s: (slice(None), h, d, s)),
}


def one_patch(model, corrupted, clean_cache, metric, sweep, index):
    """The metric of one full forward pass of the corrupted prompts with one patch."""
    hook, _, where_of = REFERENCE[sweep]
    name = f"blocks.{index[0]}.{hook}"
    where = where_of(*index[1:])

    def patch(act, hook_point):
        act = act.copy()
        act[where] = clean_cache[name][where]
        return act

    return metric(model.run_with_hooks(corrupted, fwd_hooks=[(name, patch)]))


def one_at_a_time(model, corrupted, clean_cache, metric, sweep):
    shape = (L,) + REFERENCE[sweep][1]
    out = np.empty(shape)
    for index in np.ndindex(*shape):
        out[index] = one_patch(model, corrupted, clean_cache, metric, sweep, index)
    return out


def every_logit(logits):
    """A metric that reads all logits (declares nothing): the sweeps must hand it all of them."""
    return float(logits[:, :, :50].std() + logits[:, 1:, 300:303].mean() - logits[:, -1, 7].mean())


@pytest.fixture(scope="module")
def runs(model64):
    rng = np.random.default_rng(31)
    clean = rng.integers(0, TINY.d_vocab, (3, POS))
    corrupted = clean.copy()
    corrupted[0, 3] = (clean[0, 3] + 1) % TINY.d_vocab  # prompt 0 differs at position 3,
    corrupted[1, 5] = (clean[1, 5] + 1) % TINY.d_vocab  # prompt 1 at 5, prompt 2 at 4 and 6
    corrupted[2, [4, 6]] = (clean[2, [4, 6]] + 1) % TINY.d_vocab
    _, clean_cache = model64.run_with_cache(clean)
    metrics = {
        "logit_diff": patching.logit_diff_metric([7, 8, 9], [10, 11, 12]),  # reads position -1 only
        "per_prompt_position": patching.logit_diff_metric([7, 8, 9], [10, 11, 12], pos=np.array([2, 7, 5])),
        "every_logit": every_logit,
    }
    return corrupted, clean_cache, metrics


@pytest.fixture(scope="module")
def reference(model64, runs):
    """One-at-a-time results, computed once per (sweep, metric)."""
    corrupted, clean_cache, metrics = runs
    memo = {}

    def get(sweep, metric="logit_diff"):
        if (sweep, metric) not in memo:
            memo[sweep, metric] = one_at_a_time(model64, corrupted, clean_cache, metrics[metric], sweep)
        return memo[sweep, metric]

    return get


@pytest.mark.parametrize("sweep", list(REFERENCE))
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_every_sweep_equals_one_patched_run_at_a_time(model64, runs, reference, sweep, chunk_size):
    corrupted, clean_cache, metrics = runs
    fn = getattr(patching, f"get_act_patch_{sweep}")
    result = fn(model64, corrupted, clean_cache, metrics["logit_diff"], chunk_size=chunk_size, progress=False)
    expected = reference(sweep)
    assert result.shape == expected.shape
    np.testing.assert_allclose(result, expected, rtol=0, atol=TOL)


@pytest.mark.parametrize("metric", ["per_prompt_position", "every_logit"])
@pytest.mark.parametrize("sweep,chunk_size", [("resid_pre", 5), ("attn_head_v_by_pos", None),
                                              ("attn_head_pattern_by_pos", 7), ("attn_head_k_all_pos", 1)])
def test_metrics_reading_other_logits(model64, runs, reference, metric, sweep, chunk_size):
    """A metric read at positions before a patch (taken from the corrupted run) and one that reads
    every logit (given all of them, the corrupted run's before the first recomputed position)."""
    corrupted, clean_cache, metrics = runs
    fn = getattr(patching, f"get_act_patch_{sweep}")
    result = fn(model64, corrupted, clean_cache, metrics[metric], chunk_size=chunk_size, progress=False)
    np.testing.assert_allclose(result, reference(sweep, metric), rtol=0, atol=TOL)


@pytest.mark.parametrize("every,sweeps", [
    ("block_every", ["resid_pre", "attn_out", "mlp_out"]),
    ("attn_head_all_pos_every", ["attn_head_out_all_pos", "attn_head_q_all_pos", "attn_head_k_all_pos",
                                 "attn_head_v_all_pos", "attn_head_pattern_all_pos"]),
    ("attn_head_by_pos_every", ["attn_head_out_by_pos", "attn_head_q_by_pos", "attn_head_k_by_pos",
                                "attn_head_v_by_pos", "attn_head_pattern_by_pos"]),
])
def test_every_sweeps_batched_together_equal_the_loops(model64, runs, reference, every, sweeps):
    corrupted, clean_cache, metrics = runs
    result = getattr(patching, f"get_act_patch_{every}")(model64, corrupted, clean_cache, metrics["logit_diff"],
                                                         chunk_size=11, progress=False)
    expected = [reference(s) for s in sweeps]
    if every == "attn_head_by_pos_every":  # the pattern's [layer, head, dest_pos] as [layer, pos, head]
        expected[-1] = expected[-1].transpose(0, 2, 1)
    np.testing.assert_allclose(result, np.stack(expected), rtol=0, atol=TOL)


@pytest.mark.parametrize("sweep,columns,rows", [
    ("attn_head_out_by_pos", ["layer", "pos", "head"], [(1, 6, 2), (0, 0, 1), (1, 3, 0), (0, 7, 3), (1, 6, 2)]),
    ("attn_head_pattern_dest_src_pos", ["layer", "head_index", "dest_pos", "src_pos"],
     [(1, 2, 7, 4), (0, 0, 5, 5), (1, 3, 6, 0), (0, 1, 2, 1)]),
    ("mlp_out", ["layer", "pos"], [(1, 7), (1, 2), (0, 5)]),
])
def test_index_df_rows_equal_one_patched_run_each(model64, runs, sweep, columns, rows):
    """index_df: only the rows given (repeated, unsorted, patches that change nothing among
    them), each equal to its own patched run."""
    corrupted, clean_cache, metrics = runs
    fn = getattr(patching, f"get_act_patch_{sweep}")
    df = pd.DataFrame(rows, columns=columns)
    for metric in ("logit_diff", "every_logit"):
        result = fn(model64, corrupted, clean_cache, metrics[metric], index_df=df, chunk_size=2, progress=False)
        expected = [one_patch(model64, corrupted, clean_cache, metrics[metric], sweep, row) for row in rows]
        np.testing.assert_allclose(result, expected, rtol=0, atol=TOL)


def test_layer_and_head_subsets(model64, runs, reference):
    """Layer 1 only, heads 0 and 2 only, as TransformerLens users cut a sweep down: index_df of
    the full sweep's rows there."""
    corrupted, clean_cache, metrics = runs
    grid = pd.DataFrame([(1, p, h) for p in range(POS) for h in (0, 2)], columns=["layer", "pos", "head"])
    result = patching.get_act_patch_attn_head_q_by_pos(model64, corrupted, clean_cache, metrics["logit_diff"],
                                                       index_df=grid, progress=False)
    full = reference("attn_head_q_by_pos")
    np.testing.assert_allclose(result, [full[l, p, h] for l, p, h in grid.itertuples(index=False)], rtol=0, atol=TOL)
    heads = pd.DataFrame({"layer": [0, 0, 1], "head": [3, 1, 3]})
    result = patching.get_act_patch_attn_head_out_all_pos(model64, corrupted, clean_cache, metrics["logit_diff"],
                                                          index_df=heads, progress=False)
    full = reference("attn_head_out_all_pos")
    np.testing.assert_allclose(result, [full[0, 3], full[0, 1], full[1, 3]], rtol=0, atol=TOL)


def test_the_shortcuts_are_taken(model64, runs):
    """What makes the sweep cheap happens: patches before the first corrupted position change
    nothing (no run), and a patch at position p recomputes positions p on only."""
    from npgpt2.analysis import patch_runs

    corrupted, clean_cache, _ = runs
    _, corrupted_cache = model64.run_with_cache(corrupted)
    runs_ = [("resid_pre", 0, (slice(None), p)) for p in range(POS)] + [("z", 1, (slice(None), 6, 2)),
                                                                       ("k", 0, (slice(None), slice(None), 1))]
    starts = patch_runs.first_changed_positions(clean_cache, corrupted_cache, runs_)
    # layer 0's residual stream differs only at the corrupted positions 3, 4, 5, 6
    assert starts.tolist() == [-1, -1, -1, 3, 4, 5, 6, -1, 6, 3]


def test_hooks_on_the_model_see_every_position(model64, runs, reference):
    """A hook of the model's own (here: position 6 of layer 1's residual stream zeroed) fires in
    every patched run at the position it names: the sweep then recomputes every position."""
    corrupted, clean_cache, metrics = runs

    def zero_position_6(act, hook):
        act = act.copy()
        act[:, 6] = 0
        return act

    with model64.hooks([("blocks.1.hook_resid_pre", zero_position_6)]):
        result = patching.get_act_patch_resid_pre(model64, corrupted, clean_cache, metrics["logit_diff"], progress=False)
        expected = one_at_a_time(model64, corrupted, clean_cache, metrics["logit_diff"], "resid_pre")
    np.testing.assert_allclose(result, expected, rtol=0, atol=TOL)
    assert np.abs(expected - reference("resid_pre")).max() > 1e-3  # the hook matters


@pytest.mark.parametrize("activation,where", [
    ("resid_pre", (slice(None), 5)), ("resid_post", (slice(None), 4)), ("mlp_out", (slice(None), 6)),
    ("resid_mid", (slice(None), 3)), ("attn_out", (slice(None), 5)),
    ("z", (slice(None), slice(None), 2)), ("q", (slice(None), 4, 1)), ("k", (slice(None), slice(None), 3)),
    ("v", (slice(None), 6, slice(None))), ("pattern", (slice(None), 0)), ("pattern", (slice(None), 2, 6, 4)),
])
def test_a_run_joins_with_the_residual_stream_its_patch_makes(model64, runs, activation, where):
    """With a metric that declares its logits, a patched run joins the batch where its patch enters
    the residual stream, without a hook: a patch inside block 0 (resid_mid, attn_out, a head's z, q,
    k, v, pattern) after block 0, its heads' attention and the MLP computed for it alone. Its start
    must be the residual stream entering that block in a full run patched by a hook."""
    from npgpt2.analysis import patch_runs
    from npgpt2.hooks import block_hook

    corrupted, clean_cache, metrics = runs
    run = (activation, 0, where)
    p = patch_runs.plan(model64, corrupted, clean_cache, metrics["logit_diff"], [run])
    p0 = int(p.starts[0])
    assert p0 > 0 and not p.own_hooks
    [(block, i, start)] = patch_runs._joins(model64, [run], p0, clean_cache, p.corrupted, direct=True)
    assert block == (0 if activation == "resid_pre" else 1)
    name = f"blocks.0.{block_hook(activation)}"

    def patch(act, hook):
        act = act.copy()
        act[where] = clean_cache[name][where]
        return act

    with model64.hooks([(name, patch)]):
        _, cache = model64.run_with_cache(corrupted, names_filter=f"blocks.{block}.hook_resid_pre")
    expected = cache[f"blocks.{block}.hook_resid_pre"][:, p0:]
    np.testing.assert_allclose(start, expected, rtol=0, atol=TOL)
    assert np.abs(expected - p.corrupted[f"blocks.{block}.hook_resid_pre"][:, p0:]).max() > 1e-6  # the patch matters
