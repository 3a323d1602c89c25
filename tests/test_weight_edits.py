"""Editing weights under TransformerLens's names: a write into a view fails and says how to edit;
``set_weight`` changes the forward pass exactly as the same edit made by hand in GPT-2's own layout
(checked with the one-screen reference forward, reference.py), and zeroing a head's W_O equals
zeroing its z with a hook."""

import dataclasses

import numpy as np
import pytest

import npgpt2
from npgpt2 import reference
from npgpt2.views import WeightEditError

TOKENS = np.array([[464, 3797, 3332, 319, 262, 2603, 290, 1965]])


@pytest.fixture
def fresh(model64):
    """A model of its own over model64's weights (edits replace arrays, never write into them)."""
    return npgpt2.GPT2(model64.cfg, model64.weights, model64.tokenizer)


def _oracle(weights, m):
    return reference.gpt2(TOKENS[0], weights, m.cfg.n_head, m.cfg.layer_norm_epsilon)


@pytest.mark.parametrize("write", [
    lambda m: m.W_Q.__setitem__((0, 0), 0),
    lambda m: m.W_O[1].__setitem__(2, 0),
    lambda m: np.multiply(m.W_in[0], 0, out=m.W_in[0]),
    lambda m: m.W_E.__setitem__(0, 0),
    lambda m: setattr(m, "W_V", np.zeros_like(m.W_V)),
], ids=["W_Q[0, 0] = 0", "W_O[1][2] = 0", "W_in[0] *= 0", "W_E[0] = 0", "model.W_V = ..."])
def test_writing_into_a_view_fails_and_says_how_to_edit(fresh, write):
    before = fresh(TOKENS)
    with pytest.raises(WeightEditError, match=r"read-only view of the weights.*model\.set_weight\("):
        write(fresh)
    np.testing.assert_array_equal(fresh(TOKENS), before)


def test_in_place_arithmetic_on_a_view_fails_with_the_same_message(fresh):
    view = fresh.W_Q
    with pytest.raises(WeightEditError, match=r"set_weight\('W_Q', layer, value"):
        view[0, 0] *= 0
    copy = view.copy()  # a copy is the user's own
    copy[0, 0] = 0
    assert (copy[0, 0] == 0).all() and type(copy) is np.ndarray and type(copy + 1) is np.ndarray
    picked = fresh.W_U[:, [5, 7]]  # fancy indexing copies: a plain array of the caller's own
    assert type(picked) is np.ndarray and picked.flags.writeable


