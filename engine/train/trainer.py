"""The training process: `python -m engine.train.trainer RUN_DIR` (started by engine.train.runs, never by hand).

Recipe: unsloth `FastLanguageModel` (4-bit QLoRA on a GPU, its CPU fallback otherwise), rsLoRA on
attention and every MoE expert, unsloth gradient checkpointing, TRL `SFTTrainer` on prompt/completion
pairs in harmony, pre-tokenized by `Example.encode` so dataset text can never become a control token,
and only the assistant's reply is trained on (prompts carry no loss), cosine
schedule with warmup, `adamw_8bit` on GPU. The data is validated before the model is loaded, so a bad
dataset never touches the GPU. Metrics go to metrics.jsonl through a TrainerCallback; a stop request
finishes the step, saves a checkpoint and exits 0.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from engine.settings import Profile, Settings, load, with_overrides
from engine.store.adapters import AdapterStore, Manifest
from engine.train.dataset import DatasetError, Example, load_examples
from engine.train.loss_monitor import LossMonitor
from engine.train.preference import Pair, judge, load_pairs, sequence_logps
from engine.train.runs import Run, RunQueue

MAX_ROUTER_PROMPTS = 2000
MIN_IMPROVEMENT = 1e-3  # held-out loss a retrained specialist must gain to replace the current one
GATE_ADAPTER = "gate-current"  # the current version's name while the gate evaluates it beside the new one


def model_folder_stem(base_id: str) -> str:
    """The base model's own name as a folder-name prefix: `unsloth/gpt-oss-20b` -> `gpt-oss-20b`,
    a local `/models/my-oss/` -> `my-oss`, the demo -> its build's name."""
    name = base_id.removeprefix("demo:").rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1]
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip(".-") or "model"


def run_profile(settings: Settings, req: Any) -> Profile:
    """The run's profile from settings, with the run's own overrides (an experiment's variant)."""
    profile = settings.profile(req.profile)
    return with_overrides(profile, req.overrides, f"run {req.profile}") if req.overrides else profile


def split(examples: list[Any], fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """Deterministic train/eval split; no eval split below 10 examples."""
    if fraction <= 0 or len(examples) < 10:
        return examples, []
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, int(len(examples) * fraction))
    ev = set(order[:n_eval])
    return [e for i, e in enumerate(examples) if i not in ev], [examples[i] for i in sorted(ev)]


def to_rows(examples: list[Any]) -> list[dict[str, Any]]:
    """Examples (or pairs) as rows to keep around; `tokenized` makes the ids TRL trains and evaluates on."""
    return [ex.as_row() for ex in examples]


def tokenized(rows: list[dict[str, Any]], tokenizer: Any, max_length: int | None = None,
              kind: type = Example) -> Any:
    """A `datasets.Dataset` of token ids TRL skips its own tokenization for: input_ids + completion_mask
    for examples, prompt_ids + chosen_ids + rejected_ids for preference pairs."""
    from datasets import Dataset

    return Dataset.from_list([kind.from_row(r).encode(tokenizer, max_length) for r in rows])


def oom_hint(profile_name: str, p: Profile) -> str:
    return (f"out of GPU memory. In settings.toml [training.profiles.{profile_name}] lower batch_size "
            f"(now {p.batch_size}) and raise grad_accum (now {p.grad_accum}) to keep the effective batch, "
            f"or lower max_seq_length (now {p.max_seq_length}).")


