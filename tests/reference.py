"""Pure-PyTorch reference of the 4-bit format (tests only): the top of the three tiers
(PyTorch reference -> scalar C++ -> SIMD/CUDA). Written from DESIGN.md's literal tables, not
from nf4lora._C, so that the native header is checked against an independent spec."""
from __future__ import annotations

import torch

NF4_LITERAL = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]
# FP4, bit 3 = sign, magnitudes in bit-pattern order, divided by 12 in fp32; code 8 is +0.0
# exactly as in bitsandbytes' table (which writes it as the integer -0).
FP4_RAW = [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0]


def codebook(quant_type: str) -> torch.Tensor:
    if quant_type == "nf4":
        return torch.tensor(NF4_LITERAL, dtype=torch.float32)
    return torch.tensor(FP4_RAW, dtype=torch.float32) / torch.tensor(12.0)


def bounds(quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 midpoints of the ascending codebook, code of each ascending position)."""
    code = codebook(quant_type)
    order = torch.argsort(code, stable=True)  # the zeros tie: code 0 before code 8
    ascending = code[order]
    return (ascending[:-1] + ascending[1:]) / 2, order


def quantize_4bit(A: torch.Tensor, blocksize: int, quant_type: str):
    """(packed uint8 [(n+1)//2, 1], absmax fp32) with NaN/Inf blocks in canonical form."""
    flat = A.reshape(-1).float()
    n = flat.numel()
    nb = -(-n // blocksize)
    padded = torch.zeros(nb * blocksize, dtype=torch.float32)
    padded[:n] = flat
    blocks = padded.view(nb, blocksize)
    finite = torch.isfinite(blocks).all(dim=1)
    absmax = blocks.abs().nan_to_num(0.0, 0.0, 0.0).amax(dim=1)
    scale = torch.tensor(1.0) / absmax.clamp(min=1e-38)
    scaled = blocks * scale[:, None]
    scaled[~finite] = 0.0
    mids, order = bounds(quant_type)
    codes = order[torch.bucketize(scaled.reshape(-1), mids, right=False)].to(torch.uint8)
    codes = codes[: n + (n % 2)]
    packed = (codes[0::2] << 4) | codes[1::2]
    absmax[~finite] = float("nan")
    return packed.unsqueeze(1), absmax


def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str,
                    shape, dtype: torch.dtype) -> torch.Tensor:
    flat = packed.reshape(-1)
    n = 1
    for s in shape:
        n *= s
    codes = torch.stack([flat >> 4, flat & 15], dim=1).reshape(-1)[:n].long()
    values = codebook(quant_type)[codes]
    scale = absmax.float().repeat_interleave(blocksize)[:n]
    return (values * scale).to(dtype).reshape(shape)


def quantize_blockwise_8bit(A: torch.Tensor, code: torch.Tensor, blocksize: int):
    flat = A.reshape(-1).float()
    n = flat.numel()
    nb = -(-n // blocksize)
    padded = torch.zeros(nb * blocksize)
    padded[:n] = flat
    blocks = padded.view(nb, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = blocks * (torch.tensor(1.0) / absmax.clamp(min=1e-38))[:, None]
    mids = (code[:-1] + code[1:]) / 2
    q = torch.bucketize(scaled.reshape(-1), mids, right=False).to(torch.uint8)[:n]
    return q.reshape(A.shape), absmax


def nested_absmax(qabsmax, nested_absmax, nested_code, offset, nested_blocksize=256):
    scale = nested_absmax.repeat_interleave(nested_blocksize)[: qabsmax.numel()]
    return nested_code[qabsmax.long()] * scale + offset
