"""Training data: local files or hub datasets, in chat (`messages`) or prompt/response form.

Every row is turned into harmony turns or counted as skipped with its reason (and the first line it
happened on): a person training a specialist must know that 40 of their 1000 rows were thrown away, and
why. One undecodable or malformed row never costs the rest of the file. Rows are tokenized with
`engine.harmony.encode_example`, so text in a dataset never becomes a harmony control token.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from engine.harmony import REASONING, PromptTooLong, Turn, encode_example, fit_turns, render_example

RESPONSE_KEYS = ("response", "completion", "answer", "output")
ANALYSIS_KEYS = ("thinking", "analysis", "reasoning_content")


class DatasetError(ValueError):
    """The data cannot be used at all (missing file, no usable rows, hub unreachable)."""


@dataclass
class Example:
    turns: list[Turn]
    reasoning: str = "low"
    instructions: str = ""

    def render(self) -> tuple[str, str]:
        return render_example(self.turns, self.reasoning, self.instructions)

    def encode(self, tokenizer: Any, max_length: int | None = None) -> dict[str, list[int]]:
        """Token ids for TRL, pre-tokenized so dataset text stays text: input_ids and a completion_mask
        (loss on the assistant's reply only)."""
        prompt, completion = self.encode_parts(tokenizer, max_length)
        return {"input_ids": prompt + completion, "completion_mask": [0] * len(prompt) + [1] * len(completion)}

    def encode_parts(self, tokenizer: Any, max_length: int | None = None) -> tuple[list[int], list[int]]:
        """(prompt ids, completion ids). A conversation longer than `max_length` loses its oldest exchanges
        first, as the chat drops them (`fit_turns`), rather than being cut at the end, which would cut the
        reply it trains on."""
        prompt, completion = encode_example(tokenizer, self.turns, self.reasoning, self.instructions)
        if max_length is not None and len(prompt) + len(completion) > max_length:
            # (PromptTooLong: even the last user turn does not fit beside the reply; the trainer truncates)
            with contextlib.suppress(PromptTooLong):
                prompt, _ = fit_turns(tokenizer, self.turns[:-1], self.reasoning, self.instructions,
                                      max_length - len(completion))
        return prompt, completion

    def as_row(self) -> dict[str, Any]:
        """A row a `datasets.Dataset` can hold; `from_row` reads it back."""
        return asdict(self)

    def to_chat_row(self) -> dict[str, Any]:
        """The example as a chat row of a .jsonl dataset (`messages`, `reasoning_effort`, the instructions
        as a developer message), which `row_to_example` reads back as the same example."""
        messages = [{"role": "developer", "content": self.instructions}] if self.instructions else []
        for t in self.turns:
            m = {"role": t.role, "content": t.content}
            if t.role == "assistant" and t.analysis:
                m["thinking"] = t.analysis
            messages.append(m)
        return {"reasoning_effort": self.reasoning, "messages": messages}

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Example:
        return cls([Turn(**t) for t in row["turns"]], row["reasoning"], row["instructions"])

    @property
    def user_prompt(self) -> str:
        """The last user message: what the router learns from."""
        return next(t.content for t in reversed(self.turns) if t.role == "user")


@dataclass
class LoadReport:
    examples: list[Example] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    first_line: dict[str, int] = field(default_factory=dict)  # reason -> first line (JSONL) or row it hit
    total_rows: int = 0
    usable: int = 0  # before any limit

    @property
    def skipped_count(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        text = f"{self.usable} of {self.total_rows} rows usable"
        if len(self.examples) < self.usable:
            text += f", using the first {len(self.examples)}"
        if self.skipped:
            text += "; skipped: " + ", ".join(f"{n} {why} (first at line {self.first_line[why]})"
                                              for why, n in self.skipped.most_common())
        return text

    def fingerprint(self) -> str:
        """What the examples say, hashed: not their render, which holds today's date (the system message)."""
        h = hashlib.sha256()
        for ex in self.examples:
            h.update(json.dumps(ex.as_row(), ensure_ascii=False, sort_keys=True).encode())
        return h.hexdigest()[:16]


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value.strip() else None


def row_to_example(row: Any) -> Example:
    """One row in either form -> Example. Raises ValueError with a short reason."""
    if not isinstance(row, dict):
        raise ValueError("row is not an object")
    level = row.get("reasoning_effort", "low")
    if level not in REASONING:
        raise ValueError("bad reasoning_effort")
    if "messages" in row:
        return from_messages(row["messages"], level)
    prompt = _text(row.get("prompt")) or _text(row.get("instruction"))
    response = next((_text(row.get(k)) for k in RESPONSE_KEYS if _text(row.get(k))), None)
    if prompt is None or response is None:
        raise ValueError("no prompt/response or messages")
    analysis = next((row[k] for k in ANALYSIS_KEYS if _text(row.get(k))), "")
    turns = [Turn("user", prompt), Turn("assistant", response, analysis)]
    return Example(turns, level, _text(row.get("system")) or "")


def from_messages(messages: Any, level: str) -> Example:
    """A chat (`messages`) -> Example; ValueError with a short reason (preference pairs read theirs here too)."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages is not a non-empty list")
    turns, instructions = [], ""
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise ValueError("message without text content")
        role = m.get("role")
        if role in ("system", "developer"):
            instructions = m["content"]
        elif role == "user":
            turns.append(Turn("user", m["content"]))
        elif role == "assistant":
            analysis = next((m[k] for k in ANALYSIS_KEYS if _text(m.get(k))), "")
            turns.append(Turn("assistant", m["content"], analysis))
        else:
            raise ValueError("unknown role")
    if len(turns) < 2 or turns[-1].role != "assistant" or not turns[-1].content.strip():
        raise ValueError("does not end with an assistant reply")
    if not any(t.role == "user" for t in turns):
        raise ValueError("no user message")
    return Example(turns, level, instructions)


SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _looks_local(source: str) -> bool:
    """A path someone mistyped, not a hub id: anything but `owner/name`, a data file suffix, or an
    owner part that is a folder here."""
    owner = source.split("/", 1)[0]
    return not _HUB_ID.fullmatch(source) or source.lower().endswith(SUFFIXES) or Path(owner).is_dir()


def _read_rows(source: str) -> list[Any]:
    path = Path(source).expanduser()
    if path.is_dir():
        raise DatasetError(f"{path}: is a folder; pass a .jsonl, .json, .parquet or .csv file")
    if path.exists():
        try:
            return _file_rows(path)
        except OSError as e:
            raise DatasetError(f"{path}: cannot be read ({e.strerror or e})") from None
    if _looks_local(source):
        raise DatasetError(f"{path}: no such file")
    return _hub_rows(source)


def _file_rows(path: Path) -> list[Any]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return [_jsonl_row(line) for line in path.read_bytes().splitlines()]
    if suffix == ".json":
        try:
            data = json.loads(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as e:
            raise DatasetError(f"{path}: not UTF-8 text (byte {e.start})") from None
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path}: not valid JSON at line {e.lineno}: {e.msg}") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            return data["data"]
        return data if isinstance(data, list) else [data]
    if suffix in (".parquet", ".csv"):
        from datasets import load_dataset  # heavy: only for these formats

        try:
            return list(load_dataset(suffix[1:], data_files=str(path), split="train"))
        except Exception as e:  # pyarrow/pandas raise many types for a malformed file; one message for all
            raise DatasetError(f"{path}: cannot be read as {suffix[1:]} ({type(e).__name__}: {e})") from None
    raise DatasetError(f"{path}: unsupported file type {suffix!r} (use .jsonl, .json, .parquet or .csv)")


def _jsonl_row(line: bytes) -> Any:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return _Unparsable("not UTF-8")
    if not text.strip():
        return _Blank()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return _Unparsable("invalid JSON")


def _hub_rows(name: str) -> list[Any]:
    from datasets import load_dataset

    try:
        return list(load_dataset(name, split="train"))
    except Exception as e:  # datasets raises many types for offline/missing; one message for all
        raise DatasetError(
            f"could not load Hugging Face dataset {name!r} ({type(e).__name__}: {e}). "
            "Offline? Download it on a connected machine and pass a local file instead."
        ) from e


@dataclass
class _Unparsable:
    """Stands in for a JSONL line that is not JSON (or not text), so it is counted as skipped."""

    reason: str


class _Blank:
    """An empty JSONL line: not a row, but it keeps the line numbers right."""


def load_examples(source: str, limit: int | None = None) -> LoadReport:
    """Read and validate a dataset. Never raises for bad rows; raises DatasetError when nothing is usable."""
    rows = _read_rows(source)
    report = LoadReport(total_rows=sum(not isinstance(r, _Blank) for r in rows))
    for line, row in enumerate(rows, start=1):
        if isinstance(row, _Blank):
            continue
        try:
            if isinstance(row, _Unparsable):
                raise ValueError(row.reason)
            report.examples.append(row_to_example(row))
        except ValueError as e:
            report.skipped[str(e)] += 1
            report.first_line.setdefault(str(e), line)
    report.usable = len(report.examples)
    if limit is not None:
        report.examples = report.examples[:limit]
    if not report.examples:
        raise DatasetError(f"{source}: no usable rows ({report.summary()})")
    return report
