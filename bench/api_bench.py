"""The OpenAI-compatible API against the engine called directly: time to first token and tokens/s, at 1
and 8 concurrent clients.

    python bench/api_bench.py [--tokens 64] [--rounds 3] [--clients 1,8] [--layers 0] [--model NAME]

Both paths answer the same greedy prompts with the base model on the same engine, in the same process:
"direct" calls `Workstation.ask` from client threads (what the app does), "api" sends the request with the
real `openai` client over loopback HTTP to `tandem serve`'s server (SSE streaming, usage included). Both
record their turns in the history, as the product does. Measured at the client:

- TTFT: request sent to the first streamed text (reasoning or content);
- per-request tok/s: completion tokens over the request's whole time; aggregate tok/s: every token of a
  round over the round's wall time (with 8 clients the worker answers them one after another);
- overhead per token at 1 client: the API's time per completion token against the direct path's.

`--layers 0` (default) serves the demo model (CPU, or the GPU when there is one); `--layers N` a
GPT-OSS-20B-shaped model with random weights (bench/shapes.py), whose replies are not harmony, so its
text only comes at the end of a reply: TTFT is then reported as n/a, tok/s stands. `--model` serves a
real checkpoint (a hub id or folder already on the machine).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

PROMPTS = ["Hello!", "What is 7 times 8?", "Translate 'good morning' to French.", "Write a haiku about rain.",
           "Name three primes.", "What is the capital of Italy?", "Explain recursion briefly.", "Say hi."]


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))] if values else float("nan")


def direct(station, prompt: str, tokens: int) -> tuple[float | None, float, int]:
    """(TTFT s or None, total s, completion tokens) of one answer from the engine itself."""
    from engine.serve.chat import Delta, Finished
    from engine.serve.generate import Sampling

    start, first, out = time.perf_counter(), None, 0
    for ev in station.ask(station.new_conversation(), prompt, mode="base",
                          sampling=Sampling(greedy=True, max_new_tokens=tokens)):
        if isinstance(ev, Delta) and first is None:
            first = time.perf_counter() - start
        elif isinstance(ev, Finished):
            out = ev.reply.stats.tokens_out
    return first, time.perf_counter() - start, out


def through_api(client, prompt: str, tokens: int) -> tuple[float | None, float, int]:
    start, first, out = time.perf_counter(), None, 0
    stream = client.chat.completions.create(model="base", messages=[{"role": "user", "content": prompt}],
                                            temperature=0, max_tokens=tokens, stream=True,
                                            stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.usage:
            out = chunk.usage.completion_tokens
        for c in chunk.choices:
            text = c.delta.content or (c.delta.model_extra or {}).get("reasoning_content")
            if text and first is None:
                first = time.perf_counter() - start
    return first, time.perf_counter() - start, out


def run_round(fn, clients: int, tokens: int, offset: int) -> tuple[list, float]:
    results: list = [None] * clients
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            results[i] = fn(PROMPTS[(offset + i) % len(PROMPTS)], tokens)
        except BaseException as e:  # reported after the round
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", default="1,8")
    ap.add_argument("--layers", type=int, default=0, help="0: the demo model; N: a random GPT-OSS-20B slice")
    ap.add_argument("--model", default="", help="a real checkpoint (hub id or folder) instead")
    a = ap.parse_args()

    import unsloth  # noqa: F401  (before transformers)
    from openai import OpenAI

    from engine.serve.demo_model import demo_model_path
    from engine.service import Workstation
    from engine.settings import load, updated

    work = Path(tempfile.mkdtemp())
    shutil.copy(ROOT / "settings.toml", work / "settings.toml")
    s = load(work / "settings.toml")
    name = a.model
    if a.layers and not name:
        from bench.shapes import save_slice

        name = str(save_slice(Path(tempfile.gettempdir()) / f"gpt-oss-20b-slice-{a.layers}", a.layers,
                              demo_model_path()))
    for key, value in (("model.name", name), ("api.port", 0), ("api.max_concurrent", 64),
                       ("model.record_experts", False)):
        s = updated(s, key, value)
    station = Workstation(s)
    station.load(lambda *_: None, lambda _m: None, lambda _c: None)
    url = station.start_api()
    client = OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
    info = station.model_info()
    print(f"model: {info.line() if info else name} · API at {url}", flush=True)
    paths = {"direct": lambda p, n: direct(station, p, n), "api": lambda p, n: through_api(client, p, n)}
    for fn in paths.values():  # warm-up: compile, caches, the first connection
        run_round(fn, 1, a.tokens, 0)

    rows, per_token = [], {}
    for clients in [int(c) for c in a.clients.split(",")]:
        for path, fn in paths.items():
            ttft, rate, spt, walls, total = [], [], [], [], 0
            for r in range(a.rounds):
                results, wall = run_round(fn, clients, a.tokens, r * clients)
                walls.append(wall)
                for first, seconds, out in results:
                    total += out
                    if first is not None:
                        ttft.append(first)
                    if out:
                        rate.append(out / seconds)
                        spt.append(seconds / out)
            per_token[(path, clients)] = statistics.median(spt)
            rows.append((path, clients, a.rounds * clients, total, total / sum(walls), statistics.median(rate),
                         pct(ttft, 0.5), pct(ttft, 0.95)))
    print(f"\n{'path':7} {'clients':>7} {'requests':>8} {'tokens':>7} {'agg tok/s':>10} {'req tok/s':>10} "
          f"{'TTFT p50 ms':>11} {'TTFT p95 ms':>11}")
    for path, clients, n, total, agg, req, t50, t95 in rows:
        shown = [f"{t * 1000:11.1f}" if t == t else f"{'n/a':>11}" for t in (t50, t95)]
        print(f"{path:7} {clients:>7} {n:>8} {total:>7} {agg:>10.1f} {req:>10.1f} {shown[0]} {shown[1]}")
    for clients in sorted({c for _, c in per_token}):
        d, api = per_token[("direct", clients)], per_token[("api", clients)]
        print(f"time per token at {clients} client(s): direct {d * 1000:.2f} ms, API {api * 1000:.2f} ms, "
              f"API overhead {100 * (api - d) / d:+.1f} %")
    station.close()


if __name__ == "__main__":
    main()
