"""The latent-shard format shared by the builder (``data_tools/build_shards.py``), the inspector and the training
data loader (:mod:`lmfusion.data.shards`).

A shard set is a directory::

    manifest.json          VAE identity + factors, latent shape/dtype, per-shard counts, totals, rejects by reason
    rejects.jsonl          one line per rejected input: index, source, reason, detail, shard
    shard-000000.tar ...   WebDataset tars; global shard index, independent of how many ranks built them
    .build/                plan + per-shard stats used for resume and the final merge (not read by loaders)

Each sample in a tar is four (or three) members sharing a key, the input's global index as ten digits::

    0000000042.latent.npy  float16/float32 (C, h, w): the scaled latent mean (store=mean_std|mean) or a scaled sample
    0000000042.std.npy     same shape: the scaled latent std (store=mean_std only)
    0000000042.txt         caption, UTF-8
    0000000042.json        {"key", "source", "original_size": [w, h], "crop_box": [l, t, r, b], "vae": id}

"Scaled" means the VAE factors are already applied: ``latent = (z - shift_factor) * scaling_factor`` and
``std = std_z * scaling_factor``; a loader draws ``latent + std * eps`` and the diffusion model sees unit-scale
latents. To decode, undo it: ``z = latent / scaling_factor + shift_factor``.

Determinism: tar members carry fixed metadata (mtime, uid/gid, names, mode) in a fixed order, ``.npy`` bytes come
from ``np.save(allow_pickle=False)``, JSON is written with sorted keys: same inputs and options give byte-identical
shards. Nothing here unpickles: ``.npy`` members are read with ``allow_pickle=False``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmfusion.errors import UserError
from lmfusion.utils import atomic_write_bytes

FORMAT_NAME = "lmfusion-latent-shards"
FORMAT_VERSION = 1
#: What a shard set's samples are (manifest field ``kind``; absent means ``caption``): image + caption, plain text
#: (``key.txt`` + ``key.json`` only, no VAE), or an editing triple (``key.latent.npy`` source, ``key.target.npy``
#: target, ``key.txt`` instruction; ``std.npy`` / ``target_std.npy`` with store=mean_std).
KINDS = ("caption", "text", "edit")
MANIFEST = "manifest.json"
REJECTS = "rejects.jsonl"
BUILD_DIR = ".build"
KEY_DIGITS = 10
# A fixed member mtime (2000-01-01T00:00:00Z) rather than 0: some tar tools warn on epoch-0 timestamps.
TAR_MTIME = 946684800


def shard_name(index: int) -> str:
    """File name of global shard ``index``: shard ``i`` holds inputs ``[i*S, (i+1)*S)`` whoever built it."""
    return f"shard-{index:06d}.tar"


def sample_key(index: int) -> str:
    """WebDataset key of the input with global ``index`` (no dots: WebDataset splits key and field at a dot)."""
    return f"{index:0{KEY_DIGITS}d}"


def dumps_json(obj: Any) -> str:
    """Deterministic JSON text (sorted keys, fixed separators)."""
    return json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=False)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (dumps_json(obj) + "\n").encode("utf-8"))


def npy_bytes(array: np.ndarray) -> bytes:
    """``.npy`` bytes of ``array`` (never pickled)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def load_npy(data: bytes, what: str) -> np.ndarray:
    """Parse ``.npy`` bytes without unpickling; ``what`` names the member in the error."""
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as e:  # object arrays need pickle: refused
        raise UserError(f"{what}: not a plain .npy array ({e})") from e


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class DeterministicTarWriter:
    """Append members with fixed metadata to an uncompressed USTAR tar (byte-identical for identical input)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._tar = tarfile.open(self.path, "w", format=tarfile.USTAR_FORMAT)

    def add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = TAR_MTIME
        info.mode = 0o444
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.type = tarfile.REGTYPE
        self._tar.addfile(info, io.BytesIO(data))

    def close(self) -> None:
        self._tar.close()
        with open(self.path, "rb+") as f:
            os.fsync(f.fileno())


def iter_samples(path: Path):
    """Yield ``(key, {field: bytes})`` per sample of a shard, grouping consecutive members by key as WebDataset does."""
    key, fields = None, {}
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            base = os.path.basename(member.name)
            k, _, field = base.partition(".")
            if k != key and key is not None:
                yield key, fields
                fields = {}
            key = k
            f = tar.extractfile(member)
            fields[field] = f.read() if f is not None else b""
    if key is not None:
        yield key, fields


def read_manifest(directory: Path) -> dict[str, Any]:
    """Load and sanity-check ``manifest.json`` of a shard set; clear one-line errors on anything off."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no manifest (build_shards did not finish, or this is not a shard set)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from e
    if manifest.get("format") != FORMAT_NAME:
        raise UserError(f"{path}: field 'format' is {manifest.get('format')!r}, expected {FORMAT_NAME!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path}: field 'format_version' is {manifest.get('format_version')!r}, "
                        f"this code reads {FORMAT_VERSION}")
    return manifest


# ----------------------------------------------------------------------------------------------------- the VAE
def _config_hash(config: dict[str, Any]) -> str:
    """sha256 of a diffusers config, ignoring bookkeeping keys (``_diffusers_version`` etc.) except the class."""
    kept = {k: v for k, v in config.items() if not k.startswith("_") or k == "_class_name"}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()


