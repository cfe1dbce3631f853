"""The learning loop: rated and corrected turns become training sets, and retraining is triggered.

What counts as an example: a corrected turn (the correction is the target), or a completed turn rated
4-5 (or marked good without a rating). Low-rated turns without a correction are left out. Examples are
de-duplicated by prompt (the latest wins) and split into train / held-out by a hash of the prompt, so
an example never moves between the two as the set grows; the held-out part feeds the promotion gate.

An example is rendered as the chat served it: the earlier turns of its conversation (as the chat kept
them), the reasoning level and the developer instructions stored with the turn, through the same
`engine.harmony` code the inference worker uses.

Triggers (settings [learning]): a task retrains once it has `retrain_every` usable examples more than
at its last retrain, or in the nightly window when anything new arrived; a task with no specialist yet
gets one at `min_examples_new_task`. Jobs go through the training queue and only when the training GPU
has nothing running or queued. A task whose examples are too few for a held-out set is refused before
anything trains. A submitted retrain is pending until its run ends: finished, its examples count as
learned; failed or stopped, it is due again after a backoff (5 min, doubling, at most 6 h). A task label
that is not a valid name (`engine.names`; written by an older Tandem) is skipped with its reason, never
used as a folder or run name. Preference runs (`check_preferences`) follow the same rules for pairs.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from engine import names
from engine.harmony import REASONING, Turn
from engine.settings import Settings, nightly_window
from engine.store.adapters import AdapterStore
from engine.store.history import History, TurnRow
from engine.train.dataset import Example
from engine.train.preference import pair_counts, pairs_from_history
from engine.train.runs import ACTIVE, DONE, Request, Run, RunError, RunQueue

RETRY_BASE_S = 300.0
RETRY_MAX_S = 6 * 3600.0


@dataclass
class Built:
    task: str
    train: Path
    holdout: Path
    n_train: int
    n_holdout: int
    n_usable: int


def example_of(turn: TurnRow, context: list[tuple[str, str]] | None = None) -> Example:
    """A stored turn as the training example it teaches, rendered as the chat served it: the turns before
    its prompt (`History.context`), the reasoning level and the developer instructions in force. The
    target is the correction, if any, else the reply."""
    turns = [Turn(role, text) for role, text in context or []]
    target = turn.correction or turn.final
    analysis = "" if turn.correction else turn.analysis  # a corrected answer has no reasoning of its own
    turns += [Turn("user", turn.prompt), Turn("assistant", target, analysis)]
    return Example(turns, turn.reasoning if turn.reasoning in REASONING else "low", turn.instructions)


def _in_holdout(prompt: str, fraction: float) -> bool:
    h = int(hashlib.sha256(prompt.strip().lower().encode()).hexdigest()[:8], 16)
    return h / 0xFFFFFFFF < fraction


def split_holdout(keyed: dict[str, Any], fraction: float) -> tuple[list[Any], list[Any]]:
    """(train, held-out) by a hash of each key (a prompt), so an item never moves between the two as the
    set grows; a set of two or more keeps at least one held out for the gate."""
    train, holdout = [], []
    for key, item in keyed.items():
        (holdout if _in_holdout(key, fraction) else train).append(item)
    if not holdout and len(train) > 1:
        holdout.append(train.pop())
    return train, holdout


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def build_dataset(history: History, task: str, out_dir: Path, holdout_fraction: float) -> Built:
    turns = history.usable_for(task)
    latest: dict[str, TurnRow] = {}
    for t in turns:  # oldest first: a later answer to the same prompt replaces the earlier one
        latest[t.prompt.strip().lower()] = t
    train, holdout = split_holdout({k: example_of(t, history.context(t)) for k, t in latest.items()},
                                   holdout_fraction)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = out_dir / "train.jsonl", out_dir / "holdout.jsonl"
    for path, rows in zip(paths, (train, holdout), strict=True):
        write_jsonl(path, [ex.to_chat_row() for ex in rows])
    return Built(task, paths[0], paths[1], len(train), len(holdout), len(latest))


def too_few(built: Built) -> str:
    """Why a built set cannot go through the promotion gate, or "" when it can."""
    if built.n_train and built.n_holdout:
        return ""
    return (f"{built.n_usable} distinct example(s) of {built.task}: the gate needs at least 2 (one to train on, "
            "one held out)")


def retry_delay(failures: int) -> float:
    """Seconds before a failed retrain is tried again: 5 min, doubling per failure, at most 6 h."""
    return min(RETRY_BASE_S * 2 ** max(failures - 1, 0), RETRY_MAX_S)


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

    def in_window(self) -> bool:
        window = nightly_window(self.settings)
        if window is None:
            return False
        t = datetime.fromtimestamp(self.now())
        minute = t.hour * 60 + t.minute
        start, end = window
        return start <= minute < end if start <= end else minute >= start or minute < end

    def _settle(self, state: dict) -> dict:
        """Fold finished retrains into `state`: a finished run (published or kept as candidate by the
        gate) moves the task's example count on; a failed or stopped one is retried after a backoff,
        its examples still counted as new. Saved when anything changed."""
        changed = False
        root = self.settings.logs_dir / "runs"
        for task, entry in state.items():
            pending = entry.get("pending")
            if not isinstance(pending, dict):
                continue
            try:
                run_state = Run(root / names.check(str(pending.get("run", "")), "run id")).state
            except (RunError, ValueError):
                run_state = None
            status = run_state.status if run_state else "failed"
            if status not in DONE:
                continue
            changed = True
            del entry["pending"]
            if status == "finished":
                entry.update(examples=pending.get("examples", 0), failures=0, retry_at=0, error="")
            else:
                failures = entry.get("failures", 0)
                failures = (failures if isinstance(failures, int) else 0) + 1
                ended = (run_state.ended if run_state and run_state.ended else None) or self.now()
                entry.update(failures=failures, retry_at=ended + retry_delay(failures),
                             error=(run_state.error if run_state else "") or status)
        if changed:
            self._save(state)
        return state

    def due(self) -> list[tuple[str, str]]:
        """[(task, why)] for every task that should retrain now."""
        state = self._settle(self._state())
        known = {a.manifest.task for a in AdapterStore(self.settings.adapters_dir).scan()[0]}
        out, self.skipped = [], []
        for task in self.history.tasks():
            if not names.is_valid(task):
                self.skipped.append((task, f"task label {names.shown(task)} is not a valid name ({names.RULE})"))
                continue
            entry = state.get(task, {})
            if isinstance(entry.get("pending"), dict):
                continue  # its retrain is queued or running
            retry_at = entry.get("retry_at", 0)
            if isinstance(retry_at, int | float) and retry_at > self.now():
                minutes = (retry_at - self.now()) / 60
                self.skipped.append((task, f"{task}: the last retrain failed ({entry.get('error', '')}); "
                                           f"retried in {minutes:.0f} min"))
                continue
            usable = len({t.prompt.strip().lower() for t in self.history.usable_for(task)})
            last = entry.get("examples", 0)
            last = last if isinstance(last, int) else 0
            new = usable - last
            again = f" (retry {entry['failures']})" if entry.get("failures") else ""
            if task not in known:
                if usable >= self.settings.learning.min_examples_new_task:
                    out.append((task, f"new task with {usable} examples{again}"))
            elif new >= self.settings.learning.retrain_every:
                out.append((task, f"{new} new examples since the last retrain{again}"))
            elif new > 0 and self.in_window():
                out.append((task, f"nightly window, {new} new examples{again}"))
        return out

    def busy(self, queue: RunQueue) -> bool:
        gpu = self.settings.gpus.training
        return any(r.request.gpu == gpu and r.state.status in (*ACTIVE, "queued") for r in queue.runs())

    def check(self, profile: str | None = None, why_prefix: str = "") -> list[str]:
        """Submit retraining for due tasks if the training GPU is free. Returns the run ids started.
        A task whose examples are too few for a held-out set is refused here, before any training
        (listed in `skipped`). Its state is saved as pending: only a finished run counts as done."""
        queue = RunQueue(self.settings)
        if self.busy(queue):
            return []
        due = self.due()
        state = self._state()
        store = AdapterStore(self.settings.adapters_dir)
        current = {a.manifest.task: a.name for a in store.scan()[0]}
        started = []
        for task, why in due:
            stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(self.now()))
            built = build_dataset(self.history, task, self.dir / task / stamp, self.settings.learning.holdout_fraction)
            if reason := too_few(built):
                self.skipped.append((task, reason))
                continue
            why = why_prefix + why
            run = queue.submit(Request(
                task=task, data=str(built.train), profile=profile or self.settings.training.default_profile,
                gpu=self.settings.gpus.training, settings=str(self.settings.source),
                from_adapter=current.get(task, ""), name=current.get(task, task),
                gate={"holdout": str(built.holdout), "current": current.get(task, ""), "why": why},
                origin="learning", why=f"retrain: {why}"))
            entry = state.setdefault(task, {})
            entry.update(pending={"run": run.id, "examples": built.n_usable}, run=run.id, time=self.now(), why=why)
            self._save(state)
            started.append(run.id)
        return started

    def preference_due(self) -> list[tuple[str, str, int]]:
        """[(task, specialist, pairs)] for every specialist with `min_pairs` preference pairs more than at
        its last preference run (A/B picks and corrections of its task)."""
        state = self._state()
        out = []
        for a in AdapterStore(self.settings.adapters_dir).scan()[0]:
            entry = state.get(f"{a.manifest.task}/preference", {})
            if isinstance(entry.get("pending"), dict):
                continue
            n = len(pairs_from_history(self.history, a.manifest.task))
            last = entry.get("examples", 0) if isinstance(entry.get("examples", 0), int) else 0  # pairs then
            if n - last >= self.settings.learning.min_pairs:
                out.append((a.manifest.task, a.name, n))
        return out

    def check_preferences(self, profile: str = "preference", why_prefix: str = "") -> list[str]:
        """Submit a preference (dpo) run on each specialist with enough new pairs, if the GPU is free."""
        queue = RunQueue(self.settings)
        if self.busy(queue):
            return []
        self.settings.profile(profile)
        self._settle(self._state())
        state = self._state()
        started = []
        for task, adapter, n in self.preference_due():
            stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(self.now()))
            built = build_pairs(self.history, task, self.dir / task / stamp, self.settings.learning.holdout_fraction)
            if not (built.n_train and built.n_holdout):
                self.skipped.append((task, f"{n} preference pair(s) of {task}: the gate needs at least 2"))
                continue
            why = f"{why_prefix}{n} preference pairs"
            run = queue.submit(Request(
                task=task, data=str(built.train), profile=profile, gpu=self.settings.gpus.training,
                settings=str(self.settings.source), from_adapter=adapter, name=adapter,
                gate={"holdout": str(built.holdout), "current": adapter, "why": why},
                origin="learning", why=f"preferences: {why}"))
            entry = state.setdefault(f"{task}/preference", {})
            entry.update(pending={"run": run.id, "examples": n}, run=run.id, time=self.now(), why=why)
            self._save(state)
            started.append(run.id)
        return started


@dataclass
class BuiltPairs:
    task: str
    train: Path
    holdout: Path
    n_train: int
    n_holdout: int


def build_pairs(history: History, task: str, out_dir: Path, holdout_fraction: float) -> BuiltPairs:
    """The task's preference pairs as train / held-out .jsonl files, split by prompt as examples are."""
    train, holdout = split_holdout(pairs_from_history(history, task), holdout_fraction)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = out_dir / "pairs-train.jsonl", out_dir / "pairs-holdout.jsonl"
    for path, rows in zip(paths, (train, holdout), strict=True):
        write_jsonl(path, [pair.to_chat_row() for pair in rows])
    return BuiltPairs(task, paths[0], paths[1], len(train), len(holdout))


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
            "preferences": len(history.preferences()), "pairs": pair_counts(history)}
