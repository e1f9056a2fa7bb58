"""The per-row LoRA kernel of CPU hosts: every row multiplied by its own slot's A and B, in place.

Semantics, for every row m whose slot s = slot[m] holds an adapter of rank r = rank[s] > 0 in
this layer (slot 0 and rank 0: the row is not touched):

    y[m] += (x[m] @ A[s, :, :r]) @ B[s, :r, :]          A [S + 1, in, R], B [S + 1, R, out]

(slot numbers index A and B from 1: callers pass the slot tables with a leading placeholder, or
subtract one; see `add_rows`). Rows are visited in `order` (sorted by slot), so the rows of one
slot follow each other and read its A and B from cache after the first.

Why our own kernel: a decode step of many adapters is bound by reading their weights (32 fp32
rank-16 all-linear adapters of the small bases are 180 MB a step against 11 MB of NF4 base).
torch has no op that multiplies each row by its own matrix without a gather copy; the closest,
`F.embedding_bag` with per-sample weights, reads them at ~12 GB/s and `bmm` on gathered slices
at ~14 GB/s on this host, where this loop reads them at ~22 GB/s (of ~29 GB/s a single core
streams). Compiled with numba (LLVM): `fastmath` here allows only reassociation and fused
multiply-adds, so a NaN or inf in one slot still propagates into its own rows and nowhere else.

CPU and float32 only: on CUDA the layer keeps its embedding_bag path.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

_FASTMATH = {"reassoc", "contract"}
_lock = threading.Lock()
_kernel = None


def _compile():
    from numba import njit

    @njit(fastmath=_FASTMATH, nogil=True, boundscheck=False, cache=True)
    def add_rows_kernel(x, a, b, slot, order, rank, scratch, y):  # pragma: no cover - compiled
        # x [M, in], a [S, in, R], b [S, R, out], slot [M] (0-based slot index, or -1), order [K]
        # (the rows with a slot, sorted by it), rank [S], scratch [4, R], y [M, out] (+=)
        n_in = x.shape[1]
        n_out = y.shape[1]
        k4 = n_in - n_in % 4
        for q in range(order.shape[0]):
            m = order[q]
            s = slot[m]
            r = rank[s]
            if r == 0:
                continue
            xm = x[m]
            am = a[s]
            for j in range(r):
                scratch[0, j] = 0.0
                scratch[1, j] = 0.0
                scratch[2, j] = 0.0
                scratch[3, j] = 0.0
            # h = xm @ am[:, :r], four independent accumulators so the loads pipeline
            for k in range(0, k4, 4):
                x0 = xm[k]
                x1 = xm[k + 1]
                x2 = xm[k + 2]
                x3 = xm[k + 3]
                a0 = am[k]
                a1 = am[k + 1]
                a2 = am[k + 2]
                a3 = am[k + 3]
                for j in range(r):
                    scratch[0, j] += x0 * a0[j]
                    scratch[1, j] += x1 * a1[j]
                    scratch[2, j] += x2 * a2[j]
                    scratch[3, j] += x3 * a3[j]
            for k in range(k4, n_in):
                xk = xm[k]
                ak = am[k]
                for j in range(r):
                    scratch[0, j] += xk * ak[j]
            # y[m] += h @ b[s, :r]
            bm = b[s]
            ym = y[m]
            for j in range(r):
                hj = scratch[0, j] + scratch[1, j] + scratch[2, j] + scratch[3, j]
                bj = bm[j]
                for o in range(n_out):
                    ym[o] += hj * bj[o]

    return add_rows_kernel


def _get():
    global _kernel
    if _kernel is None:
        with _lock:
            if _kernel is None:
                _kernel = _compile()
    return _kernel


def available() -> bool:
    """Whether numba can be imported (the kernel is compiled on first use)."""
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def usable(x: torch.Tensor, a: torch.Tensor) -> bool:
    """Whether `add_rows` takes these inputs: CPU float32 activations and slots."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and a.dtype == torch.float32 and available()


def add_rows(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, slot: np.ndarray, order: np.ndarray,
             rank: np.ndarray, y: torch.Tensor) -> None:
    """y[m] += (x[m] @ a[slot[m], :, :r]) @ b[slot[m], :r], r = rank[slot[m]], for the rows in
    `order` (each once). x [M, in] and y [M, out] contiguous float32 (y written in place);
    a [S, in, R], b [S, R, out]; slot [M] int64 (0-based, -1: none), order, rank int64."""
    scratch = np.empty((4, a.shape[2]), dtype=np.float32)
    _get()(x.numpy(), a.numpy(), b.numpy(), slot, order, rank, scratch, y.numpy())


def warm_up() -> None:
    """Compile (or load from numba's cache) before the first request needs it."""
    if not available():
        return
    x = torch.ones(2, 4)
    a, b = torch.ones(1, 4, 8), torch.ones(1, 8, 3)
    y = torch.zeros(2, 3)
    add_rows(x, a, b, np.array([0, -1], dtype=np.int64), np.array([0], dtype=np.int64),
             np.array([8], dtype=np.int64), y)
