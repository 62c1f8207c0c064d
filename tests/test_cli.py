"""The command line in-process, through Click's CliRunner: usage errors and what each
command prints, and one tiny train, study, listing and promotion against a SQLite store in
tmp_path. (tests/test_end_to_end.py runs the installed `mnist-track` as a subprocess.)"""

from __future__ import annotations

import errno
import sys

import pytest
from click.testing import CliRunner
from conftest import mnist_dir
from mlflow import MlflowClient
from stores import tiny_study

from mnist_track import timings
from mnist_track.cli import main

TINY_TRAIN = (
    "--epochs", "1", "--train-limit", "1000", "--val-size", "500", "--test-limit", "500",
    "--hidden-sizes", "32", "--no-download",
)  # fmt: skip


@pytest.fixture
def cli(tracking_uri, monkeypatch, restored_signal_handlers):
    """invoke(*args) -> click's Result, in a fresh SQLite store; the signal handlers that
    train, tune and predict install are put back afterwards."""
    monkeypatch.setenv("MNIST_TRACK_DATA", str(mnist_dir()))
    monkeypatch.delenv("MNIST_TRACK_STORAGE", raising=False)
    return lambda *args: CliRunner().invoke(main, list(args))


def error_line(result) -> str:
    [line] = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    return line


# --- usage errors (exit 2), before anything is opened or created -------------------------


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("train", "--hidden-sizes", "128,x"), "not a comma-separated list of integers"),
        (("train", "--hidden-sizes", "128,0"), "every size must be a positive integer"),
        (("train", "--epochs", "0"), "epochs"),
        (("train", "--config", "missing.yaml"), "missing.yaml"),
        (("tune",), "Missing argument 'CONFIG'"),
        (("predict", "."), "no PNG/JPEG images found"),
        (("train", "--threads", "0"), "--threads"),
        (("train", "--precision", "fp16"), "'fp16' is not one of 'fp32', 'bf16', 'auto'"),
    ],
)
def test_usage_errors_exit_2_with_one_line(cli, tmp_path, args, fragment):
    result = cli(*args)
    assert result.exit_code == 2, result.output
    assert fragment in result.output
    assert sorted(path.name for path in tmp_path.iterdir()) == []  # no store was created


@pytest.mark.parametrize("command", ["train", "tune"])
def test_system_metrics_without_psutil_is_a_usage_error(cli, tmp_path, monkeypatch, command):
    monkeypatch.setitem(sys.modules, "psutil", None)  # as if not installed
    args = [str(tiny_study(tmp_path, "s"))] if command == "tune" else []
    result = cli(command, *args, "--system-metrics", "--no-download")
    assert result.exit_code == 2, result.output
    assert "Invalid value for --system-metrics" in error_line(result)
    assert "pip install psutil" in error_line(result)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["s.yaml"] * (command == "tune")


def test_a_shared_tracking_store_needs_a_shared_study_storage(cli, tmp_path):
    config = tiny_study(tmp_path, "needs-storage")
    result = cli("tune", str(config), "--tracking-uri", "http://127.0.0.1:9")
    assert result.exit_code == 2, result.output
    assert "MNIST_TRACK_STORAGE" in result.output and "--storage" in result.output
    assert sorted(path.name for path in tmp_path.iterdir()) == ["needs-storage.yaml"]


def test_reading_commands_refuse_a_store_that_does_not_exist(cli, tmp_path):
    result = cli("promote", "mnist-classifier", "1")
    assert result.exit_code == 1
    assert "no MLflow tracking store at" in error_line(result)
    result = cli("studies")
    assert result.exit_code == 1
    assert "no Optuna storage at" in error_line(result)
    assert sorted(path.name for path in tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "args, message",
    [
        ((), "Missing argument 'MODEL_URI'"),
        (("m", "--port", "0"), "0 is not in the range 1<=x<=65535"),
        (("m", "--workers", "0"), "0 is not in the range x>=1"),
    ],
)
def test_serve_usage_errors(cli, args, message):
    result = cli("serve", *args)
    assert result.exit_code == 2 and message in result.output


def test_serve_refuses_a_store_that_does_not_exist(cli, tmp_path):
    result = cli("serve", "models:/mnist-classifier@champion")
    assert result.exit_code == 1
    assert "no MLflow tracking store at" in error_line(result)
    assert list(tmp_path.iterdir()) == []


# --- the commands ------------------------------------------------------------------------


