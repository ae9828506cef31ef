"""Learned assignment: the k-means kernel, k-means, dense -> slim compression,
and fine-tuning a compressed model (`slimnp compress`, `train --init-from`)."""
import json

import numpy as np
import pytest
from click.testing import CliRunner

from slimnp import kernels
from slimnp.backend import make_rng
from slimnp.cli import main
from slimnp.compress import CoarseIndex, compress_model, kmeans, nearest, nearest_ivf
from slimnp.evaluate import evaluate_ids
from slimnp.model import LanguageModel, ModelConfig
from slimnp.modelfile import load_model

from helpers import tiny_corpus


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("b,k", [(1, 1), (1, 7), (37, 1), (300, 50), (64, 2048)])
def test_nearest_centroid_kernel_matches_reference(backend, dtype, b, k):
    """Every backend (the GPU's dispatch goes to the reference) finds the
    argmin of the float64 values, ties to the first index."""
    rng = np.random.default_rng(b * 1000 + k)
    scores = rng.standard_normal((b, k)).astype(dtype)
    c_sq = rng.random(k).astype(dtype)
    if k > 3:  # exact ties: the first index wins
        scores[:, 3] = scores[:, 1]
        c_sq[3] = c_sq[1]
    labels, d2 = backend.put(np.full(b, -1, np.int32)), backend.put(np.full(b, np.nan))
    kernels.nearest_centroid(backend.put(scores), backend.put(c_sq), labels, d2)
    labels, d2 = backend.get(labels), backend.get(d2)
    t = c_sq[None, :].astype(np.float64) - 2 * scores.astype(np.float64)
    np.testing.assert_array_equal(labels, t.argmin(axis=1))
    np.testing.assert_array_equal(d2, t[np.arange(b), labels])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("b,L,n", [(1, 1, 1), (1, 7, 7), (37, 20, 1), (300, 50, 8), (64, 400, 16)])
def test_nearest_lists_kernel_matches_reference(backend, dtype, b, L, n):
    """The n smallest of each row, smallest first, ties to the lower index."""
    rng = np.random.default_rng(b * 1000 + L)
    scores = rng.standard_normal((b, L)).astype(dtype)
    q_sq = rng.random(L).astype(dtype)
    if L > 3:
        scores[:, 3] = scores[:, 1]
        q_sq[3] = q_sq[1]
    out = backend.put(np.full((b, n), -1, np.int32))
    kernels.nearest_lists(backend.put(scores), backend.put(q_sq), out)
    t = q_sq[None, :].astype(np.float64) - 2 * scores.astype(np.float64)
    np.testing.assert_array_equal(backend.get(out), np.argsort(t, axis=1, kind="stable")[:, :n])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n,d,k", [(1, 3, 1), (50, 4, 7), (3000, 33, 40)])
def test_cluster_sums_kernel_matches_reference(dtype, n, d, k):
    """Each cluster's rows summed in float64 in ascending row order: exactly
    np.add.at's sums, both compiled variants; an empty cluster sums to 0."""
    from slimnp.kernels import cpu, reference

    rng = np.random.default_rng(n + k)
    X = rng.standard_normal((n, d)).astype(dtype)
    labels = rng.integers(0, max(1, k - 1), n).astype(np.int32)  # cluster k - 1 left empty
    want = np.full((k, d), np.nan)
    reference.cluster_sums(X, labels, want)
    got = np.full((k, d), np.nan)
    kernels.cluster_sums(X, labels, got)
    np.testing.assert_array_equal(got, want)
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(k + 1)).astype(np.int64)
    for fn in (cpu._cluster_sums_serial, cpu._cluster_sums_parallel):
        got = np.full((k, d), np.nan)
        fn(X, order, bounds, got)
        np.testing.assert_array_equal(got, want)
    with pytest.raises(IndexError):
        kernels.cluster_sums(X, np.full(n, k, np.int32), np.empty((k, d)))
    with pytest.raises(ValueError, match="float64"):
        kernels.cluster_sums(X, labels, np.empty((k, d), np.float32))


def test_nearest_lists_rejects_bad_arguments():
    s = np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError, match="1 <= n <= 4"):
        kernels.nearest_lists(s, np.zeros(4, np.float32), np.zeros((3, 5), np.int32))
    with pytest.raises(TypeError, match="int32"):
        kernels.nearest_lists(s, np.zeros(4, np.float32), np.zeros((3, 2), np.int64))


