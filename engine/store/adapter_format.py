"""Reading a PEFT LoRA folder for GPT-OSS the one way Tandem serves it, and checking it against the base.

Two things vary between the adapters unsloth and PEFT have written for GPT-OSS's fused experts:
- **lora_B's column order** (the expert axis). PEFT packs the [out, r * experts] factor rank-major (column
  j * experts + e); unsloth-zoo before 2026.9.6 packed it grouped by expert (column e * r + j). unsloth
  records which in adapter_config.json: the flat key `lora_B_layout`, a nested per-parameter entry under
  `unsloth_fused_expert_lora.parameters.<param>.lora_B_layout`, either of them possibly copied into
  `auto_mapping`; older saves carry no marker but can be told by `auto_mapping.unsloth_fixed` beside fused
  expert targets. Tandem serves rank-major only: an import converts (a column permutation) and rewrites
  the config to say `rank_major`; `mixed` or unknown values are refused.
- **which expert weights are adapted.** PEFT keeps one nesting of its wrappers per model, so adapters
  that adapt different subsets of the experts' weights cannot sit on one model side by side. An adapter
  of one expert weight is served with exact zero factors for the other (`complete_experts`).

`check` validates a folder against the base model's config before it enters the store: complete
safetensors, every tensor PEFT expects for that config and base (no missing A/B, no strays), shapes that
match, a sane rank and target modules that exist.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from engine.store.adapters import AdapterError
from engine.train.targets import FUSED_EXPERTS

LAYOUT_KEY = "lora_B_layout"
DETAIL_KEY = "unsloth_fused_expert_lora"
RANK_MAJOR, GROUPED = "rank_major", "grouped_by_expert"
LAYOUTS = (RANK_MAJOR, GROUPED)
PARAMS = tuple(p.rsplit(".", 1)[1] for p in FUSED_EXPERTS)  # gate_up_proj, down_proj: PEFT nests them in this order
MAX_RANK = 1024


def expert_layouts(config: dict) -> dict[str, str]:
    """{expert parameter: lora_B layout} as the adapter's config declares it (rank_major when it says
    nothing and is not a marker-less unsloth save). Raises AdapterError on `mixed` or unknown values."""
    mapping = config.get("auto_mapping")
    mapping = mapping if isinstance(mapping, dict) else {}
    for where, source in (("", config), ("auto_mapping.", mapping)):
        detail = source.get(DETAIL_KEY)
        if isinstance(detail, dict) and isinstance(detail.get("parameters"), dict):
            out = {}
            for param, entry in detail["parameters"].items():
                layout = entry.get(LAYOUT_KEY) if isinstance(entry, dict) else entry
                key = f"{where}{DETAIL_KEY}.parameters.{param}.{LAYOUT_KEY}"
                out[str(param)] = _layout(layout, key)
            return out
        if LAYOUT_KEY in source:
            layout = _layout(source[LAYOUT_KEY], where + LAYOUT_KEY)
            return dict.fromkeys(PARAMS, layout)
    if config.get("target_parameters") and mapping.get("unsloth_fixed"):
        return dict.fromkeys(PARAMS, GROUPED)  # an unsloth save from before the marker: grouped by expert
    return dict.fromkeys(PARAMS, RANK_MAJOR)


def _layout(value: Any, key: str) -> str:
    if value not in LAYOUTS:
        raise AdapterError(f"adapter_config.json: {key} = {value!r}; Tandem reads {' or '.join(LAYOUTS)} "
                           "(re-save the adapter with one layout for every expert weight)")
    return value


def to_rank_major(b: Any, num_experts: int) -> Any:
    """A grouped-by-expert lora_B [out, experts * r] (column e * r + j) in PEFT's rank-major order
    (column j * experts + e)."""
    out, width = b.shape
    return b.reshape(out, num_experts, width // num_experts).transpose(1, 2).reshape(out, width).contiguous()


def expert_param(key: str, config: dict) -> str | None:
    """Which expert weight a PEFT state-dict key belongs to: PEFT nests one wrapper per targeted weight,
    the first of PARAMS innermost, so the depth of `base_layer.` after `experts.` tells them apart."""
    if ".mlp.experts." not in key or "lora_" not in key:
        return None
    listed = [str(t) for t in config.get("target_parameters") or []]
    targeted = [p for p in PARAMS if any(t.endswith(f"experts.{p}") for t in listed)]
    depth = key.split(".mlp.experts.", 1)[1].count("base_layer.")
    return targeted[len(targeted) - 1 - depth] if depth < len(targeted) else None


def rank_major_state(state: dict, config: dict, num_experts: int) -> tuple[dict, int]:
    """`state` with every grouped-by-expert lora_B permuted to rank-major; and how many were."""
    layouts = expert_layouts(config)
    out, moved = dict(state), 0
    for key, t in state.items():
        param = expert_param(key, config)
        if param and ".lora_B." in key and layouts.get(param, RANK_MAJOR) == GROUPED:
            out[key] = to_rank_major(t, num_experts)
            moved += 1
    return out, moved


def rank_major_config(config: dict) -> dict:
    """The config of a converted adapter: every marker says rank_major."""
    config = json.loads(json.dumps(config))
    for source in (config, config.get("auto_mapping") if isinstance(config.get("auto_mapping"), dict) else {}):
        detail = source.get(DETAIL_KEY)
        if isinstance(detail, dict) and isinstance(detail.get("parameters"), dict):
            for entry in detail["parameters"].values():
                if isinstance(entry, dict):
                    entry[LAYOUT_KEY] = RANK_MAJOR
            detail[LAYOUT_KEY] = RANK_MAJOR
        if LAYOUT_KEY in source:
            source[LAYOUT_KEY] = RANK_MAJOR
    if config.get("target_parameters"):
        config[LAYOUT_KEY] = RANK_MAJOR
    return config


def complete_experts(config: Any, state: dict) -> tuple[Any, dict]:
    """A LoraConfig and state that adapt one of the two expert weights, extended to both with exact zero
    factors for the other (PEFT serves adapters with different expert targets only one at a time)."""
    import torch

    targets = [t for t in (config.target_parameters or []) if str(t).endswith(PARAMS)]
    present = [p for p in PARAMS if any(str(t).endswith(f"experts.{p}") for t in targets)]
    if len(present) != 1:
        return config, state
    inner = present[0] == PARAMS[0]  # gate_up sits under down's wrapper once both are targeted
    out = {}
    for key, t in state.items():
        if ".mlp.experts." not in key or "lora_" not in key:
            out[key] = t
            continue
        head, tail = key.split(".mlp.experts.", 1)
        out[f"{head}.mlp.experts.{'base_layer.' if inner else ''}{tail}"] = t
        if ".lora_A." not in key:
            continue
        b = state[key.replace(".lora_A.", ".lora_B.")]
        # gate_up maps hidden -> 2 * intermediate, down intermediate -> hidden
        other_in, other_out = (b.shape[0] // 2, t.shape[1]) if inner else (b.shape[0], 2 * t.shape[1])
        other = f"{head}.mlp.experts.{'' if inner else 'base_layer.'}{tail}"
        out[other] = torch.zeros(t.shape[0], other_in, dtype=t.dtype, device=t.device)
        out[other.replace(".lora_A.", ".lora_B.")] = torch.zeros(other_out, t.shape[0], dtype=t.dtype, device=t.device)
    config.target_parameters = list(FUSED_EXPERTS) + [t for t in config.target_parameters if t not in targets]
    return config, out


def read_weights(folder: Path, device: str, num_experts: int) -> tuple[Any, dict]:
    """(LoraConfig, state) of a PEFT folder as Tandem serves it: lora_B rank-major whatever layout the
    config declares, both expert weights adapted when either is. The server and the promotion gate both
    read adapters here, so they score and serve the same weights."""
    from peft import LoraConfig

    raw = read_config(folder)
    config = LoraConfig.from_pretrained(str(folder))
    state = load_state(folder, device)
    state, _ = rank_major_state(state, raw, num_experts)
    return complete_experts(config, state)


def read_config(folder: Path) -> dict:
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
    except (OSError, ValueError) as e:
        raise AdapterError(f"adapter_config.json: cannot read it ({e})") from None
    if not isinstance(config, dict):
        raise AdapterError("adapter_config.json must be a JSON object")
    return config


def load_state(folder: Path, device: str = "cpu") -> dict:
    """Every tensor of the folder's weights (a truncated or corrupt file is an AdapterError)."""
    from engine.store.adapters import WEIGHT_FILES

    path = next((folder / f for f in WEIGHT_FILES if (folder / f).is_file()), None)
    if path is None:
        raise AdapterError("missing adapter_model.safetensors (weights)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device=device)
        import torch

        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise AdapterError(f"{path.name}: unreadable or incomplete ({type(e).__name__}: {e})"[:300]) from None
