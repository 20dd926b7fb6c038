"""4-bit quantization as users call it: QuantState (bitsandbytes' state-dict format), the
functional API (quantize_4bit, dequantize_4bit, matmul_4bit) and the Linear4bit module with
quantize_model. Built on the op layer (nf4lora.ops)."""
from .functional import dequantize_4bit, matmul_4bit, quantize_4bit
from .linear import Linear4bit, quantize_model
from .state import QuantState

__all__ = ["Linear4bit", "QuantState", "dequantize_4bit", "matmul_4bit", "quantize_4bit", "quantize_model"]
