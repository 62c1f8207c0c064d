"""Optuna studies end to end, through the real `mnist-track` CLI in subprocesses, checked
in the MLflow store (runs, metrics, artifacts, registry) and in the Optuna storage.

Covers: a whole study and its MLflow layout, then `promote` and a resume on the same store
(in file order); pruning; a failing trial; SIGKILL mid-trial and the resume after it;
SIGTERM mid-trial; two workers sharing a PostgreSQL storage (marked `postgres`, see
postgres.py); warm-start trials, the early stop (by target, by patience, two workers) and
system metrics; bad configs and an unopenable storage.

Every study trains tiny MLPs on a few thousand images for 2-3 epochs, so the module runs
in a few minutes on two CPU cores.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import BIN_DIR, cli_env, run_cli, signals_as_from_a_terminal
from stores import ROLE_TAG, RUN_ID_ATTR, Stores, tiny_study

pytest_plugins = ["postgres"]
pytestmark = pytest.mark.e2e

EXPERIMENT = "e2e"
MODEL = "e2e-model"


def study_config(folder: Path, name: str, **settings: Any) -> Path:
    """A tiny study in this module's experiment and registered model."""
    return tiny_study(
        folder, name, **({"experiment": EXPERIMENT, "registered_model": MODEL} | settings)
    )


def tune(config: Path, *args: str, check: bool = True, **env: str):
    return run_cli("tune", str(config), "--no-download", *args, check=check, **env)


class Store(Stores):
    """The stores of this module's experiment and registered model."""

    def runs(self, filter_string: str = "") -> list:
        """Every run of the experiment (any status), oldest first."""
        return self.experiment_runs(EXPERIMENT, filter_string)

    def parent_runs(self, study: str) -> list:
        """The study's parent runs, not counting discarded (deleted) candidates."""
        runs = self.runs(f"tags.`{ROLE_TAG}` = 'study' and tags.`optuna.study` = '{study}'")
        return [run for run in runs if run.info.lifecycle_stage == "active"]

    def trial_runs(self, study: str) -> list:
        runs = self.runs(f"tags.`optuna.study` = '{study}'")
        return [run for run in runs if run.data.tags.get(ROLE_TAG) != "study"]

    def versions(self, study: str | None = None) -> list:
        versions = self.model_versions(MODEL)
        if study is not None:
            versions = [v for v in versions if v.tags.get("study") == study]
        return versions


def sqlite_store(folder: Path) -> Store:
    return Store(f"sqlite:///{folder / 'mlflow.db'}", f"sqlite:///{folder / 'optuna.db'}")


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory) -> Path:
    """An empty MLflow database with all its tables: a copy saves each test the seconds
    MLflow takes to create and migrate a new one."""
    folder = tmp_path_factory.mktemp("mlflow-template")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        sqlite_store(folder).client.search_experiments()
    return folder / "mlflow.db"


@pytest.fixture
def store(tracking_uri, tmp_path, mlflow_template) -> Store:
    """The `tracking_uri` store (tmp_path, also the working directory), its tables
    created, with the default Optuna storage beside it."""
    shutil.copyfile(mlflow_template, tmp_path / "mlflow.db")
    store = sqlite_store(tmp_path)
    assert store.tracking_uri == tracking_uri
    return store


def state(trial) -> str:
    return trial.state.name


def counted(trials) -> list:
    """Trials that count towards n_trials (see mnist_track.tune.counted)."""
    return [
        t
        for t in trials
        if state(t) in ("COMPLETE", "PRUNED") or (state(t) == "FAIL" and "error" in t.user_attrs)
    ]


def assert_consistent(store: Store, study: str) -> None:
    """What must hold after any invocation has ended, however the previous ones ended:
    nothing RUNNING, and each complete trial has exactly one run and one version."""
    trials = store.trials(study)
    assert not [t.number for t in trials if state(t) == "RUNNING"]
    assert not [r.info.run_name for r in store.runs() if r.info.status == "RUNNING"]
    runs = {run.info.run_id: run for run in store.trial_runs(study)}
    versions = store.versions(study)
    complete = [t for t in trials if state(t) == "COMPLETE"]
    for trial in complete:
        run = runs[trial.user_attrs[RUN_ID_ATTR]]
        assert run.info.status == "FINISHED"
        assert run.info.run_name == f"trial-{trial.number}"
        assert run.data.tags["optuna.state"] == "COMPLETE"
        same_trial = [r for r in runs.values() if r.data.tags["optuna.trial"] == str(trial.number)]
        assert same_trial == [run]
        mine = [v for v in versions if v.tags["trial"] == str(trial.number)]
        assert [(v.run_id, str(v.version)) for v in mine] == [
            (run.info.run_id, trial.user_attrs["model_version"])
        ]
    # Only complete trials have a model version; no run serves two trials.
    assert sorted(int(v.tags["trial"]) for v in versions) == [t.number for t in complete]
    run_ids = [t.user_attrs[RUN_ID_ATTR] for t in trials if RUN_ID_ATTR in t.user_attrs]
    assert len(run_ids) == len(set(run_ids))
    names = [runs[t.user_attrs[RUN_ID_ATTR]].info.run_name for t in complete]
    assert len(names) == len(set(names))


