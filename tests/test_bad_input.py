"""Bad input through the real CLI, as a table: each case is a command line (options,
config files, data files, model URIs, stores) with the answer it must get: its exit status
(2 for a bad option or config, 1 for anything else), one `Error:` line naming the problem,
no traceback, no password. After each case the tracking store and the study storage are
as they were (runs and their states, experiments, registered models, versions, studies
and trials), and nothing was written in the working folder.

The store is populated once per module by a one-trial study (a parent run, a trial run,
a model version, a study with one trial); its storage URL carries a password, which must
not come out anywhere. Most cases fail before anything heavy is imported; the whole
module takes about a minute on two CPU cores.
"""

from __future__ import annotations

import gzip
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import mnist_dir, run_cli

pytestmark = pytest.mark.e2e

SECRET = "s3cret-Pa55"
EXPERIMENT = "bad-input"
MODEL = "bad-input-model"
STUDY = "bad-input-study"
MNIST_STEMS = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


# --- what the cases need in their folder ------------------------------------------------


def study_file(name: str, **settings: Any) -> Callable[[Path], None]:
    """A tiny study config `name`; `settings` replace its top-level entries."""

    def write(folder: Path) -> None:
        config = {
            "study_name": STUDY,
            "experiment": EXPERIMENT,
            "registered_model": MODEL,
            "n_trials": 1,
            "sampler": {"type": "random", "seed": 0},
            "pruner": {"type": "none"},
            "train": {
                "epochs": 1,
                "train_limit": 1000,
                "val_size": 200,
                "test_limit": 200,
                "hidden_sizes": [16],
            },
            "search_space": {"lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}},
        } | settings
        (folder / name).write_text(yaml.safe_dump(config, sort_keys=False))

    return write


def search_space(**space: Any) -> Callable[[Path], None]:
    return study_file("study.yaml", search_space=space)


def file(name: str, content: bytes) -> Callable[[Path], None]:
    def write(folder: Path) -> None:
        (folder / name).write_bytes(content)

    return write


def mnist_folder(stem: str, write_file: Callable[[Path], None]) -> Callable[[Path], None]:
    """`folder/mnist`: the real files linked, except `stem`, which `write_file` makes."""

    def make(folder: Path) -> None:
        target = folder / "mnist"
        target.mkdir()
        for other in MNIST_STEMS:
            if other != stem:
                (target / f"{other}.gz").symlink_to(mnist_dir() / f"{other}.gz")
        write_file(target)

    return make


def gzip_bomb(stem: str, megabytes: int) -> Callable[[Path], None]:
    def write(folder: Path) -> None:
        with gzip.open(folder / f"{stem}.gz", "wb") as stream:
            for _ in range(megabytes):
                stream.write(bytes(1 << 20))

    return write


def truncated(stem: str) -> Callable[[Path], None]:
    def write(folder: Path) -> None:
        content = (mnist_dir() / f"{stem}.gz").read_bytes()
        (folder / f"{stem}.gz").write_bytes(content[: len(content) // 2])

    return write


def png(folder: Path) -> None:
    from PIL import Image

    Image.new("L", (28, 28)).save(folder / "digit.png")


# --- the table -------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    args: tuple[str, ...]  # {dir}: the case's folder, {fake}: a fake tracking server's port
    status: int
    message: str  # in the one `Error:` line
    setup: Callable[[Path], None] | None = None
    env: dict[str, str] = field(default_factory=dict)
    max_seconds: float | None = None


CASES = [
    # Options.
    Case("train-lr-zero", ("train", "--lr", "0"), 2, "Invalid value for '--lr'"),
    Case("train-lr-nan", ("train", "--lr", "nan"), 2, "lr: Input should be a finite number"),
    Case(
        "train-hidden-sizes-text",
        ("train", "--hidden-sizes", "128,x"),
        2,
        "'128,x' is not a comma-separated list of integers",
    ),
    Case("train-seed-beyond-torch", ("train", "--seed", str(2**64)), 2, "seed: Input should be"),
    Case("train-val-size-all", ("train", "--val-size", "60000"), 2, "val_size must leave"),
    Case("train-device-unknown", ("train", "--device", "tpu"), 2, "unknown device 'tpu'"),
    Case(
        "tune-sampler-seed-negative",
        ("tune", "{dir}/study.yaml", "--sampler-seed", "-1"),
        2,
        "'--sampler-seed': -1 is not in the range",
        setup=study_file("study.yaml"),
    ),
    # Config files.
    Case(
        "config-missing",
        ("tune", "{dir}/absent.yaml"),
        2,
        "'{dir}/absent.yaml' does not exist",
    ),
    Case(
        "config-not-utf8",
        ("train", "--config", "{dir}/latin1.yaml"),
        2,
        "{dir}/latin1.yaml: not UTF-8 text (byte 0xe9",
        setup=file("latin1.yaml", "epochs: 2  # caf\u00e9\n".encode("latin-1")),
    ),
    Case(
        "config-not-yaml",
        ("train", "--config", "{dir}/broken.yaml"),
        2,
        "{dir}/broken.yaml: not valid YAML",
        setup=file("broken.yaml", b"epochs: [1,\n"),
    ),
    Case(
        "config-unknown-key",
        ("tune", "{dir}/study.yaml"),
        2,
        "{dir}/study.yaml: train.epoch: unknown key",
        setup=study_file("study.yaml", train={"epoch": 2}),
    ),
    Case(
        "search-space-unknown-optimizer",
        ("tune", "{dir}/study.yaml"),
        2,
        "search_space.optimizer.choices: 'rmsprop' is not a valid optimizer",
        setup=search_space(optimizer={"type": "categorical", "choices": ["adam", "rmsprop"]}),
    ),
    Case(
        "search-space-zero-epochs",
        ("tune", "{dir}/study.yaml"),
        2,
        "search_space.epochs.low: 0 is not a valid epochs",
        setup=search_space(epochs={"type": "int", "low": 0, "high": 2}),
    ),
    Case(
        "search-space-nan-bound",
        ("tune", "{dir}/study.yaml"),
        2,
        "search_space.lr.low: Input should be a finite number",
        setup=search_space(lr={"type": "float", "low": float("nan"), "high": 0.1}),
    ),
    Case(
        "search-space-empty-range",
        ("tune", "{dir}/study.yaml"),
        2,
        "search_space.dropout: empty range",
        setup=search_space(dropout={"type": "float", "low": 0.5, "high": 0.1}),
    ),
    # Data files.
    Case(
        "data-missing",
        ("train", "--data-dir", "{dir}", "--no-download"),
        1,
        "MNIST files missing in {dir}",
    ),
    Case(
        "data-truncated-gzip",
        ("data", "--data-dir", "{dir}/mnist", "--no-download"),
        1,
        "{dir}/mnist/t10k-labels-idx1-ubyte.gz: cannot be read or decompressed",
        setup=mnist_folder("t10k-labels-idx1-ubyte", truncated("t10k-labels-idx1-ubyte")),
    ),
    Case(
        "data-gzip-bomb",
        ("data", "--data-dir", "{dir}/mnist", "--no-download"),
        1,
        "{dir}/mnist/train-images-idx3-ubyte.gz: holds more than the 47,040,016 bytes",
        setup=mnist_folder("train-images-idx3-ubyte", gzip_bomb("train-images-idx3-ubyte", 64)),
    ),
    # Model URIs.
    Case(
        "predict-unknown-model",
        ("predict", "{dir}/digit.png", "-m", "models:/no-such-model/1"),
        1,
        "no-such-model",
        setup=png,
    ),
    Case(
        "predict-tracking-store-missing",
        ("predict", "{dir}/digit.png", "--tracking-uri", "sqlite:///{dir}/typo.db"),
        1,
        "no MLflow tracking store at {dir}/typo.db",
        setup=png,
    ),
    Case("promote-unknown-version", ("promote", MODEL, "99"), 1, "has no version 99"),
    Case(
        "promote-invalid-alias",
        ("promote", MODEL, "1", "--alias", "not an alias!"),
        1,
        "MLflow: Invalid alias name: 'not an alias!'",
    ),
    # Stores.
    Case(
        "tracking-server-closed-port",
        ("train", "--tracking-uri", f"http://alice:{SECRET}@127.0.0.1:9", "--no-download"),
        1,
        "cannot open the MLflow tracking store 'http://alice:***@127.0.0.1:9'",
        max_seconds=15,
    ),
    Case(
        "tracking-server-refuses",
        ("promote", MODEL, "1", "--tracking-uri", "http://127.0.0.1:{fake}"),
        1,
        "MLflow: PERMISSION_DENIED: alice may not change this model",
    ),
    Case(
        "tracking-server-without-shared-storage",
        ("tune", "{dir}/study.yaml", "--tracking-uri", "http://127.0.0.1:{fake}"),
        2,
        "is shared, so the study must be too",
        setup=study_file("study.yaml"),
        env={"MNIST_TRACK_STORAGE": ""},
    ),
    Case(
        "storage-unreachable",
        ("tune", "{dir}/study.yaml", "--no-download"),
        1,
        "cannot open the Optuna storage 'postgresql://alice:***@127.0.0.1:1/optuna?password=***'",
        setup=study_file("study.yaml"),
        env={
            "MNIST_TRACK_STORAGE": (
                f"postgresql://alice:{SECRET}@127.0.0.1:1/optuna?password={SECRET}"
            )
        },
    ),
    Case(
        "studies-storage-missing",
        ("studies", "--storage", "sqlite:///{dir}/typo.db"),
        1,
        "no Optuna storage at {dir}/typo.db",
    ),
    Case(
        "studies-tracking-store-missing",
        ("studies", "--tracking-uri", "sqlite:///{dir}/typo.db"),
        1,
        "no Optuna storage at {dir}/optuna.db",
        env={"MNIST_TRACK_STORAGE": ""},
    ),
    Case(
        "promote-tracking-store-missing",
        ("promote", MODEL, "1", "--tracking-uri", "sqlite:///{dir}/typo.db"),
        1,
        "no MLflow tracking store at {dir}/typo.db",
    ),
]


# --- the populated store, and a tracking server that refuses -----------------------------


@dataclass(frozen=True)
class Populated:
    folder: Path
    tracking_uri: str
    storage_url: str  # without the password, which SQLite ignores
    secret_storage_url: str  # as the study was run: with a password in the query
    tune: Any  # the CompletedProcess of the populating study


@pytest.fixture(scope="module")
def populated(tmp_path_factory) -> Populated:
    folder = tmp_path_factory.mktemp("populated")
    storage = f"sqlite:///{folder}/optuna.db"
    store = Populated(
        folder,
        f"sqlite:///{folder}/mlflow.db",
        storage,
        f"{storage}?timeout=30&password={SECRET}",
        None,
    )
    study_file("study.yaml")(folder)
    result = run_cli(
        "tune",
        str(folder / "study.yaml"),
        "--no-download",
        cwd=folder,
        MLFLOW_TRACKING_URI=store.tracking_uri,
        MNIST_TRACK_STORAGE=store.secret_storage_url,
    )
    return Populated(**(vars(store) | {"tune": result}))


def snapshot(store: Populated) -> dict[str, Any]:
    """Everything a case must leave as it was."""
    import optuna
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    client = MlflowClient(tracking_uri=store.tracking_uri, registry_uri=store.tracking_uri)
    experiments = client.search_experiments(view_type=ViewType.ALL)
    runs = client.search_runs(
        [e.experiment_id for e in experiments], run_view_type=ViewType.ALL, max_results=1000
    )
    storage = optuna.storages.RDBStorage(store.storage_url, skip_table_creation=True)
    try:
        studies = {
            s.study_name: [(t.number, t.state.name) for t in storage.get_all_trials(s._study_id)]
            for s in optuna.get_all_study_summaries(storage, include_best_trial=False)
        }
    finally:
        storage.engine.dispose()
    return {
        "experiments": sorted((e.name, e.lifecycle_stage) for e in experiments),
        "runs": sorted((r.info.run_id, r.info.status, r.info.lifecycle_stage) for r in runs),
        "models": sorted(
            (m.name, sorted(m.aliases.items())) for m in client.search_registered_models()
        ),
        "versions": sorted((v.name, str(v.version)) for v in client.search_model_versions()),
        "studies": studies,
        "files": sorted(path.name for path in store.folder.iterdir()),
    }


class RefusingServer(BaseHTTPRequestHandler):
    """An MLflow tracking server as a user without permission sees it: it answers the
    first request, then refuses everything else with PERMISSION_DENIED (HTTP 403)."""

    def _answer(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if "/experiments/search" in self.path:
            status, body = 200, {"experiments": []}
        elif "/model-versions/get" in self.path:
            status, body = 200, {"model_version": {"name": MODEL, "version": "1"}}
        else:
            message = "alice may not change this model"
            status, body = 403, {"error_code": "PERMISSION_DENIED", "message": message}
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PATCH = do_DELETE = _answer

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def refusing_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), RefusingServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


# --- the tests -------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_gets_a_one_line_answer_and_changes_nothing(
    case, populated, refusing_server, tmp_path
):
    folder = tmp_path / "case"
    folder.mkdir()
    if case.setup is not None:
        case.setup(folder)
    made = sorted(path.name for path in folder.iterdir())
    fill = {"dir": str(folder), "fake": str(refusing_server)}
    env = {
        "MLFLOW_TRACKING_URI": populated.tracking_uri,
        "MNIST_TRACK_STORAGE": populated.storage_url,
    } | case.env
    before = snapshot(populated)

    started = time.monotonic()
    result = run_cli(*(arg.format(**fill) for arg in case.args), check=False, cwd=folder, **env)
    seconds = time.monotonic() - started

    output = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == case.status, output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, output
    assert case.message.format(**fill) in errors[0], output
    assert "Traceback" not in result.stderr
    assert SECRET not in result.stdout + result.stderr
    if case.max_seconds is not None:
        assert seconds < case.max_seconds
    assert snapshot(populated) == before
    assert sorted(path.name for path in folder.iterdir()) == made


def test_the_table_is_broad():
    assert len(CASES) >= 20
    assert len({case.id for case in CASES}) == len(CASES)
    assert {case.status for case in CASES} == {1, 2}


def test_the_populated_store_has_a_run_a_version_and_a_study(populated):
    state = snapshot(populated)
    assert len(state["runs"]) == 2  # the study's parent run and its one trial
    assert state["versions"] == [(MODEL, "1")]
    assert state["studies"] == {STUDY: [(0, "COMPLETE")]}


def test_a_storage_password_never_reaches_output_params_or_tags(populated):
    from mlflow import MlflowClient

    masked = f"{populated.storage_url}?timeout=30&password=***"
    assert f"storage {masked})" in populated.tune.stdout
    assert SECRET not in populated.tune.stdout + populated.tune.stderr
    client = MlflowClient(tracking_uri=populated.tracking_uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id])
    assert runs
    for run in runs:
        assert SECRET not in json.dumps([run.data.params, run.data.tags])
    [parent] = [run for run in runs if run.data.tags.get("mnist_track.role") == "study"]
    assert parent.data.tags["optuna.storage"] == masked
    for version in client.search_model_versions(f"name = '{MODEL}'"):
        assert SECRET not in json.dumps(version.tags)
