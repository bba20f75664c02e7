"""Writing a checkpoint into the run directory: a temporary directory, hashed, recorded last, renamed, ``latest``.

Both engines call :func:`begin_save` (every rank), write their files into the temporary directory (hashed while
written when the caller follows them with :func:`~lmfusion.rundir.integrity.hash_while_writing`), then
:func:`finish_save` (every rank: the hashing is shared): rank 0 adds ``train_state.json`` and ``config.yaml``, every
rank hashes its share of the files not hashed yet, rank 0 writes ``integrity.json`` and then the record, renames the
directory to ``iter_N``, rewrites ``latest`` and prunes. A crash before the rename leaves a ``.tmp_`` directory that
the next save of that step removes; after it, a complete ``iter_N`` that
:func:`~lmfusion.rundir.layout.find_checkpoint` finds even when ``latest`` was not rewritten yet.

A failed write (disk full, quota, I/O error; in megatron's writer processes, synchronous or asynchronous, or in the
files written here) is one line naming the file, the same on every rank (:class:`CheckpointWriteError`); the
temporary directory is removed (nothing under an ``iter_N`` name, ``latest`` unchanged, the space given back).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional

from lmfusion.errors import UserError
from lmfusion.rundir import integrity
from lmfusion.rundir.layout import (CHECKPOINT_JSON, CONFIG, LATEST, TRAIN_STATE, base_files, complete_iterations,
                                    is_complete, iter_name, json_text)
from lmfusion.utils import atomic_write_text

__all__ = ["begin_save", "finish_save", "prune", "write_guard", "CheckpointWriteError", "describe_write_error"]

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_ERRNO_TEXT = re.compile(r"\[Errno (\d+)\] [^:\n]*(?:: '([^'\n]+)')?")


class CheckpointWriteError(UserError):
    """Writing a checkpoint failed (disk full, quota, I/O error): one line; the previous checkpoint stays latest."""


def _causes(e: BaseException):
    """``e``, its causes and contexts, and the per-rank exceptions a torch ``CheckpointException`` carries."""
    seen, todo = set(), [e]
    while todo:
        x = todo.pop(0)
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        yield x
        todo += [x.__cause__, x.__context__]
        failures = getattr(x, "failures", None)
        if isinstance(failures, dict):
            todo += [f[0] if isinstance(f, tuple) else f for f in failures.values()]


def describe_write_error(e: BaseException, tmp: Path, after: Optional[str] = None) -> str:
    """One line for a failed checkpoint write under ``tmp``: "no space left on device writing PATH" when the disk
    or quota is full (found as an OSError anywhere in the chain, or as its text where megatron's writer processes
    passed it on as a message), the error's last line otherwise."""
    code, path = None, None
    for x in _causes(e):
        if isinstance(x, OSError) and x.errno is not None:
            code, path = x.errno, x.filename
            break
    if code is None:  # the writer processes' OSError survives only as text ("Worker failure: [Errno 28] ...")
        for x in _causes(e):
            m = _ERRNO_TEXT.search(str(x))
            if m:
                code, path = int(m.group(1)), m.group(2)
                break
    where = path or tmp
    step = tmp.name.removeprefix(".tmp_")
    after = after or f"the checkpoint {step} was not saved and the previous checkpoint stays latest"
    if code in _NO_SPACE:
        what = "no space left on device" if code == errno.ENOSPC else "disk quota exceeded"
        return f"{what} writing {where}: {after}"
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    text = lines[-1][:200] if lines else type(e).__name__
    hint = "; is the disk full?" if "enforce fail" in str(e) or "unexpected pos" in str(e) else ""
    return f"cannot write {where} ({type(e).__name__}: {text}){hint}: {after}"


def _discard(tmp: Path) -> None:
    rank, _ = _rank_world()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def write_guard(tmp: Path):
    """Turn a failed checkpoint write (torch's "enforce fail at inline_container.cc", ENOSPC, a torch
    ``CheckpointException`` from megatron's writers) into one :class:`CheckpointWriteError` line naming the file
    and remove ``tmp``; nothing was renamed, so ``latest`` still names the previous complete checkpoint."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except CheckpointWriteError:
        raise
    except (OSError, RuntimeError, CheckpointException) as e:
        message = describe_write_error(e, Path(tmp))
        _discard(Path(tmp))
        raise CheckpointWriteError(message) from None


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


def _agree(error: Optional[str]) -> Optional[str]:
    """Rank 0's outcome on every rank (a barrier that carries rank 0's error message)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return error
    box = [error]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def finish_save(tmp: Path, final: Path, train_state: dict[str, Any], record: dict[str, Any], config_text: str,
                keep_last: Optional[int], hash_files: bool = True,
                written: Optional[integrity.HashWhileWriting] = None) -> None:
    """Collective end of a save, once every rank's files are in ``tmp`` (see the module docstring). ``written``: this
    rank's files as hashed while written (:func:`~lmfusion.rundir.integrity.hash_while_writing`). ``hash_files=False``
    writes no manifest (the measurement baseline of benchmarks/checkpoint_hashing.py). A failed write raises
    :class:`CheckpointWriteError` on every rank."""
    rank, _ = _rank_world()
    error = None
    if rank == 0:
        try:
            atomic_write_text(tmp / TRAIN_STATE, json_text(train_state))
            atomic_write_text(tmp / CONFIG, config_text)
        except OSError as e:
            error = describe_write_error(e, tmp)
    error = _agree(error)
    if error is not None:
        if written is not None:
            written.cancel()
        _discard(tmp)
        raise CheckpointWriteError(error)
    record = dict(record)
    if hash_files:
        files = integrity.hash_files(tmp, written=written)
    elif written is not None:
        written.cancel()
    if rank == 0:
        try:
            if record.get("base_conversion_sha256") and "base_files" not in record:
                record["base_files"] = base_files(record["base"])  # an engine that did not record them at start
            if hash_files:
                record["integrity"] = integrity.write_manifest(tmp, files)
            atomic_write_text(tmp / CHECKPOINT_JSON, json_text(record))  # last: the directory is now complete
            os.replace(tmp, final)
            atomic_write_text(final.parent / LATEST, final.name + "\n")
            prune(final.parent, final, keep_last)
        except OSError as e:
            done = final.exists() and not tmp.exists()
            error = describe_write_error(e, tmp, after=f"{final.name} is complete and the next start takes it, but "
                                                       f"{LATEST} was not updated" if done else None)
    error = _agree(error)
    if error is not None:
        _discard(tmp)
        raise CheckpointWriteError(error)


def prune(run_dir: Path, newest: Path, keep_last: Optional[int]) -> None:
    """Remove complete iteration directories beyond the newest ``keep_last`` (never ``newest``)."""
    if keep_last is None:
        return
    for old in complete_iterations(run_dir)[:-keep_last]:
        if old != newest:
            shutil.rmtree(old, ignore_errors=True)
