"""Names, JSON files, ``latest`` and the base reference of a run directory (the contract in one place).

    RUN/config.yaml          the resolved config of the latest launch
    RUN/run.lock             held while a training writes here (owner's host and pid; lmfusion.rundir.lock)
    RUN/latest               the newest complete iteration's name (a hint: the newest complete iter_N wins)
    RUN/iter_0000100/        dist_checkpointing files (or DeepSpeed's), train_state.json, config.yaml,
                             integrity.json (sha256 + size of every other file), and, written last,
                             lmfusion_checkpoint.json (the record: base + its hash, model config, VAE, iteration,
                             the integrity manifest's own sha256). An iteration directory without a record is
                             incomplete and never loaded.

A save renames ``.tmp_iter_N`` to ``iter_N`` and then rewrites ``latest``. A crash between the two leaves ``latest``
one checkpoint behind: :func:`find_checkpoint` takes the newest complete iteration and (``repair=True``) rewrites
``latest``. To roll a run back, remove the newer ``iter_*`` directories.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path
from typing import Any, Callable, Optional

from lmfusion.errors import UserError
from lmfusion.utils import atomic_write_text

__all__ = ["CHECKPOINT_JSON", "TRAIN_STATE", "LATEST", "CONFIG", "RECORD_FORMAT", "STATE_FORMAT", "STATE_VERSION",
           "iter_name", "iteration_of", "read_json", "json_text", "is_complete", "complete_iterations",
           "find_checkpoint", "base_sha256", "base_files", "resolve_base", "check_base", "read_record",
           "read_train_state"]

CHECKPOINT_JSON = "lmfusion_checkpoint.json"
TRAIN_STATE = "train_state.json"
LATEST = "latest"
CONFIG = "config.yaml"
RECORD_FORMAT = "lmfusion-checkpoint"
STATE_FORMAT, STATE_VERSION = "lmfusion-train-state", 1
_ITER = re.compile(r"^iter_(\d{7,})$")


def iter_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def iteration_of(name: str) -> Optional[int]:
    m = _ITER.match(name)
    return int(m.group(1)) if m else None


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; a one-line error naming the file otherwise."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read JSON ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def json_text(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def is_complete(iter_dir: Path) -> bool:
    """The record is written last: a directory holding it is a complete checkpoint."""
    return (iter_dir / CHECKPOINT_JSON).is_file()


def complete_iterations(run_dir: Path) -> list[Path]:
    """Complete ``iter_N`` directories of ``run_dir``, oldest first."""
    found = [(iteration_of(p.name), p) for p in Path(run_dir).glob("iter_*") if p.is_dir()]
    return [p for n, p in sorted((n, p) for n, p in found if n is not None) if is_complete(p)]


def find_checkpoint(path: str | Path, repair: bool = False, log: Optional[Callable[[str], None]] = None
                    ) -> Optional[Path]:
    """The iteration directory ``path`` names: itself when it is one, else the run directory's newest complete
    iteration; None when there is none. ``latest`` naming an older or missing iteration is reported through ``log``
    and, with ``repair``, rewritten."""
    path = Path(path).expanduser()
    if is_complete(path):
        return path
    if (path / TRAIN_STATE).is_file():
        raise UserError(f"{path}: incomplete checkpoint (expected {CHECKPOINT_JSON}, written last, found none); "
                        f"its save did not finish")
    done = complete_iterations(path)
    latest = path / LATEST
    named = latest.read_text(encoding="utf-8").strip() if latest.is_file() else None
    if not done:
        if named:
            raise FileNotFoundError(f"{latest}: names {named}, which is not a complete checkpoint (expected "
                                    f"{named}/{CHECKPOINT_JSON}, found none), and no other iteration is complete")
        return None
    newest = done[-1]
    if named != newest.name:
        what = f"names {named}" if named else "is missing"
        if log is not None:
            log(f"{latest}: {what}, but {newest.name} is the newest complete checkpoint: "
                f"{'repaired' if repair else 'using it'}")
        if repair:
            atomic_write_text(latest, newest.name + "\n")
    return newest


# ---------------------------------------------------------------------------------------------------- the base
# A run's record holds the base's identity twice over: ``base_conversion_sha256`` (its conversion.json, written once by
# ``convert-hf`` with a timestamp and the source, so another conversion differs) and ``base_files``, the sha256 and
# size of every other file of the base (weights, model config, tokenizer), so a base whose safetensors were replaced
# by another same-shape model, conversion.json kept, is refused too.
#
# Why hashed at first use and cached, not recorded by convert-hf: it covers every base, converted before this or
# copied and edited since, and asks nothing of the conversion. The weights are large (16 GB for an 8B base, ~10 s at
# 1.5 GB/s), so each file's digest is computed once per file version and machine and kept under its (device, inode,
# size, mtime_ns) (lmfusion.rundir.digest.cached_sha256): a replacement by copy, move or rewrite changes one of them
# and is hashed afresh; an unchanged base costs a stat per file. What the fast path cannot see is a deliberate in-place
# rewrite that restores size and mtime on the same inode (tampering with the user's own base, outside what a run
# directory guards; what is shared leaves as an export, whose every file is hashed at load). In a process group rank 0
# hashes and the others take its digests (a node-local copy of the base on another node is not read).
_BASE_IDENTITY = "conversion.json"
_warned_old_records: set[str] = set()


def base_sha256(base_dir: str | Path) -> str:
    """The base's identity: sha256 of its ``conversion.json``."""
    path = Path(base_dir) / _BASE_IDENTITY
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file; is {base_dir} a converted base (lmfusion convert-hf)?") \
            from None


