"""Writing a checkpoint into the run directory: a temporary directory, hashed, recorded last, renamed, ``latest``.

Both engines call :func:`begin_save` (every rank), write their files into the temporary directory, then
:func:`finish_save` (every rank: the hashing is shared): rank 0 adds ``train_state.json`` and ``config.yaml``, every
rank hashes its share of the files, rank 0 writes ``integrity.json`` and then the record, renames the directory to
``iter_N``, rewrites ``latest`` and prunes. A crash before the rename leaves a ``.tmp_`` directory that the next
save of that step removes; after it, a complete ``iter_N`` that :func:`~lmfusion.rundir.layout.find_checkpoint`
finds even when ``latest`` was not rewritten yet.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path
from typing import Any, Optional

from lmfusion.errors import UserError
from lmfusion.rundir import integrity
from lmfusion.rundir.layout import (CHECKPOINT_JSON, CONFIG, LATEST, TRAIN_STATE, complete_iterations, is_complete,
                                    iter_name, json_text)
from lmfusion.utils import atomic_write_text

__all__ = ["begin_save", "finish_save", "prune", "write_guard", "CheckpointWriteError"]


class CheckpointWriteError(UserError):
    """Writing a checkpoint failed (disk full, quota, I/O error): one line; the previous checkpoint stays latest."""


@contextlib.contextmanager
def write_guard(tmp: Path):
    """Turn a failed checkpoint write (torch's "enforce fail at inline_container.cc", ENOSPC, ...) into one line
    naming the directory; nothing was renamed, so ``latest`` still names the previous complete checkpoint."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        text = " ".join(str(e).split())
        hint = "; is the disk full?" if ("enforce fail" in text or "No space" in text
                                         or getattr(e, "errno", None) == errno.ENOSPC) else ""
        raise CheckpointWriteError(f"{tmp}: cannot write the checkpoint ({type(e).__name__}: {text[:200]}){hint} "
                                   f"The previous checkpoint stays latest") from None


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def begin_save(run_dir: Path, iteration: int) -> Optional[tuple[Path, Path]]:
    """Collective start of a save: ``(tmp, final)``, ``tmp`` empty on every rank after the barrier; None when
    ``final`` is already complete (a signal right after an interval save; a relaunch after a crash that came before
    ``latest`` moved, whose ``latest`` this then points at ``final``)."""
    rank, _ = _rank_world()
    final = Path(run_dir) / iter_name(iteration)
    if is_complete(final):
        if rank == 0 and (not (final.parent / LATEST).is_file()
                          or (final.parent / LATEST).read_text().strip() != final.name):
            atomic_write_text(final.parent / LATEST, final.name + "\n")
        return None
    tmp = Path(run_dir) / f".tmp_{iter_name(iteration)}"
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a crashed save
        tmp.mkdir(parents=True)
    _barrier()
    return tmp, final


def finish_save(tmp: Path, final: Path, train_state: dict[str, Any], record: dict[str, Any], config_text: str,
                keep_last: Optional[int], hash_files: bool = True) -> None:
    """Collective end of a save, once every rank's files are in ``tmp`` (see the module docstring).
    ``hash_files=False`` writes no manifest (the measurement baseline of benchmarks/checkpoint_hashing.py)."""
    rank, _ = _rank_world()
    if rank == 0:
        atomic_write_text(tmp / TRAIN_STATE, json_text(train_state))
        atomic_write_text(tmp / CONFIG, config_text)
    _barrier()
    record = dict(record)
    if hash_files:
        files = integrity.hash_files(tmp)
        if rank == 0:
            record["integrity"] = integrity.write_manifest(tmp, files)
    if rank == 0:
        atomic_write_text(tmp / CHECKPOINT_JSON, json_text(record))  # last: the directory is now complete
        os.replace(tmp, final)
        atomic_write_text(final.parent / LATEST, final.name + "\n")
        prune(final.parent, final, keep_last)
    _barrier()


def prune(run_dir: Path, newest: Path, keep_last: Optional[int]) -> None:
    """Remove complete iteration directories beyond the newest ``keep_last`` (never ``newest``)."""
    if keep_last is None:
        return
    for old in complete_iterations(run_dir)[:-keep_last]:
        if old != newest:
            shutil.rmtree(old, ignore_errors=True)
