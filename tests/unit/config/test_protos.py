"""The committed stubs are what protos/ generates now, and the protos follow buf STANDARD names."""

from __future__ import annotations

from pathlib import Path

from loraserve.proto import codegen


def test_generated_stubs_are_not_stale(tmp_path):
    fresh = {p.relative_to(tmp_path): p.read_text() for p in codegen.generate(tmp_path)}
    committed = {p.relative_to(codegen.GEN): p.read_text()
                 for p in codegen.GEN.rglob("*") if p.suffix in (".py", ".pyi")}
    assert set(fresh) == set(committed), "stubs differ from protos/: run `python -m loraserve.proto.codegen`"
    for name, text in fresh.items():
        assert committed[name] == text, f"{name} is stale: run `python -m loraserve.proto.codegen`"


def test_proto_style():
    from loraserve.proto.v1 import adapters_pb2, inference_pb2, server_info_pb2

    for module in (adapters_pb2, inference_pb2, server_info_pb2):
        assert module.DESCRIPTOR.package == "loraserve.v1"
        for service in module.DESCRIPTOR.services_by_name.values():
            assert service.name.endswith("Service")
            for method in service.methods:
                assert method.input_type.name == f"{method.name}Request"
                assert method.output_type.name == f"{method.name}Response"
        for enum in module.DESCRIPTOR.enum_types_by_name.values():
            assert enum.values[0].number == 0 and enum.values[0].name.endswith("_UNSPECIFIED")
    assert Path(codegen.PROTOS / "loraserve" / "v1").is_dir()
    assert all(m.__name__.startswith("loraserve.proto.v1.") for m in (adapters_pb2, inference_pb2, server_info_pb2))
