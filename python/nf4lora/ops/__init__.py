"""The op layer: the only code that touches the native core ``nf4lora._C``.

    native.py    loads _C; dtype/quant-type codes, codebook tables, CPU variant switch
    weight.py    Weight4bit, the one form of a 4-bit weight the ops take
    checks.py    argument checks (shared by fakes and kernels)
    library.py   every nf4lora:: custom op: schema, fake, and the per-device registration
    cpu.py       CPU implementations          cuda.py   CUDA implementations
    matmul.py    the 4-bit product with autograd, as the layers above call it
    dispatch.py  DISPATCH: every machine-dependent routing choice, in one object
    optim.py     the fused optimizer steps' native entry points (a table)
    memory.py    CUDA managed memory for paged optimizer state
    buffers.py   huge-page output buffers and per-thread scratch
    attention.py the CPU attention routes calibration chooses among (torch sdpa, no _C)

Layers above import from here (``from ..ops import ...``), never from _C."""
from . import cpu, cuda, library
from .attention import attend
from .checks import check_blocksize, check_float_dtype, check_quant_type, num_blocks
from .dispatch import DISPATCH, DispatchPolicy
from .matmul import dequantized, matmul_4bit
from .native import (BUILD_INFO, FLOAT_DTYPES, active_cpu_variant, codebook, cpu_variants, dynamic_map,
                     has_cuda, set_cpu_variant, use_cpu_variant)
from .weight import Weight4bit, packed_bytes

library.register("cpu", cpu)
library.register("cuda", cuda)

__all__ = [
    "BUILD_INFO", "DISPATCH", "attend", "DispatchPolicy", "FLOAT_DTYPES", "Weight4bit", "active_cpu_variant",
    "check_blocksize", "check_float_dtype", "check_quant_type", "codebook", "cpu_variants",
    "dequantized", "dynamic_map", "has_cuda", "matmul_4bit", "num_blocks", "packed_bytes",
    "set_cpu_variant", "use_cpu_variant",
]
