"""The specialist store on disk: `adapters/<name>/` = a standard PEFT folder + manifest.json.

Publishing is atomic: the folder is written under `adapters/.staging/`, fsynced, then renamed into
place, so the live engine's watcher (or any reader) never sees half an adapter. A replaced version is
pushed on a stack, `adapters/.versions/<name>/<created>`; each rollback pops one version back.
Reading never raises for a broken folder: it is reported with its reason and skipped. Every name is
checked by `engine.names` and every path resolved inside the store's root, so no name reaches a folder
outside it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from engine import names
from engine.files import read_json
from engine.store.adapter_format import WEIGHT_FILES, AdapterError, convert


class BadAdapterName(AdapterError, names.InvalidName):
    """Caught as either: the store's callers catch AdapterError, the name checks InvalidName."""


def _str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


# manifest.json's shape: field -> (check, what it must be). Written by hand: it is the file format.
SCHEMA: dict[str, tuple[Any, str]] = {
    "name": (names.is_valid, f"a name ({names.RULE})"),
    "task": (names.is_valid, f"a name ({names.RULE})"),
    "base_model": (lambda v: isinstance(v, str), "a string"),
    "description": (lambda v: isinstance(v, str), "a string"),
    "lora": (lambda v: isinstance(v, dict), "an object"),
    "adapted": (lambda v: isinstance(v, dict) and all(isinstance(x, int) for x in v.values()),
                "an object of integers"),
    "profile": (lambda v: isinstance(v, str), "a string"),
    "dataset_fingerprint": (lambda v: isinstance(v, str), "a string"),
    "final_loss": (lambda v: v is None or _number(v), "a number or null"),
    "best_loss": (lambda v: v is None or _number(v), "a number or null"),
    "eval_loss": (lambda v: v is None or _number(v), "a number or null"),
    "created": (_number, "a number"),
    "prompts": (_str_list, "a list of strings"),
    "exemplars": (_str_list, "a list of strings"),
    "run_id": (lambda v: isinstance(v, str), "a string"),
    "parent": (lambda v: isinstance(v, str), "a string"),
}


@dataclass
class Manifest:
    name: str
    task: str
    base_model: str
    description: str = ""
    lora: dict[str, Any] = field(default_factory=dict)  # rank, alpha, rslora, target_modules, target_parameters
    adapted: dict[str, int] = field(default_factory=dict)  # trainable parameters: attention / experts / total
    profile: str = ""
    dataset_fingerprint: str = ""
    final_loss: float | None = None
    best_loss: float | None = None
    eval_loss: float | None = None
    created: float = field(default_factory=time.time)
    prompts: list[str] = field(default_factory=list)  # what the router learns from
    exemplars: list[str] = field(default_factory=list)  # extra router examples the user adds
    run_id: str = ""
    parent: str = ""  # created-time of the version this one replaced, for rollback

    @property
    def router_prompts(self) -> list[str]:
        return self.prompts + self.exemplars

    @classmethod
    def from_dict(cls, d: Any) -> Manifest:
        """Validated against SCHEMA: a wrong shape or type is an AdapterError naming the field."""
        if not isinstance(d, dict):
            raise AdapterError(f"manifest.json must be a JSON object, got {type(d).__name__}")
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        missing = {"name", "task", "base_model"} - known.keys()
        if missing:
            raise AdapterError(f"manifest.json lacks {', '.join(sorted(missing))}")
        for key, value in known.items():
            ok, expected = SCHEMA[key]
            if not ok(value):
                raise AdapterError(f"manifest.json: {key} = {names.shown(repr(value))} must be {expected}")
        return cls(**known)


@dataclass
class StoredAdapter:
    path: Path
    manifest: Manifest

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.iterdir() if f.name in WEIGHT_FILES)

    @property
    def weights(self) -> Path:
        return next(self.path / f for f in WEIGHT_FILES if (self.path / f).exists())


def check_name(name: Any, what: str = "adapter name") -> str:
    try:
        return names.check(name, what)
    except names.InvalidName as e:
        raise BadAdapterName(str(e)) from None


def _read_json(path: Path) -> Any:
    return read_json(path, AdapterError, path.name)


def read_adapter(folder: Path, base_model: str | None = None) -> StoredAdapter:
    """Validate one folder. Raises AdapterError naming what is wrong."""
    if not folder.is_dir():
        raise AdapterError("not a folder")
    cfg_path = folder / "adapter_config.json"
    if not cfg_path.exists():
        raise AdapterError("missing adapter_config.json (not a PEFT adapter folder)")
    if not any((folder / f).is_file() for f in WEIGHT_FILES):
        raise AdapterError("missing adapter_model.safetensors (weights)")
    cfg = _read_json(cfg_path)
    if not isinstance(cfg, dict):
        raise AdapterError(f"adapter_config.json must be a JSON object, got {type(cfg).__name__}")
    manifest = Manifest.from_dict(_read_json(folder / "manifest.json"))
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"peft_type {cfg.get('peft_type')!r} is not LORA")
    if base_model is not None and manifest.base_model != base_model:
        raise AdapterError(f"trained for base model {manifest.base_model!r}, the engine runs {base_model!r}")
    return StoredAdapter(folder, manifest)


