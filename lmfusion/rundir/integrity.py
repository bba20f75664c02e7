"""A checkpoint's integrity manifest: sha256 and size of every file, written at save, verified at load.

``integrity.json`` (the layout chosen here; megatron-core 0.16.1 has no such manifest, and where a newer release's
``dist_checkpointing`` validation writes one the same shape, a relative path per file with its digest, lets it take
over)::

    {"version": 1, "algorithm": "sha256", "files": {"__0_0.distcp": {"sha256": "...", "size": 1173171}, ...}}

It covers every file of the iteration directory except itself and the record, which is written after it and holds
the manifest's own sha256 (``record["integrity"]``).

Cost. At save each rank hashes the files its own writers produce *while* they are written
(:class:`~lmfusion.rundir.digest.HashWhileWriting`, started by the caller before the write and handed to
:func:`hash_files`); what is left (small files, or everything when nothing was followed) is spread over the ranks,
rank r taking every W-th file, each rank hashing its share in parallel threads. At load the sizes and the manifest
are checked before anything is read (:func:`start_verify`), the sha256s in background threads while megatron reads
the same files, and :meth:`Verification.result` collects them before the loaded state is used.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Optional

from lmfusion.errors import UserError
from lmfusion.rundir.digest import HashWhileWriting, sha256_file, sha256_files
from lmfusion.rundir.layout import CHECKPOINT_JSON, json_text, read_json
from lmfusion.utils import atomic_write_text

__all__ = ["INTEGRITY", "IntegrityError", "hash_file", "hash_files", "write_manifest", "verify", "start_verify",
           "Verification", "HashWhileWriting", "hash_while_writing"]

INTEGRITY = "integrity.json"
_VERSION, _ALGORITHM = 1, "sha256"
_SKIP = (INTEGRITY, CHECKPOINT_JSON)


class IntegrityError(UserError):
    """A checkpoint file is missing, truncated or changed since its save."""


def hash_file(path: Path) -> dict[str, Any]:
    return sha256_file(path)


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather(obj: Any) -> list[Any]:
    import torch.distributed as dist

    rank, world = _world()
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _files(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*")
                  if p.is_file() and not (p.parent == directory and p.name in _SKIP))


def hash_while_writing(directory: Path) -> HashWhileWriting:
    """Follow the files this rank's checkpoint writers create in ``directory`` (megatron names them
    ``__{rank}_{i}.distcp``) and hash them as they grow; pass the result to :func:`hash_files`."""
    rank, _ = _world()
    prefix = f"__{rank}_"
    return HashWhileWriting(Path(directory), lambda name: name.startswith(prefix))


def hash_files(directory: Path, distributed: bool = True, written: Optional[HashWhileWriting] = None
               ) -> dict[str, dict[str, Any]]:
    """``{relative path: {sha256, size}}`` of every file under ``directory`` but the manifest and the record.
    ``written``: this rank's files hashed while written (finished here). ``distributed``: a collective, each rank
    hashing its share of the rest; every rank gets the whole map."""
    directory = Path(directory)
    rank, world = _world() if distributed else (0, 1)
    known = written.finish() if written is not None else {}
    merged: dict[str, dict[str, Any]] = {}
    for part in (_gather(known) if world > 1 else [known]):
        merged.update(part)
    rest = [n for n in _files(directory) if n not in merged]
    mine_names = rest[rank::world]
    mine = dict(zip(mine_names, sha256_files(directory / n for n in mine_names)))
    for part in (_gather(mine) if world > 1 else [mine]):
        merged.update(part)
    return dict(sorted(merged.items()))


def write_manifest(directory: Path, files: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Write ``integrity.json``; returns the record's ``integrity`` entry (file name and its sha256)."""
    atomic_write_text(Path(directory) / INTEGRITY,
                      json_text({"version": _VERSION, "algorithm": _ALGORITHM, "files": files}))
    return {"file": INTEGRITY, "sha256": hash_file(Path(directory) / INTEGRITY)["sha256"]}


