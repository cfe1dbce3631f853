"""Routed experts over MXFP4 weights for decoding: Triton kernels on the GPU, the exact fp32 path elsewhere.

Why our own kernels: torchao's MX formats run MXFP4 matmuls only on sm_100 (elsewhere they dequantize the
whole weight first), gemlite and bitsandbytes quantize dense linears in their own layouts (no routing over
experts, no MXFP4 e8m0 scales), liger-kernel is for training, and OpenAI's triton_kernels (transformers'
MXFP4 path) comes from the kernel hub, which an offline box cannot reach, and has no LoRA.

Work is a list of routed (token, expert) pairs sorted by expert, so pairs that share an expert read its
weights back to back (from L2). Each kernel program takes one pair and a tile of output rows, reads that
expert's 4-bit rows once, dequantizes in registers (e2m1 bits placed straight into fp32 ones, scale
applied per 32-value block) and accumulates in fp32; no bf16 copy of a weight is ever written. The adapter's expert
LoRA rides along: the two expert kernels add (x·A)·B in their epilogue. x·A for gate_up is one dense
product over every expert's A; for down, each gate_up program multiplies the tile of activations it
holds by its rows of A and stores that partial sum in its own slot, which the down kernel's programs add
up (no launch of its own, no zero-fill, no atomics). gate_up fuses GPT-OSS's clamped SwiGLU; down
multiplies by the routing weight. Nothing here needs FP8, TMA or wgmma, so it runs on Ampere (sm_80/86)
as on Hopper.

Each is a torch custom op (opaque to torch.compile, capturable in CUDA graphs) whose CPU version is the
exact dequantizing path, the one the tests check (the kernels are tested against it on a GPU, and in
Triton's interpreter on the CPU).

Prefill is different: hundreds of pairs share each expert, so `dequantized` writes a layer's experts
once into a transient bf16 copy (one Triton pass, exact: every MXFP4 value is a bf16 number) for
torch's grouped GEMM (fast_decode.py), which reads each expert's weights per tile of rows, not per pair.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from engine.serve.mxfp4 import dequantize, swiglu

# gate/up units and down rows per program, scale blocks per step of each, loop pipelining stages. gate_up's
# tiles from bench/mxfp4_tune.py's grid at batch 1 on an H200; down's 16 rows and 4 stages as the whole decode
# step judged (decode_profile.py, H200, against 32 rows and Triton's default 3 stages: down's time a step
# 469 -> 459 µs without an adapter, ~515 -> 493 µs with a specialist; 4 stages alone changed neither kernel;
# the tune, whose weights stay in L2 across its launches, had 32 rows ahead by 3 %)
BJ, BN, BKB_UP, BKB_DOWN, STAGES = 32, 16, 8, 16, 4
DQ_BLOCKS = 64  # scale blocks per program of the dequantizing kernel
WARPS = 4


# ----- Triton
@triton.jit
def _e2m1(code):
    """A byte's low 4-bit code (int32) -> e2m1 value * 2^-14: sign and the 3 magnitude bits placed into an
    fp16's sign, exponent and mantissa, which also makes the subnormal 0.5 come out right."""
    bits = ((code & 7) << 9) | ((code & 8) << 12)
    return bits.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _e2m1_high(byte):
    """`_e2m1` of a byte's high code, placed straight from the byte (no shift down first)."""
    bits = ((byte & 0x70) << 5) | ((byte & 0x80) << 8)
    return bits.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _scale(s):
    """e8m0 codes -> 2^(s-127) * 2^14 (undoing _e2m1's 2^-14), built as fp32 bits: exact for s <= 240."""
    return ((s.to(tl.int32) + 14) << 23).to(tl.float32, bitcast=True)


# The dot kernels place codes straight into fp32 bits (no conversion instruction per value: at batch 1 the
# fp16 route's conversions, not the memory, bounded the expert kernels): a code is its e2m1 value * 2^-126,
# the code 0.5 being fp32's subnormal 2^-127 (Triton keeps subnormals). x is lifted by 2^64 so that every
# product with a weight stays a normal number, and each block's scale takes back 2^(126 - 64).
@triton.jit
def _e2m1_f32(code):
    """A byte's low 4-bit code (int32) -> e2m1 value * 2^-126 as fp32 bits: sign to bit 31, the 3 magnitude
    bits to the exponent's low 2 bits and the mantissa's top bit."""
    return (((code & 7) << 22) | ((code & 8) << 28)).to(tl.float32, bitcast=True)


