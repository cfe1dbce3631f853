"""`tandem`: the workstation (no arguments) and headless commands for scripts and plain terminals.

Errors go to stderr as one line with exit status 1 (2 for bad usage); results go to stdout, as JSON with
--json. Stored text (prompts, replies, names, run errors) is printed through `engine.text`, so escape
sequences in it never reach the terminal. The inference GPU is pinned before anything imports torch.
"""

from __future__ import annotations

import argparse
import atexit
import os
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

from engine import settings as settings_mod
from engine.text import json_text, line, plain, plural

Command = Callable[[settings_mod.Settings, argparse.Namespace], int]


class _Progress:
    """Load steps on stderr, one line each. A step that repeats itself (a download's bytes, a countdown)
    rewrites its line on a terminal, and into a pipe or file is printed at most every REPEAT_S."""

    REPEAT_S = 30.0

    def __init__(self) -> None:
        self.step, self.at = "", 0.0

    def __call__(self, message: str, _fraction: float) -> None:
        step = message.split(":")[0].split(" · ")[0]
        again, now = step == self.step, time.monotonic()
        if again and not sys.stderr.isatty() and now - self.at < self.REPEAT_S:
            return
        up = "\x1b[1A\x1b[2K" if again and sys.stderr.isatty() else ""  # back over the step's last line
        print(f"{up}… {line(message)}", file=sys.stderr, flush=True)
        self.step, self.at = step, now

    def note(self, text: str) -> None:
        """An engine log line (the precision chosen and why, the template check): printed, never rewritten."""
        print(f"… {line(text)}", file=sys.stderr, flush=True)
        self.step = ""


_progress = _Progress()


def _engine(s: settings_mod.Settings, history: bool = True):
    from engine.serve.remote import engine_for
    from engine.store.history import History

    eng = engine_for(s, history=History(s.history_db) if history else None)
    atexit.register(eng.close)  # stops the inference worker before the interpreter tears threads down
    eng.on_log(_progress.note)
    eng.load(_progress)
    for name, why in eng.broken_adapters():
        print(f"warning: adapter folder {line(name)!r} skipped: {line(why)}", file=sys.stderr)
    return eng


def cmd_chat(s: settings_mod.Settings, a: argparse.Namespace) -> int:
    from engine.serve.chat import Conversation, Delta, Finished, Routed

    eng = _engine(s)
    if a.adapter:
        eng.set_mode(a.adapter)  # checked before any prompt: a bad name is an error, not a base reply
    conv = Conversation()
    dim = sys.stdout.isatty()  # reasoning in grey on a terminal; no escape sequences into a pipe or file

    def one(prompt: str, live: bool) -> dict:
        result: dict = {}
        for ev in eng.ask(conv, prompt, reasoning=a.reasoning, skip_reasoning=a.final_only):
            if isinstance(ev, Routed) and live:
                d = ev.decision
                print(f"[{ev.adapter} · {d.reason} · {d.confidence:.2f}]", file=sys.stderr)
            elif isinstance(ev, Delta) and live and (ev.channel == "final" or not a.final_only):
                text = plain(ev.text)  # a model's text is text: no escape sequence of its own reaches the terminal
                print(text if ev.channel == "final" or not dim else f"\x1b[2m{text}\x1b[0m", end="", flush=True)
            elif isinstance(ev, Finished):
                r = ev.reply
                result = {"final": r.parser.final, "analysis": r.parser.analysis,
                          "segments": [seg.__dict__ for seg in r.parser.segments], "adapter": ev.adapter,
                          "route": ev.decision.as_dict(), "stats": r.stats.as_dict(), "turn_id": ev.turn_id}
        return result

    if a.once is not None:
        if a.json:
            print(json_text(one(a.once, live=False)))
        elif a.final_only:
            print(plain(one(a.once, live=False)["final"]))
        else:
            res = one(a.once, live=True)
            stats = res["stats"]
            cut = " · cut at chat.max_new_tokens" if stats["stop"] == "length" else ""
            print(f"\n[{plural(stats['tokens_out'], 'token')}, {stats['tokens_per_s']} tok/s{cut}]", file=sys.stderr)
        return 0
    print("Tandem chat. Empty line or Ctrl-D quits; /base, /auto or /use NAME switch adapter.", file=sys.stderr)
    while True:
        try:
            prompt = input("> ").strip()
        except (EOFError, KeyboardInterrupt):
            return 0
        if not prompt:
            return 0
        try:
            if prompt.startswith("/"):
                cmd, _, arg = prompt[1:].partition(" ")
                eng.set_mode({"base": "base", "auto": "auto"}.get(cmd, arg.strip()))
                continue
            one(prompt, live=True)
            print()
        except _user_errors() as e:  # e.g. a prompt too long for the context: say so, take the next one
            print(f"\nerror: {_message(e)}", file=sys.stderr)


