"""The OpenAI-compatible API, driven by the real `openai` client against the real server on loopback:
model list, routed and pinned specialists, streaming, usage, cancel on disconnect, concurrency, the
keyboard's priority, the error format and exposure rules."""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
from dataclasses import replace

import openai
import pytest
from openai import OpenAI

from engine.api.protocol import split
from engine.api.server import ApiConfigError, ApiServer
from engine.serve import generate
from engine.serve.chat import Conversation, Finished
from engine.serve.generate import Sampling
from engine.serve.worker import API, KEYBOARD, InferenceWorker
from engine.service import Workstation
from engine.settings import load
from tests.conftest import ROOT, _adapter_maker, terminal_sigint
from tests.test_adapters import prompts

GREEDY = {"temperature": 0, "max_tokens": 24}
HELLO = [{"role": "user", "content": "Hello!"}]


@pytest.fixture(scope="module")
def station(tmp_path_factory, demo_model_dir):
    """One workstation for the module, with two trained specialists (math, translate)."""
    folder = tmp_path_factory.mktemp("api")
    shutil.copy(ROOT / "settings.toml", folder / "settings.toml")
    settings = load(folder / "settings.toml")
    make = _adapter_maker(settings, demo_model_dir)
    make("math", prompts("math"), seed=1)
    make("translate", prompts("translate"), seed=2)
    ws = Workstation(replace(settings, api=replace(settings.api, port=0)))
    ws.load(lambda *_: None, lambda _: None, lambda _: None)
    ws.start_api()
    yield ws
    ws.close()


@pytest.fixture(scope="module")
def client(station):
    return OpenAI(base_url=station.api_url, api_key="unused", max_retries=0, timeout=120)


def direct(station, text, mode, reasoning=None, max_new_tokens=24):
    """The same question asked of the engine itself, outside the history."""
    for ev in station.ask(Conversation(), text, mode=mode, reasoning=reasoning, store=False,
                          sampling=Sampling(greedy=True, max_new_tokens=max_new_tokens)):
        if isinstance(ev, Finished):
            return ev


def ext(obj):
    return obj.model_extra["tandem"]


def test_models_lists_auto_base_and_every_live_specialist(client):
    assert [m.id for m in client.models.list()] == ["auto", "base", "math", "translate"]


def test_a_pinned_specialist_answers_with_reasoning_content_and_real_usage(station, client):
    r = client.chat.completions.create(model="math", messages=HELLO, **GREEDY)
    want = direct(station, "Hello!", "math")
    msg = r.choices[0].message
    assert r.model == "math" and msg.role == "assistant"
    content, reasoning = split(want.reply)
    assert msg.content == content and (msg.model_extra["reasoning_content"] or "") == reasoning
    stats = want.reply.stats
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (stats.tokens_in, stats.tokens_out)
    assert r.usage.total_tokens == stats.tokens_in + stats.tokens_out
    tandem = ext(r)
    assert tandem["specialist"] == "math" and tandem["reason"] == "pinned" and tandem["confidence"] == 1.0
    row = station.history.turn(tandem["turn_id"])
    assert (row.source, row.adapter, row.status, row.prompt) == ("api", "math", "complete", "Hello!")
    assert (row.final, row.analysis, row.stats["tokens_out"]) == (want.reply.parser.final, want.reply.parser.analysis,
                                                                  stats.tokens_out)
    assert r.usage.prompt_tokens_details.cached_tokens == row.stats["tokens_reused"]


