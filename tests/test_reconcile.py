"""Unit tests for the decisions behind mnist_track.reconciliation.reconcile (`_verdict`,
`_version_belongs`), the trial count, the sampler's seeds and the study storage URL.
Trials are FrozenTrial objects and runs/versions plain stand-ins: no store is touched."""

from __future__ import annotations

from datetime import datetime, timedelta
from types import SimpleNamespace

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from mnist_track.config import StopConfig, StudyConfig
from mnist_track.reconciliation import _verdict, _version_belongs
from mnist_track.study_links import ERROR_ATTR, RUN_ID_ATTR
from mnist_track.tune import (
    StudyError,
    counted,
    default_storage_url,
    make_sampler,
    open_storage,
    stop_reason,
)

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")

OWN = "run-own"
OTHER = "run-other"
LR = {"lr": FloatDistribution(1e-4, 1e-1, log=True)}
STOPPED = ("FAILED", "FAIL", "the trial's process stopped before it finished")


def trial(state: TrialState, run_id: str | None = OWN, error: str | None = None):
    user_attrs = {} if run_id is None else {RUN_ID_ATTR: run_id}
    if error is not None:
        user_attrs[ERROR_ATTR] = error
    return create_trial(
        state=state,
        value=0.9 if state == TrialState.COMPLETE else None,
        params={"lr": 0.01},
        distributions=LR,
        user_attrs=user_attrs,
    )


def run(run_id: str = OWN, status: str = "RUNNING", number: int = 0):
    return SimpleNamespace(
        info=SimpleNamespace(run_id=run_id, status=status),
        data=SimpleNamespace(tags={"optuna.study": "s", "optuna.trial": str(number)}),
    )


def version(run_id: str = OWN):
    return SimpleNamespace(run_id=run_id, version="1", tags={"study": "s", "trial": "0"})


# --- _verdict --------------------------------------------------------------------------


def test_an_orphan_running_run_is_failed():
    assert _verdict(run(status="RUNNING"), None) == (
        "FAILED",
        "FAIL",
        "its trial does not exist",
    )


@pytest.mark.parametrize("status", ["FINISHED", "FAILED", "KILLED"])
def test_an_orphan_run_that_ended_is_left_alone(status):
    assert _verdict(run(status=status), None) is None


@pytest.mark.parametrize("status", ["RUNNING", "FINISHED"])
@pytest.mark.parametrize("owner", [OWN, OTHER, None])
def test_a_running_trial_leaves_its_runs_alone(status, owner):
    assert _verdict(run(status=status), trial(TrialState.RUNNING, owner)) is None


@pytest.mark.parametrize("status", ["RUNNING", "FINISHED"])
def test_a_trial_whose_worker_died_fails_its_run(status):
    # FAIL without an error attribute: the process stopped (killed, interrupted); the
    # trial is run again, so even a FINISHED run of it must not count.
    assert _verdict(run(status=status), trial(TrialState.FAIL)) == STOPPED
    assert _verdict(run(OTHER, status), trial(TrialState.FAIL)) == STOPPED


@pytest.mark.parametrize("status", ["FAILED", "KILLED"])
def test_a_died_trial_run_that_already_ended_badly_is_left_alone(status):
    assert _verdict(run(status=status), trial(TrialState.FAIL)) is None


def test_a_trial_failed_by_its_error_fails_its_running_run():
    verdict = _verdict(run(status="RUNNING"), trial(TrialState.FAIL, error="ValueError: x"))
    assert verdict == ("FAILED", "FAIL", "the trial failed with its own error")


@pytest.mark.parametrize("status", ["FAILED", "KILLED"])
def test_a_trial_failed_by_its_error_leaves_an_ended_run_alone(status):
    assert _verdict(run(status=status), trial(TrialState.FAIL, error="ValueError: x")) is None


def test_a_trial_failed_by_its_error_after_its_run_finished_fails_the_run():
    # e.g. the champion decision failed after registration: a FINISHED run promises a
    # COMPLETE trial, so it must not stay FINISHED.
    verdict = _verdict(run(status="FINISHED"), trial(TrialState.FAIL, error="RestException: x"))
    assert verdict == ("FAILED", "FAIL", "the trial failed with its own error after its run ended")


