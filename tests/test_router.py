"""The router: abstention on unrelated prompts, other languages and scripts, explanations, corrections,
and one way to build it for the engine and the CLI."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from textual.app import App

from engine.serve.router import (
    Router,
    RouterError,
    correct,
    name_text,
    router_for,
    task_library,
    unrelated_prompts,
)
from engine.store.corrections import RouterCorrections
from tests.conftest import ROUTER_TASKS as TASKS
from tests.conftest import sample_prompts as prompts
from tui.screens.route import RouteCorrection, RouteScreen

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def unnamed():
    return Router(threshold=0.4).fit({t: prompts(t) for t in TASKS})


@pytest.fixture(scope="module")
def bare():
    """Without the task library, named and not: what a name adds where no library family covers it."""
    return (Router(threshold=0.4, library={}).fit({t: prompts(t) for t in TASKS}, names={t: t for t in TASKS}),
            Router(threshold=0.4, library={}).fit({t: prompts(t) for t in TASKS}))


def fake_adapter(settings, name, examples, base, task=None):
    """A store entry the router reads (manifest + PEFT file names); the router never loads weights."""
    folder = settings.adapters_dir / name
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (folder / "adapter_model.safetensors").write_bytes(b"")
    (folder / "manifest.json").write_text(json.dumps({"name": name, "task": task or name, "base_model": base,
                                                      "prompts": examples}))


@pytest.mark.parametrize("prompt", [
    "My knee hurts when I climb stairs, is it serious?",  # the cases: health, a poem
    "Write a poem about the northern lights.",
    "Can you recommend a quiet beach in Greece?",
    "Как научиться плавать взрослому?",
    "週末におすすめの映画はありますか？",
])
def test_unrelated_prompts_go_to_base(router, prompt):
    d = router.route(prompt)
    assert d.choice == "base" and d.reason == "below threshold", d.explain()


@pytest.mark.parametrize("prompt", [
    # issue 24: short chat turns; before the shipped set had any, 26 of 40 such went to a specialist
    "ok", "thanks!", "lol", "yes", "no", "merci", "спасибо", "asante", "continue", ":)", "", "🙂🙂",
])
def test_short_chat_turns_go_to_base(router, prompt):
    d = router.route(prompt)
    assert d.choice == "base", d.explain()


@pytest.mark.parametrize(("prompt", "task"), [
    # Cyrillic, Japanese, Chinese, Arabic: none in the training data
    ("Сколько будет 48 плюс 19?", "math"),
    ("81を9で割るといくつですか？", "math"),
    ("Quanto fa 120 diviso 8?", "math"),
    ("Напиши функцию на Python, которая удаляет пробелы из строки.", "code"),
    ("用Python写一个函数，计算列表的平均值。", "code"),
    ("Переведи на немецкий: доброе утро", "translate"),
    ("كيف أقول 'صباح الخير' بالإسبانية؟", "translate"),
    # issue 24: languages outside USE's 16, which the old router sent to base
    ("कृपया 36 और 27 का गुणनफल बताइए।", "math"),  # Hindi
    ("इसे अंग्रेज़ी में अनुवाद कीजिए: मेरा घर नदी के पास है", "translate"),
    ("Πόσο κάνει 64 διά 8;", "math"),  # Greek
    ("Μετάφρασε στα αγγλικά: ο σκύλος τρέχει στον κήπο", "translate"),
    ("כמה זה 45 כפול 3?", "math"),  # Hebrew
    ("Tafsiri kwa Kiingereza: mvua inanyesha leo", "translate"),  # Swahili
    ("Hãy dịch sang tiếng Anh: tôi thích đọc sách", "translate"),  # a known miss until the task library
    # issue 24, round 3: requests unlike every example that the discriminant term (_discriminants) routes;
    # each went to base (the integral to code) without it
    ("Wenn ich 2000 Euro zu 3 % Zinsen für 4 Jahre anlege, wie viel habe ich am Ende?", "math"),
    ("Kalau 3 kg beras harganya Rp45.000, berapa harga 7 kg?", "math"),
    ("Compute the integral of 2x from 0 to 4.", "math"),
    ("Nataka kumwandikia rafiki yangu Mfaransa \"nakutakia siku njema\" kwa lugha yake.", "translate"),
    ("식당에서 \"계산서 주세요\"라고 일본어로 하려면 뭐라고 해요?", "translate"),
    ("मुझे अपने जापानी दोस्त को \"तुम्हारी याद आती है\" लिखना है, जापानी में कैसे लिखूं?", "translate"),
])
def test_task_requests_in_other_languages_and_words_are_routed(router, prompt, task):
    d = router.route(prompt)
    assert (d.choice, d.reason) == (task, "routed"), d.explain()


@pytest.mark.parametrize("prompt", [
    "Write a SQL query that returns every order placed in March.",
    "Implement a stack class in Java with push and pop.",
    "Write a Rust function that counts the vowels in a string.",
    "Écris une fonction Go qui inverse une chaîne.",
    "Schreib ein Bash-Skript, das alle leeren Dateien in einem Ordner löscht.",
])
def test_a_python_trained_code_specialist_takes_other_programming_languages(router, prompt):
    assert all("Python" in p for p in prompts("code"))  # the specialist saw Python only
    d = router.route(prompt)
    assert (d.choice, d.reason) == ("code", "routed"), d.explain()


@pytest.mark.parametrize("prompt", [
    "Is being a sworn translator a well-paid job?",  # names a specialist's subject, asks something else
    "Warum fällt vielen Kindern Mathematik so schwer?",
    "¿Qué lenguaje de programación aprendió primero Linus Torvalds?",
    "क्या गणित के शिक्षक बनना अच्छा करियर है?",
    "Je, walimu wa hisabati wanalipwa vizuri?",
    "How much do translators earn?",  # the issue's own; each specialist borrows a library family (test_router_tasks)
    "Is a maths degree worth it?",
    "Wie viel verdienen Übersetzer im Monat?",
    "Combien gagne un développeur Python ?",
    "ผู้แปลหนังสือได้เงินเดือนเท่าไหร่",
    "Kwa nini hisabati ni ngumu kwa watoto?",
])
def test_topic_without_the_task_stays_with_base(router, prompt):
    d = router.route(prompt)
    assert d.choice == "base", d.explain()


@pytest.mark.parametrize(("prompt", "task"), [
    # issue 24, round 4: the math examples are all arithmetic; the name "math" covers a priced word
    # problem in Vietnamese (base at 0.37 without names) and a circle's area in Korean (code at 0.95).
    # Without the task library, which covers both now (tests/test_router_tasks.py).
    ("Nếu 1 kg thịt giá 150 nghìn thì 2,5 kg giá bao nhiêu?", "math"),
    ("반지름이 5cm인 원의 넓이를 구해 주세요.", "math"),
])
def test_a_specialists_name_counts_where_its_examples_bear_it_out(bare, prompt, task):
    named, unnamed = bare
    d, before = named.route(prompt), unnamed.route(prompt)
    assert d.choice == task and d.scores[task] > before.scores[task], (d.explain(), before.explain())


@pytest.mark.parametrize("names", [{"math": "s1", "code": "s2", "translate": "s3"},
                                   {"math": "alice", "code": "bob", "translate": "carol"}])
def test_a_name_that_says_nothing_of_the_task_changes_nothing(unnamed, names):
    """Where the examples do not bear a name out, it has no weight in any view. (e5 reads the math
    examples as a little nearer "A s1 question" than the unrelated prompts are, digits beside digits, so
    that name gets some: it then routes the Vietnamese word problem as the name "math" does.)"""
    named = Router(threshold=0.4).fit({t: prompts(t) for t in TASKS}, names=names)
    silent = [named.classes.index(t) for t in ("code", "translate")]
    assert all(not s.names[:, silent].any() for s in named._spaces)
    for prompt in ("반지름이 5cm인 원의 넓이를 구해 주세요.", "Write a SQL query that counts orders per day.",
                   "¿Cómo se dice 'buenas noches' en alemán?", "Is being a sworn translator a well-paid job?",
                   "Who won the Tour de France in 1998?", "ok", "danke", "🙂"):
        d, before = named.route(prompt), unnamed.route(prompt)
        assert d.choice == before.choice, (prompt, d.explain(), before.explain())


def test_a_name_is_read_as_words_in_a_neutral_request():
    assert name_text("sql_helper") == "A sql helper question"
    assert name_text("fr-en.v2") == "A fr en v2 question"
    assert name_text("") == "" and name_text("._-") == ""


def test_the_discriminant_weighs_what_unrelated_prompts_do_not_vary_along():
    """Two directions set the examples apart from the unrelated prompts by as much; the unrelated prompts
    spread 10x wider along the first (their topics), so the discriminant leans on the second. Scaled so
    that the unrelated prompts' scores spread by 1 around 0."""
    from engine.serve.router import _discriminants

    rng = np.random.default_rng(0)
    neg = rng.normal(size=(600, 8)) * np.array([1.0, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1])
    spec = rng.normal(size=(20, 8)) * 0.05 + np.array([1.0, 1.0, 0, 0, 0, 0, 0, 0])
    w, mean = _discriminants(spec.astype(np.float32), np.zeros(20, int), neg.astype(np.float32), 1)
    assert w.shape == (8, 1) and abs(w[1, 0]) > 5 * abs(w[0, 0])
    scores = (neg - mean) @ w[:, 0]
    assert abs(scores.mean()) < 1e-4 and abs(scores.std() - 1) < 1e-3
    assert ((spec - mean) @ w[:, 0]).min() > np.quantile(scores, 0.999)