# --- one study, then its resume and `promote` (module-scoped: trained once) -------------


@pytest.fixture(scope="module")
def first_study(tmp_path_factory, mlflow_template) -> tuple[Store, Path, str]:
    """A 3-trial study in its own store: the store, the config and tune's stdout."""
    folder = tmp_path_factory.mktemp("study")
    shutil.copyfile(mlflow_template, folder / "mlflow.db")
    store = sqlite_store(folder)
    config = study_config(
        folder,
        "mlp-search",
        search_space={
            "lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True},
            "hidden_layers": {"type": "int", "low": 1, "high": 2},
            "hidden_units": {"type": "int", "low": 16, "high": 64},
        },
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)  # the experiment's artifacts go to ./mlruns when it is created
        result = tune(config, MLFLOW_TRACKING_URI=store.tracking_uri)
    return store, config, result.stdout


def test_study_end_to_end(first_study):
    store, _config, stdout = first_study
    client = store.client
    trials = store.trials("mlp-search")
    assert [state(t) for t in trials] == ["COMPLETE"] * 3

    # One parent run named after the study, holding the summary.
    [parent] = store.parent_runs("mlp-search")
    assert parent.info.run_name == "mlp-search"
    assert parent.info.status == "FINISHED"
    assert store.study("mlp-search").user_attrs["mlflow_parent_run_id"] == parent.info.run_id
    best = max(trials, key=lambda t: t.value)
    assert parent.data.metrics["trials/complete"] == 3
    assert parent.data.metrics["trials/pruned"] == 0
    assert parent.data.metrics["best/validation_accuracy"] == pytest.approx(best.value)
    assert parent.data.metrics["best/trial"] == best.number
    assert parent.data.params["study.n_trials"] == "3"
    study_files = [a.path for a in client.list_artifacts(parent.info.run_id, "study")]
    assert "study/trials.csv" in study_files
    plots = {path.removeprefix("study/") for path in study_files if path.endswith(".png")}
    assert plots == {
        "optimization_history.png",
        "intermediate_values.png",
        "slice.png",
        "parallel_coordinate.png",
        "param_importances.png",
    }
    table = Path(client.download_artifacts(parent.info.run_id, "study/trials.csv"))
    assert len(table.read_text().strip().splitlines()) == 1 + 3

    # One nested run per trial, linked both ways.
    runs = store.trial_runs("mlp-search")
    assert sorted(r.info.run_name for r in runs) == ["trial-0", "trial-1", "trial-2"]
    by_id = {r.info.run_id: r for r in runs}
    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    for trial in trials:
        run = by_id[trial.user_attrs[RUN_ID_ATTR]]
        tags, params = run.data.tags, run.data.params
        assert run.info.run_name == f"trial-{trial.number}"
        assert run.info.status == "FINISHED"
        assert tags["mlflow.parentRunId"] == parent.info.run_id
        assert tags["optuna.state"] == "COMPLETE"
        assert tags["optuna.study"] == "mlp-search"
        assert tags["optuna.trial"] == str(trial.number)
        # The sampled values are the run's params.
        assert float(params["lr"]) == pytest.approx(trial.params["lr"])
        layers = [trial.params[f"hidden_units_l{i}"] for i in range(trial.params["hidden_layers"])]
        assert params["hidden_sizes"] == ",".join(map(str, layers))
        assert params["epochs"] == "2"
        # Per-epoch curves, plots and the model.
        history = client.get_metric_history(run.info.run_id, "val/accuracy")
        assert sorted(m.step for m in history) == [1, 2]
        assert history[-1].value == pytest.approx(trial.value)
        assert trial.intermediate_values.keys() == {1, 2}
        assert "test/accuracy" in run.data.metrics
        plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
        assert {"plots/training_curves.png", "plots/confusion_matrix.png"} <= plots
        [model] = client.search_logged_models(
            [experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'"
        )
        assert model.name == "model"

    # One registered version per trial; the champion has the best validation accuracy.
    versions = store.versions()
    assert len(versions) == 3
    for trial in trials:
        [version] = [v for v in versions if v.tags["trial"] == str(trial.number)]
        assert version.run_id == trial.user_attrs[RUN_ID_ATTR]
        assert str(version.version) == trial.user_attrs["model_version"]
        assert version.tags["study"] == "mlp-search"
        assert float(version.tags["validation_accuracy"]) == pytest.approx(trial.value)
        assert float(version.tags["test_accuracy"]) == pytest.approx(
            trial.user_attrs["test_accuracy"]
        )
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert float(champion.tags["validation_accuracy"]) == pytest.approx(best.value)

    assert f"best trial {best.number}:" in stdout
    assert f"models:/{MODEL}@champion" in stdout
    assert stdout.count("COMPLETE") == 3  # one line per trial
    assert_consistent(store, "mlp-search")


def test_the_study_explains_itself_in_the_mlflow_ui_and_optuna_dashboard(first_study):
    store, _config, _stdout = first_study
    client = store.client
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"

    study = store.study("mlp-search")
    assert study.metric_names == ["validation_accuracy"]
    assert study.user_attrs["registered_model"] == MODEL
    assert study.user_attrs["experiment"] == EXPERIMENT
    assert study.user_attrs["config"]["search_space"].keys() == {"lr", "hidden_layers",
                                                                 "hidden_units"}  # fmt: skip

    trials = store.trials("mlp-search")
    best = max(trials, key=lambda t: t.value)
    [parent] = store.parent_runs("mlp-search")
    note = parent.data.tags["mlflow.note.content"]
    assert "Optuna study `mlp-search`" in note and f"**Best trial**: {best.number}," in note

    by_id = {run.info.run_id: run for run in store.trial_runs("mlp-search")}
    for trial in trials:
        run = by_id[trial.user_attrs[RUN_ID_ATTR]]
        note = run.data.tags["mlflow.note.content"]
        assert note.startswith(f"Trial {trial.number} of study `mlp-search`: ")
        assert f"hidden_layers={trial.params['hidden_layers']}" in note
        assert "\n" not in note  # the params in one line
        inputs = run.inputs.dataset_inputs
        assert len(inputs) >= 2
        assert all(len(item.dataset.digest) == 16 for item in inputs)
        contexts = {tag.value for item in inputs for tag in item.tags}
        assert {"training", "validation", "test"} <= contexts
    # Every run of the study saw the same data, so the digests agree.
    assert len({
        tuple(sorted(item.dataset.digest for item in run.inputs.dataset_inputs))
        for run in by_id.values()
    }) == 1  # fmt: skip

    described = client.get_registered_model(MODEL).description
    assert "**Input**" in described and f"models:/{MODEL}@champion" in described
    for version in store.versions():
        trial = int(version.tags["trial"])
        assert f"from trial {trial} of study `mlp-search`" in version.description
        assert f"runs/{version.run_id})" in version.description
        assert f"{float(version.tags['validation_accuracy']):.4f}" in version.description


def test_promote_moves_the_alias(first_study):
    store, _config, _stdout = first_study
    env = {"MLFLOW_TRACKING_URI": store.tracking_uri}
    champion = str(store.client.get_model_version_by_alias(MODEL, "champion").version)
    other = next(str(v.version) for v in store.versions() if str(v.version) != champion)

    result = run_cli("promote", MODEL, other, **env)
    assert f"models:/{MODEL}@champion -> version {other}" in result.stdout
    assert str(store.client.get_model_version_by_alias(MODEL, "champion").version) == other

    bad = run_cli("promote", MODEL, "99", check=False, **env)
    assert bad.returncode != 0
    assert "has no version 99" in bad.stderr
    assert "Traceback" not in bad.stderr
    assert str(store.client.get_model_version_by_alias(MODEL, "champion").version) == other


def test_resume_runs_only_the_missing_trials(first_study):
    store, config, _stdout = first_study
    env = {"MLFLOW_TRACKING_URI": store.tracking_uri}
    [parent] = store.parent_runs("mlp-search")
    assert len(store.trials("mlp-search")) == 3

    more = tune(config, "--n-trials", "4", **env)
    assert "(1 run now" in more.stdout
    trials = store.trials("mlp-search")
    assert [state(t) for t in trials] == ["COMPLETE"] * 4
    assert sorted(r.info.run_name for r in store.trial_runs("mlp-search")) == [
        f"trial-{n}" for n in range(4)
    ]
    assert [p.info.run_id for p in store.parent_runs("mlp-search")] == [parent.info.run_id]
    new_run = store.client.get_run(trials[3].user_attrs[RUN_ID_ATTR])
    assert new_run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert trials[3].params != trials[0].params  # the resumed sampler does not replay
    assert len(store.versions()) == 4
    [parent] = store.parent_runs("mlp-search")
    assert parent.data.metrics["trials/complete"] == 4

    again = tune(config, "--n-trials", "4", **env)
    assert "(0 run now" in again.stdout
    assert len(store.trials("mlp-search")) == 4
    assert len(store.trial_runs("mlp-search")) == 4
    assert len(store.versions()) == 4
    assert [p.info.run_id for p in store.parent_runs("mlp-search")] == [parent.info.run_id]
    assert_consistent(store, "mlp-search")


# --- pruning and failing trials --------------------------------------------------------


def test_pruned_trials_end_killed_with_partial_curves(store, tmp_path):
    # Seed 15 samples lr 3.5e-3, then 3.4e-5 and 1.5e-5: the later two are far below
    # trial 0 after one epoch, so the median pruner (one start-up trial) prunes both.
    config = study_config(
        tmp_path,
        "pruning",
        sampler={"type": "random", "seed": 15},
        pruner={"type": "median", "n_startup_trials": 1, "n_warmup_steps": 0},
        search_space={"lr": {"type": "float", "low": 1e-5, "high": 1e-2, "log": True}},
    )
    result = tune(config)
    trials = store.trials("pruning")
    assert [state(t) for t in trials] == ["COMPLETE", "PRUNED", "PRUNED"]
    assert "PRUNED" in result.stdout and "after epoch 1" in result.stdout

    client = store.client
    for trial in trials[1:]:
        assert trial.intermediate_values.keys() == {1}
        run = client.get_run(trial.user_attrs[RUN_ID_ATTR])
        assert run.info.status == "KILLED"
        assert run.data.tags["optuna.state"] == "PRUNED"
        assert run.data.tags["optuna.pruned_at_epoch"] == "1"
        history = client.get_metric_history(run.info.run_id, "val/accuracy")
        assert [m.step for m in history] == [1]  # of 2 epochs
        assert "test/accuracy" not in run.data.metrics
        assert "model_version" not in trial.user_attrs
        assert client.search_model_versions(f"run_id = '{run.info.run_id}'") == []
    [version] = store.versions()
    assert version.tags["trial"] == "0"
    [parent] = store.parent_runs("pruning")
    assert parent.data.metrics["trials/pruned"] == 2
    assert parent.data.metrics["trials/complete"] == 1
    assert_consistent(store, "pruning")


def test_a_failing_trial_is_recorded_and_the_study_goes_on(store, tmp_path):
    # SGD at lr 1e4 turns the loss into NaN in the first epoch (TrainingDiverged); seed 10
    # samples 1e4 for trial 0 and 0.05 for trial 1.
    config = study_config(
        tmp_path,
        "diverging",
        n_trials=2,
        sampler={"type": "random", "seed": 10},
        train={"optimizer": "sgd"},
        search_space={"lr": {"type": "categorical", "choices": [1.0e4, 0.05]}},
    )
    result = tune(config)
    failed, complete = store.trials("diverging")
    assert (state(failed), state(complete)) == ("FAIL", "COMPLETE")
    assert failed.params["lr"] == 1.0e4
    assert failed.user_attrs["error"].startswith("TrainingDiverged: training loss became")
    assert "error: TrainingDiverged" in result.stdout

    client = store.client
    run = client.get_run(failed.user_attrs[RUN_ID_ATTR])
    assert run.info.status == "FAILED"
    assert run.info.run_name == "trial-0"
    assert run.data.tags["error"].startswith("TrainingDiverged")
    assert run.data.tags["optuna.state"] == "FAIL"
    assert "error.txt" in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert client.search_model_versions(f"run_id = '{run.info.run_id}'") == []
    assert client.get_run(complete.user_attrs[RUN_ID_ATTR]).info.status == "FINISHED"
    [version] = store.versions()
    assert version.tags["trial"] == "1"
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == str(version.version)
    [parent] = store.parent_runs("diverging")
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["trials/fail"] == 1
    assert_consistent(store, "diverging")

    # A trial that failed by its own error counts: it is not retried on resume.
    again = tune(config)
    assert "(0 run now" in again.stdout
    assert len(store.trials("diverging")) == 2


def test_a_study_and_model_named_with_quotes_are_reconciled(store, tmp_path):
    # MLflow's filter strings cannot hold these names quoted the usual way; reconciliation
    # must find the study's runs and the model's versions all the same. A worker killed
    # right after creating the parent run leaves it RUNNING and unrecorded: the next
    # worker must find it and discard it.
    study, model = "bob's study", 'bob\'s "best" model'
    config = study_config(tmp_path, "quoted", n_trials=1, registered_model=model)
    killed = tune(
        config, "--study-name", study, check=False, MNIST_TRACK_KILL_AT="parent_run_created"
    )
    assert killed.returncode == -signal.SIGKILL
    result = tune(config, "--study-name", study)
    assert "1 unrecorded parent run(s) discarded" in result.stdout

    assert [r.info.run_name for r in store.runs() if r.info.status == "RUNNING"] == []
    mine = [r for r in store.runs() if r.data.tags.get("optuna.study") == study]
    parents = [r for r in mine if r.data.tags.get(ROLE_TAG) == "study"]
    assert [(p.info.status, p.info.lifecycle_stage) for p in parents] == [
        ("KILLED", "deleted"),
        ("FINISHED", "active"),
    ]
    [trial] = store.trials(study)
    assert state(trial) == "COMPLETE"
    champion = store.client.get_model_version_by_alias(model, "champion")
    assert str(champion.version) == trial.user_attrs["model_version"]


# --- a worker killed mid-trial ---------------------------------------------------------

# Slow enough (a second or more of training) that the signal lands while the trial trains.
SLOW_TRAIN = {"epochs": 3, "train_limit": 6000, "hidden_sizes": [256, 256]}


def start_tune(config: Path, folder: Path, *args: str, name: str = "tune") -> subprocess.Popen:
    """`mnist-track tune` in the background, output to files (pipes could fill up)."""
    stdout = open(folder / f"{name}.out", "w")  # noqa: SIM115 - closed when the child exits
    stderr = open(folder / f"{name}.err", "w")  # noqa: SIM115
    process = subprocess.Popen(
        [str(BIN_DIR / "mnist-track"), "tune", str(config), "--no-download", *args],
        stdout=stdout,
        stderr=stderr,
        env=cli_env(),
        text=True,
        preexec_fn=signals_as_from_a_terminal,
    )
    stdout.close()
    stderr.close()
    return process


def output_of(folder: Path, name: str = "tune") -> str:
    return (folder / f"{name}.out").read_text() + (folder / f"{name}.err").read_text()


def wait_for_running_trial(
    store: Store, study: str, process: subprocess.Popen, folder: Path, number: int
):
    """Poll the Optuna storage until trial `number` is RUNNING with its MLflow run id."""
    import optuna

    deadline = time.monotonic() + 240
    storage = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"tune exited {process.returncode} early:\n{output_of(folder)}")
        # The parent run starts after the study is created: only then is it safe to open
        # the Optuna storage (opening it creates the tables if they are missing).
        if storage is None and store.parent_runs(study):
            storage = optuna.storages.RDBStorage(store.storage_url)
            study_id = storage.get_study_id_from_name(study)
        if storage is not None:
            running = storage.get_all_trials(
                study_id, deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)
            )
            for trial in running:
                if trial.number == number and RUN_ID_ATTR in trial.user_attrs:
                    storage.engine.dispose()
                    return trial
        time.sleep(0.1)
    process.kill()
    pytest.fail(f"trial {number} never ran:\n{output_of(folder)}")