@triton.jit
def _e2m1_f32_high(byte):
    """`_e2m1_f32` of a byte's high code, placed straight from the byte."""
    return (((byte & 0x70) << 18) | ((byte & 0x80) << 24)).to(tl.float32, bitcast=True)


@triton.jit
def _dot_scale(s):
    """e8m0 codes -> 2^(s-127) * 2^126 / 2^64 = 2^(s-65), as fp32 bits: exact for s <= 192 (scales up to 2^65)."""
    return ((s.to(tl.int32) + 62) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _rows_dot(w_ptr, s_ptr, rows, kbs, mask, xe, xo, KB):
    """Σ over scale blocks `kbs` of weight rows `rows` (absolute, [R]) times x (even/odd halves, [BKB, 16],
    lifted by 2^64: `_x_halves`)."""
    c = tl.arange(0, 16)
    off = rows[:, None] * KB + kbs[None, :]
    codes = tl.load(w_ptr + off[:, :, None] * 16 + c[None, None, :], mask=mask[:, :, None], other=0).to(tl.int32)
    s = tl.load(s_ptr + off, mask=mask, other=0)
    part = tl.sum(_e2m1_f32(codes) * xe[None, :, :] + _e2m1_f32_high(codes) * xo[None, :, :], axis=2)
    return tl.sum(part * _dot_scale(s), axis=1)


@triton.jit
def _x_halves(x_ptr, base, kbs, mk):
    """x's even and odd values of blocks `kbs`, in fp32, times 2^64 (see `_e2m1_f32`)."""
    c = tl.arange(0, 16)
    off = base + kbs[:, None] * 32 + 2 * c[None, :]
    xe = tl.load(x_ptr + off, mask=mk[:, None], other=0.0).to(tl.float32) * 18446744073709551616.0
    xo = tl.load(x_ptr + off + 1, mask=mk[:, None], other=0.0).to(tl.float32) * 18446744073709551616.0
    return xe, xo


@triton.jit
def _lora_b(xa, b_ptr, e, cols, mask, width, R: tl.constexpr):
    """(x·A) · B[e][:, cols] for one pair, `xa` its R values in fp32: B is [experts, R, width]."""
    r = tl.arange(0, R)
    b = tl.load(b_ptr + (e * R + r[:, None]) * width + cols[None, :], mask=mask[None, :], other=0.0)
    return tl.sum(xa[:, None] * b.to(tl.float32), axis=0)


@triton.jit
def _gate_up_kernel(x_ptr, rows_ptr, experts_ptr, w_ptr, s_ptr, bias_ptr, xa_ptr, b_ptr, a_down_ptr, out_ptr, xd_ptr,
                    INTER, KB, XA_ROW, alpha, limit, HAS_LORA: tl.constexpr, R: tl.constexpr,
                    HAS_DOWN_A: tl.constexpr, RD: tl.constexpr, BJ: tl.constexpr, BKB: tl.constexpr):
    p = tl.program_id(1)
    row = tl.load(rows_ptr + p).to(tl.int64)
    e = tl.load(experts_ptr + p).to(tl.int64)
    j = tl.program_id(0) * BJ + tl.arange(0, BJ)
    mj = j < INTER
    gate_rows = e * 2 * INTER + 2 * j  # gate and up rows interleave
    acc_g = tl.zeros([BJ], dtype=tl.float32)
    acc_u = tl.zeros([BJ], dtype=tl.float32)
    for kb0 in range(0, KB, BKB):
        kbs = kb0 + tl.arange(0, BKB)
        mk = kbs < KB
        xe, xo = _x_halves(x_ptr, row * KB * 32, kbs, mk)
        m2 = mj[:, None] & mk[None, :]
        acc_g += _rows_dot(w_ptr, s_ptr, gate_rows, kbs, m2, xe, xo, KB)
        acc_u += _rows_dot(w_ptr, s_ptr, gate_rows + 1, kbs, m2, xe, xo, KB)
    acc_g += tl.load(bias_ptr + gate_rows, mask=mj, other=0.0).to(tl.float32)
    acc_u += tl.load(bias_ptr + gate_rows + 1, mask=mj, other=0.0).to(tl.float32)
    if HAS_LORA:  # xa holds every expert's x·A for each token row ([rows, experts * R], row stride XA_ROW)
        xa = tl.load(xa_ptr + row * XA_ROW + e * R + tl.arange(0, R)).to(tl.float32)
        acc_g += _lora_b(xa, b_ptr, e, 2 * j, mj, 2 * INTER, R)
        acc_u += _lora_b(xa, b_ptr, e, 2 * j + 1, mj, 2 * INTER, R)
    gate = tl.minimum(acc_g, limit)
    up = tl.minimum(tl.maximum(acc_u, -limit), limit)
    act = ((up + 1) * (gate * tl.sigmoid(gate * alpha))).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + p * INTER + j, act, mask=mj)
    if HAS_DOWN_A:  # this tile's share of down's x·A (act as stored), into its own slot: no atomics, no zeroing
        rd = tl.arange(0, RD)
        a = tl.load(a_down_ptr + (e * INTER + j[:, None]) * RD + rd[None, :], mask=mj[:, None], other=0.0)
        part = tl.sum(act.to(tl.float32)[:, None] * a.to(tl.float32), axis=0)
        tl.store(xd_ptr + (p * tl.num_programs(0) + tl.program_id(0)) * RD + rd, part)


