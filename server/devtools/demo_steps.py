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

from loraserve.client import UPLOAD_FILES, Generation, LoraserveClient, LoraserveClientError, StreamEvent
from loraserve.devtools.demo_training import TrainedTask
from loraserve.trainer.data import read_conversations

PROMPT = "The patient presents with"
ANSWER_TOKENS = 96  # above the longest example answer in the tiny tokenizer; generation stops at EOS
CONCURRENCY = 16
SAMPLES_PER_TASK = 2
MIN_EXACT_SHARE = 0.75
UNKNOWN_ADAPTER = "no-such-adapter"
METRIC_PREFIXES = ("loraserve_requests_total", "loraserve_time_to_first_token_seconds_count",
                   "loraserve_adapter_loads_total", "vllm:lora_requests_info")


class DemoFailure(Exception):
    """A demo step saw something other than what the server promises."""


def run_steps(client: LoraserveClient, tasks: list[TrainedTask], metrics_port: int) -> None:
    """Steps 4-10 against a SERVING server whose import root holds every trained adapter."""
    show_server_info(client)
    register_adapters(client, {t.name: t.adapter_dir for t in tasks})
    list_adapters(client)
    side_by_side(client, tasks)
    stream_one(client, tasks[0])
    show_not_found(client)
    show_metrics(metrics_port)


def heading(text: str) -> None:
    """A step's title line (flushed: the next step may take a while)."""
    print(f"\n== {text}", flush=True)


def show_server_info(client: LoraserveClient) -> None:
    heading("4. server info (ServerInfoService/GetServerInfo)")
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
    heading("5. register adapters (UploadAdapter for the first, RegisterAdapter for the rest)")
    for i, (name, path) in enumerate(adapters.items()):
        if i == 0:
            sent = sum((path / f).stat().st_size for f in UPLOAD_FILES)
            reg = client.upload_adapter(name, path, replace=True)  # a re-run may have retrained it
            how = f"uploaded   {name}: {sent} bytes over gRPC"
        else:
            reg = client.register_adapter(name, path.name, replace=True)  # relative to --import-roots
            how = f"registered {name}: from <import root>/{path.name}"
        print(f"{how}, r={reg.adapter.r}, {len(reg.adapter.files)} files, "
              f"{'new' if reg.created else 'already in the store'}")


def list_adapters(client: LoraserveClient) -> None:
    heading("6. list adapters (AdapterService/ListAdapters)")
    print(f"{'name':<18} {'r':>3} {'alpha':>6} {'modules':>7} {'bytes':>7}  {'source':<8} tier")
    for a in client.list_adapters():
        print(f"{a.name:<18} {a.r:>3} {a.lora_alpha:>6g} {len(a.target_modules):>7} {a.size_bytes:>7}  "
              f"{a.source:<8} {a.tier}")


def side_by_side(client: LoraserveClient, tasks: list[TrainedTask]) -> None:
    """Every training prompt of every task, to the base and to the task's adapter, all at once
    (one mixed batch stream on the server): each adapter must answer its own task, the base
    must not."""
    jobs = [(task.name, conversation, adapter) for task in tasks for conversation in read_conversations(task.dataset)
            for adapter in ("", task.name)]
    heading(f"7. side by side: {len(jobs)} concurrent Generate calls, every example prompt to the base "
            "and to its task's adapter")

    def ask(job):
        _, conversation, adapter = job
        return client.generate(messages=conversation[:-1], adapter=adapter, max_new_tokens=ANSWER_TOKENS)

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=CONCURRENCY) as pool:
        results = list(pool.map(ask, jobs))
    elapsed = time.monotonic() - started
    tokens = sum(r.completion_tokens for r in results)
    print(f"{len(jobs)} requests, {tokens} tokens in {elapsed:.1f}s = {tokens / elapsed:.0f} tokens/s")
    exact: dict[tuple[str, str], int] = {}
    samples: dict[str, list[tuple[str, str, str, str]]] = {}
    for i, ((task, conversation, adapter), result) in enumerate(zip(jobs, results)):
        if result.adapter != adapter:
            raise DemoFailure(f"asked for adapter {adapter!r}, the result says {result.adapter!r}")
        expected = conversation[-1]["content"]
        exact[task, adapter] = exact.get((task, adapter), 0) + (result.text.strip() == expected.strip())
        if adapter and len(samples.setdefault(task, [])) < SAMPLES_PER_TASK:
            base_text = results[i - 1].text  # each prompt's base job comes just before its adapter job
            samples[task].append((conversation[-2]["content"], expected, base_text, result.text))
    print(f"\n{'task':<18} {'examples':>8} {'base exact':>10} {'adapter exact':>13}")
    for task in tasks:
        n = sum(1 for t, _, a in jobs if t == task.name and a == "")
        base_ok, adapter_ok = exact.get((task.name, ""), 0), exact.get((task.name, task.name), 0)
        print(f"{task.name:<18} {n:>8} {base_ok:>6}/{n:<3} {adapter_ok:>9}/{n:<3}")
        if base_ok > 0 or adapter_ok < MIN_EXACT_SHARE * n:
            raise DemoFailure(f"{task.name}: the adapter answered {adapter_ok}/{n} exactly and the base {base_ok}/{n}; "
                              f"expected at least {MIN_EXACT_SHARE:.0%} from the adapter and none from the base")
    for task, rows in samples.items():
        for prompt, expected, base_text, adapter_text in rows:
            print(f"\n[{task}] user:     {_short(_printable(prompt), 70)}\n"
                  f"  expected:     {_short(_printable(expected), 70)}\n"
                  f"  base:         {_short(_printable(base_text), 70)}\n"
                  f"  with adapter: {_short(_printable(adapter_text), 70)}")


def stream_one(client: LoraserveClient, task: TrainedTask) -> None:
    adapter = task.name
    heading(f"8. GenerateStream on {adapter}: deltas printed as they arrive")
    conversation = read_conversations(task.dataset)[0]
    print(f"{conversation[-2]['content']!r} -> ", end="", flush=True)
    started = time.monotonic()
    arrivals: list[float] = []
    summary: Generation | None = None
    for item in client.generate_stream(messages=conversation[:-1], adapter=adapter, max_new_tokens=ANSWER_TOKENS):
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
    heading(f"9. an unknown adapter ({UNKNOWN_ADAPTER!r}) is the client's mistake: NOT_FOUND")
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
    heading(f"10. Prometheus metrics: {url} (excerpt)")
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
