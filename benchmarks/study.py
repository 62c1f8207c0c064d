"""Trials per minute of a fixed small study (experiments/quick.yaml) run with
mnist_track.tune.run_study into a throw-away MLflow store and Optuna SQLite storage,
against the same trials (same sampled configs, same epochs) trained without MLflow or
Optuna.

The two sides alternate (tracked, untracked, tracked, ...), each pair measured within
seconds of each other, and the figures are medians with their spread: one side measured
minutes after the other on a noisy machine swung the ratio from 0.12x to 0.96x. Where
the tracked side's extra time goes comes from the phases run_study and train_and_track
mark themselves (mnist_track.timings), so the breakdown is of the real code path.

quick.yaml's trials train for about 0.4 s each, so every fixed cost shows: it is the
stress case. The same measure on the first trials of experiments/mlp.yaml, at full size
(seconds a trial), says what tracking costs a study a user would run."""

from __future__ import annotations

import os
import statistics
import tempfile
from pathlib import Path

from benchmarks.common import (
    REPO_ROOT,
    Context,
    CpuClock,
    Figure,
    Stopwatch,
    log,
    median_phases,
    spread,
    temp_store,
    warm_up_mlflow,
)

NAME = "study"
CONFIG = REPO_ROOT / "experiments" / "quick.yaml"
QUICK_TRIALS = 3
REPEATS = 3  # of each side; quick mode: 1
# The project's MLP study at full size (55,000 images, 8 epochs a trial), its first
# trials only: what tracking costs where a trial trains for seconds, not 0.4 s.
FULL_CONFIG = REPO_ROOT / "experiments" / "mlp.yaml"
FULL_TRIALS = 6
FULL_REPEATS = 3
UNTRACKED_PHASES = ("fit", "test evaluation")  # the work both sides do


def tracked_study(study_config, splits):
    """(wall seconds, the study, its timing records, CPU seconds) of one run_study in a
    new store."""
    from mnist_track import timings, tracking
    from mnist_track.tune import run_study

    with temp_store() as store:
        tracking.use_tracking_uri(store.uri)
        store.experiment(study_config.experiment)
        storage = f"sqlite:///{store.folder / 'optuna.db'}"
        with timings.collect() as records, Stopwatch() as watch, CpuClock() as cpu:
            result = run_study(study_config, splits, storage)
    return watch.seconds, result.study, records, cpu.seconds


def replay_untracked(study, study_config, splits, threads: int | None = None):
    """Seconds to train and test-evaluate each finished trial's config for the epochs it
    ran (pruned trials stop early), with plain fit: no MLflow, no Optuna; how many; and
    the CPU seconds it took. `threads`: torch's intra-op threads for the replay (default:
    as the tracked side ran)."""
    import optuna
    import torch

    from mnist_track.metrics import classification_report
    from mnist_track.train import fit, predict_logits
    from mnist_track.tune import suggest_config

    trials = [t for t in study.get_trials(deepcopy=False) if t.intermediate_values]
    default_threads = torch.get_num_threads()
    torch.set_num_threads(threads or default_threads)
    try:
        with Stopwatch() as watch, CpuClock() as cpu:
            for trial in trials:
                config = suggest_config(optuna.trial.FixedTrial(trial.params), study_config)
                config = config.model_copy(update={"epochs": len(trial.intermediate_values)})
                result = fit(config, splits)
                logits = predict_logits(result.model, splits.test.images)
                classification_report(logits, splits.test.labels)
    finally:
        torch.set_num_threads(default_threads)
    return watch.seconds, len(trials), cpu.seconds


def optuna_alone(study, study_config) -> tuple[float, float]:
    """(seconds of Optuna's bookkeeping, seconds of its five plots) for the tracked study's
    trials with no training and no MLflow: `replay_through_optuna` into a new SQLite
    storage opened as `tune` opens one (heartbeats, write-ahead log), then the plots drawn
    in the figure workers from the frozen trials, as the summary draws them. Any study
    that keeps a storage it can resume and share, and these plots, pays at least this
    outside training."""
    from mnist_track import study_plots
    from mnist_track.tune import open_storage

    with tempfile.TemporaryDirectory(prefix="bench-optuna-") as folder:
        with Stopwatch() as bookkeeping:
            storage = open_storage(
                f"sqlite:///{Path(folder) / 'optuna.db'}",
                study_config.heartbeat_interval,
                study_config.grace_period,
            )
            bare = replay_through_optuna(study, study_config, storage)
        with Stopwatch() as plots:
            study_plots.render_async(bare).pngs()
        storage.engine.dispose()  # the file goes with the folder
    return bookkeeping.seconds, plots.seconds


