"""`loraserve bench tenants`: does one tenant's flood leave another tenant's latency alone?

One real `loraserve serve` process with a keys file: tenant A (no limits) and tenant B (limited:
`--b-max-concurrent-requests`, `--b-requests-per-second`), each with its own adapter, uploaded
with that tenant's manage key. Tenant A sends a steady stream of Generate calls; in `flood` phases
tenant B hammers the server from `--b-threads` threads with no pause at all, far beyond its limits;
in `alone` phases B is silent. The two phases alternate, round after round (which goes first
rotates), so a slow spell of the machine lands on both; A's latency percentiles are pooled over
all rounds of a phase and compared: `a_p99_flood_over_alone <= 1.5` is the target.

Tenant A is open loop at a fixed rate (requests are sent on a schedule, whatever the server does):
a real tenant's traffic does not slow down because the server did, and a closed-loop client would
send fewer requests exactly when latency grows, hiding the effect being measured. The rate is half
of what one sequential stream achieves on the idle server (calibrated after warm-up, or
`--a-rate`): below capacity, so A alone mostly runs by itself. Latency counts from the scheduled
send time.

B's flood runs in its own process (`server.bench.tenant_flood`), as a separate client would. All
processes (A's client, B's flood and the server) still share this machine's CPUs: the flood's own
CPU time counts against the server, as it would not with B on another host. Each phase records
the CPU seconds of all three, and A's requests' time inside the engine (the server's own timing)
beside their latency, which tells a slow engine from a slow way in.

Exit status 1 when an invariant fails (A got an error; B was never admitted; B was never refused
although it ran more threads than its concurrency limit: then isolation or the limits are broken)
or the server does not exit 0 on SIGTERM; a missed latency target is a result, exit status 0.
`--b-threads` at or below B's concurrency limit is a diagnostic (B's admitted work alone, without
a flood of refusals): `b_refused` is then not checked (null).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from server.bench.runs import add_base_flags, measure_in, write_result
from server.bench.tenant_flood import CALL_TIMEOUT_S, FloodProcess
from server.errors import ConfigError

PHASES = ("alone", "flood")
RATIO_TARGET = 1.5  # a_p99_flood_over_alone <= this
A_LOAD = 0.5
"""A's default rate, as a fraction of one sequential stream's rate on the idle server."""
CALIBRATION_REQUESTS = 4
FLOOD_LEAD_S = 1.0
"""How long B floods before A's first request of a flood phase: every A request meets a flood in
its steady state, not one whose threads are still starting."""
TOPICS = ("the sea", "a red fox", "old maps", "rain in spring", "a quiet train", "green tea", "the moon")


@dataclass(frozen=True)
class TenantBenchConfig:
    """What one run measures; written to the JSON as is."""

    arch: str
    size: str
    quantization: str
    rounds: int
    a_requests: int
    """Tenant A's requests per phase per round."""
    a_rate: float
    """Tenant A's requests per second; 0 = calibrated to A_LOAD of one sequential stream."""
    new_tokens: int
    """max_new_tokens of every request, A's and B's."""
    b_threads: int
    b_max_concurrent_requests: int
    b_requests_per_second: float
    rank: int

    def __post_init__(self) -> None:
        for name in ("rounds", "a_requests", "new_tokens", "b_threads", "b_max_concurrent_requests", "rank"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.a_rate < 0 or self.b_requests_per_second <= 0:
            raise ConfigError(f"a_rate must be >= 0 (0 = calibrated) and b_requests_per_second > 0, got "
                              f"{self.a_rate!r} and {self.b_requests_per_second!r}")

    @property
    def b_limits(self) -> dict:
        """Tenant B's section of the keys file."""
        return {"max_concurrent_requests": self.b_max_concurrent_requests,
                "requests_per_second": self.b_requests_per_second}


def add_flags(b: argparse.ArgumentParser, archs: tuple[str, ...], sizes: tuple[str, ...],
              quantizations: tuple[str, ...]) -> None:
    """The `bench tenants` flags (server.cli parses them), beside the config they fill."""
    add_base_flags(b, archs, sizes, quantizations)
    b.add_argument("--rounds", type=int, default=4, help="alternating alone/flood rounds")
    b.add_argument("--a-requests", type=int, default=20, help="tenant A's requests per phase per round")
    b.add_argument("--a-rate", type=float, default=0.0, help=f"tenant A's requests/s (0: {A_LOAD:g} x the rate of "
                   "one sequential stream on the idle server)")
    b.add_argument("--new-tokens", type=int, default=16, help="max_new_tokens of every request (greedy)")
    b.add_argument("--b-threads", type=int, default=6, help="tenant B's flooding threads (no pause between calls)")
    b.add_argument("--b-max-concurrent-requests", type=int, default=2, help="tenant B's limit")
    b.add_argument("--b-requests-per-second", type=float, default=5.0, help="tenant B's limit")
    b.add_argument("--rank", type=int, default=16, help="LoRA rank of both adapters")
    b.add_argument("--workdir", default=None, help="where to build the base, adapters and keys (a temp dir when unset)")


@dataclass
class Phase:
    """One phase of one round. A's lists are in request order."""

    name: str
    round: int
    a_latency_s: list[float]
    """Scheduled send time to response (open loop), errors included."""
    a_server_s: list[float]
    """The server's own timing of each OK request: its arrival in the engine to its last token.
    The rest of a_latency_s was spent on the way in (gRPC, the event loop) and out."""
    a_codes: dict[str, int]
    a_completion_tokens: list[int]
    elapsed_s: float
    """A's first scheduled send to its last response."""
    cpu_s: dict[str, float | None] = field(default_factory=dict)
    b: dict | None = None
    """flood only: B's status codes, seconds flooded and its process's CPU seconds."""


def run_tenant_bench(args: argparse.Namespace) -> int:
    """Build a base, two adapters and a keys file, start a server, run the phases, print the report
    and write the JSON. Exit status as in the module docstring."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    config = TenantBenchConfig(args.arch, args.size, args.quantization, args.rounds, args.a_requests, args.a_rate,
                               args.new_tokens, args.b_threads, args.b_max_concurrent_requests,
                               args.b_requests_per_second, args.rank)
    started = time.perf_counter()
    measured = measure_in(args.workdir, "tenant", lambda root: _measure(config, root))
    result = summarize(config, *measured, time.perf_counter() - started)
    print_report(result)
    write_result(args.json_out, result)
    broken = [name for name, held in result["invariants"].items() if held is False]
    return 0 if result["server"]["exit_code"] == 0 and not broken else 1


def _setup(config: TenantBenchConfig, root: Path) -> tuple[Path, dict[str, Path], dict[str, str]]:
    """The base, one adapter per tenant, and the keys file (B limited); returns the keys by name."""
    import yaml

    from server.access.key_admin import add_key
    from server.bench.engine_bench import BenchConfig, build_inputs

    base_dir, built = build_inputs(BenchConfig(config.arch, config.size, config.quantization, requests=1,
                                               new_tokens=config.new_tokens, adapters=2, rank=config.rank,
                                               repeats=1), root)
    adapters = dict(zip("ab", built.values()))
    keys_file = root / "keys.yaml"
    keys = {f"{t}-{role}": add_key(keys_file, f"{t}-{role}", t, role) for t in "ab" for role in ("generate", "manage")}
    doc = yaml.safe_load(keys_file.read_text())
    doc["tenants"] = {"b": config.b_limits}  # A: no limits
    keys_file.write_text(yaml.safe_dump(doc, sort_keys=False))
    return base_dir, adapters, keys


def _measure(config: TenantBenchConfig, root: Path) -> tuple[list[Phase], dict, dict]:
    """Every phase of every round, the server's record, and A's calibration."""
    from server.client import LoraserveClient
    from server.serve_process import ServerProcess, free_port

    print(f"building a {config.size} {config.arch} base and one rank-{config.rank} adapter per tenant in {root}",
          flush=True)
    base_dir, adapters, keys = _setup(config, root)
    port = free_port()
    flags = ["--model", str(base_dir), "--adapters-dir", str(root / "store"), "--host", "127.0.0.1",
             "--port", str(port), "--metrics-port", "0", "--quantization", config.quantization,
             "--max-loras", "2", "--max-lora-rank", str(config.rank), "--api-keys-file", str(root / "keys.yaml")]
    server = ServerProcess(flags, f"127.0.0.1:{port}", root / "server.log")
    info: dict = {"command": ["python", "-m", "server", "serve", *flags]}
    flood, phases = None, []
    try:
        info["ready_s"] = server.wait_serving()
        print(f"server SERVING on {server.target} after {info['ready_s']:.1f} s", flush=True)
        for tenant, path in adapters.items():  # each tenant registers its own, as 'bench' in its namespace
            with LoraserveClient(server.target, api_key=keys[f"{tenant}-manage"]) as client:
                client.upload_adapter("bench", path)
        flood = FloodProcess(server.target, keys["b-generate"], config.b_threads, config.new_tokens)
        with LoraserveClient(server.target, api_key=keys["a-generate"], timeout=CALL_TIMEOUT_S) as client:
            rate, latency = _warm_up(client, config)
            print(f"tenant A: {rate:.2f} requests/s (sequential latency on the idle server {latency * 1000:.0f} ms)",
                  flush=True)
            for r in range(config.rounds):
                for name in PHASES[r % 2:] + PHASES[:r % 2]:
                    phases.append(_run_phase(name, r, client, flood, server, rate, config))
                    _print_phase(phases[-1], config.rounds)
    finally:
        if flood is not None:
            flood.close()
        info["exit_code"] = server.stop()
        if info["exit_code"] != 0:
            print(f"the server exited with status {info['exit_code']} after SIGTERM:\n{server.log_tail()}")
    return phases, info, {"a_rate_rps": rate, "a_sequential_latency_s": latency}


def _prompt(i: int) -> str:
    return f"Tenant A asks {i} about {TOPICS[i % len(TOPICS)]}"


def _warm_up(client, config: TenantBenchConfig) -> tuple[float, float]:
    """First forwards (NF4 repacking, adapter slots), then A's sequential latency and the rate."""
    print("warming up (first NF4 forwards repack the weights; adapters enter their slots)", flush=True)
    for i in range(2):
        client.generate(_prompt(i), adapter="bench", max_new_tokens=config.new_tokens)
    latencies = []
    for i in range(CALIBRATION_REQUESTS):
        start = time.perf_counter()
        client.generate(_prompt(i), adapter="bench", max_new_tokens=config.new_tokens)
        latencies.append(time.perf_counter() - start)
    latency = statistics.median(latencies)
    return (config.a_rate or A_LOAD / latency), latency


def _a_call(client, i: int, new_tokens: int, due: float) -> tuple[float, str, int, float | None]:
    """One of A's requests: (seconds from its scheduled time to the response, status, tokens,
    the server's arrival-to-finish seconds)."""
    from server.client import LoraserveClientError

    try:
        g = client.generate(_prompt(i), adapter="bench", max_new_tokens=new_tokens)
        return time.perf_counter() - due, "OK", g.completion_tokens, g.total_s
    except LoraserveClientError as exc:
        return time.perf_counter() - due, exc.code, 0, None


def _run_phase(name: str, r: int, client, flood: FloodProcess, server, rate: float,
               config: TenantBenchConfig) -> Phase:
    """A's schedule of `a_requests` calls at `rate`; B floods throughout when `name` is flood.
    Request i has the same prompt in every phase, so both phases serve the same A workload."""
    gc.collect()
    here, there = time.process_time(), server.cpu_seconds()
    if name == "flood":
        flood.start()
        time.sleep(FLOOD_LEAD_S)
    # A thread per request, so a call never waits for a free one: the schedule stays open loop
    # even when latency grows to many times the interval.
    with ThreadPoolExecutor(max_workers=config.a_requests) as pool:
        start = time.perf_counter()
        futures = []
        for i in range(config.a_requests):
            due = start + i / rate
            time.sleep(max(0.0, due - time.perf_counter()))
            futures.append(pool.submit(_a_call, client, i, config.new_tokens, due))
        calls = [f.result() for f in futures]
        elapsed = time.perf_counter() - start
    b = flood.stop() if name == "flood" else None
    after = server.cpu_seconds()
    return Phase(name, r, a_latency_s=[c[0] for c in calls], a_server_s=[c[3] for c in calls if c[3] is not None],
                 a_codes=dict(Counter(c[1] for c in calls)),
                 a_completion_tokens=[c[2] for c in calls], elapsed_s=elapsed, b=b,
                 cpu_s={"a_client": time.process_time() - here, "b_flood": b["cpu_s"] if b else 0.0,
                        "server": None if there is None or after is None else after - there})


# ---- results ---------------------------------------------------------------------------------
def summarize(config: TenantBenchConfig, phases: list[Phase], server: dict, calibration: dict, elapsed: float) -> dict:
    """The JSON document: config, machine, per-phase pooled percentiles and raw rounds, B's
    counts, the ratio with its target, and the invariants."""
    from server.bench.engine_bench import machine_info
    from server.bench.serve_bench import percentiles

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
    floods = [p.b for p in phases if p.b is not None]
    b_codes = sum((Counter(b["codes"]) for b in floods), Counter())
    b_seconds = sum(b["elapsed_s"] for b in floods)
    b_calls = sum(b_codes.values())
    b = {"ok": b_codes.get("OK", 0), "resource_exhausted": b_codes.get("RESOURCE_EXHAUSTED", 0),
         "other": {c: n for c, n in b_codes.items() if c not in ("OK", "RESOURCE_EXHAUSTED")},
         "calls": b_calls, "flood_s": b_seconds, "attempted_rps": b_calls / b_seconds,
         "admitted_rps": b_codes.get("OK", 0) / b_seconds}
    alone, flood = (result_phases[n]["a_latency_s"] for n in PHASES)
    ratios = {"a_p99_flood_over_alone": {"value": flood["p99"] / alone["p99"], "target": f"<= {RATIO_TARGET:g}"},
              "a_p50_flood_over_alone": {"value": flood["p50"] / alone["p50"], "target": None}}
    ratios["a_p99_flood_over_alone"]["pass"] = ratios["a_p99_flood_over_alone"]["value"] <= RATIO_TARGET
    return {
        "bench": "tenants",
        "config": {**asdict(config), "b_limits": config.b_limits, "a_limits": None, "greedy": True, **calibration,
                   "a_load": None if config.a_rate else A_LOAD, "flood_lead_s": FLOOD_LEAD_S},
        "machine": {**machine_info(), "shared": "tenant A's client, tenant B's flood process and the server "
                    "all run on this machine and share its CPUs"},
        "server": server,
        "phases": result_phases,
        "b": b,
        "ratios": ratios,
        "invariants": {"a_no_errors": not any(result_phases[n]["a_errors"] for n in PHASES),
                       "b_refused": (b["resource_exhausted"] > 0
                                     if config.b_threads > config.b_max_concurrent_requests else None),
                       "b_admitted": b["ok"] > 0},
        "elapsed_s": elapsed,
    }


def _print_phase(p: Phase, rounds: int) -> None:
    c = p.cpu_s
    extra = f", B: {p.b['codes']}" if p.b else ""
    print(f"  round {p.round + 1}/{rounds} {p.name:<5} A p50 {statistics.median(p.a_latency_s) * 1000:6.0f} ms, "
          f"max {max(p.a_latency_s) * 1000:6.0f} ms, codes {p.a_codes}{extra}; CPU s: A client {c['a_client']:.1f}, "
          f"B flood {c['b_flood']:.1f}, server {_cpu(c['server'])} in {p.elapsed_s:.1f} s", flush=True)


def print_report(result: dict) -> None:
    c, m, b = result["config"], result["machine"], result["b"]
    load = f" = {c['a_load']:g} x 1 / {c['a_sequential_latency_s'] * 1000:.0f} ms" if c["a_load"] else ""
    print(f"\ntenant bench: {c['arch']} {c['size']} {c['quantization']}, {c['rounds']} rounds of alone/flood; "
          f"tenant A: open loop {c['a_rate_rps']:.2f} req/s{load}, {c['a_requests']} requests x {c['new_tokens']} "
          f"new tokens per phase, no limits; tenant B: {c['b_threads']} threads without pause, limits "
          + ", ".join(f"{k}={v:g}" for k, v in c["b_limits"].items()))
    print(f"machine: {m['cpu_model']}, {m['cpu_count']} CPUs, torch {m['torch']}; NOTE: {m['shared']}")
    print(f"\n{'phase':<6} {'A p50':>8} {'A p90':>8} {'A p99':>8}  samples  A errors  in the engine p50/p99   "
          "CPU s (A client / B flood / server) per round")
    for name, p in result["phases"].items():
        lat, eng = p["a_latency_s"], p["a_server_s"]
        cpu = ", ".join(f"{r['cpu_s']['a_client']:.1f}/{r['cpu_s']['b_flood']:.1f}/{_cpu(r['cpu_s']['server'])}"
                        for r in p["rounds"])
        print(f"{name:<6} " + " ".join(f"{lat[q] * 1000:>5.0f} ms" for q in ("p50", "p90", "p99"))
              + f"  {lat['samples']:>7}  {sum(p['a_errors'].values()) or 'none':<8}  "
              + f"{_ms(eng['p50']):>8} /{_ms(eng['p99']):>8}   {cpu}")
    print(f"\ntenant B during floods ({b['flood_s']:.0f} s): {b['calls']} calls ({b['attempted_rps']:.0f}/s), "
          f"OK {b['ok']} (admitted {b['admitted_rps']:.2f} req/s), RESOURCE_EXHAUSTED {b['resource_exhausted']}, "
          f"other {b['other'] or 'none'}")
    print(f"\n{'ratio':<24} {'value':>6}   {'target':<7} result")
    for name, r in result["ratios"].items():
        verdict = "info" if r["target"] is None else ("PASS" if r["pass"] else "MISS")
        print(f"{name:<24} {r['value']:>6.2f}   {r['target'] or '-':<7} {verdict}")
    print("invariants: " + ", ".join(f"{k} {'not checked' if v is None else 'yes' if v else 'NO'}"
                                     for k, v in result["invariants"].items()))
    s = result["server"]
    print(f"server: SERVING after {s['ready_s']:.1f} s; exit status after SIGTERM: {s['exit_code']}; "
          f"total bench time {result['elapsed_s']:.0f} s")


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"


def _cpu(seconds: float | None) -> str:
    return "?" if seconds is None else f"{seconds:.1f}"
