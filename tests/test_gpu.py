"""GPU kernels (``slimnp/kernels/gpu.py``) and the GPU device, against the NumPy spec.

Every test that runs kernels takes the ``dev`` fixture, which has two sides:

* ``emu``  -- the kernels' CUDA C compiled as C++ against a CPU emulator
  (``gpu_emu.h``: one fiber per CUDA thread, ``__syncthreads`` a switch),
  launched by ``gpu.py``'s own Python code on NumPy arrays.  Runs anywhere
  with a C++ compiler, so the CPU suite checks the kernels' indexing, launch
  geometry, barriers and argument types.  ``emu-rev`` runs each block's
  threads in the opposite order (a missing barrier shows in one of the two).
* ``cuda`` -- the real thing on CuPy arrays; marked ``gpu`` and skipped
  without a usable CUDA device (``pytest -m gpu tests/test_gpu.py`` runs
  only these).

The NVRTC test compiles every kernel with NVIDIA's runtime compiler (the one
CuPy uses) without a GPU when ``libnvrtc`` is installed (``pip install
nvidia-cuda-nvrtc-cu12``, in the ``gpu-compile-check`` extra).

Corner cases throughout: id 0 and V-1, repeated ids, B=1, T=1, sizes that are
not multiples of the 256-thread block, several chunks per softmax row, rows
and columns holding a NaN or an infinity; float32 and float64.
"""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest

from slimnp import backend, kernels
from slimnp.kernels import gpu, reference

import gpu_emu
import nvrtc_check

TOL = {np.float32: dict(rtol=3e-5, atol=3e-5), np.float64: dict(rtol=1e-11, atol=1e-12)}
# sums of hundreds of terms, added in another order (atomics, chunks)
SUM_TOL = {np.float32: dict(rtol=2e-4, atol=2e-4), np.float64: dict(rtol=1e-10, atol=1e-11)}
DTYPES = [np.float32, np.float64]


def _need_gpu():
    """Skip without a usable CUDA device; fail instead under
    ``SLIMNP_REQUIRE_GPU=1`` (bench/gpu_check.sh sets it: on the GPU machine
    a skipped test would hide a broken CuPy installation)."""
    if backend.gpu_available():
        return
    try:
        backend.get_xp("gpu")
    except backend.DeviceUnavailable as exc:
        why = str(exc)
    if os.environ.get("SLIMNP_REQUIRE_GPU", "") not in ("", "0"):
        pytest.fail(f"SLIMNP_REQUIRE_GPU is set but {why}")
    pytest.skip(why)


class Device:
    """Where the kernels run: ``put`` copies a host array there, ``get`` back."""

    def __init__(self, name, put, get):
        self.name, self.put, self.get = name, put, get


@pytest.fixture(params=["emu", "emu-rev", pytest.param("cuda", marks=pytest.mark.gpu)])
def dev(request, monkeypatch):
    monkeypatch.setattr(gpu, "_cache", {})
    if request.param.startswith("emu"):
        if gpu_emu.load() is None:
            pytest.skip(gpu_emu.why_unavailable())
        monkeypatch.setattr(gpu, "_factory", gpu_emu.factory)
        gpu_emu.set_reverse(request.param == "emu-rev")
        yield Device(request.param, lambda a: np.array(a, copy=True), np.asarray)
        gpu_emu.set_reverse(False)
        return
    _need_gpu()
    cp = backend.get_xp("gpu")
    monkeypatch.setattr(gpu, "_factory", None)
    yield Device("cuda", cp.asarray, backend.to_numpy)


def _close(a, b, dtype, tol=TOL):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), **tol[dtype])


# ---------------------------------------------------------------------------
# compile checks
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["compute_80", "sm_90"])
def test_nvrtc_compiles_every_kernel_without_a_gpu(arch):
    """Every kernel template, float and double, through NVRTC with CuPy's
    options (no device needed): syntax and type errors fail here, sm_90
    (H100/H200) also assembles; the log must be clean."""
    if nvrtc_check.load() is None:
        pytest.skip(nvrtc_check.why_unavailable())
    out, log, lowered = nvrtc_check.compile_gpu_kernels(arch)
    assert set(lowered) == set(gpu.name_expressions(np.float32) + gpu.name_expressions(np.float64))
    assert all(lowered.values()) and len(out) > 1000
    if arch.startswith("compute"):
        assert out.count(".entry") == 2 * len(gpu.KERNELS)
    assert log == "", f"NVRTC warnings:\n{log}"


