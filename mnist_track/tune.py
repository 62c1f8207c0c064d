"""Optuna studies, the only module that imports optuna: search space -> TrainConfig, the
objective (one tracked run per trial), pruning, storage, resume, and the study summary.

MLflow layout: one parent run per study, one nested run `trial-<n>` per trial. Each side
finds the other: the trial's user attribute `mlflow_run_id`, the run's `optuna.*` tags.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState

from mnist_track import tracking
from mnist_track.config import (
    SCALAR_SEARCH_KEYS,
    CategoricalParam,
    FloatParam,
    IntParam,
    StudyConfig,
    TrainConfig,
)
from mnist_track.data import MnistSplits
from mnist_track.runs import RunOutcome, train_and_track
from mnist_track.train import EpochMetrics

RUN_ID_ATTR = "mlflow_run_id"
ERROR_ATTR = "error"  # set on trials that failed by their own error (they count as done)
PARENT_RUN_ATTR = "mlflow_parent_run_id"
STATE_TAG = "optuna.state"
CLAIM_WINDOW_SECONDS = 600  # parent-run candidates of workers that started together
CLAIM_SETTLE_SECONDS = 1.0
STORAGE_ATTEMPTS = 5  # opening a storage that other workers are creating at the same time

warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


class StudyError(RuntimeError):
    """The study cannot start: bad storage, or a stored study that does not match."""


# --- storage ---------------------------------------------------------------------------


def default_storage_url(tracking_uri: str) -> str:
    """An SQLite file beside the MLflow database when tracking is SQLite, else ./optuna.db."""
    if tracking_uri.startswith("sqlite:///"):
        database = Path(tracking_uri.removeprefix("sqlite:///"))
        return f"sqlite:///{database.with_name('optuna.db')}"
    return "sqlite:///optuna.db"


def open_storage(url: str, heartbeat_interval: int, grace_period: int):
    """An RDB storage with heartbeats, so trials of a process that died are failed (and
    re-run) by the next process, while trials of live workers are left alone.

    Workers started together on a new database race to create Optuna's tables; the loser
    gets a duplicate-table or duplicate-key error, and simply tries again."""
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    for attempt in range(STORAGE_ATTEMPTS):
        try:
            return optuna.storages.RDBStorage(
                url, heartbeat_interval=heartbeat_interval, grace_period=grace_period
            )
        except (IntegrityError, ProgrammingError) as error:
            if attempt + 1 == STORAGE_ATTEMPTS:
                raise StudyError(f"cannot open the Optuna storage {url!r}: {error}") from None
            time.sleep(0.2 + random.random() * 0.5)
        except Exception as error:  # noqa: BLE001 - bad URL, missing driver, refused connection
            raise StudyError(f"cannot open the Optuna storage {url!r}: {error}") from None
    raise AssertionError("unreachable")


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
    for count_key, size_key, field in (
        ("hidden_layers", "hidden_units", "hidden_sizes"),
        ("conv_layers", "conv_channels", "channels"),
    ):
        if count_key not in space and size_key not in space:
            continue
        fixed = getattr(base, field)
        count = suggest(trial, count_key, space[count_key]) if count_key in space else len(fixed)
        if size_key in space:
            values[field] = tuple(
                suggest(trial, f"{size_key}_l{layer}", space[size_key]) for layer in range(count)
            )
        else:  # only the depth is searched: keep the fixed sizes, repeating the last one
            values[field] = tuple(fixed[min(layer, len(fixed) - 1)] for layer in range(count))
    return TrainConfig.model_validate(base.model_dump() | values)


def make_sampler(study: StudyConfig, trials_so_far: int) -> optuna.samplers.BaseSampler:
    # Offset the seed by the trials already run, so a resumed study does not replay the
    # random start-up samples it drew before.
    seed = None if study.sampler.seed is None else study.sampler.seed + trials_so_far
    if study.sampler.type == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=study.sampler.n_startup_trials)


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
        on_epoch: Callable[[int, EpochMetrics], None] | None = None,
    ) -> None:
        self.study = study
        self.splits = splits
        self.parent_run_id = parent_run_id
        self.on_epoch = on_epoch
        self.outcomes: dict[int, RunOutcome] = {}

    def __call__(self, trial: optuna.Trial) -> float:
        config = suggest_config(trial, self.study)
        run_ids: list[str] = []

        def on_start(run_id: str) -> None:
            run_ids.append(run_id)
            trial.set_user_attr(RUN_ID_ATTR, run_id)

        def report(epoch: EpochMetrics) -> None:
            if self.on_epoch is not None:
                self.on_epoch(trial.number, epoch)
            trial.report(epoch.validation_accuracy, epoch.epoch)
            if trial.should_prune():
                tracking.set_run_tags(
                    run_ids[0],
                    {STATE_TAG: TrialState.PRUNED.name, "optuna.pruned_at_epoch": epoch.epoch},
                )
                raise optuna.TrialPruned(f"pruned after epoch {epoch.epoch}")

        try:
            outcome = train_and_track(
                config,
                self.splits,
                experiment=self.study.experiment,
                registered_model=self.study.registered_model,
                run_name=f"trial-{trial.number}",
                parent_run_id=self.parent_run_id,
                extra_tags={
                    "optuna.study": self.study.study_name,
                    "optuna.trial": trial.number,
                    STATE_TAG: TrialState.RUNNING.name,
                },
                version_tags={"study": self.study.study_name, "trial": trial.number},
                on_epoch=report,
                on_start=on_start,
                killed_on=(optuna.TrialPruned, KeyboardInterrupt),
            )
        except optuna.TrialPruned:
            raise
        except KeyboardInterrupt:
            # Optuna records an interrupted trial as FAIL (without ERROR_ATTR, so it is run
            # again): say so on its run too, rather than leave the tag at RUNNING.
            if run_ids:
                with contextlib.suppress(Exception):  # never hide the interrupt
                    tracking.set_run_tags(run_ids[0], {STATE_TAG: TrialState.FAIL.name})
            raise
        except Exception as error:
            trial.set_user_attr(ERROR_ATTR, f"{type(error).__name__}: {error}"[:1000])
            if run_ids:
                tracking.set_run_tags(run_ids[0], {STATE_TAG: TrialState.FAIL.name})
            raise
        trial.set_user_attr("test_accuracy", outcome.test.accuracy)
        trial.set_user_attr("model_version", outcome.model_version)
        tracking.set_run_tags(outcome.run_id, {STATE_TAG: TrialState.COMPLETE.name})
        self.outcomes[trial.number] = outcome
        return outcome.validation_accuracy


# --- running a study -------------------------------------------------------------------


def counted(trial: FrozenTrial) -> bool:
    """Trials that count towards n_trials: complete, pruned, or failed by their own error.
    A trial whose process was interrupted or died does not count, so it is run again."""
    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    return trial.state == TrialState.FAIL and ERROR_ATTR in trial.user_attrs


def reconcile_interrupted(study: optuna.Study) -> int:
    """Fail trials whose process died (stale heartbeat) and end their MLflow runs, and
    any run of an already-failed trial still marked RUNNING. Returns runs ended."""
    optuna.storages.fail_stale_trials(study)
    ended = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        run_id = trial.user_attrs.get(RUN_ID_ATTR)
        if run_id and tracking.end_stale_run(
            run_id, "FAILED", reason="the trial's process stopped before it finished"
        ):
            tracking.set_run_tags(run_id, {STATE_TAG: TrialState.FAIL.name})
            ended += 1
    return ended


@dataclass(frozen=True)
class StudyResult:
    study: optuna.Study
    parent_run_id: str
    storage_url: str
    ran: int  # trials run by this invocation

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


def run_study(
    study_config: StudyConfig,
    splits: MnistSplits,
    storage_url: str,
    *,
    on_trial: Callable[[FrozenTrial], None] | None = None,
    on_epoch: Callable[[int, EpochMetrics], None] | None = None,
) -> StudyResult:
    """Create or resume the study, run the trials still missing, and log the study's
    summary and plots on its parent run."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(storage_url, study_config.heartbeat_interval, study_config.grace_period)
    try:
        study = optuna.create_study(
            study_name=study_config.study_name,
            storage=storage,
            load_if_exists=True,
            direction="maximize",
            pruner=make_pruner(study_config),
        )
    except Exception as error:  # noqa: BLE001 - e.g. an existing study with other settings
        raise StudyError(
            f"cannot create or load study {study_config.study_name!r}: {error}"
        ) from None
    reconcile_interrupted(study)
    study.sampler = make_sampler(study_config, len(study.trials))
    remaining = remaining_trials(study, study_config.n_trials)
    parent_run_id = study.user_attrs.get(PARENT_RUN_ATTR) or claim_parent_run(
        study, study_config, storage_url
    )
    with tracking.start_run(
        study_config.experiment, study_config.study_name, run_id=parent_run_id
    ) as parent:
        objective = Objective(study_config, splits, parent.run_id, on_epoch=on_epoch)
        # Trials this process ran: other workers on the same storage add trials meanwhile.
        ran: list[int] = []
        callbacks = [
            lambda _study, trial: ran.append(trial.number),
            _stop_when_enough(study_config.n_trials),
        ]
        if on_trial is not None:
            callbacks.append(lambda _study, trial: on_trial(trial))
        if remaining is None or remaining > 0:
            study.optimize(
                objective,
                n_trials=remaining,
                timeout=study_config.timeout,
                catch=(Exception,),
                callbacks=callbacks,
                gc_after_trial=False,
            )
        reconcile_interrupted(study)
        result = StudyResult(study, parent.run_id, storage_url, len(ran))
        log_study_summary(parent, result)
    return result


