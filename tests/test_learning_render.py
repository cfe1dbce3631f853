"""The learning loop trains on what the chat served: same conversation, reasoning level, instructions and
tokens; a failed retrain is retried; too few examples are refused before training; fingerprints hold."""

import datetime as dt
import json
import os
import signal
import time

import engine.harmony as harmony
import engine.serve.worker as worker
from engine.harmony import Turn
from engine.serve.chat import Conversation, Engine, Finished
from engine.serve.generate import Sampling
from engine.settings import updated
from engine.store.history import History
from engine.train.dataset import load_examples
from engine.train.learning import Learner, build_dataset
from engine.train.preference import pairs_from_history
from engine.train.runs import RunQueue


def test_a_learned_example_is_the_prompt_the_chat_served(settings, demo_model_dir, monkeypatch, tmp_path):
    s = updated(updated(settings, "chat.reasoning", "medium"), "chat.instructions", "Answer in one line.")
    served: list[list[int]] = []

    def spy(*args, **kwargs):  # the worker's own call, recorded: the ids the model was given
        ids, dropped = real(*args, **kwargs)
        served.append(list(ids))
        return ids, dropped

    real = worker.fit_turns
    monkeypatch.setattr(worker, "fit_turns", spy)
    engine = Engine(s, history=History(s.history_db))
    engine.load()
    try:
        conv = Conversation()
        turns, kept_before = [], []  # the history's turn ids; how many turns the chat kept before each prompt
        for prompt in ("Hello there.", "What is 2 plus 2?", "And 3 plus 3?"):
            kept_before.append(len(conv.turns))
            for ev in engine.ask(conv, prompt, mode="base", sampling=Sampling(greedy=True, max_new_tokens=12)):
                if isinstance(ev, Finished):
                    turns.append(ev.turn_id)
        # an API client sends its whole conversation with each prompt: none of it is a turn of the history
        api = Conversation([Turn("user", "Earlier question."), Turn("assistant", "Earlier answer.")])
        kept_before.append(len(api.turns))
        for ev in engine.ask(api, "A client's question.", mode="base", source="api",
                             sampling=Sampling(greedy=True, max_new_tokens=12)):
            if isinstance(ev, Finished):
                turns.append(ev.turn_id)
        h = engine.history
        for turn_id in turns[1:]:  # the second and third turns teach "chat"; each has context before it
            h.set_task(turn_id, "chat")
            h.correct(turn_id, f"The answer to turn {turn_id}.")
        built = build_dataset(h, "chat", tmp_path / "built", holdout_fraction=0.5)
        assert built.n_train + built.n_holdout == 3
        examples = load_examples(str(built.train)).examples + load_examples(str(built.holdout)).examples
        by_prompt = {ex.user_prompt: ex for ex in examples}
        tok = engine.lm.tokenizer
        for i, prompt in ((1, "What is 2 plus 2?"), (2, "And 3 plus 3?"), (3, "A client's question.")):
            n_turns = kept_before[i] + 2  # a reply cut short in its reasoning is no context (chat.context_answer)
            ex = by_prompt[prompt]
            assert ex.reasoning == "medium" and ex.instructions == "Answer in one line."
            assert len(ex.turns) == n_turns  # the earlier exchanges, then this prompt and its reply
            prompt_ids, completion_ids = ex.encode_parts(tok)
            assert prompt_ids == served[i]  # token for token what the chat fed the model
            assert completion_ids and completion_ids[-1] == tok.convert_tokens_to_ids("<|return|>")
            # a correction is also a preference pair (the corrected answer over the reply): same prompt
            pair = pairs_from_history(h, "chat")[prompt.lower()]
            assert pair.source == "correction" and pair.encode(tok)["prompt_ids"] == served[i]
    finally:
        engine.close()
        engine.history.close()


def test_the_fingerprint_does_not_change_with_the_date(tmp_path, monkeypatch):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "q", "response": "a"}) + "\n")
    report = load_examples(str(path))
    today = report.fingerprint(), report.examples[0].render()

    class Tomorrow(dt.date):
        @classmethod
        def today(cls):
            return dt.date(2031, 1, 2)

    monkeypatch.setattr(harmony, "date", Tomorrow)
    assert report.examples[0].render() != today[1]  # the render holds the date...
    assert report.fingerprint() == today[0]  # ...the fingerprint does not


def _history_with(s, task: str, n: int) -> History:
    h = History(s.history_db)
    conv = h.new_conversation()
    for i in range(n):
        t = h.start_turn(conv, f"question {i}", task, {}, {}, "high", "Be brief.")
        h.finish_turn(t, f"answer {i}", "", "", {}, "complete")
        h.rate(t, 5)
    return h


def test_too_few_examples_for_a_holdout_are_refused_before_training(settings):
    s = updated(settings, "learning.min_examples_new_task", 1)
    h = _history_with(s, "poetry", 1)
    learner = Learner(s, h)
    assert learner.due() == [("poetry", "new task with 1 examples")]
    assert learner.check(profile="quick_test") == []  # nothing queued, no model loaded
    assert [why for task, why in learner.skipped if task == "poetry"] == [
        "1 distinct example(s) of poetry: the gate needs at least 2 (one to train on, one held out)"]
    assert RunQueue(s).runs() == []


def test_a_failed_retrain_is_retried_after_a_backoff(settings):
    s = updated(settings, "learning.min_examples_new_task", 2)
    h = _history_with(s, "poetry", 3)
    offset = [0.0]
    learner = Learner(s, h, now=lambda: time.time() + offset[0])
    [run_id] = learner.check(profile="quick_test")
    queue = RunQueue(s)
    run = queue.get(run_id)
    assert run.request.origin == "learning" and run.request.why.startswith("retrain: new task with 3")
    assert learner.due() == []  # in flight: not due twice
    os.kill(run.state.pid, signal.SIGKILL)  # the trainer dies (OOM killer, a reboot)
    deadline = time.monotonic() + 30
    while queue.get(run_id).state.status != "failed" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert learner.due() == []
    [(task, why)] = learner.skipped
    assert task == "poetry" and "the last retrain failed" in why and "retried in 5 min" in why
    offset[0] = 301.0  # five minutes later it is due again, its examples still new
    assert learner.due() == [("poetry", "new task with 3 examples (retry 1)")]
    state = json.loads((s.logs_dir / "learning" / "state.json").read_text())["poetry"]
    assert state["failures"] == 1 and "examples" not in state  # nothing was counted as learned


def test_exported_examples_read_back_as_training_data(settings, capsys, tmp_path):
    from engine.cli import main

    _history_with(settings, "poetry", 3).close()
    assert main(["history", "export", "--task", "poetry"]) == 0
    path = tmp_path / "export.jsonl"
    path.write_text(capsys.readouterr().out)
    examples = load_examples(str(path)).examples
    assert [ex.user_prompt for ex in examples] == ["question 0", "question 1", "question 2"]
    assert all(ex.reasoning == "high" and ex.instructions == "Be brief." for ex in examples)
    assert [len(ex.turns) for ex in examples] == [2, 4, 6]  # each after the conversation before it
