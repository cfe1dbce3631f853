"""The harmony chat format GPT-OSS was trained on: rendering prompts and parsing completions.

Rendering follows OpenAI's harmony layout token for token (system message with the reasoning level,
developer instructions, turns, `<|start|>assistant` as the generation prompt). Earlier assistant turns
keep only their final channel, as harmony prescribes: analysis is dropped once a final answer exists.

Parsing is incremental and forgiving: a model mid-stream, truncated, or simply wrong never loses text.
Anything that does not fit the grammar is kept as a `raw` segment.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import date
from typing import Any

START, END, MESSAGE, CHANNEL = "<|start|>", "<|end|>", "<|message|>", "<|channel|>"
RETURN, CALL, CONSTRAIN = "<|return|>", "<|call|>", "<|constrain|>"
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>", START, END, MESSAGE, CHANNEL, RETURN, CALL, CONSTRAIN)
STOP_TOKENS = (RETURN, CALL)  # end of the assistant's turn
CHANNELS = ("analysis", "commentary", "final")
REASONING = ("low", "medium", "high")
SKIP_REASONING_PREFILL = f"{CHANNEL}final{MESSAGE}"

_MARKER = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))


@dataclass
class Turn:
    """One message of a conversation. Assistant turns carry their channels separately."""

    role: str  # "user" or "assistant"
    content: str = ""  # the user's text, or the assistant's final answer
    analysis: str = ""  # assistant reasoning (rendered only for the turn being trained on)


class Control(str):
    """A harmony control token the renderer placed. Encoded as its id; text from a user or a dataset never
    becomes one, however it is spelled."""


class PromptTooLong(ValueError):
    """Even the newest user turn alone does not fit the model's context."""


def _controls(text: str) -> list[str]:
    """Split renderer-made structure (a prefill) into its control tokens and the text between them."""
    out: list[str] = []
    pos = 0
    for m in _MARKER.finditer(text):
        out += [text[pos : m.start()], Control(m.group())]
        pos = m.end()
    return [p for p in [*out, text[pos:]] if p]


def _system(reasoning: str, today: date | None) -> list[str]:
    if reasoning not in REASONING:
        raise ValueError(f"reasoning must be one of {REASONING}, got {reasoning!r}")
    today = today or date.today()
    body = (
        "You are ChatGPT, a large language model trained by OpenAI.\n"
        "Knowledge cutoff: 2024-06\n"
        f"Current date: {today.isoformat()}\n\n"
        f"Reasoning: {reasoning}\n\n"
        "# Valid channels: analysis, commentary, final. Channel must be included for every message."
    )
    return [Control(START), "system", Control(MESSAGE), body, Control(END)]


def system_message(reasoning: str = "low", today: date | None = None) -> str:
    return "".join(_system(reasoning, today))


def _developer(instructions: str) -> list[str]:
    if not instructions:
        return []
    return [Control(START), "developer", Control(MESSAGE), f"# Instructions\n\n{instructions}", Control(END)]


def _turn(t: Turn) -> list[str]:
    if t.role == "user":
        return [Control(START), "user", Control(MESSAGE), t.content, Control(END)]
    if t.role == "assistant":
        return [Control(START), "assistant", Control(CHANNEL), "final", Control(MESSAGE), t.content, Control(END)]
    raise ValueError(f"turn role must be 'user' or 'assistant', got {t.role!r}")


def _head(reasoning: str, instructions: str, today: date | None) -> list[str]:
    return _system(reasoning, today) + _developer(instructions)


def _tail(prefill: str) -> list[str]:
    return [Control(START), "assistant", *_controls(prefill)]


def prompt_pieces(turns: list[Turn], reasoning: str = "low", instructions: str = "", prefill: str = "",
                  today: date | None = None) -> list[str]:
    """The prompt as control tokens (`Control`) and plain text, in order."""
    return _head(reasoning, instructions, today) + [p for t in turns for p in _turn(t)] + _tail(prefill)


def render_prompt(
    turns: list[Turn],
    reasoning: str = "low",
    instructions: str = "",
    prefill: str = "",
    today: date | None = None,
) -> str:
    """The text a model continues to answer the last user turn. `prefill` is appended after
    `<|start|>assistant`, e.g. SKIP_REASONING_PREFILL to go straight to the final channel.
    For display and logs: a model gets `encode_prompt`, where typed control tokens stay text."""
    return "".join(prompt_pieces(turns, reasoning, instructions, prefill, today))


def completion_pieces(final: str, analysis: str = "") -> list[str]:
    out = [Control(CHANNEL), "analysis", Control(MESSAGE), analysis, Control(END), Control(START), "assistant"]
    return (out if analysis else []) + [Control(CHANNEL), "final", Control(MESSAGE), final, Control(RETURN)]


