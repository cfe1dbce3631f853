"""Closing the inference worker and the workstation under every kind of job: bounded, nothing left
waiting, nothing run or written after close."""

import contextlib
import sqlite3
import threading
import time

import pytest

import engine.serve.generate as gen
from engine.serve.chat import Conversation, Finished, Routed
from engine.serve.generate import Sampling
from engine.serve.worker import InferenceWorker, Request, WorkerClosed
from engine.service import Workstation

SLOW = Sampling(greedy=True, max_new_tokens=400)


def in_thread(fn):
    """Run `fn` in a thread; (thread, box) where box gets 'result' or 'error'."""
    box: dict = {}

    def run():
        try:
            box["result"] = fn()
        except BaseException as e:
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


def closed(worker, timeout=10.0):
    """Wait until `close` (in another thread) has marked the worker closed: no sleep guesses the order."""
    deadline = time.monotonic() + timeout
    while not worker._closed:
        assert time.monotonic() < deadline, "close never started"
        time.sleep(0.005)


def test_close_drops_queued_jobs_instead_of_running_them():
    worker = InferenceWorker()
    gate, started, ran = threading.Event(), threading.Event(), []
    first = worker.submit(lambda: (started.set(), gate.wait(10))[1])
    queued = [worker.submit(lambda i=i: ran.append(i)) for i in range(3)]
    assert started.wait(10)  # running before close (on a busy box the worker may not have taken it yet)
    closing, _ = in_thread(worker.close)
    closed(worker)
    gate.set()
    closing.join(5)
    assert not closing.is_alive() and first.result() is True
    for job in queued:
        with pytest.raises(WorkerClosed):
            job.result(timeout=1)
    assert ran == []


def test_no_job_is_left_waiting_when_close_races_submitters():
    worker = InferenceWorker()
    jobs: list = []
    lock = threading.Lock()

    def submitter():
        for _ in range(300):
            job = worker.submit(lambda: 1)
            with lock:
                jobs.append(job)

    threads = [threading.Thread(target=submitter) for _ in range(4)]
    for t in threads:
        t.start()
    worker.close()
    for t in threads:
        t.join()
    for job in jobs:  # each one ran or was refused; none waits forever
        with contextlib.suppress(WorkerClosed):
            assert job.result(timeout=5) == 1


def test_stream_after_close_raises_at_once():
    worker = InferenceWorker()
    worker.close()
    req = Request(turns=[], adapter=None, sampling=SLOW)
    t, box = in_thread(lambda: list(worker.stream(req)))
    t.join(5)
    assert not t.is_alive(), "stream waited forever on a job that could never run"
    assert isinstance(box.get("error"), WorkerClosed)


def slow_tokens(monkeypatch, seconds=0.02):
    sample = gen._sample
    monkeypatch.setattr(gen, "_sample", lambda *a: (time.sleep(seconds), sample(*a))[1])


def test_a_cancelled_queued_request_never_selects(engine, make_adapter, monkeypatch):
    make_adapter("math", ["x"], seed=1)
    engine.refresh_adapters()
    selected = []
    select = engine.live.select
    monkeypatch.setattr(engine.live, "select", lambda name: (selected.append(name), select(name))[1])
    gate = threading.Event()
    engine.worker.submit(lambda: gate.wait(10))  # the worker is busy: the request below waits in the queue
    cancel = threading.Event()
    it = engine.ask(Conversation(), "Hello!", mode="math", sampling=SLOW, store=False, cancel=cancel)
    t, box = in_thread(lambda: list(it))
    time.sleep(0.1)
    cancel.set()
    gate.set()
    t.join(30)
    done = next(ev for ev in box["result"] if isinstance(ev, Finished))
    assert done.reply.stats.stop == "cancelled" and done.reply.stats.tokens_out == 0
    assert selected == [], "a request cancelled while queued still loaded its adapter"


