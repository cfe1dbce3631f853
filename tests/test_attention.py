"""engine/serve/attention.py on the CPU: the decode kernels in Triton's interpreter and the sink correction
of flash attention's output, each against the reference softmax with sinks."""

import pytest
import torch

from engine.serve import attention
from tests.conftest import in_triton_interpreter

# run in a fresh interpreter: TRITON_INTERPRET must be set before triton loads
KERNEL_CHECK = """
import torch
from engine.serve import attention

gen = torch.Generator().manual_seed(0)
b, kv, g, hd, max_len = 2, 2, 4, 16, 300  # 3 splits of 128 slots on full layers
for window, pos in ((0, 0), (0, 1), (0, 127), (0, 128), (0, 299), (16, 5), (16, 200), (200, 150), (200, 299)):
    q = torch.randn(b, kv * g, hd, generator=gen)
    k = torch.randn(b, kv, max_len, hd, generator=gen) * 2
    v = torch.randn(b, kv, max_len, hd, generator=gen)
    sinks = torch.randn(kv * g, generator=gen)
    p = torch.tensor([pos])
    got = attention.triton_decode(q, k, v, p, sinks, 0.125, window)
    want = attention.exact_decode(q, k, v, p, sinks, 0.125, window)
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err < 1e-5, (window, pos, err)
    k[:, :, pos + 1:] = float("nan")  # slots past the position are never read
    if window:
        k[:, :, :max(0, pos - window + 1)] = float("nan")  # nor those before the window
    assert torch.isfinite(attention.triton_decode(q, k, v, p, sinks, 0.125, window)).all(), (window, pos)
print("kernels ok")
"""


def test_decode_kernels_match_the_reference_in_the_interpreter():
    in_triton_interpreter(KERNEL_CHECK, "kernels ok")


def _lse_attention(q, keys, values, pos, kpos, scaling, window):
    """Plain causal (windowed) softmax attention without sinks and its log-sum-exp: what flash returns."""
    g = q.shape[1] // keys.shape[1]
    k, v = keys.repeat_interleave(g, 1), values.repeat_interleave(g, 1)
    allowed = (kpos[None, :] <= pos[:, None]) & (kpos[None, :] > (pos[:, None] - window if window else -1))
    scores = (q @ k.transpose(-1, -2) * scaling).masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, -1) @ v, torch.logsumexp(scores, -1)


@pytest.mark.parametrize("window", [0, 5])
def test_sigmoid_of_lse_minus_sink_makes_plain_attention_the_sink_softmax(window, monkeypatch):
    """flash_prefill's arithmetic with the flash op replaced by its definition: out·sigmoid(lse − sink)
    equals the reference's softmax with the sink in the denominator, on a chunk after a reused prefix."""
    gen = torch.Generator().manual_seed(1)
    b, kv, g, hd, start, t = 2, 2, 3, 8, 7, 6
    q = torch.randn(b, kv * g, t, hd, generator=gen, dtype=torch.float64)
    keys = torch.randn(b, kv, start + t, hd, generator=gen, dtype=torch.float64)
    values = torch.randn(b, kv, start + t, hd, generator=gen, dtype=torch.float64)
    sinks = torch.randn(kv * g, generator=gen, dtype=torch.float64)
    pos, kpos = torch.arange(start, start + t), torch.arange(start + t)

    def flash(q_, k_, v_, *args, **kwargs):  # [b, t, heads, hd] in and out, lse [b, heads, t]
        out, lse = _lse_attention(q_.transpose(1, 2), k_.transpose(1, 2), v_.transpose(1, 2), pos, kpos, 0.3, window)
        return out.transpose(1, 2), lse.float(), None, None, None

    monkeypatch.setattr(torch.ops.aten, "_flash_attention_forward", flash)
    got = attention.flash_prefill(q, keys, values, sinks, 0.3, window)
    want = attention.reference(q, keys, values, pos, kpos, sinks, 0.3, window)
    assert (got - want).abs().max() / want.abs().max() < 1e-6
