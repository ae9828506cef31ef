"""slimnp.options: the option schema, and the settings and configs it gives."""
import click
import pytest

from slimnp import options as O
from slimnp.cli import main


def _train_command():
    return main.commands["train"]


def test_every_schema_option_is_a_train_flag_and_back():
    """The click options of `slimnp train` are generated from the schema: the
    same names, flags and defaults, nothing more and nothing less."""
    params = {p.name: p for p in _train_command().params if isinstance(p, click.Option)
              and p.name != "help"}
    assert set(params) == {o.name for o in O.TRAIN_OPTIONS}
    for o in O.TRAIN_OPTIONS:
        p = params[o.name]
        assert o.flag in p.opts and p.default == o.default and p.help == o.help
        assert p.is_flag == (o.kind == "flag")


@pytest.mark.parametrize("key, name", [("lr-schedule", "schedule"), ("lr_schedule", "schedule"),
                                       ("schedule", "schedule"), ("input", "input_kind"),
                                       ("input_kind", "input_kind"), ("json", "as_json"),
                                       ("train", "train_file"), ("batch-size", "batch_size")])
def test_an_option_is_known_by_name_and_by_flag(key, name):
    assert O.option(key).name == name
    assert key.replace("-", "_") in O.keys()


def test_unknown_option():
    assert O.option("hiden") is None
    with pytest.raises(O.OptionError, match="hiden"):
        O.complete({"hiden": 3})


@pytest.mark.parametrize("name, value, problem", [
    ("hidden", "big", "expects an integer"),
    ("hidden", 2.5, "expects an integer"),
    ("dropout", True, "expects float, got a boolean"),
    ("lr", "fast", "expects a number"),
    ("tie", 1, "expects true or false"),
    ("input_kind", "sparse", "is not one of 'dense', 'slim'"),
    ("threads", 0, "not in the range 1<=x"),
    ("samples", -5, "not in the range"),
    ("div_value", 1.0, "not in the range 1<x"),
    ("cutoffs", "20,x", "expects integers separated by commas"),
    ("cutoffs", [20, 2.5], "expects integers separated by commas"),
    ("data", 3, "expects a string"),
    ("lr", float("nan"), "finite"),
])
def test_values_are_checked_strictly(name, value, problem):
    assert problem in O.check_value(O.option(name), value)


@pytest.mark.parametrize("name, value", [("hidden", 200), ("dropout", 0), ("dropout", 0.5),
                                         ("tie", False), ("input_kind", "slim"), ("threads", 1),
                                         ("cutoffs", [20, 60]), ("cutoffs", "20,60"),
                                         ("div_value", 2)])
def test_good_values_pass(name, value):
    assert O.check_value(O.option(name), value) is None


def test_complete_fills_defaults_and_types():
    p = O.complete({"dropout": 0, "lr": 1, "cutoffs": "20,60", "data": "x"})
    assert p["dropout"] == 0.0 and isinstance(p["dropout"], float)
    assert isinstance(p["lr"], float) and p["cutoffs"] == (20, 60)
    assert p["input_kind"] == "dense" and p["seed"] == 0 and p["hidden"] is None
    assert set(p) == {o.name for o in O.TRAIN_OPTIONS}
    with pytest.raises(O.OptionError, match="^--cutoffs: expects integers"):
        O.complete({"cutoffs": "a,b"})


@pytest.mark.parametrize("given", [
    {},
    {"data": "corpus", "hidden": 32, "lr": 0.5, "lr_schedule": None},
    {"train_file": "t.txt", "valid_file": "v.txt", "input_kind": "slim", "input_k": 4,
     "input_ratio": 0.25, "output_kind": "slim", "output_k": 4, "output_m": 40, "mapping": "hash",
     "tie": True, "mapping_seed": 3, "dropout": 0, "epochs": 3},
    {"data": "c", "output_kind": "adaptive", "cutoffs": [20, 60], "div_value": 2, "head_bias": True,
     "loss": "softmax", "optimizer": "adagrad", "seed": 4, "embedding_size": 8},
])
def test_library_and_command_line_agree(given):
    """What `slimnp train` parses from to_argv(options) is what the library
    completes from the options dict: one schema, two doors."""
    given = {k: v for k, v in given.items() if v is not None}
    argv = O.to_argv(given) + ["--out", "x.h5"]
    parsed = dict(_train_command().make_context("train", argv).params)
    lib = O.complete({**given, "out": "x.h5"})
    parsed = O.complete({k: v for k, v in parsed.items() if v is not None})  # click keeps strings for ints lists
    assert parsed == lib
    assert O.settings(parsed) == O.settings(lib)


def test_settings_take_the_recipe_for_unset_options():
    builtin = O.settings(O.complete({}))
    assert builtin["hidden"] == O.PRESETS["builtin"]["hidden"] == 128
    small = O.settings(O.complete({"data": "d", "hidden": 300}))
    assert small["hidden"] == 300 and small["layers"] == O.PRESETS["zaremba-small"]["layers"]
    assert small["decay_start"] == 4 and small["loss"] is None
    assert O.recipe_of({"train_file": "t"}) == "zaremba-small"


def test_slim_sizes_from_ratios():
    hp = O.settings(O.complete({"data": "d", "input_kind": "slim", "input_k": 8, "input_ratio": 0.125,
                                "output_kind": "slim", "output_k": 8, "output_ratio": 0.125}))
    mc = O.model_config(hp, 10000)
    assert mc.input_m == 0.125 * 8 * 10000 and mc.output_m == 8 * 1250
    with pytest.raises(ValueError, match="--input-k"):
        O.model_config({**hp, "input_k": None}, 10000)
    with pytest.raises(ValueError, match="exactly one of --output-m and --output-ratio"):
        O.model_config({**hp, "output_m": 80}, 10000)


def test_adaptive_options_need_the_adaptive_output():
    hp = O.settings(O.complete({"data": "d", "cutoffs": "20,60", "div_value": 2}))
    with pytest.raises(ValueError, match="^--cutoffs, --div-value need --input adaptive or --output adaptive$"):
        O.model_config(hp, 100)
    hp = O.settings(O.complete({"data": "d", "output_kind": "adaptive", "loss": "nce"}))
    with pytest.raises(ValueError, match="exact loss"):
        O.model_config(hp, 100)
    hp = O.settings(O.complete({"data": "d", "output_kind": "adaptive", "cutoffs": [20, 60]}))
    mc = O.model_config(hp, 100)
    assert mc.output == "adaptive" and mc.cutoffs == (20, 60) and mc.div_value == 4.0


def test_train_config_of_settings():
    hp = O.settings(O.complete({"data": "d", "optimizer": "adagrad", "lr": 0.2}))
    tc = O.train_config(hp, seed=3, loss_average="token")
    assert (tc.optimizer, tc.lr, tc.seed, tc.loss_average, tc.samples) == ("adagrad", 0.2, 3, "token", 4000)
