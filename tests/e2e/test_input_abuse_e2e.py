"""A careless or hostile client against a real server on 127.0.0.1: bytes that are not a request,
inputs too large to be worth tokenizing, chats the base's template refuses, and adapter configs
of the wrong types. Each gets the status that says what is wrong (never UNKNOWN or INTERNAL), a
message a person understands (never a Python type), one WARNING line (never a stack trace), and
the server keeps answering everyone else meanwhile."""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from rpc_catalog import all_rpcs, call_raw
from safetensors.torch import load_file, save_file

from loraserve.devtools.random_adapters import make_random_adapter
from loraserve.devtools.server_process import running_server
from loraserve.devtools.synthetic_base import init_model
from loraserve.proto.v1 import adapters_pb2 as apb
from loraserve.proto.v1 import inference_pb2 as ipb
from loraserve.proto.v1 import server_info_pb2 as spb

PYTHON_WORDS = re.compile(r"DecodeError|Error parsing|Exception|Traceback|TypeError|ValueError|KeyError|"
                          r"UnicodeDecodeError|RecursionError|NoneType|<class")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("abuse")
    base = init_model(root / "base", "deepseek-v3", "tiny", seed=21)
    imports = root / "imports"
    good = make_random_adapter(base, imports / "good", r=8, target="attention", seed=1)
    bare = root / "bare-base"  # the same base without a chat template
    shutil.copytree(base, bare)
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    return {"root": root, "base": base, "bare": bare, "imports": imports, "good": good}


@pytest.fixture(scope="module")
def srv(world):
    with running_server(world["root"], world["base"], world["root"] / "store", "--import-roots",
                        str(world["imports"]), "--quantization", "none", "--max-input-tokens", "256",
                        "--max-new-tokens", "16") as server:
        yield server


def code_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def request(**input_fields) -> ipb.GenerateRequest:
    return ipb.GenerateRequest(input=ipb.GenerationInput(sampling=ipb.SamplingParams(max_new_tokens=4), **input_fields))


def generate(srv, **input_fields) -> ipb.GenerationSummary:
    return srv.inference.Generate(request(**input_fields), timeout=60).summary


def _health_answers_throughout(srv, work) -> None:
    """Run `work` while another thread checks health every 50 ms; each check must answer."""
    done, failures, answered = threading.Event(), [], []

    def watch() -> None:
        while not done.is_set():
            try:
                srv.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                answered.append(1)
            except grpc.RpcError as exc:
                failures.append(exc.code())
            time.sleep(0.05)
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        work()
    finally:
        done.set()
        watcher.join()
    assert not failures and answered, f"health failed while the server refused the input: {failures}"


# ---- bytes that are not a request ------------------------------------------------------------


def test_undecodable_bytes_are_invalid_argument_on_every_rpc(srv):
    garbage = b"\xff\xff\xff"  # a field tag whose varint never ends: no message starts like this
    for rpc in all_rpcs():
        code, details = code_of(lambda: call_raw(srv.channel, rpc, [garbage], timeout=30))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (rpc.path, code, details)
        assert f"not a valid {rpc.request.DESCRIPTOR.full_name}" in details, (rpc.path, details)
        assert not PYTHON_WORDS.search(details), details


