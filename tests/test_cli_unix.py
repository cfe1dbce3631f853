"""The CLI as a Unix tool: listings that never drop rows silently, pipes, argument bytes, file modes."""

import json
import os
import stat
import subprocess
import sys

import pytest

from engine.store.history import History
from tests.test_cli import tandem


@pytest.fixture
def big_history(settings):
    """1500 turns in one conversation and 120 conversations in all: more than any default page."""
    h = History(settings.history_db)
    first = h.new_conversation("first")
    for i in range(1500):
        t = h.start_turn(first, f"question {i} at 50% and a_b", "base", {}, {})
        h.finish_turn(t, f"answer {i}", "", "", {}, "complete")
    for i in range(119):
        h.new_conversation(f"other {i}")
    h.close()
    return first


def test_export_and_show_cover_every_row(settings_path, big_history):
    r = tandem("history", "export")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in r.stdout.splitlines()]
    assert len(rows) == 1500 and rows[-1]["prompt"].startswith("question 1499")
    assert "exported 1500 turns" in r.stderr
    shown = tandem("history", "show", str(big_history)).stdout
    assert shown.count("] you: ") == 1500


def test_listings_say_how_many_they_show_and_how_to_get_the_rest(settings_path, big_history):
    r = tandem("history", "search", "question")
    assert len(r.stdout.splitlines()) == 100
    assert "showing the oldest 100 of 1500 matching turns; --limit 0 shows all" in r.stderr
    r = tandem("history", "search", "question", "--limit", "0")
    assert len(r.stdout.splitlines()) == 1500 and "showing" not in r.stderr
    r = tandem("history", "list")
    assert len(r.stdout.splitlines()) == 50 and "50 of 120 conversations" in r.stderr
    assert len(tandem("history", "list", "--limit", "0").stdout.splitlines()) == 120
    assert tandem("history", "list", "--limit", "-3").returncode == 2


def test_search_reads_wildcards_as_typed(settings_path, big_history):
    """% and _ are characters the user typed, not SQL wildcards."""
    assert len(tandem("history", "search", "50%", "--limit", "0").stdout.splitlines()) == 1500
    assert tandem("history", "search", "5_%").stdout == ""
    assert tandem("history", "search", "a_b", "--limit", "3").stdout.count("a_b") == 3


def test_a_closed_pipe_ends_quietly(settings_path, big_history):
    """`tandem history export | head -1` printed 'error: [Errno 32] Broken pipe'."""
    cmd = f"{sys.executable} -m engine.cli history export 2>err.txt | head -1"
    r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, cwd=settings_path.parent, timeout=120)
    assert json.loads(r.stdout)["prompt"].startswith("question 0")
    assert (settings_path.parent / "err.txt").read_text() == ""


def test_an_argument_that_is_not_utf8_is_one_line(settings_path):
    r = subprocess.run([sys.executable, "-m", "engine.cli", "history", "search", b"caf\xe9"], capture_output=True,
                       timeout=120)
    err = r.stderr.decode("utf-8", "replace")
    assert r.returncode == 2 and len(err.strip().splitlines()) == 1, err
    assert "argument 3" in err and "not UTF-8" in err and "0xe9" in err and "Traceback" not in err


def test_an_existing_history_file_is_made_private(tmp_path):
    path = tmp_path / "history.db"
    History(path).close()
    for f in (path, tmp_path / "history.db-wal"):
        if f.exists():
            os.chmod(f, 0o644)
    History(path).close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_run_being_created_is_queued_not_failed(settings, tmp_path):
    """Regression: the first set_state read a missing state.json and wrote its error into the run."""
    from engine.train.runs import Run

    folder = settings.logs_dir / "runs" / "x"
    folder.mkdir(parents=True)
    state = Run(folder).set_state(status="queued")
    assert state.status == "queued" and state.error == ""
    assert json.loads((folder / "state.json").read_text())["error"] == ""


def test_interactive_chat_survives_an_over_long_prompt(settings_path, demo_model_dir):
    r = tandem("chat", stdin="word " * 40000 + "\nHello!\n\n")
    assert r.returncode == 0, r.stderr
    assert "error: the prompt needs" in r.stderr
    assert "[base · " in r.stderr  # the prompt after it was answered
