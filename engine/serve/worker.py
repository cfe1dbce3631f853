"""The inference worker: the one thread that touches the model.

Loading, warm-up, every reply, expert traces, A/B answers and the watcher's loads and evictions are
jobs on its queue, run one at a time. A reply request carries its adapter: selecting it and decoding
happen in the same job, so nothing can switch the adapter between the choice and the reply (which is
what history and A/B preferences record). Callers on other threads get results back through a Future
(`call`) or an event queue (`stream`).

Closing is bounded: jobs still queued fail with WorkerClosed without running, a reply being decoded
ends at its next token (its cancel flag is set), and a job submitted after close fails at once.
Jobs wait in a priority queue, first in first out within a priority: the person at the keyboard
(`KEYBOARD`, the default) goes before API clients (`API`), so API traffic never starves the app; a
reply already running is never interrupted.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

from engine.harmony import HarmonyParser, Turn, fit_turns
from engine.serve import checkpoint_template
from engine.serve.generate import Reply, Sampling, Stats, stream
from engine.serve.residency import LiveAdapters

T = TypeVar("T")
KEYBOARD, API = 0, 1  # job priorities: lower runs first
MIN_REPLY_ROOM = 256  # tokens kept free for the reply when old turns are trimmed to fit the context


class WorkerClosed(RuntimeError):
    """A job came after `close`: the engine is shutting down."""


@dataclass
class Request:
    """One reply: the conversation (ending with the new user turn) and how to answer it."""

    turns: list[Turn]
    adapter: str | None  # None: the base model
    sampling: Sampling
    reasoning: str = "low"
    instructions: str = ""
    prefill: str = ""  # the start of the assistant's turn, already decided (e.g. skip reasoning)
    record_experts: bool = False
    cancel: threading.Event = field(default_factory=threading.Event)
    priority: int = KEYBOARD


@dataclass
class Started:
    """The worker took the request: `adapter` answers (None: the base); `note` says why it is not the
    one asked for; `dropped` oldest turns did not fit the context."""

    adapter: str | None
    note: str
    dropped: int


@dataclass
class Step:
    """Harmony parser events of one token, (segment, channel, text), and the reply so far."""

    events: list[tuple[int, str, str]]
    reply: Reply


@dataclass
class Failed:
    error: Exception


class _Jobs(queue.PriorityQueue):
    """The worker's queue: by priority, first in first out within one; None (close) after every job."""

    def __init__(self) -> None:
        super().__init__()
        self._arrival = itertools.count()

    def put(self, job: Any, block: bool = True, timeout: float | None = None, priority: int = KEYBOARD) -> None:
        super().put((float("inf") if job is None else priority, next(self._arrival), job), block, timeout)

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        return super().get(block, timeout)[2]


class InferenceWorker:
    def __init__(self) -> None:
        self._jobs = _Jobs()
        self.live: LiveAdapters | None = None
        self._closed = False
        self._lock = threading.Lock()  # `closed` and the queue change together: no job slips in after close
        self._cancels: dict[Future, threading.Event] = {}  # replies queued or running: close cancels them
        self._thread = threading.Thread(target=self._run, name="inference-worker", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            fn, done = job
            if self._closed:  # queued before close: it never runs
                self._refuse(done, "closed before the job ran")
                continue
            if not done.set_running_or_notify_cancel():
                continue
            try:
                done.set_result(fn())
            except BaseException as e:  # handed to the caller, who decides
                done.set_exception(e)
        while True:  # anything left behind the sentinel fails rather than waits forever
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                self._refuse(job[1], "closed before the job ran")

    @staticmethod
    def _refuse(done: Future, why: str) -> None:
        if not done.done():
            done.set_exception(WorkerClosed(f"the inference worker is closed ({why})"))

    def submit(self, fn: Callable[[], T], cancel: threading.Event | None = None, *,
               priority: int = KEYBOARD) -> Future[T]:
        """Queue `fn`; `cancel` (a reply's flag) is set if the worker closes before `fn` ends."""
        done: Future[T] = Future()
        with self._lock:
            if self._closed:  # nothing would ever run it: fail now rather than leave the caller waiting
                self._refuse(done, "no new jobs")
                return done
            if cancel is not None:
                self._cancels[done] = cancel
                done.add_done_callback(self._forget)
            self._jobs.put((fn, done), priority=priority)
        return done

    def _forget(self, done: Future) -> None:
        with self._lock:
            self._cancels.pop(done, None)

    def queued(self) -> int:
        """Jobs waiting (the running one not counted)."""
        return self._jobs.qsize()

    def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the worker after the jobs of its priority (KEYBOARD) queued before it; its result or
        exception."""
        if threading.current_thread() is self._thread:
            return fn()
        return self.submit(fn).result()

    def close(self, timeout: float = 10.0) -> None:
        """Stop: queued jobs fail with WorkerClosed unrun, a running reply ends at its next token. Waits
        for the thread (at most `timeout`): torch must not be mid-call in a thread the interpreter
        tears down at exit (the process aborts)."""
        with self._lock:
            self._closed = True
            for cancel in self._cancels.values():
                cancel.set()
            self._jobs.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # ----- replies
    def stream(self, req: Request) -> Iterator[Started | Step]:
        """Events of one reply: Started, then a Step per token; the last Step's reply is final.
        Leaving the iterator early cancels the reply."""
        out: queue.Queue[Started | Step | Failed | None] = queue.Queue()

        def unrun(job: Future) -> None:  # refused or dropped by close: `_reply` will never end the queue
            if not job.cancelled() and (e := job.exception()) is not None:
                out.put(Failed(e))
                out.put(None)

        self.submit(lambda: self._reply(req, out), req.cancel, priority=req.priority).add_done_callback(unrun)
        try:
            while (ev := out.get()) is not None:
                if isinstance(ev, Failed):
                    raise ev.error
                yield ev
        finally:
            req.cancel.set()

    def _reply(self, req: Request, out: queue.Queue) -> None:
        try:
            assert self.live is not None, "no model loaded"
            lm = self.live.lm
            room = min(req.sampling.max_new_tokens, max(lm.max_len // 2, MIN_REPLY_ROOM))
            fit = checkpoint_template.fit_turns if lm.renderer == "checkpoint" else fit_turns  # model.chat_template
            ids, dropped = fit(lm.tokenizer, req.turns, req.reasoning, req.instructions, lm.max_len - room, req.prefill)
            if req.cancel.is_set():  # cancelled while queued: no adapter is loaded, evicted or captured for it
                out.put(Started(req.adapter, "cancelled before it started", dropped))
                out.put(Step([], Reply(HarmonyParser(), Stats(tokens_in=len(ids), stop="cancelled"))))
                return
            chosen = self.live.select(req.adapter)
            out.put(Started(chosen.adapter, chosen.note, dropped))
            import torch

            prompt = torch.tensor([ids], device=lm.device)
            for events, reply in stream(chosen.decoder, lm.tokenizer, prompt, req.sampling, req.cancel,
                                        req.record_experts, req.prefill):
                out.put(Step(events, reply))
        except Exception as e:  # PromptTooLong, a bad adapter, a CUDA error: the caller reports it
            out.put(Failed(e))
        finally:
            out.put(None)

