"""What every group shares: the Figure record and its target check, timers, the MNIST
splits (loaded once per process), a throw-away MLflow store, and the machine description."""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mnist_track.defaults import DATA_DIR_ENV

REPO_ROOT = Path(__file__).resolve().parents[1]
BIN_DIR = Path(sys.executable).parent  # the virtual environment's bin/: mnist-track, mlflow
TRAIN_IMAGES = 55_000  # the 60k training set less the default 5,000 validation images

OPERATORS: dict[str, Callable[[float, float], bool]] = {
    ">=": lambda a, b: a >= b,
    "<=": lambda a, b: a <= b,
    "<": lambda a, b: a < b,
    ">": lambda a, b: a > b,
}


@dataclass
class Figure:
    """One measured number, its reference (measured in the same run) and its target.

    `target` is (on, operator, threshold) where `on` is "value" or "ratio"; `met` is
    computed from it. `estimate` marks quick-mode figures (partial runs, few repeats)."""

    group: str
    name: str
    value: float | None
    unit: str
    reference: str = ""
    reference_value: float | None = None
    reference_unit: str = ""
    ratio: float | None = None
    ratio_of: str = ""  # what the ratio divides, e.g. "reference / project"
    target: tuple[str, str, float] | None = None
    estimate: bool = False
    note: str = ""
    met: bool | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.target is not None:
            on, operator, threshold = self.target
            actual = self.ratio if on == "ratio" else self.value
            self.met = None if actual is None else OPERATORS[operator](actual, threshold)

    def target_text(self) -> str:
        if self.target is None:
            return ""
        on, operator, threshold = self.target
        suffix = "x" if on == "ratio" else f" {self.unit}"
        return f"{'ratio ' if on == 'ratio' else ''}{operator} {threshold:g}{suffix}"


class Context:
    """Settings and per-process caches handed to every group."""

    def __init__(self, quick: bool) -> None:
        self.quick = quick

    @functools.cached_property
    def device(self):
        from mnist_track.train import resolve_device

        return resolve_device("auto")

    @functools.cached_property
    def raw(self):
        from mnist_track.data import load_mnist

        return load_mnist(data_dir(), download=False)

    def splits(self, **options):
        """make_splits with the TrainConfig defaults (5,000 validation images, seed 0)."""
        from mnist_track.data import make_splits

        options.setdefault("val_size", 5000)
        options.setdefault("split_seed", 0)
        return make_splits(self.raw, device=self.device, **options)

    @functools.cached_property
    def full_splits(self):
        return self.splits()


def data_dir() -> Path:
    """$MNIST_TRACK_DATA, else the shared offline copy beside the repository."""
    return Path(os.environ.get(DATA_DIR_ENV) or REPO_ROOT.parent / "shared" / "mnist")


# --- timing ----------------------------------------------------------------------------


class Stopwatch:
    """`with Stopwatch() as watch: ...` then `watch.seconds`."""

    seconds: float = 0.0

    def __enter__(self) -> Stopwatch:
        self._started = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self._started


class CpuClock:
    """`with CpuClock() as clock: ...` then `clock.seconds`: CPU seconds (user and
    system, all threads) of this process and its live child processes (the figure
    workers) over the block; what the wall time of a CPU-bound block cannot beat on
    this machine's cores."""

    seconds: float = 0.0

    def __enter__(self) -> CpuClock:
        self._started = _cpu_so_far()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = _cpu_so_far() - self._started


def _cpu_so_far() -> float:
    import psutil

    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        with contextlib.suppress(psutil.Error):  # gone meanwhile
            total += sum(child.cpu_times()[:2])
    return total


def timed(function: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = function()
    return time.perf_counter() - started, result


def percentile(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(values, q))


def spread(values: list[float], unit: str = "") -> str:
    """min-max of repeated measurements, for a figure's note."""
    if not values:
        return "n/a"
    return f"{min(values):.3g}-{max(values):.3g}{unit}"


def median_phases(records, skip: tuple[str, ...] = ()) -> dict[str, float]:
    """Median seconds of each phase over timing records (mnist_track.timings), in the
    order they first appear, plus the time in no phase; a record without a phase counts
    it as zero."""
    names: dict[str, None] = {}
    for record in records:
        names |= dict.fromkeys(name for name in record.phases if name not in skip)
    medians = {
        name: statistics.median(record.phases.get(name, 0.0) for record in records)
        for name in names
    }
    if records:
        medians["(in no phase)"] = statistics.median(record.unphased for record in records)
    return medians


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# --- a throw-away MLflow store ---------------------------------------------------------


@dataclass(frozen=True)
class Store:
    uri: str
    folder: Path
    artifacts: Path

    def experiment(self, name: str) -> str:
        """Create `name` with artifacts inside the store's folder (MLflow's default for
        a SQLite store is ./mlruns in the working directory); returns its id."""
        from mlflow import MlflowClient

        client = MlflowClient()
        existing = client.get_experiment_by_name(name)
        if existing is not None:
            return existing.experiment_id
        return client.create_experiment(name, artifact_location=(self.artifacts / name).as_uri())


@contextmanager
def temp_store(prefix: str = "bench-mlflow-") -> Iterator[Store]:
    """A fresh SQLite tracking store in a temporary folder, set for this process and its
    subprocesses, and the previous URI restored afterwards."""
    import mlflow

    previous_env = os.environ.get("MLFLOW_TRACKING_URI")
    previous_uri = mlflow.get_tracking_uri()
    with tempfile.TemporaryDirectory(prefix=prefix) as folder:
        store = Store(f"sqlite:///{Path(folder) / 'mlflow.db'}", Path(folder), Path(folder) / "art")
        os.environ["MLFLOW_TRACKING_URI"] = store.uri
        mlflow.set_tracking_uri(store.uri)
        try:
            yield store
        finally:
            while mlflow.active_run():
                mlflow.end_run()
            mlflow.set_tracking_uri(previous_uri)
            if previous_env is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = previous_env


_MLFLOW_WARM = False


def warm_up_mlflow(context: Context) -> float:
    """One tiny tracked run into a throw-away store, once per process, so the first timed
    run does not pay MLflow's lazy imports (which depend on what ran before). Returns the
    seconds it took (0 when already warm)."""
    global _MLFLOW_WARM
    if _MLFLOW_WARM:
        return 0.0
    from mnist_track import tracking
    from mnist_track.config import TrainConfig
    from mnist_track.runs import train_and_track

    with Stopwatch() as watch, temp_store("bench-warmup-") as store:
        tracking.use_tracking_uri(store.uri)
        store.experiment("warmup")
        config = TrainConfig(epochs=1, train_limit=512, test_limit=512)
        splits = context.splits(train_limit=512, test_limit=512)
        train_and_track(config, splits, experiment="warmup", registered_model="warmup")
    _MLFLOW_WARM = True
    return watch.seconds


# --- the machine -----------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(context: Context) -> dict[str, Any]:
    from importlib.metadata import version

    import torch

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "mlflow": version("mlflow"),
        "optuna": version("optuna"),
        "numpy": version("numpy"),
        "torchvision": version("torchvision"),
        "torch_threads": torch.get_num_threads(),
        "device": str(context.device),
        "load_average_at_start": _load_average(),
    }


def _load_average() -> str:
    try:
        return " ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        return "n/a"
