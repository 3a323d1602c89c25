"""Activation patching: TransformerLens's shapes, identities, agreement with the naive method."""

import numpy as np
import pytest

from npgpt2 import InputError
from npgpt2.analysis import patching
from conftest import TINY

L, H = TINY.n_layer, TINY.n_head


@pytest.fixture(scope="module")
def runs(model64):
    rng = np.random.default_rng(12)
    clean = rng.integers(0, TINY.d_vocab, (2, 8))
    corrupted = clean.copy()
    corrupted[:, 3] = rng.integers(0, TINY.d_vocab, 2)  # differ at position 3 only
    clean_logits, clean_cache = model64.run_with_cache(clean)
    metric = patching.logit_diff_metric([7, 8], [9, 10])
    return clean, corrupted, clean_logits, clean_cache, metric


def naive(model, corrupted, hook_name, index, clean_act, metric):
    def hook(act, h):
        act = act.copy()
        act[index] = clean_act[index]
        return act
    return metric(model.run_with_hooks(corrupted, fwd_hooks=[(hook_name, hook)]))


SHAPES = [
    (patching.get_act_patch_resid_pre, (L, 8)), (patching.get_act_patch_resid_mid, (L, 8)),
    (patching.get_act_patch_attn_out, (L, 8)), (patching.get_act_patch_mlp_out, (L, 8)),
    (patching.get_act_patch_attn_head_out_all_pos, (L, H)), (patching.get_act_patch_attn_head_q_all_pos, (L, H)),
    (patching.get_act_patch_attn_head_k_all_pos, (L, H)), (patching.get_act_patch_attn_head_v_all_pos, (L, H)),
    (patching.get_act_patch_attn_head_pattern_all_pos, (L, H)),
    (patching.get_act_patch_attn_head_out_by_pos, (L, 8, H)), (patching.get_act_patch_attn_head_q_by_pos, (L, 8, H)),
    (patching.get_act_patch_attn_head_k_by_pos, (L, 8, H)), (patching.get_act_patch_attn_head_v_by_pos, (L, 8, H)),
    (patching.get_act_patch_attn_head_pattern_by_pos, (L, H, 8)),
    (patching.get_act_patch_block_every, (3, L, 8)), (patching.get_act_patch_attn_head_all_pos_every, (5, L, H)),
    (patching.get_act_patch_attn_head_by_pos_every, (5, L, 8, H)),
]


@pytest.mark.parametrize("fn,shape", SHAPES, ids=[f.__name__ for f, _ in SHAPES])
def test_transformerlens_names_and_shapes(model64, runs, fn, shape):
    clean, corrupted, _, clean_cache, metric = runs
    assert fn(model64, corrupted, clean_cache, metric).shape == shape


def test_by_pos_every_stacks_transformerlens_five_sweeps_in_its_order(model64, runs):
    """TransformerLens's get_act_patch_attn_head_by_pos_every: out, q, k, v, pattern (the pattern
    sweep [layer, head, dest_pos] turned to [layer, pos, head]), so a port's reshape(5, -1) lines up."""
    clean, corrupted, _, clean_cache, metric = runs
    every = patching.get_act_patch_attn_head_by_pos_every(model64, corrupted, clean_cache, metric, progress=False)
    singles = [f(model64, corrupted, clean_cache, metric, progress=False) for f in (
        patching.get_act_patch_attn_head_out_by_pos, patching.get_act_patch_attn_head_q_by_pos,
        patching.get_act_patch_attn_head_k_by_pos, patching.get_act_patch_attn_head_v_by_pos)]
    pattern = patching.get_act_patch_attn_head_pattern_by_pos(model64, corrupted, clean_cache, metric, progress=False)
    assert every.shape == (5, L, 8, H)
    for i, single in enumerate(singles):
        np.testing.assert_array_equal(every[i], single)
    for layer, pos, head in [(0, 3, 1), (1, 5, 2), (1, 7, 3)]:
        assert every[4, layer, pos, head] == pattern[layer, head, pos]


