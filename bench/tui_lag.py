"""Event-loop lag of the app while it streams replies, polls the GPUs and follows a training run.

    python bench/tui_lag.py [--seconds 40] [--save-settings]

A 10 ms interval timer on the app's loop records how late each tick fires; the app meanwhile streams
reply after reply from the model, reads a live training run's files every second (a real quick_test run
of the demo model, started from the app's own code path) and polls NVML. With --save-settings, every
reply is joined by a settings save (the adapter VRAM budget, which reaches the inference worker) made
from the settings screen while the reply streams. Prints p50 / p99 / max lag.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]


async def save_settings(pilot, app, budget: int) -> None:
    """Open the settings screen mid-reply, change the adapter budget, save."""
    while not app.generating:
        await pilot.pause(0.02)
    await pilot.press("ctrl+o")
    app.screen.query_one("#adapters--vram_budget_mb").value = str(budget)
    await pilot.press("ctrl+s")


async def run(seconds: float, saves: bool) -> None:
    from engine.settings import load
    from engine.train.runs import Request, RunQueue
    from tui.app import TandemApp

    work = Path(tempfile.mkdtemp())
    shutil.copy(ROOT / "settings.toml", work / "settings.toml")
    settings = load(work / "settings.toml")
    app = TandemApp(settings, poll_s=1.0)
    lags: list[float] = []
    async with app.run_test(size=(160, 48)) as pilot:
        while not app.service.ready and not app.load_error:
            await pilot.pause(0.1)
        run = RunQueue(settings).submit(Request(task="lag", data=str(ROOT / "data/samples/math.jsonl"),
                                                profile="quick_test", gpu=settings.gpus.training,
                                                settings=str(settings.source)))
        expected = time.perf_counter()

        def tick() -> None:
            nonlocal expected
            now = time.perf_counter()
            lags.append(max(0.0, now - expected - 0.01))
            expected = now

        app.set_interval(0.01, tick)
        started = time.monotonic()
        replies = 0
        while time.monotonic() - started < seconds:
            await pilot.press(*"Tell me a joke.", "enter")
            if saves:
                await save_settings(pilot, app, 4096 if replies % 2 else 8192)
            while app.generating or app.pending:
                await pilot.pause(0.05)
            replies += 1
        status = RunQueue(settings).get(run.id).state.status
        if status == "running":
            RunQueue(settings).stop(run.id)
    lags_ms = sorted(x * 1e3 for x in lags[10:])
    print(f"{seconds:.0f} s: {replies} streamed replies{' each with a settings save' if saves else ''}, "
          f"training run {run.id} followed ({status}), GPU polls every 1 s")
    print(f"event-loop lag over {len(lags_ms)} ticks: p50 {statistics.median(lags_ms):.1f} ms, "
          f"p99 {lags_ms[int(len(lags_ms) * 0.99)]:.1f} ms, max {lags_ms[-1]:.1f} ms (target p99 < 30 ms)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=40)
    ap.add_argument("--save-settings", action="store_true", help="save settings from the app during each reply")
    args = ap.parse_args()
    asyncio.run(run(args.seconds, args.save_settings))
