"""The opt-in 8-bit lm_head: its quantization, its Triton kernel in the interpreter against the exact path,
and the fast decoder with it on (within the int8 rounding bound of the checkpoint's head) and off (unchanged)."""

import pytest
import torch
import triton

from engine.serve.fast_decode import FastDecoder, _unwrap
from engine.serve.lm_head8 import Int8Head, dequantize, error_bound, exact_logits, logits, quantize
from tests.conftest import in_triton_interpreter


def test_quantize_rounds_each_row_to_its_own_scale():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(40, 30, generator=gen) * torch.logspace(-3, 2, 40)[:, None]  # rows of very different sizes
    w[7] = 0
    codes, scales = quantize(w.to(torch.bfloat16))
    assert codes.dtype == torch.int8 and codes.shape == (40, 32) and not codes[:, 30:].any()  # padded to 4
    assert codes.abs().max() == 127 and (codes.abs().amax(1)[torch.arange(40) != 7] == 127).all()
    assert not codes[7].any() and scales[7] == 1  # a row of zeros: no division by zero, logits 0
    err = (dequantize(codes, scales, 30) - w.to(torch.bfloat16).float()).abs()
    assert (err <= scales[:, None] / 2 * (1 + 1e-6)).all()
    x = torch.randn(3, 30, generator=gen)
    y = exact_logits(x, codes, scales)
    assert (y[:, 7] == 0).all() and ((y - x @ w.T).abs() <= error_bound(x, scales) + 1e-4).all()


KERNEL_CHECK = """
import torch
import triton
from engine.serve import lm_head8 as H

gen = torch.Generator().manual_seed(1)
for vocab, hidden, rows in ((100, 64, 1), (77, 30, 3), (5, 258, 2), (33, 4, 1)):
    w = torch.randn(vocab, hidden, generator=gen)
    w[vocab // 2] = 0
    codes, scales = H.quantize(w)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(rows, hidden, generator=gen).to(dtype)
        got, want = H.triton_logits(x, codes, scales), H.exact_logits(x, codes, scales)
        assert got.dtype == dtype and got.shape == (rows, vocab), (got.dtype, got.shape)
        tol = 1e-5 if dtype == torch.float32 else 2**-7
        err = ((got.float() - want.float()).abs() / (want.float().abs() + 1)).max().item()
        assert err <= tol, (vocab, hidden, rows, dtype, err)
print("kernel ok")
"""


def test_triton_kernel_matches_the_exact_path_in_the_interpreter():
    """The GPU kernel's arithmetic (codes placed into fp32 mantissas, masked tails of rows and columns),
    run by Triton's CPU interpreter (which must be on before triton loads)."""
    in_triton_interpreter(KERNEL_CHECK, "kernel ok")


@pytest.fixture(scope="module")
def base(demo_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32).eval()


def test_off_leaves_the_checkpoint_head(base):
    off = FastDecoder(base, max_len=32)
    on = FastDecoder(base, max_len=32, lm_head_8bit=True)
    x = torch.randn(2, base.config.hidden_size)
    assert off.head8 is None and torch.equal(off._logits(x), _unwrap(base.lm_head)(x))
    assert isinstance(on.head8, Int8Head) and torch.equal(on._logits(x), logits(x, on.head8.codes, on.head8.scales))
    ids = torch.tensor([[1, 50, 300, 7]])
    assert torch.equal(off.prefill(ids), FastDecoder(base, max_len=32).prefill(ids))


def _clear(top: torch.Tensor, bound: torch.Tensor) -> bool:
    """Whether the int8 head cannot change this row's argmax: the top two logits further apart than both
    of their rounding bounds together."""
    values, index = top.topk(2)
    return bool(values[0] - values[1] > bound[index].sum())


def test_decoder_logits_stay_within_the_rounding_bound(base):
    """Teacher-forced on the bf16 head's greedy tokens: every 8-bit logit within its bound, and the same
    argmax wherever the margin is clear; then free-running greedy decoding with the 8-bit head gives the
    same tokens while the margins stay clear."""
    ref, dec = FastDecoder(base, max_len=64), FastDecoder(base, max_len=64, lm_head_8bit=True)
    head, seen = dec.head8, []
    dec.head8 = lambda last: (seen.append(last.clone()), head(last))[1]  # the hidden state the head reads
    steps, clear, tokens, prompt = 12, [], [], torch.tensor([[200, 201, 5, 9]])
    want, got = ref.prefill(prompt), dec.prefill(prompt)
    for _ in range(steps):
        bound = error_bound(seen[-1], head.scales)
        with torch.inference_mode():  # both decoders fed their heads the same rows
            assert torch.equal(want, _unwrap(base.lm_head)(seen[-1]))
        assert ((got - want).abs() <= bound * (1 + 1e-5) + 1e-5).all()
        clear.append(_clear(want[0], bound[0]))
        if clear[-1]:
            assert got.argmax() == want.argmax()
        tokens.append(want.argmax(-1))
        want, got = ref.step(tokens[-1]), dec.step(tokens[-1])
    run = clear.index(False) if False in clear else steps  # the leading steps whose margins are clear
    assert run >= 4, clear  # the greedy check below covers a few steps
    dec.head8 = head
    greedy = [dec.prefill(prompt).argmax(-1)]
    for _ in range(run - 1):
        greedy.append(dec.step(greedy[-1]).argmax(-1))
    assert torch.equal(torch.cat(greedy), torch.cat(tokens[:run]))


