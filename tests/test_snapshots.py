"""Screenshots of every screen at 80x24 and 160x48, with fixed data so they never flake.

The app runs the real engine on the demo model; GPUs come from the fixed NVML stand-in, the host
reading is fixed, polling runs once, and one finished training run is laid out on disk as the trainer
writes it. Update after an intended change with `./test tests/test_snapshots.py --snapshot-update`.
"""

import json
import shutil
from pathlib import Path

import pytest

import tests.fake_nvml as fake_nvml
from engine.settings import load
from engine.telemetry import Telemetry
from tui.app import TandemApp

ROOT = Path(__file__).resolve().parent.parent
FIXED = Path("/tmp/tandem-snapshots")  # fixed folders: the settings screen shows the file's path
SIZES = {"80x24": (80, 24), "160x48": (160, 48)}


def finished_run(logs: Path) -> None:
    run = logs / "runs" / "20261124-101500-ab12"
    run.mkdir(parents=True)
    (run / "request.json").write_text(json.dumps({"task": "math", "data": "data/samples/math.jsonl",
                                                  "profile": "quick_test", "gpu": 1, "settings": "settings.toml",
                                                  "created": 1795520100.0}))
    (run / "state.json").write_text(json.dumps({"status": "finished", "step": 30, "total": 30,
                                                "outcome": "published as math", "adapter": "math"}))
    lines = []
    for step in range(1, 31):
        rec = {"step": step, "total": 30, "loss": round(2.4 * 0.93**step + 0.2, 4), "learning_rate": 2e-4,
               "grad_norm": 1.5, "tokens_per_s": 5120.0, "samples_per_s": 4.0, "eta_s": (30 - step) * 0.6}
        if step == 25:
            rec["warning"] = "loss 0.290 is below 0.3: the adapter may be memorising; fewer steps or more data"
        lines.append(rec)
        if step % 10 == 0:
            lines.append({"step": step, "total": 30, "eval_loss": round(2.5 * 0.94**step + 0.3, 4)})
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


@pytest.fixture
def snap_app(request, demo_model_dir, make_adapter_factory):
    # One folder per test, so nothing a previous test's app left behind can show up in this picture.
    folder = FIXED / request.node.name.replace("[", "-").replace("]", "")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    shutil.copy(ROOT / "settings.toml", folder / "settings.toml")
    settings = load(folder / "settings.toml")
    finished_run(settings.logs_dir)

    def make(nvml=fake_nvml, adapters=True):
        if adapters:
            make_adapter_factory(settings)("math", ["What is 2 plus 2?"], seed=1)
            make_adapter_factory(settings)("translate", ["Translate to French: the cat"], seed=2)
        return TandemApp(settings, telemetry=Telemetry(nvml, fake_nvml.fixed_host), poll_s=3600)

    return make


async def loaded(pilot):
    """The model is ready and both pollers have shown their first results."""
    app = pilot.app
    while (not app.service.ready and not app.load_error) or not all(app.polls.values()):
        await pilot.pause(0.1)
    await pilot.pause(0.3)


@pytest.fixture(autouse=True)
def steady_cursor(monkeypatch):
    """A blinking cursor is on or off depending on when the picture is taken: keep it on."""
    from textual.widgets import Input

    init = Input.__init__

    def no_blink(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.cursor_blink = False

    monkeypatch.setattr(Input, "__init__", no_blink)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("view,keys", [("chat", []), ("specialists", ["f3"]), ("training", ["f4"]),
                                       ("gpus", ["f5"]), ("help", ["f1"]), ("settings", ["ctrl+o"]),
                                       ("new-run", ["f4", "n"])])
def test_screens(snap_compare, snap_app, size, view, keys):
    if size == "160x48" and view in ("specialists", "training", "gpus"):
        pytest.skip("at 160x48 every panel is on the main screen (the chat case)")
    assert snap_compare(snap_app(), terminal_size=SIZES[size], press=keys, run_before=loaded)


@pytest.mark.parametrize("size", SIZES)
def test_no_gpu(snap_compare, snap_app, size):
    keys = ["f5"] if size == "80x24" else []
    assert snap_compare(snap_app(fake_nvml.NoDriver, adapters=False), terminal_size=SIZES[size], press=keys,
                        run_before=loaded)


async def settings_error(pilot):
    """The settings form after a bad value is saved: the error and the Save button are in view."""
    await loaded(pilot)
    await pilot.press("ctrl+o")
    pilot.app.screen.query_one("#chat--temperature").value = "hot"
    await pilot.press("ctrl+s")
    await pilot.pause(0.3)


async def palette(pilot):
    """Ctrl+P and 'train' typed: the app's own actions are listed with their keys."""
    await loaded(pilot)
    await pilot.press("ctrl+p", *"train")
    await pilot.pause(0.8)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("run_before", [settings_error, palette], ids=["settings-error", "palette"])
def test_forms_and_palette(snap_compare, snap_app, size, run_before):
    assert snap_compare(snap_app(), terminal_size=SIZES[size], run_before=run_before)
