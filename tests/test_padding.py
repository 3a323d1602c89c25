"""Padding and BOS: a prompt in a padded batch gives exactly what it gives alone.

Left padding (what batched generation needs) hides the padding keys from attention and counts
positions from each row's first real token; right padding needs neither (causality hides the
padding from every real token). Every path is compared with the same prompts run one at a time:
the forward (blockwise and eager), run_with_cache, run_with_hooks, the key/value cache, the loss,
the gradients (against the single-prompt gradients and finite differences), and generation.
Tolerances: each position's logits within 4e-6 (float32: about 30 float32 steps) or 1e-13 (float64) of
that position's largest |logit| (logits of magnitude ~1-15): a padded batch and a lone prompt run
their products in blocks of other shapes, which rounds float32 differently.
"""

import numpy as np
import pytest

import npgpt2
from npgpt2.testing import assert_close
from npgpt2 import KeyValueCache, metrics
from npgpt2.inputs import InputError

import by_hand

TEXTS = ["The dog sat on the mat and looked at", "A cat", "Hello there, my friend"]
TOL = {"float32": 4e-6, "float64": 1e-13}  # of each position's largest |logit|


@pytest.fixture(params=["model", "model64"])
def any_model(request):
    return request.getfixturevalue(request.param)


def _eager(m, fn):
    m.attn_implementation = "eager"
    try:
        return fn()
    finally:
        m.attn_implementation = "blockwise"


def _assert_real_positions_equal(m, batch_logits, mask, alone, side):
    tol = TOL[str(m.dtype)]
    assert np.isfinite(batch_logits).all()
    for i, expected in enumerate(alone):
        n = expected.shape[0]
        real = batch_logits[i, -n:] if side == "left" else batch_logits[i, :n]
        assert mask[i].sum() == n
        scale = np.abs(expected).max(axis=-1, keepdims=True)  # [pos, 1]
        np.testing.assert_array_less(np.abs(real - expected), np.broadcast_to(tol * scale, real.shape))
    assert max(np.abs(e).max() for e in alone) > 1  # not a comparison of near-zeros


def test_to_tokens_pads_on_either_side(model):
    left, lmask = model.to_tokens(TEXTS, padding_side="left", return_mask=True)
    right, rmask = model.to_tokens(TEXTS, return_mask=True)
    for i, t in enumerate(TEXTS):
        ids = model.to_tokens(t)[0]
        n = len(ids)
        assert right[i, :n].tolist() == ids.tolist() and rmask[i].tolist() == [1] * n + [0] * (right.shape[1] - n)
        assert left[i, -n:].tolist() == ids.tolist() and lmask[i].tolist() == [0] * (left.shape[1] - n) + [1] * n
    assert (left[lmask == 0] == 50256).all()
    with pytest.raises(InputError, match="padding_side='middle': expected 'right' or 'left'"):
        model.to_tokens(TEXTS, padding_side="middle")


def test_left_padded_batch_equals_each_prompt_alone_on_every_path(any_model):
    m = any_model
    tokens, mask = m.to_tokens(TEXTS, padding_side="left", return_mask=True)
    assert not mask.all()
    alone = [m(t)[0] for t in TEXTS]
    runs = {
        "forward(texts)": m(TEXTS, padding_side="left"),
        "forward(ids, attention_mask)": m(tokens, attention_mask=mask),
        "eager": _eager(m, lambda: m(tokens, attention_mask=mask)),
        "run_with_cache": m.run_with_cache(TEXTS, padding_side="left")[0],
        "run_with_hooks": m.run_with_hooks(tokens, attention_mask=mask,
                                           fwd_hooks=[("blocks.1.attn.hook_pattern", lambda a, h: a)]),
    }
    # the key/value cache: the first 4 positions (padding for the short prompts), then one at a time
    kv = KeyValueCache(m.cfg, len(TEXTS), m.dtype)
    steps = [m(tokens[:, :4], attention_mask=mask[:, :4], past_kv=kv)]
    steps += [m(tokens[:, p:p + 1], attention_mask=mask[:, p:p + 1], past_kv=kv) for p in range(4, tokens.shape[1])]
    runs["key/value cache"] = np.concatenate(steps, axis=1)
    for name, logits in runs.items():
        try:
            _assert_real_positions_equal(m, logits, mask, alone, "left")
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None


