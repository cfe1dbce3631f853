"""What this process can really use of the inference GPU, and what `serve_in_4bit = "auto"` makes of it.

The card's total is the wrong measure: another process may hold part of the card, and TANDEM_GPU_MEMORY_GB
holds Tandem's processes to less (as a smaller card would). The memory the driver reports free on the
card, capped by that variable, is what the weights, the KV cache and the adapters have to share.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.serve import mxfp4_load
from engine.startup import GPU_MEMORY_ENV, gpu_memory_cap_gb


@dataclass(frozen=True)
class Usable:
    bytes: int
    why: str  # where the figure comes from, e.g. "20.5 GB free on GPU 0 (of 85.5 GB)"


def gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def usable(index: int, nvml: Any = None) -> Usable | None:
    """Free memory on GPU `index` (numbered as NVML numbers it), capped by TANDEM_GPU_MEMORY_GB; None when
    neither NVML nor CUDA can tell. `nvml` is the pynvml module (tests pass a stand-in)."""
    from engine.telemetry import Telemetry

    tel = Telemetry(nvml)
    free = total = None
    if tel.nvml is not None and index < tel.count:
        g = tel.gpu(index)
        if g.memory_total_mb is not None and g.memory_used_mb is not None:
            total, free = g.memory_total_mb * 2**20, (g.memory_total_mb - g.memory_used_mb) * 2**20
    if free is None:
        import torch

        if not torch.cuda.is_available():
            return None
        free, total = torch.cuda.mem_get_info(0)  # the pinned card is device 0 of this process
    use = Usable(int(free), f"{gb(free)} free on GPU {index} (of {gb(total)})")
    cap = gpu_memory_cap_gb()
    if cap is not None and cap * 2**30 < free:
        use = Usable(int(cap * 2**30), f"{GPU_MEMORY_ENV}={cap:g} GiB ({use.why})")
    return use


def choose(want: bool | str, config: Any, use: Usable | None) -> tuple[str, str]:
    """(how to serve, why): `mxfp4_load.serve_quant` on the usable memory, with the reason in words."""
    quant = mxfp4_load.serve_quant(want, config, use.bytes if use else None)
    if mxfp4_load.checkpoint_format(config) == "bnb-4bit":
        return quant, "the checkpoint is bitsandbytes 4-bit already"
    if want != "auto":
        return quant, f"model.serve_in_4bit = {str(bool(want)).lower()}"
    if use is None:
        return quant, "no GPU: served as stored"
    need = mxfp4_load.bf16_bytes(config)
    verb = "fit within" if quant == "bf16" else "exceed"
    return quant, f"auto: bf16 weights ({gb(need)}) {verb} {mxfp4_load.FITS:.0%} of {use.why}"
