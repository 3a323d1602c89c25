"""TransformerLens's everyday calls: FactoredMatrix, get_act_name, the cache's short forms,
npgpt2.utils, module-style accessors, hook contexts and permanent hooks. Checked against NumPy
computed directly (dense products, brute-force losses) and hand-written names; the same calls are
compared with TransformerLens itself in test_reference_tl_calls.py."""

import dataclasses
import io
from contextlib import redirect_stdout

import numpy as np
import pytest

import npgpt2
from npgpt2 import FactoredMatrix, utils
from npgpt2.hooks import get_act_name
from npgpt2.views import WeightEditError

from conftest import TINY

L, H, D, Dh = TINY.n_layer, TINY.n_head, TINY.d_model, TINY.d_head


# ------------------------------------------------------------------------------ FactoredMatrix
@pytest.fixture
def fm():
    rng = np.random.default_rng(3)
    return FactoredMatrix(rng.normal(size=(2, 3, 7, 4)), rng.normal(size=(2, 3, 4, 7)))


def test_ndarray_at_factored_matrix_and_scalars(model64):
    OV = model64.OV
    assert isinstance(OV, FactoredMatrix) and OV.shape == (L, H, D, D) and (OV.ldim, OV.mdim, OV.rdim) == (D, Dh, D)
    dense = model64.W_V[1, 2] @ model64.W_O[1, 2]
    full = model64.W_E @ OV[1, 2] @ model64.W_U  # [d_vocab, d_vocab], kept factored
    assert isinstance(full, FactoredMatrix) and full.shape == (TINY.d_vocab, TINY.d_vocab) and full.mdim == Dh
    rows, cols = [0, 5, 999, 50256], [3, 17, 40000]
    np.testing.assert_allclose(full.A[rows] @ full.B[:, cols], model64.W_E[rows] @ dense @ model64.W_U[:, cols],
                               rtol=1e-10, atol=1e-12)
    x = np.random.default_rng(0).normal(size=(5, D))
    np.testing.assert_allclose((x @ OV[1, 2]).AB, x @ dense, atol=1e-12)
    np.testing.assert_allclose(x[0] @ OV[1, 2], x[0] @ dense, atol=1e-12)  # vector -> vector
    np.testing.assert_allclose(OV[1, 2] @ x[0], dense @ x[0], atol=1e-12)
    for scaled in (OV * 2.5, 2.5 * OV, np.float32(2.5) * OV, OV / 0.4):
        assert isinstance(scaled, FactoredMatrix)
        np.testing.assert_allclose(scaled[1, 2].AB, 2.5 * dense, rtol=1e-12)
    with pytest.raises(ValueError, match="scalar"):
        OV * np.ones(3)
    with pytest.raises(ValueError, match="expected 64 columns"):
        np.ones((2, 5)) @ OV[1, 2]


def test_factored_matrix_spectrum_against_numpy(fm):
    dense = fm.AB
    U, S, V = fm.svd()
    assert U.shape == (2, 3, 7, 4) and S.shape == (2, 3, 4) and V.shape == (2, 3, 7, 4)
    np.testing.assert_allclose((U * S[..., None, :]) @ V.swapaxes(-1, -2), dense, atol=1e-10)
    np.testing.assert_allclose(S, np.linalg.svd(dense, compute_uv=False)[..., :4], atol=1e-10)
    np.testing.assert_allclose(U.swapaxes(-1, -2) @ U, np.broadcast_to(np.eye(4), (2, 3, 4, 4)), atol=1e-10)
    assert fm.U is U and fm.S is S and fm.V is V  # computed once
    with pytest.warns(DeprecationWarning, match="returns V"):
        assert fm.Vh is V
    np.testing.assert_allclose(fm.norm(), np.linalg.norm(dense, axis=(-2, -1)), rtol=1e-10)
    np.testing.assert_allclose(fm.BA, fm.B @ fm.A)
    # AB's eigenvalues: BA's (4 of them) plus zeros
    ev = np.sort_complex(fm.eigenvalues[0, 1])
    dense_ev = np.linalg.eigvals(dense[0, 1])
    nonzero = np.sort_complex(dense_ev[np.argsort(-np.abs(dense_ev))[:4]])
    np.testing.assert_allclose(ev, nonzero, atol=1e-8)
    np.testing.assert_allclose(fm.U @ fm.collapse_l(), dense, atol=1e-10)
    np.testing.assert_allclose(fm.collapse_r() @ fm.V.swapaxes(-1, -2), dense, atol=1e-10)
    np.testing.assert_allclose(fm.make_even().AB, dense, atol=1e-10)
    np.testing.assert_allclose(fm.get_corner(2), dense[:2, :2, :2, :2])
    with pytest.raises(ValueError, match="square"):
        FactoredMatrix(np.ones((3, 2)), np.ones((2, 5))).BA


