"""Optuna's study plots drawn from frozen trials, in the figure workers or here."""

from __future__ import annotations

import io

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