def test_the_setting_reaches_the_decoder(demo_model_dir, settings):
    from engine.serve.model import fast_decoder, load_model
    from engine.settings import updated

    assert settings.model.lm_head_8bit is False  # the shipped file: the checkpoint's own head
    on = updated(settings, "model.lm_head_8bit", True)
    fast, note = fast_decoder(load_model(on), on)
    assert isinstance(fast.head8, Int8Head) and not note


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_kernel_at_the_real_shape_on_the_gpu_and_in_a_graph():
    """The kernel at GPT-OSS-20B's lm_head shape (bf16, as served) against the exact path, eagerly and
    replayed from a CUDA graph."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    w = (torch.randn(201088, 2880, generator=gen, device="cuda") * 0.02).to(torch.bfloat16)
    head = Int8Head(*quantize(w), None)
    x = torch.randn(3, 2880, generator=gen, device="cuda").to(torch.bfloat16)
    want = exact_logits(x.cpu(), head.codes.cpu(), head.scales.cpu()).float()
    graph = torch.cuda.CUDAGraph()
    head(x)  # compiles the kernel outside capture
    with torch.cuda.graph(graph):
        out = head(x)
    graph.replay()
    for got in (head(x), out):
        assert got.dtype == torch.bfloat16
        assert ((got.cpu().float() - want).abs() <= want.abs() * 2**-6 + 1e-3).all()  # a bf16 rounding either way


@pytest.mark.parametrize("arch", [86, 90])
def test_kernel_builds_for_ampere_and_hopper(arch):
    """Compiled to a cubin for sm_86 (RTX 3090) and sm_90 (H100) without a GPU: no FP8, TMA or wgmma, the
    codes read with 16-byte loads and no integer-to-float conversion per value."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from engine.serve import lm_head8

    aligned = [["tt.divisibility", 16]]  # as Triton specializes the real shapes (pointers, K = 2,880, 720 words)
    src = ASTSource(fn=lm_head8._logits_kernel, constexprs={"BN": lm_head8.BN, "BKW": lm_head8.BKW},
                    signature={"x_ptr": "*bf16", "w_ptr": "*i32", "s_ptr": "*fp32", "out_ptr": "*bf16", "V": "i32",
                               "K": "i32", "KW": "i32", "BN": "constexpr", "BKW": "constexpr"},
                    attrs={(i,): aligned for i in (0, 1, 2, 3, 5, 6)})
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": lm_head8.WARPS})
    ptx = kernel.asm["ptx"]
    assert kernel.asm["cubin"] and "ld.global.v4.b32" in ptx
    assert not any(op in ptx for op in ("wgmma", "cp.async.bulk", "e4m3", "e5m2", "cvt.rn.f32.s32", "cvt.rn.f32.u32"))


def test_the_self_check_allows_the_8bit_heads_rounding_and_nothing_more(base, demo_model_dir):
    """With the 8-bit head on, the self-check (which picks the fast decoder over the reference) allows each
    logit its rounding bound: a correct decoder passes, a misread checkpoint is still flagged, and its verdict
    is cached apart from the bf16 head's."""
    from transformers import AutoTokenizer

    from engine.serve import selfcheck
    from engine.serve.decoder import ReferenceDecoder
    from tests.test_selfcheck import swap_gate_up

    tok = AutoTokenizer.from_pretrained(demo_model_dir)
    fast = FastDecoder(base, max_len=256, lm_head_8bit=True)
    good = selfcheck.compare(fast, ReferenceDecoder(base, 256), tok, None)
    assert good.ok and good.line() == "agrees", good
    swap_gate_up(fast)
    bad = selfcheck.compare(fast, ReferenceDecoder(base, 256), tok, None)
    assert not bad.ok and bad.worst > 10 * bad.tolerance, bad
    lm = type("LM", (), {"name": "m", "quant": None, "device": "cpu"})()
    assert selfcheck.identity(lm, None, None) != selfcheck.identity(lm, None, None, head8=True)
