#!/usr/bin/env python3
"""Writes tests/data/chat/<case>/expected.json: what transformers' apply_chat_template
renders for a few prompt/response pairs with the chat template of
tests/data/chat/<case>/tokenizer_config.json, which the engine's SFT formatting must
reproduce. Needs transformers and tokenizers; the tests read only the committed output.

    python tools/chat_template_reference.py
"""

import json
from pathlib import Path

from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parent.parent / "tests" / "data" / "chat"

PAIRS = [
    ("What is 2 + 2?", "4"),
    ("  Write two lines.\n", "first line\nsecond line"),
    ("Übersetze: cat", "Katze ✓"),
    ("An empty answer?", ""),
]

SPECIALS = ["bos_token", "eos_token", "unk_token", "pad_token"]


def token_text(v):
    return v["content"] if isinstance(v, dict) else v


def tokenizer(config):
    """A tokenizer with the config's special tokens and template (no real vocabulary:
    only the rendered text is compared)."""
    specials = {k: token_text(config[k]) for k in SPECIALS if k in config}
    vocab = {t: i for i, t in enumerate(dict.fromkeys(["[unk]", *specials.values()]))}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="[unk]")), **specials
    )
    tok.chat_template = config["chat_template"]
    return tok


def main():
    for case in sorted(p for p in ROOT.iterdir() if p.is_dir()):
        config = json.loads((case / "tokenizer_config.json").read_text())
        tok = tokenizer(config)
        rows = []
        for prompt, response in PAIRS:
            user = {"role": "user", "content": prompt}
            assistant = {"role": "assistant", "content": response}
            head = tok.apply_chat_template([user], tokenize=False, add_generation_prompt=True)
            full = tok.apply_chat_template([user, assistant], tokenize=False)
            rows.append({"prompt": prompt, "response": response, "head": head, "full": full})
        out = case / "expected.json"
        out.write_text(json.dumps(rows, indent=2, ensure_ascii=False) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
