"""The router's shipped task library: the data itself, the families specialists adopt from their own
examples, what a borrowed prompt routes, and that borrowing lets no topic-not-task prompt in."""

import json
import re
from collections import Counter

import pytest

from engine.serve import router as router_module
from engine.serve.router import (
    TASK_FAMILIES,
    TASK_LIBRARY,
    Router,
    RouterError,
    task_library,
    unrelated_prompts,
)
from tests.conftest import ROUTER_TASKS as TASKS
from tests.conftest import sample_prompts as prompts

# The issue asks for at least these languages (ISO 639-1 codes, as the unrelated set writes them).
LANGUAGES = {"en", "fr", "de", "es", "it", "pt", "nl", "pl", "ru", "uk", "cs", "ro", "tr", "ar", "he", "fa", "hi", "bn",
             "ur", "th", "vi", "id", "ms", "sw", "el", "ja", "ko", "zh", "da", "sv"}
COOKING = ["How do I make a tomato sauce from scratch?", "Give me a recipe for lentil soup.",
           "How long should I roast a chicken?", "What can I cook with leftover rice?",
           "Comment faire une quiche lorraine ?", "Recette de la soupe à l'oignon, s'il te plaît.",
           "Wie koche ich einen Risotto?", "Rezept für Kartoffelsalat bitte.",
           "¿Cómo se prepara un gazpacho?", "Dame una receta de paella."]


@pytest.fixture(scope="module")
def without_library():
    """The router as it was before the library: what the library's gains are measured against."""
    return Router(threshold=0.4, library={}).fit({t: prompts(t) for t in TASKS}, names={t: t for t in TASKS})


def test_every_library_row_is_well_formed():
    """Shipped data: one {"prompt", "task", "lang"} object a line, a known family, a language code, no
    prompt twice (nor the same but for case and spacing), none that the unrelated set calls unrelated,
    30+ languages, and enough prompts per family for a specialist to pick the right one among many."""
    rows = [json.loads(line) for line in TASK_LIBRARY.read_text(encoding="utf-8").splitlines()]
    for row in rows:
        assert set(row) == {"prompt", "task", "lang"} and all(isinstance(v, str) for v in row.values()), row
        assert row["prompt"] == row["prompt"].strip() and row["prompt"], row
        assert row["task"] in TASK_FAMILIES and re.fullmatch(r"[a-z]{2,3}", row["lang"]), row
    folded = Counter(" ".join(r["prompt"].lower().split()) for r in rows)
    assert [p for p, k in folded.items() if k > 1] == []
    assert not {r["prompt"] for r in rows} & set(unrelated_prompts())
    languages = {r["lang"] for r in rows}
    assert languages >= LANGUAGES and len(languages) >= 30
    sizes = Counter(r["task"] for r in rows)
    assert set(sizes) == set(TASK_FAMILIES)
    assert all(sizes[t] >= 60 for t in TASKS) and all(n >= 25 for n in sizes.values()), sizes
    assert {f: len(p) for f, p in task_library().items()} == dict(sizes)


@pytest.fixture
def library_file(tmp_path, monkeypatch):
    """Points the router at a library file of the test's own; the shipped one is read again after."""
    path = tmp_path / "router_tasks.jsonl"
    monkeypatch.setattr(router_module, "TASK_LIBRARY", path)
    task_library.cache_clear()
    yield path
    task_library.cache_clear()


GOOD = '{"prompt": "What is 2 + 2?", "task": "math", "lang": "en"}'


@pytest.mark.parametrize(("line", "message"), [
    ("{not json", "expected one JSON object"),
    ('{"prompt": "", "task": "math", "lang": "en"}', "expected one JSON object"),
    ('{"prompt": "Sum these.", "task": "math"}', "expected one JSON object"),
    ('["What is 2 + 2?", "math", "en"]', "expected one JSON object"),
    ('{"prompt": "Read my stars.", "task": "astrology", "lang": "en"}', "task 'astrology': expected one of math"),
    ('{"prompt": "Sum these.", "task": "math", "lang": "English"}', "lang 'English': expected a language code"),
    (GOOD, "is there twice"),
])
def test_a_broken_library_line_is_a_clear_error(library_file, line, message):
    library_file.write_text(f"{GOOD}\n{line}\n", encoding="utf-8")
    with pytest.raises(RouterError, match=rf"router_tasks\.jsonl:2: .*{re.escape(message)}"):
        task_library()


def test_a_missing_library_is_a_clear_error(library_file):
    with pytest.raises(RouterError, match="router_tasks.jsonl: cannot read the shipped task library"):
        Router(threshold=0.4).fit({"math": prompts("math", 5)})


