"""The checkpoint's own chat template (chat_template.jinja): checked against Tandem's harmony renderer at
load, and used for chat prompts when `model.chat_template = "checkpoint"`.

A fine-tuned checkpoint may ship a changed template, and the model then answers best to what it was tuned
on. At load a fixed set of conversations (system and developer text, each reasoning level, a multi-turn
conversation whose earlier analysis must be dropped, a training example) is rendered both ways; the first
difference of each is reported by conversation, line and column, with the text on both sides.

Rendering through the template stays structure-safe as `engine.harmony.encode` is: every message's text is
replaced by a marker before rendering, so what the template writes around the markers (its control tokens)
becomes token ids and the texts themselves are encoded as text, however they spell `<|end|>`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import date
from typing import Any

from engine.harmony import (
    REASONING,
    SPECIAL_TOKENS,
    Control,
    PromptTooLong,
    Turn,
    encode,
    render_example,
    render_prompt,
)

CHECK_DATE = date(2026, 1, 1)  # both renderers get this date, so a check never differs at midnight
CONTEXT = 24  # characters shown on each side of a difference
_CONTROL = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))
_MARK = re.compile("\ue000tandem(\\d+)\ue001")  # private-use characters: no text or template writes them


@dataclass(frozen=True)
class Case:
    """One conversation of the check. `example`: a training example (the last assistant turn with its
    analysis, no generation prompt), else a chat prompt."""

    name: str
    turns: tuple[Turn, ...]
    reasoning: str = "low"
    instructions: str = ""
    example: bool = False


CASES = (
    Case("one question", (Turn("user", "What is the capital of France?"),)),
    *(Case(f"reasoning {level} with developer instructions", (Turn("user", "Name a prime number."),),
           reasoning=level, instructions="Answer in one short sentence.\nBe exact.") for level in REASONING),
    Case("multi-turn, earlier analysis dropped", (
        Turn("user", "Hi, who are you?"),
        Turn("assistant", "I am a helpful assistant.", analysis="The user greets me; introduce briefly."),
        Turn("user", "And what can you do?"),
    ), reasoning="medium", instructions="Be brief."),
    Case("training example", (
        Turn("user", "Sort 3, 1, 2."),
        Turn("assistant", "1, 2, 3", analysis="Ascending order: 1 then 2 then 3."),
    ), reasoning="high", example=True),
)


@dataclass(frozen=True)
class Difference:
    case: str
    offset: int  # first differing character
    line: int  # 1-based, in Tandem's rendering
    column: int
    tandem: str  # the text around it, each side
    checkpoint: str

    def text(self) -> str:
        return (f"{self.case}: line {self.line}, column {self.column} (character {self.offset}): "
                f"Tandem renders {self.tandem!r}, the checkpoint's template {self.checkpoint!r}")


@dataclass
class Check:
    """What the check found. `status`: "same", "differs", "none" (the checkpoint has no template) or
    "failed" (its template raised; `error` says how)."""

    status: str
    differences: list[Difference] = field(default_factory=list)
    error: str = ""

    def summary(self) -> str:
        """One line for the log."""
        if self.status == "same":
            return f"the checkpoint's chat template renders all {len(CASES)} check conversations as Tandem does"
        if self.status == "none":
            return "the checkpoint ships no chat template; Tandem's harmony renderer is used"
        if self.status == "failed":
            return f"the checkpoint's chat template could not render the check conversations: {self.error}"
        return (f"the checkpoint's chat template differs from Tandem's renderer in {len(self.differences)} of "
                f"{len(CASES)} check conversations")


def has_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def messages(turns: tuple[Turn, ...] | list[Turn], instructions: str) -> list[dict]:
    """Turns as the template's messages: instructions as a developer message, an assistant's analysis in
    `thinking`. The template decides what to keep: harmony drops analysis except on a training example's
    last turn."""
    out = [{"role": "developer", "content": instructions}] if instructions else []
    for t in turns:
        out.append({"role": t.role, "content": t.content} | ({"thinking": t.analysis} if t.analysis else {}))
    return out


def render(tokenizer: Any, turns: tuple[Turn, ...] | list[Turn], reasoning: str, instructions: str = "",
           example: bool = False, today: date | None = None) -> str:
    """The checkpoint's template applied (text, not tokens), as the tokenizer applies it."""
    day = today or date.today()
    return tokenizer.apply_chat_template(
        messages(turns, instructions), tokenize=False, add_generation_prompt=not example,
        reasoning_effort=reasoning, strftime_now=lambda fmt: day.strftime(fmt),
    )


