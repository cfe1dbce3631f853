"""Training throughput: Tandem's recipe (unsloth 4-bit QLoRA) vs plain TRL + PEFT (bf16), equal settings.

    python bench/train_bench.py [--layers 4] [--seq 2048] [--steps 8] [--gpu 0]

Each side runs in its own process: importing unsloth patches transformers and TRL, so the baseline
must never see it, and peak memory must be measured per side. Both use the same LoRA (rank 16,
attention + all experts), batch 1, the same sequence length and the same number of steps; the first
two steps (compilation, warm-up) are excluded from the rate. Both sides run on `--gpu` alone: with two
GPUs visible, transformers' Trainer wraps the model in DataParallel, which TRL refuses. Prints one table.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]


def rows(tokenizer, seq: int, n: int) -> list[dict[str, str]]:
    """Prompt/completion pairs of about `seq` tokens, half of them completion (the trained part)."""
    vocab = [t for t in tokenizer.get_vocab() if t.isalpha()]
    rng = random.Random(0)
    out = []
    for _ in range(n):
        words = [rng.choice(vocab) for _ in range(seq)]
        text = " ".join(words)
        ids = tokenizer(text)["input_ids"][: seq - 8]
        half = len(ids) // 2
        out.append({"prompt": tokenizer.decode(ids[:half]), "completion": tokenizer.decode(ids[half:])})
    return out


def side(kind: str, model_dir: str, seq: int, steps: int) -> dict:
    import torch

    if kind == "recipe":
        import unsloth  # noqa: F401  (first, as in the trainer)
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import SFTTrainer

    from engine.settings import Profile
    from engine.train.targets import lora_targets
    from engine.train.trainer import sft_config

    profile = Profile(max_steps=steps, max_samples=steps, rank=16, alpha=16, batch_size=1, grad_accum=1,
                      max_seq_length=seq, save_steps=10_000, warmup_steps=1)
    started = time.perf_counter()
    if kind == "recipe":
        from unsloth import FastLanguageModel

        model, tok = FastLanguageModel.from_pretrained(model_dir, max_seq_length=seq, load_in_4bit=True, dtype=None)
        modules, params = lora_targets(model)
        model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, use_rslora=True,
                                                 target_modules=modules, target_parameters=params or None,
                                                 use_gradient_checkpointing="unsloth", random_state=0)
    else:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        tok = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, device_map={"": 0})
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        modules, params = lora_targets(model)
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, use_rslora=True, target_modules=modules,
                                                 target_parameters=params or None, task_type="CAUSAL_LM"))
    load_s = time.perf_counter() - started
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            torch.cuda.synchronize()
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t)

    config = sft_config(profile, Path(tempfile.mkdtemp()), on_gpu=True, seed=0)
    if kind == "plain":
        config.optim = "adamw_torch"
    data = rows(tok, seq, steps)
    tokens = sum(len(tok(r["prompt"] + r["completion"])["input_ids"]) for r in data) / len(data)
    trainer = SFTTrainer(model=model, args=config, processing_class=tok, train_dataset=Dataset.from_list(data),
                         callbacks=[Clock()])
    torch.cuda.reset_peak_memory_stats()
    trainer.train()
    steady = times[2:] or times
    step_s = sum(steady) / len(steady)
    return {"kind": kind, "load_s": round(load_s, 1), "first_step_s": round(times[0], 2), "step_s": round(step_s, 3),
            "tokens_per_s": round(tokens / step_s, 1), "peak_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "trainable_params": trainable, "tokens_per_step": round(tokens)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--side", choices=["recipe", "plain"])
    ap.add_argument("--model-dir")
    ap.add_argument("--gpu", type=int, default=0, help="the one GPU both sides train on")
    a = ap.parse_args()
    if a.side:
        print("RESULT " + json.dumps(side(a.side, a.model_dir, a.seq, a.steps)), flush=True)
        return
    from engine.serve.model import pin_gpu

    pin_gpu(a.gpu)  # the slice is built on that GPU too
    from bench.shapes import save_slice
    from engine.serve.demo_model import demo_model_path

    folder = Path(tempfile.gettempdir()) / f"gpt-oss-20b-slice-{a.layers}"
    save_slice(folder, a.layers, demo_model_path())
    results = []
    for kind in ("plain", "recipe"):
        out = subprocess.run([sys.executable, __file__, "--side", kind, "--model-dir", str(folder), "--seq",
                              str(a.seq), "--steps", str(a.steps)], capture_output=True, text=True,
                             env={**os.environ, "CUDA_VISIBLE_DEVICES": str(a.gpu), "PYTHONPATH": os.pathsep.join(
                                 filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))})
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(out.stdout[-3000:], out.stderr[-5000:], file=sys.stderr)
            results.append({"kind": kind, "error": out.stderr.strip().splitlines()[-1:] or ["no output"]})
            continue
        results.append(json.loads(line[7:]))
    print(f"\nGPT-OSS-20B slice: {a.layers} layers, full width, 32 experts; batch 1 x {a.seq} tokens; "
          f"LoRA r=16 on attention + experts; {a.steps} steps (first 2 excluded)")
    print(f"{'side':8} {'trainable':>12} {'load s':>7} {'1st step s':>10} {'step s':>7} {'tok/s':>9} {'peak GB':>8}")
    for r in results:
        if "error" in r:
            print(f"{r['kind']:8} failed: {r['error']}")
            continue
        print(f"{r['kind']:8} {r['trainable_params']:>12,} {r['load_s']:>7} {r['first_step_s']:>10} {r['step_s']:>7} "
              f"{r['tokens_per_s']:>9} {r['peak_gb']:>8}")
    ok = [r for r in results if "error" not in r]
    if len(ok) == 2:
        plain, recipe = ok
        print(f"recipe/plain tokens/s: {recipe['tokens_per_s'] / plain['tokens_per_s']:.2f}x, "
              f"peak memory {recipe['peak_gb'] / plain['peak_gb']:.2f}x")


if __name__ == "__main__":
    main()