@pytest.mark.parametrize("names", [{t: t for t in TASKS}, {"math": "s1", "code": "s2", "translate": "s3"}])
def test_each_shipped_specialist_adopts_its_family_from_its_examples(names):
    """The examples decide, not the name: "s1" adopts math as "math" does, at 10 examples as at 20."""
    for n in (10, 20):
        r = Router(threshold=0.4).fit({t: prompts(t, n) for t in TASKS}, names=names)
        assert r.adopted == {"math": "math", "code": "code", "translate": "translate"}, (n, names)


def test_a_specialist_whose_examples_match_no_family_adopts_nothing():
    """Cooking with the cooking family left out of the library; a specialist of mixed tasks ("bob"); and
    a Python specialist with code left out, whose examples sit nearer the math prompts than any other
    family's (factorials, sums of squares), but only just. None borrows; each still gets its own."""
    library = {f: p for f, p in task_library().items() if f != "recipe"}
    r = Router(threshold=0.4, library=library).fit({"cooking": COOKING, "math": prompts("math", 10)})
    assert r.adopted == {"math": "math"}
    assert r.route("Как приготовить блины?").choice == "cooking"
    bob = prompts("math", 4) + prompts("translate", 4) + prompts("code", 4)
    assert Router(threshold=0.4).fit({"bob": bob}).adopted == {}
    no_code = {f: p for f, p in task_library().items() if f != "code"}
    assert Router(threshold=0.4, library=no_code).fit({"s2": prompts("code")}).adopted == {}


@pytest.mark.parametrize(("prompt", "task", "before"), [
    # languages no example uses (the examples are en/fr/de/es); each went elsewhere without the library
    ("Μια τσάντα κοστίζει 80 ευρώ με έκπτωση 25%. Πόσο πληρώνω;", "math", "base"),  # Greek, priced
    ("ช่วยหาอนุพันธ์ของ sin(x) + x² ให้หน่อย", "math", "code"),  # Thai: a derivative
    ('"Sawasdee krap" แปลว่าอะไร', "translate", "base"),  # Thai: what does '...' mean
])
def test_a_borrowed_family_routes_requests_no_example_covers(router, without_library, prompt, task, before):
    d, old = router.route(prompt), without_library.route(prompt)
    assert (d.choice, d.reason) == (task, "routed") and old.choice == before, (d.explain(), old.explain())


def test_the_explanation_says_when_the_nearest_example_was_borrowed(router):
    prompt = "Πόσο κάνει 3/5 του 250;"  # a library prompt itself
    assert prompt in task_library()["math"]
    d = router.route(prompt)
    assert (d.choice, d.nearest, d.nearest_label) == ("math", prompt, "math (task library)"), d.explain()
    own = router.route("Calcule 12 fois 12, s'il te plaît.")
    assert own.nearest_label == "math" and own.nearest in prompts("math")


def test_two_specialists_that_adopt_one_family_are_told_apart_by_their_own_examples():
    sql = ["Write a SQL query that lists customers from Berlin.", "SQL: count the orders per month.",
           "Écris une requête SQL qui trouve les doublons dans la table clients.",
           "Schreibe eine SQL-Abfrage, die die teuersten zehn Produkte zeigt.",
           "Escribe una consulta SQL que sume las ventas por región.",
           "Write a SQL query joining orders and invoices on the order id.",
           "A SQL query that deletes users who never logged in, please.",
           "SQL: the average salary per department, highest first."]
    r = Router(threshold=0.4).fit({"sql": sql, "python": prompts("code")})
    assert r.adopted == {"sql": "code", "python": "code"}
    for prompt, want in (("Напиши SQL-запрос, который находит заказы без оплаты.", "sql"),
                         ("Pythonで文字列を逆順にする関数を書いて。", "python")):
        assert r.route(prompt).choice == want, r.route(prompt).explain()


def test_families_nobody_adopts_keep_a_lone_specialist_to_its_task():
    """With math alone, the code and translate families sit on the unrelated side."""
    only_math = Router(threshold=0.4).fit({"math": prompts("math")})
    assert only_math.adopted == {"math": "math"}
    for other in ("Écris une fonction Go qui calcule la moyenne d'une liste.", "Übersetze ins Englische: 12 Äpfel",
                  "Summarize this report about sales in 2023 in three lines."):
        assert only_math.route(other).choice == "base", only_math.route(other).explain()
    assert only_math.route("Berechne die Fläche eines Kreises mit Radius 3 cm.").choice == "math"
