"""Reconciliation: what killed or paused workers of a study left half-done, put right
by whichever worker next starts or leaves (under the study lock). Every fact it needs is
in the stores (the trials in Optuna's storage, the runs and versions in MLflow), so any
worker reaches the same verdicts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from mnist_track import registry, tracking
from mnist_track.config import StudyConfig
from mnist_track.data import validation_digest
from mnist_track.study_links import ERROR_ATTR, PARENT_RUN_ATTR, ROLE_TAG, RUN_ID_ATTR, STATE_TAG


@dataclass
class Reconciled:
    """What a start (or end) of a worker found half-done and put right."""

    trials_failed: int = 0  # stale trials failed, and queued to run again
    runs_ended: int = 0
    versions_removed: list[str] = field(default_factory=list)
    parents_discarded: int = 0

    def add(self, other: Reconciled) -> None:
        self.trials_failed += other.trials_failed
        self.runs_ended += other.runs_ended
        self.versions_removed += other.versions_removed
        self.parents_discarded += other.parents_discarded

    def __bool__(self) -> bool:
        return bool(
            self.trials_failed or self.runs_ended or self.versions_removed or self.parents_discarded
        )


def reconcile(study: optuna.Study, config: StudyConfig) -> Reconciled:
    """Put right what killed or paused workers left half-done; the caller holds the study
    lock. Stale trials are failed (and queued to run again with the same parameters);
    runs left RUNNING by a trial that ended, or FINISHED by one that never completed, are
    ended FAILED; versions that do not belong to a COMPLETE trial's FINISHED run are
    removed; parent-run candidates that were never recorded are discarded; `champion` is
    decided again if a version went."""
    report = Reconciled(trials_failed=fail_stale_trials(study))
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    parent = study.user_attrs.get(PARENT_RUN_ATTR)
    # Trials live in their parent's experiment (under `mlflow run`, the launcher's), and
    # unrecorded parent candidates in the configured one.
    experiments = [config.experiment] + [tracking.experiment_of(parent)] * bool(parent)
    status: dict[str, str] = {}
    tagged = {"optuna.study": config.study_name}
    for run in tracking.runs_tagged([e for e in experiments if e], tagged):
        run_id, tags = run.info.run_id, run.data.tags
        status[run_id] = run.info.status
        if tags.get(ROLE_TAG) == "study":
            if run_id != parent and run.info.status == "RUNNING":
                tracking.discard_run(run_id)
                report.parents_discarded += 1
            continue
        verdict = _verdict(run, trials.get(_int(tags.get("optuna.trial"))))
        if verdict is None:
            continue
        ended, state, reason = verdict
        if tracking.end_stale_run(run_id, ended, reason, also=("FINISHED",)):
            tracking.set_run_tags(run_id, {STATE_TAG: state})
            status[run_id] = ended
            report.runs_ended += 1
    for version in registry.versions_of(config.registered_model, {"study": config.study_name}):
        trial = trials.get(_int(version.tags.get("trial")))
        if not _version_belongs(version, trial, status):
            registry.delete_version(config.registered_model, str(version.version))
            report.versions_removed.append(str(version.version))
    # Always decided again: a worker that died (or lost every race) while crowning may
    # have left `champion` on a version that is no longer the best.
    split = validation_digest(config.train.val_size, config.train.split_seed)
    registry.crown_champion(config.registered_model, split)
    return report


def fail_stale_trials(study: optuna.Study) -> int:
    """Fail the trials whose worker stopped beating (Optuna queues each again with the
    same parameters); returns how many."""
    failed_before = len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,)))
    optuna.storages.fail_stale_trials(study)
    return len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,))) - failed_before


def _verdict(run, trial: FrozenTrial | None) -> tuple[str, str, str] | None:
    """How a trial run that should not be RUNNING (or FINISHED) must end, if at all:
    (run status, optuna.state tag, reason)."""
    running = run.info.status == "RUNNING"
    if trial is None:
        return ("FAILED", "FAIL", "its trial does not exist") if running else None
    if trial.state == TrialState.RUNNING:
        return None  # a live worker's, or stale and failed on a later pass
    own = trial.user_attrs.get(RUN_ID_ATTR) == run.info.run_id
    finished = run.info.status == "FINISHED"
    if trial.state == TrialState.FAIL and ERROR_ATTR not in trial.user_attrs:
        if running or finished:
            return "FAILED", "FAIL", "the trial's process stopped before it finished"
        return None
    if trial.state == TrialState.FAIL and finished:
        # e.g. registering its model failed after the run had ended: a FINISHED run
        # promises a COMPLETE trial.
        return "FAILED", "FAIL", "the trial failed with its own error after its run ended"
    if not running:
        return None
    if trial.state == TrialState.PRUNED and own:
        return "KILLED", "PRUNED", "the trial was pruned"
    if trial.state == TrialState.COMPLETE and own:
        return None
    if trial.state == TrialState.FAIL and own:
        return "FAILED", "FAIL", "the trial failed with its own error"
    return "FAILED", trial.state.name, "another run holds this trial's result"


def _version_belongs(version, trial: FrozenTrial | None, status: dict[str, str]) -> bool:
    """A version may exist only for a FINISHED run of a COMPLETE trial (or of a trial
    still running: its worker registers before it tells Optuna)."""
    run_status = status.get(version.run_id) or tracking.run_status(version.run_id)
    if trial is None or run_status != "FINISHED":
        return False
    if trial.state == TrialState.RUNNING:
        return True
    return trial.state == TrialState.COMPLETE and trial.user_attrs.get(RUN_ID_ATTR) == (
        version.run_id
    )


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return -1
