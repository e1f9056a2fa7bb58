"""The adapter store on disk: publish/get/list/remove, persistence, crash safety (processes
killed at every durable step and at random times), concurrency, quotas and start-up verification.
Import roots are tested in test_import_roots.py, the safetensors header check in
test_safetensors_check.py.

Most adapters here are small hand-written safetensors files (fast, and the store never looks
inside the tensors); one pair of real PEFT adapters on a tiny DeepSeek base checks that a
published version is exactly what `read_adapter_dir` reads, digest included.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from store_helpers import MB, adapter_files, write_dir

from loraserve.errors import (
    AdapterAlreadyExists,
    AdapterIncompatible,
    AdapterNotFound,
    ConfigError,
    InvalidArgument,
    ResourceExhausted,
)
from loraserve.store.adapter_store import AdapterStore
from loraserve.store.layout import CONFIG_FILE, CURRENT_LINK, MANIFEST_FILE, SHARED_MARKER, WEIGHTS_FILE, Manifest
from loraserve.store.safetensors_check import check_safetensors_header

REPO = Path(__file__).resolve().parents[3]
FIELDS = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "base_fingerprint": "sha256:base",
          "source": "register"}


# ---- checks and fixtures -------------------------------------------------------------------
def assert_whole(store: AdapterStore) -> None:
    """The on-disk state is exactly one current version per served adapter, no leftovers."""
    assert not [p.name for p in store.root.iterdir() if p.name.startswith(".tmp-")]
    for manifest in store.list():
        name_dir = store.root / manifest.adapter_id
        assert sorted(p.name for p in name_dir.iterdir() if p.name != SHARED_MARKER) == \
            sorted([CURRENT_LINK, store.path_of(manifest.adapter_id).name])
        assert (name_dir / CURRENT_LINK).resolve() == store.path_of(manifest.adapter_id)


@pytest.fixture(scope="module")
def peft_adapters(tmp_path_factory) -> list[Path]:
    """Two real PEFT adapters (different seeds) on a tiny DeepSeek-V3 base."""
    from transformers import AutoModelForCausalLM

    from loraserve.devtools.random_adapters import make_random_adapter
    from loraserve.devtools.synthetic_base import init_model
    root = tmp_path_factory.mktemp("peft")
    base = init_model(root / "base", "deepseek-v3", "tiny", seed=0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return [make_random_adapter(base, root / f"a{seed}", r=8, target="attention", seed=seed, model=model)
            for seed in (0, 1)]


@pytest.fixture
def store(tmp_path) -> Iterator[AdapterStore]:
    s = AdapterStore(tmp_path / "store", max_adapter_bytes=64 * MB)
    yield s
    s.close()


# ---- the basic contract --------------------------------------------------------------------
def test_publish_get_list_remove(store):
    manifest, created = store.publish("t/alpha", adapter_files(1), **FIELDS)
    assert created and manifest.adapter_id == "t/alpha" and manifest.r == 8 and manifest.lora_alpha == 16.0
    assert manifest.target_modules == ("q_proj", "v_proj") and manifest.source == "register"
    assert manifest.size_bytes == sum(len(b) for b in adapter_files(1).values())
    assert manifest.created_time.endswith("Z") and manifest.digest.startswith("sha256:")
    assert store.get("t/alpha") == manifest and store.list() == [manifest]
    assert (store.path_of("t/alpha") / WEIGHTS_FILE).read_bytes() == adapter_files(1)[WEIGHTS_FILE]
    assert store.total_bytes() == manifest.size_bytes
    store.publish("t/beta", adapter_files(2), **FIELDS)
    assert [m.adapter_id for m in store.list()] == ["t/alpha", "t/beta"]
    store.remove("t/alpha")
    assert [m.adapter_id for m in store.list()] == ["t/beta"]
    assert not (store.root / "t" / "alpha").exists()
    for call in (store.get, store.path_of, store.remove):
        with pytest.raises(AdapterNotFound, match="'t/alpha'"):
            call("t/alpha")
    assert_whole(store)


def test_real_peft_adapter_reads_back_with_the_same_digest(store, peft_adapters):
    from loraserve.store.peft_files import read_adapter_dir
    src = peft_adapters[0]
    manifest, _ = store.publish("t/real", {f: src / f for f in (CONFIG_FILE, WEIGHTS_FILE)}, **FIELDS)
    config, tensors, digest = read_adapter_dir(store.path_of("t/real"), "real")
    _, _, source_digest = read_adapter_dir(src, "real")
    assert digest == manifest.digest == source_digest and config.r == 8 and tensors
    header = check_safetensors_header(src / WEIGHTS_FILE, max_bytes=64 * MB)
    assert {k: (str(t.dtype), list(t.shape)) for k, t in tensors.items()} == \
        {k: ({"F32": "torch.float32"}[h.dtype], list(h.shape)) for k, h in header.items()}


def test_same_content_is_a_no_op_and_different_content_needs_replace(store):
    first, created = store.publish("t/a", adapter_files(1), **FIELDS)
    path = store.path_of("t/a")
    again, created_again = store.publish("t/a", adapter_files(1), **{**FIELDS, "source": "upload"}, replace=True)
    assert created and not created_again and again == first and store.path_of("t/a") == path
    with pytest.raises(AdapterAlreadyExists, match="'t/a'.*replace"):
        store.publish("t/a", adapter_files(2), **FIELDS)
    assert store.get("t/a") == first
    replaced, created = store.publish("t/a", adapter_files(2), **FIELDS, replace=True)
    assert created and replaced.digest != first.digest and store.get("t/a") == replaced
    assert not path.exists()  # the superseded version is deleted
    assert_whole(store)


def test_published_adapters_survive_a_restart(tmp_path):
    root = tmp_path / "store"
    with AdapterStore(root, max_adapter_bytes=MB) as store:
        before = [store.publish(n, adapter_files(i), **FIELDS)[0] for i, n in enumerate(["t/x", "t/y.v2", "t/Z_3"])]
        store.remove("t/y.v2")
    with AdapterStore(root, max_adapter_bytes=MB) as reopened:
        assert reopened.list() == [before[2], before[0]] and reopened.problems == []
        assert reopened.get("t/x").digest == before[0].digest
        assert_whole(reopened)


def test_stage_then_commit_and_discard(store):
    with store.stage("t/s", adapter_files(1)) as staged:
        assert (staged.path / CONFIG_FILE).is_file() and staged.size_bytes > 0
        manifest, created = store.commit(staged, **FIELDS)
    assert created and manifest.digest == staged.digest and store.get("t/s") == manifest
    with store.stage("t/t", adapter_files(2)):
        pass  # validation failed, say: nothing is published, nothing is left
    with pytest.raises(AdapterNotFound):
        store.get("t/t")
    assert_whole(store)


@pytest.mark.parametrize("name", ["", "x", "/x", "t/", "t/.hidden", "t/..", "../x", "..", "a/b/c", "t/-x", "t/" + "x" * 129,
                                  "t/é", "t/a b", "t/a\x00", "t/a\n", "-t/x", ".t/x", "t\n/x"])
def test_invalid_names_are_refused(store, name):
    with pytest.raises(InvalidArgument, match="invalid (adapter|tenant)"):
        store.publish(name, adapter_files(1), **FIELDS)
    with pytest.raises(InvalidArgument):
        store.get(name)


@pytest.mark.parametrize("files, error, words", [
    ({CONFIG_FILE: b"{}"}, AdapterIncompatible, "has no adapter_model.safetensors"),
    ({**adapter_files(1), "adapter_model.bin": b"x"}, InvalidArgument, "unexpected file 'adapter_model.bin'"),
    ({**adapter_files(1), CONFIG_FILE: b"not json"}, AdapterIncompatible, "not valid JSON"),
    ({**adapter_files(1), CONFIG_FILE: b"[1]"}, AdapterIncompatible, "must hold a JSON object"),
    ({**adapter_files(1), WEIGHTS_FILE: b"\x00" * 4}, AdapterIncompatible, "truncated"),
])
def test_bad_files_are_refused_and_leave_nothing(store, files, error, words):
    with pytest.raises(error, match=words):
        store.publish("t/bad", files, **FIELDS)
    assert store.list() == [] and sorted(p.name for p in store.root.iterdir()) == [".lock"]


def test_manifest_fields_are_validated(store):
    with pytest.raises(InvalidArgument, match="source 'cli'"):
        store.publish("t/a", adapter_files(1), **{**FIELDS, "source": "cli"})
    with pytest.raises(InvalidArgument, match="r must be"):
        store.publish("t/a", adapter_files(1), **{**FIELDS, "r": 0})
    assert sorted(p.name for p in store.root.iterdir()) == [".lock"]


# ---- quotas --------------------------------------------------------------------------------
def test_per_adapter_limit(tmp_path):
    files = adapter_files(1, weights_bytes=8192)
    size = sum(len(b) for b in files.values())
    words = f"adapter 't/a' is {size:,} bytes, over the per-adapter limit of {size - 1:,}"
    with AdapterStore(tmp_path, max_adapter_bytes=size - 1) as store, pytest.raises(ResourceExhausted, match=words):
        store.publish("t/a", files, **FIELDS)
    with AdapterStore(tmp_path, max_adapter_bytes=size) as store:
        assert store.publish("t/a", files, **FIELDS)[1]


def test_store_limit_counts_replaced_versions_once(tmp_path):
    size = sum(len(b) for b in adapter_files(1).values())
    with AdapterStore(tmp_path, max_adapter_bytes=MB, max_store_bytes=2 * size) as store:
        store.publish("t/a", adapter_files(1), **FIELDS)
        store.publish("t/b", adapter_files(2), **FIELDS)
        with pytest.raises(ResourceExhausted, match=f"store to {3 * size:,} bytes, over its limit of {2 * size:,}"):
            store.publish("t/c", adapter_files(3), **FIELDS)
        store.publish("t/b", adapter_files(3), **FIELDS, replace=True)  # same size: fits
        store.remove("t/a")
        store.publish("t/c", adapter_files(4), **FIELDS)
        assert store.total_bytes() == 2 * size and [m.adapter_id for m in store.list()] == ["t/b", "t/c"]
        assert_whole(store)


def test_bad_limits_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="max_adapter_bytes"):
        AdapterStore(tmp_path, max_adapter_bytes=0)
    with pytest.raises(ConfigError, match="max_store_bytes"):
        AdapterStore(tmp_path, max_adapter_bytes=1, max_store_bytes=-5)


# ---- start-up recovery and verification ----------------------------------------------------
def test_leftovers_are_cleaned_at_start(tmp_path):
    root = tmp_path / "store"
    with AdapterStore(root, max_adapter_bytes=MB) as store:
        good = store.publish("t/good", adapter_files(1), **FIELDS)[0]
        current = store.path_of("t/good")
    write_dir(root / ".tmp-stage-deadbeef", adapter_files(2))  # a staging dir from a crash
    shutil.copytree(current, root / "t" / "good" / "v-0123456789abcdef-00000000")  # renamed in, never swapped
    os.symlink("nowhere", root / "t" / "good" / ".tmp-link-1")  # a temporary link never renamed
    write_dir(root / "t" / "half" / "v-0123456789abcdef-11111111", adapter_files(3))  # first publish, no current
    (root / "t" / "lost").mkdir()
    os.symlink("v-0123456789abcdef-22222222", root / "t" / "lost" / CURRENT_LINK)  # dangling
    (root / "README").write_text("an operator's note")  # not ours: left alone
    with AdapterStore(root, max_adapter_bytes=MB) as store:
        assert store.list() == [good]
        assert [(p.adapter_id, "missing" in p.message) for p in store.problems] == [("t/lost", True)]
        assert sorted(p.name for p in root.iterdir()) == [".lock", "README", "t"]
        assert sorted(p.name for p in (root / "t").iterdir()) == ["good"]
        assert_whole(store)
        store.remove("t/lost")  # a reported problem can be cleared
        assert store.problems == []


@pytest.mark.parametrize("damage, words", [
    (lambda v: v.joinpath(WEIGHTS_FILE).write_bytes(_flip(v.joinpath(WEIGHTS_FILE).read_bytes())), "sha256"),
    (lambda v: v.joinpath(WEIGHTS_FILE).write_bytes(v.joinpath(WEIGHTS_FILE).read_bytes()[:-1]), "bytes, its manifest"),
    (lambda v: v.joinpath(CONFIG_FILE).unlink(), "adapter_config.json is missing"),
    (lambda v: v.joinpath(MANIFEST_FILE).write_text("{"), "manifest.json is malformed"),
    (lambda v: v.joinpath(MANIFEST_FILE).unlink(), "manifest.json is missing"),
])
def test_damaged_adapter_is_reported_and_not_served(tmp_path, damage, words):
    root = tmp_path / "store"
    with AdapterStore(root, max_adapter_bytes=MB) as store:
        store.publish("t/ok", adapter_files(1), **FIELDS)
        store.publish("t/hit", adapter_files(2), **FIELDS)
        damage(store.path_of("t/hit"))
    with AdapterStore(root, max_adapter_bytes=MB) as store:
        assert [m.adapter_id for m in store.list()] == ["t/ok"]
        assert len(store.problems) == 1 and store.problems[0].adapter_id == "t/hit"
        assert words in store.problems[0].message and str(root) not in store.problems[0].message
        with pytest.raises(AdapterNotFound):
            store.path_of("t/hit")
        assert store.publish("t/hit", adapter_files(2), **FIELDS)[1]  # publishing again repairs it
        assert store.problems == [] and store.get("t/hit").digest
        assert_whole(store)


def _flip(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 0xFF])


# ---- crashes -------------------------------------------------------------------------------
CRASH_CHILD = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from loraserve.store.adapter_store import AdapterStore
    root, action, crash_at, delay = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    sources = [Path(p) for p in sys.argv[5:]]
    FIELDS = dict(r=8, lora_alpha=16, target_modules=["q_proj"], base_fingerprint="sha256:b", source="upload")
    store = AdapterStore(root, max_adapter_bytes=1 << 30)
    count = 0
    def crash_point(fn):
        def wrapped(*args, **kwargs):
            global count
            count += 1
            if count == crash_at:
                os._exit(17)  # like SIGKILL: no cleanup runs
            if delay and fn is fsync:
                time.sleep(delay)
            return fn(*args, **kwargs)
        return wrapped
    fsync = os.fsync
    for op in ("fsync", "rename", "replace", "symlink", "mkdir", "unlink", "rmdir"):
        setattr(os, op, crash_point(getattr(os, op)))
    def publish(src):
        store.publish("t/a", {f: src / f for f in ("adapter_config.json", "adapter_model.safetensors")},
                      **FIELDS, replace=True)
    print("ready", flush=True)
    if action == "publish":
        publish(sources[0])
    elif action == "remove":
        store.remove("t/a")
    else:  # "loop": publish, replace, remove, forever, until killed; a line after each
        while True:
            for src in sources:
                publish(src)
                print("done", flush=True)
            store.remove("t/a")
            print("done", flush=True)
    print(count, flush=True)
""")


