"""Serving on the inference GPU: the fast decoder over bf16 and over MXFP4 experts, against the memory
bandwidth bound, with the chat process capped as a 24 GB card would hold it.

    python bench/serve_bench.py [--layers 24] [--tokens 128] [--batch 8] [--cap-gb 24] [--context 8192]
                                [--lm-head-8bit]

Builds GPT-OSS-20B-shaped models with random weights (bench/shapes.py) and random rank-16 specialists
on attention + all experts, held by PEFT as the engine holds them, and drives the fast decoder the way
the engine's loop does (one token at a time, greedy, the token read back to the host each step):

1. bf16 experts (the 80 GB path), context 4096, uncapped: decode tok/s without and with a specialist.
2. MXFP4 experts, with the process capped at --cap-gb (torch.cuda.set_per_process_memory_fraction) and
   a --context cache: decode at batch 1 and --batch, switch between resident adapters, time to first
   token, and the peak memory with three specialists resident and the context filled.
   With --lm-head-8bit, also the opt-in 8-bit lm_head ([model] lm_head_8bit): decode at batch 1 without and
   with a specialist, and its top-1 agreement with the bf16 head over --tokens greedy steps.
3. Correctness on a 4-layer slice: the fast decoder's logits (MXFP4, specialist active) against an fp32
   forward over the same dequantized weights, beside transformers' own bf16 forward as the noise floor.

Each speed is printed beside its bandwidth bound: the bytes a token reads (weights of attention,
router, lm_head and the routed experts, the LoRA factors, and the live part of the KV cache) over the
device-to-device copy bandwidth measured in the same run; and projected to a 936 GB/s card (RTX 3090):
the bytes at 936 GB/s plus the time the H100 spends beyond its own bound.
Without a GPU it runs a tiny model on the CPU, to check the script itself.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]
# the allocator's default segments fragment under a cap: reserved memory ran ~6 GB over allocated
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

CARD_3090 = 936e9  # bytes/s, datasheet


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second (median of 20)."""
    import torch

    if not torch.cuda.is_available():
        return float("nan")
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    times = []
    for _ in range(23):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    return 2 * 2**30 / statistics.median(times[3:])


def decode_rate(dec, ids, tokens: int, repeat: int = 2) -> tuple[float, float]:
    """(tok/s per sequence after the first token, time to first token in s): median of `repeat` runs after
    a warm-up (which captures the graphs). Greedy, each step's tokens read back to the host first."""
    import torch

    rates, ttfts = [], []
    for i in range(repeat + 1):
        sync()
        t0 = time.perf_counter()
        logits = dec.prefill(ids)
        nxt = logits.argmax(-1).tolist()
        t1 = time.perf_counter()
        for _ in range(tokens):
            logits = dec.step(torch.tensor(nxt, device=ids.device))
            nxt = logits.argmax(-1).tolist()
        t2 = time.perf_counter()
        if i:
            rates.append(tokens / (t2 - t1))
            ttfts.append(t1 - t0)
    return statistics.median(rates), statistics.median(ttfts)


def bytes_per_token(dec, lora: bool) -> float:
    """Bytes one decode step must read: every layer's dense weights, the experts the last step routed to
    (each read once however many rows chose it), lm_head (its codes and scales when 8-bit), the LoRA factors,
    the KV cache (its live part on full-attention layers, the window on sliding ones)."""
    total = 0.0
    for i, w in enumerate(dec.layers):  # the experts the last step routed to, per layer
        routed = dec.routes[0][i].unique().numel() / dec.num_experts if dec.routes else 1.0
        for key, t in w.items():
            if hasattr(t, "element_size") and not key.startswith(("ln", "sinks")):
                expert = key.startswith(("gate_up_proj", "down_proj"))
                total += t.numel() * t.element_size() * (routed if expert else 1)
    if lora and dec.active is not None:
        for i, layer in enumerate(dec.active.layers):
            routed = dec.routes[0][i].unique().numel() / dec.num_experts if dec.routes else 1.0
            for key, t in layer.items():
                # a view of router.W, read whole; attention reads the merged copy in place of the base weights
                if (key == "gate_up_proj.A" and "router.W" in layer) or key.startswith(("qkv.", "o_proj.")):
                    continue
                expert = key.startswith(("gate_up_proj", "down_proj"))
                total += t.numel() * t.element_size() * (routed if expert else 1)
    head = dec.hf.lm_head.weight
    total += dec.head8.nbytes if dec.head8 is not None else head.numel() * head.element_size()
    for w, k, v in zip(dec.layers, dec.k_cache, dec.v_cache, strict=True):
        share = min(w["window"] or dec.length, dec.length, dec.max_len) / dec.max_len
        total += (k.numel() * k.element_size() + v.numel() * v.element_size()) * share
    return total


