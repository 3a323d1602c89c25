"""Analysis I: decompositions of the residual stream, weight processing, token tables, logit lens,
direct logit attribution, pictures. Identities are checked in float64."""

import os

import numpy as np
import pandas as pd
import pytest

import npgpt2
from npgpt2.analysis import direct_logit_attribution, logit_lens, next_token_table, prompt_token_probs
from conftest import TINY
import by_hand

L, H = TINY.n_layer, TINY.n_head


@pytest.fixture(scope="module")
def run64(model64):
    tokens = np.random.default_rng(4).integers(0, TINY.d_vocab, (3, 9))
    logits, cache = model64.run_with_cache(tokens)
    return tokens, logits, cache


def test_accumulated_resid_labels_and_values(run64):
    _, _, cache = run64
    stack, labels = cache.accumulated_resid(return_labels=True)
    assert labels == ["0_pre", "1_pre", "final_post"] and stack.shape == (3, 3, 9, TINY.d_model)
    np.testing.assert_array_equal(stack[-1], cache["resid_post", L - 1])
    stack, labels = cache.accumulated_resid(layer=1, incl_mid=True, return_labels=True)
    assert labels == ["0_pre", "0_mid", "1_pre"]
    stack = cache.accumulated_resid(pos_slice=-1)
    assert stack.shape == (3, 3, TINY.d_model)


def test_decompositions_sum_to_the_residual_stream(run64):
    _, _, cache = run64
    final = cache["resid_post", L - 1]
    stack, labels = cache.decompose_resid(return_labels=True)
    assert labels == ["embed", "pos_embed", "0_attn_out", "0_mlp_out", "1_attn_out", "1_mlp_out"]
    np.testing.assert_allclose(stack.sum(0), final, atol=1e-10)
    np.testing.assert_allclose(cache.decompose_resid(layer=1).sum(0), cache["resid_pre", 1], atol=1e-10)
    np.testing.assert_allclose(cache.decompose_resid(layer=1, mlp_input=True).sum(0), cache["resid_mid", 1], atol=1e-10)

    heads, labels = cache.stack_head_results(incl_remainder=True, return_labels=True)
    assert labels[:H + 1] == [f"L0H{h}" for h in range(H)] + ["L1H0"] and labels[-1] == "remainder"
    np.testing.assert_allclose(heads.sum(0), final, atol=1e-10)

    for expand in (True, False):
        full, labels = cache.get_full_resid_decomposition(expand_neurons=expand, return_labels=True)
        assert len(full) == len(labels) and labels[-3:] == ["embed", "pos_embed", "bias"]
        np.testing.assert_allclose(full.sum(0), final, atol=1e-10)
    neurons = cache.stack_neuron_results(layer=1, incl_remainder=True)
    np.testing.assert_allclose(neurons.sum(0), cache["resid_post", 0], atol=1e-10)
    assert cache.stack_neuron_results(layer=2, neuron_slice=[0, 5], return_labels=True)[1] == ["L0N0", "L0N5", "L1N0", "L1N5"]


def test_head_results_from_z_equal_the_hooked_ones(model64, run64):
    tokens, _, cache = run64
    _, with_result = model64.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_result"))
    cache.compute_head_results()
    for l in range(L):
        np.testing.assert_allclose(cache["result", l], with_result["result", l], atol=1e-12)


def test_apply_ln_to_stack_is_linear_and_exact(model64, run64):
    _, _, cache = run64
    stack = cache.decompose_resid(layer=1)
    normed = cache.apply_ln_to_stack(stack, layer=1)
    np.testing.assert_allclose(normed.sum(0), cache["blocks.1.ln1.hook_normalized"], atol=1e-10)
    final = cache.apply_ln_to_stack(cache.decompose_resid(), layer=None)
    np.testing.assert_allclose(final.sum(0), cache["ln_final.hook_normalized"], atol=1e-10)