def test_other_programming_languages_join_only_examples_that_name_one():
    from engine.serve.router import CODE_LANGUAGES, with_code_languages

    out = with_code_languages(["Write a Python function that sums a list.", "What is 2 plus 2?"])
    assert out[:2] == ["Write a Python function that sums a list.", "What is 2 plus 2?"]
    assert {f"Write a {lang} function that sums a list." for lang in CODE_LANGUAGES} <= set(out)
    assert len(out) == len(CODE_LANGUAGES) + 1
    assert with_code_languages(["Let's go to the beach.", "Gorust is a word"]) == [
        "Let's go to the beach.", "Gorust is a word"]  # lower-case "go" and words that merely contain a name


def test_few_examples_and_fewer_specialists_still_abstain():
    """With one specialist, prompts of other tasks and unrelated ones stay with base; its own still route."""
    only_math = Router(threshold=0.4).fit({"math": prompts("math", 10)})
    assert only_math.route("Wie viel ist 17 mal 3?").choice == "math"
    for other in ("Traduis en anglais : merci beaucoup", "Write a haiku about rain.", "Wie backe ich Brot?"):
        assert only_math.route(other).choice == "base", other


def test_a_lone_math_specialist_leaves_code_requests_to_base():
    """Was a known miss: e5 found a code request nearer math than the unrelated set. USE, which knows
    English, is sure it is not math, so the cascade never asks e5."""
    only_math = Router(threshold=0.4).fit({"math": prompts("math", 10)})
    d = only_math.route("Write a Python function that reverses a list.")
    assert d.choice == "base" and d.views == ("use",), d.explain()