def test_streaming_gives_the_same_reply_in_chunks(station, client):
    whole = client.chat.completions.create(model="translate", messages=HELLO, **GREEDY)
    chunks = list(client.chat.completions.create(model="translate", messages=HELLO, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant" and ext(chunks[0])["specialist"] == "translate"
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    content = "".join(d.content or "" for d in deltas)
    reasoning = "".join(d.model_extra.get("reasoning_content") or "" for d in deltas)
    assert content == whole.choices[0].message.content
    assert reasoning == (whole.choices[0].message.model_extra["reasoning_content"] or "")
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finish] == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert {c.model for c in chunks} == {"translate"}


def test_auto_routes_to_the_trained_specialist_and_says_how_sure(station, client):
    r = client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "Wie viel ist 7 mal 8?"}],
                                       **GREEDY)
    tandem = ext(r)
    assert r.model == "math" and tandem["specialist"] == "math" and tandem["reason"] == "routed"
    assert tandem["confidence"] >= station.settings.adapters.router_threshold
    assert station.history.turn(tandem["turn_id"]).route["choice"] == "math"
    r = client.chat.completions.create(model="auto", messages=[{"role": "user", "content":
                                                                "Tell me about the history of Rome."}], **GREEDY)
    assert r.model == "base" and ext(r)["reason"] == "below threshold"


def test_reasoning_effort_and_the_conversation_reach_the_prompt(station, client):
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
               {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Hello!"}]
    low = client.chat.completions.create(model="base", messages=history, reasoning_effort="low", **GREEDY)
    high = client.chat.completions.create(model="base", messages=history, reasoning_effort="high", **GREEDY)
    from engine.harmony import Turn, encode_prompt

    tok = station.engine.lm.tokenizer
    turns = [Turn("user", "Hi"), Turn("assistant", "Hello."), Turn("user", "Hello!")]
    expected = {level: len(encode_prompt(tok, turns, level, "Be brief.")) for level in ("low", "high")}
    assert expected["low"] != expected["high"]
    assert (low.usage.prompt_tokens, high.usage.prompt_tokens) == (expected["low"], expected["high"])
    assert low.usage.prompt_tokens > len(encode_prompt(tok, turns[-1:], "low"))


def test_the_error_cases_come_back_in_openais_format(station, client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=HELLO)
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    for bad, param in (({"temperature": 7}, "temperature"), ({"reasoning_effort": "extreme"}, "reasoning_effort"),
                       ({"max_tokens": 0}, "max_tokens"), ({"n": 2}, "n")):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="base", messages=HELLO, **bad)
        assert e.value.body["param"] == param and e.value.body["type"] == "invalid_request_error"
    for messages in ([{"role": "assistant", "content": "hi"}], [],
                     [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="base", messages=messages)
        assert e.value.body["param"] == "messages"
    import httpx

    raw = httpx.Client(base_url=station.api_url, timeout=60)
    for body in (b'{"model": "base", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
                 b"[" * 100_000, b"\xff\xfe", b"{"):
        r = raw.post("/chat/completions", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", body[:20]
    r = raw.get("/nowhere")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert raw.get("/chat/completions").json()["error"]["code"] == "method_not_allowed"
    too_long = "word " * (station.engine.lm.max_len * 2)
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="base", messages=[{"role": "user", "content": too_long}],
                                           stream=stream)
        assert e.value.body["code"] == "context_length_exceeded"
    huge = "x" * (station.settings.api.max_request_kb * 1024 + 1)
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model="base", messages=[{"role": "user", "content": huge}])
    assert e.value.status_code == 413 and e.value.body["code"] == "request_too_large"
    assert not [t for t in station.history.turns(limit=100_000) if t.prompt in (too_long, huge)]  # never half-answered


def test_a_client_that_disconnects_cancels_its_reply_at_the_next_token(station, client, monkeypatch):
    go, sampled = threading.Event(), []
    real = generate._sample

    def paused(logits, s, gen):  # every token waits until the test lets it through
        go.wait(30)
        sampled.append(1)
        return real(logits, s, gen)

    monkeypatch.setattr(generate, "_sample", paused)
    api = station._api.api
    stream = client.chat.completions.create(model="base", messages=HELLO, stream=True, max_tokens=200)
    first = next(iter(stream))
    turn_id = ext(first)["turn_id"]
    assert api.active == 1
    stream.close()
    until(lambda: api.active == 0)  # the server saw the client go and cancelled the reply
    go.set()
    until(lambda: station.history.turn(turn_id).status != "pending")
    row = station.history.turn(turn_id)
    assert row.status == "cancelled" and row.stats["tokens_out"] == 1 and len(sampled) == 1


