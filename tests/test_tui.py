"""The app driven by Pilot: real engine on the demo model, real training processes."""

import subprocess
import sys
import threading
import time

import pytest

import engine.serve.generate as gen
import tests.fake_nvml as fake_nvml
from engine.telemetry import Telemetry
from tui.app import TandemApp
from tui.widgets.chat import ChatPanel
from tui.widgets.switcher import SpecialistSwitcher


def app_for(settings, nvml=fake_nvml):
    app = TandemApp(settings, telemetry=Telemetry(nvml, fake_nvml.fixed_host), poll_s=0.3)
    app.preset = "precise"  # greedy: what a test asserts of a reply must not depend on sampling luck
    return app


async def until(pilot, predicate, timeout=120.0, step=0.1):
    waited = 0.0
    while not predicate():
        await pilot.pause(step)
        waited += step
        if waited > timeout:
            raise TimeoutError("condition not reached")


async def ready(pilot):
    await until(pilot, lambda: pilot.app.service.ready or pilot.app.load_error)
    assert not pilot.app.load_error


async def send(pilot, text):
    await pilot.click("#prompt")
    await pilot.press(*text, "enter")
    await until(pilot, lambda: pilot.app.query_one(ChatPanel).last_reply is not None)
    await until(pilot, lambda: not pilot.app.generating and not pilot.app.pending)
    return pilot.app.query_one(ChatPanel).last_reply


def test_tui_does_not_import_torch():
    code = "import sys, tui.app; assert 'torch' not in sys.modules, 'torch imported'; print('ok')"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "ok", r.stderr


async def test_prompt_before_ready_waits_then_streams(settings, demo_model_dir):
    from engine.serve.chat import Engine

    release = threading.Event()

    class SlowLoadingEngine(Engine):
        def load(self, progress=None):
            release.wait(60)  # the model is still loading while the user types
            super().load(progress)

    app = TandemApp(settings, telemetry=Telemetry(fake_nvml, fake_nvml.fixed_host), poll_s=0.3,
                    engine_factory=SlowLoadingEngine)
    app.preset = "precise"  # greedy: the reply's structure does not depend on sampling luck
    async with app.run_test(size=(160, 48)) as pilot:
        await pilot.press(*"Hello!", "enter")
        assert not app.service.ready and list(app.pending) == ["Hello!"]
        assert "waiting for the model" in str(app.query_one("#chat-status").render())
        release.set()
        await until(pilot, lambda: app.query_one(ChatPanel).last_reply is not None
                    and app.query_one(ChatPanel).last_reply.meta.tokens_per_s is not None)
        reply = app.query_one(ChatPanel).last_reply
        assert reply.final and reply.meta.adapter == "base" and reply.meta.tokens_out > 0
        assert "tok/s" in reply.meta.line()
        assert reply.analysis  # the analysis channel arrived too, in its own box


async def test_reasoning_toggle_stop_and_new_conversation(settings, demo_model_dir, monkeypatch):
    app = app_for(settings)
    async with app.run_test(size=(160, 48)) as pilot:
        await ready(pilot)
        await pilot.press("ctrl+r")
        assert app.reasoning == "medium"
        for preset in ("balanced", "creative", "precise"):
            await pilot.press("ctrl+g")
            assert app.preset == preset
        reply = await send(pilot, "Translate to French: water")
        assert reply.query_one("Collapsible").collapsed
        await pilot.press("ctrl+t")
        assert not reply.query_one("Collapsible").collapsed
        # a slow "GPU": every token takes 0.2 s, so the reply is still streaming when Esc comes
        sample = gen._sample
        monkeypatch.setattr(gen, "_sample", lambda *a: (time.sleep(0.2), sample(*a))[1])
        await pilot.click("#prompt")
        await pilot.press(*"Tell me a joke.", "enter")
        await until(pilot, lambda: app.generating and app.query_one(ChatPanel).last_reply.meta.adapter)
        await pilot.press("escape")
        await until(pilot, lambda: not app.generating, timeout=5)
        monkeypatch.undo()
        meta = app.query_one(ChatPanel).last_reply.meta
        assert meta.stop == "cancelled" and "stopped" in meta.line() and meta.tokens_out < 10
        await pilot.press("ctrl+n")
        await pilot.pause(0.2)
        assert app.query_one(ChatPanel).last_reply is None and app.conversation.turns == []


