"""The OpenAI chat-completions protocol as Tandem speaks it: the request, the error format, the replies.

Declared once here (pydantic), so the HTTP layer only maps. What Tandem adds is one extension field,
`tandem`, on every completion and on the first and last stream chunks:

    "tandem": {"specialist": "math", "confidence": 0.83, "reason": "routed", "turn_id": 42}

`specialist` is the adapter that answered ("base" for the base model), `confidence` the router's
probability for it (1.0 when the request named it), `reason` why (routed, below threshold, no
specialists, pinned) and `turn_id` the history row the turn is stored under. The response's `model`
is the specialist that answered, as OpenAI names the snapshot that served an alias.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

from engine.harmony import Turn

REASONING_EFFORTS = ("low", "medium", "high")
FINISH = {"return": "stop", "end": "stop", "call": "stop", "length": "length", "cancelled": "stop"}
REASONING_CHANNELS = ("analysis", "commentary")  # harmony channels that come back as `reasoning_content`


class ApiError(Exception):
    """An error in OpenAI's format: {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.kind = status, message, code, param, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: StrictStr


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool = False


class ChatRequest(BaseModel):
    """The fields Tandem honours; others an OpenAI client may send (user, metadata, penalties) are
    ignored, and those that would change the answer in ways Tandem cannot (n > 1, tools, logprobs)
    are refused by `check_supported`."""

    model_config = ConfigDict(extra="allow")
    model: StrictStr
    messages: list[Message] = Field(min_length=1)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    max_tokens: StrictInt | None = Field(None, ge=1, le=1 << 20)
    max_completion_tokens: StrictInt | None = Field(None, ge=1, le=1 << 20)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    top_k: StrictInt | None = Field(None, ge=0, le=1 << 20)  # vLLM's extension
    seed: StrictInt | None = Field(None, ge=0, le=2**63 - 1)
    reasoning_effort: Literal["low", "medium", "high"] | None = None
    n: StrictInt | None = None

    def check_supported(self) -> None:
        extra = self.model_extra or {}
        if self.n not in (None, 1):
            raise ApiError(400, "n must be 1: Tandem answers one choice per request", "unsupported_parameter", "n")
        for key in ("tools", "functions", "tool_choice", "logprobs", "top_logprobs", "response_format"):
            if extra.get(key) not in (None, [], False, "none", {"type": "text"}):
                raise ApiError(400, f"{key} is not supported by Tandem", "unsupported_parameter", key)

    @property
    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


def parse_request(data: Any) -> ChatRequest:
    """The request, validated; a bad field is a 400 that names it."""
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", "invalid_request")
    try:
        req = ChatRequest.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ApiError(400, f"{where}: {first['msg']}", "invalid_parameter", str(first["loc"][0])) from None
    req.check_supported()
    return req


@dataclass
class Chat:
    """A request as the engine takes it: earlier turns, the new prompt, developer instructions."""

    turns: list[Turn]
    prompt: str
    instructions: str | None  # None: the settings' instructions


def to_chat(messages: list[Message]) -> Chat:
    """System and developer messages become the instructions; user and assistant messages the turns;
    the last message must be the user's."""
    if messages[-1].role != "user":
        raise ApiError(400, "the last message must be from the user", "invalid_messages", "messages")
    instructions, turns = [], []
    for i, m in enumerate(messages[:-1]):
        if m.role == "tool":
            raise ApiError(400, f"messages.{i}: tool messages are not supported", "unsupported_parameter", "messages")
        if m.role in ("system", "developer"):
            instructions.append(m.text())
        else:
            turns.append(Turn(m.role, m.text()))
    return Chat(turns, messages[-1].text(), "\n\n".join(instructions) if instructions else None)


def split(reply: Any) -> tuple[str, str]:
    """(content, reasoning_content) of a finished reply: the final channel and any text that did not parse
    as harmony (a model that lost the format still answers), then the analysis and commentary channels."""
    segments = reply.parser.segments
    return ("".join(s.text for s in segments if s.channel not in REASONING_CHANNELS),
            "".join(s.text for s in segments if s.channel in REASONING_CHANNELS))


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def extension(specialist: str, confidence: float, reason: str, turn_id: int | None) -> dict[str, Any]:
    return {"specialist": specialist, "confidence": round(confidence, 4), "reason": reason, "turn_id": turn_id}


def usage(stats: Any) -> dict[str, Any]:
    """OpenAI's usage of a reply's Stats; `cached_tokens`: prompt tokens whose KV the decoder reused."""
    return {"prompt_tokens": stats.tokens_in, "completion_tokens": stats.tokens_out,
            "total_tokens": stats.tokens_in + stats.tokens_out,
            "prompt_tokens_details": {"cached_tokens": stats.tokens_reused}}


def chunk(cid: str, created: int, model: str, delta: dict[str, Any], finish: str | None = None,
          **extra: Any) -> dict[str, Any]:
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}


def completion(cid: str, model: str, content: str, reasoning: str, finish: str, use: dict[str, int],
               ext: dict[str, Any]) -> dict[str, Any]:
    message = {"role": "assistant", "content": content, "reasoning_content": reasoning or None}
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish}], "usage": use, "tandem": ext}


def models(names: list[str]) -> dict[str, Any]:
    now = int(time.time())
    return {"object": "list", "data": [{"id": n, "object": "model", "created": now, "owned_by": "tandem"}
                                       for n in ["auto", "base", *names]]}
