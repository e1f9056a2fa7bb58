"""Access control against a real server on 127.0.0.1 with a keys file: every RPC without a
key, with a wrong key and with each role; tenants' adapters hidden from each other; shared
adapters; per-tenant limits; key reload; the audit log. (TLS: test_tls_e2e.py; the keys file
itself and timing: test_access_keys.py.)"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import threading
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2

from loraserve.access.key_admin import add_key, remove_key
from loraserve.devtools.random_adapters import make_random_adapter
from loraserve.devtools.server_process import running_server
from loraserve.devtools.synthetic_base import init_model
from loraserve.proto.v1 import adapters_pb2 as apb
from loraserve.proto.v1 import inference_pb2 as ipb
from loraserve.proto.v1 import server_info_pb2 as spb

UNKNOWN_KEY = "lsk_0123456789ab_" + "A" * 43
B_LIMITS = {"max_adapters": 1, "max_concurrent_requests": 1, "requests_per_second": 4}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("access")
    base = init_model(root / "base", "deepseek-v3", "tiny", seed=3)
    imports = root / "imports"
    for i in range(3):
        make_random_adapter(base, imports / f"a{i}", r=8, target="attention", seed=i)
    keys_file = root / "keys.yaml"
    keys = {name: add_key(keys_file, name, tenant, role) for name, tenant, role in [
        ("a-gen", "a", "generate"), ("a-man", "a", "manage"), ("b-man", "b", "manage"), ("root", "ops", "admin")]}
    doc = yaml.safe_load(keys_file.read_text())
    doc["tenants"] = {"b": B_LIMITS}
    keys_file.write_text(yaml.safe_dump(doc))
    return {"root": root, "base": base, "imports": imports, "keys_file": keys_file, "keys": keys}


@pytest.fixture(scope="module")
def srv(world):
    with running_server(world["root"], world["base"], world["root"] / "store", "--api-keys-file",
                        str(world["keys_file"]), "--import-roots", str(world["imports"]),
                        "--store-sync-interval", "0", log_level="INFO") as server:  # request lines too
        yield server


def md(key: str | None):
    return () if key is None else (("authorization", f"Bearer {key}"),)


def code_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def gen(srv, key, adapter="", n=4, timeout=60):
    req = ipb.GenerateRequest(input=ipb.GenerationInput(adapter=adapter, prompt="The patient has",
                                                        sampling=ipb.SamplingParams(max_new_tokens=n)))
    return srv.inference.Generate(req, metadata=md(key), timeout=timeout).summary


def every_rpc(srv, key):
    """One call of every RPC, as `key` (adapter names that need not exist)."""
    a, m = srv.adapters, md(key)
    stream = ipb.GenerateStreamRequest(input=ipb.GenerationInput(prompt="hi", sampling=ipb.SamplingParams(
        max_new_tokens=2)))
    upload = iter([apb.UploadAdapterRequest(header=apb.UploadHeader(name="x"))])
    return {
        "Generate": lambda: gen(srv, key),
        "GenerateStream": lambda: list(srv.inference.GenerateStream(stream, metadata=m, timeout=30)),
        "GetServerInfo": lambda: srv.info.GetServerInfo(spb.GetServerInfoRequest(), metadata=m, timeout=30),
        "ListAdapters": lambda: a.ListAdapters(apb.ListAdaptersRequest(), metadata=m, timeout=30),
        "GetAdapter": lambda: a.GetAdapter(apb.GetAdapterRequest(name="a0"), metadata=m, timeout=30),
        "RegisterAdapter": lambda: a.RegisterAdapter(apb.RegisterAdapterRequest(name="zz", path="a0"), metadata=m,
                                                     timeout=30),
        "UploadAdapter": lambda: a.UploadAdapter(upload, metadata=m, timeout=30),
        "ValidateAdapter": lambda: a.ValidateAdapter(apb.ValidateAdapterRequest(name="zz", path="a0"), metadata=m,
                                                     timeout=30),
        "UnregisterAdapter": lambda: a.UnregisterAdapter(apb.UnregisterAdapterRequest(name="zz"), metadata=m,
                                                         timeout=30),
        "PinAdapter": lambda: a.PinAdapter(apb.PinAdapterRequest(name="zz"), metadata=m, timeout=30),
        "UnpinAdapter": lambda: a.UnpinAdapter(apb.UnpinAdapterRequest(name="zz"), metadata=m, timeout=30),
        "ShareAdapter": lambda: a.ShareAdapter(apb.ShareAdapterRequest(name="zz", shared=True), metadata=m,
                                               timeout=30),
    }


def store_listing(world) -> list[str]:
    store = world["root"] / "store"
    return sorted(f"{t.name}/{n.name}" for t in store.iterdir() if t.is_dir() and not t.name.startswith(".")
                  for n in t.iterdir())


@pytest.mark.parametrize("key", [None, UNKNOWN_KEY, "not-a-key", "lsk_short"], ids=["none", "unknown", "junk", "short"])
def test_every_rpc_without_a_valid_key_is_unauthenticated(srv, key):
    for rpc, call in every_rpc(srv, key).items():
        code, details = code_of(call)
        assert code == grpc.StatusCode.UNAUTHENTICATED, rpc
        assert details == "missing or unknown API key", (rpc, details)
    assert srv.health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING


def test_a_known_key_with_a_wrong_secret_reads_like_an_unknown_key(srv, world):
    real = world["keys"]["a-gen"]
    forged = real[:-4] + ("AAAA" if not real.endswith("AAAA") else "BBBB")
    assert code_of(lambda: gen(srv, forged)) == (grpc.StatusCode.UNAUTHENTICATED, "missing or unknown API key")


def test_each_role_gets_exactly_its_calls(srv, world):
    keys = world["keys"]
    allowed = {"generate": {"Generate", "GenerateStream", "GetServerInfo", "ListAdapters", "GetAdapter"},
               "manage": {"RegisterAdapter", "UploadAdapter", "ValidateAdapter", "UnregisterAdapter"},
               "admin": {"PinAdapter", "UnpinAdapter", "ShareAdapter"}}
    order = ("generate", "manage", "admin")  # each role includes the ones before it
    for key_name, role in (("a-gen", "generate"), ("a-man", "manage"), ("root", "admin")):
        granted = set().union(*(allowed[r] for r in order[:order.index(role) + 1]))
        for rpc, call in every_rpc(srv, keys[key_name]).items():
            try:
                call()
                code = grpc.StatusCode.OK
            except grpc.RpcError as exc:
                code = exc.code()
            if rpc in granted:  # allowed: whatever the outcome, not an access refusal
                assert code not in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED), (key_name, rpc)
            else:
                assert code == grpc.StatusCode.PERMISSION_DENIED, (key_name, rpc, code)


def test_tenants_do_not_see_or_touch_each_others_adapters(srv, world):
    keys, a = world["keys"], srv.adapters
    reg = a.RegisterAdapter(apb.RegisterAdapterRequest(name="med", path="a1"), metadata=md(keys["a-man"]), timeout=60)
    assert reg.adapter.manifest.tenant == "a" and reg.adapter.manifest.name == "med"
    assert gen(srv, keys["a-gen"], "med").token_ids == gen(srv, keys["a-gen"], "a/med").token_ids
    before = store_listing(world)
    bm = md(keys["b-man"])
    missing = code_of(lambda: gen(srv, keys["b-man"], "a/nothing-here"))
    assert missing[0] == grpc.StatusCode.NOT_FOUND
    hidden = code_of(lambda: gen(srv, keys["b-man"], "a/med"))
    assert hidden == (grpc.StatusCode.NOT_FOUND, missing[1].replace("a/nothing-here", "a/med"))
    assert code_of(lambda: a.GetAdapter(apb.GetAdapterRequest(name="a/med"), metadata=bm, timeout=30))[0] == \
        grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: a.UnregisterAdapter(apb.UnregisterAdapterRequest(name="a/med"), metadata=bm, timeout=30)) \
        == (grpc.StatusCode.NOT_FOUND, "adapter 'a/med' is not registered")
    assert code_of(lambda: a.RegisterAdapter(apb.RegisterAdapterRequest(name="a/evil", path="a2", replace=True),
                                             metadata=bm, timeout=30))[0] == grpc.StatusCode.PERMISSION_DENIED
    assert code_of(lambda: a.RegisterAdapter(apb.RegisterAdapterRequest(name="a/med", path="a2", replace=True),
                                             metadata=bm, timeout=30))[0] == grpc.StatusCode.PERMISSION_DENIED
    listed = a.ListAdapters(apb.ListAdaptersRequest(), metadata=bm, timeout=30).adapters
    assert not [x for x in listed if x.manifest.tenant == "a"]  # nothing of tenant a is shared yet
    assert store_listing(world) == before  # nothing changed in the store
    assert gen(srv, keys["a-gen"], "med").token_ids  # and tenant a still has it


def test_shared_adapters_are_usable_by_every_tenant_but_changed_only_by_their_own(srv, world):
    keys, a = world["keys"], srv.adapters
    a.RegisterAdapter(apb.RegisterAdapterRequest(name="common", path="a0"), metadata=md(keys["a-man"]), timeout=60)
    bm = md(keys["b-man"])
    assert code_of(lambda: gen(srv, keys["b-man"], "a/common"))[0] == grpc.StatusCode.NOT_FOUND
    shared = a.ShareAdapter(apb.ShareAdapterRequest(name="a/common", shared=True), metadata=md(keys["root"]),
                            timeout=30)
    assert shared.adapter.shared
    assert gen(srv, keys["b-man"], "a/common").token_ids == gen(srv, keys["a-gen"], "common").token_ids
    listed = {(x.manifest.tenant, x.manifest.name, x.shared)
              for x in a.ListAdapters(apb.ListAdaptersRequest(), metadata=bm, timeout=30).adapters}
    assert ("a", "common", True) in listed and not any(t == "a" and n != "common" for t, n, _ in listed)
    assert code_of(lambda: a.UnregisterAdapter(apb.UnregisterAdapterRequest(name="a/common"), metadata=bm,
                                               timeout=30))[0] == grpc.StatusCode.PERMISSION_DENIED
    a.ShareAdapter(apb.ShareAdapterRequest(name="a/common", shared=False), metadata=md(keys["root"]), timeout=30)
    assert code_of(lambda: gen(srv, keys["b-man"], "a/common"))[0] == grpc.StatusCode.NOT_FOUND


def test_tenant_adapter_quota(srv, world):
    keys, a = world["keys"], srv.adapters
    bm = md(keys["b-man"])
    a.RegisterAdapter(apb.RegisterAdapterRequest(name="one", path="a0"), metadata=bm, timeout=60)
    code, details = code_of(lambda: a.RegisterAdapter(apb.RegisterAdapterRequest(name="two", path="a1"), metadata=bm,
                                                      timeout=60))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "tenant 'b'" in details
    assert "b/two" not in store_listing(world)
    a.RegisterAdapter(apb.RegisterAdapterRequest(name="one", path="a1", replace=True), metadata=bm, timeout=60)


def test_one_tenants_flood_is_refused_for_it_alone(srv, world):
    """Tenant b (1 request at a time, 4 per second) floods; tenant a's steady requests all succeed."""
    keys = world["keys"]
    outcomes: dict[str, list[str]] = {"a": [], "b": []}
    stop = threading.Event()

    def flood():
        while not stop.is_set():
            try:
                gen(srv, keys["b-man"], n=8)
                outcomes["b"].append("OK")
            except grpc.RpcError as exc:
                outcomes["b"].append(exc.code().name)

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(flood) for _ in range(4)]
        for _ in range(10):
            gen(srv, keys["a-gen"], n=8)
            outcomes["a"].append("OK")
        stop.set()
        for f in futures:
            f.result()
    assert outcomes["a"] == ["OK"] * 10
    assert "RESOURCE_EXHAUSTED" in outcomes["b"] and "OK" in outcomes["b"]
    assert set(outcomes["b"]) <= {"OK", "RESOURCE_EXHAUSTED"}
    # The request log did not grow a line per refusal: the first of each window in full, the rest
    # in a summary (written within a window, 10 s), and together they account for every refusal.
    refused = outcomes["b"].count("RESOURCE_EXHAUSTED")
    deadline = time.monotonic() + 15
    while True:
        records = [json.loads(line.split("loraserve.requests: ", 1)[1]) for line in srv.log().splitlines()
                   if "loraserve.requests: " in line]
        refusals = [r for r in records if r.get("tenant") == "b" and r.get("status") == "RESOURCE_EXHAUSTED"]
        in_full = [r for r in refusals if "request_id" in r]
        summed = sum(r["requests"] for r in refusals if "summary" in r)
        if len(in_full) + summed == refused or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len(in_full) + summed == refused
    assert len(in_full) <= min(refused, 3)  # a few windows at most, however many were refused


