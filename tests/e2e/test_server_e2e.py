"""The server as deployed: a real `loraserve serve` process on 127.0.0.1, real gRPC clients,
real files. Covers every RPC, the status codes clients see, persistence and shutdown."""

from __future__ import annotations

import json
import re
import shutil
import signal
import struct
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2
from peft import PeftModel
from safetensors.torch import load_file, save_file

from loraserve.base.loading import load_base
from loraserve.config import BaseModelConfig
from loraserve.devtools.random_adapters import make_random_adapter
from loraserve.devtools.server_process import running_server
from loraserve.devtools.synthetic_base import init_model
from loraserve.lora.peft_compat import keep_module_targets
from loraserve.proto.v1 import adapters_pb2 as apb
from loraserve.proto.v1 import inference_pb2 as ipb
from loraserve.proto.v1 import server_info_pb2 as spb

ARCH = "deepseek-v3"
PROMPTS = ["The patient presents with", "窦性心律不齐是指", "def parse(path):", "Summarise the clause:"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    base = init_model(root / "base", ARCH, "tiny", seed=11)
    other_base = init_model(root / "other-base", ARCH, "tiny", seed=12)
    imports = root / "imports"
    imports.mkdir()
    from transformers import AutoModelForCausalLM

    fp32 = AutoModelForCausalLM.from_pretrained(base)
    for i, target in enumerate(["attention", "mlp", "all-linear", "attention"]):
        make_random_adapter(base, imports / f"a{i}", r=(4, 8, 16, 8)[i], target=target, seed=20 + i, model=fp32)
    return {"root": root, "base": base, "other_base": other_base, "imports": imports}


@pytest.fixture(scope="module")
def server(world):
    store = world["root"] / "store"
    with running_server(world["root"], world["base"], store, "--import-roots", str(world["imports"]),
                        "--quantization", "none", "--max-loras", "2", "--max-new-tokens", "64",
                        "--max-input-tokens", "256", "--max-queue", "64") as srv:
        for i in range(3):
            srv.adapters.RegisterAdapter(apb.RegisterAdapterRequest(name=f"a{i}", path=f"a{i}"))
        yield srv


def generate(srv, prompt: str, adapter: str = "", n: int = 12, **sampling):
    req = ipb.GenerateRequest(input=ipb.GenerationInput(
        adapter=adapter, prompt=prompt, sampling=ipb.SamplingParams(max_new_tokens=n, **sampling)))
    return srv.inference.Generate(req, timeout=60).summary


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def test_health_info_and_reflection(server):
    assert server.health.Check(health_pb2.HealthCheckRequest(service="")).status == health_pb2.HealthCheckResponse.SERVING
    info = server.info.GetServerInfo(spb.GetServerInfoRequest())
    assert info.architecture == "deepseek_v3" and info.base_fingerprint.startswith("sha256:")
    assert info.limits.max_loras == 2 and info.limits.max_new_tokens == 64
    assert "/" not in info.base_model  # never a server path
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    replies = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in replies[0].list_services_response.service}
    assert {"loraserve.v1.InferenceService", "loraserve.v1.AdapterService", "grpc.health.v1.Health"} <= names


def generate_concurrently(srv, jobs: list[tuple[str, str]], n: int) -> list:
    """Every (adapter, prompt) of `jobs` sent at once, each on its own thread; their summaries."""
    results = [None] * len(jobs)

    def run(i, adapter, prompt):
        results[i] = generate(srv, prompt, adapter, n=n)
    threads = [threading.Thread(target=run, args=(i, a, p)) for i, (a, p) in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def peft_greedy(world, adapter: str, prompt: str, n: int) -> tuple[list[int], int]:
    """PEFT's (or, with no adapter, transformers') greedy tokens for one request alone on a fresh
    load of the base, and the prompt's length in tokens."""
    base = load_base(BaseModelConfig(str(world["base"]), quantization="none"))
    model = base.model
    if adapter:
        with keep_module_targets():
            model = PeftModel.from_pretrained(model, world["imports"] / adapter)
    ids = base.tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None,
                         pad_token_id=base.tokenizer.pad_token_id)
    return out[0, ids.shape[1]:].tolist(), ids.shape[1]


def test_concurrent_greedy_outputs_equal_peft(server, world):
    jobs = [(f"a{i % 3}", PROMPTS[i % 4]) for i in range(6)] + [("", PROMPTS[0])]
    for (adapter, prompt), summary in zip(jobs, generate_concurrently(server, jobs, 10)):
        expected, prompt_tokens = peft_greedy(world, adapter, prompt, 10)
        assert list(summary.token_ids) == expected, adapter
        assert summary.adapter == adapter and summary.finish_reason == ipb.FINISH_REASON_LENGTH
        assert summary.usage.completion_tokens == 10 and summary.usage.prompt_tokens == prompt_tokens


