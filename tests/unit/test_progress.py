"""Progress bars written to a log (not a terminal) are newline-separated lines, a bounded number of them; on a
terminal they stay tqdm's in-place bar."""

from __future__ import annotations

import io

from lmfusion.progress import progress

N = 1000
PERCENT = 5


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_log_gets_lines_at_most_every_few_percent():
    log = io.StringIO()
    bar = progress(total=N, desc="VAE", file=log, percent=PERCENT)
    for i in range(N):
        bar.update()
        if i % 10 == 0:
            bar.set_postfix(loss=f"{i / N:.3f}")  # must not add a line each time
    bar.close()
    out = log.getvalue()
    assert "\r" not in out and out.endswith("\n")
    lines = out.splitlines()
    # the first line (0/N), one per PERCENT of the total, and the final state again at close
    assert 100 // PERCENT <= len(lines) <= 100 // PERCENT + 2
    assert all(line.startswith("VAE:") for line in lines)
    assert f"{N}/{N}" in lines[-1] and "loss=" in lines[-1]
    counts = [int(line.split("/")[0].rsplit("|", 1)[-1].split()[-1]) for line in lines]
    assert counts == sorted(counts) and counts[0] == 0


def test_iterable_total_is_its_length():
    log = io.StringIO()
    assert list(progress(range(N), file=log, desc="gen")) == list(range(N))
    lines = log.getvalue().splitlines()
    assert len(lines) <= 100 // PERCENT + 2 and f"{N}/{N}" in lines[-1]


def test_terminal_keeps_the_in_place_bar():
    tty = _Terminal()
    for _ in progress(range(N), file=tty, mininterval=0, miniters=1):
        pass
    out = tty.getvalue()
    assert out.count("\r") > 100 // PERCENT + 2  # redrawn in place, many times