def test_left_padded_activations_equal_each_prompt_alone(model64):
    m = model64
    tokens, mask = m.to_tokens(TEXTS, padding_side="left", return_mask=True)
    _, cache = m.run_with_cache(tokens, attention_mask=mask)
    for i, t in enumerate(TEXTS):
        _, alone = m.run_with_cache(t)
        n = int(mask[i].sum())
        for name in ("hook_pos_embed", "blocks.0.attn.hook_q", "blocks.1.attn.hook_z", "blocks.1.hook_resid_post",
                     "ln_final.hook_normalized"):
            np.testing.assert_allclose(cache[name][i, -n:], alone[name][0], atol=1e-12, rtol=0, err_msg=name)
        pattern = cache["blocks.1.attn.hook_pattern"][i]  # [head, query_pos, key_pos]
        np.testing.assert_allclose(pattern[:, -n:, -n:], alone["blocks.1.attn.hook_pattern"][0], atol=1e-12, rtol=0)
        assert (pattern[:, :, :-n] == 0).all()  # no query attends to a padding key
        assert (pattern[:, -n:].sum(-1) == pytest.approx(1))
        assert (cache["blocks.0.attn.hook_attn_scores"][i][:, :, :-n] == -np.inf).all()
    np.testing.assert_array_equal(cache["hook_pos_embed"][1, :-2], np.broadcast_to(m.W_pos[0], (tokens.shape[1] - 2, m.cfg.d_model)))


def test_right_padding_keeps_working(any_model):
    m = any_model
    tokens, mask = m.to_tokens(TEXTS, return_mask=True)
    alone = [m(t)[0] for t in TEXTS]
    _assert_real_positions_equal(m, m(TEXTS), mask, alone, "right")
    _assert_real_positions_equal(m, m.run_with_cache(TEXTS)[0], mask, alone, "right")
    _assert_real_positions_equal(m, _eager(m, lambda: m(tokens, attention_mask=mask)), mask, alone, "right")


def test_loss_skips_padding_on_both_sides(model64):
    m = model64
    nll = []  # each prompt alone: -log p(next token), worked out here from its logits
    for t in TEXTS:
        ids = m.to_tokens(t)[0]
        logp = by_hand.log_softmax(m(t)[0])
        nll.append(-logp[np.arange(len(ids) - 1), ids[1:]])
    expected = np.concatenate(nll).mean()
    for side in ("right", "left"):
        assert m.loss(TEXTS, padding_side=side) == pytest.approx(expected, rel=1e-12)
        assert m(TEXTS, return_type="loss", padding_side=side) == pytest.approx(expected, rel=1e-12)
        per_token = m.loss(TEXTS, per_token=True, padding_side=side)
        assert np.isnan(per_token).sum() == per_token.size - sum(len(x) for x in nll)
        value, _ = m.value_and_grad(TEXTS, padding_side=side)
        assert value == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("impl", ["blockwise", "eager"])
def test_left_padded_gradients_equal_the_single_prompt_gradients(model64, impl):
    """The batch's mean loss is sum_i n_i loss_i / sum_i n_i over the prompts' predictions, so its
    gradient is the same mix of each prompt's gradient computed alone."""
    m = model64
    counts = np.array([len(m.to_tokens(t)[0]) - 1 for t in TEXTS])
    m.attn_implementation = impl
    try:
        _, batch = m.value_and_grad(TEXTS, padding_side="left")
        alone = [m.value_and_grad(t)[1] for t in TEXTS]
    finally:
        m.attn_implementation = "blockwise"
    expected = {k: sum(c * dict(g.arrays())[k] for c, g in zip(counts, alone)) / counts.sum()
                for k, _ in batch.arrays()}
    worst = {k: float(np.abs(a - expected[k]).max()) for k, a in batch.arrays()}
    assert max(worst.values()) < 1e-12, {k: v for k, v in worst.items() if v >= 1e-12}
    assert np.abs(batch.W_pos[:3]).max() > 1e-3  # the positions the short prompt uses got gradient


