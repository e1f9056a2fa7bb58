"""Batched multi-adapter LoRA: slot buffers, the layers that do the math, adapter parsing."""
