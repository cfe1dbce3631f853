"""Training runs on disk, and the queue that starts them: `logs/runs/<id>/`.

A run is a folder: `request.json` (what to train), `state.json` (queued / running / stopping /
stopped / finished / failed, pid, error), `metrics.jsonl` (one line per logged step), `output.log`
(the process's own output) and `checkpoints/`. The trainer is a detached process in its own session
(`python -m engine.train.trainer RUN_DIR`), so closing the app or losing SSH does not stop it; anyone can
re-attach by reading these files. One run per training GPU at a time: the rest wait as `queued` and
each finishing run starts the next one.
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

from engine.settings import Settings
from engine.store.adapters import AdapterStore
from engine.train.dataset import LoadReport, load_examples

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
        return Request(**json.loads((self.dir / "request.json").read_text()))

    @property
    def state(self) -> RunState:
        try:
            return RunState(**json.loads((self.dir / "state.json").read_text()))
        except (FileNotFoundError, json.JSONDecodeError):
            return RunState(status="failed", error="state.json missing or unreadable")

    def set_state(self, **changes: Any) -> RunState:
        s = self.state
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
        out = []
        for line in path.read_text().splitlines()[since:]:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break
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
                "created": r.created}


class RunQueue:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.root = settings.logs_dir / "runs"
        self.root.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.root / ".queue.lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            yield

    def runs(self) -> list[Run]:
        """All runs, oldest first, with dead 'running' ones marked failed."""
        out = []
        for d in self.root.iterdir():
            if d.is_dir() and (d / "request.json").exists():
                out.append(Run(d))
        out.sort(key=lambda r: (r.request.created, r.id))
        for r in out:
            self._reconcile(r)
        return out

    def get(self, run_id: str) -> Run:
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
        """Create a run; start it now if its GPU is free, else leave it queued."""
        self.settings.profile(req.profile)  # unknown profile: fail now, not in the child
        run_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:4]
        folder = self.root / run_id
        folder.mkdir()
        write_json_atomic(folder / "request.json", asdict(req))
        run = Run(folder)
        run.set_state(status="queued")
        self.start_next(req.gpu)
        return run

    def start_next(self, gpu: int) -> Run | None:
        """Start the oldest queued run on `gpu` if nothing runs there."""
        with self._locked():
            runs = [r for r in self.runs() if r.request.gpu == gpu]
            if any(r.state.status in ACTIVE for r in runs):
                return None
            queued = [r for r in runs if r.state.status == "queued"]
            if not queued:
                return None
            run = queued[0]
            self._spawn(run)
            return run

    def _spawn(self, run: Run) -> None:
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(run.request.gpu), "PYTHONUNBUFFERED": "1"}
        root = Path(__file__).resolve().parents[2]  # the checkout: engine/train/runs.py
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH", "")]))
        with open(run.dir / "output.log", "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "engine.train.trainer", str(run.dir)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                start_new_session=True,  # survives the app and the SSH session
                cwd=root,
            )
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
                       from_adapter: str = "", name: str = "") -> tuple[Run, LoadReport]:
        """Validate what a person asked for (profile, data rows, starting adapter) before anything is
        queued, then submit. Returns the run and the data report. The CLI and the app both start here."""
        profile = profile or self.settings.training.default_profile
        report = load_examples(data, limit=self.settings.profile(profile).max_samples)
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
            self._reconcile(run)
            s = run.state
            if s.status in DONE:
                return s
            time.sleep(poll)
        raise TimeoutError(f"run {run.id} still {run.state.status} after {timeout:.0f} s")
