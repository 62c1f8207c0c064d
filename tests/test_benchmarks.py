"""Smoke test of the benchmark suite: a quick run of two groups writes its report.
Timings are never asserted (they depend on the machine and its load)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from conftest import REPO_ROOT, cli_env

# Subprocesses that import torch and MLflow: not the one-minute unit tier.
pytestmark = pytest.mark.e2e


def test_quick_benchmarks_write_numeric_report(tmp_path):
    out = tmp_path / "bench"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "--quick",
            "--only",
            "startup,epoch",
            "--out",
            str(out),
        ],
        cwd=REPO_ROOT,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    report = json.loads((out / "benchmarks.json").read_text())
    assert report["mode"] == "quick"
    assert report["errors"] == {}
    assert {"cpu", "cores", "torch", "mlflow", "optuna", "numpy", "torch_threads", "device"} <= set(
        report["machine"]
    )
    figures = report["figures"]
    assert {figure["group"] for figure in figures} == {"startup", "epoch"}
    for figure in figures:
        assert (
            isinstance(figure["value"], float)
            and math.isfinite(figure["value"])
            and figure["value"] > 0
        )
        assert figure["estimate"] is True
    compared = [figure for figure in figures if figure["target"] is not None]
    assert compared, "some figures must carry a target"
    for figure in compared:
        assert isinstance(figure["met"], bool)
        if figure["target"][0] == "ratio":
            assert isinstance(figure["reference_value"], float) and figure["ratio"] > 0

    text = (out / "benchmarks.md").read_text()
    assert "## Machine" in text and "| Group | Figure |" in text
    assert "| epoch | classic MLP epoch, batch 128 |" in text
    assert "| startup | mnist-track --help |" in text
