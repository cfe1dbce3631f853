"""MXFP4 experts on the CPU: the format, the experts module under PEFT, the fast decoder over it, and its
kernels in Triton's interpreter, each against the exact fp32 dequantization."""

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.serve.fast_decode import FastDecoder
from engine.serve.mxfp4 import FP4_VALUES, Mxfp4Experts, dequantize, install, quantize
from engine.train.targets import ATTENTION, FUSED_EXPERTS
from tests.conftest import in_triton_interpreter
from tests.tolerance import relative, rounding_bound

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, num_local_experts=8, num_experts_per_tok=2, sliding_window=16, vocab_size=256,
            layer_types=["sliding_attention", "full_attention"], max_position_embeddings=512,
            tie_word_embeddings=False)


def random_mx(shape: tuple[int, ...], gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random blocks and scales for [..., out, in] weights, scales near 2^-4 (weights of order 0.1)."""
    *lead, out, inp = shape
    blocks = torch.randint(0, 256, (*lead, out, inp // 32, 16), dtype=torch.uint8, generator=gen)
    scales = torch.randint(120, 126, (*lead, out, inp // 32), dtype=torch.uint8, generator=gen)
    return blocks, scales


def tiny_mxfp4_model(seed: int = 0):
    """A tiny GPT-OSS in fp32 with random MXFP4 experts."""
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(seed)
    model = GptOssForCausalLM(GptOssConfig(**TINY)).eval()
    gen = torch.Generator().manual_seed(seed)
    for ex in install(model, torch.float32, "cpu"):
        for p in ("gate_up_proj", "down_proj"):
            blocks, scales = random_mx(tuple(getattr(ex, p).shape[:1]) + tuple(getattr(ex, p).shape[:0:-1]), gen)
            getattr(ex, f"{p}_blocks").copy_(blocks)
            getattr(ex, f"{p}_scales").copy_(scales)
            getattr(ex, f"{p}_bias").data.normal_(0, 0.1, generator=gen)
    return model


def test_dequantize_reads_the_e2m1_codes_and_e8m0_scales():
    codes = torch.arange(16, dtype=torch.uint8)
    blocks = (codes | (codes.flip(0) << 4)).repeat(2).view(1, 2, 16)  # one row, two blocks
    scales = torch.tensor([[127, 129]], dtype=torch.uint8)  # 2^0 and 2^2
    row = dequantize(blocks, scales)[0]
    values = torch.tensor(FP4_VALUES)
    expect = torch.stack((values, values.flip(0)), 1).flatten()  # low nibble first
    assert torch.equal(row[:32], expect) and torch.equal(row[32:], 4 * expect)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(1e-3, 1e3))
def test_quantize_rounds_to_the_nearest_value_and_round_trips(seed, scale):
    w = torch.randn(3, 2, 96, generator=torch.Generator().manual_seed(seed)) * scale
    blocks, scales = quantize(w)
    back = dequantize(blocks, scales)
    step = torch.exp2(scales.float() - 127).repeat_interleave(32, -1)
    assert ((back - w).abs() <= step).all()  # within half the widest gap (4 to 6) of the block's grid
    again = quantize(back)
    assert torch.equal(dequantize(*again), back)


def test_experts_module_applies_peft_lora_to_routed_experts():
    """Mxfp4Experts equals GptOssExperts holding the dequantized weights, with and without an expert
    LoRA attached by PEFT to its shape-only stand-ins."""
    from peft import LoraConfig, get_peft_model
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    cfg = GptOssConfig(**TINY)
    gen = torch.Generator().manual_seed(1)
    mx, dense = Mxfp4Experts(cfg, torch.float32), GptOssExperts(cfg)
    for p in ("gate_up_proj", "down_proj"):
        blocks, scales = random_mx((8, *getattr(mx, p).shape[:0:-1]), gen)
        getattr(mx, f"{p}_blocks").copy_(blocks)
        getattr(mx, f"{p}_scales").copy_(scales)
        getattr(dense, p).data = dequantize(blocks, scales).transpose(1, 2).contiguous()
        getattr(mx, f"{p}_bias").data.normal_(generator=gen)
        getattr(dense, f"{p}_bias").data = getattr(mx, f"{p}_bias").data.clone()
    x = torch.randn(5, 64, generator=gen)
    idx = torch.stack([torch.randperm(8, generator=gen)[:2] for _ in range(5)])
    w = torch.softmax(torch.randn(5, 2, generator=gen), -1)
    torch.testing.assert_close(mx(x, idx, w), dense(x, idx, w))
    wrapped = []
    for module, seed in ((mx, 2), (dense, 2)):
        torch.manual_seed(seed)
        holder = torch.nn.ModuleDict({"experts": module})
        lora = LoraConfig(r=4, target_modules=[], target_parameters=["experts.gate_up_proj", "experts.down_proj"],
                          init_lora_weights=False)
        wrapped.append(get_peft_model(holder, lora))
    out_mx, out_dense = (m.base_model.model["experts"](x, idx, w) for m in wrapped)
    assert (out_mx - mx.forward(x, idx, w)).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(out_mx, out_dense)
    assert mx.gate_up_proj.untyped_storage().nbytes() == 4  # the stand-in stays one element


@pytest.mark.parametrize("batch", [1, 2])  # one row: its pairs unsorted; two: sorted by expert
def test_fast_decoder_over_mxfp4_experts_matches_the_reference_with_a_specialist(batch):
    from peft import LoraConfig, get_peft_model

    model = tiny_mxfp4_model()
    torch.manual_seed(3)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=list(ATTENTION), target_parameters=list(FUSED_EXPERTS),
                     init_lora_weights=False)
    model = get_peft_model(model, cfg, adapter_name="math").eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.mul_(10)
    decoder = FastDecoder(model, max_len=128, prefill_chunk=24)
    ids = torch.randint(0, 256, (batch, 40), generator=torch.Generator().manual_seed(0))
    bound = rounding_bound(model, ids)  # from the arithmetic: a fixed 1e-4 failed on some machines
    for name in ("math", None):
        decoder.select(name)
        logits = decoder.prefill(ids)
        seq = ids
        ctx = model.disable_adapter() if name is None else torch.no_grad()
        with ctx, torch.no_grad():
            for _ in range(4):
                ref = model(input_ids=seq).logits[:, -1]
                assert relative(logits, ref) < bound
                nxt = ref.argmax(-1)
                seq = torch.cat([seq, nxt[:, None]], 1)
                logits = decoder.step(nxt)
    assert decoder.pack_bytes("math") > 0


KERNEL_CHECK = """
import torch
from engine.serve import mxfp4_kernels as K
from tests.test_mxfp4 import random_mx
gen = torch.Generator().manual_seed(0)
E, H, I, R, n, k = 4, 64, 96, 16, 3, 2
gb, gs = random_mx((E, 2 * I, H), gen); db, ds = random_mx((E, H, I), gen)
gbias, dbias = torch.randn(E, 2 * I, generator=gen), torch.randn(E, H, generator=gen)
x = torch.randn(n, H, generator=gen)
top_i = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(n)])
experts, perm = torch.sort(top_i.reshape(-1)); rows = perm // k
gate = torch.rand(n * k, generator=gen)
A, B = torch.randn(E, H, R, generator=gen), torch.randn(E, R, 2 * I, generator=gen) * 0.1
A2, B2 = torch.randn(E, I, R, generator=gen), torch.randn(E, R, H, generator=gen) * 0.1
def close(a, b):
    assert ((a - b).abs().max() / b.abs().max()).item() < 1e-5, (a, b)
