"""The idle scheduler with a fake clock: the training GPU takes pending work only once it has been idle long
enough or in the nightly window, never while the person's own run is there, and says why."""

import os
import signal
import time
from datetime import datetime

import pytest

from engine.settings import SettingsError, updated
from engine.store.history import History
from engine.train.experiments import Experiments, parse_vary
from engine.train.idle import IdleScheduler
from engine.train.runs import Run, RunQueue, write_json_atomic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MATH = os.path.join(ROOT, "data/samples/math.jsonl")


def _examples(s, task, n):
    h = History(s.history_db)
    conv = h.new_conversation()
    for i in range(n):
        t = h.start_turn(conv, f"a question {i}", task, {}, {})
        h.finish_turn(t, f"an answer {i}", "", "", {}, "complete")
        h.rate(t, 5)
    return h


def _end(queue, run_ids):
    """Stop what the scheduler started (queued ones first, so none takes the GPU), without training."""
    runs = [queue.get(i) for i in run_ids]
    for r in runs:
        if r.state.status == "queued":
            queue.stop(r.id)
    for r in runs:
        if r.state.pid and r.state.status == "running":
            os.kill(r.state.pid, signal.SIGKILL)


def test_idle_work_waits_for_the_idle_time_and_for_the_persons_run(settings):
    s = updated(updated(settings, "learning.idle_after_minutes", 30), "learning.min_examples_new_task", 2)
    h = _examples(s, "poetry", 3)
    offset = [0.0]
    sched = IdleScheduler(s, h, now=lambda: time.time() + offset[0])
    first = sched.tick()
    assert first.started == [] and "idle 0 min; idle work after 30 min" in first.status
    offset[0] = 29 * 60
    assert sched.tick().started == []

    # the person's own run holds the GPU: nothing is added, and the status says whose run it is
    mine = s.logs_dir / "runs" / "mine"
    mine.mkdir(parents=True)
    write_json_atomic(mine / "request.json", {"task": "math", "data": MATH, "profile": "quick_test",
                                              "gpu": s.gpus.training, "settings": str(s.source)})
    Run(mine).set_state(status="running", pid=os.getpid())
    offset[0] = 120 * 60
    busy = sched.tick()
    assert busy.started == [] and "started by you" not in busy.status and "your run" in busy.status
    Run(mine).set_state(status="finished", ended=time.time())

    offset[0] = 10 * 60  # the idle time counts from when that run ended, not from the first tick
    assert sched.tick().started == []
    offset[0] = 31 * 60
    tick = sched.tick()
    try:
        [run_id] = tick.started
        run = RunQueue(s).get(run_id)
        assert tick.status == "idle 31 min: retraining (1 run(s))"
        assert run.request.origin == "learning" and run.request.why == "retrain: idle 31 min: new task with 3 examples"
        assert run.summary()["why"] == run.request.why  # what the app shows beside the run
    finally:
        _end(RunQueue(s), tick.started)


def test_the_nightly_window_starts_a_waiting_experiment_at_once(settings):
    at_night = datetime(2026, 11, 24, 2, 30).timestamp()
    s = updated(updated(settings, "learning.nightly_window", "02:00-05:00"), "learning.idle_after_minutes", 0)
    h = History(s.history_db)
    exp = Experiments(s, h).create("math", parse_vary(["r=4,8"]), [MATH], "quick_test", start=False)
    assert exp.status == "waiting" and RunQueue(s).runs() == []
    assert "idle work off" in IdleScheduler(s, h, now=lambda: at_night - 3 * 3600).tick().status
    tick = IdleScheduler(s, h, now=lambda: at_night).tick()
    try:
        assert len(tick.started) == 2 and tick.status == f"nightly window 02:00-05:00: experiment {exp.id} on math"
        assert Experiments(s).get(exp.id).status == "running"
        whys = [RunQueue(s).get(i).request.why for i in tick.started]
        assert whys == [f"experiment {exp.id}: r=4", f"experiment {exp.id}: r=8"]
    finally:
        _end(RunQueue(s), tick.started)


def test_idle_settings_are_checked(settings):
    with pytest.raises(SettingsError, match=r"learning.idle_after_minutes = -1: expected 0 \(never\)"):
        updated(settings, "learning.idle_after_minutes", -1)
    with pytest.raises(SettingsError, match="learning.min_pairs"):
        updated(settings, "learning.min_pairs", 1)
