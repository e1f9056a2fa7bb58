"""The server's settings: defaults < YAML config file < LORASERVE_* environment < flags.

Every setting is declared once in `SETTINGS` (name, type, default, help); the `serve` flags,
the YAML keys (the same names with underscores) and the environment variables
(LORASERVE_<NAME>) all come from that table, so the three can never drift apart.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from loraserve.config import QUANTIZATIONS, BaseModelConfig, EngineConfig
from loraserve.engine.choice import ENGINES, VllmOptions
from loraserve.errors import ConfigError


@dataclass(frozen=True)
class Setting:
    name: str
    type: type
    default: object
    help: str
    many: bool = False  # a list: repeat the flag, a YAML list, or a comma-separated env value


SETTINGS = (
    Setting("model", str, None, "base model: a local model directory or a hub id"),
    Setting("adapters_dir", str, "adapters", "the adapter store (source of truth, survives restarts)"),
    Setting("host", str, "[::]", "address the gRPC server binds"),
    Setting("port", int, 50051, "gRPC port"),
    Setting("metrics_port", int, 9400, "Prometheus /metrics port (0 = off)"),
    Setting("engine", str, "auto", "the engine: native (loraserve's, on transformers; the CPU default), vllm "
            "(vLLM, for GPU hosts), or auto (vllm where it is installed and a CUDA device is visible, else native)"),
    Setting("quantization", str, "nf4", f"base quantization: {', '.join(QUANTIZATIONS)} (vllm engine: nf4, a CUDA "
            "GPU only, or none; FP8/AWQ/GPTQ checkpoints are served as they are with none)"),
    Setting("dtype", str, "auto", "compute dtype: auto (bf16 on GPU, fp32 on CPU), bfloat16, float16, float32"),
    Setting("device_map", str, "auto", "native engine: where the base goes: auto (one GPU when the weights fit on one, "
            "else balanced over the visible GPUs; the CPU without a GPU) or an accelerate device_map (balanced, "
            "sequential, cpu, cuda:1)"),
    Setting("max_loras", int, 4, "adapter slots on the accelerator (most distinct adapters per batch)"),
    Setting("max_cpu_loras", int, 16, "adapters kept decoded in host memory"),
    Setting("max_lora_rank", int, 64, "highest adapter rank accepted"),
    Setting("max_batch_size", int, 32, "most sequences decoding together (vLLM's max_num_seqs)"),
    Setting("max_queue", int, 256, "most waiting requests; beyond it RESOURCE_EXHAUSTED"),
    Setting("max_input_tokens", int, 4096, "longest prompt in tokens"),
    Setting("kv_cache_mib", int, 0, "native engine: memory for every sequence's KV, each reserving its prompt + "
            "max_new_tokens when admitted; a request that would not fit waits, one that never could is "
            "RESOURCE_EXHAUSTED (0 = auto: 0.6 of free GPU memory, or a quarter of available RAM on a CPU)"),
    Setting("host_cache_mib", int, 0, "native engine: host memory for decoded adapters behind the slots, at most "
            "(0 = auto: an eighth of the host's RAM); max_cpu_loras caps their number"),
    Setting("prefix_cache_mib", int, 256, "native engine: memory for the KV of prompt prefixes, reused by later "
            "prompts on the same adapter version (0 = off)"),
    Setting("max_prefill_tokens", int, 0, "native engine: prompt tokens prefilled per step, between decode steps; "
            "longer prompts are prefilled in chunks (0 = auto: 512 with CUDA, 64 on a CPU)"),
    Setting("max_new_tokens", int, 2048, "largest max_new_tokens a request may ask for"),
    Setting("max_adapter_bytes", int, 2 * 1024**3, "largest adapter accepted (bytes)"),
    Setting("max_store_bytes", int, 0, "total size of the adapter store (bytes; 0 = unlimited)"),
    Setting("import_roots", str, [], "directories RegisterAdapter may read from (default: none)", many=True),
    Setting("preload", str, [], "adapters to load into host memory at start", many=True),
    Setting("pin", str, [], "adapters to pin in accelerator slots at start", many=True),
    Setting("drain_timeout", float, 30.0, "seconds running requests get to finish after SIGTERM"),
    Setting("api_keys_file", str, "", "YAML/JSON file of API keys (salted hashes), roles, tenants and their "
            "limits; reloaded on SIGHUP or change (empty = no authentication: the server runs open)"),
    Setting("allow_open_management", bool, False, "without api_keys_file, still accept adapter management "
            "calls from non-loopback peers (unsafe outside a trusted network)"),
    Setting("tls_cert", str, "", "PEM server certificate (chain); with tls_key, the port speaks TLS only"),
    Setting("tls_key", str, "", "PEM private key of tls_cert"),
    Setting("tls_client_ca", str, "", "PEM CA bundle: clients must present a certificate it signed (mTLS)"),
    Setting("refusal_hold", float, 1.0, "most seconds a RESOURCE_EXHAUSTED answer for a tenant's request or "
            "rate limit is held back, until a retry could be admitted (never past the call's deadline), so a "
            "client that retries without backoff is paced to its limit instead of spending the server's CPU on "
            "refusals (0 = answer at once)"),
    Setting("engine_threads", int, 0, "torch CPU threads of the engine process (0 = auto: OMP_NUM_THREADS if "
            "set; else, on a host without CUDA, all CPUs but one, which stays with the gRPC front end)"),
    Setting("front_nice", int, 10, "nice value added to this gRPC front-end process (not to its engine "
            "process): when CPUs are short, the engine, which serves every tenant, runs first, and a flood of "
            "calls slows only the front end that takes it (0..19; 0 = same priority)"),
    Setting("max_concurrent_rpcs", int, 8192, "most RPCs in flight on the server (health checks aside); beyond "
            "it a call is refused RESOURCE_EXHAUSTED at once (at most half of them may be held refusals)"),
    Setting("max_streams_per_connection", int, 2048, "most concurrent gRPC streams one client connection may "
            "open (HTTP/2 MAX_CONCURRENT_STREAMS); a client queues the rest itself. Above the 1,024 refusals held "
            "per tenant, so one tenant's held calls cannot fill a connection a gateway shares between tenants"),
    Setting("max_concurrent_uploads", int, 4, "adapter uploads received at once by this server; beyond, "
            "RESOURCE_EXHAUSTED"),
    Setting("max_concurrent_uploads_per_tenant", int, 2, "adapter uploads one tenant may have in progress at once; "
            "beyond, RESOURCE_EXHAUSTED for that tenant"),
    Setting("heartbeat_interval", float, 1.0, "seconds between the engine's heartbeats; health turns NOT_SERVING "
            "when three in a row are missing (the engine process is stopped or hung)"),
    Setting("engine_stall_timeout", float, 60.0, "seconds the engine may go without finishing a step while it "
            "has work before health turns NOT_SERVING (a wedged kernel or a deadlock)"),
    Setting("tensor_parallel_size", int, 1, "vllm engine: GPUs each layer is split over (tensor parallelism)"),
    Setting("pipeline_parallel_size", int, 1, "vllm engine: GPU groups the layers are split over (pipeline "
            "parallelism)"),
    Setting("gpu_memory_utilization", float, 0.9, "vllm engine: share of each GPU's memory it takes for weights, "
            "activations and its paged KV cache"),
    Setting("max_model_len", int, 0, "vllm engine: longest prompt + output it plans its KV cache for (0 = the "
            "model's context)"),
    Setting("enable_prefix_caching", bool, True, "vllm engine: reuse the KV of shared prompt prefixes (keyed by "
            "adapter too)"),
    Setting("enable_chunked_prefill", bool, True, "vllm engine: prefill long prompts in chunks between decode "
            "steps, so running streams keep flowing"),
    Setting("max_num_batched_tokens", int, 0, "vllm engine: tokens one step may take, prefill chunks and decodes "
            "together (0 = vLLM's default)"),
    Setting("long_prefill_token_threshold", int, 0, "vllm engine: most prompt tokens one request's prefill takes "
            "per step while others run, so running streams and short prompts are not held up (0 = no cap)"),
    Setting("vllm_cpu_kv_cache_gib", int, 0, "vllm engine on a CPU host: its KV cache in GiB "
            "(VLLM_CPU_KVCACHE_SPACE; 0 = vLLM's default)"),
    Setting("store_sync_interval", float, 10.0, "seconds between looks at the adapter store for what other "
            "replicas or training jobs changed (0 = only on a request for an unknown adapter)"),
)


@dataclass(frozen=True)
class ServerSettings:
    """Validated settings of one server process."""

    values: dict

    def __getattr__(self, name: str):
        try:
            return self.values[name]
        except KeyError:
            raise AttributeError(name) from None

    def vllm_options(self) -> VllmOptions:
        v = self.values
        return VllmOptions(tensor_parallel_size=v["tensor_parallel_size"],
                           pipeline_parallel_size=v["pipeline_parallel_size"],
                           gpu_memory_utilization=v["gpu_memory_utilization"], max_model_len=v["max_model_len"],
                           enable_prefix_caching=v["enable_prefix_caching"],
                           enable_chunked_prefill=v["enable_chunked_prefill"],
                           max_num_batched_tokens=v["max_num_batched_tokens"],
                           long_prefill_token_threshold=v["long_prefill_token_threshold"],
                           cpu_kv_cache_gib=v["vllm_cpu_kv_cache_gib"])

    def engine_config(self) -> EngineConfig:
        v = self.values
        return EngineConfig(
            base=BaseModelConfig(model=v["model"], quantization=v["quantization"], dtype=v["dtype"],
                                 device_map=v["device_map"]),
            max_loras=v["max_loras"], max_cpu_loras=v["max_cpu_loras"], max_lora_rank=v["max_lora_rank"],
            max_batch_size=v["max_batch_size"], max_queue=v["max_queue"], max_input_tokens=v["max_input_tokens"],
            max_new_tokens_limit=v["max_new_tokens"], max_prefill_tokens=v["max_prefill_tokens"],
            prefix_cache_bytes=v["prefix_cache_mib"] << 20, host_cache_bytes=v["host_cache_mib"] << 20,
            kv_cache_bytes=v["kv_cache_mib"] << 20)


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="YAML file with any of the settings below")
    for s in SETTINGS:
        flag = "--" + s.name.replace("_", "-")
        help_text = f"{s.help} [env LORASERVE_{s.name.upper()}] (default: {s.default!r})"
        if s.many:
            parser.add_argument(flag, action="append", default=None, help=help_text + "; repeatable")
        elif s.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(flag, type=s.type, default=None, help=help_text)


def resolve(args: argparse.Namespace, environ: dict[str, str] | None = None) -> ServerSettings:
    """Merge defaults, the YAML file, the environment and flags; validate."""
    environ = os.environ if environ is None else environ
    values = {s.name: s.default for s in SETTINGS}
    if args.config:
        data = yaml.safe_load(Path(args.config).read_text(encoding="utf-8")) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file {args.config} must hold a mapping of settings")
        unknown = set(data) - set(values)
        if unknown:
            raise ConfigError(f"unknown settings in {args.config}: {', '.join(sorted(unknown))}")
        values.update({k: _coerce(setting(k), v, f"{args.config}:{k}") for k, v in data.items()})
    for s in SETTINGS:
        raw = environ.get(f"LORASERVE_{s.name.upper()}")
        if raw is not None:
            values[s.name] = _coerce(s, raw.split(",") if s.many else raw, f"LORASERVE_{s.name.upper()}")
    for s in SETTINGS:
        given = getattr(args, s.name, None)
        if given is not None:
            values[s.name] = _coerce(s, given, "--" + s.name.replace("_", "-"))
    if not values["model"]:
        raise ConfigError("no base model: give --model, LORASERVE_MODEL or `model:` in the config file")
    if bool(values["tls_cert"]) != bool(values["tls_key"]):
        raise ConfigError("tls_cert and tls_key go together: give both for TLS, or neither")
    if values["tls_client_ca"] and not values["tls_cert"]:
        raise ConfigError("tls_client_ca (mTLS) needs TLS: give tls_cert and tls_key too")
    if values["engine_threads"] < 0:
        raise ConfigError(f"engine_threads must be >= 0 (0 = auto), got {values['engine_threads']}")
    if not 0 <= values["refusal_hold"] <= 60:
        raise ConfigError(f"refusal_hold must be in 0..60 seconds (0 = answer at once), got {values['refusal_hold']}")
    for name in ("max_concurrent_rpcs", "max_streams_per_connection", "max_concurrent_uploads",
                 "max_concurrent_uploads_per_tenant"):
        if values[name] < 1:
            raise ConfigError(f"{name} must be at least 1, got {values[name]}")
    if not 0.05 <= values["heartbeat_interval"] <= 60:
        raise ConfigError(f"heartbeat_interval must be in 0.05..60 seconds, got {values['heartbeat_interval']}")
    if values["engine_stall_timeout"] < 3 * values["heartbeat_interval"]:
        raise ConfigError(f"engine_stall_timeout ({values['engine_stall_timeout']}) must be at least three "
                          f"heartbeat intervals ({3 * values['heartbeat_interval']})")
    if not 0 <= values["front_nice"] <= 19:
        raise ConfigError(f"front_nice must be in 0..19, got {values['front_nice']}")
    if values["engine"] not in ENGINES:
        raise ConfigError(f"engine {values['engine']!r} is not one of {', '.join(ENGINES)}")
    settings = ServerSettings(values)
    settings.engine_config()  # validates the engine's part now, naming the setting
    settings.vllm_options()
    return settings


def setting(name: str) -> Setting:
    """The declaration of one setting (its type, default and help)."""
    return next(s for s in SETTINGS if s.name == name)


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _coerce(s: Setting, value, where: str):
    if s.type is bool:
        if isinstance(value, bool):
            return value
        if str(value).strip().lower() in _TRUE + _FALSE:
            return str(value).strip().lower() in _TRUE
        raise ConfigError(f"{where}: {value!r} is not a valid bool (true/false)")
    try:
        if s.many:
            items = value if isinstance(value, list) else [value]
            return [s.type(v) for v in items if str(v) != ""]
        return s.type(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {value!r} is not a valid {s.type.__name__}") from None
