"""Synchronous data-parallel training over MPI ranks.

Launched as ``mpiexec -n N slimnp train --distributed ...`` (or ``srun``),
every rank builds the same model from the same seed and trains on its own
``B/N`` of the ``B`` parallel streams.  One step on rank r::

    forward/backward on streams [r*B/N, (r+1)*B/N)   loss scale 1/B (global)
    allgather  (nll, stop, row sets, checkpoint)      a few hundred bytes
    Allreduce  store.grad  (in place, SUM)            the whole flat buffer
    optimizer step on the summed gradient             identical on every rank

so the summed gradient is the one a single process with batch B computes, the
clipping norm is global, and every rank applies the same update to the same
parameters (Adagrad's accumulator included) without ever exchanging them.

Row-sparse gradients (:meth:`slimnp.buffers.ParamStore.grad_rows`): the store
knows which embedding rows *this* rank touched; after the allreduce the rows
touched by the other ranks are non-zero too.  :meth:`Communicator.step`
therefore replaces each row set by the union over ranks (the rows a single
process with the whole batch would have touched), so the optimizer and the
next lazy zeroing see every non-zero row.

Randomness stays in step because every rank draws the same numbers in the
same order from the same generator: dropout masks are drawn for the whole
batch and each rank keeps its columns; the sampled losses' noise words are
shared by the batch anyway.  A checksum of parameters, tables, vocabulary,
data and RNG state, compared over all ranks at the start and at every epoch
end, turns any divergence into an error instead of a silently wrong model.

mpi4py is imported inside the functions here, never at module load: slimnp
without the ``[mpi]`` extra runs as before.  GPUs: :func:`choose_collective`
picks NCCL for ``device='gpu'`` where CuPy provides it
(:class:`slimnp.backend.NcclAllreduce` sums the device buffer GPU to GPU);
without it MPI stages device buffers through the host.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sys
import traceback

import numpy as np

from .backend import to_numpy

INSTALL_HINT = "pip install 'slimnp[mpi]'"

#: Elements per ``Allreduce`` call: MPI counts are C ints (< 2**31), so a
#: larger buffer goes in chunks of this size (tests lower it to check).
MAX_COUNT = 1 << 30

# Environment variables that MPI launchers set in every process they start:
# (rank, size) pairs of MPICH/Hydra and Slurm's PMI, Open MPI, MVAPICH.
_LAUNCH_VARS = (("PMI_RANK", "PMI_SIZE"), ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
                ("MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE"))


class DistributedError(RuntimeError):
    """Distributed training cannot start or go on; the message says why."""


# ----------------------------------------------------------------------------
# What is available, and which collective to use
# ----------------------------------------------------------------------------
def import_mpi():
    """``mpi4py.MPI`` (initialises MPI), or a :class:`DistributedError` saying
    what to install."""
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise DistributedError(f"--distributed needs mpi4py and an MPI library ({exc}); "
                               f"install them with: {INSTALL_HINT}") from None
    return MPI


def mpi_available() -> bool:
    """True where mpi4py can be imported (without initialising MPI)."""
    import importlib.util

    try:
        return importlib.util.find_spec("mpi4py") is not None
    except (ImportError, ValueError):
        return False


def nccl_available() -> bool:
    """True where CuPy works and carries NCCL (:func:`slimnp.backend.nccl_module`)."""
    from .backend import nccl_module

    return nccl_module() is not None


def choose_collective(device: str, mpi_available: bool, nccl_available: bool) -> str:
    """The backend that sums gradients: ``"mpi"`` or ``"nccl"``.

    MPI always starts the processes and tells them their rank (NCCL needs it to
    share its unique id), so it is required everywhere.  On ``device='cpu'``
    it also does the allreduce; on ``'gpu'`` NCCL does where CuPy has it
    (device to device, no host copy), MPI through host memory otherwise.
    Raises :class:`DistributedError` (install hint) without MPI and
    ``ValueError`` for an unknown device.
    """
    if device not in ("cpu", "gpu"):
        raise ValueError(f"unknown device {device!r}; expected 'cpu' or 'gpu'")
    if not mpi_available:
        raise DistributedError(f"distributed training needs mpi4py and an MPI library; "
                               f"install them with: {INSTALL_HINT}")
    if device == "gpu" and nccl_available:
        return "nccl"
    return "mpi"


def launched_by_mpi(environ=None) -> tuple[int, int] | None:
    """``(rank, size)`` when an MPI launcher started this process as one of
    several, from its environment (no MPI import); None otherwise."""
    env = os.environ if environ is None else environ
    for rank_var, size_var in _LAUNCH_VARS:
        try:
            rank, size = int(env[rank_var]), int(env[size_var])
        except (KeyError, ValueError):
            continue
        if size > 1:
            return rank, size
    return None


# ----------------------------------------------------------------------------
# Communication volume
# ----------------------------------------------------------------------------
def allreduce_bytes(shapes: dict, dtype="float32") -> int:
    """Bytes of the per-step allreduce payload: the whole flat gradient buffer
    of a model with parameter ``shapes`` (``slimnp.model.param_shapes``)."""
    n = sum(int(np.prod(s)) for s in shapes.values())
    return n * np.dtype(dtype).itemsize


def ring_bytes_sent(nbytes: int, ranks: int) -> float:
    """Bytes each rank sends per allreduce of ``nbytes`` with the ring (or
    reduce-scatter + allgather) algorithm: ``2 (N-1)/N * nbytes``."""
    return 2.0 * (ranks - 1) / ranks * nbytes if ranks > 1 else 0.0


def traffic_line(nbytes: int, ranks: int) -> str:
    """``"distributed: 2 ranks, allreduce 8.0 MB/step (...)"`` for the train log."""
    return (f"distributed: {ranks} ranks, allreduce {nbytes / 1e6:.1f} MB/step "
            f"(a ring sends {ring_bytes_sent(nbytes, ranks) / 1e6:.1f} MB per rank)")


# ----------------------------------------------------------------------------
# Sharding
# ----------------------------------------------------------------------------
def shard_range(n: int, rank: int, size: int, even: bool = True) -> tuple[int, int]:
    """Rank ``rank``'s share ``[lo, hi)`` of ``n`` items in ``size`` contiguous parts.

    ``even`` requires ``size`` to divide ``n`` (training streams: every rank
    must run the same number of steps on the same shapes); otherwise the first
    ``n % size`` ranks get one item more (validation pieces; a share may be
    empty).
    """
    if even and n % size:
        raise ValueError(f"--batch-size {n} must be divisible by the number of ranks {size} "
                         f"(each rank trains on batch/ranks streams); use a multiple of {size}")
    q, r = divmod(n, size)
    lo = rank * q + min(rank, r)
    return lo, lo + q + (1 if rank < r else 0)


def evaluate_shard(model, ids, eos_id: int, batch_size: int, bptt: int, rank: int, size: int) -> float:
    """Rank ``rank``'s part of :func:`slimnp.evaluate.evaluate_ids`: the total
    NLL of its share (:func:`shard_range`, uneven allowed) of the same
    ``batch_size`` pieces, each from a zero state; the tail that continues the
    last piece goes with that piece.  The ranks' sums add up to ``evaluate_ids``'s
    ``nll`` (up to the order of float additions)."""
    from .evaluate import pieces_nll, primed_pieces

    _, _, B, _ = primed_pieces(ids, eos_id, batch_size)  # as evaluate_ids cuts it
    lo, hi = shard_range(B, rank, size, even=False)
    return pieces_nll(model, ids, eos_id, batch_size, bptt, lo, hi)


# ----------------------------------------------------------------------------
# Checksums
# ----------------------------------------------------------------------------
def digest(*parts) -> str:
    """A short hex digest of arrays (their dtype, shape and bytes), strings and
    JSON-able values, in order."""
    h = hashlib.blake2b(digest_size=12)
    for p in parts:
        if p is None:
            h.update(b"\0none")
        elif isinstance(p, (str, bytes)):
            h.update(p.encode() if isinstance(p, str) else p)
        elif hasattr(p, "dtype") and hasattr(p, "shape"):
            a = np.ascontiguousarray(to_numpy(p))
            h.update(f"{a.dtype.str}{a.shape}".encode())
            h.update(memoryview(a.reshape(-1)).cast("B"))
        else:
            h.update(json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()


# ----------------------------------------------------------------------------
# The communicator
# ----------------------------------------------------------------------------
class Communicator:
    """The ranks of one data-parallel run (an mpi4py communicator).

    Parameters
    ----------
    comm : an ``mpi4py.MPI.Comm`` (``MPI.COMM_WORLD`` from :func:`init`)
    backend : ``"mpi"`` (see :func:`choose_collective`)
    """

    def __init__(self, comm, backend: str = "mpi", nccl=None):
        if backend not in ("mpi", "nccl"):
            raise DistributedError(f"unknown collective {backend!r}; expected 'mpi' or 'nccl'")
        from mpi4py import MPI

        self.MPI = MPI
        self.comm = comm
        self.backend = backend
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        # ranks sharing this node (a collective call: every rank makes it here)
        node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank, self.local_size = node.Get_rank(), node.Get_size()
        node.Free()
        self.nccl_sum = None
        if backend == "nccl":
            # NCCL (behind slimnp.backend): rank 0 makes the clique's id, MPI
            # hands it to the others; device buffers are then summed GPU to GPU
            from .backend import NcclAllreduce, nccl_module

            nccl = nccl if nccl is not None else nccl_module()
            uid = nccl.get_unique_id() if self.rank == 0 else None
            self.nccl_sum = NcclAllreduce(nccl, self.size, comm.bcast(uid, root=0), self.rank)

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def default_threads(self) -> int:
        """CPU threads per rank that fill this node's cores once: cores / ranks here."""
        try:
            mine = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            mine = os.cpu_count() or 1
        return max(1, min(mine, (os.cpu_count() or 1) // self.local_size))

    # -- collectives -----------------------------------------------------------
    def barrier(self) -> None:
        self.comm.Barrier()

    def allgather(self, obj) -> list:
        """Every rank's ``obj`` (any picklable value), in rank order."""
        return self.comm.allgather(obj)

    def sum(self, value: float) -> float:
        """Sum of a float over ranks, added in rank order, so every rank gets
        the same bits (decisions such as the lr schedule depend on it)."""
        return math.fsum(self.allgather(float(value)))

    def allreduce_(self, buf) -> None:
        """``buf`` := the sum of every rank's ``buf``, in place: one
        ``Allreduce`` per :data:`MAX_COUNT` elements of the flat buffer.
        Device (CuPy) buffers: one NCCL allReduce with the ``nccl`` backend,
        else through a host copy."""
        if self.nccl_sum is not None and not isinstance(buf, np.ndarray):
            self.nccl_sum(buf)
            return
        MPI = self.MPI
        host = buf if isinstance(buf, np.ndarray) else to_numpy(buf)
        flat = host.reshape(-1)
        for lo in range(0, flat.size, MAX_COUNT):
            self.comm.Allreduce(MPI.IN_PLACE, flat[lo : lo + MAX_COUNT], op=MPI.SUM)
        if host is not buf:
            buf[...] = _to_device(buf, host)

    def step(self, store, nll: float, stop: str | None = None,
             checkpoint: bool = False) -> tuple[float, str | None, bool]:
        """The exchange of one training step; returns the global NLL, the stop
        request and whether a timed checkpoint follows this step.

        Sums ``store.grad`` over ranks (:meth:`allreduce_`), and makes every
        row-tracked gradient's row set the union of the ranks' sets (one small
        ``allgather`` also carrying the NLL, a pending Ctrl-C/SIGTERM, so
        all ranks stop after the same step, and rank 0's ``checkpoint`` flag,
        so rank 0's clock alone decides when all ranks write one).  Call it
        after ``forward_backward`` (gradients settled), before the optimizer.
        """
        tracked = {}  # name -> this rank's rows
        names = _names_by_offset(store)
        for seg in store.segments():
            if seg[0] == "rows":
                tracked[names[seg[1]]] = to_numpy(seg[3])
        everyone = self.allgather((float(nll), stop, tracked, bool(checkpoint)))
        for name in tracked:
            sets = [t.get(name) for _, _, t, _ in everyone]
            if any(s is None for s in sets):
                store.grad_view(name)  # dense on some rank: dense here too
            else:
                store.grad_rows(name, store.xp.asarray(np.unique(np.concatenate(sets))))
        self.allreduce_(store.grad)
        stops = [s for _, s, _, _ in everyone if s]
        return math.fsum(v for v, _, _, _ in everyone), (stops[0] if stops else None), everyone[0][3]

    def allgather_axis(self, a, axis: int):
        """Every rank's ``a`` concatenated along ``axis`` in rank order (on
        every rank): the carried ``(L, 2, B/N, H)`` states become ``(L, 2, B, H)``."""
        return np.concatenate(self.allgather(np.ascontiguousarray(to_numpy(a))), axis=axis)

    def check_same(self, items: dict, when: str, hint: str = "") -> None:
        """Raise :class:`DistributedError` on every rank unless all ranks hold the
        same ``items`` (``{what: digest}``); the message names what differs,
        ``when`` and ``hint`` what to do."""
        everyone = self.allgather(items)
        bad = [k for k in items if any(o.get(k) != items[k] for o in everyone)]
        if bad:
            detail = "; ".join(f"{k}: " + ", ".join(f"rank {r} {o.get(k)}" for r, o in enumerate(everyone))
                               for k in bad)
            raise DistributedError(f"ranks disagree {when} on {', '.join(bad)} ({detail}); " + hint)

    # -- failure -----------------------------------------------------------------
    @contextlib.contextmanager
    def abort_on_error(self, stream=None):
        """Turn an exception on any one rank into a one-line message naming the
        rank and ``MPI_Abort``, which stops every rank (the others would
        otherwise wait in their next collective forever).  Unexpected errors
        (not ValueError/OSError/RuntimeError/Ctrl-C) print their traceback first."""
        try:
            yield
        except SystemExit as exc:
            if exc.code in (None, 0):
                raise
            self._abort(exc, stream)
        except BaseException as exc:  # noqa: B902  (every failure must stop the job)
            self._abort(exc, stream)

    def _abort(self, exc, stream=None) -> None:
        stream = stream or sys.stderr
        if not isinstance(exc, (ValueError, OSError, RuntimeError, KeyboardInterrupt, SystemExit)):
            traceback.print_exception(type(exc), exc, exc.__traceback__, file=stream)
        msg = " ".join((str(exc) or type(exc).__name__).splitlines())
        stream.write(f"slimnp: rank {self.rank} of {self.size} failed: {msg}; stopping all ranks\n")
        stream.flush()
        self.comm.Abort(1)


def _to_device(like, host):
    """``host`` copied into the device array ``like``'s module (CuPy)."""
    from .backend import array_module

    return array_module(like).asarray(host)


def _names_by_offset(store) -> dict:
    """``{offset in the flat buffer: parameter name}`` of a ParamStore."""
    out, off = {}, 0
    for name, shape in store.shapes.items():
        out[off] = name
        off += int(np.prod(shape))
    return out


def init(device: str = "cpu") -> Communicator:
    """The :class:`Communicator` of every rank this process was launched with
    (``MPI.COMM_WORLD``).  Raises :class:`DistributedError` without mpi4py."""
    MPI = import_mpi()
    backend = choose_collective(device, True, device == "gpu" and nccl_available())
    if device == "gpu":
        _use_local_gpu(MPI.COMM_WORLD)
    return Communicator(MPI.COMM_WORLD, backend)


def _use_local_gpu(comm) -> None:
    """Give each rank of a node its own GPU (node-local rank modulo the GPUs
    it sees), before any device memory is allocated."""
    from mpi4py import MPI

    from .backend import use_gpu

    node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    local = node.Get_rank()
    node.Free()
    use_gpu(local)
