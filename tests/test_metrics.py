"""Unit tests for mnist_track.metrics: the confusion matrix and per-class scores."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn import metrics as sk

from mnist_track.metrics import classification_report, confusion_matrix

# Hand-made case: true digits 0..3 only, class 3 is never predicted, class 4 is predicted
# but never true.
LABELS = [0, 0, 0, 0, 1, 1, 1, 2, 2, 3, 3]
PREDICTIONS = [0, 0, 0, 1, 1, 1, 2, 2, 2, 0, 4]


def one_hot_logits(predictions: list[int], confidence: float = 5.0) -> torch.Tensor:
    logits = torch.zeros(len(predictions), 10)
    logits[torch.arange(len(predictions)), torch.tensor(predictions)] = confidence
    return logits


@pytest.fixture
def report():
    return classification_report(one_hot_logits(PREDICTIONS), torch.tensor(LABELS))


def test_confusion_matrix_counts(report):
    expected = np.zeros((10, 10), dtype=np.int64)
    expected[0, 0] = 3  # rows: true digit, columns: predicted digit
    expected[0, 1] = 1
    expected[1, 1] = 2
    expected[1, 2] = 1
    expected[2, 2] = 2
    expected[3, 0] = 1
    expected[3, 4] = 1
    np.testing.assert_array_equal(report.confusion, expected)
    np.testing.assert_array_equal(
        confusion_matrix(torch.tensor(PREDICTIONS), torch.tensor(LABELS)), expected
    )
    assert report.support == (4, 3, 2, 2, 0, 0, 0, 0, 0, 0)


def test_hand_computed_scores(report):
    assert report.accuracy == pytest.approx(7 / 11)
    # class 0: predicted 4 times (3 right), true 4 times
    assert report.precision[0] == pytest.approx(3 / 4)
    assert report.recall[0] == pytest.approx(3 / 4)
    assert report.f1[0] == pytest.approx(3 / 4)
    # class 1: predicted 3 times (2 right), true 3 times
    assert report.precision[1] == pytest.approx(2 / 3)
    assert report.recall[1] == pytest.approx(2 / 3)
    # class 2: predicted 3 times (2 right), true twice
    assert report.precision[2] == pytest.approx(2 / 3)
    assert report.recall[2] == pytest.approx(1.0)
    assert report.f1[2] == pytest.approx(2 * (2 / 3) / (2 / 3 + 1))


def test_never_predicted_or_absent_classes_score_zero_not_nan(report):
    # class 3 is never predicted, class 4 predicted but never true, 5..9 neither.
    for digit in range(3, 10):
        assert report.precision[digit] == 0.0
        assert report.recall[digit] == 0.0
        assert report.f1[digit] == 0.0
    values = [*report.precision, *report.recall, *report.f1, report.macro_f1]
    assert not any(math.isnan(value) for value in values)


def test_matches_sklearn(report):
    digits = list(range(10))
    precision, recall, f1, support = sk.precision_recall_fscore_support(
        LABELS, PREDICTIONS, labels=digits, zero_division=0
    )
    np.testing.assert_allclose(report.precision, precision)
    np.testing.assert_allclose(report.recall, recall)
    np.testing.assert_allclose(report.f1, f1)
    assert list(report.support) == support.tolist()
    assert report.macro_f1 == pytest.approx(
        sk.f1_score(LABELS, PREDICTIONS, labels=digits, average="macro", zero_division=0)
    )
    assert report.accuracy == pytest.approx(sk.accuracy_score(LABELS, PREDICTIONS))
    np.testing.assert_array_equal(
        report.confusion, sk.confusion_matrix(LABELS, PREDICTIONS, labels=digits)
    )


def test_loss_is_mean_cross_entropy(report):
    logits = one_hot_logits(PREDICTIONS).double().numpy()
    log_softmax = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    expected = -log_softmax[np.arange(len(LABELS)), LABELS].mean()
    assert report.loss == pytest.approx(expected, rel=1e-6)
    assert report.loss == pytest.approx(
        sk.log_loss(LABELS, np.exp(log_softmax), labels=list(range(10))), rel=1e-6
    )


def test_random_case_matches_sklearn():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(500, 10, generator=generator)
    labels = torch.randint(0, 10, (500,), generator=generator)
    report = classification_report(logits, labels)
    predictions = logits.argmax(dim=1).numpy()
    precision, recall, f1, _ = sk.precision_recall_fscore_support(
        labels.numpy(), predictions, labels=list(range(10)), zero_division=0
    )
    np.testing.assert_allclose(report.precision, precision)
    np.testing.assert_allclose(report.recall, recall)
    np.testing.assert_allclose(report.f1, f1)
    assert sum(report.support) == 500


def test_perfect_predictions():
    labels = torch.arange(10).repeat(3)
    report = classification_report(one_hot_logits(labels.tolist(), 20.0), labels)
    assert report.accuracy == 1.0
    assert report.macro_f1 == 1.0
    assert report.precision == report.recall == report.f1 == (1.0,) * 10
    assert report.loss < 1e-6


def test_as_metrics_names(report):
    flat = report.as_metrics("test")
    assert len(flat) == 3 + 3 * 10
    assert flat["test/accuracy"] == report.accuracy
    assert flat["test/loss"] == report.loss
    assert flat["test/macro_f1"] == report.macro_f1
    assert flat["test/precision_class_2"] == report.precision[2]
    assert flat["test/recall_class_2"] == report.recall[2]
    assert flat["test/f1_class_9"] == report.f1[9]
    assert all(key.startswith("test/") for key in flat)
