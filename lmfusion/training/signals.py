"""Graceful stop on SIGTERM / SIGUSR1 (SLURM pre-emption, time limits, ``scancel --signal``).

A handler only records the signal; the trainer checks it at each step boundary and all ranks agree with one
all-reduce (a signal may reach only some ranks, or reach them a step apart), then every rank saves the same
checkpoint and exits 0. A second signal of the same kind does not kill the process mid-save either.

Launchers: ``torchrun`` forwards SIGTERM to its workers and then exits non-zero itself (torch elastic treats a
signal as a failure); SIGUSR1 would kill torchrun (default action), so the SLURM script starts torchrun with
SIGUSR1 ignored (``trap '' USR1``, inherited across exec) and the workers, which install a handler here, catch it
when SLURM signals every process of the step: workers save and exit 0, torchrun then exits 0 and the batch script
requeues the job.
"""

from __future__ import annotations

import signal
import threading
from typing import Optional, Sequence

__all__ = ["SignalWatcher"]


class SignalWatcher:
    """Records the first of ``names`` received; :meth:`close` restores the previous handlers."""

    def __init__(self, names: Sequence[str]):
        self.received: Optional[str] = None
        self._previous: dict[signal.Signals, object] = {}
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be installed from the main thread (e.g. tests in threads)
        for name in names:
            sig = signal.Signals[name]
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
