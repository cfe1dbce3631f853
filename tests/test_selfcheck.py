"""The self-check passes a correct fast decoder and flags each injected misreading: a wrong nibble order,
swapped gate/up columns and a permuted lora_B."""

import copy

import pytest
import torch

from engine.serve import selfcheck
from engine.serve.decoder import ReferenceDecoder
from engine.serve.fast_decode import FastDecoder
from engine.train.targets import ATTENTION, FUSED_EXPERTS
from tests.test_adapter_shapes import mxfp4_pair


@pytest.fixture(scope="module")
def demo(demo_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dense = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32).eval()
    return dense, mxfp4_pair(dense)[0], AutoTokenizer.from_pretrained(demo_model_dir)


def with_adapter(model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(5)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=list(ATTENTION), target_parameters=list(FUSED_EXPERTS),
                     init_lora_weights=False)
    return get_peft_model(copy.deepcopy(model), cfg, adapter_name="spec").eval()


def verdict(model, tok, adapter=None, fault=None):
    fast = FastDecoder(model, max_len=256)
    if adapter:
        fast.prepare(adapter)
    if fault:
        fault(fast)
    return selfcheck.compare(fast, ReferenceDecoder(model, 256), tok, adapter)


def swap_nibbles(fast):
    for w in fast.layers:
        b = w["down_proj_blocks"]
        w["down_proj_blocks"] = (b << 4) | (b >> 4)


def swap_gate_up(fast):
    for w in fast.layers:
        g = w["gate_up_proj"]
        w["gate_up_proj"] = torch.stack((g[..., 1::2], g[..., ::2]), -1).flatten(-2)


def permute_lora_b(fast):
    for layer in fast.packs["spec"].layers:
        b = layer["gate_up_proj.B"]  # [experts, rank, out]: each expert given another's factor
        layer["gate_up_proj.B"] = b.roll(1, dims=0)


@pytest.mark.parametrize("path", ["bf16", "mxfp4"])
def test_a_correct_fast_decoder_passes(demo, path):
    dense, mx, tok = demo
    model = dense if path == "bf16" else mx
    base = verdict(model, tok)
    assert base.ok and base.worst < base.tolerance and base.seconds < 10, base
    assert base.tolerance == selfcheck.TOLERANCE["float32"] and base.line() == "agrees", base  # a conclusive check
    spec = verdict(with_adapter(model), tok, "spec")
    assert spec.ok, spec


@pytest.mark.parametrize("fault, path, adapter", [
    (swap_nibbles, "mxfp4", None), (swap_gate_up, "bf16", None), (permute_lora_b, "bf16", "spec"),
    (permute_lora_b, "mxfp4", "spec"),
])
def test_each_injected_fault_is_flagged(demo, fault, path, adapter):
    dense, mx, tok = demo
    model = dense if path == "bf16" else mx
    model = with_adapter(model) if adapter else model
    v = verdict(model, tok, adapter, fault)
    assert not v.ok and "self-check" in v.reason and v.worst > 10 * v.tolerance, v
    print(f"{fault.__name__} ({path}): {v.reason} [{v.seconds:.2f} s]")


def test_a_misread_adapter_is_served_by_the_reference_and_the_reply_says_why(engine, make_adapter, monkeypatch):
    from engine.serve.chat import Conversation, Finished
    from engine.serve.generate import Sampling

    make_adapter("spec", ["x"], seed=1, scale=20.0)
    engine.refresh_adapters()
    pack = FastDecoder._pack

    def misread(self, name):
        packed = pack(self, name)
        for layer in packed.layers:
            layer["gate_up_proj.B"] = layer["gate_up_proj.B"].roll(1, dims=0)
        return packed

    monkeypatch.setattr(FastDecoder, "_pack", misread)
    greedy = Sampling(greedy=True, max_new_tokens=12)
    done = next(ev for ev in engine.ask(Conversation(), "Hello!", mode="spec", sampling=greedy)
                if isinstance(ev, Finished))
    assert done.adapter == "spec"
    note = engine.history.turn(done.turn_id).route["note"]
    assert "self-check on adapter spec" in note and "transformers + PEFT answers" in note
    reference = ReferenceDecoder(engine.live.reference.model, 256)
    from engine.harmony import Turn, encode_prompt
    from engine.serve.generate import complete

    ids = torch.tensor([encode_prompt(engine.lm.tokenizer, [Turn("user", "Hello!")])])
    reference.select("spec")
    want = complete(reference, engine.lm.tokenizer, ids, greedy)
    assert done.reply.raw == want.raw  # the weights named are the weights that answered
