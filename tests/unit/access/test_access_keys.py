"""API keys: the keys file's validation, add/list/remove, authentication (including its timing),
reloading a running server's keys, and the `loraserve keys` command. Real files throughout."""

from __future__ import annotations

import json
import logging
import os
import secrets
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from loraserve.access.key_admin import KeyInfo, add_key, list_keys, remove_key
from loraserve.access.keys import (
    UNAUTHENTICATED_MESSAGE,
    KeyFile,
    KeyRing,
    hash_secret,
    new_token,
)
from loraserve.access.principal import Principal, TenantLimits
from loraserve.errors import ConfigError, Unauthenticated

ROOT = Path(__file__).resolve().parents[3]


def entry(name: str = "ci", tenant: str = "hospital-a", role: str = "manage", **fields) -> tuple[dict, str]:
    """A valid keys-file entry and the token that authenticates as it."""
    key_id = secrets.token_hex(6)
    token, secret = new_token(key_id)
    salt = secrets.token_bytes(16)
    e = {"name": name, "key_id": key_id, "tenant": tenant, "role": role, "salt": salt.hex(),
         "sha256": hash_secret(salt, secret).hex(), "created": "2026-11-28T05:00:00Z"}
    e.update(fields)
    return e, token


def write(path: Path, doc) -> Path:
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc, sort_keys=False))
    return path


# --- the file's validation ------------------------------------------------------------------

def _bad_entry(**changes):
    e, _ = entry()
    for k, v in changes.items():
        if v is _DROP:
            del e[k]
        else:
            e[k] = v
    return {"keys": [e]}


_DROP = object()

INVALID = {
    "unknown role": (_bad_entry(role="mange"), ["keys[0] ('ci')", "field 'role'", "'mange'", "generate, manage"]),
    "salt not hex": (_bad_entry(salt="zz" * 16), ["keys[0] ('ci')", "field 'salt'", "non-hex"]),
    "salt too short": (_bad_entry(salt="ab" * 15), ["keys[0] ('ci')", "field 'salt'", "32 hex", "got 30"]),
    "sha256 wrong type": (_bad_entry(sha256=12), ["keys[0] ('ci')", "field 'sha256'", "64 hex"]),
    "key_id upper case": (_bad_entry(key_id="3F9A0C12B4E7"), ["keys[0] ('ci')", "field 'key_id'", "lowercase hex"]),
    "key_id too long": (_bad_entry(key_id="3f9a0c12b4e7a"), ["keys[0] ('ci')", "field 'key_id'"]),
    "bad name": (_bad_entry(name="-ci"), ["keys[0]", "field 'name'", "'-ci'"]),
    "bad tenant": (_bad_entry(tenant="a/b"), ["keys[0] ('ci')", "field 'tenant'", "'a/b'"]),
    "unknown field": (_bad_entry(secret="x"), ["keys[0] ('ci')", "unknown fields ['secret']"]),
    "missing field": (_bad_entry(sha256=_DROP), ["keys[0] ('ci')", "missing field 'sha256'"]),
    "bad created": (_bad_entry(created="yesterday"), ["keys[0] ('ci')", "field 'created'"]),
    "entry not a mapping": ({"keys": ["ci"]}, ["keys[0]", "expected a mapping"]),
    "duplicate name": ({"keys": [entry("ci")[0], entry("ci")[0]]},
                       ["keys[1] ('ci')", "field 'name'", "duplicate of keys[0]"]),
    "duplicate key_id": ({"keys": [entry("a", key_id="3f9a0c12b4e7")[0], entry("b", key_id="3f9a0c12b4e7")[0]]},
                         ["keys[1] ('b')", "field 'key_id'", "duplicate of keys[0]"]),
    "limit not a number": ({"keys": [], "tenants": {"t": {"max_adapters": "ten"}}},
                           ["tenants['t']", "field 'max_adapters'", "'ten'", "positive integer"]),
    "limit negative": ({"keys": [], "tenants": {"t": {"max_store_bytes": -1}}},
                       ["tenants['t']", "field 'max_store_bytes'", "-1"]),
    "limit zero": ({"keys": [], "tenants": {"t": {"requests_per_second": 0}}},
                   ["tenants['t']", "field 'requests_per_second'", "positive number"]),
    "limit bool": ({"keys": [], "tenants": {"t": {"max_concurrent_requests": True}}},
                   ["tenants['t']", "field 'max_concurrent_requests'"]),
    "limit float for a count": ({"keys": [], "tenants": {"t": {"max_adapters": 2.5}}},
                                ["tenants['t']", "field 'max_adapters'", "2.5"]),
    "unknown limit": ({"keys": [], "tenants": {"t": {"max_rps": 3}}}, ["tenants['t']", "unknown limits ['max_rps']"]),
    "bad tenant in tenants": ({"keys": [], "tenants": {"../x": {}}}, ["tenants['../x']", "not a valid tenant"]),
    "tenants not a mapping": ({"keys": [], "tenants": ["t"]}, ["`tenants` must be a mapping"]),
    "unknown top level": ({"keys": [], "users": []}, ["unknown top-level keys ['users']"]),
    "keys missing": ({"tenants": {}}, ["`keys` must be a list"]),
    "empty file": ("", ["expected a mapping"]),
    "not YAML": ("keys: [\n", ["not valid YAML/JSON", "line"]),
}


