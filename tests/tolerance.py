"""How far two fp32 computations of the same logits may drift apart, derived from the arithmetic.

Two decoders that compute the same function in a different summation order (grouped matmuls vs one
matmul, a 4-bit kernel vs a dequantized weight) differ by rounding alone. How much rounding shows in the
logits depends on the reduction lengths and on the dynamic range of the terms summed (large random
adapters cancel against the base weights), which is a property of the model and the input, not of a
machine. So the bound is measured on the arithmetic itself: the fp32 reference's own distance from the
same forward in fp64 (the rounding this input really amplifies), times a margin for a second, differently
ordered fp32 computation, and never below the worst-case error of the longest fp32 reduction in the model
(K·u). A wrong nibble, a permuted column or a dropped factor is off by orders of magnitude more.
"""

from __future__ import annotations

import copy
from typing import Any

U32 = 2.0**-24  # fp32 unit roundoff
MARGIN = 16  # two fp32 computations, each within a few times the reference's own rounding of the truth


def relative(a: Any, b: Any) -> float:
    """Largest difference relative to the largest magnitude of `b`."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def logits(model: Any, ids: Any) -> Any:
    import torch

    with torch.no_grad():
        return model(input_ids=ids).logits


def rounding_bound(model: Any, ids: Any) -> float:
    """The relative bound for comparing an fp32 decoder's logits with `model`'s at `ids` [batch, t]."""
    import torch

    wide = copy.deepcopy(model).to(torch.float64)
    for m in wide.modules():  # grouped_mm has no fp64 kernel: the experts' own loop computes the same sum
        if hasattr(getattr(m, "config", None), "_experts_implementation"):
            m.config._experts_implementation = "eager"
    noise = relative(logits(model, ids), logits(wide, ids))
    cfg = getattr(model, "config", None)
    reductions = [ids.shape[1]] + [int(getattr(cfg, k, 0) or 0) for k in ("hidden_size", "intermediate_size")]
    return max(MARGIN * noise, max(reductions) * U32)
