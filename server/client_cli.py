"""The client subcommands of `loraserve` (generate, chat, adapters, health, info). loraserve.cli owns
the flags; these functions take its parsed arguments, talk to a server through LoraserveClient and
print for a person (tables, streamed text) or, with --json, for a program. Every failure is
printed as `error: <STATUS_CODE>: <message>` on stderr with exit status 1."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable
from typing import Any, TextIO

from loraserve.client import Adapter, Generation, LoraserveClient, LoraserveClientError, Registration, StreamEvent

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130  # the shell's convention for a command ended by Ctrl-C


def _print_json(value: Any) -> None:
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    elif isinstance(value, list):
        value = [dataclasses.asdict(v) for v in value]
    print(json.dumps(value, ensure_ascii=False, indent=2))


def _client(args: argparse.Namespace) -> LoraserveClient:
    """The client the connection flags describe (--api-key unset: LORASERVE_API_KEY). A bad flag
    combination or an unreadable PEM file is a ValueError, which loraserve.cli prints with exit 2."""
    return LoraserveClient(args.server, timeout=args.timeout, api_key=args.api_key, tls=args.tls,
                           tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key,
                           tls_server_name=args.tls_server_name)


def _run(args: argparse.Namespace, command: Callable[[LoraserveClient, argparse.Namespace], int]) -> int:
    """Run one command on a client for --server; client errors become the one error line."""
    try:
        with _client(args) as client:
            return command(client, args)
    except LoraserveClientError as exc:
        print(f"error: {exc.code}: {exc.message}", file=sys.stderr)
        return EXIT_ERROR


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    return {"adapter": args.adapter, "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
            "top_p": args.top_p, "top_k": args.top_k, "repetition_penalty": args.repetition_penalty,
            "seed": args.seed, "stop": tuple(args.stop or ())}


def _summary_line(g: Generation) -> str:
    return (f"[{g.finish_reason}; {g.prompt_tokens} prompt + {g.completion_tokens} new tokens; "
            f"queue {g.queue_s:.3f}s, first token {g.first_token_s:.3f}s, total {g.total_s:.3f}s; "
            f"adapter {g.adapter or '(base)'}; request {g.request_id}]")


def _stream_to(out: TextIO, client: LoraserveClient, **request: Any) -> Generation:
    """Print text deltas as they arrive; Ctrl-C leaves the `with` and so cancels the RPC."""
    with client.generate_stream(**request) as stream:
        for item in stream:
            if isinstance(item, StreamEvent):
                out.write(item.text)
                out.flush()
            else:
                return item
    raise LoraserveClientError("INTERNAL", "the stream ended without a summary")


def _generate(client: LoraserveClient, args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    request = {"prompt": prompt, "request_id": args.request_id, **_sampling(args)}
    if args.json:
        _print_json(client.generate(**request))
    elif args.no_stream:
        g = client.generate(**request)
        print(g.text)
        print(_summary_line(g), file=sys.stderr)
    else:
        g = _stream_to(sys.stdout, client, **request)
        print()
        print(_summary_line(g), file=sys.stderr)
    return 0


def generate(args: argparse.Namespace) -> int:
    """`loraserve generate`: one prompt, streamed to the terminal unless --no-stream or --json."""
    try:
        return _run(args, _generate)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _chat(client: LoraserveClient, args: argparse.Namespace) -> int:
    messages: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    failed = False
    while True:
        if interactive:
            print("you> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            return EXIT_ERROR if failed else 0
        if line.strip() == "/reset":
            del messages[1 if args.system else 0:]
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        try:
            if args.json:
                g = client.generate(messages=messages, **_sampling(args))
                print(json.dumps(dataclasses.asdict(g), ensure_ascii=False), flush=True)
            else:
                g = _stream_to(sys.stdout, client, messages=messages, **_sampling(args))
                print(flush=True)
        except LoraserveClientError as exc:
            # One failed turn (a full queue, a deadline) does not end the conversation: the
            # turn is dropped so the history stays user/assistant alternating.
            print(f"error: {exc.code}: {exc.message}", file=sys.stderr)
            messages.pop()
            failed = True
            continue
        messages.append({"role": "assistant", "content": g.text})


def chat(args: argparse.Namespace) -> int:
    """`loraserve chat`: a REPL on stdin; the whole conversation goes with each turn as messages,
    so the server applies the base's chat template. /reset forgets it, /exit or EOF ends."""
    try:
        return _run(args, _chat)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return EXIT_INTERRUPTED


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows])


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _show(a: Adapter) -> None:
    fields = [("name", a.name), ("tenant", a.tenant), ("shared", "yes" if a.shared else "no"), ("r", a.r), ("lora_alpha", f"{a.lora_alpha:g}"),
              ("target_modules", ", ".join(a.target_modules)), ("size", _size(a.size_bytes)),
              ("base_fingerprint", a.base_fingerprint), ("created_time", a.created_time), ("source", a.source)]
    if a.tier:
        fields += [("tier", a.tier), ("pinned", "yes" if a.pinned else "no")]
    for key, value in fields:
        print(f"{key + ':':<18}{value}")
    for f in a.files:
        print(f"{'file:':<18}{f.name}  {_size(f.size_bytes)}  sha256 {f.sha256}")


