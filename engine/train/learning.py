"""The learning loop: rated and corrected turns become training sets, and retraining is triggered.

What counts as an example: a corrected turn (the correction is the target), or a completed turn rated
4-5 (or marked good without a rating). Low-rated turns without a correction are left out. Examples are
de-duplicated by prompt (the latest wins) and split into train / held-out by a hash of the prompt, so
an example never moves between the two as the set grows; the held-out part feeds the promotion gate.

Triggers (settings [learning]): a task retrains once it has `retrain_every` usable examples more than
at its last retrain, or in the nightly window when anything new arrived; a task with no specialist yet
gets one at `min_examples_new_task`. Jobs go through the training queue and only when the training GPU
has nothing running or queued. A task label that is not a valid name (`engine.names`; written by an older
Tandem) is skipped with its reason, never used as a folder or run name.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from engine import names
from engine.settings import Settings, nightly_window
from engine.store.adapters import AdapterStore
from engine.store.history import History, TurnRow
from engine.train.runs import ACTIVE, Request, RunQueue


@dataclass
class Built:
    task: str
    train: Path
    holdout: Path
    n_train: int
    n_holdout: int
    n_usable: int


def example_of(turn: TurnRow) -> dict:
    target = turn.correction or turn.final
    analysis = "" if turn.correction else turn.analysis  # a corrected answer has no reasoning of its own
    return {"messages": [{"role": "user", "content": turn.prompt},
                         {"role": "assistant", "content": target, "thinking": analysis}]}


def _in_holdout(prompt: str, fraction: float) -> bool:
    h = int(hashlib.sha256(prompt.strip().lower().encode()).hexdigest()[:8], 16)
    return h / 0xFFFFFFFF < fraction


def build_dataset(history: History, task: str, out_dir: Path, holdout_fraction: float) -> Built:
    turns = history.usable_for(task)
    latest: dict[str, TurnRow] = {}
    for t in turns:  # oldest first: a later answer to the same prompt replaces the earlier one
        latest[t.prompt.strip().lower()] = t
    train, holdout = [], []
    for key, t in latest.items():
        (holdout if _in_holdout(key, holdout_fraction) else train).append(example_of(t))
    if not holdout and len(train) > 1:  # tiny sets: keep at least one held-out example for the gate
        holdout.append(train.pop())
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = out_dir / "train.jsonl", out_dir / "holdout.jsonl"
    for path, rows in zip(paths, (train, holdout), strict=True):
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return Built(task, paths[0], paths[1], len(train), len(holdout), len(latest))


class Learner:
    """Decides when a task retrains, and submits the job. State lives in logs/learning/state.json."""

    def __init__(self, settings: Settings, history: History, now: Callable[[], float] = time.time):
        self.settings = settings
        self.history = history
        self.now = now
        self.dir = settings.logs_dir / "learning"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.state_path = self.dir / "state.json"
        self.skipped: list[tuple[str, str]] = []  # (task label, why) left out by the last `due`

    def _state(self) -> dict:
        """The last retrain per task; an unreadable file counts as none (it is rewritten on the next one)."""
        try:
            state = json.loads(self.state_path.read_bytes())
        except (OSError, ValueError):
            return {}
        return {k: v for k, v in state.items() if isinstance(v, dict)} if isinstance(state, dict) else {}

    def _save(self, state: dict) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(self.state_path)

    def _in_window(self) -> bool:
        window = nightly_window(self.settings)
        if window is None:
            return False
        t = datetime.fromtimestamp(self.now())
        minute = t.hour * 60 + t.minute
        start, end = window
        return start <= minute < end if start <= end else minute >= start or minute < end

    def due(self) -> list[tuple[str, str]]:
        """[(task, why)] for every task that should retrain now."""
        state = self._state()
        known = {a.manifest.task for a in AdapterStore(self.settings.adapters_dir).scan()[0]}
        out, self.skipped = [], []
        for task in self.history.tasks():
            if not names.is_valid(task):
                self.skipped.append((task, f"task label {names.shown(task)} is not a valid name ({names.RULE})"))
                continue
            usable = len({t.prompt.strip().lower() for t in self.history.usable_for(task)})
            last = state.get(task, {}).get("examples", 0)
            last = last if isinstance(last, int) else 0
            new = usable - last
            if task not in known:
                if usable >= self.settings.learning.min_examples_new_task:
                    out.append((task, f"new task with {usable} examples"))
            elif new >= self.settings.learning.retrain_every:
                out.append((task, f"{new} new examples since the last retrain"))
            elif new > 0 and self._in_window():
                out.append((task, f"nightly window, {new} new examples"))
        return out

    def check(self, profile: str | None = None) -> list[str]:
        """Submit retraining for due tasks if the training GPU is free. Returns the run ids started."""
        queue = RunQueue(self.settings)
        gpu = self.settings.gpus.training
        busy = any(r.request.gpu == gpu and r.state.status in (*ACTIVE, "queued") for r in queue.runs())
        if busy:
            return []
        state = self._state()
        store = AdapterStore(self.settings.adapters_dir)
        current = {a.manifest.task: a.name for a in store.scan()[0]}
        started = []
        for task, why in self.due():
            stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(self.now()))
            built = build_dataset(self.history, task, self.dir / task / stamp, self.settings.learning.holdout_fraction)
            if built.n_train == 0:
                continue
            run = queue.submit(Request(
                task=task, data=str(built.train), profile=profile or self.settings.training.default_profile, gpu=gpu,
                settings=str(self.settings.source), from_adapter=current.get(task, ""), name=current.get(task, task),
                gate={"holdout": str(built.holdout), "current": current.get(task, ""), "why": why}))
            state[task] = {"examples": built.n_usable, "run": run.id, "time": self.now(), "why": why}
            self._save(state)
            started.append(run.id)
        return started


def report(history: History) -> dict:
    """Ratings trend, corrections rate, response time, per-specialist usage, router confidence over time."""
    turns = history.turns()
    by_day: dict[str, dict] = {}
    for t in turns:
        day = datetime.fromtimestamp(t.created).strftime("%Y-%m-%d")
        d = by_day.setdefault(day, {"turns": 0, "ratings": [], "corrections": 0, "tps": [], "confidence": []})
        d["turns"] += 1
        if t.rating is not None:
            d["ratings"].append(t.rating)
        d["corrections"] += t.correction is not None
        if t.stats.get("tokens_per_s"):
            d["tps"].append(t.stats["tokens_per_s"])
        if t.route.get("reason") in ("routed", "below threshold"):
            d["confidence"].append(t.route.get("confidence", 0.0))

    def mean(xs: list[float]) -> float | None:
        return round(sum(xs) / len(xs), 3) if xs else None

    usage: dict[str, int] = {}
    for t in turns:
        usage[t.adapter] = usage.get(t.adapter, 0) + 1
    days = [{"day": day, "turns": d["turns"], "mean_rating": mean(d["ratings"]),
             "correction_rate": round(d["corrections"] / d["turns"], 3), "tokens_per_s": mean(d["tps"]),
             "router_confidence": mean(d["confidence"])} for day, d in sorted(by_day.items())]
    rated = [t.rating for t in turns if t.rating is not None]
    corrected = sum(t.correction is not None for t in turns)
    return {"turns": len(turns), "mean_rating": mean(rated), "rated": len(rated), "corrections": corrected,
            "correction_rate": round(corrected / len(turns), 3) if turns else None,
            "usage": dict(sorted(usage.items(), key=lambda kv: -kv[1])), "days": days,
            "preferences": len(history.preferences())}
