"""Unit tests for the objective in mnist_track.tune: a trial that fails before training
(its sampled values make no valid config) and what the objective keeps between trials.
In-memory Optuna studies; training and tracking are stand-ins."""

from __future__ import annotations

import gc
import weakref
from types import SimpleNamespace

import optuna
import pytest
import torch
from optuna.trial import TrialState
from pydantic import ValidationError

from mnist_track import tune
from mnist_track.config import CategoricalParam, FloatParam, StudyConfig, TrainConfig
from mnist_track.study_links import ERROR_ATTR, WARM_START_ATTR
from mnist_track.tune import Objective, counted

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")


def study_config(**search_space) -> StudyConfig:
    """A StudyConfig built without validation, as if a bad search space had got through."""
    return StudyConfig.model_construct(
        study_name="s", train=TrainConfig(), search_space=search_space
    )


def test_a_trial_whose_sampled_config_is_invalid_fails_counted_with_its_error():
    config = study_config(optimizer=CategoricalParam(type="categorical", choices=("rmsprop",)))
    study = optuna.create_study(direction="maximize")
    objective = Objective(config, splits=None, parent_run_id="parent", storage=study._storage)
    trial = study.ask()
    with pytest.raises(ValidationError):
        objective(trial)
    told = study.tell(trial, state=TrialState.FAIL)  # what the worker does with the error
    assert told.user_attrs[ERROR_ATTR].startswith("ValidationError")
    assert "rmsprop" in told.user_attrs[ERROR_ATTR]
    assert counted(told)  # done: the study ends instead of retrying it for ever


def test_the_objective_keeps_no_fitted_model_between_trials(monkeypatch):
    models: list[weakref.ref] = []

    def train_and_track(config, splits, **kwargs):
        model = torch.nn.Linear(784, 10)
        models.append(weakref.ref(model))
        return SimpleNamespace(
            run_id="run",
            model=model,
            test=SimpleNamespace(accuracy=0.9),
            model_version="1",
            validation_accuracy=0.8,
        )

    monkeypatch.setattr(tune, "train_and_track", train_and_track)
    monkeypatch.setattr(tune.tracking, "set_run_tags", lambda run_id, tags: None)
    config = study_config(lr=FloatParam(type="float", low=1e-3, high=1e-2))
    study = optuna.create_study(direction="maximize")
    objective = Objective(config, splits=None, parent_run_id="parent", storage=study._storage)
    for _ in range(3):
        trial = study.ask()
        study.tell(trial, objective(trial))
    gc.collect()
    assert len(models) == 3
    assert [ref() for ref in models] == [None, None, None]


# --- suggest_config ----------------------------------------------------------------------


def spaced(**search_space) -> StudyConfig:
    """A validated StudyConfig over the default TrainConfig with this search space."""
    return StudyConfig.model_validate({"study_name": "s", "search_space": search_space})


def test_sampled_values_lay_over_the_fixed_settings():
    config = spaced(
        lr={"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
        dropout={"type": "float", "low": 0.0, "high": 0.5},
        batch_size={"type": "categorical", "choices": [64, 256]},
    )
    suggested = tune.suggest_config(
        optuna.trial.FixedTrial({"lr": 3e-3, "dropout": 0.25, "batch_size": 256}), config
    )
    assert (suggested.lr, suggested.dropout, suggested.batch_size) == (3e-3, 0.25, 256)
    assert suggested.hidden_sizes == config.train.hidden_sizes  # not searched: fixed
    assert suggested.epochs == config.train.epochs


def test_a_layer_count_and_per_layer_sizes_build_the_hidden_sizes():
    config = spaced(
        hidden_layers={"type": "int", "low": 1, "high": 3},
        hidden_units={"type": "int", "low": 16, "high": 512, "log": True},
    )
    fixed = {"hidden_layers": 3, "hidden_units_l0": 300, "hidden_units_l1": 100}
    fixed["hidden_units_l2"] = 20
    assert tune.suggest_config(optuna.trial.FixedTrial(fixed), config).hidden_sizes == (
        300,
        100,
        20,
    )


def test_only_the_depth_searched_repeats_the_last_fixed_size():
    config = spaced(hidden_layers={"type": "int", "low": 1, "high": 4})  # fixed 128, 64
    deeper = tune.suggest_config(optuna.trial.FixedTrial({"hidden_layers": 4}), config)
    assert deeper.hidden_sizes == (128, 64, 64, 64)
    shallower = tune.suggest_config(optuna.trial.FixedTrial({"hidden_layers": 1}), config)
    assert shallower.hidden_sizes == (128,)


def test_conv_channels_per_block_for_the_cnn():
    config = StudyConfig.model_validate(
        {
            "study_name": "s",
            "train": {"model": "cnn"},
            "search_space": {
                "conv_layers": {"type": "int", "low": 1, "high": 2},
                "conv_channels": {"type": "int", "low": 8, "high": 64},
            },
        }
    )
    fixed = {"conv_layers": 2, "conv_channels_l0": 12, "conv_channels_l1": 40}
    suggested = tune.suggest_config(optuna.trial.FixedTrial(fixed), config)
    assert (suggested.model, suggested.channels) == ("cnn", (12, 40))


# --- samplers and pruners ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("pruner", "kind"),
    [("median", optuna.pruners.MedianPruner), ("hyperband", optuna.pruners.HyperbandPruner),
     ("none", optuna.pruners.NopPruner)],
)  # fmt: skip
def test_make_pruner(pruner, kind):
    config = StudyConfig.model_validate(
        {"study_name": "s", "pruner": {"type": pruner}, "search_space": {"lr": LR_SPACE}}
    )
    assert isinstance(tune.make_pruner(config), kind)


LR_SPACE = {"type": "float", "low": 1e-3, "high": 1e-2}


# --- warm start --------------------------------------------------------------------------


def test_warm_start_trials_are_queued_once_when_the_study_is_new():
    config = StudyConfig(
        study_name="s", search_space={"lr": LR_SPACE}, warm_start=[{"lr": 2e-3}, {"lr": 5e-3}]
    )
    study = optuna.create_study(direction="maximize")
    assert tune.enqueue_warm_start(study, config) == 2
    # A worker joining, or a resume, finds the study's trials: nothing is queued again.
    assert tune.enqueue_warm_start(study, config) == 0
    asked = [study.ask() for _ in range(3)]
    values = [trial.suggest_float("lr", 1e-3, 1e-2) for trial in asked]
    assert values[:2] == [2e-3, 5e-3]
    assert values[2] not in (2e-3, 5e-3)  # sampled: the warm start is used up
    starts = [t.user_attrs.get(WARM_START_ATTR) for t in study.get_trials()]
    assert starts == [0, 1, None]
