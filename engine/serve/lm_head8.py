"""An opt-in 8-bit lm_head for the fast decoder ([model] lm_head_8bit): half the bytes of the bf16 one.

Why: at the GPT-OSS-20B shape a decode step reads ~3.8 GB and the bf16 lm_head (201,088 x 2,880, 1.16 GB) is
30 % of it; a GEMV is bound by the bytes it reads. The weight is quantized once, when the decoder is built:
int8 codes with one fp32 scale per vocabulary row (symmetric, absmax / 127), so a logit is off by at most
half a step per term: |Δ| <= scale_row / 2 * ||x||_1 (`error_bound`). Off by default: the checkpoint's own
weights decide the tokens unless the user opts in; bench/serve_bench.py --lm-head-8bit reports how often
the top-1 token agrees with the bf16 head's.

The Triton kernel takes one program per (input row, tile of vocabulary rows); an input row's programs for
one tile run side by side, so a batch reads each tile from memory once and from L2 after. It reads the
codes as 32-bit words (4 codes each) and places each code straight into an fp32's mantissa (flip the sign
bit to bias it to 0..255, OR it into 2^23's bits, subtract 2^23 + 128: exact, no conversion instruction per
value), accumulates in fp32 and applies the row's scale once at the end. Nothing needs FP8, TMA or wgmma:
it runs on Ampere (sm_80/86) as on Hopper. `logits` is a torch custom op (opaque to torch.compile,
capturable in CUDA graphs) whose CPU version is the exact path, a dequantized fp32 matmul.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# vocabulary rows and 32-bit code words (4 codes each) per program and loop step: 16 words divide GPT-OSS's
# 720 a row (no masked tail); with 128 rows each thread loads 4 words at once (one 16-byte load) for each of 4
# rows and reuses its x values over them; 1,571 programs at GPT-OSS's vocabulary. Not yet tuned on a GPU.
BN, BKW = 128, 16
QUANTIZE_ROWS = 16384  # rows quantized at a time: bounds the transient fp32 copy (~190 MB at hidden 2,880)
WARPS = 4


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[vocab, hidden] float weight -> (int8 codes [vocab, hidden rounded up to 4, zero-padded], fp32 scale
    per row [vocab]): code = round(w / scale), scale = absmax / 127; a row of zeros gets codes 0, scale 1."""
    vocab, hidden = weight.shape
    codes = torch.zeros(vocab, -(-hidden // 4) * 4, dtype=torch.int8, device=weight.device)
    scales = torch.empty(vocab, dtype=torch.float32, device=weight.device)
    with torch.no_grad():
        for r in range(0, vocab, QUANTIZE_ROWS):
            w = weight[r:r + QUANTIZE_ROWS].float()
            absmax = w.abs().amax(1)
            s = torch.where(absmax > 0, absmax / 127, torch.ones_like(absmax))
            codes[r:r + QUANTIZE_ROWS, :hidden] = (w / s[:, None]).round_().clamp_(-127, 127).to(torch.int8)
            scales[r:r + QUANTIZE_ROWS] = s
    return codes, scales


def dequantize(codes: torch.Tensor, scales: torch.Tensor, hidden: int) -> torch.Tensor:
    """The fp32 weight [vocab, hidden] that `codes` and `scales` stand for."""
    return codes[:, :hidden].float() * scales[:, None]


def error_bound(x: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """How far each 8-bit logit may sit from the original weight's, rounding alone: [rows, vocab]."""
    return x.float().abs().sum(-1, keepdim=True) * scales[None] / 2


# ----- Triton
@triton.jit
def _logits_kernel(x_ptr, w_ptr, s_ptr, out_ptr, V, K, KW, BN: tl.constexpr, BKW: tl.constexpr):
    m = tl.program_id(0)
    rows = tl.program_id(1) * BN + tl.arange(0, BN)
    mr = rows < V
    acc = tl.zeros((BN, BKW), tl.float32)
    for k0 in range(0, KW, BKW):
        j = k0 + tl.arange(0, BKW)
        mk = j < KW
        words = tl.load(w_ptr + rows[:, None].to(tl.int64) * KW + j[None, :], mask=mr[:, None] & mk[None, :],
                        other=0)
        biased = words.to(tl.uint32, bitcast=True) ^ 0x80808080  # each int8 code + 128, as a byte
        for b in tl.static_range(4):
            col = 4 * j + b
            x = tl.load(x_ptr + m * K + col, mask=col < K, other=0.0).to(tl.float32)
            bits = ((biased >> (8 * b)) & 0xFF) | 0x4B000000  # 2^23 + code + 128
            acc += (bits.to(tl.float32, bitcast=True) - 8388736.0) * x[None, :]
    y = tl.sum(acc, axis=1) * tl.load(s_ptr + rows, mask=mr, other=0.0)
    tl.store(out_ptr + m * V + rows, y.to(out_ptr.dtype.element_ty), mask=mr)


def triton_logits(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    n, vocab = x.shape[0], codes.shape[0]
    out = x.new_empty(n, vocab)
    words = codes.view(torch.int32)
    _logits_kernel[(n, triton.cdiv(vocab, BN))](x, words, scales, out, vocab, x.shape[1], words.shape[1], BN=BN,
                                                 BKW=BKW, num_warps=WARPS)
    return out


def exact_logits(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return (x.float() @ dequantize(codes, scales, x.shape[1]).T).to(x.dtype)


# ----- the custom op: the Triton kernel on CUDA, the exact path elsewhere
@torch.library.custom_op("tandem::lm_head8", mutates_args=())
def logits(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [rows, hidden] · the 8-bit weight (`quantize`) -> logits [rows, vocab] in x's dtype."""
    return (triton_logits if x.is_cuda else exact_logits)(x, codes, scales)


@logits.register_fake
def _(x, codes, scales):
    return x.new_empty(x.shape[0], codes.shape[0])


@dataclass
class Int8Head:
    """An lm_head quantized to 8 bits: called like the nn.Linear it was built from."""

    codes: torch.Tensor
    scales: torch.Tensor
    bias: torch.Tensor | None

    @classmethod
    def of(cls, linear: torch.nn.Linear) -> Int8Head:
        codes, scales = quantize(linear.weight.detach())
        return cls(codes, scales, None if linear.bias is None else linear.bias.detach())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = logits(x, self.codes, self.scales)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    @property
    def nbytes(self) -> int:
        """Bytes a call reads from the weight: codes and scales."""
        return self.codes.numel() * self.codes.element_size() + self.scales.numel() * self.scales.element_size()