def test_stream_deltas_join_to_the_final_text(server):
    req = ipb.GenerateStreamRequest(input=ipb.GenerationInput(
        adapter="a1", prompt=PROMPTS[1], sampling=ipb.SamplingParams(max_new_tokens=24)))
    events = list(server.inference.GenerateStream(req, timeout=60))
    deltas = [e.delta.text for e in events if e.HasField("delta")]
    summary = events[-1].summary
    assert events[-1].HasField("summary") and "".join(deltas) == summary.text
    assert sum(len(e.delta.token_ids) for e in events if e.HasField("delta")) == len(summary.token_ids)


def test_chat_messages_use_the_chat_template(server):
    msgs = ipb.Messages(messages=[ipb.ChatMessage(role="user", content="什么是窦性心律不齐？")])
    req = ipb.GenerateRequest(input=ipb.GenerationInput(messages=msgs, sampling=ipb.SamplingParams(max_new_tokens=4)))
    summary = server.inference.Generate(req, timeout=60).summary
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(server_model_dir(server))
    expected = tok.apply_chat_template([{"role": "user", "content": "什么是窦性心律不齐？"}], add_generation_prompt=True,
                                       tokenize=True, return_dict=False)
    assert summary.usage.prompt_tokens == len(expected)


def server_model_dir(server) -> Path:
    args = server.process.args
    return Path(args[args.index("--model") + 1])


