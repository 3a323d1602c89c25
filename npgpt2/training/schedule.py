"""Learning-rate schedules: functions of the number of steps already taken (0 before the first step)
-> learning rate. Pass one as ``AdamW(model, lr=schedule)``.

``warmup_cosine`` is transformers' ``get_cosine_schedule_with_warmup`` (with ``min_lr``, its
``get_cosine_with_min_lr_schedule_with_warmup``) driven by a LambdaLR: the first step's rate is 0 when
there is a warm-up, the rate climbs linearly to ``lr`` at step ``warmup``, then follows half a cosine
down to ``min_lr`` at step ``total``, and stays there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Constant:
    lr: float

    def __call__(self, step: int) -> float:
        return self.lr


@dataclass(frozen=True)
class WarmupCosine:
    lr: float
    warmup: int
    total: int
    min_lr: float = 0.0

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * step / max(1, self.warmup)
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))  # 1 -> 0
        return self.min_lr + (self.lr - self.min_lr) * factor


def constant(lr: float) -> Constant:
    """The same rate at every step."""
    if not lr >= 0:
        raise ValueError(f"lr={lr}: expected a non-negative learning rate")
    return Constant(float(lr))


def warmup_cosine(lr: float, warmup: int, total: int, min_lr: float = 0.0) -> WarmupCosine:
    """Linear warm-up over ``warmup`` steps to ``lr``, then cosine decay to ``min_lr`` at ``total``."""
    if not lr >= 0 or not 0 <= min_lr <= lr:
        raise ValueError(f"lr={lr}, min_lr={min_lr}: expected 0 <= min_lr <= lr")
    if not 0 <= warmup <= total:
        raise ValueError(f"warmup={warmup}, total={total}: expected 0 <= warmup <= total steps")
    return WarmupCosine(float(lr), int(warmup), int(total), float(min_lr))
