"""Modules MLflow probes on every request are known to be absent, and only those that
are absent."""

from __future__ import annotations

import importlib.machinery
import subprocess
import sys

import pytest

from mnist_track import missing_modules

NOWHERE = "mnist_track_no_such_module_anywhere"


@pytest.fixture
def fresh_finder(monkeypatch):
    """remember_absent as before anything was remembered in this process."""
    monkeypatch.setattr(missing_modules._finder, "names", set())
    return missing_modules._finder


def test_an_absent_module_fails_to_import_without_a_search(fresh_finder, monkeypatch):
    assert missing_modules.remember_absent((NOWHERE,)) == [NOWHERE]
    searches = _count_searches(monkeypatch)
    for name in (NOWHERE, f"{NOWHERE}.submodule"):
        with pytest.raises(ModuleNotFoundError, match=NOWHERE):
            __import__(name)
    assert searches == []
    assert NOWHERE not in sys.modules  # sys.modules is left alone


def test_installed_or_imported_modules_are_left_alone(fresh_finder, monkeypatch):
    monkeypatch.delitem(sys.modules, "tomllib", raising=False)  # installed, maybe not imported
    assert missing_modules.remember_absent(("tomllib", "json")) == []
    import tomllib  # noqa: F401 - still importable


def test_mlflow_resolves_request_headers_without_searching_for_them(fresh_finder, monkeypatch):
    """The reason for the module: MLflow's Databricks probes before each request."""
    from mlflow.tracking.request_header.registry import resolve_request_headers

    searches = _count_searches(monkeypatch)
    resolve_request_headers()
    probed = {name.partition(".")[0] for name in searches}
    absent = missing_modules.remember_absent()
    if not absent:
        pytest.skip("every module MLflow probes is installed here")
    assert probed >= set(absent)

    searches.clear()  # remember_absent's own, once
    resolve_request_headers()
    assert not {name.partition(".")[0] for name in searches} & set(absent)


def test_importing_the_tracking_module_remembers_them():
    """In a fresh interpreter, as a worker starts: what it imports before MLflow asks."""
    probe = (
        "import mnist_track.tracking\n"
        "try:\n    import dbruntime\nexcept ModuleNotFoundError:\n    pass\n"
        "from mnist_track import missing_modules\n"
        "print(sorted(missing_modules._finder.names))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
    )
    assert "'dbruntime'" in result.stdout  # Databricks' runtime: absent here


def _count_searches(monkeypatch) -> list[str]:
    """The module names sys.path is searched for from now on."""
    searches: list[str] = []
    find_spec = importlib.machinery.PathFinder.find_spec

    def counting(fullname, path=None, target=None):
        searches.append(fullname)
        return find_spec(fullname, path, target)

    monkeypatch.setattr(importlib.machinery.PathFinder, "find_spec", counting)
    return searches