def _refusal_while_b_runs(srv, key, cancel_after: float | None, timeout: float = 60):
    """A call of tenant b's while one of its streams runs (b's limit is 1 at a time): (status,
    message, seconds to the answer). `cancel_after`: the stream is cancelled after that long."""
    for _ in range(10):
        stream = srv.inference.GenerateStream(ipb.GenerateStreamRequest(input=ipb.GenerationInput(
            prompt="A long answer", sampling=ipb.SamplingParams(max_new_tokens=2000))),
            metadata=md(key), timeout=120)
        try:
            next(stream)  # b's request is running
            break
        except grpc.RpcError as exc:
            # The previous call's stream, cancelled by the client, may still hold b's place for a
            # moment on the server; the refusal says when it is freed, and the retry then gets in.
            if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or "retry now" not in exc.details():
                raise
    else:
        raise AssertionError("b's stream was refused ten times in a row")
    if cancel_after is not None:
        threading.Timer(cancel_after, stream.cancel).start()
    start = time.monotonic()
    try:
        code, details = code_of(lambda: gen(srv, key, n=2, timeout=timeout))
        return code, details, time.monotonic() - start
    finally:
        stream.cancel()


def test_a_refusal_is_held_until_a_retry_could_pass(srv, world):
    """Over its limit, b's call is answered RESOURCE_EXHAUSTED when one of its requests finishes
    (at most --refusal-hold, 1 s by default, and never past the call's deadline); a retry then
    gets in. A client retrying without backoff is so paced to its limit."""
    key = world["keys"]["b-man"]
    time.sleep(1.0)  # b's rate bucket is full again after earlier tests
    code, details, took = _refusal_while_b_runs(srv, key, cancel_after=0.3)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert details.startswith("tenant 'b' already has 1 requests in flight") and "one has finished: retry now" in details
    assert 0.25 <= took < 0.9
    assert len(gen(srv, key, n=2).token_ids) == 2  # the retry right after the answer is admitted
    # Nothing finishes: answered at the hold's limit; meanwhile the metrics show the held call.
    scraped: list[str] = []
    threading.Timer(0.3, lambda: scraped.append(urllib.request.urlopen(
        f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=10).read().decode())).start()
    code, details, took = _refusal_while_b_runs(srv, key, cancel_after=None)
    assert 'loraserve_refusals_held{tenant="b"} 1.0' in scraped[0]
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and re.search(r"answered after (0\.[5-9]|1\.0)", details)
    assert details.endswith("retry when one finishes") and 0.45 <= took < 1.6  # jitter: in the last half
    code, details, took = _refusal_while_b_runs(srv, key, cancel_after=None, timeout=0.4)  # before the deadline
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and took < 0.4