@pytest.mark.parametrize("case", INVALID)
def test_invalid_files_name_the_file_the_entry_and_the_field(tmp_path, case):
    doc, expected = INVALID[case]
    path = write(tmp_path / "keys.yaml", doc)
    with pytest.raises(ConfigError) as exc:
        KeyRing.load(path)
    for part in [str(path), *expected]:
        assert part in exc.value.message, (case, exc.value.message)
    assert "sha256: " not in exc.value.message  # never echoes a stored hash


def test_a_missing_file_says_how_to_create_one(tmp_path):
    with pytest.raises(ConfigError, match="does not exist.*loraserve keys add"):
        KeyRing.load(tmp_path / "nope.yaml")


def test_a_valid_file_with_tenants_and_json(tmp_path):
    a, token_a = entry("a-ci", tenant="hospital-a", role="manage")
    b, _ = entry("b-gen", tenant="hospital-b", role="generate", created=None)
    doc = {"keys": [a, b], "tenants": {"hospital-a": {"max_adapters": 50, "max_store_bytes": 10 << 30,
                                                      "max_concurrent_requests": 16, "requests_per_second": 50},
                                       "lab": None}}
    for path in (write(tmp_path / "keys.yaml", doc), tmp_path / "keys.json"):
        if path.suffix == ".json":
            path.write_text(json.dumps(doc))
        ring = KeyRing.load(path)
        assert len(ring) == 2 and ring.tenants == {"hospital-a", "hospital-b", "lab"}
        assert ring.limits_for("hospital-a") == TenantLimits(50, 10 << 30, 16, 50.0)
        assert ring.limits_for("hospital-b") == TenantLimits() == ring.limits_for("lab")
        assert ring.authenticate(token_a) == Principal("a-ci", "hospital-a", "manage")


def test_an_unquoted_yaml_timestamp_is_read_as_text(tmp_path):
    e, token = entry()
    text = yaml.safe_dump({"keys": [e]}).replace("'2026-11-28T05:00:00Z'", "2026-11-28T05:00:00Z")
    path = write(tmp_path / "keys.yaml", text)
    assert list_keys(path)[0].created == "2026-11-28T05:00:00Z"
    add_key(path, "second", "t", "generate")  # the rewrite keeps it as text
    assert list_keys(path)[0].created == "2026-11-28T05:00:00Z"
    assert KeyRing.load(path).authenticate(token).key_name == "ci"


