"""Every adapter shape on both decoders and both expert formats, against PEFT's logits on the demo model:
attention only, experts only, gate_up only, down only, subsets of q/k/v/o. On the MXFP4 path the ground
truth is PEFT over a dense copy holding the dequantized expert weights, so the reference path over 4-bit
experts (Mxfp4Experts) is checked too, not assumed."""

import copy

import pytest
import torch

from engine.serve.fast_decode import FastDecoder
from engine.serve.mxfp4 import dequantize as mx_dequantize
from engine.serve.mxfp4 import install, quantize
from engine.store.adapter_format import complete_experts
from engine.train.targets import ATTENTION, FUSED_EXPERTS
from tests.tolerance import logits, relative, rounding_bound

GATE_UP, DOWN = FUSED_EXPERTS
BOUNDS: dict[tuple[str, str], float] = {}  # one fp64 reference per adapter and path
SHAPES = {
    "attention": (ATTENTION, []),
    "experts": ([], FUSED_EXPERTS),
    "gateup": ([], [GATE_UP]),
    "down": ([], [DOWN]),
    "k": (["k_proj"], []),
    "o": (["o_proj"], []),
    "qv": (["q_proj", "v_proj"], []),
    "kodown": (["k_proj", "o_proj"], [DOWN]),
    "qgateup": (["q_proj"], [GATE_UP]),
}


def adapter(base, shape, seed=7):
    """(LoraConfig, state dict) of a random adapter of `shape`, as PEFT makes and saves it on its own."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    modules, params = SHAPES[shape]
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=list(modules), target_parameters=list(params),
                     init_lora_weights=False)
    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(base), cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.mul_(4)  # large enough to move the logits well beyond the bound
    return cfg, {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}


def attached(base, made):
    """One PEFT model holding every adapter as the residency attaches it (adapter_format.complete_experts)."""
    from peft import get_peft_model, set_peft_model_state_dict

    model = base
    for name, (cfg, state) in made.items():
        cfg, state = complete_experts(copy.deepcopy(cfg), state)
        if name == next(iter(made)):
            model = get_peft_model(copy.deepcopy(base), cfg, adapter_name=name)
        else:
            model.add_adapter(name, cfg)
        result = set_peft_model_state_dict(model, state, adapter_name=name)
        assert not [k for k in result.unexpected_keys if "lora_" in k]
    return model.eval()


def alone(base, made, name):
    """PEFT with only adapter `name`, as it was made: the ground truth."""
    from peft import get_peft_model, set_peft_model_state_dict

    cfg, state = made[name]
    model = get_peft_model(copy.deepcopy(base), copy.deepcopy(cfg), adapter_name=name)
    set_peft_model_state_dict(model, state, adapter_name=name)
    return model.eval()


def mxfp4_pair(dense):
    """(the demo model with its experts quantized to MXFP4, a dense copy holding the dequantized weights)."""
    mx, deq = copy.deepcopy(dense), copy.deepcopy(dense)
    for ex, layer in zip(install(mx, torch.float32, "cpu"), deq.model.layers, strict=True):
        for p in ("gate_up_proj", "down_proj"):
            w = getattr(layer.mlp.experts, p).data  # [experts, in, out]
            blocks, scales = quantize(w.transpose(1, 2))
            getattr(ex, f"{p}_blocks").copy_(blocks)
            getattr(ex, f"{p}_scales").copy_(scales)
            getattr(ex, f"{p}_bias").data.copy_(getattr(layer.mlp.experts, f"{p}_bias").data)
            w.copy_(mx_dequantize(blocks, scales).transpose(1, 2))
    return mx.eval(), deq.eval()


@pytest.fixture(scope="module")
def models(demo_model_dir):
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32).eval()
    mx, deq = mxfp4_pair(dense)
    made = {shape: adapter(dense, shape) for shape in SHAPES}
    return {"bf16": (attached(dense, made), dense), "mxfp4": (attached(mx, made), deq), "made": made,
            "bf16-base": dense, "mxfp4-base": mx}


CASES = [(shape, False) for shape in SHAPES] + [(shape, True) for shape in ("gateup", "down", "kodown", "qgateup")]


@pytest.mark.parametrize("path", ["bf16", "mxfp4"])
@pytest.mark.parametrize("shape, together", CASES, ids=[f"{s}-{'beside-others' if t else 'alone'}" for s, t in CASES])
def test_both_decoders_match_peft_for_every_adapter_shape(models, path, shape, together):
    """Alone: the adapter as PEFT made it, on its own. Beside others (the shapes that adapt one expert
    weight): extended to both expert weights, as the residency attaches it, on a model holding every
    other shape too."""
    shared, base = models[path]
    truth = alone(base, models["made"], shape)
    served = shared if together else alone(models[f"{path}-base"], models["made"], shape)
    ids = torch.randint(0, 1000, (1, 20), generator=torch.Generator().manual_seed(1))
    with truth.disable_adapter():
        plain = logits(truth, ids)[:, -1]
    want = logits(truth, ids)[:, -1]
    bound = BOUNDS.get((path, shape)) or BOUNDS.setdefault((path, shape), rounding_bound(truth, ids))
    assert relative(want, plain) > 100 * bound  # the adapter matters: matching it means something

    served.set_adapter(shape)
    assert relative(logits(served, ids)[:, -1], want) < bound  # the reference decoder (transformers + PEFT)

    decoder = FastDecoder(served, max_len=64)
    assert decoder.select(shape), decoder.reason
    got = decoder.prefill(ids)
    assert relative(got, want) < bound
    nxt = want.argmax(-1)
    step = decoder.step(nxt)
    assert relative(step, logits(truth, torch.cat([ids, nxt[:, None]], 1))[:, -1]) < bound
