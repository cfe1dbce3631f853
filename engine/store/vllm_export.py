"""Export a specialist as the PEFT folder vLLM's GPT-OSS LoRA loader reads, and the command that serves it.

vLLM (vllm/lora/model_manager.py, `_stack_moe_lora_weights`, the 3-D MoE path GPT-OSS takes since its
`is_3d_moe_weight` is true) reads the fused experts' LoRA as PEFT's `target_parameters` writes it:
`<layer>.mlp.experts.base_layer.lora_{A,B}` is gate_up_proj and `<layer>.mlp.experts.lora_{A,B}` is
down_proj; lora_A is (experts x rank, in), expert-major, and lora_B is (out, rank x experts),
rank-major, reshaped there to (out, rank, experts). Attention LoRA (q/k/v/o_proj) is read as any PEFT
adapter's. What this module makes sure of: the two expert wrappers are in that order (an adapter trained
with down_proj listed first nests them the other way round, and vLLM would load each into the other's
buffer without a word), both are present, the shapes agree, nothing else is adapted (vLLM has no LoRA
for the router or embeddings), and the rank fits one of vLLM's `--max-lora-rank` values.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.store.adapters import AdapterError, AdapterStore, StoredAdapter, check_name

VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm/config/lora.py: MaxLoRARanks
MARKER = "tandem_export.json"  # what makes a folder one of ours, safe to replace on the next export
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
GATE_UP, DOWN = "mlp.experts.gate_up_proj", "mlp.experts.down_proj"
_KEY = re.compile(r"^(?P<prefix>.*\.layers\.\d+\.)(?P<module>self_attn\.(?:q|k|v|o)_proj|mlp\.experts(?:\.base_layer)*)"
                  r"\.lora_(?P<ab>[AB])\.weight$")


class ExportError(AdapterError):
    """The adapter cannot be served by vLLM as it is, or the folder cannot be written. One line."""


@dataclass
class Exported:
    name: str
    path: Path
    rank: int
    reordered: bool  # the expert wrappers were swapped into vLLM's order


def _load(a: StoredAdapter) -> dict[str, Any]:
    weights = a.weights
    if weights.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(weights)
    import torch

    return torch.load(weights, map_location="cpu", weights_only=True)


def _experts(layer: str, found: dict[str, dict[str, Any]]) -> tuple[dict[str, Any], bool]:
    """{"gate_up": {A, B}, "down": {A, B}} of one layer, and whether the file had them the other way round."""
    outer, inner = found.get("mlp.experts"), found.get("mlp.experts.base_layer")
    if outer is None or inner is None or len(outer) != 2 or len(inner) != 2:
        raise ExportError(f"{layer}: the experts need LoRA on both gate_up_proj and down_proj for vLLM "
                          "(its GPT-OSS loader takes both or neither)")
    # gate_up's output is twice down's input (gate and up, interleaved); down's output is gate_up's input
    def is_gate_up(a: dict, b: dict) -> bool:
        return a["B"].shape[0] == 2 * b["A"].shape[1] and b["B"].shape[0] == a["A"].shape[1]

    if is_gate_up(inner, outer) and not is_gate_up(outer, inner):
        return {"gate_up": inner, "down": outer}, False
    if is_gate_up(outer, inner) and not is_gate_up(inner, outer):
        return {"gate_up": outer, "down": inner}, True
    raise ExportError(f"{layer}: cannot tell gate_up_proj from down_proj by their shapes "
                      f"({tuple(inner['A'].shape)}, {tuple(inner['B'].shape)} / {tuple(outer['A'].shape)}, "
                      f"{tuple(outer['B'].shape)})")


def convert(config: dict[str, Any], tensors: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], bool]:
    """(adapter_config, tensors) in vLLM's layout, and whether the expert wrappers were reordered."""
    if config.get("use_dora") or config.get("modules_to_save") or config.get("bias", "none") != "none":
        raise ExportError("DoRA, modules_to_save and LoRA biases are not served by vLLM's GPT-OSS LoRA")
    if "base_layer.base_layer" in "".join(tensors):
        raise ExportError("more than two expert parameters are adapted; vLLM reads gate_up_proj and down_proj only")
    layers: dict[str, dict[str, dict[str, Any]]] = {}
    out: dict[str, Any] = {}
    attention = set()
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise ExportError(f"{key}: vLLM serves LoRA on attention (q/k/v/o_proj) and the experts only")
        module = m["module"]
        if module.startswith("self_attn"):
            attention.add(module.rsplit(".", 1)[1])
            out[key] = t.contiguous()
        else:
            layers.setdefault(m["prefix"], {}).setdefault(module, {})[m["ab"]] = t
    reordered = False
    for prefix, found in layers.items():
        experts, swapped = _experts(prefix.rstrip("."), found)
        reordered |= swapped
        for part, module in (("gate_up", "mlp.experts.base_layer"), ("down", "mlp.experts")):
            for ab in ("A", "B"):
                out[f"{prefix}{module}.lora_{ab}.weight"] = experts[part][ab].contiguous()
    cfg = {**config, "target_modules": sorted(attention), "target_parameters": [GATE_UP, DOWN] if layers else [],
           "inference_mode": True}
    return cfg, out, reordered


