"""The workstation as a service: what the app drives, with no Textual in it.

It owns the engine (model, adapters, router), the run queue, the adapter store, the history and the
learner, and applies edited settings to each of them (`apply_settings`). The app maps its messages
to these methods and shows what comes back; every method may block (disk, model, subprocesses), so
the app calls them from worker threads.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from typing import Any

from engine.serve.chat import Conversation, Engine, Event, context_answer
from engine.serve.experts import usage_shift
from engine.serve.generate import Sampling
from engine.serve.model import Progress
from engine.serve.remote import engine_for
from engine.serve.residency import Residency
from engine.serve.router import correct
from engine.serve.worker import WorkerClosed
from engine.settings import Settings
from engine.store.adapters import AdapterError, AdapterStore
from engine.store.history import History
from engine.train.dataset import LoadReport
from engine.train.experiments import Experiment, Experiments, parse_vary
from engine.train.idle import IdleScheduler, Tick
from engine.train.learning import Learner, report
from engine.train.preference import PairReport
from engine.train.runs import Run, RunQueue

# Settings read once, at load: a change needs a restart (the rest apply at once).
RESTART_KEYS = ("model.", "gpus.inference", "paths.adapters", "paths.history")


@dataclass(frozen=True)
class ModelInfo:
    """What the app shows of the loaded model (header, GPU panel, log)."""

    name: str
    device: str
    is_demo: bool
    precision: str  # how the chat model's weights are held, e.g. "bf16" or "4-bit"
    decoder: str  # "fast" or why the fast decoder is off
    load_seconds: float
    template: str = ""  # the chat template, when it needs a look (differs, or the checkpoint's is used)

    def line(self) -> str:
        what = "demo model" if self.is_demo else self.name
        return f"{what} · {self.device} · {self.precision} · decoder: {self.decoder}" + \
            (f" · {self.template}" if self.template else "")


@dataclass
class Applied:
    """What `apply_settings` did: keys now in effect, and keys that wait for a restart."""

    live: list[str]
    restart: list[str]


def changed_keys(old: Settings, new: Settings) -> list[str]:
    """Dotted keys whose values differ (training profiles count as one key each)."""
    keys = []
    for section in ("model", "gpus", "chat", "adapters", "api", "paths", "training", "learning"):
        a, b = getattr(old, section), getattr(new, section)
        keys += [f"{section}.{f.name}" for f in fields(a) if getattr(a, f.name) != getattr(b, f.name)]
    return keys


class Workstation:
    def __init__(self, settings: Settings, engine_factory: Callable[..., Engine] = engine_for):
        self.settings = settings
        self.history = History(settings.history_db)
        self.engine: Engine | None = None
        self._engine_factory = engine_factory
        self._closed = False
        self._busy = 0  # calls that may still write the history; close waits for them
        self._idle = threading.Condition()
        self._api: Any = None  # the running ApiServer, if any

    # ----- lifecycle
    def load(self, progress: Progress, on_log: Callable[[str], None],
             on_adapters: Callable[[dict], None]) -> Engine:
        """Load the model and start watching the adapter store (blocks for the whole load)."""
        engine = self._engine_factory(self.settings, history=self.history)
        engine.on_log(on_log)
        engine.load(progress)
        if self._closed:  # the app quit while the model loaded
            engine.close()
            raise RuntimeError("closed while the model loaded")
        engine.watch_adapters(on_adapters)
        self.engine = engine
        return engine

    @property
    def ready(self) -> bool:
        return self.engine is not None

    def model_info(self) -> ModelInfo | None:
        if self.engine is None or not self.engine.ready:
            return None
        lm = self.engine.lm
        if lm is None:  # [model] backend: a remote server answers
            return ModelInfo(self.settings.model.backend, "remote", False, "served remotely", "remote", 0.0)
        precision = lm.quant if lm.quant != "bf16" else str(lm.model.dtype).removeprefix("torch.")
        decoder = f"reference ({self.engine.fast_note})" if self.engine.fast_note else "fast"
        return ModelInfo(lm.name, lm.device, lm.is_demo, precision, decoder, lm.load_seconds, lm.template_note)

    def close(self, timeout: float = 10.0) -> None:
        """Stop the engine (queued replies are dropped, a running one ends at its next token), wait for
        the calls still writing the history, then close it: nothing is written to a closed store."""
        with self._idle:
            self._closed = True
        self.stop_api()
        if self.engine is not None:
            self.engine.close()
        with self._idle:
            self._idle.wait_for(lambda: self._busy == 0, timeout)
        self.history.close()

    @contextlib.contextmanager
    def _using_stores(self) -> Iterator[None]:
        """Around a call that writes the history: refused once closing began, waited for by close."""
        with self._idle:
            if self._closed:
                raise WorkerClosed("the workstation is closing")
            self._busy += 1
        try:
            yield
        finally:
            with self._idle:
                self._busy -= 1
                self._idle.notify_all()

    def apply_settings(self, new: Settings) -> Applied:
        """Make `new` the settings of everything that reads them; say which keys need a restart."""
        keys = changed_keys(self.settings, new)
        restart = [k for k in keys if k.startswith(RESTART_KEYS)]
        self.settings = new
        if self.engine is not None:
            e = self.engine
            e.settings = new  # chat.* and model.record_experts are read per reply
            if "adapters.router_threshold" in keys:
                e.router.threshold = new.adapters.router_threshold
            if "adapters.vram_budget_mb" in keys:
                e.set_budget(new.adapters.vram_budget_mb)
            if "adapters.mode" in keys:
                e.set_mode(new.adapters.mode)
        return Applied([k for k in keys if k not in restart], restart)

    # ----- the OpenAI-compatible API (engine/api): clients share this process's inference worker
    @property
    def api_url(self) -> str:
        """Where the API listens ("" when it is off)."""
        return self._api.url if self._api is not None and self._api.running else ""

    def start_api(self) -> str:
        """Serve the API with the [api] settings; returns its URL. Raises ApiConfigError (one line) when the
        settings would expose it without a token or the address cannot be bound."""
        assert self.engine is not None, "the model is still loading"
        if self.api_url:
            return self.api_url
        from engine.api.server import ApiServer

        server = ApiServer(lambda: self.engine, self.settings.api)
        url = server.start()
        self._api = server
        return url

    def wait_api(self) -> None:
        """Block while the API serves (headless `tandem serve`); Ctrl-C ends it."""
        if self._api is not None:
            self._api.wait()

    def stop_api(self) -> None:
        if self._api is not None:
            self._api.stop()
            self._api = None

    # ----- chat
    def new_conversation(self) -> Conversation:
        return Conversation()

    def sampling(self, **overrides: Any) -> Sampling:
        """The settings' sampling with `overrides` (None values ignored)."""
        assert self.engine is not None, "the model is still loading"
        return self.engine.sampling(**overrides)

    def ask(self, conversation: Conversation, prompt: str, **kwargs: Any) -> Iterator[Event]:
        assert self.engine is not None, "the model is still loading"
        with self._using_stores():
            yield from self.engine.ask(conversation, prompt, **kwargs)

    @property
    def mode(self) -> str:
        return self.engine.mode if self.engine else self.settings.adapters.mode

    # ----- specialists
    def adapters(self) -> list[Residency]:
        return self.engine.adapters() if self.engine else []

    def broken_adapters(self) -> list[tuple[str, str]]:
        return self.engine.broken_adapters() if self.engine else []

    def set_mode(self, mode: str) -> None:
        if self.engine is None:
            raise AdapterError("the model is still loading")
        self.engine.set_mode(mode)

    def correct_route(self, prompt: str, label: str) -> None:
        """`prompt` should have gone to `label` (a specialist, or "none"): a router example from now on,
        kept across restarts; no LoRA is retrained."""
        assert self.engine is not None, "the model is still loading"
        correct(self.settings, self.engine.base_id, prompt, label)
        self.engine.retrain_router()

    def rollback(self, name: str) -> None:
        """The previous version becomes current; the engine's watcher loads it into the model."""
        AdapterStore(self.settings.adapters_dir).rollback(name)

    # ----- training
    def runs(self, last: int = 20) -> list[Run]:
        return RunQueue(self.settings).runs()[-last:]

    def submit_run(self, task: str, data: str, profile: str | None,
                   from_adapter: str = "") -> tuple[Run, LoadReport | PairReport]:
        return RunQueue(self.settings).submit_checked(task, data, profile, from_adapter=from_adapter)

    def experiment(self, task: str, vary: list[str], data: list[str], profile: str | None,
                   when_idle: bool = False) -> Experiment:
        """Variants of a specialist (`--vary r=8,16` etc.), queued now or left for the idle scheduler."""
        return Experiments(self.settings, self.history).create(task, parse_vary(vary), data or None, profile,
                                                               start=not when_idle)

    def experiments(self) -> list[tuple[Experiment, list[dict[str, Any]]]]:
        """Every experiment with its comparison table, newest first."""
        exps = Experiments(self.settings, self.history)
        return [(e, exps.table(e)) for e in reversed(exps.list())]

    def newly_decided(self) -> list[Experiment]:
        """Experiments decided since the last call: the app notifies each once."""
        exps = Experiments(self.settings, self.history)
        out = [e for e in exps.list() if e.status == "done" and not e.notified]
        for e in out:
            exps.mark_notified(e.id)
        return out

    def idle_tick(self) -> Tick:
        """Let the idle scheduler start pending work if the training GPU may take it; what it does, and why."""
        return IdleScheduler(self.settings, self.history).tick()

    def change_run(self, action: str, run_id: str) -> Run:
        queue = RunQueue(self.settings)
        return queue.stop(run_id) if action == "stop" else queue.resume(run_id)

    # ----- feedback and learning
    def feedback(self, turn_id: int, rating: int | None, correction: str, good: bool) -> list[str]:
        """Store what the user said of a reply; then let the learner start any retraining it made due.
        Returns the run ids started."""
        with self._using_stores():
            if rating is not None:
                self.history.rate(turn_id, rating)
            if correction:
                self.history.correct(turn_id, correction)
            if good:
                self.history.mark_good(turn_id)
            return Learner(self.settings, self.history).check()

    def prefer(self, prompt: str, a: str, b: str, reply_a: str, reply_b: str, winner: str) -> None:
        """Store an A/B pick with what it teaches: the task of the specialist on either side (the other is
        usually the base), and the reasoning level and instructions both replies were asked with
        (`answer_with` answers under the chat settings), so its preference pair renders as served."""
        task = None
        for name in (a, b):
            if name != "base" and task is None:
                with contextlib.suppress(AdapterError):  # removed since: the pick still counts, without a task
                    task = AdapterStore(self.settings.adapters_dir).get(name).manifest.task
        chat = self.settings.chat
        with self._using_stores():
            self.history.prefer(prompt, a, b, reply_a, reply_b, winner, task, chat.reasoning, chat.instructions)

    def report(self) -> dict[str, Any]:
        with self._using_stores():
            return report(self.history)

    # ----- comparisons and experts
    def answer_with(self, prompt: str, adapter: str) -> str:
        """A greedy answer from `adapter` (or "base"), outside the history: one side of an A/B."""
        assert self.engine is not None
        reply = self.engine.trace_experts(prompt, adapter).reply
        return context_answer(reply) or f"(no final answer: the reply stopped on {reply.stats.stop or 'nothing'})"

    def expert_shift(self, prompt: str, mine: str, other: str) -> list[list[float]] | None:
        """How `mine` moves expert traffic against `other` on the same prompt (None: nothing recorded)."""
        assert self.engine is not None
        a = self.engine.trace_experts(prompt, mine).reply.experts
        b = self.engine.trace_experts(prompt, other).reply.experts
        return usage_shift(b, a) if a and b else None
