import numpy as np
import pytest

from npgpt2 import HookError, InputError
from npgpt2.testing import assert_close
from conftest import TINY
import by_hand

B, P = 2, 12
D, H, DH, M, V = TINY.d_model, TINY.n_head, TINY.d_head, TINY.d_mlp, TINY.d_vocab
SHAPES = {
    "hook_embed": (B, P, D), "hook_pos_embed": (B, P, D),
    "hook_resid_pre": (B, P, D), "ln1.hook_scale": (B, P, 1), "ln1.hook_normalized": (B, P, D),
    "attn.hook_q": (B, P, H, DH), "attn.hook_k": (B, P, H, DH), "attn.hook_v": (B, P, H, DH),
    "attn.hook_attn_scores": (B, H, P, P), "attn.hook_pattern": (B, H, P, P),
    "attn.hook_z": (B, P, H, DH), "attn.hook_result": (B, P, H, D), "hook_attn_out": (B, P, D),
    "hook_resid_mid": (B, P, D), "ln2.hook_scale": (B, P, 1), "ln2.hook_normalized": (B, P, D),
    "mlp.hook_pre": (B, P, M), "mlp.hook_post": (B, P, M), "hook_mlp_out": (B, P, D),
    "hook_resid_post": (B, P, D), "ln_final.hook_scale": (B, P, 1), "ln_final.hook_normalized": (B, P, D),
}


def short(name):
    return name.split(".", 2)[2] if name.startswith("blocks.") else name


def test_every_hook_point_with_transformerlens_names_and_shapes(model, tokens):
    names = model.hook_names()
    assert names[:3] == ["hook_embed", "hook_pos_embed", "blocks.0.hook_resid_pre"]
    assert names[-1] == "ln_final.hook_normalized"
    assert len(names) == 2 + 18 * TINY.n_layer + 2
    logits, cache = model.run_with_cache(tokens, names_filter=lambda n: True)
    assert logits.shape == (B, P, V)
    assert set(cache.keys()) == set(names)
    for name in names:
        assert cache[name].shape == SHAPES[short(name)], name
        assert isinstance(cache[name], np.ndarray) and cache[name].dtype == np.float32


def test_default_cache_leaves_out_hook_result(model, tokens):
    _, cache = model.run_with_cache(tokens)
    assert "blocks.0.attn.hook_result" not in cache
    assert len(cache) == len(model.hook_names()) - TINY.n_layer


def test_names_filter_forms(model, tokens):
    _, c = model.run_with_cache(tokens, names_filter="blocks.1.attn.hook_pattern")
    assert list(c.keys()) == ["blocks.1.attn.hook_pattern"]
    _, c = model.run_with_cache(tokens, names_filter=["hook_embed", "blocks.0.mlp.hook_post"])
    assert set(c.keys()) == {"hook_embed", "blocks.0.mlp.hook_post"}
    _, c = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_z"))
    assert len(c) == TINY.n_layer
    assert c["z", 1] is c["blocks.1.attn.hook_z"]


def test_unknown_hook_name_suggests_the_closest(model, tokens):
    with pytest.raises(HookError, match="blocks.0.attn.hook_pattern"):
        model.run_with_cache(tokens, names_filter="blocks.0.attn.hook_patern")
    with pytest.raises(HookError, match="unknown hook point 'blocks.9.hook_resid_pre'"):
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.9.hook_resid_pre", lambda a, h: None)])


def test_cache_key_errors_are_helpful(model, tokens):
    _, c = model.run_with_cache(tokens, names_filter="hook_embed")
    with pytest.raises(KeyError, match="names_filter"):
        c["pattern", 0]


