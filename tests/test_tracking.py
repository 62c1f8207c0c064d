"""Unit tests for the run helpers of mnist_track.tracking that need no store."""

from __future__ import annotations

import subprocess

from conftest import REPO_ROOT

from mnist_track import tracking


def test_git_commit_is_the_packages_checkout_wherever_the_process_runs(tmp_path, monkeypatch):
    expected = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    tracking.git_commit.cache_clear()
    monkeypatch.chdir(tmp_path)  # not a checkout: the commit still comes from the package's
    assert tracking.git_commit() == expected


def test_git_commit_is_read_once_per_process(monkeypatch):
    tracking.git_commit.cache_clear()
    first = tracking.git_commit()
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: (_ for _ in ()).throw(OSError))
    assert tracking.git_commit() == first


def test_a_package_outside_a_checkout_has_no_commit(tmp_path, monkeypatch):
    tracking.git_commit.cache_clear()
    monkeypatch.setattr(tracking, "PACKAGE_DIR", tmp_path / "mnist_track")
    (tmp_path / "mnist_track").mkdir()
    try:
        assert tracking.git_commit() is None
    finally:
        tracking.git_commit.cache_clear()
