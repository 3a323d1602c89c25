"""Ablation, head detection, induction, circuits in the weights, attention pictures, walkthroughs."""

import os
import re

import numpy as np
import pandas as pd
import pytest

from npgpt2 import InputError, plot
from npgpt2.analysis import (FactoredMatrix, ablate, ablation_hook, composition_frame, composition_scores,
                             ov_circuit, parse_component, qk_circuit, singular_directions)
from npgpt2.analysis.head_detector import (detect_head, get_duplicate_token_head_detection_pattern,
                                  get_induction_head_detection_pattern, get_previous_token_head_detection_pattern,
                                  induction_scores, repeated_tokens)
from npgpt2.testing import run_walkthrough
from conftest import TINY

L, H = TINY.n_layer, TINY.n_head
EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")


# ---------------------------------------------------------------------------------- ablation
def test_zero_ablation_of_a_head_equals_removing_its_result(model64, tokens):
    df = ablate(model64, tokens, ["L1H2"], method="zero")
    _, c = model64.run_with_cache(tokens, names_filter=lambda n: "hook_result" in n)
    without = model64.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_attn_out",
                                                         lambda a, h: a - c["result", 1][:, :, 2])])
    expected = model64._loss_from_logits(without, tokens, None, False)
    assert df.loc[0, "ablated_loss"] == pytest.approx(expected, abs=1e-10)
    assert df.loc[0, "loss_change"] == pytest.approx(expected - model64.loss(tokens), abs=1e-10)


def test_ablation_methods_and_components(model64, tokens):
    metric = lambda logits: float(logits[:, -1, 3].mean())  # noqa: E731
    comps = ["L0H1", "L1N7", "0_mlp_out", "attn1", "mlp1", "1_attn_out"]
    for method in ("zero", "mean", "resample"):
        df = ablate(model64, tokens, comps, method=method, metric=metric)
        assert list(df["component"]) == comps and (df["method"] == method).all()
        assert {"loss", "ablated_loss", "loss_change", "metric", "ablated_metric", "metric_change"} <= set(df.columns)
    # mean ablation over the run's own prompts, one position: only that position changes
    name, hook = ablation_hook(model64, "0_mlp_out", "mean", positions=[5])
    _, before = model64.run_with_cache(tokens, names_filter=name)
    with model64.hooks([(name, hook)]):
        _, after = model64.run_with_cache(tokens, names_filter=name)
    changed = ~np.isclose(after[name], before[name]).all(axis=(0, 2))
    assert changed.tolist() == [p == 5 for p in range(tokens.shape[1])]
    np.testing.assert_allclose(after[name][:, 5], np.broadcast_to(before[name][:, 5].mean(0), after[name][:, 5].shape))
    # resample: each prompt takes another prompt's value
    name, hook = ablation_hook(model64, "L1N3", "resample", seed=1)
    with model64.hooks([(name, hook)]):
        _, resampled = model64.run_with_cache(tokens, names_filter=name)
    assert np.array_equal(resampled[name][0, :, 3], before_post(model64, tokens)[1, :, 3])


def before_post(model, tokens):
    _, c = model.run_with_cache(tokens, names_filter="blocks.1.mlp.hook_post")
    return c["post", 1]


def test_ablation_bad_component_names(model64):
    for bad, match in [("L9H0", "layer 9 is out of range"), ("L0H7", "head 7 is out of range"),
                       ("L0N9999", "neuron 9999 is out of range"), ("head3", "unknown component 'head3'")]:
        with pytest.raises(InputError, match=match):
            parse_component(model64, bad)
    with pytest.raises(ValueError, match="method='noise'"):
        ablation_hook(model64, "L0H0", "noise")


# ------------------------------------------------------------------------------ head detection
def test_detection_patterns():
    t = np.array([5, 6, 7, 5, 6, 7])
    np.testing.assert_array_equal(get_previous_token_head_detection_pattern(t), np.eye(6, k=-1))
    dup = get_duplicate_token_head_detection_pattern(t)
    assert dup[3, 0] == dup[4, 1] == dup[5, 2] == 1 and dup.sum() == 3
    ind = get_induction_head_detection_pattern(t)
    assert ind[3, 1] == ind[4, 2] == ind[5, 3] == 1 and ind.sum() == 3  # the token after the earlier one


