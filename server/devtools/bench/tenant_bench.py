"""`loraserve bench tenants`: does one tenant's flood leave another tenant's latency alone?

One real `loraserve serve` process with a keys file: tenant A (no limits) and tenant B (limited:
`--b-max-concurrent-requests`, `--b-requests-per-second`), each with its own adapter, uploaded
with that tenant's manage key. Tenant A sends a steady stream of Generate calls; in `flood` phases
tenant B hammers the server from `--b-threads` threads with no pause at all, far beyond its limits;
in `alone` phases B is silent; in `at_limit` phases B sends at 90% of its rate limit from as many
threads as its concurrency limit (its allowed share, next to no refusals). The phases take turns,
round after round (which goes first rotates), so a slow spell of the machine lands on each; A's
latency percentiles are pooled over all rounds of a phase and compared:
`a_p99_flood_over_alone <= 1.5` is the target. `a_p99_flood_over_at_limit` tells what the refused
excess itself costs A, apart from the work B's limits allow it.

B's default limits leave the server headroom: one request at a time and B_LOAD of one sequential
stream's rate (measured after warm-up, like A's rate; the keys file is then rewritten and the
server reloads it), so A and B at their limits together offer 75% of what one stream gets. Limits
that let B take the rest of the server measure queueing at full load, not isolation: with B at 1
concurrent and 1.5/s (~55% of a stream) and A at 50%, A's p99 rose 1.39x with B never refused.

Tenant A is open loop at a fixed rate (requests are sent on a schedule, whatever the server does):
a real tenant's traffic does not slow down because the server did, and a closed-loop client would
send fewer requests exactly when latency grows, hiding the effect being measured. The rate is half
of what one sequential stream achieves on the idle server (calibrated after warm-up, or
`--a-rate`): below capacity, so A alone mostly runs by itself. Latency counts from the scheduled
send time.

The server holds each of B's refusals until a retry could pass, up to `--refusal-hold` seconds
(`loraserve.api.tenant_gate`), so B's flooding threads, which wait for their answers, are paced to
B's limits. `--refusal-hold 0` answers every refusal at once: B then calls as fast as the front
end can refuse it, which measures what a flood of refusals costs A. A `--b-threads` above the
server's held-refusal bound (128 per tenant) gets the excess answered at once.

B's flood runs in its own process (`loraserve.devtools.bench.tenant_flood`), as a separate client would. All
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

from loraserve.devtools.bench.runs import add_base_flags, measure_in, write_result
from loraserve.devtools.bench.tenant_flood import CALL_TIMEOUT_S, FloodProcess
from loraserve.devtools.bench.tenant_report import PHASES, print_phase, print_report, summarize
from loraserve.errors import ConfigError
from loraserve.settings import setting

SERVER_REFUSAL_HOLD = setting("refusal_hold").default

B_LOAD = 0.25
"""B's default requests_per_second limit, as a fraction of one sequential stream's rate."""
AT_LIMIT_LOAD = 0.9
"""B's rate in at_limit phases, as a fraction of its requests_per_second limit."""
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
    """Tenant B's rate limit; 0 = calibrated to B_LOAD of one sequential stream."""
    rank: int
    refusal_hold: float = SERVER_REFUSAL_HOLD
    """The server's --refusal-hold: most seconds B's refusals are held until a retry could pass."""

    def __post_init__(self) -> None:
        for name in ("rounds", "a_requests", "new_tokens", "b_threads", "b_max_concurrent_requests", "rank"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.refusal_hold < 0:
            raise ConfigError(f"refusal_hold must be >= 0, got {self.refusal_hold!r}")
        if self.a_rate < 0 or self.b_requests_per_second < 0:
            raise ConfigError(f"a_rate and b_requests_per_second must be >= 0 (0 = calibrated), got "
                              f"{self.a_rate!r} and {self.b_requests_per_second!r}")

    def b_limits(self, requests_per_second: float) -> dict:
        """Tenant B's section of the keys file."""
        return {"max_concurrent_requests": self.b_max_concurrent_requests,
                "requests_per_second": round(requests_per_second, 3)}


def add_flags(b: argparse.ArgumentParser, archs: tuple[str, ...], sizes: tuple[str, ...],
              quantizations: tuple[str, ...]) -> None:
    """The `bench tenants` flags (loraserve.cli parses them), beside the config they fill."""
    add_base_flags(b, archs, sizes, quantizations)
    b.add_argument("--rounds", type=int, default=4, help="alternating alone/flood rounds")
    b.add_argument("--a-requests", type=int, default=20, help="tenant A's requests per phase per round")
    b.add_argument("--a-rate", type=float, default=0.0, help=f"tenant A's requests/s (0: {A_LOAD:g} x the rate of "
                   "one sequential stream on the idle server)")
    b.add_argument("--new-tokens", type=int, default=16, help="max_new_tokens of every request (greedy)")
    b.add_argument("--b-threads", type=int, default=6, help="tenant B's flooding threads (no pause between calls)")
    b.add_argument("--b-max-concurrent-requests", type=int, default=1, help="tenant B's limit")
    b.add_argument("--b-requests-per-second", type=float, default=0.0, help=f"tenant B's limit (0: {B_LOAD:g} x "
                   "the rate of one sequential stream on the idle server)")
    b.add_argument("--rank", type=int, default=16, help="LoRA rank of both adapters")
    b.add_argument("--refusal-hold", type=float, default=SERVER_REFUSAL_HOLD, help="the server's --refusal-hold: "
                   "most seconds B's refusals are held until a retry could pass (0 = answered at once)")
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
    """flood and at_limit: B's status codes, seconds sending and its process's CPU seconds."""


def run_tenant_bench(args: argparse.Namespace) -> int:
    """Build a base, two adapters and a keys file, start a server, run the phases, print the report
    and write the JSON. Exit status as in the module docstring."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    config = TenantBenchConfig(args.arch, args.size, args.quantization, args.rounds, args.a_requests, args.a_rate,
                               args.new_tokens, args.b_threads, args.b_max_concurrent_requests,
                               args.b_requests_per_second, args.rank, args.refusal_hold)
    started = time.perf_counter()
    measured = measure_in(args.workdir, "tenant", lambda root: _measure(config, root))
    phases, server, calibration = measured
    config_doc = {**asdict(config), "a_limits": None, "greedy": True, **calibration,
                  "a_load": None if config.a_rate else A_LOAD,
                  "b_load": None if config.b_requests_per_second else B_LOAD, "flood_lead_s": FLOOD_LEAD_S}
    b_over_limit = config.b_threads > config.b_max_concurrent_requests
    result = summarize(config_doc, phases, server, b_over_limit, time.perf_counter() - started)
    print_report(result)
    write_result(args.json_out, result)
    broken = [name for name, held in result["invariants"].items() if held is False]
    return 0 if result["server"]["exit_code"] == 0 and not broken else 1


def _setup(config: TenantBenchConfig, root: Path) -> tuple[Path, dict[str, Path], dict[str, str]]:
    """The base, one adapter per tenant, and the keys file (B limited); returns the keys by name."""
    from loraserve.access.key_admin import add_key
    from loraserve.devtools.bench.engine_bench import BenchConfig, build_inputs

    base_dir, built = build_inputs(BenchConfig(config.arch, config.size, config.quantization, requests=1,
                                               new_tokens=config.new_tokens, adapters=2, rank=config.rank,
                                               repeats=1), root)
    adapters = dict(zip("ab", built.values()))
    keys_file = root / "keys.yaml"
    keys = {f"{t}-{role}": add_key(keys_file, f"{t}-{role}", t, role) for t in "ab" for role in ("generate", "manage")}
    _set_b_limits(keys_file, config.b_limits(config.b_requests_per_second or 1.0))  # final once calibrated
    return base_dir, adapters, keys


def _set_b_limits(keys_file: Path, limits: dict) -> None:
    """Write tenant B's limits into the keys file (A has none)."""
    import yaml

    doc = yaml.safe_load(keys_file.read_text())
    doc["tenants"] = {"b": limits}
    keys_file.write_text(yaml.safe_dump(doc, sort_keys=False))


def _reload_b_limits(server, keys_file: Path, limits: dict) -> None:
    """Rewrite B's limits and have the server reload its keys file now (SIGHUP), as an operator
    would; returns once the server's log says it reloaded."""
    import signal

    reloads = server.log_tail(1 << 30).count("reloaded")
    _set_b_limits(keys_file, limits)
    server.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    while server.log_tail(1 << 30).count("reloaded") == reloads:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server did not reload its keys file:\n{server.log_tail()}")
        time.sleep(0.1)


def _measure(config: TenantBenchConfig, root: Path) -> tuple[list[Phase], dict, dict]:
    """Every phase of every round, the server's record, and A's calibration."""
    from loraserve.client import LoraserveClient
    from loraserve.devtools.server_process import ServerProcess, free_port

    print(f"building a {config.size} {config.arch} base and one rank-{config.rank} adapter per tenant in {root}",
          flush=True)
    base_dir, adapters, keys = _setup(config, root)
    port = free_port()
    flags = ["--model", str(base_dir), "--adapters-dir", str(root / "store"), "--host", "127.0.0.1",
             "--port", str(port), "--metrics-port", "0", "--quantization", config.quantization,
             "--max-loras", "2", "--max-lora-rank", str(config.rank), "--api-keys-file", str(root / "keys.yaml")]
    flags += ["--refusal-hold", str(config.refusal_hold)]
    server = ServerProcess(flags, f"127.0.0.1:{port}", root / "server.log")
    info: dict = {"command": ["python", "-m", "loraserve", "serve", *flags]}
    senders: dict[str, FloodProcess] = {}
    phases = []
    try:
        info["ready_s"] = server.wait_serving()
        print(f"server SERVING on {server.target} after {info['ready_s']:.1f} s", flush=True)
        for tenant, path in adapters.items():  # each tenant registers its own, as 'bench' in its namespace
            with LoraserveClient(server.target, api_key=keys[f"{tenant}-manage"]) as client:
                client.upload_adapter("bench", path)
        with LoraserveClient(server.target, api_key=keys["a-generate"], timeout=CALL_TIMEOUT_S) as client:
            rate, latency = _warm_up(client, config)
            b_rate = config.b_requests_per_second or B_LOAD / latency
            b_limits = config.b_limits(b_rate)
            _reload_b_limits(server, root / "keys.yaml", b_limits)
            print(f"tenant A: {rate:.2f} requests/s (sequential latency on the idle server {latency * 1000:.0f} ms); "
                  f"tenant B's limits: {b_limits}", flush=True)
            senders["flood"] = FloodProcess(server.target, keys["b-generate"], config.b_threads, config.new_tokens)
            senders["at_limit"] = FloodProcess(server.target, keys["b-generate"], config.b_max_concurrent_requests,
                                               config.new_tokens, rate=AT_LIMIT_LOAD * b_limits["requests_per_second"])
            for r in range(config.rounds):
                turn = r % len(PHASES)
                for name in PHASES[turn:] + PHASES[:turn]:
                    phases.append(_run_phase(name, r, client, senders.get(name), server, rate, config))
                    print_phase(phases[-1], config.rounds)
    finally:
        for sender in senders.values():
            sender.close()
        info["exit_code"] = server.stop()
        if info["exit_code"] != 0:
            print(f"the server exited with status {info['exit_code']} after SIGTERM:\n{server.log_tail()}")
    return phases, info, {"a_rate_rps": rate, "a_sequential_latency_s": latency, "b_limits": b_limits}


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
    from loraserve.client import LoraserveClientError

    try:
        g = client.generate(_prompt(i), adapter="bench", max_new_tokens=new_tokens)
        return time.perf_counter() - due, "OK", g.completion_tokens, g.total_s
    except LoraserveClientError as exc:
        return time.perf_counter() - due, exc.code, 0, None


def _run_phase(name: str, r: int, client, b: FloodProcess | None, server, rate: float,
               config: TenantBenchConfig) -> Phase:
    """A's schedule of `a_requests` calls at `rate`, with B's process `b` sending throughout
    (None: B is silent). Request i has the same prompt in every phase, so every phase serves the
    same A workload."""
    gc.collect()
    here, there = time.process_time(), server.cpu_split()
    if b is not None:
        b.start()
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
    got = b.stop() if b is not None else None
    after = server.cpu_split()
    return Phase(name, r, a_latency_s=[c[0] for c in calls], a_server_s=[c[3] for c in calls if c[3] is not None],
                 a_codes=dict(Counter(c[1] for c in calls)),
                 a_completion_tokens=[c[2] for c in calls], elapsed_s=elapsed, b=got,
                 cpu_s={"a_client": time.process_time() - here, "b_flood": got["cpu_s"] if got else 0.0,
                        **{f"server_{k}": None if there is None or after is None else after[k] - there[k]
                           for k in ("front", "engine")}})