def vllm_rank(rank: int) -> int:
    """The smallest `--max-lora-rank` vLLM accepts that holds `rank`."""
    for r in VLLM_RANKS:
        if rank <= r:
            return r
    raise ExportError(f"rank {rank} is above vLLM's largest --max-lora-rank ({VLLM_RANKS[-1]})")


def export(store: AdapterStore, name: str, folder: Path, base_model: str) -> Exported:
    """Write `name` as `folder/name`, atomically. A folder there from an earlier export is replaced; any
    other is left alone (an error)."""
    a = store.get(check_name(name))
    config = json.loads((a.path / "adapter_config.json").read_text(encoding="utf-8"))
    rank = config.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1 or config.get("rank_pattern"):
        raise ExportError(f"{name}: adapter_config.json needs one integer rank r (no rank_pattern) for vLLM")
    vllm_rank(rank)
    cfg, tensors, reordered = convert(config, _load(a))
    cfg["base_model_name_or_path"] = base_model
    folder = Path(folder).expanduser().resolve()
    target = folder / name
    if target.exists() and not (target / MARKER).is_file():
        raise ExportError(f"{target} exists and is not a Tandem export: remove it or choose another folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        staging = folder / f".{name}.{uuid.uuid4().hex[:8]}.tmp"
        staging.mkdir()
        try:
            from safetensors.torch import save_file

            save_file(tensors, staging / "adapter_model.safetensors", metadata={"format": "pt"})
            (staging / "adapter_config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
            marker = {"name": name, "task": a.manifest.task, "base_model": base_model, "rank": rank,
                      "source": str(a.path), "exported": time.time()}
            (staging / MARKER).write_text(json.dumps(marker, indent=1, ensure_ascii=False), encoding="utf-8")
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    except OSError as e:
        raise ExportError(f"cannot write {target}: {e.strerror or e}") from None
    return Exported(name, target, rank, reordered)


def exports(folder: Path) -> list[tuple[str, Path, int]]:
    """(name, path, rank) of every Tandem export in `folder`."""
    found = []
    for marker in sorted(Path(folder).glob(f"*/{MARKER}")):
        try:
            info = json.loads(marker.read_text(encoding="utf-8"))
            found.append((marker.parent.name, marker.parent, int(info["rank"])))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a damaged marker: that folder is not listed
    return found


def serve_command(base_model: str, folder: Path, tensor_parallel: int = 1) -> str:
    """`vllm serve` for every export in `folder`: the base as "base", each specialist under its name."""
    found = exports(folder)
    if not found:
        raise ExportError(f"no Tandem exports in {folder}")
    modules = " ".join(shlex.quote(f"{n}={p}") for n, p, _ in found)
    rank = vllm_rank(max(r for _, _, r in found))
    return (f"vllm serve {shlex.quote(base_model)} --served-model-name base --enable-lora "
            f"--lora-modules {modules} --max-lora-rank {rank} --max-loras {len(found)} "
            f"--tensor-parallel-size {tensor_parallel}")
