"""Start-up: the chat process pins its GPU before torch loads, load steps say how long they have left."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Run first in a fresh interpreter: at the first import of torch, print what CUDA will see and stop.
GUARD = r"""
import os, sys
class Guard:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            os.write(1, ("CUDA_VISIBLE_DEVICES=" + os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>") + "\n").encode())
            os._exit(0)
sys.meta_path.insert(0, Guard())
"""
ENTRIES = {
    "tandem chat": "from engine import cli; cli.main(['chat', '--once', 'hi'])",
    "tandem experts": "from engine import cli; cli.main(['experts', 'hi'])",
    # The app's worker and the bench scripts load through Engine.load -> load_model.
    "model load": "from engine.serve.model import load_model; from engine.settings import load; load_model(load())",
}


@pytest.mark.parametrize("preset", [None, "0,1"], ids=["unset", "both-visible"])
@pytest.mark.parametrize("entry", list(ENTRIES))
def test_inference_gpu_is_pinned_before_torch_loads(entry: str, preset: str | None, settings_path: Path) -> None:
    """Anything that touches CUDA with two GPUs visible (accelerate's memory probe, a library's device
    scan) creates a ~500 MB context on the training GPU: the chat process must see only its own."""
    from engine.settings import load, save, updated

    s = updated(updated(load(settings_path), "gpus.inference", 1), "gpus.training", 0)
    save(s)
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    env.update(TANDEM_SETTINGS=str(settings_path), **({"CUDA_VISIBLE_DEVICES": preset} if preset else {}))
    out = subprocess.run([sys.executable, "-c", GUARD + ENTRIES[entry]], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert "CUDA_VISIBLE_DEVICES=1\n" in out.stdout, f"{entry}: {out.stdout[-500:]} {out.stderr[-2000:]}"


def test_user_choice_of_other_gpus_is_kept() -> None:
    """CUDA_VISIBLE_DEVICES that leaves out the configured GPU is the user's explicit choice."""
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    code = GUARD + "from engine.serve.model import pin_gpu; pin_gpu(0); import torch"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**env, "CUDA_VISIBLE_DEVICES": "2"},
                         capture_output=True, text=True, timeout=60)
    assert "CUDA_VISIBLE_DEVICES=2\n" in out.stdout, out.stderr[-2000:]


def _phases(tmp_path: Path, messages: list[tuple[str, float]], record: Path | None = None):
    from engine.startup import Phases

    return Phases(lambda text, frac: messages.append((text, frac)), record=record or tmp_path / "startup.json",
                  tick_s=0.02)


def test_a_step_repeats_with_time_left_from_the_last_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # cold
    first: list[tuple[str, float]] = []
    say = _phases(tmp_path, first)
    say("loading the weights", 0.3)
    time.sleep(0.15)
    say("model ready", 1.0)
    assert len(first) > 3 and all(f == 0.3 for t, f in first[:-1] if t.startswith("loading"))
    assert not any("left" in t for t, _ in first)  # never timed here: no estimate is made up
    recorded = json.loads((tmp_path / "startup.json").read_text())
    (key, seconds), = recorded.items()
    assert key.startswith("loading the weights") and "cold" in key and 0.1 <= seconds < 5

    recorded[key] = 30.0  # as a slow machine would have timed it
    (tmp_path / "startup.json").write_text(json.dumps(recorded))
    second: list[tuple[str, float]] = []
    say = _phases(tmp_path, second)
    say("loading the weights", 0.3)
    time.sleep(0.05)
    say.close()
    assert second and all(t in ("loading the weights · 0 s, ~30 s left", "loading the weights · 0 s, ~29 s left")
                          for t, _ in second), second
    n = len(second)
    time.sleep(0.1)
    assert len(second) == n  # closed: nothing more is said


def test_compile_estimates_follow_the_cache_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.startup import Phases, compile_cache_state

    cache = tmp_path / "inductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache))
    cold = Phases.key("compiling the fast decoder (once per model load)")
    assert compile_cache_state() == "cold"
    (cache / "fxgraph" / "ab").mkdir(parents=True)
    (cache / "fxgraph" / "ab" / "graph").write_bytes(b"x")
    warm = Phases.key("compiling the fast decoder (once per model load)")
    assert compile_cache_state() == "warm" and cold != warm
    say = _phases(tmp_path, [], record=tmp_path / "none.json")
    assert say.expected(cold) > say.expected(warm) > 0


def test_a_countdown_message_is_passed_through(tmp_path: Path) -> None:
    messages: list[tuple[str, float]] = []
    say = _phases(tmp_path, messages)
    say("building the demo model (first start only): step 10/240, ~30 s left", 0.05)
    time.sleep(0.1)
    say.close()
    assert messages == [("building the demo model (first start only): step 10/240, ~30 s left", 0.05)]


def test_compile_caches_go_under_the_tandem_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.startup import use_compile_caches

    monkeypatch.setenv("TANDEM_CACHE", str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    use_compile_caches()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "inductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/elsewhere")
    use_compile_caches()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/elsewhere"


def test_a_first_start_never_says_longer_than_last_time(tmp_path, monkeypatch):
    """Regression: a step over its built-in guess said 'longer than last time' on the very first start."""
    from engine import startup

    clock = [1000.0]
    monkeypatch.setattr(startup.time, "monotonic", lambda: clock[0])
    said: list[str] = []
    phases = startup.Phases(lambda m, _f: said.append(m), record=tmp_path / "times.json", tick_s=3600)
    phases("importing unsloth", 0.05)  # a step with a first-start guess, never timed here
    clock[0] += 500
    assert "longer than expected" in phases._text() and "last time" not in phases._text()
    phases.close()
    again = startup.Phases(lambda m, _f: said.append(m), record=tmp_path / "times.json", tick_s=3600)
    again("importing unsloth", 0.05)
    clock[0] += 1000
    assert "longer than last time" in again._text()
    again.close()
