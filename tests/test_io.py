"""Tests for slimnp.io: the HDF5 model/checkpoint format."""

import json
import os

import h5py
import numpy as np
import pytest

from slimnp import io
from slimnp.io import Checkpoint, FormatError


def _make_ckpt(hidden=4, vocab_size=6, seed=0):
    rng = np.random.default_rng(seed)
    V, H, K = vocab_size, hidden, 3
    vocab = ["<unk>", "<eos>", "naïve", "日本", "the", "über"][:V]
    params = {
        "embedding/W": rng.standard_normal((V, H)).astype(np.float32),
        "lstm0/Wx": rng.standard_normal((H, 4 * H)).astype(np.float32),
        "lstm0/Wh": rng.standard_normal((H, 4 * H)).astype(np.float32),
        "lstm0/b": rng.standard_normal(4 * H),  # float64 on purpose
        "output/W": rng.standard_normal((H, V)).astype(np.float32),
        "output/b": np.zeros(V, np.float32),
    }
    gen = np.random.default_rng(1234)
    gen.standard_normal(7)  # advance so the state is not the seed state
    return Checkpoint(
        config={"hidden": H, "layers": 1, "vocab_size": V, "slim": {"K": K, "shared": True}, "lr": 0.5},
        vocab=vocab,
        params=params,
        mapping={
            "input/idx": rng.integers(0, 200, size=(V, K)).astype(np.int64),
            "output/idx": rng.integers(0, 60000, size=(V, K)).astype(np.int64),
            "signed": np.array([-3, 5, 100], dtype=np.int64),
        },
        mapping_attrs={"hash_seed": 42, "hash_name": "murmur3"},
        optimizer={
            "name": "adagrad",
            "lr": 0.1,
            "step": 17,
            "nesterov": False,
            "accum": {k: np.full(v.shape, 0.25, v.dtype) for k, v in params.items()},
            "history": [1.5, 2.5],
        },
        train_state={
            "epoch": 3,
            "done": True,
            "best_ppl": 123.456,
            "hidden/h0": rng.standard_normal((2, H)).astype(np.float32),
            "rng": gen.bit_generator.state,
            "nested": {"a": {"b": [1, 2, {"c": None}]}, "big": 2**100 + 1},
            "huge": 2**70,
        },
        vocab_counts=np.array([0, 10, 3, 2, 100, 1], dtype=np.int64)[:V],
    )


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "model.h5"
    ckpt = _make_ckpt()
    io.save(path, ckpt)
    return path, ckpt


def _assert_tree_equal(a, b):
    assert set(a) == set(b)
    for key in a:
        if isinstance(a[key], np.ndarray):
            assert isinstance(b[key], np.ndarray)
            assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape
            assert a[key].tobytes() == b[key].tobytes()
        elif isinstance(a[key], dict) and any(isinstance(v, np.ndarray) for v in a[key].values()):
            _assert_tree_equal(a[key], b[key])
        else:
            assert a[key] == b[key] and type(a[key]) is type(b[key]), key


def test_round_trip_exact(model_file):
    path, ckpt = model_file
    got = io.load(path)
    assert got.config == ckpt.config
    assert got.vocab == ckpt.vocab and all(type(w) is str for w in got.vocab)
    assert np.array_equal(got.vocab_counts, ckpt.vocab_counts) and got.vocab_counts.dtype == np.int64
    _assert_tree_equal(ckpt.params, got.params)
    assert got.params["lstm0/b"].dtype == np.float64
    assert got.params["lstm0/Wx"].dtype == np.float32
    _assert_tree_equal(ckpt.mapping, got.mapping)
    assert got.mapping_attrs == ckpt.mapping_attrs
    _assert_tree_equal(ckpt.optimizer, got.optimizer)
    _assert_tree_equal(ckpt.train_state, got.train_state)
    assert got.train_state["done"] is True and got.optimizer["nesterov"] is False
    assert got.attrs["format"] == "slimnp" and got.attrs["format_version"] == 1
    assert got.attrs["slimnp_version"] and got.attrs["created"]


