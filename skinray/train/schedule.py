"""The learning-rate rules: scaling with the global batch, and the schedule within a phase.

Pure functions of their arguments (no TensorFlow), shared by the training loop, the recipe's
description, tune's trials and the quality benchmark's plain-Keras baseline.
"""

from __future__ import annotations

import math


def scaled_learning_rate(lr: float, global_batch: int, base_batch: int, rule: str) -> float:
    """The learning-rate scaling rule: linear (Goyal et al. 2017), square root, or none."""
    ratio = global_batch / base_batch
    return lr * {"linear": ratio, "sqrt": ratio**0.5, "none": 1.0}[rule]


def scheduled_learning_rate(
    base: float, epoch: int, start: int, end: int, warmup: int, min_lr: float, schedule: str
) -> float | None:
    """The rate for `epoch` of a phase spanning epochs [start, end), or None: the monitor decides.

    The first `warmup` epochs ramp linearly up to `base` (base/(w+1), 2·base/(w+1), ...); then
    'cosine' decays from `base` to `min_lr` by the end of the phase, and 'plateau' starts at `base`
    and leaves later changes to the plateau rule. A function of the epoch alone, so a resumed run
    continues on the same curve.
    """
    i = epoch - start
    if i < warmup:
        return base * (i + 1) / (warmup + 1)
    if schedule == "plateau":
        return base if i == warmup else None
    progress = (i - warmup) / max(end - start - warmup, 1)
    return min_lr + (max(base, min_lr) - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
