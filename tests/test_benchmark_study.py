"""Unit tests for the arithmetic of benchmarks/study.py, on timing records made by hand:
what counts as a trial's fixed cost and what is left of a study outside training."""

from __future__ import annotations

import pytest

from benchmarks.study import _outside_training_figure, fixed_costs, training_seconds
from mnist_track.timings import Record


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
