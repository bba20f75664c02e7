"""The run-directory contract (lmfusion.rundir) without training: latest, lock, integrity, base hash, safe reading.

Each test names the issue-#18 item it covers; the training-level behaviour (resume, generate, export on a real run)
is in tests/distributed/test_rundir.py.
"""

from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmfusion import rundir
from lmfusion.rundir import integrity


def _fake_iteration(run_dir: Path, n: int) -> Path:
    """A complete iteration directory as the save protocol leaves it (files, manifest, record last)."""
    d = run_dir / rundir.iter_name(n)
    d.mkdir(parents=True)
    (d / "__0_0.distcp").write_bytes(os.urandom(4096))
    (d / rundir.TRAIN_STATE).write_text("{}")
    record = {"base": "b", "model": {}, "integrity": integrity.write_manifest(d, integrity.hash_files(d))}
    (d / rundir.CHECKPOINT_JSON).write_text(json.dumps(record))
    return d


# ---------------------------------------------------------------------------------------------------- 6: latest
def test_latest_left_behind_by_a_crash_is_repaired_to_the_newest_complete_iteration(tmp_path):
    """Item 6: a crash between renaming iter_N and rewriting latest. The newest complete iteration wins, latest is
    rewritten (and said so); an incomplete directory (no record) is never chosen; a save of a step that already
    exists points latest at it."""
    for n in (1, 2):
        _fake_iteration(tmp_path, n)
    (tmp_path / rundir.iter_name(3)).mkdir()  # renamed by hand, or an old layout: no record, not complete
    (tmp_path / rundir.LATEST).write_text(rundir.iter_name(1) + "\n")
    said = []
    assert rundir.find_checkpoint(tmp_path, repair=True, log=said.append) == tmp_path / rundir.iter_name(2)
    assert (tmp_path / rundir.LATEST).read_text().strip() == rundir.iter_name(2)
    assert len(said) == 1 and "iter_0000001" in said[0] and "repaired" in said[0]
    (tmp_path / rundir.LATEST).write_text(rundir.iter_name(1) + "\n")
    assert rundir.begin_save(tmp_path, 2) is None  # step 2 exists: no save, and latest now names it
    assert (tmp_path / rundir.LATEST).read_text().strip() == rundir.iter_name(2)


def test_latest_naming_nothing_complete_is_one_line(tmp_path):
    (tmp_path / rundir.LATEST).write_text("iter_0000009\n")
    with pytest.raises(FileNotFoundError, match=r"latest: names iter_0000009, which is not a complete checkpoint"):
        rundir.find_checkpoint(tmp_path)
    assert rundir.find_checkpoint(tmp_path / "empty") is None


# ---------------------------------------------------------------------------------------------------- 5: lock
_HOLD = """
import sys, time
from lmfusion.rundir import RunLock
lock = RunLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(60)
"""


