"""A tiny randomly initialised Llama (2 layers, hidden 64) and a byte-level tokenizer with a chat
template, saved as a transformers folder: what the loading / fine-tuning / CLI tests run on, in
seconds and without downloads."""
from __future__ import annotations

from pathlib import Path

import torch


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    specials = ["<|im_start|>", "<|im_end|>", "<pad>"]
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for s in specials:
        vocab[s] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<pad>")
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return tok


def tiny_config(**overrides):
    from transformers import LlamaConfig
    kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=259, max_position_embeddings=256, tie_word_embeddings=False)
    kw.update(overrides)
    return LlamaConfig(**kw)


def save_tiny_model(folder: Path, seed: int = 0, **overrides) -> Path:
    """Writes a tiny Llama (fp32 safetensors) + tokenizer into folder and returns it."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(**overrides))
    model.save_pretrained(str(folder))
    make_tokenizer().save_pretrained(str(folder))
    return folder
