"""The engine's small API: what the CLI and the app call. No Textual here, and no UI state.

`Engine.ask` routes a prompt, switches adapter, stores the turn, streams the reply as events, and
completes the stored turn, in that order. Every call that touches the model may block for a long
time; callers on an event loop run them in a worker thread.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

from engine.harmony import SKIP_REASONING_PREFILL, Turn, render_prompt
from engine.serve.generate import Reply, Sampling, stream
from engine.serve.model import LoadedModel, Progress, base_identity, load_model
from engine.serve.residency import LiveAdapters, Residency
from engine.serve.router import Decision, Router
from engine.settings import Settings
from engine.store.adapters import AdapterError, AdapterStore
from engine.store.history import History


@dataclass
class Routed:
    decision: Decision
    adapter: str  # what will answer: an adapter name or "base"
    turn_id: int | None


@dataclass
class Delta:
    channel: str
    text: str


@dataclass
class Finished:
    reply: Reply
    adapter: str
    decision: Decision
    turn_id: int | None


Event = Routed | Delta | Finished


@dataclass
class Conversation:
    """The turns the model sees next time, plus the history row they belong to."""

    turns: list[Turn] = field(default_factory=list)
    id: int | None = None


class Engine:
    def __init__(self, settings: Settings, history: bool = True):
        self.settings = settings
        self.lm: LoadedModel | None = None
        self.live: LiveAdapters | None = None
        self.router = Router(threshold=settings.adapters.router_threshold)
        self.history = History(settings.history_db) if history else None
        self.mode = settings.adapters.mode  # auto | base | adapter name
        self._listeners: list[Callable[[str], None]] = []

    # ----- lifecycle
    def load(self, progress: Progress | None = None) -> None:
        self.lm = load_model(self.settings, progress)
        store = AdapterStore(self.settings.adapters_dir, base_model=self.base_id)
        self.live = LiveAdapters(self.lm, store, self.settings.adapters.vram_budget_mb)
        self.retrain_router()
        if self.mode not in ("auto", "base") and self.mode not in self.live.known:
            self.log(f"pinned adapter {self.mode!r} is not in the store; using auto")
            self.mode = "auto"

    @property
    def ready(self) -> bool:
        return self.lm is not None

    @property
    def base_id(self) -> str:
        """The identity adapters are checked against: the demo's folder name or the configured model."""
        assert self.lm is not None
        return base_identity(self.lm.name, self.lm.is_demo)

    def on_log(self, fn: Callable[[str], None]) -> None:
        self._listeners.append(fn)

    def log(self, message: str) -> None:
        for fn in self._listeners:
            fn(message)

    def watch_adapters(self, on_change: Callable[[dict], None] | None = None) -> None:
        """Pick up adapters published while running (the trainer's), retrain the router, tell `on_change`."""
        assert self.live is not None

        def changed(changes: dict) -> None:
            self.retrain_router()
            self.log("adapters changed: " + ", ".join(f"{k} {v}" for k, v in changes.items() if v))
            if on_change:
                on_change(changes)

        self.live.watch(changed)

    def close(self) -> None:
        if self.live:
            self.live.stop_watching()
        if self.history:
            self.history.close()

    # ----- adapters and routing
    def retrain_router(self) -> None:
        assert self.live is not None
        examples = {n: a.manifest.router_prompts for n, a in self.live.known.items()}
        self.router = Router(threshold=self.settings.adapters.router_threshold).fit(examples)

    def adapters(self) -> list[Residency]:
        return self.live.table() if self.live else []

    def broken_adapters(self) -> list[tuple[str, str]]:
        return list(self.live.problems) if self.live else []

    def set_mode(self, mode: str) -> None:
        if mode not in ("auto", "base") and (self.live is None or mode not in self.live.known):
            raise AdapterError(f"no adapter named {mode!r}")
        self.mode = mode

    def decide(self, prompt: str, mode: str | None = None) -> Decision:
        mode = mode or self.mode
        if mode == "auto":
            return self.router.route(prompt)
        if mode == "base":
            return Decision("base", 1.0, {}, "pinned")
        return Decision(mode, 1.0, {}, "pinned")

    def sampling(self, **overrides) -> Sampling:
        c = self.settings.chat
        base = Sampling(c.temperature, c.top_p, c.top_k, c.max_new_tokens)
        return Sampling(**{**asdict(base), **{k: v for k, v in overrides.items() if v is not None}})

    # ----- chatting
    def ask(
        self,
        conversation: Conversation,
        prompt: str,
        *,
        mode: str | None = None,
        reasoning: str | None = None,
        skip_reasoning: bool = False,
        sampling: Sampling | None = None,
        cancel: threading.Event | None = None,
        store: bool = True,
        record_experts: bool | None = None,
    ) -> Iterator[Event]:
        """Answer `prompt` in `conversation`: yields Routed, then Deltas, then Finished. `store=False`
        keeps the turn out of the history (comparisons, scripts)."""
        assert self.lm is not None and self.live is not None, "call load() first"
        sampling = sampling or self.sampling()
        decision = self.decide(prompt, mode)
        adapter = decision.choice
        try:
            self.live.activate(None if adapter == "base" else adapter)
        except AdapterError as e:
            self.log(f"adapter {adapter} unavailable ({e}); base answers")
            adapter = "base"
            self.live.activate(None)
        turn_id = None
        history = self.history if store else None
        if history:
            if conversation.id is None:
                conversation.id = history.new_conversation(prompt[:60])
            turn_id = history.start_turn(conversation.id, prompt, adapter, decision.as_dict(), asdict(sampling))
        yield Routed(decision, adapter, turn_id)
        prefill = SKIP_REASONING_PREFILL if skip_reasoning else ""
        text = render_prompt([*conversation.turns, Turn("user", prompt)], reasoning or self.settings.chat.reasoning,
                             self.settings.chat.instructions, prefill=prefill)
        reply: Reply | None = None
        last_save = time.monotonic()
        status = "failed"
        try:
            record = self.settings.model.record_experts if record_experts is None else record_experts
            for events, reply in stream(self.lm, text, sampling, cancel, record, prefill):
                for _, channel, delta in events:
                    if delta:
                        yield Delta(channel, delta)
                if history and time.monotonic() - last_save > 1.0:
                    history.save_partial(turn_id, "".join(reply.token_texts))
                    last_save = time.monotonic()
            assert reply is not None
            status = "cancelled" if reply.stats.stop == "cancelled" else "complete"
        finally:
            if history and turn_id is not None:
                if reply is None:
                    history.finish_turn(turn_id, "", "", "", {}, status)
                else:
                    history.finish_turn(turn_id, reply.parser.final, reply.parser.analysis, reply.raw,
                                             reply.stats.as_dict(), status)
        conversation.turns += [Turn("user", prompt), Turn("assistant", reply.parser.final or reply.raw)]
        yield Finished(reply, adapter, decision, turn_id)

    def trace_experts(self, prompt: str, mode: str | None = None, max_new_tokens: int = 256) -> Finished:
        """Answer `prompt` greedily with routing recorded, outside the history: for the expert view and
        for comparing adapters on the same prompt (greedy, so the difference is the adapter's)."""
        sampling = Sampling(greedy=True, max_new_tokens=max_new_tokens)
        done = None
        for ev in self.ask(Conversation(), prompt, mode=mode, sampling=sampling, store=False, record_experts=True):
            if isinstance(ev, Finished):
                done = ev
        assert done is not None
        return done