def render_completion(final: str, analysis: str = "") -> str:
    """What the model should produce after `<|start|>assistant`: analysis (if any), then final."""
    return "".join(completion_pieces(final, analysis))


def render_example(
    turns: list[Turn], reasoning: str = "low", instructions: str = "", today: date | None = None
) -> tuple[str, str]:
    """A training example as (prompt, completion): loss goes on the completion only."""
    prompt, completion = _example_pieces(turns, reasoning, instructions, today)
    return "".join(prompt), "".join(completion)


def _example_pieces(turns: list[Turn], reasoning: str, instructions: str,
                    today: date | None) -> tuple[list[str], list[str]]:
    if not turns or turns[-1].role != "assistant":
        raise ValueError("a training example must end with an assistant turn")
    prompt = prompt_pieces(turns[:-1], reasoning, instructions, today=today)
    return prompt, completion_pieces(turns[-1].content, turns[-1].analysis)


def encode(tokenizer: Any, pieces: list[str]) -> list[int]:
    """Token ids of rendered pieces: each control token as its id, the text between them with the
    tokenizer's special-token parsing off, so a typed `<|end|>` is the characters, not the token."""
    ids: list[int] = []
    text = ""
    for piece in [*pieces, Control("")]:
        if not isinstance(piece, Control):
            text += piece
            continue
        if text:
            ids += tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
            text = ""
        if piece:
            ids.append(_control_id(tokenizer, piece))
    return ids


def _control_id(tokenizer: Any, token: str) -> int:
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or tid == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer has no {token} token: it is not a harmony (GPT-OSS) tokenizer")
    return tid


def encode_prompt(tokenizer: Any, turns: list[Turn], reasoning: str = "low", instructions: str = "",
                  prefill: str = "", today: date | None = None) -> list[int]:
    """`render_prompt` as token ids, structure-safe (see `encode`)."""
    return encode(tokenizer, prompt_pieces(turns, reasoning, instructions, prefill, today))


def encode_example(tokenizer: Any, turns: list[Turn], reasoning: str = "low", instructions: str = "",
                   today: date | None = None) -> tuple[list[int], list[int]]:
    """`render_example` as (prompt ids, completion ids), structure-safe: dataset text stays text."""
    prompt, completion = _example_pieces(turns, reasoning, instructions, today)
    return encode(tokenizer, prompt), encode(tokenizer, completion)


def fit_turns(tokenizer: Any, turns: list[Turn], reasoning: str, instructions: str, budget: int,
              prefill: str = "", today: date | None = None) -> tuple[list[int], int]:
    """The prompt's ids with the oldest whole exchanges (a user turn and the replies after it) dropped
    until they fit `budget` tokens. Returns (ids, number of turns dropped). Raises PromptTooLong when
    even the newest user turn alone does not fit."""
    fixed = len(encode(tokenizer, _head(reasoning, instructions, today) + _tail(prefill)))
    sizes = [len(encode(tokenizer, _turn(t))) for t in turns]
    start = 0
    while (need := fixed + sum(sizes[start:])) > budget:
        start = next((i for i in range(start + 1, len(turns)) if turns[i].role == "user"), -1)
        if start == -1:
            raise PromptTooLong(f"the prompt needs {need} tokens but the context holds {budget}: shorten it")
    return encode_prompt(tokenizer, turns[start:], reasoning, instructions, prefill, today), start


@dataclass
class Segment:
    """One message of a completion. `channel` is analysis/commentary/final, or raw for text that
    did not parse (then `label` holds what the model wrote as its header, if anything)."""

    channel: str
    text: str = ""
    recipient: str | None = None
    label: str | None = None
    complete: bool = False


