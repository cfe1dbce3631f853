"""The adapter store, live hot-swap on the demo model, the watcher and the router."""

import json
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest

from engine.harmony import Turn, render_prompt
from engine.serve.chat import Conversation, Finished
from engine.serve.generate import Sampling, complete, stream
from engine.serve.router import Router
from engine.store.adapters import AdapterError, AdapterStore
from engine.train.dataset import load_examples

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GREEDY = Sampling(greedy=True, max_new_tokens=24)


def prompts(task):
    return [e.user_prompt for e in load_examples(os.path.join(ROOT, f"data/samples/{task}.jsonl")).examples]


def answer(engine, text, mode):
    for ev in engine.ask(Conversation(), text, mode=mode, sampling=GREEDY):
        if isinstance(ev, Finished):
            return ev


def test_store_reports_broken_folders_and_keeps_going(settings, make_adapter):
    make_adapter("math", ["What is 2+2?"])
    root = settings.adapters_dir
    shutil.copytree(root / "math", root / "noweights")
    (root / "noweights" / "adapter_model.safetensors").unlink()
    shutil.copytree(root / "math", root / "badjson")
    (root / "badjson" / "manifest.json").write_text("{not json")
    shutil.copytree(root / "math", root / "otherbase")
    m = json.loads((root / "otherbase" / "manifest.json").read_text())
    (root / "otherbase" / "manifest.json").write_text(json.dumps({**m, "name": "otherbase", "base_model": "x/y"}))
    (root / "loose-file.txt").write_text("ignored")
    store = AdapterStore(root, base_model=m["base_model"])
    good, bad = store.scan()
    assert [a.name for a in good] == ["math"]
    reasons = dict(bad)
    assert "adapter_model.safetensors" in reasons["noweights"]
    assert "bad JSON" in reasons["badjson"]
    assert "trained for base model 'x/y'" in reasons["otherbase"]


def test_publish_rename_remove_import_and_rollback(settings, make_adapter, tmp_path):
    store = AdapterStore(settings.adapters_dir)
    first = make_adapter("code", ["write a function"], seed=1)
    first_weights = first.weights.read_bytes()
    assert not (settings.adapters_dir / ".staging").exists() or not any((settings.adapters_dir / ".staging").iterdir())
    second = make_adapter("code", ["write a function"], seed=2)
    second_weights = second.weights.read_bytes()
    assert second.manifest.parent == str(first.manifest.created)
    assert [v.manifest.created for v in store.versions("code")] == [first.manifest.created]
    rolled = store.rollback("code")
    assert rolled.weights.read_bytes() == first_weights != second_weights
    assert store.get("code").manifest.created == first.manifest.created
    store.rename("code", "coder")
    assert [a.name for a in store.scan()[0]] == ["coder"]
    with pytest.raises(AdapterError, match="letters, digits"):
        store.rename("coder", "auto")
    plain = tmp_path / "plain"
    shutil.copytree(store.get("coder").path, plain)
    (plain / "manifest.json").unlink()
    imported = store.import_folder(plain, name="imported", task="misc")
    assert imported.manifest.lora["rank"] == 4 and imported.manifest.task == "misc"
    store.remove("imported")
    assert [a.name for a in store.scan()[0]] == ["coder"]
    with pytest.raises(AdapterError, match="not a PEFT adapter"):
        store.import_folder(tmp_path)


def test_switching_changes_the_output_and_base_restores_it(engine, make_adapter):
    make_adapter("math", prompts("math"), seed=1)
    make_adapter("translate", prompts("translate"), seed=2)
    engine.live.refresh()
    engine.retrain_router()
    q = "Hello!"
    base = answer(engine, q, "base").reply.raw
    a = answer(engine, q, "math").reply.raw
    b = answer(engine, q, "translate").reply.raw
    assert len({base, a, b}) == 3
    assert answer(engine, q, "math").reply.raw == a  # switching back reproduces it
    assert answer(engine, q, "base").reply.raw == base
    assert engine.live.last_swap_s < 0.05
    table = {r.name: r for r in engine.adapters()}
    assert table["math"].resident and table["translate"].resident and not table["math"].active


def test_auto_routes_to_the_specialist_and_reports_it(engine, make_adapter):
    make_adapter("math", prompts("math"), seed=1)
    make_adapter("translate", prompts("translate"), seed=2)
    engine.live.refresh()
    engine.retrain_router()
    done = answer(engine, "Wie viel ist 7 mal 8?", "auto")
    assert done.adapter == "math" and done.decision.reason == "routed" and done.decision.confidence >= 0.4
    done = answer(engine, "Tell me about the history of Rome.", "auto")
    assert done.adapter == "base" and done.decision.reason == "below threshold"
    row = engine.history.turn(done.turn_id)
    assert row.adapter == "base" and row.route["reason"] == "below threshold" and row.status == "complete"