def test_logit_lens_last_layer_is_the_model_output(model64, run64):
    tokens, logits, _ = run64
    df, lens_logits = logit_lens(model64, tokens, return_logits=True)
    np.testing.assert_allclose(lens_logits[-1], logits, atol=1e-10)
    assert list(df["layer"].cat.categories) == ["0_pre", "1_pre", "final_post"]
    assert len(df) == 3 * 3 * 9
    last = df[(df["layer"] == "final_post") & (df["position"] < 8)]
    logp = by_hand.log_softmax(logits)
    expected = np.exp(np.take_along_axis(logp[:, :-1], tokens[:, 1:, None], -1)[..., 0])
    np.testing.assert_allclose(last.sort_values(["batch", "position"])["next_prob"], expected.ravel(), atol=1e-10)
    assert (last["top_token"].tolist() == [model64.tokenizer.token_str(t) for t in logits[:, :8].argmax(-1).ravel()])
    assert df[df["position"] == 8]["next_prob"].isna().all()


def test_logit_lens_with_mid_and_text(model):
    df = logit_lens(model, "Hello, my dog is cute", incl_mid=True)
    assert list(df["layer"].cat.categories) == ["0_pre", "0_mid", "1_pre", "1_mid", "final_post"]
    assert df[df["layer_index"] == 0]["token"].tolist() == ["Hello", ",", " my", " dog", " is", " cute"]


@pytest.mark.parametrize("by", ["layer", "head", "neuron"])
def test_dla_rows_sum_to_the_logit_difference(model64, run64, by):
    tokens, logits, cache = run64
    right, wrong = [11, 22, 33], [44, 55, 66]
    df = direct_logit_attribution(model64, cache, tokens, right, wrong, by=by)
    actual = logits[np.arange(3), -1, right] - logits[np.arange(3), -1, wrong]
    per_prompt = df[[f"prompt_{b}" for b in range(3)]].sum().to_numpy()
    np.testing.assert_allclose(per_prompt, actual, atol=1e-9)
    np.testing.assert_allclose(df.attrs["logit_diff"], actual, atol=1e-9)
    assert df["attribution"].is_monotonic_decreasing
    # rows recomputed from the cached activations: a component's write at the last position,
    # centred, divided by the final layer norm's scale (worked out from resid_post), dotted with the
    # final gain times W_U[:, right] - W_U[:, wrong]; the attribution is their mean over prompts
    w = model64.weights
    final = cache["resid_post", L - 1][:, -1]
    scale = np.sqrt(final.var(-1) + TINY.eps)  # [batch]
    unembed = (model64.W_U[:, right] - model64.W_U[:, wrong]).T  # [batch, d_model]
    assert w.b_U is None  # GPT-2 has no unembedding bias
    expected_rows = {label: ((write - write.mean(-1, keepdims=True)) * w.ln_final_w * unembed).sum(-1) / scale
                     for label, write in component_writes(model64, cache, tokens, by).items()}
    expected_rows["final_ln_bias+b_U"] = unembed @ w.ln_final_b  # what no component writes
    for label, expected in expected_rows.items():
        row = df[df["component"] == label].iloc[0]
        np.testing.assert_allclose(row[[f"prompt_{b}" for b in range(3)]].to_numpy(float), expected, atol=1e-9,
                                   err_msg=label)
        assert row["attribution"] == pytest.approx(expected.mean(), abs=1e-9)
    n_rows = {"layer": 2 + 2 * L, "head": L * H + L + 3, "neuron": L * H + L * TINY.d_mlp + 3}[by] + 1
    assert len(df) == n_rows and "final_ln_bias+b_U" in set(df["component"])
    if by == "head":
        row = df[df["component"] == "L1H2"].iloc[0]
        assert (row["type"], row["layer"], row["head"]) == ("head", 1, 2)


def component_writes(model, cache, tokens, by):
    """A few components' writes into the residual stream at the last position, [batch, d_model],
    from the cached activations and the weights."""
    w, P = model.weights, tokens.shape[1]
    writes = {"embed": w.W_E[tokens[:, -1]], "pos_embed": np.broadcast_to(w.W_pos[P - 1], (len(tokens), TINY.d_model))}
    if by == "layer":
        writes.update({"0_attn_out": cache["attn_out", 0][:, -1], "1_mlp_out": cache["mlp_out", 1][:, -1]})
    else:
        for l, h in [(0, 1), (1, 2)]:  # head h's slice of z times its rows of the output matrix
            writes[f"L{l}H{h}"] = cache["z", l][:, -1, h] @ w.blocks[l].W_O[h * TINY.d_head:(h + 1) * TINY.d_head]
        b_O = sum(blk.b_O for blk in w.blocks)
    if by == "head":
        writes["0_mlp_out"] = cache["mlp_out", 0][:, -1]
        writes["bias"] = np.broadcast_to(b_O, (len(tokens), TINY.d_model))
    if by == "neuron":
        for l, n in [(0, 5), (1, 200)]:
            writes[f"L{l}N{n}"] = cache["post", l][:, -1, n, None] * w.blocks[l].W_out[n]
        writes["bias"] = np.broadcast_to(b_O + sum(blk.b_out for blk in w.blocks), (len(tokens), TINY.d_model))
    return writes


