"""A SIGTERM or Ctrl-C that arrives while the main thread runs a `__del__` or a weakref
callback has its KeyboardInterrupt dropped by Python ("Exception ignored in ..."), as a
CI run saw inside the import system's module-lock callback: the study then went on and
ended FINISHED. `Interrupts` remembers the signal, and its `check` raises it again."""

from __future__ import annotations

import os
import signal

import pytest

from mnist_track.interrupts import SIGNALS, Interrupts


@pytest.fixture
def signals_handled(restored_signal_handlers):
    """Handled, not ignored, even when this run was started in the background or under
    nohup; and a signal left alone by the code under test fails the test, not pytest."""
    for signum in SIGNALS:
        signal.signal(signum, lambda signum, frame: None)


@pytest.fixture
def interrupts(signals_handled):
    return Interrupts().install()


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


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])  # kill; terminal gone
def test_a_signal_raises_where_it_lands(interrupts, signum):
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signum)
        for _ in range(1000):  # the handler runs between bytecodes, soon after the kill
            pass
    assert interrupts.received == signum


def test_a_signal_ignored_before_install_stays_ignored(signals_handled):
    """`nohup` starts the command with SIGHUP ignored, so that it outlives its terminal."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    interrupts = Interrupts().install()
    assert signal.getsignal(signal.SIGTERM) == interrupts._handle
    try:
        os.kill(os.getpid(), signal.SIGHUP)
        for _ in range(1000):
            pass
    except KeyboardInterrupt:
        pytest.fail("an ignored SIGHUP interrupted the command")
    assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    assert interrupts.received is None
    interrupts.check()  # nothing to raise
