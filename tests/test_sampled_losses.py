"""Sampled objectives (importance sampling, NCE): float64 gradient checks
with fixed samples, for the full and the slim output layer, and the IS
estimate of the log-partition function."""
import numpy as np
import pytest

from slimnp.backend import make_rng
from slimnp.model import LanguageModel, ModelConfig
from slimnp.sampled_losses import Sampled, sampled_loss

from backends import GPU, GPU_SUM_TOL, GPU_TOL


class FixedSampler:
    """A proposal with known probabilities that returns preset samples."""

    def __init__(self, q, samples):
        self.q, self.samples = np.asarray(q, np.float64), np.asarray(samples, np.int32)

    def sample(self, rng, n):
        assert n == len(self.samples)
        return self.samples

    def log_prob(self, ids):
        return np.log(self.q[ids])


def _model(output, V=30, H=8):
    extra = {"slim": {"output": "slim", "output_k": 2, "output_m": 20},
             # PM: E = 4 word vectors, projections around the LSTM
             "pm": {"embedding_size": 4}, "full": {}}[output]
    m = LanguageModel(ModelConfig(vocab_size=V, hidden=H, layers=1, dtype="float64", **extra))
    m.init_params(make_rng(0))
    m.store.data *= 5  # larger weights: non-trivial probabilities
    return m


@pytest.mark.parametrize("kind", ["is", "nce"])
@pytest.mark.parametrize("output", ["full", "slim", "pm"])
def test_sampled_gradients_match_finite_differences(kind, output):
    rng = np.random.default_rng(1)
    m = _model(output)
    V = m.config.vocab_size
    x = rng.integers(0, V, (4, 3)).astype(np.int32)
    y = rng.integers(0, V, (4, 3)).astype(np.int32)
    q = rng.random(V) + 0.1
    q /= q.sum()
    samples = np.concatenate([y[:2, 0], rng.integers(0, V, 5)]).astype(np.int32)  # with hits
    sampled = Sampled(kind, len(samples), FixedSampler(q, samples), None)
    state = m.zero_state(3)

    def loss():
        m.store.zero_grad()
        total, _, _ = m.forward_backward(x, y, state, 0.5, sampled=sampled)
        return 0.5 * total

    m.store.zero_grad()
    m.forward_backward(x, y, state, 0.5, sampled=sampled)
    grad = m.store.grad.copy()
    eps = 1e-6
    for i in rng.choice(m.store.size, 40, replace=False):
        old = m.store.data[i]
        m.store.data[i] = old + eps
        up = loss()
        m.store.data[i] = old - eps
        down = loss()
        m.store.data[i] = old
        num = (up - down) / (2 * eps)
        assert abs(num - grad[i]) <= 1e-6 + 1e-5 * abs(num), (i, num, grad[i])


def test_is_estimate_of_log_partition_approaches_exact():
    """With q uniform, the IS loss -z_t + log(e^{z_t} + sum_{s != t} e^{z_s} / (S q_s))
    tends to the exact -log p(t) as S grows (its error falls below 0.05 nats at
    S = 5000 for V = 500 logits of spread ~4)."""
    rng = np.random.default_rng(0)
    V, H = 500, 16
    h = rng.standard_normal((1, H))
    W = rng.standard_normal((V, H))
    b = np.zeros(V)
    t = np.array([3], np.int32)
    z = (h @ W.T)[0]
    exact = np.log(np.exp(z).sum()) - z[3]
    errs = []
    for S in (50, 500, 5000):
        s = rng.integers(0, V, S).astype(np.int32)
        logq = np.log(S / V) * np.ones(S)
        loss, _ = sampled_loss("is", h, W[t], b[t], W[s], b[s], np.array([np.log(S / V)]), logq,
                               t, s, 1.0, compute_grad=False)
        errs.append(abs(loss[0] - exact))
    assert errs[2] < errs[0] and errs[2] < 0.05