def test_sigkill_mid_trial_then_resume(store, tmp_path):
    config = study_config(
        tmp_path,
        "killed",
        n_trials=2,
        heartbeat_interval=1,
        grace_period=2,
        train=SLOW_TRAIN,
    )
    process = start_tune(config, tmp_path)
    trial = wait_for_running_trial(store, "killed", process, tmp_path, number=1)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL

    # Left behind: a RUNNING trial and RUNNING runs (its own and the parent).
    killed_run = trial.user_attrs[RUN_ID_ATTR]
    assert store.client.get_run(killed_run).info.status == "RUNNING"
    epochs = store.client.get_metric_history(killed_run, "val/accuracy")
    assert len(epochs) < SLOW_TRAIN["epochs"], "killed after training: make it slower"
    assert [state(t) for t in store.trials("killed")] == ["COMPLETE", "RUNNING"]
    time.sleep(2 + 1)  # past the grace period: the heartbeat is stale

    result = tune(config)
    assert "(1 run now" in result.stdout
    trials = store.trials("killed")
    assert [state(t) for t in trials] == ["COMPLETE", "FAIL", "COMPLETE"]
    assert "error" not in trials[1].user_attrs  # interrupted, so not counted
    assert len(counted(trials)) == 2
    run = store.client.get_run(killed_run)
    assert run.info.status == "FAILED"
    assert run.data.tags["optuna.state"] == "FAIL"
    assert "stopped before it finished" in run.data.tags["error"]
    assert store.client.search_model_versions(f"run_id = '{killed_run}'") == []
    assert len(store.parent_runs("killed")) == 1
    assert store.parent_runs("killed")[0].info.status == "FINISHED"
    assert sorted(r.info.run_name for r in store.trial_runs("killed")) == [
        "trial-0",
        "trial-1",
        "trial-2",
    ]
    assert_consistent(store, "killed")


