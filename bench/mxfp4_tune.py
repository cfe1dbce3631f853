"""Tile sizes of the MXFP4 expert kernels (engine/serve/mxfp4_kernels.py) at GPT-OSS-20B's width: each
kernel's GPU time at batch 1 (4 routed pairs) and 8 (32 pairs) for a grid of (rows per program, scale
blocks per step, warps), the shipped setting marked, every result checked against the shipped one.

    python bench/mxfp4_tune.py [--reps 200]

GPU only. The kernels read their tile sizes from module constants at launch; this sets them in turn.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]


def gpu_us(fn, reps: int) -> float:
    """Median GPU time of `fn` in µs, from CUDA events around each call."""
    import statistics

    import torch

    fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def main() -> None:
    import torch

    from engine.serve import mxfp4_kernels as K

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=200)
    a = ap.parse_args()
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
    shipped = {"BJ": K.BJ, "BN": K.BN, "BKB_UP": K.BKB_UP, "BKB_DOWN": K.BKB_DOWN, "WARPS": K.WARPS}
    print(f"{torch.cuda.get_device_name()}; shipped {shipped}")
    for pairs in (4, 32):
        experts = torch.sort(torch.randperm(e, device="cuda", generator=gen)[:pairs] if pairs <= e else
                             torch.randint(0, e, (pairs,), device="cuda", generator=gen))[0]
        rows = torch.arange(pairs, device="cuda") // 4
        x = torch.randn(pairs // 4, h, device="cuda", generator=gen).bfloat16()
        act = torch.randn(pairs, i, device="cuda", generator=gen).bfloat16()
        gate = torch.rand(pairs, device="cuda", generator=gen).bfloat16()
        runs = {"gate_up": ("BJ", "BKB_UP",
                            partial(K.triton_gate_up, x, rows, experts, gb, gs, gbias, None, None, 1.702, 7.0)),
                "down": ("BN", "BKB_DOWN", partial(K.triton_down, act, experts, gate, db, ds, dbias, None, None))}
        for name, (tile, step, fn) in runs.items():
            want = fn().float()
            results = []
            for t, bkb, warps in itertools.product((16, 32, 64), (4, 8, 16, 32), (4, 8)):
                setattr(K, tile, t)
                setattr(K, step, bkb)
                K.WARPS = warps
                err = ((fn().float() - want).abs().max() / want.abs().max()).item()
                results.append((gpu_us(fn, a.reps), t, bkb, warps, err))
                for k, v in shipped.items():
                    setattr(K, k, v)
            results.sort()
            print(f"\n{name}, {pairs} pairs: µs | {tile} | {step} | warps | rel. diff from shipped")
            mine = (shipped[tile], shipped[step], shipped["WARPS"])
            for us, t, bkb, warps, err in results[:6]:
                mark = " (shipped)" if (t, bkb, warps) == mine else ""
                print(f"  {us:7.1f} | {t:3d} | {bkb:3d} | {warps} | {err:.1e}{mark}")
            ship = next(r for r in results if r[1:4] == mine)
            print(f"  shipped: {ship[0]:.1f} µs")


if __name__ == "__main__":
    main()