def test_engine_close_under_a_running_and_a_queued_reply(engine, monkeypatch):
    slow_tokens(monkeypatch)
    running = engine.ask(Conversation(), "Hello!", mode="base", sampling=SLOW, store=False)
    assert isinstance(next(running), Routed)  # decoding on the worker now
    rest, box = in_thread(lambda: list(running))
    queued, qbox = in_thread(lambda: list(engine.ask(Conversation(), "Hi", mode="base", sampling=SLOW,
                                                     store=False)))
    time.sleep(0.2)
    started = time.monotonic()
    engine.close()
    assert time.monotonic() - started < 5, "close waited for the whole reply"
    rest.join(5)
    queued.join(5)
    assert not rest.is_alive() and not queued.is_alive()
    done = next(ev for ev in box["result"] if isinstance(ev, Finished))
    assert done.reply.stats.stop == "cancelled" and done.reply.stats.tokens_out < SLOW.max_new_tokens
    assert isinstance(qbox.get("error"), WorkerClosed)


def test_engine_close_under_a_watcher_load_and_a_trace(engine, make_adapter, monkeypatch):
    """The watcher's refresh and an expert trace (the A/B and F6 path) are queued behind a busy job."""
    engine.watch_adapters(interval=0.05)
    gate = threading.Event()
    engine.worker.submit(lambda: gate.wait(10))
    make_adapter("math", ["x"], seed=1)  # the watcher sees it and queues a refresh
    trace, box = in_thread(lambda: engine.trace_experts("Hello!", "base"))
    time.sleep(0.3)
    closing, _ = in_thread(engine.close)
    closed(engine.worker)
    gate.set()
    closing.join(5)
    trace.join(5)
    assert not closing.is_alive() and not trace.is_alive()
    assert isinstance(box.get("error"), WorkerClosed)


def test_workstation_close_under_a_reply_writes_nothing_after(settings, demo_model_dir, monkeypatch):
    ws = Workstation(settings)
    ws.load(lambda *_: None, lambda _: None, lambda _: None)
    slow_tokens(monkeypatch)
    writes_after_close: list = []
    history = ws.history
    close = history.close
    closed = threading.Event()

    def close_then_watch():
        close()
        closed.set()

    monkeypatch.setattr(history, "close", close_then_watch)
    finish = history.finish_turn
    monkeypatch.setattr(history, "finish_turn", lambda *a: (writes_after_close.append(closed.is_set()), finish(*a)))
    it = ws.ask(ws.new_conversation(), "Hello!", sampling=SLOW)
    routed = next(it)
    rest, box = in_thread(lambda: list(it))
    time.sleep(0.2)
    ws.close()
    rest.join(5)
    assert not rest.is_alive() and "error" not in box, box.get("error")
    assert writes_after_close == [False]  # the turn was finished before the history closed
    with pytest.raises(WorkerClosed):
        list(ws.ask(ws.new_conversation(), "again"))
    db = sqlite3.connect(settings.history_db)
    assert db.execute("SELECT status FROM turns WHERE id=?", (routed.turn_id,)).fetchone() == ("cancelled",)


def test_a_cancelled_reply_with_no_final_answer_is_no_context(engine, monkeypatch):
    """Regression: the raw completion (analysis and markup) became the assistant's turn."""
    conv = Conversation()
    cancel = threading.Event()
    seen = 0
    for ev in engine.ask(conv, "Hello!", mode="base", sampling=SLOW, cancel=cancel, store=False):
        if not isinstance(ev, Finished | Routed):
            seen += 1
            if seen == 2:
                cancel.set()
        elif isinstance(ev, Finished):
            assert ev.reply.stats.stop == "cancelled" and not ev.reply.parser.final and ev.reply.raw
    assert conv.turns == []
    cut = Sampling(greedy=True, max_new_tokens=2)
    done = next(ev for ev in engine.ask(conv, "Hello!", mode="base", sampling=cut, store=False)
            if isinstance(ev, Finished))
    assert done.reply.stats.stop == "length" and not done.reply.parser.final
    assert conv.turns == []
    done = next(ev for ev in engine.ask(conv, "Hello!", mode="base", sampling=Sampling(greedy=True))
            if isinstance(ev, Finished))
    assert done.reply.parser.final  # greedy on the demo model: it answers in the final channel
    assert [t.content for t in conv.turns] == ["Hello!", done.reply.parser.final]