def test_factored_matrix_indexing_and_shapes(fm):
    dense = fm.AB
    assert fm[1, 2].shape == (7, 7) and fm[1].shape == (3, 7, 7) and fm.ndim == 4
    np.testing.assert_allclose(fm[1, 2].AB, dense[1, 2])
    np.testing.assert_allclose(fm[1, 2, 3].AB, dense[1, 2, 3:4])  # a row, kept as [1, rdim]
    np.testing.assert_allclose(fm[1, 2, 3, 5].AB, dense[1, 2, 3:4, 5:6])
    np.testing.assert_allclose(fm[1, 2, -1].AB, dense[1, 2, -1:])
    assert fm.unsqueeze(0).shape == (1, 2, 3, 7, 7) and fm.T.shape == (2, 3, 7, 7)
    np.testing.assert_allclose((fm @ fm.T).AB, dense @ dense.swapaxes(-1, -2), atol=1e-10)
    broadcast = FactoredMatrix(fm.A[0, 0], fm.B)  # [7, 4] against [2, 3, 4, 7]
    assert broadcast.shape == (2, 3, 7, 7) and broadcast.A.shape == (2, 3, 7, 4)
    with pytest.raises(IndexError, match="too long"):
        fm[0, 0, 0, 0, 0]


# --------------------------------------------------------------------------------- get_act_name
@pytest.mark.parametrize("args, expected", [
    (("mlp_post", 0), "blocks.0.mlp.hook_post"), (("mlp_pre", 3), "blocks.3.mlp.hook_pre"),
    (("scale4ln1",), "blocks.4.ln1.hook_scale"), (("k6",), "blocks.6.attn.hook_k"),
    (("q6",), "blocks.6.attn.hook_q"), (("attn_scores", 2), "blocks.2.attn.hook_attn_scores"),
    (("resid_pre5",), "blocks.5.hook_resid_pre"), (("normalized", 27, "ln2"), "blocks.27.ln2.hook_normalized"),
    (("ln_final.hook_scale",), "ln_final.hook_scale"), (("scale",), "ln_final.hook_scale"),
    (("embed",), "hook_embed"), (("attn", 1), "blocks.1.attn.hook_pattern"),
    (("attn_logits", 1), "blocks.1.attn.hook_attn_scores"), (("key", 1), "blocks.1.attn.hook_k"),
    (("k", 6, "a"), "blocks.6.attn.hook_k"), (("resid_post", 3, "b"), "blocks.3.hook_resid_post"),
    (("pattern", "2"), "blocks.2.attn.hook_pattern"), (("result", 0), "blocks.0.attn.hook_result"),
    (("mlp_out1",), "blocks.1.hook_mlp_out"), (("normalized3ln2",), "blocks.3.ln2.hook_normalized"),
])
def test_get_act_name_short_forms(args, expected):
    assert get_act_name(*args) == expected
    assert utils.get_act_name(*args) == expected and npgpt2.get_act_name(*args) == expected


@pytest.mark.parametrize("args, message", [
    (("scale", 3), "ambiguous.*'ln1'"), (("resid_pre",), "give a layer"), (("mid", 1), "no 'mid'"),
    (("rot_q", 1), "rotary"), (("foo", 1), "unknown activation name 'foo'"),
    (("resid_pre", 3, "a"), "on the block itself"), (("embed", 2), "takes no layer"),
    (("k6", 2), "already gives a layer"), (("pattern", -1), "negative layers"),
])
def test_get_act_name_errors(args, message):
    with pytest.raises(KeyError, match=message):
        get_act_name(*args)


