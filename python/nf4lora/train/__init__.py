"""The trainer behind ``nf4lora finetune``: the loop with checkpoints, resume, DDP and evaluation
(loop.py), the data sets and batching (data.py), the loss-curve plot (plot.py), and the CPU
speed-ups it switches on where they pay (head_loss.py: the lm_head + cross entropy in vocabulary
chunks; cpu_attention.py: fp32 attention on CPUs whose bf16 GEMMs are slow)."""
from .loop import CausalLMLoss, TrainOptions, evaluate, finetune

__all__ = ["CausalLMLoss", "TrainOptions", "evaluate", "finetune"]