def test_dla_single_answer_per_position_and_strings(model64):
    tokens, mask = model64.to_tokens(["Hello, my dog is cute", "The dog"], return_mask=True)
    last = mask.sum(1) - 1
    logits, cache = model64.run_with_cache(tokens)
    df = direct_logit_attribution(model64, cache, tokens, " cat", by="layer", pos=last)
    cat = model64.to_single_token(" cat")
    np.testing.assert_allclose(df[["prompt_0", "prompt_1"]].sum().to_numpy(), logits[[0, 1], last, cat], atol=1e-9)


def test_dla_bad_input(model64, run64):
    tokens, _, cache = run64
    with pytest.raises(npgpt2.InputError, match="' Mary and John' is 3 tokens"):
        direct_logit_attribution(model64, cache, tokens, " Mary and John")
    with pytest.raises(ValueError, match="answer has 2 entries for 3 prompts"):
        direct_logit_attribution(model64, cache, tokens, [1, 2])
    with pytest.raises(ValueError, match="by='block'"):
        direct_logit_attribution(model64, cache, tokens, 5, by="block")


def test_logit_attrs_transformerlens_semantics_exact_after_fold_ln(tiny_dir):
    m = npgpt2.from_pretrained(tiny_dir, dtype="float64", fold_ln=True, center_writing_weights=True,
                               center_unembed=True)
    tokens = np.random.default_rng(8).integers(0, TINY.d_vocab, (2, 7))
    logits, cache = m.run_with_cache(tokens)
    stack = cache.get_full_resid_decomposition(pos_slice=-1, expand_neurons=False)
    attrs = cache.logit_attrs(stack, tokens=[3, 4], incorrect_tokens=[5, 6], pos_slice=-1)
    assert attrs.shape == (len(stack), 2)
    b_U = m.b_U
    expected = logits[[0, 1], -1, [3, 4]] - logits[[0, 1], -1, [5, 6]] - (b_U[[3, 4]] - b_U[[5, 6]])
    np.testing.assert_allclose(attrs.sum(0), expected, atol=1e-9)


# --------------------------------------------------------------------------- weight processing
PROCESSING = [dict(fold_ln=True), dict(center_writing_weights=True), dict(center_unembed=True),
              dict(fold_value_biases=True),
              dict(fold_ln=True, center_writing_weights=True, center_unembed=True, fold_value_biases=True)]


@pytest.mark.parametrize("options", PROCESSING, ids=lambda o: "+".join(o))
def test_processing_keeps_log_probs(tiny_dir, model64, options):
    tokens = np.random.default_rng(9).integers(0, TINY.d_vocab, (2, 10))
    processed = npgpt2.from_pretrained(tiny_dir, dtype="float64", **options)
    assert all(processed.processing[k] for k in options)
    np.testing.assert_allclose(by_hand.log_softmax(processed(tokens)), by_hand.log_softmax(model64(tokens)), atol=1e-9)


def test_processing_in_place_and_consistency_of_activations(tiny_dir, model64):
    tokens = np.random.default_rng(10).integers(0, TINY.d_vocab, (1, 10))
    _, before = model64.run_with_cache(tokens)
    m = npgpt2.from_pretrained(tiny_dir, dtype="float64").process_weights(fold_ln=True)
    assert m.weights.blocks[0].ln1_w is None and m.weights.ln_final_w is None
    _, after = m.run_with_cache(tokens)
    # hook_normalized is taken before the gain and bias, so folding leaves it (and all that reads
    # it through the folded weights) unchanged; the residual stream is untouched
    for name in ["blocks.1.ln1.hook_normalized", "blocks.0.ln2.hook_normalized", "ln_final.hook_normalized",
                 "blocks.1.attn.hook_q", "blocks.1.attn.hook_pattern", "blocks.0.mlp.hook_pre",
                 "blocks.1.hook_resid_post"]:
        np.testing.assert_allclose(after[name], before[name], atol=1e-9, err_msg=name)
    m.process_weights(center_writing_weights=True)
    _, centred = m.run_with_cache(tokens)
    # writers centred: the residual stream becomes the centred original; what reads it is unchanged
    resid = before["resid_post", 1]
    np.testing.assert_allclose(centred["resid_post", 1], resid - resid.mean(-1, keepdims=True), atol=1e-9)
    np.testing.assert_allclose(centred["pattern", 1], before["pattern", 1], atol=1e-9)
    with pytest.raises(ValueError, match="already applied to this model: fold_ln"):
        m.process_weights(fold_ln=True)


