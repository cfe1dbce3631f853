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
import re
from pathlib import Path
from typing import Any

WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


class AdapterError(ValueError):
    """A bad adapter name or folder, with the reason (engine.store.adapters re-exports it)."""


FUSED_EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]  # GPT-OSS's fused expert weights (PEFT targets)
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


PER_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_projs|down_projs)\.(\d+)\.(lora_[AB])\.weight$")
EXPERT_ALIASES = {"gate_proj", "up_proj", "down_proj", "gate_up_proj", "gate_up_projs", "down_projs"}


def fuse_per_expert(config: dict, state: dict, num_experts: int) -> tuple[dict, dict]:
    """An adapter of unsloth's per-expert Linear experts (its bitsandbytes GPT-OSS checkpoints:
    `mlp.experts.gate_up_projs.<e>` / `down_projs.<e>`) as PEFT's fused-expert LoRA over the same weights:
    A rows e * r + j = A_e[j], B columns j * experts + e = B_e[:, j] (rank-major), which is the same
    delta per expert. The config then targets the fused parameters."""
    import torch

    groups: dict[tuple[str, str], dict[int, dict[str, Any]]] = {}
    out = {}
    for key, t in state.items():
        m = PER_EXPERT.match(key)
        if m is None:
            out[key] = t
            continue
        groups.setdefault((m.group(1), m.group(2)), {}).setdefault(int(m.group(3)), {})[m.group(4)] = t
    if not groups:
        return config, state
    kinds = sorted({kind for _, kind in groups}, key=lambda k: PARAMS.index(k[:-1]))
    for (head, kind), experts in groups.items():
        if sorted(experts) != list(range(num_experts)) or any(len(f) != 2 for f in experts.values()):
            raise AdapterError(f"{head}.{kind}: expected lora_A and lora_B for each of {num_experts} experts")
        a = torch.cat([experts[e]["lora_A"] for e in range(num_experts)], 0)
        b = torch.stack([experts[e]["lora_B"] for e in range(num_experts)], -1).flatten(1)  # [out, r, E]
        depth = "base_layer." * (len(kinds) - 1 - kinds.index(kind))  # the first of PARAMS innermost
        out[f"{head}.{depth}lora_A.weight"], out[f"{head}.{depth}lora_B.weight"] = a, b
    config = dict(config)
    modules = config.get("target_modules") or []
    if isinstance(modules, list):
        config["target_modules"] = [m for m in modules if m not in EXPERT_ALIASES]
    config["target_parameters"] = [f"mlp.experts.{k[:-1]}" for k in kinds]
    return config, out


def base_modules(base_config: Any) -> tuple[Any, set[str]]:
    """The base model on the meta device (no memory) and its module names' last parts."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    base_config = copy.deepcopy(base_config)
    if hasattr(base_config, "quantization_config"):
        del base_config.quantization_config  # served MXFP4 experts keep the fused weights' shapes for PEFT
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(base_config)
    return model, {n.rsplit(".", 1)[-1] for n, _ in model.named_modules() if n}


def expected_shapes(model: Any, folder: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor PEFT expects for the adapter config in `folder` on `model` (meta), with its shape."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    config = LoraConfig.from_pretrained(str(folder))
    try:
        peft = get_peft_model(model, config)
    except Exception as e:  # PEFT: target modules not found, unsupported layer…
        raise AdapterError(f"does not fit this base model: {str(e).splitlines()[0][:300]}") from None
    return {k: tuple(v.shape) for k, v in get_peft_model_state_dict(peft).items()}


def convert(source: Path, target: Path, base_config: Any) -> str:
    """Check the PEFT folder `source` against the base and write it to `target` as Tandem serves it
    (rank-major lora_B, fused experts, a config that says so). Returns what was converted ("" for
    nothing). Raises AdapterError with a one-line reason."""
    from safetensors.torch import save_file

    raw = read_config(source)
    if raw.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"adapter_config.json: peft_type {raw.get('peft_type')!r} is not LORA")
    hidden = int(base_config.hidden_size)
    pattern = raw.get("rank_pattern") or {}
    for key, rank in [("r", raw.get("r")), *((f"rank_pattern.{k}", v) for k, v in pattern.items())]:
        if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= min(MAX_RANK, hidden):
            raise AdapterError(f"adapter_config.json: {key} = {rank!r} must be a whole number from 1 to "
                               f"{min(MAX_RANK, hidden)} for this base")
    expert_layouts(raw)  # mixed or unknown layouts are refused before anything is read
    model, leaves = base_modules(base_config)
    modules = raw.get("target_modules") or []
    if isinstance(modules, list):
        missing = [m for m in modules if m not in leaves and m not in EXPERT_ALIASES]
        if missing:
            raise AdapterError(f"adapter_config.json: target_modules {missing} do not exist in this base model")
    num_experts = int(getattr(base_config, "num_local_experts", 0) or 1)
    state = load_state(source)
    notes = []
    fused_raw, state = fuse_per_expert(raw, state, num_experts)
    if fused_raw is not raw:
        notes.append("per-expert LoRA fused")
    moved = 0
    if fused_raw is raw:  # a fused per-expert adapter is rank-major by construction
        state, moved = rank_major_state(state, raw, num_experts)
    if moved:
        notes.append(f"{moved} lora_B tensors from grouped_by_expert to rank_major")
    config = rank_major_config(fused_raw)
    if isinstance(config.get("target_modules"), list):  # expert aliases that matched nothing in this base
        config["target_modules"] = [m for m in config["target_modules"] if m in leaves]
    target.mkdir(parents=True, exist_ok=True)
    (target / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    expected = expected_shapes(model, target)
    absent = sorted(set(expected) - set(state))
    if absent:
        raise AdapterError(f"adapter_model.safetensors lacks {len(absent)} tensor(s) this config needs, "
                           f"e.g. {absent[0]} (a lora_A without its lora_B, or the other way round)")
    stray = sorted(set(state) - set(expected))
    if stray:
        raise AdapterError(f"adapter_model.safetensors has {len(stray)} tensor(s) this base and config do not "
                           f"have, e.g. {stray[0]}")
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise AdapterError(f"adapter_model.safetensors: {key} is {list(state[key].shape)}, this base needs "
                               f"{list(shape)}")
    save_file({k: v.contiguous() for k, v in state.items()}, str(target / "adapter_model.safetensors"))
    return ", ".join(notes)