def test_a_pruned_trial_kills_its_own_running_run():
    assert _verdict(run(status="RUNNING"), trial(TrialState.PRUNED)) == (
        "KILLED",
        "PRUNED",
        "the trial was pruned",
    )


def test_a_pruned_trial_fails_another_running_run():
    assert _verdict(run(OTHER, "RUNNING"), trial(TrialState.PRUNED)) == (
        "FAILED",
        "PRUNED",
        "another run holds this trial's result",
    )


@pytest.mark.parametrize("state", [TrialState.PRUNED, TrialState.COMPLETE])
@pytest.mark.parametrize("status", ["FINISHED", "FAILED", "KILLED"])
def test_an_ended_run_of_a_finished_trial_is_left_alone(state, status):
    assert _verdict(run(status=status), trial(state)) is None
    assert _verdict(run(OTHER, status), trial(state)) is None


def test_a_complete_trial_leaves_its_own_running_run_alone():
    # Its worker tells Optuna before the run is read as ended: nothing to put right.
    assert _verdict(run(status="RUNNING"), trial(TrialState.COMPLETE)) is None


def test_a_complete_trial_fails_another_running_run():
    assert _verdict(run(OTHER, "RUNNING"), trial(TrialState.COMPLETE)) == (
        "FAILED",
        "COMPLETE",
        "another run holds this trial's result",
    )


def test_a_complete_trial_without_a_run_id_fails_a_running_run():
    assert _verdict(run(status="RUNNING"), trial(TrialState.COMPLETE, run_id=None))[:2] == (
        "FAILED",
        "COMPLETE",
    )


# --- _version_belongs ------------------------------------------------------------------


def test_a_version_of_the_complete_trials_finished_run_belongs():
    assert _version_belongs(version(), trial(TrialState.COMPLETE), {OWN: "FINISHED"}) is True


def test_a_version_of_another_run_of_a_complete_trial_does_not_belong():
    status = {OWN: "FINISHED", OTHER: "FINISHED"}
    assert _version_belongs(version(OTHER), trial(TrialState.COMPLETE), status) is False


@pytest.mark.parametrize("status", ["RUNNING", "FAILED", "KILLED"])
def test_a_version_of_a_run_that_did_not_finish_does_not_belong(status):
    assert _version_belongs(version(), trial(TrialState.COMPLETE), {OWN: status}) is False
    assert _version_belongs(version(), trial(TrialState.RUNNING), {OWN: status}) is False


@pytest.mark.parametrize("owner", [OWN, None])
def test_a_version_of_a_running_trials_finished_run_belongs(owner):
    # Its worker registers before it tells Optuna the trial is complete.
    assert _version_belongs(version(), trial(TrialState.RUNNING, owner), {OWN: "FINISHED"})


@pytest.mark.parametrize(
    "made",
    [
        lambda: trial(TrialState.FAIL),
        lambda: trial(TrialState.FAIL, error="RuntimeError: y"),
        lambda: trial(TrialState.PRUNED),
        lambda: trial(TrialState.WAITING),
    ],
    ids=["fail-died", "fail-error", "pruned", "waiting"],
)
def test_a_version_of_a_trial_that_did_not_complete_does_not_belong(made):
    assert _version_belongs(version(), made(), {OWN: "FINISHED"}) is False


def test_a_version_without_its_trial_does_not_belong():
    assert _version_belongs(version(), None, {OWN: "FINISHED"}) is False


# --- counted ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("made", "expected"),
    [
        (lambda: trial(TrialState.COMPLETE), True),
        (lambda: trial(TrialState.PRUNED), True),
        (lambda: trial(TrialState.FAIL, error="ValueError: bad"), True),
        (lambda: trial(TrialState.FAIL), False),
        (lambda: trial(TrialState.RUNNING), False),
        (lambda: trial(TrialState.WAITING), False),
    ],
    ids=["complete", "pruned", "fail-error", "fail-died", "running", "waiting"],
)
def test_counted(made, expected):
    assert counted(made()) is expected


# --- stop_reason -----------------------------------------------------------------------

T0 = datetime(2025, 1, 1)


