"""Shared fixtures: one demo model per test run, and a private settings file per test."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def in_triton_interpreter(code: str, done: str) -> None:
    """Run `code` in a fresh Python with Triton's CPU interpreter on (TRITON_INTERPRET must be set before
    triton loads, so never in this process): the GPU kernels' arithmetic checked without a GPU. Passes
    when it exits 0 having printed `done`."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and done in out.stdout, out.stderr[-3000:]


ROUTER_TASKS = ("math", "code", "translate")  # the shipped samples' specialists


def sample_prompts(task: str, n: int = 20) -> list[str]:
    """The first `n` distinct user prompts of data/samples/{task}.jsonl: a specialist's router examples."""
    from engine.train.dataset import load_examples

    every = load_examples(str(ROOT / "data" / "samples" / f"{task}.jsonl")).examples
    return list(dict.fromkeys(e.user_prompt for e in every))[:n]


@pytest.fixture(scope="module")
def router():
    """As the engine builds it: a specialist per shipped sample set, each named for its task
    (`tandem train --task math`)."""
    from engine.serve.router import Router

    return Router(threshold=0.4).fit({t: sample_prompts(t) for t in ROUTER_TASKS},
                                     names={t: t for t in ROUTER_TASKS})


def terminal_sigint() -> None:
    """`preexec_fn` for a child a test stops with Ctrl+C: SIGINT as a terminal delivers it. A test run started
    as a background job (a script's `cmd &`) ignores SIGINT, and a child inherits that through exec."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
# Built once per checkout and shared by every test and test worker (engine.serve.demo_model locks the build).
os.environ.setdefault("TANDEM_CACHE", str(ROOT / ".pytest_cache" / "tandem-cache"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def demo_model_dir() -> Path:
    """The chat process serves the demo without unsloth (engine/serve/model.py imports it only for a
    bitsandbytes 4-bit checkpoint), so the tests do not import it either; training runs in its own process."""
    from engine.serve.demo_model import demo_model_path

    return demo_model_path()


@pytest.fixture
def settings_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the shipped settings.toml in a temp folder, with TANDEM_SETTINGS pointing at it."""
    path = tmp_path / "settings.toml"
    shutil.copy(ROOT / "settings.toml", path)
    monkeypatch.setenv("TANDEM_SETTINGS", str(path))
    return path


@pytest.fixture
def settings(settings_path: Path):
    from engine.settings import load

    return load(settings_path)


@pytest.fixture
def engine(settings, demo_model_dir):
    from engine.serve.chat import Engine
    from engine.store.history import History

    eng = Engine(settings, history=History(settings.history_db))
    eng.load()
    yield eng
    eng.close()
    eng.history.close()


TINY_PROFILE = """
[training.profiles.tiny]
max_steps = 12
max_samples = 64
batch_size = 2
grad_accum = 1
learning_rate = 0.002
warmup_steps = 1
save_steps = 4
max_seq_length = 256
"""


@pytest.fixture
def train_settings(settings_path: Path):
    """Settings with a 'tiny' profile that trains in a few seconds on the demo model."""
    from engine.settings import load

    settings_path.write_text(settings_path.read_text() + TINY_PROFILE)
    return load(settings_path)


@pytest.fixture
def make_adapter(make_adapter_factory, settings):
    return make_adapter_factory(settings)


@pytest.fixture
def make_adapter_factory(demo_model_dir):
    """make_adapter_factory(settings)(name, prompts, seed): publish a randomly initialised (non-zero) LoRA
    on the demo model covering attention and experts."""
    return lambda settings: _adapter_maker(settings, demo_model_dir)


def _adapter_maker(settings, demo_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from engine.store.adapters import AdapterStore, Manifest
    from engine.train.targets import FUSED_EXPERTS

    store = AdapterStore(settings.adapters_dir)

    def make(name: str, prompts: list[str], seed: int = 0, task: str | None = None, scale: float = 1.0):
        import torch

        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32)
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                         target_parameters=list(FUSED_EXPERTS), init_lora_weights=False)
        model = get_peft_model(base, cfg)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.mul_(scale)
        out = settings.root / "made" / f"{name}-{seed}"
        model.save_pretrained(out)
        manifest = Manifest(name=name, task=task or name, base_model=f"demo:{demo_model_dir.name}", prompts=prompts)
        return store.publish(out, manifest)

    return make


@pytest.fixture(autouse=True, scope="module")
def transformers_own_gpt_oss():
    """Each test module starts with transformers' own GPT-OSS classes. unsloth swaps GptOssTopKRouter and
    GptOssExperts in `modeling_gpt_oss` for its bitsandbytes versions process-wide (a router whose weight
    lives at `router.linear`), so a demo model loaded later in the same test worker got a router that
    never read the checkpoint's weights: every expert tied. What a module's tests patch there is undone
    after them (module scope, so that it comes before the module's own module-scoped models load)."""
    import sys

    module = sys.modules.get("transformers.models.gpt_oss.modeling_gpt_oss")
    saved = dict(vars(module)) if module is not None else None
    for name in ("GptOssTopKRouter", "GptOssExperts"):  # swapped before this module: the originals
        if module is not None and hasattr(module, f"_original_{name}"):
            setattr(module, name, getattr(module, f"_original_{name}"))
    yield
    if module is not None and saved is not None:
        for name, value in saved.items():
            if vars(module).get(name) is not value:
                setattr(module, name, value)