def test_detect_head_finds_a_planted_previous_token_head(model64):
    tokens = np.array([[3, 9, 4, 1, 5, 9, 2, 6]])
    target = np.eye(8, k=-1)
    target[0, 0] = 1  # the first query can only attend to itself

    def plant(pattern, hook):
        pattern = pattern.copy()
        pattern[:, 2] = target
        return pattern

    with model64.hooks([("blocks.1.attn.hook_pattern", plant)]):
        scores = detect_head(model64, tokens, "previous_token_head")
        scores_abs = detect_head(model64, tokens, "previous_token_head", error_measure="abs")
        excl = detect_head(model64, tokens, target, heads={1: [2]}, exclude_bos=True)
    assert scores.shape == (L, H)
    assert scores[1, 2] == pytest.approx(7 / 8)  # 7 of the 8 rows' attention is on the previous token
    assert scores[1, 2] == scores.max()
    assert scores_abs[1, 2] == pytest.approx(1 - round(1 / 8 * 8 / 8, 3))
    only = detect_head(model64, tokens, "previous_token_head", heads=[(0, 1)])
    # by hand: the share of head L0H1's attention (8 rows, each summing to 1) on the previous token
    _, c = model64.run_with_cache(tokens, names_filter="blocks.0.attn.hook_pattern")
    pattern = c["pattern", 0][0, 1]
    assert only[0, 1] == pytest.approx(sum(pattern[i, i - 1] for i in range(1, 8)) / 8, abs=1e-12)
    assert (np.delete(only.ravel(), 1) == -1).all()
    assert excl[1, 2] == pytest.approx(1.0)


def test_detect_head_bad_input(model64):
    with pytest.raises(ValueError, match="unknown head type 'copy_head'"):
        detect_head(model64, np.array([1, 2, 3]), "copy_head")
    with pytest.raises(ValueError, match=r"lower-triangular of shape \(3, 3\)"):
        detect_head(model64, np.array([1, 2, 3]), np.ones((3, 3)))
    with pytest.raises(InputError, match=r"head \(5, 0\) is out of range"):
        detect_head(model64, np.array([1, 2, 3]), "previous_token_head", heads=[(5, 0)])


def test_induction_scores_find_a_planted_induction_head(model64):
    seq_len = 10
    tokens = repeated_tokens(model64, seq_len, 2, batch=1, seed=0)
    assert tokens.shape == (1, 21) and (tokens[0, 1:11] == tokens[0, 11:]).all()
    target = get_induction_head_detection_pattern(tokens[0])
    target[target.sum(1) == 0, 0] = 1  # rows with no earlier occurrence rest on the BOS

    def plant(pattern, hook):
        pattern = pattern.copy()
        pattern[:, 0] = target[None]
        return pattern

    with model64.hooks([("blocks.1.attn.hook_pattern", plant)]):
        scores, loss = induction_scores(model64, seq_len=seq_len, batch=2, seed=3)
    assert scores.shape == (L, H) and scores[1, 0] == pytest.approx(1.0) and np.delete(scores.ravel(), H).max() < 1
    assert set(loss["copy"]) == {0, 1} and len(loss) == 20
    assert loss.columns.tolist() == ["position", "copy", "loss"]


# ------------------------------------------------------------------------------------ circuits
def test_factored_matrix_against_dense(model64):
    ov = ov_circuit(model64)
    assert ov.shape == (L, H, TINY.d_model, TINY.d_model)
    dense = ov.AB
    np.testing.assert_allclose(dense[1, 2], model64.W_V[1, 2] @ model64.W_O[1, 2])
    U, S, V = ov[1, 2].svd()  # TransformerLens's convention: V, not Vh
    np.testing.assert_allclose((U * S) @ V.T, dense[1, 2], atol=1e-12)
    np.testing.assert_allclose(S, np.linalg.svd(dense[1, 2], compute_uv=False)[: TINY.d_head], atol=1e-12)
    np.testing.assert_allclose(ov.norm(), np.linalg.norm(dense, axis=(-2, -1)), rtol=1e-12)
    qk = qk_circuit(model64)
    np.testing.assert_allclose((qk @ ov).AB[0, 1], qk.AB[0, 1] @ dense[0, 1], atol=1e-10)
    np.testing.assert_allclose(qk.T.AB[1, 0], qk.AB[1, 0].T)
    with pytest.raises(ValueError, match="do not chain"):
        FactoredMatrix(np.ones((3, 2)), np.ones((3, 2)))


def test_qk_circuit_gives_the_attention_scores(model64):
    """With the biases zeroed, the scores are x_q QK x_k^T / sqrt(d_head) for the layer-norm outputs."""
    tokens = np.array([[4, 8, 15, 16, 23, 42]])
    _, c = model64.run_with_cache(tokens)
    blk = model64.weights.blocks[0]
    x = c["blocks.0.ln1.hook_normalized"][0] * blk.ln1_w + blk.ln1_b
    q = x @ model64.W_Q[0, 3] + model64.b_Q[0, 3]
    k = x @ model64.W_K[0, 3] + model64.b_K[0, 3]
    np.testing.assert_allclose(np.tril(q @ k.T / np.sqrt(TINY.d_head)), np.tril(np.where(
        np.isinf(c["attn_scores", 0][0, 3]), 0, c["attn_scores", 0][0, 3])), atol=1e-10)
    expected = x @ qk_circuit(model64)[0, 3].AB @ x.T  # the bias-free part
    np.testing.assert_allclose(expected, (x @ model64.W_Q[0, 3]) @ (x @ model64.W_K[0, 3]).T, atol=1e-10)


