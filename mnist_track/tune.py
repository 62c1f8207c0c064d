"""Optuna studies: search space -> TrainConfig, the objective (one tracked run per
trial), pruning, warm-start trials, the early stop, storage, resume, several workers on
one study, and the study summary. With reconciliation.py (what a killed worker left
half-done, put right) and study_plots.py (the summary's plots), the only modules that
import optuna; study_links.py names what links trials and runs.

MLflow layout: one parent run per study, one nested run `trial-<n>` per trial. Each side
finds the other: the trial's user attribute `mlflow_run_id`, the run's `optuna.*` tags.

Several workers (processes, machines) share a study through its storage. Every fact they
share lives there, never in one process: the trial count (trials are started under a
study lock, so N workers end with exactly n_trials counted trials), whether the study
has stopped early (decided from the stored trials, so every worker agrees), who is at work
(worker leases: the last to leave ends the parent run), and what a killed worker left
half-done (put right by `reconciliation.reconcile` whenever a worker starts or leaves).
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState

from mnist_track import descriptions, study_plots, timings, tracking
from mnist_track.config import (
    SCALAR_SEARCH_KEYS,
    CategoricalParam,
    FloatParam,
    IntParam,
    StopConfig,
    StudyConfig,
    TrainConfig,
)
from mnist_track.coordination import (
    WorkerLease,
    creating_store,
    is_database_file,
    sqlite_url,
    study_lock,
)
from mnist_track.data import MnistSplits
from mnist_track.errors import MnistTrackError
from mnist_track.faults import fault_point
from mnist_track.reconciliation import Reconciled, fail_stale_trials, reconcile
from mnist_track.redact import redact_text, redact_url
from mnist_track.runs import RunOutcome, TrialAbandoned, train_and_track
from mnist_track.study_links import (
    ERROR_ATTR,
    PARENT_RUN_ATTR,
    RETRIED_TRIAL_ATTR,
    RETRY_OF_TAG,
    ROLE_TAG,
    RUN_ID_ATTR,
    STATE_TAG,
    STOPPED_ATTR,
    STOPPED_TAG,
    WARM_START_ATTR,
)
from mnist_track.train import EpochMetrics

STORAGE_ATTEMPTS = 5  # opening a storage that other workers are creating at the same time
MAX_RETRIES = 3  # a trial whose worker keeps dying (out of memory, say) is not run for ever
WAIT_FOR_OTHERS_SECONDS = 1.0

warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
# Trials are started with ask/tell under the study lock, and their heartbeats are beaten
# by the worker lease's thread (coordination.py), which Optuna's warning cannot know.
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")


class StudyError(MnistTrackError, RuntimeError):
    """The study cannot start: bad storage, or a stored study that does not match."""


# --- storage ---------------------------------------------------------------------------


def default_storage_url(tracking_uri: str) -> str | None:
    """The embedded default: an SQLite file beside the MLflow database when tracking is
    SQLite (./optuna.db for a local folder store). None for a tracking server or shared
    database: workers elsewhere could never share a study kept in a local file."""
    if tracking_uri.startswith("sqlite:///"):
        database = Path(tracking_uri.removeprefix("sqlite:///"))
        return f"sqlite:///{database.with_name('optuna.db')}"
    if tracking.is_local_store(tracking_uri):
        return "sqlite:///optuna.db"
    return None


def open_storage(url: str, heartbeat_interval: int, grace_period: int):
    """An RDB storage with heartbeats, so trials of a process that died are failed by the
    next worker to look and queued to run again with the same parameters, while trials of
    live workers are left alone.

    Workers started together on a new database race to create Optuna's tables; the loser
    gets a duplicate-table or duplicate-key error, and simply tries again."""
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    def failure(error: Exception) -> StudyError:
        return StudyError(
            f"cannot open the Optuna storage {redact_url(url)!r}: {redact_text(str(error), url)}"
        )

    for attempt in range(STORAGE_ATTEMPTS):
        try:
            with creating_store(url):
                return optuna.storages.RDBStorage(
                    url,
                    heartbeat_interval=heartbeat_interval,
                    grace_period=grace_period,
                    **_retry_stale_trials(),
                )
        except (IntegrityError, ProgrammingError) as error:
            if attempt + 1 == STORAGE_ATTEMPTS:
                raise failure(error) from None
            time.sleep(0.2 + random.random() * 0.5)
        except Exception as error:  # noqa: BLE001 - bad URL, missing driver, refused connection
            raise failure(error) from None
    raise AssertionError("unreachable")


def _retry_stale_trials() -> dict[str, Any]:
    """Optuna's callback that re-queues a stale trial with its parameters, under the
    name each supported Optuna release knows (renamed in 5.0)."""
    storages = optuna.storages
    if hasattr(storages, "RetryHeartbeatStaleTrialCallback"):
        callback = storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES)
        return {"heartbeat_stale_trial_callback": callback}
    return {"failed_trial_callback": storages.RetryFailedTrialCallback(max_retry=MAX_RETRIES)}


# --- search space ----------------------------------------------------------------------


def suggest(trial: optuna.Trial, name: str, spec: IntParam | FloatParam | CategoricalParam):
    if isinstance(spec, IntParam):
        return trial.suggest_int(name, spec.low, spec.high, step=spec.step, log=spec.log)
    if isinstance(spec, FloatParam):
        return trial.suggest_float(name, spec.low, spec.high, log=spec.log)
    return trial.suggest_categorical(name, list(spec.choices))


def suggest_config(trial: optuna.Trial, study: StudyConfig) -> TrainConfig:
    """The fixed training settings with the trial's sampled values laid over them."""
    space, base = study.search_space, study.train
    values: dict[str, Any] = {
        key: suggest(trial, key, space[key]) for key in SCALAR_SEARCH_KEYS if key in space
    }
    for count_key, size_key, size_field in (
        ("hidden_layers", "hidden_units", "hidden_sizes"),
        ("conv_layers", "conv_channels", "channels"),
    ):
        if count_key not in space and size_key not in space:
            continue
        fixed = getattr(base, size_field)
        count = suggest(trial, count_key, space[count_key]) if count_key in space else len(fixed)
        if size_key in space:
            values[size_field] = tuple(
                suggest(trial, f"{size_key}_l{layer}", space[size_key]) for layer in range(count)
            )
        else:  # only the depth is searched: keep the fixed sizes, repeating the last one
            values[size_field] = tuple(fixed[min(layer, len(fixed) - 1)] for layer in range(count))
    return TrainConfig.model_validate(base.model_dump() | values)


