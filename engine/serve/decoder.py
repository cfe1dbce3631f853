"""The one interface generation decodes through, and its transformers + PEFT implementation.

Two decoders serve a reply: the fast one (`engine/serve/fast_decode.py`: static cache, routed-expert
LoRA, CUDA graphs) and this reference one (the model's own forward with PEFT's layers), which serves
what the fast one refuses (other architectures, quantized layouts, DoRA…). `generate.stream` runs one
loop over either. Neither is thread-safe: only the inference worker calls them.
"""

from __future__ import annotations

from typing import Any, Protocol

from engine.serve.experts import router_modules


class Decoder(Protocol):
    """Prefill a prompt, then feed one token per step; both return the last position's logits."""

    max_len: int
    num_experts: int
    routes: tuple[Any, Any] | None  # last forward's expert routing (indices, weights), [layer, row, k]
    reused: int  # prompt tokens whose keys and values the last prefill kept from the cache

    def select(self, name: str | None) -> bool:
        """Decode with adapter `name` (None: the base) from the next forward; False when this decoder
        cannot serve it (the caller then uses another)."""
        ...

    def prefill(self, ids: Any) -> Any:
        """Logits of the prompt's last position. The cache of what was decoded before (prompt and reply) is
        reused up to the longest prefix it shares with `ids`, when the same adapter computed it."""
        ...

    def step(self, tokens: Any) -> Any: ...

    @property
    def full(self) -> bool:
        """No room for another token in the cache."""
        ...

    def record(self, on: bool) -> None:
        """Keep `routes` up to date for the forwards that follow (costs hooks on the reference path)."""
        ...

    def release(self) -> None:
        """The reply is over: stop recording; the cache stays for the next prompt's prefix."""
        ...


class ReferenceDecoder:
    """transformers' forward with a dynamic KV cache; adapters through PEFT's layers. `model` is
    replaced by the residency when PEFT first wraps the base model."""

    def __init__(self, model: Any, max_len: int):
        self.model = model
        self.max_len = max_len
        self.num_experts = int(getattr(model.config, "num_local_experts", 0))
        self.routes: tuple[Any, Any] | None = None
        self._past: Any = None
        self._length = 0
        self._tokens: list[list[int]] = []  # per row, the tokens `_past` holds (prefix reuse)
        self._owner: str | None = None  # the adapter that computed `_past`
        self.selected: str | None = None
        self.reused = 0
        self._layers: list[Any] | None = None
        self._hooks: list[Any] = []
        self._calls: list[tuple[Any, Any]] = []

    # ----- adapters
    def forget_layers(self) -> None:
        """The set of LoRA layers changed (an adapter was attached or deleted): find them again. The cache
        goes too: an adapter of the same name may now hold other weights."""
        self._layers = None
        self._past, self._length = None, 0

    def _tuner_layers(self) -> list[Any]:
        """The model's LoRA layers, found once per change of the adapter set (a walk of every module
        costs milliseconds on a 24-layer model; a switch must not)."""
        if self._layers is None:
            from peft.tuners.tuners_utils import BaseTunerLayer

            self._layers = [m for m in self.model.modules() if isinstance(m, BaseTunerLayer)]
        return self._layers

    def select(self, name: str | None) -> bool:
        """PEFT's `set_adapter` also flips requires_grad on every LoRA tensor, which inference does not
        need and which costs milliseconds; this sets only what the forward reads: each LoRA layer's
        active adapter and its disabled flag (the fields set_adapter sets)."""
        self.selected = name
        if not hasattr(getattr(self.model, "base_model", None), "disable_adapter_layers"):
            return name is None  # not PEFT-wrapped yet: only the base exists
        for layer in self._tuner_layers():
            layer._disable_adapters = name is None
            if name is not None:
                layer._active_adapter = [name]
        if name is not None:
            self.model.base_model.active_adapter = name
        return True

    # ----- decoding
    def prefill(self, ids: Any) -> Any:
        from transformers import DynamicCache

        rows = ids.tolist()
        kept = self._reusable(rows)
        if not kept:  # every layer keeps every position, so that it can be cropped back to any prefix (the
            self._past = DynamicCache()  # model's own keeps only the window on sliding layers); masks apply it
        elif kept < self._length:
            self._past.crop(kept - self._length)  # a negative count: drop that many from the end
        self._length, self._tokens, self._owner = kept, [r[:kept] for r in rows], self.selected
        self.reused = kept
        return self._forward(ids[:, kept:])

    def _reusable(self, rows: list[list[int]]) -> int:
        """The longest prefix of every row that the cache holds for the selected adapter, short of the
        prompt's last token (its logits are needed)."""
        if self._past is None or self._owner != self.selected or len(rows) != len(self._tokens):
            return 0
        n, limit = 0, min(len(rows[0]) - 1, self._length)
        while n < limit and all(r[n] == c[n] for r, c in zip(rows, self._tokens, strict=True)):
            n += 1
        return n

    def step(self, tokens: Any) -> Any:
        return self._forward(tokens.view(-1, 1))

    def _forward(self, ids: Any) -> Any:
        import torch

        self._calls.clear()
        past, self._past = self._past, None  # until the forward has written it
        out = self.model(input_ids=ids, past_key_values=past, use_cache=True)
        self._past = out.past_key_values
        self._length += ids.shape[1]
        for row, new in zip(self._tokens, ids.tolist(), strict=True):
            row.extend(new)
        if self._hooks and self._calls:  # per router: (indices, weights) of every position -> [layer, row, k]
            self.routes = (torch.stack([i for i, _ in self._calls]), torch.stack([w for _, w in self._calls]))
        return out.logits[:, -1]

    @property
    def full(self) -> bool:
        return self._length >= self.max_len

    def record(self, on: bool) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks, self.routes = [], None
        if on:
            self._hooks = [r.register_forward_hook(self._hook) for r in router_modules(self.model)]

    def _hook(self, _module: Any, _inputs: Any, output: Any) -> None:
        _logits, scores, indices = output  # GptOssTopKRouter returns (logits, top-k scores, indices)
        self._calls.append((indices.detach(), scores.detach()))

    def release(self) -> None:
        """The cache stays (at most `max_len` tokens of the last conversation) for the next prompt's prefix."""
        self.record(False)