def _registered(r: Registration, verb: str, as_json: bool) -> int:
    if as_json:
        _print_json(r)
    elif r.created:
        print(f"{verb} {r.adapter.name} (r={r.adapter.r}, lora_alpha={r.adapter.lora_alpha:g}, "
              f"{_size(r.adapter.size_bytes)})")
    else:
        print(f"{r.adapter.name} is already registered with the same content; nothing changed")
    return 0


def _adapters(client: LoraserveClient, args: argparse.Namespace) -> int:
    action, name, as_json = args.action, getattr(args, "name", ""), args.json
    if action == "list":
        adapters = client.list_adapters()
        if as_json:
            _print_json(adapters)
        elif not adapters:
            print("no adapters registered")
        else:
            print(_table([[a.full_name, a.r, f"{a.lora_alpha:g}", a.tier, "yes" if a.pinned else "",
                           "yes" if a.shared else "", _size(a.size_bytes), a.source, a.created_time] for a in adapters],
                         ["NAME", "R", "ALPHA", "TIER", "PINNED", "SHARED", "SIZE", "SOURCE", "CREATED"]))
    elif action == "show":
        a = client.get_adapter(name)
        if as_json:
            _print_json(a)
        else:
            _show(a)
    elif action == "register":
        return _registered(client.register_adapter(name, args.path, replace=args.replace), "registered", as_json)
    elif action == "upload":
        return _registered(client.upload_adapter(name, args.directory, replace=args.replace), "uploaded", as_json)
    elif action == "validate":
        a = client.validate_adapter(name, args.path)
        if as_json:
            _print_json(a)
        else:
            print(f"{a.name} is valid and would be registered as:")
            _show(a)
    elif action in ("share", "unshare"):
        a = client.share_adapter(name, shared=action == "share")
        print(json.dumps({"name": a.full_name, "shared": a.shared}) if as_json
              else f"{a.full_name} is {'shared with every tenant' if a.shared else 'no longer shared'}")
    else:
        {"remove": client.unregister_adapter, "pin": client.pin_adapter, "unpin": client.unpin_adapter}[action](name)
        done = {"remove": "removed", "pin": "pinned", "unpin": "unpinned"}[action]
        print(json.dumps({"name": name, "result": done}) if as_json else f"{done} {name}")
    return 0


def adapters(args: argparse.Namespace) -> int:
    """`loraserve adapters list|show|register|upload|validate|remove|pin|unpin|share|unshare`."""
    return _run(args, _adapters)


def _health(client: LoraserveClient, args: argparse.Namespace) -> int:
    status = client.health(args.service)
    print(json.dumps({"service": args.service, "status": status}) if args.json else status)
    return 0 if status == "SERVING" else EXIT_ERROR


def health(args: argparse.Namespace) -> int:
    """`loraserve health`: print the health status; exit 0 only when SERVING (usable as a probe)."""
    return _run(args, _health)


def _info(client: LoraserveClient, args: argparse.Namespace) -> int:
    info = client.server_info()
    if args.json:
        _print_json(info)
        return 0
    for key in ("base_model", "architecture", "quantization", "base_fingerprint", "version", "engine",
                "engine_reason"):
        print(f"{key + ':':<18}{getattr(info, key)}")
    for key, value in dataclasses.asdict(info.limits).items():
        print(f"{key + ':':<18}{value}")
    return 0


def info(args: argparse.Namespace) -> int:
    """`loraserve info`: the served base, its quantization and the server's limits."""
    return _run(args, _info)
