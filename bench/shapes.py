"""GPT-OSS-20B's real shape, with random weights: the honest way to measure speed and memory without
the real checkpoint. `layers` below 24 gives a full-width slice (same width, experts and vocab)."""

from __future__ import annotations

from pathlib import Path


def cap_memory(cap_gb: float) -> None:
    """Hold this process to `cap_gb` GiB of GPU 0, as a smaller card would (0, or no GPU: no cap)."""
    import torch

    if torch.cuda.is_available() and cap_gb:
        torch.cuda.set_per_process_memory_fraction(cap_gb * 2**30 / torch.cuda.get_device_properties(0).total_memory)


def gpt_oss_20b_config(layers: int = 24):
    from transformers import GptOssConfig

    return GptOssConfig(
        vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_hidden_layers=layers,
        num_attention_heads=64, num_key_value_heads=8, head_dim=64, num_local_experts=32, num_experts_per_tok=4,
        sliding_window=128, layer_types=["sliding_attention", "full_attention"] * (layers // 2) + (
            ["sliding_attention"] if layers % 2 else []),
        max_position_embeddings=131072, tie_word_embeddings=False,
    )


def random_model(layers: int = 24, device: str = "cuda", dtype=None):
    """A GPT-OSS-20B-shaped model with random weights, built directly on `device`."""
    import torch
    from transformers import GptOssForCausalLM

    torch.manual_seed(0)
    cfg = gpt_oss_20b_config(layers)
    with torch.device(device):
        model = GptOssForCausalLM._from_config(cfg, dtype=dtype or torch.bfloat16)
    return model.eval()


def random_mxfp4_model(layers: int = 24, device: str = "cuda", dtype=None, config=None):
    """The same shape with its experts in MXFP4 (random codes, scales near 2^-7: weights of the order of
    the bf16 model's), built without ever holding bf16 experts."""
    import torch
    from transformers import GptOssForCausalLM

    from engine.serve.mxfp4 import install

    torch.manual_seed(0)
    cfg = config or gpt_oss_20b_config(layers)
    with torch.device("meta"):
        model = GptOssForCausalLM._from_config(cfg, dtype=dtype or torch.bfloat16)
    experts = install(model, dtype or torch.bfloat16, device)
    model.to_empty(device=device)
    for name, t in model.named_parameters():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):  # shape-only stand-ins
            continue
        if name.endswith("norm.weight") or "layernorm" in name:
            t.data.fill_(1.0)
        else:
            t.data.normal_(0, 0.02)
    for ex in experts:
        for p in ("gate_up_proj", "down_proj"):
            getattr(ex, f"{p}_blocks").random_(0, 256)
            getattr(ex, f"{p}_scales").random_(119, 122)
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(cfg, device=device)
    return model.eval()


def random_adapter(model, name: str, seed: int, rank: int = 16, experts: bool = True):
    """Attach a random (non-zero) LoRA named `name` on attention + all experts (`experts=False`: attention
    only), as PEFT holds a loaded specialist; returns the PEFT model."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    from engine.train.targets import ATTENTION, lora_targets

    base = model.get_base_model() if isinstance(model, PeftModel) else model
    modules, params = lora_targets(base) if experts else (list(ATTENTION), [])
    torch.manual_seed(seed)
    cfg = LoraConfig(r=rank, lora_alpha=rank, target_modules=modules, target_parameters=params or None,
                     init_lora_weights=False)
    if isinstance(model, PeftModel):
        model.add_adapter(name, cfg)
    else:
        model = get_peft_model(model, cfg, adapter_name=name)
    return model.eval()


def save_slice(folder: Path, layers: int, tokenizer_from: Path) -> Path:
    """A full-width slice on disk (unsloth loads from a folder), with a harmony tokenizer; the tokenizer
    vocabulary is the demo's, padded ids beyond it are simply never produced by it."""
    import torch
    from transformers import AutoTokenizer

    if (folder / "config.json").exists():
        return folder
    model = random_model(layers, "cuda" if torch.cuda.is_available() else "cpu")
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(folder)
    del model
    torch.cuda.empty_cache()
    return folder


def wide_tokenizer(vocab_size: int = 201088):
    """A word-level tokenizer covering every id of the real vocabulary, with the harmony special tokens
    at their GPT-OSS ids, so a random-weight model of the real shape can be driven through the engine."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from engine.harmony import SPECIAL_TOKENS

    real_ids = {"<|startoftext|>": 199998, "<|endoftext|>": 199999, "<|return|>": 200002, "<|constrain|>": 200003,
                "<|channel|>": 200005, "<|start|>": 200006, "<|end|>": 200007, "<|message|>": 200008,
                "<|call|>": 200012}
    assert set(real_ids) == set(SPECIAL_TOKENS)
    vocab = {f"w{i}": i for i in range(vocab_size)}
    for tok, i in real_ids.items():
        vocab.pop(f"w{i}")
        vocab[tok] = i
    t = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    t.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|return|>", pad_token="<|endoftext|>")


def random_lora(model, folder: Path, seed: int, rank: int = 16, experts: bool = True) -> Path:
    """Save a random (non-zero) LoRA on attention + all experts of `model` (`experts=False`: attention
    only) as a PEFT folder."""
    import torch
    from peft import LoraConfig, get_peft_model

    from engine.train.targets import ATTENTION, lora_targets

    modules, params = lora_targets(model) if experts else (list(ATTENTION), [])
    torch.manual_seed(seed)
    cfg = LoraConfig(r=rank, lora_alpha=rank, target_modules=modules, target_parameters=params or None,
                     init_lora_weights=False)
    peft_model = get_peft_model(model, cfg, adapter_name="tmp")
    peft_model.save_pretrained(folder, selected_adapters=["tmp"])
    sub = folder / "tmp"
    if sub.exists():  # PEFT nests non-default adapter names
        for f in sub.iterdir():
            f.rename(folder / f.name)
        sub.rmdir()
    peft_model.unload()  # back to the plain model: the LoRA layers are taken out again
    return folder
