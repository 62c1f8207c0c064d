"""What one tracked run leaves behind: a logged model that carries only the modules the
served model imports (and still loads and predicts from them alone), with the run's final
test metrics linked to it."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
from conftest import in_sqlite_store
from mlflow import MlflowClient
from mlflow.entities import LoggedModelStatus

from mnist_track import model_folder, registry, tracking
from mnist_track.config import TrainConfig
from mnist_track.pixels import to_pixels
from mnist_track.runs import train_and_track


@pytest.fixture(scope="module", params=["saved by MLflow", "made from the template"])
def logged(request, tmp_path_factory, small_splits):
    """One tiny tracked run in a SQLite store of its own: (tracking URI, outcome). Its
    model's folder is saved by MLflow (a process's first model), or made from the
    template that a first model left (model_folder)."""
    model_folder.forget_templates()
    with in_sqlite_store(tmp_path_factory.mktemp("logged")) as uri:
        if request.param == "made from the template":
            train_and_track(
                TrainConfig(epochs=1, hidden_sizes=(16,)),
                small_splits,
                experiment="the-template",
                registered_model=None,
            )
            assert model_folder._templates, "the first model left no template"
        outcome = train_and_track(
            TrainConfig(epochs=1, hidden_sizes=(32,)),
            small_splits,
            experiment="logged-model",
            registered_model="logged-model",
        )
    return uri, outcome


def model_id_of(uri: str, run_id: str) -> str:
    [model] = MlflowClient(uri).search_logged_models(
        experiment_ids=[MlflowClient(uri).get_run(run_id).info.experiment_id]
    )
    return model.model_id


def test_the_model_carries_only_the_served_modules(logged):
    uri, outcome = logged
    model_id = model_id_of(uri, outcome.run_id)
    mlflow.set_tracking_uri(uri)
    files = {
        item.path.rsplit("/", 1)[-1]
        for item in MlflowClient(uri).list_logged_model_artifacts(model_id, "code/mnist_track")
    }
    assert files == set(model_folder.SERVED_MODULES)  # no __pycache__, no CLI, no tuner


@pytest.mark.e2e  # loads the model in a fresh interpreter
def test_the_served_modules_are_enough_to_load_and_predict(logged, small_splits, tmp_path):
    """In a fresh interpreter that cannot import the installed package: the model's own
    code/ folder must hold everything its loader imports."""
    uri, outcome = logged
    model_id = model_id_of(uri, outcome.run_id)
    pixels = to_pixels(small_splits.test.images[:4]).reshape(4, -1).astype(np.float32)
    np.save(tmp_path / "pixels.npy", pixels)
    script = (
        "import sys\n"
        # Only the interpreter's own paths and site-packages; the editable install's
        # finder is dropped too, so the package can come from the model's code/ alone.
        "sys.path = [p for p in sys.path if 'site-packages' in p or 'lib/python' in p]\n"
        "sys.meta_path = [f for f in sys.meta_path if 'editable' not in repr(f)]\n"
        "import mlflow, numpy as np\n"
        f"mlflow.set_tracking_uri({uri!r})\n"
        f"model = mlflow.pyfunc.load_model('models:/{model_id}')\n"
        "import mnist_track\n"
        "print(mnist_track.__file__)\n"
        f"print(list(model.predict(np.load({str(tmp_path / 'pixels.npy')!r}))['digit']))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    loaded_from, digits = result.stdout.strip().splitlines()[-2:]
    assert "/code/mnist_track/" in loaded_from, loaded_from
    assert len(eval(digits)) == 4  # noqa: S307 - a list of ints printed by the child


def test_the_final_test_metrics_are_linked_to_the_logged_model(logged):
    uri, outcome = logged
    model = MlflowClient(uri).get_logged_model(model_id_of(uri, outcome.run_id))
    linked = {metric.key: metric.value for metric in model.metrics or []}
    assert linked["test/accuracy"] == pytest.approx(outcome.test.accuracy)
    run = MlflowClient(uri).get_run(outcome.run_id)
    assert run.data.metrics["test/accuracy"] == pytest.approx(outcome.test.accuracy)
    # Marked READY in the background, while those metrics were sent; the run ended after.
    assert model.status == LoggedModelStatus.READY


def test_the_run_records_its_three_splits_as_dataset_inputs(logged, small_splits, data_dir):
    uri, outcome = logged
    inputs = MlflowClient(uri).get_run(outcome.run_id).inputs.dataset_inputs
    by_context = {
        next(tag.value for tag in item.tags if tag.key == "mlflow.data.context"): item.dataset
        for item in inputs
    }
    assert sorted(by_context) == ["test", "training", "validation"]
    for context, dataset in by_context.items():
        expected = next(split for split in small_splits.lineage if split.context == context)
        assert (dataset.name, dataset.digest) == (expected.name, expected.digest)
        assert dataset.source_type == "local"
        assert json.loads(dataset.source) == {"uri": str(data_dir.resolve())}
    assert json.loads(by_context["training"].profile) == {"num_rows": 2000}
    assert json.loads(by_context["test"].profile) == {"num_rows": 500}
    # The validation input is the split the champion rule compares on.
    assert by_context["validation"].digest == small_splits.validation_digest


def test_a_trained_run_and_its_version_describe_themselves(logged):
    uri, outcome = logged
    client = MlflowClient(uri)
    run = client.get_run(outcome.run_id)
    assert run.data.tags["mlflow.note.content"].startswith("MLP 784-32-10: optimizer=adam, lr=")
    version = client.get_model_version("logged-model", outcome.model_version)
    assert "from `mnist-track train`" in version.description
    assert f"(#/experiments/{run.info.experiment_id}/runs/{run.info.run_id})" in (
        version.description
    )
    assert "**Input**" in client.get_registered_model("logged-model").description


def test_a_failed_champion_decision_leaves_no_version_and_no_finished_run(
    tracking_uri, small_splits, monkeypatch
):
    """The trial fails with the decision's error, so nothing may promise it completed."""

    def unreachable(*args, **kwargs):
        raise tracking.TrackingError("the registry stopped answering")

    monkeypatch.setattr(registry, "crown_champion", unreachable)
    with pytest.raises(tracking.TrackingError, match="stopped answering"):
        train_and_track(
            TrainConfig(epochs=1, hidden_sizes=(16,)),
            small_splits,
            experiment="failed-decision",
            registered_model="failed-decision",
        )
    client = MlflowClient()
    [run] = client.search_runs([client.get_experiment_by_name("failed-decision").experiment_id])
    assert run.info.status == "FAILED"
    assert "stopped answering" in run.data.tags[tracking.ERROR_TAG]
    assert registry.versions_of("failed-decision") == []


