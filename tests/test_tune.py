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
from mnist_track.tune import ERROR_ATTR, Objective, counted

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
