"""The user's router corrections: "this prompt should have gone to X" (or to none), kept across restarts.

One JSON object a line in `adapters/.router-corrections.jsonl` (the store skips dot-names). The whole
file is rewritten through a temporary file and a rename, so a crash mid-write leaves the old file,
never half a line. The latest correction of a prompt wins.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

FILE_NAME = ".router-corrections.jsonl"


@dataclass
class Correction:
    prompt: str
    label: str  # a specialist name, or "none"
    created: float


class RouterCorrections:
    def __init__(self, adapters_dir: Path):
        self.path = Path(adapters_dir) / FILE_NAME

    def _read(self) -> list[Correction]:
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        out = []
        for line in lines:
            try:
                d = json.loads(line)
                out.append(Correction(str(d["prompt"]), str(d["label"]), float(d.get("created", 0.0))))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                continue  # a hand-edited bad line costs that line, not the rest
        return out

    def latest(self) -> list[Correction]:
        """One correction per prompt, the newest, in the order they were made."""
        by_prompt = {c.prompt: c for c in self._read()}
        return sorted(by_prompt.values(), key=lambda c: c.created)

    def add(self, prompt: str, label: str) -> Correction:
        fix = Correction(prompt, label, time.time())
        rows = [c for c in self.latest() if c.prompt != prompt] + [fix]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".router-corrections-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.writelines(json.dumps(asdict(c), ensure_ascii=False) + "\n" for c in rows)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return fix