@triton.jit
def _down_kernel(x_ptr, experts_ptr, gate_ptr, w_ptr, s_ptr, bias_ptr, xd_ptr, b_ptr, out_ptr, N, KB, PARTS,
                 HAS_LORA: tl.constexpr, R: tl.constexpr, PARTS_P2: tl.constexpr, BN: tl.constexpr,
                 BKB: tl.constexpr):
    p = tl.program_id(1)
    e = tl.load(experts_ptr + p).to(tl.int64)
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    mn = n < N
    rows = e * N + n
    acc = tl.zeros([BN], dtype=tl.float32)
    for kb0 in range(0, KB, BKB):
        kbs = kb0 + tl.arange(0, BKB)
        mk = kbs < KB
        xe, xo = _x_halves(x_ptr, p.to(tl.int64) * KB * 32, kbs, mk)
        acc += _rows_dot(w_ptr, s_ptr, rows, kbs, mn[:, None] & mk[None, :], xe, xo, KB)
    acc += tl.load(bias_ptr + rows, mask=mn, other=0.0).to(tl.float32)
    if HAS_LORA:  # the pair's x·A: the sum of the partials that gate_up's tiles left ([pairs, PARTS, R])
        t = tl.arange(0, PARTS_P2)
        parts = tl.load(xd_ptr + (p * PARTS + t[:, None]) * R + tl.arange(0, R)[None, :], mask=t[:, None] < PARTS,
                        other=0.0)
        acc += _lora_b(tl.sum(parts, axis=0), b_ptr, e, n, mn, N, R)
    acc *= tl.load(gate_ptr + p).to(tl.float32)
    tl.store(out_ptr + p * N + n, acc.to(out_ptr.dtype.element_ty), mask=mn)


def triton_gate_up(x: torch.Tensor, rows: torch.Tensor, experts: torch.Tensor, blocks: torch.Tensor,
                   scales: torch.Tensor, bias: torch.Tensor, xa: torch.Tensor | None, lora_b: torch.Tensor | None,
                   down_a: torch.Tensor | None, alpha: float, limit: float) -> tuple[torch.Tensor, torch.Tensor]:
    inter = blocks.shape[1] // 2
    tiles = triton.cdiv(inter, BJ)
    out = x.new_empty(rows.shape[0], inter)
    xd = _partials(x, rows.shape[0], tiles, down_a)
    lora, down_lora = xa is not None, down_a is not None
    if lora and xa.stride(1) != 1:
        xa = xa.contiguous()
    _gate_up_kernel[(tiles, rows.shape[0])](
        x, rows, experts, blocks, scales, bias, xa if lora else x, lora_b if lora else x,
        down_a if down_lora else x, out, xd if down_lora else x, inter, blocks.shape[2],
        xa.stride(0) if lora else 0, alpha, limit, HAS_LORA=lora, R=lora_b.shape[1] if lora else 1,
        HAS_DOWN_A=down_lora, RD=down_a.shape[-1] if down_lora else 1, BJ=BJ, BKB=BKB_UP, num_warps=WARPS,
        num_stages=STAGES)
    return out, xd


def _partials(x: torch.Tensor, pairs: int, parts: int, down_a: torch.Tensor | None) -> torch.Tensor:
    """Where gate_up leaves down's x·A: [pairs, parts, rank] fp32 partial sums, or an empty tensor."""
    if down_a is None:
        return x.new_empty(0, dtype=torch.float32)
    return x.new_empty(pairs, parts, down_a.shape[-1], dtype=torch.float32)


