"""Unit tests for mnist_track.config: validation, YAML loading, overrides, shipped files."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from mnist_track.config import (
    ConfigError,
    StudyConfig,
    TrainConfig,
    load_study_config,
    load_train_config,
)

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
SHIPPED = sorted(EXPERIMENTS.glob("*.yaml"))

LR_SPACE = {"lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}


def write_yaml(folder: Path, name: str, data) -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(data))
    return path


def config_error(loader, path: Path, overrides=None) -> str:
    with pytest.raises(ConfigError) as caught:
        loader(path, overrides or {})
    return str(caught.value)


# --- TrainConfig / StudyConfig as models -------------------------------------------------


def test_train_config_defaults_are_the_classic_mlp():
    config = TrainConfig()
    assert config.model == "mlp"
    assert config.hidden_sizes == (128, 64)
    assert config.optimizer == "adam"
    assert config.precision == "fp32"


@pytest.mark.parametrize(
    "fields",
    [
        {"epochs": 0},
        {"batch_size": -1},
        {"lr": 0.0},
        {"dropout": 1.0},
        {"dropout": -0.1},
        {"hidden_sizes": [128, 0]},
        {"model": "transformer"},
        {"optimizer": "rmsprop"},
        {"lr_schedule": "step"},
        {"precision": "fp16"},
        {"val_size": 60000},
        {"model": "cnn", "channels": []},
        {"train_limit": 0},
        {"no_such_field": 1},
    ],
)
def test_train_config_rejects_invalid_fields(fields):
    with pytest.raises(ValidationError):
        TrainConfig(**fields)


def test_train_config_is_frozen():
    config = TrainConfig()
    with pytest.raises(ValidationError):
        config.epochs = 3


def test_train_config_to_params_is_flat_strings():
    config = TrainConfig(hidden_sizes=(256, 32), train_limit=100)
    params = config.to_params()
    assert set(params) == set(TrainConfig.model_fields)
    assert all(isinstance(value, str) for value in params.values())
    assert params["hidden_sizes"] == "256,32"
    assert params["train_limit"] == "100"
    assert params["test_limit"] == "None"


def test_study_config_with_timeout_only_is_valid():
    study = StudyConfig(study_name="s", n_trials=None, timeout=30, search_space=LR_SPACE)
    assert study.n_trials is None and study.timeout == 30


def test_study_config_needs_a_search_space():
    with pytest.raises(ValidationError):
        StudyConfig(study_name="s", search_space={})


# --- load_train_config -------------------------------------------------------------------


def test_load_train_config_reads_the_top_level(tmp_path):
    path = write_yaml(tmp_path, "run.yaml", {"model": "cnn", "epochs": 4, "channels": [8, 16]})
    config = load_train_config(path, {})
    assert (config.model, config.epochs, config.channels) == ("cnn", 4, (8, 16))


def test_load_train_config_without_file_uses_overrides(tmp_path):
    assert load_train_config(None, {"epochs": 3, "lr": None}).epochs == 3
    assert load_train_config(None, {}) == TrainConfig()


def test_load_train_config_empty_file_gives_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_train_config(path, {}) == TrainConfig()


def test_overrides_win_over_the_file_and_none_is_ignored(tmp_path):
    path = write_yaml(tmp_path, "run.yaml", {"epochs": 5, "lr": 0.01, "seed": 7})
    config = load_train_config(path, {"epochs": 2, "lr": None, "seed": None, "batch_size": 64})
    assert config.epochs == 2  # override wins
    assert config.lr == 0.01  # None override ignored: the file's value stays
    assert config.seed == 7
    assert config.batch_size == 64


def test_load_train_config_uses_the_train_section_of_a_study_file(tmp_path):
    path = write_yaml(
        tmp_path,
        "study.yaml",
        {"n_trials": 3, "train": {"epochs": 2, "model": "mlp"}, "search_space": LR_SPACE},
    )
    config = load_train_config(path, {"seed": 5})
    assert (config.epochs, config.seed) == (2, 5)


def test_load_train_config_on_a_study_file_without_train_section(tmp_path):
    path = write_yaml(tmp_path, "study.yaml", {"n_trials": 3, "search_space": LR_SPACE})
    assert load_train_config(path, {}) == load_study_config(path, {}).train


def test_unknown_key_names_file_and_key(tmp_path):
    path = write_yaml(tmp_path, "run.yaml", {"epochz": 3})
    message = config_error(load_train_config, path)
    assert str(path) in message
    assert "epochz" in message and "unknown key" in message


def test_wrong_type_names_file_and_key(tmp_path):
    path = write_yaml(tmp_path, "run.yaml", {"epochs": "many"})
    message = config_error(load_train_config, path)
    assert str(path) in message
    assert "epochs" in message and "integer" in message


def test_invalid_override_names_the_key(tmp_path):
    path = write_yaml(tmp_path, "run.yaml", {"epochs": 3})
    message = config_error(load_train_config, path, {"batch_size": 0})
    assert str(path) in message and "batch_size" in message


@pytest.mark.parametrize(
    ("content", "fragment"),
    [("- 1\n- 2\n", "mapping"), ("epochs: [1,\n", "not valid YAML")],
)
def test_unusable_yaml_names_the_file(tmp_path, content, fragment):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    for loader in (load_train_config, load_study_config):
        message = config_error(loader, path)
        assert str(path) in message and fragment in message


def test_a_file_that_is_not_utf8_names_the_file(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("epochs: 2  # caf\u00e9\n".encode("latin-1"))
    for loader in (load_train_config, load_study_config):
        message = config_error(loader, path)
        assert message.startswith(f"{path}: not UTF-8")
        assert "0xe9" in message


@pytest.mark.parametrize(
    "fields",
    [{"lr": float("inf")}, {"lr": float("nan")}, {"seed": 2**64}, {"split_seed": -(2**63) - 1}],
    ids=["lr-inf", "lr-nan", "seed-too-big", "split-seed-too-small"],
)
def test_train_config_rejects_values_torch_cannot_take(fields):
    with pytest.raises(ValidationError):
        TrainConfig(**fields)


def test_missing_file_names_the_file(tmp_path):
    path = tmp_path / "absent.yaml"
    for loader in (load_train_config, load_study_config):
        message = config_error(loader, path)
        assert str(path) in message and "cannot read" in message


# --- load_study_config -------------------------------------------------------------------


def test_load_study_config_defaults_name_to_file_stem(tmp_path):
    path = write_yaml(tmp_path, "my-study.yaml", {"search_space": LR_SPACE})
    study = load_study_config(path, {})
    assert study.study_name == "my-study"
    assert study.n_trials == 20  # n_trials has a default, so omitting both stop rules is fine
    assert set(study.search_space) == {"lr"}


def test_study_overrides_win_and_none_is_ignored(tmp_path):
    path = write_yaml(
        tmp_path,
        "s.yaml",
        {"study_name": "from-file", "n_trials": 9, "timeout": 60, "search_space": LR_SPACE},
    )
    study = load_study_config(path, {"n_trials": 2, "timeout": None, "study_name": None})
    assert study.n_trials == 2
    assert study.timeout == 60
    assert study.study_name == "from-file"
    renamed = load_study_config(path, {"study_name": "from-cli", "experiment": "exp"})
    assert (renamed.study_name, renamed.experiment) == ("from-cli", "exp")


def test_study_unknown_top_level_and_nested_keys(tmp_path):
    top = write_yaml(tmp_path, "top.yaml", {"search_space": LR_SPACE, "bogus": 1})
    message = config_error(load_study_config, top)
    assert str(top) in message and "bogus: unknown key" in message

    nested = write_yaml(tmp_path, "nested.yaml", {"search_space": LR_SPACE, "train": {"epocs": 1}})
    message = config_error(load_study_config, nested)
    assert str(nested) in message and "train.epocs: unknown key" in message

    sampler = write_yaml(
        tmp_path, "sampler.yaml", {"search_space": LR_SPACE, "sampler": {"type": "grid"}}
    )
    message = config_error(load_study_config, sampler)
    assert str(sampler) in message and "sampler.type" in message


@pytest.mark.parametrize(
    ("space", "key", "fragment"),
    [
        ({"lr": {"type": "float", "low": 0.1, "high": 0.01}}, "search_space.lr", "empty range"),
        (
            {"hidden_units": {"type": "int", "low": 64, "high": 32}},
            "search_space.hidden_units",
            "empty range",
        ),
        ({"lr": {"type": "float", "low": 0.0, "high": 0.1, "log": True}}, "search_space.lr", "log"),
        (
            {"hidden_units": {"type": "int", "low": -4, "high": 32, "log": True}},
            "search_space.hidden_units",
            "log",
        ),
        (
            {"momentum": {"type": "float", "low": 0.1, "high": 0.9}},
            "search_space.momentum",
            "unknown parameter",
        ),
        (
            {"hidden_layers": {"type": "int", "low": 0, "high": 2}},
            "search_space.hidden_layers",
            "low >= 1",
        ),
        ({"lr": {"type": "gaussian", "low": 0.1, "high": 0.2}}, "search_space.lr", "gaussian"),
        ({"lr": {"type": "float", "low": "a", "high": 0.2}}, "search_space.lr.low", "number"),
        (
            {"batch_size": {"type": "categorical", "choices": []}},
            "search_space.batch_size.choices",
            "at least 1",
        ),
        (
            {"lr": {"type": "float", "low": 0.1, "high": 0.2, "step": 0.1}},
            "search_space.lr.step",
            "unknown key",
        ),
        ({}, "search_space", "at least 1"),
    ],
)
def test_bad_search_space_names_file_and_key(tmp_path, space, key, fragment):
    path = write_yaml(tmp_path, "study.yaml", {"search_space": space})
    message = config_error(load_study_config, path)
    assert message.startswith(f"{path}: ")
    assert key in message
    assert fragment in message


# Values a sampler would draw that no TrainConfig takes: every trial would fail.
NAN, INF = float("nan"), float("inf")
OUTSIDE_THE_DOMAIN = {
    "optimizer-choice": (
        {"optimizer": {"type": "categorical", "choices": ["adam", "rmsprop"]}},
        "search_space.optimizer.choices: 'rmsprop' is not a valid optimizer",
    ),
    "epochs-low-0": (
        {"epochs": {"type": "int", "low": 0, "high": 3}},
        "search_space.epochs.low: 0 is not a valid epochs",
    ),
    "lr-nan": ({"lr": {"type": "float", "low": NAN, "high": 0.1}}, "search_space.lr.low"),
    "lr-inf": ({"lr": {"type": "float", "low": 0.01, "high": INF}}, "search_space.lr.high"),
    "int-nan": ({"epochs": {"type": "int", "low": NAN, "high": 3}}, "search_space.epochs.low"),
    "dropout-high-1": (
        {"dropout": {"type": "float", "low": 0.1, "high": 1.0}},
        "search_space.dropout.high: 1.0 is not a valid dropout",
    ),
    "lr-choice-negative": (
        {"lr": {"type": "categorical", "choices": [0.01, -0.01]}},
        "search_space.lr.choices: -0.01 is not a valid lr",
    ),
    "batch-size-float-range": (
        {"batch_size": {"type": "float", "low": 64, "high": 256}},
        "search_space.batch_size: a float range",
    ),
    "units-low-0": (
        {"hidden_units": {"type": "int", "low": 0, "high": 8}},
        "search_space.hidden_units.low: 0 is not a valid hidden_sizes",
    ),
    "channels-choice-text": (
        {"conv_channels": {"type": "categorical", "choices": [8, "wide"]}},
        "search_space.conv_channels.choices: 'wide' is not a valid channels",
    ),
    "layers-choice-0": (
        {"hidden_layers": {"type": "categorical", "choices": [0, 2]}},
        "search_space.hidden_layers.choices: 0 is not a layer count",
    ),
    "layers-float": (
        {"conv_layers": {"type": "float", "low": 1, "high": 3}},
        "search_space.conv_layers.low: 1.0 is not a layer count",
    ),
    "log-with-step": (
        {"epochs": {"type": "int", "low": 1, "high": 9, "step": 2, "log": True}},
        "search_space.epochs: a log range takes no step",
    ),
}


@pytest.mark.parametrize(
    ("space", "expected"), OUTSIDE_THE_DOMAIN.values(), ids=OUTSIDE_THE_DOMAIN.keys()
)
def test_search_space_values_outside_train_config_are_named(tmp_path, space, expected):
    path = tmp_path / "study.yaml"
    # safe_dump writes .nan and .inf, as a user would.
    path.write_text(yaml.safe_dump({"search_space": space}))
    message = config_error(load_study_config, path)
    assert message.startswith(f"{path}: ")
    assert expected in message


def test_sampler_seed_must_suit_optunas_samplers(tmp_path):
    path = write_yaml(tmp_path, "study.yaml", {"sampler": {"seed": -1}, "search_space": LR_SPACE})
    assert "sampler.seed" in config_error(load_study_config, path)


def test_equal_bounds_are_a_valid_range(tmp_path):
    path = write_yaml(
        tmp_path, "study.yaml", {"search_space": {"lr": {"type": "float", "low": 0.1, "high": 0.1}}}
    )
    assert load_study_config(path, {}).search_space["lr"].low == 0.1


def test_missing_search_space_is_named(tmp_path):
    path = write_yaml(tmp_path, "study.yaml", {"n_trials": 3})
    message = config_error(load_study_config, path)
    assert str(path) in message and "search_space" in message


def test_study_needs_n_trials_or_timeout(tmp_path):
    path = write_yaml(tmp_path, "study.yaml", {"n_trials": None, "search_space": LR_SPACE})
    message = config_error(load_study_config, path)
    assert str(path) in message
    assert "n_trials" in message and "timeout" in message
    # Either stop rule alone is enough, from the file or from an override.
    assert load_study_config(path, {"timeout": 10.0}).timeout == 10.0
    assert load_study_config(path, {"n_trials": 4}).n_trials == 4


# --- the shipped experiment files --------------------------------------------------------


def test_the_shipped_experiment_files_are_present():
    assert {path.name for path in SHIPPED} >= {"quick.yaml", "mlp.yaml", "cnn.yaml"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda path: path.name)
def test_shipped_experiment_files_load(path):
    raw = yaml.safe_load(path.read_text())
    study = load_study_config(path, {})
    assert study.study_name == raw.get("study_name", path.stem)
    assert set(study.search_space) == set(raw["search_space"])
    for key, value in raw.get("train", {}).items():
        expected = tuple(value) if isinstance(value, list) else value
        assert getattr(study.train, key) == expected, key
    # The train command reads the same file's train: section.
    assert load_train_config(path, {}) == study.train


def test_dotted_overrides_reach_into_sections_and_are_validated(tmp_path):
    from mnist_track.config import ConfigError, load_study_config

    path = tmp_path / "study.yaml"
    path.write_text(
        "n_trials: 2\ntrain: {epochs: 1}\n"
        "search_space: {lr: {type: float, low: 0.001, high: 0.01}}\n"
    )
    config = load_study_config(path, {"train.device": "cpu", "sampler.seed": 7, "timeout": None})
    assert (config.train.device, config.train.epochs, config.sampler.seed) == ("cpu", 1, 7)
    assert config.sampler.type == "tpe"  # a section the file did not have gets its defaults
    with pytest.raises(ConfigError, match="sampler.seed"):
        load_study_config(path, {"sampler.seed": -1})


@pytest.mark.parametrize("path", sorted((EXPERIMENTS / "recipes").glob("*.yaml")), ids=str)
def test_every_shipped_recipe_is_a_valid_training_config(path):
    config = load_train_config(path, {})
    # The recipes are what the time-to-accuracy benchmark times: short one-cycle runs.
    assert config.lr_schedule == "onecycle"
    assert config.epochs <= 5


# --- study features: warm start, early stop, sampler options -----------------------------

LAYER_SPACE = LR_SPACE | {
    "hidden_layers": {"type": "int", "low": 1, "high": 2},
    "hidden_units": {"type": "int", "low": 16, "high": 64, "step": 16},
    "optimizer": {"type": "categorical", "choices": ["adam", "sgd"]},
}


def test_warm_start_trials_are_kept_in_order(tmp_path):
    trials = [
        {"lr": 3e-3, "hidden_layers": 2, "hidden_units_l0": 32, "hidden_units_l1": 64},
        {"optimizer": "sgd"},  # the rest is sampled
    ]
    path = write_yaml(tmp_path, "s.yaml", {"search_space": LAYER_SPACE, "warm_start": trials})
    assert load_study_config(path, {}).warm_start == tuple(trials)


BAD_WARM_STARTS = {
    "unknown-key": (
        [{"lr": 1e-3}, {"momentum": 0.9}],
        "warm_start[1].momentum: not a parameter of this trial; it takes: lr, optimizer, "
        "hidden_layers, hidden_units_l0, hidden_units_l1",
    ),
    "layer-beyond-its-depth": (
        [{"hidden_layers": 1, "hidden_units_l1": 32}],
        "warm_start[0].hidden_units_l1: not a parameter of this trial; it takes: lr, "
        "optimizer, hidden_layers, hidden_units_l0",
    ),
    "float-above-high": ([{"lr": 0.5}], "warm_start[0].lr: 0.5 is outside the range"),
    "int-off-the-steps": (
        [{"hidden_units_l0": 40}],
        "warm_start[0].hidden_units_l0: 40 is not on the range's steps (16, 32, ...)",
    ),
    "float-for-an-int": (
        [{"hidden_layers": 2.0}],
        "warm_start[0].hidden_layers: 2.0 is not a whole number",
    ),
    "not-a-choice": (
        [{"optimizer": "rmsprop"}],
        "warm_start[0].optimizer: 'rmsprop' is not one of the choices ['adam', 'sgd']",
    ),
    "text-for-a-number": ([{"lr": "fast"}], "warm_start[0].lr: 'fast' is not a number"),
    "entry-not-a-mapping": ([{"lr": 1e-3}, 3], "warm_start[1]: Input should be a valid dict"),
    "more-than-n-trials": (
        [{"lr": 1e-3}] * 3,
        "warm_start: 3 trials do not fit in n_trials (2)",
    ),
}


@pytest.mark.parametrize(
    ("trials", "expected"), BAD_WARM_STARTS.values(), ids=BAD_WARM_STARTS.keys()
)
def test_a_bad_warm_start_names_the_entry_and_key(tmp_path, trials, expected):
    study = {"n_trials": 2, "search_space": LAYER_SPACE, "warm_start": trials}
    path = write_yaml(tmp_path, "s.yaml", study)
    message = config_error(load_study_config, path)
    assert message.startswith(f"{path}: ")
    assert expected in message


def test_warm_start_sizes_of_a_fixed_depth(tmp_path):
    # Only the width is searched: the trial has the fixed depth (two layers).
    space = {"hidden_units": {"type": "int", "low": 16, "high": 64}}
    study = {"search_space": space, "train": {"hidden_sizes": [32, 32]}}
    fits = write_yaml(tmp_path, "a.yaml", study | {"warm_start": [{"hidden_units_l1": 20}]})
    assert load_study_config(fits, {}).warm_start == ({"hidden_units_l1": 20},)
    deeper = write_yaml(tmp_path, "b.yaml", study | {"warm_start": [{"hidden_units_l2": 20}]})
    assert "warm_start[0].hidden_units_l2: not a parameter" in config_error(
        load_study_config, deeper
    )


def test_stop_takes_a_target_a_patience_or_both(tmp_path):
    path = write_yaml(
        tmp_path, "s.yaml", {"search_space": LR_SPACE, "stop": {"target": 0.985, "patience": 4}}
    )
    stop = load_study_config(path, {}).stop
    assert (stop.target, stop.patience) == (0.985, 4)
    assert StudyConfig(study_name="s", search_space=LR_SPACE).stop is None  # the default


@pytest.mark.parametrize(
    ("stop", "expected"),
    [
        ({}, "stop: give target, patience or both"),
        ({"target": 1.5}, "stop.target: Input should be less than or equal to 1"),
        ({"target": 0}, "stop.target: Input should be greater than 0"),
        ({"patience": 0}, "stop.patience: Input should be greater than 0"),
        ({"patience": 3, "after": 2}, "stop.after: unknown key"),
    ],
)
def test_a_bad_stop_names_its_key(tmp_path, stop, expected):
    path = write_yaml(tmp_path, "s.yaml", {"search_space": LR_SPACE, "stop": stop})
    assert expected in config_error(load_study_config, path)


def test_tpe_options_default_on_and_group_follows_multivariate():
    sampler = StudyConfig(study_name="s", search_space=LR_SPACE).sampler
    assert (sampler.multivariate, sampler.grouped, sampler.constant_liar) == (True, True, True)
    independent = StudyConfig(
        study_name="s", search_space=LR_SPACE, sampler={"multivariate": False}
    ).sampler
    assert (independent.multivariate, independent.grouped) == (False, False)


@pytest.mark.parametrize(
    ("sampler", "expected"),
    [
        ({"type": "random", "constant_liar": False}, "sampler: constant_liar: only the tpe"),
        ({"multivariate": False, "group": True}, "sampler: group needs multivariate: true"),
        ({"multivariate": "sometimes"}, "sampler.multivariate: Input should be a valid boolean"),
    ],
)
def test_bad_sampler_options_are_named(tmp_path, sampler, expected):
    path = write_yaml(tmp_path, "s.yaml", {"search_space": LR_SPACE, "sampler": sampler})
    assert expected in config_error(load_study_config, path)