@pytest.mark.parametrize("kind", ["is", "nce"])
def test_sampled_training_lowers_exact_nll(kind):
    """IS and NCE training (10 samples a minibatch from the unigram
    distribution) on a Zipf token stream lower the exact NLL by > 0.3 nats in
    30 steps (full softmax training: 3.70 -> 3.12)."""
    from slimnp.optim import SGD
    from slimnp.sampled_losses import prepare_model

    rng = np.random.default_rng(0)
    V = 40
    p = 1.0 / np.arange(1, V + 1)
    p /= p.sum()
    stream = rng.choice(V, size=(20 * 21 * 8,), p=p).astype(np.int32).reshape(8, -1)
    x, y = np.ascontiguousarray(stream[:, :-1].T), np.ascontiguousarray(stream[:, 1:].T)

    class Unigram:
        def sample(self, r, n):
            return r.choice(V, size=n, p=p).astype(np.int32)

        def log_prob(self, ids):
            return np.log(p[ids])

    m = LanguageModel(ModelConfig(vocab_size=V, hidden=16, layers=1))
    m.init_params(make_rng(0))
    prepare_model(m, kind)
    sampled = Sampled(kind, 10, Unigram(), make_rng(1))
    before = m.nll(x, y, m.zero_state(8))[0].mean()
    opt = SGD(clip=5.0)
    for _ in range(30):
        m.store.zero_grad(lazy=True)
        m.forward_backward(x, y, m.zero_state(8), 1.0 / 8, sampled=sampled)
        opt.step(m.store.data, m.store.grad, 0.5, m.store.segments())
    after = m.nll(x, y, m.zero_state(8))[0].mean()
    assert after < before - 0.3, (before, after)


def test_sampled_rejects_bad_settings():
    with pytest.raises(ValueError, match="sampled loss"):
        Sampled("softmax", 10, None, None)
    with pytest.raises(ValueError, match="samples"):
        Sampled("is", 0, None, None)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("N,S", [(1, 1), (5, 37), (64, 2100)])
def test_nce_xent_kernel_parity(dev, dtype, N, S, rng):
    """The fused NCE kernels (Numba's with float32 exp/log1p approximations)
    match the NumPy reference: losses, the target gradient and the noise
    gradients written in place, including scores far in the tails of the
    sigmoid."""
    from slimnp.kernels import reference

    ZS = (rng.standard_normal((N, S)) * 4 - 2).astype(dtype)
    ZS[0, 0], ZS[-1, -1] = 70.0, -120.0
    zt, lqt = rng.standard_normal(N).astype(dtype), rng.standard_normal(N).astype(dtype)
    lqs = (rng.standard_normal(S) - 3).astype(dtype)
    tol = dict(rtol=2e-6, atol=1e-7) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-15)
    loss_tol = dict(rtol=1e-6 if dtype == np.float32 else 1e-13)
    if dev.name in GPU:  # libm's exp and log1p, the sums in another order
        tol, loss_tol = GPU_TOL[dtype], GPU_SUM_TOL[dtype]
    for grad in (True, False):
        a, b = ZS.copy(), ZS.copy()
        nr, dr = reference.nce_xent(zt, lqt, a, lqs, 0.3, grad)
        b = dev.put(b)
        nc, dc = dev.impl.nce_xent(dev.put(zt), dev.put(lqt), b, dev.put(lqs), 0.3, grad)
        nc, b = dev.get(nc), dev.get(b)
        dc = None if dc is None else dev.get(dc)
        np.testing.assert_allclose(nc, nr, **loss_tol)
        if grad:
            np.testing.assert_allclose(dc, dr, **tol)
            np.testing.assert_allclose(b, a, **tol)
            assert dc.dtype == dtype and b.dtype == dtype
        else:
            assert dc is None and dr is None


def test_nce_xent_nan_row(backend, rng):
    """A NaN or infinite score makes that row's loss NaN (a diverged model
    is reported, not hidden), on every backend."""
    from slimnp import kernels

    ZS = rng.standard_normal((3, 50)).astype(np.float32)
    ZS[1, 7] = np.nan
    zt = np.zeros(3, np.float32)
    zt[2] = np.inf
    put = backend.put
    nll, _ = kernels.nce_xent(put(zt), put(np.zeros(3, np.float32)), put(ZS), put(np.zeros(50, np.float32)),
                              1.0, False)
    nll = backend.get(nll)
    assert np.isfinite(nll[0]) and np.isnan(nll[1]) and np.isnan(nll[2])
