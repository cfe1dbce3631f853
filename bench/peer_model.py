"""The peer's input: the random GPT-OSS-20B-shaped slice (bench/shapes.py) written as an official-layout
MXFP4 checkpoint, the way openai/gpt-oss-20b ships it, so llama.cpp's own converter takes it and our
engine loads the very same files (engine/serve/mxfp4_load.py).

    python bench/peer_model.py OUT [--layers 24] [--rank 16] [--prompts 512,8192]

OUT/model: config.json (quantization_config mxfp4), one safetensors shard per layer with the experts'
`*_blocks`/`*_scales` as they are, and a tokenizer of the full 201,088-token vocabulary; OUT/lora: an
attention-only PEFT LoRA (llama.cpp's LoRA converter takes plain Linear targets, not the fused experts);
OUT/prompt-N.txt: texts of exactly N tokens, for llama.cpp's tools that take text (llama-completion).

The tokenizer: llama.cpp's converter wants a byte-level BPE vocabulary (its runtime looks up the 256 byte
tokens), which the engine's word-level test tokenizer is not. The real o200k merges are not on this
machine, so this builds one offline: the 256 byte tokens, merges up to id 199,997, GPT-OSS's special
tokens at their real ids and reserved tokens up to 201,087, with o200k's split pattern.
"""

from __future__ import annotations

import argparse
import json
import sys
from itertools import chain, islice
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

VOCAB = 201088
FIRST_SPECIAL = 199998  # GPT-OSS: <|startoftext|>; every id from here on is a special or reserved token
SPECIAL_IDS = {"<|startoftext|>": 199998, "<|endoftext|>": 199999, "<|return|>": 200002, "<|constrain|>": 200003,
               "<|channel|>": 200005, "<|start|>": 200006, "<|end|>": 200007, "<|message|>": 200008,
               "<|call|>": 200012}
# o200k's pre-tokenizer split (tiktoken's o200k_base, as tokenizer.json files of GPT-4o/GPT-OSS write it)
O200K_SPLIT = "|".join((
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"\p{N}{1,3}", r" ?[^\s\p{L}\p{N}]+[\r\n/]*", r"\s*[\r\n]+", r"\s+(?!\S)", r"\s+",
))
MXFP4_CONFIG = {"quant_method": "mxfp4", "modules_to_not_convert": [
    "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}


def byte_level_tokenizer(vocab_size: int = VOCAB):
    """A byte-level BPE tokenizer with exactly `vocab_size` ids: byte tokens, then merges of byte pairs
    and of pairs with a third byte (ids up to FIRST_SPECIAL - 1), then special and reserved tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    from engine.harmony import SPECIAL_TOKENS

    assert set(SPECIAL_IDS) == set(SPECIAL_TOKENS)
    chars = sorted(ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(chars)}
    pairs = ((a, b) for a in chars for b in chars)
    triples = ((a + b, c) for a in chars for b in chars for c in chars)
    merges = list(islice(chain(pairs, triples), FIRST_SPECIAL - len(vocab)))
    vocab.update({left + right: len(vocab) + i for i, (left, right) in enumerate(merges)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(O200K_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    names = {i: name for name, i in SPECIAL_IDS.items()}
    tok.add_special_tokens([names.get(i, f"<|reserved_{i}|>") for i in range(FIRST_SPECIAL, vocab_size)])
    assert tok.get_vocab_size() == vocab_size and all(tok.token_to_id(t) == i for t, i in SPECIAL_IDS.items())
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|return|>",
                                   pad_token="<|endoftext|>")


def write_prompts(folder: Path, counts: list[int], tokenizer) -> None:
    """prompt-N.txt of exactly N tokens for llama.cpp's text tools: random one-letter words, each " x" one
    byte-pair token under o200k's split, checked against the tokenizer."""
    import random

    rng = random.Random(0)
    for n in counts:
        text = " ".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(n))
        got = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        if got != n:
            raise RuntimeError(f"prompt-{n}.txt came out as {got} tokens")
        (folder / f"prompt-{n}.txt").write_text(text)


def write_checkpoint(folder: Path, layers: int, device: str, tokenizer) -> Path:
    """The random MXFP4 slice (bench/shapes.random_mxfp4_model, seed 0) as safetensors shards, one per
    layer plus one for embeddings, final norm and lm_head, with an index and an mxfp4 config."""
    import torch
    from safetensors.torch import save_file

    from bench.shapes import gpt_oss_20b_config, random_mxfp4_model

    folder.mkdir(parents=True, exist_ok=True)
    cfg = gpt_oss_20b_config(layers)
    model = random_mxfp4_model(layers, device, torch.bfloat16, config=cfg)
    shards: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in model.state_dict().items():
        part = key.split(".")[2] if key.startswith("model.layers.") else "rest"
        shards.setdefault(part, {})[key] = t
    weight_map, total = {}, 0
    names = sorted(shards, key=lambda p: -1 if p == "rest" else int(p))
    for n, part in enumerate(names):
        file = f"model-{n + 1:05d}-of-{len(names):05d}.safetensors"
        tensors = {k: t.detach().to("cpu").contiguous() for k, t in shards.pop(part).items()}
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    cfg.quantization_config, cfg.architectures = MXFP4_CONFIG, ["GptOssForCausalLM"]
    cfg.eos_token_id, cfg.pad_token_id = SPECIAL_IDS["<|return|>"], SPECIAL_IDS["<|endoftext|>"]
    cfg.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_lora(folder: Path, model_folder: Path, rank: int, device: str) -> Path:
    """An attention-only random LoRA over the checkpoint just written, as a PEFT folder whose
    base_model_name_or_path is that checkpoint (llama.cpp's LoRA converter reads the base's config)."""
    import torch

    from bench.shapes import random_lora
    from engine.serve.mxfp4_load import load

    model = load(model_folder, device, torch.bfloat16)
    model.name_or_path = str(model_folder)
    random_lora(model, folder, seed=11, rank=rank, experts=False)
    return folder


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--prompts", default="512,8192", help="prompt lengths to write as prompt-N.txt")
    a = ap.parse_args()
    if a.layers < 1:
        raise SystemExit(f"--layers: expected a positive number of layers, got {a.layers}")
    try:
        prompts = [int(n) for n in a.prompts.split(",")]
    except ValueError:
        prompts = [0]
    if min(prompts) < 1:
        raise SystemExit(f"--prompts: expected comma-separated positive token counts, got {a.prompts!r}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = byte_level_tokenizer()
    a.out.mkdir(parents=True, exist_ok=True)
    write_prompts(a.out, prompts, tokenizer)
    model = write_checkpoint(a.out / "model", a.layers, device, tokenizer)
    if device == "cuda":
        torch.cuda.empty_cache()
    write_lora(a.out / "lora", model, a.rank, device)
    print(f"wrote {model}, {a.out / 'lora'} ({a.layers} layers) and prompts of {a.prompts} tokens")


if __name__ == "__main__":
    main()