def make_sampler(
    study: StudyConfig, trials_so_far: int, worker: int = 0
) -> optuna.samplers.BaseSampler:
    # A fresh study's first worker uses the seed as given (repeatable studies). Later
    # starts and other workers mix in the trials already run and the worker's place, so
    # a resumed study does not replay its start-up samples and parallel workers do not
    # sample each other's trials.
    seed = study.sampler.seed
    if seed is not None and (trials_so_far, worker) != (0, 0):
        seed = int(np.random.SeedSequence([seed, trials_so_far, worker]).generate_state(1)[0])
    sampler = study.sampler
    if sampler.type == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # Every option given, none left to Optuna's defaults (they changed in 5.0).
    return optuna.samplers.TPESampler(
        seed=seed,
        n_startup_trials=sampler.n_startup_trials,
        multivariate=sampler.multivariate,
        group=sampler.grouped,
        constant_liar=sampler.constant_liar,
    )


def make_pruner(study: StudyConfig) -> optuna.pruners.BasePruner:
    pruner = study.pruner
    if pruner.type == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=pruner.n_startup_trials, n_warmup_steps=pruner.n_warmup_steps
        )
    if pruner.type == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=study.train.epochs)
    return optuna.pruners.NopPruner()


# --- the objective ---------------------------------------------------------------------


