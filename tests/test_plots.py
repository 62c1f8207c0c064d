"""Unit tests for mnist_track.plots: every figure renders to a PNG."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mnist_track import plots
from mnist_track.metrics import classification_report
from mnist_track.train import EpochMetrics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_bytes(figure: Figure) -> bytes:
    return plots.render_png(figure)


def assert_renders(figure) -> None:
    assert isinstance(figure, Figure)
    content = png_bytes(figure)
    assert content.startswith(PNG_SIGNATURE)
    assert len(content) > 1000  # something was drawn


@pytest.fixture(scope="module")
def report():
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (300,), generator=generator)
    logits = torch.randn(300, 10, generator=generator)
    logits[torch.arange(200), labels[:200]] += 5.0  # two thirds right
    return classification_report(logits, labels)


def history(epochs: int) -> list[EpochMetrics]:
    return [
        EpochMetrics(
            epoch=epoch,
            train_loss=1.0 / epoch,
            train_accuracy=1 - 0.5 / epoch,
            validation_loss=1.2 / epoch,
            validation_accuracy=1 - 0.6 / epoch,
            seconds=0.5,
        )
        for epoch in range(1, epochs + 1)
    ]


@pytest.mark.parametrize("epochs", [1, 4])
def test_training_curves(epochs):
    figure = plots.training_curves(history(epochs))
    assert_renders(figure)
    loss_axes, accuracy_axes = figure.axes
    assert [line.get_label() for line in loss_axes.get_lines()] == ["train", "validation"]
    np.testing.assert_allclose(
        accuracy_axes.get_lines()[1].get_ydata(), [h.validation_accuracy for h in history(epochs)]
    )


@pytest.mark.parametrize("epochs", [1, 3, 30])
def test_training_curves_mark_whole_epochs_only(epochs):
    figure = plots.training_curves(history(epochs))
    FigureCanvasAgg(figure).draw()
    for axes in figure.axes:
        low, high = axes.get_xlim()
        ticks = [t for t in axes.get_xticks() if low <= t <= high]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
        assert low < 1 < high and high - low >= min(epochs - 1, 2)
        assert 3 <= len(axes.get_yticks()) <= 8


def test_per_class_scores_legend_leaves_the_bars_uncovered(report):
    figure = plots.per_class_scores(report)
    FigureCanvasAgg(figure).draw()
    [axes] = figure.axes
    legend = axes.get_legend().get_window_extent()
    assert legend.x0 >= axes.get_window_extent().x1  # beside the axes, not over the bars
    assert legend.x1 <= figure.bbox.x1  # and not cut off by the figure's edge


def cell_centres(height: int):
    """(true, predicted, row, column) of each cell's centre in a confusion matrix picture."""
    axes = plots._new_confusion_matrix().axes[0]
    for true in range(10):
        for predicted in range(10):
            x, y = axes.transData.transform((predicted, true))
            yield true, predicted, round(height - y), round(x)


def test_confusion_matrix_labels_each_non_zero_cell_and_only_those(report):
    confusion = report.confusion.copy()
    confusion[3, 5], confusion[5, 3] = 0, 123  # a zero and a three-digit count off it
    picture = np.asarray(plots.confusion_matrix(confusion)).astype(int)
    assert picture.shape == (400, 400, 3)  # 5 x 5 inches at 80 dpi
    for true, predicted, row, column in cell_centres(picture.shape[0]):
        cell = picture[row - 4 : row + 4, column - 8 : column + 8].reshape(-1, 3)
        labelled = np.ptp(cell, axis=0).max() > 80  # a count's glyphs against its shade
        assert labelled == bool(confusion[true, predicted]), (true, predicted)


def test_the_heat_map_drawn_over_its_kept_frame_is_a_full_drawing(report):
    """The frame (ticks, labels, title) is drawn once per layout; the heat map of each
    later run drawn over it must look as if the whole figure had been drawn again."""
    figure = plots._new_confusion_matrix()
    plots._fill_confusion_matrix(figure, np.eye(10, dtype=np.int64) * 3)  # keeps the frame
    [axes] = figure.axes
    [image] = axes.images
    shades = np.log1p(report.confusion)
    image.set_data(shades)
    image.set_clim(shades.min(), shades.max())
    plots._draw_over_frame(figure, [image, *axes.spines.values()])
    over_frame = np.asarray(figure.canvas.buffer_rgba())[..., :3].astype(int)
    figure.canvas.draw()
    full = np.asarray(figure.canvas.buffer_rgba())[..., :3].astype(int)
    differing = (over_frame != full).any(axis=-1)
    assert differing.sum() < 40  # antialiased corners where ticks meet the frame
    assert np.abs(over_frame - full).max() < 32