def cmd_serve(s: settings_mod.Settings, a: argparse.Namespace) -> int:
    from engine.api.server import check_exposure
    from engine.service import Workstation

    for key, value in (("api.host", a.host), ("api.port", a.port)):
        if value is not None:
            s = settings_mod.updated(s, key, value)
    check_exposure(s.api)  # before the model loads: a refusal should not take a minute
    station = Workstation(s)
    atexit.register(station.close)
    station.load(_progress, lambda m: print(f"… {line(m)}", file=sys.stderr), lambda _c: None)
    for name, why in station.broken_adapters():
        print(f"warning: adapter folder {line(name)!r} skipped: {line(why)}", file=sys.stderr)
    url = station.start_api()
    print(url, flush=True)
    print(f"serving the OpenAI-compatible API at {url} (models: auto, base, "
          f"{', '.join(station.engine.specialists()) or 'no specialists yet'}); Ctrl-C stops", file=sys.stderr)
    station.wait_api()
    return 0


def cmd_route(s: settings_mod.Settings, a: argparse.Namespace) -> int:
    from engine.serve.model import base_identity, resolve_model_name
    from engine.serve.router import correct, router_for

    base = base_identity(*resolve_model_name(s, _progress))  # only adapters for this base, as the engine
    if a.correct:
        fix = correct(s, base, a.prompt, a.correct)
        where = "the base model" if fix.label in ("none", "base") else line(fix.label)
        print(f"recorded: this prompt goes to {where}", file=sys.stderr)
    d = router_for(s, base).route(a.prompt)
    if a.json:
        print(json_text(d.as_dict()))
        return 0
    print(f"{line(d.choice)}  (confidence {d.confidence:.2f}, {d.reason})")
    if d.runner_up:
        print(f"  runner-up: {line(d.runner_up)} {d.runner_up_score:.2f}")
    if d.nearest:
        print(f"  nearest example: {line(d.nearest)}  ({line(d.nearest_label)}, similarity {d.nearest_similarity:.2f})")
    for name, score in sorted(d.scores.items(), key=lambda kv: -kv[1])[:5]:
        print(f"  {score:6.3f}  {line(name)}")
    return 0


