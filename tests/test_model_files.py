"""`mnist-track predict` reads a logged model's files, never its code: a model the project
logged predicts as its pyfunc model does, code planted in a logged model never runs, and
models the project did not log are refused with one clear line (exit 1)."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
from conftest import confidence, read_predictions, run_cli
from mlflow import MlflowClient

MODEL = "files-model"
N_IMAGES = 8
# Planted in every Python file of a model: whoever imports or runs one leaves this file.
MARKER_CODE = "import pathlib\npathlib.Path({marker!r}).write_text('model code ran')\n"


@pytest.fixture(scope="module")
def logged(tmp_path_factory, small_splits, raw_mnist):
    """A SQLite store with the model a tiny tracked run logged (version 1), two more
    models the project logged with the same weights (one registered as version 2, one to
    plant code in), and PNGs of test digits."""
    from PIL import Image
    from safetensors.torch import load_file

    from mnist_track import registry, tracking
    from mnist_track.config import TrainConfig
    from mnist_track.models import architecture_of
    from mnist_track.runs import train_and_track

    folder = tmp_path_factory.mktemp("model-files")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    config = TrainConfig(epochs=1, hidden_sizes=(32,))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)  # MLflow puts a SQLite store's artifacts in ./mlruns
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        train_and_track(config, small_splits, experiment="model-files", registered_model=MODEL)
        weights = mlflow.artifacts.download_artifacts(
            f"models:/{MODEL}/1/artifacts/model.safetensors", dst_path=str(folder / "v1")
        )
        copies = {}
        for name in ("version-2", "copy"):
            with tracking.start_run("model-files", name) as run:
                example = np.zeros((1, 784), np.uint8)
                copies[name] = tracking.log_model(
                    run, load_file(weights), architecture_of(config), example
                )
            if name == "version-2":
                registry.register_version(copies[name], MODEL, run.run_id, {})
    digits = folder / "digits"
    digits.mkdir()
    images = raw_mnist.test_images[:N_IMAGES]
    for index, image in enumerate(images):
        Image.fromarray(image).save(digits / f"digit{index}.png")
    pixels = images.reshape(N_IMAGES, -1).astype(np.float32)
    return {
        "uri": uri,
        "folder": folder,
        **copies,
        "digits": digits,
        "pixels": pixels,
    }


@pytest.fixture
def store(logged, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", logged["uri"])
    monkeypatch.chdir(logged["folder"])
    monkeypatch.setattr(sys, "path", list(sys.path))  # pyfunc loading prepends code/
    mlflow.set_tracking_uri(logged["uri"])
    return logged


def predict(store, model_uri: str, check: bool = True):
    return run_cli("predict", "-m", model_uri, str(store["digits"]), check=check)


def predictions(result) -> list[tuple[int, float]]:
    return [(int(row["digit"]), confidence(row)) for row in read_predictions(result.stdout)]


def pyfunc_predictions(model_uri: str, pixels: np.ndarray) -> list[tuple[int, float]]:
    frame = mlflow.pyfunc.load_model(model_uri).predict(pixels)
    return [(int(d), max(p)) for d, p in zip(frame["digit"], frame["probabilities"], strict=True)]


def assert_same(found, expected) -> None:
    assert [digit for digit, _ in found] == [digit for digit, _ in expected]
    assert np.allclose([c for _, c in found], [c for _, c in expected], atol=1e-4)


def model_folder(model_uri: str) -> Path:
    """Where a local store keeps a logged model's files."""
    from mlflow.utils.file_utils import local_file_uri_to_path

    location = MlflowClient().get_logged_model(model_uri.removeprefix("models:/")).artifact_location
    return Path(local_file_uri_to_path(location))


def plant(model: Path, marker: Path) -> None:
    """Code that leaves `marker` when run, in the model's model_code.py and code/ folder."""
    code = MARKER_CODE.format(marker=str(marker))
    for module in [model / "model_code.py", *(model / "code").rglob("*.py")]:
        module.write_text(code + module.read_text())
    (model / "code" / "mnist_track" / "planted.py").write_text(code)


