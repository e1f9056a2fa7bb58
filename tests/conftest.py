"""The root of the test suite. Torch-free on purpose: the deployment tests (tests/deploy) and the
client's tests run without loading a model library. Fixtures that build tiny DeepSeek bases and
PEFT adapters live in helpers/model_fixtures.py and are offered by tests/unit/conftest.py and
tests/e2e/conftest.py; helpers/ is on the import path (pyproject's pytest `pythonpath`)."""
