"""Hypothesis against every RPC of a real server: typed messages with extreme values (any
unicode, NaN and infinities, integer extremes, unknown enum values, nested and repeated fields)
and raw byte payloads. Whatever arrives, the answer is a status a client can act on, the server
logs no stack trace, and health is SERVING afterwards.

Derandomized, so CI runs the same examples every time; LORASERVE_FUZZ_EXAMPLES raises the count
for a longer hunt."""

from __future__ import annotations

import os

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rpc_catalog import all_rpcs, call_raw

from loraserve.devtools.random_adapters import make_random_adapter
from loraserve.devtools.server_process import running_server
from loraserve.devtools.synthetic_base import init_model
from loraserve.proto.v1 import adapters_pb2 as apb
from loraserve.proto.v1 import inference_pb2 as ipb

ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
           grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED,
           grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED,
           # Registering an existing name with other content: an honest answer to a fuzzed register.
           grpc.StatusCode.ALREADY_EXISTS}
EXAMPLES = int(os.environ.get("LORASERVE_FUZZ_EXAMPLES", "40"))
RPCS = all_rpcs()

INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-2**31, 2**31 - 1), FieldDescriptor.TYPE_SINT32: (-2**31, 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-2**31, 2**31 - 1), FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1), FieldDescriptor.TYPE_INT64: (-2**63, 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-2**63, 2**63 - 1), FieldDescriptor.TYPE_SFIXED64: (-2**63, 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1), FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


def _integers(low: int, high: int):
    extremes = [v for v in (low, high, 0, 1, -1, 2**31 - 1, 2**31, 2**63 - 1, 2**63) if low <= v <= high]
    return st.one_of(st.sampled_from(extremes), st.integers(low, high))


def _scalar(field: FieldDescriptor):
    t = field.type
    if t == FieldDescriptor.TYPE_STRING:
        return st.one_of(st.text(max_size=40), st.sampled_from(["", "a0", "default/a0", "../etc", "x" * 300, "\x00",
                                                                 "user", "system", "tool", "窦性心律不齐"]))
    if t == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=300)
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t == FieldDescriptor.TYPE_FLOAT:
        return st.floats(width=32, allow_nan=True, allow_infinity=True)
    if t == FieldDescriptor.TYPE_DOUBLE:
        return st.floats(allow_nan=True, allow_infinity=True)
    if t == FieldDescriptor.TYPE_ENUM:
        return _integers(-2**31, 2**31 - 1)  # unknown values of an open enum included
    return _integers(*INT_RANGES[t])


@st.composite
def messages(draw, message_class, depth: int = 0, sparse: bool = False):
    """A message of `message_class` with any subset of its fields set to extreme values (with
    `sparse`, about one field in five)."""
    msg = message_class()
    chosen_oneofs: set[str] = set()
    for field in message_class.DESCRIPTOR.fields:
        oneof = field.containing_oneof
        if oneof is not None and oneof.name in chosen_oneofs:
            continue
        if not draw(st.integers(0, 4).map(lambda n: n == 0) if sparse else st.booleans()):
            continue
        if oneof is not None:
            chosen_oneofs.add(oneof.name)
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if depth >= 4:
                continue
            sub_class = type(getattr(message_class(), field.name)) if not field.is_repeated else None
            if field.is_repeated:
                items = draw(st.lists(messages(_message_class(message_class, field), depth + 1, sparse), max_size=4))
                getattr(msg, field.name).extend(items)
            else:
                getattr(msg, field.name).CopyFrom(draw(messages(sub_class, depth + 1, sparse)))
        elif field.is_repeated:
            getattr(msg, field.name).extend(draw(st.lists(_scalar(field), max_size=4)))
        else:
            setattr(msg, field.name, draw(_scalar(field)))
    return msg


def _message_class(parent, field: FieldDescriptor):
    probe = getattr(parent(), field.name).add()
    return type(probe)


