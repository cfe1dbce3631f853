"""Prompts on the inference GPU: how long a prompt waits for its first token, with MXFP4 experts and a
specialist active, the process capped as a 24 GB card would hold it.

    python bench/prefill_bench.py [--layers 24] [--cap-gb 24] [--context 8192] [--turns 20] [--reply 80]

1. Long prompts (2k tokens and a full context): the grouped-GEMM prefill (each layer's experts
   dequantized once into a transient bf16 copy, one GEMM per expert group, the expert LoRA as grouped
   GEMMs too) beside the routed-pair kernels it replaced (one program per (token, expert) pair, each
   re-reading its expert's tile), both in this run. Prompt tokens per second = tokens / first token.
2. A scripted conversation of --turns turns, all with the same specialist: a user message, a reply of
   --reply tokens of which the first half is analysis that the next prompt drops (as the harmony
   renderer does), then the next turn. Time to first token of turns 2, 5 and 20, with prefix reuse on
   (the cache keeps the conversation so far) and off (every turn prefills the whole history).
3. Peak memory with three specialists resident after the full-context prefill.
4. Decode b1 tok/s with the specialist and without (the steps these prefills lead into), and the bytes a
   step reads (serve_bench.py's count) with the bf16 lm_head's share.

Builds a GPT-OSS-20B-shaped model with random weights (bench/shapes.py), like serve_bench.py. Without a
GPU it runs a tiny model on the CPU, to check the script itself.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")


def first_token(dec, ids) -> tuple[float, list[int]]:
    """Seconds from the prompt to its first token on the host (the prefill and the argmax read back)."""
    from bench.serve_bench import sync

    sync()
    t = time.perf_counter()
    tokens = dec.prefill(ids).argmax(-1).tolist()
    return time.perf_counter() - t, tokens


def conversation(dec, vocab: int, turns: int, reply: int, device: str) -> list[float]:
    """Time to first token of each turn of a scripted chat (same tokens whatever the reuse setting)."""
    import torch

    gen = torch.Generator().manual_seed(0)

    def words(n: int) -> list[int]:
        return torch.randint(0, vocab, (n,), generator=gen).tolist()

    history = words(120)  # system and developer messages
    times = []
    for _ in range(turns):
        prompt = history + words(60) + words(3)  # the user's message, then the assistant's header
        ids = torch.tensor([prompt], device=device)
        seconds, first = first_token(dec, ids)
        times.append(seconds)
        out, nxt = first, torch.tensor(first, device=device)
        for _ in range(reply - 1):
            logits = dec.step(nxt)
            nxt = logits.argmax(-1)
            out.append(int(nxt))
        history = prompt + out[reply // 2:]  # the analysis half is dropped from the next prompt
    return times


def main() -> None:
    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--cap-gb", type=float, default=24.0, help="cap the process's memory (0: no cap)")
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--turns", type=int, default=20)
    ap.add_argument("--reply", type=int, default=80)
    a = ap.parse_args()

    from bench.serve_bench import bytes_per_token, decode_rate, free
    from bench.shapes import cap_memory, gpt_oss_20b_config, random_adapter, random_mxfp4_model
    from engine.serve import fast_decode
    from engine.serve.fast_decode import FastDecoder

    gpu = torch.cuda.is_available()
    dev = "cuda" if gpu else "cpu"
    if gpu:
        cfg = gpt_oss_20b_config(a.layers)
        what = f"GPT-OSS-20B shape, {a.layers} layers, MXFP4 experts, {torch.cuda.get_device_name()}"
        lengths = [2048, a.context - 136]
    else:
        from transformers import GptOssConfig

        from tests.test_mxfp4 import TINY

        cfg, what = GptOssConfig(**{**TINY, "num_hidden_layers": a.layers}), "tiny GPT-OSS on the CPU"
        a.context, a.turns, a.reply = min(a.context, 1024), min(a.turns, 5), min(a.reply, 8)
        lengths = [64, 300]
    rows: list[tuple[str, str, str]] = []

    def row(name: str, value: str, note: str = "") -> None:
        rows.append((name, value, note))
        print(f"  {name}: {value} | {note}", flush=True)

    cap_memory(a.cap_gb)
    model = random_mxfp4_model(a.layers, dev, torch.bfloat16 if gpu else torch.float32, config=cfg)
    for i, name in enumerate(("math", "code", "law")):
        model = random_adapter(model, name, seed=i + 1)
    dec = FastDecoder(model, max_len=a.context)
    for name in ("math", "code", "law"):
        dec.prepare(name)
    dec.select("math")
    if gpu:
        torch.cuda.reset_peak_memory_stats()

    # 1. long prompts: grouped GEMMs against the routed pairs, prefix reuse off
    dec.reuse = False
    grouped_rows = fast_decode.GROUPED_ROWS
    for n in lengths:
        ids = torch.randint(0, cfg.vocab_size // 2, (1, n), device=dev)
        got = {}
        for label, threshold in (("routed pairs", 10**12), ("grouped", grouped_rows)):
            fast_decode.GROUPED_ROWS = threshold
            first_token(dec, ids[:, :256])  # warm-up of this path
            got[label] = statistics.median(first_token(dec, ids)[0] for _ in range(2 if label == "grouped" else 1))
        fast_decode.GROUPED_ROWS = grouped_rows
        row(f"first token, {n}-token prompt", f"{got['grouped'] * 1e3:.0f} ms",
            f"{n / got['grouped']:.0f} prompt tok/s; routed-pair kernels: {got['routed pairs'] * 1e3:.0f} ms "
            f"({got['routed pairs'] / got['grouped']:.1f}x)")
    if gpu:
        peak = torch.cuda.max_memory_allocated()
        row("peak memory, 3 specialists, full-context prefill", f"{peak / 2**30:.1f} GiB allocated",
            f"{torch.cuda.max_memory_reserved() / 2**30:.1f} GiB reserved; cap {a.cap_gb:g} GiB")

    # 2. a conversation, prefix reuse off then on
    picks = [t for t in (2, 5, 20) if t <= a.turns]
    ttft = {}
    for reuse in (False, True):
        dec.reuse = reuse
        ttft[reuse] = conversation(dec, cfg.vocab_size // 2, a.turns, a.reply, dev)
    for t in picks:
        row(f"conversation turn {t}: first token", f"{ttft[True][t - 1] * 1e3:.0f} ms",
            f"without prefix reuse {ttft[False][t - 1] * 1e3:.0f} ms")
    last = picks[-1]
    row(f"turn {last} / turn 2, with reuse", f"{ttft[True][last - 1] / ttft[True][1]:.2f}x", "target <= 1.5x")

    # 4. decode after these prefills, and what a step reads
    prompt = torch.randint(0, cfg.vocab_size // 2, (1, 32), device=dev)
    for name in ("math", None):
        dec.select(name)
        rate, _ = decode_rate(dec, prompt, 128 if gpu else 8)
        step_bytes = bytes_per_token(dec, name is not None)
        head = dec.hf.lm_head.weight
        head_bytes = head.numel() * head.element_size()
        row(f"decode b1, {'specialist' if name else 'no adapter'}", f"{rate:.1f} tok/s",
            f"{step_bytes / 1e9:.2f} GB a step, lm_head {head_bytes / 1e9:.2f} GB of it "
            f"({head_bytes / step_bytes * 100:.0f}%)")
    model = dec = None
    free()

    print(f"\n{what}; specialist active; context {a.context}")
    width = [max(len(r[i]) for r in rows) for i in range(2)]
    for name, value, note in rows:
        print(f"{name:<{width[0]}}  {value:>{width[1]}}  {note}")


if __name__ == "__main__":
    main()