def test_async_uploads_refused_early_keep_their_status(srv, world):
    """The server refuses an upload before reading it (unknown key, role without manage). The
    asyncio client reports the server's status every time. Over grpc.aio such a refusal sometimes
    reached it as INTERNAL (grpc/grpc#36066; 2-3 of 120 uploads in 2 of 3 runs), so uploads go
    over a blocking channel. Small chunks keep writes in flight when the refusal arrives."""
    from loraserve.client import AsyncLoraserveClient, LoraserveClientError

    async def scenario() -> Counter:
        codes: Counter = Counter()
        async with AsyncLoraserveClient(srv.target, timeout=30, api_key=UNKNOWN_KEY) as unknown, \
                AsyncLoraserveClient(srv.target, timeout=30, api_key=world["keys"]["a-gen"]) as generate_only:
            for _ in range(120):
                for client in (unknown, generate_only):
                    try:
                        await client.upload_adapter("x", world["imports"] / "a0", chunk_bytes=1024)
                        codes["OK"] += 1
                    except LoraserveClientError as exc:
                        codes[exc.code] += 1
        return codes

    before = store_listing(world)
    assert asyncio.run(scenario()) == {"UNAUTHENTICATED": 120, "PERMISSION_DENIED": 120}
    assert store_listing(world) == before