def test_a_resume_within_the_grace_period_retries_the_killed_trial(store, tmp_path):
    """Restarted at once after a kill, while the killed trial still looks alive: the new
    worker waits for its heartbeat to go stale, then runs it again with the same
    parameters, instead of leaving it RUNNING and exiting."""
    config = study_config(
        tmp_path, "hasty", n_trials=2, heartbeat_interval=1, grace_period=4, train=SLOW_TRAIN
    )
    process = start_tune(config, tmp_path)
    killed = wait_for_running_trial(store, "hasty", process, tmp_path, number=1)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL

    result = tune(config)  # well within the 4 s grace period of the killed trial
    trials = store.trials("hasty")
    assert [state(t) for t in trials] == ["COMPLETE", "FAIL", "COMPLETE"]
    assert trials[2].params == killed.params
    assert trials[2].system_attrs["failed_trial"] == 1
    retry_run = store.client.get_run(trials[2].user_attrs[RUN_ID_ATTR])
    assert retry_run.data.tags["optuna.retry_of"] == "1"
    assert store.client.get_run(killed.user_attrs[RUN_ID_ATTR]).info.status == "FAILED"
    assert "stale trial(s) failed and queued again" in result.stdout
    listing = run_cli("studies", MLFLOW_TRACKING_URI=store.tracking_uri)
    assert "hasty\ttrials 3 (2 counted, 1 lost with their worker and run again)" in listing.stdout
    assert_consistent(store, "hasty")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["kill", "hangup"])
