"""Figures of a run: pure functions from numbers and images to matplotlib Figures.

Figures are built with the object API (no pyplot state), so they need no closing and can
be drawn from any thread. They are kept cheap because every trial draws them: fixed
margins instead of a layout engine, and a digit grid is one image, not one axes per digit.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

from mnist_track.metrics import ClassificationReport
from mnist_track.models import N_CLASSES

DPI = 80  # small PNGs: quick to render and to store, still readable in the MLflow UI


def training_curves(history: Sequence) -> Figure:
    """Loss and accuracy per epoch, train vs validation (from EpochMetrics)."""
    epochs = [h.epoch for h in history]
    figure = Figure(figsize=(9, 3.5), dpi=DPI)
    figure.subplots_adjust(left=0.08, right=0.98, bottom=0.14, top=0.9, wspace=0.25)
    loss_axes, accuracy_axes = figure.subplots(1, 2)
    loss_axes.plot(epochs, [h.train_loss for h in history], "o-", label="train")
    loss_axes.plot(epochs, [h.validation_loss for h in history], "o-", label="validation")
    loss_axes.set(title="Loss", xlabel="epoch", ylabel="cross-entropy")
    accuracy_axes.plot(epochs, [h.train_accuracy for h in history], "o-", label="train")
    accuracy_axes.plot(epochs, [h.validation_accuracy for h in history], "o-", label="validation")
    accuracy_axes.set(title="Accuracy", xlabel="epoch", ylabel="accuracy")
    for axes in (loss_axes, accuracy_axes):
        axes.grid(alpha=0.3)
        axes.legend()
    return figure


def confusion_matrix(confusion: np.ndarray) -> Figure:
    figure = Figure(figsize=(5.5, 5), dpi=DPI)
    figure.subplots_adjust(left=0.12, right=0.95, bottom=0.1, top=0.92)
    axes = figure.subplots()
    image = axes.imshow(confusion, cmap="Blues")
    threshold = confusion.max() / 2
    for true in range(N_CLASSES):
        for predicted in range(N_CLASSES):
            count = confusion[true, predicted]
            axes.text(
                predicted,
                true,
                str(count),
                ha="center",
                va="center",
                fontsize=7,
                color="white" if count > threshold else "black",
            )
    axes.set(
        title="Confusion matrix (test)",
        xlabel="predicted",
        ylabel="true",
        xticks=range(N_CLASSES),
        yticks=range(N_CLASSES),
    )
    figure.colorbar(image, ax=axes, shrink=0.8)
    return figure


def per_class_scores(report: ClassificationReport) -> Figure:
    """Precision, recall and F1 of each digit as grouped bars."""
    figure = Figure(figsize=(9, 3.5), dpi=DPI)
    figure.subplots_adjust(left=0.07, right=0.98, bottom=0.14, top=0.9)
    axes = figure.subplots()
    digits = np.arange(N_CLASSES)
    width = 0.27
    for offset, (name, values) in zip(
        (-width, 0.0, width),
        (("precision", report.precision), ("recall", report.recall), ("F1", report.f1)),
        strict=True,
    ):
        axes.bar(digits + offset, values, width, label=name)
    low = min(min(report.precision), min(report.recall), min(report.f1))
    axes.set(
        title=f"Per-class scores (test, macro-F1 {report.macro_f1:.4f})",
        xlabel="digit",
        xticks=digits,
        ylim=(max(0.0, low - 0.02), 1.0),
    )
    axes.legend(loc="lower right")
    axes.grid(axis="y", alpha=0.3)
    return figure


def digit_grid(
    images: np.ndarray,
    true_labels: Sequence[int],
    predicted_labels: Sequence[int],
    title: str,
    columns: int = 8,
) -> Figure:
    """Images (N, 28, 28) tiled into one picture, 'true / predicted' above each digit;
    wrong ones in red."""
    count = len(images)
    rows = max(1, -(-count // columns))
    cell = 36  # pixels per tile: the digit and a margin for its label
    mosaic = np.zeros((rows * cell, columns * cell), dtype=np.float32)
    for index in range(count):
        row, column = divmod(index, columns)
        top, left = row * cell + (cell - 28), column * cell + 4
        mosaic[top : top + 28, left : left + 28] = images[index]
    figure = Figure(figsize=(columns * 1.0, rows * 1.15 + 0.4), dpi=DPI)
    axes = figure.add_axes((0.01, 0.01, 0.98, 0.98 - 0.4 / (rows * 1.15 + 0.4)))
    axes.imshow(mosaic, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    axes.set_axis_off()
    for index in range(count):
        row, column = divmod(index, columns)
        true, predicted = int(true_labels[index]), int(predicted_labels[index])
        axes.text(
            column * cell + cell / 2,
            row * cell + 4,
            f"{true} / {predicted}",
            ha="center",
            va="center",
            fontsize=8,
            color="white" if true == predicted else "#ff6b6b",
        )
    figure.suptitle(title, fontsize=10)
    return figure