def _fsync_tree(folder: Path) -> None:
    for f in folder.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AdapterStore:
    def __init__(self, root: Path, base_model: str | None = None):
        self.root = Path(root)
        self.base_model = base_model
        self.root.mkdir(parents=True, exist_ok=True)

    def scan(self) -> tuple[list[StoredAdapter], list[tuple[str, str]]]:
        """(valid adapters sorted by name, [(folder name, reason)] for broken ones)."""
        good, bad = [], []
        for folder in sorted(self.root.iterdir()):
            if folder.name.startswith(".") or not folder.is_dir():
                continue
            try:
                check_name(folder.name, "folder name")
                a = read_adapter(self._path(folder.name), self.base_model)
                if a.manifest.name != folder.name:
                    raise AdapterError(f"manifest names it {a.manifest.name!r}, folder is {folder.name!r}")
                good.append(a)
            except (AdapterError, names.InvalidName, OSError) as e:  # a folder can vanish mid-scan
                bad.append((folder.name, str(e)))
        return good, bad

    def _path(self, *parts: str) -> Path:
        """A path in the store; refused when it (or a symlink on the way) leads outside the root."""
        try:
            return names.inside(self.root, *parts)
        except names.InvalidName as e:
            raise BadAdapterName(str(e)) from None

    def signature(self) -> tuple:
        """Cheap change detector for the watcher: folder names and manifest mtimes."""
        sig = []
        for folder in self.root.iterdir():
            try:
                if not folder.name.startswith("."):
                    sig.append((folder.name, (folder / "manifest.json").stat().st_mtime_ns))
            except OSError:  # no manifest, or removed between listing and reading: the next scan says
                sig.append((folder.name, 0))
        return tuple(sorted(sig))

    def get(self, name: str) -> StoredAdapter:
        folder = self._path(check_name(name))
        if not folder.exists():
            raise AdapterError(f"no adapter named {name!r} in {self.root}")
        return read_adapter(folder, self.base_model)

    def publish(self, source: Path, manifest: Manifest) -> StoredAdapter:
        """Copy a PEFT folder in with its manifest, atomically. An existing version is pushed on the
        name's version stack (`.versions/`). Whatever fails, nothing is left in `.staging/`."""
        check_name(manifest.name)
        check_name(manifest.task, "task name")
        staging = self.root / ".staging" / f"{manifest.name}-{uuid.uuid4().hex[:8]}"
        staging.parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copytree(source, staging)
            target = self._path(manifest.name)
            if target.exists():
                manifest.parent = str(self._created(target))
            (staging / "manifest.json").write_text(json.dumps(asdict(manifest), indent=1, ensure_ascii=False))
            read_adapter(staging, self.base_model)  # refuse to publish something we could not read back
            _fsync_tree(staging)
            if target.exists():
                self._push(target, manifest.name)
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # gone already when the publish went through
        return read_adapter(target)

    @staticmethod
    def _created(folder: Path) -> float:
        """A version's created time; for a folder whose manifest cannot be read, its modification time."""
        try:
            return Manifest.from_dict(_read_json(folder / "manifest.json")).created
        except (AdapterError, OSError):
            return folder.stat().st_mtime

    def _push(self, current: Path, name: str) -> None:
        """Move the current version onto the top of the stack, under a name no other version holds."""
        stack = self._path(".versions", name)
        stack.mkdir(parents=True, exist_ok=True)
        slot = f"{self._created(current):.3f}"
        while (stack / slot).exists():  # two versions created within the same millisecond
            slot += "+"
        os.replace(current, self._path(".versions", name, slot))

    def versions(self, name: str) -> list[StoredAdapter]:
        """Older versions of `name`, newest first (the top of its stack first)."""
        folder = self._path(".versions", check_name(name))
        if not folder.exists():
            return []
        out = []
        for v in folder.iterdir():
            try:
                out.append(read_adapter(v))
            except (AdapterError, OSError):
                continue
        return sorted(out, key=lambda a: (a.manifest.created, a.path.name), reverse=True)

    def rollback(self, name: str) -> StoredAdapter:
        """Pop the stack: the newest kept version becomes current, and the current one is dropped, so
        each rollback goes one version further back and a later publish pushes as usual."""
        target = self._path(check_name(name))
        older = self.versions(name)
        if not older:
            raise AdapterError(f"{name!r} has no earlier version to roll back to")
        previous = older[0]
        trash = self.root / ".staging" / f"rolled-back-{name}-{uuid.uuid4().hex[:8]}"
        trash.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            os.replace(target, trash)
        try:
            os.replace(previous.path, target)
        except OSError:
            if trash.exists():
                os.replace(trash, target)  # put the current version back rather than leave none
            raise
        shutil.rmtree(trash, ignore_errors=True)
        return read_adapter(target, self.base_model)

    def rename(self, old: str, new: str) -> StoredAdapter:
        target = self._path(check_name(new))
        a = self.get(old)
        if target.exists():
            raise AdapterError(f"an adapter named {new!r} already exists")
        a.manifest.name = new
        (a.path / "manifest.json").write_text(json.dumps(asdict(a.manifest), indent=1, ensure_ascii=False))
        os.replace(a.path, target)
        return self.get(new)

    def remove(self, name: str) -> None:
        a = self.get(name)
        trash = self.root / ".staging" / f"removed-{name}-{uuid.uuid4().hex[:8]}"
        trash.parent.mkdir(parents=True, exist_ok=True)
        os.replace(a.path, trash)  # vanish from readers at once, then delete
        shutil.rmtree(trash, ignore_errors=True)

    def import_folder(self, path: Path, name: str | None = None, task: str | None = None,
                      base_config: Any = None) -> StoredAdapter:
        """Bring in a PEFT folder from elsewhere. A manifest is made if it has none, naming the store's base
        model. With `base_config` (the base's transformers config) the weights are checked against it and
        converted to the layout Tandem serves (engine/store/adapter_format.py) before they enter the store."""
        path = Path(path).expanduser()
        if name is not None:
            check_name(name)
        if task is not None:
            check_name(task, "task name")
        if path.is_symlink() or not path.is_dir():
            _check_source(path, self.root)
        if (path / "manifest.json").exists():
            try:
                manifest = read_adapter(path).manifest
            except AdapterError as e:
                raise AdapterError(f"{path}: {e}") from None
            manifest.name, manifest.task = name or manifest.name, task or manifest.task
        else:
            if not (path / "adapter_config.json").exists():
                raise AdapterError(f"{path}: missing adapter_config.json (not a PEFT adapter folder)")
            cfg = _read_json(path / "adapter_config.json")
            if not isinstance(cfg, dict):
                raise AdapterError(f"{path}: adapter_config.json must be a JSON object")
            if not self.base_model:
                raise AdapterError(f"{path}: has no manifest.json, so the base model it was trained for is unknown; "
                                   "import it with the engine's base model set")
            folder_name = name or check_name(path.name, "folder name (pass --name)")
            manifest = Manifest(name=folder_name, task=task or folder_name, base_model=self.base_model,
                                lora={"rank": cfg.get("r"), "alpha": cfg.get("lora_alpha"),
                                      "rslora": cfg.get("use_rslora", False),
                                      "target_modules": sorted(cfg.get("target_modules") or []),
                                      "target_parameters": cfg.get("target_parameters") or []},
                                description=f"imported from {path}")
        _check_source(path, self.root)
        if self._path(check_name(manifest.name)).exists():
            raise AdapterError(f"an adapter named {manifest.name!r} already exists; pass another name")
        if base_config is None:
            return self.publish(path, manifest)
        staging = self.root / ".staging" / f"import-{manifest.name}-{uuid.uuid4().hex[:8]}"
        try:
            for f in path.iterdir():  # small files beside the weights (README, tokenizer notes) come along
                if f.is_file() and f.name not in (*WEIGHT_FILES, "adapter_config.json", "manifest.json"):
                    staging.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(f, staging / f.name)
            try:
                converted = convert(path, staging, base_config)
            except AdapterError as e:
                raise AdapterError(f"{path}: {e}") from None
            if converted:
                manifest.description = f"{manifest.description} ({converted})".strip()
            return self.publish(staging, manifest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _check_source(path: Path, root: Path) -> None:
    """An import source: a real folder (no symbolic links in it, which could reach anything on the disk)
    that neither holds nor sits inside the store (a copy into itself would never end)."""
    if path.is_symlink() or not path.is_dir():
        raise AdapterError(f"{path}: no such folder" + (" (a symbolic link: give the real folder)"
                                                         if path.is_symlink() else ""))
    for dirpath, dirs, files in os.walk(path, followlinks=False):
        for entry in (*dirs, *files):
            if (Path(dirpath) / entry).is_symlink():
                raise AdapterError(f"{path}: {Path(dirpath, entry).relative_to(path)} is a symbolic link; "
                                   "copy the real file into the folder")
    real, store = path.resolve(), root.resolve()
    if real == store or store in real.parents or real in store.parents:
        raise AdapterError(f"{path}: is inside the adapter store (or holds it); import from another folder")