def test_invalid_utf8_names_the_field(srv):
    good = ipb.GenerateRequest(input=ipb.GenerationInput(prompt="héllo", sampling=ipb.SamplingParams(
        max_new_tokens=2))).SerializeToString()
    bad = good.replace("héllo".encode(), b"h\xc3llo\xff")
    generate_rpc = next(r for r in all_rpcs() if r.name == "Generate")
    code, details = code_of(lambda: call_raw(srv.channel, generate_rpc, [bad]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "field input.prompt is not valid UTF-8" in details, details

    chat = ipb.GenerateStreamRequest(input=ipb.GenerationInput(messages=ipb.Messages(messages=[
        ipb.ChatMessage(role="user", content="one"), ipb.ChatMessage(role="user", content="twö")]))).SerializeToString()
    stream_rpc = next(r for r in all_rpcs() if r.name == "GenerateStream")
    code, details = code_of(lambda: call_raw(srv.channel, stream_rpc, [chat.replace("twö".encode(), b"tw\xc3\x28")]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert "field input.messages.messages[1].content is not valid UTF-8" in details, details

    upload = next(r for r in all_rpcs() if r.name == "UploadAdapter")
    header = apb.UploadAdapterRequest(header=apb.UploadHeader(name="name-x")).SerializeToString()
    code, details = code_of(lambda: call_raw(srv.channel, upload, [header.replace(b"name-x", b"name-\xff")]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "field header.name is not valid UTF-8" in details, details


def test_truncated_request_says_where_it_ends(srv):
    whole = ipb.GenerateRequest(input=ipb.GenerationInput(prompt="x" * 100)).SerializeToString()
    generate_rpc = next(r for r in all_rpcs() if r.name == "Generate")
    code, details = code_of(lambda: call_raw(srv.channel, generate_rpc, [whole[:-10]]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "field input says it is" in details, details


# ---- inputs too large to be worth tokenizing --------------------------------------------------


def test_oversized_prompts_are_refused_before_tokenizing_while_health_answers(srv):
    limits = srv.info.GetServerInfo(spb.GetServerInfoRequest()).limits
    assert limits.max_input_bytes > 0 and limits.max_input_bytes % limits.max_input_tokens == 0
    results = {}

    def send() -> None:
        # Over gRPC's receive limit for the whole server (16 MiB): refused by gRPC itself.
        results["20MB"] = code_of(lambda: generate(srv, prompt="a" * 20_000_000))
        # Over InferenceService's limit, under the server's: refused before it is even decoded.
        results["14MB"] = code_of(lambda: generate(srv, prompt="a" * 14_000_000))
        # Just over what max_input_tokens can hold in bytes: refused without tokenizing.
        results["bound"] = code_of(lambda: generate(srv, prompt="a" * (limits.max_input_bytes + 1)))
        results["chat"] = code_of(lambda: generate(srv, messages=ipb.Messages(messages=[
            ipb.ChatMessage(role="user", content="hi")] * (limits.max_input_tokens + 1))))
    _health_answers_throughout(srv, send)
    assert results["20MB"][0] == grpc.StatusCode.RESOURCE_EXHAUSTED, results["20MB"]
    size = request(prompt="a" * 14_000_000).ByteSize()
    assert results["14MB"] == (grpc.StatusCode.INVALID_ARGUMENT,
                               f"the request is {size:,} bytes, over the {_inference_limit(limits):,} bytes this call accepts")
    code, details = results["bound"]
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert f"at most {limits.max_input_bytes:,} can fit max_input_tokens 256" in details
    code, details = results["chat"]
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "257 messages are more than max_input_tokens 256" in details
    # Under the byte bound but over the token limit: tokenized (off the event loop) and refused.
    code, details = code_of(lambda: generate(srv, prompt="窦性心律不齐 " * 200))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "over max_input_tokens 256" in details, details
    assert generate(srv, prompt="still serving").usage.completion_tokens == 4


def _inference_limit(limits) -> int:
    from loraserve.api.app import inference_request_bytes

    return inference_request_bytes(limits.max_input_bytes, limits.max_input_tokens)


# ---- chats the template refuses ---------------------------------------------------------------


@pytest.mark.parametrize("role", ["tool", "", "System"])
def test_a_role_the_template_refuses_is_invalid_argument(srv, role):
    code, details = code_of(lambda: generate(srv, messages=ipb.Messages(messages=[
        ipb.ChatMessage(role="user", content="hi"), ipb.ChatMessage(role=role, content="x")])))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert details.startswith("the chat template refused these messages: unsupported role") and "message 1" in details


def test_messages_to_a_base_without_a_chat_template_fail_precondition(world):
    with running_server(world["root"], world["bare"], world["root"] / "bare-store", "--quantization", "none") as srv:
        code, details = code_of(lambda: generate(srv, messages=ipb.Messages(messages=[
            ipb.ChatMessage(role="user", content="hi")])))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "no chat template" in details, details
        assert generate(srv, prompt="a prompt still works").usage.completion_tokens == 4


# ---- adapter configs of the wrong types -------------------------------------------------------


def _upload(srv, name: str, directory: Path):
    def messages():
        yield apb.UploadAdapterRequest(header=apb.UploadHeader(name=name))
        for file_name in ("adapter_config.json", "adapter_model.safetensors"):
            yield apb.UploadAdapterRequest(chunk=apb.FileChunk(file_name=file_name,
                                                               data=(directory / file_name).read_bytes()))
    return srv.adapters.UploadAdapter(messages(), timeout=60)


def _variant(world, name: str, config: dict | None = None, raw_config: str | None = None, poison=None) -> Path:
    path = world["root"] / "variants" / name
    shutil.copytree(world["good"], path)
    if config is not None:
        doc = json.loads((path / "adapter_config.json").read_text())
        doc.update(config)
        (path / "adapter_config.json").write_text(json.dumps(doc))
    if raw_config is not None:
        (path / "adapter_config.json").write_text(raw_config)
    if poison is not None:
        tensors = load_file(path / "adapter_model.safetensors")
        key = sorted(k for k in tensors if k.endswith(f"lora_{poison[0]}.weight"))[0]
        tensors[key][0, 0] = poison[1]
        save_file(tensors, path / "adapter_model.safetensors")
    return path


@pytest.mark.parametrize("name, kwargs, words", [
    ("alpha-abc", {"config": {"lora_alpha": "abc"}}, ["lora_alpha must be a positive finite number", '"abc"']),
    ("alpha-null", {"config": {"lora_alpha": None}}, ["lora_alpha", "null"]),
    ("alpha-list", {"config": {"lora_alpha": [1]}}, ["lora_alpha", "[1]"]),
    ("alpha-huge", {"config": {"lora_alpha": 1e40}}, ["lora_B.weight times its scaling", "not finite in float32"]),
    ("deep", {"raw_config": '{"r": 8, "lora_alpha": 16, "x": ' + "[" * 50_000 + "]" * 50_000 + "}"},
     ["nested more than 32 levels"]),
    ("nan-a", {"poison": ("A", float("nan"))}, ["lora_A.weight has values that are not finite"]),
    ("inf-b", {"poison": ("B", float("inf"))}, ["lora_B.weight has values that are not finite"]),
])
def test_bad_adapters_fail_precondition_naming_the_field(srv, world, name, kwargs, words):
    code, details = code_of(lambda: _upload(srv, name, _variant(world, name, **kwargs)))
    assert code == grpc.StatusCode.FAILED_PRECONDITION, details
    assert details.startswith(f"adapter {name!r}"), details  # as the caller named it, not 'default/...'
    for word in words:
        assert word in details, details
    assert not PYTHON_WORDS.search(details)
    names = [a.manifest.name for a in srv.adapters.ListAdapters(apb.ListAdaptersRequest()).adapters]
    assert name not in names


def test_client_mistakes_log_one_warning_line_each_and_no_trace(srv):
    for _ in range(20):
        code_of(lambda: generate(srv, messages=ipb.Messages(messages=[ipb.ChatMessage(role="tool", content="x")])))
    log = srv.log()
    assert "Traceback" not in log
    refusals = [line for line in log.splitlines() if "InferenceService refused: INVALID_ARGUMENT" in line]
    assert 1 <= len(refusals) <= 2, refusals  # one per 10 s window: the rest are counted
    assert all(" WARNING " in line for line in refusals)
