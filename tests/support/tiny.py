"""Tiny in-process models for tests: a deterministic chat tokenizer and a seeded 2-layer Llama.

- ``make_tiny_tokenizer()``: byte-level BPE, 320 ids (256 bytes + merges + specials ``<|endoftext|>``
  = pad, ``<|im_start|>``, ``<|im_end|>`` = eos), trained on a few fixed sentences so it is the same
  in every run, with a ChatML chat template (no default system prompt). It does not add a BOS.
- ``make_tiny_model(tokenizer, seed=...)``: a seeded ``LlamaForCausalLM`` (2 layers, hidden 64,
  4 heads, 2 KV heads, vocab = ``len(tokenizer)``) in eval mode.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

TINY_VOCAB = 320
TINY_D_MODEL = 64
TINY_LAYERS = 2
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_TRAINING_TEXT = [
    "the quick brown fox jumps over the lazy dog",
    "hello, how are you today? fine, thanks. and you?",
    "what is your favourite colour? i like blue and green",
    "user assistant system",
]


def make_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A deterministic byte-level BPE tokenizer of ``TINY_VOCAB`` ids with a ChatML template."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_TRAINING_TEXT * 20, trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def make_tiny_model(tokenizer: PreTrainedTokenizerFast, seed: int = 0, **config: object) -> LlamaForCausalLM:
    """A seeded 2-layer Llama in eval mode; ``config`` overrides LlamaConfig fields."""
    settings: dict[str, object] = {
        "vocab_size": len(tokenizer),
        "hidden_size": TINY_D_MODEL,
        "intermediate_size": 128,
        "num_hidden_layers": TINY_LAYERS,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": None,
    }
    settings.update(config)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**settings)).eval()
