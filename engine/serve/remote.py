"""Chat through a remote OpenAI-compatible server: when one box is not enough.

With `[model] backend = "http://host:port/v1"` no model is loaded here. Tandem still routes: its router
picks the specialist from the local store's manifests, and the request goes to the remote engine with
`model=<specialist>` (vLLM serving the exported adapters with `--lora-modules`, or another Tandem's
`tandem serve`). The remote's `reasoning_content` and `content` come back as harmony's analysis and final
channels, so the history, the learning loop and the app see the same turns as from a local model.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from engine import names
from engine.harmony import CHANNEL, END, MESSAGE, RETURN, START, HarmonyParser, PromptTooLong
from engine.serve.chat import Engine
from engine.serve.generate import Reply, Stats
from engine.serve.model import ModelLoadError, Progress, base_identity, resolve_model_name
from engine.serve.residency import Residency
from engine.serve.router import ROUTER_STEP, router_for
from engine.serve.worker import Request, Started, Step
from engine.store.adapters import AdapterError, AdapterStore
from engine.text import line

CONNECT_TIMEOUT = 10.0
FINISH = {"stop": "return", "length": "length", "tool_calls": "call"}


class RemoteError(RuntimeError):
    """The backend failed a request; the message names it and says what it answered."""


def _opening(channel: str, previous: str | None) -> str:
    """Harmony markup that opens `channel` after `previous` (None: the start of the reply)."""
    head = f"{CHANNEL}{channel}{MESSAGE}"
    return head if previous is None else f"{END}{START}assistant{head}"


class RemoteWorker:
    """Stands where the inference worker stands: `stream` answers a Request through the backend, on the
    caller's thread (the remote engine schedules its own batch)."""

    def __init__(self, url: str, token: str = ""):
        from openai import OpenAI

        self.url = url
        self.client = OpenAI(base_url=url, api_key=token or "none", max_retries=0, timeout=600)
        self.served: set[str] = set()

    def connect(self) -> None:
        """What the backend serves; a clear error when it cannot be reached."""
        import openai

        try:
            self.served = {m.id for m in self.client.with_options(timeout=CONNECT_TIMEOUT).models.list()}
        except openai.APIError as e:
            raise ModelLoadError(f"model.backend = {self.url!r}: cannot list its models ({line(e)})") from None

    def call(self, fn: Callable[[], Any]) -> Any:
        return fn()

    def close(self) -> None:
        self.client.close()

    def stream(self, req: Request) -> Iterator[Started | Step]:
        import openai

        model, note = req.adapter or "base", ""
        if model not in self.served:
            model, note = "base", f"{req.adapter or 'base'} is not served by {self.url}; the base model answered"
        messages = [{"role": "system", "content": req.instructions}] if req.instructions else []
        messages += [{"role": t.role, "content": t.content} for t in req.turns]
        s = req.sampling
        extra = {"top_k": s.top_k} if s.top_k else None
        reply, fed = Reply(HarmonyParser(), Stats()), []
        started = time.perf_counter()
        try:
            stream = self.client.chat.completions.create(
                model=model, messages=messages, stream=True, stream_options={"include_usage": True},
                temperature=0.0 if s.greedy else s.temperature, top_p=s.top_p, max_tokens=s.max_new_tokens,
                seed=s.seed, reasoning_effort=req.reasoning, extra_body=extra)
        except openai.BadRequestError as e:
            if (e.body or {}).get("code") == "context_length_exceeded":
                raise PromptTooLong(str((e.body or {}).get("message", e))) from None
            raise RemoteError(f"{self.url}: {line(e)}") from None
        except openai.APIError as e:
            raise RemoteError(f"{self.url}: {line(e)}") from None
        yield Started(None if model == "base" else model, note, 0)
        channel, finish = None, ""
        try:
            for chunk in stream:
                if req.cancel.is_set():
                    break
                if chunk.usage:
                    reply.stats.tokens_in, reply.stats.tokens_out = (chunk.usage.prompt_tokens,
                                                                     chunk.usage.completion_tokens)
                for choice in chunk.choices:
                    delta = choice.delta
                    extra_fields = delta.model_extra or {}
                    thinking = extra_fields.get("reasoning_content") or extra_fields.get("reasoning") or ""
                    for name, text in (("analysis", thinking), ("final", delta.content or "")):
                        if not text:
                            continue
                        if not reply.stats.ttft_s:
                            reply.stats.ttft_s = time.perf_counter() - started
                        piece = (_opening(name, channel) if channel != name else "") + text
                        channel = name
                        fed.append(piece)
                        yield Step(reply.parser.feed(piece), reply)
                    finish = choice.finish_reason or finish
        except openai.APIError as e:
            raise RemoteError(f"{self.url}: {line(e)}") from None
        finally:
            stream.close()  # a cancelled reply: the backend sees the client go and stops
            reply.stats.stop = "cancelled" if req.cancel.is_set() else FINISH.get(finish, finish or "end")
            if reply.stats.stop == "return" and channel is not None:
                fed.append(RETURN)
                reply.parser.feed(RETURN)
            reply.parser.finish()
            reply.raw = "".join(fed)
            reply.token_texts = fed
            reply.stats.seconds = time.perf_counter() - started
        yield Step([], reply)


