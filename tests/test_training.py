"""Training runs as real detached processes on the demo model (unsloth CPU fallback + TRL)."""

import json
import os
import signal
import time

import pytest

from engine.settings import save, updated
from engine.store.adapters import AdapterStore
from engine.train.dataset import DatasetError, load_examples
from engine.train.runs import Request, RunError, RunQueue

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MATH = os.path.join(ROOT, "data/samples/math.jsonl")


def request(settings, **kw):
    base = dict(task="math", data=MATH, profile="tiny", gpu=0, settings=str(settings.source))
    return Request(**{**base, **kw})


def wait_for(predicate, timeout=180, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.3)
    raise TimeoutError(what)


def test_bad_rows_are_counted_with_reasons(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join([
        '{"prompt": "a", "response": "b"}',
        "not json",
        '{"messages": [{"role": "user", "content": "hi"}]}',
        '{"prompt": "a"}',
        '{"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]}',
        '["a list"]',
        '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r", "thinking": "t"}]}',
    ]))
    r = load_examples(str(path))
    assert len(r.examples) == 2 and r.total_rows == 7 and r.skipped_count == 5
    assert r.skipped["invalid JSON"] == 1 and r.skipped["unknown role"] == 1
    assert "2 of 7 rows usable" in r.summary()
    assert r.examples[1].turns[-1].analysis == "t"


def test_empty_or_unusable_data_is_refused_before_any_run(tmp_path, train_settings):
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "junk.jsonl").write_text('{"x": 1}\n{"y": 2}\n')
    for name in ("empty.jsonl", "junk.jsonl"):
        with pytest.raises(DatasetError, match="no usable rows"):
            load_examples(str(tmp_path / name))
    with pytest.raises(DatasetError, match="unsupported file type"):
        (tmp_path / "d.txt").write_text("x")
        load_examples(str(tmp_path / "d.txt"))
    with pytest.raises(DatasetError, match="Offline"):
        load_examples("nobody/no-such-dataset-xyz")


def test_unusable_data_fails_the_run_without_loading_a_model(tmp_path, train_settings):
    (tmp_path / "junk.jsonl").write_text('{"x": 1}\n')
    q = RunQueue(train_settings)
    run = q.submit(request(train_settings, data=str(tmp_path / "junk.jsonl")))
    state = q.wait(run, timeout=60)
    assert state.status == "failed" and state.error.startswith("data:") and "no usable rows" in state.error
    assert "loading" not in (run.dir / "output.log").read_text().lower()


def test_quick_run_trains_publishes_and_records_metrics(train_settings):
    q = RunQueue(train_settings)
    run = q.submit(request(train_settings))
    state = q.wait(run, timeout=300)
    assert state.status == "finished", (run.dir / "output.log").read_text()[-3000:]
    metrics = run.metrics()
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses) == 12
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4  # the loss comes down
    last = [m for m in metrics if "loss" in m][-1]
    for key in ("step", "total", "learning_rate", "grad_norm", "tokens_per_s", "samples_per_s", "elapsed_s", "eta_s"):
        assert key in last
    assert any("eval_loss" in m for m in metrics)
    store = AdapterStore(train_settings.adapters_dir)
    adapter = store.get("math")
    m = adapter.manifest
    assert m.adapted["experts"] > 0 and m.adapted["attention"] > 0  # the experts are adapted, not only attention
    assert m.lora["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    assert m.prompts and m.final_loss == pytest.approx(losses[-1], abs=1e-4) and m.base_model.startswith("demo:")
    info = json.loads((train_settings.models_dir / "latest" / "training_info.json").read_text())
    assert info["metrics"]["steps"] == 12 and (train_settings.models_dir / "latest").is_symlink()
    # the folder is named for the base model trained (here the demo build), not a fixed "gpt-oss-20b"
    assert os.readlink(train_settings.models_dir / "latest").startswith(m.base_model.removeprefix("demo:") +
                                                                         "_tiny_cosine_r16_")


def test_stop_checkpoints_and_resume_continues_the_step_count(train_settings):
    # 12 steps left too little room: on an idle box the run ended before the stop landed
    steps = 48
    train_settings = updated(train_settings, "training.profiles.tiny.max_steps", steps)
    save(train_settings, train_settings.source)
    q = RunQueue(train_settings)
    run = q.submit(request(train_settings))
    wait_for(lambda: any(m.get("step", 0) >= 2 for m in run.metrics()), what="two steps")
    q.stop(run.id)
    state = q.wait(run, timeout=120)
    assert state.status == "stopped", (run.dir / "output.log").read_text()[-3000:]
    stopped_at = state.step
    assert 2 <= stopped_at < steps
    assert run.checkpoints and int(run.checkpoints[-1].name.split("-")[1]) == stopped_at
    with pytest.raises(RunError):
        q.stop(run.id)
    q.resume(run.id)
    state = q.wait(run, timeout=300)
    assert state.status == "finished", (run.dir / "output.log").read_text()[-3000:]
    done = [m["step"] for m in run.metrics() if "loss" in m]
    assert done[: stopped_at] == list(range(1, stopped_at + 1))
    assert done[stopped_at:] == list(range(stopped_at + 1, steps + 1))  # continued, not restarted


def test_killed_process_marks_the_run_failed_and_queue_order_holds(train_settings):
    q = RunQueue(train_settings)
    first = q.submit(request(train_settings))
    second = q.submit(request(train_settings, task="second", name="second"))
    assert first.state.status == "running" and second.state.status == "queued"
    os.kill(first.state.pid, signal.SIGKILL)
    wait_for(lambda: [r.state.status for r in q.runs() if r.id == first.id] == ["failed"], 30, "failed state")
    assert "died" in first.state.error
    # the dead run could not hand over the GPU itself; the read that found it dead did
    assert second.state.status == "running"
    q.stop(second.id)
    assert q.wait(second, timeout=120).status == "stopped"


@pytest.mark.parametrize(("base", "stem"), [
    ("unsloth/gpt-oss-20b", "gpt-oss-20b"),
    ("openai/gpt-oss-120b", "gpt-oss-120b"),
    ("/models/My OSS/", "My-OSS"),
    ("demo:gpt-oss-demo-1a2b", "gpt-oss-demo-1a2b"),
    ("../..", "model"),
])
def test_model_folder_is_named_for_the_trained_base(base, stem):
    from engine.train.trainer import model_folder_stem

    assert model_folder_stem(base) == stem
