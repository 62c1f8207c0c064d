"""Unit tests for mnist_track.registry: who gets `champion`, versions and their removal.
No training: runs are created with MlflowClient and versions point at cheap logged-model
records."""

from __future__ import annotations

import time

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from mnist_track import registry, tracking
from mnist_track.defaults import CHAMPION_ALIAS
from mnist_track.registry import (
    VALIDATION_ACCURACY_TAG,
    VALIDATION_SPLIT_TAG,
    Champion,
    alias_version,
    crown_champion,
    delete_version,
    register_version,
    versions_of,
)

MODEL = "digits"
SPLIT = "split-a"
OTHER_SPLIT = "split-b"


@pytest.fixture
def experiment_id(client):
    return tracking.ensure_experiment("registry-tests")


@pytest.fixture
def version(client, experiment_id):
    """add(accuracy, split, status) -> a new version of MODEL whose run ended in `status`
    (RUNNING: not ended); returns (version, run_id)."""

    def add(accuracy: float | None, split: str = SPLIT, status: str = "FINISHED"):
        run_id = client.create_run(experiment_id).info.run_id
        model = client.create_logged_model(experiment_id, source_run_id=run_id)
        tags = {VALIDATION_SPLIT_TAG: split}
        if accuracy is not None:
            tags[VALIDATION_ACCURACY_TAG] = accuracy
        number = register_version(f"models:/{model.model_id}", MODEL, run_id, tags)
        if status != "RUNNING":
            client.set_terminated(run_id, status=status)
        return number, run_id

    return add


def champion() -> str | None:
    found = alias_version(MODEL)
    return None if found is None else str(found.version)


# --- registering -----------------------------------------------------------------------


def test_register_version_sets_tags_in_the_same_call(client, version):
    first, run_id = version(0.91)
    second, _ = version(0.92, OTHER_SPLIT)
    assert (first, second) == ("1", "2")
    [stored] = versions_of(MODEL, {VALIDATION_SPLIT_TAG: SPLIT})
    assert stored.run_id == run_id
    assert stored.tags == {VALIDATION_SPLIT_TAG: SPLIT, VALIDATION_ACCURACY_TAG: "0.91"}
    assert [str(v.version) for v in versions_of(MODEL, {VALIDATION_ACCURACY_TAG: 0.92})] == ["2"]
    assert len(versions_of(MODEL)) == 2
    assert versions_of("no-such-model") == []


# --- crown_champion --------------------------------------------------------------------


def test_the_most_accurate_finished_version_on_the_split_is_crowned(client, version):
    version(0.90)
    best, _ = version(0.97)
    version(0.95)
    decision = crown_champion(MODEL, SPLIT)
    assert decision == Champion(best)
    assert champion() == best
    assert decision.holds(best) and not decision.holds("1") and not decision.holds(None)


@pytest.mark.parametrize("status", ["FAILED", "RUNNING", "KILLED"])
def test_a_version_whose_run_did_not_finish_is_never_crowned(client, version, status):
    finished, _ = version(0.90)
    unfinished, _ = version(0.99, status=status)
    assert crown_champion(MODEL, SPLIT, candidate=unfinished) == Champion(finished)
    assert champion() == finished


def test_only_unfinished_versions_leave_no_champion(client, version):
    version(0.99, status="FAILED")
    version(0.98, status="RUNNING")
    assert crown_champion(MODEL, SPLIT) == Champion(None)
    assert champion() is None


def test_a_version_on_another_split_is_not_compared(client, version):
    held, _ = version(0.95)
    crown_champion(MODEL, SPLIT)
    other, _ = version(0.99, OTHER_SPLIT)  # better, but scored on other images
    decision = crown_champion(MODEL, OTHER_SPLIT, candidate=other)
    assert decision.version == held
    assert champion() == held
    assert decision.note is not None
    assert f"version {other}" in decision.note
    assert OTHER_SPLIT in decision.note and SPLIT in decision.note
    assert "promote" in decision.note
    # A candidate on the champion's split gets no note.
    same, _ = version(0.80)
    assert crown_champion(MODEL, SPLIT, candidate=same) == Champion(held)