# -------------------------------------------------------------------------------------- cache
def test_cache_negative_layers_and_errors(model):
    _, cache = model.run_with_cache(np.array([[5, 6, 7, 8]]))
    np.testing.assert_array_equal(cache["resid_post", -1], cache["blocks.1.hook_resid_post"])
    np.testing.assert_array_equal(cache["pattern", -2], cache["blocks.0.attn.hook_pattern"])
    np.testing.assert_array_equal(cache["scale", -1, "ln2"], cache["blocks.1.ln2.hook_scale"])
    np.testing.assert_array_equal(cache["resid_pre1"], cache["blocks.1.hook_resid_pre"])
    assert ("resid_post", -1) in cache and ("resid_post", 2) not in cache and "result0" not in cache
    with pytest.raises(KeyError, match="layer 2 is out of range for a model of 2 layers"):
        cache["resid_post", 2]
    with pytest.raises(KeyError, match="layer -3 is out of range"):
        cache["resid_post", -3]
    with pytest.raises(KeyError, match="layer 7 is out of range"):
        cache["blocks.7.hook_resid_post"]
    with pytest.raises(KeyError, match=r"compute_head_results\(\)"):
        cache["result", 0]
    with pytest.raises(KeyError, match="not a hook point.*blocks.0.hook_resid_pre"):
        cache["blocks.0.hook_resid_pr"]
    cache.compute_head_results()
    assert cache["result", -1].shape == (1, 4, H, D)


def test_remove_batch_dim_and_to(model):
    tokens = np.array([[5, 6, 7, 8]])
    _, cache = model.run_with_cache(tokens)
    _, single = model.run_with_cache(tokens, remove_batch_dim=True)
    assert not single.has_batch_dim and single["pattern", 0].shape == (H, 4, 4)
    for name in cache:
        np.testing.assert_array_equal(single[name], cache[name][0])
    assert cache.remove_batch_dim() is cache and cache["resid_pre", 1].shape == (4, D)
    with pytest.raises(ValueError, match="already been removed"):
        cache.remove_batch_dim()
    _, two = model.run_with_cache(np.array([[5, 6], [7, 8]]))
    with pytest.raises(ValueError, match="batch of 2"):
        two.remove_batch_dim()
    assert two.to("cpu") is two
    with pytest.raises(ValueError, match="'cuda'.*only device is 'cpu'"):
        two.to("cuda")


# -------------------------------------------------------------------------------- tokens
def test_to_str_tokens_of_texts_and_to_string_of_an_id(model):
    assert model.to_str_tokens(["a b", "c"]) == [["a", " b"], ["c"]]
    assert model.to_str_tokens(["a b"]) == [["a", " b"]]
    assert model.to_string(256) == model.tokenizer.decode([256]) == model.to_string([256])
    assert model.to_string(np.int64(262)) == " the"
    assert model.to_str_tokens(262) == [" the"]


# -------------------------------------------------------------------------------------- utils
def test_utils_small_functions():
    x = np.arange(60).reshape(3, 4, 5)
    np.testing.assert_array_equal(utils.get_corner(x, 2), x[:2, :2, :2])
    assert utils.to_numpy(x) is x
    np.testing.assert_array_equal(utils.to_numpy([[1, 2], [3, 4]]), np.array([[1, 2], [3, 4]]))
    assert utils.to_numpy(3.5).shape == () and utils.get_device() == "cpu"
    with pytest.raises(ValueError, match="to_numpy takes"):
        utils.to_numpy(object())


def test_lm_cross_entropy_loss_brute_force(model64):
    tokens = np.random.default_rng(4).integers(0, TINY.d_vocab, (2, 6))
    logits = model64(tokens)
    mask = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    by_hand = np.zeros((2, 5))
    for b in range(2):
        for p in range(5):
            row = logits[b, p]
            by_hand[b, p] = np.log(np.exp(row - row.max()).sum()) + row.max() - row[tokens[b, p + 1]]
    np.testing.assert_allclose(utils.lm_cross_entropy_loss(logits, tokens, per_token=True), by_hand, rtol=1e-12)
    assert utils.lm_cross_entropy_loss(logits, tokens) == pytest.approx(by_hand.mean(), rel=1e-12)
    counted = np.array([[1] * 5, [1, 1, 1, 0, 0]], bool)  # both the position and the next are real
    assert utils.lm_cross_entropy_loss(logits, tokens, mask) == pytest.approx(by_hand[counted].mean(), rel=1e-12)
    per = utils.lm_cross_entropy_loss(logits, tokens, mask, per_token=True)
    np.testing.assert_allclose(per, np.where(counted, by_hand, 0), rtol=1e-12)
    assert model64.loss_fn(logits, tokens) == pytest.approx(model64.loss(tokens), rel=1e-12)