def ended(*outcomes, order=None):
    """Trials numbered 0, 1, ... from outcomes (a value: COMPLETE; "pruned"; "error": a
    counted FAIL; "died": an uncounted FAIL), ending in `order` (trial numbers; default
    their own)."""
    trials = []
    for number, outcome in enumerate(outcomes):
        if isinstance(outcome, float):
            made = trial(TrialState.COMPLETE)
            made.value = outcome
        elif outcome == "pruned":
            made = trial(TrialState.PRUNED)
        else:
            made = trial(TrialState.FAIL, error="ValueError: bad" if outcome == "error" else None)
        made.number = number
        trials.append(made)
    for place, number in enumerate(order or range(len(trials))):
        trials[number].datetime_complete = T0 + timedelta(seconds=place)
    return trials


def test_no_stop_rule_never_stops():
    assert stop_reason(ended(0.99, "pruned", "pruned"), None) is None


def test_the_target_stops_once_a_trial_reaches_it():
    stop = StopConfig(target=0.95)
    assert stop_reason(ended(0.9, 0.94), stop) is None
    assert stop_reason(ended(0.9, 0.95, 0.93), stop) == (
        "target 0.95 reached: trial 1 has validation accuracy 0.9500"
    )


def test_patience_counts_trials_since_the_best_including_pruned_and_failed():
    stop = StopConfig(patience=3)
    assert stop_reason(ended(0.9, 0.8, "pruned"), stop) is None
    assert stop_reason(ended(0.9, 0.8, "pruned", "error"), stop) == (
        "patience 3 ran out: no trial in the 3 since trial 0 beat its validation accuracy 0.9000"
    )
    assert stop_reason(ended(0.9, 0.8, "pruned", 0.95), stop) is None  # a new best resets it
    assert stop_reason(ended(0.9, 0.9, 0.9, 0.9), stop) is not None  # a tie is no improvement
    # A trial lost with its worker is run again: it does not count.
    assert stop_reason(ended(0.9, 0.8, "died", "pruned"), stop) is None


def test_patience_follows_the_order_trials_ended_in_not_their_numbers():
    # Parallel workers: trial 2 (the best) ended before trial 1.
    trials = ended(0.9, 0.8, 0.95, order=[0, 2, 1])
    assert stop_reason(trials, StopConfig(patience=1)) == (
        "patience 1 ran out: no trial in the 1 since trial 2 beat its validation accuracy 0.9500"
    )
    assert stop_reason(ended(0.9, 0.8, 0.95), StopConfig(patience=1)) is None


def test_patience_without_any_complete_trial():
    assert stop_reason(ended("error", "error"), StopConfig(patience=2)) == (
        "patience 2 ran out: none of 2 trials completed"
    )


def test_either_rule_stops_a_study_with_both():
    stop = StopConfig(target=0.99, patience=2)
    assert stop_reason(ended(0.9, 0.8, 0.7), stop).startswith("patience 2 ran out")
    assert stop_reason(ended(0.995), stop).startswith("target 0.99 reached")


# --- make_sampler ----------------------------------------------------------------------

SPACE = {"lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True}}


def study_config(sampler_type: str = "tpe", seed: int | None = 42) -> StudyConfig:
    return StudyConfig(
        study_name="s", search_space=SPACE, sampler={"type": sampler_type, "seed": seed}
    )


def samples(sampler: optuna.samplers.BaseSampler, n: int = 4) -> list[float]:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=sampler)
    study.optimize(lambda t: t.suggest_float("x", 0.0, 1.0), n_trials=n)
    return [t.params["x"] for t in study.trials]


@pytest.mark.parametrize(
    ("sampler_type", "reference"),
    [
        (
            "tpe",
            lambda seed: optuna.samplers.TPESampler(
                seed=seed, n_startup_trials=5, multivariate=True, group=True, constant_liar=True
            ),
        ),
        ("random", lambda seed: optuna.samplers.RandomSampler(seed=seed)),
    ],
)
def test_the_first_worker_of_a_fresh_study_uses_the_seed_as_given(sampler_type, reference):
    config = study_config(sampler_type)
    sampler = make_sampler(config, trials_so_far=0, worker=0)
    assert type(sampler) is type(reference(42))
    ours = samples(sampler)
    assert ours == samples(reference(42))
    assert ours != samples(reference(43))  # the comparison can tell seeds apart


