"""Serve on one GPU while training on another, then show the new specialist go live. One script.

    python bench/two_gpu_run.py --inference-gpu 0 --training-gpu 1 [--layers 24] [--cap-gb 24]
        [--set model.serve_in_4bit=true] [--replies 2] [--tokens 32] [--solo]
    python bench/two_gpu_run.py --layers 0 --cap-gb 0 --inference-gpu 0 --training-gpu 0   # CPU dry run

1. Saves a GPT-OSS-20B-shaped model (random bf16 weights; `--layers` below 24 gives a full-width slice)
   and serves it through the engine on the inference GPU, in the serving mode settings.toml gives
   (`--set KEY=VALUE` overrides any setting; the mode in use is printed), with two specialists (random
   LoRAs on attention + experts). Both processes are held to `--cap-gb` of their card, as 24 GB cards
   would be (0: no cap).
2. Measures decode tok/s and time to first token with auto-routing while the training GPU is idle.
3. Starts a quick_test training run on the training GPU (its own process, CUDA_VISIBLE_DEVICES set)
   and measures the same again while it trains; reads NVML on every GPU, with the processes on each.
4. Waits for the run to publish, shows the new specialist loaded live and answering a routed prompt.
5. Prints a table: decode during training vs idle, each process's peak memory (torch's and NVML's),
   which processes each GPU held (the chat process must not appear on the training GPU) and, with
   `--solo`, training tokens/s vs a second run with no chat.

With one GPU, pass the same index twice: both roles share it (the figures then measure contention).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--inference-gpu", type=int, default=0)
    ap.add_argument("--training-gpu", type=int, default=1)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--cap-gb", type=float, default=24.0)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a setting, e.g. "
                    "model.serve_in_4bit=true")
    ap.add_argument("--replies", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--solo", action="store_true", help="also time a training run with no chat (one more run)")
    a = ap.parse_args()

    from engine.serve.model import pin_gpu

    pin_gpu(a.inference_gpu)  # before torch: this process sees only the inference GPU
    import torch

    if a.cap_gb:
        total = torch.cuda.get_device_properties(0).total_memory / 2**30
        torch.cuda.set_per_process_memory_fraction(min(1.0, a.cap_gb / total))
        os.environ["TANDEM_GPU_MEMORY_GB"] = str(a.cap_gb)  # the trainer process holds itself to the same

    from bench.shapes import random_lora, save_slice
    from bench.train_memory import nvml_peak
    from engine.serve.chat import Conversation, Engine, Finished
    from engine.serve.demo_model import demo_model_path
    from engine.serve.generate import Sampling
    from engine.settings import load, save, updated
    from engine.store.adapters import AdapterStore, Manifest
    from engine.telemetry import Telemetry
    from engine.train.dataset import load_examples
    from engine.train.runs import Request, RunQueue

    work = Path(tempfile.mkdtemp())
    folder = save_slice(Path(tempfile.gettempdir()) / f"gpt-oss-20b-slice-{a.layers}", a.layers,
                        demo_model_path()) if a.layers else ""  # 0 layers: the demo model (a CPU dry run)
    shutil.copy(ROOT / "settings.toml", work / "settings.toml")
    s = load(work / "settings.toml")
    for key, value in (("model.name", str(folder)), ("gpus.inference", a.inference_gpu),
                       ("gpus.training", a.training_gpu), ("model.max_seq_length", 1024)):
        s = updated(s, key, value)
    for item in a.set:
        key, _, value = item.partition("=")
        s = updated(s, key.strip(), value)
    save(s)
    prompts = {t: [e.user_prompt for e in load_examples(str(ROOT / f"data/samples/{t}.jsonl")).examples]
               for t in ("math", "translate", "code")}

    engine = Engine(s)
    engine.load()
    mode = (f"model.serve_in_4bit = {s.model.serve_in_4bit!r}: loaded {engine.lm.quant}, "
            f"decoder {'fast' if not engine.fast_note else 'transformers+PEFT (' + engine.fast_note[:80] + ')'}")
    print(f"serving mode: {mode}", flush=True)
    store = AdapterStore(s.adapters_dir)
    for i, task in enumerate(("translate", "code")):
        lora = random_lora(engine.lm.model, work / f"lora-{task}", seed=i)
        store.publish(lora, Manifest(name=task, task=task, base_model=engine.base_id, prompts=prompts[task]))
    engine.refresh_adapters()
    changes: list[dict] = []
    engine.watch_adapters(changes.append)
    telemetry = Telemetry()

    def chat(n: int) -> tuple[float, float, list[str]]:
        rates, ttfts, used = [], [], []
        for i in range(n):
            prompt = [prompts["translate"][i], prompts["code"][i]][i % 2]
            for ev in engine.ask(Conversation(), prompt, sampling=Sampling(greedy=True, max_new_tokens=a.tokens),
                                 store=False):
                if isinstance(ev, Finished):
                    rates.append(ev.reply.stats.tokens_per_s)
                    ttfts.append(ev.reply.stats.ttft_s)
                    used.append(ev.adapter)
        return statistics.median(rates), statistics.median(ttfts), used

    chat(2)  # warm-up: both specialists' first use (compile, graphs, caches) out of the numbers
    idle_rate, idle_ttft, idle_used = chat(a.replies)
    queue = RunQueue(s)
    run = queue.submit(Request(task="math", data=str(ROOT / "data/samples/math.jsonl"), profile="quick_test",
                               gpu=a.training_gpu, settings=str(s.source)))
    stop, train_peak = threading.Event(), [0.0]
    sampler = threading.Thread(target=nvml_peak, args=(a.training_gpu, lambda: run.state.pid, stop, train_peak),
                               daemon=True)
    sampler.start()
    while not run.metrics() and not run.state.ended:
        time.sleep(1)
    busy_rate, busy_ttft, busy_used = chat(a.replies)
    snap = telemetry.snapshot()
    state = queue.wait(run, timeout=900)
    stop.set()
    trained = [m for m in run.metrics() if "loss" in m]
    deadline = time.monotonic() + 60
    while not any("math" in c.get("added", []) for c in changes) and time.monotonic() < deadline:
        time.sleep(0.5)
    live = next((ev for ev in engine.ask(Conversation(), "Combien font 7 fois 8 ?", store=False,
                                          sampling=Sampling(greedy=True, max_new_tokens=8))
                 if isinstance(ev, Finished)), None)
    chat_reserved = torch.cuda.max_memory_reserved() / 2**30
    me = os.getpid()
    chat_nvml = max((p.memory_mb or 0 for g in telemetry.snapshot().gpus for p in g.processes if p.pid == me),
                    default=0) / 1024
    last = trained[-1] if trained else {}
    busy_tps = last.get("tokens_per_s", 0.0)
    solo_tps = None
    if a.solo:
        solo = queue.submit(Request(task="solo", data=str(ROOT / "data/samples/math.jsonl"), profile="quick_test",
                                    gpu=a.training_gpu, settings=str(s.source), name="solo"))
        queue.wait(solo, timeout=900)
        solo_tps = [m for m in solo.metrics() if "loss" in m][-1]["tokens_per_s"]

    cap = f"both processes capped at {a.cap_gb:g} GB" if a.cap_gb else "no memory cap"
    shape = f"GPT-OSS-20B shape, {a.layers} layers, random weights" if a.layers else "demo model"
    print(f"\n{shape}; chat on GPU {a.inference_gpu}, quick_test "
          f"training on GPU {a.training_gpu}; {cap}")
    print(f"{'serving mode':44} {mode}")
    print(f"{'decode tok/s, training GPU idle':44} {idle_rate:8.1f}   first token {idle_ttft * 1e3:.0f} ms")
    print(f"{'decode tok/s, while training':44} {busy_rate:8.1f}   first token {busy_ttft * 1e3:.0f} ms   "
          f"({(busy_rate / idle_rate - 1) * 100:+.1f}%, target within 5%)")
    print(f"{'routed to':44} idle {sorted(set(idle_used))}, training {sorted(set(busy_used))}")
    print(f"{'chat process peak GB (torch reserved / NVML)':44} {chat_reserved:8.2f} / {chat_nvml:.2f}")
    print(f"{'training peak GB (allocated / reserved / NVML)':44} {last.get('gpu_mem_gb', '-')!s:>8} / "
          f"{last.get('gpu_reserved_gb', '-')} / {train_peak[0] / 1024:.2f}")
    solo_text = f"   alone {solo_tps:.1f} ({(busy_tps / solo_tps - 1) * 100:+.1f}%)" if solo_tps else ""
    print(f"{'training tok/s while chatting':44} {busy_tps:8.1f}{solo_text}")
    print(f"{'run':44} {state.status}: {state.outcome or state.error}")
    print(f"{'new specialist live, routed prompt answered by':44} {live.adapter if live else '-'}")
    for g in snap.gpus:
        procs = ", ".join(f"{p.pid}{' (chat)' if p.pid == me else ''} {p.memory_mb or 0:.0f} MB" for p in g.processes)
        print(f"GPU {g.index} {g.name}: util {g.utilization}% mem {(g.memory_used_mb or 0) / 1024:.1f} GB "
              f"power {g.power_w} W; processes: {procs or 'none'}")
    if a.inference_gpu != a.training_gpu:
        on_training = [p.pid for g in snap.gpus if g.index == a.training_gpu for p in g.processes]
        print(f"chat process on the training GPU: {'YES' if me in on_training else 'no'}")
    print("RESULT " + json.dumps({"mode": mode, "idle": idle_rate, "busy": busy_rate, "train_busy": busy_tps,
                                  "train_solo": solo_tps, "chat_reserved_gb": round(chat_reserved, 2),
                                  "chat_nvml_gb": round(chat_nvml, 2), "train": last, "live": live.adapter if live
                                  else None, "run": state.status}))
    engine.close()


if __name__ == "__main__":
    main()
