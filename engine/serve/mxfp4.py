"""MXFP4 expert weights, the format GPT-OSS ships its experts in: exact dequantization, quantization, and
the experts module that keeps them 4-bit on the device.

MXFP4 (OCP microscaling): FP4 e2m1 values (±{0, .5, 1, 1.5, 2, 3, 4, 6}), two per byte, low nibble first,
in blocks of 32 along the input dimension, each block with one e8m0 scale 2^(s-127). A checkpoint stores
`<param>_blocks` [experts, out, in/32, 16] uint8 and `<param>_scales` [experts, out, in/32] uint8, with
the gate and up rows of `gate_up_proj` interleaved (transformers' integrations/mxfp4.py reads the same).
The fast decoder's kernels (mxfp4_kernels.py) read these tensors as they are; the exact fp32 path here
is what the CPU runs and what the kernels are tested against.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
BLOCK = 32  # values per scale
PARAMS = ("gate_up_proj", "down_proj")  # GptOssExperts' weights, [experts, in, out] there


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[..., out, in/32, 16] blocks and [..., out, in/32] scales -> [..., out, in] values. Exact in fp32
    (every e2m1 value times a power of two is an fp32 number); `dtype` rounds once at the end."""
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
    pairs = torch.stack((lut[(blocks & 15).long()], lut[(blocks >> 4).long()]), dim=-1)
    values = torch.ldexp(pairs.flatten(-2), scales.to(torch.int32)[..., None] - 127)
    return values.flatten(-2).to(dtype)


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., out, in] weights -> (blocks, scales). Each block's scale is the smallest power of two that
    keeps its largest magnitude within 6 (no clipping); values round to the nearest e2m1 value (ties
    toward zero). Re-quantizing dequantized weights gives the same values back."""
    *lead, n, k = w.shape
    if k % BLOCK:
        raise ValueError(f"MXFP4 needs the input dimension to be a multiple of {BLOCK}, got {k}")
    x = w.float().reshape(*lead, n, k // BLOCK, BLOCK)
    amax = x.abs().amax(-1, keepdim=True)
    exp = torch.ceil(torch.log2(amax / 6)).clamp(-127, 127)
    exp = torch.where(amax > 0, exp, torch.full_like(exp, -127))
    q = x / torch.exp2(exp)
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], device=w.device)
    codes = torch.bucketize(q.abs(), mids) | (torch.signbit(q).to(torch.int64) << 3)
    codes = codes.to(torch.uint8).reshape(*lead, n, k // BLOCK, BLOCK // 2, 2)
    blocks = codes[..., 0] | (codes[..., 1] << 4)
    return blocks.contiguous(), (exp.squeeze(-1) + 127).to(torch.uint8)


def _shape_only(shape: tuple[int, ...], dtype: torch.dtype, device: Any) -> nn.Parameter:
    """A parameter with a weight's shape, dtype and device but one element of storage (stride 0): PEFT
    sizes and places an adapter's factors by it; nothing reads its values."""
    return nn.Parameter(torch.zeros((), dtype=dtype, device=device).expand(shape), requires_grad=False)


