"""Preference learning: pairs from A/B picks and corrections, rendered as served; a DPO run on the demo model
trains from recorded picks on top of the specialist, and its gate decides on held-out pairs."""

import json
import os
from pathlib import Path

import pytest

from engine.settings import load, updated
from engine.store.adapters import AdapterStore
from engine.store.history import History
from engine.train.learning import Learner, report
from engine.train.preference import judge, load_pairs, pair_counts, pairs_from_history
from engine.train.runs import RunError, RunQueue

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREF_PROFILE = """
[training.profiles.tiny_pref]
method = "dpo"
beta = 0.1
max_steps = 4
max_samples = 64
batch_size = 2
grad_accum = 1
learning_rate = 0.002
warmup_steps = 1
save_steps = 4
max_seq_length = 256
"""


def math_rows(n):
    with open(os.path.join(ROOT, "data/samples/math.jsonl")) as fh:
        rows = [json.loads(x) for x in fh][:n]
    return [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in rows]


def test_pairs_come_from_picks_and_corrections_as_served(tmp_path):
    h = History(tmp_path / "h.db")
    h.prefer("2+2?", "math", "base", "4", "five", "math", task="math", reasoning="high", instructions="Be exact.")
    h.prefer("3+3?", "math", "base", "7", "6", "base", task="math")  # the base's reply won
    h.prefer("4+4?", "math", "base", "8", "eight", "tie", task="math")  # a tie teaches nothing
    h.prefer("hi", "poetry", "base", "roses", "hello", "poetry", task="poetry")
    conv = h.new_conversation()
    first = h.start_turn(conv, "Let us count.", "math", {}, {}, "medium", "Be exact.")
    h.finish_turn(first, "Sure.", "", "", {}, "complete")
    t = h.start_turn(conv, "5+5?", "math", {}, {}, "medium", "Be exact.")
    h.finish_turn(t, "11", "", "", {}, "complete")
    h.correct(t, "10")
    pairs = pairs_from_history(h, "math")
    assert {k: (p.chosen, p.rejected, p.source) for k, p in pairs.items()} == {
        "2+2?": ("4", "five", "pick"), "3+3?": ("6", "7", "pick"), "5+5?": ("10", "11", "correction")}
    assert pairs["2+2?"].reasoning == "high" and pairs["2+2?"].instructions == "Be exact."
    corrected = pairs["5+5?"]  # the conversation before it, as the chat showed it
    assert [(x.role, x.content) for x in corrected.turns] == [("user", "Let us count."), ("assistant", "Sure."),
                                                               ("user", "5+5?")]
    assert pair_counts(h) == {"math": {"picks": 2, "corrections": 1}, "poetry": {"picks": 1, "corrections": 0}}
    assert report(h)["pairs"]["math"] == {"picks": 2, "corrections": 1}
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(p.to_chat_row()) + "\n" for p in pairs.values()) + '{"chosen": "x"}\n')
    back = load_pairs(str(path))
    assert [p.as_row() for p in back.examples] == [p.as_row() for p in pairs.values()]
    assert back.skipped == {"no chosen/rejected text": 1} and "2 from A/B picks, 1 from corrections" in back.summary()


def test_the_preference_gate_needs_a_margin_and_no_worse_win_rate():
    assert judge([(-1.0, -5.0)], None, 0.1)["promote"]  # a first version
    better = judge([(-1.0, -6.0), (-2.0, -3.0)], [(-2.0, -5.0), (-2.0, -2.5)], 0.1)
    assert better["promote"] and better["win_rate"] == 1.0 and better["margin"] == pytest.approx(0.1 * 1.25)
    worse = judge([(-3.0, -2.0), (-2.0, -3.0)], [(-1.0, -2.0), (-2.0, -3.0)], 0.1)
    assert not worse["promote"] and "does not beat" in worse["reason"]


def test_a_preference_run_needs_the_specialist_it_improves(settings_path):
    settings_path.write_text(settings_path.read_text() + PREF_PROFILE)
    s = load(settings_path)
    with pytest.raises(RunError, match="--from"):
        RunQueue(s).submit_checked("math", os.path.join(ROOT, "data/samples/math.jsonl"), "tiny_pref")


@pytest.mark.slow
def test_a_dpo_run_trains_from_recorded_picks_and_its_gate_decides(settings_path, make_adapter_factory):
    settings_path.write_text(settings_path.read_text() + PREF_PROFILE)
    s = updated(load(settings_path), "learning.min_pairs", 10)
    make_adapter_factory(s)("math", ["What is 1 plus 1?"], seed=4, scale=0.1)
    h = History(s.history_db)
    for i, (prompt, answer) in enumerate(math_rows(14)):  # the user picked the right answer, on either side
        a, b = (answer, "I do not know.") if i % 2 else ("I do not know.", answer)
        h.prefer(prompt, "math", "base", a, b, "math" if i % 2 else "base", task="math", reasoning="low")
    learner = Learner(s, h)
    assert learner.preference_due() == [("math", "math", 14)]
    [run_id] = learner.check_preferences(profile="tiny_pref")
    queue = RunQueue(s)
    run = queue.get(run_id)
    assert run.request.from_adapter == "math" and run.request.why == "preferences: 14 preference pairs"
    state = queue.wait(run, timeout=600)
    assert state.status == "finished", (run.dir / "output.log").read_text()[-3000:]
    assert "held-out win rate" in state.outcome and "reward margin" in state.outcome
    gate = json.loads((run.dir / "result.json").read_text())["gate"]
    held = len(Path(run.request.gate["holdout"]).read_text().splitlines())
    assert gate["pairs"] == held > 0 and "margin" in gate and 0 <= gate["win_rate"] <= 1
    # the gate decided, and the store agrees with what it decided
    published = AdapterStore(s.adapters_dir).get("math").manifest
    assert (published.run_id == run_id) == gate["promote"] == state.outcome.startswith("published as math")
    margins = [m for m in run.metrics() if "margin" in m]
    assert len(margins) == 4 and all("accuracy" in m for m in margins)  # live in the training panel
    assert learner.preference_due() == []  # the pairs are counted as learned once the run finished


def test_the_gates_log_probs_are_the_replies_log_probs(demo_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.harmony import Turn
    from engine.train.preference import Pair, sequence_logps

    model = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32)
    row = Pair([Turn("user", "What is 2+2?")], "4", "I do not know.").encode(AutoTokenizer.from_pretrained(
        demo_model_dir))
    [got] = sequence_logps(model, [row])
    for key, value in zip(("chosen_ids", "rejected_ids"), got, strict=True):  # against log-softmax, token by token
        ids = torch.tensor([row["prompt_ids"] + row[key]])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1).gather(1, ids[0, 1:, None])
        assert value == pytest.approx(float(logp[len(row["prompt_ids"]) - 1 :].sum()), rel=1e-4)
