"""Toy models of superposition (Elhage et al., 2022), several instances trained at once, in NumPy.

n features x, each present with probability 1 - sparsity (then uniform in [0, 1]), squeezed into m < n
dimensions and read back:   h = W x,   x' = ReLU(W^T h + b),   loss = sum_i importance_i (x_i - x'_i)^2.
With dense features the model keeps the most important m and drops the rest; as features get
sparser it stores more of them than it has dimensions, in superposition (five features in two
dimensions form a pentagon).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from .optim import Adam


@dataclass
class ToyModel:
    """Trained toy models: W [instance, m, n], b [instance, n], one instance per sparsity level."""

    W: np.ndarray
    b: np.ndarray
    sparsity: np.ndarray  # [instance]
    importance: np.ndarray  # [n]

    @property
    def n_features(self) -> int:
        """The number of input features."""
        return self.W.shape[2]

    @property
    def n_hidden(self) -> int:
        """The hidden layer's width."""
        return self.W.shape[1]

    def hidden(self, x: np.ndarray) -> np.ndarray:
        """h = W x.  x [batch, instance, n] -> [batch, instance, m]"""
        return np.einsum("imn,bin->bim", self.W, x)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """x' = ReLU(W^T W x + b).  [batch, instance, n] -> [batch, instance, n]"""
        return np.maximum(np.einsum("imn,bim->bin", self.W, self.hidden(x)) + self.b, 0)

    def feature_norms(self) -> np.ndarray:
        """||W_i|| for every feature: [instance, n]. Near 1: represented; near 0: dropped."""
        return np.linalg.norm(self.W, axis=1)

    def n_represented(self, threshold: float = 0.5) -> np.ndarray:
        """How many features each instance represents (norm above ``threshold``): [instance]."""
        return (self.feature_norms() > threshold).sum(1)

    def dimensions_per_feature(self) -> np.ndarray:
        """m / ||W||_F^2 for each instance: 1 when each represented feature has a dimension of its
        own, below 1 in superposition (1/2 for antipodal pairs, 2/5 for a pentagon)."""
        return self.n_hidden / (self.W ** 2).sum(axis=(1, 2))

    def feature_dimensionality(self) -> np.ndarray:
        """Each feature's share of a dimension: ||W_i||^2 / sum_j (W_i_hat . W_j)^2, [instance, n]."""
        norms = self.feature_norms()
        unit = self.W / (norms[:, None, :] + 1e-12)
        overlap = np.einsum("imn,imk->ink", unit, self.W) ** 2  # (W_i_hat . W_j)^2
        return norms ** 2 / overlap.sum(-1)

    def table(self) -> pd.DataFrame:
        """One row per instance: sparsity, features represented, dimensions per feature."""
        return pd.DataFrame({"instance": np.arange(len(self.sparsity)), "sparsity": self.sparsity,
                             "represented": self.n_represented(),
                             "dimensions_per_feature": self.dimensions_per_feature()})


def generate_batch(rng: np.random.Generator, batch: int, n_features: int, sparsity: np.ndarray) -> np.ndarray:
    """Features: each present with probability 1 - sparsity (per instance), uniform in [0, 1].
    -> [batch, instance, n]"""
    values = rng.random((batch, len(sparsity), n_features))
    present = rng.random((batch, len(sparsity), n_features)) >= sparsity[None, :, None]
    return values * present


def loss_and_grads(W: np.ndarray, b: np.ndarray, x: np.ndarray, importance: np.ndarray):
    """Loss summed over instances (each the batch mean of sum_i I_i (x_i - x'_i)^2) and gradients.

        h = W x;  pre = W^T h + b;  x' = relu(pre)
        dpre = 2 I (x' - x) / batch * [pre > 0]
        db   = sum_batch dpre
        dW   = h dpre^T (through W^T h)  +  (W dpre) x^T (through h = W x)
    """
    batch = x.shape[0]
    h = np.einsum("imn,bin->bim", W, x)
    pre = np.einsum("imn,bim->bin", W, h) + b
    out = np.maximum(pre, 0)
    diff = out - x
    loss = float((importance * diff ** 2).sum() / batch)
    d_pre = 2 * importance * diff / batch * (pre > 0)
    grad_b = d_pre.sum(0)
    grad_W = np.einsum("bim,bin->imn", h, d_pre) + np.einsum("bim,bin->imn", np.einsum("imn,bin->bim", W, d_pre), x)
    return loss, grad_W, grad_b


def train_toy_models(n_features: int = 5, n_hidden: int = 2, sparsity=(0.0, 0.7, 0.9), importance=None,
                     steps: int = 3000, batch: int = 1024, lr: float = 5e-3, seed: int = 0,
                     restarts: int = 1, progress: bool = False) -> tuple[ToyModel, pd.DataFrame]:
    """Train toy models for each sparsity level, all at once.

    importance: per-feature weights of the loss (default 0.9 ** i, so feature 0 matters most).
    restarts: train this many instances per sparsity level from different starts and keep the one
        with the lowest loss (training can settle in a worse arrangement, e.g. two antipodal
        pairs instead of a pentagon).
    Returns the models (one instance per sparsity level) and a log of the loss of every trained
    instance every 100 steps.
    """
    if restarts < 1:
        raise ValueError(f"restarts={restarts}: expected at least 1")
    levels = np.asarray(sparsity, dtype=np.float64)
    sparsity = np.repeat(levels, restarts)
    from tqdm.auto import tqdm

    rng = np.random.default_rng(seed)
    sparsity = np.asarray(sparsity, dtype=np.float64)
    if np.any((sparsity < 0) | (sparsity >= 1)):
        raise ValueError(f"sparsity {sparsity.tolist()}: each must be in [0, 1)")
    if n_hidden < 1 or n_features < 1:
        raise ValueError(f"n_features={n_features}, n_hidden={n_hidden}: expected positive sizes")
    importance = 0.9 ** np.arange(n_features) if importance is None else np.asarray(importance, dtype=np.float64)
    n_inst = len(sparsity)
    params = {"W": rng.standard_normal((n_inst, n_hidden, n_features)) * np.sqrt(2 / (n_hidden + n_features)),
              "b": np.zeros((n_inst, n_features))}
    opt = Adam(lr)
    log = []
    for step in tqdm(range(steps), desc="toy models", disable=not progress):
        x = generate_batch(rng, batch, n_features, sparsity)
        loss, gW, gb = loss_and_grads(params["W"], params["b"], x, importance)
        opt.step(params, {"W": gW, "b": gb})
        if step % 100 == 0 or step == steps - 1:
            per_instance = ((importance * (np.maximum(np.einsum("imn,bim->bin", params["W"], np.einsum(
                "imn,bin->bim", params["W"], x)) + params["b"], 0) - x) ** 2).sum(-1).mean(0))
            log.append({"step": step, **{f"loss_{i}": float(v) for i, v in enumerate(per_instance)}})
    # keep, per sparsity level, the restart with the lowest loss on a fresh batch
    x = generate_batch(rng, 8192, n_features, sparsity)
    out = np.maximum(np.einsum("imn,bim->bin", params["W"], np.einsum("imn,bin->bim", params["W"], x)) + params["b"], 0)
    final = (importance * (out - x) ** 2).sum(-1).mean(0).reshape(len(levels), restarts)
    keep = np.arange(len(levels)) * restarts + final.argmin(1)
    return ToyModel(params["W"][keep], params["b"][keep], levels, importance), pd.DataFrame(log)
