"""Loading the base model on the inference GPU (or the CPU): the checkpoint fetched if needed, the
precision chosen from the memory this process can use, unsloth imported only when its 4-bit layout is.

`pin_gpu` must run before torch is imported (the CLI and the app do it first thing): it makes the
configured GPU the only one this process sees, so device 0 below always means the right card.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.serve import checkpoint_template
from engine.serve.checkpoint_template import Check
from engine.settings import Settings

Progress = Callable[[str, float], None]
DOWNLOAD_AT = 0.1  # the load's progress fraction while the checkpoint downloads


class ModelLoadError(RuntimeError):
    """The configured model could not be loaded; the message says how to fix settings.toml."""


def pin_gpu(index: int) -> None:
    """Expose only GPU `index` (numbered as NVML and the GPU panels number them) to this process: with
    two visible, a library's device scan puts a ~500 MB CUDA context on the training GPU. A no-op once
    torch is imported (too late), or when CUDA_VISIBLE_DEVICES already leaves `index` out (the user's choice)."""
    if "torch" in sys.modules:
        return
    # Expandable segments keep the allocator from fragmenting: without them a 24 GB card serving MXFP4
    # with three specialists and an 8k context reserved 23.9 GB for 17.5 GB allocated (bench/RESULTS.md).
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    chosen = os.environ.get("CUDA_VISIBLE_DEVICES")
    if chosen is None or str(index) in chosen.split(","):
        os.environ["CUDA_VISIBLE_DEVICES"] = str(index)
        os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")  # CUDA's own order may differ from NVML's


@dataclass(frozen=True)
class LoadedModel:
    """What was loaded: the base model as loaded (before PEFT wraps it) and how. Only the inference
    worker uses `model`."""

    model: Any
    tokenizer: Any
    name: str
    device: str
    is_demo: bool
    load_seconds: float
    max_len: int  # tokens the context holds (model.max_seq_length)
    quant: str = "bf16"  # how the weights are served: "bf16" (or fp32 on CPU), "mxfp4" experts, "bnb-4bit"
    quant_reason: str = ""  # why (engine/serve/gpu_memory.py), shown in the load line and the log
    folder: Path | None = None  # the checkpoint's local folder (its chat_template.jinja, config.json)
    renderer: str = "tandem"  # who renders chat prompts (model.chat_template): "tandem" or "checkpoint"
    template: Check | None = None  # the checkpoint's chat template against Tandem's renderer

    @property
    def template_note(self) -> str:
        """A few words for the header when the chat template needs a look; empty when all is as expected."""
        status = self.template.status if self.template is not None else "none"
        if self.renderer == "checkpoint":
            return "checkpoint's chat template" + (" (differs from Tandem's: log)" if status == "differs" else "")
        if status in ("differs", "failed"):
            return f"checkpoint's chat template {'differs' if status == 'differs' else 'fails'}: Tandem's used (log)"
        return ""

    @property
    def num_experts(self) -> int:
        return int(getattr(self.model.config, "num_local_experts", 0))


def _dtype(name: str):
    import torch

    return None if name == "auto" else getattr(torch, name)


def resolve_model_name(settings: Settings, progress: Progress) -> tuple[str, bool]:
    """(model id or folder, is_demo). Local paths are resolved against the settings file."""
    name = settings.model.name.strip()
    if not name:
        from engine.serve.demo_model import demo_model_path

        return str(demo_model_path(progress)), True
    local = Path(name).expanduser()
    if not local.is_absolute():
        local = settings.root / local
    looks_local = name.startswith((".", "/", "~")) or local.exists()
    if looks_local:
        if not (local / "config.json").exists():
            if (local / "adapter_config.json").exists():
                raise ModelLoadError(adapter_folder_message(name, local, settings))
            raise ModelLoadError(
                f"model.name = {name!r}: {local} has no config.json. Point [model] name in {settings.source} "
                "at a folder with a Hugging Face model (config.json + weights), a hub id such as "
                "'unsloth/gpt-oss-20b-unsloth-bnb-4bit', or leave it empty for the embedded demo model."
            )
        return str(local), False
    return name, False


def adapter_folder_message(name: str, folder: Path, settings: Settings) -> str:
    """What to say when [model] name is a LoRA adapter (adapter_config.json, no config.json): its base, and
    the command that adds it to the specialist store."""
    import json
    import shlex

    try:
        base = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        base = None
    named = isinstance(base, str) and base.strip()
    base_text = f"{base!r}" if named else "a base model adapter_config.json does not name"
    return (
        f"model.name = {name!r}: {folder} is a LoRA adapter (adapter_config.json, no config.json or model "
        f"weights), trained on {base_text}. Set [model] name in {settings.source} to that base model, then "
        f"add the adapter as a specialist: tandem adapters import {shlex.quote(str(folder))}"
    )


def base_identity(name: str, is_demo: bool) -> str:
    """What adapters are checked against: the demo build's folder name, or the configured model."""
    return f"demo:{Path(name).name}" if is_demo else name


def checkpoint_folder(settings: Settings, name: str, is_demo: bool, say: Progress) -> Path:
    """The local folder the model loads from: the demo build, the configured folder, or the served files of
    a hub id (from the hub cache, or downloaded: engine/serve/download.py)."""
    from engine.serve import download

    if is_demo or Path(name).is_dir():
        return Path(name)
    try:
        folder = download.fetch(name, say, fraction=DOWNLOAD_AT)
    except download.DownloadError as e:
        raise ModelLoadError(f"model.name = {name!r}: {e}") from None
    if not (folder / "config.json").exists() and (folder / "adapter_config.json").exists():
        raise ModelLoadError(adapter_folder_message(name, folder, settings))
    return folder


def needs_unsloth(settings: Settings, folder: Path, on_gpu: bool) -> bool:
    """Whether serving this checkpoint may go through unsloth: a bitsandbytes 4-bit checkpoint (its experts
    are unsloth's per-expert layout), or a model other than GPT-OSS asked to (or, with "auto", maybe to)
    serve in 4-bit on a GPU. Decided from config.json alone, before transformers is imported, since unsloth
    patches transformers at import and asks to come first. Importing it costs ~25 s of a 36 s start."""
    import json

    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False  # AutoConfig will say what is wrong with it
    if not isinstance(config, dict):
        return False
    qc = config.get("quantization_config")
    if isinstance(qc, dict) and qc.get("quant_method") == "bitsandbytes":
        return True
    return config.get("model_type") != "gpt_oss" and on_gpu and settings.model.serve_in_4bit is not False


def load_model(settings: Settings, progress: Progress | None = None) -> LoadedModel:
    """Load the configured base model (or the demo model) ready for generation."""
    say = progress or (lambda _m, _f: None)
    started = time.monotonic()
    pin_gpu(settings.gpus.inference)  # whoever loads the model (the app's worker too) sees one GPU
    from engine.startup import use_compile_caches

    use_compile_caches()
    say("importing torch", 0.05)
    import torch

    name, is_demo = resolve_model_name(settings, say)
    folder = checkpoint_folder(settings, name, is_demo, say)
    on_gpu = torch.cuda.is_available()
    if needs_unsloth(settings, folder, on_gpu):
        say("importing unsloth (bitsandbytes 4-bit goes through it)", 0.28)
        with contextlib.redirect_stdout(sys.stderr):  # unsloth prints banners; stdout belongs to --json
            import unsloth  # noqa: F401  (before transformers, as it asks)
    from transformers import AutoConfig, AutoTokenizer

    from engine.serve import gpu_memory, mxfp4_load

    dtype = (_dtype(settings.model.dtype) or torch.bfloat16) if on_gpu else torch.float32
    try:
        use = gpu_memory.usable(settings.gpus.inference) if on_gpu else None
        quant, why = gpu_memory.choose(settings.model.serve_in_4bit, AutoConfig.from_pretrained(folder), use)
        held = quant if quant != "bf16" else str(dtype).removeprefix("torch.")  # what the banner will say too
        say(f"loading {name} ({held}: {why}) on {'GPU' if on_gpu else 'CPU'}", 0.3)
        with contextlib.redirect_stdout(sys.stderr):
            if quant == "mxfp4":  # experts stay 4-bit on the device (engine/serve/mxfp4_load.py)
                model = mxfp4_load.load(folder, "cuda" if on_gpu else "cpu", dtype)
            elif quant == "bnb-4bit":
                from unsloth import FastLanguageModel

                model, tokenizer = FastLanguageModel.from_pretrained(
                    model_name=name, max_seq_length=settings.model.max_seq_length, load_in_4bit=True,
                    dtype=_dtype(settings.model.dtype),
                )
            else:
                from transformers import AutoModelForCausalLM

                model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype,
                                                             device_map="cuda" if on_gpu else "cpu")
            if quant != "bnb-4bit":
                tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as e:  # hub, disk and config errors all end here; say how to fix it
        raise ModelLoadError(
            f"could not load model {name!r}: {type(e).__name__}: {e}\n"
            f"Set [model] name in {settings.source} to a local model folder or a reachable hub id, "
            "or leave it empty to use the embedded demo model."
        ) from e
    model.eval()
    template = checkpoint_template.check(tokenizer)
    renderer = settings.model.chat_template
    if renderer == "checkpoint" and template.status in ("none", "failed"):
        raise ModelLoadError(f"model.chat_template = 'checkpoint': {template.summary()}. Set it to 'tandem' in "
                             f"{settings.source}")
    device = str(next(model.parameters()).device)
    lm = LoadedModel(model, tokenizer, name, device, is_demo, time.monotonic() - started,
                     settings.model.max_seq_length, quant=quant, quant_reason=why, folder=folder,
                     renderer=renderer, template=template)
    say("model loaded", 0.8)
    return lm


def fast_decoder(lm: LoadedModel, settings: Settings) -> tuple[Any, str]:
    """(FastDecoder compiled and captured, "") when settings want it and the model suits it; else
    (None, why not)."""
    from engine.serve.fast_decode import FastDecoder, unsupported

    if not settings.model.fast_decode:
        return None, "model.fast_decode is off"
    reason = unsupported(lm.model)
    if reason:
        return None, reason
    fast = FastDecoder(lm.model, max_len=lm.max_len, lm_head_8bit=settings.model.lm_head_8bit)
    fast.warm_up()
    return fast, fast.note
