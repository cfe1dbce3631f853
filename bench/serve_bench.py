"""Serving on the inference GPU: decode speed, adapter switch and load, expert-recording overhead.

    python bench/serve_bench.py [--layers 24] [--tokens 64] [--batch 8]

Builds a GPT-OSS-20B-shaped model with random bf16 weights (plain transformers + PEFT, as the engine
runs it), three random rank-16 adapters on attention + all experts, and drives it through the
engine's own generate loop and LiveAdapters, once through the fast decoder (the default) and once
through the reference path (transformers + PEFT, model.fast_decode off). On a machine without a GPU
it runs the demo model instead. Prints one table; every figure has its baseline from the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]


def decode_rate(lm, prompt: str, tokens: int, record: bool = False, repeat: int = 2) -> tuple[float, float]:
    """(tokens/s after the first token, time to first token in s) through the engine's generate loop:
    median of `repeat` runs after one warm-up (the fast path captures its CUDA graphs there)."""
    from engine.serve.generate import Sampling, complete

    rates, ttfts = [], []
    for i in range(repeat + 1):
        r = complete(lm, prompt, Sampling(greedy=True, max_new_tokens=tokens), record_experts=record)
        if i:
            rates.append(r.stats.tokens_per_s)
            ttfts.append(r.stats.ttft_s)
    return statistics.median(rates), statistics.median(ttfts)


@contextlib.contextmanager
def reference(lm):
    """Generate through transformers + PEFT (the engine's path with model.fast_decode off)."""
    fast, lm.fast = lm.fast, None
    try:
        yield
    finally:
        lm.fast = fast


def generate_rate(lm, ids, tokens: int) -> float:
    """model.generate tokens/s per sequence for a batch of prompts (no streaming, no stop tokens)."""
    import torch

    model = lm.reference_model()
    model.generation_config.pad_token_id = lm.tokenizer.pad_token_id
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        _sync()
        t = time.perf_counter()
        out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        _sync()
    return (out.shape[1] - ids.shape[1]) / (time.perf_counter() - t)


def fast_batch_rate(lm, ids, tokens: int) -> float:
    """The fast decoder on a batch of prompts in lockstep, greedy on the device: tokens/s per sequence."""
    rates = []
    for _ in range(2):  # the first pass captures the graphs
        logits = lm.fast.prefill(ids)
        _sync()
        t = time.perf_counter()
        for _ in range(tokens):
            logits = lm.fast.step(logits.argmax(-1))
        _sync()
        rates.append(tokens / (time.perf_counter() - t))
    return rates[-1]


def agreement(lm, ids, steps: int = 16) -> tuple[float, int]:
    """(worst relative logit error, steps whose top-1 token agrees) of the fast decoder against the
    reference forward with the same adapter, greedy-extending `ids` along the reference's choice."""
    import torch

    worst, same = 0.0, 0
    with torch.inference_mode():
        logits = lm.fast.prefill(ids)
        for i in range(steps):
            ref = lm.reference_model()(input_ids=ids).logits[:, -1].float()
            worst = max(worst, ((logits.float() - ref).abs().max() / ref.abs().max()).item())
            same += int(logits.argmax(-1).item() == ref.argmax(-1).item())
            nxt = ref.argmax(-1)
            ids = torch.cat([ids, nxt[:, None]], 1)
            if i < steps - 1:
                logits = lm.fast.step(nxt)
    return worst, same


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def percentile(xs: list[float], q: float) -> float:
    return sorted(xs)[max(0, int(len(xs) * q) - 1)]


def main() -> None:
    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    a = ap.parse_args()

    from engine.harmony import Turn, render_prompt
    from engine.serve.fast_decode import FastDecoder
    from engine.serve.model import LoadedModel
    from engine.serve.residency import LiveAdapters
    from engine.store.adapters import AdapterStore, Manifest

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
        from engine.serve.demo_model import demo_model_path

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
    lm.fast = FastDecoder(model, max_len=4096)
    live = LiveAdapters(lm, store, budget_mb=64_000)
    prompt = render_prompt([Turn("user", "w5 w6 w7 w8" if gpu else "Hello!")])
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids.to(lm.device)
    batch_ids = ids.repeat(a.batch, 1)

    rows: list[tuple[str, str, str, str]] = []  # what, fast engine, reference, note

    def row(name: str, fast: str, ref: str = "", note: str = "") -> None:
        rows.append((name, fast, ref, note))
        print(f"  {name}: {fast} | {ref} | {note}", flush=True)

    base_rate, base_ttft = decode_rate(lm, prompt, a.tokens)
    with reference(lm):
        ref_base, _ = decode_rate(lm, prompt, a.tokens, repeat=1)
    hf_rate = generate_rate(lm, ids, a.tokens)
    row("decode b1, no adapter", f"{base_rate:.1f} tok/s", f"{ref_base:.1f} tok/s",
        f"model.generate {hf_rate:.1f} tok/s: engine {base_rate / hf_rate:.2f}x of it")
    rec_rate, _ = decode_rate(lm, prompt, a.tokens, record=True)
    row("decode b1, expert routing recorded", f"{rec_rate:.1f} tok/s", "",
        f"overhead {(1 - rec_rate / base_rate) * 100:.1f}% vs not recorded")
    row(f"decode b{a.batch}, no adapter (per sequence)", f"{fast_batch_rate(lm, batch_ids, a.tokens):.1f} tok/s",
        f"{generate_rate(lm, batch_ids, a.tokens):.1f} tok/s", "reference = model.generate")

    t = time.perf_counter()
    live.ensure("math")
    first_load = time.perf_counter() - t
    live.ensure("code")
    live.activate("math")
    err, same = agreement(lm, ids)
    row("logits vs PEFT, specialist active", f"rel err {err:.1e}", "", f"top-1 agrees on {same}/16 steps")
    rate, _ = decode_rate(lm, prompt, a.tokens)
    with reference(lm):
        ref_rate, _ = decode_rate(lm, prompt, min(a.tokens, 32), repeat=1)
    row("decode b1, specialist active", f"{rate:.1f} tok/s", f"{ref_rate:.1f} tok/s",
        f"fast: {rate / base_rate * 100:.0f}% of its no-adapter speed")
    row(f"decode b{a.batch}, specialist active (per sequence)",
        f"{fast_batch_rate(lm, batch_ids, a.tokens):.1f} tok/s",
        f"{generate_rate(lm, batch_ids, min(a.tokens, 16)):.1f} tok/s", "reference = model.generate with PEFT")
    swaps = []
    for i in range(50):
        _sync()
        t = time.perf_counter()
        live.activate("code" if i % 2 else "math")
        _sync()
        swaps.append(time.perf_counter() - t)
    row("switch between resident adapters", f"{statistics.median(swaps) * 1e3:.3f} ms p50",
        "", f"p99 {percentile(swaps, 0.99) * 1e3:.3f} ms; the fast path picks that adapter's graphs")
    live.activate("math")
    live.activate("code")
    rate_after, _ = decode_rate(lm, prompt, a.tokens, repeat=1)
    row("decode b1, right after a switch", f"{rate_after:.1f} tok/s")
    size_mb = store.get("math").size_bytes / 2**20
    store.publish(work / "lora-late", Manifest(name="late", task="late", base_model=base_id))
    live.refresh()
    t = time.perf_counter()
    live.ensure("late")
    late_s = time.perf_counter() - t
    row("load a newly published adapter", f"{late_s:.2f} s", "", f"{size_mb:.0f} MB; first load {first_load:.2f} s")
    row("build/load base model", f"{build_s:.1f} s", "", "what a restart would add to the load above")
    live.activate(None)
    _, long_ttft = decode_rate(lm, long_prompt, 8, repeat=2)
    with reference(lm):
        _, ref_long_ttft = decode_rate(lm, long_prompt, 8, repeat=1)
    n_long = len(tok(long_prompt, add_special_tokens=False)["input_ids"])
    row(f"time to first token, {n_long}-token prompt", f"{long_ttft * 1e3:.0f} ms", f"{ref_long_ttft * 1e3:.0f} ms",
        f"short prompt: {base_ttft * 1e3:.0f} ms")
    if gpu:
        row("peak GPU memory", f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GB", "", "whole run")

    print(f"\n{what}; greedy, {a.tokens} new tokens; fast = engine default, reference = transformers + PEFT")
    head = ("", "fast engine", "reference", "")
    width = [max(len(r[i]) for r in [head, *rows]) for i in range(3)]
    for name, fast, ref, note in [head, *rows]:
        print(f"{name:<{width[0]}}  {fast:>{width[1]}}  {ref:>{width[2]}}  {note}")


if __name__ == "__main__":
    main()