def test_test_prompt_printout(model64):
    out = io.StringIO()
    with redirect_stdout(out):
        utils.test_prompt("The cat sat on the", "mat", model64, top_k=3)
    text = out.getvalue()
    prompt = model64.to_tokens("The cat sat on the")[0].tolist()
    answer = model64.tokenizer.encode(" mat")
    assert f"Tokenized prompt: {model64.to_str_tokens('The cat sat on the')!r}" in text
    logits = model64(np.array([prompt + answer]))[0]  # [pos, d_vocab]
    ranks = []
    for i, t in enumerate(answer):
        row = logits[len(prompt) - 1 + i]
        probs = np.exp(row - row.max()) / np.exp(row - row.max()).sum()
        ranks.append(int((probs > probs[t]).sum()))
        top = np.argsort(-row)[:3]
        for k, tk in enumerate(top):
            assert (f"Top {k}th token. Logit: {row[tk]:5.2f} Prob: {probs[tk]:6.2%} "
                    f"Token: |{model64.tokenizer.token_str(tk)}|") in text
        assert f"Rank: {ranks[-1]: <8} Logit: {row[t]:5.2f} Prob: {probs[t]:6.2%}" in text
    assert text.strip().endswith(f"Ranks of the answer tokens: "
                                 f"{[(model64.tokenizer.token_str(t), r) for t, r in zip(answer, ranks)]}")
    out = io.StringIO()
    with redirect_stdout(out):
        utils.test_prompt("The cat sat on the", ["mat", "dog"], model64, print_details=False)
    assert out.getvalue().startswith("Ranks of the answer tokens: [[(' mat', ")


# ----------------------------------------------------------------------------------- accessors
def test_module_style_accessors(model):
    for l in range(L):
        blk = model.blocks[l]
        for name in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O"):
            np.testing.assert_array_equal(getattr(blk.attn, name), getattr(model, name)[l])
        for name in ("W_in", "b_in", "W_out", "b_out"):
            np.testing.assert_array_equal(getattr(blk.mlp, name), getattr(model, name)[l])
        np.testing.assert_array_equal(blk.ln2.w, model.weights.blocks[l].ln2_w)
        assert blk.attn.hook_pattern is model.hook_dict[f"blocks.{l}.attn.hook_pattern"]
        assert blk.hook_resid_post.name == f"blocks.{l}.hook_resid_post"
    assert [b.mlp.W_in.shape for b in model.blocks] == [(D, 4 * D)] * L and len(model.blocks) == L
    np.testing.assert_array_equal(model.blocks[-1].attn.W_Q, model.W_Q[L - 1])
    assert model.embed.W_E is model.W_E and model.unembed.W_U is model.W_U and model.pos_embed.W_pos is model.W_pos
    np.testing.assert_array_equal(model.ln_final.b, model.weights.ln_final_b)
    assert set(model.hook_dict) == set(model.hook_names())
    np.testing.assert_allclose(model.OV[1, 2].AB, model.W_V[1, 2] @ model.W_O[1, 2], rtol=1e-6)
    np.testing.assert_allclose(model.QK[0, 3].AB, model.W_Q[0, 3] @ model.W_K[0, 3].T, rtol=1e-6)
    np.testing.assert_allclose(model.blocks[0].attn.OV.AB, model.OV[0].AB)
    resid = np.random.default_rng(2).normal(size=(1, 3, D)).astype(np.float32)
    _, cache = model.run_with_cache(np.array([[1, 2, 3]]))
    np.testing.assert_allclose(model.unembed(cache["resid_post", -1]), model(np.array([[1, 2, 3]])), atol=1e-5)
    assert model.unembed(resid).shape == (1, 3, TINY.d_vocab)
    tokens = np.array([[1, 2, 3], [4, 5, 6]])
    _, cache = model.run_with_cache(tokens)
    np.testing.assert_array_equal(model.embed(tokens), cache["hook_embed"])
    np.testing.assert_array_equal(model.pos_embed(tokens), cache["hook_pos_embed"])
    np.testing.assert_array_equal(model.pos_embed(tokens, past_kv_pos_offset=5)[1], model.W_pos[5:8])


