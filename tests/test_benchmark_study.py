"""Unit tests for the arithmetic of benchmarks/study.py, on timing records made by hand:
what counts as a trial's fixed cost and what is left of a study outside training; and
the replay of a study's trials through Optuna alone, on a real SQLite storage."""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState

from benchmarks.common import REPO_ROOT
from benchmarks.study import (
    _optuna_floor_figure,
    _outside_training_figure,
    fixed_costs,
    replay_through_optuna,
    training_seconds,
)
from mnist_track.config import load_study_config
from mnist_track.timings import Record
from mnist_track.tune import open_storage


def run(seconds: float, fit: float, test: float, outcome: str = "finished") -> Record:
    phases = {"fit": fit, "test evaluation": test, "model logging": seconds - fit - test}
    return Record("run", seconds, phases, outcome)


def study_records() -> list[Record]:
    return [
        Record("study", 5.0, {"trials": 4.5, "summary": 0.5}),
        run(2.0, fit=1.5, test=0.1),
        run(1.2, fit=0.8, test=0.1),
        run(0.5, fit=0.45, test=0.0, outcome="TrialPruned"),
    ]


def test_training_is_the_fit_and_test_evaluation_of_the_runs_only():
    # A phase of the same name in another kind of record is not a run's training.
    records = [*study_records(), Record("warm-up", 7.0, {"fit": 7.0})]
    assert training_seconds(records) == pytest.approx(1.5 + 0.1 + 0.8 + 0.1 + 0.45)


def test_fixed_costs_are_each_run_less_its_training_by_how_it_ended():
    costs = fixed_costs(study_records())
    assert costs["completed"] == pytest.approx([0.4, 0.3])
    assert costs["pruned"] == pytest.approx([0.05])


def test_time_outside_training_is_held_against_what_three_quarters_speed_leaves():
    records = study_records()  # 2.95 s of training in a 5.0 s tracked study
    # 4.0 s untracked: 0.75x allows 4.0 / 0.75 = 5.33 s tracked, 2.38 s outside training.
    counts = [(3, 5.0, 4.0, None)]
    figure = _outside_training_figure(counts, [records], quick=True)
    assert figure.value == pytest.approx(5.0 - 2.95)
    assert figure.reference_value == pytest.approx(4.0 / 0.75 - 2.95)
    assert figure.ratio == pytest.approx((5.0 - 2.95) / (4.0 / 0.75 - 2.95))


def test_optuna_alone_is_held_against_the_same_budget():
    records = study_records()  # 2.95 s of training; 0.75x leaves 4.0 / 0.75 - 2.95 s
    counts = [(3, 5.0, 4.0, None)]
    figure = _optuna_floor_figure(counts, [records], [(0.25, 0.5)], quick=True)
    assert figure.value == pytest.approx(0.75)
    assert figure.reference_value == pytest.approx(4.0 / 0.75 - 2.95)
    assert figure.ratio == pytest.approx(0.75 / (4.0 / 0.75 - 2.95))


def test_the_replay_through_optuna_alone_gives_optuna_the_same_trials(tmp_path):
    # A study as a tracked one leaves it: complete and pruned trials with their epochs,
    # and a failed one that Optuna never saw report (it is replayed as failed too).
    config = load_study_config(REPO_ROOT / "experiments" / "quick.yaml", {})
    source = optuna.create_study(direction="maximize")
    epochs = {0: [0.90, 0.95, 0.97], 1: [0.80], 2: [0.91, 0.96, 0.98], 3: []}
    states = [TrialState.COMPLETE, TrialState.PRUNED, TrialState.COMPLETE, TrialState.FAIL]
    for number, state in enumerate(states):
        trial = source.ask()
        for step, value in enumerate(epochs[number]):
            trial.report(value, step)
        source.tell(trial, epochs[number][-1] if state == TrialState.COMPLETE else None,
                    state=state)  # fmt: skip
    source.ask()  # a trial still running is not Optuna's finished work: left out

    storage = open_storage(f"sqlite:///{tmp_path / 'optuna.db'}", 5, 20)
    replay = replay_through_optuna(source, config, storage)

    stored = optuna.load_study(study_name=config.study_name, storage=storage)
    trials = stored.get_trials()
    assert [t.state for t in trials] == states
    # Optuna gives a pruned trial its last epoch's value, in the replay as in the source.
    assert [t.value for t in trials] == [0.97, 0.80, 0.98, None]
    assert [list(t.intermediate_values.values()) for t in trials] == list(epochs.values())
    assert set(trials[0].params) >= {"dropout", "lr"}  # drawn by the study's sampler
    assert replay.best_value == 0.98
    storage.engine.dispose()