def test_a_signal_mid_trial_ends_runs_killed(store, tmp_path, signum):
    """`kill`, or the terminal going away (SIGHUP), stops the study as Ctrl-C does."""
    config = study_config(tmp_path, "stopped", n_trials=1, train=SLOW_TRAIN)
    process = start_tune(config, tmp_path)
    trial = wait_for_running_trial(store, "stopped", process, tmp_path, number=0)
    process.send_signal(signum)
    assert process.wait(timeout=60) == 130, output_of(tmp_path)
    assert "interrupted" in output_of(tmp_path)

    [interrupted] = store.trials("stopped")
    assert state(interrupted) == "FAIL"
    assert "error" not in interrupted.user_attrs  # interrupted, so it will run again
    run = store.client.get_run(trial.user_attrs[RUN_ID_ATTR])
    assert run.info.status == "KILLED"
    assert run.data.tags["optuna.state"] == "FAIL"
    [parent] = store.parent_runs("stopped")
    assert parent.info.status == "KILLED"
    assert store.versions() == []
    assert_consistent(store, "stopped")


# --- two workers on one PostgreSQL storage ---------------------------------------------


@pytest.mark.postgres
def test_two_workers_share_a_postgres_study(postgres_url, store, tmp_path):
    config = study_config(tmp_path, "shared", n_trials=4)
    store = Store(store.tracking_uri, postgres_url)
    args = ("--storage", postgres_url)
    workers = [
        start_tune(config, tmp_path, *args, "--sampler-seed", str(i), name=f"worker{i}")
        for i in (1, 2)
    ]
    for i, worker in enumerate(workers, 1):
        try:
            returncode = worker.wait(timeout=400)
        except subprocess.TimeoutExpired:
            worker.kill()
            raise
        assert returncode == 0, output_of(tmp_path, f"worker{i}")

    trials = store.trials("shared")
    assert not [t for t in trials if state(t) == "RUNNING"]
    # Trials are started under the study lock: however the workers interleave, exactly
    # n_trials of them.
    assert len(counted(trials)) == 4, [state(t) for t in trials]
    assert all(state(t) == "COMPLETE" for t in trials)
    run_ids = [t.user_attrs[RUN_ID_ATTR] for t in trials]
    assert len(set(run_ids)) == len(trials)
    assert len(store.versions("shared")) == len(trials)
    assert_consistent(store, "shared")

    # Every trial ran in exactly one worker, which reports only its own trials.
    outputs = [(tmp_path / f"worker{i}.out").read_text() for i in (1, 2)]
    ran = [re.findall(r"^trial +(\d+) COMPLETE", out, re.MULTILINE) for out in outputs]
    assert sorted(int(n) for n in ran[0] + ran[1]) == [t.number for t in trials]
    for out, mine in zip(outputs, ran, strict=True):
        assert f"({len(mine)} run now;" in out

    # Workers that start together agree on one parent run (the other candidate is deleted).
    [parent] = store.parent_runs("shared")
    assert store.study("shared").user_attrs["mlflow_parent_run_id"] == parent.info.run_id
    assert parent.info.status == "FINISHED"
    for trial in trials:
        run = store.client.get_run(trial.user_attrs[RUN_ID_ATTR])
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    # With their own sampler seeds, the workers do not repeat each other's trials.
    assert len({tuple(sorted(t.params.items())) for t in trials}) == len(trials)

    listing = run_cli("studies", "--storage", postgres_url)
    assert f"shared\ttrials {len(trials)}" in listing.stdout


