"""The fast decoder checked against transformers + PEFT on the checkpoint actually served.

Nobody can vouch in advance that the fast decoder reads a given checkpoint and adapter right (a nibble
order, gate/up columns, an adapter's lora_B layout): so the first time a checkpoint is served, and the
first time each adapter version is attached, both decoders read one fixed short prompt, teacher-forced,
and their logits at a few positions must agree to the precision of the weights and pick the same top-1
token wherever the reference's choice is clear. "The precision of the weights" is measured, not assumed:
the reference runs the prompt a second time with its input embeddings moved by one rounding step (a
seeded ±1 ulp), and the fast decoder may differ by a few times what that moved. A well-trained
checkpoint barely moves (the floor stays at the dtype's bound); random weights at depth amplify rounding
until bf16 logits carry no signal, and the verdict then says so instead of blaming either decoder. The
verdict is cached per checkpoint and adapter version
under Tandem's cache folder, so it costs a second or two once. On disagreement the reference decoder
serves (the engine says why in the header, the GPU panel and the log). With the opt-in 8-bit lm_head
([model] lm_head_8bit) each logit may also sit as far as that head's own rounding bound (lm_head8.py) from the
reference's, measured on the reference's hidden states: a misread checkpoint still lands far outside it.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from engine.harmony import Turn, encode_prompt

PROMPT = "Name three prime numbers and explain briefly why each one is prime."
FORCED = 6  # positions decoded one token at a time (the step path), after the prefill's last one
TOLERANCE = {"float32": 2e-3, "float64": 2e-3}  # relative to the largest logit; others (bf16, fp16): BF16
BF16 = 4e-2  # bf16 keeps 8 bits: a 24-layer forward summed in another order drifts by ~1% of the largest logit
NOISE_FACTOR = 4  # the fast decoder may differ by this many times what a one-ulp input change moves
INCONCLUSIVE = 0.25  # a floor above this (relative to the largest logit): rounding alone decides the logits


@dataclass
class Verdict:
    ok: bool
    worst: float  # largest logit difference (beyond the 8-bit lm_head's bound), relative to the largest reference logit
    tolerance: float
    top1: str  # "agreed at n of m positions"
    seconds: float
    reason: str = ""  # what disagreed (empty when ok)
    noise: float = 0.0  # what a one-ulp change of the input embeddings moved the reference's logits

    def line(self) -> str:
        if not self.ok:
            return self.reason
        if self.noise * NOISE_FACTOR > INCONCLUSIVE:
            return (f"inconclusive: a one-ulp input change moves this checkpoint's logits by {self.noise:.2g} of "
                    "the largest (random or ill-conditioned weights); top-1 " + self.top1)
        return "agrees"


def _cache_file(identity: str) -> Path:
    from engine.serve.demo_model import cache_root

    return cache_root() / "selfcheck" / f"{hashlib.sha256(identity.encode()).hexdigest()[:24]}.json"


def identity(lm: Any, adapter: str | None, created: float | None, head8: bool = False) -> str:
    """What a verdict holds for: the checkpoint as served, the adapter version (None: the base), and whether
    logits come from the 8-bit lm_head."""
    return json.dumps([lm.name, lm.quant, str(lm.device).split(":")[0], PROMPT, adapter, created]
                      + (["lm_head_8bit"] if head8 else []))


def cached(key: str) -> Verdict | None:
    try:
        return Verdict(**json.loads(_cache_file(key).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def remember(key: str, verdict: Verdict) -> None:
    path = _cache_file(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(verdict)))
        tmp.replace(path)
    except OSError:
        pass  # a read-only cache costs a re-check next time, nothing else


def compare(fast: Any, reference: Any, tokenizer: Any, adapter: str | None) -> Verdict:
    """Teacher-forced logits of both decoders on PROMPT with `adapter` selected on each (None: the base).
    Leaves both decoders released; the caller selects again before the next reply."""
    import torch

    started = time.perf_counter()
    ids = torch.tensor([encode_prompt(tokenizer, [Turn("user", PROMPT)])], device=fast.device)
    split = ids.shape[1] - FORCED
    if not (fast.select(adapter) and reference.select(adapter)):
        return Verdict(False, float("inf"), 0.0, "", 0.0, f"a decoder refused {adapter or 'the base'}")
    with torch.inference_mode():
        want, slack = _reference_logits(reference.model, ids, split, fast.head8)
        noise = _rounding_noise(reference.model, ids, want, split)
        got = [fast.prefill(ids[:, :split])[0].float()]
        for j in range(split, ids.shape[1] - 1):
            got.append(fast.step(ids[:, j])[0].float().clone())
        fast.release()
    got_t = torch.stack(got)
    want = want[: got_t.shape[0]]
    slack = slack[: got_t.shape[0]]
    worst = (((got_t - want).abs() - slack).clamp(min=0).max() / want.abs().max()).item()
    tolerance = max(TOLERANCE.get(str(fast.dtype).removeprefix("torch."), BF16), NOISE_FACTOR * noise)
    top2 = want.topk(2, dim=-1).values
    # the reference's choice is not a tie (nor within twice the 8-bit head's bound)
    clear = (top2[:, 0] - top2[:, 1]) > 2 * tolerance * want.abs().max() + 2 * slack.amax(-1)
    agree = got_t.argmax(-1) == want.argmax(-1)
    top1 = f"agreed at {int((agree | ~clear).sum())} of {len(agree)} positions"
    reasons = []
    if worst > tolerance:
        reasons.append(f"logits differ by {worst:.3g} of the largest (tolerance {tolerance:g})")
    if not bool((agree | ~clear).all()):
        reasons.append(f"top-1 {top1}")
    subject = f"adapter {adapter}" if adapter else "the base model"
    reason = f"self-check on {subject}: " + "; ".join(reasons) if reasons else ""
    return Verdict(not reasons, worst, tolerance, top1, time.perf_counter() - started, reason, noise)


def _reference_logits(model: Any, ids: Any, split: int, head8: Any) -> tuple[Any, Any]:
    """The reference's fp32 logits from position split - 1 on, and how far the fast decoder's 8-bit lm_head
    (`head8`, or None) may put each one from them by its rounding alone (zeros without it): its bound on the
    hidden states the reference's lm_head reads."""
    import torch

    seen: list[Any] = []
    hook = model.get_output_embeddings().register_forward_hook(lambda _m, args, _out: seen.append(args[0]))
    try:
        want = model(input_ids=ids).logits[0, split - 1:].float()
    finally:
        hook.remove()
    if head8 is None:
        return want, torch.zeros_like(want)
    from engine.serve.lm_head8 import error_bound

    return want, error_bound(seen[0][0, split - 1:], head8.scales)


def _rounding_noise(model: Any, ids: Any, want: Any, split: int) -> float:
    """How far the reference's own logits move when every input embedding moves by one rounding step
    (seeded signs): the scale at which two correct implementations of this checkpoint may disagree."""
    import torch

    embeds = model.get_input_embeddings()(ids)
    signs = torch.randint(0, 2, embeds.shape, generator=torch.Generator().manual_seed(0)).to(embeds.device) * 2 - 1
    moved = embeds + embeds * signs.to(embeds.dtype) * torch.finfo(embeds.dtype).eps
    again = model(inputs_embeds=moved).logits[0, split - 1:].float()
    return ((again - want).abs().max() / want.abs().max()).item()


def check(lm: Any, fast: Any, reference: Any, adapter: str | None = None, created: float | None = None) -> Verdict:
    """The cached verdict for this checkpoint and adapter version, or a fresh comparison (then cached)."""
    key = identity(lm, adapter, created, fast.head8 is not None)
    verdict = cached(key)
    if verdict is None:
        verdict = compare(fast, reference, lm.tokenizer, adapter)
        remember(key, verdict)
    return verdict
