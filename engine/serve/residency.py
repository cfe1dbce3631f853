"""The live set of adapters on the inference model.

`LiveAdapters` keeps adapters resident on the model within a memory budget (least recently used ones
are unloaded and reloaded on demand); switching is PEFT's `set_adapter`. Disk reads happen outside the
model's lock; only attaching the weights takes it, so a streaming reply is never disturbed.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from engine.serve.model import LoadedModel
from engine.store.adapters import AdapterError, AdapterStore, StoredAdapter


@dataclass
class Residency:
    name: str
    resident: bool
    active: bool
    size_mb: float
    task: str
    final_loss: float | None


class LiveAdapters:
    """Adapters on the live inference model. Every method is thread-safe."""

    def __init__(self, lm: LoadedModel, store: AdapterStore, budget_mb: int):
        self.lm = lm
        self.store = store
        self.budget_bytes = budget_mb * 2**20
        self.known: dict[str, StoredAdapter] = {}
        self.problems: list[tuple[str, str]] = []
        self.resident: OrderedDict[str, tuple[float, int]] = OrderedDict()  # name -> (created, bytes), LRU order
        self.active: str | None = None
        self._state_lock = threading.Lock()
        self._watch_stop = threading.Event()
        self._layers: list[Any] | None = None
        self.last_swap_s = 0.0
        self.refresh()

    # ----- the store
    def refresh(self) -> dict[str, list[str]]:
        """Re-read the store; unload adapters that vanished or changed. Returns what changed."""
        good, bad = self.store.scan()
        with self._state_lock:
            before = {n: a.manifest.created for n, a in self.known.items()}
            self.known = {a.name: a for a in good}
            self.problems = bad
            now = {n: a.manifest.created for n, a in self.known.items()}
        added = [n for n in now if n not in before]
        changed = [n for n in now if n in before and now[n] != before[n]]
        removed = [n for n in before if n not in now]
        for name in removed + changed:
            self.unload(name)
        return {"added": added, "changed": changed, "removed": removed}

    def names(self) -> list[str]:
        return sorted(self.known)

    def table(self) -> list[Residency]:
        with self._state_lock:
            return [Residency(n, n in self.resident, n == self.active, a.size_bytes / 2**20, a.manifest.task,
                              a.manifest.final_loss) for n, a in sorted(self.known.items())]

    # ----- loading
    def _read(self, a: StoredAdapter) -> tuple[Any, dict]:
        from peft import LoraConfig
        from safetensors.torch import load_file

        config = LoraConfig.from_pretrained(str(a.path))
        config.inference_mode = True
        weights = a.weights
        if weights.suffix == ".safetensors":
            state = load_file(str(weights), device=self.lm.device)
        else:
            import torch

            state = torch.load(weights, map_location=self.lm.device, weights_only=True)
        return config, state

    def _attach(self, name: str, config: Any, state: dict) -> None:
        """Under the model lock: add the adapter's layers and weights to the live model."""
        from peft import PeftModel, get_peft_model, set_peft_model_state_dict

        model = self.lm.model
        if isinstance(model, PeftModel):
            model.add_adapter(name, config)
        else:
            model = get_peft_model(model, config, adapter_name=name)
            self.lm.model = model
        self._layers = None
        if self.lm.fast is not None:
            self.lm.fast.forget(name)
        result = set_peft_model_state_dict(model, state, adapter_name=name)
        missing = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
        if missing:
            model.delete_adapter(name)
            raise AdapterError(f"{name}: weights do not match this model ({len(missing)} unexpected tensors)")
        model.eval()

    def ensure(self, name: str) -> None:
        """Make `name` resident (load from disk if needed), evicting LRU adapters beyond the budget."""
        with self._state_lock:
            if name in self.resident:
                self.resident.move_to_end(name)
                return
            a = self.known.get(name)
        if a is None:
            raise AdapterError(f"no adapter named {name!r}; known: {', '.join(self.names()) or 'none'}")
        try:
            config, state = self._read(a)  # disk I/O outside the model lock
        except Exception as e:
            raise AdapterError(f"{name}: could not read its weights: {e}") from e
        size = a.size_bytes
        with self.lm.lock:
            if name in self.resident:
                return
            while self.resident and sum(b for _, b in self.resident.values()) + size > self.budget_bytes:
                # Least recently used first, the active one last (every reply re-activates its adapter anyway).
                order = sorted(self.resident, key=lambda n: n == self.active)
                self._drop(order[0])
            try:
                self._attach(name, config, state)
            except AdapterError:
                raise
            except Exception as e:  # a shape mismatch surfaces here as a RuntimeError from torch
                raise AdapterError(f"{name}: does not fit this base model: {e}") from e
            if self.lm.fast is not None:
                self.lm.fast.prepare(name)
            with self._state_lock:
                self.resident[name] = (a.manifest.created, size)

    def _drop(self, name: str) -> None:
        self.lm.model.delete_adapter(name)
        self._layers = None
        if self.lm.fast is not None:
            self.lm.fast.forget(name)
        with self._state_lock:
            self.resident.pop(name, None)
            if self.active == name:
                self.active = None
                self.lm.pending = None  # a deferred switch to it must not come back

    def unload(self, name: str) -> None:
        with self.lm.lock:
            if name in self.resident:
                self._drop(name)

    def _tuner_layers(self) -> list[Any]:
        """The model's LoRA layers, found once per change of the adapter set (a walk of every module
        costs milliseconds on a 24-layer model; the switch itself must not)."""
        if self._layers is None:
            from peft.tuners.tuners_utils import BaseTunerLayer

            self._layers = [m for m in self.lm.model.modules() if isinstance(m, BaseTunerLayer)]
        return self._layers

    def activate(self, name: str | None) -> None:
        """Switch the model to adapter `name`, or to the plain base model with None.

        PEFT's `set_adapter` also flips requires_grad on every LoRA tensor, which inference does not
        need and which costs milliseconds; the switch here sets only what the forward pass reads:
        each LoRA layer's active adapter and its disabled flag (the same fields set_adapter sets)."""
        if name is not None:
            self.ensure(name)
        with self.lm.lock:
            started = time.perf_counter()
            fast = self.lm.fast
            if fast is not None:
                fast.select(name)
            if fast is not None and fast.usable:  # the PEFT layers wait until a reference forward needs them
                self.lm.pending = lambda: self._set_peft(name)
            else:
                self.lm.pending = None
                self._set_peft(name)
            self.last_swap_s = time.perf_counter() - started
            with self._state_lock:
                self.active = name
                if name:
                    self.resident.move_to_end(name)

    def _set_peft(self, name: str | None) -> None:
        model = self.lm.model
        if hasattr(model, "base_model") and hasattr(model.base_model, "disable_adapter_layers"):
            for layer in self._tuner_layers():
                layer._disable_adapters = name is None
                if name is not None:
                    layer._active_adapter = [name]
            if name is not None:
                model.base_model.active_adapter = name

    # ----- the watcher
    def watch(self, on_change: Callable[[dict[str, list[str]]], None], interval: float = 1.0) -> threading.Thread:
        """Poll the store; new or replaced adapters are loaded into the live model as they appear."""

        def loop() -> None:
            sig = self.store.signature()
            while not self._watch_stop.wait(interval):
                now = self.store.signature()
                if now == sig:
                    continue
                sig = now
                changes = self.refresh()
                for name in changes["added"] + changes["changed"]:
                    try:
                        self.ensure(name)
                    except AdapterError as e:
                        changes.setdefault("failed", []).append(f"{name}: {e}")
                on_change(changes)

        t = threading.Thread(target=loop, name="adapter-watcher", daemon=True)
        t.start()
        return t

    def stop_watching(self) -> None:
        self._watch_stop.set()