def cmd_adapters(s: settings_mod.Settings, a: argparse.Namespace) -> int:
    from dataclasses import asdict

    from engine.store.adapters import AdapterStore

    store = AdapterStore(s.adapters_dir)
    if a.action == "list":
        good, bad = store.scan()
        if a.json:
            print(json_text({"adapters": [{**asdict(x.manifest), "size_bytes": x.size_bytes} for x in good],
                             "broken": [{"folder": f, "reason": r} for f, r in bad]}))
            return 0
        if not good:
            print(f"no adapters in {line(store.root)}")
        for x in good:
            loss = f"{x.manifest.final_loss:.3f}" if x.manifest.final_loss is not None else "-"
            print(f"{line(x.name):24} {line(x.manifest.task):12} {x.size_bytes / 2**20:8.1f} MB  loss {loss}")
        for f, r in bad:
            print(f"broken: {line(f)}: {line(r)}", file=sys.stderr)
        return 0
    if a.action == "show":
        x = store.get(a.name)
        print(json_text({**asdict(x.manifest), "path": str(x.path), "size_bytes": x.size_bytes}, indent=1))
    elif a.action == "rename":
        store.rename(a.name, a.new_name)
        print(f"renamed {a.name} -> {a.new_name}")
    elif a.action == "remove":
        store.get(a.name)
        if not a.yes:
            if not sys.stdin.isatty():
                print("error: refusing to remove without --yes when not at a terminal", file=sys.stderr)
                return 1
            if input(f"Remove adapter {a.name!r}? [y/N] ").strip().lower() != "y":
                print("kept")
                return 0
        store.remove(a.name)
        print(f"removed {a.name}")
    elif a.action == "rollback":
        x = store.rollback(a.name)
        print(f"{a.name} rolled back to the version created {x.manifest.created:.0f}")
    elif a.action == "export":
        return _export(s, a)
    elif a.action == "import":
        from transformers import AutoConfig

        from engine.serve.model import base_identity, resolve_model_name

        model, is_demo = resolve_model_name(s, _progress)  # the base the engine runs: checked against, recorded
        store.base_model = base_identity(model, is_demo)
        x = store.import_folder(Path(a.path), a.name, a.task, base_config=AutoConfig.from_pretrained(model))
        extra = f"; {line(x.manifest.description)}" if "(" in x.manifest.description else ""
        print(f"imported {x.name} ({x.size_bytes / 2**20:.1f} MB) for base {line(x.manifest.base_model)}{extra}")
    return 0


def _export(s: settings_mod.Settings, a: argparse.Namespace) -> int:
    from engine.serve.model import base_identity, resolve_model_name
    from engine.store.adapters import AdapterStore
    from engine.store.vllm_export import export, serve_command

    if not 1 <= a.tensor_parallel_size <= 64:
        print("error: --tensor-parallel-size must be 1 to 64", file=sys.stderr)
        return 2
    name, is_demo = resolve_model_name(s, _progress)
    done = export(AdapterStore(s.adapters_dir, base_model=base_identity(name, is_demo)), a.name, Path(a.dir), name)
    print(f"exported {done.name} (rank {done.rank}) to {line(done.path)}"
          + (" (expert LoRA reordered for vLLM)" if done.reordered else ""), file=sys.stderr)
    if is_demo:
        print("note: this is the demo model; vLLM serves the real GPT-OSS checkpoints", file=sys.stderr)
    print(serve_command(name, done.path.parent, a.tensor_parallel_size))
    return 0


def cmd_train(s: settings_mod.Settings, a: argparse.Namespace) -> int:
    from engine.train.runs import RunQueue

    queue = RunQueue(s)
    run, report = queue.submit_checked(a.task, a.data, a.profile, a.gpu, a.from_adapter or "", a.name or "")
    print(f"data: {line(report.summary())}", file=sys.stderr)
    print(run.id)
    where = queue.device(run.request.gpu)
    print(f"{run.state.status} on {where}; follow it with: tandem runs show {run.id}", file=sys.stderr)
    if a.wait:
        state = queue.wait(run, timeout=a.wait)
        print(f"{state.status}: {line(state.outcome or state.error)}", file=sys.stderr)
        return 0 if state.status == "finished" else 1
    return 0


def cmd_runs(s: settings_mod.Settings, a: argparse.Namespace) -> int:
    from engine.train.runs import RunQueue

    queue = RunQueue(s)
    if a.action == "list":
        rows = [r.summary() for r in queue.runs()]
        if a.json:
            print(json_text(rows))
        for r in [] if a.json else rows:
            print(line(f"{r['id']:24} {r['task']:12} {r['profile']:12} GPU {r['gpu']}  {r['status']:9} "
                       f"{r['step']}/{r['total']}  {r['outcome'] or r['error']}  ({r['why']})"))
        for folder, why in queue.broken:
            print(f"broken: {line(folder)}: {line(why)}", file=sys.stderr)
        return 0
    if a.action == "show":
        run = queue.get(a.id)
        metrics = run.metrics()
        out = {**run.summary(), "metrics": metrics[-1] if metrics else None,
               "warnings": [m["warning"] for m in metrics if m.get("warning")]}
        print(json_text(out, indent=1))
    elif a.action == "stop":
        run = queue.stop(a.id)
        print(f"{run.id}: {run.state.status}")
    elif a.action == "resume":
        run = queue.resume(a.id)
        print(f"{run.id}: {run.state.status}")
    return 0