async def test_switcher_keys_pin_base_and_auto(settings, make_adapter, demo_model_dir):
    make_adapter("math", ["What is 2 plus 2?"], seed=1)
    make_adapter("code", ["Write a Python function"], seed=2)
    app = app_for(settings)
    async with app.run_test(size=(160, 48)) as pilot:
        await ready(pilot)
        await until(pilot, lambda: len(app.query_one(SpecialistSwitcher).rows) == 2)
        await pilot.press("f3")
        await pilot.press("2")
        await pilot.pause(0.1)
        assert app.service.mode == "math"
        assert "pinned · math" in str(app.query_one("#switcher-mode").render())
        reply = await send(pilot, "Hello!")
        assert reply.meta.adapter == "math" and reply.meta.reason == "pinned"
        await pilot.press("f3", "b")
        assert app.service.mode == "base"
        await pilot.press("a")
        assert app.service.mode == "auto"
        await pilot.press("up", "enter")
        assert app.service.mode == "code"


async def test_feedback_is_stored(settings, demo_model_dir):
    app = app_for(settings)
    async with app.run_test(size=(160, 48)) as pilot:
        await ready(pilot)
        reply = await send(pilot, "Hello!")
        await pilot.press("ctrl+f", "4")
        await until(pilot, lambda: app.service.history.turn(reply.turn_id).rating == 4, timeout=10)
        await pilot.press("ctrl+f", "c")
        area = app.screen.query_one("#correction")
        assert area.text == reply.final  # the editor starts from the reply, to be edited
        area.clear()
        await pilot.press(*"Hi there!", "ctrl+s")
        await until(pilot, lambda: app.service.history.turn(reply.turn_id).correction == "Hi there!", timeout=10)


async def test_settings_screen_validates_before_writing(settings, settings_path, demo_model_dir):
    app = app_for(settings)
    async with app.run_test(size=(160, 48)) as pilot:
        await pilot.press("ctrl+o")
        field = app.screen.query_one("#chat--temperature")
        field.value = "hot"
        before = settings_path.read_text()
        await pilot.press("ctrl+s")
        assert "chat.temperature" in str(app.screen.query_one("#settings-error").render())
        assert settings_path.read_text() == before
        field.value = "0.5"
        await pilot.press("ctrl+s")
        await until(pilot, lambda: app.settings.chat.temperature == 0.5, timeout=10)  # applied off the loop
        assert "temperature = 0.5" in settings_path.read_text()


async def test_help_log_and_views_at_80x24(settings, demo_model_dir):
    app = app_for(settings)
    async with app.run_test(size=(80, 24)) as pilot:
        assert app.has_class("-narrow")
        await pilot.press("f5")
        assert app.view == "gpus" and app.query_one("#chat").has_class("-hidden")
        await until(pilot, lambda: "GPU 1" in str(app.query_one("#gpu-1 .gpu-text").render()))
        text = str(app.query_one("#gpu-0 .gpu-text").render())
        assert "inference" in text and "H100" in text and "n/a" in text  # no fan on an H100: n/a, no crash
        assert "training" in str(app.query_one("#gpu-1 .gpu-text").render())
        await pilot.press("f2")
        assert not app.query_one("#chat").has_class("-hidden")
        await pilot.press("f1")
        assert type(app.screen).__name__ == "HelpScreen"
        await pilot.press("escape", "ctrl+l")
        assert type(app.screen).__name__ == "LogScreen"


async def test_no_gpu_panel_says_so(settings, demo_model_dir):
    app = app_for(settings, nvml=fake_nvml.NoDriver)
    async with app.run_test(size=(160, 48)) as pilot:
        await until(pilot, lambda: "No NVIDIA GPU" in str(app.query_one("#gpu-note").render()))
        assert "RAM" in str(app.query_one("#gpu-note").render())