def test_left_padded_gradients_equal_finite_differences(model64):
    """d metric / d weight against central differences, in float64, at entries that padding moves:
    the position embeddings (rows 0-2 are used by every prompt at different places) and a
    query/key weight."""
    m = npgpt2.GPT2(model64.cfg, model64.weights, model64.tokenizer)  # edits below stay private
    tokens, mask = m.to_tokens(TEXTS, padding_side="left", return_mask=True)
    metric = metrics.logit_diff(" Mary", " John")  # at the last position, a real token of every row
    _, cache = m.run_with_cache(tokens, attention_mask=mask, metric=metric, incl_bwd=True, names_filter="hook_pos_embed")
    _, grads = m.value_and_grad(tokens, metric=metric, attention_mask=mask)
    import dataclasses

    def value_with(edit):
        w = m.weights
        m.weights = edit(w)
        try:
            return float(metric(m(tokens, attention_mask=mask)))
        finally:
            m.weights = w

    eps = 1e-6
    for pos, d in [(0, 3), (1, 10), (2, 40)]:
        def shift(w, h):
            W_pos = np.array(w.W_pos)
            W_pos[pos, d] += h
            return dataclasses.replace(w, W_pos=W_pos)
        numeric = (value_with(lambda w: shift(w, eps)) - value_with(lambda w: shift(w, -eps))) / (2 * eps)
        assert grads.W_pos[pos, d] == pytest.approx(numeric, rel=1e-6, abs=1e-9)
    for row, col in [(5, 7), (20, 64 + 3)]:  # a query and a key weight of block 1
        def shift(w, h):
            blocks = list(w.blocks)
            W_qkv = np.array(blocks[1].W_qkv)
            W_qkv[row, col] += h
            blocks[1] = dataclasses.replace(blocks[1], W_qkv=W_qkv)
            return dataclasses.replace(w, blocks=blocks)
        numeric = (value_with(lambda w: shift(w, eps)) - value_with(lambda w: shift(w, -eps))) / (2 * eps)
        assert grads.blocks[1].W_qkv[row, col] == pytest.approx(numeric, rel=1e-6, abs=1e-9)
    d_pos_embed = cache["hook_pos_embed_grad"]  # [batch, pos, d_model]
    assert np.abs(d_pos_embed[mask == 0]).max() == 0 < np.abs(d_pos_embed[mask == 1]).max()  # padding feeds nothing


def test_generate_a_batch_of_texts_of_different_lengths(model):
    texts = ["The dog", "A cat sat on the", "Hello"]
    alone = [model.generate(t, max_new_tokens=6, return_type="tokens") for t in texts]
    for t, ids in zip(texts, alone):  # greedy decoding is the argmax of a full pass at every step
        np.testing.assert_array_equal(ids, by_hand.greedy(model, model.to_tokens(t)[0], 6))
    for use_cache in (True, False):
        out = model.generate(texts, max_new_tokens=6, return_type="tokens", use_past_kv_cache=use_cache)
        prompt, mask = model.to_tokens(texts, padding_side="left", return_mask=True)
        assert out.shape == (3, prompt.shape[1] + 6)
        np.testing.assert_array_equal(out[:, :prompt.shape[1]], prompt)  # the left-padded prompts
        for i, ids in enumerate(alone):
            np.testing.assert_array_equal(out[i, -len(ids):], ids)
    strings = model.generate(texts, max_new_tokens=6)  # return_type="input": texts in, texts out
    assert strings == [model.generate(t, max_new_tokens=6) for t in texts]
    assert strings == [model.to_string(ids) for ids in alone]
    streamed = np.stack(list(model.generate_stream(texts, max_new_tokens=6)), axis=1)
    np.testing.assert_array_equal(streamed, out[:, -6:])


def test_generate_from_left_padded_ids_takes_their_mask(model):
    tokens, mask = model.to_tokens(["The dog", "A cat sat on the"], padding_side="left", return_mask=True)
    out = model.generate(tokens, attention_mask=mask, max_new_tokens=4)  # ids in, ids out
    assert out.shape == (2, tokens.shape[1] + 4)
    np.testing.assert_array_equal(out[0, -6:], by_hand.greedy(model, model.to_tokens("The dog")[0], 4))
    right, rmask = model.to_tokens(["The dog", "A cat sat on the"], return_mask=True)
    with pytest.raises(InputError, match="pad prompts on the left"):
        model.generate(right, attention_mask=rmask, max_new_tokens=2)
    with pytest.raises(InputError, match="generation pads prompts on the left"):
        model.generate(["The dog", "A cat"], padding_side="right")