def cmd_experiment(s: settings_mod.Settings, a: argparse.Namespace) -> int:
    from engine.store.history import History
    from engine.train.experiments import Experiments, parse_vary

    exps = Experiments(s, History(s.history_db))
    exp = exps.create(a.task, parse_vary(a.vary or []), a.data, a.profile, start=not a.when_idle)
    print(exp.id)
    how = "waiting for the training GPU to idle" if a.when_idle else "queued behind your own runs"
    print(f"{len(exp.variants)} variants {how}; follow them with: tandem experiments show {exp.id}", file=sys.stderr)
    if not a.wait:
        return 0
    deadline = time.monotonic() + a.wait
    while (exp := exps.get(exp.id)).status != "done":
        if time.monotonic() > deadline:
            raise TimeoutError(f"experiment {exp.id} still {exp.status} after {a.wait:.0f} s")
        from engine.train.runs import RunQueue

        RunQueue(s).runs()  # finds a dead trainer and starts what waited behind it
        time.sleep(1.0)
    _print_experiment(exps, exp, a.json)
    return 0


def _print_experiment(exps, exp, as_json: bool) -> None:
    from dataclasses import asdict

    rows = exps.table(exp)
    if as_json:
        print(json_text({**asdict(exp), "table": rows}))
        return
    print(f"experiment {exp.id} · {line(exp.task)} · {exp.profile} · {exp.status}")
    print(f"{'variant':28} {'status':9} {'held-out':>8} {'current':>8} {'time':>7} {'peak mem':>9}  loss curve")
    sparks = "▁▂▃▄▅▆▇█"
    losses = [v for r in rows for _, v in r["curve"]]
    top, bottom = (max(losses), min(losses)) if losses else (1.0, 0.0)

    def num(v, fmt):
        return format(v, fmt) if v is not None else "-"

    for r in rows:  # one shared scale, so the curves compare as if overlaid
        curve = "".join(sparks[min(7, int((v - bottom) / ((top - bottom) or 1) * 7.999))] for _, v in r["curve"][-40:])
        print(f"{line(r['label'])[:28]:28} {r['status']:9} {num(r['heldout_loss'], '.4f'):>8} "
              f"{num(r['current_loss'], '.4f'):>8} {num(r['seconds'], '.0f'):>6}s "
              f"{num(r['peak_mem_gb'], '.2f'):>6} GB  {curve}")
    if exp.outcome:
        print(line(exp.outcome))


def cmd_experiments(s: settings_mod.Settings, a: argparse.Namespace) -> int:
    from engine.train.experiments import Experiments

    exps = Experiments(s)
    if a.action == "list":
        items = exps.list()
        if a.json:
            print(json_text([{"id": e.id, "task": e.task, "status": e.status, "outcome": e.outcome} for e in items]))
        for e in [] if a.json else items:
            print(line(f"{e.id:24} {e.task:12} {e.status:8} {len(e.variants)} variants  {e.outcome}"))
        return 0
    _print_experiment(exps, exps.get(a.id), a.json)
    return 0


def cmd_experts(s: settings_mod.Settings, a: argparse.Namespace) -> int:
    from engine.serve.experts import usage_shift

    eng = _engine(s, history=False)
    mine, other_name = (eng.check_mode(x) if x else None for x in (a.adapter, a.compare))
    done = eng.trace_experts(a.prompt, mine, a.max_new_tokens)
    trace = done.reply.experts
    if trace is None:
        print("error: this model exposes no MoE routers to record", file=sys.stderr)
        return 1
    tokens = done.reply.token_texts
    out = {"adapter": done.adapter, "final": done.reply.parser.final, **trace.as_dict(),
           "tokens": [{"text": t, "experts": trace.indices[i], "weights": trace.weights[i]}
                      for i, t in enumerate(tokens[: len(trace.indices)])]}
    if a.compare:
        other = eng.trace_experts(a.prompt, other_name, a.max_new_tokens)
        out["compare"] = {"adapter": other.adapter, "usage": other.reply.experts.usage(),
                          "shift": usage_shift(other.reply.experts, trace)}
    if a.json:
        print(json_text(out))
        return 0
    print(f"{done.adapter}: {out['final']!r}  ({len(trace.indices)} reply tokens, top-{trace.top_k} of "
          f"{trace.num_experts} experts, {trace.num_layers} layers)")
    print(render_heatmap(trace.usage(), "share of reply tokens per expert"))
    if a.compare:
        print(render_heatmap(out["compare"]["shift"], f"{done.adapter} minus {out['compare']['adapter']}",
                             signed=True))
    return 0


