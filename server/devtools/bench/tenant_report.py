"""The results of `loraserve bench tenants`: the JSON document (pooled percentiles per phase,
B's counts and rates, the ratios with their target, the invariants) and the printed report."""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import asdict
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from loraserve.devtools.bench.tenant_bench import Phase

PHASES = ("alone", "at_limit", "flood")
RATIO_TARGET = 1.5  # a_p99_flood_over_alone <= this


def summarize(config: dict, phases: list[Phase], server: dict, b_over_limit: bool, elapsed: float) -> dict:
    """The JSON document: `config` as given, machine, per-phase pooled percentiles and raw rounds,
    B's counts, the ratio with its target, and the invariants (`b_over_limit`: B ran more threads
    than its concurrency limit, so it must have been refused)."""
    from loraserve.devtools.bench.engine_bench import machine_info
    from loraserve.devtools.bench.serve_bench import percentiles

    result_phases = {}
    for name in PHASES:
        runs = [p for p in phases if p.name == name]
        codes = sum((Counter(p.a_codes) for p in runs), Counter())
        result_phases[name] = {
            "a_latency_s": percentiles([s for p in runs for s in p.a_latency_s]),
            "a_server_s": percentiles([s for p in runs for s in p.a_server_s]),
            "a_requests": sum(len(p.a_latency_s) for p in runs),
            "a_errors": {c: n for c, n in codes.items() if c != "OK"},
            "rounds": [{**asdict(p), "a_latency_p50_s": statistics.median(p.a_latency_s)} for p in runs],
        }
    b = {name: _b_summary([p.b for p in phases if p.name == name]) for name in ("flood", "at_limit")}
    lat = {name: result_phases[name]["a_latency_s"] for name in PHASES}
    ratios = {"a_p99_flood_over_alone": {"value": lat["flood"]["p99"] / lat["alone"]["p99"],
                                         "target": f"<= {RATIO_TARGET:g}"},
              "a_p50_flood_over_alone": {"value": lat["flood"]["p50"] / lat["alone"]["p50"], "target": None},
              "a_p99_at_limit_over_alone": {"value": lat["at_limit"]["p99"] / lat["alone"]["p99"], "target": None},
              "a_p99_flood_over_at_limit": {"value": lat["flood"]["p99"] / lat["at_limit"]["p99"], "target": None}}
    ratios["a_p99_flood_over_alone"]["pass"] = ratios["a_p99_flood_over_alone"]["value"] <= RATIO_TARGET
    return {
        "bench": "tenants",
        "config": config,
        "machine": {**machine_info(), "shared": "tenant A's client, tenant B's flood process and the server "
                    "all run on this machine and share its CPUs"},
        "server": server,
        "phases": result_phases,
        "b": b["flood"],
        "b_at_limit": b["at_limit"],
        "ratios": ratios,
        "invariants": {"a_no_errors": not any(result_phases[n]["a_errors"] for n in PHASES),
                       "b_refused": b["flood"]["resource_exhausted"] > 0 if b_over_limit else None,
                       "b_admitted": b["flood"]["ok"] > 0 and b["at_limit"]["ok"] > 0},
        "elapsed_s": elapsed,
    }


def _b_summary(runs: list[dict]) -> dict:
    """B's status counts and rates over the phases `runs` of one kind."""
    codes = sum((Counter(b["codes"]) for b in runs), Counter())
    seconds = sum(b["elapsed_s"] for b in runs)
    calls = sum(codes.values())
    return {"ok": codes.get("OK", 0), "resource_exhausted": codes.get("RESOURCE_EXHAUSTED", 0),
            "other": {c: n for c, n in codes.items() if c not in ("OK", "RESOURCE_EXHAUSTED")},
            "calls": calls, "flood_s": seconds, "attempted_rps": calls / seconds,
            "admitted_rps": codes.get("OK", 0) / seconds}