@pytest.mark.e2e  # `mnist-track predict` as a subprocess
def test_a_logged_model_predicts_as_its_pyfunc_model(store):
    """Version 2 holds version 1's weights; without its code it still predicts the same."""
    model = model_folder(store["version-2"])
    (model / "model_code.py").unlink()
    shutil.rmtree(model / "code")
    found = predictions(predict(store, f"models:/{MODEL}/2"))
    assert len(found) == N_IMAGES
    assert_same(found, pyfunc_predictions(f"models:/{MODEL}/1", store["pixels"]))


@pytest.mark.e2e  # `mnist-track predict` as a subprocess
def test_code_planted_in_a_logged_model_never_runs(store, tmp_path):
    marker = tmp_path / "ran"
    plant(model_folder(store["copy"]), marker)
    found = predictions(predict(store, store["copy"]))
    assert not marker.exists()
    assert_same(found, pyfunc_predictions(f"models:/{MODEL}/1", store["pixels"]))
    mlflow.pyfunc.load_model(store["copy"])  # MLflow's loader runs it: the plant is live
    assert marker.exists()


def without_architecture(model: Path) -> None:
    (model / "artifacts" / "architecture.json").unlink()


def unknown_family(model: Path) -> None:
    architecture = {"model": "transformer", "hidden_sizes": [32], "dropout": 0.0}
    (model / "artifacts" / "architecture.json").write_text(json.dumps(architecture))


def mismatched_weights(model: Path) -> None:
    architecture = {"model": "mlp", "hidden_sizes": [64], "dropout": 0.0}
    (model / "artifacts" / "architecture.json").write_text(json.dumps(architecture))


@pytest.mark.e2e  # `mnist-track predict` as a subprocess
@pytest.mark.parametrize(
    ("doctor", "reason"),
    [
        (without_architecture, "it has no artifacts/architecture.json"),
        (unknown_family, "names the model family 'transformer'"),
        (mismatched_weights, "has the shape [32, 784], the architecture needs [64, 784]"),
    ],
)
def test_an_altered_model_is_refused(store, tmp_path, doctor, reason):
    model = Path(
        mlflow.artifacts.download_artifacts(f"models:/{MODEL}/1", dst_path=str(tmp_path / "m"))
    )
    marker = tmp_path / "ran"
    plant(model, marker)
    doctor(model)
    assert_refused(predict(store, str(model), check=False), reason)
    assert not marker.exists()


@pytest.mark.e2e  # `mnist-track predict` as a subprocess
def test_a_foreign_sklearn_model_is_refused(store):
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    classifier = LogisticRegression(max_iter=50).fit(rng.random((20, 784)), np.arange(20) % 10)
    with mlflow.start_run():
        info = mlflow.sklearn.log_model(
            classifier, name="foreign", pip_requirements=["scikit-learn"]
        )
    result = predict(store, info.model_uri, check=False)
    assert_refused(result, "its python_function loader is 'mlflow.sklearn', not ours")


def assert_refused(result, reason: str) -> None:
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("Error: refusing ") and "not a model mnist-track logged" in line
    assert reason in line, line
    assert result.stdout == ""


# --- the checks one by one, in process (no CLI start-up per case) -----------------------


