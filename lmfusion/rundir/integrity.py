"""A checkpoint's integrity manifest: sha256 and size of every file, written at save, verified at load.

``integrity.json`` (the layout chosen here; megatron-core 0.16.1 has no such manifest, and where a newer release's
``dist_checkpointing`` validation writes one the same shape, a relative path per file with its digest, lets it take
over)::

    {"version": 1, "algorithm": "sha256", "files": {"__0_0.distcp": {"sha256": "...", "size": 1173171}, ...}}

It covers every file of the iteration directory except itself and the record, which is written after it and holds
the manifest's own sha256 (``record["integrity"]``). Hashing is spread over the ranks (rank r hashes every W-th file,
in sorted order), at save and at load, so its cost falls with the number of ranks like the writing does.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Optional

from lmfusion.errors import UserError
from lmfusion.rundir.layout import CHECKPOINT_JSON, json_text, read_json
from lmfusion.utils import atomic_write_text

__all__ = ["INTEGRITY", "IntegrityError", "hash_file", "hash_files", "write_manifest", "verify"]

INTEGRITY = "integrity.json"
_VERSION, _ALGORITHM = 1, "sha256"
_SKIP = (INTEGRITY, CHECKPOINT_JSON)


class IntegrityError(UserError):
    """A checkpoint file is missing, truncated or changed since its save."""


def hash_file(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, _ALGORITHM).hexdigest()
    return {"sha256": digest, "size": path.stat().st_size}


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


def hash_files(directory: Path, distributed: bool = True) -> dict[str, dict[str, Any]]:
    """``{relative path: {sha256, size}}`` of every file under ``directory`` but the manifest and the record.
    ``distributed``: a collective, each rank hashing its share; every rank gets the whole map."""
    directory = Path(directory)
    names = _files(directory)
    rank, world = _world() if distributed else (0, 1)
    mine = {n: hash_file(directory / n) for n in names[rank::world]}
    merged: dict[str, dict[str, Any]] = {}
    for part in (_gather(mine) if world > 1 else [mine]):
        merged.update(part)
    return dict(sorted(merged.items()))


def write_manifest(directory: Path, files: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Write ``integrity.json``; returns the record's ``integrity`` entry (file name and its sha256)."""
    atomic_write_text(Path(directory) / INTEGRITY,
                      json_text({"version": _VERSION, "algorithm": _ALGORITHM, "files": files}))
    return {"file": INTEGRITY, "sha256": hash_file(Path(directory) / INTEGRITY)["sha256"]}


def _problem(directory: Path, name: str, want: dict[str, Any], check_hash: bool) -> Optional[str]:
    path = directory / name
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return f"{path}: missing (expected {want.get('size')} bytes)"
    if size != want.get("size"):
        return f"{path}: {size} bytes, expected {want.get('size')} (truncated or overwritten since the save)"
    if check_hash:
        got = hash_file(path)["sha256"]
        if got != want.get("sha256"):
            return f"{path}: sha256 {got[:16]}, expected {str(want.get('sha256'))[:16]} (changed since the save)"
    return None


def verify(directory: Path, record: dict[str, Any], distributed: bool = True) -> bool:
    """Check every file the manifest lists (sizes everywhere, hashes split over the ranks when ``distributed``);
    raises :class:`IntegrityError` naming the first bad file, on every rank. False when the checkpoint predates
    manifests (nothing to verify)."""
    directory = Path(directory)
    entry = record.get("integrity")
    if entry is None:
        return False
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
    rank, world = _world() if distributed else (0, 1)
    names = sorted(files)
    mine = set(names[rank::world])
    for name in names:
        p = _problem(directory, name, files[name], check_hash=name in mine)
        if p:
            problems.append(p)
    everyone = _gather(problems[:1]) if distributed and world > 1 else [problems[:1]]
    first = sorted(p for ps in everyone for p in ps)
    if first:
        raise IntegrityError(first[0])
    return True
