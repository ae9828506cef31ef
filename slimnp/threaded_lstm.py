"""The LSTM stack run as a pipeline over layers, one thread per layer.

At batch sizes like 20, the recurrent product ``h_{t-1} Wh`` of one time
step is too small for the BLAS library to use two cores well (config C:
110 GFLOP/s on two threads, 84 on one).  Layer l+1 only needs layer l's
outputs, so the layers can run concurrently: layer l works on time chunk
c+1 while layer l+1 works on chunk c (and in the backward pass, layer l+1 on
chunk c-1 while layer l on chunk c), each with a single-threaded BLAS.
Measured, two such streams do the small products of config B in 6.3 ms
where the two-thread BLAS takes 8.7 ms.

Each layer runs the time loops of :mod:`slimnp.layers`
(:func:`~slimnp.layers.lstm_forward_steps`,
:func:`~slimnp.layers.lstm_backward_steps`) over one chunk of time steps at
a time, on its own buffers, so the result does not depend on the thread
timing.  The weight gradients (large GEMMs) are left to the caller, which
computes them after the pipeline with all BLAS threads.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import kernels
from .layers import lstm_backward_steps, lstm_cache, lstm_forward_steps
from .threads import blas_threads, set_blas_threads

CHUNK = 5  # time steps per pipeline stage


class _SingleThreadedBlas:
    """Context: OpenBLAS on one thread inside, the previous count restored after."""

    def __enter__(self):
        self.prev = blas_threads()
        set_blas_threads(1)

    def __exit__(self, *exc):
        if self.prev:
            set_blas_threads(self.prev)


_pool = None  # (ThreadPoolExecutor, its worker count), grown on demand
_pool_lock = threading.Lock()


def shutdown_pool() -> None:
    """Stop the pipeline's worker threads (the next layer step starts new
    ones, from the thread that runs it: :func:`slimnp.threads.restart_worker_threads`)."""
    global _pool
    with _pool_lock:
        pool, _pool = _pool, None
    if pool is not None:
        pool[0].shutdown(wait=True)


def _executor(n: int) -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None or _pool[1] < n:
            _pool = (ThreadPoolExecutor(max_workers=n, thread_name_prefix="slimnp-layer"), n)
        return _pool[0]


MIN_BH = 4000  # batch x hidden below which a step is too small to hand over


def enabled(xp, L: int, T: int, B: int, H: int) -> bool:
    """Whether to pipeline: NumPy arrays, 2+ layers, 2+ chunks, steps big
    enough (B*H >= MIN_BH: at B = 1 or 10 with H = 200 the hand-over costs
    more than it saves; measured on PTB evaluation, 15.6K -> 11.2K tok/s at
    B = 1), 2+ cores and an OpenBLAS whose threads we can set.
    ``SLIMNP_PIPELINE=0`` turns it off, ``=1`` on whenever possible."""
    mode = os.environ.get("SLIMNP_PIPELINE", "auto")
    if mode == "0":
        return False
    if xp is not np or L < 2 or T < 2 * CHUNK:
        return False
    if mode != "1" and B * H < MIN_BH:
        return False
    if (os.cpu_count() or 1) < 2 or (blas_threads() or 1) < 2:
        return False
    return True


def _chunks(T: int):
    return [(t0, min(T, t0 + CHUNK)) for t0 in range(0, T, CHUNK)]


def _run_layers(L: int, body):
    """Run ``body(l)`` for every layer, layer 0 on this thread and the others
    on the pool, under a single-threaded BLAS; re-raise the first error.

    ``body`` receives a ``failed`` event too: when one layer fails, the
    others stop waiting (every wait in a body is ``_wait(ev, failed)``).
    """
    failed = threading.Event()

    def guarded(l):
        try:
            body(l, failed)
        except BaseException:
            failed.set()
            raise

    with _SingleThreadedBlas():
        futures = [_executor(L - 1).submit(guarded, l) for l in range(1, L)]
        err = None
        try:
            guarded(0)
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            err = exc
        for f in futures:
            try:
                f.result()
            except BaseException as exc:  # noqa: BLE001
                if err is None:
                    err = exc
    if err is not None:
        raise err


class _Aborted(Exception):
    pass


def _wait(ev: threading.Event, failed: threading.Event) -> None:
    while not ev.wait(0.05):
        if failed.is_set():
            raise _Aborted("another pipeline stage failed")


def forward(a0, state, weights, masks=None):
    """Forward through the whole stack.

    a0 : (T, B, D) input of layer 0 (already dropout-masked);  state :
    (L, 2, B, H);  weights : [(Wx, Wh, b)] per layer;  masks : None or the
    L+1 dropout masks (``masks[l+1]`` scales layer l's output).

    Returns the top layer's (masked) output ``(T, B, H)``, the new state
    ``(L, 2, B, H)`` and the per-layer :class:`LSTMCache` list.
    """
    L = len(weights)
    T, B, _ = a0.shape
    H = state.shape[-1]
    dt = weights[0][0].dtype
    chunks = _chunks(T)
    # ins[l]: layer l's input; ins[l + 1] its (masked) output, or without
    # masks a view of its hidden states
    ins, caches = [a0], []
    for l in range(L):
        c = lstm_cache(ins[l], state[l, 0], state[l, 1], dt)
        caches.append(c)
        ins.append(c.hs[1:] if masks is None else np.empty((T, B, H), dt))
    ready = [[threading.Event() for _ in chunks] for _ in range(L)]
    steps = [kernels.lstm_segment_kernels(c.gates, c.cs)[0] for c in caches]

    def body(l, failed):
        Wx, Wh, b = weights[l]
        c = caches[l]
        hg = np.empty((B, 4 * H), dt)
        for ci, (t0, t1) in enumerate(chunks):
            if l > 0:
                _wait(ready[l - 1][ci], failed)
            lstm_forward_steps(c, Wx, Wh, b, t0, t1, hg, steps[l])
            if masks is not None:
                np.multiply(c.hs[t0 + 1 : t1 + 1], masks[l + 1][t0:t1], out=ins[l + 1][t0:t1])
            ready[l][ci].set()

    _run_layers(L, body)
    new_state = np.empty_like(state)
    for l, c in enumerate(caches):
        new_state[l, 0], new_state[l, 1] = c.hs[T], c.cs[T]
    return ins[L], new_state, caches


def backward(da_top, caches, weights, masks=None):
    """BPTT through the whole stack (truncated: no gradient from a later segment).

    da_top : (T, B, H) gradient w.r.t. the top layer's masked output.
    Returns ``dx0`` (T, B, D) w.r.t. layer 0's (masked) input, the per-layer
    gate gradients ``dgates`` (T, B, 4H) for the caller's weight GEMMs, and
    ``dstate`` (L, 2, B, H).
    """
    L = len(weights)
    T, B, H = da_top.shape
    dt = da_top.dtype
    chunks = _chunks(T)
    # douts[l]: gradient w.r.t. layer l's output h (after undoing its mask)
    douts = [np.empty((T, B, H), dt) for _ in range(L)]
    if masks is not None:
        np.multiply(da_top, masks[L], out=douts[L - 1])
    else:
        douts[L - 1][...] = da_top
    dx0 = np.empty(caches[0].x.shape, dt)
    dgates_l = [np.empty((T, B, 4 * H), dt) for _ in range(L)]
    dstate = np.empty((L, 2, B, H), dt)
    ready = [[threading.Event() for _ in chunks] for _ in range(L)]
    steps = [kernels.lstm_segment_kernels(c.gates, c.cs)[1] for c in caches]

    def body(i, failed):
        l = L - 1 - i  # thread 0 runs the top layer: it goes first
        Wx, Wh, _ = weights[l]
        WhT, WxT = np.ascontiguousarray(Wh.T), np.ascontiguousarray(Wx.T)
        c, dgates = caches[l], dgates_l[l]
        dh_next = np.zeros((B, H), dt)
        dc = np.zeros((B, H), dt)
        dh = np.empty((B, H), dt)
        for ci in range(len(chunks) - 1, -1, -1):
            t0, t1 = chunks[ci]
            if l < L - 1:
                _wait(ready[l + 1][ci], failed)
            lstm_backward_steps(douts[l], c, WhT, t0, t1, dh_next, dc, dh, dgates, steps[l])
            # gradient w.r.t. this chunk's input: the layer below's output
            dest = douts[l - 1] if l > 0 else dx0
            D = dest.shape[2]
            np.matmul(dgates[t0:t1].reshape(-1, 4 * H), WxT, out=dest[t0:t1].reshape(-1, D))
            if l > 0 and masks is not None:
                dest[t0:t1] *= masks[l][t0:t1]
            ready[l][ci].set()
        dstate[l, 0], dstate[l, 1] = dh_next, dc

    _run_layers(L, body)
    return dx0, dgates_l, dstate
