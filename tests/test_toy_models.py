"""Toy models of superposition: hand-written gradients, the published geometry on small seeds,
and an SAE recovering the toy model's features."""

import numpy as np
import pytest

from npgpt2.training.sae import init_sae, train_sae
from npgpt2.training.toy_models import generate_batch, loss_and_grads, train_toy_models


def test_gradients_match_finite_differences():
    rng = np.random.default_rng(0)
    W = rng.standard_normal((3, 2, 5))
    b = rng.standard_normal((3, 5)) * 0.1
    x = generate_batch(rng, 64, 5, np.array([0.0, 0.5, 0.9]))
    importance = 0.9 ** np.arange(5)
    _, gW, gb = loss_and_grads(W, b, x, importance)
    eps = 1e-6
    for g, param in ((gW, W), (gb, b)):
        for _ in range(8):
            idx = tuple(rng.integers(0, n) for n in param.shape)
            old = param[idx]
            param[idx] = old + eps
            up = loss_and_grads(W, b, x, importance)[0]
            param[idx] = old - eps
            down = loss_and_grads(W, b, x, importance)[0]
            param[idx] = old
            assert g[idx] == pytest.approx((up - down) / (2 * eps), rel=1e-5, abs=1e-9)


def test_generate_batch_sparsity():
    rng = np.random.default_rng(0)
    x = generate_batch(rng, 20000, 5, np.array([0.0, 0.9]))
    present = (x > 0).mean(axis=(0, 2))
    assert present[0] == pytest.approx(1.0, abs=1e-3) and present[1] == pytest.approx(0.1, abs=0.01)
    assert x.min() >= 0 and x.max() <= 1


@pytest.fixture(scope="module")
def five_in_two():
    return train_toy_models(5, 2, sparsity=(0.0, 0.9), steps=2000, batch=512, lr=5e-3, seed=0, restarts=4)[0]


def test_dense_features_two_most_important_kept_orthogonal(five_in_two):
    W = five_in_two.W[0]  # sparsity 0
    norms = np.linalg.norm(W, axis=0)
    assert norms[0] > 0.9 and norms[1] > 0.9 and norms[2:].max() < 0.35
    assert abs(W[:, 0] @ W[:, 1]) < 0.05
    assert five_in_two.n_represented()[0] == 2
    assert five_in_two.dimensions_per_feature()[0] == pytest.approx(1.0, abs=0.15)


def test_sparse_features_form_a_pentagon(five_in_two):
    W = five_in_two.W[1]  # sparsity 0.9
    assert (np.linalg.norm(W, axis=0) > 0.9).all()
    angles = np.sort(np.degrees(np.arctan2(W[1], W[0])) % 360)
    gaps = np.diff(np.r_[angles, angles[0] + 360])
    np.testing.assert_allclose(gaps, 72, atol=8)
    assert five_in_two.dimensions_per_feature()[1] < 0.45  # 2 dimensions for 5 features
    assert (five_in_two.feature_dimensionality()[1] < 0.6).all()


def test_more_features_represented_as_sparsity_grows():
    toy, log = train_toy_models(20, 5, sparsity=(0.0, 0.7, 0.9, 0.99), steps=2000, batch=512, lr=5e-3, seed=0)
    represented = toy.n_represented()
    assert represented[0] <= 6 and represented[-1] >= 15
    assert (np.diff(represented) >= 0).all()
    dpf = toy.dimensions_per_feature()
    assert dpf[0] > 0.8 and dpf[-1] < 0.4
    table = toy.table()
    assert list(table.columns) == ["instance", "sparsity", "represented", "dimensions_per_feature"]
    assert {"step", "loss_0", "loss_3"} <= set(log.columns)


def test_bad_toy_arguments():
    with pytest.raises(ValueError, match=r"sparsity \[1.0\]"):
        train_toy_models(5, 2, sparsity=(1.0,), steps=1)
    with pytest.raises(ValueError, match="restarts=0"):
        train_toy_models(5, 2, restarts=0, steps=1)


def test_sae_recovers_the_toy_models_features():
    n, m = 8, 4
    toy, _ = train_toy_models(n, m, sparsity=(0.95,), importance=np.ones(n), steps=3000, batch=512, lr=5e-3,
                              seed=0, restarts=2)
    assert toy.n_represented()[0] == n  # all 8 features stored in 4 dimensions
    rng = np.random.default_rng(1)

    def hidden_batches():
        while True:
            yield toy.hidden(generate_batch(rng, 1024, n, toy.sparsity))[:, 0]

    sae, log = train_sae(hidden_batches(), d_sae=2 * n, l1_coeff=3e-2, lr=3e-3, n_steps=5000,
                         resample_every=1000, progress=False, init=init_sae(m, 2 * n, 0))
    features = toy.W[0] / np.linalg.norm(toy.W[0], axis=0)  # [m, n] unit feature directions
    best = (sae.W_dec @ features).max(0)  # best-matching decoder row for each feature
    assert best.min() > 0.98, best
    assert log["fve"].iloc[-1] > 0.99 and log["l0"].iloc[-1] < 1.5
