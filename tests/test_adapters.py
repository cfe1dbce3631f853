"""The adapter store, live hot-swap on the demo model, the watcher and the router."""

import json
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest

from engine.serve.chat import Conversation, Finished
from engine.serve.generate import Sampling
from engine.serve.router import Router
from engine.store.adapters import AdapterError, AdapterStore, Manifest
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
    imported = AdapterStore(settings.adapters_dir, base_model=first.manifest.base_model).import_folder(
        plain, name="imported", task="misc")
    assert imported.manifest.lora["rank"] == 4 and imported.manifest.task == "misc"
    store.remove("imported")
    assert [a.name for a in store.scan()[0]] == ["coder"]
    with pytest.raises(AdapterError, match="not a PEFT adapter"):
        store.import_folder(tmp_path)


def test_switching_changes_the_output_and_base_restores_it(engine, make_adapter):
    make_adapter("math", prompts("math"), seed=1)
    make_adapter("translate", prompts("translate"), seed=2)
    engine.refresh_adapters()
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
    engine.refresh_adapters()
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
    engine.refresh_adapters()
    answer(engine, "x", "one")
    answer(engine, "x", "two")
    resident = {r.name: r.resident for r in engine.adapters()}
    assert resident == {"one": False, "two": True}
    answer(engine, "x", "one")  # reloaded on demand
    assert {r.name: r.resident for r in engine.adapters()} == {"one": True, "two": False}


def test_broken_adapter_does_not_break_the_chat(engine, settings, make_adapter):
    make_adapter("math", ["x"], seed=1)
    engine.refresh_adapters()
    (settings.adapters_dir / "math" / "adapter_model.safetensors").write_bytes(b"garbage")
    done = answer(engine, "Hello!", "math")
    assert done.adapter == "base" and done.reply.parser.segments


def test_worker_runs_a_load_only_between_replies(engine, make_adapter, monkeypatch):
    """The watcher's loads are worker jobs: one submitted mid-reply waits until the reply is done."""
    import engine.serve.generate as gen

    make_adapter("math", ["x"], seed=1)
    engine.refresh_adapters()
    sample = gen._sample
    monkeypatch.setattr(gen, "_sample", lambda *a: (time.sleep(0.02), sample(*a))[1])
    slow = Sampling(greedy=True, max_new_tokens=60)
    it = engine.ask(Conversation(), "Hello!", mode="base", sampling=slow, store=False)
    next(it)  # the reply is on the worker
    job = engine.worker.submit(lambda: engine.live.ensure("math"))
    time.sleep(0.3)
    assert not job.done()
    finished = [ev for ev in it if isinstance(ev, Finished)]
    assert finished[0].reply.stats.tokens_out > 15  # the reply really outlasted the wait above
    job.result(timeout=10)
    assert {r.name: r.resident for r in engine.adapters()} == {"math": True}


def test_the_reply_comes_from_the_adapter_its_record_names(engine, make_adapter):
    """Regression: routing and decoding used to take the model lock separately, so a switch in between
    (an A/B answer, a queued prompt, the watcher) made the reply come from another adapter than the one
    stored with it. Here another request for "two" is started right between routing and decoding."""
    make_adapter("one", ["x"], seed=1, scale=20.0)
    make_adapter("two", ["y"], seed=2, scale=20.0)
    engine.refresh_adapters()
    alone = {name: answer(engine, "Hello!", name).reply.raw for name in ("one", "two")}
    assert alone["one"] != alone["two"]
    other: list = []
    rival = threading.Thread(target=lambda: other.append(answer(engine, "Hello!", "two")))
    done = None
    for ev in engine.ask(Conversation(), "Hello!", mode="one", sampling=GREEDY):
        if type(ev).__name__ == "Routed":
            rival.start()
            time.sleep(0.2)  # the rival request is queued (or, before the fix, had switched the adapter)
        if isinstance(ev, Finished):
            done = ev
    rival.join(30)
    assert done.adapter == "one" and engine.history.turn(done.turn_id).adapter == "one"
    assert done.reply.raw == alone["one"]
    assert other[0].adapter == "two" and other[0].reply.raw == alone["two"]