def tandem(case: Case) -> str:
    if case.example:
        return "".join(render_example(list(case.turns), case.reasoning, case.instructions, today=CHECK_DATE))
    return render_prompt(list(case.turns), case.reasoning, case.instructions, today=CHECK_DATE)


def check(tokenizer: Any) -> Check:
    """Render CASES with the checkpoint's template and with Tandem's renderer; report where they differ."""
    if not has_template(tokenizer):
        return Check("none")
    found = []
    for case in CASES:
        try:
            theirs = render(tokenizer, case.turns, case.reasoning, case.instructions, case.example, CHECK_DATE)
        except Exception as e:  # a template is code from the checkpoint: any error is a finding, not a crash
            first = (str(e).splitlines() or [""])[0]
            return Check("failed", error=f"{case.name}: {type(e).__name__}: {first}")
        d = first_difference(case.name, tandem(case), theirs)
        if d is not None:
            found.append(d)
    return Check("differs" if found else "same", found)


def first_difference(name: str, ours: str, theirs: str) -> Difference | None:
    if ours == theirs:
        return None
    i = next((k for k, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), min(len(ours), len(theirs)))
    line = ours.count("\n", 0, i) + 1
    column = i - (ours.rfind("\n", 0, i) + 1) + 1
    lo = max(i - CONTEXT, 0)
    return Difference(name, i, line, column, ours[lo:i + CONTEXT], theirs[lo:i + CONTEXT])


# ----- chat prompts through the checkpoint's template
def pieces(tokenizer: Any, turns: list[Turn], reasoning: str, instructions: str, prefill: str,
           today: date | None) -> list[str]:
    """The prompt as harmony pieces (`Control` tokens and text): the template's own output becomes
    structure, each message's text stays text."""
    texts: list[str] = []

    def mark(text: str) -> str:
        texts.append(text)
        return f"\ue000tandem{len(texts) - 1}\ue001"

    marked_instructions = mark(instructions) if instructions else ""
    marked = [Turn(t.role, mark(t.content), mark(t.analysis) if t.analysis else "") for t in turns]
    rendered = render(tokenizer, marked, reasoning, marked_instructions, today=today) + prefill
    out: list[str] = []
    pos = 0
    for m in _MARK.finditer(rendered):
        out += [*_structure(rendered[pos:m.start()]), texts[int(m.group(1))]]
        pos = m.end()
    return [p for p in out + _structure(rendered[pos:]) if p]


def _structure(text: str) -> list[str]:
    out: list[str] = []
    pos = 0
    for m in _CONTROL.finditer(text):
        out += [text[pos:m.start()], Control(m.group())]
        pos = m.end()
    return [*out, text[pos:]]


def fit_turns(tokenizer: Any, turns: list[Turn], reasoning: str, instructions: str, budget: int,
              prefill: str = "", today: date | None = None) -> tuple[list[int], int]:
    """`engine.harmony.fit_turns` through the checkpoint's template: the prompt's ids with the oldest whole
    exchanges dropped until they fit `budget` tokens; (ids, turns dropped). Raises PromptTooLong."""
    starts = [0] + [i for i in range(1, len(turns)) if turns[i].role == "user"]
    need = 0
    for start in starts:
        ids = encode(tokenizer, pieces(tokenizer, turns[start:], reasoning, instructions, prefill, today))
        if (need := len(ids)) <= budget:
            return ids, start
    raise PromptTooLong(f"the prompt needs {need} tokens but the context holds {budget}: shorten it")
