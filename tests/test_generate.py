"""Streaming generation on the demo model, loaded on the CPU (through transformers: no unsloth in the chat process)."""

import threading

import pytest
import torch

from engine.harmony import Turn, encode_prompt
from engine.serve.decoder import ReferenceDecoder
from engine.serve.generate import Sampling, complete, stream
from engine.serve.model import ModelLoadError, fast_decoder, load_model
from engine.settings import updated


@pytest.fixture(scope="module")
def lm(demo_model_dir):
    from engine.settings import Settings

    return load_model(Settings())


@pytest.fixture(scope="module", params=["fast", "reference"])
def decoder(lm, request):
    """Both decoders run the same generation loop."""
    from engine.settings import Settings

    if request.param == "reference":
        return ReferenceDecoder(lm.model, lm.max_len)
    fast, note = fast_decoder(lm, Settings())
    assert fast is not None, note
    return fast


def prompt(lm, text="Hello!"):
    return torch.tensor([encode_prompt(lm.tokenizer, [Turn("user", text)])])


def test_loads_the_demo_on_the_cpu(lm):
    assert lm.is_demo and lm.device == "cpu" and lm.quant == "bf16"
    assert type(lm.model).__name__ == "GptOssForCausalLM" and lm.num_experts == 8


def test_stream_yields_channels_and_stats(lm, decoder):
    chunks, reply = [], None
    for events, reply in stream(decoder, lm.tokenizer, prompt(lm), Sampling(greedy=True, max_new_tokens=60)):
        chunks += [text for _, _, text in events]
    assert reply.stats.stop in ("return", "end") and reply.stats.tokens_out > 2
    assert reply.parser.segments[0].channel == "analysis" and reply.parser.final
    assert "".join(chunks) == reply.parser.analysis + reply.parser.final
    assert "<|" not in "".join(chunks)
    s = reply.stats
    assert 0 < s.ttft_s <= s.seconds and s.tokens_per_s > 0 and s.tokens_in > 20


def test_greedy_is_deterministic_and_seeded_sampling_repeats(lm, decoder):
    def run(text, sampling):
        return complete(decoder, lm.tokenizer, prompt(lm, text), sampling).raw

    assert run("Translate to French: water", Sampling(greedy=True, max_new_tokens=40)) == run(
        "Translate to French: water", Sampling(greedy=True, max_new_tokens=40))
    seeded = Sampling(temperature=1.5, top_k=50, top_p=0.9, max_new_tokens=30, seed=1)
    assert run("Hello!", seeded) == run("Hello!", seeded)


def test_max_new_tokens_stops_with_length(lm, decoder):
    r = complete(decoder, lm.tokenizer, prompt(lm), Sampling(greedy=True, max_new_tokens=3))
    assert r.stats.tokens_out == 3 and r.stats.stop == "length"


def test_cancel_mid_stream_stops_within_a_token(lm, decoder):
    cancel = threading.Event()
    n = 0
    reply = None
    for _, reply in stream(decoder, lm.tokenizer, prompt(lm), Sampling(temperature=1.0, max_new_tokens=500, seed=3),
                           cancel):
        n += 1
        if n == 3:
            cancel.set()
    assert reply.stats.stop == "cancelled" and reply.stats.tokens_out == 3


def test_recorded_routes_have_one_entry_per_fed_back_token(lm, decoder):
    r = complete(decoder, lm.tokenizer, prompt(lm), Sampling(greedy=True, max_new_tokens=8), record_experts=True)
    assert r.experts is not None and len(r.experts.indices) == r.stats.tokens_out - 1
    assert r.experts.num_layers == 2 and r.experts.num_experts == 8 and r.experts.top_k == 2


def test_missing_local_model_says_how_to_fix(settings):
    bad = updated(settings, "model.name", "./no-such-model")
    with pytest.raises(ModelLoadError, match=r"\[model\] name"):
        load_model(bad)


def test_a_request_cancelled_before_it_starts_never_runs_the_model(lm, decoder, monkeypatch):
    cancel = threading.Event()
    cancel.set()
    monkeypatch.setattr(decoder, "prefill", lambda ids: pytest.fail("prefilled a cancelled request"))
    replies = [r for _, r in stream(decoder, lm.tokenizer, prompt(lm), Sampling(greedy=True, max_new_tokens=5), cancel)]
    assert replies[-1].stats.stop == "cancelled" and replies[-1].stats.tokens_out == 0
