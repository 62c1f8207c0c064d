"""A team on one study: several `mnist-track tune` workers, each in its own empty folder
with only MLFLOW_TRACKING_URI and MNIST_TRACK_STORAGE set, against a real `mlflow server`
(PostgreSQL backend store, proxied artifacts) and an Optuna study on PostgreSQL; and two
workers on the embedded SQLite default.

After every scenario, however the workers interleaved and wherever one was killed
(SIGKILL through the fault-injection seam) or paused (SIGSTOP), and after a restart,
`assert_invariants` checks the promises, reading the real stores with `MlflowClient` and
`optuna.load_study`:
- exactly n_trials trials that reached an end of their own; nothing RUNNING anywhere;
- one parent run, FINISHED; every trial run nested under it;
- every COMPLETE trial has exactly one FINISHED run and exactly one version, no version
  belongs to anything else, and `champion` is the best of them;
- a trial whose worker died was retried with the same parameters, the retry's run tagged.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import BIN_DIR, cli_env, run_cli
from stores import ROLE_TAG, RUN_ID_ATTR, Stores, tiny_study
from tracking_server import output_of, start_worker

from mnist_track.faults import KILL_AT_ENV

pytest_plugins = ["postgres", "tracking_server"]
pytestmark = pytest.mark.e2e

# Heartbeats every second; a worker silent for three is dead.
GRACE_PERIOD = 3
WORKER_TIMEOUT = 420


def team_config(folder: Path, name: str, **settings: Any) -> Path:
    """A tiny study named `name` with its own experiment and registered model, 4 trials,
    and quick heartbeats."""
    defaults = {
        "experiment": f"team-{name}",
        "registered_model": f"model-{name}",
        "n_trials": 4,
        "heartbeat_interval": 1,
        "grace_period": GRACE_PERIOD,
    }
    return tiny_study(folder, name, **(defaults | settings))


def wait(process: subprocess.Popen, folder: Path, name: str, timeout: float = WORKER_TIMEOUT):
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"{name} did not finish in {timeout} s:\n{output_of(folder, name)}")


def counted(trial) -> bool:
    state = trial.state.name
    return state in ("COMPLETE", "PRUNED") or (state == "FAIL" and "error" in trial.user_attrs)


def assert_invariants(stores: Stores, config_path: Path, n_trials: int) -> None:
    config = yaml.safe_load(config_path.read_text())
    name, experiment, model = config["study_name"], config["experiment"], config["registered_model"]
    study = stores.study(name)
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    states = [t.state.name for t in trials]

    # Exact counts; nothing left running or queued.
    assert sum(counted(t) for t in trials) == n_trials, states
    assert not {"RUNNING", "WAITING"} & set(states), states
    runs = [r for r in stores.experiment_runs(experiment) if r.info.lifecycle_stage == "active"]
    assert [r.info.run_name for r in runs if r.info.status == "RUNNING"] == []

    # One parent run, FINISHED, recorded on the study; every trial run under it.
    parents = [r for r in runs if r.data.tags.get(ROLE_TAG) == "study"]
    assert len(parents) == 1, [(p.info.run_id, p.info.status) for p in parents]
    [parent] = parents
    assert parent.info.status == "FINISHED"
    assert study.user_attrs["mlflow_parent_run_id"] == parent.info.run_id
    trial_runs = [r for r in runs if r.data.tags.get(ROLE_TAG) != "study"]
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in trial_runs)

    # Each COMPLETE trial: exactly one FINISHED run and exactly one version; no other.
    versions = stores.model_versions(model)
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    for trial in complete:
        finished = [
            r
            for r in trial_runs
            if r.data.tags["optuna.trial"] == str(trial.number) and r.info.status == "FINISHED"
        ]
        assert [r.info.run_id for r in finished] == [trial.user_attrs[RUN_ID_ATTR]]
        mine = [v for v in versions if v.run_id == finished[0].info.run_id]
        assert [str(v.version) for v in mine] == [trial.user_attrs["model_version"]]
    status = {r.info.run_id: r.info.status for r in trial_runs}
    assert all(status.get(v.run_id) == "FINISHED" for v in versions)
    assert len(versions) == len(complete)
    # Runs that are FINISHED belong to COMPLETE trials only.
    complete_runs = {t.user_attrs[RUN_ID_ATTR] for t in complete}
    assert {r for r, s in status.items() if s == "FINISHED"} == complete_runs

    # Champion: the best validation accuracy among them.
    if complete:
        champion = stores.client.get_model_version_by_alias(model, "champion")
        best = max(complete, key=lambda t: (t.value, -int(t.user_attrs["model_version"])))
        assert str(champion.version) == best.user_attrs["model_version"]

    # A trial whose worker died was run again with the same parameters.
    for lost in [t for t in trials if t.state.name == "FAIL" and "error" not in t.user_attrs]:
        retries = [t for t in trials if t.system_attrs.get("failed_trial") == lost.number]
        assert retries, f"trial {lost.number} was not retried"
        assert retries[0].params == lost.params
        if RUN_ID_ATTR in retries[0].user_attrs:
            run = stores.client.get_run(retries[0].user_attrs[RUN_ID_ATTR])
            assert run.data.tags["optuna.retry_of"] == str(lost.number)


def assert_nothing_written(folder: Path, *names: str) -> None:
    """A worker against remote stores leaves only our own log files in its folder."""
    logs = {f"{name}.{suffix}" for name in names for suffix in ("out", "err")}
    assert sorted(p.name for p in folder.iterdir() if p.name not in logs) == []


def worker_folders(tmp_path: Path, count: int) -> list[Path]:
    folders = [tmp_path / f"worker{i}" for i in range(count)]
    for folder in folders:
        folder.mkdir()
    return folders


# --- the shared topology ---------------------------------------------------------------


@pytest.mark.postgres
def test_two_workers_share_a_study_through_the_tracking_server(tracking_server, tmp_path):
    stores = Stores(tracking_server.url, tracking_server.storage_url)
    config = team_config(tmp_path, "pair", n_trials=5)
    folders = worker_folders(tmp_path, 2)
    workers = [
        start_worker(tracking_server, folder, str(config), "--threads", "1", name="tune")
        for folder in folders
    ]
    for folder, worker in zip(folders, workers, strict=True):
        assert wait(worker, folder, "tune") == 0, output_of(folder, "tune")

    assert_invariants(stores, config, n_trials=5)
    trials = stores.study("pair").get_trials(deepcopy=False)
    assert [t.state.name for t in trials] == ["COMPLETE"] * 5  # no worker overshot
    for folder in folders:
        assert_nothing_written(folder, "tune")
    # Both took part, and only the last to leave ended the parent run.
    outputs = [output_of(folder, "tune") for folder in folders]
    assert all(" COMPLETE " in out for out in outputs), outputs
    assert sum("(FINISHED)" in out for out in outputs) >= 1
    # One link to the parent run in the server's UI, not MLflow's two lines per trial.
    parent_id = stores.study("pair").user_attrs["mlflow_parent_run_id"]
    assert all(f"{tracking_server.url}/#/experiments/" in out for out in outputs)
    assert all(f"/runs/{parent_id}" in out for out in outputs)
    assert not [out for out in outputs if "View run" in out]
    # Artifacts went through the server into its artifact store, not a local folder.
    run_id = trials[0].user_attrs[RUN_ID_ATTR]
    plots = {a.path for a in stores.client.list_artifacts(run_id, "plots")}
    assert "plots/confusion_matrix.png" in plots
    assert list(tracking_server.artifacts.rglob("confusion_matrix.png"))


@pytest.mark.postgres
@pytest.mark.parametrize(
    "point",
    [
        "parent_run_created",
        "after_run_creation",
        "mid_training",
        "after_model_logging",
        "after_registration",
        "before_tell",
    ],
)
def test_a_worker_killed_at_any_point_leaves_the_promises_intact(tracking_server, tmp_path, point):
    """Three workers, one of which SIGKILLs itself at `point`; the two others finish the
    study (retrying the killed trial once its heartbeat is stale); then a restart."""
    stores = Stores(tracking_server.url, tracking_server.storage_url)
    name = point.replace("_", "-")
    config = team_config(tmp_path, name, n_trials=4)
    folders = worker_folders(tmp_path, 3)
    args = (str(config), "--threads", "1")
    doomed = start_worker(
        tracking_server, folders[0], *args, name="tune", env_extra={"MNIST_TRACK_KILL_AT": point}
    )
    if point == "parent_run_created":  # only the first worker creates the parent run
        assert wait(doomed, folders[0], "tune") == -signal.SIGKILL
    others = [start_worker(tracking_server, f, *args, name="tune") for f in folders[1:]]
    assert wait(doomed, folders[0], "tune") == -signal.SIGKILL, output_of(folders[0], "tune")
    for folder, worker in zip(folders[1:], others, strict=True):
        assert wait(worker, folder, "tune") == 0, output_of(folder, "tune")

    restart = start_worker(tracking_server, folders[0], *args, name="restart")
    assert wait(restart, folders[0], "restart") == 0, output_of(folders[0], "restart")
    logs = "\n".join(
        output_of(folder, name)
        for folder in folders
        for name in ("tune", "restart")
        if (folder / f"{name}.out").exists()
    )
    assert "(0 run now" in output_of(folders[0], "restart"), logs
    try:
        assert_invariants(stores, config, n_trials=4)
    except AssertionError as error:  # the workers' own account, to tell what interleaved
        raise AssertionError(f"{error}\n--- worker output ---\n{logs}") from None
    for folder in folders:
        assert_nothing_written(folder, "tune", "restart")

    summaries = "".join(output_of(f, "tune") for f in folders[1:]) + output_of(
        folders[0], "restart"
    )
    trials = stores.study(name).get_trials(deepcopy=False)
    if point == "parent_run_created":
        assert "unrecorded parent run(s) discarded" in summaries
        assert [t.state.name for t in trials] == ["COMPLETE"] * 4
    else:
        lost = [t for t in trials if t.state.name == "FAIL"]
        assert len(lost) == 1 and "error" not in lost[0].user_attrs
        assert "stale trial(s) failed and queued again" in summaries
    if point in ("after_registration", "before_tell"):
        assert "removed (their runs never completed)" in summaries


@pytest.mark.postgres
def test_a_paused_worker_gives_up_its_trial_without_harm(tracking_server, tmp_path):
    """Worker A is paused (SIGSTOP) mid-trial past the grace period; worker B fails A's
    trial and runs it again; A resumed (SIGCONT) must not register, crown, flip its run
    back or crash. A pauses itself after its first epoch (the fault seam's `:stop`): a
    SIGSTOP sent from here once the epoch shows in the store could land after the trial
    had ended, since a short trial's epochs reach the store with its final metrics."""
    stores = Stores(tracking_server.url, tracking_server.storage_url)
    config = team_config(
        tmp_path,
        "paused",
        n_trials=2,
        train={"epochs": 3, "train_limit": 6000, "hidden_sizes": [256, 256]},
    )
    folder_a, folder_b = worker_folders(tmp_path, 2)
    args = (str(config), "--threads", "1")
    worker_a = start_worker(
        tracking_server, folder_a, *args, name="tune", env_extra={KILL_AT_ENV: "mid_training:stop"}
    )
    wait_until_stopped(worker_a, folder_a)
    [trial] = stores.study("paused").get_trials(deepcopy=False)
    run_id = trial.user_attrs[RUN_ID_ATTR]
    try:
        worker_b = start_worker(tracking_server, folder_b, *args, name="tune")
        assert wait(worker_b, folder_b, "tune") == 0, output_of(folder_b, "tune")
    finally:
        worker_a.send_signal(signal.SIGCONT)
    assert wait(worker_a, folder_a, "tune") == 0, output_of(folder_a, "tune")

    assert "ABANDONED" in output_of(folder_a, "tune")
    assert "Traceback" not in output_of(folder_a, "tune")
    run = stores.client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert stores.client.search_model_versions(f"run_id = '{run_id}'") == []
    assert_invariants(stores, config, n_trials=2)


def wait_until_stopped(process: subprocess.Popen, folder: Path, timeout: float = 240) -> None:
    """Returns once `process` has stopped itself (SIGSTOP); fails if it exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid, status = os.waitpid(process.pid, os.WUNTRACED | os.WNOHANG)
        if pid and os.WIFSTOPPED(status):
            return
        if pid:  # exited (and reaped here): Popen no longer can
            process.returncode = os.waitstatus_to_exitcode(status)
            pytest.fail(f"worker exited {process.returncode} early:\n{output_of(folder, 'tune')}")
        time.sleep(0.05)
    process.kill()
    pytest.fail(f"the worker never paused:\n{output_of(folder, 'tune')}")


@pytest.mark.postgres
def test_a_shared_tracking_store_needs_a_shared_study_storage(tracking_server, tmp_path):
    config = team_config(tmp_path, "nowhere")
    folder = tmp_path / "empty"
    folder.mkdir()
    env = {"MLFLOW_TRACKING_URI": tracking_server.url, "MNIST_TRACK_STORAGE": ""}
    result = run_cli("tune", str(config), "--no-download", check=False, cwd=folder, **env)
    assert result.returncode == 2, result.stderr
    assert "MNIST_TRACK_STORAGE" in result.stderr and "MLFLOW_TRACKING_URI" in result.stderr
    assert "Traceback" not in result.stderr
    assert list(folder.iterdir()) == []
    assert (
        Stores(tracking_server.url, tracking_server.storage_url).experiment_runs("team-nowhere")
        == []
    )


@pytest.mark.postgres
def test_a_storage_password_never_leaves_the_worker(tracking_server, tmp_path):
    """The test server trusts loopback, so a password in the URL is accepted and ignored:
    enough to prove it is not written anywhere."""
    from sqlalchemy.engine import make_url

    secret = "s3cret-do-not-log"
    storage = make_url(tracking_server.storage_url).set(password=secret)
    storage_url = storage.render_as_string(hide_password=False)
    config = team_config(tmp_path, "secret", n_trials=1)
    folder = tmp_path / "worker"
    folder.mkdir()
    worker = start_worker(
        tracking_server,
        folder,
        str(config),
        name="tune",
        env_extra={"MNIST_TRACK_STORAGE": storage_url},
    )
    assert wait(worker, folder, "tune") == 0, output_of(folder, "tune")
    output = output_of(folder, "tune")
    assert "storage postgresql+psycopg2://" in output and "***" in output
    assert secret not in output

    stores = Stores(tracking_server.url, tracking_server.storage_url)
    for run in stores.experiment_runs("team-secret"):
        recorded = {**run.data.params, **run.data.tags}
        assert not [key for key, value in recorded.items() if secret in value]
    assert secret not in tracking_server.log.read_text()
    for path in tracking_server.artifacts.rglob("*"):
        if path.is_file() and path.suffix in (".yaml", ".csv", ".txt", ".json"):
            assert secret not in path.read_text(errors="replace"), path


# --- one machine, the embedded default ---------------------------------------------------


def test_two_workers_on_the_embedded_default(tracking_uri, tmp_path):
    """Two workers in one folder share mlflow.db and optuna.db beside it."""
    stores = Stores(tracking_uri, f"sqlite:///{tmp_path / 'optuna.db'}")
    config = team_config(tmp_path, "local", n_trials=4)
    workers = [
        subprocess.Popen(
            [str(BIN_DIR / "mnist-track"), "tune", str(config), "--no-download", "--threads", "1"],
            stdout=open(tmp_path / f"w{i}.out", "w"),  # noqa: SIM115 - closed at exit
            stderr=subprocess.STDOUT,
            env=cli_env(),
            cwd=tmp_path,
        )
        for i in range(2)
    ]
    for i, worker in enumerate(workers):
        assert worker.wait(timeout=WORKER_TIMEOUT) == 0, (tmp_path / f"w{i}.out").read_text()
    assert_invariants(stores, config, n_trials=4)
    assert [t.state.name for t in stores.study("local").get_trials()] == ["COMPLETE"] * 4


# --- single runs -----------------------------------------------------------------------


def test_sigterm_ends_a_train_run_killed(tracking_uri, tmp_path):
    from mlflow import MlflowClient

    process = subprocess.Popen(
        [
            str(BIN_DIR / "mnist-track"), "train", "--no-download", "--epochs", "30",
            "--train-limit", "6000", "--val-size", "500", "--test-limit", "500",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=cli_env(),
        text=True,
    )  # fmt: skip
    client = MlflowClient(tracking_uri)
    deadline = time.monotonic() + 180
    runs: list = []
    while time.monotonic() < deadline and not runs:
        if process.poll() is not None:
            pytest.fail(f"train exited early: {process.communicate()}")
        experiment = client.get_experiment_by_name("mnist-track")
        if experiment is not None:
            runs = [
                r
                for r in client.search_runs([experiment.experiment_id])
                if client.get_metric_history(r.info.run_id, "val/accuracy")
            ]
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _out, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    [run] = client.search_runs([client.get_experiment_by_name("mnist-track").experiment_id])
    assert run.info.status == "KILLED"
    assert client.search_model_versions("name = 'mnist-classifier'") == []


@pytest.mark.parametrize("threads", [1, 2])
def test_no_figure_worker_outlives_a_killed_study(tracking_uri, tmp_path, threads):
    """The figure worker processes (one per CPU thread given, at most two) exit when
    their parent is SIGKILLed (they used to be re-parented and hold the terminal)."""
    marker = f"mnist-track-test-{os.getpid()}-{time.time_ns()}"
    config = team_config(tmp_path, "orphans", n_trials=3)
    process = subprocess.Popen(
        [str(BIN_DIR / "mnist-track"), "tune", str(config), "--no-download"]
        + ["--threads", str(threads)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=cli_env(MNIST_TRACK_TEST_MARKER=marker),
        text=True,
    )
    # The first trial's line means the figure worker has drawn its figures and idles.
    first_line = process.stdout.readline()
    assert "COMPLETE" in first_line
    figure_workers = [
        pid
        for pid in processes_with(marker)
        if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]
    assert len(figure_workers) == threads
    process.kill()
    process.wait(timeout=30)
    deadline = time.monotonic() + 10
    while processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_with(marker) == set()


def processes_with(marker: str) -> set[int]:
    """Pids of live processes whose environment holds `marker`."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().split(")")[-1].split()[0]
        except OSError:
            continue
        if marker.encode() in environ and state != "Z":
            found.add(int(entry.name))
    return found


def test_a_version_on_another_validation_split_does_not_take_champion(tracking_uri):
    common = ("--no-download", "--epochs", "1", "--train-limit", "2000", "--test-limit", "300")
    first = run_cli("train", *common, "--val-size", "500")
    assert "(now champion)" in first.stdout
    tiny = run_cli("train", *common, "--val-size", "1")
    assert "(now champion)" not in tiny.stdout
    assert "not compared with the champion" in tiny.stdout
    assert "another split" in tiny.stdout
    from mlflow import MlflowClient

    champion = MlflowClient(tracking_uri).get_model_version_by_alias("mnist-classifier", "champion")
    assert str(champion.version) == "1"