def test_keys_reload_on_change_and_on_sighup(srv, world):
    new = add_key(world["keys_file"], "c-gen", "c", "generate")
    deadline = time.monotonic() + 15
    while True:  # picked up by the file watch, no signal
        try:
            gen(srv, new)
            break
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAUTHENTICATED and time.monotonic() < deadline
            time.sleep(0.3)
    remove_key(world["keys_file"], "c-gen")
    srv.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 5
    while True:
        try:
            gen(srv, new)
            assert time.monotonic() < deadline, "the removed key still works"
            time.sleep(0.1)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAUTHENTICATED
            break
    world["keys_file"].write_text("keys: [this is: not valid")  # a broken edit keeps the old keys
    srv.process.send_signal(signal.SIGHUP)
    time.sleep(3)
    assert gen(srv, world["keys"]["a-gen"]).token_ids
    assert "keys file not reloaded" in srv.log()


def test_audit_log_records_management_calls_without_secrets(srv, world):
    keys, a = world["keys"], srv.adapters
    a.RegisterAdapter(apb.RegisterAdapterRequest(name="audited", path="a2"), metadata=md(keys["a-man"]), timeout=60)
    code_of(lambda: a.UnregisterAdapter(apb.UnregisterAdapterRequest(name="a/audited"), metadata=md(keys["b-man"]),
                                        timeout=30))
    time.sleep(0.5)
    lines = [json.loads(line.split("loraserve.audit: ", 1)[1]) for line in srv.log().splitlines()
             if "loraserve.audit: " in line]
    ok = [x for x in lines if x["action"] == "RegisterAdapter" and x["adapter"] == "audited" and x["result"] == "OK"]
    assert ok and ok[0]["key"] == "a-man" and ok[0]["tenant"] == "a" and ok[0]["sha256"].startswith("sha256:")
    denied = [x for x in lines if x["action"] == "UnregisterAdapter" and x["adapter"] == "a/audited"]
    assert denied and denied[0]["key"] == "b-man" and denied[0]["result"] == "NOT_FOUND"
    log = srv.log()
    for key in world["keys"].values():
        assert key.split("_", 2)[2] not in log  # no secret ever reaches the log (a secret may hold "_")
    assert "Traceback" not in log


