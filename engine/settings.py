"""settings.toml: typed, validated configuration.

Errors name the key, the value and what was expected, because the person reading them is editing a
text file over SSH. Unknown keys only warn (a newer checkout may have written them) and are kept when
the file is written back. Paths are relative to the settings file so a checkout is self-contained.
Writing (`save`) edits the file as text with tomlkit: only changed values are rewritten, so comments,
order and layout survive; it is atomic, and refused when the file changed on disk since it was read.
"""

from __future__ import annotations

import math
import os
import tempfile
import tomllib
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import tomlkit

from engine import names

ENV_VAR = "TANDEM_SETTINGS"
REASONING_LEVELS = ("low", "medium", "high")
DTYPES = ("auto", "bfloat16", "float16", "float32")
RENDERERS = ("tandem", "checkpoint")  # model.chat_template: who renders chat prompts


class SettingsError(ValueError):
    """A settings.toml value is wrong; the message says which key and what was expected."""


class SettingsChanged(SettingsError):
    """The file changed on disk since these settings were read: writing would undo someone's edit."""


@dataclass
class ModelSettings:
    name: str = ""  # hub id or local folder; empty means the embedded demo model
    max_seq_length: int = 4096
    load_in_4bit: bool = True  # training
    serve_in_4bit: bool | str = "auto"  # chat: MXFP4 experts; "auto" = when bf16 would not fit the GPU
    dtype: str = "auto"
    record_experts: bool = True  # keep each reply's expert routing for the expert view
    fast_decode: bool = True  # static cache, routed-expert LoRA, CUDA graphs; off = transformers+PEFT forward
    lm_head_8bit: bool = False  # fast decoder: int8 lm_head (half its bytes a step); off = the checkpoint's own
    chat_template: str = "tandem"  # chat prompts rendered by: tandem (engine/harmony.py) | checkpoint (its jinja)
    backend: str = ""  # "http(s)://host:port/v1" of an OpenAI-compatible server that answers instead; "" = local
    backend_token: str = ""  # bearer token the remote backend wants, if any


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
class ApiSettings:
    host: str = "127.0.0.1"  # loopback only; any other address needs a token
    port: int = 8400  # 0 = any free port
    token: str = ""  # bearer token clients must send ("" = none; refused for a non-loopback host)
    max_request_kb: int = 1024  # larger request bodies get 413
    max_concurrent: int = 8  # requests answered or queued at once; more get 429


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
    method: str = "sft"  # sft: learn the replies | dpo: learn preferences (chosen over rejected) on a specialist
    beta: float = 0.1  # dpo: how far the specialist may move from where it started


METHODS = ("sft", "dpo")
# What an experiment may vary, and the profile field each name sets (`tandem experiment --vary r=8,16`).
VARY_KEYS = {"r": "rank", "rank": "rank", "alpha": "alpha", "lr": "learning_rate", "learning_rate": "learning_rate",
             "steps": "max_steps", "max_steps": "max_steps", "batch_size": "batch_size", "beta": "beta"}


def default_profiles() -> dict[str, Profile]:
    return {
        "quick_test": Profile(max_steps=30, max_samples=100, save_steps=10),
        "standard": Profile(max_steps=200, max_samples=1000),
        "full": Profile(max_steps=500, max_samples=5000),
        "max_quality": Profile(max_steps=500, max_samples=10000, rank=16, alpha=32),
        "conservative": Profile(max_steps=100, max_samples=1000, rank=8, alpha=8),
        # batch 1: a DPO step holds chosen and rejected (two sequences per pair) and the reference's forward
        "preference": Profile(max_steps=100, max_samples=2000, batch_size=1, grad_accum=8, learning_rate=5e-5,
                              method="dpo"),
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
    idle_after_minutes: int = 30  # the training GPU idle this long takes pending work by itself; 0 = never
    min_pairs: int = 20  # preference pairs (A/B picks, corrections) a specialist needs for a preference run


SECTIONS = {
    "model": ModelSettings,
    "gpus": GpuSettings,
    "chat": ChatSettings,
    "adapters": AdapterSettings,
    "api": ApiSettings,
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
    api: ApiSettings = field(default_factory=ApiSettings)
    paths: PathSettings = field(default_factory=PathSettings)
    training: TrainingSettings = field(default_factory=TrainingSettings)
    learning: LearningSettings = field(default_factory=LearningSettings)
    source: Path | None = None  # the file these came from; paths resolve against its folder
    raw: dict[str, Any] = field(default_factory=dict)  # the file as read, unknown keys included
    warnings: list[str] = field(default_factory=list)  # one line per unknown key, naming it and the file
    text: str = ""  # the file's text as read ("" when there was none): what `save` edits and checks against

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


def _build(cls: type, data: Any, prefix: str, unknown: list[str]) -> Any:
    if not isinstance(data, dict):
        raise SettingsError(f"[{prefix}] must be a table, got {data!r}")
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}"
        if key not in known:
            unknown.append(full)
            continue
        f = known[key]
        if key == "profiles":
            kwargs[key] = _profiles(value, full, unknown)
            continue
        if str(f.type) == "bool | str":  # model.serve_in_4bit
            kwargs[key] = _bool_or_auto(full, value)
            continue
        expected = {"int": int, "float": float, "bool": bool, "str": str}[str(f.type)]
        kwargs[key] = _coerce(full, value, expected)
    return cls(**kwargs)


def _bool_or_auto(key: str, value: Any) -> bool | str:
    if isinstance(value, bool) or value == "auto":
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "auto"):
        word = value.strip().lower()
        return word if word == "auto" else word == "true"
    raise SettingsError(f'{key} = {value!r}: expected true, false or "auto"')


