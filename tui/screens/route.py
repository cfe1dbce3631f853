"""Why this route: the router's explanation of one reply, with keys to correct it.

The app pushes it with the prompt, the reply's decision (`Decision.as_dict()`) and the specialists'
names. A key dismisses it with a `RouteCorrection` (Esc with None); the app hands that to the engine,
which keeps it as a router example at once: the next prompt is routed with it, no LoRA retraining.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.widgets import Label, Static

from tui.screens.forms import Dismissable

NONE = "none"


@dataclass(frozen=True)
class RouteCorrection:
    prompt: str
    label: str  # a specialist name, or "none" (the base model should answer)


def explanation(decision: dict[str, Any]) -> list[str]:
    """The decision as lines: choice and why, top score and runner-up, the most similar example."""
    d = decision
    lines = [f"answered by {d.get('choice', 'base')} · {d.get('reason', '')}"]
    if d.get("top"):
        line = f"top {d['top']} {d.get('confidence', 0.0):.2f}"
        if d.get("runner_up"):
            line += f" · runner-up {d['runner_up']} {d.get('runner_up_score', 0.0):.2f}"
        lines.append(line)
    if d.get("nearest"):
        lines.append(f"most similar example ({d.get('nearest_label', '')}, "
                     f"{d.get('nearest_similarity', 0.0):.2f}): {d['nearest']}")
    return lines


class RouteScreen(Dismissable):
    BINDINGS = [Binding("n", "correct(0)", "should be none"),
                *(Binding(str(i), f"correct({i})", "should be this specialist", show=False) for i in range(1, 10))]

    def __init__(self, prompt: str, decision: dict[str, Any], specialists: list[str]) -> None:
        super().__init__()
        self.prompt, self.decision = prompt, decision
        self.specialists = list(specialists)[:9]

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="route"):
            yield Label(f"Why this route · {self.prompt[:70]}", markup=False)
            for text in explanation(self.decision):
                yield Static(text, markup=False, classes="route-line")
            keys = " · ".join(f"{i} {name}" for i, name in enumerate(self.specialists, 1))
            yield Static(f"It should have gone to: {keys + ' · ' if keys else ''}n none (base) · Esc close",
                         markup=False, classes="hint", id="route-hint")

    def action_correct(self, index: int) -> None:
        """0 is none; 1-9 pick a specialist in the order shown."""
        if index == 0:
            self.dismiss(RouteCorrection(self.prompt, NONE))
        elif index <= len(self.specialists):
            self.dismiss(RouteCorrection(self.prompt, self.specialists[index - 1]))
