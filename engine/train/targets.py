"""LoRA targets for GPT-OSS: which modules and parameters a specialist adapts.

GPT-OSS experts come in two layouts: fused 3-D parameters (`mlp.experts.gate_up_proj`, transformers'
bf16 model) which PEFT adapts through `target_parameters`, and one Linear per expert (unsloth's 4-bit
checkpoints) which plain `target_modules` reach. `lora_targets` looks at the model and picks, so an
adapter always covers the experts, not only attention. The fast decoder reads the same names to know
what an adapter may adapt.
"""

from __future__ import annotations

from typing import Any

from engine.store.adapter_format import FUSED_EXPERTS  # the store reads adapters by the same names

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def lora_targets(model: Any) -> tuple[list[str], list[str]]:
    """(target_modules, target_parameters) covering attention and every expert of `model`."""
    params = {name for name, _ in model.named_parameters()}
    if any(p.endswith(FUSED_EXPERTS[0]) for p in params):
        return list(ATTENTION), list(FUSED_EXPERTS)
    leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    per_expert = [m for m in ("gate_up_proj", "gate_proj", "up_proj", "down_proj") if m in leaves]
    return ATTENTION + per_expert, []


def count_adapted(model: Any) -> dict[str, int]:
    """Trainable LoRA parameters split into attention and experts (for the manifest)."""
    out = {"attention": 0, "experts": 0, "other": 0}
    for name, p in model.named_parameters():
        if not p.requires_grad or "lora_" not in name:
            continue
        key = "attention" if ".self_attn." in name else "experts" if ".experts" in name else "other"
        out[key] += p.numel()
    out["total"] = sum(out.values())
    return out