class Objective:
    """One trial = one tracked training run. Data is loaded once, for all trials."""

    def __init__(
        self,
        study: StudyConfig,
        splits: MnistSplits,
        parent_run_id: str,
        storage: optuna.storages.BaseStorage,
        on_epoch: Callable[[int, EpochMetrics], None] | None = None,
        on_batches: Callable[[int, int], None] | None = None,
    ) -> None:
        self.study = study
        self.splits = splits
        self.parent_run_id = parent_run_id
        self.storage = storage
        self.on_epoch = on_epoch
        self.on_batches = on_batches

    def __call__(self, trial: optuna.Trial) -> float:
        run_ids: list[str] = []
        try:
            config = suggest_config(trial, self.study)
            outcome = self._train(trial, config, run_ids)
            trial.set_user_attr("test_accuracy", outcome.test.accuracy)
            trial.set_user_attr("model_version", outcome.model_version)
        except (optuna.TrialPruned, TrialAbandoned):
            raise
        except optuna.exceptions.UpdateFinishedTrialError:
            raise TrialAbandoned("the trial was failed by another worker") from None
        except KeyboardInterrupt:
            # Optuna records an interrupted trial as FAIL (without ERROR_ATTR, so it is run
            # again): say so on its run too, rather than leave the tag at RUNNING.
            if run_ids:
                with contextlib.suppress(Exception):  # never hide the interrupt
                    tracking.set_run_tags(run_ids[0], {STATE_TAG: TrialState.FAIL.name})
            raise
        except Exception as error:
            try:
                trial.set_user_attr(ERROR_ATTR, f"{type(error).__name__}: {error}"[:1000])
            except optuna.exceptions.UpdateFinishedTrialError:
                raise TrialAbandoned("the trial was failed by another worker") from None
            if run_ids:
                tracking.set_run_tags(run_ids[0], {STATE_TAG: TrialState.FAIL.name})
            raise
        tracking.set_run_tags(outcome.run_id, {STATE_TAG: TrialState.COMPLETE.name})
        return outcome.validation_accuracy

    def _train(self, trial: optuna.Trial, config: TrainConfig, run_ids: list[str]) -> RunOutcome:
        # Optuna keeps no public trial id; `_trial_id` is what its own optimize loop uses.
        trial_id = trial._trial_id

        def on_start(run_id: str) -> None:
            run_ids.append(run_id)
            trial.set_user_attr(RUN_ID_ATTR, run_id)

        def report(epoch: EpochMetrics) -> None:
            if self.on_epoch is not None:
                self.on_epoch(trial.number, epoch)
            with timings.phase("optuna report"):
                trial.report(epoch.validation_accuracy, epoch.epoch)
                prune = trial.should_prune()
            if prune:
                tracking.set_run_tags(
                    run_ids[0],
                    {STATE_TAG: TrialState.PRUNED.name, "optuna.pruned_at_epoch": epoch.epoch},
                )
                raise optuna.TrialPruned(f"pruned after epoch {epoch.epoch}")

        def still_wanted() -> bool:
            return self.storage.get_trial(trial_id).state == TrialState.RUNNING

        tags = {
            "optuna.study": self.study.study_name,
            "optuna.trial": trial.number,
            STATE_TAG: TrialState.RUNNING.name,
            descriptions.NOTE_TAG: descriptions.trial_note(
                self.study.study_name, trial.number, trial.params
            ),
        }
        retry_of = self.storage.get_trial(trial_id).system_attrs.get(RETRIED_TRIAL_ATTR)
        if retry_of is not None:
            tags[RETRY_OF_TAG] = retry_of
        return train_and_track(
            config,
            self.splits,
            experiment=self.study.experiment,
            registered_model=self.study.registered_model,
            run_name=f"trial-{trial.number}",
            parent_run_id=self.parent_run_id,
            extra_tags=tags,
            version_tags={"study": self.study.study_name, "trial": trial.number},
            on_epoch=report,
            on_batches=self.on_batches,
            on_start=on_start,
            killed_on=(optuna.TrialPruned, KeyboardInterrupt),
            still_wanted=still_wanted,
        )


# --- running a study -------------------------------------------------------------------


def counted(trial: FrozenTrial) -> bool:
    """Trials that count towards n_trials: complete, pruned, or failed by their own error.
    A trial whose process was interrupted or died does not count, so it is run again."""
    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    return trial.state == TrialState.FAIL and ERROR_ATTR in trial.user_attrs


