"""Idle-time work: when the training GPU has nothing to do, it takes pending work by itself.

The GPU counts as idle when no run on it is running, stopping or queued. Once it has been idle for
`learning.idle_after_minutes` (0: never), or at any time inside `learning.nightly_window`, a tick
starts, in this order: an experiment left waiting for idle time (`tandem experiment --when-idle`),
the retrains the learning loop has due (failed ones after their backoff), and preference runs for
specialists with enough new pairs. One kind per tick, so the person's next run never waits behind a
pile. Whatever it starts are ordinary runs queued behind the person's own (`engine.train.runs`), each
carrying why it runs. The app ticks it on a timer; `tandem learn` ticks it once. Idle since: the last
run on the GPU ended, or the first tick that found it idle (kept in logs/learning/idle.json).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass

from engine.settings import Settings
from engine.store.history import History
from engine.train.experiments import Experiments
from engine.train.learning import Learner
from engine.train.runs import ACTIVE, RunQueue, write_json_atomic


@dataclass
class Tick:
    started: list[str]  # run ids started by this tick
    status: str  # one line for the app: what the training GPU does and why


class IdleScheduler:
    def __init__(self, settings: Settings, history: History, now: Callable[[], float] = time.time):
        self.settings = settings
        self.history = history
        self.now = now
        self.path = settings.logs_dir / "learning" / "idle.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def _since(self) -> float | None:
        try:
            value = json.loads(self.path.read_bytes()).get("since")
        except (OSError, ValueError, AttributeError):
            return None
        return value if isinstance(value, int | float) else None

    def _remember(self, since: float | None) -> None:
        if self._since() != since:
            write_json_atomic(self.path, {"since": since})

    def tick(self) -> Tick:
        """Start pending work if the training GPU may take it now; say what it does either way."""
        gpu = self.settings.gpus.training
        runs = [r for r in RunQueue(self.settings).runs() if r.request.gpu == gpu]
        busy = [r for r in runs if r.state.status in (*ACTIVE, "queued")]
        if busy:
            self._remember(None)
            active = next((r for r in busy if r.state.status in ACTIVE), busy[0])
            waiting = len(busy) - 1
            return Tick([], f"training GPU {gpu}: {active.request.why or 'your run'}"
                            + (f" · {waiting} queued" if waiting else ""))
        ended = max((r.state.ended or 0.0 for r in runs), default=0.0)
        since = max(self._since() or 0.0, ended) or self.now()  # never seen idle, never ran: from now
        self._remember(since)
        learner = Learner(self.settings, self.history, now=self.now)
        idle_min = (self.now() - since) / 60
        after = self.settings.learning.idle_after_minutes
        if learner.in_window():
            reason = f"nightly window {self.settings.learning.nightly_window}"
        elif after and idle_min >= after:
            reason = f"idle {idle_min:.0f} min"
        else:
            wait = f"; idle work after {after} min" if after else "; idle work off (learning.idle_after_minutes)"
            return Tick([], f"training GPU {gpu} idle {idle_min:.0f} min{wait}")
        experiments = Experiments(self.settings, self.history)
        exp = experiments.next_waiting()
        if exp is not None:
            experiments.start(exp)
            return Tick([v.run_id for v in exp.variants], f"{reason}: experiment {exp.id} on {exp.task}")
        started = learner.check(why_prefix=f"{reason}: ")
        if started:
            return Tick(started, f"{reason}: retraining ({len(started)} run(s))")
        started = learner.check_preferences(why_prefix=f"{reason}: ")
        if started:
            return Tick(started, f"{reason}: preference runs ({len(started)})")
        return Tick([], f"training GPU {gpu} {reason}: nothing pending")
