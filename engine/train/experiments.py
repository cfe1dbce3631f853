"""Experiments: train several variants of a specialist (rank, learning rate, steps, data) and keep the best.

An experiment is a folder `logs/experiments/<id>/` with `experiment.json` (the task, the grid, the
variants and their run ids, the outcome), the held-out set every variant is scored on, and each data
source's training part. Its variants are ordinary runs (`engine.train.runs`): detached, resumable,
stoppable, queued behind the person's own runs. Each variant's trainer scores it with the promotion
gate's held-out evaluation on the same held-out rows, against the current specialist, and publishes
nothing. When the last variant ends (its trainer, or any later read of the experiments, notices) the
experiment concludes once, under a lock: the variant with the lowest held-out loss is published if it
beats the current specialist by the gate's margin (or there is none yet); otherwise the current one
stays. `logs/experiments/<id>/experiment.json`'s `outcome` says what was found, and the app notifies it.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import math
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from engine import names
from engine.files import read_json
from engine.settings import VARY_KEYS, Settings, SettingsError, with_overrides
from engine.store.adapters import AdapterError, AdapterStore, Manifest
from engine.store.history import History
from engine.train.dataset import Example, load_examples
from engine.train.learning import Built, build_dataset, split_holdout, too_few, write_jsonl
from engine.train.runs import DONE, Request, Run, RunError, RunQueue, write_json_atomic

MAX_VARIANTS = 16
MIN_IMPROVEMENT = 1e-3  # as the promotion gate's (engine.train.trainer)


class ExperimentError(ValueError):
    """An experiment that cannot be made or read; one line naming what is wrong."""


@dataclass
class Variant:
    label: str  # "r=8 lr=0.0001" or "data=b.jsonl": how the table names it
    overrides: dict[str, Any]
    data: str  # its training file
    run_id: str = ""


@dataclass
class Experiment:
    id: str
    task: str
    profile: str
    holdout: str
    current: str  # the specialist to beat ("" when the task has none yet)
    variants: list[Variant]
    status: str = "queued"  # waiting (for the GPU to idle) | running | done
    created: float = field(default_factory=time.time)
    outcome: str = ""  # what was found, one line
    best: str = ""  # the winning variant's label
    promoted: bool = False
    notified: bool = False  # the app told the person

    @classmethod
    def from_dict(cls, data: Any, where: Path) -> Experiment:
        try:
            return cls(**{**data, "variants": [Variant(**v) for v in data["variants"]]})
        except (TypeError, KeyError) as e:
            raise ExperimentError(f"{where}: not an experiment record ({e})") from None


def parse_vary(specs: list[str]) -> dict[str, list[float | int]]:
    """['r=8,16', 'lr=1e-4,2e-4'] -> {'rank': [8, 16], 'learning_rate': [0.0001, 0.0002]}."""
    grid: dict[str, list[float | int]] = {}
    for spec in specs:
        key, sep, values = spec.partition("=")
        key = key.strip().lower()
        if not sep or key not in VARY_KEYS:
            raise ExperimentError(f"--vary {names.shown(spec)}: expected NAME=V1,V2 with NAME one of "
                                  f"{', '.join(sorted(set(VARY_KEYS)))}")
        field_name = VARY_KEYS[key]
        out = []
        for text in values.split(","):
            try:
                number = float(text)
            except ValueError:
                number = math.nan
            if not math.isfinite(number):
                raise ExperimentError(f"--vary {key}: {names.shown(text.strip())} is not a number")
            is_int = field_name in ("rank", "alpha", "max_steps", "batch_size")
            if is_int and number != int(number):
                raise ExperimentError(f"--vary {key}: {text.strip()} must be a whole number")
            out.append(int(number) if is_int else number)
        if field_name in grid:
            raise ExperimentError(f"--vary {key}: given twice")
        grid[field_name] = list(dict.fromkeys(out))
    return grid


def _label(overrides: dict[str, Any], data: str | None) -> str:
    short = {v: min((k for k in VARY_KEYS if VARY_KEYS[k] == v), key=len) for v in VARY_KEYS.values()}
    parts = [f"{short.get(k, k)}={v:g}" for k, v in overrides.items()]
    return " ".join(parts + ([f"data={Path(data).name}"] if data else [])) or "profile as is"


class Experiments:
    def __init__(self, settings: Settings, history: History | None = None):
        self.settings = settings
        self.history = history
        self.root = settings.logs_dir / "experiments"
        self.root.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.root / ".lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            yield

    def _save(self, exp: Experiment) -> None:
        write_json_atomic(self.root / exp.id / "experiment.json", asdict(exp))

    def _read(self, folder: Path) -> Experiment:
        return Experiment.from_dict(read_json(folder / "experiment.json", ExperimentError), folder)

    # ----- making one
    def create(self, task: str, vary: dict[str, list[Any]], data: list[str] | None = None,
               profile: str | None = None, start: bool = True) -> Experiment:
        """Check everything, write the held-out set and each source's training part, and queue the variants
        (or leave them `waiting` for the idle scheduler when `start` is false)."""
        names.check(task, "task name")
        profile = profile or self.settings.training.default_profile
        base = self.settings.profile(profile)
        if base.method != "sft":
            raise ExperimentError(f"profile {profile!r} learns preferences; experiments compare reply (sft) profiles")
        grid = [dict(zip(vary, values, strict=True)) for values in itertools.product(*vary.values())] or [{}]
        sources: list[str | None] = list(dict.fromkeys(data)) if data else [None]
        if len(grid) * len(sources) < 2:
            raise ExperimentError("an experiment needs at least 2 variants: --vary NAME=V1,V2 or two --data")
        if len(grid) * len(sources) > MAX_VARIANTS:
            raise ExperimentError(f"{len(grid) * len(sources)} variants; at most {MAX_VARIANTS} per experiment")
        for overrides in grid:
            try:
                with_overrides(base, overrides, f"--vary ({_label(overrides, None)})")
            except SettingsError as e:
                raise ExperimentError(str(e)) from None
        current = self._current(task)
        RunQueue(self.settings).check_gpu(self.settings.gpus.training)
        exp_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:4]
        folder = self.root / exp_id
        folder.mkdir()
        try:
            trains, holdout = self._data(task, sources, folder, base.max_samples)
        except BaseException:  # a bad source: no half-made experiment is left behind
            shutil.rmtree(folder, ignore_errors=True)
            raise
        variants = [Variant(_label(o, src if len(sources) > 1 else None), o, trains[src])
                    for src in sources for o in grid]
        exp = Experiment(exp_id, task, profile, str(holdout), current, variants,
                         status="running" if start else "waiting")
        self._save(exp)
        if start:
            self.start(exp)
        return exp

    def _current(self, task: str) -> str:
        """The task's specialist now ("" when it has none yet)."""
        return next((a.name for a in AdapterStore(self.settings.adapters_dir).scan()[0] if a.manifest.task == task), "")

    def _data(self, task: str, sources: list[str | None], folder: Path,
              limit: int) -> tuple[dict[str | None, str], Path]:
        """Training files per source and one held-out file for all. From the history when no source is
        given; else each source is split by a hash of its prompts, and the held-out parts pooled."""
        fraction = self.settings.learning.holdout_fraction
        if sources == [None]:
            if self.history is None:
                raise ExperimentError("no --data given and no history to learn from")
            built = build_dataset(self.history, task, folder, fraction)
            if reason := too_few(built):
                raise ExperimentError(f"cannot score variants: {reason}")
            return {None: str(built.train)}, built.holdout
        loaded = {src: load_examples(src, limit=limit).examples for src in sources}
        held: dict[str, Example] = {}
        trains: dict[str | None, str] = {}
        parts = {}
        for src, examples in loaded.items():
            train, hold = split_holdout({ex.user_prompt.strip().lower(): ex for ex in examples}, fraction)
            parts[src] = train
            held.update({ex.user_prompt.strip().lower(): ex for ex in hold})
        for i, (src, train) in enumerate(parts.items()):
            train = [ex for ex in train if ex.user_prompt.strip().lower() not in held]  # never trained on
            if reason := too_few(Built(task, Path(), Path(), len(train), len(held), len(train) + len(held))):
                raise ExperimentError(f"{src}: {reason}")
            path = folder / f"train-{i}.jsonl"
            write_jsonl(path, [ex.to_chat_row() for ex in train])
            trains[src] = str(path)
        holdout = folder / "holdout.jsonl"
        write_jsonl(holdout, [ex.to_chat_row() for ex in held.values()])
        return trains, holdout

    def start(self, exp: Experiment) -> Experiment:
        """Queue the variants as runs on the training GPU (behind the person's own runs), to beat the task's
        specialist as it is now (one may have been published since a waiting experiment was made)."""
        queue = RunQueue(self.settings)
        exp.current = self._current(exp.task)
        for v in exp.variants:
            run = queue.submit(Request(
                task=exp.task, data=v.data, profile=exp.profile, gpu=self.settings.gpus.training,
                settings=str(self.settings.source), name=exp.current or exp.task, overrides=v.overrides,
                gate={"holdout": exp.holdout, "current": exp.current, "experiment": exp.id},
                origin="experiment", why=f"experiment {exp.id}: {v.label}"))
            v.run_id = run.id
            exp.status = "running"
            self._save(exp)
        return exp

    # ----- reading
    def list(self) -> list[Experiment]:
        """Every experiment, oldest first; finished ones are concluded on the way."""
        out = []
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            try:
                out.append(self.conclude(folder.name))
            except ExperimentError:
                continue  # a damaged record is skipped, never fatal to the listing
        return out

    def get(self, exp_id: str) -> Experiment:
        names.check(exp_id, "experiment id")
        matches = [e for e in self.list() if e.id == exp_id or e.id.startswith(exp_id)]
        if len(matches) != 1:
            raise ExperimentError(f"no experiment {exp_id!r}" if not matches else f"experiment id {exp_id!r} is "
                                  "ambiguous")
        return matches[0]

    def _run(self, v: Variant) -> Run | None:
        if not v.run_id or not names.is_valid(v.run_id):
            return None
        run = Run(self.settings.logs_dir / "runs" / v.run_id)
        return run if run.dir.is_dir() else None

    def table(self, exp: Experiment) -> list[dict[str, Any]]:
        """One row per variant: status, held-out loss (and the current one's), time, peak memory, loss curve."""
        rows = []
        for v in exp.variants:
            run = self._run(v)
            state = run.state if run else None
            result = _result(run)
            gate = result.get("gate", {})
            rows.append({"label": v.label, "run": v.run_id, "status": state.status if state else "not started",
                         "heldout_loss": gate.get("new_loss"), "current_loss": gate.get("old_loss"),
                         "seconds": result.get("seconds"), "peak_mem_gb": result.get("peak_mem_gb"),
                         "curve": [(m["step"], m["loss"]) for m in (run.metrics() if run else []) if "loss" in m],
                         "error": state.error if state else ""})
        return rows

    # ----- concluding
    def conclude(self, exp_id: str) -> Experiment:
        """Decide an experiment whose variants have all ended: publish the best if it beats the current
        specialist. Done once, under a lock; returns the experiment as it now stands."""
        folder = self.root / names.check(exp_id, "experiment id")
        with self._locked():
            exp = self._read(folder)
            if exp.status != "running":
                return exp
            runs = [self._run(v) for v in exp.variants]
            if any(r is None or r.state.status not in DONE for r in runs):
                return exp
            scored = [(r, _result(r)["gate"]) for r in runs
                      if r is not None and r.state.status == "finished" and "new_loss" in _result(r).get("gate", {})]
            exp.status = "done"
            if not scored:
                exp.outcome = "no variant finished; the current specialist stays"
                self._save(exp)
                return exp
            best_run, best = min(scored, key=lambda rg: rg[1]["new_loss"])
            exp.best = next(v.label for v in exp.variants if v.run_id == best_run.id)
            old = best.get("old_loss")
            beats = old is None or best["new_loss"] < old - MIN_IMPROVEMENT
            versus = f"current {old:.4f}" if old is not None else "no current specialist"
            if beats:
                try:
                    manifest = Manifest.from_dict(read_json(best_run.dir / "candidate.json", ExperimentError))
                    AdapterStore(self.settings.adapters_dir).publish(Path(best_run.state.model_dir), manifest)
                    exp.promoted = True
                    exp.outcome = (f"{exp.best} is best (held-out loss {best['new_loss']:.4f} vs {versus}) of "
                                   f"{len(scored)}: published as {manifest.name}")
                except (AdapterError, ExperimentError, OSError) as e:
                    exp.outcome = f"{exp.best} is best but could not be published: {e}"
            else:
                exp.outcome = (f"best variant {exp.best} (held-out loss {best['new_loss']:.4f}) does not beat "
                               f"{versus}: the current specialist stays")
            self._save(exp)
            return exp

    def mark_notified(self, exp_id: str) -> None:
        with self._locked():
            exp = self._read(self.root / names.check(exp_id, "experiment id"))
            exp.notified = True
            self._save(exp)

    def next_waiting(self) -> Experiment | None:
        return next((e for e in self.list() if e.status == "waiting"), None)


def _result(run: Run | None) -> dict[str, Any]:
    if run is None:
        return {}
    try:
        data = read_json(run.dir / "result.json", RunError)
    except RunError:
        return {}
    return data if isinstance(data, dict) else {}