def claim_parent_run(study: optuna.Study, config: StudyConfig, storage_url: str) -> str:
    """Create the study's parent run, once, even when workers start together: each worker
    creates a candidate, waits a moment, then all pick the oldest candidate and the others
    discard theirs. Under `mlflow run`, the launcher's run is the parent."""
    tags = {
        "optuna.study": config.study_name,
        "mnist_track.role": "study",
        "optuna.storage": _safe_url(storage_url),
    }
    launcher_run = tracking.launcher_run_id()
    if launcher_run:
        tracking.set_run_tags(launcher_run, tags)
        chosen = mine = launcher_run
    else:
        mine = tracking.create_run(config.experiment, config.study_name, tags)
        # Let the candidates of workers that started together reach the store, so that
        # all of them choose among the same set.
        time.sleep(CLAIM_SETTLE_SECONDS)
        recent_ms = int((time.time() - CLAIM_WINDOW_SECONDS) * 1000)
        candidates = tracking.running_runs_tagged(config.experiment, tags, since_ms=recent_ms)
        chosen = candidates[0] if candidates else mine
        if chosen != mine:
            tracking.discard_run(mine)
    if chosen == mine:
        study.set_user_attr(PARENT_RUN_ATTR, mine)
        log = tracking.run_log(mine)
        log.log_params(_study_params(config))
        log.log_text(
            yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), "study_config.yaml"
        )
    return chosen