def test_second_training_is_refused_by_the_lock_naming_its_owner(tmp_path):
    """Item 5: while one process holds RUN/run.lock, acquiring it fails with one line naming the holder's host and
    pid; when the holder is killed (kill -9: no cleanup) the stale file is taken over on the same host."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                                        os.environ.get("PYTHONPATH", "")])}
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              env=env)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(rundir.RunLocked, match=rf"run.lock: held by a running training \(host "
                                                    rf"{socket.gethostname()}, pid {holder.pid},"):
            rundir.RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    said = []
    with rundir.RunLock(tmp_path, log=said.append):
        assert json.loads((tmp_path / rundir.LOCK).read_text())["pid"] == os.getpid()
        assert said and f"stale lock of pid {holder.pid}" in said[0]
    assert not (tmp_path / rundir.LOCK).exists()


def test_lock_left_by_another_host_is_reported_with_the_command_to_clear_it(tmp_path):
    (tmp_path / rundir.LOCK).write_text(json.dumps({"host": "node-17", "pid": 4242, "since": "2026-01-01"}))
    with pytest.raises(rundir.RunLocked, match=rf"left by host node-17 pid 4242 .* clear it with: rm "
                                                rf"{tmp_path / rundir.LOCK}$"):
        rundir.RunLock(tmp_path).acquire()


# ---------------------------------------------------------------------------------------------------- 4, 7: integrity
@pytest.mark.parametrize("damage, words", [
    ("flip", r"__0_0.distcp: sha256 \w+, expected \w+ \(changed since the save\)"),
    ("truncate", r"__0_0.distcp: 100 bytes, expected 4096 \(truncated"),
    ("remove", r"__0_0.distcp: missing \(expected 4096 bytes\)"),
    ("manifest", r"integrity.json: sha256 \w+, expected \w+ \(from lmfusion_checkpoint.json"),
])
def test_damaged_checkpoint_files_are_named_in_one_line(tmp_path, damage, words):
    """Items 4 and 7: 64 flipped bytes, a truncated or a missing file, an edited manifest: one line naming it."""
    d = _fake_iteration(tmp_path, 1)
    record = json.loads((d / rundir.CHECKPOINT_JSON).read_text())
    assert integrity.verify(d, record)
    f = d / "__0_0.distcp"
    if damage == "flip":
        data = bytearray(f.read_bytes())
        data[1000:1064] = bytes(b ^ 0xFF for b in data[1000:1064])
        f.write_bytes(bytes(data))
    elif damage == "truncate":
        f.write_bytes(f.read_bytes()[:100])
    elif damage == "remove":
        f.unlink()
    else:
        (d / integrity.INTEGRITY).write_text((d / integrity.INTEGRITY).read_text().replace("4096", "4097"))
    with pytest.raises(integrity.IntegrityError, match=words) as e:
        integrity.verify(d, record)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------------- 2: base hash
def test_a_replaced_base_is_refused_by_its_hash(tmp_path):
    """Item 2 (unit level): the record's base hash against another conversion of a same-shape model."""
    for name, stamp in (("a", "2026-01-01"), ("b", "2026-01-02")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "conversion.json").write_text(json.dumps({"created_at": stamp}))
    record = {"base": "a", "base_conversion_sha256": rundir.base_sha256(tmp_path / "a")}
    rundir.check_base(record, tmp_path / rundir.CHECKPOINT_JSON, tmp_path / "a")
    with pytest.raises(ValueError, match=r"b/conversion.json: sha256 \w+, expected \w+ .* was replaced"):
        rundir.check_base(record, tmp_path / rundir.CHECKPOINT_JSON, tmp_path / "b")


def _base(directory: Path, weights: bytes) -> Path:
    directory.mkdir()
    (directory / "conversion.json").write_text(json.dumps({"created_at": "2026-01-01"}))
    (directory / "model.safetensors").write_bytes(weights)
    (directory / "tokenizer.json").write_text("{}")
    return directory


