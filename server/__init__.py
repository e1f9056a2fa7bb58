"""loraserve: many LoRA adapters served on one quantized DeepSeek base."""

__version__ = "0.1.0"