def test_render_run_figures_without_torch_objects(report, raw_mnist):
    from types import SimpleNamespace

    history = [
        SimpleNamespace(
            epoch=e,
            train_loss=1 / e,
            train_accuracy=0.9,
            validation_loss=1 / e,
            validation_accuracy=0.9,
        )
        for e in (1, 2)
    ]
    images, labels = raw_mnist.test_images[:4], raw_mnist.test_labels[:4]
    data = {
        "history": history,
        "report": report,
        "shown": (images, labels, labels),
        "wrong": (images[:0], labels[:0], labels[:0]),
        "wrong_total": 0,
    }
    pngs = plots.render_run_figures(data)
    assert set(pngs) == {
        "training_curves.png",
        "confusion_matrix.png",
        "per_class_scores.png",
        "test_predictions.png",
    }
    assert all(png.startswith(b"\x89PNG") for png in pngs.values())
    data["wrong"], data["wrong_total"] = (images[:1], labels[:1], labels[1:2]), 7
    assert "misclassified.png" in plots.render_run_figures(data)


def test_confusion_matrix_all_zero():
    picture = plots.confusion_matrix(np.zeros((10, 10), dtype=np.int64))
    assert plots.render_png(picture).startswith(PNG_SIGNATURE)


def test_per_class_scores(report):
    figure = plots.per_class_scores(report)
    assert_renders(figure)
    assert f"{report.macro_f1:.4f}" in figure.axes[0].get_title()
    assert len(figure.axes[0].patches) == 30  # precision, recall, F1 for ten digits


def label_band(picture: np.ndarray, index: int, columns: int) -> np.ndarray:
    """The pixels of tile `index`'s label (the margin above its digit), as RGB."""
    row, column = divmod(index, columns)
    size = plots.GRID_CELL * plots.GRID_SCALE
    top = plots.GRID_TITLE_HEIGHT + row * size
    return picture[top : top + (plots.GRID_CELL - 28) * plots.GRID_SCALE, column * size :][:, :size]


def is_red(pixels: np.ndarray) -> np.ndarray:
    return (pixels[..., 0] > 200) & (pixels[..., 1] < 160)