@pytest.mark.parametrize("sampling, words", [
    ({"temperature": float("nan")}, "temperature"), ({"temperature": -1.0}, "temperature"),
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"max_new_tokens": 65}, "max_new_tokens"),
    ({"stop": [str(i) for i in range(17)]}, "stop"), ({"stop": ["x" * 300]}, "stop"),
])
def test_bad_sampling_is_invalid_argument(server, sampling, words):
    req = ipb.GenerateRequest(input=ipb.GenerationInput(prompt="hi", sampling=ipb.SamplingParams(**sampling)))
    code, details = code_of(lambda: server.inference.Generate(req, timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and words in details


def test_input_errors(server):
    empty = ipb.GenerateRequest(input=ipb.GenerationInput(adapter=""))
    assert code_of(lambda: server.inference.Generate(empty, timeout=30))[0] == grpc.StatusCode.INVALID_ARGUMENT
    long = ipb.GenerateRequest(input=ipb.GenerationInput(prompt="word " * 400))
    code, details = code_of(lambda: server.inference.Generate(long, timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "max_input_tokens" in details
    bad_name = ipb.GenerateRequest(input=ipb.GenerationInput(prompt="hi", adapter="../etc"))
    assert code_of(lambda: server.inference.Generate(bad_name, timeout=30))[0] == grpc.StatusCode.INVALID_ARGUMENT
    unknown = ipb.GenerateRequest(input=ipb.GenerationInput(prompt="hi", adapter="nope"))
    code, details = code_of(lambda: server.inference.Generate(unknown, timeout=30))
    assert code == grpc.StatusCode.NOT_FOUND and "nope" in details  # never a silent fallback to the base


def test_adapter_lifecycle(server, world):
    listed = server.adapters.ListAdapters(apb.ListAdaptersRequest()).adapters
    assert {a.manifest.name for a in listed} >= {"a0", "a1", "a2"}
    got = server.adapters.GetAdapter(apb.GetAdapterRequest(name="a2")).adapter
    assert got.manifest.r == 16 and got.manifest.base_fingerprint.startswith("sha256:")
    assert len(got.manifest.files) == 2 and all(len(f.sha256) >= 64 for f in got.manifest.files)
    again = server.adapters.RegisterAdapter(apb.RegisterAdapterRequest(name="a0", path="a0"))
    assert not again.created  # same content: a no-op
    code, _ = code_of(lambda: server.adapters.RegisterAdapter(apb.RegisterAdapterRequest(name="a0", path="a3")))
    assert code == grpc.StatusCode.ALREADY_EXISTS
    server.adapters.PinAdapter(apb.PinAdapterRequest(name="a1"))
    status = server.adapters.GetAdapter(apb.GetAdapterRequest(name="a1")).adapter
    assert status.pinned and status.tier == apb.RESIDENCY_TIER_GPU
    server.adapters.UnpinAdapter(apb.UnpinAdapterRequest(name="a1"))
    reg = server.adapters.RegisterAdapter(apb.RegisterAdapterRequest(name="tmp", path=str(world["imports"] / "a3")))
    assert reg.created
    assert generate(server, "hi", "tmp", n=2).adapter == "tmp"
    server.adapters.UnregisterAdapter(apb.UnregisterAdapterRequest(name="tmp"))
    assert code_of(lambda: generate(server, "hi", "tmp", n=2))[0] == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: server.adapters.GetAdapter(apb.GetAdapterRequest(name="tmp")))[0] == grpc.StatusCode.NOT_FOUND


def test_path_escapes_are_refused(server, world, tmp_path):
    outside = tmp_path / "outside"
    shutil.copytree(world["imports"] / "a0", outside)
    link = world["imports"] / "escape-link"
    if not link.exists():
        link.symlink_to(outside, target_is_directory=True)
    for path in ["../store", str(outside), "escape-link", "a0/../../e2e", "missing"]:
        code, details = code_of(lambda: server.adapters.RegisterAdapter(apb.RegisterAdapterRequest(name="x", path=path)))
        assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), path
        # Only the client's own string may be echoed: never a resolved target or the roots.
        assert str(world["imports"]) not in details
        assert path == str(outside) or str(outside) not in details


def _upload(server, name: str, files: dict[str, bytes], replace: bool = False, chunk: int = 4096):
    def messages():
        yield apb.UploadAdapterRequest(header=apb.UploadHeader(name=name, replace=replace))
        for file_name, data in files.items():
            for i in range(0, max(len(data), 1), chunk):
                yield apb.UploadAdapterRequest(chunk=apb.FileChunk(file_name=file_name, data=data[i:i + chunk]))
    return server.adapters.UploadAdapter(messages(), timeout=60)


def _files(folder: Path) -> dict[str, bytes]:
    return {n: (folder / n).read_bytes() for n in ("adapter_config.json", "adapter_model.safetensors")}


def test_upload_publishes_after_validation(server, world):
    reply = _upload(server, "uploaded", _files(world["imports"] / "a3"))
    assert reply.created and reply.adapter.manifest.source == "upload"
    assert generate(server, PROMPTS[0], "uploaded", n=3).usage.completion_tokens == 3


def _header_bytes(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize("case", ["truncated", "header_too_long", "absurd_shape", "many_tensors", "pickle",
                                  "auto_map", "wrong_base"])
def test_malformed_uploads_are_refused_and_nothing_is_published(server, world, case):
    files = _files(world["imports"] / "a0")
    weights = files["adapter_model.safetensors"]
    expected = grpc.StatusCode.FAILED_PRECONDITION
    if case == "truncated":
        files["adapter_model.safetensors"] = weights[: len(weights) // 2]
    elif case == "header_too_long":
        files["adapter_model.safetensors"] = struct.pack("<Q", 10**9) + weights[8:100]
    elif case == "absurd_shape":
        files["adapter_model.safetensors"] = _header_bytes(
            {"base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight":
             {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 16]}}, b"\0" * 16)
    elif case == "many_tensors":
        header = {f"t{i}": {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]} for i in range(100_000)}
        files["adapter_model.safetensors"] = _header_bytes(header, b"\0" * 400_000)
    elif case == "pickle":
        del files["adapter_model.safetensors"]
        files["adapter_model.bin"] = b"\x80\x04 not really"
        expected = grpc.StatusCode.INVALID_ARGUMENT
    elif case == "auto_map":
        config = json.loads(files["adapter_config.json"])
        config["auto_map"] = {"AutoModel": "evil.Model"}
        files["adapter_config.json"] = json.dumps(config).encode()
    elif case == "wrong_base":
        # Same architecture, different shapes would be caught by shapes; a different base of
        # the same shapes is caught by the fingerprint on restart. Here: shapes from a wider base.
        tensors = load_file(world["imports"] / "a0" / "adapter_model.safetensors")
        key = next(k for k in tensors if k.endswith("lora_A.weight"))
        tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] * 2)
        path = world["root"] / f"wide-{case}.safetensors"
        save_file(tensors, path)
        files["adapter_model.safetensors"] = path.read_bytes()
    code, details = code_of(lambda: _upload(server, f"bad-{case.replace('_', '-')}", files))
    assert code == expected, details
    names = {a.manifest.name for a in server.adapters.ListAdapters(apb.ListAdaptersRequest()).adapters}
    assert f"bad-{case.replace('_', '-')}" not in names


