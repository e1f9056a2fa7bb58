"""Admission in one pass: an incoming adapter's config is parsed once, its safetensors header
checked once and its files hashed once, on the way from staging to the engine, whichever way it
arrives (an upload in chunks, or a directory under an import root)."""

from __future__ import annotations

import hashlib
import types
from pathlib import Path

import pytest

import loraserve.store.adapter_config as adapter_config
import loraserve.store.layout as layout
import loraserve.store.peft_files as peft_files
import loraserve.store.safetensors_check as safetensors_check
import loraserve.store.staging as staging
from loraserve.config import BaseModelConfig, EngineConfig
from loraserve.engine.native import NativeEngine
from loraserve.registry.admission import check_shape
from loraserve.registry.registry import AdapterRegistry
from loraserve.store.layout import CONFIG_FILE, WEIGHTS_FILE
from loraserve.store.peft_names import lora_modules, lora_name, parse_lora_name

ARCH = "deepseek-v3"


class Counts:
    """How often each step of admission ran, and how many bytes went through sha256."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.configs = self.headers = self.hashed = 0
        from_bytes = adapter_config.AdapterConfig.from_bytes.__func__
        header = safetensors_check.check_safetensors_header
        real_sha256 = hashlib.sha256

        def counted_from_bytes(cls, data, name):
            self.configs += 1
            return from_bytes(cls, data, name)

        def counted_header(*args, **kwargs):
            self.headers += 1
            return header(*args, **kwargs)

        class CountedSha256:
            def __init__(inner, data=b""):  # noqa: N805 - the hash object, not the test
                inner._h = real_sha256(data)
                self.hashed += len(data)

            def update(inner, data):  # noqa: N805
                self.hashed += len(data)
                inner._h.update(data)

            def __getattr__(inner, name):  # noqa: N805
                return getattr(inner._h, name)
        def digest_of_digests(config_sha256: str, weights_sha256: str) -> str:  # not a file's bytes: not counted
            return "sha256:" + real_sha256(bytes.fromhex(config_sha256) + bytes.fromhex(weights_sha256)).hexdigest()
        for module in (layout, staging, peft_files):
            monkeypatch.setattr(module, "content_digest", digest_of_digests)
        monkeypatch.setattr(adapter_config.AdapterConfig, "from_bytes", classmethod(counted_from_bytes))
        monkeypatch.setattr(staging, "check_safetensors_header", counted_header)
        for module in (staging, peft_files):
            monkeypatch.setattr(module.hashlib, "sha256", CountedSha256)


@pytest.fixture
def registry(base_dirs, adapter_dirs, tmp_path):
    engine = NativeEngine.load(EngineConfig(base=BaseModelConfig(str(base_dirs[ARCH]), quantization="none")))
    engine.start(warmup=False)
    adapters = adapter_dirs(ARCH)
    imports = Path(adapters["all-r16"]).parent
    settings = types.SimpleNamespace(adapters_dir=tmp_path / "store", max_adapter_bytes=1 << 30, max_store_bytes=0,
                                     import_roots=[str(imports)])
    yield AdapterRegistry(engine, settings), adapters
    engine.stop()


def _size(directory: Path) -> int:
    return sum((directory / f).stat().st_size for f in (CONFIG_FILE, WEIGHTS_FILE))


def test_a_registration_parses_checks_and_hashes_once(registry, monkeypatch):
    registry, adapters = registry
    counts = Counts(monkeypatch)
    status, created = registry.register("t/once", "all-r16", replace=False)
    assert created and status.manifest.r == 16 and registry.engine.has_adapter("t/once")
    assert (counts.configs, counts.headers) == (1, 1)
    assert counts.hashed == _size(Path(adapters["all-r16"]))  # each byte of each file once (the copy)


def test_an_upload_parses_checks_and_hashes_once(registry, monkeypatch):
    registry, adapters = registry
    source = Path(adapters["att-r4"])
    counts = Counts(monkeypatch)
    upload = registry.open_upload("t/up")
    for file_name in (CONFIG_FILE, WEIGHTS_FILE):
        data = (source / file_name).read_bytes()
        for start in range(0, len(data), 4096):
            upload.write(file_name, data[start:start + 4096])
    status, created = registry.upload(upload, replace=False)
    assert created and status.manifest.adapter_id == "t/up"
    assert (counts.configs, counts.headers) == (1, 1)
    assert counts.hashed == _size(source)


def test_a_served_adapter_read_again_from_disk_is_hashed_again(registry, monkeypatch):
    """Admission trusts what the store just wrote; a later read from disk (eviction, restart)
    does not: it hashes the files, which is how tampering is seen (DATA_LOSS)."""
    registry, adapters = registry
    registry.register("t/again", "att-r8-rs", replace=False)
    counts = Counts(monkeypatch)
    registry.engine.preload_adapter("t/again")
    assert counts.hashed == _size(Path(adapters["att-r8-rs"])) and counts.configs == 1


def test_one_parser_of_peft_tensor_names():
    name = lora_name("model.layers.0.self_attn.q_a_proj", "A")
    assert name == "base_model.model.model.layers.0.self_attn.q_a_proj.lora_A.weight"
    parsed = parse_lora_name(name)
    assert (parsed.module, parsed.which) == ("model.layers.0.self_attn.q_a_proj", "A")
    for other in ("base_model.model.x.lora_C.weight", "model.x.lora_A.weight", "base_model.model.x.lora_A.bias",
                  "base_model.model.x.lora_embedding_A"):
        assert parse_lora_name(other) is None, other
    assert lora_modules([lora_name("b", "A"), lora_name("a", "B"), lora_name("a", "A"), "other"]) == ["a", "b"]
    shapes = {"m": (64, 32)}
    check_shape(lora_name("m", "A"), (8, 64), shapes, 16, "t/x")
    check_shape(lora_name("m", "B"), (32, 8), shapes, 16, "t/x")
    with pytest.raises(Exception, match="does not fit this base"):
        check_shape(lora_name("m", "B"), (33, 8), shapes, 16, "t/x")
    # routed experts (4 of them): gate_up_proj [in 64, out 128] and down_proj [in 32, out 64]
    experts = {"e.gate_up_proj": (64, 128, 4), "e.down_proj": (32, 64, 4)}
    check_shape(lora_name("e.base_layer", "A"), (4 * 8, 64), shapes, 16, "t/x", experts)
    check_shape(lora_name("e", "B"), (64, 4 * 16), shapes, 16, "t/x", experts)
    for module, which, shape in (("e", "A", (4 * 17, 32)), ("e.base_layer", "A", (30, 64)), ("e", "B", (100, 8)),
                                 ("e", "A", (4, 8, 32))):
        with pytest.raises(Exception, match="does not fit this base|dimensions"):
            check_shape(lora_name(module, which), shape, shapes, 16, "t/x", experts)
