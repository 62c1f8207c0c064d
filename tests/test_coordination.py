"""Unit tests for mnist_track.coordination: the study lock across processes, its key, and
worker leases on a real Optuna RDB storage (SQLite in tmp_path)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import optuna
import pytest
import sqlalchemy

from mnist_track.coordination import (
    LEASE_PREFIX,
    LockTimeout,
    WorkerLease,
    _lock_key,
    creating_store,
    study_lock,
)

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")

# --- the study lock --------------------------------------------------------------------

HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import sqlalchemy
    from mnist_track.coordination import study_lock

    url, hold = sys.argv[1], float(sys.argv[4])
    ready, leaving = Path(sys.argv[2]), Path(sys.argv[3])
    engine = sqlalchemy.create_engine(url)
    with study_lock(engine, "s", timeout=30):
        ready.write_text("locked")
        time.sleep(hold)
        leaving.write_text("leaving")
    """
)


def _start_holder(url: str, folder: Path, hold: float) -> tuple[subprocess.Popen, Path, Path]:
    ready, leaving = folder / "ready", folder / "leaving"
    child = subprocess.Popen(
        [sys.executable, "-c", HOLDER, url, str(ready), str(leaving), str(hold)],
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    while not ready.exists():
        if child.poll() is not None:
            raise AssertionError(f"the lock holder exited early: {child.stderr.read()}")
        if time.monotonic() > deadline:
            child.kill()
            raise AssertionError("the lock holder never took the lock")
        time.sleep(0.01)
    return child, ready, leaving


@pytest.fixture
def sqlite_engine(tmp_path):
    engine = sqlalchemy.create_engine(f"sqlite:///{tmp_path}/optuna.db")
    yield engine
    engine.dispose()


def test_study_lock_excludes_another_process(tmp_path, sqlite_engine):
    url = str(sqlite_engine.url)
    child, _, leaving = _start_holder(url, tmp_path, hold=1.5)
    try:
        seen_locked = time.monotonic()
        # A tiny timeout gives up, naming the database.
        with pytest.raises(LockTimeout) as caught, study_lock(sqlite_engine, "s", timeout=0.2):
            pytest.fail("the lock was taken while another process held it")
        assert str(tmp_path / "optuna.db") in str(caught.value)
        assert not leaving.exists()
        # A patient one waits until the holder lets go, and only then gets in.
        with study_lock(sqlite_engine, "s", timeout=30):
            waited = time.monotonic() - seen_locked
            assert leaving.exists(), "got the lock while the holder was still inside"
        assert waited >= 1.0
    finally:
        child.kill()
        child.wait(timeout=10)


def test_study_lock_dies_with_a_killed_holder(tmp_path, sqlite_engine):
    child, _, leaving = _start_holder(str(sqlite_engine.url), tmp_path, hold=60)
    try:
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=10) == -signal.SIGKILL
        started = time.monotonic()
        with study_lock(sqlite_engine, "s", timeout=5):
            assert time.monotonic() - started < 2
        assert not leaving.exists()  # the holder never finished: the kernel let go
    finally:
        child.kill()
        child.wait(timeout=10)


def test_study_lock_is_free_again_after_the_block(sqlite_engine):
    with study_lock(sqlite_engine, "s", timeout=1):
        pass
    started = time.monotonic()
    with study_lock(sqlite_engine, "s", timeout=1):
        assert time.monotonic() - started < 0.5


def test_study_lock_on_an_in_memory_database_does_not_block():
    engine = sqlalchemy.create_engine("sqlite://")
    with study_lock(engine, "s", timeout=0.1), study_lock(engine, "s", timeout=0.1):
        pass  # one process only: nothing to share, so nesting cannot deadlock


# --- the lock key ----------------------------------------------------------------------


def test_lock_key_is_the_documented_digest():
    digest = hashlib.sha256(b"mnist-track/my-study").digest()
    expected = int.from_bytes(digest[:8], "big", signed=True)
    assert _lock_key("my-study") == expected
    assert _lock_key("my-study") == _lock_key("my-study")


def test_lock_key_is_stable_across_processes():
    code = "from mnist_track.coordination import _lock_key; print(_lock_key('my-study'))"
    keys = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        ).stdout.strip()
        for seed in ("1", "2")
    }
    assert keys == {str(_lock_key("my-study"))}


def test_lock_key_is_signed_64_bit_and_differs_by_study():
    names = [f"study-{i}" for i in range(64)]
    keys = [_lock_key(name) for name in names]
    assert all(isinstance(key, int) and -(2**63) <= key < 2**63 for key in keys)
    assert len(set(keys)) == len(names)
    # Signed: about half the keys are negative (pg_advisory_lock takes a signed bigint).
    assert any(key < 0 for key in keys) and any(key > 0 for key in keys)


# --- worker leases ---------------------------------------------------------------------


