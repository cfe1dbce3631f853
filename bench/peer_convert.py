"""Run llama.cpp's own converters (convert_hf_to_gguf.py, convert_lora_to_gguf.py) on the peer's model.

    python bench/peer_convert.py LLAMA_CPP_DIR convert_hf_to_gguf.py|convert_lora_to_gguf.py [ARGS...]

The converter names a BPE pre-tokenizer by hashing how the tokenizer encodes a test text, and knows only
the hashes of published vocabularies. bench/peer_model.py's tokenizer splits text exactly as o200k does
(GPT-4o's and GPT-OSS's pattern) but has made-up merges, since the real ones are not on this machine, so its
hash is unknown. Here that one tokenizer is named "gpt-4o", the pre-tokenizer llama.cpp then applies;
any other tokenizer goes through the converter's own check. Nothing else of the converter changes.
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

SCRIPTS = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py")


def splits_like_o200k(tokenizer) -> bool:
    """Whether `tokenizer` pre-tokenizes exactly as bench/peer_model.py's: o200k's split, then bytes."""
    from bench.peer_model import O200K_SPLIT

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    pre = json.loads(backend.to_str()).get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [])
    return (len(steps) == 2 and steps[0].get("type") == "Split"
            and steps[0].get("pattern", {}).get("Regex") == O200K_SPLIT and steps[1].get("type") == "ByteLevel")


def main() -> None:
    if len(sys.argv) < 3 or sys.argv[2] not in SCRIPTS:
        raise SystemExit(f"usage: {Path(sys.argv[0]).name} LLAMA_CPP_DIR {'|'.join(SCRIPTS)} [ARGS...]")
    llama = Path(sys.argv[1]).resolve()
    script = llama / sys.argv[2]
    if not script.is_file():
        raise SystemExit(f"{script}: no such converter (LLAMA_CPP_DIR must be the unpacked llama.cpp)")
    sys.path[:0] = [str(llama), str(llama / "gguf-py")]
    from conversion.base import TextModel

    hashed = TextModel.get_vocab_base_pre

    def named(self, tokenizer) -> str:
        return "gpt-4o" if splits_like_o200k(tokenizer) else hashed(self, tokenizer)

    TextModel.get_vocab_base_pre = named
    sys.argv = [str(script), *sys.argv[3:]]
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()
