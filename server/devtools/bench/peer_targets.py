"""The three servers `loraserve bench peer` compares, each a real process on 127.0.0.1 with the
same base, adapters and limits, and one streaming client call per server:

- `loraserve-vllm`: `loraserve serve --engine vllm`, over gRPC;
- `vllm-openai`: vLLM's own OpenAI-compatible server (`vllm serve`, adapters given with
  `--lora-modules`), over HTTP: a streamed `/v1/completions` with `model` = adapter name;
- `loraserve-native`: `loraserve serve --engine native`, over gRPC.

Every call returns a `Trace`: when it was sent, when each token-carrying chunk arrived, how many
prompt and output tokens the server counted.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from loraserve.devtools.server_process import ServerProcess, free_port, server_env

TARGETS = ("loraserve-vllm", "vllm-openai", "loraserve-native")


@dataclass(frozen=True)
class Limits:
    """What every server is configured with (vLLM's names where they differ)."""

    max_loras: int
    max_cpu_loras: int
    max_lora_rank: int
    max_num_seqs: int
    max_model_len: int
    kv_cache_gib: int
    long_prefill_token_threshold: int


@dataclass(frozen=True)
class Trace:
    submitted: float
    arrivals: list[float]
    prompt_tokens: int
    output_tokens: int


class GrpcTarget:
    """A `loraserve serve` process and an asyncio gRPC client to it."""

    def __init__(self, name: str, engine: str, base_dir: Path, root: Path, limits: Limits,
                 adapters: dict[str, Path]) -> None:
        self.name = name
        port = free_port()
        flags = ["--model", str(base_dir), "--adapters-dir", str(root / f"store-{engine}"), "--host", "127.0.0.1",
                 "--port", str(port), "--metrics-port", "0", "--engine", engine, "--quantization", "none",
                 "--max-loras", str(limits.max_loras), "--max-cpu-loras", str(limits.max_cpu_loras),
                 "--max-lora-rank", str(limits.max_lora_rank), "--max-batch-size", str(limits.max_num_seqs),
                 "--max-input-tokens", str(limits.max_model_len - 128), "--max-new-tokens", "128",
                 "--max-model-len", str(limits.max_model_len), "--vllm-cpu-kv-cache-gib", str(limits.kv_cache_gib),
                 "--long-prefill-token-threshold", str(limits.long_prefill_token_threshold),
                 "--import-roots", str(next(iter(adapters.values())).parent)]
        self.command = ["python", "-m", "loraserve", "serve", *flags]
        self.server = ServerProcess(flags, f"127.0.0.1:{port}", root / f"{name}.log")
        self._adapters = adapters
        self.client = None

    def wait_ready(self) -> float:
        return self.server.wait_serving(timeout=600)

    async def connect(self) -> None:
        from loraserve.client import AsyncLoraserveClient

        self.client = AsyncLoraserveClient(self.server.target)
        for name, path in self._adapters.items():
            await self.client.register_adapter(name, str(path), timeout=120)

    async def stream(self, prompt: str, adapter: str, new_tokens: int, first: asyncio.Event | None = None) -> Trace:
        """One greedy stream read to its end; `first` is set when its first token arrives."""
        from loraserve.client import Generation

        submitted, arrivals, summary = time.perf_counter(), [], None
        async with self.client.generate_stream(prompt, adapter=adapter, max_new_tokens=new_tokens,
                                               timeout=600) as stream:
            async for item in stream:
                if isinstance(item, Generation):
                    summary = item
                elif item.token_ids:
                    arrivals.append(time.perf_counter())
                    if first is not None:
                        first.set()
        return Trace(submitted, arrivals, summary.prompt_tokens, summary.completion_tokens)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()

    def cpu_seconds(self) -> float | None:
        return self.server.cpu_seconds()

    def stop(self) -> int:
        return self.server.stop()


class VllmOpenAITarget:
    """vLLM's OpenAI-compatible API server (what `vllm serve` runs) and an httpx client streaming
    `/v1/completions` from it; the base is model `base`, each adapter the model of its name."""

    def __init__(self, base_dir: Path, root: Path, limits: Limits, adapters: dict[str, Path], dtype: str) -> None:
        self.name = "vllm-openai"
        self.port = free_port()
        modules = [f"{name}={path}" for name, path in adapters.items()]
        # The OpenAI server `vllm serve` runs (the same app and launcher); started by its module
        # because vllm-cpu's `vllm` command looks up the "vllm" distribution, which it is not.
        self.command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(base_dir),
                        "--host", "127.0.0.1", "--port", str(self.port), "--served-model-name", "base",
                        "--dtype", dtype, "--max-model-len", str(limits.max_model_len),
                        "--max-num-seqs", str(limits.max_num_seqs), "--enable-lora", "--max-loras",
                        str(limits.max_loras), "--max-cpu-loras", str(limits.max_cpu_loras), "--max-lora-rank",
                        str(limits.max_lora_rank), "--lora-modules", *modules, "--enable-prefix-caching",
                        "--enable-chunked-prefill", "--long-prefill-token-threshold",
                        str(limits.long_prefill_token_threshold), "--uvicorn-log-level", "warning"]
        import torch

        if not torch.cuda.is_available():
            self.command.append("--enforce-eager")
        env = server_env({"VLLM_CPU_KVCACHE_SPACE": str(limits.kv_cache_gib)})
        self.log_path = root / "vllm-openai.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=env)
        self.client = None

    def wait_ready(self) -> float:
        import httpx

        started = time.monotonic()
        while time.monotonic() - started < 600:
            if self.process.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.process.returncode}:\n"
                                   f"{self.log_path.read_text()[-4000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=1).status_code == 200:
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"vllm serve was not healthy after 600 s:\n{self.log_path.read_text()[-4000:]}")

    async def connect(self) -> None:
        import httpx

        self.client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.port}", timeout=600,
                                        limits=httpx.Limits(max_connections=256, max_keepalive_connections=256))

    async def stream(self, prompt: str, adapter: str, new_tokens: int, first: asyncio.Event | None = None) -> Trace:
        """One greedy stream read to its end; `first` is set when its first token arrives."""
        body = {"model": adapter or "base", "prompt": prompt, "max_tokens": new_tokens, "temperature": 0,
                "stream": True, "return_token_ids": True, "stream_options": {"include_usage": True}}
        submitted, arrivals, usage = time.perf_counter(), [], None
        async with self.client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                raise RuntimeError(f"vllm serve answered {response.status_code}: {(await response.aread())[:300]}")
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices", ()):
                    if choice.get("token_ids"):
                        arrivals.append(time.perf_counter())
                        if first is not None:
                            first.set()
        return Trace(submitted, arrivals, usage["prompt_tokens"], usage["completion_tokens"])

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()

    def cpu_seconds(self) -> float | None:
        import psutil

        try:
            processes = [psutil.Process(self.process.pid), *psutil.Process(self.process.pid).children(recursive=True)]
            return sum(p.cpu_times().user + p.cpu_times().system for p in processes)
        except psutil.Error:
            return None

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def vllm_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm", "vllm-cpu"):
        try:
            return f"{dist} {version(dist)}"
        except PackageNotFoundError:
            continue
    return "not installed"


def kv_cache_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith("VLLM_")}
