"""The buffers the layers live in.

:class:`ParamStore` holds every parameter of a model in one flat buffer and
every gradient in another, handing the layers reshaped views of them, so an
update, a clip, a save or an all-reduce touches one array.
:class:`Workspace` keeps large scratch arrays (the ``(N, V)`` logits above
all) from one training step to the next.
"""
from __future__ import annotations

import numpy as np

class ParamStore:
    """Every parameter in one flat buffer, every gradient in another.

    Layers ``add`` named shapes while the model is built; ``allocate`` then
    creates the two flat buffers and hands out reshaped views, so
    ``store.data`` / ``store.grad`` can be updated, clipped, saved or
    all-reduced as single arrays.
    """

    def __init__(self, xp=np, dtype=np.float32):
        self.xp = xp
        self.dtype = np.dtype(dtype)
        self.shapes: dict[str, tuple] = {}
        self.data = None
        self.grad = None
        self.params: dict[str, object] = {}
        self.grads: dict[str, object] = {}
        self._pending: set = set()  # lazily zeroed gradients (zero_grad(lazy=True))
        self._rows: dict = {}  # name -> rows that may be non-zero (grad_rows)

    def add(self, name: str, shape) -> None:
        if self.data is not None:
            raise RuntimeError("ParamStore.add after allocate")
        if name in self.shapes:
            raise ValueError(f"duplicate parameter name {name!r}")
        self.shapes[name] = tuple(int(s) for s in shape)

    def allocate(self) -> None:
        sizes = [int(np.prod(s)) for s in self.shapes.values()]
        total = sum(sizes)
        self.data = self.xp.zeros(total, dtype=self.dtype)
        self.grad = self.xp.zeros(total, dtype=self.dtype)
        off = 0
        for (name, shape), n in zip(self.shapes.items(), sizes):
            self.params[name] = self.data[off : off + n].reshape(shape)
            self.grads[name] = self.grad[off : off + n].reshape(shape)
            off += n

    @property
    def size(self) -> int:
        return int(sum(int(np.prod(s)) for s in self.shapes.values()))

    def zero_grad(self, lazy: bool = False) -> None:
        """Zero every gradient.

        ``lazy`` defers the zeroing: until :meth:`settle_grad`, the first
        :meth:`accumulate` into a gradient overwrites it instead of adding to
        it (a GEMM writes its result in place: no memset, no temporary, no
        extra pass), and ``settle_grad`` zeroes those nobody wrote.
        ``LanguageModel.forward_backward`` settles before it returns.
        """
        if lazy:
            self._pending = set(self.grads)
        else:
            self._pending = set()
            self.grad.fill(0)
            for name, rows in self._rows.items():
                self._rows[name] = rows[:0]

    def settle_grad(self) -> None:
        """Zero the gradients a lazy :meth:`zero_grad` left unwritten."""
        for name in self._pending:
            self._zero(name)
        self._pending = set()

    def grad_view(self, name: str):
        """``grads[name]``, zeroed first if still lazily pending (for scatters)."""
        if name in self._pending:
            self._pending.discard(name)
            self._zero(name)
        self._rows.pop(name, None)  # may now be non-zero anywhere
        return self.grads[name]

    def grad_rows(self, name: str, rows):
        """``grads[name]`` for a scatter-add into rows ``rows`` only.

        Rows are those of the gradient seen as 2-d ``(-1, last axis)`` (a
        ``(K, Mk, d)`` pool gradient has ``K*Mk`` rows of ``d``).  The store
        remembers which rows can be non-zero, so a lazy :meth:`zero_grad`
        clears just those and the optimizer (:meth:`segments`) visits just
        those: an embedding step then costs O(rows touched), not
        O(vocabulary).  ``rows`` : distinct sorted ints.
        """
        g = self.grads[name]
        known = self._rows.get(name, False)  # False: not tracked (dense)
        if name in self._pending:
            self._pending.discard(name)
            self._zero(name)
            self._rows[name] = rows
        elif known is not False:
            self._rows[name] = self.xp.union1d(known, rows)
        return g

    def _rows2d(self, name: str):
        g = self.grads[name]
        return g.reshape(-1, g.shape[-1])

    def _zero(self, name: str) -> None:
        rows = self._rows.get(name, False)
        if rows is False:
            self.grads[name].fill(0)
        elif rows.size:
            self._rows2d(name)[rows] = 0
        if rows is not False:
            self._rows[name] = rows[:0]

    def segments(self) -> list:
        """The gradient buffer as the optimizer should walk it.

        ``("dense", offset, size)`` spans, and ``("rows", offset, shape,
        rows)`` for row-tracked gradients (see :meth:`grad_rows`), which are
        exactly zero outside ``rows``.  Consecutive dense parameters merge.
        """
        out, off = [], 0
        for name, shape in self.shapes.items():
            n = int(np.prod(shape))
            rows = self._rows.get(name, False)
            if rows is not False:
                out.append(("rows", off, (n // shape[-1], shape[-1]), rows))
            elif out and out[-1][0] == "dense" and out[-1][1] + out[-1][2] == off:
                out[-1] = ("dense", out[-1][1], out[-1][2] + n)
            else:
                out.append(("dense", off, n))
            off += n
        return out

    def accumulate(self, name: str, a, b=None) -> None:
        """``grads[name] += a`` (``b`` None) or ``+= a @ b`` (one GEMM).

        Overwrites instead of adding if the gradient is lazily zero; ``a @ b``
        is then computed straight into the gradient buffer.
        """
        g = self.grads[name]
        self._rows.pop(name, None)  # a dense write: no longer row-tracked
        if name in self._pending:
            self._pending.discard(name)
            if b is None:
                g[...] = a
            else:
                self.xp.matmul(a, b, out=g)
        elif b is None:
            g += a
        else:
            g += a @ b

    def __getitem__(self, name):
        return self.params[name]


class Workspace:
    """Scratch arrays kept across steps, one per name (new when the shape changes).

    Large per-step buffers (the ``(N, V)`` logits above all) are then
    allocated once: a fresh one costs page faults on every step, and above
    glibc's 32 MB mmap threshold it is unmapped and faulted in again each
    time.  A buffer's contents are valid only until its next ``get``.
    """

    def __init__(self, xp=np):
        self.xp = xp
        self._bufs: dict = {}

    def get(self, name: str, shape, dtype):
        shape = tuple(int(s) for s in shape)
        a = self._bufs.get(name)
        if a is None or a.shape != shape or a.dtype != dtype:
            a = self._bufs[name] = None  # drop the old buffer before allocating its successor
            a = self._bufs[name] = self.xp.empty(shape, dtype=dtype)
        return a
