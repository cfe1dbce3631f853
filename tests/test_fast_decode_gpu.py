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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (run on the device)")
@pytest.mark.parametrize("pairs", [4, 32])  # batch 1 and 8, top-4
def test_mxfp4_kernels_at_real_width_match_exact_dequantization(pairs):
    """The Triton routed-expert kernels (with the expert LoRA) against the exact fp32 path over the same
    4-bit weights: in fp32 the two differ only by summation order; in bf16 by the output's rounding."""
    from engine.serve import mxfp4_kernels as K

    gen = torch.Generator(device="cuda").manual_seed(0)
    e, h, i, r = 32, 2880, 2880, 16

    def mx(out, inp):
        blocks = torch.randint(0, 256, (e, out, inp // 32, 16), dtype=torch.uint8, device="cuda", generator=gen)
        return blocks, torch.randint(118, 124, (e, out, inp // 32), dtype=torch.uint8, device="cuda", generator=gen)

    (gb, gs), (db, ds) = mx(2 * i, h), mx(h, i)
    rnd = lambda *s: torch.randn(*s, device="cuda", generator=gen)  # noqa: E731
    gbias, dbias, a, b = rnd(e, 2 * i), rnd(e, h), rnd(e, h, r), rnd(e, r, 2 * i) * 0.05
    a2, b2 = rnd(e, i, r), rnd(e, r, h)
    experts, perm = torch.sort(torch.randint(0, e, (pairs,), device="cuda", generator=gen))
    rows, gate = perm // 4, torch.rand(pairs, device="cuda", generator=gen)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        x = rnd(pairs // 4, h).to(dtype)
        cast = [t.to(dtype) for t in (gbias, dbias, a, b, a2, b2, gate)]
        xa = x @ K.pack_gate_up_a(cast[2]).T
        act = K.triton_gate_up(x, rows, experts, gb, gs, cast[0], xa, cast[3], 1.702, 7.0)
        xd = K.triton_lora_a(act, torch.arange(pairs, device="cuda"), experts, cast[4])
        out = K.triton_down(act, experts, cast[6], db, ds, cast[1], xd, cast[5])
        for got, want in ((xd, K.exact_lora_a(act, torch.arange(pairs, device="cuda"), experts, cast[4])),
                          (act, K.exact_gate_up(x, rows, experts, gb, gs, cast[0], xa, cast[3], 1.702, 7.0)),
                          (out, K.exact_down(act, experts, cast[6], db, ds, cast[1], xd, cast[5]))):
            err = ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
            assert err < tol, (dtype, err)
