"""Tile sizes of the MXFP4 expert kernels (engine/serve/mxfp4_kernels.py) at GPT-OSS-20B's width: each
kernel's GPU time (launches replayed from a CUDA graph) at batch 1 (4 routed pairs) and 8 (32 pairs) for a
grid of (rows per program, scale blocks per step, warps, loop pipelining stages), optionally with a
specialist's expert LoRA, the shipped setting marked, every result checked against the shipped one.

    python bench/mxfp4_tune.py [--reps 50] [--pairs 4,32] [--tiles 16,32,64] [--steps 4,8,16,32]
                               [--warps 4,8] [--stages 3] [--lora]

GPU only. The kernels read their tile sizes from module constants at launch; this sets them in turn. The
routed experts' weights stay in L2 across the timed launches, which a decode step's do not: confirm a
setting in the whole step (decode_profile.py) before shipping it."""

from __future__ import annotations

import argparse
import itertools
import sys
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]


def gpu_us(fn, reps: int, launches: int = 20) -> float:
    """Median GPU time of one call of `fn` in µs: `launches` calls captured in a CUDA graph, timed by events
    around each replay. (Timing single calls measured Python's launch overhead, ~70 µs, not a ~35 µs kernel.)"""
    import statistics

    import torch

    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(launches):
            fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / launches)
    return statistics.median(times)


def first(fn, *args):
    """gate_up's activations, without the partial sums of down's x·A it also returns."""
    return fn(*args)[0]


def main() -> None:
    import torch

    from bench.peer_ours import counts
    from engine.serve import mxfp4_kernels as K

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--lora", action="store_true", help="with a rank-16 expert LoRA in both kernels")
    for flag, default in (("pairs", "4,32"), ("tiles", "16,32,64"), ("steps", "4,8,16,32"), ("warps", "4,8"),
                          ("stages", "3")):
        ap.add_argument(f"--{flag}", default=default, help=f"comma-separated values (default {default})")
    a = ap.parse_args()
    grid = {flag: counts(getattr(a, flag), f"--{flag}") for flag in ("pairs", "tiles", "steps", "warps", "stages")}
    if not torch.cuda.is_available():
        raise SystemExit("needs a GPU")
    gen = torch.Generator(device="cuda").manual_seed(0)
    e, h, i = 32, 2880, 2880

    def mx(out, inp):
        return (torch.randint(0, 256, (e, out, inp // 32, 16), dtype=torch.uint8, device="cuda", generator=gen),
                torch.randint(118, 124, (e, out, inp // 32), dtype=torch.uint8, device="cuda", generator=gen))

    (gb, gs), (db, ds) = mx(2 * i, h), mx(h, i)
    gbias = torch.randn(e, 2 * i, device="cuda", generator=gen).bfloat16()
    dbias = torch.randn(e, h, device="cuda", generator=gen).bfloat16()
    shipped = {"BJ": K.BJ, "BN": K.BN, "BKB_UP": K.BKB_UP, "BKB_DOWN": K.BKB_DOWN, "WARPS": K.WARPS,
               "STAGES": K.STAGES}
    print(f"{torch.cuda.get_device_name()}; shipped {shipped}")
    for pairs in grid["pairs"]:
        experts = torch.sort(torch.randperm(e, device="cuda", generator=gen)[:pairs] if pairs <= e else
                             torch.randint(0, e, (pairs,), device="cuda", generator=gen))[0]
        rows = torch.arange(pairs, device="cuda") // 4
        x = torch.randn(pairs // 4, h, device="cuda", generator=gen).bfloat16()
        act = torch.randn(pairs, i, device="cuda", generator=gen).bfloat16()
        gate = torch.rand(pairs, device="cuda", generator=gen).bfloat16()
        lora = (None,) * 5
        if a.lora:  # a rank-16 expert LoRA as a specialist has it (xa strided as the router's product leaves it)
            r = 16
            xa = torch.randn(pairs // 4, e * (r + 1), device="cuda", generator=gen).bfloat16()[:, :e * r]
            lora = (xa, *(torch.randn(*shape, device="cuda", generator=gen).bfloat16() * 0.05
                          for shape in ((e, r, 2 * i), (e, i, r), (e, r, h))))
            lora += (K.triton_gate_up(x, rows, experts, gb, gs, gbias, *lora[:3], 1.702, 7.0)[1],)
        runs = {"gate_up": ("BJ", "BKB_UP",
                            partial(first, K.triton_gate_up, x, rows, experts, gb, gs, gbias, *lora[:3], 1.702, 7.0)),
                "down": ("BN", "BKB_DOWN",
                         partial(K.triton_down, act, experts, gate, db, ds, dbias, lora[4], lora[3]))}
        for name, (tile, step, fn) in runs.items():
            want = fn().float()
            results = []
            for t, bkb, warps, stages in itertools.product(grid["tiles"], grid["steps"], grid["warps"],
                                                           grid["stages"]):
                setattr(K, tile, t)
                setattr(K, step, bkb)
                K.WARPS, K.STAGES = warps, stages
                err = ((fn().float() - want).abs().max() / want.abs().max()).item()
                results.append((gpu_us(fn, a.reps), t, bkb, warps, stages, err))
                for k, v in shipped.items():
                    setattr(K, k, v)
            results.sort()
            print(f"\n{name}, {pairs} pairs: µs | {tile} | {step} | warps | stages | rel. diff from shipped")
            mine = (shipped[tile], shipped[step], shipped["WARPS"], shipped["STAGES"])
            for us, t, bkb, warps, stages, err in results[:8]:
                mark = " (shipped)" if (t, bkb, warps, stages) == mine else ""
                print(f"  {us:7.1f} | {t:3d} | {bkb:3d} | {warps} | {stages} | {err:.1e}{mark}")
            ship = next((r for r in results if r[1:5] == mine), None)
            print(f"  shipped: {ship[0]:.1f} µs" if ship else "  shipped: not in this grid")


if __name__ == "__main__":
    main()
