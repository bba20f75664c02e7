"""Reading latent shard sets (``data_tools/build_shards.py`` output) for training.

A :class:`ShardSet` is one set's manifest, checked against the model config when the loader is built (latent shape
and VAE). :func:`read_shard` reads one whole ``.tar`` into memory with WebDataset's tar iterator and key grouping,
verifies it (sha256 from the manifest, sample count, members, latent shapes) and returns its samples; anything off
raises :class:`ShardError`, which the loader turns into a logged, counted skip. A shard is taken whole or not at
all, so a skip does not depend on how far a reader got: the same shards are skipped on every run and resume.
Nothing is unpickled: ``.npy`` members go through ``np.load(allow_pickle=False)``.

Kinds (the manifest's ``kind``, :data:`lmfusion.data.shard_format.KINDS`): ``caption`` (default; one latent and a
caption per sample), ``text`` (a ``txt`` member only: no VAE, no latent block) and ``edit`` (source ``latent.npy``,
``target.npy`` and the instruction as ``txt``; ``std.npy``/``target_std.npy`` with ``store=mean_std``).
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from webdataset.tariterators import group_by_keys, tar_file_iterator

from lmfusion.data import shard_format as fmt
from lmfusion.errors import UserError

__all__ = ["ShardError", "ShardSet", "RawSample", "read_shard", "check_same_vae"]

# What makes two latent sets interchangeable: the same encoder weights and the same scaling applied.
_VAE_IDENTITY = ("kind", "config_hash", "weights_hash", "scaling_factor", "shift_factor")


class ShardError(Exception):
    """A shard that cannot be used (unreadable, truncated, checksum or content mismatch)."""


@dataclass(frozen=True)
class RawSample:
    key: str
    caption: str                  # caption, text (kind text) or instruction (kind edit)
    latent: Optional[np.ndarray]  # (C, H, W) float16/float32, scaled mean or a stored draw; None for text
    std: Optional[np.ndarray]     # (C, H, W) scaled std (store=mean_std) or None
    target: Optional[np.ndarray] = None      # kind edit: the target image's latent
    target_std: Optional[np.ndarray] = None


@dataclass(frozen=True)
class ShardEntry:
    path: str
    samples: int
    sha256: str


class ShardSet:
    """One shard-set directory: its manifest, checked against the model's latent shape and an expected VAE."""

    def __init__(self, directory: str | Path, latent_shape: Sequence[int], expected_vae: Optional[str] = None):
        self.directory = Path(directory).expanduser().resolve()
        self.manifest = fmt.read_manifest(self.directory)
        where = self.directory / fmt.MANIFEST
        self.kind = str(self.manifest.get("kind", "caption"))
        if self.kind not in fmt.KINDS:
            raise UserError(f"{where}: field 'kind' is {self.kind!r}, expected one of {list(fmt.KINDS)}")
        self.latent_shape = tuple(latent_shape)
        if self.kind == "text":  # no latents, no VAE
            self.vae, self.store, self.has_std = {}, "none", False
        else:
            self._read_latent_block(where, latent_shape, expected_vae)
        self.fingerprint = str(self.manifest.get("fingerprint", ""))
        shards = self._field(self.manifest, "shards", where)
        # Shards with no valid sample hold nothing to read: leaving them out keeps the order deterministic.
        self.shards = [ShardEntry(str(self.directory / s["name"]), int(s["samples"]), str(s.get("sha256", "")))
                       for s in shards if int(s["samples"]) > 0]
        if not self.shards:
            raise UserError(f"{where}: no shard holds a sample")
        self.num_samples = sum(s.samples for s in self.shards)

    def _read_latent_block(self, where: Path, latent_shape: Sequence[int], expected_vae: Optional[str]) -> None:
        latent = self._field(self.manifest, "latent", where)
        shape = list(self._field(latent, "shape", where, "latent."))
        if shape != list(latent_shape):
            raise UserError(f"{where}: latent.shape {shape} does not match the model config "
                            f"(model.image latent_channels, latent_size, latent_size) = {list(latent_shape)}")
        self.vae: dict[str, Any] = dict(self._field(self.manifest, "vae", where))
        if not self.vae.get("factors_applied", False):
            raise UserError(f"{where}: vae.factors_applied is not true; these latents are not scaled for training")
        if expected_vae is not None and expected_vae not in (self.vae.get("id"), self.vae.get("path"),
                                                             self.vae.get("weights_hash")):
            raise UserError(f"{where}: vae {self.vae.get('id')!r} (path {self.vae.get('path')!r}) is not the "
                            f"expected data.vae {expected_vae!r}")
        self.store = str(self._field(latent, "store", where, "latent."))
        self.has_std = bool(latent.get("std", self.store == "mean_std"))

    @staticmethod
    def _field(obj: dict[str, Any], key: str, where: Path, prefix: str = "") -> Any:
        if not isinstance(obj, dict) or key not in obj:
            raise UserError(f"{where}: missing field '{prefix}{key}'")
        return obj[key]

    def vae_identity(self) -> dict[str, Any]:
        return {k: self.vae.get(k) for k in _VAE_IDENTITY}


