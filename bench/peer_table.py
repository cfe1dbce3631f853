"""One table: our fast decoder beside llama.cpp on the same GPU and checkpoint (bench/peer_llamacpp.sh).

    python bench/peer_table.py DIR

DIR holds what the run wrote: llama-bench.json (`llama-bench -o json`), completion[-lora]-N.log
(llama-completion's timings after an N-token prompt, without and with --lora), ours.json
(bench/peer_ours.py; absent when only the peer ran), PEER_SOURCE (which llama.cpp). llama-bench gives
llama.cpp's figures without an adapter (tg from an empty context, each the mean of its repetitions);
llama-bench takes no LoRA, so the LoRA figures are llama-completion's (one run each, tg following the
shortest prompt, greedy sampling included), shown beside its own run without the LoRA.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

PROMPT = re.compile(r"prompt eval time =\s*[\d.]+ ms /\s*(?P<n>\d+) tokens .*?(?P<rate>[\d.]+) tokens per second")
GEN = re.compile(r"\beval time =\s*[\d.]+ ms /\s*(?P<n>\d+) runs .*?(?P<rate>[\d.]+) tokens per second")


def llama_bench(path: Path) -> tuple[dict[str, float], dict]:
    """{"tg128": tok/s, "pp512": ...} and the first record (build, GPU, model)."""
    records = json.loads(path.read_text()) if path.exists() else []
    rates = {}
    for r in records:
        test = f"pp{r['n_prompt']}" if r["n_prompt"] else f"tg{r['n_gen']}"
        rates[test] = float(r["avg_ts"])
    return rates, (records[0] if records else {})


def completion(out: Path, lora: bool) -> dict[str, float]:
    """{"ppN": prompt tok/s, ...} from llama-completion's timings, one run per prompt length, and "tgM"
    (M tokens generated) from the run after the shortest prompt."""
    rates: dict[str, float] = {}
    runs = []
    for log in out.glob(f"completion{'-lora' if lora else ''}-[0-9]*.log"):
        text = log.read_text(errors="replace")
        prompt, gen = PROMPT.search(text), GEN.search(text)
        if prompt and gen:
            rates[f"pp{prompt['n']}"] = float(prompt["rate"])
            runs.append((int(prompt["n"]), int(gen["n"]), float(gen["rate"])))
    if runs:
        _, n, rate = min(runs)
        rates[f"tg{n}"] = rate
    return rates


def fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:,.1f}"


def ratio(a: float | None, b: float | None) -> str:
    return "—" if a is None or b is None or not b else f"{a / b:.2f}×"


def main() -> None:
    if len(sys.argv) != 2 or not Path(sys.argv[1]).is_dir():
        raise SystemExit("usage: peer_table.py DIR (the folder bench/peer_llamacpp.sh bench wrote)")
    out = Path(sys.argv[1])
    theirs, info = llama_bench(out / "llama-bench.json")
    base, lora = completion(out, lora=False), completion(out, lora=True)
    ours_file = out / "ours.json"
    ours = json.loads(ours_file.read_text()) if ours_file.exists() else {"rows": {}}
    mine = ours["rows"]
    tests = sorted({*theirs, *base, *mine.get("none", {})}, key=lambda t: (t[:2] != "tg", int(t[2:])))
    head = ("test", "ours", "llama-bench", "ours/llama", "ours attn-LoRA", "completion", "completion --lora",
            "ours/llama LoRA", "ours specialist")
    rows = [head]
    for t in tests:
        o, a, s = (mine.get(k, {}).get(t) for k in ("none", "attn_lora", "specialist"))
        rows.append((t, fmt(o), fmt(theirs.get(t)), ratio(o, theirs.get(t)), fmt(a), fmt(base.get(t)),
                     fmt(lora.get(t)), ratio(a, lora.get(t)), fmt(s)))
    width = [max(len(r[i]) for r in rows) for i in range(len(head))]
    print()
    for r in rows:
        cells = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, width, strict=True))]
        print("| " + " | ".join(cells) + " |")
        if r is head:
            print("|" + "|".join("-" * (w + 2) for w in width) + "|")
    gpu = info.get("gpu_info") or ours.get("device") or info.get("cpu_info", "?")
    source = (out / "PEER_SOURCE").read_text().split(",")[0] if (out / "PEER_SOURCE").exists() else "llama.cpp"
    print(f"\ntok/s on {gpu}. {source} ({info.get('backends', '?')}): model {info.get('model_type', '?')}, "
          f"{info.get('model_size', 0) / 2**30:.2f} GiB, flash-attn {info.get('flash_attn', '?')} (-1: auto), "
          f"n_ubatch {info.get('n_ubatch', '?')}; llama-bench: mean of {len(info.get('samples_ts', []))} runs, tg "
          "from an empty context; llama-completion: one run per prompt, tg after the shortest prompt.")
    if mine:
        cap = "uncapped"
        if ours["cap_gb"]:
            cap = f"capped at {ours['cap_gb']:g} GiB, peak {ours['peak_gib']:.1f} GiB allocated"
        print(f"ours: fast decoder, MXFP4 experts, a {ours['context']}-token cache (a step reads its live part), "
              f"{cap}" + (f"; {ours['note']}" if ours.get("note") else "") + ". attn-LoRA: the same rank-16 "
              "LoRA on q/k/v/o both sides; specialist: rank 16 on attention + all experts (no llama.cpp converter "
              "takes LoRA on fused experts).")
    else:
        print("ours: not run (PEER_OURS=0).")


if __name__ == "__main__":
    main()
