"""The app under a normal hand: screens closed under their workers, failing workers, slow engine
calls kept off the event loop, text from disk shown safely, every action in the palette."""

import json
import threading
import time

import engine.serve.generate as gen
from tests.test_tui import app_for, ready, send, until
from tui.widgets.training import TrainingPanel


def errors(app):
    return [n for n in app._notifications if n.severity == "error"]


async def test_ab_closed_before_both_answers_is_not_an_error(settings, make_adapter, demo_model_dir, monkeypatch):
    """Regression: Esc during F7 made the worker's screen.show hit a removed screen and end the app."""
    make_adapter("math", ["What is 2 plus 2?"], seed=1)
    app = app_for(settings)
    async with app.run_test(size=(160, 48)) as pilot:
        await ready(pilot)
        await send(pilot, "What is 2 plus 2?")
        sample = gen._sample
        monkeypatch.setattr(gen, "_sample", lambda *a: (time.sleep(0.01), sample(*a))[1])
        await pilot.press("f7")
        await pilot.pause(0.2)
        await pilot.press("escape")
        await until(pilot, lambda: not [w for w in app.workers if w.group == "experts" and w.is_running], 60)
        assert app.is_running and type(app.screen).__name__ != "CompareScreen" and errors(app) == []


async def test_a_failing_worker_is_reported_and_the_app_goes_on(settings, make_adapter, demo_model_dir,
                                                                monkeypatch):
    make_adapter("math", ["What is 2 plus 2?"], seed=1)
    app = app_for(settings)
    async with app.run_test(size=(160, 48)) as pilot:
        await ready(pilot)
        await send(pilot, "What is 2 plus 2?")

        def broken(*_a):
            raise RuntimeError("CUDA error: an illegal memory access")

        monkeypatch.setattr(app.service, "answer_with", broken)
        monkeypatch.setattr(app.service, "expert_shift", broken)
        await pilot.press("f7")
        await until(pilot, lambda: errors(app), timeout=20)
        assert "illegal memory access" in errors(app)[0].message and app.is_running
        await pilot.press("escape")
        reply = await send(pilot, "Hello!")  # still answering
        assert reply.meta.tokens_out


async def test_saving_settings_during_a_reply_does_not_block(settings, settings_path, demo_model_dir, monkeypatch):
    """Regression: Save applied the budget through worker.call on the event loop, behind the reply."""
    app = app_for(settings)
    async with app.run_test(size=(160, 48)) as pilot:
        await ready(pilot)
        sample, applied = gen._sample, threading.Event()
        # the reply stays in flight until the save is seen applied (a slowed reply could end first on a busy box)
        monkeypatch.setattr(gen, "_sample", lambda *a: (applied.wait(60), sample(*a))[1])
        await pilot.click("#prompt")
        await pilot.press(*"Tell me a story.", "enter")
        await until(pilot, lambda: app.generating)
        await pilot.press("ctrl+o")
        app.screen.query_one("#adapters--vram_budget_mb").value = "4096"
        await pilot.press("ctrl+s")
        await until(pilot, lambda: app.settings.adapters.vram_budget_mb == 4096, timeout=30)
        assert app.generating  # applied while the reply still streams, not after it
        applied.set()
        await pilot.press("escape")  # Esc still stops it
        await until(pilot, lambda: not app.generating, timeout=10)


