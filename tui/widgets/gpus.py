"""GPU panels: one card per GPU with its role, load, memory, heat, power, clocks, processes and history.

With no NVIDIA GPU or driver the panel says so and shows the CPU and RAM instead. The data comes from
`engine.telemetry` snapshots that the app polls in a worker; this widget never calls NVML.
"""

from __future__ import annotations

from collections import deque

from rich.markup import escape
from textual.app import ComposeResult
from textual.containers import Vertical, VerticalScroll
from textual.widgets import Sparkline, Static

from engine.telemetry import GpuSnapshot, Snapshot
from engine.text import line

HISTORY = 60


def _v(x: float | None, fmt: str = "{:.0f}", unit: str = "") -> str:
    return "n/a" if x is None else fmt.format(x) + unit


def _bar(frac: float | None, width: int = 12) -> str:
    if frac is None:
        return "·" * width
    filled = round(max(0.0, min(1.0, frac)) * width)
    return "█" * filled + "░" * (width - filled)


def _mem_frac(g: GpuSnapshot) -> float | None:
    return g.memory_used_mb / g.memory_total_mb if g.memory_used_mb is not None and g.memory_total_mb else None


class GpuCard(Vertical):
    def __init__(self, index: int) -> None:
        super().__init__(classes="gpu-card", id=f"gpu-{index}")
        self.index = index
        self.util: deque[float] = deque([0.0] * HISTORY, maxlen=HISTORY)
        self.mem: deque[float] = deque([0.0] * HISTORY, maxlen=HISTORY)
        self._last: tuple[GpuSnapshot, str] | None = None

    def compose(self) -> ComposeResult:
        yield Static("", classes="gpu-text")
        yield Sparkline(list(self.util), classes="util-history")
        yield Sparkline(list(self.mem), classes="mem-history")

    def show(self, g: GpuSnapshot, role: str) -> None:
        self._last = (g, role)
        self.util.append(g.utilization or 0.0)
        self.mem.append((_mem_frac(g) or 0.0) * 100)
        if self.is_mounted and self.children:
            self._draw()

    def on_mount(self) -> None:
        if self._last:
            self._draw()

    def relabel(self, role: str) -> None:
        """A new role line without a new reading (the chat model finished loading)."""
        if self._last:
            self._last = (self._last[0], role)
            if self.is_mounted and self.children:
                self._draw()

    def _draw(self) -> None:
        g, role = self._last
        mem_frac = _mem_frac(g)
        power = f"{_v(g.power_w)}/{_v(g.power_limit_w)} W"
        lines = [
            f"[b]GPU {g.index}[/b] · {escape(line(g.name))} · [b]{escape(role)}[/b]",
            f"util {_bar(g.utilization / 100 if g.utilization is not None else None)} {_v(g.utilization, unit='%')}",
            f"mem  {_bar(mem_frac)} {_v(g.memory_used_mb and g.memory_used_mb / 1024, '{:.1f}')}"
            f"/{_v(g.memory_total_mb and g.memory_total_mb / 1024, '{:.1f}')} GB",
            f"{_v(g.temperature_c, unit='°C')} · {power} · fan {_v(g.fan_percent, unit='%')} · "
            f"SM {_v(g.sm_clock_mhz)} MHz · mem {_v(g.mem_clock_mhz)} MHz",
        ]
        for p in g.processes[:4]:
            lines.append(f"  {p.pid:>7} {_v(p.memory_mb, unit=' MB'):>9}  {escape(line(p.name)[:40])}")
        if not g.processes:
            lines.append("  no processes")
        self.query_one(".gpu-text", Static).update("\n".join(lines))
        self.query_one(".util-history", Sparkline).data = list(self.util)
        self.query_one(".mem-history", Sparkline).data = list(self.mem)


class GpuPanel(VerticalScroll):
    def __init__(self, inference_gpu: int, training_gpu: int, **kw) -> None:
        super().__init__(**kw)
        self.inference_gpu, self.training_gpu = inference_gpu, training_gpu
        self.serving = ""  # how the chat model is held on the inference GPU, once it is loaded (set_serving)
        self.cards: dict[int, GpuCard] = {}

    def compose(self) -> ComposeResult:
        yield Static("reading GPUs…", id="gpu-note", markup=False)

    def set_serving(self, text: str) -> None:
        self.serving = text
        for index, card in self.cards.items():
            card.relabel(self.role(index))

    def role(self, index: int) -> str:
        chat = f"inference ({self.serving})" if self.serving else "inference"
        roles = [r for r, i in ((chat, self.inference_gpu), ("training", self.training_gpu)) if i == index]
        return " + ".join(roles) or "idle"

    def show(self, snap: Snapshot) -> None:
        note = self.query_one("#gpu-note", Static)
        if not snap.gpus:
            h = snap.host
            note.update(f"No NVIDIA GPU here: {line(snap.note)}.\nThe model runs on the CPU.\n\n"
                        f"CPU {_bar(h.cpu_percent / 100)} {h.cpu_percent:.0f}%\n"
                        f"RAM {_bar(h.ram_used_gb / h.ram_total_gb)} {h.ram_used_gb:.1f}/{h.ram_total_gb:.1f} GB")
            return
        note.display = False
        for g in snap.gpus:
            if g.index not in self.cards:
                self.cards[g.index] = GpuCard(g.index)
                self.mount(self.cards[g.index])
            self.cards[g.index].show(g, self.role(g.index))