def render_heatmap(grid: list[list[float]], title: str, signed: bool = False) -> str:
    """A layer x expert map in plain text: darker = more traffic (or +/- for a signed shift)."""
    shades = " ░▒▓█"
    lines = [title, "layer " + "".join(str(e % 10) for e in range(len(grid[0])))]
    for i, row in enumerate(grid):
        if signed:
            cells = "".join("+" if v > 0.05 else "-" if v < -0.05 else "·" for v in row)
        else:
            top = max(max(row), 1e-9)
            cells = "".join(shades[min(4, int(v / top * 4.999))] for v in row)
        lines.append(f"{i:>5} {cells}")
    return "\n".join(lines)


def cmd_history(s: settings_mod.Settings, a: argparse.Namespace) -> int:
    from engine.store.history import History
    from engine.train.learning import example_of

    h = History(s.history_db)
    if a.action == "list":
        rows = h.conversations(a.limit or None)
        if a.json:
            print(json_text(rows))
        for c in [] if a.json else rows:
            print(f"{c['id']:>5}  {c['turns']:>3} turn{'' if c['turns'] == 1 else 's'}  {line(c['title'])}")
        _shown(len(rows), h.count_conversations(), "conversations", "newest")
    elif a.action == "show":
        turns = h.turns(a.id)
        if not turns:
            print(f"error: no conversation {a.id}", file=sys.stderr)
            return 1
        if a.json:
            print(json_text([t.as_dict() for t in turns]))
        for t in [] if a.json else turns:
            extra = "".join([f" · rated {t.rating}" if t.rating else "", " · corrected" if t.correction else "",
                             f" · {line(t.status)}" if t.status != "complete" else "",
                             f" · via {line(t.source)}" if t.source != "app" else ""])
            print(f"[{t.id}] you: {plain(t.prompt)}\n      {line(t.adapter)}{extra}: {plain(t.final)}")
    elif a.action == "search":
        found = h.search(a.text, a.limit or None)
        if a.json:
            print(json_text([t.as_dict() for t in found]))
        for t in [] if a.json else found:
            print(f"[{t.id}] conv {t.conversation_id} · {line(t.adapter)}: {line(repr(t.prompt[:60]))} -> "
                  f"{line(repr(t.final[:60]))}")
        _shown(len(found), h.count_matches(a.text), "matching turns", "oldest")
    elif a.action == "export":
        rows = ((example_of(t, h.context(t)).to_chat_row() for t in h.usable_for(a.task)) if a.task
                else (t.as_dict() for t in h.each_turn()))
        count = 0
        for r in rows:
            sys.stdout.write(json_text(r) + "\n")
            count += 1
        print(f"exported {count} {'examples' if a.task else 'turns'}", file=sys.stderr)
    elif a.action == "label":
        h.turn(a.turn)  # KeyError (one line) when there is no such turn
        h.set_task(a.turn, a.task)
        print(f"turn {a.turn} now teaches {a.task!r}")
    return 0


def _shown(shown: int, total: int, what: str, which: str) -> None:
    """Say on stderr when a listing stopped short of every row, and how to get the rest."""
    if shown < total:
        print(f"showing the {which} {shown} of {total} {what}; --limit 0 shows all", file=sys.stderr)