@pytest.mark.parametrize("activation,axes,hook,index", [
    ("resid_pre", ("layer", "pos"), "hook_resid_pre", lambda i: (slice(None), i[0])),
    ("mlp_out", ("layer", "pos"), "hook_mlp_out", lambda i: (slice(None), i[0])),
    ("z", ("layer", "pos", "head"), "attn.hook_z", lambda i: (slice(None), i[0], i[1])),
    ("k", ("layer", "head"), "attn.hook_k", lambda i: (slice(None), slice(None), i[0])),
    ("pattern", ("layer", "head_index", "dest_pos"), "attn.hook_pattern", lambda i: (slice(None), i[0], i[1])),
])
def test_sweep_equals_naive_full_forward_patching(model64, runs, activation, axes, hook, index):
    """Starting at the patched layer and batching patches changes nothing: each entry equals a full
    forward pass of the corrupted prompts with that one patch."""
    clean, corrupted, _, clean_cache, metric = runs
    result = patching.generic_activation_patch(model64, corrupted, clean_cache, metric, activation, axes)
    rng = np.random.default_rng(0)
    for _ in range(6):
        idx = tuple(int(rng.integers(0, n)) for n in result.shape)
        name = f"blocks.{idx[0]}.{hook}"
        expected = naive(model64, corrupted, name, index(idx[1:]), clean_cache[name], metric)
        assert result[idx] == pytest.approx(expected, abs=1e-10)


def test_patching_everything_restores_clean_and_nothing_leaves_corrupted(model64, runs):
    clean, corrupted, clean_logits, clean_cache, metric = runs
    captured = []
    # every position of resid_pre at layer 0 from the clean run: the clean logits, exactly
    patching.generic_activation_patch(model64, corrupted, clean_cache, lambda lg: captured.append(lg) or 0.0,
                                      "resid_pre", ("layer",))
    np.testing.assert_allclose(captured[0], clean_logits, rtol=0, atol=1e-10)
    whole = patching.generic_activation_patch(model64, corrupted, clean_cache, metric, "resid_pre", ("layer",))
    np.testing.assert_allclose(whole, metric(clean_logits), atol=1e-10)
    # positions before the first difference hold identical activations: patching them changes nothing
    corrupted_value = metric(model64(corrupted))
    by_pos = patching.get_act_patch_resid_pre(model64, corrupted, clean_cache, metric)
    np.testing.assert_allclose(by_pos[:, :3], corrupted_value, atol=1e-10)
    np.testing.assert_allclose(by_pos[0, 3], metric(clean_logits), atol=1e-10)  # the only difference


def test_normalized_metric_and_frame(model64, runs):
    clean, corrupted, clean_logits, clean_cache, metric = runs
    norm = patching.normalized_metric(metric, metric(clean_logits), metric(model64(corrupted)))
    assert norm(clean_logits) == pytest.approx(1) and norm(model64(corrupted)) == pytest.approx(0)
    result = patching.get_act_patch_resid_pre(model64, corrupted, clean_cache, norm)
    df = patching.patching_frame(result, ("layer", "pos"), model64.to_str_tokens(corrupted[0]))
    assert list(df.columns) == ["layer", "pos", "token", "metric"] and len(df) == L * 8
    assert df.loc[(df.layer == 0) & (df.pos == 3), "metric"].item() == pytest.approx(1)
    with pytest.raises(ValueError, match="nothing to normalise"):
        patching.normalized_metric(metric, 1.0, 1.0)


def test_small_batches_give_the_same_answer(model64, runs):
    clean, corrupted, _, clean_cache, metric = runs
    big = patching.get_act_patch_attn_head_out_by_pos(model64, corrupted, clean_cache, metric)
    small = patching.get_act_patch_attn_head_out_by_pos(model64, corrupted, clean_cache, metric, max_batch=2)
    np.testing.assert_allclose(big, small, atol=1e-10)