def test_new_adapter_is_picked_up_live(engine, make_adapter):
    changes = []
    engine.watch_adapters(changes.append)
    before = answer(engine, "Hello!", "base").reply.raw
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
    assert {r["label"] for r in rows} == {"math", "code", "translate", "none"}
    hits = sum(router.route(r["prompt"]).choice == {"none": "base"}.get(r["label"], r["label"]) for r in rows)
    assert hits / len(rows) >= 0.85  # 24 languages, 11 of them outside USE's (bench/RESULTS.md: ~90 %)
    unrelated = [r for r in rows if r["label"] == "none"]
    assert sum(router.route(r["prompt"]).choice == "base" for r in unrelated) >= 0.95 * len(unrelated)
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


def test_a_closed_worker_refuses_jobs_at_once():
    from engine.serve.worker import InferenceWorker

    worker = InferenceWorker()
    assert worker.call(lambda: 42) == 42
    worker.close()
    with pytest.raises(RuntimeError, match="closed"):
        worker.call(lambda: 1)


def staged(store: AdapterStore) -> list[str]:
    folder = store.root / ".staging"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_versions_are_a_stack(settings, make_adapter):
    """Regression: rollback copied the old version back, so its copy stayed in .versions/, a second
    rollback toggled instead of going further back, and the next publish failed with ENOTEMPTY."""
    store = AdapterStore(settings.adapters_dir)
    weights, created = [], []
    for seed in range(3):  # read each version as it is published: the folder then holds the next one
        made = make_adapter("code", ["write a function"], seed=seed)
        weights.append(made.weights.read_bytes())
        created.append(made.manifest.created)
    assert [v.manifest.created for v in store.versions("code")] == created[1::-1]
    assert store.rollback("code").weights.read_bytes() == weights[1]
    assert store.get("code").manifest.created == created[1]
    assert [v.manifest.created for v in store.versions("code")] == [created[0]]
    assert store.rollback("code").weights.read_bytes() == weights[0]  # one further back, not a toggle
    assert store.versions("code") == []
    with pytest.raises(AdapterError, match="no earlier version"):
        store.rollback("code")
    newest = make_adapter("code", ["write a function"], seed=9)  # what the learning loop's retrain does
    assert newest.manifest.parent == str(created[0]) and newest.manifest.created > created[2]
    assert [v.manifest.created for v in store.versions("code")] == [created[0]]
    assert store.rollback("code").manifest.created == created[0]
    assert staged(store) == []


def test_a_failed_publish_leaves_nothing_staged(settings, make_adapter, tmp_path):
    store = AdapterStore(settings.adapters_dir)
    good = make_adapter("code", ["x"], seed=1)
    no_weights = tmp_path / "no-weights"
    shutil.copytree(good.path, no_weights)
    (no_weights / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match="missing adapter_model"):
        store.publish(no_weights, Manifest(name="code", task="code", base_model=good.manifest.base_model))
    with pytest.raises(OSError):
        store.publish(tmp_path / "nowhere", Manifest(name="code", task="code", base_model="x"))
    assert staged(store) == []
    assert store.get("code").weights.read_bytes() == good.weights.read_bytes()
    (good.path / "manifest.json").write_text("{broken")  # a damaged current version is still pushed aside
    source = tmp_path / "source"
    shutil.copytree(good.path, source)
    (source / "manifest.json").unlink()
    manifest = Manifest(name="code", task="code", base_model=good.manifest.base_model)
    assert store.publish(source, manifest).manifest.created == manifest.created
    assert len(list((store.root / ".versions" / "code").iterdir())) == 1 and staged(store) == []
