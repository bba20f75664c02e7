"""sha256 of files: many at once (threads), while a writer appends to them, and cached for read-only inputs.

* :func:`sha256_files`: several files in parallel threads. ``hashlib`` releases the GIL while it digests a buffer
  larger than 2 KiB, so threads use as many cores as there are files.
* :class:`HashWhileWriting`: a background thread follows the files a writer (megatron's checkpoint writer processes,
  forked from this one) creates in a directory and hashes each while it grows, so the hash is ready when the write
  ends instead of costing a second pass over the bytes after it. It relies on the writer appending (megatron's
  ``FileSystemWriterAsync``, ``torch.save`` and ``pickle`` write files front to back, never seeking back), reads only
  files this process's writers create (a same-node page cache is coherent with the writer, a network file system's
  view of another node's file may not be), and checks at the end that each file is the one it followed (same inode)
  and that it read every byte (same size); any other file is hashed afresh. Were the writer ever to rewrite earlier
  bytes, the manifest would disagree with the file and the load would name it: a loud failure, never a silent one.
* :func:`cached_sha256`: the digest of a large read-only input (the base's weights), computed once per file version
  and machine, keyed by (device, inode, size, mtime_ns): replacing a file (copy, move, rewrite) changes at least one
  of them. The cache is ``$LMFUSION_CACHE/file_sha256.json`` (default ``~/.cache/lmfusion``), in memory when it cannot
  be written.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

__all__ = ["sha256_file", "sha256_files", "HashWhileWriting", "cached_sha256"]

_CHUNK = 4 << 20
_MAX_THREADS = 8
_PARALLEL_MIN = 8 << 20


def sha256_file(path: Path) -> dict[str, Any]:
    """``{"sha256", "size"}`` of one file."""
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
        size = os.fstat(f.fileno()).st_size
    return {"sha256": digest, "size": size}


def sha256_files(paths: Iterable[Path]) -> list[dict[str, Any]]:
    """:func:`sha256_file` of each path, in order. Files of ``_PARALLEL_MIN`` bytes or more hash in parallel threads;
    smaller ones in the calling thread, where a pool's start-up would cost more than their hashing (a tiny run's
    checkpoint: ~1 ms of sha256 against ~1 ms of pool)."""
    paths = [Path(p) for p in paths]
    big = [p for p in paths if p.stat().st_size >= _PARALLEL_MIN]
    threads = min(len(big), os.cpu_count() or 1, _MAX_THREADS)
    if threads <= 1:
        return [sha256_file(p) for p in paths]
    with ThreadPoolExecutor(threads, thread_name_prefix="sha256") as pool:
        futures = {p: pool.submit(sha256_file, p) for p in big}
        return [futures[p].result() if p in futures else sha256_file(p) for p in paths]


class _Follower:
    """One growing file: reads what has been written so far and hashes it."""

    def __init__(self, path: Path):
        self.path = path
        self.file = open(path, "rb", buffering=0)
        self.inode = os.fstat(self.file.fileno()).st_ino
        self.hash = hashlib.sha256()
        self.size = 0

    def advance(self, buf: memoryview) -> int:
        n = self.file.readinto(buf) or 0
        if n:
            self.hash.update(buf[:n])
            self.size += n
        return n

    def finish(self, buf: memoryview) -> Optional[dict[str, Any]]:
        """The digest once the writer is done; None when the file is no longer the one followed."""
        try:
            while self.advance(buf):
                pass
            st = os.stat(self.path)
        except OSError:
            return None
        finally:
            self.file.close()
        if st.st_ino != self.inode or st.st_size != self.size:
            return None
        return {"sha256": self.hash.hexdigest(), "size": self.size}


class HashWhileWriting:
    """Hash the files appearing in ``directory`` whose names ``mine`` accepts while they are written (see the module
    docstring). :meth:`finish` after the writers are done returns ``{name: {sha256, size}}`` for the files it could
    vouch for; :meth:`cancel` stops without a result.

    Between reads that found nothing new it sleeps ``poll_s``, doubled after each idle poll up to ``max_poll_s``
    and back to ``poll_s`` once bytes arrive: while megatron plans the save (Python holding the GIL, no file yet) the
    follower wakes a few dozen times instead of every 2 ms, and while a writer streams it stays at most
    ``max_poll_s`` of writing behind, which :meth:`finish` reads at the end."""

    _event = threading.Event  # the stop flag the thread waits on

    def __init__(self, directory: Path, mine: Callable[[str], bool], poll_s: float = 0.002,
                 max_poll_s: float = 0.016):
        self.directory, self.mine, self.poll_s, self.max_poll_s = Path(directory), mine, poll_s, max_poll_s
        self._followers: dict[str, _Follower] = {}
        self._stop = self._event()
        self._buf = memoryview(bytearray(_CHUNK))
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, name="sha256-while-writing", daemon=True)
        self._thread.start()

    def _scan(self) -> None:
        try:
            entries = list(os.scandir(self.directory))
        except OSError:
            return
        for entry in entries:
            if entry.name not in self._followers and self.mine(entry.name) and entry.is_file(follow_symlinks=False):
                try:
                    self._followers[entry.name] = _Follower(Path(entry.path))
                except OSError:  # gone again (a temporary file renamed)
                    pass

    def _run(self) -> None:
        try:
            wait = self.poll_s
            while not self._stop.is_set():
                self._scan()
                progressed = False
                for f in list(self._followers.values()):
                    while not self._stop.is_set() and f.advance(self._buf):
                        progressed = True
                if progressed:
                    wait = self.poll_s
                else:
                    self._stop.wait(wait)  # finish() wakes it at once
                    wait = min(2 * wait, self.max_poll_s)
        except BaseException as e:  # reported by finish(), which then hashes afresh
            self._error = e

    def finish(self) -> dict[str, dict[str, Any]]:
        self._stop.set()
        self._thread.join()
        if self._error is not None:
            self.cancel()
            return {}
        self._scan()  # files created after the last scan
        out = {}
        for name, f in sorted(self._followers.items()):
            got = f.finish(self._buf)
            if got is not None:
                out[name] = got
        self._followers.clear()
        return out

    def cancel(self) -> None:
        self._stop.set()
        self._thread.join()
        for f in self._followers.values():
            f.file.close()
        self._followers.clear()


# ---------------------------------------------------------------------------------------------------- cached
_memory: dict[str, dict[str, Any]] = {}
_cache_lock = threading.Lock()


def _cache_path() -> Path:
    return Path(os.environ.get("LMFUSION_CACHE") or Path.home() / ".cache" / "lmfusion").expanduser() / \
        "file_sha256.json"


def _key(st: os.stat_result) -> dict[str, int]:
    return {"dev": st.st_dev, "ino": st.st_ino, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _load_cache() -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(_cache_path().read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _store_cache(new: dict[str, dict[str, Any]]) -> None:
    from lmfusion.utils import atomic_write_text

    try:
        merged = {**_load_cache(), **new}  # another process may have added entries meanwhile
        atomic_write_text(_cache_path(), json.dumps(merged, sort_keys=True) + "\n")
    except OSError:
        pass  # read-only home: the in-memory cache still serves this process


def cached_sha256(paths: Iterable[Path]) -> list[dict[str, Any]]:
    """``{"sha256", "size"}`` of each path, from the cache when the file's (device, inode, size, mtime_ns) are those
    it was hashed at, else hashed (in parallel) and remembered."""
    paths = [Path(p).resolve() for p in paths]
    stats = [os.stat(p) for p in paths]
    with _cache_lock:
        if not _memory:
            _memory.update(_load_cache())
        known = [_memory.get(str(p)) for p in paths]
    todo = [i for i, (k, st) in enumerate(zip(known, stats)) if k is None or k.get("stat") != _key(st)]
    if todo:
        fresh = sha256_files(paths[i] for i in todo)
        new = {}
        for i, got in zip(todo, fresh):
            st = os.stat(paths[i])
            if _key(st) == _key(stats[i]):  # unchanged while hashed: remember it
                new[str(paths[i])] = {"stat": _key(st), **got}
            known[i] = {"stat": _key(stats[i]), **got}
        with _cache_lock:
            _memory.update(new)
        if new:
            _store_cache(new)
    return [{"sha256": k["sha256"], "size": k["size"]} for k in known]