def _non_loopback_ip() -> str | None:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))  # no packet is sent: this only picks a route
            ip = s.getsockname()[0]
    except OSError:
        return None
    return None if ip.startswith("127.") else ip


@pytest.mark.parametrize("allow", [False, True])
def test_open_server_refuses_remote_management_unless_allowed(world, tmp_path, allow):
    ip = _non_loopback_ip()
    if ip is None:
        pytest.skip("this machine has no non-loopback address")
    extra = ["--import-roots", str(world["imports"]), "--host", "0.0.0.0"] + (["--allow-open-management"] if allow else [])
    with running_server(tmp_path, world["base"], tmp_path / "store", *extra) as server:
        assert "runs OPEN" in server.log()
        with grpc.insecure_channel(f"{ip}:{server.port}") as channel:
            from loraserve.proto.v1 import adapters_pb2_grpc, inference_pb2_grpc
            remote = adapters_pb2_grpc.AdapterServiceStub(channel)
            def register():
                return remote.RegisterAdapter(apb.RegisterAdapterRequest(name="x", path="a0"), timeout=60)
            if allow:
                assert register().created
            else:
                code, details = code_of(register)
                assert code == grpc.StatusCode.PERMISSION_DENIED and "loopback" in details
            req = ipb.GenerateRequest(input=ipb.GenerationInput(prompt="hi", sampling=ipb.SamplingParams(max_new_tokens=2)))
            assert inference_pb2_grpc.InferenceServiceStub(channel).Generate(req, timeout=60).summary.token_ids
        local = server.adapters.RegisterAdapter(apb.RegisterAdapterRequest(name="y", path="a0"), timeout=60)
        assert local.adapter.manifest.tenant == "default"  # loopback management works either way
