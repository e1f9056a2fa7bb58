"""Replicas and training jobs sharing one adapter store (a ReadWriteMany volume in Kubernetes):
real server processes on 127.0.0.1, real gRPC. What one process publishes, replaces or removes
is served (or refused) by the others: at once on a request for an adapter they do not know,
and within the store sync interval for replacements and removals."""

from __future__ import annotations

import time

import pytest

from loraserve.client import LoraserveClient, LoraserveClientError
from loraserve.devtools.random_adapters import make_random_adapter
from loraserve.devtools.server_process import running_server
from loraserve.devtools.synthetic_base import init_model
from loraserve.trainer.config import TrainConfig
from loraserve.trainer.output import is_store
from loraserve.trainer.train import train

SYNC = "0.5"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("shared")
    model = init_model(root / "base", "deepseek-v3", "tiny", seed=0)
    adapters = [make_random_adapter(model, root / f"a{i}", r=8, target="all-linear", seed=i) for i in range(2)]
    return {"model": model, "adapters": adapters}


def _text(client: LoraserveClient, adapter: str) -> list[int]:
    return client.generate("The patient has", adapter=adapter, max_new_tokens=8).token_ids


def _eventually(check, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except (AssertionError, LoraserveClientError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.mark.slow
def test_replicas_follow_each_other_through_the_store(base, tmp_path):
    store = tmp_path / "store"
    flags = ("--store-sync-interval", SYNC)
    with running_server(tmp_path, base["model"], store, *flags) as a, \
            running_server(tmp_path, base["model"], store, *flags) as b, \
            LoraserveClient(a.target) as ca, LoraserveClient(b.target) as cb:
        ca.upload_adapter("med", base["adapters"][0])
        # B has never heard of "med": the request itself finds it in the store.
        assert _text(cb, "med") == _text(ca, "med") != _text(cb, "")
        assert [x.name for x in cb.list_adapters()] == ["med"]
        before = _text(cb, "med")
        ca.upload_adapter("med", base["adapters"][1], replace=True)
        _eventually(lambda: _assert(_text(cb, "med") == _text(ca, "med") != before))
        ca.unregister_adapter("med")
        assert _error_within(lambda: _text(cb, "med"), 20.0) == "NOT_FOUND"
        assert cb.list_adapters() == []
        with pytest.raises(LoraserveClientError) as err:
            _text(cb, "never-published")
        assert err.value.code == "NOT_FOUND"


def _error_within(call, timeout: float):
    """The status code of the first failing call, trying until `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            call()
        except LoraserveClientError as exc:
            return exc.code
        time.sleep(0.2)
    return None


def _assert(condition: bool) -> None:
    assert condition


@pytest.mark.slow
def test_trainer_publishes_into_a_live_servers_store(base, tmp_path):
    data = tmp_path / "task.jsonl"
    data.write_text("".join(f'{{"prompt": "Item {i}?", "completion": "Code {i}."}}\n' for i in range(8)))
    store = tmp_path / "store"
    with running_server(tmp_path, base["model"], store, "--store-sync-interval", "0") as srv, \
            LoraserveClient(srv.target) as client:
        assert is_store(store)
        result = train(TrainConfig(model=str(base["model"]), quantization="nf4", train_file=str(data),
                                   adapter_name="fresh", output_dir=str(store), max_steps=2, batch_size=4,
                                   eval_fraction=0.0, gradient_checkpointing=False, logging_steps=1))
        assert result.adapter_dir.parent == store.absolute() / "default" / "fresh"
        served = client.generate("Item 3?", adapter="fresh", max_new_tokens=4)  # no registration call
        assert served.token_ids
        shown = client.get_adapter("fresh")
        assert shown.source == "trainer" and shown.base_fingerprint == result.manifest["base_fingerprint"]
    assert not [p for p in store.iterdir() if p.name.startswith(".tmp")]
