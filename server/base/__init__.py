"""Base models: building, loading and describing the model every adapter is trained and served on."""
