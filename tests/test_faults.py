"""Unit tests for mnist_track.faults: inert by default, a real SIGKILL when asked."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from mnist_track import faults
from mnist_track.faults import KILL_AT_ENV, POINTS, fault_point


@pytest.fixture(autouse=True)
def fresh_counts(monkeypatch):
    """Each test starts with no point passed (the counter is per process)."""
    monkeypatch.setattr(faults, "_passed", faults.Counter())


@pytest.mark.parametrize("value", [None, "", "   "])
def test_fault_point_is_inert_without_a_target(monkeypatch, value):
    if value is None:
        monkeypatch.delenv(KILL_AT_ENV, raising=False)
    else:
        monkeypatch.setenv(KILL_AT_ENV, value)
    for _ in range(3):
        for name in POINTS:
            fault_point(name)  # still alive
    assert not faults._passed  # nothing is even counted when inert


def test_fault_point_elsewhere_only_counts(monkeypatch):
    # The target is a later occurrence of another point: passing the others is harmless.
    monkeypatch.setenv(KILL_AT_ENV, "before_tell@99")
    for name in POINTS:
        fault_point(name)
    assert faults._passed == {name: 1 for name in POINTS}


@pytest.mark.parametrize("value", ["no_such_point", "mid_trainin@2", "@1"])
def test_an_unknown_point_names_the_variable(monkeypatch, value):
    monkeypatch.setenv(KILL_AT_ENV, value)
    with pytest.raises(ValueError) as caught:
        fault_point("mid_training")
    message = str(caught.value)
    assert KILL_AT_ENV in message
    assert repr(value.partition("@")[0]) in message
    assert "mid_training" in message  # the valid points are listed


def test_the_points_are_unique_and_known():
    assert len(set(POINTS)) == len(POINTS)
    assert {"mid_training", "after_registration", "before_tell"} <= set(POINTS)


def _run_killed_child(kill_at: str) -> subprocess.CompletedProcess:
    code = textwrap.dedent(
        """
        from mnist_track.faults import fault_point
        fault_point("mid_training")
        print("after-1", flush=True)
        fault_point("mid_training")
        print("after-2", flush=True)
        fault_point("mid_training")
        print("after-3", flush=True)
        """
    )
    env = dict(os.environ)
    env[KILL_AT_ENV] = kill_at
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
    )


def test_a_real_kill_at_the_second_occurrence():
    result = _run_killed_child("mid_training@2")
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert result.stdout.split() == ["after-1"]


def test_a_point_without_occurrence_kills_the_first_time():
    result = _run_killed_child("mid_training")
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert result.stdout.split() == []


def test_a_child_without_a_target_runs_to_the_end():
    result = _run_killed_child("")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["after-1", "after-2", "after-3"]


def test_a_pause_at_the_second_occurrence_stops_there_until_resumed():
    code = "\n".join(
        ["from mnist_track.faults import fault_point"]
        + [f"fault_point('mid_training'); print('after-{i}', flush=True)" for i in (1, 2, 3)]
    )
    env = dict(os.environ) | {KILL_AT_ENV: "mid_training@2:stop"}
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        _, status = os.waitpid(child.pid, os.WUNTRACED)  # returns once it has stopped
        assert os.WIFSTOPPED(status) and os.WSTOPSIG(status) == signal.SIGSTOP
        assert child.stdout.readline().split() == ["after-1"]
        child.send_signal(signal.SIGCONT)
        assert child.stdout.read().split() == ["after-2", "after-3"]
    finally:
        child.kill()
        child.wait(timeout=60)


def test_an_unknown_action_names_the_variable(monkeypatch):
    monkeypatch.setenv(KILL_AT_ENV, "mid_training:pause")
    with pytest.raises(ValueError, match=f"{KILL_AT_ENV}.*'pause'"):
        fault_point("mid_training")
