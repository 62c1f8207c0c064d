"""Benchmark suite for mnist-track: every figure is measured beside its reference in the
same run, with the ratio and the target. Run `python -m benchmarks --help`.

Groups (one module each): startup, epoch, time_to_accuracy, tracking, study, team,
serving.
This package imports nothing heavy at load, so `python -m benchmarks.epoch` starts fast.
"""

GROUPS = ("startup", "epoch", "time_to_accuracy", "tracking", "study", "team", "serving")
