"""The learning loop end to end on the demo model: stored turns, feedback, trigger, retraining through the
queue, the promotion gate, live pickup, and durability of a turn when the process is killed mid-reply."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from engine.serve.chat import Conversation, Engine, Finished
from engine.serve.generate import Sampling
from engine.settings import load, save, updated
from engine.store.adapters import AdapterStore
from engine.store.history import History
from engine.train.learning import Learner, build_dataset, report
from engine.train.runs import RunQueue

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def math_rows(start, n):
    with open(os.path.join(ROOT, "data/samples/math.jsonl")) as fh:
        rows = [json.loads(x) for x in fh][start : start + n]
    return [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in rows]


def ask(engine, prompt, mode="auto"):
    for ev in engine.ask(Conversation(), prompt, mode=mode, sampling=Sampling(greedy=True, max_new_tokens=24)):
        if isinstance(ev, Finished):
            return ev


def test_dataset_from_history_keeps_corrections_and_good_turns(tmp_path):
    h = History(tmp_path / "h.db")
    conv = h.new_conversation()

    def turn(prompt, final, rating=None, correction=None, good=False, status="complete", task="math"):
        t = h.start_turn(conv, prompt, task, {}, {})
        h.finish_turn(t, final, "thinking", final, {}, status)
        if rating:
            h.rate(t, rating)
        if correction:
            h.correct(t, correction)
        if good:
            h.mark_good(t)
        return t

    turn("1+1?", "3", rating=1, correction="2")  # corrected: the correction is the target
    turn("2+2?", "4", rating=5)  # good reply
    turn("3+3?", "7", rating=2)  # bad, no correction: excluded
    turn("4+4?", "8", good=True)  # marked good, unrated
    turn("5+5?", "1", status="interrupted", correction="10")  # a crash, but the user said what they wanted
    turn("2+2?", "four", rating=4)  # same prompt again: the later one wins
    turn("6+6?", "12", rating=5, task="code")  # another task
    built = build_dataset(h, "math", tmp_path / "out", holdout_fraction=0.3)
    rows = [json.loads(x) for p in (built.train, built.holdout) for x in p.read_text().splitlines()]
    # each example ends with its prompt and target, after the conversation the chat showed with it
    pairs = {r["messages"][-2]["content"]: r["messages"][-1]["content"] for r in rows}
    assert pairs == {"1+1?": "2", "2+2?": "four", "4+4?": "8", "5+5?": "10"}
    assert built.n_holdout >= 1 and built.n_train + built.n_holdout == 4 == built.n_usable
    assert "thinking" not in next(r for r in rows if r["messages"][-2]["content"] == "1+1?")["messages"][-1]
    r = report(h)
    assert r["turns"] == 7 and r["rated"] == 5 and r["usage"]["math"] == 6


def test_trigger_retrain_gate_promote_then_reject(train_settings, make_adapter_factory, demo_model_dir):
    s = train_settings
    for key, value in (("learning.retrain_every", 6), ("learning.holdout_fraction", 0.3)):
        s = updated(s, key, value)
    save(s)
    s = load(s.source)
    make_adapter_factory(s)("math", [p for p, _ in math_rows(100, 60)], seed=1)
    engine = Engine(s, history=History(s.history_db))
    engine.load()
    changes = []
    engine.watch_adapters(changes.append)
    learner = Learner(s, engine.history)
    store = AdapterStore(s.adapters_dir)
    v1 = store.get("math").manifest.created

    for i, (prompt, answer) in enumerate(math_rows(0, 10)):
        done = ask(engine, prompt)
        assert done.adapter == "math"  # routed: the turn is stored under the math task
        engine.history.correct(done.turn_id, answer)
        if i == 4:
            assert learner.due() == []  # 5 examples: below the trigger
    bad = ask(engine, "What is 1 plus 1?")
    engine.history.rate(bad.turn_id, 1)  # rated low, no correction: not an example
    assert learner.due() == [("math", "10 new examples since the last retrain")]

    [run_id] = learner.check(profile="tiny")
    assert learner.check(profile="tiny") == []  # the training GPU is busy: nothing more is queued
    queue = RunQueue(s)
    state = queue.wait(queue.get(run_id), timeout=300)
    assert state.status == "finished", (queue.get(run_id).dir / "output.log").read_text()[-3000:]
    assert state.outcome.startswith("published as math (held-out loss") and " beats current " in state.outcome
    current = store.get("math").manifest
    assert current.created != v1 and current.parent == str(v1) and store.versions("math")[0].manifest.created == v1
    # what is published is what was trained (the gate evaluated v1 beside it, never over it), in a
    # folder named for the base model actually trained
    run_dir = queue.get(run_id).dir
    trained = load_file(str(sorted((run_dir / "checkpoints").glob("checkpoint-*"), key=lambda p: int(
        p.name.split("-")[1]))[-1] / "adapter_model.safetensors"))
    published = load_file(str(store.get("math").weights))
    assert trained.keys() == published.keys() and all(torch.equal(trained[k], published[k]) for k in trained)
    assert Path(state.model_dir).name.startswith(demo_model_dir.name + "_tiny_")
    deadline = time.monotonic() + 20
    while not any("math" in c.get("changed", []) for c in changes) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert engine.live.resident["math"][0] == current.created  # the live engine holds the new version
    assert ask(engine, "Combien font 3 fois 4 ?").adapter == "math"

    # Six more examples, trained with a learning rate too small to learn anything: the gate keeps the
    # current version and says why, with the numbers.
    for prompt, answer in math_rows(10, 6):
        engine.history.correct(ask(engine, prompt).turn_id, answer)
    s2 = updated(s, "training.profiles.tiny.learning_rate", "1e-12")
    save(s2)
    learner = Learner(load(s.source), engine.history)
    [run_id] = learner.check(profile="tiny")
    state = queue.wait(queue.get(run_id), timeout=300)
    assert state.status == "finished" and "kept as candidate" in state.outcome and "does not beat" in state.outcome
    assert store.get("math").manifest.created == current.created
    engine.close()


def test_killed_mid_reply_keeps_the_turn(settings_path, demo_model_dir):
    script = textwrap.dedent("""
        import sys, time
        import engine.serve.generate as gen
        from engine.serve.chat import Conversation, Delta, Engine
        from engine.serve.generate import Sampling
        from engine.settings import load
        from engine.store.history import History
        eng = Engine(load(), history=History(load().history_db))
        eng.load()
        sample = gen._sample
        gen._sample = lambda *a: (time.sleep(0.5), sample(*a))[1]  # a slow GPU: 20 tokens take 10 s
        for ev in eng.ask(Conversation(), "Tell me a joke.", sampling=Sampling(greedy=True, max_new_tokens=500)):
            if isinstance(ev, Delta):
                print("STREAMING", flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout.readline().strip() == "STREAMING"
    time.sleep(2.5)  # partial text is saved about once a second
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    h = History(settings_path.parent / "history.db")  # opening it marks turns left pending as interrupted
    [turn] = h.turns()
    assert turn.prompt == "Tell me a joke." and turn.status == "interrupted"
    raw = h._exec("SELECT raw FROM turns WHERE id=?", (turn.id,)).fetchone()[0]
    assert raw  # what had streamed before the kill is there


def test_nightly_window_and_new_task_triggers(settings, make_adapter):
    from datetime import datetime

    make_adapter("math", ["x"], seed=1)
    s = settings
    for key, value in (("learning.nightly_window", "23:00-02:00"), ("learning.retrain_every", 100),
                       ("learning.min_examples_new_task", 3)):
        s = updated(s, key, value)
    h = History(s.history_db)
    conv = h.new_conversation()
    for i, task in enumerate(["math", "poetry", "poetry", "poetry"]):
        t = h.start_turn(conv, f"prompt {i}", task, {}, {})
        h.finish_turn(t, f"answer {i}", "", "", {}, "complete")
        h.rate(t, 5)
    at = {hour: datetime(2026, 11, 24, hour, 30).timestamp() for hour in (0, 12, 23)}
    day = Learner(s, h, now=lambda: at[12]).due()
    assert day == [("poetry", "new task with 3 examples")]  # math has 1 new example: not enough by day
    for hour in (23, 0):  # the window wraps past midnight
        assert ("math", "nightly window, 1 new examples") in Learner(s, h, now=lambda hour=hour: at[hour]).due()
