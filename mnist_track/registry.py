"""The Model Registry: a version per finished run, and the rule behind the alias
`champion` (the best validation accuracy among versions whose run FINISHED, validated on
the same split), which any worker can recompute, so racing workers converge."""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from mnist_track import descriptions
from mnist_track.defaults import CHAMPION_ALIAS
from mnist_track.tracking import TrackingError, every_page, filter_equals, run_status

VALIDATION_ACCURACY_TAG = "validation_accuracy"
# Versions are comparable only when scored on the same validation images: a version
# validated on 1 image must not hold `champion` over one validated on 5,000.
VALIDATION_SPLIT_TAG = "validation_split"
CHAMPION_ATTEMPTS = 5  # re-decisions when other workers keep registering meanwhile

# A decision reads the versions while it reads the champion and its run.
_reads = ThreadPoolExecutor(max_workers=2, thread_name_prefix="registry-reads")


def register_version(
    model_uri: str, name: str, run_id: str, tags: Mapping[str, Any], description: str = ""
) -> str:
    """A new version of `name` for a logged model (`models:/<model id>`), its tags and
    description set in the same call so no reader ever sees a version without its
    validation accuracy and split. (Not `mlflow.register_model`, which prints to stderr
    on every call.)"""
    client = MlflowClient()
    if (mlflow.get_registry_uri(), name) not in _REGISTERED_MODELS:
        _ensure_registered_model(client, name)
    try:
        version = _create_version(client, name, model_uri, run_id, tags, description)
    except MlflowException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        _ensure_registered_model(client, name)  # deleted since this process saw it
        version = _create_version(client, name, model_uri, run_id, tags, description)
    return str(version.version)


# (registry URI, name) of registered models this process knows exist: one round trip
# less per trial against a tracking server.
_REGISTERED_MODELS: set[tuple[str, str]] = set()


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    try:
        client.create_registered_model(name, description=descriptions.registered_model(name))
    except MlflowException as error:
        if error.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
        # Made before descriptions were written, or by hand: described once, never
        # overwritten (a team may have written its own).
        if not client.get_registered_model(name).description:
            client.update_registered_model(name, descriptions.registered_model(name))
    _REGISTERED_MODELS.add((mlflow.get_registry_uri(), name))


def _create_version(client, name: str, model_uri: str, run_id: str, tags, description: str):
    return client.create_model_version(
        name,
        source=model_uri,
        run_id=run_id,
        description=description or None,
        tags={k: str(v) for k, v in tags.items()},
        await_creation_for=0,
        model_id=model_uri.removeprefix("models:/"),
    )


def delete_version(name: str, version: str) -> None:
    """Remove a version that must not exist (its run did not finish); an alias on it
    goes with it."""
    with contextlib.suppress(MlflowException):  # already deleted by another worker
        MlflowClient().delete_model_version(name, version)


def versions_of(name: str, tags: Mapping[str, Any] | None = None) -> list:
    """Every version of a registered model (optionally only those with all `tags`)."""
    query = filter_equals("name", name)
    client = MlflowClient()
    versions = every_page(
        lambda token: client.search_model_versions(query, max_results=1000, page_token=token)
    )
    wanted = {k: str(v) for k, v in (tags or {}).items()}
    return [
        v for v in versions if v.name == name and all(v.tags.get(k) == x for k, x in wanted.items())
    ]


def alias_version(name: str, alias: str = CHAMPION_ALIAS):
    """The ModelVersion carrying `alias`, or None."""
    try:
        return MlflowClient().get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def set_alias(name: str, version: str, alias: str = CHAMPION_ALIAS) -> None:
    client = MlflowClient()
    try:
        client.get_model_version(name, version)
    except MlflowException:
        raise TrackingError(f"registered model {name!r} has no version {version}") from None
    client.set_registered_model_alias(name, alias, version)


@dataclass(frozen=True)
class Champion:
    """Where `champion` points after a decision, and why a version was left out."""

    version: str | None
    note: str | None = None  # e.g. why the caller's version was not compared

    def holds(self, version: str | None) -> bool:
        return version is not None and self.version == version


