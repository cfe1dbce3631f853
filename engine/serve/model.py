"""Loading the base model through unsloth, on the inference GPU or unsloth's CPU fallback.

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

from engine.settings import Settings

Progress = Callable[[str, float], None]


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
            raise ModelLoadError(
                f"model.name = {name!r}: {local} has no config.json. Point [model] name in {settings.source} "
                "at a folder with a Hugging Face model (config.json + weights), a hub id such as "
                "'unsloth/gpt-oss-20b-unsloth-bnb-4bit', or leave it empty for the embedded demo model."
            )
        return str(local), False
    return name, False


def base_identity(name: str, is_demo: bool) -> str:
    """What adapters are checked against: the demo build's folder name, or the configured model."""
    return f"demo:{Path(name).name}" if is_demo else name


def load_model(settings: Settings, progress: Progress | None = None) -> LoadedModel:
    """Load the configured base model (or the demo model) ready for generation."""
    say = progress or (lambda _m, _f: None)
    started = time.monotonic()
    pin_gpu(settings.gpus.inference)  # whoever loads the model (the app's worker too) sees one GPU
    from engine.startup import use_compile_caches

    use_compile_caches()
    say("importing unsloth and torch", 0.05)
    with contextlib.redirect_stdout(sys.stderr):  # unsloth prints banners; stdout belongs to --json
        import unsloth  # noqa: F401  (first, so it can patch transformers before the demo build imports it)
    name, is_demo = resolve_model_name(settings, say)
    import torch
    from transformers import AutoConfig, AutoTokenizer
    from unsloth import FastLanguageModel

    from engine.serve import mxfp4_load

    on_gpu = torch.cuda.is_available()
    dtype = (_dtype(settings.model.dtype) or torch.bfloat16) if on_gpu else torch.float32
    try:
        gpu_bytes = torch.cuda.get_device_properties(0).total_memory if on_gpu else None
        quant = mxfp4_load.serve_quant(settings.model.serve_in_4bit, AutoConfig.from_pretrained(name), gpu_bytes)
        held = quant if quant != "bf16" else str(dtype).removeprefix("torch.")  # what the banner will say too
        say(f"loading {name} ({held}) on {'GPU' if on_gpu else 'CPU'}", 0.3)
        with contextlib.redirect_stdout(sys.stderr):
            if quant == "mxfp4":  # experts stay 4-bit on the device (engine/serve/mxfp4_load.py)
                folder = mxfp4_load.local_folder(name)
                model = mxfp4_load.load(folder, "cuda" if on_gpu else "cpu", dtype)
                tokenizer = AutoTokenizer.from_pretrained(folder)
            else:
                model, tokenizer = FastLanguageModel.from_pretrained(
                    model_name=name,
                    max_seq_length=settings.model.max_seq_length,
                    load_in_4bit=quant == "bnb-4bit",
                    dtype=_dtype(settings.model.dtype) if on_gpu else torch.float32,
                )
    except Exception as e:  # hub, disk and config errors all end here; say how to fix it
        raise ModelLoadError(
            f"could not load model {name!r}: {type(e).__name__}: {e}\n"
            f"Set [model] name in {settings.source} to a local model folder or a reachable hub id, "
            "or leave it empty to use the embedded demo model."
        ) from e
    model.eval()
    device = str(next(model.parameters()).device)
    lm = LoadedModel(model, tokenizer, name, device, is_demo, time.monotonic() - started,
                     settings.model.max_seq_length, quant=quant)
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
    fast = FastDecoder(lm.model, max_len=lm.max_len)
    fast.warm_up()
    return fast, fast.note
