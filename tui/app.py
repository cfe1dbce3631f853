"""Tandem's Textual app: chat, specialist switcher, training and GPU panels over one engine.

The app owns no model state: it maps its messages to `engine.service.Workstation` (the engine, run
queue, adapter store, history and learner) from thread workers and shows what comes back. Slow things
never run on the event loop: the model load, every reply, NVML polls and reading training runs all
happen in workers that hand results back with messages or `call_from_thread`.
"""

from __future__ import annotations

import contextlib
import gc
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.reactive import reactive
from textual.widgets import Footer, Header, Static

from engine import settings as st
from engine.service import Workstation
from engine.telemetry import Telemetry
from tui.screens.experiments import ExperimentsScreen, NewExperiment, NewExperimentScreen
from tui.screens.experts import ExpertsScreen
from tui.screens.forms import (
    Feedback,
    FeedbackScreen,
    HelpScreen,
    LogScreen,
    NewRun,
    NewRunScreen,
    SettingsScreen,
)
from tui.screens.review import CompareScreen, ReportScreen
from tui.screens.route import RouteCorrection, RouteScreen
from tui.widgets.chat import ChatPanel, ReplyMeta
from tui.widgets.gpus import GpuPanel
from tui.widgets.switcher import AdapterRow, SpecialistSwitcher
from tui.widgets.training import RunView, TrainingPanel

PANELS = ("chat", "specialists", "training", "gpus")
NARROW_BELOW = 120  # columns; below this the panels become tabs
PRESETS = {"precise": (0.0, 1.0), "balanced": (0.7, 0.95), "creative": (1.0, 1.0)}  # temperature 0: greedy
REASONING = ("low", "medium", "high")
FLUSH_S = 0.05  # streamed text reaches the screen in batches at most this old
IDLE_TICK_S = 30.0  # how often the idle scheduler may look for work for the training GPU


class EngineProgress(Message):
    def __init__(self, text: str, fraction: float) -> None:
        super().__init__()
        self.text, self.fraction = text, fraction


class EngineReady(Message):
    pass


class EngineFailed(Message):
    def __init__(self, error: str) -> None:
        super().__init__()
        self.error = error


class EngineLog(Message):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text