@pytest.mark.parametrize("get, error, message", [
    (lambda m: m.blocks[0].attn.W_qkv, AttributeError, r"model.weights.blocks\[l\].W_qkv"),
    (lambda m: m.blocks[0].mlp.W_gate, AttributeError, "not gated"),
    (lambda m: m.blocks[0].attn.W_q, AttributeError, "did you mean W_Q"),
    (lambda m: m.blocks[0].ln1.weight, AttributeError, "it has w, b"),
    (lambda m: m.blocks[2], IndexError, r"0..1"),
    (lambda m: m.ln_final(np.zeros(3)), TypeError, "not callable"),
    (lambda m: setattr(m.blocks[0].attn, "W_Q", 0), AttributeError, "read-only"),
    (lambda m: m.hook_dict["hook_embed"].remove_hooks(), AttributeError, r"model.reset_hooks\(\) removes them"),
])
def test_accessor_errors_name_the_real_thing(model, get, error, message):
    with pytest.raises(error, match=message):
        get(model)


def test_get_token_position(model):
    tokens = model.to_tokens("a b c b")
    assert model.get_token_position(" b", "a b c b") == 1
    assert model.get_token_position(" b", tokens, mode="last") == 3
    assert model.get_token_position(tokens[0, 2], tokens[0]) == 2
    with pytest.raises(npgpt2.InputError, match="does not occur"):
        model.get_token_position(" dog", tokens)
    with pytest.raises(ValueError, match="mode"):
        model.get_token_position(" b", tokens, mode="middle")


# ---------------------------------------------------------------------------------------- hooks
def test_hook_ctx_persists_and_is_cleared(model):
    tokens = np.array([[1, 2, 3]])

    def count(act, hook):
        hook.ctx["calls"] = hook.ctx.get("calls", 0) + 1

    model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_pre", count)])
    model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_pre", count)])
    point = model.hook_dict["blocks.0.hook_resid_pre"]
    assert point.ctx == {"calls": 2}
    model.reset_hooks(clear_contexts=False)
    assert point.ctx == {"calls": 2}
    model.reset_hooks()
    assert point.ctx == {}
    model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_pre", count)], clear_contexts=True)
    assert point.ctx == {}
    with model.hooks([("blocks.0.hook_resid_pre", count)], clear_contexts=True):
        model(tokens)
        model(tokens)
        assert point.ctx == {"calls": 2}
    assert point.ctx == {}


def test_permanent_hooks(model):
    tokens = np.array([[1, 2, 3]])
    seen = []
    model.add_perma_hook("hook_embed", lambda act, hook: seen.append("perma"))
    model.add_hook("hook_embed", lambda act, hook: seen.append("plain"))
    model.add_hook("hook_embed", lambda act, hook: seen.append("plain bwd"), dir="bwd")
    model(tokens)
    assert seen == ["perma", "plain"]
    model.reset_hooks()
    seen.clear()
    model(tokens)
    assert seen == ["perma"]
    model.reset_hooks(including_permanent=True)
    seen.clear()
    model(tokens)
    assert seen == [] and model._hooks == {} and model._bwd_hooks == {}


def test_reset_hooks_direction(model):
    f, b = (lambda a, h: None), (lambda g, h: None)
    model.add_hook("hook_embed", f)
    model.add_hook("hook_embed", b, dir="bwd")
    model.reset_hooks(direction="fwd")
    assert model._hooks == {} and model._bwd_hooks == {"hook_embed": [b]}
    model.reset_hooks(direction="bwd")
    assert model._bwd_hooks == {}
    with pytest.raises(npgpt2.HookError, match="direction"):
        model.reset_hooks(direction="up")


def test_run_with_hooks_and_hooks_remove_only_their_own(model):
    """TransformerLens 4's rule: the hooks a call or block added go; add_hook's stay."""
    tokens = np.array([[1, 2, 3]])
    seen = []
    before = lambda act, hook: seen.append("before")  # noqa: E731
    during = lambda act, hook: seen.append("during")  # noqa: E731

    def adds_one(act, hook):
        if not seen.count("adder"):
            model.add_hook("hook_pos_embed", during)
        seen.append("adder")

    model.add_hook("hook_embed", before)
    try:
        model.run_with_hooks(tokens, fwd_hooks=[("hook_embed", adds_one)])
        seen.clear()
        model(tokens)
        assert seen == ["before", "during"]  # the call's own hook is gone; the others stay
        seen.clear()
        with model.hooks([("hook_embed", lambda a, h: seen.append("block"))]):
            model.add_hook("blocks.0.hook_resid_pre", lambda a, h: seen.append("added inside"))
            model(tokens)
        assert seen == ["before", "block", "during", "added inside"]
        seen.clear()
        model(tokens)
        assert seen == ["before", "during", "added inside"]
    finally:
        model.reset_hooks(including_permanent=True)