def test_decision_explains_top_runner_up_and_nearest_example(router):
    d = router.route("Calcule 12 fois 12, s'il te plaît.")
    assert d.choice == d.top == "math" and d.runner_up in ("code", "translate")
    assert d.confidence >= d.runner_up_score == sorted(d.scores.values())[-2]
    assert d.nearest in prompts("math") and d.nearest_label == "math" and 0 < d.nearest_similarity <= 1.0001
    assert set(d.as_dict()) >= {"top", "runner_up", "runner_up_score", "nearest", "nearest_label"}
    below = router.route("Write a poem about the northern lights.")
    # the nearest unrelated prompt: shipped as such, or a library family no specialist adopted (a poem)
    assert below.nearest_label == "none" and below.nearest in {*unrelated_prompts(), *task_library()["creative"]}
    assert "runner-up" in d.explain() and "nearest example (math" in d.explain()


def test_a_specialist_on_a_topic_the_unrelated_set_covers_still_gets_its_prompts():
    """The shipped unrelated prompts about cooking give way to a user's cooking specialist."""
    cooking = ["How do I make a tomato sauce from scratch?", "Give me a recipe for lentil soup.",
               "How long should I roast a chicken?", "What can I cook with leftover rice?",
               "Comment faire une quiche lorraine ?", "Recette de la soupe à l'oignon, s'il te plaît.",
               "Wie koche ich einen Risotto?", "Rezept für Kartoffelsalat bitte.",
               "¿Cómo se prepara un gazpacho?", "Dame una receta de paella."]
    r = Router(threshold=0.4).fit({"cooking": cooking, "math": prompts("math", 10)})
    assert r.route("How do I make pancakes for breakfast?").choice == "cooking"
    assert r.route("Как приготовить блины?").choice == "cooking"
    assert r.route("Who won the Tour de France in 1998?").choice == "base"


def test_the_engine_names_each_specialist_for_its_task(settings, demo_base, monkeypatch):
    """router_for passes each manifest's task: a specialist the user named "tutor-2" for --task math.
    (Without the task library, which would route the prompt on its own.)"""
    for name, task in (("tutor-2", "math"), ("coder", "code"), ("words", "translate")):
        fake_adapter(settings, name, prompts(task), demo_base, task=task)
    monkeypatch.setattr("engine.serve.router.task_library", dict)
    prompt = "Nếu 1 kg thịt giá 150 nghìn thì 2,5 kg giá bao nhiêu?"
    d = router_for(settings, demo_base).route(prompt)
    unnamed = Router(threshold=0.4).fit({t: prompts(t) for t in TASKS})
    assert d.choice == "tutor-2" and unnamed.route(prompt).choice == "base", d.explain()


