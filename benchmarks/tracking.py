"""What tracking costs: the same 5-epoch MLP trial with MLflow on (train_and_track into a
SQLite store, model registered) and off (fit + test evaluation); the fixed cost per trial
split into its parts, each timed by calling what train_and_track calls; and raw MLflow
calls for reference."""

from __future__ import annotations

import statistics

from benchmarks.common import Context, Figure, Stopwatch, log, temp_store, timed, warm_up_mlflow

NAME = "tracking"
EXPERIMENT = "bench-tracking"
MODEL = "bench-tracking"
EPOCHS = 5


def untracked_trial(config, splits) -> tuple[float, tuple]:
    """fit + test evaluation: the same work as a tracked trial, without MLflow."""
    from mnist_track.metrics import classification_report
    from mnist_track.train import fit, predict_logits

    with Stopwatch() as watch:
        result = fit(config, splits)
        logits = predict_logits(result.model, splits.test.images)
        report = classification_report(logits, splits.test.labels)
    return watch.seconds, (result, logits, report)


def tracked_trial(config, splits) -> float:
    from mnist_track.runs import train_and_track

    seconds, _ = timed(
        lambda: train_and_track(config, splits, experiment=EXPERIMENT, registered_model=MODEL)
    )
    return seconds


def fixed_cost_parts(config, splits, fitted) -> dict[str, float]:
    """Seconds of each part of train_and_track's MLflow work, in order, in one run."""
    from mnist_track import plots, runs, tracking
    from mnist_track.data import to_pixels
    from mnist_track.models import architecture_of, describe_architecture

    result, logits, report = fitted
    parts: dict[str, float] = {}
    with Stopwatch() as watch:
        tags = runs.run_tags(config, splits)
        run = tracking.start_run(EXPERIMENT, "fixed-cost-parts", tags=tags)
        run_log = run.__enter__()
    parts["run creation (tags incl. git commit)"] = watch.seconds
    parts["params"] = timed(lambda: run_log.log_params(config.to_params()))[0]

    def log_all_metrics() -> None:
        for epoch in result.history:
            run_log.log_metrics(epoch.as_dict(), step=epoch.epoch)
        run_log.log_metrics(runs.final_metrics(result, report))

    parts[f"metrics ({len(result.history)} epochs + final test metrics)"] = timed(log_all_metrics)[
        0
    ]
    # train_and_track draws these in a worker process while it logs the model; here they
    # are drawn in-process so their own cost shows.
    parts["plots (render + log 5 PNGs, in-process)"] = timed(
        lambda: run_log.log_pngs(
            plots.render_run_figures(runs.figure_data(result, report, splits, logits)), "plots"
        )
    )[0]
    seconds, model_uri = timed(
        lambda: tracking.log_model(
            result.model.state_dict(),
            architecture_of(config),
            example_pixels=to_pixels(splits.test.images[:1]).reshape(1, -1),
        )
    )
    parts["model logging (pyfunc, safetensors)"] = seconds
    # train_and_track registers after the run has ended; the order does not change the cost.
    seconds, version = timed(
        lambda: tracking.register_version(
            model_uri,
            MODEL,
            run_log.run_id,
            {
                tracking.VALIDATION_ACCURACY_TAG: 2.0,  # always the best: the alias moves
                tracking.VALIDATION_SPLIT_TAG: splits.validation_digest,
                "test_accuracy": report.accuracy,
                "run_id": run_log.run_id,
                "architecture": describe_architecture(config),
            },
        )
    )
    parts["registration (version + tags, one call)"] = seconds
    parts["run end"] = timed(lambda: run.__exit__(None, None, None))[0]
    parts["champion decision (convergent)"] = timed(
        lambda: tracking.crown_champion(MODEL, splits.validation_digest, candidate=version)
    )[0]
    # Not a part of its own: how much of "plots" is matplotlib rather than MLflow.
    parts["_render_only"] = timed(lambda: _render_figures(plots, result, report, splits))[0]
    return parts


def _render_figures(plots, result, report, splits) -> None:
    from mnist_track import runs
    from mnist_track.train import predict_logits

    logits = predict_logits(result.model, splits.test.images)
    plots.render_run_figures(runs.figure_data(result, report, splits, logits))


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
    repeats = 1 if quick else 2
    offs, ons, measured_parts = [], [], []
    with temp_store() as store:
        store_seconds = timed(lambda: tracking.use_tracking_uri(store.uri))[0]
        store.experiment(EXPERIMENT)
        for index in range(repeats):
            log(f"tracking: {EPOCHS}-epoch trial, tracking off ({index + 1}/{repeats})")
            seconds, fitted = untracked_trial(config, splits)
            offs.append(seconds)
            log(f"tracking: fixed-cost parts ({index + 1}/{repeats})")
            measured_parts.append(fixed_cost_parts(config, splits, fitted))
            log(f"tracking: {EPOCHS}-epoch trial, tracking on ({index + 1}/{repeats})")
            ons.append(tracked_trial(config, splits))
        log("tracking: raw MLflow calls")
        log_metric, run_cycle = raw_mlflow(quick)
    off, on = statistics.median(offs), statistics.median(ons)
    parts = {key: statistics.median(p[key] for p in measured_parts) for key in measured_parts[0]}
    render_only = parts.pop("_render_only")
    fixed = sum(parts.values())
    how = f"median of {repeats}" if repeats > 1 else "one run each"
    figures = [
        Figure(
            NAME,
            f"{EPOCHS}-epoch classic MLP trial, tracking on",
            on,
            "s",
            reference="tracking off (fit + test evaluation)",
            reference_value=off,
            reference_unit="s",
            ratio=on / off,
            ratio_of="on / off",
            target=("ratio", "<=", 1.15),
            estimate=quick,
            note=(
                f"{how}, alternating off/on; on = mnist_track.runs.train_and_track into a "
                "SQLite store, model registered; MLflow warmed up by one earlier tiny run"
            ),
        ),
        Figure(
            NAME,
            "fixed cost per trial (sum of parts)",
            fixed * 1000,
            "ms",
            reference="measured on - off",
            reference_value=(on - off) * 1000,
            reference_unit="ms",
            ratio=fixed / (on - off) if on > off else None,
            ratio_of="sum of parts / measured difference",
            estimate=quick,
            note=(
                ("each part timed once" if repeats == 1 else f"median over {repeats} runs")
                + ", calling what train_and_track calls, in a run of its own; the difference "
                "of two whole trials is noisier than the parts"
            ),
        ),
    ]
    for part, seconds in parts.items():
        figures.append(
            Figure(
                NAME,
                f"part: {part}",
                seconds * 1000,
                "ms",
                reference="share of the fixed cost",
                reference_value=100 * seconds / fixed,
                reference_unit="%",
                estimate=quick,
                note=(
                    f"matplotlib rendering alone: {render_only * 1000:.0f} ms"
                    if part.startswith("plots")
                    else ""
                ),
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
