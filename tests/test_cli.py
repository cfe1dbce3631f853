"""The `tandem` command as a user runs it: a real subprocess."""

import json
import os
import subprocess
import sys

import pytest


def tandem(*args, env_extra=None, stdin=None, timeout=240):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, input=stdin)


@pytest.fixture
def greedy(settings_path):
    """The chat answers greedily: tests assert on the reply's structure, which sampling must not decide
    (a sampled toy reply may end before its final channel)."""
    from engine.settings import load, save, updated

    save(updated(load(settings_path), "chat.temperature", 0.0))
    return settings_path


def test_chat_once_json_returns_parsed_channels(settings_path, greedy, demo_model_dir):
    r = tandem("chat", "--once", "What is 2+2?", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out) >= {"final", "analysis", "stats", "route", "adapter"}
    assert out["analysis"] and out["final"] and out["stats"]["tokens_out"] > 0
    assert out["adapter"] == "base" and out["route"]["reason"] == "no specialists"
    assert (settings_path.parent / "history.db").exists()  # the turn was stored beside the settings


def test_final_only_prints_just_the_answer(settings_path, greedy, demo_model_dir):
    r = tandem("chat", "--once", "Hello!", "--final-only")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and "<|" not in r.stdout


def test_repl_reads_prompts_until_empty_line(settings_path, greedy, demo_model_dir):
    r = tandem("chat", stdin="Hello!\n\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()


def test_bad_settings_exit_1_with_key(settings_path):
    settings_path.write_text('[chat]\nreasoning = "max"\n')
    r = tandem("chat", "--once", "hi")
    assert r.returncode == 1 and "chat.reasoning" in r.stderr and "low, medium or high" in r.stderr


@pytest.mark.parametrize("name", ["./missing-model", "/nonexistent/gpt-oss"])
def test_missing_model_exit_1_with_hint(settings_path, name):
    settings_path.write_text(f'[model]\nname = "{name}"\n')
    r = tandem("chat", "--once", "hi")
    assert r.returncode == 1 and "[model] name" in r.stderr and "Traceback" not in r.stderr
