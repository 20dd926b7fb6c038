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


def save_tiny_gguf(path: Path, seed: int = 0) -> Path:
    """Writes a tiny Llama as a GGUF file (1 layer, hidden 64, fp32 tensors, a byte-level gpt2
    tokenizer of 260 tokens) with the gguf package's writer; nf4lora.load_model reads it in ~0.3 s."""
    import gguf
    import numpy as np
    rng = np.random.default_rng(seed)
    H, F, NH, NKV, V = 64, 128, 4, 2, 260
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(128)
    w.add_embedding_length(H)
    w.add_block_count(1)
    w.add_feed_forward_length(F)
    w.add_head_count(NH)
    w.add_head_count_kv(NKV)
    w.add_rope_dimension_count(H // NH)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(V)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([bytes([b]).decode("latin-1") for b in range(256)] + ["ab", "<s>", "</s>", "<pad>"])
    w.add_token_types([1] * 257 + [3] * 3)
    w.add_token_merges(["a b"])
    w.add_token_scores([0.0] * V)
    w.add_bos_token_id(257)
    w.add_eos_token_id(258)
    shapes = {"token_embd.weight": (V, H), "output_norm.weight": (H,), "output.weight": (V, H),
              "blk.0.attn_q.weight": (H, H), "blk.0.attn_k.weight": (H // NH * NKV, H),
              "blk.0.attn_v.weight": (H // NH * NKV, H), "blk.0.attn_output.weight": (H, H),
              "blk.0.ffn_gate.weight": (F, H), "blk.0.ffn_up.weight": (F, H), "blk.0.ffn_down.weight": (H, F),
              "blk.0.attn_norm.weight": (H,), "blk.0.ffn_norm.weight": (H,)}
    for name, shape in shapes.items():
        w.add_tensor(name, (rng.standard_normal(shape) * 0.05).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
