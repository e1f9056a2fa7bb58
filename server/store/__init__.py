"""The adapter store on disk: PEFT layout, safetensors only, validation before use."""