# xa as the decoder makes it: split from the router's product, rows strided by experts * R + experts
xa = (x @ torch.cat([K.pack_gate_up_a(A), torch.randn(E, H, generator=gen)]).T).split([E * R, E], -1)[0]
assert not xa.is_contiguous()
for xa_, b_, a2_ in ((None, None, None), (xa, B, None), (xa, B, A2), (None, None, A2)):
    act, xd = K.triton_gate_up(x, rows, experts, gb, gs, gbias, xa_, b_, a2_, 1.702, 7.0)
    act_x, xd_x = K.exact_gate_up(x, rows, experts, gb, gs, gbias, xa_, b_, a2_, 1.702, 7.0)
    close(act, act_x)
    if a2_ is None:
        assert xd.numel() == 0 and xd_x.numel() == 0
        continue
    assert xd.shape == (n * k, -(-I // K.BJ), R) and xd_x.shape == (n * k, 1, R)  # a part per tile / one
    close(xd.sum(1), xd_x[:, 0])
    for xd_, b2_ in ((None, None), (xd, B2)):
        close(K.triton_down(act, experts, gate, db, ds, dbias, xd_, b2_),
              K.exact_down(act, experts, gate, db, ds, dbias, xd_x if xd_ is not None else None, b2_))
print("kernels ok")
"""


def test_triton_kernels_match_the_exact_path_in_the_interpreter():
    """The GPU kernels' arithmetic, run by Triton's CPU interpreter (which must be on before triton loads)."""
    in_triton_interpreter(KERNEL_CHECK, "kernels ok")


def test_fast_decoder_rejects_nothing_it_can_run():
    from engine.serve.fast_decode import unsupported

    assert unsupported(tiny_mxfp4_model()) is None


@pytest.mark.parametrize("bad", [0])
def test_quantize_refuses_widths_off_the_block(bad):
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize(torch.zeros(2, 40 + bad))


OFFICIAL_QUANTIZATION = {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                    "model.embed_tokens", "lm_head"], "quant_method": "mxfp4"}


def _checkpoint(folder: Path, model, tokenizer_dir: Path, quantization: dict | None) -> Path:
    """Save `model` as a Hugging Face folder (bf16 tensors, MXFP4 experts as *_blocks/*_scales when it has
    them, as openai/gpt-oss-20b ships them) with the demo tokenizer."""
    import json
    import shutil

    from safetensors.torch import save_file

    folder.mkdir()
    state = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v).contiguous()
             for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    config = model.config.to_dict()
    if quantization:
        config["quantization_config"] = quantization
    (folder / "config.json").write_text(json.dumps(config))
    for f in tokenizer_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, folder / f.name)
    return folder


def _greedy(model, decoder, ids, steps=6):
    """The fast decoder's greedy tokens, each checked against the model's own forward."""
    logits = decoder.prefill(ids)
    with torch.no_grad():
        for _ in range(steps):
            ref = model(input_ids=ids).logits[:, -1]
            assert ((logits - ref).abs().max() / ref.abs().max()).item() < 1e-4
            ids = torch.cat([ids, ref.argmax(-1)[:, None]], 1)
            logits = decoder.step(ids[:, -1])
    return ids


def test_tandem_dequantization_matches_transformers_reader():
    """An independent reader of the format: transformers' own integrations/mxfp4.py, on the same bytes
    (every byte value, scales on both sides of 2^0)."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    gen = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 64, 4, 16), dtype=torch.uint8, generator=gen)
    blocks[0, 0, :, :].view(-1)[:] = torch.arange(64, dtype=torch.uint8)  # low and high nibbles of every code
    scales = torch.randint(100, 150, (3, 64, 4), dtype=torch.uint8, generator=gen)
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # [experts, in, out]
    assert torch.equal(dequantize(blocks, scales), theirs.transpose(1, 2))


def _transformers_dense(folder: Path, served):
    """GptOssForCausalLM holding `folder`'s experts as transformers' MXFP4 reader dequantizes them (the
    rest copied from `served`): what the checkpoint means, read without Tandem's code."""
    from safetensors.torch import load_file
    from transformers import GptOssForCausalLM
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    dense = GptOssForCausalLM(served.config).eval()
    dense.load_state_dict({k: v for k, v in served.state_dict().items() if ".experts." not in k}, strict=False)
    tensors = load_file(str(folder / "model.safetensors"))
    for i, layer in enumerate(dense.model.layers):
        for p in ("gate_up_proj", "down_proj"):
            key = f"model.layers.{i}.mlp.experts.{p}"
            getattr(layer.mlp.experts, p).data = convert_moe_packed_tensors(
                tensors[f"{key}_blocks"], tensors[f"{key}_scales"], dtype=torch.float32)
            getattr(layer.mlp.experts, f"{p}_bias").data = tensors[f"{key}_bias"].float()
    return dense


def test_load_model_reads_the_official_mxfp4_layout(tmp_path, demo_model_dir):
    """The checkpoint's bytes, loaded by Tandem and served by both decoders, give the logits of a dense
    model whose experts transformers' own reader dequantized from the same file."""
    from engine.serve.model import load_model
    from engine.settings import Settings, updated

    written = tiny_mxfp4_model(seed=4)
    folder = _checkpoint(tmp_path / "gpt-oss-mx", written, demo_model_dir, OFFICIAL_QUANTIZATION)
    lm = load_model(updated(Settings(), "model.name", str(folder)))  # serve_in_4bit = "auto"
    assert lm.quant == "mxfp4"
    experts = lm.model.model.layers[1].mlp.experts
    assert isinstance(experts, Mxfp4Experts)
    dense = _transformers_dense(folder, lm.model)
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(0))
    bound = rounding_bound(dense, ids)
    with torch.no_grad():
        assert relative(lm.model(input_ids=ids).logits, dense(input_ids=ids).logits) < bound
    decoder = FastDecoder(lm.model, max_len=64)
    assert relative(decoder.prefill(ids), dense(input_ids=ids).logits[:, -1]) < bound
    tokens = _greedy(lm.model, decoder, ids)
    assert tokens.shape == (1, 26)


def test_bf16_checkpoint_is_quantized_at_load_when_serving_in_4bit(tmp_path, demo_model_dir):
    from transformers import GptOssConfig, GptOssForCausalLM

    from engine.serve.model import load_model
    from engine.settings import Settings, updated

    torch.manual_seed(5)
    dense = GptOssForCausalLM(GptOssConfig(**TINY)).eval()
    folder = _checkpoint(tmp_path / "gpt-oss-bf16", dense, demo_model_dir, None)
    settings = updated(updated(Settings(), "model.name", str(folder)), "model.serve_in_4bit", True)
    lm = load_model(settings)
    assert lm.quant == "mxfp4"
    w = dense.model.layers[0].mlp.experts.gate_up_proj.data[3].to(torch.bfloat16)  # [in, out] as saved
    blocks, scales = quantize(w.T)
    experts = lm.model.model.layers[0].mlp.experts
    assert torch.equal(experts.gate_up_proj_blocks[3], blocks) and torch.equal(experts.gate_up_proj_scales[3], scales)
    _greedy(lm.model, FastDecoder(lm.model, max_len=64), torch.randint(0, 256, (1, 12)))
    auto = load_model(updated(Settings(), "model.name", str(folder)))
    assert auto.quant == "bf16"  # no GPU and a bf16 checkpoint: nothing to gain from 4-bit on the CPU


def test_auto_picks_4bit_only_when_bf16_does_not_fit():
    from transformers import GptOssConfig

    from bench.shapes import gpt_oss_20b_config
    from engine.serve.mxfp4_load import bf16_bytes, serve_quant

    real = gpt_oss_20b_config()
    assert 40e9 < bf16_bytes(real) < 44e9
    assert serve_quant("auto", real, 24 * 2**30) == "mxfp4"
    assert serve_quant("auto", real, 80 * 2**30) == "bf16"
    assert serve_quant(False, real, 24 * 2**30) == "bf16" and serve_quant(True, real, 80 * 2**30) == "mxfp4"
    bnb = GptOssConfig(**TINY)
    bnb.quantization_config = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    assert serve_quant(False, bnb, 24 * 2**30) == "bnb-4bit"


def test_a_bnb_checkpoint_is_refused_by_the_fast_decoder_naming_the_mxfp4_one():
    from engine.serve.fast_decode import unsupported

    model = tiny_mxfp4_model()
    model.config.quantization_config = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    assert "unsloth/gpt-oss-20b" in unsupported(model)


def test_settings_take_true_false_or_auto():
    from engine.settings import Settings, SettingsError, updated

    assert Settings().model.serve_in_4bit == "auto"
    assert updated(Settings(), "model.serve_in_4bit", "false").model.serve_in_4bit is False
    with pytest.raises(SettingsError, match="serve_in_4bit"):
        updated(Settings(), "model.serve_in_4bit", "sometimes")


def test_reference_path_over_mxfp4_never_builds_dense_expert_weights():
    """Regression: PEFT's checked parametrization evaluated W + ΔW once per forward, writing the whole
    [experts, in, out] tensor (1.6 GB a layer at 20B size). Only routed experts' rows may be dequantized."""
    from peft import LoraConfig, get_peft_model
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        biggest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, tuple | list) else [out]:
                if isinstance(t, torch.Tensor):
                    Largest.biggest = max(Largest.biggest, t.numel())
            return out

    model = tiny_mxfp4_model()
    torch.manual_seed(3)
    cfg = LoraConfig(r=4, target_modules=list(ATTENTION), target_parameters=list(FUSED_EXPERTS),
                     init_lora_weights=False)
    model = get_peft_model(model, cfg).eval()
    experts = TINY["num_local_experts"] * TINY["hidden_size"] * 2 * TINY["intermediate_size"]
    with torch.no_grad(), Largest():
        model(input_ids=torch.randint(0, 256, (1, 8)))
    assert 0 < Largest.biggest < experts // 4
