"""The specialist store on disk: `adapters/<name>/` = a standard PEFT folder + manifest.json.

Publishing is atomic: the folder is written under `adapters/.staging/`, fsynced, then renamed into
place, so the live engine's watcher (or any reader) never sees half an adapter. A replaced version
moves to `adapters/.versions/<name>/<created>` and can be rolled back. Reading never raises for a
broken folder: it is reported with its reason and skipped.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
RESERVED = {"auto", "base"}


class AdapterError(ValueError):
    """A bad adapter name or folder, with the reason."""


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
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        missing = {"name", "task", "base_model"} - known.keys()
        if missing:
            raise AdapterError(f"manifest.json lacks {', '.join(sorted(missing))}")
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


def check_name(name: str) -> str:
    if not NAME_RE.match(name) or name.lower() in RESERVED:
        raise AdapterError(
            f"adapter name {name!r}: use letters, digits, '_', '-' or '.', at most 64, not 'auto' or 'base'"
        )
    return name


def read_adapter(folder: Path, base_model: str | None = None) -> StoredAdapter:
    """Validate one folder. Raises AdapterError naming what is wrong."""
    if not folder.is_dir():
        raise AdapterError("not a folder")
    cfg_path = folder / "adapter_config.json"
    if not cfg_path.exists():
        raise AdapterError("missing adapter_config.json (not a PEFT adapter folder)")
    if not any((folder / f).exists() for f in WEIGHT_FILES):
        raise AdapterError("missing adapter_model.safetensors (weights)")
    try:
        cfg = json.loads(cfg_path.read_text())
        manifest = Manifest.from_dict(json.loads((folder / "manifest.json").read_text()))
    except FileNotFoundError:
        raise AdapterError("missing manifest.json") from None
    except json.JSONDecodeError as e:
        raise AdapterError(f"bad JSON: {e}") from None
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
                a = read_adapter(folder, self.base_model)
                if a.manifest.name != folder.name:
                    raise AdapterError(f"manifest names it {a.manifest.name!r}, folder is {folder.name!r}")
                good.append(a)
            except AdapterError as e:
                bad.append((folder.name, str(e)))
        return good, bad

    def signature(self) -> tuple:
        """Cheap change detector for the watcher: folder names and manifest mtimes."""
        sig = []
        for folder in self.root.iterdir():
            m = folder / "manifest.json"
            if not folder.name.startswith(".") and m.exists():
                sig.append((folder.name, m.stat().st_mtime_ns))
        return tuple(sorted(sig))

    def get(self, name: str) -> StoredAdapter:
        folder = self.root / name
        if not folder.exists():
            raise AdapterError(f"no adapter named {name!r} in {self.root}")
        return read_adapter(folder, self.base_model)

    def publish(self, source: Path, manifest: Manifest) -> StoredAdapter:
        """Copy a PEFT folder in with its manifest, atomically. An existing version is kept aside."""
        check_name(manifest.name)
        staging = self.root / ".staging" / f"{manifest.name}-{uuid.uuid4().hex[:8]}"
        staging.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(source, staging)
        (staging / "manifest.json").write_text(json.dumps(asdict(manifest), indent=1, ensure_ascii=False))
        try:
            read_adapter(staging, self.base_model)  # refuse to publish something we could not read back
        except AdapterError:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        _fsync_tree(staging)
        target = self.root / manifest.name
        if target.exists():
            old = read_adapter(target)
            manifest.parent = str(old.manifest.created)
            (staging / "manifest.json").write_text(json.dumps(asdict(manifest), indent=1, ensure_ascii=False))
            keep = self.root / ".versions" / manifest.name / f"{old.manifest.created:.3f}"
            keep.parent.mkdir(parents=True, exist_ok=True)
            os.replace(target, keep)
        os.replace(staging, target)
        return read_adapter(target)

    def versions(self, name: str) -> list[StoredAdapter]:
        """Older versions of `name`, newest first."""
        folder = self.root / ".versions" / name
        if not folder.exists():
            return []
        out = []
        for v in sorted(folder.iterdir(), reverse=True):
            try:
                out.append(read_adapter(v))
            except AdapterError:
                continue
        return out

    def rollback(self, name: str) -> StoredAdapter:
        """Make the newest kept version current again; the current one is kept aside."""
        older = self.versions(name)
        if not older:
            raise AdapterError(f"{name!r} has no earlier version to roll back to")
        previous = older[0]
        return self.publish(previous.path, previous.manifest)

    def rename(self, old: str, new: str) -> StoredAdapter:
        check_name(new)
        a = self.get(old)
        if (self.root / new).exists():
            raise AdapterError(f"an adapter named {new!r} already exists")
        a.manifest.name = new
        (a.path / "manifest.json").write_text(json.dumps(asdict(a.manifest), indent=1, ensure_ascii=False))
        os.replace(a.path, self.root / new)
        return self.get(new)

    def remove(self, name: str) -> None:
        a = self.get(name)
        trash = self.root / ".staging" / f"removed-{name}-{uuid.uuid4().hex[:8]}"
        trash.parent.mkdir(parents=True, exist_ok=True)
        os.replace(a.path, trash)  # vanish from readers at once, then delete
        shutil.rmtree(trash, ignore_errors=True)

    def import_folder(self, path: Path, name: str | None = None, task: str | None = None) -> StoredAdapter:
        """Bring in a PEFT folder from elsewhere. A manifest is made if it has none."""
        path = Path(path).expanduser()
        if (path / "manifest.json").exists():
            manifest = read_adapter(path).manifest
            if name:
                manifest.name = name
        else:
            if not (path / "adapter_config.json").exists():
                raise AdapterError(f"{path}: missing adapter_config.json (not a PEFT adapter folder)")
            cfg = json.loads((path / "adapter_config.json").read_text())
            manifest = Manifest(name=name or path.name, task=task or name or path.name,
                                base_model=self.base_model or cfg.get("base_model_name_or_path", ""),
                                lora={"rank": cfg.get("r"), "alpha": cfg.get("lora_alpha"),
                                      "rslora": cfg.get("use_rslora", False),
                                      "target_modules": sorted(cfg.get("target_modules") or []),
                                      "target_parameters": cfg.get("target_parameters") or []},
                                description=f"imported from {path}")
        if (self.root / manifest.name).exists():
            raise AdapterError(f"an adapter named {manifest.name!r} already exists; pass another name")
        return self.publish(path, manifest)