class _Metrics:
    """Builds the TrainerCallback that writes metrics.jsonl and honours stop requests."""

    def __init__(self, run: Run, settings: Settings, profile: Profile, tokens_per_sample: float):
        self.run = run
        self.monitor = LossMonitor(settings.training.target_loss, settings.training.overfit_below,
                                   settings.training.underfit_above)
        self.tokens_per_sample = tokens_per_sample
        self.samples_per_step = profile.batch_size * profile.grad_accum
        self.started = time.monotonic()
        self.first_step_at: float | None = None
        self.best_loss: float | None = None
        self.last_loss: float | None = None
        self.last_eval: float | None = None

    def write(self, record: dict[str, Any]) -> None:
        with open(self.run.dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")

    def callback(self):
        from transformers import TrainerCallback

        outer = self

        class Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                if outer.first_step_at is None:
                    outer.first_step_at = time.monotonic()
                if outer.run.stop_requested:
                    control.should_save = True
                    control.should_training_stop = True
                return control

            def on_log(self, args, state, control, logs=None, **kw):
                outer.on_log(state, logs or {})

        return Callback()

    def on_log(self, state: Any, logs: dict[str, Any]) -> None:
        import torch

        step, total = int(state.global_step), int(state.max_steps)
        elapsed = time.monotonic() - self.started
        # Rates from the first finished step on: the first step carries compilation and warm-up.
        timed = time.monotonic() - self.first_step_at if self.first_step_at else 0.0
        samples_s = (step - 1) * self.samples_per_step / timed if timed > 0 and step > 1 else 0.0
        per_step = timed / (step - 1) if step > 1 and timed > 0 else 0.0
        rec: dict[str, Any] = {"time": time.time(), "step": step, "total": total, "elapsed_s": round(elapsed, 2),
                               "eta_s": round(per_step * (total - step), 1) if per_step else None,
                               "samples_per_s": round(samples_s, 3),
                               "tokens_per_s": round(samples_s * self.tokens_per_sample, 1)}
        if "loss" in logs:
            loss = float(logs["loss"])
            self.last_loss = loss
            self.best_loss = loss if self.best_loss is None else min(self.best_loss, loss)
            rec.update(loss=round(loss, 4), learning_rate=logs.get("learning_rate"),
                       grad_norm=round(float(logs["grad_norm"]), 4) if logs.get("grad_norm") is not None else None)
            verdict = self.monitor.classify(loss)
            rec["loss_state"] = verdict.state
            if verdict.warning:
                rec["warning"] = verdict.warning
        if "eval_loss" in logs:
            self.last_eval = float(logs["eval_loss"])
            rec["eval_loss"] = round(self.last_eval, 4)
        for key, name in (("rewards/margins", "margin"), ("rewards/accuracies", "accuracy"),
                          ("eval_rewards/margins", "eval_margin"), ("eval_rewards/accuracies", "eval_accuracy")):
            if logs.get(key) is not None:  # a preference run's live reward margin and accuracy
                rec[name] = round(float(logs[key]), 4)
        if torch.cuda.is_available():  # peaks: what tensors held, and what the allocator took from the card
            rec["gpu_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            rec["gpu_reserved_gb"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
        self.write(rec)
        self.run.set_state(step=step, total=total)


def cap_gpu_memory() -> None:
    """Hold this process to TANDEM_GPU_MEMORY_GB of the card, as a smaller card would (bench/train_memory.py
    checks the profiles fit a 24 GB card on a larger one), or to share a card with other work."""
    import torch

    from engine.startup import gpu_memory_cap_gb

    cap = gpu_memory_cap_gb() or 0
    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    if 0 < cap < total:
        torch.cuda.set_per_process_memory_fraction(cap / total)


def _load(settings: Settings, profile: Profile):
    from engine.startup import use_compile_caches

    use_compile_caches()  # the first step's compile is cached for the next run
    import torch
    from unsloth import FastLanguageModel

    from engine.serve.model import base_identity, resolve_model_name

    name, is_demo = resolve_model_name(settings, lambda *_: None)
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        cap_gpu_memory()
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=name, max_seq_length=profile.max_seq_length, load_in_4bit=settings.model.load_in_4bit and on_gpu,
        dtype=None if on_gpu else torch.float32,
    )
    return model, tokenizer, base_identity(name, is_demo), on_gpu


def _peft(model: Any, profile: Profile, from_adapter: Path | None, seed: int, modules: list[str],
          params: list[str]):
    from unsloth import FastLanguageModel

    if from_adapter is not None:
        from peft import PeftModel

        return PeftModel.from_pretrained(model, str(from_adapter), is_trainable=True)
    return FastLanguageModel.get_peft_model(
        model, r=profile.rank, lora_alpha=profile.alpha, lora_dropout=0.0, use_rslora=True,
        target_modules=modules, target_parameters=params or None,
        use_gradient_checkpointing="unsloth", random_state=seed,
    )


def _common_config(profile: Profile, output_dir: Path, on_gpu: bool, seed: int, keep: int,
                   with_eval: bool) -> dict[str, Any]:
    """The recipe's schedule, batch, optimizer and saving, shared by the SFT and DPO configs."""
    return dict(
        output_dir=str(output_dir),
        max_steps=profile.max_steps,
        per_device_train_batch_size=profile.batch_size,
        gradient_accumulation_steps=profile.grad_accum,
        learning_rate=profile.learning_rate,
        warmup_steps=profile.warmup_steps,
        lr_scheduler_type=profile.scheduler,
        optim="adamw_8bit" if on_gpu else "adamw_torch",
        weight_decay=0.01,
        seed=seed,
        logging_steps=profile.logging_steps,
        save_steps=profile.save_steps,
        save_total_limit=keep,
        eval_strategy="steps" if with_eval else "no",
        eval_steps=profile.save_steps if with_eval else None,
        per_device_eval_batch_size=profile.batch_size,
        max_length=profile.max_seq_length,
        report_to="none",
        use_cpu=not on_gpu,
        dataloader_num_workers=0,
        dataset_num_proc=1,
        bf16=on_gpu,
        disable_tqdm=True,
    )


def sft_config(profile: Profile, output_dir: Path, on_gpu: bool, seed: int, keep: int = 2, with_eval: bool = False):
    """The recipe's TRL settings, shared with bench/train_bench.py so the benchmark measures this recipe."""
    from trl import SFTConfig

    return SFTConfig(**_common_config(profile, output_dir, on_gpu, seed, keep, with_eval),
                     train_sampling_strategy="group_by_length", completion_only_loss=True, packing=False)


def dpo_config(profile: Profile, output_dir: Path, on_gpu: bool, seed: int, keep: int = 2,
               with_eval: bool = False):
    """The preference recipe's TRL settings: the SFT recipe's schedule and batch, DPO's loss with `beta`. A
    long pair was already fitted by dropping its oldest turns (`Pair.encode`), so the replies stay whole."""
    from trl import DPOConfig

    return DPOConfig(**_common_config(profile, output_dir, on_gpu, seed, keep, with_eval), beta=profile.beta,
                     precompute_ref_log_probs=False)


def evaluate_loss(trainer: Any, rows: list[dict[str, str]]) -> float:
    """Mean completion-token loss of the current model on `rows` (for the promotion gate)."""
    ds = trainer._prepare_dataset(tokenized(rows, trainer.processing_class), trainer.processing_class, trainer.args,
                                  packing=False, formatting_func=None, dataset_name="gate")
    return float(trainer.evaluate(eval_dataset=ds, metric_key_prefix="gate")["gate_loss"])


def preference_trainer(**kwargs: Any):
    """TRL's DPOTrainer (unsloth-patched where unsloth offers the patch, i.e. on a GPU) fed pairs that
    `Pair.encode` already tokenized with the chat's renderer, so TRL's own tokenization is skipped."""
    import unsloth
    from trl import DPOTrainer

    getattr(unsloth, "PatchDPOTrainer", lambda: None)()  # the CPU fallback has no patch: plain TRL, as SFT

    class PreferenceTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset  # prompt_ids / chosen_ids / rejected_ids, rendered as served

    return PreferenceTrainer(**kwargs)


def peak_memory_gb() -> float:
    """The most memory this run held: GPU tensors at their peak, else the process's peak RSS (CPU)."""
    import resource

    import torch

    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)  # KiB on Linux


