"""Router accuracy, abstention and latency on the held-out set (data/router_eval.jsonl), on one CPU core.

    python bench/router_bench.py [--seeds 5] [--no-baseline]

Specialists learn from the shipped datasets (data/samples/{math,code,translate}.jsonl: English, French,
German and Spanish only), drawing 10, 20 or 100 prompts each (code has 47 distinct ones) with several
seeds. The held-out set has math, code, translate and unrelated ("none") prompts in 14 languages, five
of them in non-Latin scripts. Prints accuracy per training-set size, per label and per language, the
share of unrelated prompts routed to a specialist, the same with 1, 2 or 3 specialists, and p50/p99
latency. The hand-written router this one replaced (character n-grams, from git history) runs beside
it when git can show it.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # one core: before numpy is imported
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import importlib.util
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]
TASKS = ("math", "code", "translate")
SIZES = (10, 20, 100)
TRAINED = {"en", "fr", "de", "es"}  # the languages of the specialists' data
ENCODED = {"ar", "de", "en", "es", "fr", "it", "ja", "ko", "nl", "pl", "pt", "ru", "th", "tr", "zh"}  # USE's own
BASELINE_COMMIT = "4cc6601"  # the last commit with the character n-gram router


def baseline_router():
    """The previous router class, loaded from git history; None where git cannot show it."""
    try:
        src = subprocess.run(["git", "-C", str(ROOT), "show", f"{BASELINE_COMMIT}:engine/serve/router.py"],
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    path = Path(tempfile.mkdtemp()) / "old_router.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("old_router", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_router"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module.Router


def pick(pool: dict[str, list[str]], n: int, seed: int, tasks=TASKS) -> dict[str, list[str]]:
    rng = random.Random(seed)
    return {t: rng.sample(pool[t], min(n, len(pool[t]))) for t in tasks}


def label_of(choice: str) -> str:
    return "none" if choice == "base" else choice


def evaluate(make, pool, rows, n, seeds, tasks=TASKS):
    """[(row, predicted label)] over all seeds; prompts of a task without a specialist count as none."""
    out = []
    for seed in range(seeds):
        router = make().fit(pick(pool, n, seed, tasks))
        for r in rows:
            want = r["label"] if r["label"] in tasks else "none"
            out.append((r, want, label_of(router.route(r["prompt"]).choice)))
    return out


def share(results, key=lambda r, w: True) -> tuple[float, int]:
    hits = [w == got for r, w, got in results if key(r, w)]
    return (sum(hits) / len(hits) if hits else float("nan")), len(hits)


def false_routes(results) -> float:
    none = [got != "none" for r, w, got in results if w == "none"]
    return sum(none) / len(none)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--no-baseline", action="store_true")
    args = ap.parse_args()
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

    from engine.serve.router import Router
    from engine.train.dataset import load_examples

    pool = {t: list(dict.fromkeys(e.user_prompt for e in load_examples(str(ROOT / f"data/samples/{t}.jsonl")).examples))
            for t in TASKS}
    rows = [json.loads(x) for x in (ROOT / "data/router_eval.jsonl").read_text().splitlines() if x.strip()]
    langs = sorted({r["lang"] for r in rows}, key=lambda x: (x not in TRAINED, x not in ENCODED, x))
    routers = {"new": lambda: Router(threshold=0.4)}
    old = None if args.no_baseline else baseline_router()
    if old is not None:
        routers["old"] = lambda: old(threshold=0.4)

    started = time.perf_counter()
    router = Router(threshold=0.4).fit(pick(pool, 20, 0))
    print(f"held out: {len(rows)} prompts, {len(langs)} languages; specialists learn from en/fr/de/es only; "
          f"{args.seeds} seeds per size; first fit (loads the encoder) {time.perf_counter() - started:.2f} s, "
          f"refit {Router(threshold=0.4).fit(pick(pool, 20, 1)).fit_seconds:.2f} s")
    times = []
    for _ in range(3):
        for r in rows:
            t = time.perf_counter()
            router.route(r["prompt"])
            times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    print(f"latency on one core: p50 {statistics.median(times):.2f} ms, p99 {times[int(len(times) * 0.99)]:.2f} ms")

    results = {(name, n): evaluate(make, pool, rows, n, args.seeds) for name, make in routers.items() for n in SIZES}
    cols = [f"{name} n={n}" for name in routers for n in SIZES]
    print("\n| held out | " + " | ".join(cols) + " |")
    print("| --- |" + " ---: |" * len(cols))

    def line(title, key):
        cells = []
        for name in routers:
            for n in SIZES:
                acc, count = share(results[name, n], key)
                cells.append(f"{acc:.1%}")
        print(f"| {title} ({count // args.seeds}) | " + " | ".join(cells) + " |")

    line("all", lambda r, w: True)
    line("the encoder's languages", lambda r, w: r["lang"] in ENCODED)
    line("seen languages", lambda r, w: r["lang"] in TRAINED)
    line("unseen, encoder's languages", lambda r, w: r["lang"] not in TRAINED and r["lang"] in ENCODED)
    line("outside the encoder's (hi)", lambda r, w: r["lang"] not in ENCODED)
    for label in (*TASKS, "none"):
        line(f"label {label}", lambda r, w, label=label: r["label"] == label)
    for lang in langs:
        tag = "trained" if lang in TRAINED else "encoder" if lang in ENCODED else "unknown to encoder"
        line(f"{lang} ({tag})", lambda r, w, lang=lang: r["lang"] == lang)
    print("| unrelated routed (false) | " + " | ".join(f"{false_routes(results[name, n]):.1%}"
                                                  for name in routers for n in SIZES) + " |")

    print("\nAbstention with fewer specialists (n=20; prompts of a missing specialist must go to none):")
    print("| specialists | accuracy | unrelated + missing tasks routed |")
    print("| --- | ---: | ---: |")
    for tasks in (("math",), ("math", "code"), TASKS):
        res = evaluate(routers["new"], pool, rows, 20, args.seeds, tasks)
        print(f"| {', '.join(tasks)} | {share(res)[0]:.1%} | {false_routes(res):.1%} |")

    worst = defaultdict(int)
    for r, w, got in results["new", 20]:
        if w != got:
            worst[(r["lang"], r["label"], got, r["prompt"])] += 1
    print(f"\nmisses at n=20 (of {args.seeds} seeds):")
    for (lang, label, got, prompt), k in sorted(worst.items(), key=lambda kv: -kv[1])[:25]:
        print(f"  {k}x {lang} {label} -> {got}: {prompt}")


if __name__ == "__main__":
    main()
