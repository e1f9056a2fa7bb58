"""The `loraserve` command. Flags are read here and only here; each subcommand builds the
validated config objects it needs and hands them to the code that does the work."""

from __future__ import annotations

import argparse
import logging
import sys

from server import __version__


def _init_model(args: argparse.Namespace) -> int:
    from server.base.synthetic import init_model

    path = init_model(args.out, args.arch, args.size, args.seed)
    print(f"wrote a {args.size} {args.arch} model to {path}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from server.demo import run_demo

    return run_demo(args.workdir, arch=args.arch, quantization=args.quantization, num_adapters=args.adapters)


def _serve(args: argparse.Namespace) -> int:
    from server.api.app import run
    from server.settings import resolve

    return run(resolve(args))


def _bench_engine(args: argparse.Namespace) -> int:
    from server.bench.engine_bench import run_engine_bench

    return run_engine_bench(args)


def build_parser() -> argparse.ArgumentParser:
    from server.base.synthetic import ARCHS, SIZES
    from server.config import QUANTIZATIONS

    parser = argparse.ArgumentParser(prog="loraserve", description=(
        "Serve many LoRA adapters on one quantized DeepSeek base, chosen per request."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--version", action="version", version=f"loraserve {__version__}")
    parser.add_argument("--log-level", default="WARNING", help="Python logging level")
    sub = parser.add_subparsers(dest="command", required=True)

    from server.settings import add_flags

    p = sub.add_parser("serve", help="run the gRPC server (settings: flags > LORASERVE_* env > --config YAML)")
    add_flags(p)
    p.set_defaults(func=_serve)

    p = sub.add_parser("init-model", help="write a small random DeepSeek-architecture model directory",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("out", help="output directory (must not exist or be empty)")
    p.add_argument("--arch", choices=ARCHS, default="deepseek-v3",
                   help="deepseek-v3 (MLA + MoE, as V3/R1), deepseek-v2 (as V2-Lite), deepseek-llm (Llama, as 7b/67b/coder)")
    p.add_argument("--size", choices=SIZES, default="tiny", help="tiny for unit tests, small (~22-26M params) for benchmarks")
    p.add_argument("--seed", type=int, default=0, help="weights are a deterministic function of the seed")
    p.set_defaults(func=_init_model)

    p = sub.add_parser("demo", help="build a tiny base and adapters locally, serve a mixed batch, print outputs",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--workdir", default=None, help="where to write the base and adapters (default: a temp dir)")
    p.add_argument("--arch", choices=ARCHS, default="deepseek-v3")
    p.add_argument("--quantization", choices=QUANTIZATIONS, default="nf4")
    p.add_argument("--adapters", type=int, default=4, help="number of random adapters to create")
    p.set_defaults(func=_demo)

    p = sub.add_parser("bench", help="benchmarks (ratios measured side by side in one run)")
    bench = p.add_subparsers(dest="bench", required=True)
    b = bench.add_parser("engine", help="multi-LoRA engine vs single adapter, base, and PEFT",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    b.add_argument("--json", dest="json_out", default=None, help="also write the results as JSON here")
    b.add_argument("--arch", choices=ARCHS, default="deepseek-v3")
    b.add_argument("--size", choices=SIZES, default="small")
    b.add_argument("--quantization", choices=QUANTIZATIONS, default="nf4")
    b.add_argument("--requests", type=int, default=16, help="concurrent requests")
    b.add_argument("--new-tokens", type=int, default=32, help="new tokens per request")
    b.add_argument("--adapters", type=int, default=8, help="distinct adapters in the mixed run")
    b.add_argument("--rank", type=int, default=16, help="LoRA rank of every adapter")
    b.add_argument("--repeats", type=int, default=3, help="alternating rounds; medians are reported")
    b.add_argument("--workdir", default=None, help="where to build the base and adapters (default: a temp dir)")
    b.set_defaults(func=_bench_engine)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from server.errors import LoraserveError

    try:
        return int(args.func(args) or 0)
    except (LoraserveError, ValueError, OSError) as exc:
        # A user's mistake (bad value, existing directory, missing file): say what, no traceback.
        print(f"loraserve: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