def test_nearest_centroid_rejects_bad_arguments():
    s = np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError, match="c_sq"):
        kernels.nearest_centroid(s, np.zeros(5, np.float32), np.zeros(3, np.int32), np.zeros(3))
    with pytest.raises(TypeError, match="int32"):
        kernels.nearest_centroid(s, np.zeros(4, np.float32), np.zeros(3, np.int64), np.zeros(3))


def test_nearest_is_the_exact_nearest_centroid():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((500, 6)).astype(np.float32)
    C = rng.standard_normal((40, 6)).astype(np.float32)
    labels, d2 = nearest(X, C, block=64)
    full = ((X[:, None, :].astype(np.float64) - C[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(labels, full.argmin(1))
    np.testing.assert_allclose(d2, full.min(1), rtol=1e-4, atol=1e-4)


def _blobs(rng, k=12, per=40, d=5, spread=0.05):
    centres = rng.standard_normal((k, d)) * 5
    X = np.concatenate([c + spread * rng.standard_normal((per, d)) for c in centres])
    truth = np.repeat(np.arange(k), per)
    perm = rng.permutation(len(X))
    return X[perm].astype(np.float32), truth[perm]


def _same_partition(a, b):
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def test_kmeans_recovers_separated_clusters_and_is_seeded():
    X, truth = _blobs(np.random.default_rng(1))
    r = kmeans(X, 12, seed=3)
    assert r.seeding == "k-means++" and _same_partition(r.labels, truth)
    again = kmeans(X, 12, seed=3)
    np.testing.assert_array_equal(r.centroids, again.centroids)
    np.testing.assert_array_equal(r.labels, again.labels)
    # fitted on a sample, then one pass over every point: still the partition
    s = kmeans(X, 12, seed=3, sample=200)
    assert s.sample == 200 and _same_partition(s.labels, truth)
    # uniform seeding when k-means++ would cost too much: still a local optimum
    u = kmeans(X, 12, seed=3, pp_budget=0)
    assert u.seeding == "uniform" and u.inertia >= r.inertia * (1 - 1e-6)


def test_kmeans_repairs_empty_clusters():
    """Duplicated points and k close to the number of distinct points: every
    cluster ends non-empty (a repair re-seeds empty ones)."""
    rng = np.random.default_rng(0)
    base = rng.standard_normal((20, 3)).astype(np.float32)
    X = np.repeat(base, 5, axis=0)
    r = kmeans(X, 20, seed=0, pp_budget=0)  # uniform seeds: duplicates collide
    assert np.bincount(r.labels, minlength=20).min() > 0
    assert r.inertia < 1e-4  # every point on its centroid, up to float32 rounding


def _dense_model(V=40, H=8, seed=0):
    m = LanguageModel(ModelConfig(vocab_size=V, hidden=H, layers=1, init_scale=0.5))
    m.init_params(make_rng(seed))
    return m


def test_compress_at_full_size_is_lossless():
    """M/K = V and M = K V: every slice can keep its own centroid, so the
    compressed model computes the dense model's logits."""
    m = _dense_model()
    slim, rep = compress_model(m, np.ones(40), input_k=2, input_ratio=1.0, output_k=2,
                               output_ratio=1.0)
    assert slim.config.mapping == "learned" and rep["output"]["distortion"] < 1e-6
    x = np.arange(12, dtype=np.int32).reshape(4, 3)
    np.testing.assert_allclose(slim.logits(x, slim.zero_state(3))[0], m.logits(x, m.zero_state(3))[0],
                               rtol=1e-5, atol=1e-5)


def test_compress_shows_progress_per_pool(capsys):
    m = _dense_model()
    compress_model(m, np.ones(40), input_k=2, input_ratio=0.5, output_k=2, output_ratio=0.5,
                   progress=True)
    err = capsys.readouterr().err
    assert "output k-means [" in err and "pool 1/2, iteration 1" in err, err
    assert "input k-means [" in err and "iteration 1" in err, err
    compress_model(m, np.ones(40), output_k=2, output_ratio=0.5)  # the library default: silent
    assert capsys.readouterr().err == ""


def test_frequent_words_keep_exact_vectors():
    m = _dense_model()
    counts = np.arange(40)[::-1] + 1  # word 0 the most frequent
    slim, rep = compress_model(m, counts, input_k=4, input_ratio=0.15, output_k=4, output_ratio=0.15,
                               frequent=5)
    c = slim.config
    assert c.output_m == 4 * (6 + 5) and c.input_m == 24 + 5 * 4
    assert rep["frequent"] == 5 and rep["frequent_token_share"] == pytest.approx(
        counts[:5].sum() / counts.sum())
    W = m.store.params["output/W"]
    A = slim.store.params["output/A"]
    idx = slim.mapping["output/idx"]
    rebuilt = np.concatenate([A[k][idx[:, k]] for k in range(4)], axis=1)
    np.testing.assert_array_equal(rebuilt[:5], W[:5])
    assert not np.allclose(rebuilt[5:], W[5:])  # the rest is quantised
    E = m.store.params["embedding/W"]
    pool = slim.store.params["embedding/A"]
    np.testing.assert_array_equal(pool[slim.mapping["input/idx"][:5]].reshape(5, -1), E[:5])
    np.testing.assert_array_equal(slim.store.params["lstm0/Wx"], m.store.params["lstm0/Wx"])
    np.testing.assert_array_equal(slim.store.params["output/b"], m.store.params["output/b"])


@pytest.mark.slow
def test_compress_cli_then_fine_tune(tmp_path):
    files, _ = tiny_corpus(tmp_path, tokens=8000)
    d = tmp_path / "dense.h5"
    run = CliRunner().invoke
    r = run(main, ["train", "--train", str(files["train"]), "--valid", str(files["valid"]),
                   "--hidden", "16", "--layers", "1", "--epochs", "2", "-q", "--out", str(d)])
    assert r.exit_code == 0, r.output
    s = tmp_path / "slim.h5"
    r = run(main, ["compress", str(d), "--out", str(s), "--input-k", "4", "--input-ratio", "0.25",
                   "--output-k", "4", "--output-ratio", "0.25", "--frequent", "3",
                   "--valid", str(files["valid"]), "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output.strip().splitlines()[-1])
    assert rep["valid_ppl_after"] < 1.5 * rep["valid_ppl_before"]
    model, vocab, ck = load_model(s)
    assert model.config.mapping == "learned" and ck.mapping_attrs["kind"] == "learned"
    assert len(ck.mapping_attrs["source_sha256"]) == 64
    ins = run(main, ["inspect", str(s)])
    assert "learned" in ins.output and "source_sha256" in ins.output
    assert ck.mapping_attrs["output_search"] == "exact" and "output_search" in ins.output
    valid_ids = vocab.encode_file(files["valid"]).ids
    before = evaluate_ids(model, valid_ids, vocab.eos_id, batch_size=10).perplexity
    assert before == pytest.approx(rep["valid_ppl_after"], rel=1e-6)
    # fine-tuning: the file's model, a fresh schedule; valid perplexity drops
    f = tmp_path / "ft.h5"
    r = run(main, ["train", "--init-from", str(s), "--train", str(files["train"]), "--valid",
                   str(files["valid"]), "--epochs", "1", "--lr", "0.5", "-q", "--out", str(f), "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output.strip().splitlines()[-1])
    assert summary["best_valid_ppl"] < before
    tuned, _, ck2 = load_model(f)
    assert tuned.config == model.config and ck2.config["data"]["init_from_sha256"]
    # model options cannot be changed
    r = run(main, ["train", "--init-from", str(s), "--train", str(files["train"]), "--valid",
                   str(files["valid"]), "--hidden", "8", "--out", str(tmp_path / "x.h5")])
    assert r.exit_code == 2 and "--hidden cannot be given" in r.output


def test_kmeans_objective_never_increases():
    rng = np.random.default_rng(5)
    X = rng.standard_normal((3000, 4)).astype(np.float32)  # no structure: many iterations
    for seeding_budget in (2e9, 0):
        r = kmeans(X, 60, seed=1, iters=40, tol=0, pp_budget=seeding_budget)
        assert len(r.history) == r.iterations > 5
        assert all(b <= a * (1 + 1e-6) for a, b in zip(r.history, r.history[1:])), r.history


def test_kmeans_objective_never_increases_with_the_approximate_search():
    rng = np.random.default_rng(5)
    X = rng.standard_normal((3000, 8)).astype(np.float32)
    r = kmeans(X, 100, seed=1, iters=30, tol=0, exact_budget=0, nprobe=2)
    assert r.search == "ivf(10, 2)" and len(r.history) == r.iterations > 5
    assert all(b <= a * (1 + 1e-6) for a, b in zip(r.history, r.history[1:])), r.history


def _clustered(n=20000, d=16, centres=800, seed=0):
    rng = np.random.default_rng(seed)
    T = rng.standard_normal((centres, d)).astype(np.float32)
    return (T[rng.integers(centres, size=n)] + 0.3 * rng.standard_normal((n, d))).astype(np.float32), rng


def test_ivf_search_probing_every_list_is_exact():
    X, rng = _clustered()
    C = X[rng.choice(len(X), 400, replace=False)]
    index = CoarseIndex(C, seed=2)
    assert index.lists == 20 and index.start[-1] == 400
    assert np.array_equal(np.sort(index.order), np.arange(400))  # every centroid in one list
    le, de = nearest(X, C)
    li, di = nearest_ivf(X, C, nprobe=20, index=index, block=1000)
    assert np.array_equal(li, le)
    np.testing.assert_allclose(di, de, rtol=1e-5, atol=1e-4)


def test_ivf_search_is_close_and_never_worse_than_the_previous_labels():
    X, rng = _clustered()
    C = X[rng.choice(len(X), 400, replace=False)]
    le, de = nearest(X, C)
    li, di = nearest_ivf(X, C, nprobe=4, seed=1)  # 4 of 20 lists: a fifth of the flops
    assert (li == le).mean() > 0.8 and di.sum() <= 1.05 * de.sum()  # measured 0.88, 1.03
    np.testing.assert_allclose(di, ((X - C[li]) ** 2).sum(axis=1), rtol=1e-4, atol=1e-3)
    # with the exact labels as the previous ones, the search cannot lose them
    lp, dp = nearest_ivf(X, C, nprobe=1, seed=1, previous=le)
    assert np.array_equal(lp, le)
    again = nearest_ivf(X, C, nprobe=4, seed=1)
    assert np.array_equal(again[0], li)  # seeded


def test_kmeans_switches_to_the_ivf_search_above_its_budget():
    X, _ = _clustered()
    exact = kmeans(X, 400, seed=0, iters=10)
    approx = kmeans(X, 400, seed=0, iters=10, exact_budget=1e6)
    assert exact.search == "exact" and approx.search == "ivf(20, 8)"
    assert approx.inertia <= 1.03 * exact.inertia


def _codebook_model(V=60, H=8, K=2, Mk=5, M_in=7, seed=0):
    """A dense model whose output rows are concatenations of K codewords
    (Mk per position) and whose input slices come from M_in codewords."""
    rng = np.random.default_rng(seed)
    m = _dense_model(V=V, H=H, seed=seed)
    d = H // K
    books = rng.standard_normal((K, Mk, d)).astype(np.float32) * 2
    pick = np.stack([rng.permutation(np.arange(V) % Mk) for _ in range(K)], axis=1)  # every codeword used
    m.store.params["output/W"][...] = np.concatenate([books[k][pick[:, k]] for k in range(K)], axis=1)
    pool = rng.standard_normal((M_in, d)).astype(np.float32) * 2
    sub = (np.arange(V * K) % M_in)[rng.permutation(V * K)].reshape(V, K)
    m.store.params["embedding/W"][...] = pool[sub].reshape(V, H)
    return m, books, pool


def test_compress_recovers_exact_codewords_and_keeps_the_perplexity():
    V, K, Mk, M_in = 60, 2, 5, 7
    m, books, pool = _codebook_model(V=V, K=K, Mk=Mk, M_in=M_in)
    slim, rep = compress_model(m, np.ones(V), input_k=K, input_ratio=M_in / (K * V), output_k=K,
                               output_ratio=Mk / V)
    assert slim.config.output_m == K * Mk and slim.config.input_m == M_in
    assert rep["output"]["distortion"] < 1e-6 and rep["input"]["distortion"] < 1e-6
    for k in range(K):  # the same codewords, in some order
        got = np.sort(slim.store.params["output/A"][k], axis=0)
        np.testing.assert_allclose(got, np.sort(books[k], axis=0), atol=1e-5)
    np.testing.assert_allclose(np.sort(slim.store.params["embedding/A"], axis=0), np.sort(pool, axis=0),
                               atol=1e-5)
    ids = np.random.default_rng(0).integers(0, V, 400).astype(np.int32)
    ppl_dense = evaluate_ids(m, ids, 0, batch_size=4).perplexity
    ppl_slim = evaluate_ids(slim, ids, 0, batch_size=4).perplexity
    assert ppl_slim == pytest.approx(ppl_dense, rel=1e-5)


def test_compress_rejects_bad_input():
    m = _dense_model(V=40, H=8)
    with pytest.raises(ValueError, match="--output-k 3 must divide the hidden size 8"):
        compress_model(m, np.ones(40), output_k=3, output_ratio=0.5)
    with pytest.raises(ValueError, match="fewer than the 10 private ones --frequent 10"):
        compress_model(m, np.ones(40), output_k=2, output_ratio=0.1, frequent=10)
    with pytest.raises(ValueError, match="raise the ratio or lower --frequent"):
        compress_model(m, np.ones(40), input_k=4, input_ratio=0.05, frequent=3)
    slim, _ = compress_model(m, np.ones(40), output_k=2, output_ratio=0.5)
    with pytest.raises(ValueError, match="dense, untied model"):
        compress_model(slim, np.ones(40), output_k=2, output_ratio=0.5)


def test_compress_cli_errors_are_one_line(tmp_path):
    from slimnp import io as sio
    from slimnp.modelfile import mapping_fields

    m = _dense_model(V=40, H=8)
    path = tmp_path / "d.h5"
    sio.save(path, sio.Checkpoint(config={"model": m.config.to_dict()},
                                  vocab=["<eos>", "<unk>"] + [f"w{i}" for i in range(38)],
                                  params=m.params_numpy(), **mapping_fields(m)))
    for args, words in ((["--output-k", "3", "--output-ratio", "0.5"], "must divide"),
                        (["--output-k", "2", "--output-ratio", "0.1", "--frequent", "10"], "--frequent 10")):
        r = CliRunner().invoke(main, ["compress", str(path), "--out", str(tmp_path / "s.h5"), *args])
        lines = [ln for ln in r.output.splitlines() if ln.strip()]
        assert r.exit_code == 1 and len(lines) == 1 and words in lines[0], r.output
    assert not (tmp_path / "s.h5").exists()
    # an --out folder that does not exist: said before any k-means, as train says it
    bad = tmp_path / "nope" / "s.h5"
    r = CliRunner().invoke(main, ["compress", str(path), "--out", str(bad), "--output-k", "2",
                                  "--output-ratio", "0.5"])
    assert r.exit_code == 1 and r.output.strip() == (
        f"Error: cannot write {bad} (--out): folder {bad.parent} does not exist; "
        "create it first (nothing was done)"), r.output


def test_learned_model_trains_on_the_gpu_kernels_like_the_cpu(monkeypatch):
    """A compressed (learned-table) model: training steps through every GPU
    kernel (the CUDA C run by the CPU emulator) equal the NumPy reference's."""
    import gpu_emu
    from slimnp.kernels import gpu

    if gpu_emu.load() is None:
        pytest.skip(gpu_emu.why_unavailable())
    from test_gpu import _train_steps

    monkeypatch.setenv("SLIMNP_PIPELINE", "0")
    dense = LanguageModel(ModelConfig(vocab_size=25, hidden=8, layers=2, dtype="float64", dropout=0.2))
    dense.init_params(make_rng(0))
    slim, _ = compress_model(dense, np.arange(25)[::-1] + 1, input_k=2, input_ratio=0.3, output_k=4,
                             output_ratio=0.2, frequent=2)
    tables = slim.mapping

    def fresh():
        return LanguageModel(slim.config, mapping=tables)

    with kernels.using("reference"):
        want = _train_steps(fresh(), "softmax", "adagrad")
    monkeypatch.setattr(gpu, "_factory", gpu_emu.factory)
    with kernels.using("gpu"):
        got = _train_steps(fresh(), "softmax", "adagrad")
    for (n1, g1, gr1, ds1, p1), (n2, g2, gr2, ds2, p2) in zip(got, want):
        assert n1 == pytest.approx(n2, rel=1e-8)
        np.testing.assert_allclose(gr1, gr2, rtol=1e-9, atol=1e-11)
        np.testing.assert_allclose(p1, p2, rtol=1e-9, atol=1e-11)