def test_a_run_ends_only_once_its_model_is_ready(tracking_uri, small_splits, monkeypatch):
    """The READY mark goes in the background while the final metrics are sent: a slow one
    still lands before the run ends FINISHED and before its version is registered."""
    real = MlflowClient.finalize_logged_model
    marked = []

    def slow(self, model_id, status):
        time.sleep(0.5)
        result = real(self, model_id, status)
        marked.append(time.time())
        return result

    monkeypatch.setattr(MlflowClient, "finalize_logged_model", slow)
    outcome = train_and_track(
        TrainConfig(epochs=1, hidden_sizes=(16,)),
        small_splits,
        experiment="slow-ready",
        registered_model="slow-ready",
    )
    client = MlflowClient()
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    assert len(marked) == 1 and run.info.end_time / 1000 >= marked[0] - 0.01
    version = client.get_model_version("slow-ready", outcome.model_version)
    assert version.creation_timestamp / 1000 >= marked[0] - 0.01
    model = client.get_logged_model(model_id_of(tracking_uri, outcome.run_id))
    assert model.status == LoggedModelStatus.READY


def _saved_model(tmp_path, small_splits):
    """A model folder as tracking.log_model writes it, before it is checked and uploaded."""
    from mlflow.models import Model

    from mnist_track.models import architecture_of, build_model

    architecture = architecture_of(TrainConfig(epochs=1, hidden_sizes=(32,)))
    path = tmp_path / "model"
    model_folder.save(
        path,
        Model(),
        build_model(architecture).state_dict(),
        architecture,
        to_pixels(small_splits.test.images[:1]).reshape(1, -1),
        tmp_path / "files",
    )
    return path