def test_tenant_names_follow_adapter_names():
    from loraserve.access.keys import TENANT_NAME
    from loraserve.store.layout import ADAPTER_NAME

    assert TENANT_NAME.pattern.strip("^$") == ADAPTER_NAME.pattern.strip("^$")


# --- add / list / remove ------------------------------------------------------------------------

def test_add_list_remove_round_trip(tmp_path):
    path = tmp_path / "conf" / "keys.yaml"  # the directory is created too
    token = add_key(path, "hospital-a-ci", "hospital-a", "manage")
    assert token.startswith("lsk_") and len(token) == 4 + 12 + 1 + 43
    doc = yaml.safe_load(path.read_text())
    doc["tenants"] = {"hospital-a": {"max_adapters": 3}}
    write(path, doc)
    admin = add_key(path, "ops", "default", "admin")

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    for t in (token, admin):
        assert t not in text and t.split("_", 2)[2] not in text  # neither the token nor its secret
    assert [p.name for p in path.parent.iterdir()] == ["keys.yaml"]  # no temporary file left
    infos = list_keys(path)
    assert [(i.name, i.tenant, i.role) for i in infos] == [("hospital-a-ci", "hospital-a", "manage"),
                                                          ("ops", "default", "admin")]
    assert all(isinstance(i, KeyInfo) and len(i) == 5 for i in infos)
    assert infos[0].key_id == token[4:16]
    ring = KeyRing.load(path)
    assert ring.limits_for("hospital-a").max_adapters == 3  # the tenants section survived the add
    assert ring.authenticate(token) == Principal("hospital-a-ci", "hospital-a", "manage")
    assert ring.authenticate(admin).is_admin

    with pytest.raises(ConfigError, match="already exists"):
        add_key(path, "ops", "default", "generate")
    remove_key(path, "hospital-a-ci")
    assert [i.name for i in list_keys(path)] == ["ops"]
    assert KeyRing.load(path).limits_for("hospital-a").max_adapters == 3
    with pytest.raises(Unauthenticated):
        KeyRing.load(path).authenticate(token)
    with pytest.raises(ConfigError, match="no key named 'nobody'"):
        remove_key(path, "nobody")
    remove_key(path, "ops")
    assert list_keys(path) == [] and KeyRing.load(path).tenants == {"hospital-a"}


def test_add_writes_json_for_a_json_name_and_refuses_bad_arguments(tmp_path):
    path = tmp_path / "keys.json"
    token = add_key(path, "a", "t", "generate")
    assert json.loads(path.read_text())["keys"][0]["name"] == "a"
    assert KeyRing.load(path).authenticate(token).tenant == "t"
    for name, tenant, role, message in (("a b", "t", "generate", "invalid key name"),
                                        ("b", "../etc", "generate", "invalid tenant name"),
                                        ("b", "t", "root", "unknown role")):
        with pytest.raises(ConfigError, match=message):
            add_key(path, name, tenant, role)
    assert len(list_keys(path)) == 1


def test_add_never_rewrites_a_broken_file(tmp_path):
    path = write(tmp_path / "keys.yaml", _bad_entry(role="mange"))
    before = path.read_bytes()
    with pytest.raises(ConfigError, match="field 'role'"):
        add_key(path, "new", "t", "generate")
    assert path.read_bytes() == before


# --- authenticate ------------------------------------------------------------------------------

def test_authenticate_gives_one_answer_for_every_failure(tmp_path):
    e, token = entry("ci", role="generate")
    ring = KeyRing.from_document({"keys": [e]}, "mem")
    assert ring.authenticate(token) == Principal("ci", "hospital-a", "generate")
    key_id, secret = token[4:16], token[17:]
    flipped = secret[:-1] + ("A" if secret[-1] != "A" else "B")
    failures = {
        "unknown key_id": f"lsk_{'0' * 12}_{secret}",
        "wrong secret": f"lsk_{key_id}_{flipped}",
        "secret of another length": f"lsk_{key_id}_{secret}x",
        "upper-case key_id": f"lsk_{key_id.upper()}_{secret}",
        "other prefix": f"sk_{key_id}_{secret}",
        "bearer left in": f"Bearer {token}",
        "trailing newline": token + "\n",
        "empty": "",
        "missing": None,
        "not a string": b"lsk_",
    }
    for what, bad in failures.items():
        with pytest.raises(Unauthenticated) as exc:
            ring.authenticate(bad)
        assert exc.value.message == UNAUTHENTICATED_MESSAGE == "missing or unknown API key", what
        assert exc.value.code == "UNAUTHENTICATED"


