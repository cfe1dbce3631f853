"""Loading GPT-OSS for serving with its experts in MXFP4, straight from the checkpoint's tensors.

transformers' own MXFP4 path needs the `kernels` hub package (unreachable offline) and otherwise
dequantizes every expert to bf16 (~42 GB). Here the model is built on the meta device, its experts are
replaced by Mxfp4Experts on the device, and the checkpoint is read one tensor at a time: `*_blocks` and
`*_scales` are copied as they are (openai/gpt-oss-20b and unsloth/gpt-oss-20b ship them), bf16 experts
(unsloth/gpt-oss-20b-BF16) are quantized one expert at a time, everything else loads as it is.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from engine.serve.mxfp4 import install, quantize

FITS = 0.75  # "auto" serves bf16 only when its weights take at most this share of the GPU
EXPERT_KEY = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)(_blocks|_scales|_bias|)$")
MXFP4_CHECKPOINT = "unsloth/gpt-oss-20b"  # or openai/gpt-oss-20b: the same MXFP4 experts, ~13 GB


def checkpoint_format(config: Any) -> str:
    """"mxfp4", "bnb-4bit" or "bf16" (unquantized), from a config's quantization_config."""
    qc = getattr(config, "quantization_config", None) or {}
    method = (qc if isinstance(qc, dict) else qc.to_dict()).get("quant_method", "")
    return {"mxfp4": "mxfp4", "bitsandbytes": "bnb-4bit", "": "bf16"}.get(str(method), str(method))


def bf16_bytes(config: Any) -> int:
    """The model's size with every weight in bf16 (counted on the meta device)."""
    from transformers import AutoModelForCausalLM

    config = _without_quantization(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return 2 * sum(p.numel() for p in model.parameters())


def serve_quant(want: bool | str, config: Any, gpu_bytes: int | None) -> str:
    """How to serve: "mxfp4", "bf16" or "bnb-4bit". `want` is model.serve_in_4bit; `gpu_bytes` the
    inference GPU's memory (None: no GPU). "auto" picks 4-bit when bf16 weights would not fit the GPU
    (or, on the CPU, when the checkpoint is MXFP4 already: no reason to dequantize it)."""
    fmt = checkpoint_format(config)
    if fmt == "bnb-4bit":
        return fmt  # pre-quantized: it loads 4-bit whatever is asked
    if want == "auto":
        four = fmt == "mxfp4" if gpu_bytes is None else bf16_bytes(config) > FITS * gpu_bytes
    else:
        four = bool(want)
    if not four:
        return "bf16"
    if getattr(config, "model_type", "") == "gpt_oss":
        return "mxfp4"
    return "bnb-4bit" if gpu_bytes is not None else "bf16"  # other models: bitsandbytes, which needs a GPU


def local_folder(name: str) -> Path:
    """A local folder as is; a hub id through the local hub cache (downloaded if reachable)."""
    if Path(name).is_dir():
        return Path(name)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]))


def _without_quantization(config: Any) -> Any:
    import copy

    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


def load(folder: Path, device: str, dtype: torch.dtype) -> Any:
    """GptOssForCausalLM from `folder` with MXFP4 experts on `device`, the rest in `dtype`."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    config = _without_quantization(AutoConfig.from_pretrained(folder))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    experts = install(model, dtype, device)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{folder} has no .safetensors files")
    for file in files:
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            for key in f.keys():  # noqa: SIM118  (a safetensors handle is not iterable)
                _put(model, experts, key, f.get_tensor(key), dtype)
    rotary = model.model.rotary_emb  # its buffers are computed, not stored
    model.model.rotary_emb = type(rotary)(config, device=device)
    if config.tie_word_embeddings:
        model.tie_weights()
    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if missing:
        raise ValueError(f"{folder}: the checkpoint lacks {len(missing)} tensor(s), e.g. {missing[0]}")
    return model.eval()


def _put(model: Any, experts: list, key: str, t: torch.Tensor, dtype: torch.dtype) -> None:
    m = EXPERT_KEY.match(key)
    if m:
        ex, param, kind = experts[int(m.group(1))], m.group(2), m.group(3)
        if kind == "":  # a bf16 checkpoint's [experts, in, out]: quantize expert by expert
            for e in range(t.shape[0]):
                blocks, scales = quantize(t[e].T)
                getattr(ex, f"{param}_blocks")[e].copy_(blocks)
                getattr(ex, f"{param}_scales")[e].copy_(scales)
        else:
            target = getattr(ex, f"{param}{kind}")
            (target.data if kind == "_bias" else target).copy_(t.view(target.shape))
        return
    module_name, _, attr = key.rpartition(".")
    module = model.get_submodule(module_name)
    value = t.to(dtype) if t.is_floating_point() else t
    if attr in module._parameters:
        module._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)
    elif attr in module._buffers:
        module._buffers[attr] = value


