"""Adam, for the hand-written training loops (sparse autoencoders, toy models)."""

from __future__ import annotations

import numpy as np


class Adam:
    """Adam (Kingma & Ba) over a dict of named arrays, updated in place.

    ``step(params, grads)`` applies one update; ``reset(name, index)`` forgets the moments of part
    of a parameter (e.g. resampled latents), so they restart fresh.
    """

    def __init__(self, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        if lr <= 0:
            raise ValueError(f"lr={lr}: expected a positive learning rate")
        self.lr, (self.beta1, self.beta2), self.eps = lr, betas, eps
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}
        self.t = 0

    def step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray]) -> None:
        """One Adam update of every array in ``params`` (in place) from ``grads`` of the same names."""
        self.t += 1
        c1, c2 = 1 - self.beta1 ** self.t, 1 - self.beta2 ** self.t
        for name, g in grads.items():
            m = self.m.setdefault(name, np.zeros_like(g))
            v = self.v.setdefault(name, np.zeros_like(g))
            m *= self.beta1
            m += (1 - self.beta1) * g
            v *= self.beta2
            v += (1 - self.beta2) * g * g
            params[name] -= self.lr * (m / c1) / (np.sqrt(v / c2) + self.eps)

    def reset(self, name: str, index) -> None:
        """Zero the moment estimates of ``params[name][index]`` (for resampled SAE latents)."""
        for state in (self.m, self.v):
            if name in state:
                state[name][index] = 0
