"""One tracked training run: fit, evaluate on the test set, log everything to MLflow,
register the model and move `champion` if it is the best. Used by `mnist-track train` and
by every trial of a study."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from mnist_track import plots, tracking
from mnist_track.config import TrainConfig
from mnist_track.data import PIXEL_MEAN, PIXEL_STD, MnistSplits
from mnist_track.metrics import ClassificationReport, classification_report
from mnist_track.models import architecture_of, count_parameters
from mnist_track.train import EpochMetrics, FitResult, fit, predict_logits

GRID_SIZE = 32  # digits per prediction grid


@dataclass(frozen=True)
class RunOutcome:
    run_id: str
    fit: FitResult
    test: ClassificationReport
    model_version: str | None  # None when not registered
    champion: bool  # this run's version now carries the champion alias

    @property
    def validation_accuracy(self) -> float:
        return self.fit.final_validation_accuracy


def run_tags(config: TrainConfig, splits: MnistSplits) -> dict[str, Any]:
    """Tags that make runs readable in the MLflow UI."""
    sizes = splits.sizes()
    tags = {
        "model_family": config.model,
        "architecture": describe_architecture(config),
        "device": str(splits.train.images.device),
        "split.train": sizes["train"],
        "split.validation": sizes["validation"],
        "split.test": sizes["test"],
    }
    commit = tracking.git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def describe_architecture(config: TrainConfig) -> str:
    if config.model == "mlp":
        return "-".join(map(str, (784, *config.hidden_sizes, 10)))
    conv = "-".join(f"c{c}" for c in config.channels)
    return "-".join([conv, *map(str, config.hidden_sizes), "10"])


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
    on_start: Callable[[str], None] | None = None,
    killed_on: tuple[type[BaseException], ...] = (KeyboardInterrupt,),
    version_tags: Mapping[str, Any] | None = None,
) -> RunOutcome:
    """Train `config` inside one MLflow run. `on_epoch` runs after each epoch's metrics are
    logged (so a pruned trial keeps its curve); exceptions in `killed_on` end the run
    KILLED, any other FAILED, with the error recorded."""
    tags = run_tags(config, splits) | dict(extra_tags or {})
    with tracking.start_run(
        experiment, run_name, tags=tags, parent_run_id=parent_run_id, killed_on=killed_on
    ) as log:
        if on_start is not None:
            on_start(log.run_id)
        log.log_params(config.to_params())

        def log_epoch(epoch: EpochMetrics) -> None:
            log.log_metrics(epoch.as_dict(), step=epoch.epoch)
            if on_epoch is not None:
                on_epoch(epoch)

        result = fit(config, splits, on_epoch=log_epoch)
        logits = predict_logits(result.model, splits.test.images)
        report = classification_report(logits, splits.test.labels)
        log.log_metrics(final_metrics(result, report))
        figures = figure_data(result, report, splits, logits)
        drawing = draw_figures_in_background(figures)
        version = tracking.log_model(
            result.model.state_dict(),
            architecture_of(config),
            example_pixels=to_pixels(splits.test.images[:1]).reshape(1, -1),
            registered_model=registered_model,
        )
        champion = False
        if version is not None:
            tracking.tag_model_version(
                registered_model,
                version,
                {
                    tracking.VALIDATION_ACCURACY_TAG: result.final_validation_accuracy,
                    "test_accuracy": report.accuracy,
                    "run_id": log.run_id,
                    "architecture": describe_architecture(config),
                    **(version_tags or {}),
                },
            )
            champion = tracking.promote_if_better(
                registered_model, version, result.final_validation_accuracy
            )
        log.log_pngs(figures_from(drawing, figures), "plots")
        return RunOutcome(log.run_id, result, report, version, champion)


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


_figure_pool: ProcessPoolExecutor | None = None


def draw_figures_in_background(data: dict[str, Any]) -> Future:
    """Draw the figures in a worker process while this one logs and registers the model:
    the two take about as long, and training has left both cores free."""
    global _figure_pool
    try:
        if _figure_pool is None:
            _figure_pool = ProcessPoolExecutor(
                max_workers=1, mp_context=multiprocessing.get_context("spawn")
            )
        return _figure_pool.submit(plots.render_run_figures, data)
    except (BrokenProcessPool, RuntimeError, OSError):
        _figure_pool = None
        done: Future = Future()
        done.set_result(plots.render_run_figures(data))
        return done


def figures_from(future: Future, data: dict[str, Any]) -> dict[str, bytes]:
    """The worker's PNGs, or the same drawn here if the worker died."""
    try:
        return future.result()
    except BrokenProcessPool:
        global _figure_pool
        _figure_pool = None
        return plots.render_run_figures(data)


def to_pixels(images: torch.Tensor) -> np.ndarray:
    """Normalized images back to uint8 pixels (N, 28, 28), for plots and input examples."""
    pixels = (images.detach().cpu().float() * PIXEL_STD + PIXEL_MEAN) * 255.0
    return pixels.round().clamp(0, 255).to(torch.uint8).reshape(-1, 28, 28).numpy()