@dataclass(frozen=True)
class StudyResult:
    study: optuna.Study
    parent_run_id: str
    storage_url: str
    ran: int  # trials run by this invocation
    reconciled: Reconciled = field(default_factory=Reconciled)
    abandoned: int = 0  # trials of this worker taken over by another (it was paused)
    parent_status: str = "RUNNING"  # RUNNING while other workers are still at work

    @property
    def stopped(self) -> str | None:
        """Why the study stopped before n_trials, as recorded on it; None if it did not."""
        return self.study.user_attrs.get(STOPPED_ATTR)

    @property
    def best_trial(self) -> FrozenTrial | None:
        complete = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        return max(complete, key=lambda t: t.value, default=None)

    def counts(self) -> dict[str, int]:
        trials = self.study.get_trials(deepcopy=False)
        return {
            state.name.lower(): sum(t.state == state for t in trials)
            for state in (
                TrialState.COMPLETE,
                TrialState.PRUNED,
                TrialState.FAIL,
                TrialState.RUNNING,
            )
        }


@timings.record("study")
def run_study(
    study_config: StudyConfig,
    splits: MnistSplits,
    storage_url: str,
    *,
    on_trial: Callable[[FrozenTrial], None] | None = None,
    on_epoch: Callable[[int, EpochMetrics], None] | None = None,
    on_batches: Callable[[int, int], None] | None = None,
    on_abandoned: Callable[[int], None] | None = None,
) -> StudyResult:
    """Join the study (creating it and its parent run if this worker is first), put right
    what killed workers left half-done, run trials until the study as a whole has its
    n_trials, and leave: the last worker to leave ends the parent run and logs the
    study's summary and plots."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(storage_url, study_config.heartbeat_interval, study_config.grace_period)

    def locked():
        return study_lock(storage.engine, study_config.study_name)

    with locked(), timings.phase("join"):
        study = _create_or_load(study_config, storage)
        describe_study(study, study_config)
        enqueue_warm_start(study, study_config)
        parent_run_id = ensure_parent_run(study, study_config, storage_url)
        with timings.phase("reconcile"):
            reconciled = reconcile(study, study_config)
        lease = WorkerLease(
            storage,
            storage.get_study_id_from_name(study_config.study_name),
            study_config.heartbeat_interval,
            study_config.grace_period,
        ).start()
        if tracking.run_status(parent_run_id) != "RUNNING":
            tracking.resume_run(parent_run_id)
    study.sampler = make_sampler(study_config, len(study.trials), lease.ordinal())
    objective = Objective(
        study_config, splits, parent_run_id, storage, on_epoch=on_epoch, on_batches=on_batches
    )
    work = _Work(study, storage, study_config, objective, lease, locked, on_trial, on_abandoned)
    how = "failed"
    try:
        with timings.phase("trials"):
            work.run()
        how = "left"
    except KeyboardInterrupt:
        how = "interrupted"
        raise
    finally:
        with timings.phase("leave"):
            parent_status, leaving = _leave(work, parent_run_id, how, storage_url)
        reconciled.add(work.reconciled)
        reconciled.add(leaving)
    return StudyResult(
        study,
        parent_run_id,
        storage_url,
        len(work.ran),
        reconciled,
        work.abandoned,
        parent_status,
    )


def _create_or_load(config: StudyConfig, storage) -> optuna.Study:
    try:
        return optuna.create_study(
            study_name=config.study_name,
            storage=storage,
            load_if_exists=True,
            direction="maximize",
            pruner=make_pruner(config),
        )
    except Exception as error:  # noqa: BLE001 - e.g. an existing study with other settings
        raise StudyError(f"cannot create or load study {config.study_name!r}: {error}") from None


def describe_study(study: optuna.Study, config: StudyConfig) -> None:
    """Name the objective and say where the study's runs and models are, so
    optuna-dashboard (and `optuna studies`) show a study that explains itself. Written
    only when different: a worker joining an existing study writes nothing."""
    if study.metric_names != [config.objective]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([config.objective])
    attrs = {
        "experiment": config.experiment,
        "registered_model": config.registered_model,
        "tracking_uri": redact_url(tracking.resolve_tracking_uri(None)),
        "searched": ", ".join(config.search_space),
        "config": config.model_dump(mode="json"),
    }
    for key, value in attrs.items():
        if study.user_attrs.get(key) != value:
            study.set_user_attr(key, value)


def enqueue_warm_start(study: optuna.Study, config: StudyConfig) -> int:
    """Queue the config's warm-start trials, in order, on a study that has no trial yet:
    once, at its creation (the caller holds the study lock, so a worker joining or a
    resume finds them queued or run, and queues nothing). Returns how many."""
    if not config.warm_start or study.get_trials(deepcopy=False):
        return 0
    for index, params in enumerate(config.warm_start):
        study.enqueue_trial(dict(params), user_attrs={WARM_START_ATTR: index})
    return len(config.warm_start)


# --- early stop ------------------------------------------------------------------------


def stop_reason(trials: list[FrozenTrial], stop: StopConfig | None) -> str | None:
    """Why the study should stop before n_trials, from its trials alone (so every worker
    reaches the same answer); None to go on. Patience counts counted trials in the order
    they ended since the one that set the best value."""
    if stop is None:
        return None
    ended = sorted(
        (t for t in trials if counted(t)),
        key=lambda t: (t.datetime_complete or datetime.max, t.number),
    )
    best, since = None, 0
    for trial in ended:
        if trial.state == TrialState.COMPLETE and (best is None or trial.value > best.value):
            best, since = trial, 0
        else:
            since += 1
    if stop.target is not None and best is not None and best.value >= stop.target:
        return (
            f"target {stop.target:g} reached: trial {best.number} has validation accuracy "
            f"{best.value:.4f}"
        )
    if stop.patience is not None and since >= stop.patience:
        if best is None:
            return f"patience {stop.patience} ran out: none of {since} trials completed"
        return (
            f"patience {stop.patience} ran out: no trial in the {since} since trial "
            f"{best.number} beat its validation accuracy {best.value:.4f}"
        )
    return None


@dataclass
class _Work:
    """One worker's share of a study: take the next trial while the study needs one,
    run it, tell Optuna, repeat."""

    study: optuna.Study
    storage: Any
    config: StudyConfig
    objective: Objective
    lease: WorkerLease
    locked: Callable[[], Any]
    on_trial: Callable[[FrozenTrial], None] | None
    on_abandoned: Callable[[int], None] | None
    ran: list[int] = field(default_factory=list)
    abandoned: int = 0
    reconciled: Reconciled = field(default_factory=Reconciled)

    def run(self) -> None:
        timeout = self.config.timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        while deadline is None or time.monotonic() < deadline:
            with self.locked(), timings.phase("optuna ask"):
                trial, done = self._next_trial()
            if done:
                return
            if trial is None:
                # The trials left are running on other workers: wait, in case one of them
                # dies and its trial has to be run again.
                time.sleep(WAIT_FOR_OTHERS_SECONDS)
                continue
            self._run(trial)

    def _next_trial(self) -> tuple[optuna.Trial | None, bool]:
        """Under the study lock: a trial to run (a queued retry first), or None when the
        remaining trials are all taken; True when the study has all its trials."""
        self.reconciled.trials_failed += fail_stale_trials(self.study)
        trials = self.study.get_trials(deepcopy=False)
        n_trials = self.config.n_trials
        done = sum(counted(t) for t in trials)
        if n_trials is not None and done >= n_trials:
            return None, True
        if self._stopped_early(trials):
            return None, True
        if n_trials is not None:
            taken = sum(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials)
            queued = any(t.state == TrialState.WAITING for t in trials)
            if done + taken >= n_trials and not queued:
                return None, False
        trial = self.study.ask()
        self.lease.running(trial._trial_id)  # heartbeat now, so it can go stale if we die
        return trial, False

    def _stopped_early(self, trials: list[FrozenTrial]) -> bool:
        """The study-wide early stop, kept on the study so a resume (and the summary) can
        say why; cleared when a loosened stop rule lets the study go on."""
        reason = stop_reason(trials, self.config.stop)
        if reason != self.study.user_attrs.get(STOPPED_ATTR):
            self.study.set_user_attr(STOPPED_ATTR, reason)
        return reason is not None

    def _run(self, trial: optuna.Trial) -> None:
        try:
            state, value = TrialState.COMPLETE, None
            try:
                value = self.objective(trial)
            except optuna.TrialPruned:
                state = TrialState.PRUNED
            except TrialAbandoned:
                state = None
            except KeyboardInterrupt:
                self._tell(trial, TrialState.FAIL)
                raise
            except Exception:  # noqa: BLE001 - recorded on the trial and its run; go on
                state = TrialState.FAIL
            if state == TrialState.COMPLETE:
                fault_point("before_tell")
            with timings.phase("optuna tell"):
                told = None if state is None else self._tell(trial, state, value)
        finally:
            self.lease.running(None)
        if told is None:
            self._give_up(trial)
            return
        self.ran.append(trial.number)
        if self.on_trial is not None:
            self.on_trial(told)

    def _tell(self, trial: optuna.Trial, state: TrialState, value: float | None = None):
        """Tell Optuna how the trial ended; None if it is no longer this worker's."""
        if self.storage.get_trial(trial._trial_id).state.is_finished():
            return None
        try:
            return self.study.tell(trial, value, state=state)
        except (ValueError, RuntimeError, optuna.exceptions.UpdateFinishedTrialError):
            return None  # failed by another worker between the check and the tell

    def _give_up(self, trial: optuna.Trial) -> None:
        """This worker's trial was failed by another (this one was paused past the grace
        period) and is being run again: withdraw what it logged meanwhile."""
        self.abandoned += 1
        with self.locked():
            self.reconciled.add(reconcile(self.study, self.config))
        if self.on_abandoned is not None:
            self.on_abandoned(trial.number)