def _valid(rpc) -> list:
    """Requests that would succeed, for the fuzzer to bend one field at a time."""
    sampling = ipb.SamplingParams(max_new_tokens=2)
    chat = ipb.Messages(messages=[ipb.ChatMessage(role="system", content="terse"),
                                  ipb.ChatMessage(role="user", content="hi")])
    inputs = [ipb.GenerationInput(prompt="hello", sampling=sampling),
              ipb.GenerationInput(adapter="a0", messages=chat, sampling=sampling)]
    by_name = {
        "Generate": [ipb.GenerateRequest(input=i) for i in inputs],
        "GenerateStream": [ipb.GenerateStreamRequest(input=i) for i in inputs],
        "RegisterAdapter": [apb.RegisterAdapterRequest(name="r1", path="a0")],
        "ValidateAdapter": [apb.ValidateAdapterRequest(name="v1", path="a0")],
        "UploadAdapter": [apb.UploadAdapterRequest(header=apb.UploadHeader(name="u1"))],
    }
    return by_name.get(rpc.name, [rpc.request(name="a0")] if "name" in rpc.request.DESCRIPTOR.fields_by_name else [])


def _merged(valid, extra):
    out = type(valid)()
    out.CopyFrom(valid)
    out.MergeFrom(extra)
    return out


def payloads(rpc):
    """One request (or a short stream of them) as bytes: typed messages, valid ones with a few
    fields bent to extreme values, raw bytes, or a mix."""
    typed = [messages(rpc.request)]
    if _valid(rpc):
        typed.append(st.builds(_merged, st.sampled_from(_valid(rpc)), messages(rpc.request, sparse=True)))
    one = st.one_of(*(t.map(lambda m: m.SerializeToString()) for t in typed), st.binary(max_size=200))
    if rpc.client_streaming:
        return st.lists(one, min_size=1, max_size=4)
    return one.map(lambda b: [b])


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    base = init_model(root / "base", "deepseek-v3", "tiny", seed=51)
    imports = root / "imports"
    make_random_adapter(base, imports / "a0", r=4, target="attention", seed=2)
    with running_server(root, base, root / "store", "--import-roots", str(imports), "--quantization", "none",
                        "--max-new-tokens", "4", "--max-input-tokens", "64", "--max-loras", "2",
                        "--refusal-hold", "0") as server:
        server.adapters.RegisterAdapter(apb.RegisterAdapterRequest(name="a0", path="a0"), timeout=60)
        yield server
        assert "Traceback" not in server.log(), server.log()[-4000:]


def _call(srv, rpc, data: list[bytes]) -> grpc.StatusCode:
    if rpc.name == "Watch":  # a health watch never ends by itself: one answer is the whole test
        call = srv.channel.unary_stream(rpc.path)(data[0], timeout=30)
        try:
            next(call)
            call.cancel()
            return grpc.StatusCode.OK
        except grpc.RpcError as exc:
            return exc.code()
    try:
        call_raw(srv.channel, rpc, data, timeout=30)
        return grpc.StatusCode.OK
    except grpc.RpcError as exc:
        assert exc.code() in ALLOWED, (rpc.path, exc.code(), exc.details(), data)
        assert "Traceback" not in (exc.details() or "")
        return exc.code()


@pytest.mark.parametrize("rpc", RPCS, ids=[r.path.strip("/") for r in RPCS])
def test_every_rpc_answers_any_input_with_an_honest_status(srv, rpc):
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(payloads(rpc))
    def check(data):
        assert _call(srv, rpc, data) in ALLOWED
    check()
    assert srv.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status == \
        health_pb2.HealthCheckResponse.SERVING


def test_the_server_still_serves_after_the_fuzzing(srv):
    req = ipb.GenerateRequest(input=ipb.GenerationInput(prompt="still here", sampling=ipb.SamplingParams(
        max_new_tokens=3)))
    assert srv.inference.Generate(req, timeout=60).summary.usage.completion_tokens == 3
