"""npgpt2.ops against values worked out independently: known numbers, and plain-NumPy versions
written in by_hand.py."""

import math
import warnings

import numpy as np
import pytest

from npgpt2 import ops
import by_hand

# 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), evaluated at 30 digits (mpmath); GPT-2's GELU,
# not the exact erf one (which gives 0.841345 at 1, 1.954500 at 2)
GELU_NEW = {-3.0: -0.0036373920817730188, -1.0: -0.1588080093917233, -0.5: -0.15428599017485608,
            0.0: 0.0, 0.5: 0.34571400982514392, 1.0: 0.8411919906082767, 2.0: 1.954597694087775,
            3.0: 2.996362607918227}


def test_gelu_new_known_values():
    x = np.array(list(GELU_NEW))
    np.testing.assert_allclose(ops.gelu_new(x.copy()), list(GELU_NEW.values()), rtol=1e-14, atol=1e-17)
    out32 = ops.gelu_new(x.astype(np.float32))
    assert out32.dtype == np.float32
    np.testing.assert_allclose(out32, list(GELU_NEW.values()), rtol=1e-6, atol=1e-7)


def test_gelu_new_follows_the_formula_over_a_wide_range():
    x = np.linspace(-12, 12, 2001)
    np.testing.assert_allclose(ops.gelu_new(x.copy()), by_hand.gelu_new(x), rtol=1e-13, atol=1e-15)
    assert ops.gelu_new(np.array([-40.0]))[0] == 0 and ops.gelu_new(np.array([40.0]))[0] == 40


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gelu_new_and_its_slope_where_exp_overflows_and_underflows(dtype):
    # gelu_new is x / (1 + exp(-2u)): in float32, exp(-2u) overflows below about x = -10 and
    # underflows above about x = 10 (to subnormal numbers, whose reciprocal overflows, then to 0);
    # neither may give a NaN, an inf or a warning, and the value and slope kept for a backward pass
    # must be those of the plain call and of gelu_new_backward
    x = np.array([-1e4, -60, -12, -10.5, -9.8, -5, -1e-3, 0, 1e-3, 5.0, 9.8, 10.3, 10.6, 12, 60, 1e4], dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = ops.gelu_new(x)
        kept = x.copy()
        y_kept = ops.gelu_new(kept, slope=kept)  # the slope written over its input, as fast.py's tape does
        slope = ops.gelu_new_backward(np.ones_like(x), x)
    assert np.isfinite(y).all() and np.isfinite(slope).all()
    np.testing.assert_array_equal(y_kept, y)
    np.testing.assert_array_equal(kept, slope)
    x64 = x.astype(np.float64)
    t = np.tanh(math.sqrt(2 / math.pi) * (x64 + 0.044715 * x64 ** 3))
    d_ref = 0.5 * (1 + t) + 0.5 * x64 * (1 - t * t) * math.sqrt(2 / math.pi) * (1 + 3 * 0.044715 * x64 ** 2)
    # (the reference's 1 + tanh(u) cancels where u is very negative: it is judged in absolute terms there)
    np.testing.assert_allclose(y, by_hand.gelu_new(x64), rtol=4 * np.finfo(dtype).eps, atol=4 * np.finfo(dtype).eps)
    np.testing.assert_allclose(slope, d_ref, rtol=0, atol=4 * np.finfo(dtype).eps)


def test_gelu_new_leaves_its_input_alone():
    x = np.array([0.5, -1.5, 2.0])
    ops.gelu_new(x)
    np.testing.assert_array_equal(x, [0.5, -1.5, 2.0])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_at_magnitudes_where_exp_overflows(dtype):
    # exp overflows above ~88 in float32 and ~709 in float64; a softmax must not notice
    x = np.array([[1000.0, 999.0, 998.0], [-1000.0, -1001.0, -1002.0], [1000.0, -1000.0, 0.0]], dtype)
    z = 1 + math.exp(-1) + math.exp(-2)
    expected = [[1 / z, math.exp(-1) / z, math.exp(-2) / z]] * 2 + [[1.0, 0.0, 0.0]]
    out = ops.softmax(x.copy())
    assert out.dtype == dtype
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-30)
    np.testing.assert_allclose(ops.softmax(x.T.copy(), axis=0), np.transpose(expected), rtol=1e-6, atol=1e-30)
    # masked (-inf) entries get exactly 0
    masked = np.array([[500.0, -np.inf, 499.0]], dtype)
    np.testing.assert_allclose(ops.softmax(masked), [[1 / (1 + math.exp(-1)), 0, math.exp(-1) / (1 + math.exp(-1))]],
                               rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_log_softmax_at_magnitudes_where_exp_overflows(dtype):
    x = np.array([[1000.0, 998.0, -1000.0], [-100.0, -101.0, -300.0], [120.0, 100.0, 80.0]], dtype)
    lse = [1000 + math.log(1 + math.exp(-2)),  # exp(-2000) is nothing next to 1
           -100 + math.log(1 + math.exp(-1) + math.exp(-200)),
           120 + math.log(1 + math.exp(-20) + math.exp(-40))]
    expected = np.array(x, np.float64) - np.array(lse)[:, None]
    out = ops.log_softmax(x.copy())
    assert out.dtype == dtype and np.isfinite(out).all()
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)


