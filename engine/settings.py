"""settings.toml: typed, validated configuration.

Errors name the key, the value and what was expected, because the person reading them is editing a
text file over SSH. Unknown keys only warn (a newer checkout may have written them) and are kept when
the file is written back. Paths are relative to the settings file so a checkout is self-contained.
"""

from __future__ import annotations

import os
import tomllib
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import tomli_w

ENV_VAR = "TANDEM_SETTINGS"
REASONING_LEVELS = ("low", "medium", "high")
DTYPES = ("auto", "bfloat16", "float16", "float32")


class SettingsError(ValueError):
    """A settings.toml value is wrong; the message says which key and what was expected."""


@dataclass
class ModelSettings:
    name: str = ""  # hub id or local folder; empty means the embedded demo model
    max_seq_length: int = 4096
    load_in_4bit: bool = True  # training
    serve_in_4bit: bool = False  # the chat model; the fast decoder needs unquantized weights
    dtype: str = "auto"
    record_experts: bool = True  # keep each reply's expert routing for the expert view
    fast_decode: bool = True  # static cache, routed-expert LoRA, CUDA graphs; off = transformers+PEFT forward


@dataclass
class GpuSettings:
    inference: int = 0
    training: int = 1


@dataclass
class ChatSettings:
    reasoning: str = "low"
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 1024
    instructions: str = ""  # developer message sent with every conversation


@dataclass
class AdapterSettings:
    mode: str = "auto"  # auto (router), base, or an adapter name (pinned)
    router_threshold: float = 0.4
    vram_budget_mb: int = 8192


@dataclass
class PathSettings:
    adapters: str = "adapters"
    logs: str = "logs"
    models: str = "models"
    history: str = "history.db"


@dataclass
class Profile:
    max_steps: int
    max_samples: int
    rank: int = 16
    alpha: int = 16
    batch_size: int = 2
    grad_accum: int = 4
    learning_rate: float = 2e-4
    warmup_steps: int = 5
    max_seq_length: int = 2048
    scheduler: str = "cosine"
    save_steps: int = 50
    logging_steps: int = 1


def default_profiles() -> dict[str, Profile]:
    return {
        "quick_test": Profile(max_steps=30, max_samples=100, save_steps=10),
        "standard": Profile(max_steps=200, max_samples=1000),
        "full": Profile(max_steps=500, max_samples=5000),
        "max_quality": Profile(max_steps=500, max_samples=10000, rank=16, alpha=32),
        "conservative": Profile(max_steps=100, max_samples=1000, rank=8, alpha=8),
    }


@dataclass
class TrainingSettings:
    default_profile: str = "standard"
    target_loss: float = 0.5
    overfit_below: float = 0.3
    underfit_above: float = 1.0
    keep_checkpoints: int = 2
    eval_fraction: float = 0.1
    seed: int = 3407
    profiles: dict[str, Profile] = field(default_factory=default_profiles)


@dataclass
class LearningSettings:
    retrain_every: int = 100  # new usable examples of a task before it retrains
    nightly_window: str = ""  # "HH:MM-HH:MM" local time, or empty for no nightly retrain
    min_examples_new_task: int = 50
    holdout_fraction: float = 0.2


SECTIONS = {
    "model": ModelSettings,
    "gpus": GpuSettings,
    "chat": ChatSettings,
    "adapters": AdapterSettings,
    "paths": PathSettings,
    "training": TrainingSettings,
    "learning": LearningSettings,
}


@dataclass
class Settings:
    model: ModelSettings = field(default_factory=ModelSettings)
    gpus: GpuSettings = field(default_factory=GpuSettings)
    chat: ChatSettings = field(default_factory=ChatSettings)
    adapters: AdapterSettings = field(default_factory=AdapterSettings)
    paths: PathSettings = field(default_factory=PathSettings)
    training: TrainingSettings = field(default_factory=TrainingSettings)
    learning: LearningSettings = field(default_factory=LearningSettings)
    source: Path | None = None  # the file these came from; paths resolve against its folder
    raw: dict[str, Any] = field(default_factory=dict)  # the file as read, unknown keys included

    @property
    def root(self) -> Path:
        return self.source.parent if self.source else Path.cwd()

    def path(self, name: str) -> Path:
        """An absolute path for one of [paths] (adapters, logs, models, history)."""
        p = Path(getattr(self.paths, name)).expanduser()
        return p if p.is_absolute() else self.root / p

    @property
    def adapters_dir(self) -> Path:
        return self.path("adapters")

    @property
    def logs_dir(self) -> Path:
        return self.path("logs")

    @property
    def models_dir(self) -> Path:
        return self.path("models")

    @property
    def history_db(self) -> Path:
        return self.path("history")

    def profile(self, name: str | None = None) -> Profile:
        name = name or self.training.default_profile
        try:
            return self.training.profiles[name]
        except KeyError:
            known = ", ".join(sorted(self.training.profiles))
            raise SettingsError(f"training profile {name!r} does not exist; known profiles: {known}") from None


