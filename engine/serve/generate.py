"""Streaming generation: one token at a time, cancellable, with per-reply statistics.

A hand-written decode loop rather than `model.generate`: it lets a cancelled reply stop within one
token (and drop its KV cache at once), stop on harmony's end-of-turn tokens with the parser's view of
which channel just ended, and time the first token exactly.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from engine.harmony import END, STOP_TOKENS, HarmonyParser
from engine.serve.decoder import Decoder
from engine.serve.experts import ExpertRecorder, ExpertTrace


@dataclass
class Sampling:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 1024
    greedy: bool = False
    seed: int | None = None


@dataclass
class Stats:
    tokens_in: int = 0
    tokens_out: int = 0
    tokens_reused: int = 0  # prompt tokens whose keys and values the decoder kept from the previous reply
    ttft_s: float = 0.0  # request to first token, prefill included
    seconds: float = 0.0
    stop: str = ""  # return, call, end, length, cancelled

    @property
    def tokens_per_s(self) -> float:
        decode = self.seconds - self.ttft_s
        return (self.tokens_out - 1) / decode if self.tokens_out > 1 and decode > 0 else 0.0

    def as_dict(self) -> dict:
        return {"tokens_in": self.tokens_in, "tokens_reused": self.tokens_reused, "tokens_out": self.tokens_out,
                "ttft_s": round(self.ttft_s, 4),
                "seconds": round(self.seconds, 4), "tokens_per_s": round(self.tokens_per_s, 2), "stop": self.stop}


@dataclass
class Reply:
    """What a finished (or cancelled) generation produced."""

    parser: HarmonyParser
    stats: Stats
    raw: str = ""
    experts: ExpertTrace | None = None
    token_texts: list[str] = field(default_factory=list)


class Detokenizer:
    """Text deltas for a growing list of token ids, decoding only a short window per token (decoding
    the whole reply each token is quadratic). The window starts a few tokens back so that merges across
    token boundaries (a space, a multi-byte character split over tokens) come out as the full decode
    would have them; a delta ending in an incomplete character waits for the next token."""

    def __init__(self, tokenizer: Any):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # window start
        self.read = 0  # ids before this are already emitted

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self.tok.decode(self.ids[self.prefix:self.read], skip_special_tokens=False)
        now = self.tok.decode(self.ids[self.prefix:], skip_special_tokens=False)
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return now[len(before):]


def _sample(logits, s: Sampling, gen):
    import torch

    if s.greedy or s.temperature == 0:
        return int(torch.argmax(logits))
    logits = logits.float() / s.temperature
    if s.top_k > 0:
        kth = torch.topk(logits, min(s.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) > s.top_p  # keep the token that crosses top_p
        logits[order[drop]] = float("-inf")
    return int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=gen))


def stream(
    decoder: Decoder,
    tokenizer: Any,
    ids: Any,
    sampling: Sampling,
    cancel: threading.Event | None = None,
    record_experts: bool = False,
    prefill: str = "",
) -> Iterator[tuple[list[tuple[int, str, str]], Reply]]:
    """Yield (parser events, reply so far) per token: events are (segment, channel, text) with the
    harmony markup removed. The reply's parser holds the channels; its stats are final once the
    iterator ends. `ids` is the prompt, [1, t]; `prefill` the part of the assistant's turn already in
    it (e.g. a forced final channel), for the parser. The caller owns the decoder for the whole reply
    (the inference worker), with the adapter already selected."""
    import torch

    cancel = cancel or threading.Event()
    stop_ids = {tokenizer.convert_tokens_to_ids(t): t for t in (*STOP_TOKENS, END)}
    reply = Reply(HarmonyParser(), Stats())
    reply.parser.feed(prefill)
    device = ids.device
    gen = torch.Generator(device=device)  # multinomial needs its generator on the logits' device
    gen.manual_seed(sampling.seed if sampling.seed is not None else int(time.time_ns() % 2**31))
    started = time.perf_counter()
    reply.stats.tokens_in = ids.shape[1]
    recorder = ExpertRecorder(decoder.num_experts) if record_experts else None
    decoder.record(record_experts)
    out_ids: list[int] = []
    detok = Detokenizer(tokenizer)
    try:
        with torch.inference_mode():
            while not cancel.is_set():  # checked before every forward: a request cancelled while queued never prefills
                logits = decoder.step(torch.tensor(out_ids[-1:], device=device)) if out_ids else decoder.prefill(ids)
                if recorder and decoder.routes is not None:
                    recorder.add_step(*decoder.routes)
                nxt = _sample(logits[0], sampling, gen)
                if not out_ids:
                    reply.stats.ttft_s = time.perf_counter() - started
                    reply.stats.tokens_reused = decoder.reused
                out_ids.append(nxt)
                delta = detok.push(nxt)
                reply.token_texts.append(delta)
                if delta:
                    yield reply.parser.feed(delta), reply
                if nxt in stop_ids:
                    mark = stop_ids[nxt]
                    ended_final = reply.parser.segments and reply.parser.segments[-1].channel == "final"
                    if mark in STOP_TOKENS or ended_final:
                        reply.stats.stop = mark.strip("<|>")
                        break
                if len(out_ids) >= sampling.max_new_tokens or decoder.full:
                    reply.stats.stop = "length"
                    break
    finally:
        decoder.release()  # the KV cache stays for the next prompt's prefix
        if recorder:
            reply.experts = recorder.finish(reply.stats.tokens_in)
        reply.parser.finish()
        reply.raw = "".join(reply.token_texts)
        reply.stats.tokens_out = len(out_ids)
        reply.stats.seconds = time.perf_counter() - started
    if not reply.stats.stop:  # the loop ended on the cancel flag (or an error left it)
        reply.stats.stop = "cancelled"
    yield [], reply


def complete(decoder: Decoder, tokenizer: Any, ids: Any, sampling: Sampling, record_experts: bool = False) -> Reply:
    """Run a generation to the end and return the reply."""
    reply = None
    for _, reply in stream(decoder, tokenizer, ids, sampling, record_experts=record_experts):
        pass
    assert reply is not None
    return reply