class TandemApp(App):
    TITLE = "Tandem"
    CSS_PATH = "app.tcss"
    BINDINGS = [
        Binding("f1", "help", "help"),
        Binding("f2", "view('chat')", "chat"),
        Binding("f3", "view('specialists')", "specialists"),
        Binding("f4", "view('training')", "training"),
        Binding("f5", "view('gpus')", "GPUs"),
        Binding("escape", "stop_reply", "stop reply", show=False),
        Binding("ctrl+n", "new_conversation", "new chat"),
        Binding("ctrl+r", "cycle_reasoning", "reasoning"),
        Binding("ctrl+g", "cycle_preset", "preset", show=False),
        Binding("ctrl+t", "toggle_analysis", "show reasoning", show=False),
        Binding("ctrl+f", "feedback", "feedback"),
        Binding("ctrl+o", "settings", "settings", show=False),
        Binding("ctrl+l", "show_log", "log", show=False),
        Binding("f6", "experts", "experts"),
        Binding("f7", "compare", "A/B"),
        Binding("f8", "report", "report", show=False),
        Binding("f9", "why_route", "why this route", show=False),
        Binding("f10", "toggle_api", "API server", show=False),
    ]

    view: reactive[str] = reactive("chat")
    reasoning: reactive[str] = reactive("low")
    preset: reactive[str] = reactive("balanced")

    def __init__(self, settings: st.Settings, telemetry: Telemetry | None = None, poll_s: float = 1.0,
                 engine_factory: Any = None) -> None:
        super().__init__()
        self.settings = settings
        self.telemetry = telemetry
        self.poll_s = poll_s
        self.service = Workstation(settings, **({"engine_factory": engine_factory} if engine_factory else {}))
        self.conversation = self.service.new_conversation()
        self.pending: deque[str] = deque()
        self.cancel: threading.Event | None = None
        self.generating = False
        self.log_lines: list[str] = []
        self.reasoning = settings.chat.reasoning
        self.load_error = ""
        self._progress_at, self._progress_line = -1.0, -1  # the last load step logged, and where its line is
        self.polls = {"gpus": 0, "runs": 0}  # results shown so far, per poller (tests wait on these)
        self._idle_at = -IDLE_TICK_S  # when the idle scheduler last ticked (monotonic)

    def notify(self, message: str, *, title: str = "", severity: Any = "information", timeout: float | None = None,
               markup: bool = False) -> None:
        """Notifications carry names, errors and model text: shown as text, never parsed as markup."""
        super().notify(message, title=title, severity=severity, timeout=timeout, markup=markup)

    def _ui(self, fn: Any, *args: Any, **kwargs: Any) -> None:
        """call_from_thread for workers, quiet when the app has already shut down (a poll finishing
        while the user quits must not turn into an error)."""
        if not self.is_running:
            return
        with contextlib.suppress(RuntimeError):
            self.call_from_thread(fn, *args, **kwargs)

    # ----- layout
    def compose(self) -> ComposeResult:
        yield Header(show_clock=False)
        yield Static("", id="tabs")
        with Horizontal(id="main"):
            yield ChatPanel(id="chat")
            with Vertical(id="side"):
                yield SpecialistSwitcher(id="specialists")
                yield TrainingPanel(id="training")
                yield GpuPanel(self.settings.gpus.inference, self.settings.gpus.training, id="gpus")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = "loading model…"
        for panel, title in zip(PANELS, ("Chat", "Specialists", "Training", "GPUs"), strict=True):
            self.query_one(f"#{panel}").border_title = title
        self._layout(self.size.width)
        self.query_one(ChatPanel).set_status("Loading the model in the background; you can type already.")
        self.query_one(SpecialistSwitcher).show([], self.settings.adapters.mode, note="waiting for the model…")
        self.load_engine()
        self.poll_gpus()
        self.poll_runs()
        self.set_interval(self.poll_s, self.poll_gpus)
        self.set_interval(self.poll_s, self.poll_runs)
        self.query_one("#prompt").focus()

    def on_resize(self, event) -> None:
        self._layout(event.size.width)

    def _layout(self, width: int) -> None:
        self.set_class(width < NARROW_BELOW, "-narrow")
        self._show_view()

    def _show_view(self) -> None:
        narrow = self.has_class("-narrow")
        for panel in PANELS:
            self.query_one(f"#{panel}").set_class(narrow and panel != self.view, "-hidden")
        self.query_one("#side").set_class(narrow and self.view == "chat", "-hidden")
        self.query_one("#chat").set_class(narrow and self.view != "chat", "-hidden")
        tabs = "  ".join(f"[reverse] F{i + 2} {p} [/reverse]" if p == self.view else f"F{i + 2} {p}"
                         for i, p in enumerate(PANELS))
        self.query_one("#tabs", Static).update(tabs)

    def watch_view(self, _old: str, _new: str) -> None:
        if self.is_mounted:
            self._show_view()

    def action_view(self, panel: str) -> None:
        self.view = panel
        target = {"chat": "#prompt", "specialists": "#adapters", "training": "#runs", "gpus": "#gpus"}[panel]
        self.query_one(target).focus()

    # ----- engine lifecycle
    @work(thread=True, exclusive=True, group="engine")
    def load_engine(self) -> None:
        try:
            self.service.load(lambda text, frac: self.post_message(EngineProgress(text, frac)),
                              lambda text: self.post_message(EngineLog(text)),
                              lambda _changes: self._ui(self.refresh_switcher))
        except Exception as e:  # a model that fails to load must not take the app down
            self.post_message(EngineFailed(f"{type(e).__name__}: {e}"))
            return
        self.post_message(EngineReady())

    @on(EngineProgress)
    def _engine_progress(self, m: EngineProgress) -> None:
        self.sub_title = f"{m.text} ({m.fraction:.0%})"
        if (self._progress_at, len(self.log_lines)) == (m.fraction, self._progress_line):
            self.log_lines.pop()  # the same step repeating its countdown: keep its latest line only
        self._remember_log(m.text)
        self._progress_at, self._progress_line = m.fraction, len(self.log_lines)

    @on(EngineLog)
    def _engine_log(self, m: EngineLog) -> None:
        self._remember_log(m.text)

    @on(EngineFailed)
    def _engine_failed(self, m: EngineFailed) -> None:
        self.load_error = m.error
        self.sub_title = "model failed to load"
        self._remember_log(f"model failed to load: {m.error}")
        self.query_one(ChatPanel).show_error("Model failed to load:", f"{m.error}\nFix settings (Ctrl+O).")
        self.notify(m.error, title="model failed to load", severity="error", timeout=15)

    @on(EngineReady)
    def _engine_ready(self) -> None:
        if not self.is_running or not self.screen.query(ChatPanel):
            return  # the app quit while the model loaded
        # The model, tokenizer and libraries are hundreds of thousands of long-lived objects; a full
        # garbage collection walking them stalls the event loop for tenths of a second. Freeze them.
        gc.collect()
        gc.freeze()
        info = self.service.model_info()
        self.sub_title = info.line()
        decoder = "fast" if info.decoder == "fast" else "reference"
        self.query_one(GpuPanel).set_serving(f"{info.precision}, {decoder} decoder")
        self._remember_log(f"model ready in {info.load_seconds:.1f} s: {info.name} on {info.device}, "
                           f"{info.precision}, decoder: {info.decoder}")
        self.refresh_switcher()
        self._status()
        if self.pending:
            self.ask(self.pending.popleft())

    def _remember_log(self, text: str) -> None:
        self.log_lines.append(f"{time.strftime('%H:%M:%S')} {text}")

    def _status(self, extra: str = "") -> None:
        parts = [f"mode {self.service.mode}", f"reasoning {self.reasoning}", f"preset {self.preset}"]
        if self.pending:
            parts.append(f"{len(self.pending)} prompt(s) waiting for the model")
        if extra:
            parts.append(extra)
        self.query_one(ChatPanel).set_status(" · ".join(parts))

    # ----- chat
    @on(ChatPanel.Submitted)
    def _submitted(self, m: ChatPanel.Submitted) -> None:
        chat = self.query_one(ChatPanel)
        chat.add_user(m.prompt)
        if not self.service.ready or self.generating:
            self.pending.append(m.prompt)
            self._status("waiting for the model" if not self.service.ready else "queued after the current reply")
            return
        self.ask(m.prompt)

    def ask(self, prompt: str) -> None:
        self.generating = True
        self.cancel = threading.Event()
        reply = self.query_one(ChatPanel).start_reply(prompt)
        self._status("generating… (Esc stops)")
        self.run_reply(prompt, reply, self.cancel)

    @work(thread=True, group="chat")
    def run_reply(self, prompt: str, reply: Any, cancel: threading.Event) -> None:
        from engine.serve.chat import Delta, Finished, Routed

        temperature, top_p = PRESETS[self.preset]
        sampling = self.service.sampling(temperature=temperature, top_p=top_p)
        pieces: list[tuple[str, str]] = []
        last = time.monotonic()
        meta = ReplyMeta()
        try:
            for ev in self.service.ask(self.conversation, prompt, reasoning=self.reasoning, sampling=sampling,
                                      cancel=cancel):
                if isinstance(ev, Routed):
                    d = ev.decision
                    meta = ReplyMeta(ev.adapter, d.reason, d.confidence, dropped=ev.dropped, runner_up=d.runner_up,
                                     runner_up_score=d.runner_up_score)
                    reply.turn_id, reply.decision = ev.turn_id, d.as_dict()
                    self._ui(reply.set_meta, meta)
                elif isinstance(ev, Delta):
                    pieces.append((ev.channel, ev.text))
                    if time.monotonic() - last > FLUSH_S:
                        self._ui(self._flush_reply, reply, pieces)
                        pieces, last = [], time.monotonic()
                elif isinstance(ev, Finished):
                    s = ev.reply.stats
                    meta.ttft_s, meta.tokens_per_s, meta.tokens_out, meta.stop = (
                        s.ttft_s, s.tokens_per_s, s.tokens_out, s.stop)
                    self._ui(self._flush_reply, reply, pieces)
                    self._ui(reply.set_meta, meta)
                    reply.experts = ev.reply.experts
                    reply.tokens = ev.reply.token_texts
        except Exception as e:  # e.g. a prompt that cannot fit the context: say so, give the text back
            self._ui(self.notify, str(e).splitlines()[0] if str(e) else type(e).__name__, title="reply failed",
                     severity="error")
            self.post_message(EngineLog(f"reply failed: {type(e).__name__}: {e}"))
            self._ui(self.query_one(ChatPanel).restore_prompt, prompt)
        finally:
            self._ui(self._reply_done)

    def _flush_reply(self, reply: Any, pieces: list[tuple[str, str]]) -> None:
        if pieces:
            reply.add(pieces)
            self.query_one(ChatPanel).follow()

    def _reply_done(self) -> None:
        self.generating = False
        self.cancel = None
        self._status()
        if self.pending and self.service.ready:
            self.ask(self.pending.popleft())

    def action_stop_reply(self) -> None:
        if self.cancel is not None:
            self.cancel.set()

    def action_new_conversation(self) -> None:
        self.action_stop_reply()
        self.conversation = self.service.new_conversation()
        self.query_one(ChatPanel).clear()
        self._status("new conversation")

    def action_cycle_reasoning(self) -> None:
        self.reasoning = REASONING[(REASONING.index(self.reasoning) + 1) % len(REASONING)]
        self._status()

    def action_cycle_preset(self) -> None:
        names = list(PRESETS)
        self.preset = names[(names.index(self.preset) + 1) % len(names)]
        self._status()

    def action_toggle_analysis(self) -> None:
        chat = self.query_one(ChatPanel)
        chat.show_analysis = not chat.show_analysis

    # ----- specialists
    def refresh_switcher(self) -> None:
        if not self.service.ready or not self.is_running:
            return
        rows = [AdapterRow(r.name, r.task, r.size_mb, r.final_loss, r.resident, r.active)
                for r in self.service.adapters()]
        self.query_one(SpecialistSwitcher).show(rows, self.service.mode, self.service.broken_adapters())

    @on(SpecialistSwitcher.ModeChosen)
    def _mode(self, m: SpecialistSwitcher.ModeChosen) -> None:
        try:
            self.service.set_mode(m.mode)
        except Exception as e:
            self.notify(str(e), severity="error")
            return
        self.refresh_switcher()
        self._status()
        self.notify(f"next prompt: {m.mode}", title="specialist", timeout=3)

    @on(SpecialistSwitcher.RollbackRequested)
    def _rollback(self, m: SpecialistSwitcher.RollbackRequested) -> None:
        try:
            self.service.rollback(m.name)
        except Exception as e:
            self.notify(str(e), severity="warning")
            return
        self.notify(f"{m.name} rolled back to its previous version", title="specialist")

    def action_why_route(self) -> None:
        reply = self.query_one(ChatPanel).last_reply
        if reply is None or not reply.decision:
            self.notify("no routed reply yet", severity="warning")
            return
        names = [r.name for r in self.service.adapters()]
        self.push_screen(RouteScreen(reply.prompt, reply.decision, names), self._route_corrected)

    def _route_corrected(self, correction: RouteCorrection | None) -> None:
        if correction is not None:
            self.correct_route(correction)

    @work(thread=True, group="route")
    def correct_route(self, c: RouteCorrection) -> None:
        """The correction becomes a router example at once; the next prompt is routed with it."""
        try:
            self.service.correct_route(c.prompt, c.label)
        except Exception as e:
            self._ui(self.notify, str(e), title="route not corrected", severity="error")
            return
        self._ui(self.notify, f"noted: prompts like this go to {c.label}", title="router")

    # ----- training
    @work(thread=True, exclusive=True, group="runs")
    def poll_runs(self) -> None:
        """Read the runs; let the idle scheduler give the training GPU work (every IDLE_TICK_S); tell the
        person what experiments found."""
        try:
            work = None
            if time.monotonic() - self._idle_at >= IDLE_TICK_S:
                self._idle_at = time.monotonic()
                work = self.service.idle_tick()
            views = [RunView(r.summary(), r.metrics()) for r in reversed(self.service.runs())]
            decided = self.service.newly_decided()
        except Exception as e:
            self.post_message(EngineLog(f"reading training runs failed: {e}"))
            return
        if work is not None:
            self._ui(self.query_one(TrainingPanel).show_work, work.status)
            for run_id in work.started:
                self.post_message(EngineLog(f"{work.status}: started {run_id}"))
        for exp in decided:
            self._ui(self.notify, exp.outcome, title=f"experiment on {exp.task}", timeout=15)
        self._ui(self._show_runs, views)

    def _show_runs(self, views: list[RunView]) -> None:
        panel = self.query_one(TrainingPanel)
        t = self.settings.training
        panel.bands = (t.overfit_below, t.target_loss, t.underfit_above)
        panel.show(views)
        self.polls["runs"] += 1

    @on(TrainingPanel.Action)
    def _run_action(self, m: TrainingPanel.Action) -> None:
        if m.action == "new":
            sample = Path(__file__).resolve().parent.parent / "data" / "samples" / "math.jsonl"
            with contextlib.suppress(ValueError):  # shown relative to where the app was started, if inside
                sample = sample.relative_to(Path.cwd())
            self.push_screen(NewRunScreen(sorted(self.settings.training.profiles),
                                          self.settings.training.default_profile, str(sample)), self._start_run)
        elif m.action == "experiment":
            sft = sorted(n for n, p in self.settings.training.profiles.items() if p.method == "sft")
            default = self.settings.training.default_profile
            self.push_screen(NewExperimentScreen(sft, default if default in sft else sft[0]), self._start_experiment)
        elif m.action == "experiments":
            self.show_experiments()
        else:
            self.change_run(m.action, m.run_id)

    def _start_run(self, new: NewRun | None) -> None:
        if new is not None:
            self.submit_run(new)

    @work(thread=True, group="runs-actions")
    def submit_run(self, new: NewRun) -> None:
        try:
            run, report = self.service.submit_run(new.task, new.data, new.profile)
        except Exception as e:
            self._ui(self.notify, str(e), title="cannot start training", severity="error", timeout=10)
            return
        self._ui(self.notify, f"{run.id}: {run.state.status} · {report.summary()}", title="training")
        self.poll_runs()

    def _start_experiment(self, new: NewExperiment | None) -> None:
        if new is not None:
            self.start_experiment(new)

    @work(thread=True, group="runs-actions")
    def start_experiment(self, new: NewExperiment) -> None:
        try:
            exp = self.service.experiment(new.task, new.vary, new.data, new.profile, new.when_idle)
        except Exception as e:
            self._ui(self.notify, str(e), title="cannot start the experiment", severity="error", timeout=10)
            return
        how = "waiting for the training GPU to idle" if new.when_idle else "queued behind your runs"
        self._ui(self.notify, f"{exp.id}: {len(exp.variants)} variants {how}", title="experiment")
        self.poll_runs()

    @work(thread=True, exclusive=True, group="experiments")
    def show_experiments(self) -> None:
        try:
            experiments = self.service.experiments()
        except Exception as e:
            self._ui(self.notify, str(e), title="experiments", severity="error")
            return
        t = self.settings.training
        self._ui(self.push_screen, ExperimentsScreen(experiments, (t.overfit_below, t.target_loss, t.underfit_above)))

    @work(thread=True, group="runs-actions")
    def change_run(self, action: str, run_id: str) -> None:
        try:
            run = self.service.change_run(action, run_id)
            self._ui(self.notify, f"{run.id}: {run.state.status}", title=action)
        except Exception as e:
            self._ui(self.notify, str(e), title=f"cannot {action}", severity="error")
        self.poll_runs()

    # ----- GPUs
    @work(thread=True, exclusive=True, group="gpus")
    def poll_gpus(self) -> None:
        if self.telemetry is None:
            self.telemetry = Telemetry()
        snap = self.telemetry.snapshot()
        self._ui(self._show_gpus, snap)

    def _show_gpus(self, snap: Any) -> None:
        self.query_one(GpuPanel).show(snap)
        self.polls["gpus"] += 1

    # ----- screens
    def action_toggle_api(self) -> None:
        """Serve (or stop serving) the OpenAI-compatible API from this process: clients share the model and
        queue behind what is typed here."""
        if not self.service.ready:
            self.notify("the model is still loading", title="API", severity="warning")
            return
        self.switch_api()

    @work(thread=True, exclusive=True, group="api")
    def switch_api(self) -> None:
        try:
            if self.service.api_url:
                self.service.stop_api()
                self._ui(self.notify, "stopped", title="API server")
                return
            url = self.service.start_api()
        except Exception as e:  # the exposure rule, a port in use: one line
            self._ui(self.notify, str(e).splitlines()[0] if str(e) else type(e).__name__, title="API not started",
                     severity="error", timeout=10)
            return
        self._ui(self.notify, f"OpenAI-compatible API at {url} · models: auto, base and every specialist · "
                              "F10 stops it", title="API server", timeout=10)

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def action_show_log(self) -> None:
        self.push_screen(LogScreen(self.log_lines))

    def action_settings(self) -> None:
        self.push_screen(SettingsScreen(self.settings), self._settings_saved)

    def _settings_saved(self, saved: st.Settings | None) -> None:
        if saved is None:
            return
        try:
            applied = self.service.apply_settings(saved)
        except Exception as e:  # e.g. adapters.mode naming an adapter that is not there
            self.notify(f"saved, but not applied: {e}", title="settings", severity="warning")
            return
        self.settings = saved
        if "chat.reasoning" in applied.live:
            self.reasoning = saved.chat.reasoning
        self._status()
        self.refresh_switcher()
        later = f" · at the next start: {', '.join(applied.restart)}" if applied.restart else ""
        self.notify(f"saved · in effect now: {', '.join(applied.live) or 'nothing changed'}{later}", title="settings")

    def action_feedback(self) -> None:
        reply = self.query_one(ChatPanel).last_reply
        if reply is None or reply.turn_id is None:
            self.notify("no reply to give feedback on yet", severity="warning")
            return
        self.push_screen(FeedbackScreen(reply.prompt, reply.final), lambda fb: self._feedback(reply.turn_id, fb))

    def _feedback(self, turn_id: int, fb: Feedback | None) -> None:
        if fb is not None:
            self.give_feedback(turn_id, fb)

    @work(thread=True, exclusive=True, group="learning")
    def give_feedback(self, turn_id: int, fb: Feedback) -> None:
        """Store the feedback; it may make a specialist due for retraining, which the learner starts."""
        try:
            started = self.service.feedback(turn_id, fb.rating, fb.correction, fb.good)
        except Exception as e:
            self.post_message(EngineLog(f"feedback failed: {e}"))
            self._ui(self.notify, str(e), title="feedback", severity="error")
            return
        said = [f"rated {fb.rating}/5"] if fb.rating is not None else []
        said += ["correction saved; it will teach the specialist"] if fb.correction else []
        said += ["marked as a good example"] if fb.good else []
        self._ui(self.notify, " · ".join(said) or "nothing to save", title="feedback")
        for run_id in started:
            self._ui(self.notify, f"retraining started: {run_id}", title="learning")
        if started:
            self.poll_runs()

    def _other_adapter(self, than: str) -> str | None:
        """What to compare `than` with: the base, or for the base the first specialist."""
        names = [r.name for r in self.service.adapters()]
        return "base" if than != "base" else (names[0] if names else None)

    def action_compare(self) -> None:
        reply = self.query_one(ChatPanel).last_reply
        if reply is None or not self.service.ready:
            self.notify("ask something first", severity="warning")
            return
        a = reply.meta.adapter or "base"
        b = self._other_adapter(a)
        if b is None:
            self.notify("no specialist to compare with yet", severity="warning")
            return
        screen = CompareScreen(reply.prompt, a, b)
        self.push_screen(screen, lambda choice: self._picked(screen, choice))
        self.answer_both(screen)

    @work(thread=True, exclusive=True, group="experts")
    def answer_both(self, screen: CompareScreen) -> None:
        for side, name in (("a", screen.a), ("b", screen.b)):
            self._ui(screen.show, side, self.service.answer_with(screen.prompt, name))

    def _picked(self, screen: CompareScreen, choice: str | None) -> None:
        if choice is None:
            return
        winner = {"a": screen.a, "b": screen.b}.get(choice, "tie")
        self.service.prefer(screen.prompt, screen.a, screen.b, screen.replies["a"], screen.replies["b"], winner)
        self.notify(f"preference stored: {winner}", title="A/B")

    def action_report(self) -> None:
        self.push_screen(ReportScreen(self.service.report()))

    def action_experts(self) -> None:
        reply = self.query_one(ChatPanel).last_reply
        if reply is None or reply.experts is None:
            self.notify("no reply with recorded expert routing yet (model.record_experts in settings)",
                        severity="warning")
            return
        self.push_screen(ExpertsScreen(reply.prompt, reply.meta.adapter, reply.experts, reply.tokens))

    @on(ExpertsScreen.CompareRequested)
    def _compare(self, m: ExpertsScreen.CompareRequested) -> None:
        other = self._other_adapter(m.adapter)
        if other is None:
            self.notify("no other adapter to compare with: train or import a specialist", severity="warning")
            return
        self.compare_experts(m.prompt, m.adapter, other)

    @work(thread=True, exclusive=True, group="experts")
    def compare_experts(self, prompt: str, a: str, b: str) -> None:
        shift = self.service.expert_shift(prompt, a, b)
        screen = self.screen
        if isinstance(screen, ExpertsScreen) and shift is not None:
            self._ui(screen.show_shift, b, a, shift)

    def on_unmount(self) -> None:
        if self.cancel is not None:
            self.cancel.set()
        self.service.close()