def test_loaded_arrays_are_in_memory(model_file):
    path, _ = model_file
    got = io.load(path)
    for arr in list(got.params.values()) + list(got.mapping.values()):
        assert type(arr) is np.ndarray
    # The file is closed, yet the arrays are still usable.
    assert float(got.params["embedding/W"].sum()) == pytest.approx(float(got.params["embedding/W"].sum()))


def test_generator_state_round_trip(tmp_path):
    gen = np.random.default_rng(2024)
    gen.random(5)
    ckpt = Checkpoint(config={}, vocab=[], params={}, train_state={"rng": gen.bit_generator.state})
    io.save(tmp_path / "g.h5", ckpt)
    expected = gen.random(10)
    restored = np.random.default_rng()
    restored.bit_generator.state = io.load(tmp_path / "g.h5").train_state["rng"]
    assert np.array_equal(restored.random(10), expected)


def test_file_layout_and_shrunk_mapping(model_file):
    path, ckpt = model_file
    with h5py.File(path, "r") as f:
        assert f.attrs["format"] == "slimnp"
        assert int(f.attrs["format_version"]) == 1
        assert json.loads(f.attrs["config"]) == ckpt.config
        assert f["/params/lstm0/Wx"].shape == (4, 16)
        assert f["/params/lstm0/Wx"].compression is None
        assert h5py.check_string_dtype(f["vocab"].dtype).encoding == "utf-8"
        assert f["vocab"].asstr()[2] == "naïve"
        assert f["/mapping/input/idx"].dtype == np.uint8
        assert f["/mapping/output/idx"].dtype == np.uint16
        assert f["/mapping/signed"].dtype == np.int8
        assert f["/mapping/input/idx"].attrs["orig_dtype"] == np.dtype(np.int64).str
        assert f["mapping"].attrs["hash_name"] == "murmur3"
        assert isinstance(f["train_state"].attrs["rng"], str)  # JSON text
    got = io.load(path)
    assert got.mapping["input/idx"].dtype == np.int64
    assert got.mapping["signed"].tolist() == [-3, 5, 100]


def test_partial_load(model_file):
    path, ckpt = model_file
    got = io.load(path, params=False, optimizer=False, train_state=False)
    assert got.params == {} and got.mapping == {} and got.optimizer == {} and got.train_state == {}
    assert got.vocab == ckpt.vocab and got.config == ckpt.config
    assert got.mapping_attrs == ckpt.mapping_attrs
    assert io.read_config(path) == ckpt.config


def test_expected_shapes_ok_dict_and_callable(model_file):
    path, ckpt = model_file
    shapes = {k: v.shape for k, v in ckpt.params.items()}
    got = io.load(path, expected_shapes=shapes)
    assert got.params.keys() == ckpt.params.keys()
    assert all(np.array_equal(got.params[k], v) for k, v in ckpt.params.items())
    seen = []

    def spec(cfg):  # given the stored config, lists for shapes
        seen.append(cfg)
        return {k: list(v) for k, v in shapes.items()}

    got = io.load(path, expected_shapes=spec, params=False)
    assert seen == [ckpt.config] and got.params == {}
    with pytest.raises(FormatError, match="lstm0/b"):  # the callable's answer is what is checked
        io.load(path, expected_shapes=lambda cfg: dict(spec(cfg), **{"lstm0/b": [3]}))


def test_expected_shapes_reports_all_problems(model_file):
    path, ckpt = model_file
    shapes = {k: v.shape for k, v in ckpt.params.items()}
    del shapes["output/b"]                 # -> unexpected in file
    shapes["lstm1/Wx"] = (4, 16)           # -> missing from file
    shapes["lstm0/Wx"] = (200, 800)        # -> wrong shape
    with pytest.raises(FormatError) as err:
        io.load(path, expected_shapes=shapes)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg
    assert "missing lstm1/Wx" in msg
    assert "unexpected output/b" in msg
    assert "lstm0/Wx: expected (200, 800), found (4, 16)" in msg