def _child(root: Path, action: str, crash_at: int, sources: list[Path], delay: float = 0.0) -> subprocess.Popen:
    env = dict(os.environ)
    return subprocess.Popen([sys.executable, "-c", CRASH_CHILD, str(root), action, str(crash_at), str(delay),
                             *map(str, sources)], stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)


def _digest_of(files: dict[str, bytes]) -> str:
    import hashlib
    inner = hashlib.sha256(files[CONFIG_FILE]).digest() + hashlib.sha256(files[WEIGHTS_FILE]).digest()
    return "sha256:" + hashlib.sha256(inner).hexdigest()


def _state_after_crash(root: Path) -> str | None:
    """Open the store as a restarted server would: the digest served under 'a', or None."""
    with AdapterStore(root, max_adapter_bytes=1 << 30) as store:
        assert store.problems == [], store.problems
        assert_whole(store)
        return store.get("t/a").digest if store.list() else None


@pytest.mark.parametrize("action, before, allowed", [
    ("publish", None, (None, "new")),      # first publish of a name
    ("publish", "old", ("old", "new")),    # replace
    ("remove", "old", ("old", None)),
])
def test_crash_at_every_durable_step_leaves_old_or_new(tmp_path, action, before, allowed):
    """The child dies (os._exit, no cleanup) just before its k-th fsync/rename/replace/symlink/
    mkdir/unlink/rmdir, for every k; the restarted store serves the old or the new adapter,
    whole, and once the commit point has passed it is always the new one."""
    old, new = adapter_files(1, 256 * 1024), adapter_files(2, 256 * 1024)
    digests = {"old": _digest_of(old), "new": _digest_of(new), None: None}
    new_dir = write_dir(tmp_path / "src-new", new)
    template = tmp_path / "template"
    with AdapterStore(template, max_adapter_bytes=MB) as store:
        if before:
            store.publish("t/a", old, **FIELDS)
    dry = _child(template, action, 0, [new_dir])
    steps = int(dry.communicate()[0].split()[-1])
    shutil.rmtree(template)
    with AdapterStore(template, max_adapter_bytes=MB) as store:
        if before:
            store.publish("t/a", old, **FIELDS)
    seen = []
    for k in range(1, steps + 1):
        root = tmp_path / f"run{k}"
        shutil.copytree(template, root, symlinks=True)
        assert _child(root, action, k, [new_dir]).wait() == 17
        state = _state_after_crash(root)
        label = next(key for key, d in digests.items() if d == state)
        assert label in allowed, f"crash before step {k} of {steps} left {label!r}"
        seen.append(label)
        shutil.rmtree(root)
    assert steps >= 5 and allowed[1] in seen
    first_new = seen.index(allowed[1])  # the commit point: before it old, after it new, no flip-flop
    assert first_new > 0 and seen == [allowed[0]] * first_new + [allowed[1]] * (steps - first_new), seen


