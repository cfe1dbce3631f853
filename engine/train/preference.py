"""Preference learning: pairs from the user's A/B picks and corrections, and the gate that judges them.

A pair is a prompt (with the conversation before it, the reasoning level and the instructions it was
asked under) and two replies to it: the one the user preferred (`chosen`) and the other (`rejected`).
An A/B pick gives one (a tie gives none); a correction gives one too, the corrected answer over the
reply it corrected. Pairs are tokenized with the chat's own renderer (`engine.harmony`), so a pair
trains on exactly the prompt the chat serves, and text never becomes a control token.

A `dpo` profile trains the specialist a pair's task belongs to with TRL's DPO trainer (through unsloth),
starting from that specialist; TRL keeps a frozen copy of it as the reference. The gate then scores the
new weights and the current specialist on held-out pairs: win rate (how often a model puts more
probability on the chosen reply than on the rejected one) and the DPO reward margin of the new weights
over the current ones. It promotes only when the margin is positive and the win rate is no worse;
the SFT loss alone says nothing about preferences.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from engine.harmony import REASONING, PromptTooLong, Turn, completion_pieces, encode, fit_turns, prompt_pieces
from engine.store.history import History
from engine.train.dataset import DatasetError, from_messages

MIN_MARGIN = 1e-3  # held-out reward margin a preference run must reach to replace the current specialist


@dataclass
class Pair:
    turns: list[Turn]  # the conversation up to and including the user's prompt
    chosen: str
    rejected: str
    reasoning: str = "low"
    instructions: str = ""
    source: str = "pick"  # pick (A/B) | correction

    @property
    def user_prompt(self) -> str:
        return self.turns[-1].content

    def as_row(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Pair:
        return cls(**{**row, "turns": [Turn(**t) for t in row["turns"]]})

    def to_chat_row(self) -> dict[str, Any]:
        """A .jsonl line: `messages` (ending with the user's prompt), `chosen`, `rejected`."""
        messages = [{"role": "developer", "content": self.instructions}] if self.instructions else []
        messages += [{"role": t.role, "content": t.content} for t in self.turns]
        return {"reasoning_effort": self.reasoning, "messages": messages, "chosen": self.chosen,
                "rejected": self.rejected, "source": self.source}

    def encode(self, tokenizer: Any, max_length: int | None = None) -> dict[str, list[int]]:
        """prompt_ids, chosen_ids, rejected_ids as the chat renders them; a long conversation loses its
        oldest exchanges first, as the chat drops them."""
        chosen = encode(tokenizer, completion_pieces(self.chosen))
        rejected = encode(tokenizer, completion_pieces(self.rejected))
        prompt = encode(tokenizer, prompt_pieces(self.turns, self.reasoning, self.instructions))
        room = (max_length or 0) - max(len(chosen), len(rejected))
        if max_length is not None and len(prompt) > room > 0:
            with contextlib.suppress(PromptTooLong):  # TRL truncates what is left
                prompt, _ = fit_turns(tokenizer, self.turns, self.reasoning, self.instructions, room)
        return {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected}


def pair_from_row(row: Any) -> Pair:
    """One .jsonl row -> Pair; ValueError with a short reason."""
    if not isinstance(row, dict):
        raise ValueError("row is not an object")
    level = row.get("reasoning_effort", "low")
    if level not in REASONING:
        raise ValueError("bad reasoning_effort")
    chosen, rejected = row.get("chosen"), row.get("rejected")
    if not (isinstance(chosen, str) and chosen.strip() and isinstance(rejected, str) and rejected.strip()):
        raise ValueError("no chosen/rejected text")
    if chosen == rejected:
        raise ValueError("chosen and rejected are the same")
    messages = row.get("messages")
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict):
        # read through the SFT reader, with the chosen reply standing in as the last turn
        ex = from_messages([*messages, {"role": "assistant", "content": chosen}], level)
    elif isinstance(row.get("prompt"), str) and row["prompt"].strip():
        ex = from_messages([{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": chosen}],
                            level)
    else:
        raise ValueError("no prompt or messages")
    if ex.turns[-2].role != "user":
        raise ValueError("messages do not end with the user's prompt")
    source = row.get("source", "pick")
    return Pair(ex.turns[:-1], chosen, rejected, level, ex.instructions, source if source in ("pick", "correction")
                else "pick")


@dataclass
class PairReport:
    """As `dataset.LoadReport`, for pairs: what was usable, what was skipped and why."""

    examples: list[Pair] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    total_rows: int = 0

    def summary(self) -> str:
        picks = sum(p.source == "pick" for p in self.examples)
        text = (f"{len(self.examples)} of {self.total_rows} pairs usable ({picks} from A/B picks, "
                f"{len(self.examples) - picks} from corrections)")
        if self.skipped:
            text += "; skipped: " + ", ".join(f"{n} {why}" for why, n in self.skipped.items())
        return text

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for p in self.examples:
            h.update(json.dumps(p.as_row(), ensure_ascii=False, sort_keys=True).encode())
        return h.hexdigest()[:16]


def load_pairs(source: str, limit: int | None = None) -> PairReport:
    """Read a pairs .jsonl file; DatasetError naming it when nothing is usable."""
    path = Path(source).expanduser()
    try:
        lines = path.read_bytes().splitlines()
    except OSError as e:
        raise DatasetError(f"{path}: cannot be read ({e.strerror or e})") from None
    report = PairReport()
    for line in lines:
        if not line.strip():
            continue
        report.total_rows += 1
        try:
            report.examples.append(pair_from_row(json.loads(line.decode("utf-8"))))
        except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
            why = str(e) if not isinstance(e, json.JSONDecodeError | UnicodeDecodeError) else "invalid JSON"
            report.skipped[why] = report.skipped.get(why, 0) + 1
    if limit is not None:
        report.examples = report.examples[:limit]
    if not report.examples:
        raise DatasetError(f"{path}: no usable preference pairs ({report.summary()})")
    return report


def pairs_from_history(history: History, task: str) -> dict[str, Pair]:
    """The task's pairs keyed by prompt, oldest first so a later pick on the same prompt wins."""
    out: dict[str, Pair] = {}
    for t in history.corrected(task):
        turns = [Turn(role, text) for role, text in history.context(t)]
        out[t.prompt.strip().lower()] = Pair([*turns, Turn("user", t.prompt)], t.correction or "", t.final,
                                             t.reasoning if t.reasoning in REASONING else "low", t.instructions,
                                             "correction")
    for p in history.preferences():
        if p["task"] != task or p["choice"] not in (p["a"], p["b"]) or p["a"] == p["b"]:
            continue  # another task's, a tie, or the same adapter on both sides
        won_a = p["choice"] == p["a"]
        chosen, rejected = (p["reply_a"], p["reply_b"]) if won_a else (p["reply_b"], p["reply_a"])
        if chosen.strip() and rejected.strip() and chosen != rejected:
            out[p["prompt"].strip().lower()] = Pair([Turn("user", p["prompt"])], chosen, rejected,
                                                    p["reasoning"] if p["reasoning"] in REASONING else "low",
                                                    p["instructions"] or "", "pick")
    return out


def pair_counts(history: History) -> dict[str, dict[str, int]]:
    """Per task: pairs from A/B picks and from corrections (the report, F8)."""
    tasks = set(history.tasks()) | {p["task"] for p in history.preferences() if p["task"]}
    out = {}
    for task in sorted(tasks):
        pairs = pairs_from_history(history, task).values()
        picks = sum(p.source == "pick" for p in pairs)
        if pairs:
            out[task] = {"picks": picks, "corrections": len(pairs) - picks}
    return out


def sequence_logps(model: Any, rows: list[dict[str, list[int]]]) -> list[tuple[float, float]]:
    """(log p(chosen | prompt), log p(rejected | prompt)) under the model's active adapter, per pair.
    Read from the model's own loss on the reply tokens (mean NLL times their count): the loss path is the
    one every backend computes (unsloth's fused cross-entropy returns no logits while training)."""
    import torch

    out = []
    device = next(p for p in model.parameters()).device
    model.eval()
    with torch.no_grad():
        for row in rows:
            pair = []
            for key in ("chosen_ids", "rejected_ids"):
                ids = torch.tensor([row["prompt_ids"] + row[key]], device=device)
                labels = ids.clone()
                labels[0, : len(row["prompt_ids"])] = -100  # only the reply is scored
                loss = model(input_ids=ids, labels=labels).loss
                pair.append(-float(loss) * len(row[key]))
            out.append((pair[0], pair[1]))
    return out


def judge(new: list[tuple[float, float]], current: list[tuple[float, float]] | None, beta: float) -> dict[str, Any]:
    """The preference gate's verdict from held-out log-probs of the new weights and the current specialist."""
    def win_rate(lps: list[tuple[float, float]]) -> float:
        return sum(c > r for c, r in lps) / len(lps)

    out: dict[str, Any] = {"pairs": len(new), "win_rate": round(win_rate(new), 4)}
    if current is None:
        out.update(promote=True, reason=f"first version, held-out win rate {out['win_rate']:.2f}")
        return out
    margins = [beta * ((nc - cc) - (nr - cr)) for (nc, nr), (cc, cr) in zip(new, current, strict=True)]
    out["current_win_rate"] = round(win_rate(current), 4)
    out["margin"] = round(sum(margins) / len(margins), 5)
    promote = out["margin"] > MIN_MARGIN and out["win_rate"] >= out["current_win_rate"]
    verb = "beats" if promote else "does not beat"
    out.update(promote=promote, reason=f"held-out win rate {out['win_rate']:.2f} (current "
               f"{out['current_win_rate']:.2f}), reward margin {out['margin']:+.4f}: {verb} current")
    return out