def remaining_trials(study: optuna.Study, n_trials: int | None) -> int | None:
    if n_trials is None:
        return None
    return max(0, n_trials - sum(counted(t) for t in study.get_trials(deepcopy=False)))


def _stop_when_enough(n_trials: int | None):
    """Stop when the study as a whole has enough trials: with several workers on one
    storage, each worker's own count is not enough."""

    def callback(study: optuna.Study, _trial: FrozenTrial) -> None:
        if n_trials is not None and remaining_trials(study, n_trials) == 0:
            study.stop()

    return callback


def _study_params(study: StudyConfig) -> dict[str, Any]:
    # Namespaced, so they cannot clash with the MLproject's parameters on a launcher run.
    params = {
        "study.name": study.study_name,
        "study.n_trials": study.n_trials,
        "study.timeout": study.timeout,
        "study.sampler": study.sampler.type,
        "study.sampler_seed": study.sampler.seed,
        "study.pruner": study.pruner.type,
        "study.objective": study.objective,
        "study.registered_model": study.registered_model,
    }
    params |= {f"train.{k}": v for k, v in study.train.to_params().items()}
    params |= {
        f"search.{k}": spec.model_dump_json(exclude={"type"})
        for k, spec in study.search_space.items()
    }
    return params


def _safe_url(url: str) -> str:
    """A storage URL without its password, for tags."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001
        return url.split("@")[-1]


# --- the summary -----------------------------------------------------------------------


def log_study_summary(parent: tracking.RunLog, result: StudyResult) -> None:
    """Parent-run metrics, the trials table and Optuna's plots."""
    counts = result.counts()
    metrics = {f"trials/{state}": count for state, count in counts.items() if state != "running"}
    best = result.best_trial
    if best is not None:
        metrics["best/validation_accuracy"] = best.value
        if "test_accuracy" in best.user_attrs:
            metrics["best/test_accuracy"] = best.user_attrs["test_accuracy"]
        metrics["best/trial"] = best.number
    parent.log_metrics(metrics, step=len(result.study.trials))
    table = result.study.trials_dataframe(
        attrs=("number", "state", "value", "params", "user_attrs", "duration")
    )
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "trials.csv"
        table.to_csv(path, index=False)
        parent.log_artifact(path, "study")
    for name, figure in study_figures(result.study):
        parent.log_figure(figure, f"study/{name}.png")