def _size_problem(directory: Path, name: str, want: dict[str, Any]) -> Optional[str]:
    path = directory / name
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return f"{path}: missing (expected {want.get('size')} bytes)"
    if size != want.get("size"):
        return f"{path}: {size} bytes, expected {want.get('size')} (truncated or overwritten since the save)"
    return None


def _agree(problems: list[str], distributed: bool) -> None:
    """Every rank raises the same (first, by name) problem any rank found."""
    everyone = _gather(problems[:1]) if distributed and _world()[1] > 1 else [problems[:1]]
    first = sorted(p for ps in everyone for p in ps)
    if first:
        raise IntegrityError(first[0])


class Verification:
    """A started check of a checkpoint's files (:func:`start_verify`): the sha256s of this rank's share are computed
    in a background thread; :meth:`result` waits for them (a collective when ``distributed``)."""

    def __init__(self, directory: Path, files: dict[str, Any], distributed: bool):
        self.directory, self.files, self.distributed = directory, files, distributed
        rank, world = _world() if distributed else (0, 1)
        self.names = sorted(files)[rank::world]
        self._found: Optional[list[dict[str, Any]]] = None
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, name="sha256-verify", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._found = sha256_files(self.directory / n for n in self.names)
        except BaseException as e:
            self._error = e

    def result(self) -> bool:
        """True when every file is as saved; raises :class:`IntegrityError` naming the first that is not."""
        self._thread.join()
        problems = []
        if self._error is not None:  # e.g. a file removed while the load ran
            problems.append(f"{self.directory}: cannot hash its files ({type(self._error).__name__}: "
                            f"{' '.join(str(self._error).split())[:200]})")
        else:
            for name, got in zip(self.names, self._found or []):
                want = self.files[name]
                if got["sha256"] != want.get("sha256"):
                    problems.append(f"{self.directory / name}: sha256 {got['sha256'][:16]}, expected "
                                    f"{str(want.get('sha256'))[:16]} (changed since the save)")
        _agree(problems, self.distributed)
        return True


class _Nothing:
    """The verification of a checkpoint that predates manifests."""

    def result(self) -> bool:
        return False


def start_verify(directory: Path, record: dict[str, Any], distributed: bool = True):
    """Check the manifest and every file's size now (raises :class:`IntegrityError` naming the first bad file, on
    every rank, before anything reads the files) and start hashing this rank's share of the files in the background.
    Returns an object whose ``result()`` is :meth:`Verification.result`, or False when the checkpoint predates
    manifests (nothing to verify)."""
    directory = Path(directory)
    entry = record.get("integrity")
    if entry is None:
        return _Nothing()
    manifest_path = directory / str(entry.get("file", INTEGRITY))
    problems: list[str] = []
    files: dict[str, Any] = {}
    if not manifest_path.is_file():
        problems.append(f"{manifest_path}: missing (the record {CHECKPOINT_JSON} lists it)")
    else:
        got = hash_file(manifest_path)["sha256"]
        if got != entry.get("sha256"):
            problems.append(f"{manifest_path}: sha256 {got[:16]}, expected {str(entry.get('sha256'))[:16]} "
                            f"(from {CHECKPOINT_JSON}; changed since the save)")
        else:
            manifest = read_json(manifest_path)
            files = manifest.get("files") if isinstance(manifest.get("files"), dict) else {}
            if manifest.get("algorithm") != _ALGORITHM or not files:
                problems.append(f"{manifest_path}: expected {_ALGORITHM} digests of the checkpoint files, found "
                                f"algorithm {manifest.get('algorithm')!r} with {len(files)} file(s)")
    for name in sorted(files):
        p = _size_problem(directory, name, files[name])
        if p:
            problems.append(p)
    _agree(problems, distributed)
    return Verification(directory, files, distributed)


def verify(directory: Path, record: dict[str, Any], distributed: bool = True) -> bool:
    """Check every file the manifest lists (sizes everywhere, hashes split over the ranks when ``distributed``);
    raises :class:`IntegrityError` naming the first bad file, on every rank. False when the checkpoint predates
    manifests (nothing to verify)."""
    return start_verify(directory, record, distributed).result()
