"""GPT-OSS attention over the fast decoder's static KV cache: per-head sinks, sliding or full.

A sink is one more logit per head in each softmax's denominator, with no value. Three ways to compute the
same thing:

- `reference`: scores in fp32, masked, softmax with the sink; what the CPU runs and what the others are
  tested against. Its scores take memory quadratic in the chunk (fast_decode.py chunks a prompt for it).
- `decode`, for one-token steps (a torch custom op: opaque to torch.compile, capturable in a CUDA graph):
  a split-K flash-decode Triton kernel that reads the position from a device tensor, so one graph serves
  every position yet reads only the live slots (a sliding layer's window), never the whole cache. Each
  program takes one key/value head with its query heads and a chunk of slots; a second kernel combines
  the chunks' partial softmaxes with the sink.
- `flash_prefill`, for a prompt's tokens on CUDA: torch's flash-attention kernel (causal, the sliding
  window as its left window, grouped-query heads as they are), no scores in memory. It does not know
  sinks, but its log-sum-exp makes them exact: the sink only enlarges the denominator, so
  out_with_sink = out · Σexp(s) / (Σexp(s) + exp(sink)) = out · sigmoid(lse − sink).

Nothing here needs FP8, TMA or wgmma: Ampere (sm_80/86) runs it as Hopper does.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

CHUNK = 128  # cache slots per program of the decode kernel
BLOCK_N = 64  # slots per inner step
WARPS = 4


# ----- the reference
def reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, pos: torch.Tensor, kpos: torch.Tensor,
              sinks: torch.Tensor, scaling: float, window: int) -> torch.Tensor:
    """q [b, heads, t, hd] at positions `pos` [t]; keys/values [b, kv_heads, span, hd] at positions `kpos`
    [span] (below 0: not a slot); [b, t, heads * hd]."""
    b, heads, t, hd = q.shape
    kv_heads, span = keys.shape[1], keys.shape[2]
    g = heads // kv_heads
    allowed = (kpos[None, :] <= pos[:, None]) & (kpos[None, :] >= 0)
    if window:
        allowed = allowed & (kpos[None, :] > pos[:, None] - window)
    scores = (q.reshape(b, kv_heads, g * t, hd) @ keys.transpose(-1, -2)).float() * scaling
    scores = scores.view(b, kv_heads, g, t, span).masked_fill(~allowed, float("-inf"))
    sink = sinks.float().view(1, kv_heads, g, 1)
    top = torch.maximum(scores.amax(-1), sink)
    p = torch.exp(scores - top[..., None])
    p = p / (p.sum(-1) + torch.exp(sink - top))[..., None]
    out = (p.to(values.dtype).view(b, kv_heads, g * t, span) @ values).view(b, kv_heads, g, t, hd)
    return out.permute(0, 3, 1, 2, 4).reshape(b, t, heads * hd)


def live_slots(pos: int, window: int) -> tuple[int, int]:
    """The cache slots [first, end) a token at `pos` attends to."""
    return (max(0, pos - window + 1) if window else 0), pos + 1


# ----- one-token steps
@triton.jit
def _decode_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, o_ptr, m_ptr, l_ptr, MAX_LEN, WINDOW, SPLITS, scaling,
                   G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, CHUNK: tl.constexpr, BN: tl.constexpr,
                   PRECISION: tl.constexpr):
    """Program (b * kv_heads + head, split): the G query heads of one key/value head over CHUNK live slots;
    writes their unnormalized output, running max and denominator for the combine kernel."""
    bh = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1)
    end = tl.load(pos_ptr).to(tl.int32) + 1
    lo = 0
    if WINDOW > 0:
        lo = tl.maximum(end - WINDOW, 0)
    start = lo + s * CHUNK
    stop = tl.minimum(start + CHUNK, end)
    g = tl.arange(0, GP)
    d = tl.arange(0, D)
    mg = g < G
    q = tl.load(q_ptr + (bh * G + g[:, None]) * D + d[None, :], mask=mg[:, None], other=0.0)
    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    base = bh * MAX_LEN * D
    for n0 in range(start, stop, BN):
        n = n0 + tl.arange(0, BN)
        mn = n < stop
        k = tl.load(k_ptr + base + n[:, None] * D + d[None, :], mask=mn[:, None], other=0.0)
        sc = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scaling
        sc = tl.where(mn[None, :], sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, 1))
        p = tl.exp(sc - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + base + n[:, None] * D + d[None, :], mask=mn[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    row = (bh * G + g) * SPLITS + s
    tl.store(o_ptr + row[:, None] * D + d[None, :], acc, mask=mg[:, None])
    tl.store(m_ptr + row, m_i, mask=mg)
    tl.store(l_ptr + row, l_i, mask=mg)


@triton.jit
def _combine_kernel(o_ptr, m_ptr, l_ptr, sinks_ptr, out_ptr, HEADS, SPLITS, D: tl.constexpr, SP: tl.constexpr):
    """Program b * heads + head: the splits' partial softmaxes merged, the sink in the denominator."""
    bh = tl.program_id(0).to(tl.int64)
    s = tl.arange(0, SP)
    d = tl.arange(0, D)
    ms = s < SPLITS
    m = tl.load(m_ptr + bh * SPLITS + s, mask=ms, other=float("-inf"))
    lsum = tl.load(l_ptr + bh * SPLITS + s, mask=ms, other=0.0)
    sink = tl.load(sinks_ptr + bh % HEADS).to(tl.float32)
    top = tl.maximum(tl.max(m, 0), sink)
    wgt = tl.exp(m - top)  # an empty split (m = -inf) weighs 0
    o = tl.load(o_ptr + (bh * SPLITS + s[:, None]) * D + d[None, :], mask=ms[:, None], other=0.0)
    out = tl.sum(wgt[:, None] * o, 0) / (tl.sum(wgt * lsum, 0) + tl.exp(sink - top))
    tl.store(out_ptr + bh * D + d, out.to(out_ptr.dtype.element_ty))


