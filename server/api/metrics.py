"""Every Prometheus metric loraserve exports, defined here and only here.

Base units (seconds, tokens), `_total` on counters, bounded labels: `adapter` takes registered
adapter names (bounded by the registry) or "" for the base, `tenant` the tenants of the keys
file ("default" when the server runs open, "" before authentication), `code` a gRPC status
name, `tier` gpu|cpu|disk. Engine state (queue, slots, tiers) is read from `Engine.stats()` at scrape time.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class ServerMetrics:
    """The server's metrics in their own registry (so several servers can live in one test process)."""

    def __init__(self, engine, vllm_series: bool = False) -> None:
        """`vllm_series`: the engine is vLLM's, whose own `vllm:*` series (its queue, KV cache,
        LoRA info, ...) are served here too, in place of the LoRA info series loraserve writes
        for routers with the native engine."""
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("loraserve_requests", "Finished generation RPCs, and RPCs of any service refused "
                                "before they ran, by adapter, tenant and gRPC status code",
                                ["adapter", "tenant", "code"], registry=r)
        self.ttft = Histogram("loraserve_time_to_first_token_seconds", "Time from arrival to the first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("loraserve_inter_token_latency_seconds", "Time between two streamed tokens",
                             buckets=TOKEN_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("loraserve_request_duration_seconds", "Time from arrival to the last token",
                             ["tenant"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Histogram("loraserve_queue_time_seconds", "Time waiting before joining the batch",
                               buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("loraserve_prompt_tokens", "Prompt tokens of finished requests", ["tenant"],
                                     registry=r)
        self.generation_tokens = Counter("loraserve_generation_tokens", "Generated tokens", ["tenant"], registry=r)
        self.adapter_load = Histogram("loraserve_adapter_load_seconds", "Reading and decoding an adapter from disk",
                                      buckets=LATENCY_BUCKETS, registry=r)
        self.data_loss = Counter("loraserve_adapter_data_loss", "Requests refused because a stored adapter's files "
                                 "no longer match its manifest", ["adapter", "tenant"], registry=r)
        r.register(_EngineCollector(engine, lora_info=not vllm_series))
        if vllm_series:
            r.register(_VllmCollector())

    def track_held_refusals(self, held: Callable[[], dict[str, int]]) -> None:
        """Export `held()` (tenant -> refusals being held now) as a gauge at scrape time."""
        self.registry.register(_HeldRefusalsCollector(held))

    def observe_finish(self, tenant: str, prompt_tokens: int, completion_tokens: int,
                       queue_s: float, first_token_s: float, total_s: float) -> None:
        self.prompt_tokens.labels(tenant=tenant).inc(prompt_tokens)
        self.generation_tokens.labels(tenant=tenant).inc(completion_tokens)
        self.queue.observe(queue_s)
        self.ttft.observe(first_token_s)
        self.e2e.labels(tenant=tenant).observe(total_s)

    def serve_http(self, port: int, host: str = "0.0.0.0") -> None:
        """Expose /metrics on `port` (a daemon thread)."""
        start_http_server(port, addr=host, registry=self.registry)


class _HeldRefusalsCollector:
    """Over-limit refusals being held until a retry could pass (`loraserve.api.tenant_gate`)."""

    def __init__(self, held: Callable[[], dict[str, int]]) -> None:
        self._held = held

    def describe(self):
        return []

    def collect(self):
        gauge = GaugeMetricFamily("loraserve_refusals_held", "Over-limit RESOURCE_EXHAUSTED answers being held "
                                  "until a retry could pass, by tenant", labels=["tenant"])
        for tenant, n in sorted(self._held().items()):
            gauge.add_metric([tenant], n)
        yield gauge


class _EngineCollector:
    """Engine state at scrape time, and (`lora_info`) the vLLM-compatible LoRA info series."""

    def __init__(self, engine, lora_info: bool) -> None:
        self._engine = engine
        self._lora_info = lora_info

    def describe(self):
        return []

    def collect(self):
        try:
            s = self._engine.stats()
        except Exception:  # engine not started or shutting down: export nothing rather than fail
            return
        yield GaugeMetricFamily("loraserve_requests_running", "Sequences in the running batch", value=s.running)
        yield GaugeMetricFamily("loraserve_requests_waiting", "Requests queued for the batch", value=s.waiting)
        yield GaugeMetricFamily("loraserve_batch_size", "Sequences in the last decode step", value=s.batch_size)
        resident = GaugeMetricFamily("loraserve_adapters_resident", "Adapters held per tier", labels=["tier"])
        resident.add_metric(["gpu"], len(s.slots_resident))
        resident.add_metric(["cpu"], len(s.host_cached))
        yield resident
        loads = CounterMetricFamily("loraserve_adapter_loads", "Adapter loads into a tier", labels=["tier"])
        loads.add_metric(["gpu"], s.slot_loads_total)
        loads.add_metric(["cpu"], s.disk_loads_total)
        yield loads
        evictions = CounterMetricFamily("loraserve_adapter_evictions", "Adapters evicted from a tier", labels=["tier"])
        evictions.add_metric(["gpu"], s.slot_evictions_total)
        evictions.add_metric(["cpu"], s.host_evictions_total)
        yield evictions
        hits = CounterMetricFamily("loraserve_adapter_hits", "Requests whose adapter was found in a tier",
                                   labels=["tier"])
        hits.add_metric(["gpu"], s.gpu_hits_total)
        hits.add_metric(["cpu"], s.cpu_hits_total)
        hits.add_metric(["disk"], s.disk_loads_total)
        yield hits
        prefix = CounterMetricFamily("loraserve_prefix_cache_lookups", "Prompts looked up in the prefix cache "
                                     "(native engine; per adapter version)", labels=["result"])
        prefix.add_metric(["hit"], s.prefix_cache_hits_total)
        prefix.add_metric(["miss"], s.prefix_cache_misses_total)
        yield prefix
        yield CounterMetricFamily("loraserve_prefix_cache_hit_tokens", "Prompt tokens whose prefill the prefix "
                                  "cache saved", value=s.prefix_cache_hit_tokens_total)
        yield GaugeMetricFamily("loraserve_prefix_cache_bytes", "Memory held by the prefix cache",
                                value=s.prefix_cache_bytes)
        if not self._lora_info:
            return
        # vLLM's series, read by LoRA-aware routers (e.g. the Gateway API inference extension).
        info = GaugeMetricFamily("vllm:lora_requests_info", "Running and waiting adapters (vLLM-compatible)",
                                 labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"])
        info.add_metric([",".join(s.running_adapters), ",".join(s.waiting_adapters),
                         str(self._engine.config.max_loras)], time.time())
        yield info


class _VllmCollector:
    """vLLM's own series (`vllm:num_requests_waiting`, `vllm:kv_cache_usage_perc`,
    `vllm:lora_requests_info`, ...), as vLLM registered them in this process, so LoRA-aware
    routers read them on the server's metrics port. vLLM names each adapter version
    '<adapter id>#<n>' (its LoRA requests are keyed by name); in `vllm:lora_requests_info` the
    names are the adapter ids clients and routers use."""

    def describe(self):
        return []

    def collect(self):
        from vllm.v1.metrics.prometheus import get_prometheus_registry

        for family in get_prometheus_registry().collect():
            if family.name == "vllm:lora_requests_info":
                for sample in family.samples:
                    for label in ("running_lora_adapters", "waiting_lora_adapters"):
                        if label in sample.labels:
                            sample.labels[label] = _adapter_ids(sample.labels[label])
            if family.name.startswith("vllm:"):
                yield family


def _adapter_ids(version_names: str) -> str:
    """'t/a#3,t/b#1,t/a#4' -> 't/a,t/b' (version suffixes off, each id once, in order)."""
    ids = [name.rsplit("#", 1)[0] for name in version_names.split(",") if name]
    return ",".join(dict.fromkeys(ids))
