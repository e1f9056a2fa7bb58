"""One adapter store shared by several processes (replicas on a ReadWriteMany volume, a
training job publishing next to running servers): each sees the others' changes on refresh,
commits never lose or mix another writer's work, and start-up deletes only the leftovers of
writers that are gone."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from store_helpers import MB, adapter_files

from loraserve.errors import AdapterAlreadyExists, AdapterNotFound
from loraserve.store.adapter_store import AdapterStore
from loraserve.store.layout import CURRENT_LINK, STALE_TMP_SECONDS, new_tmp_name

REPO = Path(__file__).resolve().parents[3]
FIELDS = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], "base_fingerprint": "sha256:base",
          "source": "trainer"}


def test_a_second_store_sees_publish_replace_and_remove(tmp_path):
    writer = AdapterStore(tmp_path, max_adapter_bytes=MB)
    reader = AdapterStore(tmp_path, max_adapter_bytes=MB, superseded_grace_seconds=0.5)
    first, _ = writer.publish("t/a", adapter_files(1), **FIELDS)
    with pytest.raises(AdapterNotFound):
        reader.get("t/a")  # not looked yet
    assert reader.refresh_one("t/a") and reader.get("t/a") == first
    old_path = reader.path_of("t/a")
    second, _ = reader.publish("t/a", adapter_files(2), **FIELDS, replace=True)
    assert old_path.is_dir()  # within the grace: the writer may still be reading it
    assert writer.refresh() == ["t/a"] and writer.get("t/a") == second
    time.sleep(0.6)
    assert reader.refresh() == [] and not old_path.exists()  # pruned once the grace passed
    writer.remove("t/a")
    assert reader.refresh() == ["t/a"]
    with pytest.raises(AdapterNotFound):
        reader.get("t/a")


def test_a_stale_index_cannot_overwrite_another_writers_adapter(tmp_path):
    one = AdapterStore(tmp_path, max_adapter_bytes=MB)
    two = AdapterStore(tmp_path, max_adapter_bytes=MB)
    kept, _ = one.publish("t/same", adapter_files(1), **FIELDS)
    with pytest.raises(AdapterAlreadyExists):
        two.publish("t/same", adapter_files(2), **FIELDS)  # `two` never refreshed, yet it is refused
    again, created = two.publish("t/same", adapter_files(1), **FIELDS)
    assert not created and again.digest == kept.digest
    two.remove("t/same")  # removal of what another process published works without a refresh
    assert one.refresh() == ["t/same"] and one.list() == []


def test_store_limit_counts_what_other_writers_published(tmp_path):
    size = sum(len(v) for v in adapter_files(1).values())
    one = AdapterStore(tmp_path, max_adapter_bytes=MB, max_store_bytes=size + size // 2)
    two = AdapterStore(tmp_path, max_adapter_bytes=MB, max_store_bytes=size + size // 2)
    one.publish("t/a", adapter_files(1), **FIELDS)
    with pytest.raises(Exception, match="over its limit"):
        two.publish("t/b", adapter_files(2), **FIELDS)


def test_start_up_keeps_live_writers_work_and_deletes_dead_ones(tmp_path):
    AdapterStore(tmp_path, max_adapter_bytes=MB)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    live = tmp_path / f".tmp-stage-aa@{sleeper.pid}@{host}"
    gone = tmp_path / f".tmp-stage-bb@{dead.pid}@{host}"
    fresh_elsewhere = tmp_path / ".tmp-stage-cc@1@another-replica"
    old_elsewhere = tmp_path / ".tmp-stage-dd@1@another-replica"
    for path in (live, gone, fresh_elsewhere, old_elsewhere):
        path.mkdir()
    past = time.time() - STALE_TMP_SECONDS - 60
    os.utime(old_elsewhere, (past, past))
    try:
        AdapterStore(tmp_path, max_adapter_bytes=MB)
        assert sorted(p.name for p in tmp_path.glob(".tmp-*")) == sorted([live.name, fresh_elsewhere.name])
    finally:
        sleeper.kill()
        sleeper.wait()
    AdapterStore(tmp_path, max_adapter_bytes=MB)
    assert [p.name for p in tmp_path.glob(".tmp-*")] == [fresh_elsewhere.name]
    assert new_tmp_name("stage").endswith(f"@{os.getpid()}@{host}")


WRITER = textwrap.dedent("""
    import sys
    from store_helpers import adapter_files
    from loraserve.store.adapter_store import AdapterStore
    root, prefix = sys.argv[1], sys.argv[2]
    store = AdapterStore(root, max_adapter_bytes=1 << 20)
    fields = dict(r=8, lora_alpha=16, target_modules=["q_proj"], base_fingerprint="sha256:base", source="upload")
    for i in range(15):
        store.publish(f"{prefix}/{i}", adapter_files(i, 32 * 1024), **fields)
        store.publish("t/shared", adapter_files(100 + i % 3, 32 * 1024), **fields, replace=True)
        if i % 3 == 2:
            store.remove(f"{prefix}/{i - 1}")
""")


def test_concurrent_writer_processes_lose_nothing(tmp_path):
    """Three processes publish, replace one shared name and remove, at once, on one store;
    afterwards a fresh open finds exactly the union of what each one left, all whole."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests" / "helpers")}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), p], env=env, cwd=REPO)
             for p in ("p", "q", "r")]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    store = AdapterStore(tmp_path, max_adapter_bytes=MB)
    expected = {"t/shared"} | {f"{p}/{i}" for p in "pqr" for i in range(15) if not (i % 3 == 1 and i < 14)}
    assert {m.adapter_id for m in store.list()} == expected and store.problems == []
    for name in expected:
        entries = sorted(p.name for p in (tmp_path / name).iterdir())
        assert entries == sorted([CURRENT_LINK, store.path_of(name).name])
    assert not list(tmp_path.glob(".tmp-*"))


def test_sharing_is_a_marker_every_process_sees_and_a_remove_drops(tmp_path):
    one = AdapterStore(tmp_path, max_adapter_bytes=MB)
    two = AdapterStore(tmp_path, max_adapter_bytes=MB)
    one.publish("t/a", adapter_files(1), **FIELDS)
    one.publish("u/b", adapter_files(2), **FIELDS)
    assert not one.is_shared("t/a")
    one.set_shared("t/a", True)
    assert one.is_shared("t/a") and two.refresh() == ["t/a", "u/b"] and two.is_shared("t/a")
    one.publish("t/a", adapter_files(3), **FIELDS, replace=True)  # a replace keeps it shared
    assert one.is_shared("t/a") and AdapterStore(tmp_path, max_adapter_bytes=MB).is_shared("t/a")
    two.set_shared("t/a", False)
    assert one.refresh() == ["t/a"] and not one.is_shared("t/a")
    one.set_shared("t/a", True)
    one.remove("t/a")
    one.publish("t/a", adapter_files(1), **FIELDS)
    assert not one.is_shared("t/a")  # a removed adapter's sharing does not outlive it
    with pytest.raises(AdapterNotFound):
        one.set_shared("t/missing", True)
    assert one.tenant_usage("t") == (1, sum(len(v) for v in adapter_files(1).values()))
    assert one.tenant_usage("u")[0] == 1 and one.tenant_usage("nobody") == (0, 0)