def test_the_logged_model_holds_every_file_saved(logged, tmp_path, small_splits):
    """The check runs while the files upload: none may be left out, none added."""
    uri, outcome = logged
    model_id = model_id_of(uri, outcome.run_id)
    saved = {
        p.relative_to(tmp_path / "model").as_posix()
        for p in _saved_model(tmp_path, small_splits).rglob("*")
        if p.is_file()
    }
    client = MlflowClient(uri)

    def listed(folder=None):
        for item in client.list_logged_model_artifacts(model_id, folder):
            yield from listed(item.path) if item.is_dir else [item.path]

    # Registering the version (the fixture's run did) adds MLflow's registered_model_meta.
    assert set(listed()) - {"registered_model_meta"} == saved


def test_the_logged_files_are_the_saved_files_byte_for_byte(tmp_path, small_splits, monkeypatch):
    """The files upload while the saved model is checked (which imports its code):
    what lands in the store must be exactly the folder as saved, for a first model
    (saved by MLflow) and a second (made from the first's template)."""
    saved: list[dict[str, bytes]] = []
    save = model_folder.save

    def snapshot_then_check(path, *args):
        check = save(path, *args)

        def snapshot_and_check():
            saved.append(
                {
                    p.relative_to(path).as_posix(): p.read_bytes()
                    for p in path.rglob("*")
                    if p.is_file()
                }
            )
            check()

        return snapshot_and_check

    monkeypatch.setattr(model_folder, "save", snapshot_then_check)
    model_folder.forget_templates()
    (tmp_path / "store").mkdir()
    with in_sqlite_store(tmp_path / "store") as uri:
        outcomes = [
            train_and_track(
                TrainConfig(epochs=1, hidden_sizes=(32,)),
                small_splits,
                experiment=f"byte-for-byte-{n}",
                registered_model=None,
            )
            for n in range(2)
        ]
        folders = [
            mlflow.artifacts.download_artifacts(
                f"models:/{model_id_of(uri, outcome.run_id)}", dst_path=str(tmp_path / str(n))
            )
            for n, outcome in enumerate(outcomes)
        ]
    assert len(saved) == 2 and saved[0].keys() == saved[1].keys()
    for folder, files in zip(folders, saved, strict=True):
        logged = {
            p.relative_to(folder).as_posix(): p.read_bytes()
            for p in Path(folder).rglob("*")
            if p.is_file()
        }
        assert "artifacts/model.safetensors" in files and "MLmodel" in files
        # Downloading a model by its models:/ URI adds MLflow's registered_model_meta.
        assert logged.keys() - {"registered_model_meta"} == files.keys()
        assert {name: logged[name] for name in files} == files


def test_logging_models_leaves_no_imports_behind(tmp_path, small_splits):
    """MLflow puts each saved model's code/ folder on sys.path and keeps its model code as
    a module; a worker logging a model per trial must not grow either."""

    def code_models() -> set[str]:
        return {name for name in sys.modules if name.startswith("code_model_")}

    path_before, modules_before = list(sys.path), code_models()
    with in_sqlite_store(tmp_path) as uri:
        for _ in range(2):
            outcome = train_and_track(
                TrainConfig(epochs=1, hidden_sizes=(16,)),
                small_splits,
                experiment="imports",
                registered_model=None,
            )
        client = MlflowClient(uri)
        experiment = client.get_run(outcome.run_id).info.experiment_id
        assert len(client.search_logged_models(experiment_ids=[experiment])) == 2
    assert sys.path == path_before
    assert code_models() == modules_before
