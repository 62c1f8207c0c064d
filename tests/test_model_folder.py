"""A logged model's folder: a process's first is saved by MLflow and checked as MLflow's
log_model checks it; the later ones are made from its template, byte for byte what MLflow
would have written, and checked on their own weights and architecture."""

from __future__ import annotations

import json
import shutil

import mlflow
import numpy as np
import pytest
import torch
from mlflow.models import Model

from mnist_track import model_folder
from mnist_track.config import TrainConfig
from mnist_track.models import architecture_of, build_model
from mnist_track.pixels import to_pixels

TEMPLATE_CONFIG = TrainConfig(hidden_sizes=(16,))
CONFIGS = {
    "mlp 784-32-10": TrainConfig(hidden_sizes=(32,)),
    "mlp 784-128-64-10": TrainConfig(hidden_sizes=(128, 64), dropout=0.3),
    "cnn": TrainConfig(model="cnn"),
}
UNSCORED = "cannot score its own input example"


@pytest.fixture(autouse=True)
def no_template():
    model_folder.forget_templates()
    yield
    model_folder.forget_templates()


@pytest.fixture
def example(small_splits) -> np.ndarray:
    return to_pixels(small_splits.test.images[:1]).reshape(1, -1)


@pytest.fixture
def mlflow_saves(monkeypatch) -> list[str]:
    """The folders mlflow.pyfunc.save_model wrote."""
    saves: list[str] = []
    real = mlflow.pyfunc.save_model

    def counted(path, *args, **kwargs):
        saves.append(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(mlflow.pyfunc, "save_model", counted)
    return saves


def identity(n: int) -> Model:
    """What tracking.log_model names a model by; the time fixed, so two folders of one
    model compare equal."""
    return Model(
        artifact_path=f"file:///store/models/m-{n}/artifacts",
        run_id=f"run-{n}",
        model_id=f"m-{n}",
        model_uuid=f"m-{n}",
        utc_time_created="2026-12-06 12:00:00.000000",
    )


def save(tmp_path, name, config, example, n=0, break_architecture=False, scratch="files"):
    """(folder, network): a model saved as log_model saves it, then checked. MLmodel
    records where the data files came from (`scratch`): two folders of one model compare
    equal where it is the same."""
    torch.manual_seed(n)
    architecture = architecture_of(config)
    network = build_model(architecture)
    scratch = tmp_path / scratch
    shutil.rmtree(scratch, ignore_errors=True)
    path = tmp_path / name
    with model_folder.imports_undone(tmp_path):
        check = model_folder.save(
            path, identity(n), network.state_dict(), architecture, example, scratch
        )
        if break_architecture:  # an architecture its weights do not fit
            file = path / "artifacts" / model_folder.ARCHITECTURE_FILE
            file.write_text(json.dumps(json.loads(file.read_text()) | {"hidden_sizes": [7]}))
        check()
    return path, network


def files_of(path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob("*") if p.is_file()}


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_a_folder_made_from_the_template_is_the_folder_mlflow_saves(
    tmp_path, example, config, mlflow_saves
):
    save(tmp_path, "template", TEMPLATE_CONFIG, example, n=0, scratch="template-files")
    templated, _ = save(tmp_path, "templated", config, example, n=1)
    assert len(mlflow_saves) == 1  # the template's
    model_folder.forget_templates()
    by_mlflow, _ = save(tmp_path, "by-mlflow", config, example, n=1)
    assert len(mlflow_saves) == 2
    # Every file, MLmodel with its size and identity included, the same bytes.
    assert files_of(templated) == files_of(by_mlflow)


def test_a_template_without_a_size_makes_folders_as_mlflow_does(tmp_path, example, monkeypatch):
    """MLflow writes no model_size_bytes where it cannot add the files up."""
    monkeypatch.setattr(mlflow.pyfunc.model, "get_total_file_size", lambda path: None)
    save(tmp_path, "template", TEMPLATE_CONFIG, example, n=0, scratch="template-files")
    templated, _ = save(tmp_path, "templated", CONFIGS["cnn"], example, n=1)
    model_folder.forget_templates()
    by_mlflow, _ = save(tmp_path, "by-mlflow", CONFIGS["cnn"], example, n=1)
    assert b"model_size_bytes" not in (by_mlflow / "MLmodel").read_bytes()
    assert files_of(templated) == files_of(by_mlflow)


def test_only_a_process_s_first_model_is_saved_by_mlflow(tmp_path, example, mlflow_saves):
    for n in range(3):
        save(tmp_path, f"model-{n}", TEMPLATE_CONFIG, example, n)
    assert len(mlflow_saves) == 1
    # Another input example is another template.
    save(tmp_path, "other-example", TEMPLATE_CONFIG, np.zeros_like(example), n=3)
    assert len(mlflow_saves) == 2


def test_a_folder_made_from_the_template_loads_in_mlflow_and_predicts_as_its_network(
    tmp_path, example, small_splits
):
    save(tmp_path, "template", TEMPLATE_CONFIG, example, n=0)
    path, network = save(tmp_path, "templated", CONFIGS["cnn"], example, n=1)
    images = small_splits.test.images[:16]
    with model_folder.imports_undone(tmp_path):
        loaded = mlflow.pyfunc.load_model(str(path))
        digits = loaded.predict(to_pixels(images).reshape(16, -1))["digit"]
    network.eval()
    with torch.inference_mode():
        expected = network(images).argmax(dim=1).numpy()
    assert list(digits) == list(expected)


@pytest.mark.parametrize("made", ["saved by MLflow", "made from the template"])
def test_a_model_that_scores_its_example_passes_the_check(tmp_path, example, caplog, made):
    if made == "made from the template":
        save(tmp_path, "template", TEMPLATE_CONFIG, example, n=0)
    with caplog.at_level("WARNING"):
        save(tmp_path, "model", CONFIGS["mlp 784-32-10"], example, n=1)
    assert UNSCORED not in caplog.text


@pytest.mark.parametrize("made", ["saved by MLflow", "made from the template"])
def test_a_model_that_cannot_score_its_example_is_warned_about(tmp_path, example, caplog, made):
    if made == "made from the template":
        save(tmp_path, "template", TEMPLATE_CONFIG, example, n=0)
    with caplog.at_level("WARNING"):
        save(tmp_path, "model", CONFIGS["mlp 784-32-10"], example, n=1, break_architecture=True)
    assert UNSCORED in caplog.text


def test_a_model_that_fails_mlflow_s_check_leaves_no_template(
    tmp_path, example, mlflow_saves, caplog
):
    with caplog.at_level("WARNING"):
        save(tmp_path, "broken", TEMPLATE_CONFIG, example, n=0, break_architecture=True)
    assert UNSCORED in caplog.text
    save(tmp_path, "next", TEMPLATE_CONFIG, example, n=1)
    save(tmp_path, "after", TEMPLATE_CONFIG, example, n=2)
    assert len(mlflow_saves) == 2  # the broken one's, then the next one's, the template