def _gate_rows(req: Any, kind: type) -> list[dict[str, Any]]:
    """The promotion gate's held-out rows, read before any model is loaded: a held-out set that is
    missing or empty fails the run here, not after a full training run."""
    if not req.gate:
        return []
    loader = load_pairs if kind is Pair else load_examples
    try:
        return to_rows(loader(req.gate["holdout"]).examples)
    except DatasetError as e:
        raise DatasetError(f"the promotion gate's held-out set: {e}") from None


def train(run: Run) -> None:
    req = run.request
    settings = load(req.settings)
    profile = run_profile(settings, req)
    kind = Pair if profile.method == "dpo" else Example
    if kind is Pair and not req.from_adapter:
        raise DatasetError("a preference (dpo) run improves a specialist: name it with --from ADAPTER")
    loader = load_pairs if kind is Pair else load_examples
    report = loader(req.data, limit=profile.max_samples)  # raises before the GPU is touched
    holdout = _gate_rows(req, kind)
    train_ex, eval_ex = split(report.examples, settings.training.eval_fraction, settings.training.seed)
    (run.dir / "data.json").write_text(json.dumps({"summary": report.summary(), "train": len(train_ex),
                                                   "eval": len(eval_ex), "skipped": dict(report.skipped),
                                                   "fingerprint": report.fingerprint(), "held_out": len(holdout)}))
    print(f"data: {report.summary()}; train {len(train_ex)}, eval {len(eval_ex)}", flush=True)

    model, tokenizer, base_id, on_gpu = _load(settings, profile)
    store = AdapterStore(settings.adapters_dir)
    parent = store.get(req.from_adapter).path if req.from_adapter else None
    from engine.train.targets import count_adapted, lora_targets

    modules, params = lora_targets(model)  # before PEFT wraps (and renames) the expert parameters
    model = _peft(model, profile, parent, settings.training.seed, modules, params)
    adapted = count_adapted(model)
    print(f"trainable LoRA parameters: {adapted}", flush=True)

    train_rows, eval_rows = to_rows(train_ex), to_rows(eval_ex)
    train_ds = tokenized(train_rows, tokenizer, profile.max_seq_length, kind)
    eval_ds = tokenized(eval_rows, tokenizer, profile.max_seq_length, kind) if eval_rows else None
    tokens_per_sample = sum(map(_tokens, train_ds)) / max(1, len(train_ds))
    metrics = _Metrics(run, settings, profile, tokens_per_sample)
    make_config, make_trainer = (dpo_config, preference_trainer) if kind is Pair else (sft_config, _sft_trainer)
    config = make_config(profile, run.dir / "checkpoints", on_gpu, settings.training.seed,
                         keep=settings.training.keep_checkpoints, with_eval=bool(eval_rows))
    trainer = make_trainer(model=model, args=config, processing_class=tokenizer, train_dataset=train_ds,
                           eval_dataset=eval_ds, callbacks=[metrics.callback()])
    resume = str(run.checkpoints[-1]) if run.state.resume and run.checkpoints else None
    if resume:
        print(f"resuming from {resume}", flush=True)
    trainer.train(resume_from_checkpoint=resume)

    if run.stop_requested:  # the callback asked the trainer to save a checkpoint at this step
        run.set_state(status="stopped", ended=time.time(), outcome=f"stopped at step {trainer.state.global_step}")
        return

    if kind is Pair:
        eval_loss = float(trainer.evaluate(eval_dataset=eval_ds)["eval_loss"]) if eval_rows else None
    else:
        eval_loss = evaluate_loss(trainer, eval_rows) if eval_rows else None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    model_dir = settings.models_dir / f"{model_folder_stem(base_id)}_{req.profile}_{profile.scheduler}" \
        f"_r{profile.rank}_{stamp}_{run.id[-4:]}"
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    # before the gate: what is published is what was trained (a preference run's frozen "ref" copy is not)
    trainer.model.save_pretrained(str(model_dir), selected_adapters=["default"])
    gate = _preference_gate(trainer, req, store, holdout, profile) if kind is Pair else \
        _gate(trainer, req, store, holdout)
    summary = {"final_loss": metrics.last_loss, "best_loss": metrics.best_loss, "eval_loss": eval_loss,
               "steps": trainer.state.global_step, "seconds": round(time.monotonic() - metrics.started, 1),
               "peak_mem_gb": peak_memory_gb(), "gate": gate}
    info = {"run_id": run.id, "request": asdict(req), "profile": asdict(profile), "base_model": base_id,
            "data": json.loads((run.dir / "data.json").read_text()), "metrics": summary, "adapted": adapted}
    (model_dir / "training_info.json").write_text(json.dumps(info, indent=1, ensure_ascii=False))
    (run.dir / "result.json").write_text(json.dumps(summary))  # what an experiment compares
    latest = settings.models_dir / "latest"
    tmp_link = settings.models_dir / f".latest-{os.getpid()}"
    tmp_link.symlink_to(model_dir.name)
    os.replace(tmp_link, latest)

    name = req.name or req.task
    what = "preferences" if kind is Pair else "replies"
    manifest = Manifest(
        name=name, task=req.task, base_model=base_id, description=f"trained on {what} in {Path(req.data).name}",
        lora={"rank": profile.rank, "alpha": profile.alpha, "rslora": True, "target_modules": modules,
              "target_parameters": params},
        adapted=adapted, profile=req.profile, dataset_fingerprint=info["data"]["fingerprint"],
        final_loss=metrics.last_loss, best_loss=metrics.best_loss, eval_loss=eval_loss,
        prompts=[ex.user_prompt for ex in report.examples][:MAX_ROUTER_PROMPTS], run_id=run.id,
    )
    if req.gate.get("experiment"):  # a variant: scored now, the experiment promotes the best of them
        (run.dir / "candidate.json").write_text(json.dumps(asdict(manifest), ensure_ascii=False))
        run.set_state(status="finished", ended=time.time(), model_dir=str(model_dir),
                      outcome=f"scored for experiment {req.gate['experiment']}: {gate['reason']}")
    elif gate.get("promote", True):
        store.publish(model_dir, manifest)
        outcome = f"published as {name}" + (f" ({gate['reason']})" if gate.get("reason") else "")
        run.set_state(status="finished", ended=time.time(), adapter=name, model_dir=str(model_dir), outcome=outcome)
    else:
        run.set_state(status="finished", ended=time.time(), model_dir=str(model_dir),
                      outcome=f"kept as candidate in {model_dir.name}: {gate['reason']}")
    print(run.state.outcome, flush=True)


