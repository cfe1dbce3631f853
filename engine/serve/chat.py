"""The engine's small API for chatting: what the CLI and the workstation service call. No Textual here.

`Engine.ask` routes a prompt, hands the inference worker a request that carries the chosen adapter,
stores the turn under the adapter that really answers, streams the reply as events, and completes the
stored turn. Every call that touches the model is a job on the worker (`engine/serve/worker.py`);
callers on an event loop still run `ask` in a thread, since it blocks while the reply streams.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field

from engine import names
from engine.harmony import SKIP_REASONING_PREFILL, Turn
from engine.serve import selfcheck
from engine.serve.generate import Reply, Sampling
from engine.serve.model import LoadedModel, Progress, base_identity, fast_decoder, load_model
from engine.serve.residency import LiveAdapters, Residency
from engine.serve.router import ROUTER_STEP, Decision, Router, router_for
from engine.serve.worker import API, KEYBOARD, InferenceWorker, Request, Started, Step, WorkerClosed
from engine.settings import Settings
from engine.startup import Phases
from engine.store.adapters import AdapterError, AdapterStore
from engine.store.history import History


@dataclass
class Routed:
    decision: Decision
    adapter: str  # what answers: an adapter name or "base" (the history records the same)
    turn_id: int | None
    dropped: int = 0  # oldest turns left out: they no longer fit the context


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


def context_answer(reply: Reply) -> str:
    """What the model sees of `reply` in the next turn: its final answer; for a reply that ended on its
    own with no final channel, its unchannelled text. Never the raw completion (analysis and markup),
    so a reply cancelled or cut short in its reasoning adds nothing."""
    if reply.parser.final or reply.stats.stop in ("cancelled", "length"):
        return reply.parser.final
    return reply.parser.channel_text("raw")


class Engine:
    def __init__(self, settings: Settings, history: History | None = None):
        """`history` stores every turn (None: nothing is stored); its owner closes it."""
        self.settings = settings
        self.lm: LoadedModel | None = None
        self.live: LiveAdapters | None = None
        self.worker = InferenceWorker()
        self.router = Router(threshold=settings.adapters.router_threshold)
        self.history = history
        self.mode = settings.adapters.mode  # auto | base | adapter name
        self.fast_note = ""  # why the fast decoder is off, if it is
        self._listeners: list[Callable[[str], None]] = []
        self._watch_stop = threading.Event()

    # ----- lifecycle
    def load(self, progress: Progress | None = None) -> None:
        """Load the model, compile the fast decoder and read the adapters, all on the worker."""
        say = Phases(progress or (lambda _m, _f: None))  # a slow step repeats with the time it has left

        def load() -> None:
            lm = load_model(self.settings, say)
            self.log(f"serving {lm.quant}: {lm.quant_reason}")
            if lm.template is not None and lm.template.status != "none":
                self.log(lm.template.summary())
                for d in lm.template.differences:
                    self.log(f"chat template: {d.text()}")
            if lm.device.startswith("cuda") and self.settings.model.fast_decode:
                say("compiling the fast decoder (once per model load)", 0.85)
            fast, self.fast_note = fast_decoder(lm, self.settings)
            store = AdapterStore(self.settings.adapters_dir, base_model=base_identity(lm.name, lm.is_demo))
            self.worker.live = self.live = LiveAdapters(lm, store, self.settings.adapters.vram_budget_mb, fast)
            if fast is not None:  # the first time this checkpoint is served: the fast decoder against the reference
                say("checking the fast decoder against transformers", 0.95)
                verdict = selfcheck.check(lm, fast, self.live.reference)
                self.log(f"self-check: {verdict.line()} ({verdict.top1}, worst {verdict.worst:.2g}, "
                         f"{verdict.seconds:.1f} s when checked)")
                if not verdict.ok:
                    self.live.fast = None
                    self.fast_note = f"{verdict.reason}; transformers + PEFT answers"
            self.lm = lm

        try:
            self.worker.call(load)
            say(ROUTER_STEP, 0.97)
            self.retrain_router()
            say("model ready" + (f" (fast decoder: {self.fast_note})" if self.fast_note else ""), 1.0)
        finally:
            say.close()  # a failed load stops repeating its last step
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

    def refresh_adapters(self) -> dict[str, list[str]]:
        """Re-read the store now (adapters that vanished or changed are unloaded); retrain the router."""
        assert self.live is not None
        changes = self.worker.call(self.live.refresh)
        self.retrain_router()
        return changes

    def watch_adapters(self, on_change: Callable[[dict], None] | None = None, interval: float = 1.0) -> None:
        """Poll the store; adapters published while running (the trainer's) are read from disk on the
        watcher's thread and attached by the worker between replies. Tells `on_change` what changed. The
        watcher outlives any failure: an adapter that cannot be attached is listed as broken with the
        reason (the attach is rolled back), and an error reading the store is logged and retried."""
        assert self.live is not None
        live = self.live

        def attach(name: str) -> str | None:
            try:
                read = live.read(name)  # disk I/O here, not on the worker
                self.worker.call(lambda: live.attach(*read))
                return None
            except WorkerClosed:
                raise
            except Exception as e:  # AdapterError, out of memory, a CUDA error: this adapter, not the watcher
                reason = str(e) if isinstance(e, AdapterError) else f"{type(e).__name__}: {e}"
                live.broken(name, reason[:300])
                return f"{name}: {reason[:300]}"

        def loop(sig: tuple | None) -> None:  # None: the store could not be read; refresh once it can
            while not self._watch_stop.wait(interval):
                try:
                    if (now := live.store.signature()) == sig:
                        continue
                    sig = now
                    changes = self.refresh_adapters()
                    failed = [f for n in changes["added"] + changes["changed"] if (f := attach(n))]
                    if failed:
                        changes["failed"] = failed
                except WorkerClosed:  # the engine is shutting down
                    return
                except Exception as e:  # the store unreadable for a moment (a disk error, a folder mid-move)
                    sig = None
                    self.log(f"adapter watcher: {type(e).__name__}: {e}; trying again")
                    continue
                self.log("adapters changed: " + ", ".join(f"{k} {v}" for k, v in changes.items() if v))
                if on_change:
                    on_change(changes)

        try:
            start: tuple | None = live.store.signature()  # the store as the engine loaded it
        except OSError:
            start = None
        threading.Thread(target=loop, args=(start,), name="adapter-watcher", daemon=True).start()

    def close(self) -> None:
        self._watch_stop.set()
        self.worker.close()

    # ----- adapters and routing
    def retrain_router(self) -> None:
        """Rebuild the router from the store's adapters for this base and the user's corrections."""
        assert self.live is not None
        self.router = router_for(self.settings, self.base_id)

    def adapters(self) -> list[Residency]:
        return self.live.table() if self.live else []

    def broken_adapters(self) -> list[tuple[str, str]]:
        return self.live.broken_list() if self.live else []

    def specialists(self) -> list[str]:
        """The specialists a request may name: every adapter in the store for this base."""
        return self.live.names() if self.live else []

    def check_mode(self, mode: str) -> str:
        """`mode` if it is auto, base or a known specialist's name; else a one-line error."""
        if mode in ("auto", "base"):
            return mode
        names.check(mode, "adapter name")
        if self.live is None or mode not in self.live.known:
            known = ", ".join(self.live.names()) if self.live else ""
            raise AdapterError(f"no adapter named {mode!r}; known: {known or 'none yet'} (or auto, base)")
        return mode

    def set_mode(self, mode: str) -> None:
        self.mode = self.check_mode(mode)

    def set_budget(self, budget_mb: int) -> Future | None:
        """A new residency budget, applied between replies: queued on the worker, not waited for (a
        streaming reply may hold the worker for a while). The Future says when it took effect."""
        if self.live is None:
            return None
        live = self.live
        job = self.worker.submit(lambda: live.budget(budget_mb))
        job.add_done_callback(lambda f: f.exception() and self.log(f"adapter budget not applied: {f.exception()}"))
        return job

    def decide(self, prompt: str, mode: str | None = None) -> Decision:
        mode = mode or self.mode
        if mode == "auto":
            return self.router.route(prompt)
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
        source: str = "app",
        instructions: str | None = None,
    ) -> Iterator[Event]:
        """Answer `prompt` in `conversation`: yields Routed, then Deltas, then Finished. `store=False`
        keeps the turn out of the history (comparisons, scripts). `source` "api" marks an API client's
        turn in the history and queues it behind the keyboard's; `instructions` replaces the settings' developer
        message for this turn."""
        assert self.ready, "call load() first"
        decision = self.decide(prompt, mode)
        request = Request(
            turns=[*conversation.turns, Turn("user", prompt)],
            adapter=None if decision.choice == "base" else decision.choice,
            sampling=sampling or self.sampling(),
            reasoning=reasoning or self.settings.chat.reasoning,
            instructions=self.settings.chat.instructions if instructions is None else instructions,
            prefill=SKIP_REASONING_PREFILL if skip_reasoning else "",
            record_experts=self.settings.model.record_experts if record_experts is None else record_experts,
            cancel=cancel or threading.Event(),
            priority=API if source == "api" else KEYBOARD,
        )
        events = self.worker.stream(request)
        started = next(events)
        assert isinstance(started, Started)
        adapter = started.adapter or "base"
        if started.note:
            self.log(started.note)
        history = self.history if store else None
        turn_id = None
        if history:
            # turns the conversation came with (an API client's messages) are not turns of this history
            given = [(t.role, t.content) for t in conversation.turns] if conversation.id is None else []
            if conversation.id is None:
                conversation.id = history.new_conversation(prompt[:60])
            route = {**decision.as_dict(), **({"note": started.note} if started.note else {})}  # why not the one asked
            turn_id = history.start_turn(conversation.id, prompt, adapter, route, asdict(request.sampling),
                                         request.reasoning, request.instructions, source, given)
        yield Routed(decision, adapter, turn_id, started.dropped)
        reply: Reply | None = None
        last_save = time.monotonic()
        status = "failed"
        try:
            for step in events:
                assert isinstance(step, Step)
                reply = step.reply
                for _, channel, delta in step.events:
                    if delta:
                        yield Delta(channel, delta)
                if history and time.monotonic() - last_save > 1.0:
                    history.save_partial(turn_id, "".join(reply.token_texts))
                    last_save = time.monotonic()
            assert reply is not None
            status = "cancelled" if reply.stats.stop == "cancelled" else "complete"
        finally:
            events.close()  # an abandoned reply is cancelled on the worker
            if history and turn_id is not None:
                if reply is None:
                    history.finish_turn(turn_id, "", "", "", {}, status)
                else:
                    history.finish_turn(turn_id, reply.parser.final, reply.parser.analysis, reply.raw,
                                        reply.stats.as_dict(), status)
        if answer := context_answer(reply):  # a reply with nothing to show for it is no context for the next
            conversation.turns += [Turn("user", prompt), Turn("assistant", answer)]
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
