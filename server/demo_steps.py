"""The client half of `loraserve demo`: what a user does against a running server.

Each step prints a heading and its results, using only `LoraserveClient` and the Prometheus
endpoint, and raises `DemoFailure` when the server answers something the product promises it
will not (so the demo doubles as a smoke test of a fresh install).
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from server.client import UPLOAD_FILES, Generation, LoraserveClient, LoraserveClientError, StreamEvent

PROMPT = "The patient presents with"
STREAM_PROMPT = "窦性心律不齐是指"
NEW_TOKENS = 24
UNKNOWN_ADAPTER = "no-such-adapter"
METRIC_PREFIXES = ("loraserve_requests_total", "loraserve_time_to_first_token_seconds_count",
                   "loraserve_adapter_loads_total", "vllm:lora_requests_info")


class DemoFailure(Exception):
    """A demo step saw something other than what the server promises."""


def run_steps(client: LoraserveClient, adapters: dict[str, Path], metrics_port: int) -> None:
    """Steps 3-9 against a SERVING server whose import root holds every adapter directory."""
    show_server_info(client)
    register_adapters(client, adapters)
    list_adapters(client)
    generate_concurrently(client, list(adapters))
    stream_one(client, next(iter(adapters)))
    show_not_found(client)
    show_metrics(metrics_port)


def heading(text: str) -> None:
    """A step's title line (flushed: the next step may take a while)."""
    print(f"\n== {text}", flush=True)


def show_server_info(client: LoraserveClient) -> None:
    heading("3. server info (ServerInfoService/GetServerInfo)")
    info = client.server_info()
    lim = info.limits
    print(f"base_model={info.base_model} architecture={info.architecture} quantization={info.quantization} "
          f"version={info.version}\n"
          f"  fingerprint={info.base_fingerprint[:23]}... (stamped on every adapter registered here)")
    print(f"  limits: max_loras={lim.max_loras} max_cpu_loras={lim.max_cpu_loras} "
          f"max_lora_rank={lim.max_lora_rank} max_batch_size={lim.max_batch_size}")


def register_adapters(client: LoraserveClient, adapters: dict[str, Path]) -> None:
    """The first adapter is uploaded (bytes over gRPC, as from a laptop); the rest are registered
    by a path relative to the server's import root (as from a shared volume)."""
    heading("4. register adapters (UploadAdapter for the first, RegisterAdapter for the rest)")
    for i, (name, path) in enumerate(adapters.items()):
        if i == 0:
            sent = sum((path / f).stat().st_size for f in UPLOAD_FILES)
            reg = client.upload_adapter(name, path)
            how = f"uploaded   {name}: {sent} bytes over gRPC"
        else:
            reg = client.register_adapter(name, path.name)  # relative to --import-roots
            how = f"registered {name}: from <import root>/{path.name}"
        print(f"{how}, r={reg.adapter.r}, {len(reg.adapter.files)} files, "
              f"{'new' if reg.created else 'already in the store'}")


def list_adapters(client: LoraserveClient) -> None:
    heading("5. list adapters (AdapterService/ListAdapters)")
    print(f"{'name':<10} {'r':>3} {'alpha':>6} {'modules':>7} {'bytes':>7}  {'source':<8} tier")
    for a in client.list_adapters():
        print(f"{a.name:<10} {a.r:>3} {a.lora_alpha:>6g} {len(a.target_modules):>7} {a.size_bytes:>7}  "
              f"{a.source:<8} {a.tier}")


def generate_concurrently(client: LoraserveClient, names: list[str]) -> None:
    """The base and every adapter at once, one thread each: the server batches them together
    although it has fewer adapter slots than adapters."""
    jobs = ["", *names]
    heading(f"6. {len(jobs)} concurrent Generate calls, same prompt, base + each adapter")
    print(f"prompt {PROMPT!r}; the weights are random, so the text is noise: what matters is that "
          "each adapter changes it")
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        results = list(pool.map(lambda adapter: client.generate(PROMPT, adapter=adapter, max_new_tokens=NEW_TOKENS),
                                jobs))
    elapsed = time.monotonic() - started
    print(f"{'adapter':<10} {'tokens':>6} {'ttft ms':>8}  output")
    for adapter, result in zip(jobs, results):
        if result.adapter != adapter:
            raise DemoFailure(f"asked for adapter {adapter!r}, the result says {result.adapter!r}")
        print(f"{adapter or 'base':<10} {result.completion_tokens:>6} {1000 * result.first_token_s:>8.1f}  "
              f"{_short(result.text, 48)!r}")
    tokens = sum(r.completion_tokens for r in results)
    distinct = len({r.token_ids for r in results})
    print(f"{len(jobs)} requests, {tokens} tokens in {elapsed:.2f}s = {tokens / elapsed:.1f} tokens/s; "
          f"{distinct} distinct outputs of {len(jobs)}")
    tiers = ", ".join(f"{a.name}={a.tier}" for a in client.list_adapters())
    print(f"residency now ({client.server_info().limits.max_loras} accelerator slots, LRU): {tiers}")


def stream_one(client: LoraserveClient, adapter: str) -> None:
    heading(f"7. GenerateStream on {adapter}: deltas printed as they arrive")
    print(f"{STREAM_PROMPT!r} -> ", end="", flush=True)
    started = time.monotonic()
    arrivals: list[float] = []
    summary: Generation | None = None
    for item in client.generate_stream(STREAM_PROMPT, adapter=adapter, max_new_tokens=NEW_TOKENS):
        if isinstance(item, StreamEvent):
            arrivals.append(time.monotonic() - started)
            print(_printable(item.text), end="", flush=True)
        else:
            summary = item
    print()
    if summary is None or not arrivals:
        raise DemoFailure("the stream carried no deltas or no summary")
    print(f"{len(arrivals)} deltas, first after {1000 * arrivals[0]:.0f} ms, last after {1000 * arrivals[-1]:.0f} ms; "
          f"summary: {summary.completion_tokens} tokens, finish_reason={summary.finish_reason}")


def show_not_found(client: LoraserveClient) -> None:
    heading(f"8. an unknown adapter ({UNKNOWN_ADAPTER!r}) is the client's mistake: NOT_FOUND")
    try:
        client.generate(PROMPT, adapter=UNKNOWN_ADAPTER, max_new_tokens=4)
    except LoraserveClientError as exc:
        print(f"client error: code={exc.code} message={exc.message!r}")
        if exc.code != "NOT_FOUND":
            raise DemoFailure(f"expected NOT_FOUND for an unknown adapter, got {exc.code}") from None
        return
    raise DemoFailure(f"generation on the unknown adapter {UNKNOWN_ADAPTER!r} succeeded")


def show_metrics(metrics_port: int) -> None:
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    heading(f"9. Prometheus metrics: {url} (excerpt)")
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
    except (urllib.error.URLError, OSError) as exc:
        raise DemoFailure(f"GET {url} failed: {exc}") from None
    lines = [line for line in text.splitlines() if line.startswith(METRIC_PREFIXES)]
    missing = [p for p in METRIC_PREFIXES if not any(line.startswith(p) for line in lines)]
    if missing:
        raise DemoFailure(f"{url} has no {', '.join(missing)}")
    print("\n".join(lines))


def _printable(text: str) -> str:
    """Noise from random weights may hold control characters; keep them off the terminal."""
    return "".join(c if c.isprintable() or c == "\n" else "?" for c in text)


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."
