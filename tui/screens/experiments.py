"""Experiments from the training panel: a form to start one, and the comparison of its variants.

The form takes what `tandem experiment` takes (task, `r=8,16 lr=1e-4,2e-4`, data, profile, now or when
the GPU idles) and returns it through `dismiss`; the app calls the engine. The comparison shows each
variant's held-out loss (the promotion gate's, on the same rows for all), time and peak memory, their
loss curves overlaid on one scale, and what the experiment found.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Any

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.widgets import Button, Checkbox, DataTable, Input, Label, Select, Static

from engine import names
from tui.screens.forms import Dismissable, start_or_cancel
from tui.widgets.loss_chart import SERIES_STYLES, LossChart


@dataclass
class NewExperiment:
    task: str
    vary: list[str]
    data: list[str]
    profile: str
    when_idle: bool


class NewExperimentScreen(Dismissable):
    BINDINGS = [Binding("ctrl+s", "start", "start")]

    def __init__(self, profiles: list[str], default_profile: str) -> None:
        super().__init__()
        self.profiles, self.default_profile = profiles, default_profile

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label("New experiment: variants of a specialist, the best promoted through the gate")
            yield Input(placeholder="task name, e.g. math", id="exp-task")
            yield Input(placeholder="vary, e.g. r=8,16 lr=1e-4,2e-4 steps=100,200", id="exp-vary")
            yield Input(placeholder="data paths, space-separated (empty: the task's learned examples)",
                        id="exp-data")
            yield Select([(Text(p), p) for p in self.profiles], value=self.default_profile, allow_blank=False,
                         id="exp-profile")
            yield Checkbox("when the training GPU idles (else: now, behind your runs)", id="exp-idle")
            yield from start_or_cancel()

    @on(Input.Submitted)
    @on(Button.Pressed, "#start")
    def action_start(self) -> None:
        task = self.query_one("#exp-task", Input).value.strip()
        vary = self.query_one("#exp-vary", Input).value.split()
        try:
            names.check(task, "task name")
            data = shlex.split(self.query_one("#exp-data", Input).value)
        except (names.InvalidName, ValueError) as e:  # ValueError: an unclosed quote
            self.query_one("#run-error", Static).update(Text(str(e), style="red"))
            return
        if not vary and len(data) < 2:
            self.query_one("#run-error", Static).update(Text("vary something (r=8,16) or give two data paths",
                                                             style="red"))
            return
        self.dismiss(NewExperiment(task, vary, data, str(self.query_one("#exp-profile", Select).value),
                                   self.query_one("#exp-idle", Checkbox).value))

    @on(Button.Pressed, "#cancel")
    def _cancel(self) -> None:
        self.dismiss(None)


def _num(value: Any, fmt: str, unit: str = "") -> str:
    return format(value, fmt) + unit if value is not None else "-"


class ExperimentsScreen(Dismissable):
    """Experiments newest first; the highlighted one's variants compared below."""

    def __init__(self, experiments: list[tuple[Any, list[dict[str, Any]]]], bands: tuple[float, float, float]):
        super().__init__()
        self.experiments, self.bands = experiments, bands

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="experiments-dialog"):
            yield Label("Experiments")
            yield DataTable(id="exp-list", cursor_type="row")
            yield DataTable(id="exp-table", cursor_type="none")
            yield LossChart(id="exp-chart")
            yield Static("", id="exp-outcome", markup=False)
            yield Static("Up/Down choose · Esc closes", classes="hint")

    def on_mount(self) -> None:
        exps = self.query_one("#exp-list", DataTable)
        exps.add_columns("experiment", "task", "status", "variants")
        for e, _ in self.experiments:
            exps.add_row(*(Text(str(c)) for c in (e.id, e.task, e.status, len(e.variants))))
        self.query_one("#exp-table", DataTable).add_columns(" ", "variant", "status", "held-out", "current", "time",
                                                           "peak mem")
        self._show(0)

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.data_table.id == "exp-list":
            self._show(event.cursor_row)

    def _show(self, index: int) -> None:
        table = self.query_one("#exp-table", DataTable)
        table.clear()
        outcome = self.query_one("#exp-outcome", Static)
        if not self.experiments:
            outcome.update("No experiments yet. Press e in the training panel to start one.")
            return
        exp, rows = self.experiments[min(max(index, 0), len(self.experiments) - 1)]
        for i, r in enumerate(rows):
            mark, style = SERIES_STYLES[i % len(SERIES_STYLES)]
            label = r["label"] + (" ★" if r["label"] == exp.best else "")
            table.add_row(Text(mark, style=style), Text(label), Text(r["status"]),
                          _num(r["heldout_loss"], ".4f"), _num(r["current_loss"], ".4f"),
                          _num(r["seconds"], ".0f", " s"), _num(r["peak_mem_gb"], ".2f", " GB"))
        total = max((s for r in rows for s, _ in r["curve"]), default=1)
        self.query_one("#exp-chart", LossChart).overlay([r["curve"] for r in rows], total, self.bands)
        outcome.update(exp.outcome or f"{exp.status}: variants are training or waiting for the GPU")
