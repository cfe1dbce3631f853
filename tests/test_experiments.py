"""Experiments on the demo model: variants queue as ordinary runs behind the person's own, are scored on the
same held-out rows, and the best is promoted through the gate (or the current specialist stays)."""

import json
import os
import time

import pytest

from engine.cli import main
from engine.settings import load
from engine.store.adapters import AdapterStore
from engine.train.experiments import ExperimentError, Experiments, parse_vary
from engine.train.runs import Run, RunQueue, next_queued, write_json_atomic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MATH = os.path.join(ROOT, "data/samples/math.jsonl")
# smaller than the tiny profile: two variants and their gates in about a minute on two cores
EXP_PROFILE = """
[training.profiles.exp]
max_steps = 6
max_samples = 40
batch_size = 2
grad_accum = 1
learning_rate = 0.002
warmup_steps = 1
save_steps = 6
max_seq_length = 256
"""


def test_vary_is_parsed_and_checked():
    assert parse_vary(["r=8,16", "lr=1e-4,2e-4"]) == {"rank": [8, 16], "learning_rate": [1e-4, 2e-4]}
    for bad, says in (("r=8.5", "whole number"), ("depth=3", "expected NAME=V1,V2"), ("lr=fast", "not a number"),
                      ("r", "expected NAME=V1,V2"), ("r=1e400", "not a number"), ("lr=nan", "not a number"),
                      ("r=8,", "not a number")):
        with pytest.raises(ExperimentError, match=says):
            parse_vary([bad])


def test_bad_experiments_are_refused_before_anything_is_queued(settings):
    exps = Experiments(settings)
    with pytest.raises(ExperimentError, match="at least 2 variants"):
        exps.create("math", parse_vary(["r=8"]), [MATH])
    with pytest.raises(ExperimentError, match="learning_rate"):
        exps.create("math", parse_vary(["lr=0,0.1"]), [MATH])  # a value settings.toml would refuse
    with pytest.raises(ExperimentError, match="no --data given and no history"):
        exps.create("math", parse_vary(["r=4,8"]))
    assert RunQueue(settings).runs() == [] and exps.list() == []


def test_the_persons_own_runs_go_first(settings):
    root = settings.logs_dir / "runs"
    made = []
    for i, origin in enumerate(("experiment", "learning", "user", "user")):
        folder = root / f"run-{i}"
        folder.mkdir(parents=True)
        write_json_atomic(folder / "request.json", {
            "task": "math", "data": MATH, "profile": "quick_test", "gpu": 0, "settings": str(settings.source),
            "created": 1000.0 + i, "origin": origin})
        Run(folder).set_state(status="queued")
        made.append(Run(folder))
    assert next_queued(made).id == "run-2"  # the oldest of the person's runs, before older background work
    made[2].set_state(status="stopped")
    made[3].set_state(status="stopped")
    assert next_queued(made).id == "run-0"


@pytest.mark.slow
def test_an_experiment_of_two_variants_promotes_the_better(settings_path, make_adapter_factory, capsys):
    settings_path.write_text(settings_path.read_text() + EXP_PROFILE)
    s = load(settings_path)
    current = make_adapter_factory(s)("math", ["What is 1 plus 1?"], seed=3).manifest
    assert main(["experiment", "--task", "math", "--vary", "lr=1e-12,0.002", "--data", MATH, "--profile", "exp",
                 "--wait", "600"]) == 0
    out = capsys.readouterr().out
    exp = Experiments(s).list()[-1]
    assert exp.status == "done" and exp.id in out and "held-out" in out and exp.outcome in out
    rows = {r["label"]: r for r in Experiments(s).table(exp)}
    assert set(rows) == {"lr=1e-12", "lr=0.002"}
    for r in rows.values():
        assert r["status"] == "finished" and r["curve"] and r["seconds"] > 0 and r["peak_mem_gb"] > 0
        assert r["current_loss"] == pytest.approx(rows["lr=1e-12"]["current_loss"])  # the same held-out rows
    runs = {r.id: r for r in RunQueue(s).runs()}
    held = {json.loads((runs[r["run"]].dir / "data.json").read_text())["held_out"] for r in rows.values()}
    assert len(held) == 1 and held.pop() > 0
    best = min(rows.values(), key=lambda r: r["heldout_loss"])
    assert exp.best == best["label"] == "lr=0.002" and exp.promoted
    published = AdapterStore(s.adapters_dir).get("math").manifest
    assert published.run_id == best["run"] and published.created != current.created
    assert all(runs[r["run"]].request.origin == "experiment" for r in rows.values())
    assert all(not runs[r["run"]].state.adapter for r in rows.values())  # no variant published itself
    # the table reads back the same from the CLI, and the conclusion happened once
    assert main(["experiments", "show", exp.id[:10]]) == 0
    assert exp.outcome in capsys.readouterr().out
    assert Experiments(s).conclude(exp.id).outcome == exp.outcome
    assert time.time() - published.created < 900