def test_eight_concurrent_clients_are_each_answered_and_recorded_once(station, client):
    results, errors = {}, []

    def ask(i):
        try:
            r = client.chat.completions.create(model="base", messages=[{"role": "user", "content": f"Question {i}?"}],
                                               temperature=0, max_tokens=8)
            results[i] = ext(r)["turn_id"]
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(results) == 8
    rows = [t for t in station.history.turns(limit=100_000) if t.prompt.startswith("Question ")]
    assert sorted(t.prompt for t in rows) == sorted(f"Question {i}?" for i in range(8))
    assert {t.id for t in rows} == set(results.values())
    assert all(t.source == "api" and t.status == "complete" for t in rows)


def test_requests_beyond_the_limit_get_429_and_the_keyboard_goes_first(station, client):
    """With the worker busy, API requests queue; one beyond api.max_concurrent is refused; a keyboard
    prompt sent after them is answered before them."""
    gate = threading.Event()
    station.engine.worker.submit(gate.wait)
    limited = ApiServer(lambda: station.engine, replace(station.settings.api, port=0, max_concurrent=2))
    url = limited.start()
    try:
        other = OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
        done = {}

        def ask(i):
            r = other.chat.completions.create(model="base", messages=[{"role": "user", "content": f"queued {i}"}],
                                              temperature=0, max_tokens=4)
            done[i] = ext(r)["turn_id"]

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        until(lambda: limited.api.active == 2 and station.engine.worker.queued() == 2)
        with pytest.raises(openai.RateLimitError) as e:
            other.chat.completions.create(model="base", messages=HELLO, max_tokens=4)
        assert e.value.body["code"] == "rate_limit_exceeded"
        keyboard = {}
        kb = threading.Thread(target=lambda: keyboard.update(done=direct_stored(station, "from the keyboard")))
        kb.start()
        until(lambda: station.engine.worker.queued() == 3)
        gate.set()
        for t in [*threads, kb]:
            t.join(120)
        assert keyboard["done"].turn_id < min(done.values())  # started first, though it came last
        assert station.history.turn(keyboard["done"].turn_id).source == "app"
    finally:
        gate.set()
        limited.stop()


def direct_stored(station, text):
    for ev in station.ask(Conversation(), text, mode="base", sampling=Sampling(greedy=True, max_new_tokens=4)):
        if isinstance(ev, Finished):
            return ev


def test_worker_runs_keyboard_jobs_before_api_jobs_and_fifo_within_each():
    worker = InferenceWorker()
    gate, order = threading.Event(), []
    worker.submit(gate.wait)
    jobs = [worker.submit(lambda n=n: order.append(n), priority=p) for n, p in
            (("api1", API), ("kb1", KEYBOARD), ("api2", API), ("kb2", KEYBOARD))]
    gate.set()
    for j in jobs:
        j.result(10)
    worker.close()
    assert order == ["kb1", "kb2", "api1", "api2"]


def test_a_token_is_required_when_set_and_for_any_non_loopback_address(station):
    with pytest.raises(ApiConfigError, match="api.token"):
        ApiServer(lambda: station.engine, replace(station.settings.api, host="0.0.0.0", token=""))
    token = "s3cret-token-of-20-chars"
    guarded = ApiServer(lambda: station.engine, replace(station.settings.api, port=0, token=token))
    url = guarded.start()
    try:
        with pytest.raises(openai.AuthenticationError) as e:
            OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
        assert e.value.body["code"] == "invalid_api_key"
        assert "auto" in [m.id for m in OpenAI(base_url=url, api_key=token, max_retries=0).models.list()]
    finally:
        guarded.stop()


