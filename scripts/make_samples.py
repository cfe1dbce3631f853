"""Writes the small datasets the repo ships (data/samples/*.jsonl, data/router_eval.jsonl,
engine/data/demo_chat.jsonl). Deterministic: rerunning gives the same files.

Three specialist tasks (math, code, translate) with prompts in English, French, German and Spanish,
so the router and trainer are exercised on non-English text. The router evaluation set uses templates
that the training sets do not, plus unrelated prompts that should go to the base model.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OPS = {"+": ("plus", "plus", "mehr", "más"), "-": ("minus", "moins", "minus", "menos"),
       "*": ("times", "fois", "mal", "por")}

MATH_TRAIN = [
    "What is {a} {en} {b}?", "Compute {a} {sym} {b}.", "Calculate {a} {en} {b}, please.",
    "Combien font {a} {fr} {b} ?", "Wie viel ist {a} {de} {b}?", "¿Cuánto es {a} {es} {b}?",
    "Solve: {a} {sym} {b} = ?", "I need the result of {a} {sym} {b}.",
]
MATH_EVAL = [
    "Quick sum check: {a} {sym} {b}", "Calcule {a} {fr} {b} s'il te plaît.", "Rechne {a} {sym} {b} aus.",
    "Resuelve {a} {sym} {b}", "what's {a} {en} {b}", "Evaluate the expression {a} {sym} {b}.",
]
FUNCS = [
    ("reverses a string", "inverse une chaîne", "eine Zeichenkette umkehrt", "invierta una cadena",
     "def reverse(s: str) -> str:\n    return s[::-1]"),
    ("returns the maximum of a list", "renvoie le maximum d'une liste", "das Maximum einer Liste zurückgibt",
     "devuelva el máximo de una lista", "def maximum(xs: list[int]) -> int:\n    return max(xs)"),
    ("checks whether a number is even", "vérifie si un nombre est pair", "prüft, ob eine Zahl gerade ist",
     "compruebe si un número es par", "def is_even(n: int) -> bool:\n    return n % 2 == 0"),
    ("counts the vowels in a word", "compte les voyelles d'un mot", "die Vokale in einem Wort zählt",
     "cuente las vocales de una palabra", "def vowels(w: str) -> int:\n    return sum(c in 'aeiou' for c in w)"),
    ("sums the squares of a list", "additionne les carrés d'une liste", "die Quadrate einer Liste summiert",
     "sume los cuadrados de una lista", "def sum_squares(xs: list[int]) -> int:\n    return sum(x * x for x in xs)"),
    ("removes duplicates from a list", "supprime les doublons d'une liste", "Duplikate aus einer Liste entfernt",
     "elimine duplicados de una lista", "def dedupe(xs: list) -> list:\n    return list(dict.fromkeys(xs))"),
    ("computes a factorial", "calcule une factorielle", "eine Fakultät berechnet", "calcule un factorial",
     "def factorial(n: int) -> int:\n    return 1 if n < 2 else n * factorial(n - 1)"),
    ("joins words with commas", "joint des mots avec des virgules", "Wörter mit Kommas verbindet",
     "una palabras con comas", "def join_words(ws: list[str]) -> str:\n    return ', '.join(ws)"),
]
CODE_TRAIN = [
    "Write a Python function that {en}.", "Can you code a Python function which {en}?",
    "Écris une fonction Python qui {fr}.", "Schreibe eine Python-Funktion, die {de}.",
    "Escribe una función en Python que {es}.", "Python snippet: a function that {en}",
]
CODE_EVAL = [
    "Implement in Python: a def that {en}", "Give me Python code for a function that {en}",
    "Code Python : une fonction qui {fr}", "Bitte Python-Code für eine Funktion, die {de}",
    "Necesito código Python: una función que {es}",
]
WORDS = [("good morning", "bonjour", "guten Morgen", "buenos días"), ("thank you", "merci", "danke", "gracias"),
         ("the cat", "le chat", "die Katze", "el gato"), ("the house", "la maison", "das Haus", "la casa"),
         ("water", "eau", "Wasser", "agua"), ("the book", "le livre", "das Buch", "el libro"),
         ("good night", "bonne nuit", "gute Nacht", "buenas noches"), ("the sun", "le soleil", "die Sonne", "el sol"),
         ("friend", "ami", "Freund", "amigo"), ("the train", "le train", "der Zug", "el tren"),
         ("bread", "pain", "Brot", "pan"), ("the sea", "la mer", "das Meer", "el mar")]
LANGS = {"French": 1, "German": 2, "Spanish": 3}
TRANSLATE_TRAIN = [
    "Translate to {lang}: {w}", "How do you say '{w}' in {lang}?", "Please translate \"{w}\" into {lang}.",
    "Traduis en {lang_fr} : {w}", "Übersetze ins {lang_de}: {w}", "Traduce al {lang_es}: {w}",
]
TRANSLATE_EVAL = [
    "What is '{w}' in {lang}?", "Render '{w}' in {lang}, please", "Comment dit-on « {w} » en {lang_fr} ?",
    "Was heißt '{w}' auf {lang_de}?", "¿Cómo se dice '{w}' en {lang_es}?",
]
LANG_NAMES = {"French": ("français", "Französische", "francés"), "German": ("allemand", "Deutsche", "alemán"),
              "Spanish": ("espagnol", "Spanische", "español")}
CHAT = [
    ("Hello!", "The user greets me.", "Hello! How can I help you today?"),
    ("Who are you?", "They ask who I am.", "I am a local assistant running on your own GPU box."),
    ("Tell me a joke.", "A short joke.", "Why did the GPU cross the road? To get to the other batch."),
    ("Bonjour !", "A greeting in French.", "Bonjour ! Comment puis-je vous aider ?"),
    ("Hallo, wie geht's?", "A greeting in German.", "Hallo! Mir geht es gut, danke. Und dir?"),
    ("Give me a tip for sleeping better.", "A wellness tip.", "Keep a regular bedtime; dim the lights an hour before."),
    ("What is the capital of France?", "Geography question.", "Paris."),
    ("Recommend a book.", "A book suggestion.", "Try 'The Left Hand of Darkness' by Ursula K. Le Guin."),
    ("¿Qué tiempo hace?", "Weather question in Spanish; I cannot see outside.", "No tengo acceso al tiempo actual."),
    ("Thanks!", "Thanks from the user.", "You're welcome!"),
]
UNRELATED_EVAL = [
    "What's a good name for a golden retriever?", "Tell me about the history of Rome.",
    "Quel temps fera-t-il demain à Lyon ?", "Was ist der Sinn des Lebens?", "Recomiéndame una película.",
    "How do I fix a squeaky door?", "Write a haiku about autumn.", "Who won the football match yesterday?",
]


def _math(rng: random.Random, templates: list[str], n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        sym = rng.choice(list(OPS))
        en, fr, de, es = OPS[sym]
        prompt = rng.choice(templates).format(a=a, b=b, sym=sym, en=en, fr=fr, de=de, es=es)
        result = eval(f"{a}{sym}{b}")
        rows.append({"task": "math", "messages": [
            {"role": "user", "content": prompt},
            {"role": "assistant", "thinking": f"{a} {sym} {b} = {result}.", "content": str(result)}]})
    return rows


def _code(rng: random.Random, templates: list[str], n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        en, fr, de, es, body = rng.choice(FUNCS)
        prompt = rng.choice(templates).format(en=en, fr=fr, de=de, es=es)
        rows.append({"task": "code", "prompt": prompt, "response": f"```python\n{body}\n```",
                     "thinking": "One short function."})
    return rows


def _translate(rng: random.Random, templates: list[str], n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        words = rng.choice(WORDS)
        lang = rng.choice(list(LANGS))
        fr, de, es = LANG_NAMES[lang]
        prompt = rng.choice(templates).format(w=words[0], lang=lang, lang_fr=fr, lang_de=de, lang_es=es)
        rows.append({"task": "translate", "messages": [
            {"role": "user", "content": prompt},
            {"role": "assistant", "thinking": f"'{words[0]}' in {lang}.", "content": words[LANGS[lang]]}]})
    return rows


def _write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main() -> None:
    rng = random.Random(7)
    _write(ROOT / "data/samples/math.jsonl", _math(rng, MATH_TRAIN, 240))
    _write(ROOT / "data/samples/code.jsonl", _code(rng, CODE_TRAIN, 160))
    _write(ROOT / "data/samples/translate.jsonl", _translate(rng, TRANSLATE_TRAIN, 200))
    evals = [{"prompt": r["messages"][0]["content"], "label": "math"} for r in _math(rng, MATH_EVAL, 40)]
    evals += [{"prompt": r["prompt"], "label": "code"} for r in _code(rng, CODE_EVAL, 40)]
    evals += [{"prompt": r["messages"][0]["content"], "label": "translate"}
              for r in _translate(rng, TRANSLATE_EVAL, 40)]
    evals += [{"prompt": p, "label": "base"} for p in UNRELATED_EVAL]
    _write(ROOT / "data/router_eval.jsonl", evals)
    demo = [{"messages": [{"role": "user", "content": u},
                          {"role": "assistant", "thinking": t, "content": a}]} for u, t, a in CHAT]
    demo += _math(rng, MATH_TRAIN, 60) + _translate(rng, TRANSLATE_TRAIN, 40)
    demo += [{"messages": [{"role": "user", "content": r["prompt"]},
                           {"role": "assistant", "thinking": r["thinking"], "content": r["response"]}]}
             for r in _code(rng, CODE_TRAIN, 30)]
    _write(ROOT / "engine/data/demo_chat.jsonl", demo)


if __name__ == "__main__":
    main()