def triton_down(act: torch.Tensor, experts: torch.Tensor, gate: torch.Tensor, blocks: torch.Tensor,
                scales: torch.Tensor, bias: torch.Tensor, xd: torch.Tensor | None,
                lora_b: torch.Tensor | None) -> torch.Tensor:
    n = blocks.shape[1]
    out = act.new_empty(act.shape[0], n)
    lora = xd is not None
    parts = xd.shape[1] if lora else 1
    _down_kernel[(triton.cdiv(n, BN), act.shape[0])](
        act, experts, gate, blocks, scales, bias, xd if lora else act, lora_b if lora else act, out, n,
        blocks.shape[2], parts, HAS_LORA=lora, R=lora_b.shape[1] if lora else 1,
        PARTS_P2=triton.next_power_of_2(parts), BN=BN, BKB=BKB_DOWN, num_warps=WARPS,
        num_stages=STAGES)
    return out


@triton.jit
def _dequant_kernel(w_ptr, s_ptr, out_ptr, NBLK, BLOCKS: tl.constexpr):
    """BLOCKS scale blocks (16 bytes, 32 values each) per program, written in the output's dtype."""
    b = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)
    m = b < NBLK
    c = tl.arange(0, 16)
    codes = tl.load(w_ptr + b[:, None] * 16 + c[None, :], mask=m[:, None], other=0).to(tl.int32)
    s = _scale(tl.load(s_ptr + b, mask=m, other=0))[:, None]
    values = tl.interleave(_e2m1(codes) * s, _e2m1_high(codes) * s)  # low nibble first
    tl.store(out_ptr + b[:, None] * 32 + tl.arange(0, 32)[None, :], values.to(out_ptr.dtype.element_ty),
             mask=m[:, None])


def triton_dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty(*scales.shape[:-1], scales.shape[-1] * 32, dtype=dtype, device=blocks.device)
    n = scales.numel()
    _dequant_kernel[(triton.cdiv(n, DQ_BLOCKS),)](blocks, scales, out, n, BLOCKS=DQ_BLOCKS, num_warps=WARPS)
    return out