def engine_for(settings: Any, history: Any = None) -> Engine:
    """The engine the settings ask for: this machine's model, or a remote server's ([model] backend)."""
    return RemoteEngine(settings, history) if settings.model.backend else Engine(settings, history)


class RemoteEngine(Engine):
    """The engine with the model elsewhere: routing, history and the store stay here."""

    def __init__(self, settings: Any, history: Any = None):
        super().__init__(settings, history)
        self.worker.close()  # no local model: the backend answers
        self.worker = RemoteWorker(settings.model.backend, settings.model.backend_token)
        self.store: AdapterStore | None = None
        self._base = ""

    def load(self, progress: Progress | None = None) -> None:
        say = progress or (lambda _m, _f: None)
        say(f"connecting to {self.settings.model.backend}", 0.1)
        self.worker.connect()
        self._base = base_identity(*resolve_model_name(self.settings, say))
        self.store = AdapterStore(self.settings.adapters_dir, base_model=self._base)
        say(ROUTER_STEP, 0.9)
        self.retrain_router()
        missing = [n for n in self.specialists() if n not in self.worker.served]
        if missing:
            self.log(f"not served by {self.settings.model.backend} (the base answers for them): {', '.join(missing)}")
        if self.mode not in ("auto", "base") and self.mode not in self.specialists():
            self.log(f"pinned adapter {self.mode!r} is not in the store; using auto")
            self.mode = "auto"
        say(f"answering through {self.settings.model.backend}", 1.0)

    @property
    def ready(self) -> bool:
        return self.store is not None

    @property
    def base_id(self) -> str:
        return self._base

    def retrain_router(self) -> None:
        self.router = router_for(self.settings, self._base)

    def specialists(self) -> list[str]:
        return sorted(a.name for a in self.store.scan()[0]) if self.store else []

    def check_mode(self, mode: str) -> str:
        if mode in ("auto", "base"):
            return mode
        names.check(mode, "adapter name")
        known = self.specialists()
        if mode not in known:
            raise AdapterError(f"no adapter named {mode!r}; known: {', '.join(known) or 'none yet'} (or auto, base)")
        return mode

    def adapters(self) -> list[Residency]:
        if self.store is None:
            return []
        return [Residency(a.name, a.name in self.worker.served, False, a.size_bytes / 2**20, a.manifest.task,
                          a.manifest.final_loss) for a in self.store.scan()[0]]

    def broken_adapters(self) -> list[tuple[str, str]]:
        return self.store.scan()[1] if self.store else []

    def refresh_adapters(self) -> dict[str, list[str]]:
        before = set(self.specialists())
        self.retrain_router()
        now = set(self.specialists())
        return {"added": sorted(now - before), "removed": sorted(before - now), "changed": []}

    def watch_adapters(self, on_change: Callable[[dict], None] | None = None, interval: float = 1.0) -> None:
        """Retrain the router when the store changes (the backend loads adapters on its own side)."""
        assert self.store is not None
        store = self.store

        def loop() -> None:
            sig = store.signature()
            while not self._watch_stop.wait(interval):
                if (now := store.signature()) != sig:
                    sig = now
                    self.retrain_router()
                    if on_change:
                        on_change({"added": [], "removed": [], "changed": self.specialists()})

        threading.Thread(target=loop, name="adapter-watcher", daemon=True).start()

    def set_budget(self, budget_mb: int) -> None:
        """Residency is the backend's (vLLM's --max-loras)."""
