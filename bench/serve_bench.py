"""Serving on the inference GPU: decode speed, adapter switch and load, expert-recording overhead.

    python bench/serve_bench.py [--layers 24] [--tokens 64]

Builds a GPT-OSS-20B-shaped model with random bf16 weights (plain transformers + PEFT, as the engine
runs it), three random rank-16 adapters on attention + all experts, and drives it through the
engine's own generate loop and LiveAdapters. On a machine without a GPU it runs the demo model
instead. Prints one table; every figure has its baseline from the same run beside it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]


def decode_rate(lm, prompt: str, tokens: int, record: bool = False, repeat: int = 2) -> tuple[float, float]:
    """(tokens/s after the first token, time to first token in s): median of `repeat` runs."""
    from engine.generate import Sampling, complete

    rates, ttfts = [], []
    for _ in range(repeat):
        r = complete(lm, prompt, Sampling(greedy=True, max_new_tokens=tokens), record_experts=record)
        rates.append(r.stats.tokens_per_s)
        ttfts.append(r.stats.ttft_s)
    return statistics.median(rates), statistics.median(ttfts)


def main() -> None:
    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--tokens", type=int, default=64)
    a = ap.parse_args()

    from engine.adapters import AdapterStore, Manifest
    from engine.harmony import Turn, render_prompt
    from engine.lora import LiveAdapters
    from engine.model import LoadedModel

    gpu = torch.cuda.is_available()
    work = Path(tempfile.mkdtemp())
    started = time.perf_counter()
    if gpu:
        from bench.shapes import random_lora, random_model, wide_tokenizer

        model, tok = random_model(a.layers), wide_tokenizer()
        what = f"GPT-OSS-20B shape, {a.layers} layers, random bf16, {torch.cuda.get_device_name()}"
        words = " ".join(f"w{i}" for i in range(1000, 3000))  # a 2k-token prompt
        long_prompt = render_prompt([Turn("user", words)])
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from bench.shapes import random_lora
        from engine.demo_model import demo_model_path

        path = demo_model_path()
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(path)
        what = "demo model (CPU)"
        long_prompt = render_prompt([Turn("user", "What is 2 plus 2? " * 150)])
    build_s = time.perf_counter() - started
    base_id = "bench"
    store = AdapterStore(work / "adapters", base_model=base_id)
    for i, name in enumerate(("math", "code", "late")):
        folder = random_lora(model, work / f"lora-{name}", seed=i)
        if name != "late":
            store.publish(folder, Manifest(name=name, task=name, base_model=base_id))
    lm = LoadedModel(model, tok, what, str(next(model.parameters()).device), False, build_s, False)
    live = LiveAdapters(lm, store, budget_mb=64_000)
    prompt = render_prompt([Turn("user", "w5 w6 w7 w8" if gpu else "Hello!")])
    sync = torch.cuda.synchronize if gpu else (lambda: None)

    rows = []
    base_rate, base_ttft = decode_rate(lm, prompt, a.tokens)
    rows.append(("decode, no adapter (engine loop)", f"{base_rate:.1f} tok/s", ""))
    with torch.inference_mode():
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids.to(lm.device)
        model.generation_config.pad_token_id = tok.pad_token_id
        sync()
        t = time.perf_counter()
        out = model.generate(ids, max_new_tokens=a.tokens, min_new_tokens=a.tokens, do_sample=False)
        sync()
        hf_rate = (out.shape[1] - ids.shape[1]) / (time.perf_counter() - t)
    rows.append(("decode, no adapter (model.generate)", f"{hf_rate:.1f} tok/s", "baseline for the engine loop"))
    rec_rate, _ = decode_rate(lm, prompt, a.tokens, record=True)
    rows.append(("decode, expert routing recorded", f"{rec_rate:.1f} tok/s",
                 f"overhead {(1 - rec_rate / base_rate) * 100:.1f}% vs not recorded"))

    t = time.perf_counter()
    live.ensure("math")
    first_load = time.perf_counter() - t
    live.ensure("code")
    live.activate("math")
    rate, _ = decode_rate(lm, prompt, a.tokens)
    rows.append(("decode, specialist active", f"{rate:.1f} tok/s", f"{rate / base_rate * 100:.0f}% of no adapter"))
    swaps = []
    for i in range(50):
        sync()
        t = time.perf_counter()
        live.activate("code" if i % 2 else "math")
        sync()
        swaps.append(time.perf_counter() - t)
    rows.append(("switch between resident adapters", f"{statistics.median(swaps) * 1e3:.3f} ms p50",
                 f"p99 {sorted(swaps)[int(len(swaps) * 0.99) - 1] * 1e3:.3f} ms"))
    live.activate("math")
    live.activate("code")
    rate_after, _ = decode_rate(lm, prompt, a.tokens, repeat=1)
    rows.append(("decode, right after a switch", f"{rate_after:.1f} tok/s", ""))
    size_mb = store.get("math").size_bytes / 2**20
    store.publish(work / "lora-late", Manifest(name="late", task="late", base_model=base_id))
    live.refresh()
    t = time.perf_counter()
    live.ensure("late")
    late_s = time.perf_counter() - t
    rows.append(("load a newly published adapter", f"{late_s:.2f} s",
                 f"{size_mb:.0f} MB; first load {first_load:.2f} s"))
    rows.append(("build/load base model", f"{build_s:.1f} s", "what a restart would add to the load above"))
    live.activate(None)
    _, long_ttft = decode_rate(lm, long_prompt, 8, repeat=2)
    n_long = len(tok(long_prompt, add_special_tokens=False)["input_ids"])
    rows.append((f"time to first token, {n_long}-token prompt", f"{long_ttft * 1e3:.0f} ms",
                 f"short prompt: {base_ttft * 1e3:.0f} ms"))
    if gpu:
        rows.append(("peak GPU memory", f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GB", ""))

    print(f"\n{what}; batch 1, greedy, {a.tokens} new tokens")
    width = max(len(r[0]) for r in rows)
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>16}  {note}")


if __name__ == "__main__":
    main()