def triton_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                  sinks: torch.Tensor, scaling: float, window: int) -> torch.Tensor:
    b, heads, hd = q.shape
    kv_heads, max_len = k_cache.shape[1], k_cache.shape[2]
    g = heads // kv_heads
    splits = triton.cdiv(min(window, max_len) if window else max_len, CHUNK)
    o = torch.empty(b, heads, splits, hd, dtype=torch.float32, device=q.device)
    m = torch.empty(b, heads, splits, dtype=torch.float32, device=q.device)
    lsum = torch.empty_like(m)
    _decode_kernel[(b * kv_heads, splits)](q.contiguous(), k_cache, v_cache, pos, o, m, lsum, max_len, window, splits,
                                           scaling, G=g, GP=max(16, triton.next_power_of_2(g)), D=hd, CHUNK=CHUNK,
                                           BN=BLOCK_N, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                                           num_warps=WARPS)
    out = q.new_empty(b, heads * hd)
    _combine_kernel[(b * heads,)](o, m, lsum, sinks, out, heads, splits, D=hd, SP=triton.next_power_of_2(splits),
                                  num_warps=WARPS)
    return out


def exact_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                 sinks: torch.Tensor, scaling: float, window: int) -> torch.Tensor:
    first, end = live_slots(int(pos.reshape(-1)[0]), window)
    kpos = torch.arange(first, end, device=q.device)
    out = reference(q[:, :, None], k_cache[:, :, first:end], v_cache[:, :, first:end], pos.reshape(1), kpos, sinks,
                    scaling, window)
    return out.view(q.shape[0], -1)


@torch.library.custom_op("tandem::decode_attention", mutates_args=())
def decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor, sinks: torch.Tensor,
           scaling: float, window: int) -> torch.Tensor:
    """One token per row: q [b, heads, hd] at position `pos` ([1], on the device) over the cache slots up to
    it (the last `window` of them when `window` > 0); [b, heads * hd]. The Triton kernels on CUDA (fp32 in
    IEEE precision, not TF32), the reference elsewhere. The caches must be contiguous (the decoder's are)."""
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("decode attention reads contiguous [batch, kv_heads, slots, head_dim] caches")
    return (triton_decode if q.is_cuda else exact_decode)(q, k_cache, v_cache, pos, sinks, scaling, window)


@decode.register_fake
def _(q, k_cache, v_cache, pos, sinks, scaling, window):
    return q.new_empty(q.shape[0], q.shape[1] * q.shape[2])


# ----- a prompt's tokens
def flash_applies(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether `flash_prefill` runs: CUDA from sm_80 on, a torch built with flash attention, 16-bit, head
    size a multiple of 8 up to 256."""
    return (device.type == "cuda" and dtype in (torch.bfloat16, torch.float16) and head_dim <= 256
            and head_dim % 8 == 0 and torch.backends.cuda.is_flash_attention_available()
            and torch.cuda.get_device_capability(device) >= (8, 0))


def flash_prefill(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, sinks: torch.Tensor, scaling: float,
                  window: int) -> torch.Tensor:
    """q [b, heads, t, hd], the prompt's last t positions; keys/values [b, kv_heads, span, hd], the slots
    from the first one the earliest query sees up to the last query's own (so causal alignment is
    bottom-right, as flash attention does it); [b, t, heads * hd]."""
    b, heads, t, hd = q.shape
    out, lse, *_ = torch.ops.aten._flash_attention_forward(
        q.transpose(1, 2).contiguous(), keys.transpose(1, 2).contiguous(), values.transpose(1, 2).contiguous(),
        None, None, t, keys.shape[2], 0.0, True, False, scale=scaling,
        window_size_left=window - 1 if window else None, window_size_right=0 if window else None)
    keep = torch.sigmoid(lse[:, :, :t] - sinks.float().view(1, heads, 1))  # [b, heads, t]
    return (out.float() * keep.transpose(1, 2)[..., None]).to(q.dtype).reshape(b, t, heads * hd)


def attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor, kpos: Any,
           first: int | None, sinks: torch.Tensor, scaling: float, window: int) -> torch.Tensor:
    """q [b, heads, t, hd] at positions `pos` over the cache (this chunk's keys and values already in it):
    `kpos` None for a one-token step (every live slot), else the slots `kpos` from slot `first`; [b, t,
    heads * hd]."""
    b, heads, t, hd = q.shape
    if kpos is None:
        return decode(q[:, :, 0], k_cache, v_cache, pos, sinks, scaling, window).view(b, 1, heads * hd)
    span = kpos.shape[0]
    keys, values = k_cache[:, :, first:first + span], v_cache[:, :, first:first + span]
    if t > 1 and flash_applies(q.device, q.dtype, hd):
        return flash_prefill(q, keys, values, sinks, scaling, window)
    return reference(q, keys, values, pos, kpos, sinks, scaling, window)
