"""Tiny real DeepSeek bases and PEFT adapters for these tests (helpers/model_fixtures.py)."""

from model_fixtures import adapter_dirs, base_dirs, single_threaded_torch  # noqa: F401 (fixtures)