def test_nothing_secret_in_reprs(tmp_path):
    e, token = entry()
    ring = KeyRing.from_document({"keys": [e]}, "mem")
    text = repr(ring) + repr(ring.records) + repr(ring.authenticate(token))
    assert e["sha256"] not in text and e["salt"] not in text and token[17:] not in text


def _timings(ring: KeyRing, tokens: tuple[str, str], rounds: int, calls: int) -> list[tuple[float, float]]:
    """Per round, the median time (ns) of `calls` authenticate calls with each token, the two
    interleaved in a random order per pair so drift and cache effects hit both alike."""
    import gc
    import random
    import statistics
    import time

    def once(token: str) -> int:
        start = time.perf_counter_ns()
        try:
            ring.authenticate(token)
        except Unauthenticated:
            pass
        return time.perf_counter_ns() - start

    rng = random.Random(0)
    medians = []
    gc.disable()  # a collection would land on whichever call happens to run then
    try:
        for _ in range(rounds):
            times: tuple[list[int], list[int]] = ([], [])
            for _ in range(calls):
                order = (0, 1) if rng.random() < 0.5 else (1, 0)
                for i in order:
                    times[i].append(once(tokens[i]))
            medians.append((statistics.median(times[0]), statistics.median(times[1])))
    finally:
        gc.enable()
    return medians


def _leak_verdict(medians: list[tuple[float, float]]) -> tuple[float, int, str]:
    """(ratio of the overall medians, most rounds one side was >5% faster, a summary)."""
    import statistics

    ratio = statistics.median(a for a, _ in medians) / statistics.median(b for _, b in medians)
    first = sum(a < 0.95 * b for a, b in medians)
    second = sum(b < 0.95 * a for a, b in medians)
    summary = (f"overall median ratio {ratio:.3f}; first >5% faster in {first}/{len(medians)} rounds, "
               f"second in {second}; per-round ratios {[round(a / b, 3) for a, b in medians]}")
    return ratio, max(first, second), summary


class _EarlyExitKeyRing(KeyRing):
    """The mistake KeyRing.authenticate avoids, as a control for the timing test: the same code,
    except that an unknown key_id fails before the hash and the comparison."""

    def authenticate(self, token):
        import hmac

        from loraserve.access import keys

        match = keys._TOKEN.fullmatch(token) if isinstance(token, str) else None
        if match is None:
            raise Unauthenticated(UNAUTHENTICATED_MESSAGE)
        key_id, secret = match.groups()
        record = self._by_id.get(key_id)
        if record is None:  # the leak
            raise Unauthenticated(UNAUTHENTICATED_MESSAGE)
        if not hmac.compare_digest(hash_secret(record.salt, secret), record.sha256):
            raise Unauthenticated(UNAUTHENTICATED_MESSAGE)
        return self._principals[key_id]


