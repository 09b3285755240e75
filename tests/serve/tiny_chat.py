"""A tiny random Mixtral with a tokenizer and chat template, built offline, for the user-surface tests.

The tokenizer is character-level over printable ASCII plus filler words, so any id the random model
samples decodes to text; ChatML special tokens give it a real chat template and an EOS.
"""

from __future__ import annotations

import string
from pathlib import Path

from tests.tiny_models import TINY_CONFIGS, build_tiny_model
from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<unk>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """Characters first, then filler words up to exactly vocab_size entries."""
    chars = [c for c in string.printable if c not in "\r\x0b\x0c"]
    tokens = SPECIALS + chars
    words = ["the", " cat", " sat", " on", " mat", "ing", " and", " of", " to", " a", "é", "€"]
    i = 0
    while len(tokens) < vocab_size:
        tokens.append(words[i] if i < len(words) else f"w{i}")
        i += 1
    vocab = {t: n for n, t in enumerate(tokens[:vocab_size])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<|im_start|>", eos_token="<|im_end|>",
        pad_token="<|im_end|>", chat_template=CHAT_TEMPLATE,
    )


def build_tiny_chat_model(path: str | Path, seed: int = 0) -> Path:
    """Write model (BF16 Mixtral, context 256) + tokenizer to path; EOS is <|im_end|> (id 2)."""
    path = Path(path)
    model = build_tiny_model("mixtral", seed=seed)
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 2
    model.save_pretrained(path)
    build_tokenizer(TINY_CONFIGS["mixtral"]["vocab_size"]).save_pretrained(path)
    return path