def _tokens(row: dict[str, list[int]]) -> int:
    """Tokens a step runs through for one row: a pair's prompt goes through twice (chosen, rejected)."""
    if "prompt_ids" in row:
        return 2 * len(row["prompt_ids"]) + len(row["chosen_ids"]) + len(row["rejected_ids"])
    return len(row["input_ids"])


def _sft_trainer(**kwargs: Any):
    from trl import SFTTrainer

    return SFTTrainer(**kwargs)


def _preference_gate(trainer: Any, req: Any, store: AdapterStore, holdout: list[dict[str, Any]],
                     profile: Profile) -> dict[str, Any]:
    """Preference gate: win rate and reward margin of the new weights over the current specialist on the
    held-out pairs (`engine.train.preference.judge`)."""
    if not req.gate:
        return {}
    rows = [Pair.from_row(r).encode(trainer.processing_class, profile.max_seq_length) for r in holdout]
    model = trainer.model
    new = sequence_logps(model, rows)
    current = req.gate.get("current")
    if not current:
        return judge(new, None, profile.beta)
    with _current_adapter(model, store, current):
        old = sequence_logps(model, rows)
    return judge(new, old, profile.beta)


@contextlib.contextmanager
def _current_adapter(model: Any, store: AdapterStore, current: str) -> Iterator[None]:
    """The current version loaded beside the new weights as its own adapter, active for the block: the new
    weights are never overwritten (and were saved before this anyway)."""
    model.load_adapter(str(store.get(current).path), adapter_name=GATE_ADAPTER, is_trainable=False)
    try:
        model.set_adapter(GATE_ADAPTER)
        yield
    finally:
        model.set_adapter("default")
        model.delete_adapter(GATE_ADAPTER)