def test_other_workers_and_resumed_studies_get_other_seeds():
    config = study_config()
    runs = {
        (trials, worker): samples(make_sampler(config, trials, worker))
        for trials, worker in [(0, 0), (0, 1), (0, 2), (5, 0), (5, 1)]
    }
    distinct = {tuple(values) for values in runs.values()}
    assert len(distinct) == len(runs)
    # ... and still repeatable: the same place in the same study gives the same samples.
    assert samples(make_sampler(config, 5, 1)) == runs[(5, 1)]


def test_an_unseeded_sampler_stays_unseeded():
    config = study_config(seed=None)
    assert samples(make_sampler(config, 0, 0)) != samples(make_sampler(config, 0, 0))


def test_the_tpe_sampler_keeps_the_configured_startup_trials():
    config = StudyConfig(
        study_name="s", search_space=SPACE, sampler={"type": "tpe", "n_startup_trials": 7}
    )
    assert make_sampler(config, 3, 1)._n_startup_trials == 7


def test_the_tpe_options_are_given_to_optuna_not_left_to_its_defaults():
    # Optuna 4.x defaults both to off, 5.x to on: the config decides, on either.
    for options in (
        {"multivariate": True, "constant_liar": True},
        {"multivariate": False, "constant_liar": False},
    ):
        config = StudyConfig(study_name="s", search_space=SPACE, sampler=options)
        sampler = make_sampler(config, 0, 0)
        assert sampler._multivariate is options["multivariate"]
        assert sampler._group is options["multivariate"]  # group follows multivariate
        assert sampler._constant_liar is options["constant_liar"]


def pair_samples(sampler: optuna.samplers.BaseSampler, n: int = 6) -> list[tuple[float, float]]:
    """Samples of a two-parameter objective, past the sampler's two start-up trials."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=sampler)
    study.optimize(lambda t: t.suggest_float("x", 0, 1) + t.suggest_float("y", 0, 1), n_trials=n)
    return [(t.params["x"], t.params["y"]) for t in study.trials]


def test_a_study_samples_as_multivariate_tpe_with_constant_liar():
    config = StudyConfig(
        study_name="s", search_space=SPACE, sampler={"seed": 3, "n_startup_trials": 2}
    )

    def tpe(**options):
        return optuna.samplers.TPESampler(seed=3, n_startup_trials=2, **options)

    ours = pair_samples(make_sampler(config, 0, 0))
    assert ours == pair_samples(tpe(multivariate=True, group=True, constant_liar=True))
    assert ours != pair_samples(tpe(multivariate=False, constant_liar=False))  # 4.x's defaults


# --- storage ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tracking_uri", "expected"),
    [
        ("sqlite:////srv/team/mlflow.db", "sqlite:////srv/team/optuna.db"),
        ("sqlite:///mlflow.db", "sqlite:///optuna.db"),
        ("sqlite:///stores/tracking.db", "sqlite:///stores/optuna.db"),
        ("./mlruns", "sqlite:///optuna.db"),
        ("file:///srv/mlruns", "sqlite:///optuna.db"),
        ("http://mlflow.internal:5000", None),
        ("https://mlflow.example.com", None),
        ("postgresql+psycopg2://u:p@db/mlflow", None),
    ],
)
def test_default_storage_url(tracking_uri, expected):
    assert default_storage_url(tracking_uri) == expected


def test_open_storage_on_sqlite_has_heartbeats_and_retries(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path}/optuna.db", 3, 10)
    try:
        assert (storage.heartbeat_interval, storage.grace_period) == (3, 10)
        assert storage.get_heartbeat_stale_trial_callback() is not None
        assert (tmp_path / "optuna.db").is_file()
    finally:
        storage.engine.dispose()


def test_open_storage_errors_do_not_show_the_password():
    url = "postgresql+psycopg2://alice:s3cr3t@127.0.0.1:1/optuna"
    with pytest.raises(StudyError) as caught:
        open_storage(url, 1, 2)
    message = str(caught.value)
    assert "s3cr3t" not in message
    assert "postgresql+psycopg2://alice:***@127.0.0.1:1/optuna" in message