def _type_name(t: Any) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(t, str(t))


def _coerce(key: str, value: Any, expected: type) -> Any:
    # bool is a subclass of int in Python; a TOML `true` must not pass as a count of steps.
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, bool) != (expected is bool) or not isinstance(value, expected):
        raise SettingsError(f"{key} = {value!r}: expected {_type_name(expected)}")
    return value


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise SettingsError(f"[{prefix}] must be a table, got {data!r}")
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}"
        if key not in known:
            warnings.warn(f"settings: unknown key {full} (kept, ignored)", stacklevel=4)
            continue
        f = known[key]
        if key == "profiles":
            kwargs[key] = _profiles(value, full)
            continue
        expected = {"int": int, "float": float, "bool": bool, "str": str}[str(f.type)]
        kwargs[key] = _coerce(full, value, expected)
    return cls(**kwargs)


def _profiles(data: Any, prefix: str) -> dict[str, Profile]:
    if not isinstance(data, dict):
        raise SettingsError(f"[{prefix}] must be a table of profiles")
    merged = default_profiles()
    for name, table in data.items():
        base = asdict(merged[name]) if name in merged else {}
        if not isinstance(table, dict):
            raise SettingsError(f"[{prefix}.{name}] must be a table")
        if name not in merged and not {"max_steps", "max_samples"} <= table.keys():
            raise SettingsError(f"[{prefix}.{name}] needs max_steps and max_samples")
        merged[name] = _build(Profile, {**base, **table}, f"{prefix}.{name}")
    return merged


def _check(s: Settings) -> None:
    def need(ok: bool, key: str, value: Any, expected: str) -> None:
        if not ok:
            raise SettingsError(f"{key} = {value!r}: expected {expected}")

    need(s.model.max_seq_length >= 64, "model.max_seq_length", s.model.max_seq_length, "at least 64")
    need(s.model.dtype in DTYPES, "model.dtype", s.model.dtype, "one of " + ", ".join(DTYPES))
    for role in ("inference", "training"):
        v = getattr(s.gpus, role)
        need(v >= 0, f"gpus.{role}", v, "a GPU index (0, 1, ...)")
    need(s.chat.reasoning in REASONING_LEVELS, "chat.reasoning", s.chat.reasoning, "low, medium or high")
    need(0 <= s.chat.temperature <= 5, "chat.temperature", s.chat.temperature, "a number from 0 to 5")
    need(0 < s.chat.top_p <= 1, "chat.top_p", s.chat.top_p, "a number in (0, 1]")
    need(s.chat.top_k >= 0, "chat.top_k", s.chat.top_k, "0 (off) or a positive integer")
    need(s.chat.max_new_tokens > 0, "chat.max_new_tokens", s.chat.max_new_tokens, "a positive integer")
    need(s.adapters.mode != "", "adapters.mode", s.adapters.mode, "auto, base or an adapter name")
    thr = s.adapters.router_threshold
    need(0 <= thr <= 1, "adapters.router_threshold", thr, "a number from 0 to 1")
    need(s.adapters.vram_budget_mb > 0, "adapters.vram_budget_mb", s.adapters.vram_budget_mb, "a positive integer")
    t = s.training
    need(t.default_profile in t.profiles, "training.default_profile", t.default_profile,
         "one of " + ", ".join(sorted(t.profiles)))
    need(0 <= t.eval_fraction < 0.5, "training.eval_fraction", t.eval_fraction, "a number in [0, 0.5)")
    need(t.keep_checkpoints >= 1, "training.keep_checkpoints", t.keep_checkpoints, "at least 1")
    for name, p in t.profiles.items():
        key = f"training.profiles.{name}"
        need(p.max_steps > 0, f"{key}.max_steps", p.max_steps, "a positive integer")
        need(p.max_samples > 0, f"{key}.max_samples", p.max_samples, "a positive integer")
        need(p.rank > 0, f"{key}.rank", p.rank, "a positive integer")
        need(p.batch_size > 0, f"{key}.batch_size", p.batch_size, "a positive integer")
        need(p.grad_accum > 0, f"{key}.grad_accum", p.grad_accum, "a positive integer")
        need(0 < p.learning_rate < 1, f"{key}.learning_rate", p.learning_rate, "a number in (0, 1)")
        need(p.scheduler in ("cosine", "linear", "constant"), f"{key}.scheduler", p.scheduler,
             "cosine, linear or constant")
    w = s.learning.nightly_window
    need(w == "" or _parse_window(w) is not None, "learning.nightly_window", w, '"HH:MM-HH:MM" or ""')
    need(s.learning.retrain_every > 0, "learning.retrain_every", s.learning.retrain_every, "a positive integer")
    need(0 < s.learning.holdout_fraction < 1, "learning.holdout_fraction", s.learning.holdout_fraction,
         "a number in (0, 1)")