# ------------------------------------------------------------------------------------ tables
def test_next_token_table(model64):
    text = "Hello, my dog is cute"
    df = next_token_table(model64, text, k=3)
    tokens = model64.to_tokens(text)[0]
    logp = by_hand.log_softmax(model64(tokens))[0]
    assert df["position"].tolist() == list(range(6)) and df["token"].tolist() == model64.to_str_tokens(text)
    np.testing.assert_allclose(df["next_logprob"][:5], logp[np.arange(5), tokens[1:]], atol=1e-10)
    np.testing.assert_allclose(df["next_prob"][:5], np.exp(logp[np.arange(5), tokens[1:]]), atol=1e-12)
    ranks = [(logp[j] > logp[j, tokens[j + 1]]).sum() for j in range(5)]
    assert df["next_rank"][:5].tolist() == ranks and pd.isna(df["next_rank"][5])
    assert df["top1"].tolist() == [model64.tokenizer.token_str(t) for t in logp.argmax(-1)]
    p = np.exp(logp)
    np.testing.assert_allclose(df["entropy"], -(p * logp).sum(-1), atol=1e-8)
    assert (df["top1_prob"] >= df["top2_prob"]).all()


def test_prompt_token_probs_labels_positions_not_layers(model64):
    text = "Oh, I love ice cream so much!"
    m = prompt_token_probs(model64, text)
    assert m.columns.names == ["position", "token"] and m.index.names == ["i", "token_i"]
    assert m.columns.get_level_values("position").tolist() == list(range(9))
    assert not any("layer" in str(c) for c in m.columns.to_flat_index())
    tokens = model64.to_tokens(text)[0]
    probs = by_hand.softmax(model64(tokens)[0])  # [position, d_vocab]
    np.testing.assert_allclose(m.to_numpy(), probs[:, tokens].T, atol=1e-12)  # entry (i, j): P(token i at j)
    table = next_token_table(model64, text)
    diag = [m.iloc[j + 1, j] for j in range(8)]
    np.testing.assert_allclose(diag, table["next_prob"][:8], atol=1e-12)
    assert m.corr().shape == (9, 9)  # the notebook's next step works on it


def test_example_runs_on_a_synthetic_model(model, tmp_path):
    from npgpt2.testing import run_walkthrough

    example = run_walkthrough(os.path.join(os.path.dirname(__file__), "..", "examples", "token_tables.py"),
                              MODEL=model, OUT_DIR=str(tmp_path))
    results = example["results"]
    assert set(results) == set(example["PROMPTS"])
    for prompt, r in results.items():
        n = len(model.to_tokens(prompt)[0])
        assert r["matrix"].shape == (n, n) and len(r["table"]) == n
        assert set(r["lens"]["layer"].cat.categories) == {"0_pre", "1_pre", "final_post"}
    assert len(list(tmp_path.glob("logit_lens_*.png"))) == 3


# ---------------------------------------------------------------------------------- pictures
def test_plots_render_to_files(model64, run64, tmp_path):
    pytest.importorskip("matplotlib")
    from npgpt2 import plot

    tokens, _, cache = run64
    lens = logit_lens(model64, "Hello, my dog is cute")
    plot.logit_lens_heatmap(lens, path=tmp_path / "lens.png")
    dla = direct_logit_attribution(model64, cache, tokens, 11, 44, by="head")
    plot.attribution_heatmap(dla, path=tmp_path / "heads.png")
    plot.attribution_bars(direct_logit_attribution(model64, cache, tokens, 11, by="layer"), path=tmp_path / "bars.png")
    for name in ("lens.png", "heads.png", "bars.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    with pytest.raises(ValueError, match='by="head"'):
        plot.attribution_heatmap(direct_logit_attribution(model64, cache, tokens, 11, by="layer"))