def replay_through_optuna(study, study_config, storage):
    """A new study in `storage` given the finished trials of `study` in order: each asked
    (its parameters drawn by the study's sampler), its epochs reported with a pruning
    check each, and told how it ended. Optuna's work for those trials, alone."""
    import optuna
    from optuna.trial import TrialState

    from mnist_track.tune import make_pruner, make_sampler, suggest_config

    bare = optuna.create_study(
        study_name=study_config.study_name,
        storage=storage,
        direction="maximize",
        sampler=make_sampler(study_config, 0),
        pruner=make_pruner(study_config),
    )
    for finished in study.get_trials(deepcopy=False):
        if not finished.state.is_finished():
            continue
        trial = bare.ask()
        suggest_config(trial, study_config)
        for step, value in sorted(finished.intermediate_values.items()):
            trial.report(value, step)
            trial.should_prune()
        if finished.state == TrialState.COMPLETE:
            bare.tell(trial, finished.value)
        else:
            bare.tell(trial, state=finished.state)
    return bare


def fixed_costs(records) -> dict[str, list[float]]:
    """Per trial, the seconds of its run beyond the work the untracked side does too,
    by how the trial ended."""
    costs: dict[str, list[float]] = {"completed": [], "pruned": []}
    for record in records:
        if record.kind != "run":
            continue
        shared = sum(record.phases.get(name, 0.0) for name in UNTRACKED_PHASES)
        kind = "completed" if record.outcome == "finished" else "pruned"
        if record.outcome in ("finished", "TrialPruned"):
            costs[kind].append(record.seconds - shared)
    return costs


def training_seconds(records) -> float:
    """Seconds the tracked study's runs spent on the work the untracked side does."""
    return sum(
        r.phases.get(name, 0.0) for r in records if r.kind == "run" for name in UNTRACKED_PHASES
    )


def study_overheads(records, n_trials: int) -> dict[str, float]:
    """Seconds of the study's own work: joining, Optuna's ask/tell and objective wrapper
    per trial, and leaving (reconciliation, summary, parent run)."""
    study = next(r for r in records if r.kind == "study")
    in_runs = sum(r.seconds for r in records if r.kind == "run")
    per_trial = study.phases.get("trials", 0.0) - in_runs
    per_trial += study.phases.get("optuna ask", 0.0) + study.phases.get("optuna tell", 0.0)
    return {
        "join (create or load, parent run, lease)": study.phases.get("join", 0.0),
        "reconciliation (on join and on leave)": study.phases.get("reconcile", 0.0),
        "Optuna ask/tell and objective, per trial": per_trial / max(n_trials, 1),
        "summary (metrics, trials table, 5 Optuna plots)": study.phases.get("summary", 0.0),
        "leave (lease, parent run end)": study.phases.get("leave", 0.0),
    }


def run(context: Context) -> list[Figure]:
    from mnist_track import plots, study_plots

    study_config, splits = _load(
        CONFIG, {"n_trials": QUICK_TRIALS} if context.quick else {}, context
    )
    log("study: warming up MLflow (one tiny tracked run)")
    plots.start_figure_worker(study_plots.PRELOAD)  # as `mnist-track tune` does first
    warm_up_mlflow(context)
    measured = interleaved_pairs(
        study_config, splits, 1 if context.quick else REPEATS, explain=True
    )
    result = figures(context, study_config, *measured)
    overrides = {"n_trials": 2, "train.epochs": 1} if context.quick else {}
    full_config, full_splits = _load(FULL_CONFIG, {"n_trials": FULL_TRIALS} | overrides, context)
    pairs, records, counts, _, _ = interleaved_pairs(
        full_config, full_splits, 1 if context.quick else FULL_REPEATS
    )
    result.append(full_size_figure(context, full_config, pairs, records, counts))
    return result