@pytest.fixture
def storage(tmp_path):
    storage = optuna.storages.RDBStorage(
        f"sqlite:///{tmp_path}/optuna.db", heartbeat_interval=1, grace_period=1
    )
    yield storage
    storage.engine.dispose()


@pytest.fixture
def study(storage):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(storage=storage, study_name="team", direction="maximize")


@pytest.fixture
def study_id(storage, study):
    return storage.get_study_id_from_name("team")


@pytest.fixture
def leases():
    """Leases started by a test, released at its end so no thread outlives it."""
    started: list[WorkerLease] = []

    def start(storage, study_id, interval=1.0, grace=2.0) -> WorkerLease:
        lease = WorkerLease(storage, study_id, interval, grace).start()
        started.append(lease)
        time.sleep(0.01)  # distinct start times
        return lease

    yield start
    for lease in started:
        lease._stop.set()
        lease._thread.join(timeout=5)


def test_two_leases_see_each_other(storage, study_id, leases):
    first = leases(storage, study_id)
    second = leases(storage, study_id)
    [seen_by_first] = first.others_active()
    [seen_by_second] = second.others_active()
    assert seen_by_first["started"] == second._started
    assert seen_by_second["started"] == first._started
    assert seen_by_first["pid"] == os.getpid() and seen_by_first["state"] == "active"
    stored = storage.get_study_system_attrs(study_id)
    assert {first.key, second.key} <= set(stored)
    assert first.key.startswith(LEASE_PREFIX) and first.key != second.key


def test_a_released_lease_is_not_active(storage, study_id, leases):
    first = leases(storage, study_id)
    second = leases(storage, study_id)
    first.release("left")
    assert second.others_active() == []
    assert storage.get_study_system_attrs(study_id)[first.key]["state"] == "left"
    assert not first._thread.is_alive()
    assert [lease["started"] for lease in first.others_active()] == [second._started]


def test_a_lease_not_renewed_within_the_grace_is_gone(storage, study_id, leases):
    mine = leases(storage, study_id, interval=1.0, grace=2.0)
    now = time.time()
    for key, renewed in (("stale", now - 2.5), ("fresh", now - 1.0)):
        storage.set_study_system_attr(
            study_id,
            LEASE_PREFIX + key,
            {"host": "h", "pid": 1, "started": now - 60, "renewed": renewed, "state": "active"},
        )
    assert [lease["renewed"] for lease in mine.others_active()] == [now - 1.0]


def test_a_lease_stays_active_while_renewed_and_goes_when_renewal_stops(storage, study_id, leases):
    watcher = leases(storage, study_id, interval=0.05, grace=0.4)
    worker = leases(storage, study_id, interval=0.05, grace=0.4)
    time.sleep(0.8)  # twice the grace: only renewal keeps it active
    assert len(watcher.others_active()) == 1
    # The worker stops renewing without saying goodbye (killed, paused).
    worker._stop.set()
    worker._thread.join(timeout=5)
    assert storage.get_study_system_attrs(study_id)[worker.key]["state"] == "active"
    time.sleep(0.5)
    assert watcher.others_active() == []


def test_ordinal_counts_the_workers_that_joined_before(storage, study_id, leases):
    first = leases(storage, study_id)
    second = leases(storage, study_id)
    assert (first.ordinal(), second.ordinal()) == (0, 1)
    first.release("left")  # joined before, even if gone now: the ordinal does not shift
    third = leases(storage, study_id)
    assert (second.ordinal(), third.ordinal()) == (1, 2)


def _ask(study: optuna.Study) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna's "heartbeat is meant for optimize" warning
        return study.ask()._trial_id


def test_the_lease_thread_beats_the_running_trial(storage, study, study_id, leases, monkeypatch):
    beats: list[int] = []
    record = storage.record_heartbeat
    monkeypatch.setattr(storage, "record_heartbeat", lambda tid: (beats.append(tid), record(tid)))
    trial_id = _ask(study)
    slow = leases(storage, study_id, interval=60, grace=120)  # its thread will not beat
    slow.running(trial_id)
    assert beats == [trial_id]  # at once, not only on the next renewal
    slow.running(None)
    beats.clear()

    lease = leases(storage, study_id, interval=0.05, grace=1.0)
    time.sleep(0.1)
    assert beats == []  # no trial yet: nothing to beat
    lease.running(trial_id)
    time.sleep(0.3)
    assert len(beats) >= 3 and set(beats) == {trial_id}
    lease.running(None)
    time.sleep(0.1)  # a renewal in flight may still finish
    count = len(beats)
    time.sleep(0.2)
    assert len(beats) == count