# ------------------------------------------------------------------------------ cfg and its switches
@pytest.mark.parametrize("name,hint", [("defualt_prepend_bos", "did you mean default_prepend_bos"),
                                       ("use_atn_result", "did you mean use_attn_result"),
                                       ("completely_unknown", "the settable ones are default_prepend_bos")])
def test_unknown_cfg_names_raise_with_the_closest_name(tiny_dir, name, hint):
    model = npgpt2.from_pretrained(tiny_dir)
    with pytest.raises(AttributeError, match=hint):
        setattr(model.cfg, name, True)
    assert not hasattr(model.cfg, name)


def test_cfg_device_is_cpu_and_only_cpu(tiny_dir):
    model = npgpt2.from_pretrained(tiny_dir)
    assert model.cfg.device == "cpu"
    model.cfg.device = "cpu"
    with pytest.raises(ValueError, match="device='cuda:0'.*only device is 'cpu'"):
        model.cfg.device = "cuda:0"


@pytest.mark.parametrize("switch", ["cfg", "set_use_attn_result"])
def test_use_attn_result_puts_each_heads_output_in_a_default_cache(tiny_dir, tokens, switch):
    model = npgpt2.from_pretrained(tiny_dir, dtype="float64")
    _, before = model.run_with_cache(tokens)
    assert "blocks.0.attn.hook_result" not in before.cache_dict
    if switch == "cfg":
        model.cfg.use_attn_result = True
    else:
        model.set_use_attn_result(True)
    _, cache = model.run_with_cache(tokens)
    for l in range(L):
        # each head's z through its own slice of the output projection, summed by hand
        W = model.weights.blocks[l].W_O.reshape(H, Dh, D)
        by_hand = np.einsum("bphd,hdm->bphm", cache["z", l], W)
        np.testing.assert_allclose(cache.cache_dict[f"blocks.{l}.attn.hook_result"], by_hand, atol=1e-12)
    with pytest.raises(ValueError, match="use_attn_result='yes': expected True or False"):
        model.cfg.use_attn_result = "yes"


def test_enable_compatibility_mode_processes_as_from_pretrained_does(tiny_dir, tokens):
    model = npgpt2.from_pretrained(tiny_dir)
    assert model.enable_compatibility_mode(disable_warnings=True) is model
    loaded = npgpt2.from_pretrained(tiny_dir, fold_ln=True, center_writing_weights=True,
                                    center_unembed=True, fold_value_biases=True)
    assert model.processing == loaded.processing
    for (name, ours), (_, theirs) in zip(model.weights.arrays(), loaded.weights.arrays()):
        np.testing.assert_array_equal(ours, theirs, err_msg=name)
    untouched = npgpt2.from_pretrained(tiny_dir)
    untouched.enable_compatibility_mode(no_processing=True)
    assert not any(untouched.processing.values())


def test_hook_point_add_hook_as_in_transformer_lens(tiny_dir, tokens):
    """The demos' ``model.blocks[l].attn.hook_pattern.add_hook(fn)``: a model-wide hook, as
    model.add_hook gives, until reset_hooks()."""
    model = npgpt2.from_pretrained(tiny_dir)
    seen = []
    model.blocks[1].attn.hook_pattern.add_hook(lambda pattern, hook: seen.append((hook.name, pattern.shape)))
    model.hook_dict["blocks.0.hook_resid_post"].add_hook(lambda resid, hook: resid * 0, dir="fwd")
    zeroed_logits = model(tokens)
    assert seen == [("blocks.1.attn.hook_pattern", (2, H, 12, 12))]
    model.reset_hooks()
    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_post", lambda resid, hook: resid * 0)]):
        np.testing.assert_array_equal(model(tokens), zeroed_logits)
    model(tokens)
    assert len(seen) == 1  # the pattern hook went with reset_hooks
    model.hook_dict["hook_embed"].add_perma_hook(lambda e, hook: seen.append("perma"))
    model.reset_hooks()
    model(tokens)
    assert seen[-1] == "perma"
    model.reset_hooks(including_permanent=True)


