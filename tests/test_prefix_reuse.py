"""Prefix (KV) reuse across turns, on the demo model in fp32: a prompt that starts with what the cache
holds computes only its new tokens, and its teacher-forced logits equal a fresh prefill's."""

import pytest

from engine.serve.decoder import ReferenceDecoder
from engine.serve.fast_decode import FastDecoder
from tests.test_fast_decode import _random_lora


@pytest.fixture(scope="module")
def model(demo_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32).eval()
    model = _random_lora(_random_lora(base, "math", seed=1), "code", seed=2)
    yield model
    model.unload()


def _decoder(kind, model):
    return FastDecoder(model, max_len=512, prefill_chunk=40) if kind == "fast" else ReferenceDecoder(model, 512)


def _forced(dec, ids, then):
    """Logits of the prompt's last position, then of each token of `then` fed one at a time."""
    import torch

    with torch.inference_mode():
        out = [dec.prefill(ids)]
        for t in then:
            out.append(dec.step(torch.tensor([t] * ids.shape[0])))
    return torch.stack([o[0].clone() for o in out])


def _turn(dec, ids, n):
    """A greedy reply of `n` tokens (fed back, as generation does); the ids the cache now holds."""
    import torch

    with torch.inference_mode():
        logits = dec.prefill(ids)
        fed = ids[0].tolist()
        for _ in range(n):
            nxt = int(logits[0].argmax())
            fed.append(nxt)
            logits = dec.step(torch.tensor([nxt]))
    return fed


def _close(a, b):
    return ((a - b).abs().max() / b.abs().max()).item() < 1e-5


@pytest.mark.parametrize("kind", ["fast", "reference"])
def test_reused_prefix_gives_a_fresh_prefills_logits(model, kind):
    """Turn 2 keeps the system part and turn 1 up to where the renderer changes it (earlier analysis
    dropped), longer than the sliding window (64) and across prefill chunks; then a new user turn."""
    import torch

    dec = _decoder(kind, model)
    dec.select("math")
    gen = torch.Generator().manual_seed(3)
    turn1 = torch.randint(0, 1000, (1, 90), generator=gen)
    fed = _turn(dec, turn1, 12)
    keep = 95  # the prompt and 5 reply tokens; the rest of the reply is rendered differently
    turn2 = torch.tensor([fed[:keep] + torch.randint(0, 1000, (70,), generator=gen).tolist()])
    then = torch.randint(0, 1000, (6,), generator=gen).tolist()
    reused = _forced(dec, turn2, then)
    assert dec.reused == keep + int(turn2[0, keep] == fed[keep])
    fresh_dec = _decoder(kind, model)
    fresh_dec.select("math")
    fresh = _forced(fresh_dec, turn2, then)
    assert fresh_dec.reused == 0
    assert _close(reused, fresh)

    # the same prompt again: everything but its last token is reused, and the logits still match
    again = _forced(dec, turn2, then)
    assert dec.reused == turn2.shape[1] - 1 and _close(again, fresh)


@pytest.mark.parametrize("kind", ["fast", "reference"])
def test_another_adapter_or_the_same_one_reloaded_recomputes(model, kind):
    """Attention LoRA makes keys and values adapter-specific: a switch, or the adapter replaced under the
    same name, starts from nothing."""
    import torch

    dec = _decoder(kind, model)
    ids = torch.randint(0, 1000, (1, 80), generator=torch.Generator().manual_seed(4))
    dec.select("math")
    _turn(dec, ids, 3)
    dec.select("code")
    code = _forced(dec, ids, [5, 6])
    assert dec.reused == 0
    fresh_dec = _decoder(kind, model)
    fresh_dec.select("code")
    assert _close(code, _forced(fresh_dec, ids, [5, 6]))
    dec.select(None)
    base = _forced(dec, ids, [5, 6])
    assert dec.reused == 0 and not _close(base, code)
    if kind == "fast":  # an adapter dropped while the cache is the base's: its pack goes, the cache stays
        dec.forget("math")
        assert "math" not in dec.packs
        _forced(dec, ids, [])
        assert dec.reused == ids.shape[1] - 1
    dec.select("code")
    _forced(dec, ids, [])
    assert dec.reused == 0
    _forced(dec, ids, [])
    assert dec.reused == ids.shape[1] - 1
    if kind == "fast":
        dec.forget("code")  # unloaded, or replaced on disk
    else:
        dec.forget_layers()
    dec.select("code")
    _forced(dec, ids, [])
    assert dec.reused == 0


def test_rows_reuse_only_what_every_row_shares(model):
    import torch

    dec = _decoder("fast", model)
    dec.select("math")
    ids = torch.randint(0, 1000, (2, 60), generator=torch.Generator().manual_seed(5))
    _forced(dec, ids, [1])
    nxt = ids.clone()
    nxt[1, 30:] = (nxt[1, 30:] + 1) % 1000
    _forced(dec, nxt, [])
    assert dec.reused == 30
    _forced(dec, nxt[:1], [])  # another batch size: a new cache
    assert dec.reused == 0


def test_second_turn_of_a_chat_reports_its_reused_tokens(demo_model_dir):
    """Through the generation loop: the second turn's prompt starts with the first turn's, so the fast
    decoder keeps it (the Stats say how much)."""
    import torch

    from engine.harmony import Turn, encode_prompt
    from engine.serve.generate import Sampling, complete
    from engine.serve.model import fast_decoder, load_model
    from engine.settings import Settings

    lm = load_model(Settings())
    dec, _ = fast_decoder(lm, Settings())
    sampling = Sampling(greedy=True, max_new_tokens=30)
    turns = [Turn("user", "What is 2 plus 2?")]
    first = complete(dec, lm.tokenizer, torch.tensor([encode_prompt(lm.tokenizer, turns)]), sampling)
    turns += [Turn("assistant", first.parser.final or "4"), Turn("user", "And 3 plus 3?")]
    ids = torch.tensor([encode_prompt(lm.tokenizer, turns)])
    second = complete(dec, lm.tokenizer, ids, sampling)
    assert 0 < second.stats.tokens_reused < ids.shape[1]
    assert first.stats.tokens_reused < second.stats.tokens_reused


@pytest.mark.parametrize("kind", ["fast", "reference"])
def test_a_forward_that_fails_midway_leaves_nothing_to_reuse(model, kind, monkeypatch):
    """A prefill or step that raises (out of memory, say) may have written part of the cache: the next
    prompt must not trust any of it."""
    import torch

    from engine.serve import fast_decode

    dec = _decoder(kind, model)
    dec.select("math")
    ids = torch.randint(0, 1000, (1, 80), generator=torch.Generator().manual_seed(6))
    _turn(dec, ids[:, :50], 2)
    calls = {"n": 0}

    def failing(*args, **kwargs):  # in the second layer: the first has already written its keys and values
        calls["n"] += 1
        if calls["n"] == (2 if kind == "fast" else 1):
            raise RuntimeError("out of memory")
        return real(*args, **kwargs)

    if kind == "fast":  # every layer's attention
        real = fast_decode._attend
        monkeypatch.setattr(fast_decode, "_attend", failing)
    else:  # the second layer's attention
        layer = model.get_base_model().model.layers[1].self_attn
        real = layer.forward
        monkeypatch.setattr(layer, "forward", failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        _forced(dec, ids, [])
    monkeypatch.undo()
    got = _forced(dec, ids, [7])
    assert dec.reused == 0
    fresh_dec = _decoder(kind, model)
    fresh_dec.select("math")
    assert _close(got, _forced(fresh_dec, ids, [7]))
