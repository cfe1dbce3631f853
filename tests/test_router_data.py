"""The shipped unrelated prompts (engine/data/router_none.jsonl) are what every specialist's margin is
calibrated against and what e5's language directions are read from (engine/serve/router.py). A language
with few of them gets a noisy mean and the prompts in it a loose calibration (issue 24: ro, cs, bn, ur,
fa, ms and da had 2-10 each), and a copy of a tuning prompt would make the tuning figures dishonest."""

import json
import re
from collections import Counter
from pathlib import Path

from engine.serve.router import TASK_LIBRARY, UNRELATED_DATA

ROOT = Path(__file__).resolve().parent.parent
# The languages the benchmark sets ask in most, each needing a calibration of its own.
COVERED = ("en", "fr", "de", "es", "it", "pt", "nl", "pl", "ru", "uk", "cs", "ro", "tr", "ar", "he", "fa", "hi",
           "bn", "ur", "th", "vi", "id", "ms", "tl", "sw", "el", "ja", "ko", "zh", "sv", "da", "fi", "hu")
MIN_PER_LANGUAGE = 20


def rows() -> list[dict]:
    return [json.loads(x) for x in UNRELATED_DATA.read_text(encoding="utf-8").splitlines() if x.strip()]


def test_every_row_is_a_prompt_and_its_language():
    for i, r in enumerate(rows(), 1):
        assert set(r) == {"prompt", "lang"}, f"line {i}: {r}"
        assert isinstance(r["prompt"], str) and r["prompt"] and r["prompt"] == r["prompt"].strip(), f"line {i}"
        assert re.fullmatch(r"[a-z]{2,3}", r["lang"]), f"line {i}: {r['lang']!r}"


def test_no_prompt_is_shipped_twice():
    twice = [p for p, n in Counter(r["prompt"].casefold() for r in rows()).items() if n > 1]
    assert not twice, twice


def test_each_covered_language_has_enough_unrelated_prompts():
    counts = Counter(r["lang"] for r in rows())
    short = {lang: counts[lang] for lang in COVERED if counts[lang] < MIN_PER_LANGUAGE}
    assert not short, short


def test_no_benchmark_prompt_is_shipped():
    """Neither the unrelated set nor the task library holds a prompt of a tuning or held-out set
    (data/router_*.jsonl, bench/router_bench.py --data)."""
    shipped = {json.loads(x)["prompt"].casefold() for path in (UNRELATED_DATA, TASK_LIBRARY)
               for x in path.read_text(encoding="utf-8").splitlines() if x.strip()}
    sets = sorted((ROOT / "data").glob("router_*.jsonl"))
    assert len(sets) >= 6
    for path in sets:
        lines = path.read_text(encoding="utf-8").splitlines()
        copied = [p for p in (json.loads(x)["prompt"] for x in lines if x.strip()) if p.casefold() in shipped]
        assert not copied, (path.name, copied)
