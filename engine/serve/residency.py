"""The live set of adapters on the inference model, and which decoder serves each.

`LiveAdapters` keeps adapters resident on the model within a memory budget (least recently used ones
are unloaded and reloaded on demand); the budget counts each adapter's weights and the fast
decoder's packed copy of them. Reading an adapter from disk is safe from any thread; everything that
touches the model (attach, unload, select) runs on the inference worker, the model's one owner.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from engine.serve import selfcheck
from engine.serve.decoder import Decoder, ReferenceDecoder
from engine.serve.model import LoadedModel
from engine.store.adapter_format import read_weights
from engine.store.adapters import AdapterError, AdapterStore, StoredAdapter


@dataclass
class Residency:
    name: str
    resident: bool
    active: bool
    size_mb: float
    task: str
    final_loss: float | None


@dataclass
class Selected:
    """What a request will decode with: the adapter that answers (None: the base), its decoder, and
    why it differs from the one asked for (empty when it does not)."""

    adapter: str | None
    decoder: Decoder
    note: str = ""


class LiveAdapters:
    """Adapters on the live inference model. `table`, `names`, `known` and `read` may be used from any
    thread; the rest only from the inference worker."""

    def __init__(self, lm: LoadedModel, store: AdapterStore, budget_mb: int, fast: Any = None):
        self.lm = lm
        self.store = store
        self.budget_bytes = budget_mb * 2**20
        self.reference = ReferenceDecoder(lm.model, lm.max_len)
        self.fast = fast  # FastDecoder, or None when it does not apply
        self.known: dict[str, StoredAdapter] = {}
        self.problems: list[tuple[str, str]] = []
        self.failed: dict[str, str] = {}  # adapters that could not be attached: name -> why (until they change)
        self.resident: OrderedDict[str, tuple[float, int]] = OrderedDict()  # name -> (created, bytes), LRU order
        self.active: str | None = None
        self._state_lock = threading.Lock()
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
            self.failed.pop(name, None)
        return {"added": added, "changed": changed, "removed": removed}

    def broken(self, name: str, reason: str) -> None:
        """Adapter `name` could not be attached: listed with the broken ones until it changes on disk."""
        with self._state_lock:
            self.failed[name] = reason

    def broken_list(self) -> list[tuple[str, str]]:
        with self._state_lock:
            return [*self.problems, *((n, f"could not be attached: {r}") for n, r in sorted(self.failed.items()))]

    def names(self) -> list[str]:
        return sorted(self.known)

    def table(self) -> list[Residency]:
        with self._state_lock:
            return [Residency(n, n in self.resident, n == self.active, a.size_bytes / 2**20, a.manifest.task,
                              a.manifest.final_loss) for n, a in sorted(self.known.items())]

    def budget(self, budget_mb: int) -> None:
        """A new budget: evict least recently used adapters until the resident ones fit it."""
        self.budget_bytes = budget_mb * 2**20
        self._evict(0)

    # ----- loading
    def stored(self, name: str) -> StoredAdapter:
        with self._state_lock:
            a = self.known.get(name)
        if a is None:
            raise AdapterError(f"no adapter named {name!r}; known: {', '.join(self.names()) or 'none'}")
        return a

    def read(self, name: str) -> tuple[StoredAdapter, Any, dict]:
        """Adapter `name`'s config and weights from disk, on the model's device, as Tandem serves them
        (engine/store/adapter_format.py: lora_B rank-major, both expert weights). Any thread."""
        a = self.stored(name)
        try:
            config, state = read_weights(a.path, self.lm.device, self.lm.num_experts)
        except AdapterError as e:
            raise AdapterError(f"{name}: {e}") from e
        except Exception as e:
            raise AdapterError(f"{name}: could not read its weights: {e}") from e
        config.inference_mode = True
        return a, config, state

    def attach(self, a: StoredAdapter, config: Any, state: dict) -> None:
        """Add an adapter read by `read` to the live model, evicting least recently used ones beyond the
        budget (never the incoming one: its own bytes, the fast decoder's packed copy included, are counted
        before loading). A failure at any step leaves the model as it was. Worker only."""
        if a.name in self.resident:
            return
        estimate = self.fast.pack_estimate(state) if self.fast is not None else 0
        self._evict(a.size_bytes + estimate, keep=a.name)
        try:
            size = a.size_bytes + self._load(a, config, state)
        except AdapterError:
            self._drop(a.name)
            raise
        except Exception as e:  # out of memory while packing or capturing graphs, a CUDA error…
            self._drop(a.name)
            raise AdapterError(f"{a.name}: could not be attached: {type(e).__name__}: {e}"[:500]) from e
        with self._state_lock:
            self.resident[a.name] = (a.manifest.created, size)
        self._evict(0, keep=a.name)

    def _load(self, a: StoredAdapter, config: Any, state: dict) -> int:
        """Put the adapter on the PEFT model and pack it for the fast decoder; the packed copy's bytes."""
        from peft import PeftModel, get_peft_model, set_peft_model_state_dict

        model = self.reference.model
        try:
            if isinstance(model, PeftModel):
                model.add_adapter(a.name, config)
            else:
                model = get_peft_model(model, config, adapter_name=a.name)
                self.reference.model = model
            self.reference.forget_layers()
            result = set_peft_model_state_dict(model, state, adapter_name=a.name)
        except Exception as e:  # a shape mismatch surfaces here as a RuntimeError from torch
            raise AdapterError(f"{a.name}: does not fit this base model: {e}") from e
        unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
        if unexpected:
            raise AdapterError(f"{a.name}: weights do not match this model ({len(unexpected)} unexpected tensors)")
        model.eval()
        if self.fast is None:
            return 0
        self.fast.forget(a.name)
        if not isinstance(self.fast.prepare(a.name), str):  # pack and capture now, not on the first reply
            verdict = selfcheck.check(self.lm, self.fast, self.reference, a.name, a.manifest.created)
            if not verdict.ok:  # the fast decoder misreads this adapter: the reference serves it, saying why
                self.fast.forget(a.name)
                self.fast.packs[a.name] = verdict.reason
        return self.fast.pack_bytes(a.name)

    def _drop(self, name: str) -> None:
        """Take a half-attached adapter off the PEFT model and the fast decoder again."""
        model = self.reference.model
        if name in (getattr(model, "peft_config", None) or {}):
            model.delete_adapter(name)
            self.reference.forget_layers()
        if self.fast is not None:
            self.fast.forget(name)

    def ensure(self, name: str) -> None:
        """Make `name` resident, reading it from disk if needed. Worker only."""
        with self._state_lock:
            if name in self.resident:
                self.resident.move_to_end(name)
                return
        self.attach(*self.read(name))

    def _evict(self, incoming: int, keep: str | None = None) -> None:
        """Drop least recently used adapters until `incoming` more bytes fit: the active one last, `keep`
        (the adapter being loaded) never. One adapter larger than the budget alone still serves."""
        while sum(b for _, b in self.resident.values()) + incoming > self.budget_bytes:
            order = sorted((n for n in self.resident if n != keep), key=lambda n: n == self.active)
            if not order or (incoming == 0 and keep is None and len(self.resident) == 1):
                return
            self.unload(order[0])

    def unload(self, name: str) -> None:
        """Worker only."""
        if name not in self.resident:
            return
        self._drop(name)
        with self._state_lock:
            self.resident.pop(name, None)
            if self.active == name:
                self.active = None

    # ----- selecting
    def select(self, name: str | None) -> Selected:
        """The decoder for adapter `name` (None: the base), with that adapter applied. The decoder
        returned holds the adapter it names: an adapter that cannot be loaded, or that no decoder will
        take, gives the base, with the reason in the note. Worker only."""
        started = time.perf_counter()
        note = ""
        if name is not None:
            try:
                self.ensure(name)
            except AdapterError as e:
                note, name = f"adapter {name} unavailable ({e}); base answers", None
        decoder: Decoder | None = None
        if self.fast is not None and self.fast.select(name):
            decoder = self.fast
        elif self.reference.select(name):
            decoder = self.reference
            if self.fast is not None and self.fast.reason:
                note = note or f"fast decoder: {self.fast.reason}; transformers + PEFT answers"
        else:  # held by neither (evicted under it, or never attached): the base answers, and says so
            why = self.fast.reason if self.fast is not None and self.fast.reason else "not on the model"
            note = f"adapter {name} unavailable ({why}); base answers"
            name = None
            decoder = self.fast if self.fast is not None and self.fast.select(None) else self.reference
            if decoder is self.reference:
                self.reference.select(None)
        self.last_swap_s = time.perf_counter() - started
        with self._state_lock:
            self.active = name  # ensure() above already made it the most recently used
        return Selected(name, decoder, note)
