"""What the CLI shows a person: per-epoch progress and run summaries.

Progress goes to stderr and only to a terminal (quiet in logs, CI and pipes, or with
--quiet); results go to stdout so they can be piped.
"""

from __future__ import annotations

import sys

import click


class EpochProgress:
    """An `on_epoch` callback that prints one line per epoch."""

    def __init__(self, total_epochs: int, quiet: bool = False, prefix: str = "") -> None:
        self.total_epochs = total_epochs
        self.enabled = not quiet and sys.stderr.isatty()
        self.prefix = prefix

    def __call__(self, epoch) -> None:
        if not self.enabled:
            return
        click.echo(
            f"{self.prefix}epoch {epoch.epoch:>2}/{self.total_epochs}  "
            f"train loss {epoch.train_loss:.4f} acc {epoch.train_accuracy:.2%}  "
            f"val loss {epoch.validation_loss:.4f} acc {epoch.validation_accuracy:.2%}  "
            f"{epoch.seconds:.1f}s",
            err=True,
        )


def run_summary(outcome, registered_model: str | None) -> str:
    lines = [
        f"run {outcome.run_id}",
        f"  validation accuracy {outcome.validation_accuracy:.4f}",
        f"  test accuracy       {outcome.test.accuracy:.4f}  (macro-F1 {outcome.test.macro_f1:.4f},"
        f" loss {outcome.test.loss:.4f})",
        f"  training time       {outcome.fit.seconds:.1f}s",
    ]
    if outcome.model_version is not None:
        lines.append(
            f"  model               models:/{registered_model}/{outcome.model_version}"
            + ("  (now champion)" if outcome.champion else "")
        )
    return "\n".join(lines)
