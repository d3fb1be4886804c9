"""Early stopping, plateau learning-rate reduction and checkpoint ranking on one validation metric.

Plain Python, so the decisions are easy to test and identical on every worker: they all see the same
all-reduced metric. `loop.py` saves the monitor's state in every checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Monitor:
    """Early stopping and plateau learning-rate reduction on one validation metric.

    Plain Python, so its decisions are easy to test and identical on every worker (they all see
    the same all-reduced metric). Saved in every checkpoint.
    """

    mode: str  # "max" or "min"
    patience: int  # epochs without improvement before a phase stops; 0 never stops
    plateau_patience: int
    best: float | None = None
    best_epoch: int = -1
    wait: int = 0
    plateau_wait: int = 0

    def update(self, value: float, epoch: int) -> tuple[bool, bool, bool]:
        """Returns (improved, reduce_lr, stop_phase) after an epoch's value."""
        better = self.best is None or (value > self.best if self.mode == "max" else value < self.best)
        if better:
            self.best, self.best_epoch, self.wait, self.plateau_wait = value, epoch, 0, 0
            return True, False, False
        self.wait += 1
        self.plateau_wait += 1
        reduce_lr = self.plateau_wait >= self.plateau_patience
        if reduce_lr:
            self.plateau_wait = 0
        return False, reduce_lr, bool(self.patience and self.wait >= self.patience)

    def new_phase(self) -> None:
        self.wait = self.plateau_wait = 0


def checkpoint_score(value: float, epoch: int, mode: str) -> float:
    """What Ray ranks checkpoints by: the monitored metric, with ties going to the earlier epoch
    (the one `Monitor` calls best, as Keras' EarlyStopping does), so the kept best checkpoint
    and the restored best weights are always the same epoch."""
    tie_break = 1e-9 * epoch
    return value - tie_break if mode == "max" else value + tie_break
