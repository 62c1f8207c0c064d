"""Wall time of `mnist-track --help` in a fresh process, beside a bare interpreter and an
interpreter that imports torch (what the CLI would cost if it imported torch at load)."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

from benchmarks.common import BIN_DIR, Context, Figure, log

NAME = "startup"


def wall_seconds(command: list[str], repeats: int) -> float:
    """Median wall time of `command` over `repeats` runs, after one untimed run (so the
    files are in the page cache, as they are for a user's second call)."""
    subprocess.run(command, capture_output=True, check=True)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run(command, capture_output=True, check=True)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def run(context: Context) -> list[Figure]:
    repeats = 5 if context.quick else 15
    torch_repeats = 2 if context.quick else 7
    log("startup: python -c pass")
    bare = wall_seconds([sys.executable, "-c", "pass"], repeats)
    log("startup: mnist-track --help")
    help_seconds = wall_seconds([str(BIN_DIR / "mnist-track"), "--help"], repeats)
    log("startup: python -c 'import torch'")
    torch_seconds = wall_seconds([sys.executable, "-c", "import torch"], torch_repeats)
    note = f"median of {repeats} runs ({torch_repeats} for import torch) after one untimed run"
    return [
        Figure(
            NAME,
            "mnist-track --help",
            help_seconds,
            "s",
            reference="python -c pass",
            reference_value=bare,
            reference_unit="s",
            ratio=help_seconds / bare,
            ratio_of="project / bare interpreter",
            target=("value", "<", 0.3),
            estimate=context.quick,
            note=note,
        ),
        Figure(
            NAME,
            "python -c 'import torch'",
            torch_seconds,
            "s",
            reference="mnist-track --help",
            reference_value=help_seconds,
            reference_unit="s",
            ratio=torch_seconds / help_seconds,
            ratio_of="import torch / mnist-track --help",
            estimate=context.quick,
            note="what --help would cost if the CLI imported torch at load",
        ),
    ]
