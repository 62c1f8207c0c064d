"""Unit tests for mnist_track.tracking: runs and their end states, background logging,
system metrics, experiments, stores, and filter strings built from user values."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time

import pytest
from conftest import REPO_ROOT

from mnist_track import registry, tracking


def test_git_commit_is_the_packages_checkout_wherever_the_process_runs(tmp_path, monkeypatch):
    expected = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    tracking.git_commit.cache_clear()
    monkeypatch.chdir(tmp_path)  # not a checkout: the commit still comes from the package's
    assert tracking.git_commit() == expected


def test_git_commit_is_read_once_per_process(monkeypatch):
    tracking.git_commit.cache_clear()
    first = tracking.git_commit()
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: (_ for _ in ()).throw(OSError))
    assert tracking.git_commit() == first


def test_a_package_outside_a_checkout_has_no_commit(tmp_path, monkeypatch):
    tracking.git_commit.cache_clear()
    monkeypatch.setattr(tracking, "PACKAGE_DIR", tmp_path / "mnist_track")
    (tmp_path / "mnist_track").mkdir()
    try:
        assert tracking.git_commit() is None
    finally:
        tracking.git_commit.cache_clear()


# --- start_run's end states ------------------------------------------------------------


def ended(run_id: str):
    from mlflow import MlflowClient

    return MlflowClient().get_run(run_id)


def test_a_run_that_returns_ends_finished_with_its_tags(migrated_store):
    with tracking.start_run("states", "ok", tags={"kind": "test"}) as log:
        log.log_metrics({"m": 1.0})
    run = ended(log.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["kind"] == "test"
    assert run.data.metrics == {"m": 1.0}


def test_a_child_run_lives_under_its_parent_and_does_not_read_it(migrated_store, monkeypatch):
    """A study's trials: nested under the parent, in its experiment, without MLflow's read
    of the parent per trial (a request each to a tracking server)."""
    from mlflow import MlflowClient

    parent = tracking.create_run("family", "study", {})
    with tracking.start_run("family", "first", parent_run_id=parent):
        pass  # the first child of a process reads the parent's experiment, once
    reads = []
    get_run = MlflowClient.get_run
    monkeypatch.setattr(
        MlflowClient, "get_run", lambda self, run_id: reads.append(run_id) or get_run(self, run_id)
    )
    with tracking.start_run("family", "second", parent_run_id=parent) as log:
        pass
    assert parent not in reads
    child = ended(log.run_id)
    assert child.data.tags["mlflow.parentRunId"] == parent
    assert child.info.experiment_id == ended(parent).info.experiment_id
    [found] = MlflowClient().search_runs(
        [child.info.experiment_id], f"tags.mlflow.parentRunId = '{parent}' and run_name = 'second'"
    )
    assert found.info.run_id == log.run_id


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit])
def test_a_run_stopped_by_a_killed_on_exception_ends_killed(migrated_store, interrupt):
    with (
        pytest.raises(interrupt),
        tracking.start_run("states", killed_on=(KeyboardInterrupt, SystemExit)) as log,
    ):
        raise interrupt()
    assert ended(log.run_id).info.status == "KILLED"
    assert tracking.ERROR_TAG not in ended(log.run_id).data.tags


def test_a_run_that_raises_ends_failed_with_the_error_recorded(migrated_store):
    from mlflow import MlflowClient

    with pytest.raises(ValueError, match="bad batch"), tracking.start_run("states") as log:
        raise ValueError("bad batch")
    run = ended(log.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags[tracking.ERROR_TAG] == "ValueError: bad batch"
    [artifact] = MlflowClient().list_artifacts(log.run_id)
    assert artifact.path == "error.txt"


def test_a_resumed_run_whose_tags_cannot_be_set_ends_failed(migrated_store, monkeypatch):
    with tracking.start_run("states") as first:
        pass

    def refuse(self, tags):
        raise tracking.TrackingError("the server refused the tags")

    monkeypatch.setattr(tracking.RunLog, "set_tags", refuse)
    with (
        pytest.raises(tracking.TrackingError),
        tracking.start_run("states", run_id=first.run_id, tags={"again": 1}),
    ):
        pass
    assert ended(first.run_id).info.status == "FAILED"


def test_the_tracking_module_does_not_import_matplotlib():
    """`promote`, `predict` and `studies` import tracking: matplotlib would cost them."""
    import sys

    code = "import sys, mnist_track.tracking; print('matplotlib' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "False", result.stderr


# --- background requests -----------------------------------------------------------------


@pytest.mark.parametrize("ending", ["returns", "killed", "raises"])
def test_background_metrics_are_all_in_before_the_run_ends(migrated_store, ending):
    from mlflow import MlflowClient

    stops = {"killed": KeyboardInterrupt, "raises": ValueError}
    try:
        with tracking.start_run("background") as log:
            log.log_params({"p": 1}, background=True)
            for epoch in range(1, 6):
                log.log_metrics({"val/accuracy": epoch / 10}, step=epoch, background=True)
            if ending in stops:
                raise stops[ending]()
    except (KeyboardInterrupt, ValueError):
        pass
    history = MlflowClient().get_metric_history(log.run_id, "val/accuracy")
    assert [m.step for m in history] == [1, 2, 3, 4, 5]
    assert ended(log.run_id).data.params == {"p": "1"}
    assert log.pending == []


def test_background_logging_sends_at_most_once_per_interval(migrated_store, monkeypatch):
    """What arrives within the interval (from the run's start, then from the last send)
    waits and goes in one request with what follows; the wait ends when the interval has
    passed, or at flush."""
    monkeypatch.setattr(tracking, "BATCH_INTERVAL_SECONDS", 0.5)
    sent: list[dict] = []

    def until_sent(count: int) -> None:
        deadline = time.monotonic() + 10
        while len(sent) < count and time.monotonic() < deadline:
            time.sleep(0.05)

    with tracking.start_run("batched") as log:
        real = log.client.log_batch
        monkeypatch.setattr(
            log.client,
            "log_batch",
            lambda run_id, **batch: (sent.append(batch), real(run_id, **batch)),
        )
        log.log_params({"p": 1}, background=True)
        log.log_metrics({"val/accuracy": 0.1}, step=1, background=True)
        assert sent == []  # both wait for the interval
        until_sent(1)
        assert [p.key for p in sent[0]["params"]] == ["p"]  # sent once due, in one request
        assert [m.step for m in sent[0]["metrics"]] == [1]
        time.sleep(0.6)
        log.log_metrics({"val/accuracy": 0.2}, step=2, background=True)  # due: at once
        until_sent(2)
        log.log_metrics({"val/accuracy": 0.3}, step=3, background=True)
        log.log_metrics({"test/accuracy": 0.3}, background=True)
        assert len(sent) == 2
        log.flush()  # does not wait for the interval
        assert [m.key for m in sent[2]["metrics"]] == ["val/accuracy", "test/accuracy"]
    assert len(sent) == 3


def test_send_sends_what_waits_without_waiting_for_the_interval(migrated_store, monkeypatch):
    monkeypatch.setattr(tracking, "BATCH_INTERVAL_SECONDS", 60)
    with tracking.start_run("sent") as log:
        log.log_metrics({"test/accuracy": 0.9}, background=True)
        assert log.client.get_run(log.run_id).data.metrics == {}  # waits for the interval
        log.send()
        [request] = log.pending  # the caller does not wait; the run's end does
        request.result(timeout=10)
        assert log.client.get_run(log.run_id).data.metrics == {"test/accuracy": 0.9}


def test_a_request_handed_to_the_run_is_waited_for_before_it_ends(migrated_store):
    """RunLog.wait_for: e.g. the logged model's READY mark, sent in the background."""
    from concurrent.futures import ThreadPoolExecutor

    finished = []
    with ThreadPoolExecutor(1) as pool, tracking.start_run("waits") as log:
        log.wait_for(pool.submit(lambda: (time.sleep(0.3), finished.append(time.time()))))
        ending = time.time()
    assert finished and finished[0] >= ending
    assert ended(log.run_id).info.end_time / 1000 >= finished[0] - 0.01


def test_a_request_handed_to_the_run_that_fails_fails_the_run(migrated_store):
    from concurrent.futures import ThreadPoolExecutor

    def fails():
        raise tracking.MlflowException("the model could not be marked READY")

    with (
        ThreadPoolExecutor(1) as pool,
        pytest.raises(tracking.MlflowException, match="READY"),
        tracking.start_run("fails") as log,
    ):
        log.wait_for(pool.submit(fails))
    assert ended(log.run_id).info.status == "FAILED"


def test_a_failed_background_request_fails_the_run(migrated_store, monkeypatch):
    with pytest.raises(tracking.MlflowException), tracking.start_run("background") as log:
        monkeypatch.setattr(
            log.client,
            "log_batch",
            lambda *a, **k: (_ for _ in ()).throw(tracking.MlflowException("store is gone")),
        )
        log.log_metrics({"m": 1.0}, background=True)
    assert ended(log.run_id).info.status == "FAILED"


# --- system metrics ----------------------------------------------------------------------


@pytest.fixture
def system_metrics_settings(monkeypatch):
    """MLflow keeps these process-wide in the environment: put them back afterwards."""
    for name in ("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", tracking.SAMPLING_INTERVAL_ENV):
        monkeypatch.delenv(name, raising=False)
    yield monkeypatch


def system_metrics_of(run_id: str) -> set[str]:
    return {key for key in ended(run_id).data.metrics if key.startswith("system/")}


def test_runs_log_system_metrics_once_switched_on(migrated_store, system_metrics_settings):
    pytest.importorskip("psutil")
    system_metrics_settings.setenv(tracking.SAMPLING_INTERVAL_ENV, "0.2")  # a short run
    tracking.log_system_metrics()
    with tracking.start_run("system") as on:
        time.sleep(1)
    tracking.log_system_metrics(enabled=False)
    with tracking.start_run("system") as off:
        time.sleep(1)
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= (
        system_metrics_of(on.run_id)
    )
    assert system_metrics_of(off.run_id) == set()


def test_system_metrics_sample_often_enough_for_a_short_trial(system_metrics_settings):
    pytest.importorskip("psutil")
    tracking.log_system_metrics()
    assert float(os.environ[tracking.SAMPLING_INTERVAL_ENV]) == 2  # MLflow's 10 s: none
    system_metrics_settings.setenv(tracking.SAMPLING_INTERVAL_ENV, "30")
    tracking.log_system_metrics()
    assert os.environ[tracking.SAMPLING_INTERVAL_ENV] == "30"  # the user's setting wins


def test_system_metrics_without_psutil_say_how_to_install_it(system_metrics_settings):
    system_metrics_settings.setitem(sys.modules, "psutil", None)  # as if not installed
    with pytest.raises(tracking.TrackingError, match="pip install psutil"):
        tracking.log_system_metrics()
    assert "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING" not in os.environ  # nothing switched on


DATASET_RACE = (
    "BAD_REQUEST: (psycopg2.errors.UniqueViolation) duplicate key value violates unique "
    'constraint "dataset_pk" DETAIL: Key (experiment_id, name, digest)=(3, mnist-train, 7d85) '
    "already exists."
)


@pytest.mark.parametrize("error, calls", [(DATASET_RACE, 2), ("store is gone", 1)])
def test_datasets_lost_to_another_workers_insert_are_logged_again(
    migrated_store, monkeypatch, small_splits, error, calls
):
    """Two workers logging a new dataset at once on PostgreSQL: the loser's insert fails on
    the unique key, and asking again links the winner's dataset. Other errors fail the
    run as before."""
    from mlflow import MlflowClient

    made = []
    real = MlflowClient.log_inputs

    def first_loses(self, run_id, datasets=None, models=None):
        made.append(run_id)
        if len(made) == 1:
            raise tracking.MlflowException(error)
        return real(self, run_id, datasets)

    monkeypatch.setattr(MlflowClient, "log_inputs", first_loses)
    with contextlib.suppress(tracking.MlflowException), tracking.start_run("datasets") as log:
        log.log_datasets(small_splits.lineage, background=True)
    assert len(made) == calls
    run = ended(log.run_id)
    if calls == 2:
        assert run.info.status == "FINISHED"
        names = {d.dataset.name for d in run.inputs.dataset_inputs}
        assert names == {split.name for split in small_splits.lineage}
    else:
        assert run.info.status == "FAILED"


# --- experiments and stores ------------------------------------------------------------


@pytest.fixture
def experiment_id(client):
    return tracking.ensure_experiment("tracking-tests")


def test_ensure_experiment_returns_the_same_id(client):
    first = tracking.ensure_experiment("repeat")
    assert tracking.ensure_experiment("repeat") == first
    assert client.get_experiment_by_name("repeat").experiment_id == first
    assert tracking.ensure_experiment("another") != first


def test_experiments_open_on_their_runs_in_the_mlflow_ui(client):
    made = tracking.ensure_experiment("fresh")
    assert client.get_experiment(made).tags["mlflow.experimentKind"] == "custom_model_development"
    # One made before (or by hand) gets the kind; a kind someone chose is kept.
    older = client.create_experiment("older")
    chosen = client.create_experiment("chosen", tags={"mlflow.experimentKind": "genai_development"})
    tracking.ensure_experiment("older"), tracking.ensure_experiment("chosen")
    assert client.get_experiment(older).tags["mlflow.experimentKind"] == "custom_model_development"
    assert client.get_experiment(chosen).tags["mlflow.experimentKind"] == "genai_development"


def test_ensure_experiment_never_returns_a_deleted_experiment(client):
    deleted = tracking.ensure_experiment("deleted-in-the-ui")
    client.delete_experiment(deleted)
    try:
        found = tracking.ensure_experiment("deleted-in-the-ui")
    except tracking.TrackingError as error:
        assert "deleted-in-the-ui" in str(error)  # refusing, by name, is fine too
        return
    assert client.get_experiment(found).lifecycle_stage == "active"


@pytest.mark.parametrize(
    ("uri", "local"),
    [
        ("sqlite:///x", True),
        ("sqlite:////abs/mlflow.db", True),
        ("file:///x", True),
        ("./mlruns", True),
        ("mlruns", True),
        ("/abs/mlruns", True),
        ("http://h", False),
        ("https://mlflow.example.com", False),
        ("postgresql://h", False),
        ("mysql+pymysql://u:p@h/db", False),
        ("databricks://profile", False),
    ],
)
def test_is_local_store(uri, local):
    assert tracking.is_local_store(uri) is local


def test_the_databricks_uri_is_not_a_local_store():
    assert tracking.is_local_store("databricks") is False


# --- filter strings built from user values ---------------------------------------------

# MLflow's filter parser strips a value's quotes and unescapes nothing, so each of these
# needs its own treatment (the other quote, or LIKE and an exact check).
AWKWARD = {
    "single-quote": "bob's study",
    "double-quote": 'say "hi"',
    "both-quotes": "both ' and \"",
    "backslash": "back\\slash",
    "trailing-backslash": "ends in \\",
    "like-wildcards": "100%_done",
}


def near_miss(value: str) -> str:
    """A different value that a LIKE pattern made from `value` would also match."""
    return re.sub(r"['\"\\\\%_]", "x", value)


@pytest.mark.parametrize("value", AWKWARD.values(), ids=AWKWARD.keys())
def test_runs_are_found_by_a_tag_value_with_quotes(client, experiment_id, value):
    wanted = client.create_run(experiment_id, tags={"optuna.study": value}).info.run_id
    client.create_run(experiment_id, tags={"optuna.study": near_miss(value)})
    found = tracking.runs_tagged(["tracking-tests"], {"optuna.study": value})
    assert [run.info.run_id for run in found] == [wanted]


@pytest.mark.parametrize("value", AWKWARD.values(), ids=AWKWARD.keys())
def test_versions_are_found_by_a_model_name_with_quotes(client, experiment_id, value):
    for name in (value, near_miss(value)):
        run_id = client.create_run(experiment_id).info.run_id
        model = client.create_logged_model(experiment_id, source_run_id=run_id)
        registry.register_version(f"models:/{model.model_id}", name, run_id, {"accuracy": 0.5})
    assert [(v.name, str(v.version)) for v in registry.versions_of(value)] == [(value, "1")]


# --- opening a store -------------------------------------------------------------------


def test_a_missing_local_store_is_named(tmp_path):
    (tmp_path / "there.db").touch()
    assert tracking.missing_local_store(f"sqlite:///{tmp_path}/there.db") is None
    assert tracking.missing_local_store(f"sqlite:///{tmp_path}/typo.db") == f"{tmp_path}/typo.db"
    assert tracking.missing_local_store(f"file://{tmp_path}/mlrunz") == f"{tmp_path}/mlrunz"
    assert tracking.missing_local_store(str(tmp_path / "mlrunz")) == f"{tmp_path}/mlrunz"
    for elsewhere in ("sqlite://", "http://127.0.0.1:9", "postgresql://h/db"):
        assert tracking.missing_local_store(elsewhere) is None


def test_reading_a_store_that_does_not_exist_creates_nothing(tracking_uri, tmp_path):
    typo = tmp_path / "typo.db"
    with pytest.raises(tracking.TrackingError, match=f"no MLflow tracking store at {typo}"):
        tracking.use_tracking_uri(f"sqlite:///{typo}", create=False)
    assert sorted(path.name for path in tmp_path.iterdir()) == []


class Page(list):
    """A stand-in for MLflow's PagedList: results and the next page's token."""

    def __init__(self, items, token):
        super().__init__(items)
        self.token = token


def test_every_page_follows_the_tokens_to_the_last_page():
    pages = {None: Page([1, 2], "b"), "b": Page([3], "c"), "c": Page([], "d"), "d": Page([4], "")}
    asked = []

    def search(token):
        asked.append(token)
        return pages[token]

    assert tracking.every_page(search) == [1, 2, 3, 4]
    assert asked == [None, "b", "c", "d"]
