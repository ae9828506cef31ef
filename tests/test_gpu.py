"""The GPU side: kernel compile checks, the dispatcher's routing, whole
training steps on every compiled backend against the reference, and model
files across devices.

The GPU kernels' own parity tests are in ``test_kernels.py``; like the
training-step tests here they take the ``dev`` fixture (``tests/backends.py``),
whose ``emu`` rows run ``kernels/gpu.py``'s CUDA C on a CPU emulator
(``gpu_emu.h``) -- so the CPU suite checks the kernels' indexing, launch
geometry, barriers and argument types -- and whose ``cuda`` row is the real
thing, marked ``gpu`` and skipped without a usable CUDA device
(``pytest -m gpu tests/test_gpu.py tests/test_kernels.py`` runs only those).

The NVRTC test compiles every kernel with NVIDIA's runtime compiler (the one
CuPy uses) without a GPU when ``libnvrtc`` is installed (``pip install
nvidia-cuda-nvrtc-cu12``, in the ``gpu-compile-check`` extra).
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from slimnp import backend, kernels
from slimnp.kernels import gpu

import gpu_emu
import nvrtc_check
from backends import need_gpu as _need_gpu


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
# whole training steps: every compiled backend vs the reference
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
    # HashNet (K = H, hash tables), its output layer on the dense strategy
    # (the V x H matrix rebuilt from the pools; forced: this model is tiny)
    "hashnet": dict(input="slim", input_k=8, input_m=12, output="slim", output_k=8, output_m=40,
                    mapping="hash"),
}
# (model, loss, optimizer)
STEPS = [("dense", "softmax", "sgd"), ("slim", "softmax", "sgd"), ("slim-hash", "softmax", "adagrad"),
         ("dense", "is", "adagrad"), ("slim", "is", "sgd"), ("slim", "nce", "adagrad"),
         ("tied-slim", "softmax", "adagrad"), ("pm", "softmax", "sgd"), ("pm", "nce", "adagrad"),
         ("input-dropout", "is", "sgd"), ("hashnet", "softmax", "sgd")]


def _train_steps(model, loss, optimizer, steps=2, seed=3):
    """Two SGD/Adagrad steps with dropout and carried state; returns the
    host copies of everything a step produces."""
    from slimnp.backend import make_rng
    from slimnp.optim import make_optimizer
    from slimnp.sampled_losses import Sampled, prepare_model
    from slimnp.alias_sampler import AliasSampler

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
    from slimnp.model import ModelConfig

    monkeypatch.setenv("SLIMNP_PIPELINE", "0")  # the emulator is single-threaded
    if name == "hashnet":
        from slimnp import layers
        monkeypatch.setattr(layers, "DENSE_MIN_ELEMENTS", 0)
    cfg = ModelConfig(vocab_size=25, hidden=8, layers=2, dropout=0.2, dtype=dtype, **MODELS[name])
    assert_step_parity(dev, cfg, loss, optimizer)


def assert_step_parity(dev, cfg, loss="softmax", optimizer="sgd"):
    """Two training steps of a model of ``cfg`` through backend ``dev``'s
    kernels (Numba, or gpu.py on NumPy arrays -- the emulator, dispatcher
    mode 'gpu' -- or on CuPy arrays) equal the NumPy reference's: loss,
    norm, gradient buffer, state gradient and updated parameters."""
    from slimnp.model import LanguageModel

    if dev.name == "emu-rev":
        pytest.skip("the kernels' own tests cover the reversed order")
    with kernels.using("reference"):
        want = _train_steps(LanguageModel(cfg), loss, optimizer)
    got = _train_steps(LanguageModel(cfg, device="gpu" if dev.name == "cuda" else "cpu"), loss, optimizer)
    tol = dict(rtol=1e-9, atol=1e-11) if cfg.dtype == "float64" else dict(rtol=2e-4, atol=2e-5)
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
    from slimnp.modelfile import load_model

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
    from slimnp.options import configs

    files, _ = tiny_corpus(tmp_path / "data", tokens=3000, vocab=50)
    hp = dict(TINY_HP, epochs=1, optimizer="adagrad", lr=0.1)
    out = tmp_path / "r.h5"
    with kernels.using("reference"):
        run_training(files, out, *configs(hp), log=lambda m: None, progress=False)
    summary = resume_training(out, epochs=2, device="gpu", log=lambda m: None, progress=False)
    assert summary["finished"] and np.isfinite(summary["best_valid_ppl"])


@pytest.mark.gpu
def test_generate_and_score_on_gpu(tmp_path):
    _need_gpu()
    from helpers import TINY_HP, tiny_corpus
    from slimnp.inference import LM
    from slimnp.options import configs
    from slimnp.trainer import run_training

    files, _ = tiny_corpus(tmp_path / "data", tokens=3000, vocab=50)
    hp = dict(TINY_HP, epochs=1, input="slim", input_k=2, input_ratio=0.5, output="slim",
              output_k=2, output_ratio=0.5)
    out = tmp_path / "g.h5"
    with kernels.using("reference"):
        run_training(files, out, *configs(hp), log=lambda m: None, progress=False)
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