@pytest.mark.parametrize(("count", "columns"), [(1, 1), (5, 8), (10, 4)])
def test_digit_grid(raw_mnist, count, columns):
    images = raw_mnist.test_images[:count]
    true = raw_mnist.test_labels[:count].tolist()
    predicted = list(true)
    predicted[0] = (true[0] + 1) % 10  # one mistake
    grid = plots.digit_grid(images, true, predicted, "Mistakes", columns=columns)
    assert plots.render_png(grid).startswith(PNG_SIGNATURE)
    shown_columns = min(columns, count)
    rows = -(-count // shown_columns)
    size = plots.GRID_CELL * plots.GRID_SCALE
    assert grid.size == (shown_columns * size, plots.GRID_TITLE_HEIGHT + rows * size)
    picture = np.asarray(grid)
    for index, image in enumerate(images):  # each digit, enlarged, in its tile
        row, column = divmod(index, shown_columns)
        top = plots.GRID_TITLE_HEIGHT + (row * plots.GRID_CELL + plots.GRID_CELL - 28) * 2
        left = (column * plots.GRID_CELL + 4) * 2
        tile = picture[top : top + 56, left : left + 56, 0]
        np.testing.assert_array_equal(tile, np.kron(image, np.ones((2, 2), dtype=np.uint8)))
        label = label_band(picture, index, shown_columns)
        assert label.max() > 200  # a label is drawn above it
        # The mistake's label is red, the right answers' are not.
        assert is_red(label).any() == (index == 0)
    assert (picture[: plots.GRID_TITLE_HEIGHT] < 100).any()  # the title, dark on white


def test_digit_grid_shows_the_digits(raw_mnist):
    """The pixels drawn are the digits: an all-black set and a real set differ."""
    true = raw_mnist.test_labels[:4].tolist()
    real = plots.render_png(plots.digit_grid(raw_mnist.test_images[:4], true, true, "t", 4))
    blank = np.zeros_like(raw_mnist.test_images[:4])
    empty = plots.render_png(plots.digit_grid(blank, true, true, "t", columns=4))
    assert real != empty


def run_data(report, raw_mnist, epochs: int, offset: int) -> dict:
    images, labels = raw_mnist.test_images[offset : offset + 8], raw_mnist.test_labels[:8]
    return {
        "history": history(epochs),
        "report": report,
        "shown": (images, labels, labels),
        "wrong": (images[:3], labels[:3], (labels[:3] + 1) % 10),
        "wrong_total": 3,
    }


@pytest.mark.parametrize(("first_epochs", "second_epochs"), [(5, 2), (1, 4)])
def test_figures_filled_again_are_the_figures_a_fresh_layout_draws(
    report, raw_mnist, first_epochs, second_epochs
):
    """render_run_figures reuses one layout per figure per process: the second run's
    PNGs must be exactly what fresh figures of its data give, nothing left of the first
    (a lone epoch's fixed limits included)."""
    from dataclasses import replace

    plots._layouts.clear()
    first = run_data(report, raw_mnist, epochs=first_epochs, offset=0)
    other = replace(
        report,
        confusion=np.eye(10, dtype=np.int64) * 7,
        precision=[0.5] * 10,
        macro_f1=0.25,
    )
    second = run_data(other, raw_mnist, epochs=second_epochs, offset=8)
    plots.render_run_figures(first)
    again = plots.render_run_figures(second)
    assert again["training_curves.png"] == png_bytes(plots.training_curves(second["history"]))
    assert again["confusion_matrix.png"] == png_bytes(plots.confusion_matrix(other.confusion))
    assert again["per_class_scores.png"] == png_bytes(plots.per_class_scores(other))
    assert again != plots.render_run_figures(first)


# --- the figure worker processes --------------------------------------------------------


def where_drawn(modules: list[str], names) -> dict[str, bytes]:
    """A `draw` for `plots.in_workers`: the drawing process and which of `modules` it has
    imported."""
    import os
    import sys

    loaded = [module for module in modules if module in sys.modules]
    return {name: f"{os.getpid()} {' '.join(loaded)}".encode() for name in names}


@pytest.fixture
def fresh_lanes(monkeypatch):
    """No figure worker process yet, as in a new `train` or `tune`; the processes the test
    spawns are shut down after it."""
    lanes: dict = {}
    monkeypatch.setattr(plots, "_lanes", lanes)
    monkeypatch.setattr(plots, "_lane_count", len(plots.SHARES))
    yield
    for pool in lanes.values():
        pool.shutdown(wait=True)


# Two stdlib modules that nothing here or in a figure worker imports by itself.
FIRST, SECOND = "colorsys", "wave"


@pytest.mark.parametrize("processes", [1, 2])
def test_each_lane_preloads_what_its_shares_need(fresh_lanes, processes):
    plots.start_figure_worker(((FIRST,), (SECOND,)), processes=processes)
    drawn = plots.in_workers(where_drawn, [FIRST, SECOND], (("a",), ("b",))).pngs()
    (pid_a, *loaded_a), (pid_b, *loaded_b) = (drawn[n].decode().split() for n in "ab")
    if processes == 1:  # one thread given: one process draws both shares, has both
        assert pid_a == pid_b
        assert loaded_a == loaded_b == [FIRST, SECOND]
    else:  # one process per share; each imported only its share's modules
        assert pid_a != pid_b
        assert (loaded_a, loaded_b) == ([FIRST], [SECOND])


def test_lanes_modules_are_their_shares_once():
    preload = (("m", "a"), ("m", "b"), ("c",))
    assert plots.lane_modules(preload, 1) == [("m", "a", "b", "c")]
    assert plots.lane_modules(preload, 2) == [("m", "a", "c"), ("m", "b")]


def exit_in_worker(parent_pid: int, names) -> dict[str, bytes]:
    """A `draw` that kills the figure worker process it runs in, and draws in the parent."""
    import os

    if os.getpid() != parent_pid:
        os._exit(1)
    return where_drawn([], names)


def test_a_lane_whose_process_died_draws_here_then_spawns_anew(fresh_lanes):
    import os

    def pid_of(job: plots.FigureJob) -> str:
        return job.pngs()["a"].decode().split()[0]

    plots.start_figure_worker(processes=1)
    first = pid_of(plots.in_workers(where_drawn, [], (("a",),)))
    assert first != str(os.getpid())
    assert pid_of(plots.in_workers(exit_in_worker, os.getpid(), (("a",),))) == str(os.getpid())
    assert pid_of(plots.in_workers(where_drawn, [], (("a",),))) not in (first, str(os.getpid()))