def cmd_learn(s: settings_mod.Settings, a: argparse.Namespace) -> int:
    from engine.store.history import History
    from engine.train.learning import Learner

    learner = Learner(s, History(s.history_db))
    due = learner.due()
    for _task, why in learner.skipped:
        print(f"skipped: {line(why)}", file=sys.stderr)
    for task, why in due:
        print(f"{task}: due ({why})", file=sys.stderr)
    if not due:
        print("nothing due", file=sys.stderr)
    for run_id in [] if a.dry_run else learner.check(a.profile):
        print(run_id)
    if not a.dry_run:  # and what the idle scheduler would start now (settings [learning])
        from engine.train.idle import IdleScheduler

        tick = IdleScheduler(s, learner.history).tick()
        print(line(tick.status), file=sys.stderr)
        for run_id in tick.started:
            print(run_id)
    return 0


def cmd_report(s: settings_mod.Settings, a: argparse.Namespace) -> int:
    from engine.store.history import History
    from engine.train.learning import report

    r = report(History(s.history_db))
    if a.json:
        print(json_text(r))
        return 0
    print(f"{r['turns']} turns · mean rating {r['mean_rating']} ({r['rated']} rated) · "
          f"corrections {r['correction_rate']} · {r['preferences']} A/B picks")
    print("usage: " + line(", ".join(f"{k} {v}" for k, v in r["usage"].items())))
    print("preference pairs (A/B picks + corrections): " + (line(", ".join(
        f"{k} {v['picks']} + {v['corrections']}" for k, v in r["pairs"].items())) or "none yet"))
    print(f"{'day':10} {'turns':>5} {'rating':>6} {'corr.':>6} {'tok/s':>7} {'router':>6}")
    for d in r["days"]:
        print(f"{d['day']:10} {d['turns']:>5} {d['mean_rating'] or '-':>6} {d['correction_rate']:>6} "
              f"{d['tokens_per_s'] or '-':>7} {d['router_confidence'] or '-':>6}")
    return 0