def _gate(trainer: Any, req: Any, store: AdapterStore, holdout: list[dict[str, Any]]) -> dict[str, Any]:
    """Promotion gate: the new adapter must beat the current one on the user's held-out examples."""
    if not req.gate:
        return {}
    new_loss = evaluate_loss(trainer, holdout)
    current = req.gate.get("current")
    if not current:
        return {"promote": True, "new_loss": new_loss, "reason": f"first version, held-out loss {new_loss:.4f}"}
    with _current_adapter(trainer.model, store, current):
        old_loss = evaluate_loss(trainer, holdout)
    promote = new_loss < old_loss - MIN_IMPROVEMENT
    verb = "beats" if promote else "does not beat"
    return {"promote": promote, "new_loss": new_loss, "old_loss": old_loss,
            "reason": f"held-out loss {new_loss:.4f} {verb} current {old_loss:.4f}"}


def main(run_dir: str) -> int:
    run = Run(Path(run_dir))
    signal.signal(signal.SIGTERM, lambda *_: (run.dir / "stop").touch())  # graceful: finish the step, save
    queue = None
    try:
        queue = RunQueue(load(run.request.settings))
        train(run)
        return 0
    except DatasetError as e:
        run.set_state(status="failed", ended=time.time(), error=f"data: {e}")
    except Exception as e:
        text = f"{type(e).__name__}: {e}"
        if "out of memory" in text.lower():
            text = oom_hint(run.request.profile, load(run.request.settings).profile(run.request.profile))
        run.set_state(status="failed", ended=time.time(), error=text)
        traceback.print_exc()
    finally:
        if queue is not None:
            queue.start_next(run.request.gpu)  # hand the GPU to the next queued run
            _conclude_experiment(run, queue.settings)
    return 1


def _conclude_experiment(run: Run, settings: Settings) -> None:
    """The last variant of an experiment to end decides it (`Experiments.conclude` does it only once)."""
    exp_id = run.request.gate.get("experiment")
    if isinstance(exp_id, str) and exp_id:
        from engine.train.experiments import ExperimentError, Experiments

        try:
            print(Experiments(settings).conclude(exp_id).outcome or "experiment still running", flush=True)
        except (ExperimentError, ValueError, OSError) as e:
            print(f"experiment {exp_id}: {e}", flush=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