def test_emulator_compiles_and_checks_signatures():
    if gpu_emu.load() is None:
        pytest.skip(gpu_emu.why_unavailable())
    k = gpu_emu.factory("axpy", np.float32)
    assert k.signature == "pfpq"
    y = np.zeros(3, np.float32)
    with pytest.raises(TypeError, match="expected int64"):
        k((1,), (256,), (y, np.float32(1), y, 3))  # a Python int where long long is declared
    with pytest.raises(TypeError, match="expected float32"):
        k((1,), (256,), (y, 1.0, y, np.int64(3)))


@pytest.mark.gpu
def test_cupy_compiles_every_kernel():
    _need_gpu()
    gpu._cache.clear()
    gpu._modules.clear()
    gpu.compile_all()
    assert len(gpu._cache) == 2 * len(gpu.KERNELS)


# ---------------------------------------------------------------------------
# kernels vs reference
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,H", [(1, 1), (1, 3), (5, 7), (3, 100)])
@pytest.mark.parametrize("alias", [False, True])
def test_lstm_pointwise(dev, dtype, B, H, alias, rng):
    xg = rng.standard_normal((B, 4 * H)).astype(dtype) * 3
    xg[0, 0] = -200  # sigmoid of a very negative input: 0, not NaN
    hg = rng.standard_normal((B, 4 * H)).astype(dtype)
    c_prev = rng.standard_normal((B, H)).astype(dtype)
    want = [np.empty((B, 4 * H), dtype)] + [np.empty((B, H), dtype) for _ in range(3)]
    reference.lstm_pointwise_forward(xg, hg, c_prev, *want)
    d_xg, d_hg, d_cp = dev.put(xg), dev.put(hg), dev.put(c_prev)
    outs = [d_xg if alias else dev.put(np.zeros((B, 4 * H), dtype))] + \
        [dev.put(np.zeros((B, H), dtype)) for _ in range(3)]
    gpu.lstm_pointwise_forward(d_xg, d_hg, d_cp, *outs)
    for got, exp in zip(outs, want):
        _close(dev.get(got), exp, dtype)
    act, _, _, tc = want
    dh = rng.standard_normal((B, H)).astype(dtype)
    dc = rng.standard_normal((B, H)).astype(dtype)
    dg_want, dc_want = np.empty((B, 4 * H), dtype), dc.copy()
    reference.lstm_pointwise_backward(act, c_prev, tc, dh, dc_want, dg_want)
    d_dc, d_dg = dev.put(dc), dev.put(np.zeros((B, 4 * H), dtype))
    gpu.lstm_pointwise_backward(dev.put(act), d_cp, dev.put(tc), dev.put(dh), d_dc, d_dg)
    _close(dev.get(d_dg), dg_want, dtype)
    _close(dev.get(d_dc), dc_want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V,D,N", [(7, 5, 60), (1, 3, 1), (50, 1, 9), (4, 300, 5)])
def test_embedding_scatter_add(dev, dtype, V, D, N, rng):
    ids = rng.integers(0, V, N).astype(np.int32)
    ids[0] = 0
    ids[-1] = V - 1
    if N > 3:
        ids[1:3] = ids[0]  # repeated ids accumulate
    dX = rng.standard_normal((N, D)).astype(dtype)
    dW = rng.standard_normal((V, D)).astype(dtype)
    want = dW.copy()
    reference.embedding_scatter_add(want, ids, dX)
    got = dev.put(dW)
    gpu.embedding_scatter_add(got, dev.put(ids.astype(np.int64)), dev.put(dX))  # int64 ids too
    _close(dev.get(got), want, dtype)


def _logits_case(rng, dtype, N, V):
    z = (rng.standard_normal((N, V)) * 3).astype(dtype)
    t = rng.integers(0, V, N).astype(np.int32)
    t[0] = 0
    t[-1] = V - 1
    b = rng.standard_normal(V).astype(dtype)
    return z, t, b


# (N, V): one word; one row; several rows of one block; rows split in chunks
XENT_SHAPES = [(1, 1), (1, 5), (3, 257), (2, 5000), (40, 300)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,V", XENT_SHAPES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("grad", [True, False])
def test_softmax_xent_rows(dev, dtype, N, V, bias, grad, rng):
    z, t, b = _logits_case(rng, dtype, N, V)
    b = b if bias else None
    want_z = z.copy()
    want = reference.softmax_xent(want_z, t, 0.5, grad, b)
    d_z = dev.put(z)
    got = gpu.softmax_xent(d_z, dev.put(t), 0.5, grad, None if b is None else dev.put(b))
    assert dev.get(got).dtype == np.float64
    _close(dev.get(got), want, dtype, SUM_TOL)
    if grad:
        _close(dev.get(d_z), want_z, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V,N", [(1, 1), (5, 1), (257, 3), (3000, 2), (300, 33), (100, 70)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("grad", [True, False])
def test_softmax_xent_columns(dev, dtype, V, N, bias, grad, rng):
    z, t, b = _logits_case(rng, dtype, N, V)
    zT = np.ascontiguousarray(z.T)
    b = b if bias else None
    want_z = zT.copy()
    want = reference.softmax_xent_t(want_z, t, 0.5, grad, b)
    d_z = dev.put(zT)
    got = gpu.softmax_xent_t(d_z, dev.put(t), 0.5, grad, None if b is None else dev.put(b))
    _close(dev.get(got), want, dtype, SUM_TOL)
    if grad:
        _close(dev.get(d_z), want_z, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_xent_nonfinite_rows_are_nan(dev, dtype, rng):
    z, t, _ = _logits_case(rng, dtype, 4, 3000)
    z[1, 7] = np.nan
    z[2, 2999] = np.inf
    for word_major in (False, True):
        arr = np.ascontiguousarray(z.T) if word_major else z.copy()
        fn = gpu.softmax_xent_t if word_major else gpu.softmax_xent
        nll = dev.get(fn(dev.put(arr), dev.put(t), 1.0, True))
        assert np.isnan(nll[1]) and np.isnan(nll[2])
        assert np.isfinite(nll[0]) and np.isfinite(nll[3])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V,N", [(1, 1), (5, 1), (3000, 2), (300, 33), (70000, 3)])
@pytest.mark.parametrize("bias", [False, True])
def test_log_softmax_columns(dev, dtype, V, N, bias, rng):
    zT = (rng.standard_normal((V, N)) * 3).astype(dtype)
    if V > 1:
        zT[0, 0] = -np.inf  # a word ruled out: probability 0, the column still normalised
    b = rng.standard_normal(V).astype(dtype) if bias else None
    want = zT.copy()
    lse_want = reference.log_softmax_t(want, b)
    d = dev.put(zT)
    lse = dev.get(gpu.log_softmax_t(d, None if b is None else dev.put(b)))
    _close(lse, lse_want, dtype, SUM_TOL)
    got = dev.get(d)
    assert V == 1 or got[0, 0] == -np.inf
    _close(got, want, dtype, SUM_TOL)
    if V > 1:
        np.testing.assert_allclose(np.exp(got.astype(np.float64)).sum(axis=0), 1.0,
                                   rtol=1e-5 if dtype == np.float32 else 1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,S", [(1, 1), (3, 300), (5, 1000)])
@pytest.mark.parametrize("grad", [True, False])
def test_nce_xent(dev, dtype, N, S, grad, rng):
    zt = (rng.standard_normal(N) * 4).astype(dtype)
    lqt = rng.standard_normal(N).astype(dtype)
    ZS = (rng.standard_normal((N, S)) * 4).astype(dtype)
    ZS[0, 0] = 60  # large |d|: exp(-|d|) underflows, no overflow
    lqs = rng.standard_normal(S).astype(dtype)
    want_ZS = ZS.copy()
    want, want_dzt = reference.nce_xent(zt, lqt, want_ZS, lqs, 0.25, grad)
    d_ZS = dev.put(ZS)
    got, dzt = gpu.nce_xent(dev.put(zt), dev.put(lqt), d_ZS, dev.put(lqs), 0.25, grad)
    _close(dev.get(got), want, dtype, SUM_TOL)
    if grad:
        _close(dev.get(dzt), want_dzt, dtype)
        _close(dev.get(d_ZS), want_ZS, dtype)
    else:
        assert dzt is None


@pytest.mark.parametrize("dtype", DTYPES)
def test_nce_nonfinite_row_is_nan(dev, dtype, rng):
    ZS = rng.standard_normal((3, 10)).astype(dtype)
    ZS[1, 4] = np.inf
    zt = np.zeros(3, dtype)
    zt[2] = np.nan
    nll, _ = gpu.nce_xent(dev.put(zt), dev.put(np.zeros(3, dtype)), dev.put(ZS),
                          dev.put(np.zeros(10, dtype)), 1.0, True)
    nll = dev.get(nll)
    assert np.isfinite(nll[0]) and np.isnan(nll[1]) and np.isnan(nll[2])


def _slim_case(rng, dtype, K, N, Mk, V, shared=False):
    P = rng.standard_normal((K, N, Mk)).astype(dtype)
    idx = rng.integers(0, Mk, (K, V)).astype(np.int32)
    idx[:, 0] = 0
    idx[:, -1] = Mk - 1
    if shared:
        idx[:, ::3] = Mk // 2
    return P, idx, rng.standard_normal(V).astype(dtype)


# (K, N, Mk, V, shared): generic; K=1; N=1; pools of one entry; heavy sharing; one word
SLIM_CASES = [(3, 7, 5, 40, False), (1, 4, 6, 6, False), (4, 1, 3, 25, False),
              (2, 5, 1, 30, False), (5, 9, 8, 300, True), (2, 3, 4, 1, False)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K,N,Mk,V,shared", SLIM_CASES)
@pytest.mark.parametrize("bias", [False, True])
def test_slim_gather_sums(dev, dtype, K, N, Mk, V, shared, bias, rng):
    """Row- and word-major gather-sums add bias, k = 0, 1, ... in the
    reference's order (additions only: no FMA), so they agree exactly."""
    P, idx, b = _slim_case(rng, dtype, K, N, Mk, V, shared)
    b = b if bias else None
    want = np.full((N, V), np.nan, dtype)
    reference.slim_gather_sum(P, idx, b, want)
    z = dev.put(np.full((N, V), np.nan, dtype))
    gpu.slim_gather_sum(dev.put(P), dev.put(idx), None if b is None else dev.put(b), z)
    np.testing.assert_array_equal(dev.get(z), want)
    PT = np.ascontiguousarray(P.transpose(0, 2, 1))
    wantT = np.full((V, N), np.nan, dtype)
    reference.slim_gather_sum_t(PT, idx, b, wantT)
    zT = dev.put(np.full((V, N), np.nan, dtype))
    gpu.slim_gather_sum_t(dev.put(PT), dev.put(idx), None if b is None else dev.put(b), zT)
    np.testing.assert_array_equal(dev.get(zT), wantT)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K,N,Mk,V,shared", SLIM_CASES)
def test_slim_segment_sums(dev, dtype, K, N, Mk, V, shared, rng):
    _, idx, _ = _slim_case(rng, dtype, K, N, Mk, V, shared)
    dz = rng.standard_normal((N, V)).astype(dtype)
    want = np.full((K, N, Mk), np.nan, dtype)
    reference.slim_segment_sum(dz, idx, want)
    G = dev.put(np.full((K, N, Mk), np.nan, dtype))
    gpu.slim_segment_sum(dev.put(dz), dev.put(idx), G)
    _close(dev.get(G), want, dtype, SUM_TOL)
    dzT = np.ascontiguousarray(dz.T)
    wantT, db_want = np.full((K, Mk, N), np.nan, dtype), np.empty(V, dtype)
    reference.slim_segment_sum_t(dzT, idx, wantT, None, db_want)
    GT, db = dev.put(np.full((K, Mk, N), np.nan, dtype)), dev.put(np.full(V, np.nan, dtype))
    gpu.slim_segment_sum_t(dev.put(dzT), dev.put(idx), GT, None, db)
    _close(dev.get(GT), wantT, dtype, SUM_TOL)
    _close(dev.get(db), db_want, dtype, SUM_TOL)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K,N,Mk,F", [(3, 7, 5, 4), (1, 1, 1, 9), (2, 33, 300, 2)])
def test_slim_segment_sum_t_inverse_table(dev, dtype, K, N, Mk, F, rng):
    """With the inverted table the word-major backward is a gather that adds
    each entry's words in ascending order, as the reference does: exact."""
    from slimnp.mapping import inverse_table

    V = Mk * F
    idx = np.stack([rng.permutation(np.arange(V) % Mk) for _ in range(K)]).astype(np.int32)
    inv = inverse_table(idx, Mk)
    assert inv is not None
    dzT = rng.standard_normal((V, N)).astype(dtype)
    want = np.full((K, Mk, N), np.nan, dtype)
    reference.slim_segment_sum_t(dzT, idx, want)
    GT = dev.put(np.full((K, Mk, N), np.nan, dtype))
    gpu.slim_segment_sum_t(dev.put(dzT), dev.put(idx), GT, dev.put(inv), None)
    np.testing.assert_array_equal(dev.get(GT), want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [0, 1, 255, 257, 70001])
def test_sumsq_axpy(dev, dtype, n, rng):
    x = rng.standard_normal(n).astype(dtype)
    y = rng.standard_normal(n).astype(dtype)
    assert gpu.sumsq(dev.put(x)) == pytest.approx(reference.sumsq(x), rel=1e-12, abs=1e-300)
    want = y.copy()
    reference.axpy(want, -0.3, x)
    d = dev.put(y)
    gpu.axpy(d, -0.3, dev.put(x))
    _close(dev.get(d), want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V,D,rows", [(10, 7, [0, 3, 9]), (5, 1, [4]), (300, 3, list(range(0, 300, 2))),
                                      (4, 2, [])])
def test_rows_variants(dev, dtype, V, D, rows, rng):
    x = rng.standard_normal((V, D)).astype(dtype)
    y = rng.standard_normal((V, D)).astype(dtype)
    r = np.array(rows, np.int64)  # ParamStore's row sets can be int64
    assert gpu.sumsq_rows(dev.put(x), dev.put(r)) == pytest.approx(reference.sumsq_rows(x, r), rel=1e-12)
    want = y.copy()
    reference.axpy_rows(want, 0.7, x, r)
    d = dev.put(y)
    gpu.axpy_rows(d, 0.7, dev.put(x), dev.put(r))
    _close(dev.get(d), want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [None, [0, 2, 5]])
def test_adagrad_update(dev, dtype, rows, rng):
    p = rng.standard_normal((6, 300)).astype(dtype)
    acc = rng.random((6, 300)).astype(dtype) + 0.1
    g = rng.standard_normal((6, 300)).astype(dtype)
    wp, wacc = p.copy(), acc.copy()
    dp, dacc = dev.put(p), dev.put(acc)
    if rows is None:
        reference.adagrad_update(wp, wacc, g, 0.5, 0.1, 1e-7)
        gpu.adagrad_update(dp, dacc, dev.put(g), 0.5, 0.1, 1e-7)
    else:
        r = np.array(rows, np.int32)
        reference.adagrad_update(wp, wacc, g, 0.5, 0.1, 1e-7, r)
        gpu.adagrad_update(dp, dacc, dev.put(g), 0.5, 0.1, 1e-7, dev.put(r))
    _close(dev.get(dp), wp, dtype)
    _close(dev.get(dacc), wacc, dtype)


# ---------------------------------------------------------------------------
# the dispatcher
# ---------------------------------------------------------------------------
def test_dispatcher_routes_by_array_module():
    a = np.zeros((2, 3), np.float32)
    assert kernels.implementation(a) == "cpu"
    assert kernels.implementation(a[:, ::2]) == "reference"
    with kernels.using("reference"):
        assert kernels.implementation(a) == "reference"
    with kernels.using("gpu"):
        assert kernels.implementation(a) == "gpu"
        with pytest.raises(ValueError, match="C-contiguous"):
            kernels.implementation(a[:, ::2])


@pytest.mark.gpu
def test_dispatcher_sends_cupy_arrays_to_gpu_kernels():
    _need_gpu()
    cp = backend.get_xp("gpu")
    a = cp.zeros((2, 4), cp.float32)
    assert kernels.implementation(a) == "gpu"
    assert kernels.implementation(a[:, ::2]) == "reference"  # the xp fallback
    with kernels.using("reference"):
        assert kernels.implementation(a) == "reference"


def test_device_gpu_without_cuda_is_one_clear_error(tmp_path):
    if backend.gpu_available():
        pytest.skip("a GPU is usable here")
    from click.testing import CliRunner

    from slimnp.cli import main
    from slimnp.model import LanguageModel, ModelConfig

    with pytest.raises(backend.DeviceUnavailable, match="README: GPU"):
        LanguageModel(ModelConfig(vocab_size=10, hidden=4, layers=1), device="gpu")
    res = CliRunner().invoke(main, ["evaluate", str(tmp_path / "m.h5"), str(tmp_path / "t.txt"),
                                    "--device", "gpu"])
    assert res.exit_code == 1
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: device 'gpu'"), res.output
    assert "Traceback" not in res.output


# ---------------------------------------------------------------------------
# whole training steps: GPU kernels vs the CPU
# ---------------------------------------------------------------------------
MODELS = {
    "dense": dict(),
    # V = 25, M/K = 5: every entry has 5 words, the backward uses the inverse table
    "slim": dict(input="slim", input_k=2, input_m=12, output="slim", output_k=2, output_m=10),
    "slim-hash": dict(input="slim", input_k=4, input_m=9, output="slim", output_k=2, output_m=6,
                      mapping="hash"),  # uneven fan-out: the scatter backward, not the inverse table
    "tied-slim": dict(input="slim", output="slim", output_k=4, output_m=12, tie=True),
    # the PM baseline: E = 4 word vectors projected to and from H = 8
    "pm": dict(embedding_size=4),
    # Tables 2-3: dropout on the embedding -> LSTM connection alone differs
    "input-dropout": dict(input_dropout=0.5),
}
# (model, loss, optimizer)
STEPS = [("dense", "softmax", "sgd"), ("slim", "softmax", "sgd"), ("slim-hash", "softmax", "adagrad"),
         ("dense", "is", "adagrad"), ("slim", "is", "sgd"), ("slim", "nce", "adagrad"),
         ("tied-slim", "softmax", "adagrad"), ("pm", "softmax", "sgd"), ("pm", "nce", "adagrad"),
         ("input-dropout", "is", "sgd")]


def _train_steps(model, loss, optimizer, steps=2, seed=3):
    """Two SGD/Adagrad steps with dropout and carried state; returns the
    host copies of everything a step produces."""
    from slimnp.backend import make_rng
    from slimnp.optim import make_optimizer
    from slimnp.sampled import Sampled, prepare_model
    from slimnp.sampling import AliasSampler

    xp, V = model.xp, model.config.vocab_size
    rng = make_rng(seed)
    model.init_params(rng)
    prepare_model(model, loss)
    sampled = None
    if loss != "softmax":
        q = np.arange(1, V + 1, dtype=np.float64) ** -0.75
        sampled = Sampled(loss, 7, AliasSampler(q / q.sum()), rng)
    opt = make_optimizer(optimizer, clip=0.5)  # the clip is active
    data = np.random.default_rng(seed).integers(0, V, (steps, 2, 5, 3)).astype(np.int32)
    data[0, 0, 0, 0], data[0, 1, -1, -1] = 0, V - 1
    state = model.zero_state(3)
    out = []
    for x, y in data:
        model.store.zero_grad(lazy=True)
        nll, state, dstate = model.forward_backward(xp.asarray(x), xp.asarray(y), state, 1 / 3, rng,
                                                    sampled=sampled)
        grad = backend.to_numpy(model.store.grad).copy()
        norm = opt.step(model.store.data, model.store.grad, 0.5, model.store.segments())
        out.append((nll, norm, grad, backend.to_numpy(dstate), backend.to_numpy(model.store.data).copy()))
    return out


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name,loss,optimizer", STEPS)
def test_training_step_parity(dev, dtype, name, loss, optimizer, monkeypatch):
    """Loss, gradient buffer, state gradient, norm and updated parameters of
    two steps (dropout, clipping, carried state) agree with the CPU."""
    from slimnp.model import LanguageModel, ModelConfig

    monkeypatch.setenv("SLIMNP_PIPELINE", "0")  # the emulator is single-threaded
    cfg = ModelConfig(vocab_size=25, hidden=8, layers=2, dropout=0.2, dtype=dtype, **MODELS[name])
    if dev.name == "emu-rev":
        pytest.skip("the kernels' own tests cover the reversed order")
    with kernels.using("reference"):
        want = _train_steps(LanguageModel(cfg), loss, optimizer)
    if dev.name == "emu":
        with kernels.using("gpu"):  # every kernel through gpu.py, on NumPy arrays
            got = _train_steps(LanguageModel(cfg), loss, optimizer)
    else:
        got = _train_steps(LanguageModel(cfg, device="gpu"), loss, optimizer)
    tol = dict(rtol=1e-9, atol=1e-11) if dtype == "float64" else dict(rtol=2e-4, atol=2e-5)
    for (n1, g1, gr1, ds1, p1), (n2, g2, gr2, ds2, p2) in zip(got, want):
        assert n1 == pytest.approx(n2, rel=tol["rtol"] * 10)
        assert g1 == pytest.approx(g2, rel=tol["rtol"] * 10)
        np.testing.assert_allclose(gr1, gr2, **tol)
        np.testing.assert_allclose(ds1, ds2, **tol)
        np.testing.assert_allclose(p1, p2, **tol)


# ---------------------------------------------------------------------------
# model files across devices (needs a GPU)
# ---------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["dense", "slim"])
def test_gpu_trained_model_file_round_trip(tmp_path, variant):
    """Train on the GPU (CLI), then evaluate the file on CPU and GPU: the same
    perplexity to float32 tolerance; the file loads back on the GPU with the
    same parameters."""
    _need_gpu()
    from click.testing import CliRunner

    from helpers import tiny_corpus
    from slimnp.cli import main
    from slimnp.trainer import load_model

    files, _ = tiny_corpus(tmp_path / "data", tokens=4000, vocab=60)
    out = tmp_path / "m.h5"
    args = ["train", "--train", str(files["train"]), "--valid", str(files["valid"]), "--out", str(out),
            "--layers", "2", "--hidden", "16", "--epochs", "1", "--bptt", "7", "--batch-size", "4",
            "--device", "gpu", "--quiet", "--json"]
    if variant == "slim":
        args += ["--input", "slim", "--input-k", "2", "--input-ratio", "0.5",
                 "--output", "slim", "--output-k", "4", "--output-ratio", "0.25", "--loss", "is",
                 "--samples", "20"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    ppl = {}
    for device in ("cpu", "gpu"):
        # the CPU side on the NumPy reference kernels: no Numba compilation on the device machine
        with kernels.using("reference" if device == "cpu" else "auto"):
            r = CliRunner().invoke(main, ["evaluate", str(out), str(files["test"]), "--device", device,
                                          "--json", "--quiet"])
        assert r.exit_code == 0, r.output
        ppl[device] = json.loads(r.output.strip().splitlines()[-1])["perplexity"]
    assert ppl["gpu"] == pytest.approx(ppl["cpu"], rel=1e-4)
    m_cpu, _, _ = load_model(out)
    m_gpu, _, _ = load_model(out, device="gpu")
    for name, arr in m_cpu.params_numpy().items():
        np.testing.assert_array_equal(m_gpu.params_numpy()[name], arr)


@pytest.mark.gpu
def test_cpu_model_file_resumes_on_gpu(tmp_path):
    """A checkpoint written on the CPU continues on the GPU (and the carried
    state and Adagrad accumulator move with it)."""
    _need_gpu()
    from helpers import TINY_HP, tiny_corpus
    from slimnp.trainer import resume_training, run_training

    files, _ = tiny_corpus(tmp_path / "data", tokens=3000, vocab=50)
    hp = dict(TINY_HP, epochs=1, optimizer="adagrad", lr=0.1)
    out = tmp_path / "r.h5"
    with kernels.using("reference"):
        run_training(files, out, hp, log=lambda m: None, progress=False)
    summary = resume_training(out, epochs=2, device="gpu", log=lambda m: None, progress=False)
    assert summary["finished"] and np.isfinite(summary["best_valid_ppl"])


@pytest.mark.gpu
def test_generate_and_score_on_gpu(tmp_path):
    _need_gpu()
    from helpers import TINY_HP, tiny_corpus
    from slimnp.apply import LM
    from slimnp.trainer import run_training

    files, _ = tiny_corpus(tmp_path / "data", tokens=3000, vocab=50)
    hp = dict(TINY_HP, epochs=1, input="slim", input_k=2, input_ratio=0.5, output="slim",
              output_k=2, output_ratio=0.5)
    out = tmp_path / "g.h5"
    with kernels.using("reference"):
        run_training(files, out, hp, log=lambda m: None, progress=False)
    cpu, gpu_lm = LM.load(out), LM.load(out, "gpu")
    lines = files["test"].read_text().splitlines()[:20]
    with kernels.using("reference"):
        a = [s.logprob for s in cpu.score(lines)]
    b = [s.logprob for s in gpu_lm.score(lines)]
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)
    texts = gpu_lm.generate("", length=5, seed=1, count=2)
    assert len(texts) == 2 and all(len(t.split()) <= 5 for t in texts)  # at most --length words,
    assert all(w in gpu_lm.vocab.index for t in texts for w in t.split())  # the model's, and seeded
    assert texts == gpu_lm.generate("", length=5, seed=1, count=2)
    dense = dataclasses.asdict(gpu_lm.dense().model.config)
    assert dense["output"] == "full"
