"""Streaming generation on the demo model, loaded through unsloth's CPU path."""

import threading
import time

import pytest

from engine.harmony import Turn, render_prompt
from engine.serve.generate import Sampling, complete, stream
from engine.serve.model import ModelLoadError, load_model
from engine.settings import updated


@pytest.fixture(scope="module")
def lm(demo_model_dir):
    from engine.settings import Settings

    return load_model(Settings())


def prompt(text="Hello!"):
    return render_prompt([Turn("user", text)])


def test_loads_through_unsloth_cpu_fallback(lm):
    assert lm.is_demo and lm.device == "cpu" and not lm.quantized
    assert type(lm.model).__name__ == "GptOssForCausalLM" and lm.num_experts == 8


def test_stream_yields_channels_and_stats(lm):
    chunks, reply = [], None
    for events, reply in stream(lm, prompt(), Sampling(greedy=True, max_new_tokens=60)):
        chunks += [text for _, _, text in events]
    assert reply.stats.stop in ("return", "end") and reply.stats.tokens_out > 2
    assert reply.parser.segments[0].channel == "analysis" and reply.parser.final
    assert "".join(chunks) == reply.parser.analysis + reply.parser.final
    assert "<|" not in "".join(chunks)
    s = reply.stats
    assert 0 < s.ttft_s <= s.seconds and s.tokens_per_s > 0 and s.tokens_in > 20


def test_greedy_is_deterministic_and_seeded_sampling_repeats(lm):
    a = complete(lm, prompt("Translate to French: water"), Sampling(greedy=True, max_new_tokens=40))
    b = complete(lm, prompt("Translate to French: water"), Sampling(greedy=True, max_new_tokens=40))
    assert a.raw == b.raw
    c = complete(lm, prompt(), Sampling(temperature=1.5, top_k=50, top_p=0.9, max_new_tokens=30, seed=1))
    d = complete(lm, prompt(), Sampling(temperature=1.5, top_k=50, top_p=0.9, max_new_tokens=30, seed=1))
    assert c.raw == d.raw


def test_max_new_tokens_stops_with_length(lm):
    r = complete(lm, prompt(), Sampling(greedy=True, max_new_tokens=3))
    assert r.stats.tokens_out == 3 and r.stats.stop == "length"


def test_cancel_mid_stream_stops_within_a_token_and_releases_the_lock(lm):
    cancel = threading.Event()
    n = 0
    reply = None
    for _, reply in stream(lm, prompt(), Sampling(temperature=1.0, max_new_tokens=500, seed=3), cancel):
        n += 1
        if n == 3:
            cancel.set()
    assert reply.stats.stop == "cancelled" and reply.stats.tokens_out == 3
    assert lm.lock.acquire(timeout=1)
    lm.lock.release()


def test_generation_holds_the_lock(lm):
    """A swap (which takes the same lock) waits until the reply is done."""
    it = stream(lm, prompt(), Sampling(greedy=True, max_new_tokens=20))
    next(it)
    got = []
    t = threading.Thread(target=lambda: got.append(lm.lock.acquire(timeout=5)) or lm.lock.release())
    t.start()
    time.sleep(0.2)
    assert not got  # still blocked while the generator is suspended mid-reply
    for _ in it:
        pass
    t.join(5)
    assert got == [True]


def test_missing_local_model_says_how_to_fix(settings):
    bad = updated(settings, "model.name", "./no-such-model")
    with pytest.raises(ModelLoadError, match=r"\[model\] name"):
        load_model(bad)
