"""The HTTP layer: Starlette routes that map OpenAI requests to the engine and stream what comes back.

`Engine.ask` blocks while a reply streams, so each request runs it on a thread of its own (`Pump`) that
hands events to the event loop; the thread mostly waits on the inference worker, where the request is
queued behind the keyboard's. A client that goes away sets the request's cancel flag, which the decode
loop checks before every forward: the reply stops at the next token and is stored as cancelled.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from engine.api import protocol as p
from engine.harmony import PromptTooLong
from engine.serve.chat import Conversation, Delta, Engine, Event, Finished, Routed
from engine.settings import ApiSettings
from engine.store.adapters import AdapterError
from engine.text import line

_END = object()


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


class Pump:
    """Runs a blocking event iterator on its own thread and hands its events to the running loop."""

    def __init__(self, run: Callable[[threading.Event], Iterator[Event]]):
        self.cancel = threading.Event()
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        threading.Thread(target=self._run, args=(run,), name="api-reply", daemon=True).start()

    def _put(self, item: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the server's loop is gone (shut down mid-reply): nobody is listening
            self.cancel.set()

    def _run(self, run: Callable[[threading.Event], Iterator[Event]]) -> None:
        try:
            for ev in run(self.cancel):
                self._put(ev)
        except BaseException as e:  # handed to the request, which answers in OpenAI's format
            self._put(_Failed(e))
        finally:
            self._put(_END)

    async def next(self) -> Any:
        """The next event; _END after the last. An error on the thread is raised here."""
        item = await self._queue.get()
        if isinstance(item, _Failed):
            raise item.error
        return item


def _engine_error(e: BaseException) -> p.ApiError:
    if isinstance(e, p.ApiError):
        return e
    if isinstance(e, PromptTooLong):
        return p.ApiError(400, str(e), "context_length_exceeded", "messages")
    return p.ApiError(500, f"{type(e).__name__}: {line(e)}", "internal_error", kind="server_error")


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body is already read, so only a disconnect is left)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class Api:
    """The routes, bound to the engine of the process and the [api] settings the server started with."""

    def __init__(self, engine: Callable[[], Engine | None], settings: ApiSettings):
        self._engine = engine
        self.settings = settings
        self.active = 0  # requests being answered or queued (touched on the event loop only)

    # ----- checks every request passes
    def _authorize(self, request: Request) -> None:
        token = self.settings.token
        if not token:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise p.ApiError(401, "a valid bearer token is required (Authorization: Bearer …)", "invalid_api_key")

    def engine(self) -> Engine:
        engine = self._engine()
        if engine is None or not engine.ready:
            raise p.ApiError(503, "the model is still loading", "model_loading", kind="server_error")
        return engine

    async def _body(self, request: Request) -> Any:
        limit = self.settings.max_request_kb * 1024
        too_large = p.ApiError(413, f"the request is larger than {self.settings.max_request_kb} KB "
                                    "(api.max_request_kb)", "request_too_large")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > limit:
                raise too_large
        try:
            return json.loads(body)
        except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError; RecursionError: nested too deep
            raise p.ApiError(400, "the request body is not valid JSON", "invalid_json") from None

    # ----- routes
    async def models(self, request: Request) -> Response:
        try:
            self._authorize(request)
            return JSONResponse(p.models(self.engine().specialists()))
        except p.ApiError as e:
            return JSONResponse(e.body(), e.status)

    async def chat(self, request: Request) -> Response:
        try:
            self._authorize(request)
            engine = self.engine()
            req = p.parse_request(await self._body(request))
            mode = self._mode(engine, req.model)
            chat = p.to_chat(req.messages)
            if self.active >= self.settings.max_concurrent:
                raise p.ApiError(429, f"{self.active} requests are already being answered (api.max_concurrent); "
                                      "try again shortly", "rate_limit_exceeded", kind="rate_limit_error")
        except p.ApiError as e:
            return JSONResponse(e.body(), e.status)
        sampling = engine.sampling(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                                   max_new_tokens=req.limit, seed=req.seed)

        def run(cancel: threading.Event) -> Iterator[Event]:
            return engine.ask(Conversation(turns=list(chat.turns)), chat.prompt, mode=mode,
                              reasoning=req.reasoning_effort, sampling=sampling, cancel=cancel, source="api",
                              instructions=chat.instructions)

        self.active += 1
        slot = _Slot(self, Pump(run))
        try:
            return await self._answer(request, slot, req)
        finally:
            if not req.stream:
                slot.release()

    @staticmethod
    def _mode(engine: Engine, model: str) -> str:
        try:
            return engine.check_mode(model)
        except (AdapterError, ValueError):
            known = ", ".join(["auto", "base", *engine.specialists()])
            raise p.ApiError(404, f"the model {model[:80]!r} does not exist; known: {known}", "model_not_found",
                             "model") from None

    async def _answer(self, request: Request, slot: _Slot, req: p.ChatRequest) -> Response:
        """An error if the reply fails before its first event (a prompt that does not fit), else the
        stream, or the whole reply once it ends. A client gone before then cancels it (499)."""
        pump = slot.pump
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            first = await _next_or_gone(pump, gone)
            if first is None:
                slot.release()
                return Response(status_code=499)
            if req.stream:
                gone.cancel()  # from here the response watches for the disconnect itself
                return _Stream(self._stream(pump, first, req), slot)
            events = [first]
            while (ev := await _next_or_gone(pump, gone)) is not _END:
                if ev is None:
                    return Response(status_code=499)
                events.append(ev)
            return JSONResponse(_whole(events))
        except Exception as e:
            slot.release()
            err = _engine_error(e)
            return JSONResponse(err.body(), err.status)
        finally:
            gone.cancel()

    async def _stream(self, pump: Pump, first: Routed, req: p.ChatRequest) -> AsyncIterator[str]:
        cid, created = p.completion_id(), int(time.time())
        model = first.adapter
        d = first.decision
        ext = p.extension(first.adapter, d.confidence, d.reason, first.turn_id)
        yield _sse(p.chunk(cid, created, model, {"role": "assistant", "content": ""}, tandem=ext))
        sent = {"content": "", "reasoning_content": ""}
        try:
            while (ev := await pump.next()) is not _END:
                if isinstance(ev, Delta):
                    key = "reasoning_content" if ev.channel in p.REASONING_CHANNELS else "content"
                    sent[key] += ev.text
                    yield _sse(p.chunk(cid, created, model, {key: ev.text}))
                elif isinstance(ev, Finished):
                    # text the parser only settles at the end (an unfinished header kept as raw text)
                    for key, whole in zip(sent, p.split(ev.reply), strict=True):
                        if len(whole) > len(sent[key]) and whole.startswith(sent[key]):
                            yield _sse(p.chunk(cid, created, model, {key: whole[len(sent[key]):]}))
                    stats = ev.reply.stats
                    yield _sse(p.chunk(cid, created, model, {}, p.FINISH.get(stats.stop, "stop"), tandem=ext))
                    if req.stream_options and req.stream_options.include_usage:
                        yield _sse({**p.chunk(cid, created, model, {}), "choices": [],
                                    "usage": p.usage(stats)})
        except Exception as e:  # the headers are gone: the error travels as an event
            yield _sse(_engine_error(e).body())
        yield "data: [DONE]\n\n"


class _Slot:
    """One request's place among `max_concurrent`, released once: when the reply ends, fails, or its
    client goes away (then the reply is cancelled: it stops at its next token)."""

    def __init__(self, api: Api, pump: Pump):
        self.api, self.pump, self._held = api, pump, True

    def release(self) -> None:
        self.pump.cancel.set()  # a no-op for a reply that already ended
        if self._held:
            self._held = False
            self.api.active -= 1


class _Stream(StreamingResponse):
    """Server-sent events that release their slot however the response ends, even when the client is
    gone before the first event is sent (the generator then never starts, so its own cleanup would not run)."""

    def __init__(self, events: AsyncIterator[str], slot: _Slot):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._slot = slot

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._slot.release()


async def _next_or_gone(pump: Pump, gone: asyncio.Future) -> Any:
    """The pump's next event, or None (and the reply cancelled) when the client disconnects first."""
    nxt = asyncio.ensure_future(pump.next())
    await asyncio.wait({nxt, gone}, return_when=asyncio.FIRST_COMPLETED)
    if nxt.done():
        return nxt.result()
    nxt.cancel()
    pump.cancel.set()
    return None


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _whole(events: list[Any]) -> dict[str, Any]:
    routed: Routed = events[0]
    done: Finished = events[-1]
    content, reasoning = p.split(done.reply)
    stats, d = done.reply.stats, routed.decision
    return p.completion(p.completion_id(), routed.adapter, content, reasoning, p.FINISH.get(stats.stop, "stop"),
                        p.usage(stats),
                        p.extension(routed.adapter, d.confidence, d.reason, routed.turn_id))


async def _http_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    kind = "not_found" if exc.status_code == 404 else "method_not_allowed" if exc.status_code == 405 else "http_error"
    err = p.ApiError(exc.status_code, str(exc.detail), kind)
    return JSONResponse(err.body(), err.status)


def build_app(engine: Callable[[], Engine | None], settings: ApiSettings) -> tuple[Starlette, Api]:
    """The ASGI app, and the object that holds its state (for the server and the tests)."""
    api = Api(engine, settings)
    routes = [Route("/v1/models", api.models, methods=["GET"]),
              Route("/v1/chat/completions", api.chat, methods=["POST"])]
    return Starlette(routes=routes, exception_handlers={HTTPException: _http_error}), api
