"""Training data: local files or hub datasets, in chat (`messages`) or prompt/response form.

Every row is turned into harmony turns or counted as skipped with its reason: a person training a
specialist must know that 40 of their 1000 rows were thrown away, and why.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.harmony import REASONING, Turn, render_example

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

    @property
    def user_prompt(self) -> str:
        """The last user message: what the router learns from."""
        return next(t.content for t in reversed(self.turns) if t.role == "user")


@dataclass
class LoadReport:
    examples: list[Example] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)  # reason -> count
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
            text += "; skipped: " + ", ".join(f"{n} {why}" for why, n in self.skipped.most_common())
        return text

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for ex in self.examples:
            h.update(json.dumps(ex.render(), ensure_ascii=False).encode())
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
        return _from_messages(row["messages"], level)
    prompt = _text(row.get("prompt")) or _text(row.get("instruction"))
    response = next((_text(row.get(k)) for k in RESPONSE_KEYS if _text(row.get(k))), None)
    if prompt is None or response is None:
        raise ValueError("no prompt/response or messages")
    analysis = next((row[k] for k in ANALYSIS_KEYS if _text(row.get(k))), "")
    turns = [Turn("user", prompt), Turn("assistant", response, analysis)]
    return Example(turns, level, _text(row.get("system")) or "")


def _from_messages(messages: Any, level: str) -> Example:
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


def _read_rows(source: str) -> list[Any]:
    path = Path(source).expanduser()
    if path.exists():
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            rows = []
            for line in path.read_text(encoding="utf-8").splitlines():
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    rows.append(_Unparsable())
            return rows
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            return data if isinstance(data, list) else data.get("data", [data])
        if suffix in (".parquet", ".csv"):
            from datasets import load_dataset  # heavy: only for these formats

            kind = "parquet" if suffix == ".parquet" else "csv"
            return list(load_dataset(kind, data_files=str(path), split="train"))
        raise DatasetError(f"{path}: unsupported file type {suffix!r} (use .jsonl, .json, .parquet or .csv)")
    if "/" in source and not source.startswith((".", "/", "~")):
        return _hub_rows(source)
    raise DatasetError(f"{source}: no such file, and not a Hugging Face dataset name (owner/name)")


def _hub_rows(name: str) -> list[Any]:
    from datasets import load_dataset

    try:
        return list(load_dataset(name, split="train"))
    except Exception as e:  # datasets raises many types for offline/missing; one message for all
        raise DatasetError(
            f"could not load Hugging Face dataset {name!r} ({type(e).__name__}: {e}). "
            "Offline? Download it on a connected machine and pass a local file instead."
        ) from e


class _Unparsable:
    """Stands in for a JSONL line that is not JSON, so it is counted as skipped."""


def load_examples(source: str, limit: int | None = None) -> LoadReport:
    """Read and validate a dataset. Never raises for bad rows; raises DatasetError when nothing is usable."""
    rows = _read_rows(source)
    report = LoadReport(total_rows=len(rows))
    for row in rows:
        if isinstance(row, _Unparsable):
            report.skipped["invalid JSON"] += 1
            continue
        try:
            report.examples.append(row_to_example(row))
        except ValueError as e:
            report.skipped[str(e)] += 1
    report.usable = len(report.examples)
    if limit is not None:
        report.examples = report.examples[:limit]
    if not report.examples:
        raise DatasetError(f"{source}: no usable rows ({report.summary()})")
    return report
