"""Where a decode step's time goes: per-kernel GPU time of the fast decoder's graph steps, without and with
a specialist, at a short and a long context, beside the step's wall time (the gap is launch latency and
idle GPU), then tg128 and pp512/pp8192 as peer_ours.py measures them.

    python bench/decode_profile.py [--layers 24] [--contexts 100,4000] [--steps 32] [--cap-gb 24]
                                   [--max-len 8448] [--pp 512,8192] [--tg 128] [--top 12] [--json OUT]

The model is GPT-OSS-20B's shape with random MXFP4 experts built on the device (bench/shapes.py), the
specialist a random rank-16 LoRA on attention + all experts. Steps run as the engine runs them: one token,
its argmax read back to the host before the next. torch.profiler records the kernels inside the CUDA graph
replays; each kernel's time is summed over the profiled steps and divided by their number. Without a GPU
it runs a 2-layer slice on the CPU, to check the script itself.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

from bench.peer_ours import counts, prefill_rate  # noqa: E402  (sets the allocator's options before torch)
from bench.serve_bench import decode_rate, sync  # noqa: E402

# kernel name patterns -> the group a table line sums them under (first match wins)
GROUPS = (
    ("experts gate_up (MXFP4)", r"gate_up_kernel"),
    ("experts down (MXFP4)", r"down_kernel"),
    ("attention (Triton)", r"attn|attention|flash|_decode_kernel|_combine_kernel"),
    ("cuBLAS GEMM/GEMV", r"gemv|gemm|cutlass|xmma|sm\d\d_|ampere_|cublas|splitK"),
    ("inductor fused", r"^triton_"),
    ("sort", r"sort|radix"),
    ("top-k", r"topk|TopK|bitonic"),
    ("index/scatter/gather", r"index|scatter|gather"),
    ("memcpy/memset", r"[Mm]emcpy|[Mm]emset"),
    ("aten element-wise/reduce", r"elementwise|vectorized|reduce|Reduce"),
)


def group(name: str) -> str:
    return next((g for g, pattern in GROUPS if re.search(pattern, name)), "other")


def kernel_times(dec, steps: int, nxt: list[int]) -> tuple[dict[str, tuple[float, int]], list[int]]:
    """{kernel name: (µs per step, launches per step)} over `steps` profiled steps."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            nxt = dec.step(torch.tensor(nxt, device=dec.device)).argmax(-1).tolist()
        sync()
    out: dict[str, tuple[float, int]] = {}
    for e in prof.key_averages():
        if e.device_type != DeviceType.CUDA:
            continue
        t = getattr(e, "self_device_time_total", None)
        t = e.self_cuda_time_total if t is None else t
        out[e.key] = (t / steps, round(e.count / steps))
    return out, nxt


def step_wall(dec, steps: int, nxt: list[int]) -> tuple[float, list[int]]:
    """ms per step of the engine's loop (the argmax read back each step)."""
    import torch

    sync()
    t = time.perf_counter()
    for _ in range(steps):
        nxt = dec.step(torch.tensor(nxt, device=dec.device)).argmax(-1).tolist()
    sync()
    return (time.perf_counter() - t) / steps * 1e3, nxt


def without_flash(dec, n: int, vocab: int) -> dict[str, float]:
    """ppN with the prefill's attention in chunks over fp32 scores (engine/serve/attention.py's reference),
    where this tree has flash prefill: what flash attention changes at this length."""
    try:
        from engine.serve import attention
    except ImportError:
        return {}
    flash = attention.flash_applies
    attention.flash_applies = lambda *args: False
    try:
        return {f"pp{n} no flash": prefill_rate(dec, n, vocab, 3)}
    finally:
        attention.flash_applies = flash


