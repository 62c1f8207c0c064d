"""Everything mnist-track asks of MLflow's tracking store: runs, params, metrics,
figures, the logged model and reading its files back. (The Model Registry and the
champion rule are registry.py's; the served model, serving.py and model_code.py, imports
MLflow too: a pyfunc model must.)

Run lifecycle goes through MLflow's fluent API (model logging needs an active run);
everything else goes through `MlflowClient` with explicit run ids, batched into as few
calls as possible.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import posixpath
import random
import re
import subprocess
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT as DATASET_CONTEXT_TAG
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from mlflow.utils.validation import (
    MAX_ENTITIES_PER_BATCH,
    MAX_METRICS_PER_BATCH,
    MAX_PARAMS_TAGS_PER_BATCH,
)

from mnist_track import missing_modules, model_folder, timings
from mnist_track.coordination import creating_store, is_database_file
from mnist_track.defaults import SYSTEM_METRICS_INTERVAL_SECONDS
from mnist_track.errors import MnistTrackError
from mnist_track.model_folder import PACKAGE_DIR
from mnist_track.redact import redact_text, redact_url

if TYPE_CHECKING:
    from mnist_track.data import SplitLineage

# MLflow probes for Databricks before every request to a tracking server (missing_modules).
missing_modules.remember_absent()
# Artifact transfers are local and fast; their progress bars only clutter the output.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# MLflow prints two "View run/experiment at" lines per run against a tracking server;
# in a study that is two per trial. Summaries give the one link that matters (`run_url`).
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

LAUNCHER_RUN_ENV = "MLFLOW_RUN_ID"  # set by `mlflow run` for the entry point's process
MODEL_NAME_IN_RUN = "model"
ERROR_TAG = "error"
# The first request to a tracking server: one try, a short wait. A wrong URI then fails
# in seconds, not after MLflow's retries with back-off (minutes); once it has answered,
# later requests keep those retries for passing failures.
PROBE_TIMEOUT_SECONDS = 5


class TrackingError(MnistTrackError, RuntimeError):
    """The tracking store or registry cannot do what was asked."""


def resolve_tracking_uri(uri: str | None) -> str:
    """Point MLflow at `uri` (else $MLFLOW_TRACKING_URI, else MLflow's default) without
    opening the store."""
    if uri:
        mlflow.set_tracking_uri(uri)
    return mlflow.get_tracking_uri()


def use_tracking_uri(uri: str | None, *, create: bool = True) -> str:
    """Point MLflow at `uri` (else $MLFLOW_TRACKING_URI, else MLflow's default) and
    check the store answers, so a bad URI fails before any training. A local store that
    does not exist is created, unless `create` is False (commands that only read or
    change what is there): then it is an error, and nothing is left behind."""
    resolved = resolve_tracking_uri(uri)
    if not create:
        missing = missing_local_store(resolved)
        if missing is not None:
            raise TrackingError(
                f"no MLflow tracking store at {missing} (MLFLOW_TRACKING_URI / "
                f"--tracking-uri is {redact_url(resolved)!r}; nothing has been tracked there)"
            )
    try:
        with creating_store(resolved), _one_quick_try(resolved):
            # The first call creates and migrates a new store.
            MlflowClient().search_experiments(max_results=1)
    except Exception as error:  # noqa: BLE001 - any store failure is reported the same way
        raise TrackingError(
            f"cannot open the MLflow tracking store {redact_url(resolved)!r}: "
            + redact_text(str(error), resolved)
        ) from None
    return resolved


def missing_local_store(uri: str) -> str | None:
    """The path of a local store (an SQLite file, a folder) that does not exist; None
    when it exists or the store is not local."""
    if not is_local_store(uri):
        return None
    if uri.startswith("sqlite:"):
        from sqlalchemy.engine import make_url

        database = make_url(uri).database
        if not is_database_file(database):
            return None
        path = Path(database)
    elif uri.startswith("file:"):
        from urllib.parse import urlsplit
        from urllib.request import url2pathname

        path = Path(url2pathname(urlsplit(uri).path))
    else:
        path = Path(uri)
    return None if path.exists() else str(path)


@contextmanager
def _one_quick_try(uri: str) -> Iterator[None]:
    """For a tracking server: the requests inside make one try each, with a short wait
    (MLflow reads these settings on every request)."""
    if not uri.startswith(("http://", "https://")):
        yield
        return
    settings = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(PROBE_TIMEOUT_SECONDS),
    }
    saved = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# MLflow's URIs for hosted tracking that carry no "://" (e.g. "databricks").
REMOTE_SCHEMES_WITHOUT_SLASHES = ("databricks", "databricks-uc", "uc")


def is_local_store(uri: str) -> bool:
    """An embedded store on this machine (SQLite or a folder), not a server or a shared
    database that workers on other machines could reach."""
    if uri.split(":")[0] in REMOTE_SCHEMES_WITHOUT_SLASHES:
        return False
    return uri.startswith(("sqlite:", "file:")) or "://" not in uri


SAMPLING_INTERVAL_ENV = "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"  # MLflow's own setting


def log_system_metrics(enabled: bool = True) -> None:
    """Whether the runs this process starts from now on log `system/*` metrics (CPU,
    memory, disk, network; GPU where MLflow finds a monitor), sampled by a thread of
    MLflow's every SYSTEM_METRICS_INTERVAL_SECONDS unless its own environment variable
    says otherwise. Process-wide, like the tracking URI: every run started here (a
    training run, each trial of a study) gets the same setting."""
    if not enabled:
        mlflow.disable_system_metrics_logging()
        return
    if importlib.util.find_spec("psutil") is None:
        raise TrackingError(
            "system metrics need the psutil package, which is not installed: pip install "
            "psutil (or install mnist-track with its system-metrics extra)"
        )
    if not os.environ.get(SAMPLING_INTERVAL_ENV):
        mlflow.set_system_metrics_sampling_interval(SYSTEM_METRICS_INTERVAL_SECONDS)
    mlflow.enable_system_metrics_logging()


# The MLflow UI opens an experiment by its kind: without this tag, 3.x guesses "GenAI"
# and shows traces and token usage instead of the runs table.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"


def ensure_experiment(name: str) -> str:
    """The experiment's id, created if missing. Workers starting together on a fresh
    server race to create it; the loser reads the winner's (MLflow's own set_experiment
    then returns without making it active, so runs would land in the default one)."""
    client = MlflowClient()
    for _attempt in range(3):
        found = client.get_experiment_by_name(name)
        if found is not None and found.lifecycle_stage == "deleted":
            # MLflow keeps the name taken; creating runs in it would fail one by one.
            raise TrackingError(
                f"the MLflow experiment {name!r} (id {found.experiment_id}) is deleted: "
                f"restore it (mlflow experiments restore --experiment-id "
                f"{found.experiment_id}) or choose another experiment name"
            )
        if found is not None:
            if EXPERIMENT_KIND_TAG not in found.tags:  # made before this tag, or by hand
                client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
            return found.experiment_id
        try:
            return client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING})
        except MlflowException:
            time.sleep(0.2)  # created by another worker meanwhile: read it on the next pass
    raise TrackingError(f"cannot create or find the MLflow experiment {name!r}")


# Background metrics and params go at most this often: a short trial's epochs then cost
# one request, not one each (about 10 ms of a tracking server's CPU per request).
BATCH_INTERVAL_SECONDS = 1.0
# One thread: background requests of a run are made in the order they were asked for.
_background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow-background")

# Requests that need not wait for each other, sent at once: the files of a folder (a
# model is 15 small files) and a logged model's own requests while they upload.
PARALLEL_REQUESTS = 4
_parallel = ThreadPoolExecutor(max_workers=PARALLEL_REQUESTS, thread_name_prefix="mlflow-parallel")


def _artifact_repository(artifact_uri: str):
    """The artifact store at a run's or a logged model's artifact URI, without asking the
    tracking server where that is."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    return get_artifact_repository(artifact_uri, tracking_uri=mlflow.get_tracking_uri())


def upload_folder(repository, folder: str | Path, artifact_path: str | None = None) -> None:
    """Every file under `folder` into `repository` (under `artifact_path`), several at a
    time: through a tracking server each file is one request, and MLflow sends them one
    after another."""
    wait_for_uploads(start_uploads(repository, folder, artifact_path))


def start_uploads(repository, folder: str | Path, artifact_path: str | None = None) -> list[Future]:
    """The uploads of `upload_folder`, started; the files are listed now, so what appears
    in `folder` later is not sent."""
    folder = Path(folder)
    uploads = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        parts = [artifact_path, path.parent.relative_to(folder).as_posix()]
        parts = [part for part in parts if part and part != "."]
        target = posixpath.join(*parts) if parts else None
        uploads.append(_parallel.submit(repository.log_artifact, str(path), target))
    return uploads


def wait_for_uploads(uploads: list[Future]) -> None:
    wait(uploads)  # all of them, before the caller's folder goes: then the first error
    for upload in uploads:
        upload.result()


@dataclass
class RunLog:
    """Logging into one run by id; cheap to create, safe to use from any thread.

    With `background=True`, params and metrics are sent from a background thread, in
    order, while training goes on (against a tracking server, about 10 ms each), and at
    most once per BATCH_INTERVAL_SECONDS: what arrives sooner waits for the next send and
    goes with it in one request. Epochs longer than that are each sent at once; a short
    trial's params and epochs go with its final metrics. `flush` sends what waits and waits for it;
    `start_run` flushes before it ends the run, and a pruned or failed run too. (Not
    MLflow's own asynchronous logging: `mlflow.end_run` shuts its queue down, which
    waits up to a second for the queue's thread, once per run.)"""

    run_id: str
    client: MlflowClient
    experiment_id: str = ""  # known when this process started the run
    # Known when this process started the run: uploads then skip MLflow's get_run, one
    # request each against a tracking server.
    artifact_uri: str = ""
    # A run started by `mlflow run` already holds the MLproject parameters (MLflow refuses
    # to change a param): those keep the launcher's values.
    adopted: bool = False
    pending: list[Future] = field(default_factory=list)  # background requests not waited on
    _waiting: dict[str, list] = field(default_factory=dict, repr=False)  # the next batch
    _timer: threading.Timer | None = field(default=None, repr=False)
    # The first interval starts with the run: a quick trial's params wait for its metrics.
    _last_sent: float = field(default_factory=time.monotonic, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def log_params(self, params: Mapping[str, Any], background: bool = False) -> None:
        items = [Param(key, str(value)) for key, value in params.items()]
        if self.adopted:
            existing = self.client.get_run(self.run_id).data.params
            items = [item for item in items if item.key not in existing]
        if background:
            self._later(params=items)
            return
        for start in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(
                self.run_id, params=items[start : start + MAX_PARAMS_TAGS_PER_BATCH]
            )

    def _later(self, **entities: list) -> None:
        """Into the next background batch, sent now if the last went long enough ago,
        else when it is due (or at `flush`)."""
        with self._lock:
            for kind, items in entities.items():
                self._waiting.setdefault(kind, []).extend(items)
            if self._timer is not None:
                return  # a send is due already and will take these along
            delay = self._last_sent + BATCH_INTERVAL_SECONDS - time.monotonic()
            if delay <= 0:
                self._send_waiting()
            else:
                self._timer = threading.Timer(delay, self._on_timer)
                self._timer.daemon = True
                self._timer.start()

    def _on_timer(self) -> None:
        with self._lock:
            if self._timer is threading.current_thread():  # else flushed meanwhile
                self._send_waiting()

    def _send_waiting(self) -> None:
        """Queue what waits as one background request (more only past MLflow's limits);
        the caller holds the lock."""
        self._timer = None
        waiting, self._waiting = self._waiting, {}
        if not waiting:
            return
        self._last_sent = time.monotonic()
        self.pending.append(_background.submit(self._log_batches, **waiting))

    def _log_batches(self, metrics=(), params=(), tags=()) -> None:
        metrics, params, tags = list(metrics), list(params), list(tags)
        while metrics or params or tags:
            some_params = params[:MAX_PARAMS_TAGS_PER_BATCH]
            some_tags = tags[:MAX_PARAMS_TAGS_PER_BATCH]
            room = MAX_ENTITIES_PER_BATCH - len(some_params) - len(some_tags)
            some_metrics = metrics[: min(room, MAX_METRICS_PER_BATCH)]
            self.client.log_batch(
                self.run_id, metrics=some_metrics, params=some_params, tags=some_tags
            )
            metrics = metrics[len(some_metrics) :]
            params = params[len(some_params) :]
            tags = tags[len(some_tags) :]

    def send(self) -> None:
        """Send what waits now, in the background, without waiting for it (`flush` does)."""
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
            self._send_waiting()

    def wait_for(self, request: Future) -> None:
        """A request of the run's made elsewhere, that `flush` waits for too."""
        with self._lock:
            self.pending.append(request)

    def flush(self) -> None:
        """Send what waits, and wait for the background requests; the first failure is
        raised here."""
        self.send()
        with self._lock:
            pending, self.pending = self.pending, []
        for request in pending:
            request.result()

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(
        self,
        metrics: Mapping[str, float],
        step: int = 0,
        model_uri: str | None = None,
        background: bool = False,
    ) -> None:
        """All metrics in one call (one store transaction), stamped with one time; linked
        to the logged model at `model_uri` when given (its page in the UI shows them)."""
        now = int(time.time() * 1000)
        model_id = model_uri.removeprefix("models:/") if model_uri else None
        items = [
            Metric(key, float(value), now, step, model_id=model_id)
            for key, value in metrics.items()
        ]
        if background:
            self._later(metrics=items)
            return
        for start in range(0, len(items), MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=items[start : start + MAX_METRICS_PER_BATCH])

    def log_datasets(self, lineage: Iterable[SplitLineage], background: bool = False) -> None:
        """The run's splits as MLflow dataset inputs (the UI's "Datasets used" column), all
        in one request."""
        datasets = [_dataset_input(split) for split in lineage]
        if not datasets:
            return
        if background:
            with self._lock:
                self.pending.append(_background.submit(self._log_inputs, datasets))
        else:
            self._log_inputs(datasets)

    def _log_inputs(self, datasets: list[DatasetInput]) -> None:
        """A store records a dataset once per experiment: it looks the dataset up, then
        inserts it. Two workers logging a new dataset at the same moment both insert, and
        the loser fails on the unique key (seen on a tracking server with PostgreSQL);
        asked again, it finds the winner's dataset and only links it to this run."""
        try:
            self.client.log_inputs(self.run_id, datasets)
        except MlflowException as error:
            if not _DUPLICATE_KEY.search(str(error)):
                raise
            time.sleep(0.05 + random.random() * 0.1)  # let the winner's insert commit
            self.client.log_inputs(self.run_id, datasets)

    def log_pngs(self, pngs: Mapping[str, bytes], artifact_path: str) -> None:
        """Several images in one artifact upload."""
        with tempfile.TemporaryDirectory() as folder:
            for name, content in pngs.items():
                (Path(folder) / name).write_bytes(content)
            if self.artifact_uri:
                upload_folder(_artifact_repository(self.artifact_uri), folder, artifact_path)
            else:
                self.client.log_artifacts(self.run_id, folder, artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)


# A split's schema, as MLflow's tensor datasets describe theirs: raw IDX pixels and labels.
_SPLIT_SCHEMA = json.dumps(
    {
        "mlflow_tensorspec": {
            "features": json.dumps(
                [{"name": "images", "type": "tensor",
                  "tensor-spec": {"dtype": "uint8", "shape": [-1, 28, 28]}}]
            ),
            "targets": json.dumps(
                [{"name": "labels", "type": "tensor",
                  "tensor-spec": {"dtype": "uint8", "shape": [-1]}}]
            ),
        }
    }
)  # fmt: skip


# PostgreSQL's and SQLite's words for an insert that lost a race on a unique key.
_DUPLICATE_KEY = re.compile(r"UniqueViolation|duplicate key|UNIQUE constraint failed", re.I)


def _dataset_input(split: SplitLineage) -> DatasetInput:
    dataset = Dataset(
        name=split.name,
        digest=split.digest,
        source_type="local",  # MLflow's own type for a folder on disk
        source=json.dumps({"uri": split.folder}),
        schema=_SPLIT_SCHEMA,
        profile=json.dumps({"num_rows": split.rows}),
    )
    return DatasetInput(dataset, tags=[InputTag(DATASET_CONTEXT_TAG, split.context)])


@contextmanager
def start_run(
    experiment: str,
    run_name: str | None = None,
    *,
    tags: Mapping[str, Any] | None = None,
    parent_run_id: str | None = None,
    run_id: str | None = None,
    killed_on: tuple[type[BaseException], ...] = (KeyboardInterrupt,),
) -> Iterator[RunLog]:
    """A run that ends FINISHED, KILLED (on `killed_on` exceptions, e.g. a pruned trial or
    Ctrl-C) or FAILED with the error recorded as a tag and an artifact.

    `run_id` resumes a run; under `mlflow run` the launcher's run ($MLFLOW_RUN_ID) is used
    for a top-level run, so the MLproject run and ours are one.
    """
    with timings.phase("run start"):
        log, resumed = _begin_run(experiment, run_name, tags, parent_run_id, run_id)
    try:
        # Inside the try: a run whose tags cannot be set still ends (FAILED), never RUNNING.
        if tags and resumed:
            with timings.phase("run start"):
                log.set_tags(tags)
        yield log
        with timings.phase("run end"):
            log.flush()  # a FINISHED run has all it logged
    except killed_on:
        with timings.phase("run end"):
            _flush_quietly(log)  # a pruned trial keeps its curve up to the last epoch
            mlflow.end_run(RunStatus.to_string(RunStatus.KILLED))
        raise
    except BaseException as error:
        with timings.phase("run end"):
            _flush_quietly(log)
            record_error(log, error)
            mlflow.end_run(RunStatus.to_string(RunStatus.FAILED))
        raise
    else:
        with timings.phase("run end"):
            mlflow.end_run(RunStatus.to_string(RunStatus.FINISHED))


def _begin_run(experiment, run_name, tags, parent_run_id, run_id) -> tuple[RunLog, bool]:
    """The new (or resumed) run, active; True if it was resumed (its tags still to set)."""
    launcher_run = launcher_run_id()
    adopted = run_id is None and parent_run_id is None and launcher_run is not None
    if adopted:
        run_id = launcher_run
    # MLflow would also resume $MLFLOW_RUN_ID for the next run started without an id (a
    # trial): once the launcher's run is taken, it must not be taken again.
    os.environ.pop(LAUNCHER_RUN_ENV, None)
    experiment_id = None
    if parent_run_id is not None:  # a child lives in its parent's experiment
        experiment_id = _experiment_id_of(mlflow.get_tracking_uri(), parent_run_id)
    elif run_id is None:
        experiment_id = ensure_experiment(experiment)
    # A new run gets its tags in the call that creates it: a process killed right after
    # still leaves a run that reconciliation can find by its study and trial tags.
    creation_tags = {k: str(v) for k, v in (tags or {}).items()} if run_id is None else None
    if creation_tags is not None and parent_run_id is not None:
        # The tag `start_run(parent_run_id=)` would set, without the read of the parent
        # it makes first: one request per trial to a tracking server, for a parent the
        # study checked as it started.
        creation_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
    active = mlflow.start_run(
        run_id=run_id,
        experiment_id=experiment_id,
        run_name=run_name if run_id is None else None,
        nested=parent_run_id is not None,
        tags=creation_tags,
    )
    log = RunLog(
        active.info.run_id,
        MlflowClient(),
        active.info.experiment_id,
        artifact_uri=active.info.artifact_uri,
        adopted=adopted,
    )
    return log, creation_tags is None


def _flush_quietly(log: RunLog) -> None:
    with contextlib.suppress(Exception):  # the error that ends the run is the one to show
        log.flush()


@functools.lru_cache(maxsize=64)
def _experiment_id_of(tracking_uri: str, run_id: str) -> str:
    """A run never moves between experiments: one request per study's parent run, not one
    per trial."""
    return MlflowClient(tracking_uri).get_run(run_id).info.experiment_id


def record_error(log: RunLog, error: BaseException) -> None:
    """The error as a tag (short, shown in the UI) and the traceback as error.txt."""
    try:
        log.set_tags({ERROR_TAG: f"{type(error).__name__}: {error}"[:4000]})
        log.log_text("".join(traceback.format_exception(error)), "error.txt")
    except Exception:  # noqa: BLE001 - never hide the original error behind a logging one
        pass


@functools.cache
def git_commit() -> str | None:
    """The commit of the checkout this package runs from (an editable install), or None
    for an installed package; read once per process, not once per run."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "--show-toplevel", "HEAD"],
            cwd=PACKAGE_DIR,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    top, _, commit = result.stdout.strip().partition("\n")
    # A copy installed into site-packages of a venv inside some checkout is not that
    # checkout's code: only the package folder at the checkout's top counts.
    if Path(top).resolve() != PACKAGE_DIR.parent:
        return None
    return commit.strip() or None


def run_url(run_id: str) -> str | None:
    """The run's page in the MLflow UI of a tracking server (password masked), or None
    for a local store."""
    uri = mlflow.get_tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return None
    experiment_id = MlflowClient().get_run(run_id).info.experiment_id
    return f"{redact_url(uri.rstrip('/'))}/#/experiments/{experiment_id}/runs/{run_id}"


def run_log(run_id: str) -> RunLog:
    """Logging into an existing run that is not the active one."""
    return RunLog(run_id, MlflowClient(), adopted=run_id == launcher_run_id())


@functools.cache
def launcher_run_id() -> str | None:
    """The run `mlflow run` started for this process, if any (read once: start_run removes
    the variable so that MLflow does not reuse it)."""
    return os.environ.get(LAUNCHER_RUN_ENV)


def create_run(experiment: str, run_name: str, tags: Mapping[str, Any]) -> str:
    """A new RUNNING run that is not made active (logged to by id, ended by `end_run`)."""
    run = MlflowClient().create_run(
        ensure_experiment(experiment),
        run_name=run_name,
        tags={k: str(v) for k, v in tags.items()},
    )
    return run.info.run_id


def resume_run(run_id: str) -> None:
    """Mark an ended run RUNNING again (a study's parent when a worker joins)."""
    MlflowClient().update_run(run_id, status="RUNNING")


def end_run(run_id: str, status: str) -> None:
    MlflowClient().set_terminated(run_id, status=status)


def run_status(run_id: str) -> str | None:
    """FINISHED, RUNNING, ...; None for a run that does not exist or was deleted."""
    try:
        run = MlflowClient().get_run(run_id)
    except MlflowException:
        return None
    return run.info.status if run.info.lifecycle_stage == "active" else None


_UNQUOTABLE = re.compile(r"['\"\\]")  # characters no filter-string literal can hold


def filter_equals(field: str, value: Any) -> str:
    """A filter-string condition that `field` equals `value`, or a superset of it: the
    caller keeps only exact matches. MLflow's parser takes a quoted value as it stands
    (it strips the quotes and unescapes nothing), so the quote must be one the value does
    not hold, and a backslash may escape the closing quote. A value no literal can hold
    is matched with LIKE, its quotes and backslashes replaced by `_` (any one character)."""
    text = str(value)
    if "\\" not in text:
        for quote in ("'", '"'):
            if quote not in text:
                return f"{field} = {quote}{text}{quote}"
    return f"{field} LIKE '{_UNQUOTABLE.sub('_', text)}'"


def every_page(search: Callable[[str | None], Any]) -> list:
    """All results of an MLflow search, page after page: `search(page_token)` returns one
    page (a PagedList, whose `token` names the next page, or is empty after the last)."""
    results, token = [], None
    while True:
        page = search(token)
        results += page
        token = page.token
        if not token:
            return results


def runs_tagged(experiments: list[str], tags: Mapping[str, Any]) -> list:
    """Every active run in the named experiments carrying all `tags`, oldest first."""
    client = MlflowClient()
    ids = {found.experiment_id for name in experiments if (found := _experiment(client, name))}
    if not ids:
        return []
    wanted = {key: str(value) for key, value in tags.items()}
    query = " and ".join(filter_equals(f"tags.`{key}`", value) for key, value in wanted.items())
    runs = every_page(
        lambda token: client.search_runs(sorted(ids), query, max_results=1000, page_token=token)
    )
    runs = [run for run in runs if all(run.data.tags.get(k) == v for k, v in wanted.items())]
    return sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))


def _experiment(client: MlflowClient, name: str):
    return client.get_experiment_by_name(name)


def experiment_of(run_id: str) -> str | None:
    """The name of the experiment a run lives in."""
    client = MlflowClient()
    try:
        return client.get_experiment(client.get_run(run_id).info.experiment_id).name
    except MlflowException:
        return None


def discard_run(run_id: str) -> None:
    """End a run that is not wanted and delete it (MLflow keeps it, hidden, until gc)."""
    client = MlflowClient()
    client.set_terminated(run_id, status="KILLED")
    client.delete_run(run_id)


def set_run_tags(run_id: str, tags: Mapping[str, Any]) -> None:
    """Tags on any run, running or ended."""
    MlflowClient().log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def end_stale_run(
    run_id: str, status: str = "FAILED", reason: str | None = None, also: tuple[str, ...] = ()
) -> bool:
    """End a run left RUNNING (or in one of the `also` states) by a process that died or
    was overtaken; False if it had already ended otherwise, or does not exist."""
    current = run_status(run_id)
    if current is None or current == status or current not in ("RUNNING", *also):
        return False
    if reason:
        MlflowClient().set_tag(run_id, ERROR_TAG, reason)
    MlflowClient().set_terminated(run_id, status=status)
    return True


# --- the model -------------------------------------------------------------------------


def log_model(
    log: RunLog,
    state_dict: Mapping[str, Any],
    architecture: Mapping[str, Any],
    example_pixels: np.ndarray,
    params: Mapping[str, Any] | None = None,
) -> str:
    """Log the network as an MLflow pyfunc model of the active run (`log`'s): weights as
    safetensors, architecture as JSON, code as code (models-from-code plus this package),
    so nothing is pickled; `params` (the run's config) go onto the model's page. Returns
    the model's URI; registering it is a separate, last step (`registry.register_version`), once
    the run is complete.

    Returns once its files are uploaded; the model is marked READY in the background,
    while the caller sends the run's final metrics, and the run's end waits for it
    (`RunLog.flush`): a run never ends FINISHED with a model that is not READY.

    The steps of `mlflow.pyfunc.log_model`, without the requests it spends on finding
    what the caller knows: it reads the run back for its params and experiment, reads each
    metric's whole history to link the run's step-0 metrics to the model (one request per
    key, none of them at step 0 here), and reads the new model back for its artifact
    location: 8 of a trial's requests to a tracking server. The final metrics are linked
    in the call that logs them (`RunLog.log_metrics(..., model_uri=)`)."""
    from mlflow.entities import LoggedModelOutput
    from mlflow.models import Model

    run = mlflow.active_run()
    if run is None or run.info.run_id != log.run_id:
        raise TrackingError("a model is logged into an active run (tracking.start_run)")
    run_id = run.info.run_id
    client = MlflowClient()
    model = mlflow.initialize_logged_model(
        name=MODEL_NAME_IN_RUN,
        source_run_id=run_id,
        params={key: str(value) for key, value in (params or {}).items()},
        experiment_id=run.info.experiment_id,
    )
    try:
        # The run's link to its model, sent while the model is saved.
        linked = _parallel.submit(
            client.log_outputs, run_id, [LoggedModelOutput(model.model_id, step=0)]
        )
        with tempfile.TemporaryDirectory() as folder, model_folder.imports_undone(folder):
            path = Path(folder) / "model"
            check = model_folder.save(
                path,
                Model(
                    artifact_path=model.artifact_location,
                    model_uuid=model.model_id,
                    run_id=run_id,
                    model_id=model.model_id,
                ),
                state_dict,
                architecture,
                example_pixels,
                Path(folder) / "files",
            )
            uploads = start_uploads(_artifact_repository(model.artifact_location), path)
            try:
                check()  # while the files upload
            finally:
                wait_for_uploads(uploads)
        linked.result()
    except BaseException:
        with contextlib.suppress(Exception):  # the error that stopped the logging comes first
            client.finalize_logged_model(model.model_id, "FAILED")
        raise
    log.wait_for(_parallel.submit(client.finalize_logged_model, model.model_id, "READY"))
    return f"models:/{model.model_id}"


def load_model(model_uri: str):
    """A logged model as a pyfunc model (weights and code, no pickle). This runs the code
    shipped in the model: only for models we trust (`model_files` reads any model safely)."""
    return mlflow.pyfunc.load_model(model_uri)


class ModelArtifacts:
    """The files of one model at any model URI (models:/NAME/3, models:/NAME@alias,
    models:/ID, runs:/ID/model, a path), listed and downloaded one by one, never loaded.
    The URI is resolved once, so an alias that moves meanwhile cannot mix two versions."""

    def __init__(self, model_uri: str) -> None:
        from mlflow.tracking.artifact_utils import get_artifact_repository

        self._repo = get_artifact_repository(model_uri)

    def files(self, folder: str = "") -> dict[str, int | None]:
        """Name -> size in bytes (None where the store does not say) of each file directly
        under `folder`; sub-folders are left out."""
        return {
            posixpath.basename(item.path): item.file_size
            for item in self._repo.list_artifacts(folder)
            if not item.is_dir
        }

    def download(self, path: str, folder: str | Path) -> Path:
        return Path(self._repo.download_artifacts(path, str(folder)))