def check_same_vae(sets: Sequence[ShardSet]) -> None:
    """Blended sets must hold latents of one VAE with one scaling, or the image model sees two distributions."""
    sets = [s for s in sets if s.kind != "text"]  # text sets hold no latents
    if not sets:
        return
    first = sets[0]
    for other in sets[1:]:
        if other.vae_identity() != first.vae_identity():
            diff = [k for k in _VAE_IDENTITY if other.vae.get(k) != first.vae.get(k)]
            raise UserError(f"{other.directory / fmt.MANIFEST}: vae differs from {first.directory / fmt.MANIFEST} "
                            f"in {diff} ({other.vae.get('id')!r} vs {first.vae.get('id')!r}); blended shard sets "
                            f"must share one VAE")


def read_shard(entry: ShardEntry, latent_shape: tuple[int, ...], has_std: bool, verify_checksum: bool,
               kind: str = "caption") -> list[RawSample]:
    """All samples of one shard, in file order; :class:`ShardError` naming the shard if anything is off."""
    path = entry.path
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ShardError(f"{path}: cannot read ({e})") from e
    if verify_checksum and entry.sha256 and hashlib.sha256(data).hexdigest() != entry.sha256:
        raise ShardError(f"{path}: sha256 differs from the manifest (corrupt or replaced; {len(data)} bytes)")
    samples: list[RawSample] = []
    try:
        files = ({**f, "__url__": path} for f in tar_file_iterator(io.BytesIO(data)))
        for group in group_by_keys(files):
            samples.append(_decode(group, path, latent_shape, has_std, kind))
    except ShardError:
        raise
    except Exception as e:  # tarfile.ReadError, EOFError, ValueError from the tar or key grouping
        raise ShardError(f"{path}: unreadable tar after {len(samples)} samples ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from e
    if len(samples) != entry.samples:
        raise ShardError(f"{path}: {len(samples)} samples, the manifest lists {entry.samples} (truncated?)")
    return samples


def _decode(group: dict[str, Any], path: str, latent_shape: tuple[int, ...], has_std: bool,
            kind: str = "caption") -> RawSample:
    key = group["__key__"]
    arrays_of = {"text": (), "caption": ("latent.npy",), "edit": ("latent.npy", "target.npy")}[kind]
    if has_std:
        arrays_of = {"caption": ("latent.npy", "std.npy"),
                     "edit": ("latent.npy", "std.npy", "target.npy", "target_std.npy")}[kind]
    need = list(arrays_of) + ["txt"]
    missing = [m for m in need if m not in group]
    if missing:
        raise ShardError(f"{path}: sample {key} lacks member(s) {missing}")
    arrays = []
    for member in arrays_of:
        try:
            arr = fmt.load_npy(group[member], f"{path}:{key}.{member}")
        except ValueError as e:
            raise ShardError(str(e)) from e
        if tuple(arr.shape) != tuple(latent_shape) or arr.dtype.kind != "f":
            raise ShardError(f"{path}: {key}.{member} is {arr.dtype} {tuple(arr.shape)}, expected float "
                             f"{tuple(latent_shape)}")
        arrays.append(arr)
    try:
        caption = group["txt"].decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise ShardError(f"{path}: {key}.txt is not UTF-8 ({e})") from e
    named = dict(zip(arrays_of, arrays))
    return RawSample(key=key, caption=caption, latent=named.get("latent.npy"), std=named.get("std.npy"),
                     target=named.get("target.npy"), target_std=named.get("target_std.npy"))
