"""A study's Optuna plots (optimization history, intermediate values, slice, parallel
coordinates, parameter importances) as PNGs, drawn from the study's frozen trials so the
drawing can happen in the figure worker processes: rendering them is most of a study's
summary (~0.6 s on a 2-core CPU), and two workers draw them in about half that."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import optuna
from optuna.trial import FrozenTrial, TrialState

from mnist_track import plots

# Two shares of about equal rendering time, one per worker process.
SHARES = (
    ("slice", "optimization_history"),
    ("parallel_coordinate", "intermediate_values", "param_importances"),
)
MIN_WIDTH, MIN_HEIGHT = 8, 5  # inches: Optuna's defaults crowd the labels
# What each share's plots import on first use, worth importing in the figure workers
# while a study starts (`plots.start_figure_worker(PRELOAD)`), not while its summary
# waits. Only the lane that draws the importances (the second share's) imports them.
_PLOTTING = ("mnist_track.study_plots", "optuna.visualization.matplotlib")
PRELOAD = (_PLOTTING, (*_PLOTTING, "optuna.importance"))


@dataclass(frozen=True)
class StudyPlotData:
    """What the plots need, as plain picklable data."""

    trials: Sequence[FrozenTrial]
    directions: Sequence[str]  # "maximize" / "minimize"
    metric_names: Sequence[str] | None


def plot_data(study: optuna.Study) -> StudyPlotData:
    return StudyPlotData(
        trials=study.get_trials(deepcopy=False),
        directions=[direction.name.lower() for direction in study.directions],
        metric_names=study.metric_names,
    )


def plot_names(trials: Sequence[FrozenTrial]) -> list[str]:
    """The plots these trials are enough for."""
    return list(_plotters(trials))


def _plotters(trials: Sequence[FrozenTrial]) -> dict[str, Callable]:
    """Optuna's matplotlib plots that these trials are enough for."""
    from optuna.visualization import matplotlib as optuna_plots

    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if not complete:
        return {}
    plotters: dict[str, Callable] = {
        "optimization_history": optuna_plots.plot_optimization_history,
        "intermediate_values": optuna_plots.plot_intermediate_values,
        "slice": optuna_plots.plot_slice,
        "parallel_coordinate": optuna_plots.plot_parallel_coordinate,
    }
    if len(complete) >= 2 and _varied_params(complete):
        plotters["param_importances"] = _plot_importances
    return plotters


def _plot_importances(study: optuna.Study):
    """Optuna's importances plot by PED-ANOVA, Optuna 5's default evaluator, named so that
    every supported Optuna draws the same plot (4.x defaults to fANOVA) and none needs
    scikit-learn, which the figure workers refuse (`plots.REFUSED_IN_WORKERS`)."""
    from optuna.importance import PedAnovaImportanceEvaluator
    from optuna.visualization.matplotlib import plot_param_importances

    return plot_param_importances(study, evaluator=PedAnovaImportanceEvaluator())


def _varied_params(trials: list[FrozenTrial]) -> bool:
    names = {name for trial in trials for name in trial.params}
    return any(len({repr(t.params.get(n)) for t in trials}) > 1 for n in names)


def render(data: StudyPlotData, names: Collection[str] | None = None) -> dict[str, bytes]:
    """PNG bytes by file name ("slice.png", ...) of the plots in `names` (all by default)
    that the trials are enough for; a plot Optuna cannot draw is skipped with a warning."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=list(data.directions))
    study.add_trials(data.trials)
    if data.metric_names:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(list(data.metric_names))
    pngs: dict[str, bytes] = {}
    for name, plot in _plotters(data.trials).items():
        if names is not None and name not in names:
            continue
        # Optuna's plots switch the whole process to its ggplot style, except the parallel
        # coordinates, which take whatever style the plot before left: all in ggplot, and
        # only they, so the run figures drawn later in this process look as they always do.
        with plt.style.context("ggplot"):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    axes = plot(study)
            except Exception as error:  # noqa: BLE001 - a plot that cannot be drawn is skipped
                logging.getLogger(__name__).warning("study plot %s skipped: %s", name, error)
                continue
            first = axes.flat[0] if hasattr(axes, "flat") else axes
            figure = first.figure
            figure.set_size_inches(
                max(figure.get_figwidth(), MIN_WIDTH), max(figure.get_figheight(), MIN_HEIGHT)
            )
            pngs[f"{name}.png"] = plots.render_png(figure)
            plt.close(figure)
    return pngs


def render_async(study: optuna.Study) -> plots.FigureJob:
    """Start drawing the study's plots in the figure worker processes."""
    return plots.in_workers(render, plot_data(study), SHARES)
