"""Flushing denormal floats: threads.flush_denormals, threads.denormals_flushed
and ``slimnp train --denormals``.

A denormal (subnormal) float32 lies below ``np.finfo(np.float32).tiny``
(1.18e-38).  1e-38 is one; half of it, the result of every
operation below, is 5e-39 when denormals are kept and exactly 0 when they
are flushed: in the calling thread (NumPy), in Numba's pool (the kernels) and
in OpenBLAS's threads (a GEMM).
"""
import numba
import numpy as np
import pytest

from slimnp import kernels, threads
from slimnp.kernels import cpu
from slimnp.options import check_value, complete, option, to_argv

TINY_BITS = 0x006CE3EE  # float32 1e-38: denormal; half of it, 5e-39, too


def _tiny(*shape):
    """float32 1e-38 everywhere, filled as integer bits: a float fill (or a
    conversion from a Python float) under a flushing thread would give 0."""
    return np.full(shape, TINY_BITS, np.int32).view(np.float32)

x86 = pytest.mark.skipif(not cpu.X86_64, reason="FTZ/DAZ are x86 MXCSR bits; elsewhere a no-op")


@pytest.fixture(autouse=True)
def restored():
    """Each test leaves the threads as it found them (keeping denormals, as
    the other test files expect) and OpenBLAS at its thread count."""
    blas, nb_threads = threads.blas_threads(), numba.get_num_threads()
    before = threads.denormals_are_flushed()
    yield
    threads.flush_denormals(before)
    if blas is not None:
        threads.set_blas_threads(blas)
    numba.set_num_threads(nb_threads)


def _numpy_half(n=4):
    return _tiny(n) * np.float32(0.5)


def _numba_half(n=4):
    """``0.5 * 1e-38`` by kernels.axpy on n elements: with ``n`` over the
    kernel's span (2**14), its spans run on Numba's pool threads."""
    y = np.zeros(n, np.float32)
    with kernels.using("cpu"):
        kernels.axpy(y, 0.5, _tiny(n))
    return y


def _blas_half(threads_n=1):
    """``A @ (0.5 I)`` with every entry of A denormal, on ``threads_n``
    OpenBLAS threads; 256^3 is big enough for OpenBLAS to split it."""
    threads.set_blas_threads(threads_n)
    A = _tiny(256, 256)
    return A @ (np.eye(256, dtype=np.float32) * np.float32(0.5))


def _all_denormal(a):
    """Every element of float32 ``a`` denormal (zero exponent bits, some
    fraction bits), judged on the integer bits: a float comparison in a
    thread with DAZ set would read the denormals as 0."""
    bits = a.view(np.int32)
    return bool(np.all((bits & 0x7F800000 == 0) & (bits & 0x007FFFFF != 0)))


def _all_zero(a):
    """Every element of float32 ``a`` is +-0 (on the bits, as above)."""
    return not np.any(a.view(np.int32) & 0x7FFFFFFF)


@x86
def test_flushing_zeroes_numpy_numba_and_blas_results():
    threads.flush_denormals(False)
    assert _all_denormal(_numpy_half()) and _all_denormal(_numba_half())
    assert _all_denormal(_numba_half(3 << 14)) and _all_denormal(_blas_half())
    was = threads.flush_denormals(True)
    assert was is False and threads.denormals_are_flushed()
    assert _all_zero(_numpy_half())
    assert _all_zero(_numba_half())
    assert _all_zero(_numba_half(3 << 14))  # three spans on the pool's threads
    assert _all_zero(_blas_half())
    assert threads.flush_denormals(True) is True


@x86
def test_openblas_threads_pick_the_setting_up():
    """OpenBLAS's workers keep the MXCSR they started with: a worker left
    alone would compute its half of the columns of a 2-thread GEMM with its
    old setting; restarted by flush_denormals, it takes the new one, both ways."""
    if threads.blas_threads() is None:
        pytest.skip("NumPy here does not use OpenBLAS")
    for first in (True, False):
        cpu.set_ftz_daz(cpu.MXCSR_FTZ_DAZ if first else 0)
        threads.restart_worker_threads()
        _blas_half(2)  # the workers start here, with the setting ``first``
        threads.flush_denormals(not first)
        assert (_all_denormal if first else _all_zero)(_blas_half(2))


@x86
def test_every_thread_of_numbas_pool_is_set_and_the_count_restored():
    numba.set_num_threads(1)  # the pool's other threads are idle, yet get set
    threads.flush_denormals(True)
    assert numba.get_num_threads() == 1
    old = cpu.set_ftz_daz_pool(cpu.MXCSR_FTZ_DAZ)  # what they hold now
    assert old.shape == (numba.config.NUMBA_NUM_THREADS,)
    assert np.all(old & cpu.MXCSR_FTZ_DAZ == cpu.MXCSR_FTZ_DAZ)
    threads.flush_denormals(False)
    assert np.all(cpu.set_ftz_daz_pool(0) & cpu.MXCSR_FTZ_DAZ == 0)