def _base_file_names(base_dir: Path) -> list[str]:
    return sorted(p.name for p in Path(base_dir).iterdir()
                  if p.is_file() and p.name != _BASE_IDENTITY and not p.name.startswith("."))


def base_files(base_dir: str | Path) -> dict[str, dict[str, Any]]:
    """``{name: {sha256, size}}`` of the base's files but conversion.json (cached digests, see above)."""
    from lmfusion.rundir.digest import cached_sha256

    names = _base_file_names(Path(base_dir))
    return dict(zip(names, cached_sha256(Path(base_dir) / n for n in names)))


def _digests_from_rank0(paths: list[Path]) -> list[dict[str, Any]]:
    """Cached digests of ``paths``; in a process group, rank 0's, sent to every rank (one rank reads the weights when
    the cache misses, not every rank of every node). A collective there: every rank checks the base."""
    from lmfusion.rundir.digest import cached_sha256

    try:
        import torch.distributed as dist

        grouped = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    except ImportError:
        grouped = False
    if not grouped:
        return cached_sha256(paths)
    box: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            box = [cached_sha256(paths)]
        except OSError as e:
            box = [f"{type(e).__name__}: {' '.join(str(e).split())}"]
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], str):
        raise ValueError(f"cannot hash the base's files on rank 0 ({box[0]})")
    return box[0]


def resolve_base(record: dict[str, Any], record_path: Path) -> Path:
    """The base a record names: absolute, or relative to the record's directory."""
    if not isinstance(record.get("base"), str) or not record["base"]:
        raise UserError(f"{record_path}: key 'base' expected a path, found {record.get('base')!r}")
    base = Path(record["base"]).expanduser()
    return base if base.is_absolute() else (record_path.parent / base).resolve()


def check_base(record: dict[str, Any], record_path: Path, base_dir: Path,
               warn: Optional[Callable[[str], None]] = None) -> None:
    """``base_dir`` is the base the record was trained on: its conversion.json sha256 and, when the record lists
    them, every file's size and sha256. A record from before per-file hashes gets the first check and one warning
    per record (through ``warn``; default: stderr)."""
    want = record.get("base_conversion_sha256")
    if not want:
        raise UserError(f"{record_path}: key 'base_conversion_sha256' expected the base's hash, found none")
    found = base_sha256(base_dir)
    if found != want:
        raise UserError(f"{base_dir}/{_BASE_IDENTITY}: sha256 {found[:12]}, expected {want[:12]} (the base "
                        f"{record_path} was trained on); the base directory was replaced or is another model")
    files = record.get("base_files")
    if files is None:
        if str(record_path) not in _warned_old_records:
            _warned_old_records.add(str(record_path))
            message = (f"{record_path}: predates per-file base hashes; only {Path(base_dir) / _BASE_IDENTITY} was "
                       f"checked, not the base's weight files (checkpoints saved from now on record them)")
            (warn or (lambda m: print(f"lmfusion: {m}", file=sys.stderr, flush=True)))(message)
        return
    if not isinstance(files, dict):
        raise UserError(f"{record_path}: key 'base_files' expected an object of file digests, found "
                        f"{type(files).__name__}")
    for name in sorted(files):
        path = Path(base_dir) / name
        if not path.is_file():
            raise UserError(f"{path}: missing, expected {files[name].get('size')} bytes (a file of the base "
                            f"{record_path} was trained on)")
        if path.stat().st_size != files[name].get("size"):
            raise UserError(f"{path}: {path.stat().st_size} bytes, expected {files[name].get('size')} (the base "
                            f"{record_path} was trained on); the base's files were replaced or changed")
    names = sorted(files)
    for name, got in zip(names, _digests_from_rank0([Path(base_dir) / n for n in names])):
        if got["sha256"] != files[name].get("sha256"):
            raise UserError(f"{Path(base_dir) / name}: sha256 {got['sha256'][:12]}, expected "
                            f"{str(files[name].get('sha256'))[:12]} (the base {record_path} was trained on); the "
                            f"base's files were replaced or changed")


def read_record(iter_dir: Path, name: str = CHECKPOINT_JSON) -> dict[str, Any]:
    """A checkpoint's record, its keys checked."""
    path = Path(iter_dir) / name
    record = read_json(path)
    for key in ("base", "model"):
        if key not in record:
            raise UserError(f"{path}: key {key!r} expected, found none")
    if record.get("vae") is not None and not isinstance(record["vae"], dict):
        raise UserError(f"{path}: key 'vae' expected an object or null, found {type(record['vae']).__name__}")
    return record


def read_train_state(iter_dir: Path) -> dict[str, Any]:
    path = Path(iter_dir) / TRAIN_STATE
    state = read_json(path)
    if state.get("format") != STATE_FORMAT or state.get("version") != STATE_VERSION:
        raise UserError(f"{path}: expected format {STATE_FORMAT} v{STATE_VERSION}, found "
                        f"{state.get('format')!r} v{state.get('version')!r}")
    return state
