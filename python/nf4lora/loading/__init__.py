"""Model loading: transformers folders (safetensors, read tensor by tensor), GGUF files and
transformers + bitsandbytes *-bnb-4bit checkpoints, quantized to Linear4bit as they are read; the base an adapter was trained on
(LoftQ/PiSSA rebuilt, adapter_base.py); the merged model written as GGUF (gguf_export.py)."""
from .adapter_base import load_model_for_adapter
from .models import default_model_path, load_model

__all__ = ["default_model_path", "load_model", "load_model_for_adapter"]