@pytest.fixture
def digest_cache(tmp_path, monkeypatch):
    from lmfusion.rundir import digest

    monkeypatch.setenv("LMFUSION_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(digest, "_memory", {})
    return digest


def test_replaced_base_weights_are_refused_even_with_conversion_json_kept(tmp_path, digest_cache):
    """Item 2: the base's safetensors replaced by another same-shape (same size) model, conversion.json untouched:
    refused naming the weight file. An unchanged base is checked from the digest cache (a stat per file)."""
    base = _base(tmp_path / "base", os.urandom(5000))
    record = {"base": str(base), "base_conversion_sha256": rundir.base_sha256(base),
              "base_files": rundir.base_files(base)}
    assert set(record["base_files"]) == {"model.safetensors", "tokenizer.json"}
    where = tmp_path / rundir.CHECKPOINT_JSON
    hashed = []
    real = digest_cache.sha256_files

    def counting(paths):
        paths = list(paths)
        hashed.extend(paths)
        return real(paths)

    digest_cache.sha256_files = counting
    try:
        rundir.check_base(record, where, base)
        assert hashed == []  # cached: nothing rehashed
        assert (tmp_path / "cache" / "file_sha256.json").is_file()
        other = tmp_path / "other.safetensors"
        other.write_bytes(os.urandom(5000))
        os.replace(other, base / "model.safetensors")
        with pytest.raises(ValueError, match=r"base/model.safetensors: sha256 \w+, expected \w+ \(the base .* were "
                                             r"replaced or changed"):
            rundir.check_base(record, where, base)
        assert [p.name for p in hashed] == ["model.safetensors"]
    finally:
        digest_cache.sha256_files = real
    (base / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match=r"tokenizer.json: missing, expected 2 bytes"):
        rundir.check_base(record, where, base)
    (base / "model.safetensors").write_bytes(os.urandom(10))
    with pytest.raises(ValueError, match=r"model.safetensors: 10 bytes, expected 5000"):
        rundir.check_base(record, where, base)


def test_a_record_from_before_base_file_hashes_is_checked_by_conversion_json_and_warns_once(tmp_path, digest_cache):
    base = _base(tmp_path / "base", os.urandom(100))
    record = {"base": str(base), "base_conversion_sha256": rundir.base_sha256(base)}
    said = []
    for _ in range(2):
        rundir.check_base(record, tmp_path / "old" / rundir.CHECKPOINT_JSON, base, warn=said.append)
    assert len(said) == 1 and "predates per-file base hashes" in said[0] and "conversion.json was checked" in said[0]
    (base / "conversion.json").write_text("{}")
    with pytest.raises(ValueError, match="conversion.json: sha256"):
        rundir.check_base(record, tmp_path / "old" / rundir.CHECKPOINT_JSON, base, warn=said.append)


# ---------------------------------------------------------------------------------------------------- 1: trust
class _Payload:
    """Unpickling runs ``code`` (touching a marker file), then returns ``then`` so the load would carry on."""

    def __init__(self, marker: Path, then: bytes):
        self.marker, self.then = marker, then

    def __reduce__(self):
        code = f"__import__('pathlib').Path({str(self.marker)!r}).touch() or __import__('pickle').loads({self.then!r})"
        return eval, (code,)


class _ObjectPayload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return eval, (f"__import__('pathlib').Path({str(self.marker)!r}).touch() or 0",)


def _save(directory: Path, obj) -> dict:
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    def sharded(t, o):
        return {"w": ShardedTensor.from_rank_offsets("w", t), "obj": ShardedObject("obj", o, (1,), (0,))}

    directory.mkdir(parents=True)
    dist_checkpointing.save(sharded(torch.arange(6.0), obj), str(directory))
    return sharded(torch.zeros(6), None)


def test_pickle_payload_in_metadata_is_refused_and_never_runs(runtime, tmp_path):
    """Item 1: ``.metadata`` replaced by a pickle that runs code and then returns the real metadata. megatron's own
    load runs it (the marker appears: what `generate` and resume did before); the run directory's reader refuses it
    by name and the code never runs."""
    from megatron.core import dist_checkpointing

    d = tmp_path / "ckpt"
    template = _save(d, {"step": torch.tensor(3)})
    marker = tmp_path / "ran"
    (d / ".metadata").write_bytes(pickle.dumps(_Payload(marker, (d / ".metadata").read_bytes())))
    with pytest.raises(rundir.UnsafeCheckpoint, match=r"\.metadata: refuses to unpickle builtins\.eval"):
        rundir.load_dist_checkpoint(template, d)
    assert not marker.exists()
    dist_checkpointing.load(_save(tmp_path / "again", {"step": torch.tensor(3)}), str(tmp_path / "again"))
    (tmp_path / "again" / ".metadata").write_bytes((d / ".metadata").read_bytes())
    dist_checkpointing.load(template, str(tmp_path / "again"))  # the unguarded path: the payload runs
    assert marker.exists()


def test_pickle_payload_in_an_object_entry_is_refused_and_never_runs(runtime, tmp_path):
    """Item 1: an object entry (as the RNG state is stored) holding a payload: refused by weights-only loading."""
    d = tmp_path / "ckpt"
    marker = tmp_path / "ran"
    template = _save(d, _ObjectPayload(marker))
    with pytest.raises(rundir.UnsafeCheckpoint, match=r"object entry 'obj.*refused by torch.load\(weights_only=True"):
        rundir.load_dist_checkpoint(template, d)
    assert not marker.exists()
    good = tmp_path / "good"
    loaded = rundir.load_dist_checkpoint(_save(good, {"step": torch.tensor(3)}), good)
    assert torch.equal(loaded["w"], torch.arange(6.0)) and int(loaded["obj"]["step"]) == 3


# ---------------------------------------------------------------------------------------------------- 7: disk full
def _checkpoint_exception(text: str):
    """What megatron raises on every rank when a writer process failed: torch's CheckpointException, whose per-rank
    exception only carries the writer's OSError as text (it crossed process boundaries)."""
    import traceback

    from torch.distributed.checkpoint.api import CheckpointException

    return CheckpointException("write", {0: (RuntimeError(f"Worker failure: {text}"), traceback.StackSummary())})


@pytest.mark.parametrize("error, where, words", [
    (OSError(28, "No space left on device", "FILE"), "FILE", "no space left on device writing"),
    ("checkpoint_exception", "FILE", "no space left on device writing"),
    (OSError(122, "Disk quota exceeded"), "TMP", "disk quota exceeded writing"),
    (RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0"), "TMP", "cannot write"),
])
def test_a_failed_checkpoint_write_is_one_line_naming_the_file(tmp_path, error, where, words):
    """Item 7: a disk filling up mid-save surfaced as torch's 'enforce fail at inline_container.cc' traceback, or
    megatron's multi-rank CheckpointException wall. The save's guard turns each into one line naming the file (or the
    directory when the error names none), saying the previous checkpoint stays latest, and removes the partial
    temporary directory."""
    tmp = tmp_path / ".tmp_iter_0000002"
    tmp.mkdir()
    (tmp / "__0_0.distcp").write_bytes(b"partial")
    file = tmp / "__0_0.distcp"
    if error == "checkpoint_exception":
        error = _checkpoint_exception(f"[Errno 28] No space left on device: '{file}'")
    elif isinstance(error, OSError) and error.filename == "FILE":
        error = OSError(error.errno, error.strerror, str(file))
    with pytest.raises(rundir.CheckpointWriteError) as e:
        with rundir.write_guard(tmp):
            raise error
    text = str(e.value)
    assert text.startswith(f"{words} {file if where == 'FILE' else tmp}") and "\n" not in text, text
    assert "iter_0000002 was not saved and the previous checkpoint stays latest" in text, text
    assert ("is the disk full?" in text) == text.startswith("cannot write"), text
    assert not tmp.exists()


def test_a_failed_write_of_the_record_is_one_line_and_publishes_nothing(tmp_path, monkeypatch):
    """Item 7: the disk fills up while finish_save writes the manifest/record: one line naming the file, no iter_N,
    latest unchanged, the temporary directory removed."""
    import errno

    from lmfusion.rundir import save as save_mod

    _fake_iteration(tmp_path, 1)
    (tmp_path / rundir.LATEST).write_text(rundir.iter_name(1) + "\n")
    tmp, final = rundir.begin_save(tmp_path, 2)
    (tmp / "__0_0.distcp").write_bytes(os.urandom(1000))
    real = save_mod.atomic_write_text

    def full(path, text):
        if Path(path).name == rundir.CHECKPOINT_JSON:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, text)

    monkeypatch.setattr(save_mod, "atomic_write_text", full)
    with pytest.raises(rundir.CheckpointWriteError, match=rf"^no space left on device writing "
                                                          rf"{tmp / rundir.CHECKPOINT_JSON}: the checkpoint"):
        rundir.finish_save(tmp, final, {}, {"base": "b", "model": {}}, "", keep_last=None)
    assert not final.exists() and not tmp.exists()
    assert (tmp_path / rundir.LATEST).read_text().strip() == rundir.iter_name(1)
    assert rundir.find_checkpoint(tmp_path) == tmp_path / rundir.iter_name(1)


# ---------------------------------------------------------------------------------------------------- hashing cost
def test_files_hashed_while_written_match_a_fresh_hash(tmp_path):
    """Item 4 (cost): a writer appends to two files (another process, as megatron's forked writers do) while they are
    followed; the manifest built from the followed digests equals hashing the finished files afresh. A file the
    follower does not own, and one replaced under its name while followed (another inode), are hashed afresh."""
    from lmfusion.rundir.digest import HashWhileWriting, sha256_file

    script = (
        "import os, sys, time\n"
        "d = sys.argv[1]\n"
        "fs = [open(os.path.join(d, n), 'wb') for n in ('__0_0.distcp', '__0_1.distcp', 'replaced')]\n"
        "for i in range(40):\n"
        "    for f in fs:\n"
        "        f.write(os.urandom(50000)); f.flush()\n"
        "    time.sleep(0.005)\n"
        "for f in fs: f.close()\n"
        "open(os.path.join(d, 'other.bin'), 'wb').write(os.urandom(3000))\n"
        "open(os.path.join(d, 'new'), 'wb').write(os.urandom(777))\n"
        "os.replace(os.path.join(d, 'new'), os.path.join(d, 'replaced'))\n")
    follower = HashWhileWriting(tmp_path, lambda name: name.startswith("__0_") or name == "replaced")
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True)
    files = integrity.hash_files(tmp_path, written=follower)
    fresh = {p.name: sha256_file(p) for p in tmp_path.iterdir()}
    assert files == fresh
    assert files["__0_0.distcp"]["size"] == 40 * 50000 and files["replaced"]["size"] == 777