def _leave(work: _Work, parent_run_id: str, how: str, storage_url: str):
    """Release this worker's lease; the last active worker ends the parent run:
    FINISHED, or KILLED if it was interrupted, FAILED if it crashed. Returns the parent's
    status and what the final reconciliation put right."""
    reconciled = Reconciled()
    work.lease.release(how)
    # The lease is released first, so of two workers leaving together at least one sees
    # the other gone and ends the parent.
    if work.lease.others_active():
        return "RUNNING", reconciled
    if how == "left":
        with work.locked(), timings.phase("reconcile"):
            reconciled = reconcile(work.study, work.config)
        result = StudyResult(work.study, parent_run_id, storage_url, len(work.ran))
        with timings.phase("summary"):
            log_study_summary(tracking.run_log(parent_run_id), result, work.config)
    status = {"left": "FINISHED", "interrupted": "KILLED"}.get(how, "FAILED")
    tracking.end_run(parent_run_id, status)
    return status, reconciled


def ensure_parent_run(study: optuna.Study, config: StudyConfig, storage_url: str) -> str:
    """The study's parent run, created by the first worker (the caller holds the study
    lock, so only one creates it). Under `mlflow run`, the launcher's run is the parent."""
    existing = study.user_attrs.get(PARENT_RUN_ATTR)
    if existing and tracking.run_status(existing) is not None:
        return existing
    tags = {
        "optuna.study": config.study_name,
        ROLE_TAG: "study",
        "optuna.storage": redact_url(storage_url),
        descriptions.NOTE_TAG: _study_note(config),
    }
    run_id = tracking.launcher_run_id()
    if run_id:
        tracking.set_run_tags(run_id, tags)
    else:
        run_id = tracking.create_run(config.experiment, config.study_name, tags)
    fault_point("parent_run_created")
    log = tracking.run_log(run_id)
    log.log_params(_study_params(config))
    log.log_text(
        yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), "study_config.yaml"
    )
    study.set_user_attr(PARENT_RUN_ATTR, run_id)
    return run_id


