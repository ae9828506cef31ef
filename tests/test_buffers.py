"""slimnp.buffers: every parameter in one flat buffer and every gradient in
another, handed out as views; gradients that add or overwrite; scratch
arrays kept per name.

(The model's parameters living in the store, and its lazily zeroed,
row-tracked step equal to the plain one, are tested in test_model.py.)
"""
import numpy as np
import pytest

from slimnp.buffers import ParamStore, Workspace
from slimnp.optim import global_norm

SHAPES = {"emb": (5, 3), "lstm0/b": (8,), "out/A": (2, 3, 2)}


def _store(dtype=np.float32):
    store = ParamStore(np, dtype)
    for name, shape in SHAPES.items():
        store.add(name, shape)
    store.allocate()
    return store


def test_params_and_grads_are_views_of_two_flat_buffers_in_the_order_added():
    store = _store(np.float64)
    n = 15 + 8 + 12
    assert store.size == n and store.data.shape == store.grad.shape == (n,)
    assert store.data.dtype == store.grad.dtype == np.float64
    store.data[:] = np.arange(n)
    store.grad[:] = -np.arange(n)
    off = 0
    for name, shape in SHAPES.items():
        size = int(np.prod(shape))
        p, g = store.params[name], store.grads[name]
        assert p.shape == g.shape == shape and store[name] is p
        np.testing.assert_array_equal(p.ravel(), np.arange(off, off + size))
        np.testing.assert_array_equal(g.ravel(), -np.arange(off, off + size))
        off += size
    # writes through a view land in the flat buffer (what an update, a clip
    # or an all-reduce of store.data / store.grad relies on)
    store.params["out/A"][1, 2, 1] = 100.0
    store.grads["emb"][0, 0] = 7.0
    assert store.data[-1] == 100.0 and store.grad[0] == 7.0
    # the optimizer walks one dense span: consecutive dense parameters merge
    assert store.segments() == [("dense", 0, n)]


def test_names_are_added_once_and_before_allocate():
    store = ParamStore()
    store.add("w", (2, 2))
    with pytest.raises(ValueError, match="duplicate parameter name 'w'"):
        store.add("w", (3,))
    store.allocate()
    with pytest.raises(RuntimeError, match="after allocate"):
        store.add("v", (1,))


def test_accumulate_adds_unless_the_gradient_is_lazily_zero(rng):
    store = _store(np.float64)
    a, v, x = rng.standard_normal((8, 4)), rng.standard_normal(4), rng.standard_normal(8)
    # eager: every call adds, with or without the product
    store.zero_grad()
    store.accumulate("lstm0/b", x)
    store.accumulate("lstm0/b", a, v)
    np.testing.assert_allclose(store.grads["lstm0/b"], x + a @ v, rtol=1e-14)
    # lazy: the product is written straight into the gradient
    store.zero_grad(lazy=True)
    store.accumulate("lstm0/b", a, v)
    np.testing.assert_allclose(store.grads["lstm0/b"], a @ v, rtol=1e-14)
    # lazy: the first write overwrites what an earlier step left, the next adds
    store.grad[:] = 9.0
    store.zero_grad(lazy=True)
    store.accumulate("lstm0/b", x)
    store.accumulate("lstm0/b", x)
    np.testing.assert_array_equal(store.grads["lstm0/b"], 2 * x)
    # grad_view (a scatter's target) zeroes a pending gradient first
    g = store.grad_view("emb")
    assert np.all(g == 0) and g is store.grads["emb"]
    g[1] += 1.0
    store.settle_grad()  # "out/A": nobody wrote it this step
    assert np.all(store.grads["out/A"] == 0) and store.grads["emb"].sum() == 3.0
    np.testing.assert_array_equal(store.grads["lstm0/b"], 2 * x)


def test_lazy_zero_and_row_tracking():
    store = ParamStore()
    store.add("emb", (10, 3))
    store.add("w", (3, 2))
    store.allocate()
    store.grad[:] = 7  # stale values from an earlier step
    store.zero_grad(lazy=True)
    g = store.grad_rows("emb", np.array([2, 5]))
    g[[2, 5]] += 1
    a, b = np.ones((3, 4), np.float32), np.ones((4, 2), np.float32)
    store.accumulate("w", a, b)  # written, not added to the stale 7s
    store.settle_grad()
    assert np.all(store.grads["w"] == 4)
    np.testing.assert_array_equal(store.grads["emb"].sum(axis=1), [0, 0, 3, 0, 0, 3, 0, 0, 0, 0])
    assert [s[0] for s in store.segments()] == ["rows", "dense"]
    # next step: only rows 2 and 5 needed clearing; a second scatter unions rows
    store.zero_grad(lazy=True)
    store.grad_rows("emb", np.array([1]))[1] += 1
    store.grad_rows("emb", np.array([9]))[9] += 1
    store.settle_grad()
    np.testing.assert_array_equal(store.grads["emb"].sum(axis=1), [0, 3, 0, 0, 0, 0, 0, 0, 0, 3])
    np.testing.assert_array_equal(store.segments()[0][3], [1, 9])
    assert np.all(store.grads["w"] == 0)  # settled: nobody wrote it this step
    assert global_norm(store.grad, store.segments()) == pytest.approx(np.sqrt(6))


def test_a_dense_write_ends_row_tracking():
    """After ``grad_rows`` the optimizer visits only the rows touched; a dense
    ``accumulate`` into the same gradient makes it dense again (non-zero
    anywhere), and the spans merge back into one."""
    store = _store()
    store.zero_grad(lazy=True)
    store.grad_rows("emb", np.array([1, 3]))[[1, 3]] += 1
    store.settle_grad()
    segs = store.segments()
    assert segs[0][:3] == ("rows", 0, (5, 3)) and list(segs[0][3]) == [1, 3]
    assert segs[1:] == [("dense", 15, 20)]
    store.accumulate("emb", np.ones((5, 3), np.float32))
    assert store.segments() == [("dense", 0, 35)]
    np.testing.assert_array_equal(store.grads["emb"].sum(axis=1), [3, 6, 3, 6, 3])


def test_workspace_keeps_one_buffer_per_name_shape_and_dtype():
    ws = Workspace()
    a = ws.get("logits", (4, 5), np.float32)
    assert a.shape == (4, 5) and a.dtype == np.float32
    assert ws.get("logits", [4, 5], np.float32) is a  # shapes compared as tuples
    b = ws.get("dh", (4, 5), np.float32)
    assert b is not a and not np.shares_memory(a, b)  # one buffer per name
    c = ws.get("logits", (4, 5), np.float64)
    assert c.dtype == np.float64 and c is not a  # a new dtype: a new buffer
    assert ws.get("logits", (4, 5), np.float64) is c


def test_workspace_reuses_buffers():
    ws = Workspace()
    a = ws.get("x", (4, 5), np.float32)
    assert ws.get("x", (4, 5), np.float32) is a
    assert ws.get("x", (4, 6), np.float32).shape == (4, 6)
