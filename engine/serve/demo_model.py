"""The embedded demo model: a tiny GPT-OSS built on first use so every feature runs without a GPU.

It is the real architecture at toy size (MoE with top-k routing, alternating sliding/full attention,
attention sinks) with a byte-level BPE tokenizer that carries the harmony special tokens, trained for
a few seconds on the shipped harmony samples so that it answers in the right structure (analysis,
then final). It knows nothing useful; it exists so the chat, adapters, router, trainer and UI can be
exercised end to end on a laptop or in CI. Built once and cached; a file lock lets parallel test
workers share one build.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

from engine.harmony import SPECIAL_TOKENS

DATA = Path(__file__).resolve().parent.parent / "data" / "demo_chat.jsonl"
# The demo ships GPT-OSS's chat template as a real checkpoint does, so the load-time template check
# (engine/serve/checkpoint_template.py) runs on it too. It is metadata, not part of the build: a changed
# template is written into the cached build, the weights stay.
TEMPLATE = DATA.with_name("gpt_oss_chat_template.jinja")
FIXED_DATE = date(2026, 1, 1)  # the demo renders a fixed date so a build is reproducible
PAD = "<|endoftext|>"
Progress = Callable[[str, float], None]  # (what is happening, fraction done)

TINY = dict(
    hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, num_local_experts=8, num_experts_per_tok=2, sliding_window=64,
    layer_types=["sliding_attention", "full_attention"], max_position_embeddings=2048,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False,
)
VOCAB = 1024
STEPS, BATCH, LR = 240, 16, 4e-3
BUILD_SHARE = 0.25  # of a first load's progress (the model load and compile come after)


def cache_root() -> Path:
    env = os.environ.get("TANDEM_CACHE")
    if env:
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("tandem"))


def _build_key() -> str:
    """What the build depends on: the training texts as rendered (so a harmony change rebuilds), the
    recipe's code and constants, and the library versions; not this file's docs or unrelated code."""
    import inspect
    from importlib.metadata import version

    recipe = [inspect.getsource(f) for f in (_tokenizer, build)] + [repr((TINY, VOCAB, STEPS, BATCH, LR))]
    parts = recipe + [p + c for p, c in _texts()] + [version("tokenizers"), version("transformers")]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:12]


def demo_model_path(progress: Progress | None = None) -> Path:
    """The cached demo model folder, built first if needed (under a lock). A build reports its progress
    as the first BUILD_SHARE of a model load's."""
    target = cache_root() / f"demo-gpt-oss-{_build_key()}"
    if (target / "config.json").exists():
        _ship_template(target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".demo-build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "config.json").exists():
            tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".build-"))
            try:
                build(tmp, progress and (lambda text, done: progress(text, BUILD_SHARE * done)))
                os.replace(tmp, target)  # readers never see a half-built model
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    _ship_template(target)
    return target


def _ship_template(folder: Path) -> None:
    """Make `folder/chat_template.jinja` TEMPLATE's text (atomically: other processes may be loading it)."""
    text = TEMPLATE.read_text()
    path = folder / "chat_template.jinja"
    try:
        if path.read_text() == text:
            return
    except OSError:
        pass
    tmp = path.with_name(f".chat_template.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _texts() -> list[tuple[str, str]]:
    from engine.harmony import render_example
    from engine.train.dataset import load_examples

    report = load_examples(str(DATA))
    return [render_example(ex.turns, ex.reasoning, ex.instructions, today=FIXED_DATE) for ex in report.examples]


def _tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=list(SPECIAL_TOKENS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|return|>", pad_token=PAD,
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in ("<|startoftext|>", "<|return|>", PAD)],
        model_max_length=TINY["max_position_embeddings"],
    )


def build(out: Path, progress: Progress | None = None) -> None:
    """Train the tokenizer and the tiny model on the demo samples and save both to `out`."""
    import torch
    from transformers import GptOssConfig, GptOssForCausalLM

    say = progress or (lambda _m, _f: None)
    started = time.monotonic()
    pairs = _texts()
    say("training the demo tokenizer", 0.02)
    tokenizer = _tokenizer([p + c for p, c in pairs])
    torch.manual_seed(0)
    config = GptOssConfig(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id, **TINY,
    )
    model = GptOssForCausalLM(config)
    ids, labels = [], []
    for prompt, completion in pairs:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        c = tokenizer(completion, add_special_tokens=False)["input_ids"]
        ids.append(p + c)
        labels.append([-100] * len(p) + c)
    width = max(map(len, ids))
    input_ids = torch.full((len(ids), width), tokenizer.pad_token_id)
    label_ids = torch.full((len(ids), width), -100)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, (x, y) in enumerate(zip(ids, labels, strict=True)):
        input_ids[i, : len(x)], label_ids[i, : len(y)], mask[i, : len(x)] = torch.tensor(x), torch.tensor(y), 1
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=STEPS, pct_start=0.1)
    gen = torch.Generator().manual_seed(0)
    model.train()
    steps_started = time.monotonic()  # the countdown extrapolates from the steps alone, not the tokenizer
    for step in range(STEPS):
        batch = torch.randint(0, len(ids), (BATCH,), generator=gen)
        loss = model(input_ids=input_ids[batch], attention_mask=mask[batch], labels=label_ids[batch]).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        if step % 10 == 0 and step:
            left = (time.monotonic() - steps_started) / step * (STEPS - step)
            say(f"building the demo model (first start only): step {step}/{STEPS}, ~{left:.0f} s left",
                0.05 + 0.9 * step / STEPS)
    model.eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    info = {"what": "Tandem embedded demo model (tiny GPT-OSS, toy weights)", "steps": STEPS,
            "final_loss": round(loss.item(), 4), "seconds": round(time.monotonic() - started, 1)}
    (out / "tandem_demo.json").write_text(json.dumps(info, indent=1))
    say("demo model ready", 1.0)