async def test_text_from_a_run_is_shown_without_its_escape_sequences(settings, demo_model_dir):
    """Regression: a run error holding an OSC sequence retitled the terminal from the training panel."""
    run = settings.logs_dir / "runs" / "20260101-000000-abcd"
    run.mkdir(parents=True)
    (run / "request.json").write_text(json.dumps({"task": "math", "data": "x.jsonl", "profile": "standard",
                                                  "gpu": 1, "settings": "s.toml", "created": 1.0}))
    (run / "state.json").write_text(json.dumps({"status": "failed", "error": "bad \x1b]0;pwned\x07 path\x1b[2J"}))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "total": 2, "loss": 1.0,
                                                   "warning": "loss \x1b[31mred\x1b[0m"}) + "\n")
    app = app_for(settings)
    async with app.run_test(size=(160, 48)) as pilot:
        await until(pilot, lambda: app.query_one(TrainingPanel).runs)
        await pilot.pause(0.2)
        shown = str(app.query_one("#run-stats").render()) + str(app.query_one("#run-warnings").render())
        assert "bad  path" in shown and "loss red" in shown
        assert "\x1b" not in shown and "\x07" not in shown
        app.notify("title \x1b]0;x\x07 here", title="\x1b[2Jt")
        await until(pilot, lambda: len(app._notifications))
        shown = [(n.message, n.title) for n in app._notifications]
        assert ("title  here", "t") in shown


async def test_the_palette_holds_every_action_with_its_key(settings, demo_model_dir):
    from textual.command import CommandPalette

    app = app_for(settings)
    async with app.run_test(size=(160, 48)) as pilot:
        titles = [c.title for c in app.get_system_commands(app.screen)]
        for word in ("train", "new", "settings", "experts", "report", "reasoning", "help", "roll back", "A/B"):
            assert any(word.lower() in t.lower() for t in titles), word
        assert {"settings (Ctrl+O)", "help (F1)", "stop reply (Esc)", "train a new specialist (n in Training)"} \
            <= set(titles)
        await pilot.press("ctrl+p")
        assert isinstance(app.screen, CommandPalette)
        await pilot.press(*"train a new")
        await pilot.pause(0.5)
        await pilot.press("enter")
        await until(pilot, lambda: type(app.screen).__name__ == "NewRunScreen", timeout=5)


async def test_settings_changed_on_disk_are_not_overwritten_and_reload_is_offered(settings, settings_path,
                                                                                 demo_model_dir):
    from engine import settings as st

    app = app_for(settings)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("ctrl+o")
        st.save(st.updated(st.load(settings_path), "chat.temperature", "0.3"))  # another app saves meanwhile
        app.screen.query_one("#chat--top_p").value = "0.9"
        await pilot.press("ctrl+s")
        await until(pilot, lambda: app.screen.query_one("#reload").display, timeout=10)
        assert "changed on disk" in str(app.screen.query_one("#settings-error").render())
        assert st.load(settings_path).chat.temperature == 0.3
        await pilot.click("#reload")
        await pilot.pause(0.2)
        assert app.screen.query_one("#chat--temperature").value == "0.3"
        app.screen.query_one("#chat--top_p").value = "0.9"
        await pilot.press("ctrl+s")
        await until(pilot, lambda: app.settings.chat.top_p == 0.9, timeout=10)
        assert st.load(settings_path).chat.temperature == 0.3


def test_reply_labels_count_right():
    from tui.widgets.chat import ReplyMeta

    one = ReplyMeta("base", "pinned", ttft_s=0.1, tokens_per_s=1.0, tokens_out=1, stop="return").line()
    assert "· 1 token" in one and "1 tokens" not in one
    cut = ReplyMeta("base", "pinned", ttft_s=0.1, tokens_per_s=1.0, tokens_out=9, stop="length").line()
    assert "max_new_tokens" in cut and "9 tokens" in cut


def test_the_report_counts_corrections(tmp_path):
    """Regression: F8 said 'correction rate 0' after two corrections (a rate rounded away)."""
    from engine.store.history import History
    from engine.train.learning import report
    from tui.screens.review import report_markdown

    h = History(tmp_path / "h.db")
    conv = h.new_conversation()
    for i in range(1200):
        t = h.start_turn(conv, f"q{i}", "base", {}, {})
        if i < 2:
            h.correct(t, "better")
    r = report(h)
    assert r["corrections"] == 2
    assert "1200 turns" in report_markdown(r) and "2 corrected replies (0.2% of turns)" in report_markdown(r)
