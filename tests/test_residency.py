"""A reply names exactly the weights that produced it: residency under a tight budget, and decoders that
refuse adapters they do not hold."""

from engine.serve.chat import Conversation, Finished
from engine.serve.generate import Sampling

GREEDY = Sampling(greedy=True, max_new_tokens=16)


def answer(engine, text, mode):
    for ev in engine.ask(Conversation(), text, mode=mode, sampling=GREEDY):
        if isinstance(ev, Finished):
            return ev


def test_the_incoming_adapter_is_never_the_one_evicted(engine, make_adapter):
    """Regression: the budget used to be checked against the file size alone; the packed copy then pushed
    the total over, and the eviction that followed spared the active adapter, not the incoming one, so
    the new adapter went at once and the base answered under its name."""
    make_adapter("one", ["x"], seed=1, scale=20.0)
    two = make_adapter("two", ["y"], seed=2, scale=20.0)
    engine.refresh_adapters()
    alone = answer(engine, "Hello!", "two").reply.raw
    engine.live.unload("two")
    answer(engine, "Hello!", "one")
    held = sum(b for _, b in engine.live.resident.values())
    engine.live.budget_bytes = held + two.size_bytes + 1024  # the file fits beside "one", its packed copy not
    done = answer(engine, "Hello!", "two")
    assert done.adapter == "two" and done.reply.raw == alone
    assert {r.name: r.resident for r in engine.adapters()} == {"one": False, "two": True}


def test_the_budget_counts_the_packed_copy_before_loading(engine, make_adapter):
    a = make_adapter("one", ["x"], seed=1)
    engine.refresh_adapters()
    _, _, state = engine.live.read("one")
    estimate = engine.live.fast.pack_estimate(state)
    answer(engine, "Hello!", "one")
    assert estimate == engine.live.fast.pack_bytes("one") > 0
    assert engine.live.resident["one"][1] == a.size_bytes + estimate


def test_an_adapter_no_decoder_holds_is_answered_by_the_base_and_recorded_so(engine, make_adapter, monkeypatch):
    """If the adapter is not on the model after all (here: ensure claims success and loads nothing), no
    decoder may take its name: the base answers, the reply and the history say so."""
    make_adapter("one", ["x"], seed=1)
    engine.refresh_adapters()
    base = answer(engine, "Hello!", "base").reply.raw
    monkeypatch.setattr(engine.live, "ensure", lambda name: None)
    logged = []
    engine.on_log(logged.append)
    done = answer(engine, "Hello!", "one")
    assert done.adapter == "base" and done.reply.raw == base
    row = engine.history.turn(done.turn_id)
    assert row.adapter == "base" and "one unavailable" in row.route["note"]
    assert any("adapter one unavailable" in m and "base answers" in m for m in logged)


def test_decoders_refuse_names_they_do_not_hold(engine, make_adapter):
    make_adapter("one", ["x"], seed=1)
    engine.refresh_adapters()
    answer(engine, "Hello!", "one")
    live = engine.live

    def check():
        assert live.reference.select("one") and not live.reference.select("ghost")
        assert live.fast.select("one") and not live.fast.select("ghost") and "ghost" not in live.fast.packs
        assert live.fast.select(None) and live.reference.select(None)
        live.unload("one")
        assert not live.reference.select("one") and not live.fast.select("one")
        import torch

        assert live.reference.select(None)  # the active one was unloaded: the reference still runs the base
        assert live.reference.prefill(torch.tensor([[1, 2, 3]])).shape[-1] == engine.lm.model.config.vocab_size
        live.reference.release()

    engine.worker.call(check)


def test_a_failed_attach_leaves_nothing_on_the_model(engine, make_adapter, monkeypatch):
    """An error while packing (out of memory, say) rolls the half attach back: the adapter is neither on
    the PEFT model nor resident, and the reply says the base answered and why."""
    make_adapter("one", ["x"], seed=1)
    engine.refresh_adapters()

    def boom(name):
        raise RuntimeError("CUDA out of memory (injected)")

    monkeypatch.setattr(engine.live.fast, "prepare", boom)
    done = answer(engine, "Hello!", "one")
    assert done.adapter == "base"
    assert "one" not in (getattr(engine.live.reference.model, "peft_config", None) or {})
    assert "one" not in engine.live.resident
    assert "out of memory (injected)" in engine.history.turn(done.turn_id).route["note"]


def test_one_adapter_larger_than_the_budget_still_serves(engine, make_adapter):
    a = make_adapter("one", ["x"], seed=1, scale=20.0)
    engine.refresh_adapters()
    engine.live.budget_bytes = a.size_bytes // 2
    assert answer(engine, "Hello!", "one").adapter == "one"


def test_the_watcher_survives_any_failure(engine, make_adapter, monkeypatch):
    """Regression: only AdapterError was caught, so an out-of-memory error in attach or an OSError from the
    store scan ended the watcher silently and no new specialist went live until a restart."""
    import time

    live, logged, changes = engine.live, [], []
    engine.on_log(logged.append)
    scan, prepare = live.store.signature, live.fast.prepare
    calls = {"scan": 0}

    def flaky_scan():
        calls["scan"] += 1
        if calls["scan"] == 2:
            raise OSError("disk went away (injected)")
        return scan()

    def oom_for_big(name):  # on the PEFT model already, then out of memory while packing
        if name == "big":
            raise MemoryError("out of memory while capturing graphs (injected)")
        return prepare(name)

    monkeypatch.setattr(live.store, "signature", flaky_scan)
    monkeypatch.setattr(live.fast, "prepare", oom_for_big)
    engine.watch_adapters(changes.append, interval=0.05)

    def wait(cond):
        deadline = time.monotonic() + 30
        while not cond() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert cond()

    wait(lambda: calls["scan"] >= 3)
    assert any("disk went away" in m for m in logged)
    make_adapter("big", ["x"], seed=1)
    wait(lambda: any("big" in str(c.get("failed")) for c in changes))
    assert "MemoryError" in dict(engine.broken_adapters())["big"]
    assert "big" not in live.reference.model.peft_config  # the half attach was rolled back
    make_adapter("small", ["y"], seed=2)
    wait(lambda: any(c.get("added") == ["small"] for c in changes))
    assert {r.name: r.resident for r in engine.adapters()} == {"big": False, "small": True}