def test_without_a_valid_champion_the_split_argument_is_the_reference(client, version):
    on_a, _ = version(0.90, SPLIT)
    on_b, _ = version(0.99, OTHER_SPLIT)
    decision = crown_champion(MODEL, SPLIT, candidate=on_b)
    assert decision.version == on_a  # 0.99 on another split does not count
    assert "promote" in decision.note

    delete_version(MODEL, on_a)
    assert crown_champion(MODEL, OTHER_SPLIT, candidate=on_b) == Champion(on_b)
    assert champion() == on_b


def test_an_invalid_champion_does_not_fix_the_reference(client, version):
    on_a, run_a = version(0.90, SPLIT)
    crown_champion(MODEL, SPLIT)
    on_b, _ = version(0.80, OTHER_SPLIT)
    client.update_run(run_a, status="FAILED")  # the champion no longer counts
    assert crown_champion(MODEL, OTHER_SPLIT) == Champion(on_b)
    assert champion() == on_b


def test_ties_go_to_the_older_version(client, version):
    version(0.80)
    older, _ = version(0.95)
    version(0.95)
    version(0.95)
    assert crown_champion(MODEL, SPLIT) == Champion(older)
    assert champion() == older


def test_a_tie_does_not_move_the_champion_to_a_newer_version(client, version):
    older, _ = version(0.95)
    crown_champion(MODEL, SPLIT)
    newer, _ = version(0.95)
    assert crown_champion(MODEL, SPLIT, candidate=newer) == Champion(older)


def test_versions_without_accuracy_are_not_compared(client, version):
    version(None)
    scored, _ = version(0.5)
    assert crown_champion(MODEL, SPLIT) == Champion(scored)


def test_a_champion_whose_run_failed_loses_the_alias(client, version):
    version(0.90)
    runner_up, _ = version(0.93)
    best, best_run = version(0.97)
    assert crown_champion(MODEL, SPLIT).version == best
    client.update_run(best_run, status="FAILED")
    assert crown_champion(MODEL, SPLIT) == Champion(runner_up)
    assert champion() == runner_up


def test_the_alias_goes_when_no_version_is_valid_any_more(client, version):
    only, run_id = version(0.97)
    crown_champion(MODEL, SPLIT)
    client.update_run(run_id, status="FAILED")
    assert crown_champion(MODEL, SPLIT) == Champion(None)
    assert champion() is None
    assert CHAMPION_ALIAS not in client.get_registered_model(MODEL).aliases


def test_deleting_the_champion_removes_its_alias_and_it_is_recrowned(client, version):
    runner_up, _ = version(0.93)
    best, _ = version(0.97)
    crown_champion(MODEL, SPLIT)
    assert champion() == best
    delete_version(MODEL, best)
    assert champion() is None
    assert [str(v.version) for v in versions_of(MODEL)] == [runner_up]
    delete_version(MODEL, best)  # already gone: no error
    assert crown_champion(MODEL, SPLIT) == Champion(runner_up)
    assert champion() == runner_up


def lose_the_first_race(monkeypatch, winner: str) -> list[str]:
    """Make the next alias change lose a race, as on a tracking server: another worker
    sets `champion` to `winner` at the same moment, and ours fails on the unique key."""
    real = MlflowClient.set_registered_model_alias
    calls: list[str] = []

    def racing(self, name, alias, version):
        calls.append(str(version))
        if len(calls) == 1:
            real(self, name, alias, winner)
            raise MlflowException(
                "(psycopg2.errors.UniqueViolation) duplicate key value violates unique "
                'constraint "registered_model_alias_pk"',
                error_code="BAD_REQUEST",
            )
        real(self, name, alias, version)

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", racing)
    return calls


def test_a_lost_race_to_set_the_alias_is_decided_again(client, version, monkeypatch):
    worse, _ = version(0.90)
    best, _ = version(0.97)
    calls = lose_the_first_race(monkeypatch, winner=worse)
    assert crown_champion(MODEL, SPLIT, candidate=best) == Champion(best)
    assert champion() == best
    assert calls == [best, best]  # read again after losing, then set again