def _profiles(data: Any, prefix: str, unknown: list[str]) -> dict[str, Profile]:
    if not isinstance(data, dict):
        raise SettingsError(f"[{prefix}] must be a table of profiles")
    merged = default_profiles()
    for name, table in data.items():
        base = asdict(merged[name]) if name in merged else {}
        if not isinstance(table, dict):
            raise SettingsError(f"[{prefix}.{name}] must be a table")
        if name not in merged and not {"max_steps", "max_samples"} <= table.keys():
            raise SettingsError(f"[{prefix}.{name}] needs max_steps and max_samples")
        merged[name] = _build(Profile, {**base, **table}, f"{prefix}.{name}", unknown)
    return merged


Range = tuple[float, float, str]  # low, high (inclusive), what to say
_INT = 2**31 - 1

# Every numeric setting and its allowed range; the error names key, value and range.
RANGES: dict[str, Range] = {
    "model.max_seq_length": (64, 1 << 20, "an integer from 64 to 1048576"),
    "gpus.inference": (0, 63, "a GPU index (0, 1, ...)"),
    "gpus.training": (0, 63, "a GPU index (0, 1, ...)"),
    "chat.temperature": (0, 5, "a number from 0 to 5"),
    "chat.top_p": (1e-9, 1, "a number in (0, 1]"),
    "chat.top_k": (0, 1 << 20, "0 (off) or a positive integer"),
    "chat.max_new_tokens": (1, 1 << 20, "an integer from 1 to 1048576"),
    "adapters.router_threshold": (0, 1, "a number from 0 to 1"),
    "adapters.vram_budget_mb": (1, 1 << 24, "an integer from 1 to 16777216 (MB)"),
    "api.port": (0, 65535, "a TCP port from 0 (any free port) to 65535"),
    "api.max_request_kb": (1, 1 << 20, "an integer from 1 to 1048576 (KB)"),
    "api.max_concurrent": (1, 1024, "an integer from 1 to 1024"),
    "training.target_loss": (0, 100, "a number from 0 to 100"),
    "training.overfit_below": (0, 100, "a number from 0 to 100"),
    "training.underfit_above": (0, 100, "a number from 0 to 100"),
    "training.keep_checkpoints": (1, 1000, "an integer from 1 to 1000"),
    "training.eval_fraction": (0, 0.4999, "a number in [0, 0.5)"),
    "training.seed": (0, _INT, f"an integer from 0 to {_INT}"),
    "learning.retrain_every": (1, _INT, "a positive integer"),
    "learning.min_examples_new_task": (1, _INT, "a positive integer"),
    "learning.holdout_fraction": (1e-9, 1 - 1e-9, "a number in (0, 1)"),
    "learning.idle_after_minutes": (0, 7 * 24 * 60, "0 (never) or minutes up to 10080 (a week)"),
    "learning.min_pairs": (2, _INT, "an integer of at least 2 (one pair to train on, one held out)"),
}
PROFILE_RANGES: dict[str, Range] = {
    "max_steps": (1, 10_000_000, "an integer from 1 to 10000000"),
    "max_samples": (1, 1_000_000_000, "a positive integer"),
    "rank": (1, 1024, "an integer from 1 to 1024"),
    "alpha": (1, 4096, "an integer from 1 to 4096"),
    "batch_size": (1, 4096, "an integer from 1 to 4096"),
    "grad_accum": (1, 4096, "an integer from 1 to 4096"),
    "learning_rate": (1e-12, 1 - 1e-12, "a number in (0, 1)"),
    "warmup_steps": (0, 10_000_000, "an integer from 0 to 10000000"),
    "max_seq_length": (16, 1 << 20, "an integer from 16 to 1048576"),
    "save_steps": (1, 10_000_000, "a positive integer"),
    "logging_steps": (1, 10_000_000, "a positive integer"),
    "beta": (1e-4, 100, "a number from 0.0001 to 100"),
}


