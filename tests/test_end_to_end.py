"""End to end through the real parts: the CLI as a subprocess, a real SQLite MLflow store
checked with MlflowClient, a real `mlflow models serve` process over HTTP on loopback, and
`mlflow run .` with the MLproject."""

from __future__ import annotations

import base64
import io
import json
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import BIN_DIR, REPO_ROOT, cli_env, confidence, read_predictions, run_cli

pytestmark = pytest.mark.e2e

MODEL = "e2e-model"
EXPERIMENT = "e2e"
SMALL = ["--train-limit", "3000", "--val-size", "1000", "--test-limit", "500"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A tracking store with one trained, registered model (version 1)."""
    import mlflow

    folder = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    result = run_cli(
        "train",
        "--epochs",
        "2",
        *SMALL,
        "--experiment",
        EXPERIMENT,
        "--registered-model",
        MODEL,
        "--run-name",
        "first",
        cwd=folder,
        MLFLOW_TRACKING_URI=uri,
    )
    return {"uri": uri, "folder": folder, "stdout": result.stdout}


@pytest.fixture
def client(store):
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(store["uri"])
    return MlflowClient(store["uri"])


def only_run(client, name="first"):
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], f"attributes.run_name = '{name}'")
    assert len(runs) == 1
    return runs[0]


def test_train_logs_params_metrics_and_tags(client):
    run = only_run(client)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["model"] == "mlp"
    assert params["hidden_sizes"] == "128,64"
    assert params["epochs"] == "2"
    assert params["train_limit"] == "3000"
    assert {"lr", "dropout", "batch_size", "seed", "optimizer", "lr_schedule"} <= params.keys()
    for key in ("train/loss", "train/accuracy", "val/loss", "val/accuracy"):
        history = client.get_metric_history(run.info.run_id, key)
        assert sorted(m.step for m in history) == [1, 2], key
    metrics = run.data.metrics
    assert 0.7 < metrics["test/accuracy"] <= 1.0
    assert 0.0 < metrics["test/macro_f1"] <= 1.0
    assert all(f"test/f1_class_{d}" in metrics for d in range(10))
    tags = run.data.tags
    assert tags["model_family"] == "mlp"
    assert tags["split.train"] == "3000"
    assert tags["split.validation"] == "1000"
    assert tags["split.test"] == "500"
    assert tags["device"] == "cpu"


def test_train_logs_plots(client):
    run = only_run(client)
    names = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert names == {
        "plots/training_curves.png",
        "plots/confusion_matrix.png",
        "plots/per_class_scores.png",
        "plots/test_predictions.png",
        "plots/misclassified.png",
    }
    local = client.download_artifacts(run.info.run_id, "plots/confusion_matrix.png")
    assert Path(local).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_model_is_registered_without_pickle(client):
    run = only_run(client)
    version = client.get_model_version(MODEL, "1")
    assert version.run_id == run.info.run_id
    assert float(version.tags["validation_accuracy"]) == pytest.approx(
        run.data.metrics["val/final_accuracy"]
    )
    assert float(version.tags["test_accuracy"]) == pytest.approx(run.data.metrics["test/accuracy"])
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "1"

    import mlflow

    model_dir = Path(mlflow.artifacts.download_artifacts(f"models:/{MODEL}/1"))
    files = {p.name for p in model_dir.rglob("*") if p.is_file()}
    assert "model.safetensors" in files and "architecture.json" in files
    assert not [name for name in files if name.endswith((".pkl", ".pickle", ".pt", ".pth"))]
    mlmodel = (model_dir / "MLmodel").read_text()
    assert "signature" in mlmodel and "input_example" in mlmodel
    requirements = (model_dir / "requirements.txt").read_text()
    assert "torch==" in requirements and "safetensors==" in requirements


def test_worse_model_does_not_take_champion(store, client):
    run_cli(
        "train",
        "--epochs",
        "1",
        "--train-limit",
        "300",
        "--val-size",
        "1000",
        "--test-limit",
        "500",
        "--experiment",
        EXPERIMENT,
        "--registered-model",
        MODEL,
        "--run-name",
        "worse",
        cwd=store["folder"],
        MLFLOW_TRACKING_URI=store["uri"],
    )
    worse = only_run(client, "worse")
    version = client.get_model_version(MODEL, "2")
    assert version.run_id == worse.info.run_id
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "1"


def test_predict_command_reads_png_files(store, raw_mnist, tmp_path):
    from PIL import Image

    images, labels = raw_mnist.test_images[:20], raw_mnist.test_labels[:20]
    for index, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / f"digit{index:02d}.png")
    # A dark digit on white paper, as a phone picture would be: inverted by predict.
    Image.fromarray(255 - images[0]).resize((56, 56)).save(tmp_path / "paper.jpg")
    result = run_cli(
        "predict",
        "--model-uri",
        f"models:/{MODEL}@champion",
        str(tmp_path),
        MLFLOW_TRACKING_URI=store["uri"],
    )
    rows = read_predictions(result.stdout)
    assert len(rows) == 21
    predicted = {Path(row["source"]).name: int(row["digit"]) for row in rows}
    correct = sum(predicted[f"digit{i:02d}.png"] == labels[i] for i in range(20))
    assert correct >= 16, rows
    assert predicted["paper.jpg"] == labels[0]
    assert all(0.0 < confidence(row) <= 1.0 for row in rows)


# --- bad input -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--epochs", "0"], "--epochs"),
        (["--hidden-sizes", "128,x"], "comma-separated list of integers"),
        (["--dropout", "1.5"], "--dropout"),
        (["--model", "resnet"], "--model"),
        (["--device", "cuda:7"], "--device"),
    ],
)
def test_bad_train_options_are_usage_errors(args, message, tracking_uri):
    result = run_cli("train", *args, check=False, MLFLOW_TRACKING_URI=tracking_uri)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not Path("mlflow.db").exists()  # options are checked before the store is touched


def test_bad_config_file_names_file_and_key(tmp_path, tracking_uri):
    config = tmp_path / "bad.yaml"
    config.write_text("epochs: 3\nlearning_rate: 0.1\n")
    result = run_cli("train", "--config", str(config), check=False)
    assert result.returncode == 2
    assert "bad.yaml" in result.stderr and "learning_rate" in result.stderr
    config.write_text("epochs: many\n")
    result = run_cli("train", "--config", str(config), check=False)
    assert result.returncode == 2 and "epochs" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_data_is_a_clear_error(tmp_path, tracking_uri):
    result = run_cli("train", "--data-dir", str(tmp_path / "nothing"), "--no-download", check=False)
    assert result.returncode == 1
    assert "train-images-idx3-ubyte" in result.stderr and "nothing" in result.stderr
    assert "Traceback" not in result.stderr


def test_data_command_verifies_files(data_dir, tmp_path):
    result = run_cli("data", "--data-dir", str(data_dir), "--no-download")
    assert result.stdout.count("sha256 verified") == 4
    for path in data_dir.glob("*.gz"):
        (tmp_path / path.name).write_bytes(path.read_bytes())
    broken = tmp_path / "t10k-labels-idx1-ubyte.gz"
    broken.write_bytes(broken.read_bytes()[:-100])
    result = run_cli("data", "--data-dir", str(tmp_path), "--no-download", check=False)
    assert result.returncode == 1
    assert "t10k-labels-idx1-ubyte.gz" in result.stderr
    assert "Traceback" not in result.stderr


def test_help_does_not_import_torch_or_mlflow():
    import sys

    code = (
        "import sys, mnist_track.cli; "
        "print(sorted(m for m in ('torch', 'mlflow', 'optuna') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert "train" in run_cli("--help").stdout


# --- serving ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(store):
    port = free_port()
    process = subprocess.Popen(
        [
            str(BIN_DIR / "mlflow"),
            "models",
            "serve",
            "-m",
            f"models:/{MODEL}/1",
            "--env-manager",
            "local",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env=cli_env(MLFLOW_TRACKING_URI=store["uri"]),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"mlflow models serve exited:\n{process.stdout.read()}")
        try:
            urllib.request.urlopen(f"{url}/ping", timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    else:
        process.kill()
        pytest.fail("mlflow models serve did not answer /ping within 180 s")
    yield url
    process.terminate()
    process.wait(timeout=30)


def post(url: str, body: bytes | str | dict, content_type="application/json"):
    data = (
        json.dumps(body).encode()
        if isinstance(body, dict)
        else (body.encode() if isinstance(body, str) else body)
    )
    request = urllib.request.Request(
        f"{url}/invocations", data=data, headers={"Content-Type": content_type}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def test_served_model_predicts_raw_pixels(server, raw_mnist):
    images, labels = raw_mnist.test_images[:16], raw_mnist.test_labels[:16]
    for inputs in (
        images.reshape(16, 784).tolist(),  # flat 784
        images.tolist(),  # 28x28
        [base64.b64encode(image.tobytes()).decode() for image in images],  # compact
    ):
        status, body = post(server, {"inputs": inputs})
        assert status == 200, body
        predictions = body["predictions"]
        assert len(predictions) == 16
        digits = np.array([p["digit"] for p in predictions])
        assert (digits == labels).mean() >= 0.75
        for p in predictions:
            assert len(p["probabilities"]) == 10
            assert sum(p["probabilities"]) == pytest.approx(1.0, abs=1e-5)
            assert p["digit"] == int(np.argmax(p["probabilities"]))
    status, body = post(server, {"instances": images[:2].reshape(2, 784).tolist()})
    assert status == 200 and len(body["predictions"]) == 2


def test_served_model_reads_png_base64(server, raw_mnist):
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(raw_mnist.test_images[0]).save(buffer, format="PNG")
    status, body = post(server, {"inputs": [base64.b64encode(buffer.getvalue()).decode()]})
    assert status == 200
    assert body["predictions"][0]["digit"] == raw_mnist.test_labels[0]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"inputs": [[0] * 783]}, "784 values or 28 rows of 28"),
        ({"inputs": [[0] * 784, [0] * 783]}, "inhomogeneous shape"),  # MLflow's own answer
        ({"inputs": [["a"] * 784]}, "numbers 0..255"),
        ({"inputs": [[300] * 784]}, "0..255"),
        ({"inputs": [[-1] * 784]}, "0..255"),
        ({"inputs": ["not base64!"]}, "base64"),
        ({"pixels": [[0] * 784]}, "input fields"),
        ({"inputs": [[0] * 784], "instances": [[0] * 784]}, "exactly one"),
        ('{"inputs": [[0, 0', "valid JSON"),
        ({}, "input fields"),
    ],
)
def test_bad_requests_get_4xx_with_reason(server, body, message):
    status, answer = post(server, body)
    assert 400 <= status < 500, answer
    assert message in answer["message"]


def test_server_keeps_serving_after_bad_requests(server, raw_mnist):
    for _ in range(3):
        post(server, '{"broken')
        post(server, {"inputs": [[1e9] * 784]})
    status, body = post(server, {"inputs": [raw_mnist.test_images[0].reshape(784).tolist()]})
    assert status == 200 and len(body["predictions"]) == 1


# --- MLproject -------------------------------------------------------------------------


def mlflow_run(tmp_path, *arguments: str, env: dict[str, str] | None = None):
    """`mlflow run` of this repository with the local environment, into a fresh store in
    tmp_path, which must succeed; returns the client and the experiment id."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    # Artifacts go to tmp_path, not into the repository the project runs in.
    experiment_id = client.create_experiment("mlproject", artifact_location=str(tmp_path / "a"))
    result = subprocess.run(
        [
            str(BIN_DIR / "mlflow"),
            "run",
            str(REPO_ROOT),
            "--env-manager",
            "local",
            "--experiment-name",
            "mlproject",
            *arguments,
        ],
        env=cli_env(MLFLOW_TRACKING_URI=uri, **(env or {})),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return client, experiment_id


def test_mlflow_run_main_entry_point(tmp_path):
    client, experiment_id = mlflow_run(
        tmp_path,
        "-P",
        "epochs=1",
        "-P",
        "train_limit=1000",
        "-P",
        "registered_model=mlproject-model",
    )
    runs = client.search_runs([experiment_id])
    assert len(runs) == 1  # the launcher's run and the training run are one
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["epochs"] == "1"
    assert run.data.params["train_limit"] == "1000"
    assert "test/accuracy" in run.data.metrics
    assert client.get_model_version("mlproject-model", "1").run_id == run.info.run_id


def test_mlflow_run_tune_entry_point(tmp_path):
    """Under `mlflow run`, the launcher's run is the study's parent run."""
    config = tmp_path / "tiny.yaml"
    config.write_text(
        "study_name: tiny\nregistered_model: mlproject-tuned\nn_trials: 2\n"
        "pruner: {type: none}\n"
        "train: {epochs: 1, train_limit: 1000, val_size: 500, test_limit: 500}\n"
        "search_space:\n  lr: {type: float, low: 1.0e-3, high: 3.0e-3, log: true}\n"
    )
    client, experiment_id = mlflow_run(
        tmp_path,
        "-e",
        "tune",
        "-P",
        f"config={config}",
        env={"MNIST_TRACK_STORAGE": f"sqlite:///{tmp_path / 'optuna.db'}"},
    )
    runs = client.search_runs([experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["mnist_track.role"] == "study"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == ["trial-0", "trial-1"]
    assert parent.data.metrics["trials/complete"] == 2
    assert len(client.search_model_versions("name = 'mlproject-tuned'")) == 2
    # The storage URL (which may hold a password) is no MLflow parameter.
    assert "storage" not in parent.data.params