@dataclass
class HarmonyParser:
    """Incremental parser of an assistant completion (the text after `<|start|>assistant`).

    `feed` takes decoded text (special tokens included) in any chunking and returns what was added as
    (segment index, channel, text) events; `segments` holds the parse so far. `done` turns true at
    `<|return|>` or `<|call|>`. A model's output goes through `feed_token`, which knows which tokens were
    control tokens by their ids: only those are structure.
    """

    segments: list[Segment] = field(default_factory=list)
    done: bool = False
    _state: str = "header"  # header | body | between
    _header: str = ""
    _pending: str = ""  # a tail that may be the start of a special token split across chunks

    def feed(self, text: str) -> list[tuple[int, str, str]]:
        events: list[tuple[int, str, str]] = []
        buf = self._pending + text
        self._pending = ""
        cut = buf.rfind("<")
        if cut != -1 and buf[cut:] not in SPECIAL_TOKENS and any(t.startswith(buf[cut:]) for t in SPECIAL_TOKENS):
            buf, self._pending = buf[:cut], buf[cut:]
        pos = 0
        for m in _MARKER.finditer(buf):
            self._text(buf[pos : m.start()], events)
            self._marker(m.group(), events)
            pos = m.end()
        self._text(buf[pos:], events)
        return events

    def feed_token(self, text: str, marker: str | None = None) -> list[tuple[int, str, str]]:
        """One generated token's decoded `text`, parsed on its id: `marker` is the control token it is (its
        id was a special id), None for an ordinary token, whose text is content however it is spelled (a
        model writing the characters `<|channel|>final<|message|>` does not open a final channel)."""
        events: list[tuple[int, str, str]] = []
        if self._pending:  # text held back by `feed` (a prefill), now known not to be a marker
            self._text(self._pending, events)
            self._pending = ""
        if marker is not None and text.endswith(marker):
            text = text[: -len(marker)]
        self._text(text, events)
        if marker is not None:
            self._marker(marker, events)
        return events

    def finish(self) -> list[tuple[int, str, str]]:
        """End of stream: flush a held-back tail and an unfinished header as raw text."""
        events = self.feed("")
        if self._pending:
            self._text(self._pending, events)
            self._pending = ""
        if self._state == "header" and self._header.strip():
            self._raw(self._header, events)
            self._header = ""
        if self.segments and self._state == "body":
            self.segments[-1].complete = False
        return events

    def channel_text(self, channel: str) -> str:
        return "".join(s.text for s in self.segments if s.channel == channel)

    @property
    def final(self) -> str:
        return self.channel_text("final")

    @property
    def analysis(self) -> str:
        return self.channel_text("analysis")

    def _text(self, text: str, events: list) -> None:
        if not text:
            return
        if self._state == "header":
            self._header += text
        elif self._state == "body":
            self._append(text, events)
        elif text.strip():  # between messages only whitespace is expected
            self._raw(text, events)

    def _marker(self, tok: str, events: list) -> None:
        if self._state == "body":
            if tok in (END, RETURN, CALL):
                self.segments[-1].complete = True
                self._state = "between"
                self.done = tok in STOP_TOKENS
            elif tok in (START, CHANNEL):  # a new header with no <|end|> before it
                self._state, self._header = "header", tok if tok == CHANNEL else ""
            else:
                self._append(tok, events)
        elif self._state == "header":
            if tok == MESSAGE:
                self._open(self._header, events)
            elif tok in (CHANNEL, CONSTRAIN):
                self._header += tok
            else:  # a header cut short: keep its text, start over
                if self._header.strip():
                    self._raw(self._header, events)
                self._header = ""
                self._state = "header" if tok == START else "between"
                self.done = tok in STOP_TOKENS
        else:  # between
            if tok in (START, CHANNEL):
                self._state, self._header = "header", tok if tok == CHANNEL else ""
            elif tok in STOP_TOKENS:
                self.done = True

    def _open(self, header: str, events: list) -> None:
        rest = header.partition(CHANNEL)[2]
        words = rest.split(CONSTRAIN)[0].split()
        name = words[0] if words else ""
        m = re.search(r"to=(\S+)", header.replace(CONSTRAIN, " "))
        recipient = m.group(1) if m else None
        plain = " ".join(header.replace(CHANNEL, " ").replace(CONSTRAIN, " ").split())
        # A header with more than role and a known channel (recipient, constraint, an unknown channel
        # name, junk) is kept as the label, so no header text is lost.
        label = None if name in CHANNELS and plain in (name, f"assistant {name}") else plain or None
        seg = Segment(name if name in CHANNELS else "raw", recipient=recipient, label=label)
        self.segments.append(seg)
        self._state, self._header = "body", ""
        events.append((len(self.segments) - 1, seg.channel, ""))

    def _append(self, text: str, events: list) -> None:
        seg = self.segments[-1]
        seg.text += text
        events.append((len(self.segments) - 1, seg.channel, text))

    def _raw(self, text: str, events: list) -> None:
        stripped = text.replace(CHANNEL, " ").replace(CONSTRAIN, " ").strip()
        if not self.segments or self.segments[-1].channel != "raw" or self.segments[-1].complete:
            self.segments.append(Segment("raw", complete=True))
        seg = self.segments[-1]
        seg.text += stripped
        events.append((len(self.segments) - 1, "raw", stripped))


def parse(completion: str) -> HarmonyParser:
    """Parse a whole completion at once."""
    p = HarmonyParser()
    p.feed(completion)
    p.finish()
    return p