def _load(path, overrides, context: Context):
    from mnist_track.config import load_study_config

    study_config = load_study_config(path, overrides)
    train = study_config.train
    splits = context.splits(
        val_size=train.val_size,
        split_seed=train.split_seed,
        train_limit=train.train_limit,
        test_limit=train.test_limit,
    )
    return study_config, splits


def interleaved_pairs(study_config, splits, repeats: int, explain: bool = False):
    """`repeats` pairs of the study tracked, then its trials untracked: per pair the
    trials per minute of both sides, the timing records, (trials, wall seconds tracked,
    untracked, untracked on one torch thread or None), the CPU seconds of both sides and
    Optuna's own seconds (`optuna_alone`, or None). `explain`: each pair also replays the
    trials untracked on one torch thread, and through Optuna alone."""
    pairs, all_records, counts, cpu, floors = [], [], [], [], []
    for index in range(repeats):
        name = f"{study_config.n_trials} trials of {study_config.study_name}"
        log(f"study: {name}, tracked ({index + 1})")
        wall, study, records, tracked_cpu = tracked_study(study_config, splits)
        log(f"study: the same trials untracked ({index + 1})")
        untracked, replayed, untracked_cpu = replay_untracked(study, study_config, splits)
        cpu.append((tracked_cpu, untracked_cpu))
        single = floor = None
        if explain:
            log(f"study: the same trials untracked on one torch thread ({index + 1})")
            single = replay_untracked(study, study_config, splits, threads=1)[0]
            log(f"study: the same trials through Optuna alone ({index + 1})")
            floor = optuna_alone(study, study_config)
        ran = sum(r.kind == "run" for r in records)
        pairs.append((ran / (wall / 60), replayed / (untracked / 60)))
        all_records.append(records)
        counts.append((ran, wall, untracked, single))
        floors.append(floor)
    return pairs, all_records, counts, cpu, floors


