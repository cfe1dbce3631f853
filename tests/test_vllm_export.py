"""`tandem adapters export`: a specialist as the PEFT folder vLLM's GPT-OSS LoRA loader reads, and the
`vllm serve` command. vLLM cannot run here; what is checked is the layout its loader assumes
(vllm/lora/model_manager.py `_stack_moe_lora_weights`) and that the folder is a standard PEFT adapter
that answers exactly as the stored specialist does."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from engine.store.adapters import AdapterError, AdapterStore, Manifest
from engine.store.vllm_export import MARKER, ExportError, convert, export, serve_command
from tests.test_cli import tandem


def publish(settings, demo_model_dir, name, params, seed=0):
    """A random (non-zero) LoRA on attention and the given expert parameters, in the store."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], target_parameters=params,
                     init_lora_weights=False)
    out = settings.root / "made" / name
    get_peft_model(base, cfg).save_pretrained(out)
    manifest = Manifest(name=name, task=name, base_model=f"demo:{demo_model_dir.name}", prompts=["x"])
    return AdapterStore(settings.adapters_dir).publish(out, manifest)


def logits(demo_model_dir, adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        return model(torch.tensor([[5, 17, 42, 99, 3, 250, 7]])).logits


def store(settings, demo_model_dir):
    return AdapterStore(settings.adapters_dir, base_model=f"demo:{demo_model_dir.name}")


def test_the_export_is_vllms_layout_and_answers_as_the_specialist(settings, demo_model_dir, tmp_path):
    stored = publish(settings, demo_model_dir, "math", ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"], seed=1)
    done = export(store(settings, demo_model_dir), "math", tmp_path / "out", str(demo_model_dir))
    assert done.path == tmp_path / "out" / "math" and done.rank == 4 and not done.reordered
    cfg = json.loads((done.path / "adapter_config.json").read_text())
    assert cfg["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    assert cfg["base_model_name_or_path"] == str(demo_model_dir) and cfg["r"] == 4
    hf = json.loads((demo_model_dir / "config.json").read_text())
    experts, inter, hidden = hf["num_local_experts"], hf["intermediate_size"], hf["hidden_size"]
    t = load_file(done.path / "adapter_model.safetensors")
    layer = "base_model.model.model.layers.0.mlp.experts"
    # vLLM: experts.base_layer is gate_up_proj, experts is down_proj; A (experts*r, in), B (out, r*experts)
    assert t[f"{layer}.base_layer.lora_A.weight"].shape == (experts * 4, hidden)
    assert t[f"{layer}.base_layer.lora_B.weight"].shape == (2 * inter, 4 * experts)
    assert t[f"{layer}.lora_A.weight"].shape == (experts * 4, inter)
    assert t[f"{layer}.lora_B.weight"].shape == (hidden, 4 * experts)
    # a standard PEFT folder that answers exactly as the stored specialist
    assert torch.allclose(logits(demo_model_dir, done.path), logits(demo_model_dir, stored.path), atol=1e-5)


def test_expert_wrappers_nested_the_other_way_round_are_put_in_vllms_order(settings, demo_model_dir):
    """Another PEFT may nest down_proj inside: vLLM would load each into the other's buffer, silently."""
    stored = publish(settings, demo_model_dir, "math", ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    config = json.loads((stored.path / "adapter_config.json").read_text())
    right = load_file(stored.path / "adapter_model.safetensors")

    def swapped(key):
        if ".experts.base_layer." in key:
            return key.replace(".experts.base_layer.", ".experts.")
        return key.replace(".experts.", ".experts.base_layer.") if ".experts." in key else key

    _, tensors, reordered = convert(config, {swapped(k): v for k, v in right.items()})
    assert reordered and tensors.keys() == right.keys()
    assert all(torch.equal(tensors[k], right[k]) for k in right)
    _, tensors, reordered = convert(config, right)
    assert not reordered and all(torch.equal(tensors[k], right[k]) for k in right)


def test_what_vllm_cannot_serve_is_refused_with_a_reason(settings, demo_model_dir, tmp_path):
    publish(settings, demo_model_dir, "half", ["mlp.experts.gate_up_proj"])
    with pytest.raises(ExportError, match="both gate_up_proj and down_proj"):
        export(store(settings, demo_model_dir), "half", tmp_path / "out", "base")
    with pytest.raises(AdapterError, match="no adapter named"):
        export(store(settings, demo_model_dir), "missing", tmp_path / "out", "base")
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_cli_exports_and_prints_the_vllm_command_for_every_export(settings, settings_path, demo_model_dir,
                                                                  tmp_path):
    for i, name in enumerate(("math", "code")):
        publish(settings, demo_model_dir, name, ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"], seed=i)
    out = tmp_path / "vllm"
    first = tandem("adapters", "export", "math", str(out))
    assert first.returncode == 0, first.stderr
    r = tandem("adapters", "export", "code", str(out), "--tensor-parallel-size", "2")
    assert r.returncode == 0, r.stderr
    command = r.stdout.strip()
    assert command.startswith("vllm serve ") and "--enable-lora" in command
    assert f"--lora-modules code={out / 'code'} math={out / 'math'}" in command
    assert "--max-lora-rank 8" in command and "--max-loras 2" in command and "--tensor-parallel-size 2" in command
    assert "--served-model-name base" in command
    assert command == serve_command(str(demo_model_dir), out, 2)
    again = tandem("adapters", "export", "math", str(out))  # an earlier export is replaced
    assert again.returncode == 0 and (out / "math" / MARKER).is_file()
    (out / "mine").mkdir()
    (out / "mine" / "notes.txt").write_text("keep")
    publish(settings, demo_model_dir, "mine", ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    refused = tandem("adapters", "export", "mine", str(out))
    assert refused.returncode == 1 and "is not a Tandem export" in refused.stderr
    assert (out / "mine" / "notes.txt").read_text() == "keep"
