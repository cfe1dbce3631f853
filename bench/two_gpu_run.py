"""Serve on one GPU while training on another, then show the new specialist go live. One script.

    python bench/two_gpu_run.py --inference-gpu 0 --training-gpu 1 [--layers 8] [--replies 4]

1. Saves a GPT-OSS-20B-shaped full-width slice (random bf16 weights) and serves it through the engine
   (unsloth, 4-bit) on the inference GPU, with two specialists (random LoRAs on attention + experts).
2. Measures decode tok/s and time to first token with auto-routing while the training GPU is idle.
3. Starts a quick_test training run on the training GPU (its own process, CUDA_VISIBLE_DEVICES set)
   and measures the same again while it trains; reads NVML on every GPU, with the processes on each.
4. Waits for the run to publish, shows the new specialist loaded live and answering a routed prompt.
5. Prints a table: decode during training vs idle, training tokens/s vs alone (a second run with no
   chat), and which processes each GPU held (the chat process must not appear on the training GPU).

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
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--inference-gpu", type=int, default=0)
    ap.add_argument("--training-gpu", type=int, default=1)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--replies", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=48)
    a = ap.parse_args()

    from engine.serve.model import pin_gpu

    pin_gpu(a.inference_gpu)  # before torch: this process sees only the inference GPU
    import torch  # noqa: F401

    from bench.shapes import random_lora, save_slice
    from engine.serve.chat import Conversation, Engine, Finished
    from engine.serve.demo_model import demo_model_path
    from engine.serve.generate import Sampling
    from engine.settings import load, save, updated
    from engine.store.adapters import AdapterStore, Manifest
    from engine.telemetry import Telemetry
    from engine.train.dataset import load_examples
    from engine.train.runs import Request, RunQueue

    work = Path(tempfile.mkdtemp())
    folder = save_slice(Path(tempfile.gettempdir()) / f"gpt-oss-20b-slice-{a.layers}", a.layers, demo_model_path())
    shutil.copy(ROOT / "settings.toml", work / "settings.toml")
    s = load(work / "settings.toml")
    for key, value in (("model.name", str(folder)), ("gpus.inference", a.inference_gpu),
                       ("gpus.training", a.training_gpu), ("model.max_seq_length", 1024)):
        s = updated(s, key, value)
    save(s)
    prompts = {t: [e.user_prompt for e in load_examples(str(ROOT / f"data/samples/{t}.jsonl")).examples]
               for t in ("math", "translate", "code")}

    engine = Engine(s)
    engine.load()
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

    chat(1)  # warm-up: compilation and caches out of the numbers
    idle_rate, idle_ttft, idle_used = chat(a.replies)
    queue = RunQueue(s)
    run = queue.submit(Request(task="math", data=str(ROOT / "data/samples/math.jsonl"), profile="quick_test",
                               gpu=a.training_gpu, settings=str(s.source)))
    while not run.metrics():
        time.sleep(1)
    busy_rate, busy_ttft, busy_used = chat(a.replies)
    snap = telemetry.snapshot()
    state = queue.wait(run, timeout=900)
    trained = [m for m in run.metrics() if "loss" in m]
    deadline = time.monotonic() + 60
    while not any("math" in c.get("added", []) for c in changes) and time.monotonic() < deadline:
        time.sleep(0.5)
    live = next((ev for ev in engine.ask(Conversation(), "Combien font 7 fois 8 ?", store=False,
                                          sampling=Sampling(greedy=True, max_new_tokens=8))
                 if isinstance(ev, Finished)), None)
    solo = queue.submit(Request(task="solo", data=str(ROOT / "data/samples/math.jsonl"), profile="quick_test",
                                gpu=a.training_gpu, settings=str(s.source), name="solo"))
    queue.wait(solo, timeout=900)
    solo_tps = [m for m in solo.metrics() if "loss" in m][-1]["tokens_per_s"]
    busy_tps = trained[-1]["tokens_per_s"] if trained else 0.0

    print(f"\nGPT-OSS-20B slice, {a.layers} layers, served through unsloth on GPU {a.inference_gpu}; "
          f"quick_test training on GPU {a.training_gpu}")
    print(f"{'decode tok/s, training GPU idle':44} {idle_rate:8.1f}   first token {idle_ttft * 1e3:.0f} ms")
    print(f"{'decode tok/s, while training':44} {busy_rate:8.1f}   first token {busy_ttft * 1e3:.0f} ms   "
          f"({(busy_rate / idle_rate - 1) * 100:+.1f}%, target within 5%)")
    print(f"{'routed to':44} idle {sorted(set(idle_used))}, training {sorted(set(busy_used))}")
    print(f"{'training tok/s while chatting':44} {busy_tps:8.1f}   alone {solo_tps:.1f} "
          f"({(busy_tps / solo_tps - 1) * 100:+.1f}%)")
    print(f"{'run':44} {state.status}: {state.outcome or state.error}")
    print(f"{'new specialist live, routed prompt answered by':44} {live.adapter if live else '-'}")
    me = os.getpid()
    for g in snap.gpus:
        procs = ", ".join(f"{p.pid}{' (chat)' if p.pid == me else ''} {p.memory_mb or 0:.0f} MB" for p in g.processes)
        print(f"GPU {g.index} {g.name}: util {g.utilization}% mem {(g.memory_used_mb or 0) / 1024:.1f} GB "
              f"power {g.power_w} W; processes: {procs or 'none'}")
    if a.inference_gpu != a.training_gpu:
        on_training = [p.pid for g in snap.gpus if g.index == a.training_gpu for p in g.processes]
        print(f"chat process on the training GPU: {'YES' if me in on_training else 'no'}")
    print(json.dumps({"idle": idle_rate, "busy": busy_rate, "train_busy": busy_tps, "train_solo": solo_tps}))
    engine.close()


if __name__ == "__main__":
    main()