def main() -> None:
    import torch

    from bench.shapes import cap_memory, gpt_oss_20b_config, random_adapter, random_mxfp4_model
    from engine.serve.fast_decode import FastDecoder

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--contexts", default="100,4000")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--cap-gb", type=float, default=24.0)
    ap.add_argument("--max-len", type=int, default=8448)
    ap.add_argument("--pp", default="512,8192")
    ap.add_argument("--tg", type=int, default=128)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    contexts, pp = counts(a.contexts, "--contexts"), counts(a.pp, "--pp")
    gpu = torch.cuda.is_available()
    dev = "cuda" if gpu else "cpu"
    if not gpu:  # the script's own check: a 2-layer slice of a narrow model
        a.layers, a.max_len, contexts, pp, a.tg, a.steps = 2, 256, [8, 40], [16, 64], 4, 2
    if a.max_len <= max(contexts + pp) + a.steps * 2 + a.tg:
        raise SystemExit(f"--max-len {a.max_len} is too short for the contexts, prompts and steps asked for")
    cap_memory(a.cap_gb)
    cfg = None
    if not gpu:
        cfg = gpt_oss_20b_config(a.layers)
        cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_local_experts = 256, 256, 1024, 8
        cfg.num_attention_heads, cfg.num_key_value_heads, cfg.sliding_window = 8, 2, 16
    model = random_mxfp4_model(a.layers, dev, torch.bfloat16 if gpu else torch.float32, config=cfg)
    model = random_adapter(model, "specialist", seed=1)
    dec = FastDecoder(model, max_len=a.max_len)
    dec.reuse = False
    vocab = model.get_base_model().config.vocab_size
    gen = torch.Generator().manual_seed(0)
    result: dict = {"device": torch.cuda.get_device_name() if gpu else "CPU", "layers": a.layers, "profile": {},
                    "rates": {}}
    for key, name in (("none", None), ("specialist", "specialist")):
        if not dec.select(name):
            raise SystemExit(f"the fast decoder cannot run {name}: {dec.reason}")
        dec.warm_up(name)
        for ctx in contexts:
            ids = torch.randint(0, vocab // 2, (1, ctx), generator=gen).to(dev)
            nxt = dec.prefill(ids).argmax(-1).tolist()
            _, nxt = step_wall(dec, 4, nxt)  # warm: the graph exists after warm_up, the clocks settle here
            wall, nxt = step_wall(dec, a.steps, nxt)
            kernels, nxt = kernel_times(dec, a.steps, nxt)
            result["profile"][f"{key}@{ctx}"] = {"wall_ms": wall, "kernels": kernels}
            print(f"{key} context {ctx}: {wall:.3f} ms/step wall, {sum(t for t, _ in kernels.values()) / 1e3:.3f} ms "
                  f"kernels, {sum(n for _, n in kernels.values())} launches", flush=True)
        one = torch.randint(0, vocab // 2, (1, 1), generator=gen).to(dev)
        rates = {f"tg{a.tg}": decode_rate(dec, one, a.tg, repeat=2)[0]}
        prefill_rate(dec, min(pp), vocab, 1)  # warm-up
        rates.update({f"pp{n}": prefill_rate(dec, n, vocab, 3) for n in pp})
        rates.update(without_flash(dec, min(pp), vocab))
        result["rates"][key] = rates
        print(key, {k: round(v, 1) for k, v in rates.items()}, flush=True)
    result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if gpu else float("nan")
    result["note"] = dec.note
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))
    print_tables(result, a.top)


def print_tables(result: dict, top: int) -> None:
    prof = result["profile"]
    print(f"\n{result['device']}, {result['layers']} layers, MXFP4 experts, peak {result['peak_gib']:.1f} GiB "
          f"{'(' + result['note'] + ')' if result['note'] else ''}")
    print("\n| per step | " + " | ".join(prof) + " |")
    print("|---" * (len(prof) + 1) + "|")
    rows: dict[str, list[str]] = defaultdict(list)
    for run in prof.values():
        total = sum(t for t, _ in run["kernels"].values()) / 1e3
        rows["wall ms"].append(f"{run['wall_ms']:.3f}")
        rows["kernel ms (sum)"].append(f"{total:.3f}")
        rows["gap ms (launch/idle)"].append(f"{run['wall_ms'] - total:.3f}")
        rows["launches"].append(str(sum(n for _, n in run["kernels"].values())))
        groups: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
        for k, (t, n) in run["kernels"].items():
            groups[group(k)][0] += t
            groups[group(k)][1] += n
        for g, _ in (*GROUPS, ("other", "")):
            t, n = groups.get(g, (0.0, 0))
            rows[f"{g} ms (launches)"].append(f"{t / 1e3:.3f} ({n})")
    for label, cells in rows.items():
        print(f"| {label} | " + " | ".join(cells) + " |")
    for label, run in prof.items():
        print(f"\ntop kernels, {label} (µs/step, launches/step):")
        for k, (t, n) in sorted(run["kernels"].items(), key=lambda kv: -kv[1][0])[:top]:
            print(f"  {t:8.1f} {n:4d}  {k[:110]}")
    print("\n| tok/s | " + " | ".join(result["rates"]) + " |")
    print("|---" * (len(result["rates"]) + 1) + "|")
    for test in next(iter(result["rates"].values())):
        print(f"| {test} | " + " | ".join(f"{r.get(test, float('nan')):,.1f}" for r in result["rates"].values())
              + " |")


if __name__ == "__main__":
    main()