def test_composition_scores_against_dense(model64):
    ov, qk = ov_circuit(model64).AB, qk_circuit(model64).AB
    for mode, right in (("Q", qk), ("K", qk.swapaxes(-1, -2)), ("V", ov)):
        s = composition_scores(model64, mode)
        assert s.shape == (L, H, L, H) and np.isnan(s[1, :, 0]).all() and np.isnan(s[0, :, 0]).all()
        for h1, h2 in [(0, 1), (3, 2)]:
            a, b = ov[0, h1], right[1, h2]
            expected = np.linalg.norm(a @ b) / (np.linalg.norm(a) * np.linalg.norm(b))
            assert s[0, h1, 1, h2] == pytest.approx(expected, rel=1e-10)
    df = composition_frame(model64)
    assert len(df) == 3 * H * H and df["score"].is_monotonic_decreasing


def test_singular_directions_as_tokens(model64):
    df = singular_directions(model64, 1, 2, "OV", k=2, top_tokens=5)
    assert list(df.columns) == ["layer", "head", "circuit", "rank", "singular_value", "reads", "writes"]
    assert df["singular_value"].is_monotonic_decreasing and len(df.loc[0, "writes"]) == 5
    U, S, V = ov_circuit(model64)[1, 2].svd()
    top_written = np.argsort(-(V[:, 0] @ model64.W_U))[:5]
    tops_signed = [model64.tokenizer.token_str(t) for t in top_written]
    bottoms = [model64.tokenizer.token_str(t) for t in np.argsort(V[:, 0] @ model64.W_U)[:5]]
    assert df.loc[0, "writes"] in (tops_signed, bottoms)
    qk = singular_directions(model64, 0, 0, "QK", k=1)
    assert {"query", "key"} <= set(qk.columns)
    with pytest.raises(ValueError, match=r"head \(0, 9\) is out of range"):
        singular_directions(model64, 0, 9)


# ------------------------------------------------------------------------------------ pictures
def test_attention_pictures(model, tmp_path):
    text = "When John and Mary went to the shops"
    _, c = model.run_with_cache(text)
    tokens = model.to_str_tokens(text)
    plot.attention_patterns(c, tokens, [(0, 1), (1, 3)], path=tmp_path / "att.png")
    assert (tmp_path / "att.png").read_bytes()[:4] == b"\x89PNG"
    page = plot.attention_html(c["pattern", 1][0], tokens, 1, path=tmp_path / "layer1.html")
    assert (tmp_path / "layer1.html").read_text() == page
    assert page.startswith("<!DOCTYPE html>") and page.count("<script") == 2
    assert not re.search(r"(src|href)\s*=|https?://|@import", page)  # nothing fetched from anywhere
    data = re.search(r'<script type="application/json" id="[^"]+">(.*?)</script>', page, re.S).group(1)
    import json

    payload = json.loads(data)  # script content is raw text: no HTML entities to undo
    assert payload["tokens"] == tokens and np.array(payload["patterns"]).shape == (H, len(tokens), len(tokens))
    with pytest.raises(ValueError, match="pattern must be"):
        plot.attention_html(c["pattern", 1], tokens, 1)


# --------------------------------------------------------------------------------- walkthroughs
def test_ioi_walkthrough_on_a_synthetic_model(model, tmp_path):
    r = run_walkthrough(os.path.join(EXAMPLES, "ioi.py"), MODEL=model, OUT_DIR=str(tmp_path))["results"]
    assert r["logit_diff"].shape == (8, 4)
    assert list(r["lens"]["layer"]) == ["0_pre", "0_mid", "1_pre", "1_mid", "final_post"]
    # the lens read after the last layer is the model's own logit difference
    np.testing.assert_allclose(r["lens"]["logit_diff"].iloc[-1], r["logit_diff"]["logit_diff"].mean(), atol=1e-4)
    assert set(r["dla_head"]["type"]) >= {"head", "mlp", "embed"}
    assert r["patch_resid_pre"].shape == (L * 14, 4) and r["patch_blocks"].shape == (3, L, 14)
    assert r["patch_heads"].shape == (L * H, 3)
    # the prompt pairs differ only at position 9 (the repeated name): at layer 0, patching it
    # restores the clean run (1) and patching any other position changes nothing (0)
    layer0 = r["patch_resid_pre"][r["patch_resid_pre"]["layer"] == 0]
    np.testing.assert_allclose(layer0["metric"], np.where(layer0["pos"] == 9, 1.0, 0.0), atol=1e-4)
    assert len(r["ablation"]) == L * H
    for name in ("top_heads.png", "dla_heads.png"):
        assert (tmp_path / name).exists()
    assert list(tmp_path.glob("attention_layer*.html"))


def test_induction_walkthrough_on_a_synthetic_model(model, tmp_path):
    r = run_walkthrough(os.path.join(EXAMPLES, "induction.py"), MODEL=model, SEQ_LEN=20, OUT_DIR=str(tmp_path))["results"]
    assert r["scores"].shape == (L, H) and len(r["heads"]) == L * H
    assert isinstance(r["loss"], pd.DataFrame)
    assert (tmp_path / "induction_heads.png").exists() and (tmp_path / "induction_scores.png").exists()