def _count(text: str) -> int:
    """A --limit: 0 (all) or a positive whole number."""
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"expected 0 (all) or a positive whole number, got {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tandem", description=__doc__.splitlines()[0])
    p.add_argument("--settings", help="settings file (default: $TANDEM_SETTINGS or ./settings.toml)")
    sub = p.add_subparsers(dest="command")

    c = sub.add_parser("chat", help="chat in a plain terminal, or answer one prompt with --once")
    c.add_argument("--once", metavar="PROMPT")
    c.add_argument("--reasoning", choices=settings_mod.REASONING_LEVELS)
    c.add_argument("--final-only", action="store_true", help="skip reasoning; print only the final answer")
    c.add_argument("--json", action="store_true")
    c.add_argument("--adapter", help="NAME, base or auto (default: adapters.mode from settings)")
    c.set_defaults(fn=cmd_chat)

    sv = sub.add_parser("serve", help="serve the OpenAI-compatible API (routed specialists) until Ctrl-C")
    sv.add_argument("--host", help="address to bind (default: api.host); not loopback needs api.token")
    sv.add_argument("--port", type=int, help="port (default: api.port; 0 = any free port)")
    sv.set_defaults(fn=cmd_serve)

    r = sub.add_parser("route", help="which specialist the router picks for a prompt, and why")
    r.add_argument("prompt")
    r.add_argument("--json", action="store_true")
    r.add_argument("--correct", metavar="NAME|none",
                   help="record that this prompt should go to specialist NAME (or none), then route it again")
    r.set_defaults(fn=cmd_route)

    ad = sub.add_parser("adapters", help="the specialist store")
    asub = ad.add_subparsers(dest="action", required=True)
    x = asub.add_parser("list")
    x.add_argument("--json", action="store_true")
    asub.add_parser("show").add_argument("name")
    x = asub.add_parser("rename")
    x.add_argument("name")
    x.add_argument("new_name")
    x = asub.add_parser("remove")
    x.add_argument("name")
    x.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    asub.add_parser("rollback", help="make the previous version current again").add_argument("name")
    x = asub.add_parser("export", help="write NAME as a PEFT folder DIR/NAME for vLLM; print the vllm serve command")
    x.add_argument("name")
    x.add_argument("dir")
    x.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs vLLM splits the model over (default 1)")
    x = asub.add_parser("import")
    x.add_argument("path")
    x.add_argument("--name")
    x.add_argument("--task")
    ad.set_defaults(fn=cmd_adapters)

    hi = sub.add_parser("history", help="stored conversations: list, show, search, export, label")
    hsub = hi.add_subparsers(dest="action", required=True)
    x = hsub.add_parser("list")
    x.add_argument("--limit", type=_count, default=50, help="newest N conversations (0: all; default 50)")
    x.add_argument("--json", action="store_true")
    x = hsub.add_parser("show", help="every turn of one conversation")
    x.add_argument("id", type=int)
    x.add_argument("--json", action="store_true")
    x = hsub.add_parser("search", help="turns whose prompt, reply or correction contains TEXT (as typed)")
    x.add_argument("text")
    x.add_argument("--limit", type=_count, default=100, help="oldest N matches (0: all; default 100)")
    x.add_argument("--json", action="store_true")
    hsub.add_parser("export", help="JSONL: every turn, or with --task the training examples of a task").add_argument(
        "--task")
    x = hsub.add_parser("label", help="say which task a turn teaches (e.g. one base answered)")
    x.add_argument("turn", type=int)
    x.add_argument("task")
    hi.set_defaults(fn=cmd_history)

    le = sub.add_parser("learn", help="retrain specialists whose new examples reached the trigger")
    le.add_argument("--profile")
    le.add_argument("--dry-run", action="store_true")
    le.set_defaults(fn=cmd_learn)

    rp = sub.add_parser("report", help="ratings, corrections, speed, usage and router confidence over time")
    rp.add_argument("--json", action="store_true")
    rp.set_defaults(fn=cmd_report)

    e = sub.add_parser("experts", help="which experts a reply used, per layer and per token")
    e.add_argument("prompt")
    e.add_argument("--adapter", help="NAME, base or auto (default: adapters.mode)")
    e.add_argument("--compare", metavar="NAME", help="also answer with NAME (or base) and show the traffic shift")
    e.add_argument("--max-new-tokens", type=int, default=256)
    e.add_argument("--json", action="store_true")
    e.set_defaults(fn=cmd_experts)

    t = sub.add_parser("train", help="train a specialist on the training GPU (detached; prints the run id)")
    t.add_argument("--task", required=True)
    t.add_argument("--data", required=True, help="a .jsonl/.json/.parquet/.csv file or a hub dataset name")
    t.add_argument("--profile")
    t.add_argument("--gpu", type=int, help="GPU index (default: gpus.training)")
    t.add_argument("--from", dest="from_adapter", metavar="ADAPTER", help="continue from an existing adapter")
    t.add_argument("--name", help="adapter name to publish as (default: the task)")
    t.add_argument("--wait", type=float, metavar="SECONDS", help="wait for the run to end")
    t.set_defaults(fn=cmd_train)

    x = sub.add_parser("experiment", help="train variants of a specialist on the training GPU; the best is promoted")
    x.add_argument("--task", required=True)
    x.add_argument("--vary", action="append", metavar="NAME=V1,V2",
                   help="a profile value to try several of: r, alpha, lr, steps, batch_size (repeatable)")
    x.add_argument("--data", action="append", metavar="PATH",
                   help="training data; give several to compare data mixes (default: the task's learned examples)")
    x.add_argument("--profile", help="the profile the variants start from (default: training.default_profile)")
    x.add_argument("--when-idle", action="store_true", help="wait for the idle scheduler instead of queueing now")
    x.add_argument("--wait", type=float, metavar="SECONDS", help="wait for the outcome and print the comparison")
    x.add_argument("--json", action="store_true")
    x.set_defaults(fn=cmd_experiment)

    x = sub.add_parser("experiments", help="experiments: list, or show one's comparison table")
    xsub = x.add_subparsers(dest="action", required=True)
    xsub.add_parser("list").add_argument("--json", action="store_true")
    y = xsub.add_parser("show")
    y.add_argument("id")
    y.add_argument("--json", action="store_true")
    x.set_defaults(fn=cmd_experiments)

    rn = sub.add_parser("runs", help="training runs: list, show, stop, resume")
    rsub = rn.add_subparsers(dest="action", required=True)
    rsub.add_parser("list").add_argument("--json", action="store_true")
    for action in ("show", "stop", "resume"):
        rsub.add_parser(action).add_argument("id")
    rn.set_defaults(fn=cmd_runs)
    return p


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message is meant for the user: printed as one line, no traceback."""
    from engine.api.server import ApiConfigError
    from engine.harmony import PromptTooLong
    from engine.names import InvalidName
    from engine.serve.model import ModelLoadError
    from engine.store.adapters import AdapterError
    from engine.store.history import HistoryError
    from engine.train.dataset import DatasetError
    from engine.train.experiments import ExperimentError
    from engine.train.runs import RunError

    return (ApiConfigError, AdapterError, DatasetError, ExperimentError, HistoryError, InvalidName, ModelLoadError,
            PromptTooLong, RunError, settings_mod.SettingsError, KeyError, OSError, TimeoutError)


def _message(e: BaseException) -> str:
    text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)  # str(KeyError) adds quotes
    return line(text) or type(e).__name__


def _crash_report(s: settings_mod.Settings | None, e: BaseException) -> str:
    """An unexpected error: the traceback goes to a log file, the user gets one line saying where."""
    logs = s.logs_dir if s is not None else Path.cwd()
    path = logs / "cli-errors.log"
    try:
        logs.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8", errors="backslashreplace") as fh:  # argv may hold any bytes
            fh.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} tandem {' '.join(sys.argv[1:])}\n")
            fh.write(traceback.format_exc())
    except OSError:
        return f"error: {type(e).__name__}: {_message(e)} (a bug; the traceback could not be written to {path})"
    return f"error: {type(e).__name__}: {_message(e)} (a bug; traceback in {path})"


def main(argv: list[str] | None = None, ui: Command | None = None) -> int:
    """Run a headless command, or `ui` (the workstation, which tui/ supplies) when none is given."""
    argv = sys.argv[1:] if argv is None else argv
    for i, arg in enumerate(argv, start=1):
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError as e:  # bytes the locale could not decode arrive as lone surrogates
            byte = ord(arg[e.start]) - 0xDC00 if 0xDC80 <= ord(arg[e.start]) <= 0xDCFF else ord(arg[e.start])
            print(f"error: argument {i} ({arg.encode('utf-8', 'backslashreplace').decode()}) is not UTF-8 text "
                  f"(byte 0x{byte:02x} at {e.start}); Tandem reads arguments as UTF-8", file=sys.stderr)
            return 2
    try:
        status = _run(argv, ui)
        sys.stdout.flush()  # here, where a closed pipe is caught, not at exit
        return status
    except BrokenPipeError:  # `tandem … | head -1`: the reader left; end quietly, as a Unix tool does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit flush must not fail again
        return 141  # 128 + SIGPIPE, what a shell reports for a tool the pipe ended


def _run(argv: list[str], ui: Command | None) -> int:
    args = build_parser().parse_args(argv)
    if args.command is None and ui is None:
        build_parser().print_help()
        return 2
    warnings.filterwarnings("ignore")
    s = None
    try:
        s = settings_mod.load(args.settings, must_exist=bool(args.settings))
        for warning in s.warnings:
            print(f"warning: {line(warning)}", file=sys.stderr)
        if args.command in (None, "chat", "experts", "serve"):
            from engine.serve.model import pin_gpu
            from engine.telemetry import gpu_count

            count = gpu_count()
            if count and s.gpus.inference >= count:
                raise settings_mod.SettingsError(
                    f"gpus.inference = {s.gpus.inference}: this machine has GPUs 0-{count - 1}")
            pin_gpu(s.gpus.inference)
        return getattr(args, "fn", ui)(s, args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        raise
    except settings_mod.SettingsError as e:
        print(f"error: settings: {_message(e)}", file=sys.stderr)
        return 1
    except Exception as e:
        if isinstance(e, _user_errors()):
            print(f"error: {_message(e)}", file=sys.stderr)
        else:
            print(_crash_report(s, e), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
