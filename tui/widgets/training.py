"""The training panel: queued and active runs, progress with ETA, the live loss curve, rates and warnings.

It only displays what the app's poller read from `logs/runs/` (the runs keep going without the app):
what the training GPU does and why (the person's run, a retrain, an experiment, idle time), and for
a preference run its live reward margin and accuracy. Keys (when focused): `n` new specialist,
`e` new experiment, `x` experiments (comparison), `s` stop the selected run, `r` resume it, up/down select.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.message import Message
from textual.widgets import DataTable, ProgressBar, Static

from tui.widgets.loss_chart import LossChart


@dataclass
class RunView:
    summary: dict[str, Any]
    metrics: list[dict[str, Any]] = field(default_factory=list)


def _fmt_eta(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m{s:02d}s"


class TrainingPanel(Vertical):
    BINDINGS = [
        Binding("n", "new", "new specialist"),
        Binding("e", "experiment", "experiment"),
        Binding("x", "experiments", "experiments"),
        Binding("s", "stop", "stop run"),
        Binding("r", "resume", "resume run"),
    ]

    class Action(Message):
        def __init__(self, action: str, run_id: str | None) -> None:
            super().__init__()
            self.action = action
            self.run_id = run_id

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.runs: list[RunView] = []
        self.bands = (0.3, 0.5, 1.0)

    def compose(self) -> ComposeResult:
        yield Static("", id="gpu-work", markup=False)
        table = DataTable(id="runs", cursor_type="row")
        # fixed widths: auto-sized columns re-flow a frame after each refresh (a picture taken then differs)
        for label, width in (("run", 20), ("task", 10), ("profile", 12), ("status", 9), ("step", 7)):
            table.add_column(label, width=width)
        yield table
        yield ProgressBar(id="run-progress", show_eta=False)
        yield Static("", id="run-stats", markup=False)
        yield Static("", id="run-warnings", markup=False)  # above the chart: a short panel never hides it
        yield LossChart(id="loss-chart")

    @property
    def selected(self) -> RunView | None:
        table = self.query_one(DataTable)
        if not self.runs:
            return None
        return self.runs[min(max(table.cursor_row, 0), len(self.runs) - 1)]

    def show(self, runs: list[RunView]) -> None:
        """Runs newest first. Keeps the user's selection by run id."""
        table = self.query_one(DataTable)
        keep = self.selected.summary["id"] if self.selected else None
        self.runs = runs
        table.clear()
        for rv in runs:
            s = rv.summary
            # Text cells: a DataTable reads str cells as markup, and a run's task is whatever its file says
            cells = (s["id"], s["task"], s["profile"], s["status"], f"{s['step']}/{s['total'] or '?'}")
            table.add_row(*(Text(str(c)) for c in cells), key=s["id"])
        ids = [rv.summary["id"] for rv in runs]
        if keep in ids:
            table.move_cursor(row=ids.index(keep))
        self._detail()

    def show_work(self, text: str) -> None:
        """What the training GPU does now and why (the idle scheduler's last word)."""
        self.query_one("#gpu-work", Static).update(text)

    def on_data_table_row_highlighted(self, _event: DataTable.RowHighlighted) -> None:
        self._detail()

    def _detail(self) -> None:
        rv = self.selected
        bar = self.query_one(ProgressBar)
        stats = self.query_one("#run-stats", Static)
        warnings = self.query_one("#run-warnings", Static)
        chart = self.query_one(LossChart)
        if rv is None:
            bar.update(total=1, progress=0)
            stats.update("No training runs. Press n to train a new specialist.")
            warnings.update("")
            chart.plot([], [], 1, self.bands)
            return
        s = rv.summary
        bar.update(total=max(s["total"], 1), progress=s["step"])
        last = next((m for m in reversed(rv.metrics) if "loss" in m), {})
        last_any = rv.metrics[-1] if rv.metrics else {}
        evals = [m for m in rv.metrics if "eval_loss" in m]
        parts = [f"{s['status']} · step {s['step']}/{s['total'] or '?'} · ETA {_fmt_eta(last_any.get('eta_s'))}"
                 + (f" · {s['why']}" if s.get("why") else "")]
        if last:
            lr = last.get("learning_rate")
            parts.append(f"loss {last['loss']:.3f}" + (f" · eval {evals[-1]['eval_loss']:.3f}" if evals else "")
                         + (f" · lr {lr:.2e}" if lr is not None else "")
                         + (f" · grad {last['grad_norm']:.2f}" if last.get("grad_norm") is not None else ""))
            parts.append(f"{last.get('tokens_per_s', 0):.0f} tok/s · {last.get('samples_per_s', 0):.2f} samples/s"
                         + (f" · {last['gpu_mem_gb']:.1f} GB" if last.get("gpu_mem_gb") else ""))
        prefs = [m for m in rv.metrics if "margin" in m]
        if prefs:  # a preference run: how far it prefers the chosen replies, live
            parts.append(f"reward margin {prefs[-1]['margin']:+.3f} · accuracy {prefs[-1].get('accuracy', 0):.2f}")
        if s.get("outcome") or s.get("error"):
            parts.append(s.get("outcome") or f"error: {s['error']}")
        stats.update("\n".join(parts))
        chart.plot([(m["step"], m["loss"]) for m in rv.metrics if "loss" in m],
                   [(m["step"], m["eval_loss"]) for m in evals], s["total"] or 1, self.bands)
        # each warning names its step: its loss is that step's, not the latest one shown above
        warns = [f"⚠ step {m.get('step', '?')}: {m['warning']}" for m in rv.metrics if m.get("warning")]
        warnings.update("\n".join(warns[-2:]))

    def action_new(self) -> None:
        self.post_message(self.Action("new", None))

    def action_experiment(self) -> None:
        self.post_message(self.Action("experiment", None))

    def action_experiments(self) -> None:
        self.post_message(self.Action("experiments", None))

    def action_stop(self) -> None:
        if self.selected:
            self.post_message(self.Action("stop", self.selected.summary["id"]))

    def action_resume(self) -> None:
        if self.selected:
            self.post_message(self.Action("resume", self.selected.summary["id"]))
