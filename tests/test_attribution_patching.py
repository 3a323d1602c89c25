"""Attribution patching: each estimate is the derivative of the exact patch along the line from the
corrupted activation to the clean one (finite differences, float64), with the exact sweeps' shapes."""

import numpy as np
import pytest

from npgpt2.analysis import patching

V = 50257


@pytest.fixture(scope="module")
def runs(model64):
    rng = np.random.default_rng(4)
    clean = rng.integers(0, V, (2, 7))
    corrupted = clean.copy()
    corrupted[:, 2] = rng.integers(0, V, 2)  # the prompts differ at position 2
    _, clean_cache = model64.run_with_cache(clean)
    metric = patching.logit_diff_metric([11, 12], [13, 14])
    return corrupted, clean_cache, metric


# (sweep, hook suffix, {index axis name: activation axis})
CASES = [
    ("resid_pre", "hook_resid_pre", {"pos": 1}),
    ("mlp_out", "hook_mlp_out", {"pos": 1}),
    ("attn_head_out_all_pos", "attn.hook_z", {"head": 2}),
    ("attn_head_k_by_pos", "attn.hook_k", {"pos": 1, "head": 2}),
    ("attn_head_pattern_dest_src_pos", "attn.hook_pattern", {"head_index": 1, "dest_pos": 2, "src_pos": 3}),
]


@pytest.mark.parametrize("sweep,hook,axes", CASES)
def test_attribution_is_the_derivative_of_the_exact_patch(model64, runs, sweep, hook, axes):
    corrupted, clean_cache, metric = runs
    attribution = getattr(patching, f"get_attr_patch_{sweep}")(model64, corrupted, clean_cache, metric)
    exact = getattr(patching, f"get_act_patch_{sweep}")(model64, corrupted, clean_cache, metric, progress=False)
    assert attribution.shape == exact.shape
    _, corrupted_cache = model64.run_with_cache(corrupted)
    rng = np.random.default_rng(0)
    for _ in range(3):
        index = tuple(int(rng.integers(0, n)) for n in attribution.shape)
        if sweep.endswith("dest_src_pos") and index[3] > index[2]:  # a masked (future) weight: 0 both ways
            index = index[:3] + (index[2],)
        layer, rest = index[0], index[1:]
        name = f"blocks.{layer}.{hook}"
        where = [slice(None)] * clean_cache[name].ndim
        for axis, i in zip(axes.values(), rest):
            where[axis] = i
        where = tuple(where)
        direction = clean_cache[name][where] - corrupted_cache[name][where]

        def f(alpha):
            def patch(act, point):
                out = act.copy()
                out[where] = act[where] + alpha * direction
                return out
            return metric(model64.run_with_hooks(corrupted, fwd_hooks=[(name, patch)]))

        fd = (f(1e-6) - f(-1e-6)) / 2e-6
        # relative to the sweep's largest estimate: a tiny entry's difference is rounding in the metric
        assert abs(attribution[index] - fd) <= 1e-6 * np.abs(attribution).max(), (sweep, index)


def test_attribution_vs_exact_side_by_side(model64, runs):
    corrupted, clean_cache, metric = runs
    df = patching.attribution_vs_exact(model64, corrupted, clean_cache, metric, "resid_pre", progress=False)
    exact = patching.get_act_patch_resid_pre(model64, corrupted, clean_cache, metric, progress=False)
    np.testing.assert_allclose(df["exact"], exact.ravel())
    corrupted_value = metric(model64(corrupted))
    np.testing.assert_allclose(df["exact_change"], exact.ravel() - corrupted_value)
    # positions other than 2 are the same in both runs at layer 0: nothing to patch, both say 0
    layer0 = df[(df["layer"] == 0) & (df["pos"] != 2)]
    assert np.abs(layer0[["exact_change", "attribution"]].to_numpy()).max() < 1e-9
    assert -1 <= df.attrs["correlation"] <= 1
    np.testing.assert_allclose(df.attrs["correlation"], np.corrcoef(df["exact_change"], df["attribution"])[0, 1])


def test_a_metric_without_a_gradient_is_refused(model64, runs):
    corrupted, clean_cache, _ = runs
    with pytest.raises(TypeError, match="differentiable metric"):
        patching.get_attr_patch_resid_pre(model64, corrupted, clean_cache, lambda logits: float(logits.sum()))


def test_all_sweeps_from_one_pass_equal_each_sweep(model64, runs):
    corrupted, clean_cache, metric = runs
    every = patching.get_attr_patch_all(model64, corrupted, clean_cache, metric)
    assert len(every) == 15
    for name, values in every.items():
        np.testing.assert_allclose(values, getattr(patching, f"get_attr_patch_{name}")(model64, corrupted, clean_cache,
                                                                                        metric), atol=1e-12)