def _study_params(study: StudyConfig) -> dict[str, Any]:
    # Namespaced, so they cannot clash with the MLproject's parameters on a launcher run.
    params = {
        "study.name": study.study_name,
        "study.n_trials": study.n_trials,
        "study.timeout": study.timeout,
        "study.sampler": study.sampler.type,
        "study.sampler_seed": study.sampler.seed,
        "study.warm_start_trials": len(study.warm_start),
        "study.stop_target": study.stop and study.stop.target,
        "study.stop_patience": study.stop and study.stop.patience,
        "study.pruner": study.pruner.type,
        "study.objective": study.objective,
        "study.registered_model": study.registered_model,
    }
    if study.sampler.type == "tpe":
        params["study.sampler_multivariate"] = study.sampler.multivariate
        params["study.sampler_group"] = study.sampler.grouped
        params["study.sampler_constant_liar"] = study.sampler.constant_liar
    params |= {f"train.{k}": v for k, v in study.train.to_params().items()}
    params |= {
        f"search.{k}": spec.model_dump_json(exclude={"type"})
        for k, spec in study.search_space.items()
    }
    return params


# --- the summary -----------------------------------------------------------------------


def _study_note(
    config: StudyConfig, best: FrozenTrial | None = None, stopped: str | None = None
) -> str:
    return descriptions.study_note(
        config.study_name,
        n_trials=config.n_trials,
        searched=list(config.search_space),
        registered_model=config.registered_model,
        best=(best.number, best.value, best.params) if best is not None else None,
        stopped=stopped,
    )


