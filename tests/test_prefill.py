"""Prefill as grouped matmuls over the routed experts: MXFP4 experts dequantized once per layer, the
expert LoRA applied, against the routed-pair path and the model's own forward (CPU, exact fp32)."""

import pytest
import torch

from engine.serve import fast_decode
from engine.serve.fast_decode import FastDecoder
from engine.train.targets import ATTENTION, FUSED_EXPERTS
from tests.conftest import in_triton_interpreter
from tests.test_mxfp4 import tiny_mxfp4_model


@pytest.fixture(scope="module")
def model():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=list(ATTENTION), target_parameters=list(FUSED_EXPERTS),
                     init_lora_weights=False)
    model = get_peft_model(tiny_mxfp4_model(), cfg, adapter_name="math").eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.mul_(10)
    return model


def _prefill(model, ids, grouped_rows, moe_rows, name="math", chunk=12):
    dec = FastDecoder(model, max_len=128, prefill_chunk=chunk)
    dec.select(name)
    old = fast_decode.GROUPED_ROWS, fast_decode.MOE_ROWS
    fast_decode.GROUPED_ROWS, fast_decode.MOE_ROWS = grouped_rows, moe_rows
    try:
        with torch.inference_mode():
            return dec.prefill(ids), dec
    finally:
        fast_decode.GROUPED_ROWS, fast_decode.MOE_ROWS = old


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("name", ["math", None])
def test_grouped_prefill_matches_the_routed_pairs_and_the_model(model, name):
    """Two rows of 50 tokens (past the 16-token sliding window, over several attention chunks and, with
    `moe_rows` 32, several expert passes), with and without the specialist."""
    ids = torch.randint(0, 256, (2, 50), generator=torch.Generator().manual_seed(1))
    grouped, dec = _prefill(model, ids, grouped_rows=1, moe_rows=32, name=name)
    routed, _ = _prefill(model, ids, grouped_rows=10**9, moe_rows=10**9, name=name)
    assert dec.routes[0].shape == (2, 100, 2)  # [layer, row, k]: every prompt row's routing
    with torch.no_grad():
        if name is None:
            with model.disable_adapter():
                ref = model(input_ids=ids).logits[:, -1]
        else:
            ref = model(input_ids=ids).logits[:, -1]
    assert _rel(grouped, routed) < 1e-5
    assert _rel(grouped, ref) < 2e-4  # the model's own fp32 forward sums in another order (see test_mxfp4)


def test_prefill_then_steps_continue_the_same_sequence(model):
    """The cache a grouped, layer-by-layer prefill writes is the one the steps read: a prompt prefilled
    whole and one prefilled short then fed token by token give the same logits."""
    ids = torch.randint(0, 256, (1, 70), generator=torch.Generator().manual_seed(2))
    whole, _ = _prefill(model, ids, grouped_rows=1, moe_rows=32)
    _, dec = _prefill(model, ids[:, :40], grouped_rows=1, moe_rows=32)
    with torch.inference_mode():
        for t in ids[0, 40:].tolist():
            logits = dec.step(torch.tensor([t]))
    # the step after the last prompt token predicts what the whole prompt's prefill does
    assert _rel(logits, whole) < 1e-5


DEQUANT_CHECK = """
import torch
from engine.serve import mxfp4_kernels as K
from engine.serve.mxfp4 import dequantize
from tests.test_mxfp4 import random_mx
gen = torch.Generator().manual_seed(0)
blocks, scales = random_mx((3, 40, 96), gen)
scales[0, 0, 0], scales[1, 2, 1] = 90, 200  # small and large powers of two
for dtype in (torch.float32, torch.bfloat16):
    got = K.triton_dequantize(blocks, scales, dtype)
    assert got.dtype == dtype and got.shape == (3, 40, 96)
    assert torch.equal(got, dequantize(blocks, scales, dtype)), dtype
print("dequantize ok")
"""


def test_dequantizing_kernel_is_exact_in_the_interpreter():
    """The Triton kernel that feeds the grouped matmuls, run by Triton's CPU interpreter: bit-exact."""
    in_triton_interpreter(DEQUANT_CHECK, "dequantize ok")
