"""The vLLM engine: the engine contract (`loraserve.engine.contract.Engine`) on vLLM's asyncio
engine (`AsyncLLM`), for GPU hosts: paged KV, chunked prefill, prefix caching, LoRA kernels,
CUDA graphs, tensor and pipeline parallelism.

vLLM runs its engine core in a process of its own; this object lives in the server process and
runs `AsyncLLM` on an event loop of its own thread (the engine loop), so the contract's blocking
calls (from the API's worker threads) and its streams (read on the server's loop) work as with
the other engines. All request and adapter state is touched on the engine loop only. What stays
loraserve's: the tokenizer the front end encodes with (prompts reach vLLM as token ids), the
text (the native engine's incremental detokenizer and stop strings, so deltas never split a
character and join to the final text), the validation of requests and adapters, adapter ids
and versions (`loraserve.engine.vllm_adapters`), and the limits both engines share.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass

from loraserve.base.quantization import describe
from loraserve.config import EngineConfig
from loraserve.engine.choice import VllmOptions
from loraserve.engine.contract import BaseInfo
from loraserve.engine.detokenizer import IncrementalDetokenizer
from loraserve.engine.input_limits import InputLimits, max_token_bytes
from loraserve.engine.request import (
    ErrorEvent,
    GenerationRequest,
    RequestStream,
    encode_input,
    validate_request,
    warm_up,
)
from loraserve.engine.sequence import Sequence
from loraserve.engine.vllm_adapters import AdapterVersion, AdapterVersions
from loraserve.engine.vllm_engine_adapters import VllmAdapterMethods
from loraserve.engine.vllm_setup import BaseModelFacts, engine_args, read_base_facts, restrict_to_targets, vllm_sampling
from loraserve.errors import (
    AdapterIncompatible,
    AdapterNotFound,
    Cancelled,
    ConfigError,
    DeadlineExceeded,
    LoraserveError,
    ResourceExhausted,
    Unavailable,
)

log = logging.getLogger(__name__)

GONE = "the vLLM engine stopped unexpectedly; this server is shutting down, retry on another replica"
PINGS_MISSED = 3
"""Heartbeat intervals an idle engine core may leave a ping unanswered before it counts as stopped."""


@dataclass(eq=False)
class _Request:
    seq: Sequence
    version: AdapterVersion | None
    task: asyncio.Task | None = None
    """Serving it inside vLLM; None while it waits at the slot gate."""
    ending: LoraserveError | None = None
    """Why it is being cut short (cancel, deadline, adapter removed), once it is."""
    timer: asyncio.TimerHandle | None = None


class VllmEngine(VllmAdapterMethods):
    """Multi-LoRA generation on vLLM. Thread-safe: every call is handed to the engine loop."""

    def __init__(self, config: EngineConfig, options: VllmOptions | None = None,
                 on_exit: Callable[[], None] | None = None, heartbeat_interval: float = 1.0,
                 stall_timeout: float = 60.0) -> None:
        """Returns at once; `wait_loaded` starts vLLM (its engine core loads the base)."""
        self.config = config
        self.options = options or VllmOptions()
        self.heartbeat_interval = heartbeat_interval
        self.stall_timeout = stall_timeout
        self._on_exit = on_exit
        self.base: BaseInfo | None = None
        self.input_limits: InputLimits | None = None
        self.tokenizer = None
        self._facts: BaseModelFacts | None = None
        self._max_context: int | None = None
        self._llm = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vllm-engine", daemon=True)
        self._thread.start()
        self._versions = AdapterVersions(config.max_loras)
        self._lora_ids: dict[int, AdapterVersion] = {}  # vLLM id -> version, while vLLM holds it (loop)
        self._requests: dict[int, _Request] = {}  # id(stream) -> not ended (loop)
        self._held: deque[_Request] = deque()  # waiting at the slot gate (loop)
        self._count_lock = threading.Lock()
        self._outstanding = 0  # submitted, not ended (held: _count_lock)
        self._accepting = False
        self._gone: str | None = None
        self._last_progress = time.monotonic()
        self._pinger: asyncio.Task | None = None
        self._vllm_threads: set[int] = set()

    # ---- lifecycle ---------------------------------------------------------------------
    @property
    def loaded(self) -> bool:
        return self._llm is not None

    def wait_loaded(self) -> None:
        """Read the base (tokenizer, fingerprint, module shapes) and start vLLM; an option vLLM
        refuses or a base it cannot run is a ConfigError here."""
        if self.loaded:
            return
        from loraserve.base.tokenizer import load_tokenizer

        facts = restrict_to_targets(read_base_facts(self.config.base), self.config.target_modules)
        args = engine_args(self.config, self.options, facts)
        self.tokenizer = load_tokenizer(facts.model_dir, self.config.base.trust_remote_code)
        if self.options.cpu_kv_cache_gib and not facts.cuda:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(self.options.cpu_kv_cache_gib)
        self._llm = self._run(self._start_llm(args), timeout=None)
        self._facts = facts
        self._max_context = self.options.max_model_len or facts.max_context
        self.input_limits = InputLimits(self.config.max_input_tokens, max_token_bytes(self.tokenizer))
        self.base = BaseInfo(facts.fingerprint, facts.model_type, facts.model_dir, facts.max_context,
                             dict(facts.lora_module_shapes),
                             describe(self.config.base.quantization, facts.checkpoint_quantization))

    def engine_threads(self) -> set[int]:
        """Native ids of the threads in this process that do vLLM's work: the engine loop's, and
        those vLLM started while it came up (its sockets' I/O threads)."""
        return {self._thread.native_id, *self._vllm_threads}

    async def _start_llm(self, args):
        from vllm.v1.engine.async_llm import AsyncLLM

        before = _thread_ids()
        try:
            llm = AsyncLLM.from_engine_args(args)
        except (ValueError, TypeError, NotImplementedError) as exc:  # vLLM's own checks of the options
            raise ConfigError(f"vLLM refused the engine options: {exc}") from None
        await llm.collective_rpc("loraserve_fix_no_lora_rows")
        if not all(await llm.collective_rpc("loraserve_install_counters")):
            log.warning("some adapter counters are not available with this vLLM version")
        self._pinger = asyncio.create_task(self._ping_forever(llm))
        self._vllm_threads = _thread_ids() - before
        return llm

    def start(self, warmup: bool = True) -> None:
        self._accepting = True
        if warmup:
            warm_up(self)

    @property
    def ready(self) -> bool:
        return self._accepting and self.health() is None

    def health(self) -> str | None:
        """None while vLLM is alive and making progress. Its engine core answers a ping every
        heartbeat interval between steps; with requests in flight a step may be long, so only
        `stall_timeout` without any output counts as stuck; idle, three missed pings do."""
        if self._gone is not None:
            return self._gone
        if self._llm is None:
            return None
        if self._llm.errored:
            return f"the vLLM engine failed: {self._llm.dead_error}"
        silent = time.monotonic() - self._last_progress
        with self._count_lock:
            busy = self._outstanding > 0
        if busy and silent > self.stall_timeout:
            return f"the vLLM engine has made no progress for {silent:.0f}s with requests in flight"
        if not busy and silent > PINGS_MISSED * self.heartbeat_interval:
            return f"the vLLM engine core has not answered for {silent:.1f}s (stopped or hung)"
        return None

    def drain(self, timeout: float) -> bool:
        self._accepting = False
        deadline = time.monotonic() + timeout
        while not self._idle() and time.monotonic() < deadline:
            time.sleep(0.02)
        return self._idle()

    def _idle(self) -> bool:
        with self._count_lock:
            return self._outstanding == 0

    def stop(self, drain_timeout: float = 0.0) -> None:
        self.drain(drain_timeout)
        if self._llm is not None and self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(60)
        self._gone = self._gone or "the engine has stopped"
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _shutdown(self) -> None:
        for request in list(self._requests.values()):
            self._end(request, Cancelled("the engine shut down before the request finished"))
        await asyncio.sleep(0)
        if self._pinger is not None:
            self._pinger.cancel()
        self._llm.shutdown()

    def add_load_observer(self, observe: Callable[[float], None]) -> None:
        """vLLM's workers read adapters from disk themselves; their loads are counted in `stats`
        (disk_loads_total, disk_load_seconds_total), not observed one by one."""

    # ---- requests ----------------------------------------------------------------------
    def encode(self, prompt: str | None = None, messages: list[dict[str, str]] | None = None) -> list[int]:
        return encode_input(self.tokenizer, prompt, messages)

    def submit(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop | None = None) -> RequestStream:
        if self._gone is not None and self.loaded:
            raise Unavailable(GONE)
        if not self._accepting:
            raise Unavailable("the engine is not accepting requests (starting up or draining)")
        validate_request(request, self.config, self._facts.vocab_size, self._max_context)
        version = self._versions.require(request.adapter) if request.adapter else None
        with self._count_lock:
            if self._outstanding >= self.config.max_queue + self.config.max_batch_size:
                raise ResourceExhausted(f"the queue is full ({self.config.max_queue} requests waiting); retry later")
            self._outstanding += 1
        request.request_id = request.request_id or uuid.uuid4().hex
        stream = RequestStream(request.request_id, loop)
        detokenizer = IncrementalDetokenizer(self.tokenizer, tuple(request.sampling.stop))
        seq = Sequence.create(request, stream, version.entry.version if version else None, detokenizer)
        self._loop.call_soon_threadsafe(self._begin, _Request(seq, version))
        return stream

    def cancel(self, stream: RequestStream) -> None:
        stream.cancel()
        self._loop.call_soon_threadsafe(self._cancel, id(stream))

    def _cancel(self, key: int) -> None:
        request = self._requests.get(key)
        if request is not None:
            self._end(request, Cancelled("the request was cancelled"))

    def _begin(self, request: _Request) -> None:
        """Engine loop: take a submitted request (into vLLM, or to wait at the slot gate)."""
        self._requests[id(request.seq.stream)] = request
        if request.version is not None and request.version.retired:  # replaced or removed since submit
            request.version = self._versions.get(request.version.entry.adapter_id)
            if request.version is None:
                self._end(request, AdapterNotFound(f"adapter {request.seq.request.adapter!r} was removed before "
                                                   "the request started"))
                return
        if request.version is not None:
            request.version.requests += 1
        deadline = request.seq.request.deadline
        if deadline is not None:
            request.timer = self._loop.call_at(
                deadline, self._end, request, DeadlineExceeded("the request's deadline passed before it finished"))
        if self._versions.may_enter(request.version, others_waiting=bool(self._held)):
            self._enter(request)
        else:
            self._held.append(request)

    def _enter(self, request: _Request) -> None:
        self._versions.entered(request.version)
        request.seq.admitted_at = time.monotonic()
        request.task = self._loop.create_task(self._serve(request))

    def _admit_held(self) -> None:
        """Engine loop: let in, in order, the waiting requests the slot gate now allows."""
        still: deque[_Request] = deque()
        for request in self._held:
            if self._versions.may_enter(request.version, others_waiting=bool(still)):
                self._enter(request)
            else:
                still.append(request)
        self._held = still

    def _end(self, request: _Request, why: LoraserveError) -> None:
        """Engine loop: cut a request short; it ends and says why."""
        if request.ending is not None or id(request.seq.stream) not in self._requests:
            return
        request.ending = why
        if request.task is None:  # not inside vLLM (waiting at the gate, or never let in)
            if request in self._held:
                self._held.remove(request)
            _report_end(request)
            self._finished(request)
        elif not request.task.done():
            request.task.cancel()

    async def _serve(self, request: _Request) -> None:
        from vllm.inputs import TokensPrompt
        from vllm.v1.engine.exceptions import EngineDeadError

        seq = request.seq
        lora = request.version.lora_request() if request.version is not None else None
        vllm_id = f"{seq.request.request_id}-{uuid.uuid4().hex[:8]}"  # unique even when clients reuse ids
        outputs = self._llm.generate(TokensPrompt(prompt_token_ids=list(seq.request.prompt_token_ids)),
                                     vllm_sampling(seq.request.sampling), vllm_id, lora_request=lora)
        try:
            async for out in outputs:
                self._last_progress = time.monotonic()
                for token in out.outputs[0].token_ids:
                    reason = seq.append(token, self._facts.eos_ids)
                    if reason is not None:
                        seq.finish(reason)
                        return
                if out.finished:  # vLLM ends a request on its own only at max_tokens or an EOS
                    seq.finish("length" if out.outputs[0].finish_reason == "length" else "eos")
                    return
        except asyncio.CancelledError:
            _report_end(request)
        except EngineDeadError:
            seq.stream.push(ErrorEvent(Unavailable(GONE)))
            self._engine_died()
        except Exception as exc:  # noqa: BLE001 - vLLM's refusal of this one request: it fails alone
            log.exception("vLLM failed request %s", seq.request.request_id)
            seq.stream.push(ErrorEvent(_as_domain_error(exc, seq.request.adapter)))
        finally:
            await outputs.aclose()  # vLLM aborts a request whose output stream is closed early
            self._finished(request)

    def _finished(self, request: _Request) -> None:
        """Engine loop: a request has ended (its last event is on its stream)."""
        self._requests.pop(id(request.seq.stream), None)
        if request.timer is not None:
            request.timer.cancel()
        with self._count_lock:
            self._outstanding -= 1
        version = request.version
        if version is not None:
            if request.task is not None:
                self._versions.left(version)
            version.requests -= 1
            if version.retired and version.requests == 0:
                self._loop.create_task(self._drop_from_vllm(version))
        self._admit_held()

    # ---- the engine loop -----------------------------------------------------------------
    def _run(self, coroutine: Coroutine, timeout: float | None = 120.0):
        """Run `coroutine` on the engine loop and wait for its result (never from that loop)."""
        if self._gone is not None and self._llm is not None:
            coroutine.close()
            raise Unavailable(GONE)
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    async def _ping_forever(self, llm) -> None:
        """Ask the engine core something cheap every heartbeat interval: an answer while idle is
        progress; a dead engine core ends every open request UNAVAILABLE and tells the server.
        `is_sleeping` is answered by the engine core itself: a call that reaches the workers
        (list_loras) keeps them busy-polling their shared-memory queue, a CPU core each, forever."""
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            if llm.errored:
                self._engine_died()
                return
            try:
                await asyncio.wait_for(llm.is_sleeping(), timeout=self.heartbeat_interval * 10)
            except TimeoutError:
                continue
            except Exception:  # noqa: BLE001 - a dead engine core: its error is in `errored`
                self._engine_died()
                return
            if self._idle():
                self._last_progress = time.monotonic()

    def _engine_died(self) -> None:
        if self._gone is not None:
            return
        self._gone = GONE
        self._accepting = False
        log.error("the vLLM engine died: %s", self._llm.dead_error if self._llm is not None else "?")
        for request in list(self._requests.values()):
            self._end(request, Unavailable(GONE))
        if self._on_exit is not None:
            self._on_exit()


def _thread_ids() -> set[int]:
    try:
        return {int(t) for t in os.listdir("/proc/self/task")}
    except OSError:  # not Linux
        return set()


def _report_end(request: _Request) -> None:
    """The last event of a request cut short: a 'cancelled' finish, or the error that ended it."""
    why = request.ending or Cancelled("the request was cancelled")
    if isinstance(why, Cancelled):
        request.seq.finish("cancelled")
    else:
        request.seq.stream.push(ErrorEvent(why))


def _as_domain_error(exc: Exception, adapter: str | None) -> LoraserveError:
    text = str(exc)
    if adapter and "lora" in text.lower():
        return AdapterIncompatible(f"adapter {adapter!r}: vLLM cannot serve it ({text[:300]})")
    return LoraserveError(f"internal engine error ({type(exc).__name__})")
