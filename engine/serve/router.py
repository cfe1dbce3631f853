"""The prompt router: which specialist (or base) should answer a prompt, with a confidence.

Why this encoder: hashed character n-grams (2-5 chars inside word boundaries, TF-IDF weighted). They
need no tokenizer or vocabulary, so French, German, Spanish, Cyrillic or CJK prompts work the same
way; they need no downloaded weights (a multilingual sentence encoder would have to come from a hub
this box may not reach, or would take GPU memory from the chat); they fit in well under a second and
score a prompt in well under a millisecond on one CPU core.

Why this classifier: multinomial logistic regression over the specialists, learned from each
specialist's own training prompts (and exemplars from its manifest) - never keyword lists. Softmax
alone is overconfident on prompts unlike any training data, so the confidence is scaled by how close
the prompt is to its nearest training prompt of the chosen class, relative to how close training
prompts come to the nearest prompt of *another* class (90th percentile): a prompt less similar to a
class than unrelated tasks are to each other is not that class's. Below the threshold, base answers.
"""

from __future__ import annotations

import re
import time
import zlib
from dataclasses import dataclass, field

import numpy as np

DIM = 2**13
# With one specialist there is no other class to calibrate against: the cross-class level measured on
# the shipped three-task data (90th percentile, about 0.28) stands in.
SINGLE_CLASS_REF = 0.28
NGRAMS = (2, 3, 4, 5)
_WORD = re.compile(r"\w+|[^\w\s]", re.UNICODE)
_DIGIT = re.compile(r"\d")


def _features(text: str) -> np.ndarray:
    """Hashed counts of character n-grams of each word or symbol (padded with spaces), sublinear tf.
    Digits are folded to 0: which number a prompt holds says nothing about its task."""
    counts: dict[int, int] = {}
    for word in _WORD.findall(_DIGIT.sub("0", text.lower())):
        w = f" {word} "
        for n in NGRAMS:
            for i in range(max(len(w) - n + 1, 1)):
                h = zlib.crc32(w[i : i + n].encode()) & (DIM - 1)
                counts[h] = counts.get(h, 0) + 1
    v = np.zeros(DIM, dtype=np.float32)
    if counts:
        idx = np.fromiter(counts.keys(), dtype=np.int64)
        v[idx] = 1.0 + np.log(np.fromiter(counts.values(), dtype=np.float32))
    return v


@dataclass
class Decision:
    choice: str  # a specialist name, or "base"
    confidence: float
    scores: dict[str, float]  # per specialist: probability x closeness
    reason: str  # routed / below threshold / no specialists / pinned
    ms: float = 0.0

    def as_dict(self) -> dict:
        top = dict(sorted(self.scores.items(), key=lambda kv: -kv[1]))
        return {"choice": self.choice, "confidence": round(self.confidence, 4), "reason": self.reason,
                "scores": {k: round(v, 4) for k, v in top.items()}, "ms": round(self.ms, 3)}


@dataclass
class Router:
    threshold: float = 0.4
    classes: list[str] = field(default_factory=list)
    _idf: np.ndarray | None = None
    _w: np.ndarray | None = None
    _b: np.ndarray | None = None
    _train: np.ndarray | None = None  # normalised training vectors
    _labels: np.ndarray | None = None
    _ref: float = 0.3  # similarity at which a prompt counts as fully "near" a class
    fit_seconds: float = 0.0

    def _vectorise(self, texts: list[str]) -> np.ndarray:
        x = np.stack([_features(t) for t in texts]) if texts else np.zeros((0, DIM), np.float32)
        x *= self._idf
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        return x / np.maximum(norms, 1e-8)

    def fit(self, examples: dict[str, list[str]], steps: int = 300, l2: float = 1e-4) -> Router:
        """Learn from {specialist: [prompts]}. Specialists without prompts are left out."""
        started = time.perf_counter()
        examples = {k: list(dict.fromkeys(v)) for k, v in sorted(examples.items()) if v}
        self.classes = list(examples)
        if not self.classes:
            self._w = None
            return self
        texts = [t for v in examples.values() for t in v]
        labels = np.array([i for i, v in enumerate(examples.values()) for _ in v])
        raw = np.stack([_features(t) for t in texts]) > 0
        df = raw.sum(axis=0)
        self._idf = np.log((1 + len(texts)) / (1 + df)).astype(np.float32) + 1.0
        x = self._vectorise(texts)
        c = len(self.classes)
        w = np.zeros((DIM, c), np.float32)
        b = np.zeros(c, np.float32)
        y = np.eye(c, dtype=np.float32)[labels]
        vw, vb = np.zeros_like(w), np.zeros_like(b)
        lr, beta = 2.0, 0.9
        for _ in range(steps if c > 1 else 0):  # full-batch gradient descent with momentum: convex, tiny
            p = _softmax(x @ w + b)
            g = (p - y) / len(texts)
            vw = beta * vw + x.T @ g + l2 * w
            vb = beta * vb + g.sum(axis=0)
            w -= lr * vw
            b -= lr * vb
        self._w, self._b, self._train, self._labels = w, b, x, labels
        sims = x @ x.T
        cross = [sims[i][labels != labels[i]].max() for i in range(len(texts))] if c > 1 else []
        self._ref = float(np.percentile(cross, 90)) if cross else SINGLE_CLASS_REF
        self.fit_seconds = time.perf_counter() - started
        return self

    def route(self, prompt: str) -> Decision:
        started = time.perf_counter()
        if self._w is None or not self.classes:
            return Decision("base", 0.0, {}, "no specialists", (time.perf_counter() - started) * 1e3)
        x = self._vectorise([prompt])
        probs = _softmax(x @ self._w + self._b)[0] if len(self.classes) > 1 else np.ones(1, np.float32)
        sims = (self._train @ x[0]) if self._train is not None else np.zeros(0)
        scores = {}
        for k, name in enumerate(self.classes):
            nearest = float(sims[self._labels == k].max())
            closeness = min(1.0, max(nearest, 0.0) / self._ref)
            scores[name] = float(probs[k]) * closeness
        best = max(scores, key=scores.get)
        conf = scores[best]
        ms = (time.perf_counter() - started) * 1e3
        if conf < self.threshold:
            return Decision("base", conf, scores, "below threshold", ms)
        return Decision(best, conf, scores, "routed", ms)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
