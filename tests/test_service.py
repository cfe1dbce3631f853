"""The workstation service: settings edited while running reach the objects that use them."""

import pytest

from engine.serve.chat import Finished
from engine.serve.generate import Sampling
from engine.service import Workstation
from engine.settings import updated
from tests.test_tui import app_for, ready, until


@pytest.fixture
def station(settings, demo_model_dir):
    ws = Workstation(settings)
    ws.load(lambda *_: None, lambda _: None, lambda _: None)
    yield ws
    ws.close()


def answer(ws, text, mode):
    for ev in ws.ask(ws.new_conversation(), text, mode=mode, sampling=Sampling(greedy=True, max_new_tokens=8)):
        if isinstance(ev, Finished):
            return ev


def apply(ws, **changes):
    s = ws.settings
    for key, value in changes.items():
        s = updated(s, key.replace("__", "."), value)
    return ws.apply_settings(s)


def test_adapter_settings_apply_live(station, make_adapter):
    make_adapter("one", ["x"], seed=1)
    make_adapter("two", ["y"], seed=2)
    station.engine.refresh_adapters()
    answer(station, "Hello!", "one")
    answer(station, "Hello!", "two")
    assert all(r.resident for r in station.adapters())
    applied = apply(station, adapters__vram_budget_mb=3, adapters__mode="one", adapters__router_threshold=0.9)
    assert set(applied.live) == {"adapters.vram_budget_mb", "adapters.mode", "adapters.router_threshold"}
    assert not applied.restart
    station.engine.worker.call(lambda: None)  # the budget is queued on the worker, not waited for
    assert station.engine.live.budget_bytes == 3 * 2**20  # the residency holds the new budget
    assert station.mode == "one" and station.engine.router.threshold == 0.9
    assert answer(station, "Hello!", None).adapter == "one"  # the pinned mode answers


def test_chat_settings_reach_the_next_reply(station):
    apply(station, chat__max_new_tokens=3, chat__temperature=0.0)
    done = answer_with_defaults(station)
    assert done.reply.stats.tokens_out == 3 and done.reply.stats.stop == "length"
    assert station.history.turn(done.turn_id).stats["tokens_out"] == 3


def answer_with_defaults(ws):
    for ev in ws.ask(ws.new_conversation(), "Hello!"):
        if isinstance(ev, Finished):
            return ev


def test_model_and_paths_wait_for_a_restart(station):
    applied = apply(station, model__max_seq_length=2048, paths__history="elsewhere.db", chat__top_k=5)
    assert applied.restart == ["model.max_seq_length", "paths.history"] and applied.live == ["chat.top_k"]


def test_a_mode_naming_no_adapter_is_refused(station):
    with pytest.raises(Exception, match="no adapter named"):
        apply(station, adapters__mode="ghost")


async def test_settings_screen_edits_apply_in_the_app(settings, demo_model_dir):
    app = app_for(settings)
    async with app.run_test(size=(160, 48)) as pilot:
        await ready(pilot)
        await pilot.press("ctrl+o")
        app.screen.query_one("#chat--reasoning").value = "high"
        app.screen.query_one("#adapters--router_threshold").value = "0.75"
        await pilot.press("ctrl+s")
        await until(pilot, lambda: app.reasoning == "high", timeout=10)
        assert app.service.engine.router.threshold == 0.75
        assert "reasoning high" in str(app.query_one("#chat-status").render())


def test_a_budget_change_does_not_wait_behind_a_reply(station, monkeypatch):
    """Regression: saving settings called set_budget through worker.call, which waited for the whole
    streaming reply (and froze the app, which applied settings on its event loop)."""
    import threading
    import time

    import engine.serve.generate as gen

    sample = gen._sample
    monkeypatch.setattr(gen, "_sample", lambda *a: (time.sleep(0.02), sample(*a))[1])
    it = station.ask(station.new_conversation(), "Hello!", mode="base",
                     sampling=Sampling(greedy=True, max_new_tokens=300))
    next(it)  # the reply holds the worker
    rest = threading.Thread(target=lambda: list(it))
    rest.start()
    started = time.monotonic()
    apply(station, adapters__vram_budget_mb=5)
    assert time.monotonic() - started < 0.5
    rest.join(60)
    station.engine.worker.call(lambda: None)
    assert station.engine.live.budget_bytes == 5 * 2**20


def test_the_load_says_so_while_it_builds_the_router(settings, demo_model_dir, make_adapter):
    """With a specialist, a fresh install's first router embeds the shipped prompts (~1 min on a core):
    the load shows that step before it reports ready, and the router it built knows the specialist."""
    from engine.serve.router import ROUTER_STEP

    make_adapter("math", ["What is 12 * 7?", "Compute 15 + 27.", "How much is 9 squared?"])
    said: list[tuple[str, float]] = []
    ws = Workstation(settings)
    try:
        ws.load(lambda message, fraction: said.append((message, fraction)), lambda _: None, lambda _: None)
        assert ws.engine.router.classes == ["math"]
    finally:
        ws.close()
    step = next(i for i, (m, _) in enumerate(said) if m.startswith(ROUTER_STEP))
    assert step < next(i for i, (_, f) in enumerate(said) if f >= 1.0)
