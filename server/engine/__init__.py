"""The engine: continuous batching scheduler, model runner, sampling and streaming."""