def _need(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise SettingsError(f"{key} = {value!r}: expected {expected}")


def _in_range(key: str, value: float, rng: Range) -> None:
    low, high, what = rng
    _need(math.isfinite(value) and low <= value <= high, key, value, what)


def _check(s: Settings) -> None:
    for key, rng in RANGES.items():
        section, name = key.split(".")
        _in_range(key, getattr(getattr(s, section), name), rng)
    _need(s.model.dtype in DTYPES, "model.dtype", s.model.dtype, "one of " + ", ".join(DTYPES))
    _need(s.model.chat_template in RENDERERS, "model.chat_template", s.model.chat_template,
          "one of " + ", ".join(RENDERERS))
    _need(s.chat.reasoning in REASONING_LEVELS, "chat.reasoning", s.chat.reasoning, "low, medium or high")
    mode = s.adapters.mode
    _need(mode in ("auto", "base") or names.is_valid(mode), "adapters.mode", mode, "auto, base or an adapter name")
    t = s.training
    _need(t.overfit_below <= t.target_loss <= t.underfit_above, "training.target_loss", t.target_loss,
          f"a value between overfit_below ({t.overfit_below}) and underfit_above ({t.underfit_above})")
    _need(t.default_profile in t.profiles, "training.default_profile", t.default_profile,
          "one of " + ", ".join(sorted(t.profiles)))
    for name, p in t.profiles.items():
        key = f"training.profiles.{name}"
        _need(names.is_valid(name), key, name, f"a profile name of {names.RULE}")
        _check_profile(p, key)
    _need(s.model.backend == "" or _is_url(s.model.backend), "model.backend", s.model.backend,
          '"" (this machine) or an http:// or https:// URL of an OpenAI-compatible server')
    host = s.api.host
    _need(bool(host) and host.isprintable() and not any(c.isspace() or c in "/@?#" for c in host), "api.host",
          host, "an address to bind, e.g. 127.0.0.1")
    token = s.api.token
    _need(token == "" or (len(token) >= 16 and token.isascii() and token.isprintable() and " " not in token),
          "api.token", "…" if token else token, '"" or at least 16 printable ASCII characters without spaces')
    w = s.learning.nightly_window
    _need(w == "" or _parse_window(w) is not None, "learning.nightly_window", w, '"HH:MM-HH:MM" or ""')


def _check_profile(p: Profile, key: str) -> None:
    for field_name, rng in PROFILE_RANGES.items():
        _in_range(f"{key}.{field_name}", getattr(p, field_name), rng)
    _need(p.scheduler in ("cosine", "linear", "constant"), f"{key}.scheduler", p.scheduler,
          "cosine, linear or constant")
    _need(p.method in METHODS, f"{key}.method", p.method, " or ".join(METHODS))


def with_overrides(p: Profile, overrides: dict[str, Any], where: str) -> Profile:
    """`p` with some fields changed (an experiment's variant), each checked as settings.toml would be;
    a SettingsError names `where` and the field."""
    known = {f.name: f for f in fields(Profile)}
    for key, value in overrides.items():
        _need(key in set(VARY_KEYS.values()), f"{where}.{key}", value,
              "one of " + ", ".join(sorted(set(VARY_KEYS.values()))))
    out = replace(p, **{k: _coerce(f"{where}.{k}", v, {"int": int, "float": float}[str(known[k].type)])
                        for k, v in overrides.items()})
    _check_profile(out, where)
    return out


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


def _is_url(text: str) -> bool:
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(text)
        return parts.scheme in ("http", "https") and bool(parts.hostname) and text.isprintable()
    except ValueError:
        return False


def is_loopback(host: str) -> bool:
    """Whether `host` only accepts connections from this machine."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def nightly_window(s: Settings) -> tuple[int, int] | None:
    return _parse_window(s.learning.nightly_window) if s.learning.nightly_window else None


def from_dict(data: dict[str, Any], source: Path | None = None) -> Settings:
    sections, unknown = {}, []
    for key, value in data.items():
        if key in SECTIONS:
            sections[key] = _build(SECTIONS[key], value, key, unknown)
        else:
            unknown.append(key)
    s = Settings(**sections, source=source, raw=data)
    where = source.name if source else "settings"
    s.warnings = [f"{where}: unknown key {k} (kept, ignored; a typo?)" for k in unknown]
    for w in s.warnings:
        warnings.warn(w, stacklevel=2)
    _check(s)
    return s


def default_path() -> Path:
    """TANDEM_SETTINGS if set, else settings.toml in the checkout this package lives in."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser().resolve()
    return Path(__file__).resolve().parent.parent / "settings.toml"


def load(path: Path | str | None = None, must_exist: bool = False) -> Settings:
    """Settings from `path` (default: `default_path()`). A missing file gives the defaults, unless the
    person named it (`must_exist`, or TANDEM_SETTINGS): then a typo must not silently mean defaults."""
    named_by_env = not path and bool(os.environ.get(ENV_VAR))
    path = Path(path).expanduser() if path else default_path()
    if not path.exists():
        if must_exist or named_by_env:
            how = f" (named by {ENV_VAR})" if named_by_env else ""
            raise SettingsError(f"{path}: no such settings file{how}")
        return Settings(source=path.resolve())
    try:
        text = path.read_bytes().decode("utf-8")
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SettingsError(f"{path}: not valid TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise SettingsError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise SettingsError(f"{path}: cannot be read ({e.strerror or e})") from None
    s = from_dict(data, source=path.resolve())
    s.text = text
    return s


def _known_dict(s: Settings) -> dict[str, Any]:
    return {name: asdict(getattr(s, name)) for name in SECTIONS}


def _merge(raw: dict[str, Any], known: dict[str, Any]) -> dict[str, Any]:
    out = dict(raw)
    for k, v in known.items():
        out[k] = _merge(raw[k], v) if isinstance(v, dict) and isinstance(raw.get(k), dict) else v
    return out


def _changes(old: dict[str, Any], new: dict[str, Any], at: tuple[str, ...] = ()) -> Iterator[tuple[tuple, Any]]:
    """(dotted path, value) of every leaf of `new` that differs from `old`."""
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, dict) and isinstance(before, dict):
            yield from _changes(before, value, (*at, key))
        elif value != before:
            yield (*at, key), value


def _quiet_known(text: str) -> dict[str, Any]:
    """The known settings a file's text gives (defaults filled in), without repeating its warnings."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _known_dict(from_dict(tomllib.loads(text)))


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o777)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save(s: Settings, path: Path | None = None) -> Path:
    """Write validated settings into their file as edits: only values that changed are rewritten, so
    comments, order and unknown keys stay. Atomic. Refused (SettingsChanged) when the file is the one
    `s` was read from and it changed on disk since: saving would put someone's edit back."""
    _check(s)
    path = Path(path or s.source or default_path())
    try:
        current = path.read_bytes().decode("utf-8") if path.exists() else ""
    except (OSError, UnicodeDecodeError) as e:
        raise SettingsError(f"{path}: cannot be read back before writing ({e})") from None
    if s.source is not None and path.resolve() == s.source and current != s.text:
        raise SettingsChanged(f"{path} changed on disk since it was read (another Tandem or an editor); "
                              "reload it and make your change again")
    doc = tomlkit.parse(s.text)
    for keys, value in _changes(_quiet_known(s.text), _known_dict(s)):
        node = doc
        for key in keys[:-1]:
            if key not in node:
                node[key] = tomlkit.table()
            node = node[key]
        node[keys[-1]] = value
    text = tomlkit.dumps(doc)
    _write_atomic(path, text)
    s.raw, s.source, s.text = tomllib.loads(text), path.resolve(), text
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
    out = from_dict(data, source=s.source)
    out.text = s.text  # still based on the same file text: `save` writes only the difference
    return out


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
