"""A SIGTERM or Ctrl-C that arrives while the main thread runs a `__del__` or a weakref
callback has its KeyboardInterrupt dropped by Python ("Exception ignored in ..."), as a
CI run saw inside the import system's module-lock callback: the study then went on and
ended FINISHED. `Interrupts` remembers the signal, and its `check` raises it again."""

from __future__ import annotations

import os
import signal

import pytest

from mnist_track.interrupts import Interrupts


@pytest.fixture
def interrupts():
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield Interrupts().install()
    for signum, handler in previous.items():
        signal.signal(signum, handler)


class _SignalsItselfWhenCollected:
    def __init__(self, signum: int) -> None:
        self.signum = signum

    def __del__(self) -> None:
        os.kill(os.getpid(), self.signum)  # handled here, where Python drops exceptions


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the drop
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_dropped_in_a_destructor_is_raised_at_the_next_check(interrupts, signum):
    interrupts.check()  # nothing came yet
    doomed = _SignalsItselfWhenCollected(signum)
    del doomed  # the handler's KeyboardInterrupt is printed and dropped
    assert interrupts.received == signum
    with pytest.raises(KeyboardInterrupt):
        interrupts.check()


def test_a_signal_raises_where_it_lands(interrupts):
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):  # the handler runs between bytecodes, soon after the kill
            pass
    assert interrupts.received == signal.SIGTERM