async def test_an_experiment_from_the_training_panel(settings, demo_model_dir):
    from tests.test_tui import app_for, until
    from tui.screens.experiments import ExperimentsScreen

    app = app_for(settings)
    async with app.run_test(size=(160, 48)) as pilot:
        await pilot.press("f4", "e")
        await pilot.press(*"math")
        app.screen.query_one("#exp-vary").value = "r=4,8"
        app.screen.query_one("#exp-data").value = MATH
        app.screen.query_one("#exp-profile").value = "quick_test"
        app.screen.query_one("#exp-idle").value = True  # left for idle time: nothing trains in this test
        await pilot.press("ctrl+s")
        await until(pilot, lambda: Experiments(settings).list(), timeout=60)
        [exp] = Experiments(settings).list()
        assert exp.status == "waiting" and [v.label for v in exp.variants] == ["r=4", "r=8"]
        assert RunQueue(settings).runs() == []
        await until(pilot, lambda: "idle work after 30 min" in str(app.query_one("#gpu-work").render()), 30)
        await pilot.press("f4", "x")
        await until(pilot, lambda: isinstance(app.screen, ExperimentsScreen), timeout=30)
        assert exp.id in str(app.screen.query_one("#exp-list").get_row_at(0)[0])
        assert "waiting" in str(app.screen.query_one("#exp-outcome").render())
        assert app.screen.query_one("#exp-table").row_count == 2


@pytest.mark.parametrize("args", [["--task", "../x", "--vary", "r=4,8"], ["--task", "math", "--vary", "r=1e400"],
                                  ["--task", "math", "--vary", "r=4,8", "--data", "/nonexistent.jsonl"],
                                  ["--task", "math", "--vary", "r=4,8", "--profile", "nope"]])
def test_the_cli_refuses_a_bad_experiment_in_one_line(settings, capsys, args):
    assert main(["experiment", *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert RunQueue(settings).runs() == [] and Experiments(settings).list() == []


def test_what_an_experiment_found_is_announced_once(settings):
    from engine.service import Workstation
    from engine.train.experiments import Experiment, Variant

    exps = Experiments(settings)
    (exps.root / "20261128-010000-aaaa").mkdir()
    exps._save(Experiment("20261128-010000-aaaa", "math", "quick_test", "h.jsonl", "", [Variant("r=4", {}, "t")],
                          status="done", outcome="r=4 is best: published as math"))
    (exps.root / "20261128-010001-bbbb").mkdir()
    (exps.root / "20261128-010001-bbbb" / "experiment.json").write_text('{"id": 3}')  # damaged: skipped
    ws = Workstation(settings)
    try:
        assert [e.outcome for e in ws.newly_decided()] == ["r=4 is best: published as math"]
        assert ws.newly_decided() == []
        assert [e.id for e, _ in ws.experiments()] == ["20261128-010000-aaaa"]
    finally:
        ws.close()