def test_a_lost_race_to_a_better_version_is_accepted(client, version, monkeypatch):
    best, _ = version(0.97)
    mine, _ = version(0.90)
    # The other worker's version is already the best: nothing to set after re-reading.
    calls = lose_the_first_race(monkeypatch, winner=best)
    assert crown_champion(MODEL, SPLIT, candidate=mine) == Champion(best)
    assert champion() == best
    assert calls == [best]


def test_a_decision_that_moves_nothing_reads_the_registry_once(client, version, monkeypatch):
    best, _ = version(0.97)
    crown_champion(MODEL, SPLIT)
    worse, _ = version(0.90)
    reads = []
    real = registry.versions_of
    monkeypatch.setattr(registry, "versions_of", lambda *a: reads.append(a) or real(*a))
    assert crown_champion(MODEL, SPLIT, candidate=worse) == Champion(best)
    assert len(reads) == 1
    better, _ = version(0.99)  # this one moves the alias: read again to confirm
    assert crown_champion(MODEL, SPLIT, candidate=better) == Champion(better)
    assert len(reads) == 3


def test_crowning_is_idempotent(client, version):
    version(0.90)
    best, _ = version(0.97)
    first = crown_champion(MODEL, SPLIT)
    assert crown_champion(MODEL, SPLIT) == first == Champion(best)
    assert len(versions_of(MODEL)) == 2


# --- the store and the registered model ------------------------------------------------


def test_the_module_talks_to_the_store_of_the_fixture(client, tracking_uri):
    # Guard for the fixtures above: the copied template is the store in use.
    assert registry.mlflow.get_tracking_uri() == tracking_uri
    assert client.search_experiments(filter_string="name = 'Default'")


def test_a_registered_model_deleted_meanwhile_is_created_again(client, version):
    first, _ = version(0.9)
    client.delete_registered_model(MODEL)  # e.g. by someone in the UI
    again, _ = version(0.8)
    assert again == "1"
    assert [str(v.version) for v in versions_of(MODEL)] == ["1"]
    assert first == "1"


# --- a worker's decision for its own new version ---------------------------------------


def counting_version_reads(monkeypatch) -> list:
    reads: list = []
    real = registry.versions_of
    monkeypatch.setattr(registry, "versions_of", lambda *a: reads.append(a) or real(*a))
    return reads


def test_a_version_no_better_than_the_champion_is_decided_without_reading_versions(
    client, version, monkeypatch
):
    held, _ = version(0.95)
    crown_champion(MODEL, SPLIT)
    reads = counting_version_reads(monkeypatch)
    for accuracy in (0.90, 0.95):  # worse, and a tie (the older version keeps it)
        newer, _ = version(accuracy)
        decision = crown_champion(MODEL, SPLIT, candidate=newer, candidate_accuracy=accuracy)
        assert decision == Champion(held)
    assert reads == []
    assert champion() == held


def test_a_version_on_another_split_is_not_compared_without_reading_versions(
    client, version, monkeypatch
):
    held, _ = version(0.95)
    crown_champion(MODEL, SPLIT)
    reads = counting_version_reads(monkeypatch)
    other, _ = version(0.99, OTHER_SPLIT)
    decision = crown_champion(MODEL, OTHER_SPLIT, candidate=other, candidate_accuracy=0.99)
    assert decision.version == held and reads == []
    assert f"version {other}" in decision.note and "promote" in decision.note


def test_a_better_version_is_decided_in_full(client, version, monkeypatch):
    """Beating the champion, it reads every version: one registered meanwhile by a
    worker that has not decided yet may be better still."""
    version(0.90)
    crown_champion(MODEL, SPLIT)
    undecided, _ = version(0.99)  # its worker's decision still to come
    mine, _ = version(0.97)
    reads = counting_version_reads(monkeypatch)
    alias_reads = []
    real_alias = registry.alias_version
    monkeypatch.setattr(
        registry, "alias_version", lambda *a: alias_reads.append(a) or real_alias(*a)
    )
    assert crown_champion(MODEL, SPLIT, candidate=mine, candidate_accuracy=0.97) == Champion(
        undecided
    )
    assert reads and champion() == undecided
    assert len(alias_reads) == 2  # once before deciding, once to confirm what it set