def print_phase(p: Phase, rounds: int) -> None:
    """One line as a phase ends, so a long run shows progress."""
    c = p.cpu_s
    extra = f", B: {p.b['codes']}" if p.b else ""
    print(f"  round {p.round + 1}/{rounds} {p.name:<8} A p50 {statistics.median(p.a_latency_s) * 1000:6.0f} ms, "
          f"max {max(p.a_latency_s) * 1000:6.0f} ms, codes {p.a_codes}{extra}; CPU s: A client {c['a_client']:.1f}, "
          f"B flood {c['b_flood']:.1f}, server front {_cpu(c['server_front'])}, engine {_cpu(c['server_engine'])} "
          f"in {p.elapsed_s:.1f} s", flush=True)


def print_report(result: dict) -> None:
    c, m = result["config"], result["machine"]
    load = f" = {c['a_load']:g} x 1 / {c['a_sequential_latency_s'] * 1000:.0f} ms" if c["a_load"] else ""
    print(f"\ntenant bench: {c['arch']} {c['size']} {c['quantization']}, {c['rounds']} rounds of alone/at_limit/flood; "
          f"tenant A: open loop {c['a_rate_rps']:.2f} req/s{load}, {c['a_requests']} requests x {c['new_tokens']} "
          f"new tokens per phase, no limits; tenant B: {c['b_threads']} threads without pause, limits "
          + ", ".join(f"{k}={v:g}" for k, v in c["b_limits"].items())
          + f"; server: refusals held up to {c['refusal_hold']:g} s (--refusal-hold)")
    print(f"machine: {m['cpu_model']}, {m['cpu_count']} CPUs, torch {m['torch']}; NOTE: {m['shared']}")
    print(f"\n{'phase':<8} {'A p50':>8} {'A p90':>8} {'A p99':>8}  samples  A errors  in the engine p50/p99   "
          "CPU s (A client / B flood / server front / engine) per round")
    for name, p in result["phases"].items():
        lat, eng = p["a_latency_s"], p["a_server_s"]
        cpu = ", ".join(f"{r['cpu_s']['a_client']:.1f}/{r['cpu_s']['b_flood']:.1f}/{_cpu(r['cpu_s']['server_front'])}"
                        f"/{_cpu(r['cpu_s']['server_engine'])}"
                        for r in p["rounds"])
        print(f"{name:<8} " + " ".join(f"{lat[q] * 1000:>5.0f} ms" for q in ("p50", "p90", "p99"))
              + f"  {lat['samples']:>7}  {sum(p['a_errors'].values()) or 'none':<8}  "
              + f"{_ms(eng['p50']):>8} /{_ms(eng['p99']):>8}   {cpu}")
    print()
    for what, b in (("floods", result["b"]), ("at_limit phases", result["b_at_limit"])):
        print(f"tenant B during {what} ({b['flood_s']:.0f} s): {b['calls']} calls ({b['attempted_rps']:.1f}/s), "
              f"OK {b['ok']} (admitted {b['admitted_rps']:.2f} req/s), RESOURCE_EXHAUSTED {b['resource_exhausted']}, "
              f"other {b['other'] or 'none'}")
    print(f"\n{'ratio':<26} {'value':>6}   {'target':<7} result")
    for name, r in result["ratios"].items():
        verdict = "info" if r["target"] is None else ("PASS" if r["pass"] else "MISS")
        print(f"{name:<26} {r['value']:>6.2f}   {r['target'] or '-':<7} {verdict}")
    print("invariants: " + ", ".join(f"{k} {'not checked' if v is None else 'yes' if v else 'NO'}"
                                     for k, v in result["invariants"].items()))
    s = result["server"]
    print(f"server: SERVING after {s['ready_s']:.1f} s; exit status after SIGTERM: {s['exit_code']}; "
          f"total bench time {result['elapsed_s']:.0f} s")


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"


def _cpu(seconds: float | None) -> str:
    return "?" if seconds is None else f"{seconds:.1f}"