def test_torch_style_calls_a_port_makes(model, tokens):
    """model.to("cpu"), model.eval(), model.train() are no-ops returning the model (no device, no
    dropout); another device names what to do; the cfg fields a port reads are GPT-2's."""
    assert model.to("cpu") is model and model.eval() is model and model.train() is model
    with pytest.raises(ValueError, match=r"model.to\('cuda'\): npgpt2 runs on the CPU"):
        model.to("cuda")
    cfg = model.cfg
    assert (cfg.act_fn, cfg.d_vocab_out, cfg.positional_embedding_type, cfg.original_architecture) == \
        ("gelu_new", TINY.vocab_size, "standard", "GPT2LMHeadModel")


def test_state_dict_round_trip_and_load_checks(tiny_dir):
    import npgpt2

    model = npgpt2.from_pretrained(tiny_dir, dtype="float64")
    tokens = np.random.default_rng(2).integers(0, model.cfg.d_vocab, (2, 7))
    before = model(tokens)
    state = model.state_dict()
    assert state["blocks.1.attn.W_Q"].shape == (model.cfg.n_heads, model.cfg.d_model, model.cfg.d_head)
    state["blocks.1.attn.W_Q"][2] *= 3.0  # a copy: nothing changes until it is loaded
    state["blocks.0.ln2.w"] = state["blocks.0.ln2.w"] * 0.5
    np.testing.assert_array_equal(model(tokens), before)
    model.load_state_dict(state)
    # the same edits made another way: set_weight, and the layer norm's gain halved by hand
    other = npgpt2.from_pretrained(tiny_dir, dtype="float64")
    other.set_weight("W_Q", 1, other.W_Q[1, 2] * 3.0, head=2)
    halved = dataclasses.replace(other.weights.blocks[0], ln2_w=other.weights.blocks[0].ln2_w * 0.5)
    other.weights = dataclasses.replace(other.weights, blocks=[halved, *other.weights.blocks[1:]])
    np.testing.assert_allclose(model(tokens), other(tokens), rtol=1e-12, atol=1e-12)
    assert not np.allclose(model(tokens), before)

    with pytest.raises(WeightEditError, match="TransformerBridge's module names"):
        model.load_state_dict({"embed.weight": state["embed.W_E"]})
    with pytest.raises(WeightEditError, match="parameters missing: .*strict=False"):
        model.load_state_dict({"embed.W_E": state["embed.W_E"]})
    model.load_state_dict({"unembed.b_U": np.zeros(model.cfg.d_vocab)}, strict=False)
    folded = npgpt2.from_pretrained(tiny_dir, dtype="float64", fold_ln=True)
    assert (folded.state_dict()["blocks.0.ln1.w"] == 1).all()
    folded.load_state_dict(folded.state_dict())  # its own (gain 1, bias 0) loads
    with pytest.raises(WeightEditError, match="folded"):
        folded.load_state_dict(state)


def test_loss_per_token_is_the_mean_loss_spread_out(model):
    texts = ["The cat sat on the mat", "Hi there"]
    per_token = model(texts, return_type="loss", loss_per_token=True)
    assert per_token.shape == (2, model.to_tokens(texts).shape[1] - 1)
    assert np.isnan(per_token[1, -1]) and not np.isnan(per_token[0]).any()  # padding: NaN
    assert np.nanmean(per_token) == pytest.approx(model(texts, return_type="loss"), rel=1e-6)
    np.testing.assert_allclose(per_token, model.loss(texts, per_token=True), rtol=1e-6)


def test_torch_and_transformer_lens_names_say_what_to_use(model):
    assert model.cpu() is model and model.to(device="cpu") is model
    with pytest.raises(ValueError, match="dtype='float64'"):
        model.to(dtype="float64")
    for name, words in (("cuda", "CPU"), ("parameters", "state_dict"), ("zero_grad", "value_and_grad"),
                        ("mod_dict", "hook_dict")):
        with pytest.raises(AttributeError, match=words):
            getattr(model, name)
    with pytest.raises(AttributeError, match="no attribute 'W_QQ'"):
        model.W_QQ
    with pytest.raises(AttributeError, match="model.dtype"):
        model.cfg.dtype
    with pytest.raises(AttributeError, match="did you mean d_model"):
        model.cfg.d_modle
    assert model.cfg.normalization_type == "LN" and model.cfg.use_hook_mlp_in is False
    model.set_use_hook_mlp_in(False)
    with pytest.raises(npgpt2.ConfigError, match="ln2.hook_normalized"):
        model.set_use_hook_mlp_in(True)
    with pytest.raises(npgpt2.ConfigError, match="hook_q"):
        model.cfg.use_split_qkv_input = True
