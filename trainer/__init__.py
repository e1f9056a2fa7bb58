"""LoRA / QLoRA trainer producing store-ready adapters (`loraserve.trainer`)."""