def figures(context, study_config, pairs, all_records, counts, cpu, floors) -> list[Figure]:
    costs: dict[str, list[float]] = {"completed": [], "pruned": []}
    for records in all_records:
        for kind, values in fixed_costs(records).items():
            costs[kind] += values
    runs = [r for records in all_records for r in records if r.kind == "run"]
    completed = [r for r in runs if r.outcome == "finished"]
    pruned = [r for r in runs if r.outcome == "TrialPruned"]
    ran, wall, untracked_seconds, _ = counts[len(counts) // 2]
    quick = context.quick
    result = [
        _per_minute_figure(
            f"trials per minute ({CONFIG.name})",
            pairs,
            quick,
            f"{ran} trials "
            f"({len(completed) // len(pairs)} complete, {len(pruned) // len(pairs)} "
            f"pruned per study) of {study_config.train.epochs} epochs on "
            f"{study_config.train.train_limit or 55000} images; a middle pair took "
            f"{wall:.1f} s tracked (run_study in-process, store created and data loaded "
            f"beforehand) vs {untracked_seconds:.1f} s untracked",
        ),
        _cpu_figure(cpu, quick),
        _one_thread_figure(counts, quick),
        _outside_training_figure(counts, all_records, quick),
        _optuna_floor_figure(counts, all_records, floors, quick),
        _cost_figure("completed", costs["completed"], 0.25, quick),
        _cost_figure("pruned", costs["pruned"], 0.05, quick),
    ]
    for label, records in (("completed", completed), ("pruned", pruned)):
        for phase, seconds in median_phases(records, skip=UNTRACKED_PHASES).items():
            result.append(
                Figure(
                    NAME,
                    f"{label} trial, phase: {phase}",
                    seconds * 1000,
                    "ms",
                    estimate=quick,
                    note=f"median over {len(records)} {label} trials",
                )
            )
    overheads = [study_overheads(records, sum(r.kind == "run" for r in records))
                 for records in all_records]  # fmt: skip
    for name in overheads[0]:
        values = [overhead[name] for overhead in overheads]
        result.append(
            Figure(
                NAME,
                f"study work: {name}",
                statistics.median(values) * 1000,
                "ms",
                estimate=quick,
                note=f"median of {len(values)} studies, spread {spread(values, ' s')}",
            )
        )
    return result


def full_size_figure(context, study_config, pairs, all_records, counts) -> Figure:
    """The same measure on a study whose trials train for seconds: the fixed costs that
    quick.yaml's 0.4 s trials cannot carry, spread over full-size trials."""
    ran, wall, untracked_seconds, _ = counts[len(counts) // 2]
    completed = sum(
        r.kind == "run" and r.outcome == "finished" for records in all_records for r in records
    )
    train = study_config.train
    return _per_minute_figure(
        f"trials per minute ({FULL_CONFIG.name}, its first {study_config.n_trials} trials)",
        pairs,
        context.quick,
        f"{completed // len(pairs)} of {ran} trials complete per study, up to "
        f"{train.epochs} epochs on {train.train_limit or 55000} images (batch "
        f"{train.batch_size}); a middle pair took {wall:.1f} s tracked vs "
        f"{untracked_seconds:.1f} s untracked",
    )


def _per_minute_figure(title: str, pairs, quick: bool, detail: str) -> Figure:
    """Trials per minute tracked against untracked: medians of the interleaved pairs,
    their spreads, then `detail` (what was run)."""
    tracked = [tracked for tracked, _ in pairs]
    untracked = [untracked for _, untracked in pairs]
    ratios = [t / u for t, u in pairs]
    return Figure(
        NAME,
        title,
        statistics.median(tracked),
        "trials/min",
        reference="same trials, fit + test evaluation only",
        reference_value=statistics.median(untracked),
        reference_unit="trials/min",
        ratio=statistics.median(ratios),
        ratio_of="tracked / untracked",
        target=("ratio", ">=", 0.75),
        estimate=quick,
        note=(
            f"median of {len(pairs)} interleaved pairs (tracked, then the same trials "
            f"untracked); ratio spread {spread(ratios, 'x')}, tracked {spread(tracked)}, "
            f"untracked {spread(untracked)} trials/min; {detail}"
        ),
    )


def _cost_figure(label: str, values: list[float], target: float, quick: bool) -> Figure:
    shared = " and ".join(UNTRACKED_PHASES)
    return Figure(
        NAME,
        f"fixed cost per {label} trial",
        statistics.median(values) if values else None,
        "s",
        target=("value", "<=", target),
        estimate=quick,
        note=(
            f"median over {len(values)} {label} trials, spread {spread(values, ' s')}: the "
            f"trial's run (train_and_track's own phase timings) less its {shared}, i.e. "
            "MLflow, figures, model, registry, champion and Optuna's per-epoch report"
        ),
    )


def _cpu_figure(cpu: list[tuple[float, float]], quick: bool) -> Figure:
    """CPU seconds of the two sides: what tracking adds in CPU, beside what it adds in
    time. Not a ceiling of the trials-per-minute ratio: the untracked side's CPU is not
    all useful work (`_one_thread_figure`)."""
    tracked = statistics.median(t for t, _ in cpu)
    untracked = statistics.median(u for _, u in cpu)
    ratios = [u / t for t, u in cpu]
    return Figure(
        NAME,
        "CPU time of the tracked study (its process and figure workers)",
        tracked,
        "s",
        reference="the same trials untracked",
        reference_value=untracked,
        reference_unit="s",
        ratio=statistics.median(ratios),
        ratio_of="untracked / tracked",
        estimate=quick,
        note=(
            f"median of {len(cpu)} interleaved pairs, ratio spread {spread(ratios, 'x')}; "
            "user + system seconds of all threads; tracking adds "
            f"{tracked - untracked:.1f} CPU seconds. The untracked side keeps "
            f"{os.cpu_count() or 1} cores busy, but not with useful work alone (the "
            "one-thread figure), so this is no ceiling of the trials-per-minute ratio"
        ),
    )


def _one_thread_figure(counts, quick: bool) -> Figure:
    """The untracked trials on one torch thread against the default: how much of the
    untracked side's CPU the second thread turns into speed on these small MLPs."""
    pairs = [(single, untracked) for _, _, untracked, single in counts if single]
    ratios = [single / untracked for single, untracked in pairs]
    return Figure(
        NAME,
        "the same trials untracked, one torch thread",
        statistics.median(single for single, _ in pairs),
        "s",
        reference="untracked, default threads",
        reference_value=statistics.median(untracked for _, untracked in pairs),
        reference_unit="s",
        ratio=statistics.median(ratios),
        ratio_of="one thread / default, wall time",
        estimate=quick,
        note=(
            f"median of {len(pairs)} replays, one in each pair, ratio spread "
            f"{spread(ratios, 'x')}; a ratio near 1x says the second thread's CPU is "
            "mostly waiting: tracking work could have that core, and the time the tracked "
            "study spends outside training is what sets its trials per minute"
        ),
    )


def _budgets(counts, all_records) -> list[float]:
    """Per pair, what 0.75x trials per minute would leave for all the tracked study's work
    outside training: the untracked wall time / 0.75 less the tracked study's own fit and
    test evaluation."""
    trainings = [training_seconds(records) for records in all_records]
    return [untracked / 0.75 - training
            for (_, _, untracked, _), training in zip(counts, trainings, strict=True)]  # fmt: skip


def _outside_training_figure(counts, all_records, quick: bool) -> Figure:
    """The tracked study's wall time less its runs' fit and test evaluation, against what
    0.75x trials per minute would leave for it (`_budgets`)."""
    trainings = [training_seconds(records) for records in all_records]
    outside = [wall - training
               for (_, wall, _, _), training in zip(counts, trainings, strict=True)]  # fmt: skip
    middle = len(outside) // 2
    return _budget_figure(
        "tracked study: time outside training (fit and test evaluation)",
        outside,
        _budgets(counts, all_records),
        ("what 0.75x would leave for it", "taken / left"),
        quick,
        f"median of {len(outside)} tracked studies, spread {spread(outside, ' s')}; "
        "tracked wall time less its runs' fit and test evaluation phases, i.e. the "
        "fixed costs of its trials and the study's own work below; what 0.75x leaves: "
        f"the untracked wall time / 0.75 less that training time (a middle study: "
        f"{counts[middle][1]:.1f} s in all, {trainings[middle]:.1f} s of it training)",
    )


def _optuna_floor_figure(counts, all_records, floors, quick: bool) -> Figure:
    """Optuna's own work for the same trials (`optuna_alone`) against what 0.75x would
    leave for all the work outside training: a ratio above 1x says no tracking, however
    cheap, can reach 0.75x while the study keeps its storage and its plots."""
    totals = [sum(floor) for floor in floors]
    bookkeeping, plots = floors[len(floors) // 2]
    return _budget_figure(
        "Optuna alone: the same trials' ask/report/tell on SQLite, then its 5 plots",
        totals,
        _budgets(counts, all_records),
        ("what 0.75x would leave for all work outside training", "Optuna alone / left"),
        quick,
        f"median of {len(totals)} replays, one in each pair, spread "
        f"{spread(totals, ' s')}; no training, no MLflow: a new SQLite storage opened "
        "as tune opens one (heartbeats, write-ahead log), each trial asked (sampled), "
        "its epochs reported with a pruning check, told; then the five plots drawn by "
        f"the two figure workers (a middle replay: {bookkeeping:.2f} s of "
        f"ask/report/tell, {plots:.2f} s of plots)",
    )


def _budget_figure(
    title: str, taken: list[float], budgets: list[float], labels, quick: bool, note: str
) -> Figure:
    """Seconds `taken` in each pair against what 0.75x left in it (`budgets`): the
    medians, and the median of the pairs' ratios. `labels`: (the reference, the ratio)."""
    reference, ratio_of = labels
    return Figure(
        NAME,
        title,
        statistics.median(taken),
        "s",
        reference=reference,
        reference_value=statistics.median(budgets),
        reference_unit="s",
        ratio=statistics.median(t / b for t, b in zip(taken, budgets, strict=True)),
        ratio_of=ratio_of,
        estimate=quick,
        note=note,
    )