def test_an_invalid_champion_is_decided_in_full_even_for_a_worse_version(client, version):
    runner_up, _ = version(0.93)
    best, best_run = version(0.97)
    crown_champion(MODEL, SPLIT)
    client.update_run(best_run, status="FAILED")  # its trial was taken over
    worse, _ = version(0.80)
    decision = crown_champion(MODEL, SPLIT, candidate=worse, candidate_accuracy=0.80)
    assert decision == Champion(runner_up)
    assert champion() == runner_up


def timed_reads(monkeypatch) -> list[tuple[str, str, float]]:
    """(what, event, time) of every alias read and run-status read from now on."""
    events: list[tuple[str, str, float]] = []

    def timed(what, real):
        def read(*args):
            events.append((what, "start", time.perf_counter()))
            time.sleep(0.05)  # a tracking server's round trip, so overlap shows
            try:
                return real(*args)
            finally:
                events.append((what, "end", time.perf_counter()))

        return read

    monkeypatch.setattr(registry, "alias_version", timed("alias", registry.alias_version))
    monkeypatch.setattr(registry, "run_status", timed("run", registry.run_status))
    return events


def test_the_champions_run_is_read_while_the_alias_is(client, version, monkeypatch):
    """A worker that saw the champion before reads its run's status at the same time as
    the alias (one round trip, not two, while the champion stays)."""
    held, _ = version(0.95)
    crown_champion(MODEL, SPLIT)
    first, _ = version(0.90)
    crown_champion(MODEL, SPLIT, candidate=first, candidate_accuracy=0.90)  # sees the champion
    events = timed_reads(monkeypatch)
    second, _ = version(0.91)
    assert crown_champion(MODEL, SPLIT, candidate=second, candidate_accuracy=0.91) == Champion(held)
    times = {(what, event): t for what, event, t in events}
    assert sorted(what for what, event, _ in events if event == "start") == ["alias", "run"]
    # Overlapped, not one after the other.
    assert times["run", "start"] < times["alias", "end"]
    assert times["alias", "start"] < times["run", "end"]


def test_a_champion_that_moved_has_its_own_run_read(client, version, monkeypatch):
    version(0.95)
    crown_champion(MODEL, SPLIT)
    seen, _ = version(0.90)
    crown_champion(MODEL, SPLIT, candidate=seen, candidate_accuracy=0.90)
    moved, _ = version(0.99)
    crown_champion(MODEL, SPLIT)  # another worker crowns it; this one guesses the old run
    events = timed_reads(monkeypatch)
    worse, _ = version(0.92)
    assert crown_champion(MODEL, SPLIT, candidate=worse, candidate_accuracy=0.92) == Champion(moved)
    # The guessed run's status is not the champion's: its own run is read after the alias.
    starts = sorted(what for what, event, _ in events if event == "start")
    assert starts == ["alias", "run", "run"]
    last_run_start = max(t for what, event, t in events if (what, event) == ("run", "start"))
    alias_end = next(t for what, event, t in events if (what, event) == ("alias", "end"))
    assert last_run_start > alias_end


def test_a_champion_whose_run_failed_since_it_was_seen_is_replaced(client, version):
    runner_up, _ = version(0.93)
    best, best_run = version(0.97)
    crown_champion(MODEL, SPLIT)
    seen, _ = version(0.90)
    crown_champion(MODEL, SPLIT, candidate=seen, candidate_accuracy=0.90)  # guesses best_run
    client.update_run(best_run, status="FAILED")
    worse, _ = version(0.80)
    assert crown_champion(MODEL, SPLIT, candidate=worse, candidate_accuracy=0.80) == Champion(
        runner_up
    )
    assert champion() == runner_up
