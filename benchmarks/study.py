"""Trials per minute of a fixed small study (experiments/quick.yaml) run with
mnist_track.tune.run_study into a throw-away MLflow store and Optuna SQLite storage,
beside the same trials (same sampled configs, same epochs) trained without MLflow or
Optuna."""

from __future__ import annotations

from benchmarks.common import (
    REPO_ROOT,
    Context,
    Figure,
    Stopwatch,
    log,
    temp_store,
    warm_up_mlflow,
)

NAME = "study"
CONFIG = REPO_ROOT / "experiments" / "quick.yaml"
QUICK_TRIALS = 3


def replay_untracked(study, study_config, splits) -> float:
    """Seconds to train and test-evaluate each finished trial's config for the epochs it
    ran (pruned trials stop early), with plain fit: no MLflow, no Optuna."""
    import optuna

    from mnist_track.metrics import classification_report
    from mnist_track.train import fit, predict_logits
    from mnist_track.tune import suggest_config

    with Stopwatch() as watch:
        for trial in study.get_trials(deepcopy=False):
            if not trial.intermediate_values:
                continue
            config = suggest_config(optuna.trial.FixedTrial(trial.params), study_config)
            config = config.model_copy(update={"epochs": len(trial.intermediate_values)})
            result = fit(config, splits)
            logits = predict_logits(result.model, splits.test.images)
            classification_report(logits, splits.test.labels)
    return watch.seconds


def run(context: Context) -> list[Figure]:
    from mnist_track import tracking
    from mnist_track.config import load_study_config
    from mnist_track.tune import run_study

    overrides = {"n_trials": QUICK_TRIALS} if context.quick else {}
    study_config = load_study_config(CONFIG, overrides)
    train = study_config.train
    splits = context.splits(
        val_size=train.val_size,
        split_seed=train.split_seed,
        train_limit=train.train_limit,
        test_limit=train.test_limit,
    )
    log("study: warming up MLflow (one tiny tracked run)")
    warm_up_mlflow(context)
    with temp_store() as store:
        tracking.use_tracking_uri(store.uri)
        store.experiment(study_config.experiment)
        storage = f"sqlite:///{store.folder / 'optuna.db'}"
        log(f"study: {study_config.n_trials} trials of {CONFIG.name}")
        with Stopwatch() as watch:
            result = run_study(study_config, splits, storage)
    log("study: the same trials untracked")
    trials = result.study.get_trials(deepcopy=False)
    replayed = sum(bool(t.intermediate_values) for t in trials)
    untracked = replay_untracked(result.study, study_config, splits)
    in_trials = sum(t.duration.total_seconds() for t in trials if t.duration is not None)
    counts = result.counts()
    per_minute = result.ran / (watch.seconds / 60)
    untracked_per_minute = replayed / (untracked / 60)
    quick_note = (
        f"; quick mode: n_trials {QUICK_TRIALS} instead of the file's" if context.quick else ""
    )
    return [
        Figure(
            NAME,
            f"trials per minute ({CONFIG.name})",
            per_minute,
            "trials/min",
            reference="same trials, fit + test evaluation only",
            reference_value=untracked_per_minute,
            reference_unit="trials/min",
            ratio=per_minute / untracked_per_minute,
            ratio_of="study / untracked",
            estimate=context.quick,
            note=(
                f"{result.ran} trials ({counts['complete']} complete, {counts['pruned']} "
                f"pruned) in {watch.seconds:.1f} s wall: run_study in-process (data loaded and "
                f"store created beforehand); {train.epochs} epochs on "
                f"{train.train_limit or 55000} images per trial; {in_trials:.1f} s inside "
                f"trials, {watch.seconds - in_trials:.1f} s of study work (parent run, "
                f"summary, plots); the untracked replay took {untracked:.1f} s" + quick_note
            ),
        ),
        Figure(
            NAME,
            "seconds per trial (mean, inside Optuna)",
            in_trials / max(len(trials), 1),
            "s",
            reference="untracked replay, per trial",
            reference_value=untracked / max(replayed, 1),
            reference_unit="s",
            ratio=(in_trials / max(len(trials), 1)) / (untracked / max(replayed, 1)),
            ratio_of="tracked / untracked",
            estimate=context.quick,
        ),
    ]