def test_unknown_key_and_wrong_secret_take_indistinguishable_time():
    """Acceptance: an unknown key_id and a known key_id with a wrong secret take the same time.

    Criterion, and why: on 100 keys, 20 rounds x 2,000 interleaved calls of each, the ratio of
    the overall medians must lie in [0.8, 1.25], and neither side may be more than 5% faster in
    15 or more of the 20 rounds. A sign test alone ("not every round the same way") would fail
    the correct code: the dict lookup of a known key_id compares strings and that of an unknown
    one does not, a real, consistent ~0.3% (~10 ns of ~4 us, measured on this machine) that
    reveals nothing about secrets. The leak that matters, skipping the hash for an unknown
    key_id, is ~25% here; the 5% margin sits between the two with room for scheduler noise on
    a busy 2-core machine, which moves single rounds but not 15 of 20 in the same direction.
    The same measurement of an early-exit implementation must fail the criterion, so the test
    is known to detect the leak it is about."""
    doc = {"keys": [entry(f"k{i}", tenant=f"t{i % 7}")[0] for i in range(100)]}
    known = doc["keys"][50]["key_id"]
    unknown_token = new_token("0" * 12)[0]
    wrong_secret = new_token(known)[0]
    assert unknown_token != wrong_secret and len(unknown_token) == len(wrong_secret)

    ring = KeyRing.from_document(doc, "mem")
    ratio, one_sided, summary = _leak_verdict(_timings(ring, (unknown_token, wrong_secret), rounds=20, calls=2000))
    print(summary)
    assert 0.8 <= ratio <= 1.25 and one_sided < 15, summary

    leaky = _EarlyExitKeyRing.from_document(doc, "mem")
    ratio, one_sided, summary = _leak_verdict(_timings(leaky, (unknown_token, wrong_secret), rounds=20, calls=2000))
    print("early-exit control:", summary)
    assert not (0.8 <= ratio <= 1.25 and one_sided < 15), "the criterion missed a real leak: " + summary


# --- reloading ---------------------------------------------------------------------------------

def test_reload_on_change_and_a_broken_file_keeps_the_old_keys(tmp_path, caplog):
    path = tmp_path / "keys.yaml"
    old = add_key(path, "old", "t", "generate")
    keys = KeyFile(path)
    assert keys.authenticate(old).key_name == "old"
    assert not keys.reload_if_changed()  # nothing changed

    new = add_key(path, "new", "t", "manage")
    assert keys.reload_if_changed() and not keys.reload_if_changed()
    assert keys.authenticate(new).role == "manage"

    good = path.read_text()
    path.write_text(good.replace("role: manage", "role: superuser"))
    with caplog.at_level(logging.ERROR, logger="loraserve.access.keys"):
        assert not keys.reload_if_changed()
        assert not keys.reload_if_changed()  # a broken file is reported once, not at every poll
        assert not keys.reload()  # SIGHUP re-reads it anyway, and fails again
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2 and "previous 2 keys stay in force" in errors[0] and "superuser" in errors[0]
    assert keys.authenticate(old).key_name == "old" and keys.authenticate(new).key_name == "new"

    path.unlink()
    assert not keys.reload_if_changed() and len(keys.ring) == 2  # a vanished file keeps the keys too
    path.write_text(good)
    assert keys.reload_if_changed() and len(keys.ring) == 2
    remove_key(path, "old")
    assert keys.reload()
    with pytest.raises(Unauthenticated):
        keys.authenticate(old)


def test_reload_follows_a_kubernetes_secret_symlink_swap(tmp_path):
    """The kubelet updates a Secret volume by pointing `..data` at a new directory; keys.yaml is
    a symlink through it and never changes itself."""
    mount = tmp_path / "mount"
    v1, v2 = mount / "..2026_11_28_v1", mount / "..2026_11_28_v2"
    first = add_key(v1 / "keys.yaml", "first", "t", "generate")
    (mount / "..data").symlink_to(v1.name)
    (mount / "keys.yaml").symlink_to("..data/keys.yaml")
    keys = KeyFile(mount / "keys.yaml")
    v2.mkdir()
    (v2 / "keys.yaml").write_bytes((v1 / "keys.yaml").read_bytes())
    second = add_key(v2 / "keys.yaml", "second", "t", "generate")
    (mount / "..data_tmp").symlink_to(v2.name)
    os.replace(mount / "..data_tmp", mount / "..data")  # what the kubelet does
    assert keys.reload_if_changed()
    assert keys.authenticate(second).key_name == "second" and keys.authenticate(first).key_name == "first"


