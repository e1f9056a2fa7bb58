"""`loraserve bench tenants` end to end at the smallest size: a real server subprocess, tenant A's
stream and tenant B's processes (a flood, and B paced at its limits). Checks the result's shape and the isolation invariants, not
the timing ratio (a 2-core CI box says little about it in one short round)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_tenant_bench_reports_isolation_invariants(tmp_path):
    out = tmp_path / "tenants.json"
    result = subprocess.run(
        [sys.executable, "-m", "loraserve", "bench", "tenants", "--size", "tiny", "--rounds", "1", "--a-requests", "4",
         "--b-threads", "3", "--workdir", str(tmp_path / "work"), "--json", str(out)],
        check=False, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "share its CPUs" in result.stdout and "a_p99_flood_over_alone" in result.stdout

    doc = json.loads(out.read_text())
    assert doc["bench"] == "tenants"
    # B's rate limit was calibrated to a quarter of one stream's rate, and the server reloaded it.
    latency, limits = doc["config"]["a_sequential_latency_s"], doc["config"]["b_limits"]
    assert limits["max_concurrent_requests"] == 1 and doc["config"]["b_load"] == 0.25
    assert limits["requests_per_second"] == pytest.approx(0.25 / latency, rel=0.01)
    assert doc["config"]["a_rate_rps"] > 0 and doc["server"]["exit_code"] == 0
    for name in ("alone", "at_limit", "flood"):
        phase = doc["phases"][name]
        assert phase["a_requests"] == 4 and len(phase["rounds"]) == 1
        assert phase["a_errors"] == {}, name  # tenant A never fails, flood or not
        lat = phase["a_latency_s"]
        assert lat["samples"] == 4 and 0 < lat["p50"] <= lat["p99"]
    assert doc["phases"]["alone"]["rounds"][0]["b"] is None
    b = doc["b"]
    assert b["ok"] > 0 and b["resource_exhausted"] > 0 and b["other"] == {}
    assert b["calls"] == b["ok"] + b["resource_exhausted"] and b["admitted_rps"] > 0
    # At its limits B is paced to 90% of its rate from as many threads as it may run at once.
    steady = doc["b_at_limit"]
    assert steady["ok"] > 0 and steady["other"] == {}
    assert steady["calls"] <= 1 + steady["flood_s"] * 0.9 * limits["requests_per_second"]  # the first starts at 0
    # Flooding, B is refused far more often than admitted, though each refusal is held until a
    # retry could pass (the server's default --refusal-hold, recorded in the config).
    assert doc["config"]["refusal_hold"] == 1.0 and "--refusal-hold" in doc["server"]["command"]
    assert b["resource_exhausted"] > b["ok"] and steady["resource_exhausted"] < b["resource_exhausted"]
    cpu = doc["phases"]["flood"]["rounds"][0]["cpu_s"]  # the server's two processes, measured apart
    assert cpu["server_front"] > 0 and cpu["server_engine"] > 0 and cpu["b_flood"] > 0
    for name in ("a_p99_flood_over_alone", "a_p99_at_limit_over_alone", "a_p99_flood_over_at_limit"):
        assert doc["ratios"][name]["value"] > 0
    ratio = doc["ratios"]["a_p99_flood_over_alone"]
    assert ratio["target"] == "<= 1.5" and isinstance(ratio["pass"], bool) and ratio["value"] > 0
    assert doc["invariants"] == {"a_no_errors": True, "b_refused": True, "b_admitted": True}