@pytest.mark.slow
async def test_training_from_the_app_stop_resume_and_goes_live(train_settings, demo_model_dir):
    from engine.train.runs import RunQueue

    app = app_for(train_settings)
    async with app.run_test(size=(160, 48)) as pilot:
        await ready(pilot)
        await pilot.press("f4", "n")
        await pilot.press(*"algebra")
        app.screen.query_one("#profile").value = "tiny"
        await pilot.press("ctrl+s")
        queue = RunQueue(train_settings)
        await until(pilot, lambda: queue.runs() and queue.runs()[-1].metrics())
        run = queue.runs()[-1]
        await pilot.press("f4", "s")
        await until(pilot, lambda: run.state.status == "stopped", timeout=120)
        await pilot.press("f4", "r")
        await until(pilot, lambda: run.state.status == "finished", timeout=240)
        await until(pilot, lambda: any(r.name == "algebra" for r in app.query_one(SpecialistSwitcher).rows), 30)
        chart = app.query_one("#loss-chart")
        assert len(chart.loss) == 12  # the live curve holds every logged step
        reply = await send(pilot, "Combien font 7 fois 8 ?")
        assert reply.meta.adapter == "algebra"  # the new specialist answers a routed prompt, no restart


async def test_ab_compare_report_and_rollback(settings, make_adapter, demo_model_dir):
    make_adapter("math", ["What is 2 plus 2?"], seed=1)
    make_adapter("math", ["What is 2 plus 2?"], seed=2)  # a second version: the first is kept for rollback
    app = app_for(settings)
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(pilot)
        await send(pilot, "What is 2 plus 2?")
        await pilot.press("f7")
        screen = app.screen
        assert type(screen).__name__ == "CompareScreen"
        await until(pilot, lambda: len(screen.replies) == 2, timeout=60)
        await pilot.press("2")
        await pilot.pause(0.1)
        [pref] = app.service.history.preferences()
        assert pref["choice"] == screen.b and pref["a"] != pref["b"]
        await pilot.press("f8")
        await until(pilot, lambda: type(app.screen).__name__ == "ReportScreen", timeout=10)  # read off the loop
        await pilot.press("escape", "f3")
        created = app.service.engine.live.known["math"].manifest.created
        await pilot.press("u")
        await until(pilot, lambda: app.service.engine.live.known["math"].manifest.created != created, timeout=20)


async def test_brackets_in_prompts_and_replies_are_text_not_markup(settings, demo_model_dir):
    """A sampled reply once contained '[' + text that Rich read as a closing tag, and the reply failed."""
    from tui.widgets.chat import ReplyMeta, UserMessage

    app = app_for(settings)
    async with app.run_test(size=(80, 24)) as pilot:
        chat = app.query_one(ChatPanel)
        chat.add_user("[/b] is not [red]markup")
        reply = chat.start_reply("x")
        await pilot.pause()
        reply.add([("analysis", "[/oops] [b"), ("final", "fine")])
        reply.set_meta(ReplyMeta(adapter="odd[/name]"))
        await pilot.pause()
        assert "[/b] is not [red]markup" in str(app.query(UserMessage).last().render())
        assert "[/oops] [b" in str(reply.query_one(".analysis").render())
        assert "odd[/name]" in str(reply.query_one(".reply-meta").render())


async def test_why_this_route_explains_and_a_correction_applies_at_once(settings, make_adapter, demo_model_dir):
    from engine.store.corrections import RouterCorrections
    from engine.train.dataset import load_examples

    math = [e.user_prompt for e in load_examples("data/samples/math.jsonl").examples][:20]
    make_adapter("math", math, seed=1)
    app = app_for(settings)
    prompt = "What is 17 times 23?"
    async with app.run_test(size=(160, 48)) as pilot:
        await ready(pilot)
        reply = await send(pilot, prompt)
        assert reply.meta.adapter == "math" and reply.decision["top"] == "math"
        await pilot.press("f9")
        assert type(app.screen).__name__ == "RouteScreen"
        shown = " ".join(str(w.render()) for w in app.screen.query(".route-line"))
        assert "top math" in shown and "most similar example" in shown
        await pilot.press("n")  # it should have gone to none: the base model
        await until(pilot, lambda: any(c.prompt == prompt for c in RouterCorrections(settings.adapters_dir)._read()),
                    timeout=10)
        await until(pilot, lambda: app.service.engine.decide(prompt).choice == "base", timeout=10)