def _resolve_vae_dir(path: str) -> Path:
    """A diffusers VAE directory, or a pipeline directory with a ``vae/`` subfolder."""
    p = Path(path).expanduser().resolve()
    if (p / "config.json").is_file():
        return p
    if (p / "vae" / "config.json").is_file():
        return p / "vae"
    raise FileNotFoundError(f"--vae {path}: no config.json there (nor in vae/); expected a local diffusers "
                            "AutoencoderKL/AutoencoderTiny directory (save_pretrained output) or 'identity'")


@dataclass
class LatentCodec:
    """A VAE (or the pixel identity) with its scaling/shift factors applied, plus what identifies it.

    ``encode`` maps images in [-1, 1] to scaled ``(mean, std)``; ``std`` is ``None`` for deterministic encoders
    (AutoencoderTiny, identity). ``decode`` maps scaled latents back to images in [-1, 1].
    """

    kind: str                      # "AutoencoderKL" | "AutoencoderTiny" | "identity"
    path: str                      # resolved directory, or "identity"
    config_hash: str
    weights_hash: str
    scaling_factor: float
    shift_factor: float
    model: torch.nn.Module | None
    device: torch.device
    dtype: torch.dtype
    extra: dict[str, Any]

    @property
    def deterministic(self) -> bool:
        return self.kind != "AutoencoderKL"

    @property
    def vae_id(self) -> str:
        """Short identity string stored in every sample's JSON."""
        if self.kind == "identity":
            return "identity"
        return f"{self.kind}:{Path(self.path).name}:{self.config_hash[:12]}"

    def describe(self) -> dict[str, Any]:
        """The manifest's ``vae`` block: what a loader checks before training on these latents."""
        return {"kind": self.kind, "path": self.path, "id": self.vae_id, "config_hash": self.config_hash,
                "weights_hash": self.weights_hash, "scaling_factor": self.scaling_factor,
                "shift_factor": self.shift_factor, "factors_applied": True,
                "encode_dtype": str(self.dtype).removeprefix("torch."), **self.extra}

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, 3, H, W) in [-1, 1] -> scaled float32 mean (B, C, h, w) and std (or None)."""
        if self.model is None:
            return images.float(), None
        x = images.to(self.dtype)
        if self.kind == "AutoencoderKL":
            dist = self.model.encode(x).latent_dist
            mean, std = dist.mean.float(), dist.std.float()
        else:
            mean, std = self.model.encode(x).latents.float(), None
        mean = (mean - self.shift_factor) * self.scaling_factor
        return mean, (std * self.scaling_factor if std is not None else None)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, C, h, w) -> images (B, 3, H, W) in [-1, 1] (float32)."""
        if self.model is None:
            return latents.float().clamp(-1, 1)
        z = latents.to(self.device, torch.float32) / self.scaling_factor + self.shift_factor
        return self.model.decode(z.to(self.dtype)).sample.float().clamp(-1, 1)


def load_codec(spec: str, device: torch.device, dtype: torch.dtype) -> LatentCodec:
    """``spec`` is ``identity`` or a local diffusers directory holding an AutoencoderKL or AutoencoderTiny."""
    if spec == "identity":
        return LatentCodec("identity", "identity", "identity", "identity", 1.0, 0.0, None, device,
                           torch.float32, {})
    from diffusers import AutoencoderKL, AutoencoderTiny  # heavy import, only when a VAE is used

    root = _resolve_vae_dir(spec)
    try:
        config = json.loads((root / "config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{root / 'config.json'}: not valid JSON ({e})") from e
    kind = config.get("_class_name")
    classes = {"AutoencoderKL": AutoencoderKL, "AutoencoderTiny": AutoencoderTiny}
    if kind not in classes:
        raise UserError(f"{root / 'config.json'}: field '_class_name' is {kind!r}; build_shards supports "
                        "AutoencoderKL and AutoencoderTiny")
    weights = sorted(p for p in root.iterdir() if p.suffix in (".safetensors", ".bin"))
    if not weights:
        raise FileNotFoundError(f"{root}: no .safetensors/.bin weights next to config.json")
    # Prefer safetensors; diffusers reads a .bin fallback with torch.load(weights_only=True).
    model = classes[kind].from_pretrained(root, local_files_only=True, torch_dtype=dtype, low_cpu_mem_usage=False,
                                          use_safetensors=any(p.suffix == ".safetensors" for p in weights))
    model.to(device=device).eval().requires_grad_(False)
    weights_hash = hashlib.sha256("".join(sha256_file(p) for p in weights).encode()).hexdigest()
    scaling = float(config.get("scaling_factor") or 1.0)
    shift = float(config.get("shift_factor") or 0.0)
    extra = {k: config[k] for k in ("latents_mean", "latents_std") if config.get(k) is not None}
    if extra:  # per-channel statistics some pipelines use; recorded for the loader, not applied here
        extra["latents_mean_std_applied"] = False
    return LatentCodec(kind, str(root), _config_hash(config), weights_hash, scaling, shift, model, device,
                       dtype, extra)