def crown_champion(
    name: str,
    split: str,
    candidate: str | None = None,
    candidate_accuracy: float | None = None,
) -> Champion:
    """Point `champion` at the best version: highest validation accuracy among versions
    whose run FINISHED and that were validated on the same split as the champion (or as
    `split`, when there is no valid champion). Ties go to the older version.

    Any worker can recompute this, so racing workers converge: each that moves the alias
    re-reads and decides again until what it reads agrees with what it wrote.

    A worker deciding for its new version `candidate`, validated on `split` with
    `candidate_accuracy`, first reads only the champion: most versions cannot move it
    (`_champion_stays`), and then the versions need not be read at all (one request less
    per trial to a tracking server, and that one grows with the versions)."""
    finished: dict[str, bool] = {}  # run id -> FINISHED, cached across passes

    def valid(version) -> bool:
        if version.run_id not in finished:
            finished[version.run_id] = run_status(version.run_id) == "FINISHED"
        return finished[version.run_id]

    read_first = candidate is not None and candidate_accuracy is not None
    if read_first:
        current = _read_champion(name, finished)
        stays = _champion_stays(current, split, candidate, candidate_accuracy, valid)
        if stays is not None:
            return stays
    decision = Champion(None)
    for attempt in range(CHAMPION_ATTEMPTS):
        # The versions are read while the champion and its run are (on the first pass,
        # the champion just read for `_champion_stays`).
        versions_read = _reads.submit(versions_of, name)
        if attempt > 0 or not read_first:
            current = alias_version(name)
        current_valid = current is not None and valid(current)
        versions = versions_read.result()
        reference = split
        if current_valid:
            reference = current.tags.get(VALIDATION_SPLIT_TAG, "")
        comparable = sorted(
            (
                v
                for v in versions
                if v.tags.get(VALIDATION_SPLIT_TAG) == reference
                and VALIDATION_ACCURACY_TAG in v.tags
            ),
            key=lambda v: (-float(v.tags[VALIDATION_ACCURACY_TAG]), int(v.version)),
        )
        best = next((v for v in comparable if valid(v)), None)
        mine = next((v for v in versions if str(v.version) == str(candidate)), None)
        mine_split = None if mine is None else mine.tags.get(VALIDATION_SPLIT_TAG, "")
        note = _why_not_compared(candidate, mine_split, reference)
        if best is None:
            invalid = current is not None and not valid(current)
            if invalid and not _lost_race(MlflowClient().delete_registered_model_alias, name):
                continue
            return Champion(None, note)
        decision = Champion(str(best.version), note)
        if current is not None and str(current.version) == str(best.version):
            # Nothing written, so nothing another worker wrote was overwritten: no need to
            # read again (most trials do not beat the champion).
            return decision
        if not _lost_race(MlflowClient().set_registered_model_alias, name, best.version):
            continue
        versions_read = _reads.submit(versions_of, name)
        settled = alias_version(name)
        if (
            settled is not None
            and str(settled.version) == str(best.version)
            and len(versions_read.result()) == len(versions)
        ):
            return decision
    return decision


# (registry URI, registered model) -> the run of the last champion this process read:
# its status is read while the alias is, one round trip less per decision while the
# champion stays.
_CHAMPION_RUNS: dict[tuple[str, str], str] = {}


def _read_champion(name: str, finished: dict[str, bool]):
    """The version carrying `champion` (or None); the status of the run this process
    last saw behind it is read at the same time, into `finished`, and used if the
    champion is still that run's. Both reads start after the caller's version is
    registered, as sequential reads would."""
    key = (mlflow.get_registry_uri(), name)
    guess = _CHAMPION_RUNS.get(key)
    status_read = _reads.submit(run_status, guess) if guess else None
    current = alias_version(name)
    if current is None:
        _CHAMPION_RUNS.pop(key, None)
        return None
    _CHAMPION_RUNS[key] = current.run_id
    if status_read is not None and current.run_id == guess:
        finished[guess] = status_read.result() == "FINISHED"
    return current


def _lost_race(change_alias: Callable[..., None], name: str, *version: str) -> bool:
    """Set or delete `champion`; False when another worker changed it at the same moment.
    A tracking server's registry reads, then inserts: two workers crowning the first
    champion together both insert, and the loser's request fails on the unique key. The
    caller then reads again and decides again, like any other lost race."""
    try:
        change_alias(name, CHAMPION_ALIAS, *version)
    except MlflowException:
        if alias_version(name) is None and not version:
            return True  # deleting an alias another worker deleted first
        time.sleep(0.05 + random.random() * 0.2)  # let the winner's write land first
        return False
    return True


def _champion_stays(current, split, candidate, accuracy, valid) -> Champion | None:
    """The decision for a new version that cannot move `champion` (now `current`, the
    version carrying it, or None); None when it may.
    It cannot when the champion is valid and was validated on another split (the new
    version is not compared) or is at least as accurate (ties go to the older version).
    Comparing the new version alone is enough: the champion was the best when it was
    crowned, a better version registered since is crowned by its own worker's decision,
    and a version that stops being valid is removed and the champion decided in full."""
    if current is None or str(current.version) == str(candidate) or not valid(current):
        return None
    reference = current.tags.get(VALIDATION_SPLIT_TAG, "")
    if reference != split:
        return Champion(str(current.version), _why_not_compared(candidate, split, reference))
    held = current.tags.get(VALIDATION_ACCURACY_TAG)
    if held is not None and float(held) >= accuracy:
        return Champion(str(current.version))
    return None


def _why_not_compared(candidate: str | None, split: str | None, reference: str) -> str | None:
    """Why version `candidate`, validated on `split`, was not compared with the champion
    (validated on `reference`); None when it was."""
    if candidate is None or split is None or split == reference:
        return None
    return (
        f"version {candidate} was not compared with the champion: it was validated on "
        f"another split ({split or 'unknown'} vs {reference}); "
        "use `mnist-track promote` to crown it by hand"
    )
