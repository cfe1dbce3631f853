"""The fast decoder at the real GPT-OSS-20B width on a GPU, against an fp32 reference (run on the device)."""

import pytest
import torch

from engine.serve.fast_decode import FastDecoder
from engine.train.targets import ATTENTION, FUSED_EXPERTS


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (run on the device)")
def test_real_width_on_gpu_is_within_bf16_noise():
    """A 4-layer slice of the real GPT-OSS-20B width with a rank-16 specialist, bf16, compiled CUDA-graph
    steps: the fast decoder's distance from an fp32 reference must be of the order of the reference's
    own bf16 distance from it (the noise floor of bf16 on this model)."""
    import copy

    from peft import LoraConfig, get_peft_model

    from bench.shapes import random_model

    model = random_model(4)
    torch.manual_seed(1)
    cfg = LoraConfig(r=16, lora_alpha=16, target_modules=list(ATTENTION), target_parameters=list(FUSED_EXPERTS),
                     init_lora_weights=False)
    model = get_peft_model(model, cfg, adapter_name="a").eval()
    exact = copy.deepcopy(model).float()
    decoder = FastDecoder(model, max_len=512)
    decoder.select("a")
    ids = torch.randint(0, 200_000, (1, 300), device="cuda")  # longer than the 128-token sliding window
    fast_err, ref_err = [], []
    with torch.inference_mode():
        logits = decoder.prefill(ids)
        for step in range(8):
            truth = exact(input_ids=ids).logits[:, -1]
            scale = truth.abs().max()
            fast_err.append(((logits.float() - truth).abs().max() / scale).item())
            ref_err.append(((model(input_ids=ids).logits[:, -1].float() - truth).abs().max() / scale).item())
            nxt = truth.argmax(-1)
            ids = torch.cat([ids, nxt[:, None]], 1)
            if step < 7:
                logits = decoder.step(nxt)
    print(f"relative error vs fp32: fast {max(fast_err):.2e}, transformers+PEFT bf16 {max(ref_err):.2e}; "
          f"{decoder.note or 'compiled'}")
    assert not decoder.note
    assert max(fast_err) < 2 * max(ref_err) + 1e-3
