"""The benchmark report's rows: a figure beside its target never reads as the target."""

from __future__ import annotations

import pytest

from benchmarks.common import Figure
from benchmarks.report import beside_target, row


@pytest.mark.parametrize(
    ("value", "threshold", "shown"),
    [
        (1.2986, 1.3, "1.299"),  # "1.30" beside a "no" would read as met
        (1.3012, 1.3, "1.301"),
        (1.41, 1.3, "1.41"),  # plainly apart: the usual rounding
        (0.2496, 0.25, "0.2496"),
        (0.24, 0.25, "0.24"),
        (1.3, 1.3, "1.30"),
        (7.84, None, "7.84"),
    ],
)
def test_a_figure_rounded_onto_its_target_shows_more_digits(value, threshold, shown):
    assert beside_target(value, threshold) == shown


def test_a_row_shows_the_ratio_that_missed_its_target_as_missed():
    figure = Figure(
        "team",
        "2 workers vs 1",
        92.5,
        "trials/min",
        reference="1 worker",
        reference_value=71.2,
        ratio=1.2986,
        ratio_of="2 workers / 1 worker",
        target=("ratio", ">=", 1.3),
    )
    text = row(figure)
    assert "| 1.299x (2 workers / 1 worker) |" in text
    assert text.endswith("| **no** |")
    assert "| 92.5 trials/min |" in text  # the value has no target of its own


def test_a_value_target_is_shown_apart_from_its_threshold():
    figure = Figure("study", "fixed cost", 0.2503, "s", target=("value", "<=", 0.25))
    assert "| 0.2503 s |" in row(figure)
