"""How much memory a training run needs, checked before it starts.

:func:`estimate` adds up what a run holds at its peak, from the model and
training settings alone (nothing is allocated)::

    parameters      P s            P = every parameter (slimnp.model.param_shapes:
    gradients       P s                slim pools, PM projections, tying), s = bytes
    optimizer       P s (Adagrad)      per value (4 for float32)
    activations     one BPTT segment: per layer the gates (T, b, 4H), the
                    states h, c, tanh(c) (T, b, H each), its input and dropout
                    mask, and the backward's gate gradients
    logits          the largest per-step output buffers: (T b, V) logits of
                    the full softmax, (V, T b) + (K, M/K, T b) of the slim
                    one, the head's and at worst the widest cluster's of
                    the adaptive one, (T b, S + 1) of a sampled loss, and validation's
                    (rows, V) chunk, which stays allocated beside the latter
    tables          slim mapping tables (V, K) int32, the noise sampler
    runtime         this process now (interpreter, libraries, vocabulary,
                    encoded text) plus the compiled kernels

with ``b = B / ranks`` streams per rank.  A resumed run briefly holds the
file's copy of one array of P values while the gradients are still unused,
and the final test evaluation reads the best model straight into the
parameters, so neither phase rises above training's peak.  On the GPU the
first six parts live on the device (with the CUDA context beside them) and
the host holds a copy of parameters and optimizer state while a checkpoint
is written.

:func:`check` compares the estimate with the memory available
(``MemAvailable`` in ``/proc/meminfo``, or what a cgroup limit leaves, the
smaller; the device's free memory on the GPU) and raises
:class:`NotEnoughMemory`, one line with both numbers and settings that would
fit, when it does not fit.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import numpy as np

from .adaptive import buffer_elements as adaptive_buffer_elements
from .errors import human_bytes
from .layers import slim_output_strategy
from .model import ModelConfig, param_shapes

#: RSS the Numba kernels add to a process: loaded from Numba's on-disk cache,
#: or compiled the first time (measured: 110 MB and 160 MB).
KERNELS_CACHED_BYTES = 110 * 10**6
KERNELS_BYTES = 160 * 10**6
#: Device memory the CUDA context, cuBLAS and CuPy's kernels take beside the arrays.
CUDA_CONTEXT_BYTES = 400 * 10**6
#: Rows of the validation logits chunk are capped so it stays under 2**26 values
#: (slimnp.layers._eval_chunks).
EVAL_CHUNK_VALUES = 1 << 26


class NotEnoughMemory(RuntimeError):
    """The run would not fit in memory; the message says what would."""


@dataclass
class Estimate:
    """Bytes a run needs, by part; ``device`` parts live on the GPU (empty on the CPU)."""

    host: dict = field(default_factory=dict)
    device: dict = field(default_factory=dict)

    @property
    def host_total(self) -> int:
        return int(sum(self.host.values()))

    @property
    def device_total(self) -> int:
        return int(sum(self.device.values()))

    def line(self, available: "Available | None" = None, device_available: "Available | None" = None) -> str:
        """``memory: about 2.41 GB (parameters 0.52 GB, ...); 20.1 GB available``."""
        def parts(d):
            return ", ".join(f"{k} {human_bytes(v)}" for k, v in d.items() if v >= 1e5)

        text = f"memory: about {human_bytes(self.host_total)} ({parts(self.host)})"
        if available is not None:
            text += f"; {human_bytes(available.bytes + available.in_use)} available"
        if self.device:
            text += f"; GPU about {human_bytes(self.device_total)} ({parts(self.device)})"
            if device_available is not None:
                text += f"; {human_bytes(device_available.bytes)} free on the GPU"
        return text


@dataclass
class Available:
    bytes: int  # what may still be allocated
    source: str  # where the number comes from, for messages
    in_use: int = 0  # what this process holds already (counted in the estimate)


# ---------------------------------------------------------------------------
# the estimate
# ---------------------------------------------------------------------------
def _output_buffers(mc: ModelConfig, rows: int, s: int) -> int:
    """Bytes of the exact output layer's per-call buffers for ``rows`` hidden states."""
    V, E = mc.vocab_size, mc.word_size
    if mc.output == "adaptive":
        return s * adaptive_buffer_elements(rows, V, E, mc.cutoffs, mc.div_value, mc.output_k, mc.tail_m)
    if mc.output == "slim":
        K = mc.output_k
        if slim_output_strategy(V, E, K) == "dense":  # the V x E matrix rebuilt, then a full softmax
            return s * (V * E + rows * V + rows * E) + 4 * V * K  # W (and dW in it), logits, dh; rows
        return s * (V * rows + K * (mc.output_m // K) * rows + V + rows * E)  # zT, PT, db, dh
    return s * (rows * V + rows * E)  # logits, dh


def parts(mc: ModelConfig, *, optimizer: str = "sgd", loss: str = "softmax", samples: int = 4000,
          bptt: int = 20, batch_size: int = 20, eval_batch_size: int = 10, ranks: int = 1,
          valid_tokens: int | None = None) -> dict:
    """The model-dependent parts of :func:`estimate`, in bytes (per rank).

    ``valid_tokens``: length of the validation text, if known (a short one
    is evaluated in shorter segments: smaller buffers).
    """
    s = np.dtype(mc.dtype).itemsize
    P = sum(int(np.prod(shape)) for shape in param_shapes(mc).values())
    V, E, H, L = mc.vocab_size, mc.word_size, mc.hidden, mc.layers
    T, b = bptt, max(1, batch_size // max(ranks, 1))
    n = T * b
    out = {"parameters": P * s, "gradients": P * s,
           "optimizer": P * s if optimizer == "adagrad" else 0}
    # forward caches of every layer (input, 4H gates, h, c, tanh c, mask), the
    # backward's (T, b, 4H) gate gradients and (T, b, H) input gradient, and
    # the word vectors, projections and their gradients
    out["activations"] = s * T * b * (L * 9 * H + 6 * H + 4 * E)
    # validation: eval_batch_size pieces in segments of max(bptt, 50) steps
    # (Trainer.validate), the logits in chunks of at most 2**26 values
    seg = max(bptt, 50)
    if valid_tokens is not None:
        seg = max(1, min(seg, valid_tokens // max(eval_batch_size, 1)))
    eval_rows = min(eval_batch_size * seg, max(1, EVAL_CHUNK_VALUES // V))
    evaluation = _output_buffers(mc, eval_rows, s)
    if loss == "softmax":
        # training and validation share the output layer's named buffers:
        # the larger of the two is alive
        out["logits"] = max(_output_buffers(mc, n, s), evaluation)
    else:
        S = samples
        sampled = s * (3 * (n + S) * E + 4 * n * (S + 1) + 2 * (n + S))
        if mc.output == "slim":
            sampled += 8 * (n + S) * mc.output_k * 2  # candidate rows (int64)
        out["logits"] = sampled + evaluation
    tables = 0
    if mc.output == "slim":
        tables += 12 * V * mc.output_k  # (V, K) table, its (K, V) copy and inverse
    if mc.input == "slim":
        tables += (8 if mc.tie else 4) * V * (mc.output_k if mc.tie else mc.input_k)
    if mc.output == "adaptive" and mc.tail_m:  # slim tails: as the slim output's, per cluster
        tables += (16 if mc.input == "adaptive" and mc.tie else 12) * (V - mc.cutoffs[0]) * mc.output_k
    if loss != "softmax":
        tables += 32 * V  # unigram counts, noise law, alias tables
    out["tables"] = tables
    return out


def kernels_bytes() -> int:
    """What the Numba kernels will add to this process (:data:`KERNELS_BYTES`,
    or :data:`KERNELS_CACHED_BYTES` when Numba's cache holds them)."""
    import glob

    from . import kernels

    where = [os.path.join(os.path.dirname(kernels.__file__), "__pycache__")]
    if os.environ.get("NUMBA_CACHE_DIR"):
        where.append(os.environ["NUMBA_CACHE_DIR"])
    cached = any(glob.glob(os.path.join(d, "**", "cpu.*.nbi"), recursive=True) for d in where)
    return KERNELS_CACHED_BYTES if cached else KERNELS_BYTES


def estimate(mc: ModelConfig, *, device: str = "cpu", in_use: int | None = None, **settings) -> Estimate:
    """What a run of model ``mc`` needs (bytes, per rank); ``settings`` as
    :func:`parts` (optimizer, loss, samples, bptt, batch_size,
    eval_batch_size, ranks, valid_tokens).  ``in_use``: what the process
    holds now (default: its resident set)."""
    p = parts(mc, **settings)
    now = current_rss() if in_use is None else in_use
    if device == "gpu":
        dev = dict(p)
        dev["CUDA context"] = CUDA_CONTEXT_BYTES
        host = {"runtime": now + kernels_bytes(),
                "checkpoint copy": p["parameters"] + p["optimizer"], "tables": p["tables"]}
        return Estimate(host=host, device=dev)
    p["runtime"] = now + kernels_bytes()
    return Estimate(host=p)


# ---------------------------------------------------------------------------
# what is available
# ---------------------------------------------------------------------------
def current_rss() -> int:
    """Resident set of this process in bytes (0 where /proc is missing)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _read_int(path) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _meminfo(key: str) -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def host_available() -> Available | None:
    """Memory this process may still allocate: ``MemAvailable``, or what
    the cgroup's limit leaves if smaller; None where neither is known."""
    found = []
    avail = _meminfo("MemAvailable")
    if avail is not None:
        found.append((avail, "MemAvailable in /proc/meminfo"))
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None and limit < (1 << 60):
            found.append((max(0, limit - usage), f"the cgroup limit of {human_bytes(limit)}"))
            break
    if not found:
        return None
    b, source = min(found)
    return Available(b, source, current_rss())


def device_available() -> Available | None:
    """Free memory of the current GPU (CuPy's pool counts as free: it is ours)."""
    from .backend import get_xp

    try:
        cp = get_xp("gpu")
        free, total = cp.cuda.runtime.memGetInfo()
        pool = cp.get_default_memory_pool()
        free += pool.free_bytes()
    except Exception:  # noqa: BLE001  (no GPU: nothing to compare with)
        return None
    return Available(int(free), f"free on the GPU of {human_bytes(total)}")


# ---------------------------------------------------------------------------
# the check
# ---------------------------------------------------------------------------
def _needed(est: Estimate, avail: Available | None, dev_avail: Available | None, local_ranks: int):
    """``(host_short, device_short)``: True where the estimate does not fit."""
    host_short = avail is not None and \
        (est.host_total - avail.in_use) * local_ranks > avail.bytes
    dev_short = bool(est.device) and dev_avail is not None and est.device_total > dev_avail.bytes
    return host_short, dev_short


def _slim_variant(mc: ModelConfig, ratio: float) -> tuple[ModelConfig, str] | None:
    """Slim input and output at ``ratio`` of the dense size, K = 8 (or a divisor of E)."""
    E, V = mc.word_size, mc.vocab_size
    K = next((k for k in (8, 4, 10, 5, 2) if E % k == 0 and k < E), None)
    if K is None:
        return None
    m_in = max(1, round(ratio * K * V))
    m_out = K * max(1, round(ratio * V))
    mc2 = dataclasses.replace(mc, input="slim", input_k=K, input_m=m_in, output="slim", output_k=K,
                              output_m=m_out, tie=False)
    try:
        mc2.validate()
    except ValueError:
        return None
    return mc2, (f"--input slim --input-k {K} --input-ratio {ratio:g} "
                 f"--output slim --output-k {K} --output-ratio {ratio:g}")


def suggestions(mc: ModelConfig, settings: dict, fits) -> list:
    """Changes of settings that would fit: ``["--optimizer sgd (about 3.1 GB)", ...]``.

    ``fits(estimate) -> bool`` decides; the cheapest changes come first.
    """
    out = []

    def attempt(mc2, changed, label):
        est = estimate(mc2, **{**settings, **changed})
        if fits(est):
            total = est.device_total if est.device else est.host_total
            out.append(f"{label} (about {human_bytes(total)})")
            return True
        return False

    if settings.get("optimizer") == "adagrad":
        attempt(mc, {"optimizer": "sgd"}, "--optimizer sgd")
    if settings.get("loss", "softmax") == "softmax" and mc.vocab_size > 1000:
        attempt(mc, {"loss": "is", "samples": min(4000, mc.vocab_size // 2)}, "--loss is (or nce)")
    if mc.input == "dense" and mc.output == "full":
        for ratio in (0.5, 0.25, 0.125, 1 / 16, 1 / 32, 1 / 64, 1 / 128, 1 / 256):
            v = _slim_variant(mc, ratio)
            if v is not None and attempt(v[0], {}, v[1]):
                break
    b = settings.get("batch_size", 20)
    while len(out) < 2 and b > 1:
        b //= 2
        if attempt(mc, {"batch_size": b}, f"--batch-size {b}"):
            break
    return out[:3]


def check(mc: ModelConfig, *, device: str = "cpu", force: bool = False, local_ranks: int = 1,
          log=None, **settings) -> Estimate:
    """Estimate the run's memory, log it (``log``: one line) and raise
    :class:`NotEnoughMemory` if it does not fit, unless ``force``.

    ``local_ranks``: ranks of a distributed run on this node, which share
    its memory.  ``settings``: as :func:`parts`.
    """
    est = estimate(mc, device=device, **settings)
    avail = host_available()
    dev_avail = device_available() if device == "gpu" else None
    if log is not None:
        log(est.line(avail, dev_avail) + (f" per rank, {local_ranks} ranks on this node"
                                          if local_ranks > 1 else ""))
    host_short, dev_short = _needed(est, avail, dev_avail, local_ranks)
    if not (host_short or dev_short) or force:
        return est
    if dev_short:
        where = (f"the GPU needs about {human_bytes(est.device_total)}, "
                 f"{human_bytes(dev_avail.bytes)} are {dev_avail.source}")
    else:
        # in all, as the log line above says it: the run's peak against what is
        # free plus what this process (each local rank) holds already -- the
        # comparison of _needed with in_use added to both sides.  The difference
        # alone ("needs 41.62 GB more") read as a shortfall beyond what is free.
        held = avail.in_use * local_ranks
        ranks = (f" ({local_ranks} ranks on this node, {human_bytes(est.host_total)} each)"
                 if local_ranks > 1 else "")
        holder = "the ranks hold" if local_ranks > 1 else "this process holds"
        source = avail.source + (f", and the {human_bytes(held)} {holder} already" if held else "")
        where = (f"the run needs about {human_bytes(est.host_total * local_ranks)} in all{ranks}, "
                 f"{human_bytes(avail.bytes + held)} are available ({source})")
    tips = suggestions(mc, {"device": device, "in_use": est.host.get("runtime", 0) - kernels_bytes(),
                            **settings},
                       lambda e: not any(_needed(e, avail, dev_avail, local_ranks)))
    tip = ("; would fit: " + ", or ".join(tips)) if tips else ""
    raise NotEnoughMemory(f"not enough memory: {where}{tip}; pass --force-memory to try anyway")
