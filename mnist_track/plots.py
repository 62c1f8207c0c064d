"""Figures of a run: pure functions from numbers and images to matplotlib Figures, and
`render_run_figures`, which draws a run's set of PNGs from plain data, and `render_async`,
which does that in worker processes (two, or one per CPU thread given) that die with
their parent.

Figures are built with the object API (no pyplot state), so they need no closing and can
be drawn from any thread or process. They are kept cheap because every trial draws them:
fixed margins instead of a layout engine, one layout per figure kept and filled again,
digit grids drawn with Pillow, and the confusion matrix's counts written by Pillow too
(only its non-zero cells). PNGs are compressed with zlib's fastest level.
This module imports neither torch nor MLflow, so a worker process that draws figures
starts fast.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image, ImageDraw, ImageFont

if TYPE_CHECKING:
    from mnist_track.metrics import ClassificationReport

N_CLASSES = 10

DPI = 80  # small PNGs: quick to render and to store, still readable in the MLflow UI


# Each of the first three figures is a fixed layout (`_new_*`: axes, labels, legends) and
# the run's data laid into it (`_fill_*`). The public builders make a fresh figure;
# `render_run_figures` keeps one layout of each per process and only fills it again: its
# ticks, legends and labels, made once, are half the cost of drawing a figure. Each
# layout has an Agg canvas of its own, so every save draws with the same renderer, whose
# cache keeps the measurements of texts drawn before (a save without one made a canvas
# and measured every text again: a run's five figures took 155 ms of CPU, now 142).


def training_curves(history: Sequence) -> Figure:
    """Loss and accuracy per epoch, train vs validation (from EpochMetrics)."""
    return _fill_training_curves(_new_training_curves(), history)


def _new_training_curves() -> Figure:
    figure = Figure(figsize=(9, 3.5), dpi=DPI)
    FigureCanvasAgg(figure)  # its own, kept: see above
    figure.subplots_adjust(left=0.08, right=0.98, bottom=0.14, top=0.9, wspace=0.25)
    loss_axes, accuracy_axes = figure.subplots(1, 2)
    loss_axes.set(title="Loss", xlabel="epoch", ylabel="cross-entropy")
    accuracy_axes.set(title="Accuracy", xlabel="epoch", ylabel="accuracy")
    for axes in (loss_axes, accuracy_axes):
        # Whole epochs only (not 1.5), and about five values up the side: fewer labels
        # to lay out is most of what a redraw costs.
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.yaxis.set_major_locator(MaxNLocator(nbins=5, steps=[1, 2, 2.5, 5, 10]))
        axes.plot([], [], "o-", label="train")
        axes.plot([], [], "o-", label="validation")
        axes.grid(alpha=0.3)
        axes.legend()
    return figure


def _fill_training_curves(figure: Figure, history: Sequence) -> Figure:
    epochs = [h.epoch for h in history]
    loss_axes, accuracy_axes = figure.axes
    for axes, series in (
        (loss_axes, ([h.train_loss for h in history], [h.validation_loss for h in history])),
        (
            accuracy_axes,
            ([h.train_accuracy for h in history], [h.validation_accuracy for h in history]),
        ),
    ):
        for line, values in zip(axes.get_lines(), series, strict=True):
            line.set_data(epochs, values)
        axes.relim()
        axes.set_autoscale_on(True)  # this layout may hold a lone point's limits
        axes.autoscale_view()
        if len(epochs) == 1:  # a lone point: whole epochs on either side, not 0.95..1.05
            axes.set_xlim(epochs[0] - 1, epochs[0] + 1)
    return figure


def confusion_matrix(confusion: np.ndarray) -> Image.Image:
    return _fill_confusion_matrix(_new_confusion_matrix(), confusion)


CELL_FONT_PIXELS = round(7 * DPI / 72)  # 7 pt, as matplotlib would draw the counts


def _draw_over_frame(figure: Figure, changing: Sequence) -> None:
    """Draw only the `changing` artists of `figure` over its frame (ticks, labels,
    title), which is drawn once and kept: text is what costs, and a frame that never
    changes need not be laid out again."""
    canvas = figure.canvas
    frame = getattr(figure, "_kept_frame", None)
    if frame is None:  # drawn without the changing artists, as if under them
        for artist in changing:
            artist.set_visible(False)
        canvas.draw()
        frame = figure._kept_frame = canvas.copy_from_bbox(figure.bbox)
        for artist in changing:
            artist.set_visible(True)
    canvas.restore_region(frame)
    for artist in changing:
        artist.axes.draw_artist(artist)


def _new_confusion_matrix() -> Figure:
    figure = Figure(figsize=(5, 5), dpi=DPI)
    FigureCanvasAgg(figure)  # drawn to pixels here, not saved: it needs its own canvas
    figure.subplots_adjust(left=0.12, right=0.97, bottom=0.1, top=0.92)
    axes = figure.subplots()
    axes.imshow(np.zeros((N_CLASSES, N_CLASSES)), cmap="Blues")
    axes.set(
        title="Confusion matrix (test)",
        xlabel="predicted",
        ylabel="true",
        xticks=range(N_CLASSES),
        yticks=range(N_CLASSES),
    )
    return figure


def _fill_confusion_matrix(figure: Figure, confusion: np.ndarray) -> Image.Image:
    """The heat map drawn by matplotlib, then each non-zero count written into its cell
    by Pillow: matplotlib's layout of up to 100 short texts was most of the figure's
    drawing time."""
    [axes] = figure.axes
    [image] = axes.images
    # Log colour scale: the off-diagonal counts are small beside the diagonal's hundreds.
    shades = np.log1p(confusion)
    image.set_data(shades)
    image.set_clim(shades.min(), shades.max())
    _draw_over_frame(figure, [image, *axes.spines.values()])
    picture = Image.fromarray(np.asarray(figure.canvas.buffer_rgba())).convert("RGB")
    draw = ImageDraw.Draw(picture)
    font = _font(CELL_FONT_PIXELS)
    threshold = np.log1p(confusion.max()) / 2
    for true, predicted in zip(*np.nonzero(confusion), strict=True):
        count = confusion[true, predicted]
        x, y = axes.transData.transform((predicted, true))  # from the bottom left
        colour = "white" if np.log1p(count) > threshold else "black"
        draw.text((x, picture.height - y), str(count), colour, font, "mm")
    return picture


SCORES = ("precision", "recall", "F1")


def per_class_scores(report: ClassificationReport) -> Figure:
    """Precision, recall and F1 of each digit as grouped bars."""
    return _fill_per_class_scores(_new_per_class_scores(), report)


def _new_per_class_scores() -> Figure:
    figure = Figure(figsize=(9, 3.5), dpi=DPI)
    FigureCanvasAgg(figure)  # its own, kept: see above
    figure.subplots_adjust(left=0.07, right=0.85, bottom=0.14, top=0.9)
    axes = figure.subplots()
    digits = np.arange(N_CLASSES)
    width = 0.27
    for offset, name in zip((-width, 0.0, width), SCORES, strict=True):
        axes.bar(digits + offset, np.zeros(N_CLASSES), width, label=name)
    axes.set(xlabel="digit", xticks=digits)
    # Beside the bars, not over them: inside, it hid the last digits' scores.
    axes.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    axes.grid(axis="y", alpha=0.3)
    return figure


def _fill_per_class_scores(figure: Figure, report: ClassificationReport) -> Figure:
    [axes] = figure.axes
    scores = (report.precision, report.recall, report.f1)
    for bars, values in zip(axes.containers, scores, strict=True):
        for bar, value in zip(bars, values, strict=True):
            bar.set_height(value)
    low = min(min(values) for values in scores)
    axes.set(
        title=f"Per-class scores (test, macro-F1 {report.macro_f1:.4f})",
        ylim=(max(0.0, low - 0.02), 1.0),
    )
    return figure


GRID_CELL = 36  # pixels per tile: the digit and a margin for its label above it
GRID_SCALE = 2  # tiles are enlarged (nearest neighbour) so the digits stay crisp
GRID_TITLE_HEIGHT = 26
WRONG_COLOUR = (255, 107, 107)


def digit_grid(
    images: np.ndarray,
    true_labels: Sequence[int],
    predicted_labels: Sequence[int],
    title: str,
    columns: int = 8,
) -> Image.Image:
    """Images (N, 28, 28) tiled into one picture, 'true / predicted' above each digit,
    wrong ones in red. Drawn with Pillow, not matplotlib: a grid is pixels and 32 short
    labels, which matplotlib's text layout makes the costliest figure of a run."""
    count = len(images)
    columns = max(1, min(columns, count))
    rows = max(1, -(-count // columns))
    cell = GRID_CELL
    mosaic = np.zeros((rows * cell, columns * cell), dtype=np.uint8)
    for index in range(count):
        row, column = divmod(index, columns)
        top, left = row * cell + (cell - 28), column * cell + 4
        mosaic[top : top + 28, left : left + 28] = images[index]
    scaled = np.kron(mosaic, np.ones((GRID_SCALE, GRID_SCALE), dtype=np.uint8))
    picture = Image.new("RGB", (scaled.shape[1], scaled.shape[0] + GRID_TITLE_HEIGHT), "white")
    picture.paste(Image.fromarray(scaled).convert("RGB"), (0, GRID_TITLE_HEIGHT))
    draw = ImageDraw.Draw(picture)
    draw.text((picture.width / 2, GRID_TITLE_HEIGHT / 2), title, "black", _font(14), "mm")
    label_font = _font(12)
    for index in range(count):
        row, column = divmod(index, columns)
        true, predicted = int(true_labels[index]), int(predicted_labels[index])
        centre = (
            (column + 0.5) * cell * GRID_SCALE,
            GRID_TITLE_HEIGHT + (row * cell + 4) * GRID_SCALE,
        )
        colour = "white" if true == predicted else WRONG_COLOUR
        draw.text(centre, f"{true} / {predicted}", colour, label_font, "mm")
    return picture


@functools.cache
def _font(size: int) -> ImageFont.FreeTypeFont:
    """The sans-serif font of the other figures (matplotlib's DejaVu Sans)."""
    from matplotlib import font_manager

    return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)


# zlib's fastest level: compression was a tenth of a figure's drawing time, and this
# level halves it for files about a tenth larger.
PNG_COMPRESSION = 1


def render_png(figure: Figure | Image.Image) -> bytes:
    buffer = io.BytesIO()
    if isinstance(figure, Image.Image):
        figure.save(buffer, format="png", compress_level=PNG_COMPRESSION)
    else:
        figure.savefig(buffer, format="png", pil_kwargs={"compress_level": PNG_COMPRESSION})
    return buffer.getvalue()


# One layout of each fixed figure per process (keyed by its builder), filled again by
# every run; a lock, since runs in one process may draw from several threads when the
# worker is unavailable.
_layouts: dict[Callable[[], Figure], Figure] = {}
_layouts_lock = threading.Lock()


def _refilled(
    new: Callable[[], Figure], fill: Callable[[Figure, Any], Figure | Image.Image], data
) -> bytes:
    with _layouts_lock:
        if new not in _layouts:
            _layouts[new] = new()
        return render_png(fill(_layouts[new], data))


def render_run_figures(
    data: dict[str, Any], names: Collection[str] | None = None
) -> dict[str, bytes]:
    """A run's figures (or those of them in `names`) as PNG bytes by file name, from plain
    data (numbers, numpy arrays and objects with the fields of EpochMetrics and
    ClassificationReport), so the drawing can happen in another process."""
    shown, wrong, report = data["shown"], data["wrong"], data["report"]
    drawers: dict[str, Callable[[], bytes]] = {
        "training_curves.png": lambda: _refilled(
            _new_training_curves, _fill_training_curves, data["history"]
        ),
        "confusion_matrix.png": lambda: _refilled(
            _new_confusion_matrix, _fill_confusion_matrix, report.confusion
        ),
        "per_class_scores.png": lambda: _refilled(
            _new_per_class_scores, _fill_per_class_scores, report
        ),
        "test_predictions.png": lambda: render_png(
            digit_grid(*shown, "Test predictions (true / predicted)")
        ),
    }
    if len(wrong[0]):
        title = f"Misclassified ({data['wrong_total']} in all; true / predicted)"
        drawers["misclassified.png"] = lambda: render_png(digit_grid(*wrong, title))
    return {name: draw() for name, draw in drawers.items() if names is None or name in names}


# --- drawing in the background ---------------------------------------------------------

PARENT_CHECK_SECONDS = 0.5


# The figures split in two shares of about equal drawing time (~60-65 ms of CPU each),
# drawn by two worker processes at once: while the trial's process logs its model, both
# are done sooner than one worker drawing all five. A process given one CPU thread
# has one worker, which draws both (on a CPU shared with other workers, a second would
# only cost its start).
SHARES = (
    ("training_curves.png", "test_predictions.png"),
    ("per_class_scores.png", "confusion_matrix.png", "misclassified.png"),
)


class FigureJob:
    """Figures being drawn in the worker processes; `pngs()` waits for them, or draws
    here what a dead worker did not."""

    def __init__(
        self,
        futures: list[tuple[Future, tuple[str, ...], int]],
        draw: Callable[[Any, Collection[str]], dict[str, bytes]],
        data: Any,
    ) -> None:
        self.futures, self.draw, self.data = futures, draw, data

    def pngs(self) -> dict[str, bytes]:
        pngs: dict[str, bytes] = {}
        for future, names, lane in self.futures:
            try:
                pngs |= future.result()
            except BrokenProcessPool:
                _forget_lane(lane)
                pngs |= self.draw(self.data, names)
        return pngs

    def then(self, use: Callable[[dict[str, bytes]], None]) -> Future:
        """Hand the PNGs to `use` (an upload) in a background thread as soon as they are
        drawn, so the caller logs the model meanwhile; the Future says when it is done
        and raises what `use` raised."""
        return _uploads.submit(lambda: use(self.pngs()))


# One thread for the uploads: a run's figures go up while its model is logged.
_uploads = ThreadPoolExecutor(max_workers=1, thread_name_prefix="figure-upload")

# The worker processes, one per lane: share i of a drawing goes to lane i % lane count,
# so a lane imports only what its shares draw. As many lanes as shares, or fewer where
# this process was given fewer CPU threads (`start_figure_worker`).
_lanes: dict[int, ProcessPoolExecutor] = {}
_lane_count = len(SHARES)
_lanes_lock = threading.Lock()


def _lane(lane: int) -> ProcessPoolExecutor:
    """Lane number `lane`, its process spawned on first use."""
    with _lanes_lock:
        if lane not in _lanes:
            _lanes[lane] = ProcessPoolExecutor(
                max_workers=1,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_worker,
                initargs=(os.getpid(),),
            )
        return _lanes[lane]


def _forget_lane(lane: int) -> None:
    """A lane whose process died: the next drawing spawns a new one."""
    with _lanes_lock:
        _lanes.pop(lane, None)


def lane_modules(preload: Sequence[Sequence[str]], lanes: int) -> list[tuple[str, ...]]:
    """For each of `lanes` lanes, the modules that the shares it draws need (`preload[i]`
    for share i), each once."""
    modules: list[dict[str, None]] = [{} for _ in range(lanes)]
    for share, names in enumerate(preload):
        modules[share % lanes].update(dict.fromkeys(names))
    return [tuple(names) for names in modules]


def start_figure_worker(
    preload: Sequence[Sequence[str]] = (), processes: int | None = None
) -> None:
    """Spawn the figure workers now and let them import matplotlib (and `preload[i]`, the
    modules that share i of a later drawing needs) and load their fonts (about a second)
    while this process imports torch and reads MNIST, rather than during the first run's
    figures. `processes` (at most one per share) is the CPU this process was given: a
    worker given one thread draws in one process. Returns at once; any failure shows
    later as a drawing here."""
    global _lane_count
    if processes is not None and not _lanes:
        _lane_count = max(1, min(processes, len(SHARES)))
    with contextlib.suppress(BrokenProcessPool, RuntimeError, OSError):
        for lane, modules in enumerate(lane_modules(preload, _lane_count)):
            _lane(lane).submit(_warm_up, modules)


def _warm_up(preload: tuple[str, ...] = ()) -> None:
    render_png(training_curves([]))
    for module in preload:
        importlib.import_module(module)


def render_async(data: dict[str, Any]) -> FigureJob:
    """Start drawing a run's figures in the worker processes (spawned once, reused), so
    the caller can log the model meanwhile: training has left both cores free."""
    return in_workers(render_run_figures, data, SHARES)


def in_workers(
    draw: Callable[[Any, Collection[str]], dict[str, bytes]],
    data: Any,
    shares: Sequence[tuple[str, ...]],
) -> FigureJob:
    """Start `draw(data, share)` for each share of figure names, share i in lane i; `draw`
    must be a module-level function (it is pickled by name)."""
    futures: list[tuple[Future, tuple[str, ...], int]] = []
    for index, names in enumerate(shares):
        lane = index % _lane_count
        try:
            future = _lane(lane).submit(draw, data, names)
        except (BrokenProcessPool, RuntimeError, OSError):
            _forget_lane(lane)
            future = Future()
            future.set_result(draw(data, names))
        futures.append((future, names, lane))
    return FigureJob(futures, draw, data)


# What a figure worker would import but never uses: Optuna's importance package imports
# scikit-learn (1.3-2 CPU-s) for its fANOVA evaluator, and the study's importances are
# PED-ANOVA's (study_plots). Refused, the import fails as Optuna's optional imports do
# where scikit-learn is not installed, and fANOVA alone is unavailable.
REFUSED_IN_WORKERS = ("sklearn",)


def _start_worker(parent_pid: int) -> None:
    for name in REFUSED_IN_WORKERS:
        sys.modules.setdefault(name, None)  # type: ignore[assignment]
    _follow_parent(parent_pid)


def _follow_parent(parent_pid: int) -> None:
    """In the figure worker: let go of the terminal, and exit when the process that
    started it is gone. A killed `train` or `tune` must not leave a worker behind that
    holds its stdout (a `| tee` would never end) and ~90 MB."""
    devnull = os.open(os.devnull, os.O_RDWR)
    for descriptor in (0, 1, 2):
        os.dup2(devnull, descriptor)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_CHECK_SECONDS)
        os._exit(0)

    threading.Thread(target=watch, name="follow-parent", daemon=True).start()
