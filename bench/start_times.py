"""First and second start of the chat engine: how long until the model is ready, what each load step
took, and which GPUs the process holds a CUDA context on (NVML, at every step).

    python bench/start_times.py --inference-gpu 1 --training-gpu 0 [--model NAME_OR_FOLDER]

Each start is a fresh process loading the engine as the app's worker does (`Engine.load`), with one
TANDEM_CACHE that starts empty: the first start builds the demo model and compiles the fast decoder, the
second reads both from the cache. Each start is shown step by step (when each began, how long it took,
which GPUs held a context), the second against its 10 s target. A third process imports torch before the
engine, too early for it to pin its GPU, and shows which load step then puts a context on the other GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SECOND_START_TARGET_S = 10.0  # issue 25: a second start with the fast decoder's compile cached
sys.path[:0] = [str(ROOT)]


def contexts() -> dict[int, float]:
    """GPU index -> MB that NVML lists for this process."""
    from engine.telemetry import Telemetry

    me = os.getpid()
    return {g.index: p.memory_mb or 0.0 for g in Telemetry().snapshot().gpus for p in g.processes if p.pid == me}


def child(unpinned: bool, launched: float) -> None:
    if unpinned:
        import torch  # noqa: F401  (before the engine: pinning is then too late)
    from engine.serve.chat import Engine
    from engine.settings import load

    steps: list[tuple[float, str, dict[int, float]]] = []
    engine = Engine(load())
    engine.load(lambda text, _f: steps.append((round(time.time() - launched, 1), text, contexts())))
    ready = time.time() - launched
    print("RESULT " + json.dumps({"ready_s": round(ready, 1), "steps": steps, "contexts": contexts(),
                                  "visible": os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")}), flush=True)
    engine.close()


def start(label: str, env: dict[str, str], unpinned: bool = False) -> dict:
    args = [sys.executable, __file__, "--child", "--launched", str(time.time())] + (["--unpinned"] if unpinned else [])
    out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=900)
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        return {"label": label, "error": (out.stderr.strip().splitlines() or ["no output"])[-1]}
    return {"label": label, **json.loads(line[7:])}


def phases(r: dict) -> list[tuple[float, float, str, str]]:
    """Each load step once: (began, seconds it took, its last message, GPUs with a context then), plus the
    launch (interpreter and engine imports) before the first step. A step lasts until the next begins."""
    groups: list[list] = []
    for t, text, c in r["steps"]:
        key = text.split(" · ")[0]
        if groups and groups[-1][0] == key:
            groups[-1][2:] = [text, c]
        else:
            groups.append([key, t, text, c])
    out = [(0.0, groups[0][1] if groups else r["ready_s"], "launch: python, torch-free engine imports", "-")]
    for i, (_key, began, text, c) in enumerate(groups):
        end = groups[i + 1][1] if i + 1 < len(groups) else r["ready_s"]
        out.append((began, end - began, text, ",".join(sorted(c, key=int)) or "-"))
    return out


def show(r: dict, target_s: float | None = None) -> None:
    if "error" in r:
        print(f"{r['label']:28} failed: {r['error']}", flush=True)
        return
    ctx = ", ".join(f"GPU {i} {mb:.0f} MB" for i, mb in sorted(r["contexts"].items())) or "none"
    verdict = "" if target_s is None else \
        f"   target <= {target_s:.0f} s: {'met' if r['ready_s'] <= target_s else 'MISSED'}"
    print(f"{r['label']:28} ready {r['ready_s']:6.1f} s   CUDA_VISIBLE_DEVICES={r['visible']}   "
          f"contexts: {ctx}{verdict}")
    print(f"  {'from':>7}  {'took':>6}  {'GPUs':>5}  step (its last message)")
    for began, took, text, on in phases(r):
        print(f"  {began:7.1f}  {took:6.1f}  [{on:>3}]  {text[:100]}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--inference-gpu", type=int, default=0)
    ap.add_argument("--training-gpu", type=int, default=1)
    ap.add_argument("--model", default="", help="model.name (default: the embedded demo model)")
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--unpinned", action="store_true")
    ap.add_argument("--launched", type=float)
    a = ap.parse_args()
    if a.child:
        child(a.unpinned, a.launched)
        return
    from engine.settings import load, save, updated

    work = Path(tempfile.mkdtemp(prefix="starts-"))
    s = load(ROOT / "settings.toml")
    for key, value in (("model.name", a.model), ("gpus.inference", a.inference_gpu),
                       ("gpus.training", a.training_gpu), ("paths.adapters", str(work / "adapters")),
                       ("paths.logs", str(work / "logs"))):
        s = updated(s, key, value)
    save(s, work / "settings.toml")
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "TORCHINDUCTOR_CACHE_DIR")}
    env.update(TANDEM_SETTINGS=str(work / "settings.toml"), TANDEM_CACHE=str(work / "cache"), PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    print(f"\nChat engine start, {a.model or 'demo model'}: inference GPU {a.inference_gpu}, "
          f"training GPU {a.training_gpu}; seconds from launch", flush=True)
    runs = []
    for label, unpinned in (("first start (empty cache)", False), ("second start", False),
                            ("torch imported first", True)):
        runs.append(start(label, env, unpinned))
        show(runs[-1], SECOND_START_TARGET_S if label == "second start" else None)  # as each ends: a run cut
        # short by a time limit keeps what it measured
    on_training = [r["label"] for r in runs if "error" not in r and str(a.training_gpu) in r["contexts"]]
    print(f"a context on the training GPU {a.training_gpu}: {', '.join(on_training) or 'none'}")
    print("RESULT " + json.dumps(runs))


if __name__ == "__main__":
    main()