def test_sigkill_at_random_points(tmp_path):
    """A child publishes, replaces and removes in a loop; it is SIGKILLed at a random moment,
    20 times on the same store. Each restart serves nothing, A or B, whole, and no problems."""
    sources = [write_dir(tmp_path / f"src{i}", adapter_files(i, 2 * MB)) for i in (1, 2)]
    digests = {None, *(_digest_of(adapter_files(i, 2 * MB)) for i in (1, 2))}
    root = tmp_path / "store"
    AdapterStore(root, max_adapter_bytes=64 * MB).close()
    rng = random.Random(0)
    states = set()
    for _ in range(20):
        child = _child(root, "loop", 0, sources, delay=0.002)
        assert child.stdout.readline().strip() == "ready"
        for _ in range(rng.randrange(3)):  # let 0-2 operations finish, however slow the machine
            assert child.stdout.readline().strip() == "done"
        time.sleep(rng.uniform(0.0, 0.05))  # then kill somewhere inside the next one
        child.kill()
        child.wait()
        state = _state_after_crash(root)
        assert state in digests
        states.add(state)
    assert len(states) >= 2  # the kills did land in different phases


# ---- concurrency ---------------------------------------------------------------------------
def test_concurrent_publish_and_remove_of_one_name(tmp_path):
    root = tmp_path / "store"
    contents = [adapter_files(i, 64 * 1024) for i in range(3)]
    outcomes: list[str] = []
    with AdapterStore(root, max_adapter_bytes=MB) as store:
        def worker(seed: int) -> None:
            rng = random.Random(seed)
            for _ in range(25):
                op = rng.choice(["publish", "replace", "remove", "get"])
                try:
                    if op == "remove":
                        store.remove("t/same")
                    elif op == "get":
                        assert (store.path_of("t/same") / MANIFEST_FILE).parent.name.startswith("v-")
                    else:
                        store.publish("t/same", rng.choice(contents), **FIELDS, replace=op == "replace")
                    outcomes.append("ok")
                except (AdapterAlreadyExists, AdapterNotFound) as exc:
                    outcomes.append(type(exc).__name__)
                except BaseException as exc:  # noqa: BLE001 - anything else fails the test below
                    outcomes.append(repr(exc))
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert set(outcomes) <= {"ok", "AdapterAlreadyExists", "AdapterNotFound"}, set(outcomes)
        assert len(outcomes) == 200
        listed = store.list()
        assert_whole(store)
    with AdapterStore(root, max_adapter_bytes=MB) as reopened:
        assert reopened.list() == listed and reopened.problems == []


def test_manifest_json_round_trips(store):
    manifest, _ = store.publish("t/m", adapter_files(1), **FIELDS)
    on_disk = (store.path_of("t/m") / MANIFEST_FILE).read_bytes()
    assert Manifest.from_json(on_disk) == manifest
    body = json.loads(on_disk)
    assert sorted(body) == sorted(["format_version", "name", "files", "r", "lora_alpha", "target_modules",
                                   "base_fingerprint", "size_bytes", "created_time", "source"])
    assert [f["name"] for f in body["files"]] == [CONFIG_FILE, WEIGHTS_FILE]
