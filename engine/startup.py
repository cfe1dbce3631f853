"""Start-up on a GPU box: compile caches that outlive the process, and load steps that say how long they have left.

A fresh box spends minutes before the first reply (unsloth's import, the demo model's build, torch.compile
of the fast decoder), and the trainer's first step compiles too. torch keeps its compile caches (inductor's
FX graph and AOTAutograd caches, Triton's kernels) under /tmp by default, which a reboot or a fresh
container loses; under Tandem's cache dir a second start skips the compile. How long each load step took
is remembered there too, per cold or warm compile cache, so the next start can say how long it has left.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
import time
from pathlib import Path

from engine.serve.demo_model import Progress, cache_root

TICK_S = 5.0  # how often a running step repeats its message with the time left
COUNTDOWN = re.compile(r"\d+ s left")  # a message that already says how long it has left (the demo build)
# First-start guesses (seconds, H100 box) for the slow steps, until this machine has timed them itself.
GUESS_S = {("compiling", "cold"): 120.0, ("compiling", "warm"): 20.0, ("importing", "cold"): 20.0,
           ("importing", "warm"): 20.0}


GPU_MEMORY_ENV = "TANDEM_GPU_MEMORY_GB"


def gpu_memory_cap_gb() -> float | None:
    """TANDEM_GPU_MEMORY_GB: the GiB of a card Tandem's processes hold themselves to, as a smaller card
    would (None: unset or 0). The chat process sizes `serve_in_4bit = "auto"` by it, the trainer caps its
    allocator to it."""
    value = os.environ.get(GPU_MEMORY_ENV, "").strip()
    try:
        cap = float(value or 0)
    except ValueError:
        cap = -1.0
    if not math.isfinite(cap) or cap < 0:
        raise ValueError(f"{GPU_MEMORY_ENV}={value!r}: expected a number of GB, e.g. 24")
    return cap or None


def compile_cache_dir() -> Path:
    return Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR") or cache_root() / "inductor")


def use_compile_caches() -> None:
    """Keep torch's compile caches under Tandem's cache dir; call before anything compiles (a value the
    user has set wins)."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root() / "inductor"))


def compile_cache_state() -> str:
    """'warm' once inductor has compiled anything into the cache dir in use, else 'cold'."""
    graphs = compile_cache_dir() / "fxgraph"
    return "warm" if graphs.is_dir() and any(graphs.glob("*/*")) else "cold"


class Phases:
    """A Progress callback for a model load. Each message starts a step that lasts until the next one;
    while a step runs, its message is repeated every `tick_s` with the seconds spent and, when this
    machine has timed the step before (or it is a known slow one), the seconds left. Durations are
    recorded in `record` when the load reports 100 % or `close()` is called."""

    def __init__(self, say: Progress, record: Path | None = None, tick_s: float = TICK_S):
        self.say = say
        self.record = record or cache_root() / "startup.json"
        self.tick_s = tick_s
        try:
            self.times: dict[str, float] = json.loads(self.record.read_text())
        except (OSError, ValueError):
            self.times = {}
        self.lock = threading.Lock()
        self.step: tuple[str, str, float, float] | None = None  # (key, message, fraction, began)
        self.closed = threading.Event()
        self.ticker: threading.Thread | None = None

    @staticmethod
    def key(message: str) -> str:
        """The part of a message that names the step (before any ':' detail), with the cache state."""
        return f"{message.split(':')[0].strip()} [{compile_cache_state()} compile cache]"

    def expected(self, key: str) -> float | None:
        if key in self.times:
            return self.times[key]
        state = "warm" if "[warm" in key else "cold"
        return next((s for (word, st), s in GUESS_S.items() if key.startswith(word) and st == state), None)

    def __call__(self, message: str, fraction: float) -> None:
        with self.lock:
            self._finish_step()
            if fraction >= 1.0 or COUNTDOWN.search(message):  # done, or a step that counts down by itself
                self.say(message, fraction)
                if fraction >= 1.0:
                    self._close()
                return
            self.step = (self.key(message), message, fraction, time.monotonic())
            self.say(self._text(), fraction)
        if self.ticker is None:
            self.ticker = threading.Thread(target=self._tick, name="load progress", daemon=True)
            self.ticker.start()

    def close(self) -> None:
        """Stop repeating (the load ended, maybe with an error) and record what was timed."""
        with self.lock:
            self._close()

    def _text(self) -> str:
        assert self.step is not None
        key, message, _, began = self.step
        spent = time.monotonic() - began
        expected = self.expected(key)
        if expected is None or expected < 1:  # never timed here, or too quick to count down
            return f"{message} · {spent:.0f} s" if spent >= 1 else message
        left = expected - spent
        over = "longer than last time" if key in self.times else "longer than expected"  # a guess is no "last time"
        return f"{message} · {spent:.0f} s, " + (f"~{left:.0f} s left" if left >= 1 else over)

    def _tick(self) -> None:
        while not self.closed.wait(self.tick_s):
            with self.lock:
                if self.step is not None and not self.closed.is_set():
                    self.say(self._text(), self.step[2])

    def _finish_step(self) -> None:
        if self.step is not None:
            key, _, _, began = self.step
            self.times[key] = round(time.monotonic() - began, 1)
            self.step = None

    def _close(self) -> None:
        self._finish_step()
        if self.closed.is_set():
            return
        self.closed.set()
        try:
            self.record.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.record.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.times, indent=1, sort_keys=True))
            os.replace(tmp, self.record)
        except OSError:  # a read-only cache dir costs the next estimate, never the start
            pass