class Mxfp4Experts(nn.Module):
    """GPT-OSS experts with MXFP4 weights. `gate_up_proj`/`down_proj` are shape-only stand-ins, so PEFT
    attaches expert LoRA as it does to GptOssExperts; the forward applies an attached adapter to the
    routed experts only, reading its factors from PEFT's parametrization (never the summed weight)."""

    is_transposed = True  # PEFT: the stand-ins are [experts, in, out], like GptOssExperts

    def __init__(self, config: Any, dtype: torch.dtype, device: Any = None):
        super().__init__()
        e, h, i = config.num_local_experts, config.hidden_size, config.intermediate_size
        self.num_experts, self.hidden_size, self.intermediate_size = e, h, i
        self.alpha, self.limit = 1.702, getattr(config, "swiglu_limit", 7.0)
        for p, (out, inp) in zip(PARAMS, ((2 * i, h), (h, i)), strict=True):
            self.register_buffer(f"{p}_blocks", torch.zeros(e, out, inp // BLOCK, 16, dtype=torch.uint8, device=device))
            self.register_buffer(f"{p}_scales", torch.zeros(e, out, inp // BLOCK, dtype=torch.uint8, device=device))
            setattr(self, f"{p}_bias", nn.Parameter(torch.zeros(e, out, dtype=dtype, device=device),
                                                    requires_grad=False))
            setattr(self, p, _shape_only((e, inp, out), dtype, device))

    # The stand-ins are not weights: dtype/device moves rebuild them (a plain move would materialize their
    # full size), and state dicts leave them out.
    def _apply(self, fn: Any, recurse: bool = True) -> Mxfp4Experts:
        stand_ins = {p: self._parameters.pop(p) for p in PARAMS}
        probe = fn(torch.zeros((), dtype=stand_ins[PARAMS[0]].dtype, device=stand_ins[PARAMS[0]].device))
        super()._apply(fn, recurse)
        for p, t in stand_ins.items():
            self._parameters[p] = _shape_only(tuple(t.shape), probe.dtype, probe.device)
        return self

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for p in PARAMS:
            destination.pop(prefix + p, None)

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any) -> None:
        stand_ins = {p: self._parameters.pop(p) for p in PARAMS}
        try:
            super()._load_from_state_dict(state_dict, prefix, *args)
        finally:
            self._parameters.update(stand_ins)

    def dequantized(self, param: str, expert: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Expert `expert`'s `param` as [out, in], exactly dequantized."""
        return dequantize(getattr(self, f"{param}_blocks")[expert], getattr(self, f"{param}_scales")[expert], dtype)

    def _project(self, x: torch.Tensor, expert: int, param: str, loras: list[tuple[Any, Any, float]]) -> torch.Tensor:
        y = x @ self.dequantized(param, expert, x.dtype).T + getattr(self, f"{param}_bias")[expert].to(x.dtype)
        for lhs, rhs, scaling in loras:  # [experts, in, r] and [experts, r, out]: this expert's slices only
            z = x @ lhs[expert].to(x.dtype)
            y = y + scaling * (z if rhs is None else z @ rhs[expert].to(x.dtype))
        return y

    def forward(self, hidden_states: torch.Tensor, router_indices: torch.Tensor, routing_weights: torch.Tensor,
                loras: dict[str, list] | None = None) -> torch.Tensor:
        """The routed experts' outputs; only the experts some row is routed to are dequantized. `loras`
        maps each weight to the active adapters' (lhs, rhs, scaling) factors (see `active_loras`); None
        reads what PEFT's parametrization put on the stand-ins (a ParamWrapper calling this directly)."""
        if loras is None:
            loras = {p: [f for proxy in _lora_proxies(self, p) for f in _factors(proxy)] for p in PARAMS}
        out = torch.zeros_like(hidden_states)
        for expert in router_indices.unique().tolist():
            token, slot = torch.where(router_indices == expert)
            gate_up = self._project(hidden_states[token], expert, "gate_up_proj", loras["gate_up_proj"])
            down = self._project(swiglu(gate_up, self.alpha, self.limit), expert, "down_proj", loras["down_proj"])
            out.index_add_(0, token, down * routing_weights[token, slot, None].to(down.dtype))
        return out


def swiglu(gate_up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """GPT-OSS's clamped SwiGLU over interleaved gate/up columns."""
    gate = gate_up[..., ::2].clamp(max=limit)
    up = gate_up[..., 1::2].clamp(-limit, limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def _lora_proxies(module: nn.Module, param: str) -> list[Any]:
    """The LoRA parametrizations PEFT put on `module.<param>` for this forward (none outside one)."""
    plist = getattr(module, "parametrizations", {})
    return list(plist[param]) if param in plist else []


def _factors(proxy: Any) -> list[tuple[Any, Any, float]]:
    if hasattr(proxy, "lhs"):  # one adapter: its factors
        return [(proxy.lhs, proxy.rhs, proxy.scaling)]
    return [(proxy.delta_weight, None, 1.0)]  # several adapters at once: PEFT summed their [experts, in, out] deltas


def active_loras(wrapper: nn.Module) -> tuple[Mxfp4Experts, dict[str, list]]:
    """The Mxfp4Experts under PEFT's ParamWrappers, and the active adapters' expert factors per weight,
    read from the wrappers as PEFT's forward would apply them (active adapters, unless disabled). Read
    directly, because PEFT's own forward registers a checked parametrization that evaluates W + ΔW once:
    on a stand-in that writes the dense [experts, in, out] tensor, ~1.6 GB a layer at 20B size."""
    loras: dict[str, list] = {p: [] for p in PARAMS}
    module = wrapper
    while hasattr(module, "base_layer"):
        param = getattr(module, "parameter_name", None)
        if param in loras and not module.disable_adapters and not module.merged:
            for name in module.active_adapters:
                if name in module.lora_A:
                    loras[param].append(module.get_delta_factors(name))
        module = module.base_layer
    return module, loras


def mlp_forward(mlp: nn.Module, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GptOssMLP's forward as transformers writes it: bound to MXFP4 layers so that a patched MLP class
    (unsloth replaces it on some GPUs) cannot reach for weights these experts do not hold, and so that an
    adapter's expert LoRA is applied to the routed experts only (see `active_loras`)."""
    b, t, d = hidden_states.shape
    x = hidden_states.reshape(-1, d)
    _, scores, indices = mlp.router(x)
    experts, loras = active_loras(mlp.experts)
    return experts(x, indices, scores, loras).reshape(b, t, d), scores


def install(model: Any, dtype: torch.dtype, device: Any) -> list[Mxfp4Experts]:
    """Replace every GPT-OSS layer's experts with (zeroed) MXFP4 ones on `device`; returns them."""
    from types import MethodType

    made = []
    for layer in model.model.layers:
        layer.mlp.experts = Mxfp4Experts(model.config, dtype, device)
        layer.mlp.forward = MethodType(mlp_forward, layer.mlp)
        made.append(layer.mlp.experts)
    return made