def log_study_summary(parent: tracking.RunLog, result: StudyResult, config: StudyConfig) -> None:
    """Parent-run metrics, its description (now with the best trial), the trials table
    and Optuna's plots."""
    counts = result.counts()
    metrics = {f"trials/{state}": count for state, count in counts.items() if state != "running"}
    best = result.best_trial
    if best is not None:
        metrics["best/validation_accuracy"] = best.value
        if "test_accuracy" in best.user_attrs:
            metrics["best/test_accuracy"] = best.user_attrs["test_accuracy"]
        metrics["best/trial"] = best.number
    # Optuna's plots are most of the summary's time: drawn in the figure workers while
    # the rest is logged here.
    plot_names = study_plots.plot_names(result.study.get_trials(deepcopy=False))
    plotting = study_plots.render_async(result.study) if plot_names else None
    parent.log_metrics(metrics, step=len(result.study.trials))
    tags = {descriptions.NOTE_TAG: _study_note(config, best, result.stopped)}
    if STOPPED_ATTR in result.study.user_attrs:  # stopped once; "no" if it then went on
        tags[STOPPED_TAG] = result.stopped or "no"
    parent.set_tags(tags)
    table = result.study.trials_dataframe(
        attrs=("number", "state", "value", "params", "user_attrs", "duration")
    )
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "trials.csv"
        table.to_csv(path, index=False)
        parent.log_artifact(path, "study")
    pngs = {}
    try:
        pngs = plotting.pngs() if plotting is not None else {}
    except Exception as error:  # noqa: BLE001 - the plots are not worth the summary
        logging.getLogger(__name__).warning("study plots skipped: %s", error)
    for name in plot_names:
        if f"{name}.png" not in pngs:
            logging.getLogger(__name__).warning("study plot %s skipped: Optuna failed", name)
    if pngs:
        parent.log_pngs(pngs, "study")


def _sqlite_file(storage_url: str) -> str | None:
    """The database file of an SQLite storage URL; None for other databases."""
    url = sqlite_url(storage_url)  # None when not a URL at all: Optuna says so
    if url is None or not is_database_file(url.database):
        return None
    return url.database


def study_summaries(storage_url: str) -> list[dict[str, Any]]:
    """Name, trial counts by outcome and best value of every study in a storage (read
    only: a storage that does not exist is an error, not created)."""
    database = _sqlite_file(storage_url)
    if database is not None and not Path(database).is_file():
        raise StudyError(f"no Optuna storage at {database} (nothing has been tuned there yet)")
    try:
        storage = optuna.storages.RDBStorage(storage_url, skip_table_creation=True)
        summaries = optuna.get_all_study_summaries(storage, include_best_trial=True)
    except Exception as error:  # noqa: BLE001
        raise StudyError(
            f"cannot read studies from {redact_url(storage_url)!r}: "
            + redact_text(str(error), storage_url)
        ) from None
    rows = []
    for summary in summaries:
        best = summary.best_trial
        trials = storage.get_all_trials(summary._study_id, deepcopy=False)
        rows.append(
            {
                "study": summary.study_name,
                "trials": summary.n_trials,
                "counted": sum(counted(t) for t in trials),
                "retried": sum(
                    t.state == TrialState.FAIL and ERROR_ATTR not in t.user_attrs for t in trials
                ),
                "running": sum(t.state == TrialState.RUNNING for t in trials),
                "best_value": best.value if best else math.nan,
                "best_trial": best.number if best else None,
                "stopped_early": summary.user_attrs.get(STOPPED_ATTR),
                "started": summary.datetime_start,
            }
        )
    return rows