def test_corrections_become_examples_at_once_and_persist(settings, demo_base):
    fake_adapter(settings, "math", prompts("math"), demo_base)
    fake_adapter(settings, "code", prompts("code"), demo_base)
    prompt = "What is the best way to name a Python variable?"  # style advice about code: the user says none
    correct(settings, demo_base, prompt, "none")
    after = router_for(settings, demo_base).route(prompt)
    assert after.choice == "base" and after.nearest == prompt and after.nearest_label == "none"
    poem = "Write a sonnet about prime numbers."
    correct(settings, demo_base, poem, "math")
    correct(settings, demo_base, poem, "code")  # the latest correction of a prompt wins
    fixed = router_for(settings, demo_base).route(poem)
    assert fixed.choice == "code" and fixed.nearest == poem
    stored = RouterCorrections(settings.adapters_dir).latest()
    assert [(c.prompt, c.label) for c in stored] == [(prompt, "none"), (poem, "code")]
    with open(RouterCorrections(settings.adapters_dir).path, "a") as fh:
        fh.write("{not json\n")
    assert len(RouterCorrections(settings.adapters_dir).latest()) == 2  # a bad line costs only itself
    with pytest.raises(RouterError, match="'cooking': expected 'none' or one of the specialists in .*code, math"):
        correct(settings, demo_base, poem, "cooking")


@pytest.fixture
def demo_base(demo_model_dir):
    return f"demo:{demo_model_dir.name}"


def test_cli_route_names_only_adapters_for_the_loaded_base(settings, settings_path, demo_base):
    """Regression (issue 14): `tandem route` read the unfiltered store and could name an adapter the
    engine would never load."""
    fake_adapter(settings, "math", prompts("math"), demo_base)
    fake_adapter(settings, "othercode", prompts("code"), "someone/other-base")

    def run(*args):
        return subprocess.run([sys.executable, "-m", "engine.cli", "route", *args], capture_output=True, text=True,
                              timeout=180, env={**os.environ, "TANDEM_SETTINGS": str(settings_path)})

    out = json.loads(run("Write a Python function that sorts a list.", "--json").stdout)
    assert out["choice"] != "othercode" and set(out["scores"]) == {"math"}
    corrected = run("Write a Python function that sorts a list.", "--correct", "math", "--json")
    assert json.loads(corrected.stdout)["choice"] == "math" and "recorded" in corrected.stderr
    refused = run("anything", "--correct", "othercode")
    assert refused.returncode == 1 and "'othercode': expected 'none' or one of the specialists" in refused.stderr


async def test_route_screen_shows_why_and_returns_the_correction(router):
    prompt = "Write a poem about the northern lights."
    decision = router.route(prompt).as_dict()
    results = []

    class Host(App):
        def on_mount(self) -> None:
            self.push_screen(RouteScreen(prompt, decision, ["code", "math"]), results.append)

    async with Host().run_test(size=(100, 20)) as pilot:
        await pilot.pause()
        shown = " ".join(str(w.render()) for w in pilot.app.screen.query(".route-line"))
        assert "below threshold" in shown and "runner-up" in shown and decision["nearest"][:20] in shown
        await pilot.press("3")  # no third specialist: nothing happens
        await pilot.press("2")
        await pilot.pause()
    assert results == [RouteCorrection(prompt, "math")]


def test_the_encoder_reads_a_bounded_printable_text():
    """A pasted document is routed on its start and end (routing stays in milliseconds), and control
    characters never reach the encoder."""
    from engine.serve.router import HEAD_CHARS, TAIL_CHARS, for_encoder

    long = "Translate to German: " + "word " * 20000 + "Thanks!"
    seen = for_encoder(long)
    assert len(seen) <= HEAD_CHARS + TAIL_CHARS + 3
    assert seen.startswith("Translate to German:") and seen.endswith("Thanks!")
    assert for_encoder("a\x1b[31m\x00b\n\tc") == "a [31m b c"


