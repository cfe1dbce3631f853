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


def system_message(reasoning: str = "low", today: date | None = None) -> str:
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
    return f"{START}system{MESSAGE}{body}{END}"


def _developer(instructions: str) -> str:
    return f"{START}developer{MESSAGE}# Instructions\n\n{instructions}{END}" if instructions else ""


def _turn(t: Turn) -> str:
    if t.role == "user":
        return f"{START}user{MESSAGE}{t.content}{END}"
    if t.role == "assistant":
        return f"{START}assistant{CHANNEL}final{MESSAGE}{t.content}{END}"
    raise ValueError(f"turn role must be 'user' or 'assistant', got {t.role!r}")


def render_prompt(
    turns: list[Turn],
    reasoning: str = "low",
    instructions: str = "",
    prefill: str = "",
    today: date | None = None,
) -> str:
    """The text a model continues to answer the last user turn. `prefill` is appended after
    `<|start|>assistant`, e.g. SKIP_REASONING_PREFILL to go straight to the final channel."""
    head = system_message(reasoning, today) + _developer(instructions)
    return head + "".join(_turn(t) for t in turns) + f"{START}assistant" + prefill


def render_completion(final: str, analysis: str = "") -> str:
    """What the model should produce after `<|start|>assistant`: analysis (if any), then final."""
    out = f"{CHANNEL}analysis{MESSAGE}{analysis}{END}{START}assistant" if analysis else ""
    return out + f"{CHANNEL}final{MESSAGE}{final}{RETURN}"


def render_example(
    turns: list[Turn], reasoning: str = "low", instructions: str = "", today: date | None = None
) -> tuple[str, str]:
    """A training example as (prompt, completion): loss goes on the completion only."""
    if not turns or turns[-1].role != "assistant":
        raise ValueError("a training example must end with an assistant turn")
    last = turns[-1]
    prompt = render_prompt(turns[:-1], reasoning, instructions, today=today)
    return prompt, render_completion(last.content, last.analysis)


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
    `<|return|>` or `<|call|>`.
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
        name = rest.split(CONSTRAIN)[0].split()[0] if rest.split() else ""
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