# --- warm start, early stop, system metrics --------------------------------------------


def test_warm_start_trials_run_first_and_are_queued_only_once(store, tmp_path):
    starts = [{"lr": 0.002}, {"lr": 0.008}]
    config = study_config(tmp_path, "warm", warm_start=starts)  # 3 trials
    tune(config)
    trials = store.trials("warm")
    assert [t.params for t in trials[:2]] == starts
    assert [t.user_attrs.get("warm_start") for t in trials] == [0, 1, None]
    assert trials[2].params["lr"] not in (0.002, 0.008)  # sampled
    for trial in trials:
        run = store.client.get_run(trial.user_attrs[RUN_ID_ATTR])
        assert float(run.data.params["lr"]) == trial.params["lr"]

    more = tune(config, "--n-trials", "4")  # a resume queues nothing again
    assert "(1 run now" in more.stdout
    trials = store.trials("warm")
    assert [state(t) for t in trials] == ["COMPLETE"] * 4
    assert "warm_start" not in trials[3].user_attrs
    assert trials[3].params not in starts
    assert_consistent(store, "warm")


def test_a_study_stops_once_a_trial_reaches_the_target(store, tmp_path):
    config = study_config(tmp_path, "target", n_trials=4, stop={"target": 0.5})
    result = tune(config)
    [trial] = store.trials("target")  # tiny trials reach about 0.85
    assert state(trial) == "COMPLETE" and trial.value >= 0.5
    reason = f"target 0.5 reached: trial 0 has validation accuracy {trial.value:.4f}"
    assert f"  stopped early: {reason}" in result.stdout.splitlines()
    [parent] = store.parent_runs("target")
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["study.stopped_early"] == reason
    assert f"**Stopped early**: {reason}." in parent.data.tags["mlflow.note.content"]
    assert parent.data.metrics["trials/complete"] == 1
    assert_consistent(store, "target")

    # A resume of a stopped study says so and runs nothing, more trials or not.
    again = tune(config, "--n-trials", "6")
    assert "(0 run now" in again.stdout
    assert f"  stopped early: {reason}" in again.stdout.splitlines()
    assert len(store.trials("target")) == 1
    listing = run_cli("studies", MLFLOW_TRACKING_URI=store.tracking_uri)
    assert "target\ttrials 1 (1 counted, stopped early)" in listing.stdout


