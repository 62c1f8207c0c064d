"""Optuna's study plots drawn from frozen trials, in the figure workers or here."""

from __future__ import annotations

import io
import sys
from types import SimpleNamespace

import optuna
import pytest
from PIL import Image

from mnist_track import plots, study_plots

ALL = {
    "optimization_history.png",
    "intermediate_values.png",
    "slice.png",
    "parallel_coordinate.png",
    "param_importances.png",
}


def _study(n_trials: int, vary: bool = True) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(0))
    with pytest.warns(optuna.exceptions.ExperimentalWarning):
        study.set_metric_names(["validation_accuracy"])

    def objective(trial: optuna.Trial) -> float:
        lr = trial.suggest_float("lr", 1e-4, 1e-2, log=True) if vary else 1e-3
        units = trial.suggest_int("units", 16, 64) if vary else trial.suggest_int("units", 32, 32)
        for epoch in range(3):
            trial.report(0.5 + 0.1 * epoch + lr, epoch)
        return 0.9 + lr + units / 1000

    study.optimize(objective, n_trials=n_trials)
    return study


def _decoded(pngs: dict[str, bytes]) -> dict[str, tuple[int, int]]:
    return {name: Image.open(io.BytesIO(png)).size for name, png in pngs.items()}


def test_all_five_plots_are_drawn_in_the_workers():
    study = _study(4)
    pngs = study_plots.render_async(study).pngs()
    assert set(pngs) == ALL
    for name, (width, height) in _decoded(pngs).items():
        assert width >= 8 * 100 * 0.99 and height >= 5 * 100 * 0.99, name


def test_the_workers_draw_what_drawing_here_draws():
    study = _study(3)
    here = study_plots.render(study_plots.plot_data(study))
    there = study_plots.render_async(study).pngs()
    assert _decoded(here) == _decoded(there)


def test_the_shares_cover_every_plot_once():
    names = [name for share in study_plots.SHARES for name in share]
    assert sorted(f"{name}.png" for name in names) == sorted(ALL)


@pytest.mark.parametrize(
    ("n_trials", "vary", "expected"),
    [(0, True, set()), (1, True, ALL - {"param_importances.png"}),
     (3, False, ALL - {"param_importances.png"})],
)  # fmt: skip
def test_plots_need_enough_trials(n_trials, vary, expected):
    study = _study(n_trials, vary)
    names = study_plots.plot_names(study.get_trials())
    assert {f"{name}.png" for name in names} == expected
    assert set(study_plots.render(study_plots.plot_data(study))) == expected


def test_a_dead_worker_pool_is_drawn_here(monkeypatch):
    def broken_lane(lane: int):
        raise RuntimeError("cannot start a process")

    monkeypatch.setattr(plots, "_lane", broken_lane)
    assert set(study_plots.render_async(_study(3)).pngs()) == ALL


def _drawn_noting_scikit_learn(data, names):
    """A figure worker's drawing of `names`, and whether scikit-learn was imported."""
    imported = b"no" if sys.modules.get("sklearn") is None else b"yes"
    pngs = study_plots.render(data, names)
    after = b"no" if sys.modules.get("sklearn") is None else b"yes"
    return pngs | {f"scikit-learn, {names[0]}": imported + b"/" + after}


def test_the_workers_draw_the_importances_without_importing_scikit_learn():
    # Optuna's importance package imports it (1.3-2 CPU-s) for fANOVA, which the
    # importances plot does not use: a figure worker refuses it.
    data = study_plots.plot_data(_study(4))
    pngs = plots.in_workers(_drawn_noting_scikit_learn, data, study_plots.SHARES).pngs()
    assert set(pngs) - ALL == {f"scikit-learn, {share[0]}" for share in study_plots.SHARES}
    assert "param_importances.png" in pngs
    for share in study_plots.SHARES:
        assert pngs[f"scikit-learn, {share[0]}"] == b"no/no", share


def test_the_importances_are_ped_anovas_on_every_supported_optuna(monkeypatch):
    # Optuna 5 draws PED-ANOVA's by default, 4.x fANOVA's: named, the plot is the same.
    from optuna.importance import PedAnovaImportanceEvaluator
    from optuna.visualization import matplotlib as optuna_plots

    evaluators = []
    draw = optuna_plots.plot_param_importances

    def recorded(study, evaluator=None, **options):
        evaluators.append(evaluator)
        return draw(study, evaluator=evaluator, **options)

    monkeypatch.setattr(optuna_plots, "plot_param_importances", recorded)
    pngs = study_plots.render(study_plots.plot_data(_study(4)), ["param_importances"])
    assert set(pngs) == {"param_importances.png"}
    assert [type(evaluator) for evaluator in evaluators] == [PedAnovaImportanceEvaluator]


def test_drawing_the_study_plots_leaves_the_run_figures_as_they_were():
    # Optuna's plots set the ggplot style for the whole process; a worker draws a study's
    # summary and then, in the next study of the same process, runs' figures.
    import matplotlib

    curves = [SimpleNamespace(epoch=1, train_loss=0.5, train_accuracy=0.8,
                              validation_loss=0.4, validation_accuracy=0.85)]  # fmt: skip
    with matplotlib.rc_context():
        matplotlib.rcdefaults()  # as this process started, whatever ran here before
        before = plots.render_png(plots.training_curves(curves))
        settings = dict(matplotlib.rcParams)
        study_plots.render(study_plots.plot_data(_study(4)))
        assert dict(matplotlib.rcParams) == settings
        assert plots.render_png(plots.training_curves(curves)) == before


def test_each_study_plot_looks_the_same_drawn_alone_or_after_the_others():
    # Optuna's parallel coordinates set no style of their own: alone, in a fresh worker's
    # lane, they must still be drawn in the style of the others.
    import matplotlib

    data = study_plots.plot_data(_study(4))
    alone = {}
    with matplotlib.rc_context():
        for name in study_plots.plot_names(data.trials):
            matplotlib.rcdefaults()  # as a fresh process
            alone |= study_plots.render(data, [name])
        matplotlib.rcdefaults()
        together = study_plots.render(data)
    assert set(alone) == set(together) == ALL
    assert alone == together