def test_validate_publishes_nothing(server):
    manifest = server.adapters.ValidateAdapter(apb.ValidateAdapterRequest(name="v", path="a3")).manifest
    assert manifest.r == 8 and manifest.base_fingerprint.startswith("sha256:")
    assert code_of(lambda: server.adapters.GetAdapter(apb.GetAdapterRequest(name="v")))[0] == grpc.StatusCode.NOT_FOUND


def test_deadline_and_cancellation(server):
    req = ipb.GenerateRequest(input=ipb.GenerationInput(prompt="hi", sampling=ipb.SamplingParams(max_new_tokens=64)))
    code, _ = code_of(lambda: server.inference.Generate(req, timeout=0.05))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    stream_req = ipb.GenerateStreamRequest(input=req.input)
    call = server.inference.GenerateStream(stream_req, timeout=60)
    next(call)
    call.cancel()
    time.sleep(0.3)
    # The server keeps serving others after both.
    assert generate(server, "hi", n=2).usage.completion_tokens == 2


def test_metrics_endpoint(server):
    generate(server, "hi", "a0", n=2)
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    for name in ("loraserve_requests_total", "loraserve_time_to_first_token_seconds_bucket",
                 "loraserve_requests_running", "loraserve_adapter_loads_total", "vllm:lora_requests_info",
                 "loraserve_generation_tokens_total"):
        assert name in text, name
    assert 'adapter="a0",code="OK",tenant="default"' in text


def test_restart_keeps_adapters_and_sigterm_drains(world, tmp_path):
    store = tmp_path / "store"
    args = ("--import-roots", str(world["imports"]), "--quantization", "none", "--drain-timeout", "20")
    with running_server(tmp_path, world["base"], store, *args) as srv:
        srv.adapters.RegisterAdapter(apb.RegisterAdapterRequest(name="keep", path="a2"))
        before = generate(srv, PROMPTS[2], "keep", n=8).token_ids
    with running_server(tmp_path, world["base"], store, *args) as srv:
        assert generate(srv, PROMPTS[2], "keep", n=8).token_ids == before
        # SIGTERM while a long request runs: it finishes, new ones are refused, exit 0.
        req = ipb.GenerateStreamRequest(input=ipb.GenerationInput(prompt="hi", adapter="keep",
                                                                 sampling=ipb.SamplingParams(max_new_tokens=1500)))
        call = srv.inference.GenerateStream(req, timeout=60)
        next(call)
        srv.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        code, details = code_of(lambda: generate(srv, "hi", n=2))
        assert code == grpc.StatusCode.UNAVAILABLE and "draining" in details  # refused by the draining server
        health = srv.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
        assert health == health_pb2.HealthCheckResponse.NOT_SERVING
        events = list(call)
        assert events[-1].HasField("summary") and events[-1].summary.usage.completion_tokens == 1500
        assert srv.process.wait(60) == 0
    # A base with other weights: the adapter is reported and not served.
    with running_server(tmp_path, world["other_base"], store, *args) as srv:
        code, _ = code_of(lambda: generate(srv, "hi", "keep", n=2))
        assert code == grpc.StatusCode.NOT_FOUND
        assert "built for base" in srv.log()


