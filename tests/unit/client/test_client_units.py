"""The Python client and the client CLI against a small fake loraserve: a real gRPC server on
127.0.0.1 (port chosen by the OS) whose servicers implement the generated stubs with canned
answers. No model, no torch in the client path; each test starts its own server."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import pytest
from fake_grpc import fake_server

from loraserve.cli import build_parser, main
from loraserve.client import AsyncLoraserveClient, Generation, LoraserveClient, LoraserveClientError, StreamEvent
from loraserve.proto.v1 import adapters_pb2 as apb
from loraserve.proto.v1 import adapters_pb2_grpc, inference_pb2_grpc
from loraserve.proto.v1 import inference_pb2 as ipb

ADAPTER = apb.AdapterStatus(
    manifest=apb.AdapterManifest(name="support", r=8, lora_alpha=16.0, target_modules=["q_proj", "v_proj"],
                                 base_fingerprint="abc123", size_bytes=4096, created_time="2025-01-01T00:00:00Z",
                                 source="upload", files=[apb.FileDigest(name="adapter_config.json", sha256="00",
                                                                        size_bytes=100)]),
    tier=apb.RESIDENCY_TIER_CPU, pinned=True)


def _summary(text: str, adapter: str, request_id: str) -> ipb.GenerationSummary:
    return ipb.GenerationSummary(request_id=request_id or "rid-1", text=text, token_ids=[1, 2, 3],
                                 finish_reason=ipb.FINISH_REASON_EOS,
                                 usage=ipb.Usage(prompt_tokens=4, completion_tokens=3), adapter=adapter,
                                 timings=ipb.Timings(queue_seconds=0.01, first_token_seconds=0.02, total_seconds=0.5))


@dataclass
class FakeState:
    """What the fake saw, for the tests to check."""

    requests: list = field(default_factory=list)
    uploads: list = field(default_factory=list)
    stream_ended: threading.Event = field(default_factory=threading.Event)


class FakeInference(inference_pb2_grpc.InferenceServiceServicer):
    """Echoes the prompt (or the last chat turn) upper-cased; adapter "missing" is NOT_FOUND and
    adapter "endless" streams until the client goes away."""

    def __init__(self, state: FakeState) -> None:
        self.state = state

    def _text(self, msg: ipb.GenerationInput, context: grpc.ServicerContext) -> str:
        self.state.requests.append(msg)
        if msg.adapter == "missing":
            context.abort(grpc.StatusCode.NOT_FOUND, "adapter 'missing' is not registered")
        if msg.WhichOneof("input") == "messages":
            return msg.messages.messages[-1].content.upper()
        return msg.prompt.upper()

    def Generate(self, request, context):
        text = self._text(request.input, context)
        return ipb.GenerateResponse(summary=_summary(text, request.input.adapter, request.input.request_id))

    def GenerateStream(self, request, context):
        context.add_callback(self.state.stream_ended.set)
        text = self._text(request.input, context)
        if request.input.adapter == "endless":
            while context.is_active():
                yield ipb.GenerateStreamResponse(delta=ipb.TextDelta(text="x", token_ids=[7]))
                time.sleep(0.01)
            return
        for i, word in enumerate(text.split(" ")):
            yield ipb.GenerateStreamResponse(delta=ipb.TextDelta(text=(" " if i else "") + word, token_ids=[i]))
        yield ipb.GenerateStreamResponse(summary=_summary(text, request.input.adapter, ""))


class FakeAdapters(adapters_pb2_grpc.AdapterServiceServicer):
    def __init__(self, state: FakeState) -> None:
        self.state = state

    def UploadAdapter(self, request_iterator, context):
        messages = list(request_iterator)
        self.state.uploads.append(messages)
        if not messages or messages[0].WhichOneof("part") != "header":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first upload message must be the header")
        return apb.UploadAdapterResponse(adapter=ADAPTER, created=True)

    def ListAdapters(self, request, context):
        return apb.ListAdaptersResponse(adapters=[ADAPTER])

    def GetAdapter(self, request, context):
        if request.name != "support":
            context.abort(grpc.StatusCode.NOT_FOUND, f"adapter {request.name!r} is not registered")
        return apb.GetAdapterResponse(adapter=ADAPTER)

    def PinAdapter(self, request, context):
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "all 4 slots are pinned")


@pytest.fixture
def fake() -> Iterator[tuple[str, FakeState]]:
    """(target, state) of a fake server running for one test."""
    state = FakeState()
    with fake_server(FakeInference(state), FakeAdapters(state)) as target:
        yield target, state


def test_every_client_subcommand_parses():
    parser = build_parser()
    args = parser.parse_args(["generate", "--adapter", "a", "--no-stream", "--max-new-tokens", "5", "--temperature",
                              "0.7", "--top-p", "0.9", "--top-k", "40", "--seed", "3", "--stop", "\n", "--stop",
                              "END", "--json", "--server", "h:1", "hello"])
    assert (args.adapter, args.no_stream, args.max_new_tokens, args.temperature, args.top_p, args.top_k,
            args.seed, args.stop, args.json, args.server, args.prompt) == \
        ("a", True, 5, 0.7, 0.9, 40, 3, ["\n", "END"], True, "h:1", "hello")
    assert parser.parse_args(["chat", "--adapter", "a"]).adapter == "a"
    args = parser.parse_args(["adapters", "register", "n", "p", "--replace", "--json"])
    assert (args.action, args.name, args.path, args.replace, args.json) == ("register", "n", "p", True, True)
    args = parser.parse_args(["adapters", "upload", "n", "d"])
    assert (args.action, args.name, args.directory, args.replace, args.json) == ("upload", "n", "d", False, False)
    for action in ("show", "remove", "pin", "unpin"):
        assert parser.parse_args(["adapters", action, "n"]).name == "n"
    assert parser.parse_args(["adapters", "validate", "n", "p"]).path == "p"
    assert parser.parse_args(["adapters", "list"]).action == "list"
    assert parser.parse_args(["health"]).service == ""
    assert parser.parse_args(["info", "--timeout", "2"]).timeout == 2.0


def test_server_default_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv("LORASERVE_SERVER", raising=False)
    assert build_parser().parse_args(["info"]).server == "127.0.0.1:50051"
    monkeypatch.setenv("LORASERVE_SERVER", "example:9")
    assert build_parser().parse_args(["health"]).server == "example:9"


def test_usage_errors_exit_2():
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["adapters", "register", "only-a-name"])
    assert exc.value.code == 2


def test_generate_sends_sampling_and_returns_a_generation(fake):
    target, state = fake
    with LoraserveClient(target, timeout=5) as client:
        g = client.generate("hello there", adapter="support", max_new_tokens=8, top_p=0.5, seed=7, stop="\n")
        chat = client.generate(messages=[{"role": "user", "content": "hi"}])
    assert g == Generation(text="HELLO THERE", token_ids=(1, 2, 3), finish_reason="eos", prompt_tokens=4,
                           completion_tokens=3, adapter="support", request_id="rid-1", queue_s=0.01,
                           first_token_s=0.02, total_s=0.5)
    sent = state.requests[0].sampling
    assert (sent.max_new_tokens, round(sent.top_p, 3), sent.seed, list(sent.stop)) == (8, 0.5, 7, ["\n"])
    assert not sent.HasField("repetition_penalty")  # unset stays unset: the server's default applies
    assert chat.text == "HI" and state.requests[1].messages.messages[0].role == "user"


def test_stream_yields_deltas_then_the_generation(fake):
    target, _ = fake
    with LoraserveClient(target, timeout=5) as client:
        items = list(client.generate_stream("a b c"))
    assert [i.text for i in items[:-1]] == ["A", " B", " C"]
    assert all(isinstance(i, StreamEvent) for i in items[:-1])
    assert isinstance(items[-1], Generation) and items[-1].text == "A B C"


def test_breaking_out_of_a_stream_cancels_the_rpc(fake):
    target, state = fake
    with LoraserveClient(target) as client:
        for n, _ in enumerate(client.generate_stream("go", adapter="endless")):
            if n == 3:
                break
        assert state.stream_ended.wait(5), "the server never saw the RPC end"


def test_upload_sends_the_header_first_then_chunks(fake, tmp_path):
    target, state = fake
    (tmp_path / "adapter_config.json").write_bytes(b'{"r": 8}')
    weights = bytes(range(256)) * 3
    (tmp_path / "adapter_model.safetensors").write_bytes(weights)
    with LoraserveClient(target, timeout=5) as client:
        result = client.upload_adapter("support", tmp_path, replace=True, chunk_bytes=100)
    assert result.created and result.adapter.tier == "cpu" and result.adapter.pinned
    messages = state.uploads[0]
    assert messages[0].header.name == "support" and messages[0].header.replace
    chunks = [m.chunk for m in messages[1:]]
    assert all(m.WhichOneof("part") == "chunk" for m in messages[1:]) and max(len(c.data) for c in chunks) == 100
    assert b"".join(c.data for c in chunks if c.file_name == "adapter_config.json") == b'{"r": 8}'
    assert b"".join(c.data for c in chunks if c.file_name == "adapter_model.safetensors") == weights
    assert chunks[0].file_name == "adapter_config.json"  # config first, then weights
    with pytest.raises(LoraserveClientError) as exc:  # checked locally, before any RPC
        LoraserveClient(target).upload_adapter("x", tmp_path / "nope")
    assert exc.value.code == "INVALID_ARGUMENT" and len(state.uploads) == 1


def test_status_codes_become_client_errors(fake):
    target, _ = fake
    with LoraserveClient(target, timeout=5) as client:
        with pytest.raises(LoraserveClientError) as exc:
            client.generate("x", adapter="missing")
        assert (exc.value.code, exc.value.message) == ("NOT_FOUND", "adapter 'missing' is not registered")
        with pytest.raises(LoraserveClientError) as exc:
            list(client.generate_stream("x", adapter="missing"))
        assert exc.value.code == "NOT_FOUND"
        with pytest.raises(LoraserveClientError) as exc:
            client.validate_adapter("a", "p")  # not implemented by the fake
        assert exc.value.code == "UNIMPLEMENTED"
        assert client.health() == "SERVING"
    with pytest.raises(LoraserveClientError) as exc:
        LoraserveClient("127.0.0.1:1", timeout=2).list_adapters()
    assert exc.value.code == "UNAVAILABLE"


def test_async_client_has_the_same_behaviour(fake, tmp_path):
    target, state = fake
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (tmp_path / name).write_bytes(b"0123456789")

    async def scenario() -> None:
        async with AsyncLoraserveClient(target, timeout=5) as client:
            assert (await client.generate("hi")).text == "HI"
            items = [item async for item in client.generate_stream("a b")]
            assert [i.text for i in items] == ["A", " B", "A B"] and isinstance(items[-1], Generation)
            assert [a.name for a in await client.list_adapters()] == ["support"]
            assert (await client.upload_adapter("u", tmp_path, chunk_bytes=4)).created
            with pytest.raises(LoraserveClientError) as exc:
                await client.pin_adapter("support")
            assert exc.value.code == "RESOURCE_EXHAUSTED"
            async for n, _ in _aenumerate(client.generate_stream("go", adapter="endless")):
                if n == 3:
                    break

    asyncio.run(scenario())
    assert [len(m.chunk.data) for m in state.uploads[0][1:]] == [4, 4, 2, 4, 4, 2]
    assert state.stream_ended.wait(5)


async def _aenumerate(it):
    n = 0
    async for item in it:
        yield n, item
        n += 1


def test_cli_generate_and_adapters_output(fake, capsys):
    target, _ = fake
    assert main(["generate", "--server", target, "hello world"]) == 0
    out, err = capsys.readouterr()
    assert out == "HELLO WORLD\n" and "[eos;" in err
    assert main(["generate", "--server", target, "--json", "hi"]) == 0
    assert json.loads(capsys.readouterr().out)["finish_reason"] == "eos"
    assert main(["adapters", "list", "--server", target]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["NAME", "R", "ALPHA", "TIER"] and lines[1].split()[:4] == ["support", "8", "16",
                                                                                                  "cpu"]
    assert main(["adapters", "show", "support", "--server", target, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["target_modules"] == ["q_proj", "v_proj"]
    assert main(["health", "--server", target]) == 0 and capsys.readouterr().out == "SERVING\n"


def test_cli_errors_print_the_status_and_exit_1(fake, capsys):
    target, _ = fake
    assert main(["adapters", "show", "nope", "--server", target]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err == "error: NOT_FOUND: adapter 'nope' is not registered\n"
    assert main(["generate", "--server", target, "--adapter", "missing", "x"]) == 1
    assert capsys.readouterr().err == "error: NOT_FOUND: adapter 'missing' is not registered\n"


def test_cli_chat_keeps_the_conversation(fake, capsys, monkeypatch):
    target, state = fake
    monkeypatch.setattr("sys.stdin", io.StringIO("first\nsecond\n/exit\n"))
    assert main(["chat", "--server", target, "--adapter", "support", "--system", "be brief"]) == 0
    assert capsys.readouterr().out == "FIRST\nSECOND\n"
    turns = [(m.role, m.content) for m in state.requests[-1].messages.messages]
    assert turns == [("system", "be brief"), ("user", "first"), ("assistant", "FIRST"), ("user", "second")]


def test_the_client_imports_no_torch():
    code = "import sys, loraserve.client, loraserve.client_cli; sys.exit('torch' in sys.modules or 'transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False, timeout=60).returncode == 0