def test_missing_file(tmp_path):
    with pytest.raises(FormatError, match="no such file"):
        io.load(tmp_path / "nope.h5")


def test_truncated_file(tmp_path):
    path = tmp_path / "t.h5"
    ckpt = _make_ckpt(hidden=64, vocab_size=6)
    io.save(path, ckpt)
    size = os.path.getsize(path)
    with open(path, "r+b") as fh:
        fh.truncate(size // 2)
    for fn in (io.load, io.read_config, io.describe):
        with pytest.raises(FormatError, match="t.h5") as err:
            fn(path)
        assert "\n" not in str(err.value)


def test_foreign_hdf5(tmp_path):
    path = tmp_path / "foreign.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("data", data=np.arange(10))
        f.attrs["format"] = "keras"
    for fn in (io.load, io.read_config, io.describe):
        with pytest.raises(FormatError, match="not a slimnp model file"):
            fn(path)


def test_text_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello, this is not HDF5\n" * 100)
    with pytest.raises(FormatError, match="not an HDF5 file"):
        io.load(path)


def test_newer_format_version(model_file):
    path, _ = model_file
    with h5py.File(path, "r+") as f:
        f.attrs["format_version"] = io.FORMAT_VERSION + 1
    with pytest.raises(FormatError, match=rf"format version {io.FORMAT_VERSION + 1} > {io.FORMAT_VERSION}\); "
                                          "upgrade slimnp"):
        io.load(path)
    with pytest.raises(FormatError, match="upgrade"):
        io.read_config(path)


def test_bad_config_json(model_file):
    path, _ = model_file
    with h5py.File(path, "r+") as f:
        f.attrs["config"] = "{not json"
    with pytest.raises(FormatError, match="not valid JSON"):
        io.load(path)


def _tmp_leftovers(directory):
    return [p for p in os.listdir(directory) if ".tmp-" in p]


@pytest.mark.parametrize("exc", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_failed_save_keeps_old_file(model_file, monkeypatch, exc):
    path, old = model_file
    new = _make_ckpt(hidden=8, seed=1)
    seen = {}

    def failing_write(group, params, compression):
        seen["tmp_exists"] = bool(_tmp_leftovers(path.parent))
        raise exc

    monkeypatch.setattr(io, "_write_params", failing_write)
    with pytest.raises(type(exc)):
        io.save(path, new)
    assert seen["tmp_exists"], "the failure should happen while the temp file exists"
    assert _tmp_leftovers(path.parent) == []
    got = io.load(path)
    _assert_tree_equal(old.params, got.params)


def test_unwritable_value_keeps_old_file(model_file):
    path, old = model_file
    bad = _make_ckpt(seed=3)
    bad.train_state["oops"] = object()
    with pytest.raises(TypeError, match="train_state/oops"):
        io.save(path, bad)
    bad = _make_ckpt(seed=3)
    bad.params["lstm0/Wx"] = np.array(["a", "b"])
    with pytest.raises(TypeError, match="params/lstm0/Wx"):
        io.save(path, bad)
    assert _tmp_leftovers(path.parent) == []
    _assert_tree_equal(old.params, io.load(path).params)


def test_save_replaces_existing_file(model_file):
    path, _ = model_file
    new = _make_ckpt(hidden=8, seed=5)
    io.save(str(path), new)
    _assert_tree_equal(new.params, io.load(path).params)
    assert _tmp_leftovers(path.parent) == []


def test_invalid_keys_rejected(tmp_path):
    ck = Checkpoint(config={}, vocab=[], params={}, optimizer={"_json_keys": 1})
    with pytest.raises(ValueError, match="reserved"):
        io.save(tmp_path / "x.h5", ck)
    ck = Checkpoint(config={}, vocab=[], params={"a": np.zeros(2), "a/b": np.zeros(2)})
    with pytest.raises(ValueError, match="clashes"):
        io.save(tmp_path / "x.h5", ck)
    ck = Checkpoint(config={}, vocab=[], params={}, train_state={"d": {1: "int key"}})
    with pytest.raises(TypeError, match="not a str"):
        io.save(tmp_path / "x.h5", ck)
    assert not (tmp_path / "x.h5").exists() and _tmp_leftovers(tmp_path) == []


def test_describe_metadata_only(model_file, monkeypatch):
    path, ckpt = model_file

    def no_reading(*args, **kwargs):
        raise AssertionError("describe() must not read dataset contents")

    monkeypatch.setattr(h5py.Dataset, "__getitem__", no_reading)
    monkeypatch.setattr(h5py.Dataset, "read_direct", no_reading)
    monkeypatch.setattr(h5py.Dataset, "__array__", no_reading)
    info = io.describe(path)
    monkeypatch.undo()

    assert info["file"] == str(path)
    assert info["file_size_bytes"] == os.path.getsize(path)
    assert info["format_version"] == 1 and info["config"] == ckpt.config
    assert info["vocab_size"] == len(ckpt.vocab)
    assert info["parameters"] == sum(v.size for v in ckpt.params.values())
    assert info["layers"] == {
        "embedding": 24, "lstm0": 64 + 64 + 16, "output": 24 + 6}
    names = {d["name"]: d for d in info["datasets"]}
    assert names["/params/lstm0/Wx"] == {"name": "/params/lstm0/Wx", "shape": [4, 16], "dtype": "float32",
                                         "size": 64, "nbytes": 256}
    assert names["/vocab"]["dtype"] == "str"
    assert "/optimizer/accum/lstm0/Wx" in names and "/train_state/hidden/h0" in names
    assert info["mapping_bytes"] == 18 * 1 + 18 * 2 + 3 * 1
    assert info["train_state"] == {"epoch": 3, "done": True, "best_ppl": 123.456}
    assert info["optimizer"] == {"name": "adagrad", "lr": 0.1, "step": 17, "nesterov": False}
    json.dumps(info)  # plain data, suitable for --json output


# ---------------------------------------------------------------------------
# checksums
# ---------------------------------------------------------------------------
DATA = os.path.join(os.path.dirname(__file__), "data")


def test_every_array_dataset_is_checksummed(model_file):
    path, ckpt = model_file
    with h5py.File(path, "r") as f:
        arrays = [(name, ds) for name, ds in io._walk_datasets(f) if name != "vocab"]
        assert len(arrays) == 6 + 3 + 6 + 1 + 1  # params, mapping, optimizer, train_state, counts
        for name, ds in arrays:
            assert ds.fletcher32 and ds.chunks, name
        assert f.attrs["format_version"] == 1  # the filter is transparent: same format


def _flip_byte(path, dataset, at=5):
    with h5py.File(path, "r") as f:
        ds = f[dataset]
        offset = ds.id.get_chunk_info(0).byte_offset if ds.chunks else ds.id.get_offset()
    with open(path, "r+b") as fh:
        fh.seek(offset + at)
        b = fh.read(1)
        fh.seek(offset + at)
        fh.write(bytes([b[0] ^ 0x10]))


@pytest.mark.parametrize("dataset", ["/params/lstm0/Wx", "/optimizer/accum/output/W"])
def test_a_flipped_byte_is_reported_naming_the_dataset(model_file, dataset):
    path, _ = model_file
    _flip_byte(path, dataset)
    with pytest.raises(FormatError) as err:
        io.load(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: dataset {dataset} is damaged (its checksum does not match)")
    assert "\n" not in msg
    if dataset.startswith("/optimizer"):  # a model loaded for evaluation does not read it
        io.load(path, optimizer=False)
    with pytest.raises(FormatError, match=f"dataset {dataset} is damaged"):
        io.load_params_into(path, {k: np.empty_like(v) for k, v in _make_ckpt().params.items()}) \
            if dataset.startswith("/params") else io.load(path)


def test_files_written_before_checksums_still_load(tmp_path):
    old = os.path.join(DATA, "format1-before-checksums.hdf5")  # slimnp 0.1.0, plain contiguous datasets
    with h5py.File(old, "r") as f:
        assert not f["params/lstm0/Wx"].fletcher32 and f["params/lstm0/Wx"].chunks is None
    got, want = io.load(old), _make_ckpt()
    _assert_tree_equal(want.params, got.params)
    _assert_tree_equal(want.mapping, got.mapping)
    _assert_tree_equal(want.optimizer, got.optimizer)
    assert got.vocab == want.vocab and got.config == want.config
    arrays = {k: np.empty_like(v) for k, v in want.params.items()}
    io.load_params_into(old, arrays)
    _assert_tree_equal(want.params, arrays)
    io.save(tmp_path / "plain.h5", want, checksum=False)  # the old layout, still writable
    _assert_tree_equal(want.params, io.load(tmp_path / "plain.h5").params)


def test_load_params_into_checks_names_and_shapes(model_file):
    path, ckpt = model_file
    arrays = {k: np.empty_like(v) for k, v in ckpt.params.items()}
    io.load_params_into(path, arrays)
    _assert_tree_equal(ckpt.params, arrays)
    other = dict(arrays, **{"lstm0/Wx": np.empty((3, 3), np.float32)})
    with pytest.raises(FormatError, match=r"lstm0/Wx: expected \(3, 3\), found \(4, 16\)"):
        io.load_params_into(path, other)
    cast = {k: np.empty(v.shape, np.float64) for k, v in ckpt.params.items()}  # another dtype
    io.load_params_into(path, cast)
    np.testing.assert_array_equal(cast["lstm0/Wx"], ckpt.params["lstm0/Wx"])


# ---------------------------------------------------------------------------
# failed writes: one line, the old file untouched, no HDF5 crash
# ---------------------------------------------------------------------------
class _FailingRaw:
    """An unbuffered file whose writes fail with ``errno`` after ``budget`` bytes."""

    def __init__(self, raw, budget, errno):
        self.raw, self.budget, self.errno = raw, budget, errno

    def write(self, b):
        if self.budget < len(b):
            raise OSError(self.errno, os.strerror(self.errno))
        self.budget -= len(b)
        return self.raw.write(b)

    def __getattr__(self, name):
        return getattr(self.raw, name)


def test_a_write_failing_anywhere_is_one_clean_error(model_file, monkeypatch):
    """The disk fills up after 0, 1000, 2000, ... bytes of the file: always
    one WriteError, the old file intact, and HDF5 only ever gets whole reads."""
    import errno as E

    from slimnp.errors import WriteError

    path, old = model_file
    before = path.read_bytes()
    new = _make_ckpt(hidden=8, seed=1)
    size = os.path.getsize(path) + 20000
    init, readinto = io._StickyFile.__init__, io._StickyFile.readinto
    short = []

    def whole(self, b):
        n = readinto(self, b)
        short.extend([n] if n != len(memoryview(b).cast("B")) else [])
        return n

    monkeypatch.setattr(io._StickyFile, "readinto", whole)
    for budget in range(0, size, 1000):
        monkeypatch.setattr(io._StickyFile, "__init__",
                            lambda self, raw: init(self, _FailingRaw(raw, budget, E.ENOSPC)))
        try:
            io.save(path, new)
        except WriteError as err:
            msg = str(err)
            assert msg.startswith(f"cannot write {path}: no space left on device (about "), msg
            assert msg.endswith(f"; the previous {path} is unchanged") and ".tmp-" not in msg
            assert path.read_bytes() == before
        else:  # it fitted
            assert budget > 10000
            _assert_tree_equal(new.params, io.load(path).params)
            path.write_bytes(before)
        assert _tmp_leftovers(path.parent) == [] and short == []


def test_special_files_are_written_in_place(tmp_path):
    """A FIFO (like /dev/null or /dev/stdout) is written, not renamed over."""
    import stat
    import threading

    from slimnp.mt import nbest

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(open(fifo, "rb").read()), daemon=True)
    reader.start()
    nbest.write_text(fifo, ["one", "two"])
    reader.join(10)
    assert got == [b"one\ntwo\n"] and stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert sorted(os.listdir(tmp_path)) == ["pipe"]