def test_zeroing_a_heads_W_O_equals_zeroing_its_z(fresh, model64):
    layer, head = 1, 2

    def ablate(z, hook):
        z = z.copy()
        z[:, :, head] = 0
        return z

    expected = model64.run_with_hooks(TOKENS, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", ablate)])
    fresh.set_weight("W_O", layer, 0.0, head=head)
    np.testing.assert_allclose(fresh(TOKENS), expected, atol=1e-12, rtol=0)
    assert np.abs(fresh(TOKENS) - model64(TOKENS)).max() > 1e-3  # the edit mattered
    assert (fresh.W_O[layer, head] == 0).all() and (fresh.W_O[layer, head - 1] == model64.W_O[layer, head - 1]).all()
    assert np.abs(model64.W_O[layer, head]).max() > 0  # the model the weights came from is untouched


def _by_hand(w, cfg, name, layer, head, value):
    """The same edit written straight into GPT-2's layout: W_qkv columns q|k|v, head after head."""
    D, Dh = cfg.d_model, cfg.d_head
    blocks = list(w.blocks)
    b = blocks[layer] if layer is not None else None
    if name in ("W_Q", "W_K", "W_V", "b_Q", "b_K", "b_V"):
        cols = slice("QKV".index(name[-1]) * D + head * Dh, "QKV".index(name[-1]) * D + (head + 1) * Dh)
        if name[0] == "W":
            W = np.array(b.W_qkv)
            W[:, cols] = value
            blocks[layer] = dataclasses.replace(b, W_qkv=W)
        else:
            bias = np.array(b.b_qkv)
            bias[cols] = value
            blocks[layer] = dataclasses.replace(b, b_qkv=bias)
    elif name == "W_O":
        W = np.array(b.W_O)
        W[head * Dh:(head + 1) * Dh] = value
        blocks[layer] = dataclasses.replace(b, W_O=W)
    elif layer is not None:
        blocks[layer] = dataclasses.replace(b, **{name: np.broadcast_to(value, getattr(b, name).shape)})
    else:
        new = {name: value}
        if name == "W_E":
            new["W_U"] = np.array(w.W_U)  # the unembedding keeps its values
        return dataclasses.replace(w, **new)
    return dataclasses.replace(w, blocks=blocks)


@pytest.mark.parametrize("name,layer,head", [
    ("W_Q", 0, 1), ("W_K", 1, 3), ("W_V", -1, 0), ("b_Q", 1, 2), ("b_V", 0, 3), ("W_O", 0, 0),
    ("b_O", 1, None), ("W_in", 0, None), ("b_in", 1, None), ("W_out", 1, None), ("b_out", 0, None),
    ("W_E", None, None), ("W_pos", None, None),
])
def test_set_weight_changes_the_forward_as_the_same_edit_by_hand(fresh, model64, name, layer, head):
    shape = getattr(model64, name)[tuple(i for i in (layer, head) if i is not None)].shape
    value = np.random.default_rng(7).normal(0, 0.3, shape)
    fresh.set_weight(name, layer, value, head=head)
    expected = _oracle(_by_hand(model64.weights, model64.cfg, name, layer, head, value), model64)
    np.testing.assert_allclose(fresh(TOKENS)[0], expected, atol=1e-10, rtol=0)
    assert np.abs(expected - model64(TOKENS)[0]).max() > 1e-4  # the edit mattered
    index = tuple(i for i in (layer, head) if i is not None)
    np.testing.assert_array_equal(getattr(fresh, name)[index], value)  # the view follows


def test_set_weight_of_every_layer_a_number_and_the_tied_unembedding(fresh, model64):
    fresh.set_weight("b_in", None, np.zeros((2, 256)))
    assert (fresh.b_in == 0).all() and all((b.b_in == 0).all() for b in fresh.weights.blocks)
    fresh.set_weight("b_U", None, 0.5)  # GPT-2 has none: now it has one
    expected = _oracle(dataclasses.replace(fresh.weights), fresh)
    np.testing.assert_allclose(fresh(TOKENS)[0], expected, atol=1e-10, rtol=0)
    assert fresh.b_U.tolist() == [0.5] * fresh.cfg.d_vocab
    fresh.set_weight("W_U", None, np.zeros_like(fresh.W_U))  # the embedding keeps its values
    np.testing.assert_array_equal(fresh.W_E, model64.W_E)
    assert (fresh(TOKENS) == 0.5).all()


@pytest.mark.parametrize("call,match", [
    (lambda m: m.set_weight("W_q", 0, 0.0), r"unknown weight 'W_q'.*did you mean W_Q"),
    (lambda m: m.set_weight("W_Q", 2, 0.0), r"layer=2 is out of range for 2 layers"),
    (lambda m: m.set_weight("W_Q", 0, 0.0, head=4), r"head=4 is out of range for 4 heads"),
    (lambda m: m.set_weight("W_in", 0, 0.0, head=1), r"W_in has no heads"),
    (lambda m: m.set_weight("W_E", 0, 0.0), r"W_E belongs to no layer; pass None"),
    (lambda m: m.set_weight("W_Q", 0, np.zeros((64, 16))), r"value has shape \(64, 16\); expected \(4, 64, 16\)"),
    (lambda m: m.set_weight("W_Q", 0, np.zeros((16, 64)), head=0), r"expected \(64, 16\)"),
    (lambda m: m.set_weight("b_O", 0, np.full(64, np.nan)), r"NaN or inf"),
    (lambda m: m.set_weight("b_O", 0, np.zeros(64, complex)), r"dtype complex128; expected real numbers"),
])
def test_set_weight_refuses_what_does_not_fit(fresh, call, match):
    with pytest.raises(WeightEditError, match=match):
        call(fresh)


def test_set_weight_refuses_a_value_that_overflows_a_float32_model(tiny_dir):
    """1e39 is finite in float64 but inf in float32: refused, and the weights stay as they were."""
    model = npgpt2.from_pretrained(tiny_dir)  # float32
    before = model.b_O.copy()
    with pytest.raises(WeightEditError, match=r"value 1e\+39 overflows the model's float32 \(largest finite: 3.40282e\+38\)"):
        model.set_weight("b_O", 0, np.full(64, 1e39))
    np.testing.assert_array_equal(model.b_O, before)
    model.set_weight("b_O", 0, 3e38)  # large, but a float32
    assert np.isfinite(model.b_O).all()