def test_lru_budget_keeps_what_fits(engine, make_adapter):
    a = make_adapter("one", ["x"], seed=1)
    make_adapter("two", ["y"], seed=2)
    engine.live.budget_bytes = int(a.size_bytes * 1.5)  # room for one
    engine.live.refresh()
    engine.live.activate("one")
    engine.live.activate("two")
    resident = {r.name: r.resident for r in engine.adapters()}
    assert resident == {"one": False, "two": True}
    engine.live.activate("one")  # reloaded on demand
    assert {r.name: r.resident for r in engine.adapters()} == {"one": True, "two": False}


def test_broken_adapter_does_not_break_the_chat(engine, settings, make_adapter):
    make_adapter("math", ["x"], seed=1)
    engine.live.refresh()
    (settings.adapters_dir / "math" / "adapter_model.safetensors").write_bytes(b"garbage")
    done = answer(engine, "Hello!", "math")
    assert done.adapter == "base" and done.reply.parser.segments


def test_swap_waits_for_the_streaming_reply(engine, make_adapter):
    make_adapter("math", ["x"], seed=1)
    engine.live.refresh()
    lm = engine.lm
    it = stream(lm, render_prompt([Turn("user", "Hello!")]), Sampling(greedy=True, max_new_tokens=20))
    next(it)  # the reply is mid-stream, holding the model lock
    swapped = threading.Event()
    t = threading.Thread(target=lambda: (engine.live.activate("math"), swapped.set()))
    t.start()
    time.sleep(0.5)
    assert not swapped.is_set()
    for _ in it:
        pass
    t.join(10)
    assert swapped.is_set() and engine.live.active == "math"


def test_new_adapter_is_picked_up_live(engine, make_adapter):
    changes = []
    engine.watch_adapters(changes.append)
    before = complete(engine.lm, render_prompt([Turn("user", "Hello!")]), GREEDY).raw
    make_adapter("fresh", prompts("code"), seed=5)
    deadline = time.monotonic() + 20
    while not changes and time.monotonic() < deadline:
        time.sleep(0.1)
    assert changes and changes[0]["added"] == ["fresh"]
    assert {r.name: r.resident for r in engine.adapters()} == {"fresh": True}  # loaded by the watcher
    assert engine.router.classes == ["fresh"]
    assert answer(engine, "Hello!", "fresh").reply.raw != before


def test_router_on_held_out_prompts_in_several_languages():
    router = Router(threshold=0.4).fit({t: prompts(t) for t in ("math", "code", "translate")})
    with open(os.path.join(ROOT, "data/router_eval.jsonl")) as fh:
        rows = [json.loads(line) for line in fh]
    assert {r["label"] for r in rows} == {"math", "code", "translate", "base"}
    hits = sum(router.route(r["prompt"]).choice == r["label"] for r in rows)
    assert hits / len(rows) >= 0.9
    unrelated = [r for r in rows if r["label"] == "base"]
    assert sum(router.route(r["prompt"]).choice == "base" for r in unrelated) >= len(unrelated) - 1
    d = router.route("Übersetze ins Spanische: das Buch")
    assert d.choice == "translate" and set(d.scores) == {"math", "code", "translate"}


def test_router_with_no_or_one_specialist():
    assert Router().fit({}).route("anything").reason == "no specialists"
    one = Router(threshold=0.4).fit({"math": prompts("math")})
    assert one.route("What is 5 plus 6?").choice == "math"
    assert one.route("Write a haiku about autumn.").choice == "base"


def test_cli_adapters_and_route(settings_path, make_adapter):
    make_adapter("math", prompts("math"), seed=1)
    make_adapter("code", prompts("code"), seed=2)

    def run(*args):
        return subprocess.run([sys.executable, "-m", "engine.cli", *args], capture_output=True, text=True, timeout=120)

    listed = json.loads(run("adapters", "list", "--json").stdout)
    assert [a["name"] for a in listed["adapters"]] == ["code", "math"]
    routed = json.loads(run("route", "Écris une fonction Python qui trie une liste", "--json").stdout)
    assert routed["choice"] == "code" and "math" in routed["scores"]
    r = run("adapters", "remove", "math")
    assert r.returncode == 1 and "--yes" in r.stderr
    assert run("adapters", "remove", "math", "--yes").returncode == 0
    r = run("adapters", "show", "math")
    assert r.returncode == 1 and "no adapter named 'math'" in r.stderr
