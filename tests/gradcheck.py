"""Float64 central-difference gradient checks, shared by the test modules.

Each check follows Karpathy's recipe: a scalar ``loss = sum(y * w)`` over a
layer's outputs (``w`` random, so every output gets its own weight), the
analytic gradient from the layer's backward, and central differences of the
loss.  Layers are checked as training runs them: the layer objects over a
:class:`~slimnp.buffers.ParamStore`, their gradients read from the store.
"""
from __future__ import annotations

import numpy as np

from slimnp.buffers import ParamStore

EPS = 1e-6


def numgrad(f, x, idx=None):
    """Central differences of scalar ``f()`` w.r.t. entries ``idx`` of array ``x`` (in place)."""
    flat = x.reshape(-1)
    idx = range(flat.size) if idx is None else idx
    g = {}
    for i in idx:
        old = flat[i]
        flat[i] = old + EPS
        fp = f()
        flat[i] = old - EPS
        fm = f()
        flat[i] = old
        g[i] = (fp - fm) / (2 * EPS)
    return g


def assert_grad(analytic, f, x, idx=None, rtol=1e-6, atol=1e-8):
    """``analytic`` equals the central differences of ``f`` w.r.t. ``x`` (at ``idx``)."""
    num = numgrad(f, x, idx)
    a = analytic.reshape(-1)
    for i, v in num.items():
        assert abs(a[i] - v) <= atol + rtol * abs(v), f"entry {i}: analytic {a[i]}, numeric {v}"


def layer(rng, make, scale=0.5):
    """``make(store)`` builds one layer in a fresh float64 :class:`ParamStore`;
    its parameters are filled from ``rng`` (uniform in +-scale).  Returns
    ``(store, layer)``."""
    store = ParamStore(np, np.float64)
    built = make(store)
    store.allocate()
    store.data[...] = rng.uniform(-scale, scale, store.data.size)
    return store, built


def softmax_expected(h, W, b, targets, scale):
    """The full softmax's loss and gradients in plain NumPy (the "expected"
    of the output layers): ``nll (N,)`` and ``(dh, dW, db)`` of
    ``scale * sum(nll)``."""
    z = h @ W.T + b  # (N, V)
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    rows = np.arange(len(targets))
    dz = np.exp(logp)
    dz[rows, targets] -= 1
    dz *= scale
    return -logp[rows, targets], (dz @ W, dz.T @ h, dz.sum(axis=0))


def assert_output_layer_grads(store, out, h, targets, scale=0.3):
    """An output layer's ``loss``: its value equals the loss without
    gradients, and ``dh`` and every parameter's gradient equal finite
    differences (float64)."""

    def loss():
        return scale * float(out.loss(h, targets, compute_grad=False)[0].sum())

    store.zero_grad()
    nll, dh = out.loss(h, targets, scale, True)
    assert abs(scale * nll.sum() - loss()) < 1e-12
    assert_grad(dh.copy(), loss, h)
    for name, p in store.params.items():
        assert_grad(store.grads[name], loss, p)


def assert_model_grads(m, x, y, state, masks, scale, rng, per_param=25):
    """A whole model's BPTT: ``forward_backward``'s loss equals ``nll``'s, and
    the carried state's and (``per_param`` sampled entries of) every
    parameter's gradients equal finite differences (float64)."""

    def loss():
        nll, _ = m.nll(x, y, state, masks)
        return scale * float(nll.sum())

    m.store.zero_grad()
    nll_sum, _, dstate = m.forward_backward(x, y, state, scale=scale, masks=masks)
    assert abs(scale * nll_sum - loss()) < 1e-10
    assert_grad(dstate, loss, state)
    for name, p in m.store.params.items():
        idx = rng.choice(p.size, size=min(p.size, per_param), replace=False)
        assert_grad(m.store.grads[name], loss, p, idx)