def test_train_prints_its_run_and_crowns_the_first_version(cli, migrated_store):
    result = cli("train", *TINY_TRAIN, "--precision", "bf16")
    assert result.exit_code == 0, result.output
    assert "validation accuracy" in result.output
    assert "models:/mnist-classifier/1  (now champion)" in result.output
    client = MlflowClient()
    assert str(client.get_model_version_by_alias("mnist-classifier", "champion").version) == "1"
    [run] = client.search_runs([client.get_experiment_by_name("mnist-track").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["hidden_sizes"] == "32"
    assert run.data.params["precision"] == "bf16"
    assert run.data.tags["precision"] == "bf16"


@pytest.mark.parametrize("native", [True, False])
def test_train_in_bf16_warns_only_where_bf16_is_emulated(cli, migrated_store, monkeypatch, native):
    monkeypatch.setattr("mnist_track.train.has_native_bf16", lambda device: native)
    result = cli("train", *TINY_TRAIN, "--precision", "bf16", "--no-register")
    assert result.exit_code == 0, result.output
    warned = "Warning: precision bf16 on cpu, which has no native bfloat16" in result.output
    assert warned is not native


@pytest.mark.parametrize(("native", "trained_in"), [(True, "bf16"), (False, "fp32")])
def test_train_with_precision_auto_records_what_it_trained_in(
    cli, migrated_store, monkeypatch, native, trained_in
):
    monkeypatch.setattr("mnist_track.train.has_native_bf16", lambda device: native)
    result = cli("train", *TINY_TRAIN, "--precision", "auto", "--no-register")
    assert result.exit_code == 0, result.output
    assert "Warning" not in result.output
    client = MlflowClient()
    [run] = client.search_runs([client.get_experiment_by_name("mnist-track").experiment_id])
    assert run.data.params["precision"] == "auto"  # the setting, as given
    assert run.data.tags["precision"] == trained_in  # what it meant on this machine


def test_a_study_then_its_listing_a_resume_and_a_promotion(cli, migrated_store, tmp_path):
    config = tiny_study(tmp_path, "cli-study", n_trials=2, registered_model="cli-model")
    with timings.collect() as records:  # the phases the benchmarks report, as they ran
        result = cli("tune", str(config), "--no-download")
    assert result.exit_code == 0, result.output
    assert result.output.count(" COMPLETE ") == 2
    study, *trials = records
    assert study.kind == "study" and {"join", "trials", "leave", "summary"} <= set(study.phases)
    assert [trial.kind for trial in trials] == ["run", "run"]
    for trial in trials:
        assert trial.outcome == "finished"
        assert {"run start", "fit", "model logging", "registration", "run end"} <= set(trial.phases)
        assert all(seconds > 0 for seconds in trial.phases.values())
        # Within the run (that nested phases are exclusive is test_timings' to prove).
        assert sum(trial.phases.values()) <= trial.seconds
    assert sum(trial.seconds for trial in trials) < study.phases["trials"]
    assert "study cli-study: 2 complete, 0 pruned, 0 failed (2 run now" in result.output
    assert "serve the champion:   models:/cli-model@champion" in result.output

    listing = cli("studies")
    assert listing.exit_code == 0, listing.output
    assert listing.output.startswith("cli-study\ttrials 2 (2 counted)\tbest 0.")

    again = cli("tune", str(config), "--no-download")  # the study has its trials
    assert again.exit_code == 0, again.output
    assert "(0 run now" in again.output

    promoted = cli("promote", "cli-model", "2")
    assert promoted.exit_code == 0, promoted.output
    assert promoted.output.strip() == "models:/cli-model@champion -> version 2"
    champion = MlflowClient().get_model_version_by_alias("cli-model", "champion")
    assert str(champion.version) == "2"
    missing = cli("promote", "cli-model", "9")
    assert missing.exit_code == 1
    assert "has no version 9" in error_line(missing)


def test_data_verifies_the_four_files(cli):
    result = cli("data", "--no-download")
    assert result.exit_code == 0, result.output
    assert result.output.count("sha256 verified") == 4


class _HungUpTerminal:
    """A terminal that went away with its SIGHUP: every write fails as a tty's does."""

    def write(self, text: str) -> int:
        raise OSError(errno.EIO, "Input/output error")

    def flush(self) -> None:
        raise OSError(errno.EIO, "Input/output error")


def test_an_interrupt_exits_130_even_when_its_terminal_is_gone(monkeypatch):
    from mnist_track.cli import domain_errors

    monkeypatch.setattr(sys, "stderr", _HungUpTerminal())
    with pytest.raises(SystemExit) as stopped, domain_errors():
        raise KeyboardInterrupt
    assert stopped.value.code == 130
