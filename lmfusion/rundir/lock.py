"""One training per run directory: an advisory lock file holding its owner's host and pid.

``RUN/run.lock`` is created and ``flock``-ed by rank 0 for the whole run and removed at its end. A second training
into the same directory stops with a one-line error naming the owner. The kernel drops an ``flock`` when its process
dies, so a lock file left by a killed run on this host is stale for certain: it is taken over, and said so. A lock
file whose owner is on another host cannot be checked from here (``flock`` may not reach across a network file
system): it is reported with the command that clears it.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Callable, Optional

from lmfusion.errors import UserError

__all__ = ["LOCK", "RunLocked", "RunLock"]

LOCK = "run.lock"


class RunLocked(UserError):
    """Another training holds the run directory."""


class RunLock:
    def __init__(self, run_dir: Path, log: Optional[Callable[[str], None]] = None):
        self.path = Path(run_dir) / LOCK
        self.log = log
        self._fd: Optional[int] = None

    def _owner(self) -> dict:
        try:
            return json.loads(self.path.read_text(encoding="utf-8") or "{}")
        except (OSError, ValueError):
            return {}

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            o = self._owner()
            raise RunLocked(f"{self.path}: held by a running training (host {o.get('host')}, pid {o.get('pid')}, "
                            f"since {o.get('since')}); one training per run directory") from None
        try:
            same_file = os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same_file = False
        if not same_file:  # its owner removed it between our open and flock: start over on the new file
            os.close(fd)
            return self.acquire()
        owner, host = self._owner(), socket.gethostname()
        if owner.get("pid") is not None:  # the file outlived its owner (kill -9, node failure)
            if owner.get("host") != host:
                os.close(fd)
                raise RunLocked(f"{self.path}: left by host {owner.get('host')} pid {owner.get('pid')} (since "
                                f"{owner.get('since')}), which cannot be checked from {host}; if no training uses "
                                f"this directory any more, clear it with: rm {self.path}")
            if self.log is not None:
                self.log(f"{self.path}: stale lock of pid {owner.get('pid')} (no longer holds it), taken over")
        text = json.dumps({"host": host, "pid": os.getpid(),
                           "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}) + "\n"
        os.ftruncate(fd, 0)
        os.pwrite(fd, text.encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # before unlocking: a waiting process then finds no owner
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