def test_softmax_and_log_softmax_against_plain_numpy():
    x = np.random.default_rng(0).standard_normal((3, 4, 50)) * 30
    np.testing.assert_allclose(ops.softmax(x.copy()), by_hand.softmax(x), rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(ops.log_softmax(x), by_hand.log_softmax(x), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ops.softmax(x.copy(), axis=1), by_hand.softmax(x, axis=1), rtol=1e-12, atol=1e-300)


def test_layer_norm_against_plain_numpy():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 5, 16)) * 3 + 7
    w, b = rng.standard_normal(16), rng.standard_normal(16)
    np.testing.assert_allclose(ops.layer_norm(x, w, b, 1e-5), by_hand.layer_norm(x, w, b, 1e-5), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ops.layer_norm(x, None, None, 1e-5), by_hand.layer_norm(x, 1, 0, 1e-5), atol=1e-12)


@pytest.mark.parametrize("n_q,n_k", [(150, 150), (5, 40), (1, 9)])
def test_causal_scores_and_attention_against_plain_numpy(n_q, n_k):
    # n_k > n_q: the queries are the last n_q positions (decoding with a key/value cache)
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 3, n_q, 8))
    k, v = rng.standard_normal((2, 3, n_k, 8)), rng.standard_normal((2, 3, n_k, 8))
    scores = by_hand.causal_scores(q, k)
    expected = by_hand.softmax(scores) @ v
    masked = q @ k.swapaxes(-1, -2) + ops.causal_mask(n_q, n_k, q.dtype)  # the eager path's scores
    np.testing.assert_array_equal(np.isneginf(masked), np.isneginf(scores))
    np.testing.assert_allclose(masked, scores, rtol=1e-12, atol=1e-12)
    for block in (1, 7, 64, 1000):
        np.testing.assert_allclose(ops.causal_attention(q, k, v, block=block), expected, rtol=1e-10, atol=1e-12)


def test_causal_attention_with_huge_scores_in_float32():
    # scores in the thousands: exp overflows unless the softmax shifts by the row maximum
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((1, 2, 20, 8)).astype(np.float32) for _ in range(3))
    q *= 300
    expected = by_hand.softmax(by_hand.causal_scores(q, k)) @ v.astype(np.float64)
    assert np.abs(by_hand.causal_scores(q, k)[np.isfinite(by_hand.causal_scores(q, k))]).max() > 1000
    for block in (4, 64):
        out = ops.causal_attention(q, k, v, block=block)
        assert out.dtype == np.float32
        np.testing.assert_allclose(out, expected, atol=1e-4)
    masked = q @ k.swapaxes(-1, -2) + ops.causal_mask(20, 20, q.dtype)
    np.testing.assert_allclose(ops.softmax(masked) @ v, expected, atol=1e-4)


def test_softmax_takes_integer_input():
    np.testing.assert_allclose(ops.softmax(np.array([1, 2, 3])), by_hand.softmax(np.array([1.0, 2.0, 3.0])))