def test_a_study_stops_when_patience_runs_out(store, tmp_path):
    # Warm starts fix the outcomes: trial 0 learns (lr 3e-3), trials 1 and 2 barely move
    # (lr 1e-5) and cannot beat it, so patience 2 stops the study after trial 2; the
    # fourth stays queued, to run if a looser rule lets the study go on.
    config = study_config(
        tmp_path,
        "patience",
        n_trials=5,
        stop={"patience": 2},
        warm_start=[{"lr": 3e-3}, {"lr": 1e-5}, {"lr": 1e-5}, {"lr": 3e-3}],
        search_space={"lr": {"type": "float", "low": 1e-5, "high": 1e-2, "log": True}},
    )
    result = tune(config)
    trials = store.trials("patience")
    assert [state(t) for t in trials] == ["COMPLETE"] * 3 + ["WAITING"]
    assert max(trials[:3], key=lambda t: t.value).number == 0
    assert (
        "  stopped early: patience 2 ran out: no trial in the 2 since trial 0 beat its "
        f"validation accuracy {trials[0].value:.4f}"
    ) in result.stdout.splitlines()
    [parent] = store.parent_runs("patience")
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["study.stopped_early"].startswith("patience 2 ran out")
    assert_consistent(store, "patience")


def test_a_worker_stops_on_another_workers_trial_reaching_the_target(store, tmp_path):
    # Two workers on one study, searching apart: every trial of the first barely learns
    # (lr about 1e-5), every trial of the second passes the target. The first stops once
    # a trial of the second has reached it, long before n_trials.
    stop = {"target": 0.5}
    lr = {"type": "float", "low": 1e-5, "high": 1.1e-5}
    slow = study_config(tmp_path, "slow", n_trials=8, stop=stop, search_space={"lr": lr})
    lr = {"type": "float", "low": 3e-3, "high": 4e-3}
    quick = study_config(tmp_path, "quick", n_trials=8, stop=stop, search_space={"lr": lr})
    workers = {
        name: start_tune(config, tmp_path, "--study-name", "shared-stop", "--threads", "1",
                         name=name)
        for name, config in (("slow", slow), ("quick", quick))
    }  # fmt: skip
    for name, worker in workers.items():
        try:
            assert worker.wait(timeout=400) == 0, output_of(tmp_path, name)
        except subprocess.TimeoutExpired:
            worker.kill()
            raise
    trials = store.trials("shared-stop")
    assert all(state(t) == "COMPLETE" for t in trials)
    reached = [t for t in trials if t.value >= 0.5]
    assert reached and all(t.params["lr"] >= 3e-3 for t in reached)  # the quick worker's
    assert len(trials) < 8
    first = min(reached, key=lambda t: t.datetime_complete)
    for name in workers:
        assert f"stopped early: target 0.5 reached: trial {first.number} " in output_of(
            tmp_path, name
        )
    [parent] = store.parent_runs("shared-stop")
    assert parent.info.status == "FINISHED"
    assert_consistent(store, "shared-stop")


