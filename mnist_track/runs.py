"""One tracked training run: fit, evaluate on the test set, log everything to MLflow,
end the run, then register the model and let `champion` follow the rule. Used by
`mnist-track train` and by every trial of a study."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from mnist_track import descriptions, plots, registry, timings, tracking
from mnist_track.config import TrainConfig
from mnist_track.data import MnistSplits
from mnist_track.faults import fault_point
from mnist_track.metrics import ClassificationReport, classification_report
from mnist_track.models import architecture_of, count_parameters, describe_architecture
from mnist_track.pixels import to_pixels
from mnist_track.train import EpochMetrics, FitResult, fit, predict_logits, resolve_precision

GRID_SIZE = 32  # digits per prediction grid
# What a run's description lists: the settings people compare runs by.
NOTE_SETTINGS = ("optimizer", "lr", "lr_schedule", "batch_size", "epochs", "dropout", "seed")


class TrialAbandoned(RuntimeError):
    """The work of this run is no longer wanted: another worker has failed its trial
    (this process was paused or cut off past the grace period) and will retry it. Its
    run ends FAILED and no version is kept."""


@dataclass(frozen=True)
class RunOutcome:
    run_id: str
    fit: FitResult
    test: ClassificationReport
    model_version: str | None  # None when not registered
    champion: registry.Champion | None  # where `champion` points after this run

    @property
    def validation_accuracy(self) -> float:
        return self.fit.final_validation_accuracy

    @property
    def is_champion(self) -> bool:
        return self.champion is not None and self.champion.holds(self.model_version)


def run_tags(config: TrainConfig, splits: MnistSplits) -> dict[str, Any]:
    """Tags that make runs readable in the MLflow UI."""
    sizes = splits.sizes()
    tags = {
        "model_family": config.model,
        "architecture": describe_architecture(config),
        "device": str(splits.train.images.device),
        "precision": resolve_precision(config.precision, splits.train.images.device),
        "split.train": sizes["train"],
        "split.validation": sizes["validation"],
        "split.test": sizes["test"],
        registry.VALIDATION_SPLIT_TAG: splits.validation_digest,
        descriptions.NOTE_TAG: descriptions.run_note(
            _named_architecture(config),
            {key: getattr(config, key) for key in NOTE_SETTINGS},
        ),
    }
    commit = tracking.git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def _named_architecture(config: TrainConfig) -> str:
    return f"{config.model.upper()} {describe_architecture(config)}"  # "MLP 784-128-64-10"


def _always_wanted() -> bool:
    return True


@timings.record("run")
def train_and_track(
    config: TrainConfig,
    splits: MnistSplits,
    *,
    experiment: str,
    registered_model: str | None,
    run_name: str | None = None,
    parent_run_id: str | None = None,
    extra_tags: Mapping[str, Any] | None = None,
    on_epoch: Callable[[EpochMetrics], None] | None = None,
    on_batches: Callable[[int, int], None] | None = None,
    on_start: Callable[[str], None] | None = None,
    killed_on: tuple[type[BaseException], ...] = (KeyboardInterrupt,),
    version_tags: Mapping[str, Any] | None = None,
    still_wanted: Callable[[], bool] = _always_wanted,
) -> RunOutcome:
    """Train `config` inside one MLflow run. `on_epoch` runs after each epoch's metrics are
    handed to the run's log (a pruned trial's end sends them: it keeps its curve),
    `on_batches` as in `fit`; exceptions in `killed_on` end the run KILLED, any other
    FAILED, with the error recorded.

    Registration comes last, after the run has all its metrics, plots and model and has
    ended FINISHED: a version is a promise that its run is complete. `still_wanted` is
    asked before the run ends and around registration; once it says no (a study's trial
    was taken over by another worker), the run ends FAILED and no version is kept."""
    tags = run_tags(config, splits) | dict(extra_tags or {})
    with tracking.start_run(
        experiment, run_name, tags=tags, parent_run_id=parent_run_id, killed_on=killed_on
    ) as log:
        # Before the trial records the run's id: reconciliation must find it by its tags.
        fault_point("after_run_creation")
        if on_start is not None:
            on_start(log.run_id)
        # In the background while training runs; flushed before the model is logged.
        log.log_params(config.to_params(), background=True)
        log.log_datasets(splits.lineage, background=True)

        def log_epoch(epoch: EpochMetrics) -> None:
            log.log_metrics(epoch.as_dict(), step=epoch.epoch, background=True)
            fault_point("mid_training")
            if on_epoch is not None:
                on_epoch(epoch)

        with timings.phase("fit"):
            result = fit(config, splits, on_epoch=log_epoch, on_batches=on_batches)
        with timings.phase("test evaluation"):
            logits = predict_logits(result.model, splits.test.images)
            report = classification_report(logits, splits.test.labels)
        with timings.phase("figure data"):
            figures = figure_data(result, report, splits, logits)
        # Figures are drawn in the worker process and uploaded from a thread while the
        # model is logged here; the run is complete (and may end) only with both.
        with timings.phase("figure data"):
            plots_logged = plots.render_async(figures).then(
                lambda pngs: log.log_pngs(pngs, "plots")
            )
        try:
            # The epoch metrics may still be on their way: the run's end waits for them.
            with timings.phase("model logging"):
                model_uri = tracking.log_model(
                    log,
                    result.model.state_dict(),
                    architecture_of(config),
                    example_pixels=to_pixels(splits.test.images[:1]).reshape(1, -1),
                    params=config.to_params(),
                )
            # Sent now, while the model is marked READY and the figures upload; the run's
            # end waits for all three.
            log.log_metrics(final_metrics(result, report), model_uri=model_uri, background=True)
            log.send()
            fault_point("after_model_logging")
        except BaseException:
            # Never end the run while its plots still upload; the first error is the one.
            with contextlib.suppress(Exception):
                plots_logged.result()
            raise
        with timings.phase("figures (wait)"):
            plots_logged.result()
        _insist(still_wanted)
    if registered_model is None:
        return RunOutcome(log.run_id, result, report, None, None)
    version_tags = {
        registry.VALIDATION_ACCURACY_TAG: result.final_validation_accuracy,
        registry.VALIDATION_SPLIT_TAG: splits.validation_digest,
        "test_accuracy": report.accuracy,
        "run_id": log.run_id,
        "architecture": describe_architecture(config),
        **(version_tags or {}),
    }
    description = descriptions.version(
        architecture=_named_architecture(config),
        validation_accuracy=result.final_validation_accuracy,
        test_accuracy=report.accuracy,
        run_id=log.run_id,
        experiment_id=log.experiment_id,
        study=version_tags.get("study"),
        trial=version_tags.get("trial"),
    )
    return _register(
        log.run_id,
        model_uri,
        registered_model,
        version_tags,
        description,
        splits.validation_digest,
        still_wanted,
        lambda version, champion: RunOutcome(log.run_id, result, report, version, champion),
    )


def _register(run_id, model_uri, name, version_tags, description, split, still_wanted, outcome):
    """Register the finished run's model, then let `champion` follow the rule."""
    abandoned = "the trial was taken over by another worker before its model was registered"
    if not still_wanted():
        tracking.end_stale_run(run_id, "FAILED", abandoned, also=("FINISHED",))
        raise TrialAbandoned(abandoned)
    with timings.phase("registration"):
        version = registry.register_version(model_uri, name, run_id, version_tags, description)
    fault_point("after_registration")
    if not still_wanted():  # taken over while registering: withdraw the version
        registry.delete_version(name, version)
        tracking.end_stale_run(run_id, "FAILED", abandoned, also=("FINISHED",))
        registry.crown_champion(name, split)
        raise TrialAbandoned(abandoned)
    try:
        with timings.phase("champion decision"):
            champion = registry.crown_champion(
                name,
                split,
                candidate=version,
                candidate_accuracy=float(version_tags[registry.VALIDATION_ACCURACY_TAG]),
            )
    except BaseException as error:
        # The trial fails with this error: its version and its FINISHED run must not
        # outlive it (a version is a promise that its trial completed).
        with contextlib.suppress(Exception):
            registry.delete_version(name, version)
        with contextlib.suppress(Exception):  # else the next reconciliation fails it
            tracking.end_stale_run(
                run_id, "FAILED", f"champion decision failed: {error}", also=("FINISHED",)
            )
        raise
    return outcome(version, champion)


