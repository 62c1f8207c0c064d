"""Classification metrics: predictions -> numbers. Pure functions of tensors."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from mnist_track.models import N_CLASSES


@dataclass(frozen=True)
class ClassificationReport:
    loss: float
    accuracy: float
    macro_f1: float
    precision: tuple[float, ...]  # per class 0..9
    recall: tuple[float, ...]
    f1: tuple[float, ...]
    support: tuple[int, ...]
    confusion: np.ndarray  # rows: true digit, columns: predicted digit

    def as_metrics(self, prefix: str) -> dict[str, float]:
        """Flat metric names for logging, e.g. test/accuracy, test/f1_class_3."""
        metrics = {
            f"{prefix}/loss": self.loss,
            f"{prefix}/accuracy": self.accuracy,
            f"{prefix}/macro_f1": self.macro_f1,
        }
        for digit in range(N_CLASSES):
            metrics[f"{prefix}/precision_class_{digit}"] = self.precision[digit]
            metrics[f"{prefix}/recall_class_{digit}"] = self.recall[digit]
            metrics[f"{prefix}/f1_class_{digit}"] = self.f1[digit]
        return metrics


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    pairs = labels.to(torch.long) * N_CLASSES + predictions.to(torch.long)
    counts = torch.bincount(pairs.cpu(), minlength=N_CLASSES * N_CLASSES)
    return counts.reshape(N_CLASSES, N_CLASSES).numpy()


def classification_report(logits: torch.Tensor, labels: torch.Tensor) -> ClassificationReport:
    """Loss, accuracy and per-class precision/recall/F1 from logits (N, 10) and labels (N,).
    A class never predicted (or never present) scores 0 rather than NaN."""
    loss = F.cross_entropy(logits.float(), labels).item()
    confusion = confusion_matrix(logits.argmax(dim=1), labels)
    true_positives = np.diag(confusion).astype(np.float64)
    predicted = confusion.sum(axis=0)
    actual = confusion.sum(axis=1)
    precision = np.divide(true_positives, predicted, out=np.zeros(N_CLASSES), where=predicted > 0)
    recall = np.divide(true_positives, actual, out=np.zeros(N_CLASSES), where=actual > 0)
    denominator = precision + recall
    f1 = np.divide(
        2 * precision * recall, denominator, out=np.zeros(N_CLASSES), where=denominator > 0
    )
    return ClassificationReport(
        loss=loss,
        accuracy=float(true_positives.sum() / max(confusion.sum(), 1)),
        macro_f1=float(f1.mean()),
        precision=tuple(precision.tolist()),
        recall=tuple(recall.tolist()),
        f1=tuple(f1.tolist()),
        support=tuple(int(n) for n in actual),
        confusion=confusion,
    )