@x86
def test_the_context_manager_restores_the_previous_setting():
    threads.flush_denormals(False)
    with threads.denormals_flushed():
        assert threads.denormals_are_flushed()
        assert _all_zero(_numba_half(3 << 14)) and _all_zero(_blas_half())
        with threads.denormals_flushed(False):  # nested: keep inside flush
            assert not threads.denormals_are_flushed()
            assert _all_denormal(_numba_half(3 << 14)) and _all_denormal(_blas_half())
        assert threads.denormals_are_flushed() and _all_zero(_numba_half(3 << 14))
    assert not threads.denormals_are_flushed()
    assert _all_denormal(_numpy_half()) and _all_denormal(_numba_half(3 << 14))
    assert _all_denormal(_blas_half())
    with pytest.raises(KeyError):  # and on an error
        with threads.denormals_flushed():
            raise KeyError
    assert not threads.denormals_are_flushed()


@x86
def test_other_mxcsr_bits_are_left_alone():
    before = cpu.mxcsr()
    threads.flush_denormals(True)
    assert cpu.mxcsr() & ~cpu.MXCSR_FTZ_DAZ == before & ~cpu.MXCSR_FTZ_DAZ
    threads.flush_denormals(False)
    assert cpu.mxcsr() & cpu.MXCSR_FTZ_DAZ == 0


def test_a_no_op_where_the_machine_is_not_x86(monkeypatch):
    monkeypatch.setattr(cpu, "X86_64", False)
    assert threads.flush_denormals(True) is False
    assert not threads.denormals_are_flushed()
    with threads.denormals_flushed():
        assert not threads.denormals_are_flushed()
    assert cpu.set_ftz_daz(cpu.MXCSR_FTZ_DAZ) == 0 and cpu.set_ftz_daz_pool(0).size == 0


def test_restarting_drops_the_layer_pipelines_threads():
    from slimnp import threaded_lstm

    threaded_lstm._executor(1).submit(int).result()
    threads.restart_worker_threads()
    assert threaded_lstm._pool is None


def test_the_train_option():
    o = option("denormals")
    assert o.flag == "--denormals" and o.feeds == "run" and o.default == "flush"
    assert complete({})["denormals"] == "flush"
    assert complete({"denormals": "keep"})["denormals"] == "keep"
    assert check_value(o, "keep") is None and check_value(o, "flush") is None
    assert "is not one of 'flush', 'keep'" in check_value(o, "sometimes")
    assert to_argv({"denormals": "keep"}) == ["--denormals", "keep"]
    from slimnp.runs import _RESUME_FIXED

    assert "denormals" not in _RESUME_FIXED  # a run option: --resume may change it



@x86
@pytest.mark.parametrize("command", ["evaluate", "score", "generate", "rerank", "compress"])
def test_scoring_commands_flush_while_they_run(command, monkeypatch, tmp_path):
    """``slimnp evaluate/score/generate/rerank/compress --denormals``: the command's
    work runs flushed by default and keeping with ``keep``, and the process
    gets its own setting back (CliRunner runs in this process)."""
    from click.testing import CliRunner

    from slimnp import cli, compress, evaluate

    seen = []

    def work(*args, **kwargs):  # stands in for loading and scoring the model
        seen.append(threads.denormals_are_flushed())
        raise cli.click.ClickException("probe")

    monkeypatch.setattr(cli, "_load_lm", work)
    monkeypatch.setattr(evaluate, "evaluate_file", work)
    monkeypatch.setattr(compress, "compress_file", work)
    text = tmp_path / "text.txt"
    text.write_text("a b\n")
    args = {"evaluate": ["m.h5", str(text)], "score": ["m.h5", str(text)], "generate": ["m.h5"],
            "rerank": ["m.h5", str(text)], "compress": [str(text), "--out", "o.h5", "--input-k", "2",
                                                        "--input-ratio", "0.5"]}[command]
    threads.flush_denormals(False)
    for flag in ([], ["--denormals", "keep"], ["--denormals", "flush"]):
        res = CliRunner().invoke(cli.main, [command, *args, *flag])
        assert res.exit_code == 1 and "probe" in res.output, res.output
        assert not threads.denormals_are_flushed()
    assert seen == [True, False, True]
    assert "--denormals [flush|keep]" in CliRunner().invoke(cli.main, [command, "--help"]).output
