"""The names by which a study and its MLflow runs find each other: attributes on Optuna's
trials and study, tags on the runs. Written by tune.py, read back by reconciliation.py
after a kill, by the listing of studies, and by the tests."""

RUN_ID_ATTR = "mlflow_run_id"  # on a trial: the id of its MLflow run
ERROR_ATTR = "error"  # set on trials that failed by their own error (they count as done)
PARENT_RUN_ATTR = "mlflow_parent_run_id"  # on the study: its parent run
WARM_START_ATTR = "warm_start"  # on a warm-start trial: its entry's index in the config
STOPPED_ATTR = "stopped_early"  # on the study: why it stopped early (None once it went on)
STOPPED_TAG = "study.stopped_early"  # the same on the parent run
RETRIED_TRIAL_ATTR = "failed_trial"  # system attr Optuna's retry callback puts on a retry
STATE_TAG = "optuna.state"  # on a trial's run: the trial's state
RETRY_OF_TAG = "optuna.retry_of"  # on a retry's run: the trial it runs again
ROLE_TAG = "mnist_track.role"  # "study" on a study's parent run
