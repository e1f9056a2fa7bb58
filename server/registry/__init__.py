"""Adapters by id for the API: admission of incoming adapters (one pass of checks) and the
registry that keeps the store and the engine in agreement."""
