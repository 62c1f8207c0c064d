"""The `mnist-track` command line: options in, domain errors out as clear messages.

Only click is imported at module load, so `mnist-track --help` answers at once; torch,
MLflow and Optuna are imported by the command that needs them.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager, suppress
from pathlib import Path

import click

from mnist_track import __version__
from mnist_track.defaults import (
    CHAMPION_ALIAS,
    DATA_DIR_ENV,
    DEFAULT_EXPERIMENT,
    DEFAULT_REGISTERED_MODEL,
    IMAGE_SUFFIXES,
    STORAGE_ENV,
    SYSTEM_METRICS_INTERVAL_SECONDS,
)


class IntList(click.ParamType):
    """Comma-separated positive integers, e.g. 128,64."""

    name = "ints"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            sizes = tuple(int(part) for part in str(value).replace(" ", "").split(",") if part)
        except ValueError:
            self.fail(
                f"{value!r} is not a comma-separated list of integers, e.g. 128,64", param, ctx
            )
        if any(size <= 0 for size in sizes):
            self.fail(f"{value!r}: every size must be a positive integer", param, ctx)
        return sizes


def limit(value: int | None) -> int | None:
    """0 means no limit (so MLproject parameters can have a default)."""
    return value or None


@contextmanager
def domain_errors():
    """Expected errors become one-line CLI errors with passwords masked, not tracebacks:
    the package's own (`MnistTrackError`; a bad config or option is a usage error, exit
    2) and the stores' (MLflow, Optuna, SQLAlchemy, the OS; exit 1), as `errors.py`
    tells them apart. Anything else is a bug and keeps its traceback."""
    from mnist_track.config import ConfigError
    from mnist_track.errors import expected_message

    try:
        yield
    except ConfigError as error:
        raise click.UsageError(expected_message(error)) from None
    except KeyboardInterrupt:
        with suppress(OSError):  # after a SIGHUP, the terminal may be gone
            click.echo("interrupted", err=True)
        sys.exit(130)
    except click.ClickException:
        raise
    except Exception as error:
        message = expected_message(error)
        if message is None:
            raise
        raise click.ClickException(message) from None


data_dir_option = click.option(
    "--data-dir",
    type=click.Path(file_okay=False),
    envvar=DATA_DIR_ENV,
    help=f"Folder with the four MNIST IDX files [env {DATA_DIR_ENV}; default ./data].",
)
download_option = click.option(
    "--download/--no-download",
    default=True,
    show_default=True,
    help="Fetch missing MNIST files with torchvision's downloader (needs internet).",
)
tracking_uri_option = click.option(
    "--tracking-uri",
    envvar="MLFLOW_TRACKING_URI",
    help="MLflow tracking URI [env MLFLOW_TRACKING_URI; default sqlite:///mlflow.db].",
)
quiet_option = click.option("--quiet", "-q", is_flag=True, help="No progress output.")
system_metrics_option = click.option(
    "--system-metrics",
    is_flag=True,
    help="Log CPU, memory, disk and network use into each run as system/* metrics, every "
    f"{SYSTEM_METRICS_INTERVAL_SECONDS} s [env MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL]; "
    "needs psutil.",
)
storage_option = click.option(
    "--storage",
    envvar=STORAGE_ENV,
    help=f"Optuna storage URL [env {STORAGE_ENV}, which keeps a password off the "
    "command line; default sqlite optuna.db beside mlflow.db].",
)
threads_option = click.option(
    "--threads",
    type=click.IntRange(1),
    envvar="MNIST_TRACK_THREADS",
    help="CPU threads for training [env MNIST_TRACK_THREADS; default all cores]; give each "
    "of several workers on one machine its share.",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mnist-track")
def main() -> None:
    """Train, tune, track, register and serve MNIST digit classifiers."""
    # MLflow's INFO lines (table creation, input-example validation) bury the results.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")


@main.command()
@click.option(
    "--config",
    "config_path",
    type=click.Path(exists=True, dir_okay=False),
    help="YAML training config (top level, or the `train:` section of a study).",
)
@click.option("--model", type=click.Choice(["mlp", "cnn"]), help="Model family [mlp].")
@click.option("--hidden-sizes", type=IntList(), help="Hidden layer sizes [128,64].")
@click.option("--channels", type=IntList(), help="CNN conv channels [16,32].")
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), help="Dropout [0.2].")
@click.option("--optimizer", type=click.Choice(["adam", "adamw", "sgd"]), help="[adam]")
@click.option("--lr", type=click.FloatRange(0, min_open=True), help="Learning rate [1e-3].")
@click.option(
    "--lr-schedule",
    type=click.Choice(["cosine", "onecycle", "constant"]),
    help="Learning-rate schedule [cosine].",
)
@click.option("--batch-size", type=click.IntRange(1), help="[128]")
@click.option(
    "--precision",
    type=click.Choice(["fp32", "bf16", "auto"]),
    help="bf16: train under bfloat16 autocast, fast where the CPU or GPU has it natively; "
    "auto: bf16 there, fp32 elsewhere [fp32].",
)
@click.option("--epochs", type=click.IntRange(1), help="[10]")
@click.option("--seed", type=int, help="Seed for weights, dropout and shuffling [0].")
@click.option("--val-size", type=click.IntRange(1), help="Validation images [5000].")
@click.option("--train-limit", type=click.IntRange(0), help="Train on this many images (0: all).")
@click.option("--test-limit", type=click.IntRange(0), help="Test on this many images (0: all).")
@click.option("--device", help="auto, cpu, cuda, cuda:1, mps [auto].")
@data_dir_option
@download_option
@tracking_uri_option
@click.option("--experiment", default=DEFAULT_EXPERIMENT, show_default=True)
@click.option(
    "--registered-model",
    default=DEFAULT_REGISTERED_MODEL,
    show_default=True,
    help="Registered model that receives the new version.",
)
@click.option(
    "--register/--no-register",
    default=True,
    show_default=True,
    help="Register the model (and move `champion` if it is the best).",
)
@click.option("--run-name", help="MLflow run name [generated].")
@threads_option
@system_metrics_option
@quiet_option
def train(
    config_path,
    data_dir,
    download,
    tracking_uri,
    experiment,
    registered_model,
    register,
    run_name,
    threads,
    system_metrics,
    quiet,
    train_limit,
    test_limit,
    **options,
) -> None:
    """Train one classifier and log it to MLflow as a run and a registered model version."""
    with domain_errors():
        from mnist_track.config import load_train_config

        options["train_limit"] = limit(train_limit)
        options["test_limit"] = limit(test_limit)
        config = load_train_config(config_path, options)
        if system_metrics:
            _log_system_metrics()
        _start_figure_worker(threads)
        device = _device(config.device, threads, config.precision)

        from mnist_track import tracking
        from mnist_track.console import EpochProgress, run_summary
        from mnist_track.data import load_mnist, splits_for
        from mnist_track.runs import train_and_track

        tracking.use_tracking_uri(tracking_uri)
        raw = load_mnist(data_dir, download=download)
        splits = splits_for(raw, config, device)
        interrupts = _stop_on_signals()
        progress = EpochProgress(config.epochs, quiet)
        outcome = train_and_track(
            config,
            splits,
            experiment=experiment,
            run_name=run_name,
            registered_model=registered_model if register else None,
            on_epoch=_checked(interrupts, progress),
            on_batches=_checked(interrupts, progress.batches),
        )
        click.echo(run_summary(outcome, registered_model, tracking.run_url(outcome.run_id)))


def _log_system_metrics() -> None:
    """Before any data is loaded: a missing psutil is a usage error naming the option."""
    from mnist_track import tracking

    try:
        tracking.log_system_metrics()
    except tracking.TrackingError as error:
        raise click.BadParameter(str(error), param_hint="--system-metrics") from None


def _start_figure_worker(threads: int | None, study: bool = False) -> None:
    """Figure worker processes (one per CPU thread given, at most two) started now."""
    from mnist_track.plots import start_figure_worker

    preload: tuple[tuple[str, ...], ...] = ()
    if study:  # its workers also draw the summary's plots: their imports load now too
        from mnist_track.study_plots import PRELOAD as preload
    start_figure_worker(preload, processes=threads or os.cpu_count())


def _device(name: str, threads: int | None = None, precision: str = "fp32"):
    """The torch device, with this process's CPU threads set (several workers on one
    machine would otherwise each take every core, and all run slower). Training in bf16
    where the device only emulates it is allowed, with a warning: it is ~10x slower."""
    import torch

    from mnist_track.train import has_native_bf16, resolve_device

    if threads is not None:
        torch.set_num_threads(threads)
    try:
        device = resolve_device(name)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--device") from None
    if precision == "bf16" and not has_native_bf16(device):
        click.echo(
            f"Warning: precision bf16 on {device.type}, which has no native bfloat16 "
            "(AVX512-BF16 or AMX on a CPU): emulated, it trains several times slower "
            "than fp32; precision auto picks bf16 only where it is native.",
            err=True,
        )
    return device


@main.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True))
@click.option(
    "--model-uri",
    "-m",
    default=f"models:/{DEFAULT_REGISTERED_MODEL}@{CHAMPION_ALIAS}",
    show_default=True,
    help="Any MLflow model URI: models:/NAME/3, runs:/ID/model, ...",
)
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, writable=True),
    help="Write the CSV to this file (made whole at the end) instead of stdout.",
)
@tracking_uri_option
def predict(images, model_uri, output, tracking_uri) -> None:
    """Classify digit images with a logged model, into a CSV of source, index, digit and
    probabilities p0..p9 (one row per image). IMAGES are PNG/JPEG files, folders of them,
    or IDX image files such as MNIST's t10k-images-idx3-ubyte.gz.

    An input that cannot be read is reported on stderr and the others are still scored
    (exit status 1)."""
    paths = _image_paths(images)
    with domain_errors():
        from mnist_track import batch_scoring, tracking
        from mnist_track.console import progress_bar

        errors: list[str] = []

        def report(message: str) -> None:
            errors.append(message)
            click.echo(f"Error: {message}", err=True)

        nothing_read = click.ClickException(f"none of the {len(paths)} inputs could be read")
        sources = batch_scoring.sources_of(paths, on_error=report)
        if not sources:
            raise nothing_read
        tracking.use_tracking_uri(tracking_uri, create=False)  # reads: never makes a store
        # Built from the model's weights and architecture by this package: a model's own
        # code never runs here (a model we did not log is refused).
        from mnist_track.model_files import load_classifier

        # `kill` as Ctrl-C: the model's temporary files and a partial output are removed.
        interrupts = _stop_on_signals()
        classifier = load_classifier(model_uri)
        total = sum(source.count for source in sources)
        with (
            progress_bar(total, "scoring") as advance,
            batch_scoring.predictions_csv(output) as written,
        ):
            batch_scoring.score(
                classifier,
                sources,
                written,
                on_error=report,
                on_progress=_checked(interrupts, advance),
            )
        if not written.rows:
            raise nothing_read
    if errors:
        sys.exit(1)


def _image_paths(arguments) -> list[Path]:
    paths: list[Path] = []
    for argument in map(Path, arguments):
        if argument.is_dir():
            paths += sorted(p for p in argument.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            paths.append(argument)
    if not paths:
        raise click.BadParameter("no PNG/JPEG images found", param_hint="IMAGES")
    return paths


@main.command()
@click.argument("config_path", metavar="CONFIG", type=click.Path(exists=True, dir_okay=False))
@click.option("--n-trials", type=click.IntRange(0), help="Trials in the study (0: the file's).")
@click.option("--timeout", type=click.FloatRange(0), help="Seconds for this run (0: the file's).")
@click.option("--study-name", help="Study name [the file's, else its stem].")
@storage_option
@click.option("--experiment", help="MLflow experiment [the file's].")
@click.option("--registered-model", help="Registered model [the file's].")
@click.option("--device", help="auto, cpu, cuda, mps [the file's train.device].")
@click.option(
    "--sampler-seed",
    type=click.IntRange(0, 2**32 - 1),
    help="Sampler seed [the file's]; give parallel workers their own.",
)
@data_dir_option
@download_option
@tracking_uri_option
@threads_option
@system_metrics_option
@quiet_option
def tune(
    config_path,
    n_trials,
    timeout,
    study_name,
    storage,
    experiment,
    registered_model,
    device,
    sampler_seed,
    data_dir,
    download,
    tracking_uri,
    threads,
    system_metrics,
    quiet,
) -> None:
    """Run (or resume) the Optuna study described by CONFIG, e.g. experiments/mlp.yaml."""
    with domain_errors():
        from mnist_track.config import load_study_config

        study_config = load_study_config(
            config_path,
            {
                "n_trials": n_trials or None,
                "timeout": timeout or None,
                "study_name": study_name or None,
                "experiment": experiment,
                "registered_model": registered_model,
                "train.device": device,
                "sampler.seed": sampler_seed,
            },
        )
        if system_metrics:
            _log_system_metrics()  # into each trial's run
        _start_figure_worker(threads, study=True)
        torch_device = _device(study_config.train.device, threads, study_config.train.precision)

        from mnist_track import tracking
        from mnist_track.console import EpochProgress, study_summary, trial_line
        from mnist_track.data import load_mnist, splits_for
        from mnist_track.tune import run_study

        # A usage error (no shared storage for a shared store) comes before any request.
        storage_url = _storage_url(storage, tracking.resolve_tracking_uri(tracking_uri))
        tracking.use_tracking_uri(tracking_uri)
        train_config = study_config.train
        raw = load_mnist(data_dir, download=download)
        splits = splits_for(raw, train_config, torch_device)
        progress = EpochProgress(train_config.epochs, quiet)
        interrupts = _stop_on_signals()
        result = run_study(
            study_config,
            splits,
            storage_url,
            on_trial=_checked(interrupts, lambda trial: click.echo(trial_line(trial))),
            on_epoch=_checked(
                interrupts, lambda number, epoch: progress(epoch, prefix=f"trial {number} ")
            ),
            on_batches=_checked(interrupts, progress.batches),
            on_abandoned=lambda number: click.echo(
                f"trial {number:>3} ABANDONED: failed by another worker while this one was "
                "paused or cut off; it runs again with the same parameters"
            ),
        )
        parent_url = tracking.run_url(result.parent_run_id)
        click.echo(study_summary(result, study_config.registered_model, parent_url))


def _storage_url(storage: str | None, tracking_uri: str) -> str:
    """The study storage: as given, else the embedded default beside an embedded
    tracking store. A shared tracking store with no shared study storage is refused:
    each worker would silently keep its own study in a local file."""
    from mnist_track.redact import redact_url
    from mnist_track.tune import default_storage_url

    url = storage or default_storage_url(tracking_uri)
    if url is None:
        raise click.UsageError(
            f"the tracking store {redact_url(tracking_uri)!r} (MLFLOW_TRACKING_URI / "
            f"--tracking-uri) is shared, so the study must be too: set {STORAGE_ENV} "
            "or --storage to a database every worker reaches, e.g. "
            "postgresql+psycopg2://user@host/optuna"
        )
    return url


def _stop_on_signals():
    """`kill` ends a run or study like Ctrl-C; neither can be lost (`Interrupts`)."""
    from mnist_track.interrupts import Interrupts

    return Interrupts().install()


def _checked(interrupts, callback):
    """`callback`, then the interrupt the signal handler could not raise, if one came."""

    def call(*args):
        callback(*args)
        interrupts.check()

    return call


@main.command()
@storage_option
@tracking_uri_option
def studies(storage, tracking_uri) -> None:
    """List the studies in a storage with their trial counts and best values."""
    with domain_errors():
        from mnist_track.redact import redact_url
        from mnist_track.tune import study_summaries

        if not storage:
            from mnist_track import tracking

            # Only the URI is needed (the default storage lies beside an SQLite store):
            # reading studies opens no tracking store, so it creates none.
            storage = _storage_url(None, tracking.resolve_tracking_uri(tracking_uri))
        rows = study_summaries(storage)
        if not rows:
            click.echo(f"no studies in {redact_url(storage)}")
        for row in rows:
            best = (
                "-"
                if row["best_trial"] is None
                else (f"{row['best_value']:.4f} (trial {row['best_trial']})")
            )
            detail = f"{row['counted']} counted"
            if row["retried"]:
                detail += f", {row['retried']} lost with their worker and run again"
            if row["running"]:
                detail += f", {row['running']} running"
            if row["stopped_early"]:
                detail += ", stopped early"
            click.echo(f"{row['study']}\ttrials {row['trials']} ({detail})\tbest {best}")


@main.command()
@click.argument("model_uri")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(1, 65535), default=5000, show_default=True)
@click.option("--workers", type=click.IntRange(1), default=1, show_default=True)
@tracking_uri_option
def serve(model_uri, host, port, workers, tracking_uri) -> None:
    """Serve MODEL_URI (models:/NAME@champion, models:/NAME/3, runs:/ID/model, a path)
    with MLflow's scoring server behind a guard that refuses, before MLflow parses them,
    bodies over 16 MiB and JSON that would take far more memory parsed than sent.

    Same protocol and formats as `mlflow models serve --env-manager local`; it runs the
    model's own code, so serve only models you trust."""
    with domain_errors():
        from mnist_track import serve as serving_app
        from mnist_track import tracking

        tracking.use_tracking_uri(tracking_uri, create=False)
        serving_app.serve(model_uri, host, port, workers)


@main.command()
@click.argument("registered_model")
@click.argument("version")
@click.option("--alias", default=CHAMPION_ALIAS, show_default=True)
@tracking_uri_option
def promote(registered_model, version, alias, tracking_uri) -> None:
    """Point ALIAS of REGISTERED_MODEL at VERSION by hand."""
    with domain_errors():
        from mnist_track import registry, tracking

        tracking.use_tracking_uri(tracking_uri, create=False)
        registry.set_alias(registered_model, version, alias)
        click.echo(f"models:/{registered_model}@{alias} -> version {version}")


@main.command()
@data_dir_option
@download_option
def data(data_dir, download) -> None:
    """Fetch (if missing and online) and verify the MNIST files."""
    with domain_errors():
        from mnist_track.data import MNIST_FILES, ensure_files, read_idx, resolve_data_dir

        folder = resolve_data_dir(data_dir)
        for stem, path in ensure_files(folder, download=download).items():
            array = read_idx(path, MNIST_FILES[stem])
            click.echo(f"ok  {path}  {array.shape[0]} records, sha256 verified")


if __name__ == "__main__":  # pragma: no cover
    main()
