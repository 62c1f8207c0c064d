"""What tracking costs: the same 5-epoch MLP trial with MLflow on (train_and_track into a
SQLite store, model registered) and off (fit + test evaluation), alternating, 3 of each;
the fixed cost per trial split into its parts by the phases train_and_track marks itself
(mnist_track.timings); what --system-metrics adds to a tracked trial (alternating with
and without, 5 of each, wall and CPU time); and raw MLflow calls for reference."""

from __future__ import annotations

import statistics
import time

from benchmarks.common import (
    Context,
    Figure,
    Stopwatch,
    log,
    median_phases,
    spread,
    temp_store,
    timed,
    warm_up_mlflow,
)

NAME = "tracking"
EXPERIMENT = "bench-tracking"
MODEL = "bench-tracking"
EPOCHS = 5
REPEATS = 3  # of each side; quick mode: 1
SYSTEM_METRICS_REPEATS = 5  # its cost is small against the noise of a shared machine
UNTRACKED_PHASES = ("fit", "test evaluation")  # the work both sides do


def untracked_trial(config, splits) -> float:
    """fit + test evaluation: the same work as a tracked trial, without MLflow."""
    from mnist_track.metrics import classification_report
    from mnist_track.train import fit, predict_logits

    with Stopwatch() as watch:
        result = fit(config, splits)
        logits = predict_logits(result.model, splits.test.images)
        classification_report(logits, splits.test.labels)
    return watch.seconds


def tracked_trial(config, splits):
    """(seconds, timing record) of one train_and_track, model registered."""
    from mnist_track import timings
    from mnist_track.runs import train_and_track

    with timings.collect() as records, Stopwatch() as watch:
        train_and_track(config, splits, experiment=EXPERIMENT, registered_model=MODEL)
    return watch.seconds, records[0]


def system_metrics_cost(config, splits, quick: bool) -> list[Figure]:
    """A tracked trial with system metrics against one without, alternating (without
    first), in wall time and in this process's CPU time (the monitor thread's included;
    steadier on a shared machine); skipped where psutil is missing."""
    from mnist_track import tracking
    from mnist_track.defaults import SYSTEM_METRICS_INTERVAL_SECONDS

    name = f"{EPOCHS}-epoch tracked trial with --system-metrics"
    try:
        tracking.log_system_metrics()
    except tracking.TrackingError as error:
        return [Figure(NAME, name, None, "s", note=f"skipped: {error}")]
    tracking.log_system_metrics(enabled=False)

    def trial() -> tuple[float, float]:
        cpu = time.process_time()
        seconds = tracked_trial(config, splits)[0]
        return seconds, time.process_time() - cpu

    repeats = 1 if quick else SYSTEM_METRICS_REPEATS
    offs, ons = [], []
    for index in range(repeats):
        log(f"tracking: tracked trial without system metrics ({index + 1}/{repeats})")
        offs.append(trial())
        log(f"tracking: tracked trial with system metrics ({index + 1}/{repeats})")
        tracking.log_system_metrics()
        try:
            ons.append(trial())
        finally:
            tracking.log_system_metrics(enabled=False)
    how = f"median of {repeats} alternating pairs" if repeats > 1 else "one run each"
    figures = []
    for column, clock in ((0, "wall"), (1, "CPU")):
        ratios = [on[column] / off[column] for off, on in zip(offs, ons, strict=True)]
        figures.append(
            Figure(
                NAME,
                f"{name} ({clock} time)",
                statistics.median(on[column] for on in ons),
                "s",
                reference="the same tracked trial without",
                reference_value=statistics.median(off[column] for off in offs),
                reference_unit="s",
                ratio=statistics.median(ratios),
                ratio_of="with / without",
                estimate=quick,
                note=(
                    f"{how} (without, then with); ratio spread {spread(ratios, 'x')}; "
                    f"MLflow's monitor thread sampling every {SYSTEM_METRICS_INTERVAL_SECONDS} s"
                    + ("; CPU: this process, all its threads" if column else "")
                ),
            )
        )
    return figures