def _parse_window(text: str) -> tuple[int, int] | None:
    """'02:00-05:30' -> (120, 330) minutes after midnight, or None when malformed."""
    try:
        start, end = text.split("-")
        minutes = []
        for part in (start, end):
            h, m = part.strip().split(":")
            if not (0 <= int(h) < 24 and 0 <= int(m) < 60):
                return None
            minutes.append(int(h) * 60 + int(m))
        return minutes[0], minutes[1]
    except ValueError:
        return None


def nightly_window(s: Settings) -> tuple[int, int] | None:
    return _parse_window(s.learning.nightly_window) if s.learning.nightly_window else None


def from_dict(data: dict[str, Any], source: Path | None = None) -> Settings:
    sections = {}
    for key, value in data.items():
        if key in SECTIONS:
            sections[key] = _build(SECTIONS[key], value, key)
        else:
            warnings.warn(f"settings: unknown section or key {key!r} (kept, ignored)", stacklevel=2)
    s = Settings(**sections, source=source, raw=data)
    _check(s)
    return s


def default_path() -> Path:
    """TANDEM_SETTINGS if set, else settings.toml in the checkout this package lives in."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser().resolve()
    return Path(__file__).resolve().parent.parent / "settings.toml"


def load(path: Path | str | None = None) -> Settings:
    path = Path(path) if path else default_path()
    if not path.exists():
        return Settings(source=path.resolve())
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise SettingsError(f"{path}: not valid TOML: {e}") from None
    return from_dict(data, source=path.resolve())


def _known_dict(s: Settings) -> dict[str, Any]:
    return {name: asdict(getattr(s, name)) for name in SECTIONS}


def _merge(raw: dict[str, Any], known: dict[str, Any]) -> dict[str, Any]:
    out = dict(raw)
    for k, v in known.items():
        out[k] = _merge(raw[k], v) if isinstance(v, dict) and isinstance(raw.get(k), dict) else v
    return out


def save(s: Settings, path: Path | None = None) -> Path:
    """Write back validated settings, keeping keys this version does not know. Atomic rename."""
    _check(s)
    path = Path(path or s.source or default_path())
    merged = _merge(s.raw, _known_dict(s))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(tomli_w.dumps(merged), encoding="utf-8")
    os.replace(tmp, path)
    s.raw, s.source = merged, path.resolve()
    return path


def updated(s: Settings, key: str, value: Any) -> Settings:
    """A copy of `s` with dotted `key` set from user input (text from a form is converted), validated."""
    data = _merge(s.raw, _known_dict(s))
    *parents, leaf = key.split(".")
    node = data
    for p in parents:
        node = node.setdefault(p, {})
    old = node.get(leaf)
    if isinstance(value, str) and old is not None and not isinstance(old, str):
        value = _parse_text(key, value, type(old))
    node[leaf] = value
    return from_dict(data, source=s.source)


def _parse_text(key: str, text: str, expected: type) -> Any:
    text = text.strip()
    try:
        if expected is bool:
            if text.lower() not in ("true", "false"):
                raise ValueError
            return text.lower() == "true"
        return expected(text)
    except ValueError:
        raise SettingsError(f"{key} = {text!r}: expected {_type_name(expected)}") from None