def test_concurrent_register_unregister_while_generating(server, world):
    outcomes: list[grpc.StatusCode] = []
    generation_errors: list[str] = []
    stop = threading.Event()

    def churn(i):
        for k in range(6):
            try:
                if (i + k) % 2:
                    server.adapters.RegisterAdapter(apb.RegisterAdapterRequest(name="churn", path="a3"), timeout=60)
                else:
                    server.adapters.UnregisterAdapter(apb.UnregisterAdapterRequest(name="churn"), timeout=60)
                outcomes.append(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                outcomes.append(exc.code())

    def traffic():
        while not stop.is_set():
            try:
                generate(server, PROMPTS[0], "a0", n=3)
            except grpc.RpcError as exc:
                generation_errors.append(f"{exc.code()}: {exc.details()}")

    gen = [threading.Thread(target=traffic) for _ in range(2)]
    workers = [threading.Thread(target=churn, args=(i,)) for i in range(8)]
    for t in gen + workers:
        t.start()
    for t in workers:
        t.join()
    stop.set()
    for t in gen:
        t.join()
    assert set(outcomes) <= {grpc.StatusCode.OK, grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.NOT_FOUND}
    assert not generation_errors
    listed = {a.manifest.name for a in server.adapters.ListAdapters(apb.ListAdaptersRequest()).adapters}
    registered = "churn" in listed
    code = grpc.StatusCode.OK
    try:
        generate(server, "hi", "churn", n=1)
    except grpc.RpcError as exc:
        code = exc.code()
    assert (code == grpc.StatusCode.OK) == registered  # store and engine agree


def test_queue_full_is_resource_exhausted(world, tmp_path):
    args = ("--quantization", "none", "--max-queue", "2", "--max-batch-size", "1")
    with running_server(tmp_path, world["base"], tmp_path / "store", *args) as srv:
        req = ipb.GenerateRequest(input=ipb.GenerationInput(prompt="hi", sampling=ipb.SamplingParams(max_new_tokens=64)))
        futures = [srv.inference.Generate.future(req, timeout=120) for _ in range(8)]
        codes = []
        for f in futures:
            try:
                f.result()
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                codes.append(exc.code())
        assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert codes.count(grpc.StatusCode.OK) >= 2  # every accepted request completed


def test_kill_during_upload_leaves_the_store_whole(world, tmp_path):
    store = tmp_path / "store"
    args = ("--quantization", "none")
    files = _files(world["imports"] / "a2")
    with running_server(tmp_path, world["base"], store, *args) as srv:
        _upload(srv, "victim", _files(world["imports"] / "a0"))
        before = generate(srv, PROMPTS[0], "victim", n=6).token_ids

        def slow():
            yield apb.UploadAdapterRequest(header=apb.UploadHeader(name="victim", replace=True))
            for name, data in files.items():
                for i in range(0, len(data), 1024):
                    yield apb.UploadAdapterRequest(chunk=apb.FileChunk(file_name=name, data=data[i:i + 1024]))
                    time.sleep(0.01)
        future = srv.adapters.UploadAdapter.future(slow(), timeout=60)
        time.sleep(0.5)
        srv.process.kill()
        srv.process.wait()
        with pytest.raises(grpc.RpcError):
            future.result()
    with running_server(tmp_path, world["base"], store, *args) as srv:
        assert generate(srv, PROMPTS[0], "victim", n=6).token_ids == before  # the old version, whole
        assert not [p for p in store.rglob("*") if ".tmp" in p.name or ".upload" in p.name]


@pytest.mark.parametrize("name", ["", "-x", ".hidden", "a/b/c", "/x", "a/", "../up", "x" * 129, "名字", "a\nb", "a b"])
def test_every_bad_name_is_invalid_argument(server, name):
    code, details = code_of(lambda: server.adapters.RegisterAdapter(apb.RegisterAdapterRequest(name=name, path="a0")))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and re.search("invalid (adapter|tenant) name", details)
    if name:
        code, _ = code_of(lambda: generate(server, "hi", name, n=1))
        assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_manifest_for_another_base_is_failed_precondition(server, world):
    folder = world["imports"] / "foreign"
    if not folder.exists():
        shutil.copytree(world["imports"] / "a0", folder)
        (folder / "manifest.json").write_text(json.dumps({"name": "foreign", "base_fingerprint": "sha256:" + "0" * 64}))
    code, details = code_of(lambda: server.adapters.RegisterAdapter(apb.RegisterAdapterRequest(name="f", path="foreign")))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "built for base" in details
    assert code_of(lambda: server.adapters.GetAdapter(apb.GetAdapterRequest(name="f")))[0] == grpc.StatusCode.NOT_FOUND


def test_a_peft_routed_expert_adapter_is_served_as_peft_computes_it(server, world):
    """An adapter with LoRA on the routed experts (PEFT target_parameters), registered over gRPC,
    generates PEFT's greedy tokens in a batch with another adapter and a base request."""
    folder = world["imports"] / "experts"
    if not folder.exists():
        make_random_adapter(world["base"], folder, r=8, target="attention", seed=31,
                            target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    server.adapters.RegisterAdapter(apb.RegisterAdapterRequest(name="experts", path="experts"))
    try:
        got = server.adapters.GetAdapter(apb.GetAdapterRequest(name="experts")).adapter
        assert any(m.endswith("mlp.experts.gate_up_proj") for m in got.manifest.target_modules)
        jobs = [("experts", PROMPTS[0]), ("a0", PROMPTS[1]), ("", PROMPTS[2]), ("experts", PROMPTS[3])]
        results = generate_concurrently(server, jobs, 10)
        for (adapter, prompt), summary in zip(jobs, results):
            assert list(summary.token_ids) == peft_greedy(world, adapter, prompt, 10)[0], adapter
        assert list(results[0].token_ids) != peft_greedy(world, "", PROMPTS[0], 10)[0], "the experts change the output"
    finally:
        server.adapters.UnregisterAdapter(apb.UnregisterAdapterRequest(name="experts"))
