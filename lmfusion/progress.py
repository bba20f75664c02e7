"""Progress bars that stay readable in a log file.

On a terminal :func:`progress` is plain tqdm (one line redrawn in place with carriage returns). Written to anything
else (a log file, a pipe, the quickstart's captured output), those redraws would pile up as one ever-growing line;
there it writes a whole line every ``percent`` percent of the total instead (a line per ``interval_s`` seconds when
the total is unknown), and ``set_postfix`` updates show on the next such line rather than adding their own.
"""

from __future__ import annotations

import re
import sys
from typing import Any, Iterable, Optional, TextIO

from tqdm import tqdm

__all__ = ["progress"]


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


class _Lines:
    """A file for tqdm that turns each redraw (``\\r...``) into one newline-terminated line; blank clears vanish."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.encoding = getattr(stream, "encoding", None) or "utf-8"

    def write(self, s: str) -> int:
        for piece in re.split(r"[\r\n]", s):
            if piece.strip():
                self.stream.write(piece.rstrip() + "\n")
        return len(s)

    def flush(self) -> None:
        flush = getattr(self.stream, "flush", None)
        if flush is not None:
            flush()


class _LogTqdm(tqdm):
    """tqdm whose postfix updates wait for the next scheduled line (each refresh would be a line of its own)."""

    def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):
        super().set_postfix(ordered_dict, refresh=False, **kwargs)

    def set_description(self, desc=None, refresh=True):
        super().set_description(desc, refresh=False)


def progress(iterable: Optional[Iterable] = None, *, total: Optional[int] = None, file: Optional[TextIO] = None,
             percent: float = 5.0, interval_s: float = 30.0, **kwargs: Any) -> tqdm:
    """``tqdm(iterable, total=total, **kwargs)`` on a terminal; elsewhere at most about ``100 / percent`` lines."""
    stream = sys.stderr if file is None else file
    if _isatty(stream):
        return tqdm(iterable, total=total, file=stream, **kwargs)
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    kwargs.update(file=_Lines(stream), dynamic_ncols=False, maxinterval=float("inf"))
    if total:
        kwargs.update(miniters=max(1, int(total * percent / 100)), mininterval=0)
    else:
        kwargs.update(mininterval=interval_s)
    return _LogTqdm(iterable, total=total, **kwargs)
