"""Where a tracked run's or a study's wall time goes, phase by phase.

`train_and_track`, `run_study` and the tracking calls mark their phases; whoever wants
the figures (the benchmarks) gathers them with `collect()`. Without a collector a phase
costs one context-variable lookup, so the marks stay in production code and the
benchmarks time the real code path rather than a copy of its steps.

Phases are exclusive: time spent in a phase nested inside another (Optuna's report
inside `fit`'s epoch callback) is charged to the inner one only, so the phases of a
record add up to at most its wall time.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field


@dataclass
class Record:
    """One run (or study): its wall time, seconds per phase, and how it ended (the
    exception's class name, or "finished")."""

    kind: str
    seconds: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)
    outcome: str = "finished"
    _stack: list[str] = field(default_factory=list, repr=False)
    _since: float = field(default=0.0, repr=False)

    def _charge(self, now: float) -> None:
        if self._stack:
            name = self._stack[-1]
            self.phases[name] = self.phases.get(name, 0.0) + now - self._since
        self._since = now

    @property
    def unphased(self) -> float:
        """Wall time inside the record but in none of its phases."""
        return max(self.seconds - sum(self.phases.values()), 0.0)


_collector: ContextVar[list[Record] | None] = ContextVar("timings_collector", default=None)
_current: ContextVar[Record | None] = ContextVar("timings_record", default=None)


@contextlib.contextmanager
def collect() -> Iterator[list[Record]]:
    """Gather the records of everything run inside the block (this thread only)."""
    records: list[Record] = []
    token = _collector.set(records)
    try:
        yield records
    finally:
        _collector.reset(token)


@contextlib.contextmanager
def record(kind: str) -> Iterator[None]:
    """Time one run or study; a no-op unless something collects."""
    records = _collector.get()
    if records is None:
        yield
        return
    entry = Record(kind)
    records.append(entry)
    token = _current.set(entry)
    start = entry._since = time.perf_counter()
    try:
        yield
    except BaseException as error:
        entry.outcome = type(error).__name__
        raise
    finally:
        entry._charge(time.perf_counter())
        entry.seconds = time.perf_counter() - start
        _current.reset(token)


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Charge the block's time to `name` in the current record, if any."""
    entry = _current.get()
    if entry is None:
        yield
        return
    entry._charge(time.perf_counter())
    entry._stack.append(name)
    try:
        yield
    finally:
        entry._charge(time.perf_counter())
        entry._stack.pop()
