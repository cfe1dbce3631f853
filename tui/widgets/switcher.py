"""The specialist switcher: adapters with task, size, loss and residency, and the router mode.

Keys (when focused): Enter pins the highlighted adapter, `b` base, `a` auto (router), 1-9 pin the
first nine. The choice applies to the next prompt; the panel confirms it in place.
"""

from __future__ import annotations

from dataclasses import dataclass

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.message import Message
from textual.widgets import DataTable, Static


@dataclass
class AdapterRow:
    name: str
    task: str
    size_mb: float
    final_loss: float | None
    resident: bool
    active: bool


class SpecialistSwitcher(Vertical):
    BINDINGS = [
        Binding("b", "mode('base')", "base"),
        Binding("a", "mode('auto')", "auto"),
        Binding("u", "rollback", "roll back"),
        *[Binding(str(i), f"number({i})", f"pin #{i}", show=False) for i in range(1, 10)],
    ]

    class RollbackRequested(Message):
        def __init__(self, name: str) -> None:
            super().__init__()
            self.name = name

    class ModeChosen(Message):
        def __init__(self, mode: str) -> None:
            super().__init__()
            self.mode = mode

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.rows: list[AdapterRow] = []
        self.mode = "auto"
        self.broken: list[tuple[str, str]] = []

    def compose(self) -> ComposeResult:
        yield Static("", id="switcher-mode", markup=False)
        table = DataTable(id="adapters", cursor_type="row", zebra_stripes=True)
        # fixed widths: auto-sized columns re-flow a frame after each refresh, so the table would jump
        for label, width in (("#", 1), ("specialist", 16), ("task", 10), ("MB", 6), ("loss", 6), ("where", 5)):
            table.add_column(label, width=width)
        yield table
        yield Static("", id="switcher-note", markup=False)

    def show(self, rows: list[AdapterRow], mode: str, broken: list[tuple[str, str]] | None = None,
             note: str = "", gpu: bool = True) -> None:
        """`gpu`: the model runs on a GPU; else a loaded adapter is said to be in RAM, not on a GPU."""
        self.rows, self.mode, self.broken = rows, mode, broken or []
        table = self.query_one(DataTable)
        cursor = table.cursor_row
        table.clear()
        for i, r in enumerate(rows, start=1):
            loss = f"{r.final_loss:.3f}" if r.final_loss is not None else "-"
            loaded = "GPU" if gpu else "RAM"
            where = f"{loaded}*" if r.active else loaded if r.resident else "disk"
            mark = "▶ " if r.name == mode else ""
            # Text cells: a DataTable reads str cells as markup, and names on disk may predate the name rule
            cells = (str(i) if i < 10 else "", mark + r.name, r.task, f"{r.size_mb:.1f}", loss, where)
            table.add_row(*(Text(c) for c in cells), key=r.name)
        if rows:
            # no scroll: a refresh must not slide a too-wide table sideways under the user
            table.move_cursor(row=min(cursor, len(rows) - 1), scroll=False)
        label = {"auto": "auto · router picks per prompt", "base": "base · adapters off"}.get(mode, f"pinned · {mode}")
        self.query_one("#switcher-mode", Static).update(f"mode: {label}")
        lines = [note] if note else []
        if not rows:
            lines.append("No specialists yet: train one in the Training panel (n).")
        lines += [f"skipped {name}: {why}" for name, why in self.broken]
        self.query_one("#switcher-note", Static).update("\n".join(lines))

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        """Enter on a row pins that adapter."""
        event.stop()
        if self.rows and 0 <= event.cursor_row < len(self.rows):
            self.post_message(self.ModeChosen(self.rows[event.cursor_row].name))

    def action_rollback(self) -> None:
        row = self.query_one(DataTable).cursor_row
        if self.rows and 0 <= row < len(self.rows):
            self.post_message(self.RollbackRequested(self.rows[row].name))

    def action_mode(self, mode: str) -> None:
        self.post_message(self.ModeChosen(mode))

    def action_number(self, n: int) -> None:
        if n <= len(self.rows):
            self.post_message(self.ModeChosen(self.rows[n - 1].name))