def test_encoder_vectors_last_between_processes(tmp_path, monkeypatch):
    """Kept texts are embedded once per encoder version: a new process (a new Encoder) reads them back
    instead of embedding the shipped set and the examples again at every start."""
    from engine.serve.router import Encoder

    monkeypatch.setenv("TANDEM_CACHE", str(tmp_path))
    embedded: list[str] = []

    def load():
        def embed(texts):
            embedded.extend(texts)
            return np.array([[len(t), t.count("a") + 1.0, 1.0] for t in texts], np.float32)
        return embed

    texts = ["alpha", "beta\x00", "a long one " * 200, "ünïcode ✓"]
    first = Encoder("fake", "numpy", load, centred=False).encode(texts, cache=True)
    assert len(embedded) == 1 + len(texts)  # the width probe, then each text (as the encoder reads it)
    embedded.clear()
    again = Encoder("fake", "numpy", load, centred=False).encode(texts, cache=True)
    assert embedded == ["."]  # only the width probe
    assert np.array_equal(first, again)
    stored = next((tmp_path / "router").glob("fake-*.npz"))
    assert stored.stat().st_mode & 0o777 == 0o600


def test_the_cascade_asks_e5_only_where_use_is_unsure(router):
    """USE (~1.5 ms) settles prompts it routes, and prompts in its languages where it finds nothing near;
    e5 (~15-30 ms) reads the rest. Reading every prompt with both gives the same choices here."""
    both = ("use", "e5", "e5-unquoted")
    cases = [("Calcule 12 fois 12, s'il te plaît.", "math", ("use",)),  # USE routes it
             ("Write a poem about the northern lights.", "base", ("use",)),  # English, nothing near
             ("कृपया 36 और 27 का गुणनफल बताइए।", "math", ("use", "e5")),  # Hindi: USE does not read it
             ("सर्दियों में बाल झड़ने से कैसे रोकें?", "base", both)]
    full = Router(threshold=0.4, cascade=False).fit({t: prompts(t) for t in TASKS})
    for prompt, choice, views in cases:
        d = router.route(prompt)
        assert (d.choice, d.views) == (choice, views), d.explain()
        assert d.as_dict()["views"] == list(views)
        every = full.route(prompt)
        assert (every.choice, every.views) == (choice, both), every.explain()


def test_language_of_names_the_language_and_how_sure():
    from engine.serve.router import USE_LANGUAGES, language_of

    assert language_of("Tôi muốn học tiếng Anh vào buổi tối.")[0] == "vi"
    lang, p = language_of("Wie viel kostet eine Fahrkarte nach Berlin?")
    assert lang == "de" and lang in USE_LANGUAGES and 0.5 < p <= 1.0
    assert 0.0 <= language_of("\x00\x01 ")[1] <= 1.0  # nothing to read: an answer, not an error


def test_e5_loses_the_directions_that_only_tell_languages_apart():
    """The shipped unrelated prompts ask the same kinds of things in 40 languages: once the language
    directions are out, their per-language means sit much closer together, and the directions are
    orthonormal (the projection removes them and nothing else)."""
    from engine.serve.router import ENCODERS, LANGUAGE_DIRECTIONS, unrelated_languages

    e5 = ENCODERS["e5"]
    shipped, langs = list(unrelated_prompts()), unrelated_languages()
    vectors = e5.encode(shipped, cache=True)
    drop = e5._drop
    assert drop.shape == (LANGUAGE_DIRECTIONS, vectors.shape[1])
    assert np.allclose(drop @ drop.T, np.eye(LANGUAGE_DIRECTIONS), atol=1e-4)
    assert np.abs(vectors @ drop.T).max() < 1e-4

    def spread(x):
        means = np.stack([x[[v == lang for v in langs]].mean(axis=0) for lang in set(langs)
                          if langs.count(lang) >= 3])  # as the router does: one prompt's mean is its meaning
        return float(np.linalg.norm(means - means.mean(axis=0), axis=1).mean())

    raw = np.stack([e5._cache[t] for t in shipped]) - e5._mean
    before = spread(raw / np.linalg.norm(raw, axis=1, keepdims=True))
    assert spread(vectors) < 0.6 * before


def test_the_unquoted_view_reads_the_request_without_what_it_quotes():
    from engine.serve.router import VIEWS, unquoted

    assert unquoted("'Xin chào' tiếng Hàn là gì?") == "tiếng Hàn là gì?"
    assert unquoted('Wie sagt man „guten Appetit" auf Polnisch?') == "Wie sagt man auf Polnisch?"
    assert unquoted("「ありがとう」は英語で？ and «merci» or “thanks”") == "は英語で？ and or"
    assert unquoted("It's Bob's car, no quotes here") == "It's Bob's car, no quotes here"
    long = "'" + "x" * 200 + "' is too long to be a phrase"
    assert unquoted(long) == long
    view = VIEWS["e5-unquoted"]
    assert view.encoder is VIEWS["e5"].encoder and view.text("say 'hi' in Thai") == "say in Thai"