def test_system_metrics_are_logged_into_each_trial_run(store, tmp_path):
    pytest.importorskip("psutil")
    config = study_config(tmp_path, "system", n_trials=1)
    # Sampled twice a second: a tiny trial lasts a few seconds.
    tune(config, "--system-metrics", MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="0.5")
    [trial] = store.trials("system")
    run = store.client.get_run(trial.user_attrs[RUN_ID_ATTR])
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(
        run.data.metrics
    )
    assert "val/accuracy" in run.data.metrics  # and the trial's own metrics as ever
    assert_consistent(store, "system")


# --- bad input -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"train": {"epoch": 2}}, "train.epoch: unknown key"),
        (
            {"search_space": {"lr": {"type": "float", "low": 0.1, "high": 0.01}}},
            "search_space.lr: empty range",
        ),
    ],
    ids=["unknown-key", "empty-range"],
)
def test_bad_config_is_a_usage_error(tracking_uri, tmp_path, settings, expected):
    config = study_config(tmp_path, "bad", **settings)
    result = tune(config, check=False)
    assert result.returncode == 2
    assert str(config) in result.stderr
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    # Rejected before anything is opened: no tracking store, no Optuna storage, no runs.
    assert sorted(path.name for path in tmp_path.iterdir()) == [config.name]


def test_unopenable_storage_is_a_clear_error(store, tmp_path):
    config = study_config(tmp_path, "nowhere")
    storage = "postgresql://nobody@127.0.0.1:1/x"  # nothing listens on port 1
    result = tune(config, "--storage", storage, check=False)
    assert result.returncode == 1
    assert f"Error: cannot open the Optuna storage {storage!r}" in result.stderr
    assert "Traceback" not in result.stderr
    assert store.runs() == []
    assert not (tmp_path / "optuna.db").exists()
