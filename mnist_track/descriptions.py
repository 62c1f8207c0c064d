"""What the MLflow UI says about our runs and models, in words: the registered model's
Markdown description, each version's, a study's parent run's and a trial run's note.

Pure text from plain values; registry.py, runs.py and tune.py put it where MLflow shows
it (a description, or the `mlflow.note.content` tag the UI shows as a run's
description)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mnist_track.defaults import CHAMPION_ALIAS

NOTE_TAG = "mlflow.note.content"  # the UI's "Description" of a run


def registered_model(name: str) -> str:
    return f"""\
MNIST digit classifier trained by **mnist-track** (PyTorch; an MLP or a small CNN).

**Input**: 28x28 grayscale digits, white on black as in MNIST, as raw pixels 0..255:
one image is 784 numbers (row-major) or 28 rows of 28, or a base64 string of the 784
raw bytes or of a PNG/JPEG file; a DataFrame of 784 pixel columns also works
(`mlflow models predict -t csv`). Normalization happens inside the model.

**Output**: per image, `digit` (0-9) and `probabilities` (ten numbers summing to 1).

**Which version**: the alias `{CHAMPION_ALIAS}` points at the version with the best
validation accuracy among versions validated on the same split.

**Serve it**:

```
mlflow models serve -m "models:/{name}@{CHAMPION_ALIAS}" --env-manager local \\
    --host 127.0.0.1 --port 5001
curl -s http://127.0.0.1:5001/invocations -H 'Content-Type: application/json' \\
    -d '{{"inputs": [[0, 0, ..., 0]]}}'
```
"""


def version(
    *,
    architecture: str,
    validation_accuracy: float,
    test_accuracy: float,
    run_id: str,
    experiment_id: str,
    study: str | None = None,
    trial: int | None = None,
) -> str:
    origin = f"trial {trial} of study `{study}`" if study is not None else "`mnist-track train`"
    # A hash link: the UI is a single-page app, so this opens the run's page in place.
    run_link = f"[{run_id}](#/experiments/{experiment_id}/runs/{run_id})"
    return (
        f"**{architecture}**, from {origin}.\n\n"
        f"- validation accuracy: {validation_accuracy:.4f}\n"
        f"- test accuracy: {test_accuracy:.4f}\n"
        f"- run: {run_link}\n"
    )


def params_line(params: Mapping[str, Any]) -> str:
    """A trial's parameters in one line, as a person writes them."""
    return ", ".join(f"{key}={_number(value)}" for key, value in params.items())


def trial_note(study: str, trial: int, params: Mapping[str, Any]) -> str:
    return f"Trial {trial} of study `{study}`: {params_line(params)}"


def run_note(architecture: str, params: Mapping[str, Any]) -> str:
    return f"{architecture}: {params_line(params)}"


def study_note(
    study: str,
    *,
    n_trials: int | None,
    searched: list[str],
    registered_model: str,
    best: tuple[int, float, Mapping[str, Any]] | None = None,
    stopped: str | None = None,
) -> str:
    """The parent run's description; `best` is (trial number, value, params) once known,
    `stopped` why the study stopped early, if it did."""
    planned = f"{n_trials} trials" if n_trials is not None else "trials until its timeout"
    lines = [
        f"Optuna study `{study}`: {planned} searching {', '.join(searched)}; "
        f"maximizes validation accuracy. Trials are this run's children; their models go to "
        f"`{registered_model}`. The full config is `study_config.yaml` among the artifacts.",
    ]
    if best is not None:
        number, value, params = best
        lines.append(
            f"\n**Best trial**: {number}, validation accuracy {value:.4f} ({params_line(params)})."
        )
    if stopped:
        lines.append(f"\n**Stopped early**: {stopped}.")
    return "\n".join(lines)


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)
