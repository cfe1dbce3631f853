"""Training runs on disk, and the queue that starts them: `logs/runs/<id>/`.

A run is a folder: `request.json` (what to train), `state.json` (queued / running / stopping /
stopped / finished / failed, pid, error), `metrics.jsonl` (one line per logged step), `output.log`
(the process's own output) and `checkpoints/`. The trainer is a detached process in its own session
(`python -m engine.train.trainer RUN_DIR`), so closing the app or losing SSH does not stop it; anyone can
re-attach by reading these files. One run per training GPU at a time: the rest wait as `queued`.
Whenever a GPU has queued runs and nothing active, the queue starts the next one: a finishing trainer
does it, and so does any read of the runs, so a trainer that was SIGKILLed or OOM-killed (and could
not hand over) is found dead and replaced on the next `runs()`, `get()` or `wait()`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from engine import names
from engine.files import read_json
from engine.settings import Settings, with_overrides
from engine.store.adapters import AdapterStore
from engine.telemetry import gpu_count
from engine.train.dataset import LoadReport, load_examples
from engine.train.preference import PairReport, load_pairs

ACTIVE = ("running", "stopping")
DONE = ("finished", "failed", "stopped")


class RunError(ValueError):
    """A run request or action that cannot be done (unknown id, wrong state)."""


@dataclass
class Request:
    task: str
    data: str
    profile: str
    gpu: int
    settings: str  # the settings file the trainer reads (profiles, paths, base model)
    from_adapter: str = ""
    name: str = ""  # adapter name to publish as (default: the task)
    gate: dict[str, Any] = field(default_factory=dict)  # promotion gate: holdout file, current adapter
    created: float = field(default_factory=time.time)
    origin: str = "user"  # user (goes first) | learning | experiment: who queued it
    why: str = ""  # one line the app shows: why this run is on the GPU
    overrides: dict[str, Any] = field(default_factory=dict)  # profile fields changed for this run (experiments)


@dataclass
class RunState:
    status: str = "queued"
    pid: int | None = None
    error: str = ""
    started: float | None = None
    ended: float | None = None
    step: int = 0
    total: int = 0
    resume: bool = False
    adapter: str = ""  # published adapter name
    model_dir: str = ""  # where the finished adapter was saved under models/
    outcome: str = ""  # one-line summary: published / kept as candidate (why)
    updated: float = field(default_factory=time.time)


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False))
    os.replace(tmp, path)


def _read_record(path: Path, cls: type) -> Any:
    data = read_json(path, RunError)
    fields_ = cls.__dataclass_fields__
    if not isinstance(data, dict) or not set(data) <= set(fields_):
        raise RunError(f"{path}: not a {cls.__name__} record")
    for key, value in data.items():
        expected = {"str": str, "int": int, "float": (int, float), "int | None": (int, type(None)),
                    "float | None": (int, float, type(None)), "bool": bool,
                    "dict[str, Any]": dict}[fields_[key].type]
        if not isinstance(value, expected) or (isinstance(value, bool) and expected is not bool):
            raise RunError(f"{path}: {key} = {names.shown(repr(value))} has the wrong type")
    try:
        return cls(**data)
    except TypeError as e:  # a required field missing
        raise RunError(f"{path}: {e}") from None


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child (ours, not yet reaped) is dead for our purposes.
    with contextlib.suppress(ChildProcessError, OSError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    return True


class Run:
    def __init__(self, folder: Path):
        self.dir = folder
        self.id = folder.name

    @property
    def request(self) -> Request:
        """The request; RunError naming the file (and line) when it is unreadable or the wrong shape."""
        return _read_record(self.dir / "request.json", Request)

    @property
    def state(self) -> RunState:
        try:
            return _read_record(self.dir / "state.json", RunState)
        except RunError as e:
            return RunState(status="failed", error=str(e))

    def set_state(self, **changes: Any) -> RunState:
        # a run being created has no state yet: start from a fresh one, not from "missing state.json"
        s = self.state if (self.dir / "state.json").exists() else RunState()
        for k, v in changes.items():
            setattr(s, k, v)
        s.updated = time.time()
        write_json_atomic(self.dir / "state.json", asdict(s))
        return s

    def metrics(self, since: int = 0) -> list[dict[str, Any]]:
        """Metric lines from line `since` on. A half-written last line is left for the next read."""
        path = self.dir / "metrics.jsonl"
        if not path.exists():
            return []
        lines = path.read_bytes().splitlines()
        out = []
        for i, line in enumerate(lines[since:], start=since):
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                if i == len(lines) - 1:
                    break  # still being written
                record = None
            # a damaged line in the middle keeps its place (line numbers are what `since` counts)
            out.append(record if isinstance(record, dict) else {"warning": f"metrics.jsonl line {i + 1} is damaged"})
        return out

    @property
    def checkpoints(self) -> list[Path]:
        folder = self.dir / "checkpoints"
        if not folder.exists():
            return []
        return sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))

    @property
    def stop_requested(self) -> bool:
        return (self.dir / "stop").exists()

    def summary(self) -> dict[str, Any]:
        r, s = self.request, self.state
        return {"id": self.id, "task": r.task, "profile": r.profile, "gpu": r.gpu, "status": s.status,
                "step": s.step, "total": s.total, "error": s.error, "adapter": s.adapter, "outcome": s.outcome,
                "created": r.created, "origin": r.origin, "why": r.why or "started by you"}


def next_queued(runs: list[Run]) -> Run | None:
    """The run a free GPU takes next: the person's own runs first, then learning and experiments; each
    oldest first (`runs` come oldest first)."""
    queued = [r for r in runs if r.state.status == "queued"]
    return min(queued, key=lambda r: r.request.origin != "user") if queued else None


class RunQueue:
    def __init__(self, settings: Settings, gpus: Any = gpu_count):
        """`gpus()` says how many GPUs this machine has (0: none, training falls back to the CPU)."""
        self.settings = settings
        self.gpus = gpus
        self.root = settings.logs_dir / "runs"
        self.root.mkdir(parents=True, exist_ok=True)
        self.broken: list[tuple[str, str]] = []  # (run folder, why) for runs that cannot be read

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.root / ".queue.lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            yield

    def runs(self) -> list[Run]:
        """All runs, oldest first, with dead 'running' ones marked failed and idle GPUs handed to their
        next queued run. Unreadable runs are left out and listed in `broken`."""
        out = self._scan()
        idle = {r.request.gpu for r in out if r.state.status == "queued"} - {
            r.request.gpu for r in out if r.state.status in ACTIVE}
        for gpu in sorted(idle):
            self.start_next(gpu)
        return out

    def _scan(self) -> list[Run]:
        out, broken, created = [], [], {}
        for d in self.root.iterdir():
            if d.is_dir() and not d.name.startswith("."):
                run = Run(d)
                try:
                    created[run.id] = run.request.created
                except RunError as e:
                    broken.append((d.name, str(e)))
                    continue
                out.append(run)
        out.sort(key=lambda r: (created[r.id], r.id))
        for r in out:
            self._reconcile(r)
        self.broken = sorted(broken)
        return out

    def get(self, run_id: str) -> Run:
        names.check(run_id, "run id")
        matches = [r for r in self.runs() if r.id == run_id or r.id.startswith(run_id)]
        if len(matches) != 1:
            raise RunError(f"no run {run_id!r}" if not matches else f"run id {run_id!r} is ambiguous")
        return matches[0]

    def _reconcile(self, run: Run) -> None:
        s = run.state
        if s.status in ACTIVE and not pid_alive(s.pid):
            run.set_state(status="failed", ended=time.time(),
                          error=s.error or "the training process died (killed, crashed or the machine restarted)")

    def submit(self, req: Request) -> Run:
        """Create a run; start it now if its GPU is free, else leave it queued. Everything a person
        typed is checked first: a bad name or GPU leaves no run folder behind."""
        self._check(req.task, req.name, req.from_adapter, req.gpu)
        profile = self.settings.profile(req.profile)  # unknown profile: fail now, not in the child
        if req.overrides:
            with_overrides(profile, req.overrides, f"run {req.profile}")
        if profile.method == "dpo" and not req.from_adapter:
            raise RunError(f"profile {req.profile!r} learns preferences: it improves a specialist, "
                           "name it with --from ADAPTER")
        run_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:4]
        making = self.root / f".{run_id}"  # hidden from listings until both files are there
        making.mkdir()
        write_json_atomic(making / "request.json", asdict(req))
        Run(making).set_state(status="queued")
        folder = self.root / run_id
        os.rename(making, folder)
        run = Run(folder)
        self.start_next(req.gpu)
        return run

    def start_next(self, gpu: int) -> Run | None:
        """Start the oldest queued run on `gpu` if nothing runs there."""
        with self._locked():
            runs = [r for r in self._scan() if r.request.gpu == gpu]
            if any(r.state.status in ACTIVE for r in runs):
                return None
            run = next_queued(runs)
            if run is None:
                return None
            self._spawn(run)
            return run

    def _check(self, task: str, name: str, from_adapter: str, gpu: int) -> None:
        names.check(task, "task name")
        for value in (name, from_adapter):
            if value:
                names.check(value, "adapter name")
        self.check_gpu(gpu)

    def check_gpu(self, gpu: int) -> None:
        """RunError unless `gpu` exists here. With no GPU at all any index trains on the CPU."""
        count = self.gpus()
        if gpu < 0 or (count and gpu >= count):
            have = f"GPUs 0-{count - 1}" if count > 1 else "GPU 0" if count else "no GPU"
            raise RunError(f"GPU {gpu} does not exist: this machine has {have} (see --gpu or gpus.training)")

    def device(self, gpu: int) -> str:
        """Where a run on `gpu` actually trains, in words."""
        return f"GPU {gpu}" if self.gpus() else "the CPU (no NVIDIA GPU found; slow)"

    def _spawn(self, run: Run) -> None:
        # the index is NVML's (the GPU panels' and settings' numbering): CUDA must count the same way
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(run.request.gpu), "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
               "PYTHONUNBUFFERED": "1"}
        root = Path(__file__).resolve().parents[2]  # the checkout: engine/train/runs.py
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH", "")]))
        try:
            with open(run.dir / "output.log", "ab") as log:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "engine.train.trainer", str(run.dir)],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                    start_new_session=True,  # survives the app and the SSH session
                    cwd=root,
                )
        except OSError as e:
            run.set_state(status="failed", ended=time.time(), error=f"could not start the trainer: {e}")
            return
        run.set_state(status="running", pid=proc.pid, started=time.time(), error="")

    def stop(self, run_id: str) -> Run:
        run = self.get(run_id)
        status = run.state.status
        if status == "queued":
            run.set_state(status="stopped", ended=time.time(), outcome="removed from the queue")
        elif status == "running":
            (run.dir / "stop").touch()  # the trainer checks this at every step, saves, and exits
            run.set_state(status="stopping")
        else:
            raise RunError(f"run {run.id} is {status}; only queued or running runs can be stopped")
        return run

    def resume(self, run_id: str) -> Run:
        run = self.get(run_id)
        if run.state.status not in ("stopped", "failed"):
            raise RunError(f"run {run.id} is {run.state.status}; only stopped or failed runs resume")
        (run.dir / "stop").unlink(missing_ok=True)
        run.set_state(status="queued", resume=bool(run.checkpoints), error="", ended=None)
        self.start_next(run.request.gpu)
        return run

    def submit_checked(self, task: str, data: str, profile: str | None = None, gpu: int | None = None,
                       from_adapter: str = "", name: str = "") -> tuple[Run, LoadReport | PairReport]:
        """Validate what a person asked for (profile, data rows, starting adapter) before anything is
        queued, then submit. Returns the run and the data report. The CLI and the app both start here."""
        profile = profile or self.settings.training.default_profile
        self._check(task, name, from_adapter, self.settings.gpus.training if gpu is None else gpu)
        p = self.settings.profile(profile)
        if p.method == "dpo" and not from_adapter:
            raise RunError(f"profile {profile!r} learns preferences: name the specialist it improves (--from)")
        report = (load_pairs if p.method == "dpo" else load_examples)(data, limit=p.max_samples)
        if from_adapter:
            AdapterStore(self.settings.adapters_dir).get(from_adapter)
        local = Path(data).expanduser()
        req = Request(task=task, data=str(local.resolve()) if local.exists() else data, profile=profile,
                      gpu=self.settings.gpus.training if gpu is None else gpu, settings=str(self.settings.source),
                      from_adapter=from_adapter, name=name)
        return self.submit(req), report

    def wait(self, run: Run, timeout: float, poll: float = 0.5) -> RunState:
        """Block until `run` is done (for the CLI's --wait and for tests)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.runs()  # finds a dead trainer and starts what waited behind it
            s = run.state
            if s.status in DONE:
                return s
            time.sleep(poll)
        raise TimeoutError(f"run {run.id} still {run.state.status} after {timeout:.0f} s")