@pytest.fixture
def clean_model(store, tmp_path) -> Path:
    return Path(
        mlflow.artifacts.download_artifacts(f"models:/{MODEL}/1", dst_path=str(tmp_path / "m"))
    )


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("architecture", "reason"),
    [
        ({"hidden_sizes": [0]}, "has hidden_sizes [0], not a list of 0 to 64 positive integers"),
        ({"hidden_sizes": [32.0]}, "not a list of 0 to 64 positive integers"),
        ({"hidden_sizes": [True]}, "not a list of 0 to 64 positive integers"),
        ({"hidden_sizes": [1] * 65}, "not a list of 0 to 64 positive integers"),
        ({"hidden_sizes": [10**30]}, "its architecture.json describes no buildable network"),
        ({"dropout": 1.5}, "has a dropout of 1.5, not in [0, 1)"),
        ({"dropout": "0.1"}, "has a dropout of '0.1', not a number"),
        ({"extra": 1}, "has the keys ['dropout', 'extra', 'hidden_sizes', 'model']"),
        ({"model": "cnn"}, "has the keys ['dropout', 'hidden_sizes', 'model'], not"),
        ({"model": "cnn", "channels": [8] * 5}, "has channels [8, 8, 8, 8, 8], not a list of 1"),
    ],
)
def test_bad_architectures_are_refused(clean_model, architecture, reason):
    from mnist_track.model_files import ForeignModel, load_classifier

    edit_json(clean_model / "artifacts" / "architecture.json", **architecture)
    with pytest.raises(ForeignModel, match=re.escape(reason)):
        load_classifier(str(clean_model))


def test_an_architecture_that_is_not_json_is_refused(clean_model):
    from mnist_track.model_files import ForeignModel, load_classifier

    (clean_model / "artifacts" / "architecture.json").write_text("{'model': 'mlp'")
    with pytest.raises(ForeignModel, match="its architecture.json is not valid JSON"):
        load_classifier(str(clean_model))


def test_weights_that_are_not_ours_are_refused(clean_model):
    import torch
    from safetensors.torch import load_file, save_file

    from mnist_track.model_files import ForeignModel, load_classifier

    weights = clean_model / "artifacts" / "model.safetensors"
    tensors = load_file(weights)
    save_file({k: v.to(torch.float64) for k, v in tensors.items()}, weights)
    with pytest.raises(ForeignModel, match=r"is F64, not float32"):
        load_classifier(str(clean_model))
    save_file({**tensors, "extra.weight": torch.zeros(1)}, weights)
    with pytest.raises(ForeignModel, match=r"unexpected \['extra.weight'\]"):
        load_classifier(str(clean_model))
    weights.write_bytes(b"\x80\x04 a pickle, not safetensors")
    with pytest.raises(ForeignModel, match="is not a safetensors file"):
        load_classifier(str(clean_model))


def test_mlmodels_that_are_not_ours_are_refused(clean_model):
    import yaml

    from mnist_track.model_files import ForeignModel, load_classifier

    path = clean_model / "MLmodel"
    ours = yaml.safe_load(path.read_text())
    pyfunc = ours["flavors"]["python_function"]
    cases = {
        "its python_function loader is 'mlflow.pyfunc.model'": {
            **pyfunc,
            "loader_module": "mlflow.pyfunc.model",
            "python_model": "python_model.pkl",
        },
        "its python model is '/elsewhere/agent.py'": {
            **pyfunc,
            "model_code_path": "/elsewhere/agent.py",
        },
        "its MLmodel declares the artifacts": {
            **pyfunc,
            "artifacts": {"weights": {"path": "artifacts/../../model.safetensors"}},
        },
    }
    for reason, flavor in cases.items():
        path.write_text(yaml.safe_dump({**ours, "flavors": {"python_function": flavor}}))
        with pytest.raises(ForeignModel, match=re.escape(reason)):
            load_classifier(str(clean_model))
    path.write_text("flavors: [unclosed")
    with pytest.raises(ForeignModel, match="its MLmodel is not valid YAML"):
        load_classifier(str(clean_model))


def test_the_loaded_network_is_the_logged_one(clean_model, store):
    from safetensors.torch import load_file

    from mnist_track.model_files import load_classifier

    classifier = load_classifier(str(clean_model))
    logged = load_file(clean_model / "artifacts" / "model.safetensors")
    assert all(
        (classifier.network.state_dict()[key] == value).all() for key, value in logged.items()
    )
    assert not classifier.network.training
    shutil.rmtree(clean_model / "code")  # never needed
    load_classifier(str(clean_model))
