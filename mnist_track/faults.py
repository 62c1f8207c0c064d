"""A fault-injection seam for tests: a worker that kills itself (SIGKILL) at a named
point, so tests can prove that whatever a kill leaves half-done is reconciled.

Inert unless $MNIST_TRACK_KILL_AT is set (only tests set it). Its value is a point name,
optionally with the occurrence that should kill, e.g. `after_registration` or
`mid_training@2` (the second time this process passes that point), and optionally
`:stop`, for a worker that pauses itself there (SIGSTOP) instead, until the test resumes
it (SIGCONT): a pause at an exact point, where a SIGSTOP sent from outside lands wherever
the worker happens to be.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

KILL_AT_ENV = "MNIST_TRACK_KILL_AT"

# Where a kill leaves the most to reconcile, in the order a trial passes them.
POINTS = (
    "parent_run_created",  # the study's parent run exists but is not yet recorded
    "after_run_creation",  # a trial's run exists, its id maybe not yet on the trial
    "mid_training",  # after the first epoch's metrics are handed to the run's log
    "after_model_logging",  # the model is logged, the run still RUNNING
    "after_registration",  # the version exists and champion may have moved
    "before_tell",  # all done except telling Optuna the trial is complete
)

_passed: Counter[str] = Counter()


SIGNALS = {"": signal.SIGKILL, "stop": signal.SIGSTOP}


def _target() -> tuple[str, int, signal.Signals] | None:
    value = os.environ.get(KILL_AT_ENV, "").strip()
    if not value:
        return None
    value, _, how = value.partition(":")
    name, _, occurrence = value.partition("@")
    if name not in POINTS:
        raise ValueError(f"${KILL_AT_ENV}: unknown point {name!r}; points: {', '.join(POINTS)}")
    if how not in SIGNALS:
        raise ValueError(f"${KILL_AT_ENV}: unknown action {how!r}; only ':stop' (pause)")
    return name, int(occurrence or 1), SIGNALS[how]


def fault_point(name: str) -> None:
    """Die (or pause) here, at once and without cleanup, if a test asked for it."""
    target = _target()
    if target is None:
        return
    _passed[name] += 1
    point, occurrence, sig = target
    if (point, occurrence) == (name, _passed[name]):
        os.kill(os.getpid(), sig)
