"""Model loading: transformers folders (safetensors, read tensor by tensor), GGUF files and
transformers + bitsandbytes *-bnb-4bit checkpoints, quantized to Linear4bit as they are read."""
from .models import default_model_path, load_model

__all__ = ["default_model_path", "load_model"]