def system_metrics_sample(quick: bool) -> Figure:
    """CPU time of one sample of MLflow's own system-metrics monitor on a run of the
    store (read the machine, check the run is still running, log the metrics), done in
    this thread: steady where whole trials on a shared machine are not. Against the
    sampling interval it is the share of a core the monitor takes."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    from mnist_track.defaults import SYSTEM_METRICS_INTERVAL_SECONDS

    name = "system metrics: one sample of MLflow's monitor (CPU time)"
    try:
        import psutil  # noqa: F401 - what the monitor reads the machine with
    except ImportError:
        return Figure(NAME, name, None, "ms", note="skipped: psutil is not installed")
    client = MlflowClient()
    with mlflow.start_run(run_name="system-metrics-sample") as run:
        monitor = SystemMetricsMonitor(run.info.run_id)

        def sample() -> float:
            started = time.thread_time()
            monitor.collect_metrics()
            client.get_run(run.info.run_id)  # the monitor asks on every sample
            monitor.publish_metrics(monitor.aggregate_metrics())
            monitor.mlflow_logger.flush()  # each sample logged at once: the worst case
            return time.thread_time() - started

        sample()
        seconds = statistics.median(sample() for _ in range(10 if quick else 50))
    return Figure(
        NAME,
        name,
        seconds * 1000,
        "ms",
        reference=f"share of one core at one sample every {SYSTEM_METRICS_INTERVAL_SECONDS} s",
        reference_value=100 * seconds / SYSTEM_METRICS_INTERVAL_SECONDS,
        reference_unit="%",
        estimate=quick,
        note="median; SQLite store; time.thread_time of the sampling thread",
    )


def raw_mlflow(quick: bool) -> tuple[float, float]:
    """Median seconds of one mlflow.log_metric and of one start_run + end_run."""
    import mlflow

    mlflow.set_experiment(EXPERIMENT)
    with mlflow.start_run(run_name="raw-log-metric"):
        counter = iter(range(10**6))
        log_metric = statistics.median(
            timed(lambda: mlflow.log_metric("x", 1.0, step=next(counter)))[0]
            for _ in range(20 if quick else 100)
        )

    def start_end() -> None:
        mlflow.start_run(run_name="raw-start-end")
        mlflow.end_run()

    start_end()
    run_cycle = statistics.median(timed(start_end)[0] for _ in range(5 if quick else 20))
    return log_metric, run_cycle


def run(context: Context) -> list[Figure]:
    from mnist_track import tracking
    from mnist_track.config import TrainConfig

    quick = context.quick
    config = TrainConfig(epochs=EPOCHS)
    splits = context.full_splits
    log("tracking: warming up MLflow (one tiny tracked run)")
    warm_up_mlflow(context)
    repeats = 1 if quick else REPEATS
    offs, ons, records = [], [], []
    with temp_store() as store:
        store_seconds = timed(lambda: tracking.use_tracking_uri(store.uri))[0]
        store.experiment(EXPERIMENT)
        for index in range(repeats):
            log(f"tracking: {EPOCHS}-epoch trial, tracking off ({index + 1}/{repeats})")
            offs.append(untracked_trial(config, splits))
            log(f"tracking: {EPOCHS}-epoch trial, tracking on ({index + 1}/{repeats})")
            seconds, record = tracked_trial(config, splits)
            ons.append(seconds)
            records.append(record)
        system_metrics = system_metrics_cost(config, splits, quick)
        system_metrics.append(system_metrics_sample(quick))
        log("tracking: raw MLflow calls")
        log_metric, run_cycle = raw_mlflow(quick)
    off, on = statistics.median(offs), statistics.median(ons)
    ratios = [b / a for a, b in zip(offs, ons, strict=True)]
    fixed = [r.seconds - sum(r.phases.get(n, 0.0) for n in UNTRACKED_PHASES) for r in records]
    parts = median_phases(records, skip=UNTRACKED_PHASES)
    how = f"median of {repeats} alternating pairs" if repeats > 1 else "one run each"
    figures = [
        Figure(
            NAME,
            f"{EPOCHS}-epoch classic MLP trial, tracking on",
            on,
            "s",
            reference="tracking off (fit + test evaluation)",
            reference_value=off,
            reference_unit="s",
            ratio=statistics.median(ratios),
            ratio_of="on / off",
            target=("ratio", "<=", 1.15),
            estimate=quick,
            note=(
                f"{how} (off, then on); ratio spread {spread(ratios, 'x')}; on = "
                "mnist_track.runs.train_and_track into a SQLite store, model registered; "
                "MLflow warmed up by one earlier tiny run"
            ),
        ),
        Figure(
            NAME,
            "fixed cost per trial (the run less its fit and test evaluation)",
            statistics.median(fixed) * 1000,
            "ms",
            reference="measured on - off",
            reference_value=(on - off) * 1000,
            reference_unit="ms",
            estimate=quick,
            note=(
                f"median of {len(fixed)}, spread {spread([f * 1000 for f in fixed], ' ms')}, "
                "from train_and_track's own phase timings; the difference of two whole "
                "trials is noisier, and also holds what background logging costs fit"
            ),
        ),
    ]
    figures += system_metrics
    total = sum(parts.values())
    for part, seconds in parts.items():
        figures.append(
            Figure(
                NAME,
                f"part: {part}",
                seconds * 1000,
                "ms",
                reference="share of the fixed cost",
                reference_value=100 * seconds / total if total else None,
                reference_unit="%",
                estimate=quick,
            )
        )
    figures += [
        Figure(
            NAME,
            "raw MLflow: one mlflow.log_metric",
            log_metric * 1000,
            "ms",
            estimate=quick,
            note="median, SQLite store, inside an active run",
        ),
        Figure(
            NAME,
            "raw MLflow: one start_run + end_run",
            run_cycle * 1000,
            "ms",
            estimate=quick,
            note="median, SQLite store",
        ),
        Figure(
            NAME,
            "new SQLite tracking store (one-time)",
            store_seconds * 1000,
            "ms",
            estimate=quick,
            note="tracking.use_tracking_uri on a fresh file: schema creation and migrations",
        ),
    ]
    return figures