def free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main() -> None:
    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--cap-gb", type=float, default=24.0, help="cap the MXFP4 phase's memory (0: no cap)")
    ap.add_argument("--context", type=int, default=8192, help="KV cache of the MXFP4 phase, filled at the end")
    ap.add_argument("--lm-head-8bit", action="store_true", help="also measure the opt-in 8-bit lm_head (MXFP4 phase)")
    a = ap.parse_args()

    from bench.shapes import cap_memory, gpt_oss_20b_config, random_adapter, random_model, random_mxfp4_model
    from engine.serve.fast_decode import FastDecoder

    gpu = torch.cuda.is_available()
    dev = "cuda" if gpu else "cpu"
    if gpu:
        cfg = gpt_oss_20b_config(a.layers)
        what = f"GPT-OSS-20B shape, {a.layers} layers, {torch.cuda.get_device_name()}"
    else:  # a smoke run of the script
        from transformers import GptOssConfig

        from tests.test_mxfp4 import TINY

        types = [TINY["layer_types"][i % 2] for i in range(a.layers)]  # sliding and full in turn, as GPT-OSS
        cfg = GptOssConfig(**{**TINY, "num_hidden_layers": a.layers, "layer_types": types})
        what = "tiny GPT-OSS on the CPU"
        a.context, a.tokens = min(a.context, 512), min(a.tokens, 8)
    dtype = torch.bfloat16 if gpu else torch.float32
    bw = copy_bandwidth()
    rows: list[tuple[str, ...]] = []

    def row(name: str, value: str, bound: str = "", note: str = "") -> None:
        rows.append((name, value, bound, note))
        print(f"  {name}: {value} | {bound} | {note}", flush=True)

    def speed(name: str, dec, ids, lora: bool, note: str = "") -> float:
        rate, _ = decode_rate(dec, ids, a.tokens)
        step_bytes = bytes_per_token(dec, lora)
        t, bound_t = 1 / (rate * ids.shape[0]), step_bytes / bw  # seconds per step
        projected = 1 / (step_bytes / CARD_3090 + max(0.0, t - bound_t)) / ids.shape[0]
        row(name, f"{rate:.1f} tok/s", f"{1 / bound_t / ids.shape[0]:.0f} tok/s ({step_bytes / 1e9:.2f} GB/step)",
            f"{rate * ids.shape[0] * step_bytes / bw * 100:.0f}% of bound; 936 GB/s card: ~{projected:.0f} tok/s"
            + (f"; {note}" if note else ""))
        return rate

    prompt = torch.randint(0, cfg.vocab_size // 2, (1, 32), device=dev)

    # 1. bf16 experts, as on an 80 GB card
    if gpu:
        model = random_adapter(random_model(a.layers), "math", seed=1)
        dec = FastDecoder(model, max_len=4096)
        dec.select(None)
        base16 = speed("bf16: decode b1, no adapter", dec, prompt, False, "baseline 168.7 (2026-11-25)")
        dec.select("math")
        spec16 = speed("bf16: decode b1, specialist", dec, prompt, True, "baseline 130.9")
        row("bf16: specialist / no adapter", f"{spec16 / base16 * 100:.0f}%")
        model = dec = None
        free()

    # 2. MXFP4 experts, capped like a 24 GB card
    cap_memory(a.cap_gb)
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    model = random_mxfp4_model(a.layers, dev, dtype, config=cfg)
    build_s = time.perf_counter() - t
    for i, name in enumerate(("math", "code", "law")):
        model = random_adapter(model, name, seed=i + 1)
    t = time.perf_counter()
    dec = FastDecoder(model, max_len=a.context)
    dec.warm_up()
    for name in ("math", "code", "law"):
        dec.prepare(name)
    ready_s = time.perf_counter() - t
    dec.select(None)
    base4 = speed("mxfp4: decode b1, no adapter", dec, prompt, False, f"context {a.context}")
    dec.select("math")
    spec4 = speed("mxfp4: decode b1, specialist", dec, prompt, True)
    row("mxfp4: specialist / no adapter", f"{spec4 / base4 * 100:.0f}%", "", "target >= 90%")
    swaps = []
    for i in range(50):
        sync()
        t = time.perf_counter()
        dec.select("code" if i % 2 else "math")
        sync()
        swaps.append(time.perf_counter() - t)
    dec.select("code")
    after, _ = decode_rate(dec, prompt, a.tokens, repeat=1)
    row("mxfp4: switch between resident adapters", f"{statistics.median(swaps) * 1e3:.3f} ms p50", "",
        f"decode right after: {after:.1f} tok/s")
    long = torch.randint(0, cfg.vocab_size // 2, (1, a.context - a.tokens - 8), device=dev)
    dec.reuse = False  # the measured run repeats the warm-up's prompt: prefill it whole (prefill_bench.py: reuse)
    _, long_ttft = decode_rate(dec, long, 4, repeat=1)
    dec.reuse = True
    row(f"mxfp4: first token after a {long.shape[1]}-token prompt", f"{long_ttft * 1e3:.0f} ms", "",
        "specialist active; the context is now full")
    packs = sum(dec.pack_bytes(n) for n in ("math", "code", "law")) / 2**20
    if gpu:
        peak, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
        free_b, total_b = torch.cuda.mem_get_info()
        row("mxfp4: peak GPU memory, 3 specialists + full context", f"{peak / 2**30:.1f} GiB allocated",
            f"{reserved / 2**30:.1f} GiB reserved", f"device in use {(total_b - free_b) / 2**30:.1f} GiB (with the "
            f"CUDA context); cap {a.cap_gb:g} GiB; packed adapter copies {packs:.0f} MiB")
    row("mxfp4: build model / decoder ready", f"{build_s:.1f} s / {ready_s:.1f} s", "",
        "ready = compile + graphs for the base and three adapters")
    batch = prompt.repeat(a.batch, 1)
    dec.select(None)
    speed(f"mxfp4: decode b{a.batch}, no adapter (per sequence)", dec, batch, False)
    dec.select("math")
    speed(f"mxfp4: decode b{a.batch}, specialist (per sequence)", dec, batch, True)
    if a.lm_head_8bit:
        try:  # the run's other figures must survive a failure here
            int8_head(dec, prompt, a.tokens, speed, row)
        except Exception as e:
            dec.head8 = None
            row("mxfp4 + 8-bit lm_head", "failed", "", f"{type(e).__name__}: {e}"[:300])
    model = dec = None
    free()
    if gpu:
        torch.cuda.set_per_process_memory_fraction(1.0)

    # 3. correctness on a 4-layer slice, against fp32 on the same dequantized weights
    check_correctness(cfg, dev, dtype, a.context, row)

    print(f"\n{what}; greedy, {a.tokens} new tokens, copy bandwidth {bw / 1e9:.0f} GB/s (read + write)")
    head = ("", "measured", "bandwidth bound", "")
    width = [max(len(r[i]) for r in [head, *rows]) for i in range(3)]
    for name, value, bound, note in [head, *rows]:
        print(f"{name:<{width[0]}}  {value:>{width[1]}}  {bound:>{width[2]}}  {note}")


def int8_head(dec, prompt, tokens: int, speed, row) -> None:
    """The MXFP4 decoder with the 8-bit lm_head swapped in: decode b1 without and with a specialist; then,
    on the hidden states of the specialist's greedy run with the bf16 head (eager steps, so that a hook
    sees each), the 8-bit head's top-1 against the bf16 head's and both against the head in fp32."""
    import torch

    from engine.serve.fast_decode import _unwrap
    from engine.serve.lm_head8 import Int8Head

    linear = _unwrap(dec.hf.lm_head)
    sync()
    t = time.perf_counter()
    head = Int8Head.of(linear)
    sync()
    built = time.perf_counter() - t
    dec.head8 = head
    dec.select(None)
    base = speed("mxfp4 + 8-bit lm_head: decode b1, no adapter", dec, prompt, False,
                 f"head {head.nbytes / 1e9:.2f} GB, quantized in {built:.1f} s")
    dec.select("math")
    spec = speed("mxfp4 + 8-bit lm_head: decode b1, specialist", dec, prompt, True)
    row("mxfp4 + 8-bit lm_head: specialist / no adapter", f"{spec / base * 100:.0f}%")

    dec.head8, graphs, dec.graphs, seen = None, dec.graphs, False, []
    hook = linear.register_forward_hook(lambda _m, args, _out: seen.append(args[0].clone()))
    try:
        nxt = dec.prefill(prompt).argmax(-1)
        for _ in range(tokens - 1):
            nxt = dec.step(nxt).argmax(-1)
    finally:
        hook.remove()
        dec.graphs = graphs
    same = {"bf16": 0, "fp32": 0, "bf16 vs fp32": 0}
    worst = 0.0
    with torch.inference_mode():
        for x in seen:
            l16, l8 = linear(x).float(), head(x).float()
            l32 = torch.cat([x.float() @ w.float().T for w in linear.weight.split(32768)], -1)  # bounded memory
            worst = max(worst, ((l8 - l16).abs().max() / l16.abs().max()).item())
            t16, t8, t32 = l16.argmax(-1), l8.argmax(-1), l32.argmax(-1)
            same["bf16"] += int(torch.equal(t8, t16))
            same["fp32"] += int(torch.equal(t8, t32))
            same["bf16 vs fp32"] += int(torch.equal(t16, t32))
    n = len(seen)
    row("8-bit lm_head vs bf16: top-1 agreement", f"{same['bf16']}/{n} steps", "",
        f"vs the head in fp32: {same['fp32']}/{n} (bf16's own: {same['bf16 vs fp32']}/{n}); max logit difference "
        f"{worst:.1e} of the largest; greedy with the specialist, random weights")


def check_correctness(cfg, dev: str, dtype, max_len: int, row) -> None:
    import torch
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import GptOssConfig

    from bench.shapes import random_adapter, random_mxfp4_model
    from engine.serve.fast_decode import FastDecoder

    small = GptOssConfig(**{**cfg.to_dict(), "num_hidden_layers": 4, "layer_types": (cfg.layer_types * 4)[:4]})
    model = random_adapter(random_mxfp4_model(4, dev, dtype, config=small), "a", seed=7)
    exact = random_adapter(random_mxfp4_model(4, dev, torch.float32, config=small), "a", seed=8)
    exact.get_base_model().load_state_dict(model.get_base_model().state_dict())
    set_peft_model_state_dict(exact, get_peft_model_state_dict(model, adapter_name="a"), adapter_name="a")
    dec = FastDecoder(model, max_len=max_len)
    dec.select("a")
    ids = torch.randint(0, small.vocab_size // 2, (1, 300), device=dev)
    fast_err, ref_err, pair_err, same = [], [], [], 0
    steps = 16
    with torch.inference_mode():
        logits = dec.prefill(ids)
        for i in range(steps):
            truth = exact(input_ids=ids).logits[:, -1].float()
            scale = truth.abs().max()
            fast_err.append(((logits.float() - truth).abs().max() / scale).item())
            ref = model(input_ids=ids).logits[:, -1].float()
            ref_err.append(((ref - truth).abs().max() / scale).item())
            pair_err.append(((logits.float() - ref).abs().max() / ref.abs().max()).item())
            same += int(logits.argmax(-1).item() == truth.argmax(-1).item())
            nxt = truth.argmax(-1)
            ids = torch.cat([ids, nxt[:, None]], 1)
            if i < steps - 1:
                logits = dec.step(nxt)
    row("mxfp4 logits vs fp32 (4 layers, specialist)", f"rel err {max(fast_err):.1e}", "",
        f"transformers bf16 forward: {max(ref_err):.1e} (vs fast {max(pair_err):.1e}); top-1 agrees on "
        f"{same}/{steps} steps; logit scale {scale.item():.2f}; "
        f"{dec.note or 'compiled'}")
    model = exact = dec = None
    free()


if __name__ == "__main__":
    main()
