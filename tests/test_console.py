"""Unit tests for mnist_track.console: what a person reads, from plain stand-ins of the
objects the CLI passes (outcomes, Optuna trials, study results)."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from mnist_track import console
from mnist_track.reconciliation import Reconciled
from mnist_track.registry import Champion

LR = {"lr": FloatDistribution(1e-4, 1e-1, log=True)}


def trial(state, value=None, intermediate=None, number=0, **attrs):
    made = create_trial(
        state=state,
        value=value,
        params={"lr": 0.0012345},
        distributions=LR,
        user_attrs=attrs,
        intermediate_values=intermediate or {},
    )
    made.number = number
    return made


def test_trial_line_of_a_complete_trial():
    line = console.trial_line(
        trial(TrialState.COMPLETE, 0.9712, number=3, test_accuracy=0.9701, model_version="4")
    )
    assert line == "trial   3 COMPLETE val 0.9712 test 0.9701 version 4  [lr=0.00123]"


def test_trial_line_of_a_pruned_and_a_failed_trial():
    pruned = console.trial_line(trial(TrialState.PRUNED, intermediate={1: 0.8, 2: 0.85}))
    assert pruned == "trial   0 PRUNED   after epoch 2  [lr=0.00123]"
    failed = console.trial_line(trial(TrialState.FAIL, error="TrainingDiverged: loss nan"))
    assert failed == "trial   0 FAIL     error: TrainingDiverged: loss nan  [lr=0.00123]"


CROWNED = Champion("2")


def outcome(version="2", champion=CROWNED):
    return SimpleNamespace(
        run_id="abc123",
        validation_accuracy=0.975,
        test=SimpleNamespace(accuracy=0.9733, macro_f1=0.9731, loss=0.0912),
        fit=SimpleNamespace(seconds=12.34),
        model_version=version,
        champion=champion,
        is_champion=champion is not None and champion.holds(version),
    )


def test_run_summary_of_a_new_champion():
    text = console.run_summary(outcome(), "digits", "http://mlflow:5000/#/experiments/1/runs/abc")
    assert text.splitlines() == [
        "run abc123  http://mlflow:5000/#/experiments/1/runs/abc",
        "  validation accuracy 0.9750",
        "  test accuracy       0.9733  (macro-F1 0.9731, loss 0.0912)",
        "  training time       12.3s",
        "  model               models:/digits/2  (now champion)",
    ]


def test_run_summary_says_why_a_version_was_not_compared():
    note = "version 3 was not compared with the champion: it was validated on another split"
    text = console.run_summary(outcome("3", Champion("1", note)), "digits")
    assert "models:/digits/3\n" in text + "\n"  # not the champion
    assert text.endswith(f"  note: {note}")


def test_run_summary_without_registration():
    text = console.run_summary(outcome(None, None), None)
    assert "model " not in text and len(text.splitlines()) == 4


def result(trials, parent_status="FINISHED", reconciled=None, abandoned=0, stopped=None):
    study = SimpleNamespace(study_name="quick")
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    return SimpleNamespace(
        study=study,
        ran=len(trials),
        storage_url="postgresql://alice:secret@db/optuna",
        parent_run_id="p1",
        parent_status=parent_status,
        reconciled=reconciled or Reconciled(),
        abandoned=abandoned,
        stopped=stopped,
        best_trial=max(complete, key=lambda t: t.value, default=None),
        counts=lambda: {
            name: sum(t.state.name.lower() == name for t in trials)
            for name in ("complete", "pruned", "fail", "running")
        },
    )


def test_study_summary_names_the_best_trial_and_masks_the_password():
    trials = [
        trial(TrialState.COMPLETE, 0.95, number=0, test_accuracy=0.94, model_version="1"),
        trial(TrialState.COMPLETE, 0.97, number=1, test_accuracy=0.96, model_version="2"),
        trial(TrialState.PRUNED, number=2),
    ]
    text = console.study_summary(result(trials), "digits", "http://mlflow/#/runs/p1")
    assert text.splitlines() == [
        "study quick: 2 complete, 1 pruned, 0 failed (3 run now; storage "
        "postgresql://alice:***@db/optuna)",
        "  parent run p1 (FINISHED)",
        "    http://mlflow/#/runs/p1",
        "  best trial 1: lr=0.00123",
        "    validation accuracy 0.9700",
        "    test accuracy       0.9600",
        "    model version       2",
        "  serve the champion:   models:/digits@champion",
    ]


def test_study_summary_while_others_work_and_after_reconciling():
    reconciled = Reconciled(trials_failed=1, runs_ended=2, versions_removed=["5"])
    text = console.study_summary(
        result([], parent_status="RUNNING", reconciled=reconciled, abandoned=1), "digits"
    )
    assert "(RUNNING: other workers are still at work)" in text
    assert (
        "  reconciled: 1 stale trial(s) failed and queued again; 2 run(s) ended; "
        "version(s) 5 removed (their runs never completed)"
    ) in text
    assert "1 trial(s) of this worker were taken over by another" in text
    assert text.endswith("  no completed trial yet")


def test_study_summary_says_why_it_stopped_early():
    trials = [trial(TrialState.COMPLETE, 0.99, number=0, model_version="1")]
    reason = "target 0.98 reached: trial 0 has validation accuracy 0.9900"
    lines = console.study_summary(result(trials, stopped=reason), "digits").splitlines()
    assert f"  stopped early: {reason}" in lines
    assert "stopped" not in console.study_summary(result(trials), "digits")


def test_reconciled_line_names_discarded_parents():
    assert console.reconciled_line(Reconciled(parents_discarded=2)) == (
        "2 unrecorded parent run(s) discarded"
    )


EPOCH = SimpleNamespace(
    epoch=2,
    train_loss=0.1234,
    train_accuracy=0.96,
    validation_loss=0.1111,
    validation_accuracy=0.97,
    seconds=1.25,
)


@pytest.mark.parametrize(("tty", "quiet", "shown"), [(True, False, True), (True, True, False),
                                                     (False, False, False)])  # fmt: skip
def test_epoch_progress_only_on_a_terminal_and_not_when_quiet(
    monkeypatch, capsys, tty, quiet, shown
):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: tty)
    console.EpochProgress(5, quiet=quiet)(EPOCH, prefix="trial 3 ")
    err = capsys.readouterr().err
    expected = (
        "trial 3 epoch  2/5  train loss 0.1234 acc 96.00%  val loss 0.1111 acc 97.00%  1.2s\n"
    )
    assert err == (expected if shown else "")


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_bar_appears_only_once_an_epoch_is_slow_and_the_epoch_line_wipes_it(monkeypatch, capsys):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    clock = FakeClock()
    progress = console.EpochProgress(5, clock=clock)
    every = console.PROGRESS_EVERY

    progress.batches(every, 10 * every)  # the epoch's clock starts
    clock.now += console.BAR_AFTER_SECONDS - 0.5
    progress.batches(2 * every, 10 * every)
    assert capsys.readouterr().err == ""  # a quick epoch: no bar

    clock.now += 1.0
    progress.batches(5 * every, 10 * every)
    bar = capsys.readouterr().err
    assert bar == f"\r  [{'#' * 15}{'.' * 15}] {5 * every}/{10 * every} batches"

    progress(EPOCH)
    wiped, line = capsys.readouterr().err.split("\033[K")
    assert wiped == "\r"
    assert line.startswith("epoch  2/5  train loss 0.1234")

    # The next epoch starts its own clock: no bar until it too is slow.
    progress.batches(every, 10 * every)
    progress.batches(2 * every, 10 * every)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(("tty", "quiet"), [(False, False), (True, True)])
def test_no_bar_off_a_terminal_or_when_quiet(monkeypatch, capsys, tty, quiet):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: tty)
    clock = FakeClock()
    progress = console.EpochProgress(5, quiet=quiet, clock=clock)
    progress.batches(console.PROGRESS_EVERY, 100)
    clock.now += 60
    progress.batches(2 * console.PROGRESS_EVERY, 100)
    progress(EPOCH)
    assert capsys.readouterr().err == ""
