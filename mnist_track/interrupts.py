"""Ctrl-C, SIGTERM and SIGHUP that cannot be lost.

All three raise KeyboardInterrupt, so a `kill`, or a terminal that goes away, ends a run or
study as Ctrl-C does: the running trial and runs are closed properly, not left RUNNING. A
signal that was ignored when the command started stays ignored: `nohup` ignores SIGHUP
so that the command outlives its terminal.

But a signal is handled wherever the main thread happens to be, and when that is a weakref
callback or a `__del__` (the import system runs one each time a module lock is freed),
Python prints "Exception ignored" and drops the KeyboardInterrupt: the study would go on
and end as if never stopped. So the signal is also remembered, and `check`, called from
the progress callbacks between batches, epochs and trials, raises it again."""

from __future__ import annotations

import signal
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupts:
    def __init__(self) -> None:
        self.received: int | None = None  # the first signal, once one came

    def install(self) -> Interrupts:
        for signum in SIGNALS:
            if signal.getsignal(signum) is not signal.SIG_IGN:
                signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is None:
            self.received = signum
        raise KeyboardInterrupt

    def check(self) -> None:
        """Raise the interrupt again if one came. Only the progress callbacks of the trial
        loop call it: once an interrupt has been raised where it is caught, the runs'
        clean-up never comes back here."""
        if self.received is not None:
            raise KeyboardInterrupt
