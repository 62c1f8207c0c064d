"""The phase timer that train_and_track and run_study carry: inert unless collected,
exclusive for nested phases, and it keeps a record of how a run ended."""

from __future__ import annotations

import time

import pytest

from mnist_track import timings


def test_phases_are_inert_without_a_collector():
    with timings.record("run"), timings.phase("fit"):
        pass  # nothing to assert on but that nothing is kept anywhere
    with timings.collect() as records:
        pass
    assert records == []


def test_nested_phases_are_charged_to_the_innermost_only():
    with timings.collect() as records, timings.record("run"):
        with timings.phase("fit"):
            time.sleep(0.02)
            with timings.phase("optuna report"):
                time.sleep(0.3)
            time.sleep(0.02)
        time.sleep(0.01)  # in no phase
    (entry,) = records
    assert entry.kind == "run" and entry.outcome == "finished"
    assert entry.phases["optuna report"] >= 0.3
    # Charged to both, fit would hold at least 0.34 s: the margin absorbs a loaded
    # machine's late wake-ups, which a tight upper bound on a sleep would not.
    assert 0.04 <= entry.phases["fit"] < 0.3
    assert sum(entry.phases.values()) <= entry.seconds
    assert entry.unphased >= 0.01


def test_a_record_keeps_how_its_block_ended_and_each_run_has_its_own():
    class Pruned(Exception):
        pass

    with timings.collect() as records:
        with pytest.raises(Pruned), timings.record("run"), timings.phase("fit"):
            raise Pruned
        with timings.record("run"), timings.phase("fit"):
            pass
    assert [r.outcome for r in records] == ["Pruned", "finished"]
    assert all(set(r.phases) == {"fit"} for r in records)


def test_a_decorated_function_gets_one_record_per_call():
    @timings.record("run")
    def work():
        with timings.phase("fit"):
            pass

    with timings.collect() as records:
        work()
        work()
    assert len(records) == 2