def study_figures(study: optuna.Study):
    """Optuna's matplotlib plots that this study has enough trials for."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as optuna_plots

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    plotters: dict[str, Callable] = {
        "optimization_history": optuna_plots.plot_optimization_history,
        "intermediate_values": optuna_plots.plot_intermediate_values,
        "slice": optuna_plots.plot_slice,
        "parallel_coordinate": optuna_plots.plot_parallel_coordinate,
    }
    if len(complete) >= 2 and _varied_params(complete):
        plotters["param_importances"] = optuna_plots.plot_param_importances
    for name, plot in plotters.items():
        if not complete:
            break
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                axes = plot(study)
        except Exception as error:  # noqa: BLE001 - a plot that cannot be drawn is skipped
            logging.getLogger(__name__).warning("study plot %s skipped: %s", name, error)
            continue
        first = axes.flat[0] if hasattr(axes, "flat") else axes
        figure = first.figure
        figure.set_size_inches(max(figure.get_figwidth(), 8), max(figure.get_figheight(), 5))
        yield name, figure
        plt.close(figure)


def _varied_params(trials: list[FrozenTrial]) -> bool:
    names = {name for trial in trials for name in trial.params}
    return any(len({repr(t.params.get(n)) for t in trials}) > 1 for n in names)


def study_summaries(storage_url: str) -> list[dict[str, Any]]:
    """Name, trial counts and best value of every study in a storage."""
    try:
        summaries = optuna.get_all_study_summaries(storage_url, include_best_trial=True)
    except Exception as error:  # noqa: BLE001
        raise StudyError(f"cannot read studies from {storage_url!r}: {error}") from None
    rows = []
    for summary in summaries:
        best = summary.best_trial
        rows.append(
            {
                "study": summary.study_name,
                "trials": summary.n_trials,
                "best_value": best.value if best else math.nan,
                "best_trial": best.number if best else None,
                "started": summary.datetime_start,
            }
        )
    return rows