def test_prepend_bos_everywhere_text_is_taken(tiny_dir, model):
    text = "The cat sat on the mat"
    with_bos = model.to_tokens(text, prepend_bos=True)
    assert with_bos[0, 0] == 50256 and with_bos[0, 1:].tolist() == model.to_tokens(text)[0].tolist()
    expected = model(with_bos)
    np.testing.assert_array_equal(model(text, prepend_bos=True), expected)
    assert_close(model.run_with_cache(text, prepend_bos=True)[0], expected, rel=1e-5)  # (model.py's blocks; model(): fast.py's)
    np.testing.assert_array_equal(model.run_with_hooks(text, prepend_bos=True), expected)
    assert model.loss(text, prepend_bos=True) == pytest.approx(model.loss(with_bos), abs=0)
    assert model.value_and_grad(text, prepend_bos=True)[0] == pytest.approx(model.loss(with_bos), rel=1e-6)
    np.testing.assert_array_equal(model.generate(text, max_new_tokens=3, prepend_bos=True, return_type="tokens"),
                                  by_hand.greedy(model, with_bos[0], 3))
    from npgpt2.analysis.lens import logit_lens
    from npgpt2.analysis.tokens import next_token_table

    assert next_token_table(model, text, prepend_bos=True).equals(next_token_table(model, with_bos[0]))

    # the model's default: False as loaded, True on request, and then every call follows it
    tl = npgpt2.from_pretrained(tiny_dir, default_prepend_bos=True)
    assert model.cfg.default_prepend_bos is False and tl.cfg.default_prepend_bos is True
    assert tl.cfg == model.cfg  # not part of the shape
    np.testing.assert_array_equal(tl.to_tokens(text), with_bos)
    np.testing.assert_array_equal(tl(text), expected)
    assert_close(tl.run_with_cache(text)[0], expected, rel=1e-5)
    np.testing.assert_array_equal(tl(text, prepend_bos=False), model(text))
    assert tl.loss(text) == pytest.approx(model.loss(with_bos), abs=0)
    # the continuation of the BOS-prefixed prompt; the text leaves the BOS out, as TransformerLens's does
    assert tl.generate(text, max_new_tokens=3) == model.to_string(by_hand.greedy(model, with_bos[0], 3)[1:])
    assert next_token_table(tl, text).equals(next_token_table(model, with_bos[0]))
    assert logit_lens(tl, text).equals(logit_lens(model, with_bos))
    m = npgpt2.GPT2(model.cfg.__class__(**{**model.cfg.to_dict()}), model.weights, model.tokenizer)
    m.cfg.default_prepend_bos = True  # settable, unlike the shape
    np.testing.assert_array_equal(m(text), expected)
    with pytest.raises(AttributeError, match="only default_prepend_bos and use_attn_result can"):
        m.cfg.n_layer = 3
    with pytest.raises(InputError, match="prepend_bos='yes'"):
        model(text, prepend_bos="yes")


def test_forward_and_run_with_cache_logits_within_the_parity_bound(model, model64):
    """A plain forward takes the blockwise attention, run_with_cache (which keeps the pattern) the
    eager one: the same maths, summed in another order, so their float32 logits differ (by ~1e-6
    here, 4e-5 on gpt2). Both stay within the parity bound against the float64 forward: 1e-5 of
    each position's largest |logit|."""
    text = "When Mary and John went to the store, John gave a drink to"
    truth = model64(text)[0]
    row_max = np.abs(truth).max(-1, keepdims=True)  # [pos, 1]
    plain, (cached, _) = model(text)[0], model.run_with_cache(text)
    for name, logits in (("forward", plain), ("run_with_cache", cached[0])):
        worst = float((np.abs(logits - truth) / row_max).max())
        assert worst <= 1e-5, (name, worst)
    assert np.abs(plain - cached[0]).max() <= 2e-5 * row_max.max()


@pytest.mark.parametrize("mask", [[[0, 0, 0, 0]], [[1, 0, 0, 0]], [[0, 1, 0, 1]]])
def test_a_loss_with_nothing_to_predict_is_refused_as_value_and_grad_refuses(model, mask):
    """No two consecutive real tokens: no prediction counts, and the mean of none is refused (not NaN)."""
    tokens = np.array([[1, 2, 3, 4]])
    for call in (lambda: model(tokens, return_type="loss", attention_mask=mask),
                 lambda: model.loss(tokens, attention_mask=mask)):
        with pytest.raises(InputError, match="the loss has no target to average over"):
            call()
    with pytest.raises(ValueError, match="the loss has no target to average over"):
        model.value_and_grad(tokens, attention_mask=mask)
    assert model.loss(tokens, per_token=True, attention_mask=mask).shape == (1, 3)  # all NaN, as documented


@pytest.mark.parametrize("bad", [0.5, 2, -1])
def test_attention_mask_values_other_than_0_and_1_are_refused(model, bad):
    tokens = np.array([[1, 2, 3, 4]])
    mask = np.array([[1, 1, bad, 1]])
    for call in (lambda: model(tokens, attention_mask=mask), lambda: model.run_with_cache(tokens, attention_mask=mask),
                 lambda: model.value_and_grad(tokens, attention_mask=mask)):
        with pytest.raises(InputError, match=rf"attention_mask must hold 0 \(padding\) and 1 \(real token\) only; it holds {bad}"):
            call()