def test_a_trial_goes_stale_only_after_its_lease_stops(storage, study, study_id, leases):
    # Optuna's grace is 1 s (SQLite timestamps have 1 s resolution); the lease beats
    # every 0.2 s.
    lease = leases(storage, study_id, interval=0.2, grace=2.0)
    trial_id = _ask(study)
    assert storage._get_stale_trial_ids(study_id) == []  # no heartbeat, never stale
    lease.running(trial_id)
    time.sleep(2.1)  # beyond the grace: only the lease's beats keep the trial fresh
    assert storage._get_stale_trial_ids(study_id) == []
    optuna.storages.fail_stale_trials(study)
    assert storage.get_trial(trial_id).state == optuna.trial.TrialState.RUNNING

    lease.release("failed")
    stopped = time.monotonic()
    assert storage._get_stale_trial_ids(study_id) == []
    while storage._get_stale_trial_ids(study_id) != [trial_id]:
        assert time.monotonic() - stopped < 5, "the trial never went stale"
        time.sleep(0.1)
    # Not before the grace period (1 s after the last beat, at most 0.2 s before release).
    assert time.monotonic() - stopped > 0.75
    optuna.storages.fail_stale_trials(study)
    assert storage.get_trial(trial_id).state == optuna.trial.TrialState.FAIL


# --- creating a store ------------------------------------------------------------------

OPENER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from mnist_track import tracking
    from mnist_track.tune import open_storage

    go = Path(sys.argv[1])
    while not go.exists():
        time.sleep(0.005)
    tracking.use_tracking_uri(sys.argv[2])
    open_storage(sys.argv[3], heartbeat_interval=1, grace_period=3)
    """
)


@pytest.mark.e2e  # worker processes importing MLflow and Optuna
def test_workers_starting_together_on_fresh_sqlite_stores_all_get_in(tmp_path):
    # MLflow migrates a new mlflow.db in ~1 s; unguarded, a second process starting then
    # fails with "table _alembic_tmp_experiments already exists".
    go = tmp_path / "go"
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage_url = f"sqlite:///{tmp_path / 'optuna.db'}"
    children = [
        subprocess.Popen(
            [sys.executable, "-c", OPENER, str(go), tracking_uri, storage_url],
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    time.sleep(3)  # let all three import MLflow, then start them at once
    go.touch()
    errors = [child.communicate(timeout=120)[1] for child in children]
    assert [child.returncode for child in children] == [0, 0, 0], errors


def test_creating_a_sqlite_store_waits_for_the_lock_beside_it(tmp_path, sqlite_engine):
    child, _, _ = _start_holder(str(sqlite_engine.url), tmp_path, hold=60)
    try:
        with pytest.raises(LockTimeout), creating_store(str(sqlite_engine.url), timeout=0.2):
            pytest.fail("opened while another process held the lock")
    finally:
        child.kill()
        child.wait(timeout=10)


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:5000", "postgresql://u@h/db", "sqlite://", "databricks"]
)
def test_creating_another_store_takes_no_lock(url, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with creating_store(url, timeout=0.1):
        pass
    assert list(tmp_path.iterdir()) == []


def _journal_mode(path: Path) -> str:
    import sqlite3

    with contextlib.closing(sqlite3.connect(path)) as db:
        return db.execute("PRAGMA journal_mode").fetchone()[0]


def test_a_new_sqlite_database_is_created_with_a_write_ahead_log(tmp_path):
    with creating_store(f"sqlite:///{tmp_path / 'new.db'}"):
        pass
    assert _journal_mode(tmp_path / "new.db") == "wal"


def test_an_existing_tracking_store_switches_to_a_write_ahead_log(migrated_store, tmp_path):
    from mnist_track import tracking

    assert _journal_mode(tmp_path / "mlflow.db") == "delete"
    tracking.use_tracking_uri(migrated_store)
    assert _journal_mode(tmp_path / "mlflow.db") == "wal"


def test_an_existing_sqlite_storage_switches_to_a_write_ahead_log_and_keeps_its_trials(
    tmp_path,
):
    from mnist_track.tune import open_storage

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="kept", storage=url)
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=2)
    study._storage.remove_session()  # noqa: SLF001 - Optuna keeps the connection open
    assert _journal_mode(tmp_path / "optuna.db") == "delete"

    storage = open_storage(url, heartbeat_interval=1, grace_period=3)
    assert _journal_mode(tmp_path / "optuna.db") == "wal"
    assert len(optuna.load_study(study_name="kept", storage=storage).trials) == 2


def test_a_file_that_is_no_database_is_reported_and_left_as_it_was(tmp_path):
    from mnist_track import tracking
    from mnist_track.tracking import TrackingError

    path = tmp_path / "mlflow.db"
    path.write_bytes(b"my notes, not a database\n" * 100)
    with pytest.raises(TrackingError, match="file is not a database"):
        tracking.use_tracking_uri(f"sqlite:///{path}")
    assert path.read_bytes() == b"my notes, not a database\n" * 100