def test_bad_input_is_named(model64, runs):
    clean, corrupted, _, clean_cache, metric = runs
    with pytest.raises(InputError, match=r"clean run has \[batch, pos\] = \[2, 8\] but the corrupted tokens are \[2, 7\]"):
        patching.get_act_patch_resid_pre(model64, corrupted[:, :7], clean_cache, metric)
    with pytest.raises(ValueError, match="unknown activation 'embed'"):
        patching.generic_activation_patch(model64, corrupted, clean_cache, metric, "embed", ("layer",))
    with pytest.raises(ValueError, match=r"index_axis_names \('layer', 'head'\) do not fit activation 'resid_pre'"):
        patching.generic_activation_patch(model64, corrupted, clean_cache, metric, "resid_pre", ("layer", "head"))


def test_index_df_patches_the_rows_given_and_equals_the_full_sweep_there(model64, runs):
    """TransformerLens's index_df: a subset of (layer, head) or (layer, pos, head) patches, one
    metric per row, each equal to the full sweep's value at that index."""
    import pandas as pd

    clean, corrupted, _, clean_cache, metric = runs
    full = patching.get_act_patch_attn_head_out_by_pos(model64, corrupted, clean_cache, metric, progress=False)
    rows = pd.DataFrame({"layer": [1, 0, 1], "pos": [3, 3, 7], "head": [2, 0, 1]})
    subset, index_df = patching.get_act_patch_attn_head_out_by_pos(model64, corrupted, clean_cache, metric, progress=False,
                                                                   index_df=rows, return_index_df=True)
    assert subset.shape == (3,)
    for value, (l, p, h) in zip(subset, rows.itertuples(index=False)):
        assert value == pytest.approx(full[l, p, h], abs=1e-12)
        assert value == pytest.approx(naive(model64, corrupted, f"blocks.{l}.attn.hook_z", (slice(None), p, h),
                                            clean_cache[f"blocks.{l}.attn.hook_z"], metric), abs=1e-10)
    pd.testing.assert_frame_equal(index_df, rows)
    heads = patching.generic_activation_patch(model64, corrupted, clean_cache, metric, "z", progress=False,
                                              index_df=pd.DataFrame({"layer": [0, 1], "head": [3, 1]}))
    whole = patching.get_act_patch_attn_head_out_all_pos(model64, corrupted, clean_cache, metric, progress=False)
    np.testing.assert_allclose(heads, [whole[0, 3], whole[1, 1]], atol=1e-12)
    _, inferred = patching.get_act_patch_resid_pre(model64, corrupted, clean_cache, metric, progress=False,
                                                   return_index_df=True)
    assert list(inferred.columns) == ["layer", "pos"] and len(inferred) == L * 8 and tuple(inferred.iloc[9]) == (1, 1)
    with pytest.raises(ValueError, match=r"index_df column 'head' holds 9: expected whole numbers 0..3"):
        patching.generic_activation_patch(model64, corrupted, clean_cache, metric, "z",
                                          index_df=pd.DataFrame({"layer": [0], "head": [9]}))


def test_logit_diff_metric_takes_transformer_lens_answer_pairs(model64, runs):
    """The demos keep answer_token_indices as [batch, 2] (right, wrong): one argument."""
    clean, _, clean_logits, _, _ = runs
    pairs = np.array([[7, 9], [8, 10]])
    by_hand = np.mean([clean_logits[b, -1, pairs[b, 0]] - clean_logits[b, -1, pairs[b, 1]] for b in range(2)])
    assert patching.logit_diff_metric(pairs)(clean_logits) == pytest.approx(by_hand, abs=1e-12)
    np.testing.assert_array_equal(patching.logit_diff_metric(pairs).grad(clean_logits),
                                  patching.logit_diff_metric([7, 8], [9, 10]).grad(clean_logits))
    with pytest.raises(ValueError, match=r"answer_tokens of shape \(2, 3\) without wrong_tokens: expected \[batch, 2\]"):
        patching.logit_diff_metric(np.zeros((2, 3), int))
