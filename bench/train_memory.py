"""Peak GPU memory of the training profiles on the GPT-OSS-20B shape, with the trainer held to a smaller card.

    python bench/train_memory.py --gpu 0 --cap-gb 24 --profiles standard,max_quality [--layers 24] [--steps 3]
    python bench/train_memory.py --gpu 0 --cap-gb 24 --profiles preference --layers 24 --steps 3
    python bench/train_memory.py --layers 0 --steps 2      # the demo model: a dry run on the CPU

Runs the real trainer (engine.train.runs starts `python -m engine.train.trainer`) on a full-width slice with
random weights, one profile after another on `--gpu`, each process capped at `--cap-gb` as a smaller card
would be (TANDEM_GPU_MEMORY_GB). The rows fill the profile's max_seq_length, the worst case for memory (real
rows are mostly shorter), and each profile runs its first `--steps` optimizer steps with everything else as
configured: weights, LoRA, optimizer state and a full batch are all on the card from the first step on.
NVML's figure for the trainer process (its CUDA context and everything outside torch's allocator included)
is sampled every half second. Prints one table.

A preference (dpo) profile trains on top of a specialist, as it does for real: one is made first by a
one-step quick_test run on the same shape (not measured), and the rows are pairs whose prompt and
longer reply fill max_seq_length, both replies as long as each other (DPO holds chosen and rejected,
plus the frozen reference's forward, in one step).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]


def long_rows(tokenizer, path: Path, n: int, tokens: int) -> Path:
    """`n` chat rows of about `tokens` tokens (a third prompt, the rest reasoning and answer), as JSONL."""
    words = [w for w in tokenizer.get_vocab() if w.isalpha() and len(w) > 2]
    rng = random.Random(0)

    def text(count: int) -> str:
        out: list[str] = []
        while len(tokenizer(" ".join(out))["input_ids"]) < count:
            out += rng.choices(words, k=max(8, count // 8))
        return " ".join(out)

    with open(path, "w") as fh:
        for _ in range(n):
            third = tokens // 3
            msg = [{"role": "user", "content": text(third)},
                   {"role": "assistant", "thinking": text(third), "content": text(tokens - 2 * third - 128)}]
            fh.write(json.dumps({"task": "memory", "messages": msg}) + "\n")
    return path


def long_pairs(tokenizer, path: Path, n: int, tokens: int) -> Path:
    """`n` preference pairs: a prompt of a third of `tokens`, chosen and rejected replies filling the rest."""
    chat = long_rows(tokenizer, path.with_suffix(".chat.jsonl"), n, tokens)
    with open(path, "w") as fh:
        for line in chat.read_text().splitlines():
            user, reply = json.loads(line)["messages"]
            text = reply["thinking"] + " " + reply["content"]
            fh.write(json.dumps({"messages": [user], "chosen": text, "rejected": " ".join(text.split()[::-1])})
                     + "\n")
    return path


def nvml_peak(gpu: int, pid_of, stop: threading.Event, peak: list[float]) -> None:
    """Largest NVML memory figure of the process `pid_of()` on `gpu`, in MB, until `stop`."""
    from engine.telemetry import Telemetry

    telemetry = Telemetry()
    while not stop.wait(0.5):
        pid = pid_of()
        for g in telemetry.snapshot().gpus:
            if g.index == gpu:
                peak[0] = max([peak[0]] + [p.memory_mb or 0 for p in g.processes if p.pid == pid])


def run_profile(profile: str, gpu: int, cap_gb: float, folder: Path, steps: int) -> dict:
    import os

    from engine.serve.demo_model import demo_model_path
    from engine.settings import load, save, updated
    from engine.train.runs import Request, RunQueue

    work = Path(tempfile.mkdtemp(prefix=f"mem-{profile}-"))
    s = load(ROOT / "settings.toml")
    s = updated(s, "model.name", str(folder) if folder != demo_model_path() else "")
    for key, value in (("gpus.training", gpu), ("training.eval_fraction", 0.0),
                       (f"training.profiles.{profile}.max_steps", steps),
                       (f"training.profiles.{profile}.save_steps", 10_000)):
        s = updated(s, key, value)
    for sub in ("adapters", "logs", "models"):
        s = updated(s, f"paths.{sub}", str(work / sub))
    save(s, work / "settings.toml")
    p = s.profile(profile)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    make_rows = long_pairs if p.method == "dpo" else long_rows
    data = make_rows(tokenizer, work / "rows.jsonl", p.batch_size * p.grad_accum * steps, p.max_seq_length)
    os.environ["TANDEM_GPU_MEMORY_GB"] = str(cap_gb)  # the trainer process inherits it
    queue = RunQueue(s)
    start_from = ""
    if p.method == "dpo":  # the specialist it improves: one quick_test step on the same shape, not measured
        s = updated(s, "training.profiles.quick_test.max_steps", 1)
        save(s, work / "settings.toml")
        rows = long_rows(tokenizer, work / "specialist.jsonl", 8, 512)
        first = queue.submit(Request(task="memory", data=str(rows), profile="quick_test", gpu=gpu,
                                     settings=str(s.source), name="memory-specialist"))
        if queue.wait(first, timeout=1200).status != "finished":
            raise SystemExit(f"the specialist run failed: {first.state.error}\n"
                             + (first.dir / "output.log").read_text(errors="replace")[-1500:])
        start_from = "memory-specialist"
    run = queue.submit(Request(task="memory", data=str(data), profile=profile, gpu=gpu, settings=str(s.source),
                               name=f"memory-{profile}", from_adapter=start_from))
    stop, peak = threading.Event(), [0.0]
    sampler = threading.Thread(target=nvml_peak, args=(gpu, lambda: run.state.pid, stop, peak), daemon=True)
    sampler.start()
    state = queue.wait(run, timeout=1200)
    stop.set()
    sampler.join()
    steps_done = [m for m in run.metrics() if "loss" in m]
    last = steps_done[-1] if steps_done else {}
    log = (run.dir / "output.log").read_text(errors="replace") if state.status != "finished" else ""
    tail = "\n".join(x for x in log[-1500:].splitlines() if x.strip())
    return {"profile": profile + (" (dpo)" if p.method == "dpo" else ""), "batch": f"{p.batch_size}x{p.grad_accum}",
            "seq": p.max_seq_length,
            "rank": p.rank, "alpha": p.alpha, "status": state.status, "error": state.error[:300],
            "steps": last.get("step", 0), "tokens_per_s": last.get("tokens_per_s"),
            "allocated_gb": last.get("gpu_mem_gb"), "reserved_gb": last.get("gpu_reserved_gb"),
            "nvml_gb": round(peak[0] / 1024, 2), "seconds": round((state.ended or time.time()) - (state.started or 0)),
            "log_tail": tail}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpu", type=int, default=0)
    ap.add_argument("--cap-gb", type=float, default=24.0)
    ap.add_argument("--profiles", default="quick_test,standard")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--steps", type=int, default=3)
    a = ap.parse_args()

    from bench.shapes import save_slice
    from engine.serve.demo_model import demo_model_path

    folder = demo_model_path()
    if a.layers:
        folder = save_slice(Path(tempfile.gettempdir()) / f"gpt-oss-20b-slice-{a.layers}", a.layers, folder)
    results = [run_profile(name, a.gpu, a.cap_gb, folder, a.steps) for name in a.profiles.split(",")]
    shape = f"GPT-OSS-20B shape ({a.layers} layers, random weights)" if a.layers else "the demo model"
    print(f"\nTraining memory, {shape}, GPU {a.gpu} capped at "
          f"{a.cap_gb:g} GB, rows of max_seq_length tokens, first {a.steps} optimizer steps")
    print(f"{'profile':12} {'batch':>6} {'seq':>5} {'r/alpha':>8} {'status':>9} {'steps':>5} {'tok/s':>8} "
          f"{'alloc GB':>8} {'reserv GB':>9} {'NVML GB':>8} {'wall s':>6}")
    for r in results:
        print(f"{r['profile']:12} {r['batch']:>6} {r['seq']:>5} {r['rank']:>3}/{r['alpha']:<4} {r['status']:>9} "
              f"{r['steps']:>5} {r['tokens_per_s'] or '-':>8} {r['allocated_gb'] or '-':>8} "
              f"{r['reserved_gb'] or '-':>9} {r['nvml_gb']:>8} {r['seconds']:>6}")
        if r["error"]:
            print(f"  error: {r['error']}\n{r['log_tail']}")
    print("RESULT " + json.dumps([{k: v for k, v in r.items() if k != "log_tail"} for r in results]))


if __name__ == "__main__":
    main()
