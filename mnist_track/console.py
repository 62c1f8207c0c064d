"""What the CLI shows a person: per-epoch progress and run summaries.

Progress goes to stderr and only to a terminal (quiet in logs, CI and pipes, or with
--quiet); results go to stdout so they can be piped.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import click

from mnist_track.defaults import CHAMPION_ALIAS, PROGRESS_EVERY

BAR_AFTER_SECONDS = 3.0  # an epoch this slow gets a progress bar; quicker ones just a line
BAR_WIDTH = 30


class EpochProgress:
    """An `on_epoch` callback that prints one line per epoch, and an `on_batches` one that
    draws a bar within an epoch once the epoch has taken BAR_AFTER_SECONDS (a CNN on a
    CPU: ~13 s an epoch), rewritten in place and wiped by the epoch's line."""

    def __init__(
        self,
        total_epochs: int,
        quiet: bool = False,
        prefix: str = "",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total_epochs = total_epochs
        self.enabled = not quiet and sys.stderr.isatty()
        self.prefix = prefix
        self.clock = clock
        self._epoch_started: float | None = None
        self._bar_shown = False

    def __call__(self, epoch, prefix: str = "") -> None:
        self._epoch_started = None
        if not self.enabled:
            return
        self._wipe_bar()
        click.echo(
            f"{self.prefix}{prefix}epoch {epoch.epoch:>2}/{self.total_epochs}  "
            f"train loss {epoch.train_loss:.4f} acc {epoch.train_accuracy:.2%}  "
            f"val loss {epoch.validation_loss:.4f} acc {epoch.validation_accuracy:.2%}  "
            f"{epoch.seconds:.1f}s",
            err=True,
        )

    def batches(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = self.clock()
        if self._epoch_started is None or done <= PROGRESS_EVERY:
            # The first report of an epoch (the clock starts a few batches late; fine).
            self._epoch_started = now
        if now - self._epoch_started < BAR_AFTER_SECONDS:
            return
        filled = BAR_WIDTH * done // total
        bar = "#" * filled + "." * (BAR_WIDTH - filled)
        click.echo(f"\r{self.prefix}  [{bar}] {done}/{total} batches", err=True, nl=False)
        self._bar_shown = True

    def _wipe_bar(self) -> None:
        if self._bar_shown:
            click.echo("\r\033[K", err=True, nl=False)
            self._bar_shown = False


@contextmanager
def progress_bar(total: int, label: str) -> Iterator[Callable[[int], None]]:
    """A bar on stderr for `total` items, advanced by the function it yields (items just
    done); on a terminal only, so logs and pipes get nothing."""
    if not sys.stderr.isatty():
        yield lambda done: None
        return
    with click.progressbar(length=total, label=label, file=sys.stderr) as bar:
        yield bar.update


def run_summary(outcome, registered_model: str | None, url: str | None = None) -> str:
    lines = [
        f"run {outcome.run_id}" + (f"  {url}" if url else ""),
        f"  validation accuracy {outcome.validation_accuracy:.4f}",
        f"  test accuracy       {outcome.test.accuracy:.4f}  (macro-F1 {outcome.test.macro_f1:.4f},"
        f" loss {outcome.test.loss:.4f})",
        f"  training time       {outcome.fit.seconds:.1f}s",
    ]
    if outcome.model_version is not None:
        lines.append(
            f"  model               models:/{registered_model}/{outcome.model_version}"
            + ("  (now champion)" if outcome.is_champion else "")
        )
    if outcome.champion is not None and outcome.champion.note:
        lines.append(f"  note: {outcome.champion.note}")
    return "\n".join(lines)


def trial_line(trial) -> str:
    """One line per finished trial (an Optuna FrozenTrial)."""
    attrs = trial.user_attrs
    line = f"trial {trial.number:>3} {trial.state.name:<8}"
    if trial.value is not None:
        line += f" val {trial.value:.4f}"
    if "test_accuracy" in attrs:
        line += f" test {attrs['test_accuracy']:.4f}"
    if attrs.get("model_version"):
        line += f" version {attrs['model_version']}"
    if trial.state.name == "PRUNED" and trial.intermediate_values:
        line += f" after epoch {max(trial.intermediate_values)}"
    if "error" in attrs:
        line += f" error: {attrs['error']}"
    params = ", ".join(f"{k}={_short(v)}" for k, v in trial.params.items())
    return f"{line}  [{params}]"


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def study_summary(result, registered_model: str, parent_url: str | None = None) -> str:
    from mnist_track.redact import redact_url

    counts = result.counts()
    lines = [
        f"study {result.study.study_name}: {counts['complete']} complete, {counts['pruned']} "
        f"pruned, {counts['fail']} failed ({result.ran} run now; "
        f"storage {redact_url(result.storage_url)})",
        f"  parent run {result.parent_run_id} ({_parent_state(result.parent_status)})",
    ]
    if parent_url:
        lines.append(f"    {parent_url}")
    if result.reconciled:
        lines.append(f"  reconciled: {reconciled_line(result.reconciled)}")
    if result.abandoned:
        lines.append(f"  {result.abandoned} trial(s) of this worker were taken over by another")
    if result.stopped:
        lines.append(f"  stopped early: {result.stopped}")
    best = result.best_trial
    if best is None:
        lines.append("  no completed trial yet")
        return "\n".join(lines)
    params = ", ".join(f"{k}={_short(v)}" for k, v in best.params.items())
    lines += [
        f"  best trial {best.number}: {params}",
        f"    validation accuracy {best.value:.4f}",
        f"    test accuracy       {best.user_attrs.get('test_accuracy', float('nan')):.4f}",
        f"    model version       {best.user_attrs.get('model_version')}",
        f"  serve the champion:   models:/{registered_model}@{CHAMPION_ALIAS}",
    ]
    return "\n".join(lines)


def _parent_state(status: str) -> str:
    if status == "RUNNING":
        return "RUNNING: other workers are still at work"
    return status


def reconciled_line(reconciled) -> str:
    """What a worker found half-done and put right, in one line."""
    parts = []
    if reconciled.trials_failed:
        parts.append(f"{reconciled.trials_failed} stale trial(s) failed and queued again")
    if reconciled.runs_ended:
        parts.append(f"{reconciled.runs_ended} run(s) ended")
    if reconciled.versions_removed:
        versions = ", ".join(reconciled.versions_removed)
        parts.append(f"version(s) {versions} removed (their runs never completed)")
    if reconciled.parents_discarded:
        parts.append(f"{reconciled.parents_discarded} unrecorded parent run(s) discarded")
    return "; ".join(parts)