def test_a_key_file_that_cannot_load_at_start_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        KeyFile(tmp_path / "keys.yaml")


def test_readers_always_see_a_whole_key_ring_while_reloading(tmp_path):
    path = tmp_path / "keys.yaml"
    stable = add_key(path, "stable", "t", "generate")
    keys = KeyFile(path)
    failures: list[BaseException] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            try:
                assert keys.authenticate(stable).key_name == "stable"
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                failures.append(exc)
                return

    readers = [threading.Thread(target=read) for _ in range(3)]
    for t in readers:
        t.start()
    try:
        for i in range(20):
            add_key(path, f"k{i}", "t", "generate")
            threading.Thread(target=keys.reload).start()
            keys.reload_if_changed()
    finally:
        stop.set()
        for t in readers:
            t.join()
    assert not failures
    keys.reload()
    assert len(keys.ring) == 21


# --- the `loraserve keys` command ---------------------------------------------------------------

def _keys_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "LORASERVE_API_KEYS_FILE"}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "loraserve", "keys", *args], check=False,
                          capture_output=True, text=True, timeout=120, cwd=ROOT, env=full_env)


def test_keys_command(tmp_path):
    path = tmp_path / "keys.yaml"
    added = _keys_cli("add", "hospital-a-ci", "--tenant", "hospital-a", "--role", "manage", "--keys-file", str(path))
    assert added.returncode == 0, added.stderr
    token = added.stdout.strip()
    assert added.stdout == token + "\n"  # the key alone on stdout: KEY=$(loraserve keys add ...)
    assert "cannot be shown again" in added.stderr and "SIGHUP" in added.stderr
    assert KeyRing.load(path).authenticate(token).tenant == "hospital-a"

    # The default file comes from LORASERVE_API_KEYS_FILE.
    env = {"LORASERVE_API_KEYS_FILE": str(path)}
    assert _keys_cli("add", "ops", "--tenant", "default", "--role", "admin", env=env).returncode == 0
    listed = _keys_cli("list", env=env)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split() == ["NAME", "KEY_ID", "TENANT", "ROLE", "CREATED"]
    assert lines[1].split()[:4] == ["hospital-a-ci", token[4:16], "hospital-a", "manage"]
    assert token[17:] not in listed.stdout and "sha256" not in listed.stdout
    as_json = json.loads(_keys_cli("list", "--json", "--keys-file", str(path)).stdout)
    assert [k["name"] for k in as_json] == ["hospital-a-ci", "ops"] and set(as_json[0]) == set(KeyInfo._fields)

    removed = _keys_cli("remove", "ops", "--keys-file", str(path))
    assert removed.returncode == 0 and "removed key 'ops'" in removed.stdout
    assert [i.name for i in list_keys(path)] == ["hospital-a-ci"]

    for args, message in ((("add", "hospital-a-ci", "--tenant", "x", "--role", "generate"), "already exists"),
                          (("remove", "nobody"), "no key named 'nobody'"),
                          (("list", "--keys-file", str(tmp_path / "none.yaml")), "does not exist")):
        failed = _keys_cli(*args, env=env)
        assert failed.returncode == 2 and message in failed.stderr, failed.stderr
        assert failed.stderr.count("\n") == 1 and "Traceback" not in failed.stderr and failed.stdout == ""
    bad_role = _keys_cli("add", "x", "--tenant", "t", "--role", "root", env=env)
    assert bad_role.returncode == 2 and "invalid choice" in bad_role.stderr


def test_keys_file_defaults_to_keys_yaml_in_the_working_directory(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "LORASERVE_API_KEYS_FILE"}
    result = subprocess.run([sys.executable, "-m", "loraserve", "keys", "add", "a", "--tenant", "t", "--role",
                             "generate"], check=False, capture_output=True, text=True, timeout=120, cwd=tmp_path,
                            env=env)
    assert result.returncode == 0, result.stderr
    assert [i.name for i in list_keys(tmp_path / "keys.yaml")] == ["a"]
