"""Optimizers with fused native steps: AdamW and Lion (siblings over optim/base.py), fp32 or
bitsandbytes-format 8-bit state, paged (optim/paging.py) or not."""
from .adamw import AdamW, AdamW8bit, PagedAdamW, PagedAdamW8bit
from .base import BLOCK, MIN_8BIT_SIZE, MIN_PAGED_SIZE, FusedOptimizer, state_bytes_per_param
from .lion import Lion, Lion8bit, PagedLion, PagedLion8bit

__all__ = ["AdamW", "AdamW8bit", "BLOCK", "FusedOptimizer", "Lion", "Lion8bit", "MIN_8BIT_SIZE",
           "MIN_PAGED_SIZE", "PagedAdamW", "PagedAdamW8bit", "PagedLion", "PagedLion8bit",
           "state_bytes_per_param"]
