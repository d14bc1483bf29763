"""Stop a round when its uncertainty-penalised proxy reward stops rising.

A per-step reward is the mean over one small batch and jumps from step to step, so the
tracker follows its exponential moving average (weight ``ALPHA`` on the newest step) and
stops after ``patience`` steps in a row without a new best average. Past that point the
round is climbing where the proxy has no data (its ensemble spread grows faster than its
mean), which is where reward over-optimisation begins.
"""

from __future__ import annotations

ALPHA = 0.3


class Plateau:
    def __init__(self, patience: int, alpha: float = ALPHA):
        self.patience = patience  # 0: never stop
        self.alpha = alpha
        self.average: float | None = None
        self.best: float | None = None
        self.best_step = 0
        self.since_best = 0
        self.stopped_at: int | None = None

    def update(self, step: int, value: float) -> bool:
        """Record step ``step``'s penalised reward; True when the round should stop now."""
        self.average = value if self.average is None else self.alpha * value + (1 - self.alpha) * self.average
        if self.best is None or self.average > self.best:
            self.best, self.best_step, self.since_best = self.average, step, 0
        else:
            self.since_best += 1
        if self.patience and self.since_best >= self.patience and self.stopped_at is None:
            self.stopped_at = step
        return self.stopped_at is not None
