"""Our side of the llama.cpp comparison (bench/peer_llamacpp.sh): the fast decoder over the very checkpoint
llama.cpp converted, measured the way llama-bench measures, written as JSON for bench/peer_table.py.

    python bench/peer_ours.py MODEL LORA OUT.json [--tg 128] [--pp 512,8192] [--reps 3] [--cap-gb 24]

MODEL is bench/peer_model.py's checkpoint, loaded as the engine loads it (engine/serve/mxfp4_load.py:
experts stay MXFP4); LORA its attention-only PEFT LoRA, the one llama.cpp gets with --lora. A third
adapter, a random rank-16 specialist on attention + all experts (what the engine trains), has no
llama.cpp counterpart: its LoRA converter takes no fused-expert LoRA.

- tgN: N tokens after a one-token prompt (llama-bench's tg starts from an empty context), greedy, each
  token read back to the host before the next step, as the engine's loop does; tok/s, median of --reps.
- ppN: an N-token prompt through prefill up to its last token's logits; N / seconds, median of --reps
  after one warm-up prefill.
The decoder holds one cache of max(pp) + 256 tokens; a step reads only its live part.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

from bench.serve_bench import decode_rate, sync  # noqa: E402  (sets the allocator's options before torch)

ADAPTERS = (("none", None), ("attn_lora", "attn"), ("specialist", "specialist"))


def prefill_rate(dec, n: int, vocab: int, reps: int) -> float:
    """Prompt tokens per second of an `n`-token prefill, median of `reps`."""
    import torch

    ids = torch.randint(0, vocab // 2, (1, n), device=dec.device)
    times = []
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        dec.prefill(ids).argmax(-1).tolist()
        times.append(time.perf_counter() - t)
        if getattr(dec, "reused", 0):
            raise RuntimeError(f"the prefill reused {dec.reused} cached tokens: not a whole prompt")
    return n / statistics.median(times)


def counts(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise SystemExit(f"{what}: expected comma-separated positive token counts, got {text!r}")
    return values


def main() -> None:
    import torch
    from peft import PeftModel

    from bench.shapes import cap_memory, random_adapter
    from engine.serve.fast_decode import FastDecoder
    from engine.serve.mxfp4_load import load

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("lora", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--tg", type=int, default=128)
    ap.add_argument("--pp", default="512,8192")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--cap-gb", type=float, default=24.0, help="cap the process as a smaller card (0: no cap)")
    a = ap.parse_args()
    pp, tg, reps = counts(a.pp, "--pp"), a.tg, a.reps
    if tg < 1 or reps < 1:
        raise SystemExit(f"--tg and --reps: expected positive numbers, got {tg} and {reps}")
    for folder in (a.model, a.lora):
        if not folder.is_dir():
            raise SystemExit(f"{folder}: no such folder (write it with bench/peer_model.py)")

    gpu = torch.cuda.is_available()
    dev = "cuda" if gpu else "cpu"
    cap_memory(a.cap_gb)
    model = load(a.model, dev, torch.bfloat16)
    model = PeftModel.from_pretrained(model, str(a.lora), adapter_name="attn")
    model = random_adapter(model, "specialist", seed=1)
    context = max(pp) + 256
    dec = FastDecoder(model, max_len=context)
    dec.reuse = False  # every prompt prefilled whole, as llama-bench's (a repeated prompt would be reused)
    dec.warm_up()
    vocab = model.get_base_model().config.vocab_size
    one = torch.randint(0, vocab // 2, (1, 1), device=dev)
    rows: dict[str, dict[str, float]] = {}
    for key, name in ADAPTERS:
        if not dec.select(name):
            raise SystemExit(f"the fast decoder cannot run adapter {name}: {dec.reason}")
        prefill_rate(dec, min(pp), vocab, 1)  # warm-up
        rows[key] = {f"tg{tg}": decode_rate(dec, one, tg, repeat=reps)[0]}
        rows[key].update({f"pp{n}": prefill_rate(dec, n, vocab, reps) for n in pp})
        print(key, {k: round(v, 1) for k, v in rows[key].items()}, flush=True)
    peak = torch.cuda.max_memory_allocated() / 2**30 if gpu else float("nan")
    device = torch.cuda.get_device_name() if gpu else "CPU"
    a.out.write_text(json.dumps({"device": device, "context": context, "cap_gb": a.cap_gb if gpu else 0,
                                 "peak_gib": peak, "note": dec.note, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