def test_the_follower_backs_off_while_nothing_is_written_and_returns_to_the_short_poll_on_bytes(tmp_path):
    """Item 4 (cost): between polls that found nothing the follower's wait doubles up to max_poll_s (megatron's
    planning holds the GIL for most of a small save, with no file to read), and bytes bring it back to poll_s."""
    import threading

    from lmfusion.rundir.digest import HashWhileWriting

    waits, target = [], tmp_path / "__0_0.distcp"

    class Recording(threading.Event):  # records the follower's waits instead of sleeping; writes after the 6th
        def wait(self, timeout=None):
            if timeout is None:
                return super().wait()
            waits.append(timeout)
            if len(waits) == 6:
                target.write_bytes(os.urandom(1000))
            if len(waits) == 12:
                self.set()
            return self.is_set()

    class Recorded(HashWhileWriting):
        _event = Recording

    follower = Recorded(tmp_path, lambda name: name.startswith("__0_"), poll_s=0.002, max_poll_s=0.016)
    follower._thread.join(timeout=30)
    assert waits == [0.002, 0.004, 0.008, 0.016, 0.016, 0.016, 0.002, 0.004, 0.008, 0.016, 0.016, 0.016]
    assert follower.finish()["__0_0.distcp"]["size"] == 1000


def test_a_changed_file_is_named_after_an_overlapped_load(tmp_path):
    """Item 4 (cost): sizes and the manifest are checked before anything is read; the sha256s while the caller reads
    (start_verify), and result() names a changed file."""
    d = _fake_iteration(tmp_path, 1)
    record = json.loads((d / rundir.CHECKPOINT_JSON).read_text())
    assert integrity.start_verify(d, record).result()
    data = bytearray((d / "__0_0.distcp").read_bytes())
    data[10] ^= 0xFF
    (d / "__0_0.distcp").write_bytes(bytes(data))
    check = integrity.start_verify(d, record)  # same size: nothing to say yet
    with pytest.raises(integrity.IntegrityError, match=r"__0_0.distcp: sha256 \w+, expected \w+ \(changed"):
        check.result()
    (d / "__0_0.distcp").write_bytes(bytes(data[:-1]))
    with pytest.raises(integrity.IntegrityError, match=r"__0_0.distcp: 4095 bytes, expected 4096"):
        integrity.start_verify(d, record)


@pytest.mark.parametrize("parallel_min", [0, 3000, 1 << 40])
def test_sha256_files_equal_hashlib_in_order_whichever_files_go_to_threads(tmp_path, monkeypatch, parallel_min):
    """Files at or above the threshold hash in a pool, the rest in the caller: the result is the same list."""
    import hashlib

    from lmfusion.rundir import digest

    monkeypatch.setattr(digest, "_PARALLEL_MIN", parallel_min)
    paths = []
    for i, n in enumerate((5000, 10, 0, 4096, 3000, 70000)):
        p = tmp_path / f"f{i}"
        p.write_bytes(os.urandom(n))
        paths.append(p)
    want = [{"sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "size": p.stat().st_size} for p in paths]
    assert digest.sha256_files(paths) == want
