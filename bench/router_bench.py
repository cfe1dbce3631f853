"""Router latency and accuracy on the held-out labelled set (data/router_eval.jsonl).

    python bench/router_bench.py

Trains on the shipped specialists' prompts (math, code, translate), then routes every held-out
prompt (new phrasings in English, French, German and Spanish, and unrelated prompts that belong to
base). Prints one table.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]


def main() -> None:
    from engine.serve.router import Router
    from engine.train.dataset import load_examples

    tasks = ("math", "code", "translate")
    examples = {t: [e.user_prompt for e in load_examples(str(ROOT / f"data/samples/{t}.jsonl")).examples]
                for t in tasks}
    router = Router(threshold=0.4).fit(examples)
    rows = [json.loads(x) for x in (ROOT / "data/router_eval.jsonl").read_text().splitlines()]
    for r in rows[:20]:  # warm-up
        router.route(r["prompt"])
    times, hits, per = [], 0, Counter()
    totals = Counter(r["label"] for r in rows)
    for _ in range(5):
        for r in rows:
            t = time.perf_counter()
            router.route(r["prompt"])
            times.append((time.perf_counter() - t) * 1e3)
    for r in rows:
        ok = router.route(r["prompt"]).choice == r["label"]
        hits += ok
        per[r["label"]] += ok
    times.sort()
    print(f"router: hashed char n-grams + logistic regression; {sum(map(len, examples.values()))} training prompts, "
          f"fit in {router.fit_seconds:.2f} s")
    print(f"{'p50 latency':24} {statistics.median(times):8.3f} ms")
    print(f"{'p99 latency':24} {times[int(len(times) * 0.99)]:8.3f} ms")
    print(f"{'accuracy (held out)':24} {hits / len(rows):8.1%}  ({hits}/{len(rows)})")
    for label in (*tasks, "base"):
        print(f"  {label:22} {per[label] / totals[label]:8.1%}  ({per[label]}/{totals[label]})")


if __name__ == "__main__":
    main()
