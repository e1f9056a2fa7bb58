"""The root of the test suite. Torch-free on purpose: the deployment tests (tests/deploy) and the
client's tests run without loading a model library. Fixtures that build tiny DeepSeek bases and
PEFT adapters live in helpers/model_fixtures.py and are offered by tests/unit/conftest.py and
tests/e2e/conftest.py; helpers/ is on the import path (pyproject's pytest `pythonpath`)."""

import importlib.util

import pytest

HAS_VLLM = importlib.util.find_spec("vllm") is not None


def pytest_collection_modifyitems(config, items):
    """Tests marked `vllm` are skipped, saying why, where vLLM is not installed (make test
    installs it, so CI runs them)."""
    if HAS_VLLM:
        return
    skip = pytest.mark.skip(reason="needs vLLM (pip install 'loraserve[vllm]', or make install)")
    for item in items:
        if "vllm" in item.keywords:
            item.add_marker(skip)
