"""LoRA / QLoRA trainer producing store-ready adapters (issue 4)."""
