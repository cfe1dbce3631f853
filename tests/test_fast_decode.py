"""The fast decoder against the reference (transformers + PEFT) forward, on the demo model in fp32."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.harmony import Turn
from engine.serve.fast_decode import FastDecoder, unsupported
from engine.serve.generate import Detokenizer, Sampling, complete
from engine.train.targets import ATTENTION, FUSED_EXPERTS
from tests.tolerance import rounding_bound


@pytest.fixture(scope="module")
def base(demo_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32).eval()


def _random_lora(model, name, seed, modules=ATTENTION, params=FUSED_EXPERTS, rank=4):
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(r=rank, lora_alpha=8, target_modules=list(modules), target_parameters=list(params),
                     init_lora_weights=False)
    if isinstance(model, PeftModel):
        model.add_adapter(name, cfg)
    else:
        model = get_peft_model(model, cfg, adapter_name=name)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if f"lora_A.{name}." in n or f"lora_B.{name}." in n:
                p.mul_(20)  # large enough to move the logits well beyond the tolerance below
    return model.eval()


def _reference(model, ids):
    import torch

    with torch.no_grad():
        return model(input_ids=ids).logits[:, -1]


def _max_error(model, decoder, ids, steps=6):
    """Greedy-extend `ids` through the decoder: (worst logit difference from the full reference forward,
    relative to the largest reference logit; tests/tolerance.py's bound for it over the whole sequence).
    The deliberately large random adapters make fp32 itself this noisy: against an fp64 reference,
    transformers+PEFT in fp32 and this decoder are both ~1e-5 off; a wrong block or scale is off by 1e-1
    and more."""
    import torch

    def error(logits, ids):
        ref = _reference(model, ids)
        return ((logits - ref).abs().max() / ref.abs().max()).item()

    logits = decoder.prefill(ids)
    worst = error(logits, ids)
    for _ in range(steps):
        nxt = logits.argmax(-1)
        ids = torch.cat([ids, nxt[:, None]], 1)
        logits = decoder.step(nxt)
        worst = max(worst, error(logits, ids))
    return worst, max(5e-4, rounding_bound(model, ids))


def _router_gap(model, ids) -> float:
    """The smallest gap, over every layer and position, between the k-th and the (k+1)-th router logit. A
    top-k choice is discontinuous: where two experts tie to within fp32 noise, the reference and the
    decoder may each pick a different one and both be right, so a comparison only means something away
    from ties."""
    import torch

    k = model.config.num_experts_per_tok
    with torch.no_grad():
        layers = model(input_ids=ids, output_router_logits=True).router_logits
    return min((top[..., k - 1] - top[..., k]).min().item()
               for top in (logits.float().topk(k + 1, dim=-1).values for logits in layers))


def _clear_prompt(model, names, shape, min_gap=1e-4):
    """The first seeded prompt whose routing has no near-tie under any of `names` (None: the base)."""
    import torch

    for seed in range(200):
        ids = torch.randint(0, 1000, shape, generator=torch.Generator().manual_seed(seed))
        gaps = []
        for name in names:
            if name is None:
                with model.disable_adapter():
                    gaps.append(_router_gap(model, ids))
            else:
                model.set_adapter(name)
                gaps.append(_router_gap(model, ids))
        if min(gaps) > min_gap:
            return ids
    raise AssertionError("no prompt without a routing near-tie in 200 seeds")


def compare_with_and_without_specialists(base) -> None:
    """Prompts longer than the sliding window (64) and than a prefill chunk, two rows in lockstep."""
    decoder = FastDecoder(base, max_len=512, prefill_chunk=40)
    model = _random_lora(base, "math", seed=1)
    model = _random_lora(model, "code", seed=2)
    model = _random_lora(model, "part", seed=4, modules=["q_proj", "v_proj"], rank=2)  # k not adapted: a zero block
    names = [None, "math", "code", "part"]
    try:
        ids = _clear_prompt(model, names, (2, 100))
        with model.disable_adapter():
            plain = _reference(model, ids)
        model.set_adapter("math")
        assert (_reference(model, ids) - plain).abs().max().item() > 0.1  # the adapter matters
        for name in names:
            decoder.select(name)
            assert decoder.usable
            # the bound grows where the fp32 reference itself is far from fp64 (a routing near-tie some
            # generated token or a ×20 adapter lands on): both sides may then pick either expert
            if name is None:
                with model.disable_adapter():
                    worst, bound = _max_error(model, decoder, ids)
            else:
                model.set_adapter(name)
                worst, bound = _max_error(model, decoder, ids)
            assert worst < bound, (name, worst, bound)
    finally:
        model.unload()  # give the module-scoped base model back without LoRA layers


def test_matches_reference_with_and_without_a_specialist(demo_model_dir):
    """Run in a fresh interpreter: other tests in a worker import unsloth, which swaps transformers'
    GPT-OSS classes process-wide, and a demo model loaded after that routes on weights it never read."""
    import os
    import subprocess
    import sys

    code = ("import torch; from transformers import AutoModelForCausalLM; "
            "from tests.test_fast_decode import compare_with_and_without_specialists as run; torch.manual_seed(0); "
            f"run(AutoModelForCausalLM.from_pretrained({str(demo_model_dir)!r}, dtype=torch.float32).eval())")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def test_refuses_what_it_cannot_run(base):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, vocab_size=64))
    assert "llama" in unsupported(llama)
    with pytest.raises(ValueError, match="does not apply"):
        FastDecoder(llama, max_len=64)
    from peft import LoraConfig

    model = _random_lora(base, "wide", seed=3)
    model.add_adapter("head", LoraConfig(r=4, target_modules=["lm_head"]))
    try:
        decoder = FastDecoder(model, max_len=64)
        decoder.select("head")
        assert not decoder.usable and "besides attention and experts" in decoder.reason
        decoder.select("wide")
        assert decoder.usable
        with pytest.raises(ValueError, match="does not fit"):
            decoder.prefill(torch.zeros((1, 70), dtype=torch.long))
    finally:
        model.unload()


def test_engine_streams_the_same_tokens_either_way(demo_model_dir):
    import torch

    from engine.harmony import encode_prompt
    from engine.serve.decoder import ReferenceDecoder
    from engine.serve.model import fast_decoder, load_model
    from engine.settings import Settings

    lm = load_model(Settings())
    fast_dec, note = fast_decoder(lm, Settings())
    assert fast_dec is not None and not note
    ids = torch.tensor([encode_prompt(lm.tokenizer, [Turn("user", "What is 2 plus 2?")])])
    sampling = Sampling(greedy=True, max_new_tokens=40)
    fast = complete(fast_dec, lm.tokenizer, ids, sampling, record_experts=True)
    reference = complete(ReferenceDecoder(lm.model, lm.max_len), lm.tokenizer, ids, sampling, record_experts=True)
    assert fast.stats.tokens_out > 5 and len(fast.experts.indices) == fast.stats.tokens_out - 1
    assert fast.raw == reference.raw and fast.stats.tokens_out == reference.stats.tokens_out
    assert fast.experts.indices == reference.experts.indices


def test_fast_decode_setting_turns_it_off(demo_model_dir):
    from engine.serve.model import fast_decoder, load_model
    from engine.settings import Settings, updated

    off = updated(Settings(), "model.fast_decode", False)
    fast, note = fast_decoder(load_model(off), off)
    assert fast is None and "fast_decode is off" in note


@pytest.fixture(scope="module")
def tokenizer(demo_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_model_dir)


@settings(max_examples=60, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list("ab 12+\n.é€🙂ü<|>")), max_size=40))
def test_detokenizer_deltas_add_up_to_the_full_decode(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False).input_ids
    detok = Detokenizer(tokenizer)
    assert "".join(detok.push(i) for i in ids) == tokenizer.decode(ids, skip_special_tokens=False)



def test_attention_lora_is_merged_for_the_selected_adapter_and_remerged_on_a_switch(base):
    """The buffers a step reads hold W + PEFT's own delta for the selected adapter, a switch refills them
    (back and forth gives the same logits), the base weights stay untouched, and the shared buffers are
    not counted in any one adapter's packed bytes."""
    import torch
    from peft import get_peft_model_state_dict

    model = _random_lora(_random_lora(base, "one", seed=5), "two", seed=6, modules=["q_proj", "o_proj"], rank=2)
    try:
        decoder = FastDecoder(model, max_len=64)
        layer = model.get_base_model().model.layers[1].self_attn
        q, o = layer.q_proj, layer.o_proj
        base_q = q.get_base_layer().weight.detach().clone()
        ids = torch.randint(0, 100, (1, 12), generator=torch.Generator().manual_seed(0))
        logits = {}
        for name in ("one", "two", "one"):
            decoder.select(name)
            decoder.reuse = False
            logits.setdefault(name, []).append(decoder.prefill(ids).clone())
            merged = decoder.active.layers[1]
            with torch.no_grad():
                torch.testing.assert_close(merged["qkv.W"][:q.out_features], base_q + q.get_delta_weight(name))
                torch.testing.assert_close(merged["o_proj.W"], o.get_base_layer().weight + o.get_delta_weight(name))
        assert torch.equal(logits["one"][0], logits["one"][1])
        assert (logits["one"][0] - logits["two"][0]).abs().max() > 1e-3
        assert torch.equal(q.get_base_layer().weight, base_q)
        decoder.select(None)
        assert torch.equal(decoder.layers[1]["qkv_w"][:q.out_features], base_q)
        shared = decoder.merged_bytes
        assert shared == sum(4 * w[k].numel() for w in decoder.layers for k in ("qkv_w", "o_proj_w"))
        for name in ("one", "two"):
            state = get_peft_model_state_dict(model, adapter_name=name)
            assert decoder.pack_bytes(name) == decoder.pack_estimate(state)
    finally:
        model.unload()