def dequantized(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[..., out, in] weights in `dtype` (exact in bf16 too: each value is e2m1 times a power of two), for a
    prefill's grouped matmuls: one Triton pass on CUDA, the exact fp32 path elsewhere."""
    return (triton_dequantize if blocks.is_cuda else dequantize)(blocks, scales, dtype)


# ----- the exact path: fp32 arithmetic on exactly dequantized weights, one routed expert at a time
def _by_expert(experts: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    return [(e, (experts == e).nonzero().squeeze(1)) for e in experts.unique().tolist()]


def _project(x: torch.Tensor, e: int, blocks: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor,
             xa: torch.Tensor | None, lora_b: torch.Tensor | None) -> torch.Tensor:
    y = x.float() @ dequantize(blocks[e], scales[e]).T + bias[e].float()
    if xa is not None and lora_b is not None:
        y = y + xa.float() @ lora_b[e].float()
    return y


def exact_gate_up(x: torch.Tensor, rows: torch.Tensor, experts: torch.Tensor, blocks: torch.Tensor,
                  scales: torch.Tensor, bias: torch.Tensor, xa: torch.Tensor | None, lora_b: torch.Tensor | None,
                  down_a: torch.Tensor | None, alpha: float, limit: float) -> tuple[torch.Tensor, torch.Tensor]:
    out = torch.empty(rows.shape[0], blocks.shape[1] // 2, dtype=torch.float32, device=x.device)
    for e, sel in _by_expert(experts):
        xa_e = None if xa is None else xa[rows[sel]].view(sel.shape[0], blocks.shape[0], -1)[:, e]
        out[sel] = swiglu(_project(x[rows[sel]], e, blocks, scales, bias, xa_e, lora_b), alpha, limit)
    act = out.to(x.dtype)
    xd = _partials(x, rows.shape[0], 1, down_a)  # one part: the whole x·A
    if down_a is not None:
        for e, sel in _by_expert(experts):
            xd[sel, 0] = act[sel].float() @ down_a[e].float()
    return act, xd


def exact_down(act: torch.Tensor, experts: torch.Tensor, gate: torch.Tensor, blocks: torch.Tensor,
               scales: torch.Tensor, bias: torch.Tensor, xd: torch.Tensor | None,
               lora_b: torch.Tensor | None) -> torch.Tensor:
    out = torch.empty(act.shape[0], blocks.shape[1], dtype=torch.float32, device=act.device)
    xa = None if xd is None else xd.sum(1)
    for e, sel in _by_expert(experts):
        y = _project(act[sel], e, blocks, scales, bias, None if xa is None else xa[sel], lora_b)
        out[sel] = y * gate[sel, None].float()
    return out.to(act.dtype)


# ----- custom ops: the Triton kernels on CUDA, the exact path elsewhere
@torch.library.custom_op("tandem::mx_gate_up", mutates_args=())
def gate_up(x: torch.Tensor, rows: torch.Tensor, experts: torch.Tensor, blocks: torch.Tensor,
            scales: torch.Tensor, bias: torch.Tensor, xa: torch.Tensor | None, lora_b: torch.Tensor | None,
            down_a: torch.Tensor | None, alpha: float, limit: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SwiGLU(x[rows] · W_gate_up[experts] + bias (+ LoRA)) per routed pair: [pairs, intermediate]. `xa` is
    [rows, experts * rank], every expert's x·A for each row. Also, with down's LoRA A `down_a` [experts,
    intermediate, rank], the pairs' act·A as partial sums [pairs, parts, rank] fp32 for `down` (one part per
    kernel tile on CUDA, one on the exact path; empty without `down_a`)."""
    return (triton_gate_up if x.is_cuda else exact_gate_up)(x, rows, experts, blocks, scales, bias, xa, lora_b,
                                                            down_a, alpha, limit)


@gate_up.register_fake
def _(x, rows, experts, blocks, scales, bias, xa, lora_b, down_a, alpha, limit):
    inter = blocks.shape[1] // 2
    return (x.new_empty(rows.shape[0], inter),
            _partials(x, rows.shape[0], triton.cdiv(inter, BJ) if x.is_cuda else 1, down_a))


@torch.library.custom_op("tandem::mx_down", mutates_args=())
def down(act: torch.Tensor, experts: torch.Tensor, gate: torch.Tensor, blocks: torch.Tensor,
         scales: torch.Tensor, bias: torch.Tensor, xd: torch.Tensor | None,
         lora_b: torch.Tensor | None) -> torch.Tensor:
    """gate · (act · W_down[experts] + bias (+ LoRA, its x·A the sum over `xd`'s parts: `gate_up`)) per
    routed pair: [pairs, hidden]."""
    return (triton_down if act.is_cuda else exact_down)(act, experts, gate, blocks, scales, bias, xd, lora_b)


@down.register_fake
def _(act, experts, gate, blocks, scales, bias, xd, lora_b):
    return act.new_empty(act.shape[0], blocks.shape[1])


def routed_experts(x: torch.Tensor, top_i: torch.Tensor, weights: torch.Tensor, w: dict[str, Any],
                   lora: dict[str, Any] | None, xa: torch.Tensor | None = None) -> torch.Tensor:
    """The MoE output for rows `x` [n, hidden] routed to experts `top_i` [n, k] with `weights` [n, k]:
    the fast decoder's MXFP4 expert step (`w` holds the layer's blocks/scales/biases, `lora` the packed
    adapter's expert factors: B as [experts, r, out], gate_up's A as [experts * r, hidden] (see
    `pack_gate_up_a`), down's as [experts, in, r]). `xa`: x·A of gate_up's LoRA when the caller has it
    (fast_decode computes it in the router's product)."""
    n, k = top_i.shape
    if n == 1:  # one row routes to k distinct experts: no pairs to group, no order to find
        experts, perm, gate = top_i.reshape(-1), None, weights.reshape(-1)
        rows = torch.zeros_like(experts)
    else:  # sorted by expert, pairs that share one read its weights back to back (from L2)
        experts, perm = torch.sort(top_i.reshape(-1))
        rows = perm // k
        gate = weights.reshape(-1)[perm]

    # an adapter may adapt either expert weight alone: each is decided on its own
    up_lora = lora is not None and "gate_up_proj.A" in lora
    down_lora = lora is not None and "down_proj.A" in lora
    # every expert's x·A at once: one dense product (A packed as [experts * rank, hidden]) beats a routed one
    if up_lora and xa is None:
        xa = torch.nn.functional.linear(x, lora["gate_up_proj.A"])
    act, xd = gate_up(x, rows, experts, w["gate_up_proj_blocks"], w["gate_up_proj_scales"],
                      w["gate_up_proj_bias"], xa, lora["gate_up_proj.B"] if up_lora else None,
                      lora["down_proj.A"] if down_lora else None, w["alpha"], w["limit"])
    y = down(act, experts, gate, w["down_proj_blocks"], w["down_proj_scales"], w["down_proj_bias"],
             xd if down_lora else None, lora["down_proj.B"] if down_lora else None)
    if perm is not None:
        y = y.new_empty(y.shape).index_copy_(0, perm, y)
    return y.view(n, k, -1).sum(1)


def pack_gate_up_a(a: torch.Tensor) -> torch.Tensor:
    """gate_up's LoRA A, [experts, hidden, r], as the weight of one dense product: [experts * r, hidden]."""
    return a.permute(0, 2, 1).reshape(-1, a.shape[1]).contiguous()
