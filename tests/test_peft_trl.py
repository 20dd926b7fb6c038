"""PEFT and TRL over nf4lora's 4-bit layers: peft.get_peft_model with PeftLoraLinear4bit
(nf4lora.peft_layers, PEFT's custom-module registration) gives nf4lora's own LoRA outputs for the
same A and B; TRL's SFTTrainer fine-tunes such a tiny Llama on the CPU for a few steps with falling
loss, and the PEFT adapter it saves loads in nl.load_adapter with the same logits."""
import pytest
import torch

import nf4lora as nl

from .tiny_lm import make_tokenizer, tiny_config

transformers = pytest.importorskip("transformers", reason="needs transformers")
peft = pytest.importorskip("peft", reason="PEFT over nf4lora's layers needs peft")
pytestmark = pytest.mark.filterwarnings("ignore:Unsupported layer type:UserWarning")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _quantized_tiny(seed=0):
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(tiny_config())
    nl.quantize_model(model, compute_dtype=None)
    return model


def test_peft_over_linear4bit_matches_nf4lora_lora(tmp_path):
    from nf4lora.peft_layers import PeftLoraLinear4bit, register
    model = _quantized_tiny()
    pm = peft.get_peft_model(model, register(peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)))
    layers = [m for m in pm.modules() if isinstance(m, PeftLoraLinear4bit)]
    assert len(layers) == 14
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in layers:
            m.lora_B["default"].weight.copy_(torch.randn(m.lora_B["default"].weight.shape, generator=g) * 0.1)
    x = torch.randint(0, 259, (2, 9))
    with torch.no_grad():
        theirs = pm(x).logits
    pm.save_pretrained(tmp_path / "a")
    ours = nl.load_adapter(_quantized_tiny(), tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, theirs, rtol=1e-5, atol=1e-5)
        base = _quantized_tiny()(x).logits
    assert (base - theirs).abs().max() > 1e-2          # the adapter changes the output
    with pytest.raises(NotImplementedError, match="merge_and_unload"):
        pm.merge_and_unload()


def test_trl_sft_trainer_fine_tunes_a_4bit_model(tmp_path):
    trl = pytest.importorskip("trl", reason="TRL's SFTTrainer (the test extra) is not installed")
    datasets = pytest.importorskip("datasets", reason="TRL needs datasets")
    from nf4lora.peft_layers import register
    tok = make_tokenizer()
    model = _quantized_tiny()
    # lm_head trained in full too: a random tiny model's head (init std 0.02) cannot make confident logits
    pm = peft.get_peft_model(model, register(peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS,
                                                             modules_to_save=["lm_head"])))
    rows = [{"text": "abcd " * 8} for _ in range(32)]   # one pattern: a tiny random model learns it in steps
    args = trl.SFTConfig(output_dir=str(tmp_path / "out"), max_steps=12, per_device_train_batch_size=8,
                         learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                         max_length=48, seed=0, lr_scheduler_type="constant", bf16=False)
    trainer = trl.SFTTrainer(model=pm, args=args, train_dataset=datasets.Dataset.from_list(rows),
                             processing_class=tok)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses
    pm.save_pretrained(tmp_path / "adapter")
    ours = nl.load_adapter(_quantized_tiny(), tmp_path / "adapter")
    x = torch.randint(0, 259, (2, 9))
    pm.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, pm(x).logits, rtol=1e-5, atol=1e-5)
