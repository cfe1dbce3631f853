"""Which experts each token went to: recorded from GPT-OSS's routers during generation.

The decoder reports each forward's top-k indices and weights per layer (the fast decoder as outputs of
its graphs, the reference one from hooks on the routers); they stay on the device (no sync per token)
and are copied to the CPU once, when the reply ends. That keeps recording cheap enough to
leave on. Token i of a reply is routed when it is fed back as input, so the last generated token (the
end-of-turn mark) has no routing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class ExpertTrace:
    num_layers: int
    num_experts: int
    top_k: int
    prompt_tokens: int
    indices: list[list[list[int]]]  # [reply token][layer][k]
    weights: list[list[list[float]]]  # same shape, the router's softmax over the chosen k

    def usage(self) -> list[list[float]]:
        """[layer][expert]: share of reply tokens routed to that expert (each row sums to top_k)."""
        n = max(len(self.indices), 1)
        grid = [[0.0] * self.num_experts for _ in range(self.num_layers)]
        for token in self.indices:
            for layer, chosen in enumerate(token):
                for e in chosen:
                    grid[layer][e] += 1 / n
        return grid

    def as_dict(self) -> dict[str, Any]:
        return {"num_layers": self.num_layers, "num_experts": self.num_experts, "top_k": self.top_k,
                "prompt_tokens": self.prompt_tokens, "indices": self.indices, "weights": self.weights,
                "usage": self.usage()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExpertTrace:
        return cls(d["num_layers"], d["num_experts"], d["top_k"], d["prompt_tokens"], d["indices"], d["weights"])


def usage_shift(a: ExpertTrace, b: ExpertTrace) -> list[list[float]]:
    """[layer][expert]: how much traffic share b gained (+) or lost (-) against a."""
    ua, ub = a.usage(), b.usage()
    return [[y - x for x, y in zip(ra, rb, strict=True)] for ra, rb in zip(ua, ub, strict=True)]


def router_modules(model: Any) -> list[Any]:
    """The per-layer routers, in layer order (works through PEFT wrappers)."""
    found = [(name, m) for name, m in model.named_modules() if name.endswith("mlp.router")]

    def layer_of(name: str) -> int:
        parts = name.split(".")
        return int(parts[parts.index("layers") + 1])

    return [m for _, m in sorted(found, key=lambda nm: layer_of(nm[0]))]


class ExpertRecorder:
    """Collects each forward's routing, as the decoder reports it ([layer, row, k] indices and
    weights, kept on the device), until the reply ends."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.steps: list[tuple[Any, Any]] = []

    def add_step(self, indices: Any, weights: Any) -> None:
        """One forward's routing; only its last row is kept (copied: decoders reuse their buffers)."""
        self.steps.append((indices[:, -1].clone(), weights[:, -1].clone()))

    def finish(self, prompt_tokens: int) -> ExpertTrace | None:
        """The trace of the reply, copied to the CPU in one transfer."""
        import torch

        if len(self.steps) < 2:
            return None
        # step 0 is the prompt; step s routes reply token s-1
        indices = torch.stack([i for i, _ in self.steps[1:]])
        weights = [[[round(x, 4) for x in layer] for layer in step]
                   for step in torch.stack([w for _, w in self.steps[1:]]).float().tolist()]
        return ExpertTrace(indices.shape[1], self.num_experts, indices.shape[2], prompt_tokens, indices.tolist(),
                           weights)
