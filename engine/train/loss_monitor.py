"""Reads a training loss against the profile's target: on track, overfitting or underfitting.

Single noisy points should not raise alarms, so the verdict uses a short moving average; a warning is
emitted once when the state changes, not at every step.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass
class Verdict:
    state: str  # warming_up | underfit | on_track | at_target | overfit_risk
    warning: str | None = None


class LossMonitor:
    def __init__(self, target: float = 0.5, overfit_below: float = 0.3, underfit_above: float = 1.0,
                 window: int = 5, warmup_points: int = 5):
        self.target, self.overfit_below, self.underfit_above = target, overfit_below, underfit_above
        self.recent: deque[float] = deque(maxlen=window)
        self.warmup_points = warmup_points
        self.seen = 0
        self.state = "warming_up"

    def classify(self, loss: float) -> Verdict:
        self.seen += 1
        self.recent.append(loss)
        avg = sum(self.recent) / len(self.recent)
        if self.seen < self.warmup_points:
            state = "warming_up"
        elif avg < self.overfit_below:
            state = "overfit_risk"
        elif avg <= self.target:
            state = "at_target"
        elif avg > self.underfit_above:
            state = "underfit"
        else:
            state = "on_track"
        warning = None
        if state != self.state and state in ("overfit_risk", "underfit"):
            warning = (
                f"loss {avg:.3f} is below {self.overfit_below}: the adapter may be memorising; fewer steps or "
                "more data" if state == "overfit_risk" else
                f"loss {avg:.3f} is above {self.underfit_above}: more steps, a higher learning rate or cleaner data"
            )
        self.state = state
        return Verdict(state, warning)