def test_forward_identities(model, tokens):
    """The cached activations fit together exactly as the architecture says."""
    logits, c = model.run_with_cache(tokens, names_filter=lambda n: True)
    w = model.weights
    np.testing.assert_allclose(c["hook_embed"], model.W_E[tokens])
    np.testing.assert_allclose(c["blocks.0.hook_resid_pre"], c["hook_embed"] + c["hook_pos_embed"])
    for l in range(TINY.n_layer):
        blk = w.blocks[l]
        pre = c["resid_pre", l]
        np.testing.assert_allclose(c["resid_mid", l], pre + c["attn_out", l], atol=1e-6)
        np.testing.assert_allclose(c["resid_post", l], c["resid_mid", l] + c["mlp_out", l], atol=1e-6)
        # layer norm: normalized is centred with unit RMS; scale is the RMS of the centred input
        for ln, stream in (("ln1", pre), ("ln2", c["resid_mid", l])):
            centred = stream - stream.mean(-1, keepdims=True)
            np.testing.assert_allclose(c[f"blocks.{l}.{ln}.hook_scale"] ** 2,
                                       (centred ** 2).mean(-1, keepdims=True) + TINY.eps, rtol=1e-5)
            np.testing.assert_allclose(c[f"blocks.{l}.{ln}.hook_normalized"],
                                       by_hand.layer_norm(stream, 1, 0, TINY.eps), atol=1e-5)
        x = c[f"blocks.{l}.ln1.hook_normalized"] * blk.ln1_w + blk.ln1_b
        np.testing.assert_allclose(np.concatenate([c["q", l], c["k", l], c["v", l]], 2).reshape(B, P, 3 * D),
                                   x @ blk.W_qkv + blk.b_qkv, atol=1e-5)
        # scores = q.k / sqrt(d_head) with the future masked; pattern = their softmax over keys
        q = c["q", l].transpose(0, 2, 1, 3) / np.sqrt(DH)  # [batch, head, query, d_head]
        scores = by_hand.causal_scores(q, c["k", l].transpose(0, 2, 1, 3))
        future = np.triu(np.ones((P, P), bool), 1)
        assert np.all(np.isneginf(c["attn_scores", l][..., future])) and np.isfinite(c["attn_scores", l][..., ~future]).all()
        np.testing.assert_allclose(c["attn_scores", l], scores, atol=1e-4)
        pattern = c["pattern", l]
        assert np.all(pattern[..., future] == 0)
        np.testing.assert_allclose(pattern, by_hand.softmax(scores), atol=1e-6)
        np.testing.assert_allclose(c["z", l], np.einsum("bhqk,bkhd->bqhd", pattern, c["v", l]), atol=1e-5)
        # per-head results sum (with b_O) to the attention output
        np.testing.assert_allclose(c["result", l].sum(2) + blk.b_O, c["attn_out", l], atol=1e-5)
        x = c[f"blocks.{l}.ln2.hook_normalized"] * blk.ln2_w + blk.ln2_b
        np.testing.assert_allclose(c["pre", l], x @ blk.W_in + blk.b_in, atol=1e-5)
        np.testing.assert_allclose(c["post", l], by_hand.gelu_new(c["pre", l]), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(c["mlp_out", l], c["post", l] @ blk.W_out + blk.b_out, atol=1e-5)
    np.testing.assert_allclose(c["ln_final.hook_normalized"],
                               by_hand.layer_norm(c["resid_post", TINY.n_layer - 1], 1, 0, TINY.eps), atol=1e-5)
    final = c["ln_final.hook_normalized"] * w.ln_final_w + w.ln_final_b
    np.testing.assert_allclose(logits, final @ model.W_E.T, atol=1e-4)


def test_mlp_post_is_gpt2_gelu_of_pre(model64, tokens):
    # float64, so the comparison is tight enough to tell GPT-2's GELU from any near miss
    _, c = model64.run_with_cache(tokens, names_filter=lambda n: "mlp.hook_p" in n)
    for l in range(TINY.n_layer):
        pre = c["pre", l]
        assert np.abs(pre).max() > 2  # the range where the cubic term matters
        np.testing.assert_allclose(c["post", l], by_hand.gelu_new(pre), rtol=1e-12, atol=1e-14)


def test_huge_attention_scores_and_logits_stay_finite(model, tokens):
    """Scores and logits in the hundreds and thousands, where exp overflows in float32: the pattern
    and the loss still equal the softmax and cross-entropy worked out by hand."""
    hooks = [("blocks.0.attn.hook_attn_scores", lambda a, h: a * 1000),
             ("ln_final.hook_normalized", lambda a, h: a * 100)]
    with model.hooks(hooks):
        (logits, loss), c = model.run_with_cache(tokens, return_type="both",
                                                 names_filter=["blocks.0.attn.hook_attn_scores",
                                                               "blocks.0.attn.hook_pattern"])
    scores = c["attn_scores", 0]
    assert np.abs(scores[np.isfinite(scores)]).max() > 1000 and np.abs(logits).max() > 500
    np.testing.assert_allclose(c["pattern", 0], by_hand.softmax(scores), atol=1e-6)
    logp = by_hand.log_softmax(logits)
    nll = -np.take_along_axis(logp[:, :-1], tokens[:, 1:, None], -1)
    assert np.isfinite(loss) and loss == pytest.approx(nll.mean(), rel=1e-5)


def test_transformerlens_weight_views(model, tokens):
    _, c = model.run_with_cache(tokens, names_filter=lambda n: "blocks.1" in n)
    x = c["blocks.1.ln1.hook_normalized"] * model.weights.blocks[1].ln1_w + model.weights.blocks[1].ln1_b
    for W, b, name in ((model.W_Q, model.b_Q, "q"), (model.W_K, model.b_K, "k"), (model.W_V, model.b_V, "v")):
        assert W.shape == (TINY.n_layer, H, D, DH) and b.shape == (TINY.n_layer, H, DH)
        np.testing.assert_allclose(np.einsum("bpd,hde->bphe", x, W[1]) + b[1], c[name, 1], atol=1e-5)
    assert model.W_O.shape == (TINY.n_layer, H, DH, D)
    np.testing.assert_allclose(np.einsum("bphe,hed->bphd", c["z", 1], model.W_O[1]), c["result", 1], atol=1e-5)
    assert model.W_in.shape == (TINY.n_layer, D, M) and model.W_out.shape == (TINY.n_layer, M, D)
    assert model.W_U.shape == (D, V) and model.b_U.shape == (V,) and not model.b_U.any()


def test_blockwise_attention_equals_the_full_computation(model, model64, tokens):
    # Without a listener on scores/pattern the model takes the blockwise path; with one, the full one.
    long_tokens = np.random.default_rng(5).integers(0, V, (2, 60))
    for m, tol in ((model, 1e-5), (model64, 1e-12)):
        plain = m(long_tokens)
        full, _ = m.run_with_cache(long_tokens, names_filter="blocks.0.attn.hook_pattern")
        assert_close(plain, full, rel=tol)
    # and the blockwise path (nothing asks for scores or pattern) against attention written out by
    # hand from the cached q, k, v
    _, c = model64.run_with_cache(long_tokens, names_filter=[f"blocks.1.attn.hook_{x}" for x in "qkvz"])
    q, k, v = (c[name, 1].transpose(0, 2, 1, 3) for name in "qkv")  # [batch, head, pos, d_head]
    z = by_hand.softmax(by_hand.causal_scores(q / np.sqrt(DH), k)) @ v
    np.testing.assert_allclose(c["z", 1], z.transpose(0, 2, 1, 3), atol=1e-12)


def test_hook_replaces_activation(model, tokens):
    def zero(act, hook):
        assert hook.name == "blocks.1.hook_mlp_out" and hook.layer() == 1
        return act * 0

    patched = model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_mlp_out", zero)])
    _, c = model.run_with_cache(tokens)
    # with layer 1's MLP zeroed, the final residual is resid_mid of layer 1
    expected = by_hand.layer_norm(c["resid_mid", 1], model.weights.ln_final_w, model.weights.ln_final_b, TINY.eps) @ model.W_U
    np.testing.assert_allclose(patched, expected, atol=1e-4)
    assert model._hooks == {}  # removed afterwards
    assert not np.allclose(model(tokens), patched)


def test_observing_hook_and_predicate_names(model, tokens):
    seen = []
    out = model.run_with_hooks(tokens, fwd_hooks=[(lambda n: n.endswith("hook_pattern"),
                                                   lambda a, h: seen.append((h.name, a.shape)))])
    assert [s[0] for s in seen] == [f"blocks.{l}.attn.hook_pattern" for l in range(TINY.n_layer)]
    assert_close(model(tokens), out, rel=1e-5)  # (observing: the same numbers, on the textbook path)


def test_hook_on_pattern_changes_output(model, tokens):
    def uniform(pattern, hook):
        causal = np.tril(np.ones(pattern.shape[-2:]))
        return np.broadcast_to(causal / causal.sum(-1, keepdims=True), pattern.shape)

    _, c = model.run_with_cache(tokens)
    with model.hooks([("blocks.0.attn.hook_pattern", uniform)]):
        _, hooked = model.run_with_cache(tokens)
    v = hooked["v", 0]
    expected_z = np.cumsum(v, axis=1) / np.arange(1, P + 1)[None, :, None, None]
    np.testing.assert_allclose(hooked["z", 0], expected_z, atol=1e-5)
    assert not np.allclose(hooked["z", 0], c["z", 0])


def test_hook_with_wrong_shape_names_point_and_shapes(model, tokens):
    with pytest.raises(HookError, match=r"blocks.0.hook_resid_pre returned shape \(2, 12\); expected \(2, 12, 64\)"):
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_pre", lambda a, h: a[..., 0])])


def test_hooks_removed_when_forward_raises(model, tokens):
    def boom(act, hook):
        raise RuntimeError("inside a hook")

    with pytest.raises(RuntimeError, match="inside a hook"):
        model.run_with_hooks(tokens, fwd_hooks=[("hook_embed", boom)])
    assert model._hooks == {}
    with pytest.raises(RuntimeError):
        with model.hooks([("hook_embed", boom)]):
            model(tokens)
    assert model._hooks == {}
    model(tokens)  # runs clean


def test_add_hook_and_reset(model, tokens):
    calls = []
    model.add_hook("hook_pos_embed", lambda a, h: calls.append(1))
    model(tokens)
    model.reset_hooks()
    model(tokens)
    assert calls == [1]


def test_start_and_stop_at_layer(model, tokens):
    logits, c = model.run_with_cache(tokens)
    resid = model(tokens, stop_at_layer=1)
    assert_close(resid, c["resid_post", 0], rel=1e-5)
    assert_close(model(c["resid_pre", 1], start_at_layer=1), logits, rel=1e-5)
    loss = model(c["resid_pre", 1], start_at_layer=1, tokens=tokens, return_type="loss")
    assert loss == pytest.approx(model.loss(tokens), abs=1e-5)
    with pytest.raises(InputError, match="start_at_layer=5 is out of range"):
        model(tokens, start_at_layer=5)
    with pytest.raises(InputError, match=r"residual stream \[batch, pos, 64\]"):
        model(tokens, start_at_layer=1)


def test_loss_equals_hand_computed_cross_entropy(model64, tokens):
    logits = model64(tokens)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    nll = -np.array([[logp[b, p, tokens[b, p + 1]] for p in range(P - 1)] for b in range(B)])
    np.testing.assert_allclose(model64.loss(tokens, per_token=True), nll, atol=1e-10)
    assert model64.loss(tokens) == pytest.approx(nll.mean(), abs=1e-10)
    logits2, loss2 = model64(tokens, return_type="both")
    assert loss2 == pytest.approx(nll.mean(), abs=1e-10)


def test_padding_is_ignored_by_loss_and_leaves_real_positions_alone(model):
    texts = ["The dog", "Hello, my dog is cute"]
    batch = model(texts)
    for i, t in enumerate(texts):
        alone = model(t)
        n = alone.shape[1]
        np.testing.assert_allclose(batch[i, :n], alone[0], atol=1e-5)
    per_tok = model.loss(texts, per_token=True)
    assert np.isnan(per_tok[0, 1:]).all() and not np.isnan(per_tok[0, 0])
    expected = np.concatenate([model.loss(t, per_token=True)[0] for t in texts]).mean()
    assert model.loss(texts) == pytest.approx(expected, abs=1e-5)


def test_text_input_equals_token_input(model):
    np.testing.assert_array_equal(model("Hello, my dog is cute"), model(np.array([[15496, 11, 616, 3290, 318, 13779]])))
    np.testing.assert_array_equal(model([15496, 11, 616]), model(np.array([[15496, 11, 616]])))


@pytest.mark.parametrize("bad,match", [
    (np.zeros((1, 0), np.int64), "empty input"),
    (np.array([[1, 50300]]), "token id 50300 is out of range for vocab_size 50257"),
    (np.array([[-1, 2]]), "token id -1 is out of range"),
    (np.array([[1.0, 2.0]]), "must be integers; got an array of dtype float64"),
    (np.zeros((1, 2, 3), np.int64), r"shape \[batch, pos\] or \[pos\]; got shape \(1, 2, 3\)"),
    (np.zeros((1, 65), np.int64), r"65 tokens is longer than the context of n_ctx=64; truncate it"),
    ("", "no tokens"),
])
def test_bad_input_is_named(model, bad, match):
    with pytest.raises(InputError, match=match):
        model(bad)


def test_bad_return_type(model, tokens):
    with pytest.raises(ValueError, match="return_type='probs'"):
        model(tokens, return_type="probs")


@pytest.fixture(scope="module")
def model_many_rows():
    # 600 rows (batch 3 x 200 positions): the fast path's size, four row tiles, two blocks of queries
    from npgpt2.testing import synthetic_model

    return synthetic_model(n_layer=3, n_head=4, n_embd=128, n_ctx=256, seed=5)


@pytest.mark.parametrize("which", ["tokens", "padded texts"])
def test_plain_call_cache_and_hooks_give_the_same_bits(model_many_rows, which):
    # A metric built from one call and evaluated on another must see the same numbers: a plain call
    # (fast.py when large enough), run_with_cache and run_with_hooks with a hook that changes
    # nothing must agree to the last bit, in float32.
    m = model_many_rows
    if which == "tokens":
        inputs = np.random.default_rng(0).integers(0, V, (3, 200)), {}
    else:
        long_text = " ".join(["the quick brown fox jumps over the lazy dog"] * 20)
        inputs = [long_text, "a short one", long_text[:300]], {"padding_side": "left"}
    x, kwargs = inputs
    plain = m(x, **kwargs)
    assert plain.dtype == np.float32 and np.abs(plain).max() > 1
    cached, cache = m.run_with_cache(x, **kwargs)
    hooked = m.run_with_hooks(x, fwd_hooks=[("blocks.1.hook_resid_pre", lambda a, hook: None)], **kwargs)
    np.testing.assert_array_equal(cached, plain)
    np.testing.assert_array_equal(hooked, plain)
    # and the cache holds what the plain call computed on the way
    np.testing.assert_array_equal(cache["blocks.2.hook_resid_post"], m(x, stop_at_layer=3, **kwargs))