def _insist(still_wanted: Callable[[], bool]) -> None:
    if not still_wanted():
        raise TrialAbandoned("the trial was taken over by another worker while this one ran")


def final_metrics(result: FitResult, report: ClassificationReport) -> dict[str, float]:
    """The metrics logged once, after training: test scores, validation summary, cost."""
    return report.as_metrics("test") | {
        "val/final_accuracy": result.final_validation_accuracy,
        "val/best_accuracy": result.best_validation_accuracy,
        "time/train_seconds": result.seconds,
        "model/parameters": count_parameters(result.model),
    }


def figure_data(
    result: FitResult, report: ClassificationReport, splits: MnistSplits, logits: torch.Tensor
) -> dict[str, Any]:
    """What the run's figures need, as plain data that pickles without torch."""
    predicted = logits.argmax(dim=1).cpu().numpy()
    labels = splits.test.labels.cpu().numpy()
    all_wrong = np.flatnonzero(predicted != labels)
    wrong = all_wrong[:GRID_SIZE]
    shown = np.arange(min(GRID_SIZE, len(labels)))
    return {
        "history": [SimpleNamespace(**asdict(epoch)) for epoch in result.history],
        "report": SimpleNamespace(**asdict(report)),
        "shown": (to_pixels(splits.test.images[shown]), labels[shown], predicted[shown]),
        "wrong": (to_pixels(splits.test.images[wrong]), labels[wrong], predicted[wrong]),
        "wrong_total": len(all_wrong),
    }