def until(condition, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_remote_backend_answers_with_the_specialist_tandem_routed_to(station, tmp_path):
    """[model] backend pointed at Tandem's own server over real HTTP: this side routes, the remote answers
    with model=<specialist>, and the reply comes back in harmony's channels."""
    from engine.serve.remote import RemoteEngine

    s = station.settings
    settings = replace(s, model=replace(s.model, backend=station.api_url),
                       paths=replace(s.paths, history=str(tmp_path / "remote.db")))
    ws = Workstation(settings)
    ws.load(lambda *_: None, lambda _: None, lambda _: None)
    remote = ws.engine
    try:
        assert isinstance(remote, RemoteEngine) and remote.specialists() == ["math", "translate"]
        assert ws.model_info().device == "remote"
        prompt = "Wie viel ist 7 mal 8?"
        done = [ev for ev in ws.ask(Conversation(), prompt, mode="auto",
                                    sampling=Sampling(greedy=True, max_new_tokens=24))][-1]
        assert done.adapter == "math" and done.decision.reason == "routed"
        served = station.history.turns(limit=100_000)[-1]
        assert (served.prompt, served.adapter, served.source, served.route["reason"]) == (prompt, "math", "api",
                                                                                         "pinned")
        want = direct(station, prompt, "math")
        assert split(done.reply) == split(want.reply)
        assert (done.reply.stats.tokens_in, done.reply.stats.tokens_out) == (want.reply.stats.tokens_in,
                                                                             want.reply.stats.tokens_out)
        mine = ws.history.turn(done.turn_id)
        assert (mine.adapter, mine.status, mine.route["reason"]) == ("math", "complete", "routed")
        with pytest.raises(Exception, match="no adapter named 'nope'"):
            remote.check_mode("nope")
    finally:
        ws.close()


async def test_the_apps_switch_serves_the_api_from_the_apps_own_engine(settings, demo_model_dir):
    from tests.test_tui import app_for, ready
    from tests.test_tui import until as until_app

    app = app_for(replace(settings, api=replace(settings.api, port=0)))
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot)
        await pilot.press("f10")
        await until_app(pilot, lambda: bool(app.service.api_url))
        c = OpenAI(base_url=app.service.api_url, api_key="unused", max_retries=0, timeout=60)
        r = await asyncio.to_thread(c.chat.completions.create, model="base", messages=HELLO, max_tokens=4,
                                    temperature=0)
        row = app.service.history.turn(ext(r)["turn_id"])  # the app's own history: one process, one worker
        assert row.source == "api" and row.status == "complete"
        await pilot.press("f10")
        await until_app(pilot, lambda: not app.service.api_url)
        with pytest.raises(openai.APIConnectionError):
            c.models.list()


def test_tandem_serve_prints_its_url_serves_and_stops_on_ctrl_c(settings_path, demo_model_dir, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    refused = subprocess.run([sys.executable, "-m", "engine.cli", "serve", "--host", "0.0.0.0"], capture_output=True,
                             text=True, timeout=120)
    assert refused.returncode == 1 and "api.token" in refused.stderr and "model ready" not in refused.stderr
    # stderr goes to a file: a pipe nobody reads blocks the server once it holds 64 KiB; -X faulthandler and
    # SIGABRT on a hang put every thread's stack into it
    with open(tmp_path / "serve.err", "w+") as err:
        proc = subprocess.Popen([sys.executable, "-X", "faulthandler", "-m", "engine.cli", "serve", "--port", "0"],
                                stdout=subprocess.PIPE, stderr=err, text=True, env={**os.environ},
                                preexec_fn=terminal_sigint)
        try:
            url = proc.stdout.readline().strip()
            assert url.startswith("http://127.0.0.1:") and url.endswith("/v1"), (tmp_path / "serve.err").read_text()
            assert [m.id for m in OpenAI(base_url=url, api_key="x", max_retries=0).models.list()] == ["auto", "base"]
            proc.send_signal(signal.SIGINT)
            try:
                code = proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGABRT)
                proc.wait(10)
                code = None
            assert code == 130, (tmp_path / "serve.err").read_text()[-6000:]
        finally:
            proc.kill()
            proc.communicate()


def test_an_unreachable_backend_is_one_clear_error(settings, tmp_path):
    from engine.serve.model import ModelLoadError

    ws = Workstation(replace(settings, model=replace(settings.model, backend="http://127.0.0.1:9/v1")))
    try:
        with pytest.raises(ModelLoadError, match=r"model.backend = 'http://127.0.0.1:9/v1': cannot list its models"):
            ws.load(lambda *_: None, lambda _: None, lambda _: None)
    finally:
        ws.close()
