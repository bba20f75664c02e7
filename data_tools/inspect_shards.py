"""Validate a latent shard set written by build_shards, and decode a few latents back to a PNG grid.

Usage::

    python data_tools/inspect_shards.py DIR                       # validate; exit 1 on any problem
    python data_tools/inspect_shards.py DIR --grid grid.png -n 16  # also decode the first 16 latents with the VAE

Every kind of set (``caption``, ``text``, ``edit``; the manifest's ``kind``) is checked against its own members; an
editing set's ``target.npy`` (and ``target_std.npy``) like its source latent; a grid of an editing set shows each
source followed by its target; a text set has nothing to decode.

Checks: every shard listed in ``manifest.json`` exists with the recorded size and sha256 and no unlisted shard sits
beside them; every sample has exactly the manifest's members; latents (and stds) have the manifest's shape and dtype
and are finite (stds non-negative); captions are non-empty UTF-8; JSON metadata parses and names its key; keys are
unique across shards; per-shard and total counts, and ``rejects.jsonl``, agree with the manifest. ``.npy`` members
are read with ``allow_pickle=False``.

The grid decodes with the VAE recorded in the manifest (or ``--vae``), refusing a VAE whose config or weights hash
differs from the one that encoded the shards.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `data_tools` and `lmfusion` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from PIL import Image

from lmfusion.data import shard_format as fmt
from lmfusion.utils import atomic_write_bytes


@dataclass
class Report:
    """What validation found: problems (one line each, naming shard/key/field) and counts."""

    problems: list[str] = field(default_factory=list)
    shards: int = 0
    samples: int = 0
    max_problems: int = 50

    def add(self, msg: str) -> None:
        if len(self.problems) < self.max_problems:
            self.problems.append(msg)
        elif len(self.problems) == self.max_problems:
            self.problems.append("... more problems not shown")

    @property
    def ok(self) -> bool:
        return not self.problems


def _check_array(report: Report, where: str, data: bytes, shape: list[int], dtype: str, nonneg: bool) -> None:
    try:
        arr = fmt.load_npy(data, where)
    except ValueError as e:
        report.add(str(e))
        return
    if list(arr.shape) != shape or str(arr.dtype) != dtype:
        report.add(f"{where}: shape {list(arr.shape)} {arr.dtype}, manifest says {shape} {dtype}")
        return
    if not np.isfinite(arr).all():
        report.add(f"{where}: {int((~np.isfinite(arr)).sum())} NaN/inf values")
    elif nonneg and (arr < 0).any():
        report.add(f"{where}: negative std values")


def _check_sample(report: Report, shard: str, key: str, fields: dict[str, bytes], manifest: dict[str, Any]) -> None:
    latent = manifest.get("latent")  # absent for a text shard set (kind: text)
    expected = set(latent["members"] if latent else manifest["members"])
    if set(fields) != expected:
        report.add(f"{shard}:{key}: members {sorted(fields)}, expected {sorted(expected)}")
    if latent:
        for member, nonneg in (("latent.npy", False), ("std.npy", True), ("target.npy", False),
                               ("target_std.npy", True)):  # target*: an editing triple's output image
            if member in fields and member in expected:
                _check_array(report, f"{shard}:{key}.{member}", fields[member], latent["shape"], latent["dtype"],
                             nonneg)
    if "txt" in fields:
        try:
            if not fields["txt"].decode("utf-8").strip():
                report.add(f"{shard}:{key}.txt: empty caption")
        except UnicodeDecodeError as e:
            report.add(f"{shard}:{key}.txt: not UTF-8 ({e})")
    if "json" in fields:
        try:
            meta = json.loads(fields["json"])
            if meta.get("key") != key:
                report.add(f"{shard}:{key}.json: field 'key' is {meta.get('key')!r}")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
            report.add(f"{shard}:{key}.json: invalid JSON ({e})")


def validate(directory: Path, check_hash: bool = True) -> tuple[Report, dict[str, Any]]:
    """Check a shard set against its manifest; see the module docstring for what is checked."""
    directory = Path(directory)
    manifest = fmt.read_manifest(directory)
    report = Report()
    seen: set[str] = set()
    listed = {s["name"] for s in manifest["shards"]}
    for stray in sorted(p.name for p in directory.glob("shard-*.tar")):
        if stray not in listed:
            report.add(f"{stray}: shard file not listed in manifest.json")
    for entry in manifest["shards"]:
        name, path = entry["name"], directory / entry["name"]
        if not path.is_file():
            report.add(f"{name}: listed in manifest.json but missing")
            continue
        report.shards += 1
        if path.stat().st_size != entry["bytes"]:
            report.add(f"{name}: {path.stat().st_size} bytes, manifest says {entry['bytes']}")
        elif check_hash and fmt.sha256_file(path) != entry["sha256"]:
            report.add(f"{name}: sha256 differs from manifest.json")
        count = 0
        try:
            for key, fields in fmt.iter_samples(path):
                count += 1
                if key in seen:
                    report.add(f"{name}:{key}: key appears more than once in the shard set")
                seen.add(key)
                _check_sample(report, name, key, fields, manifest)
        except (tarfile.TarError, OSError, EOFError) as e:  # a broken tar is a finding, not a crash
            report.add(f"{name}: unreadable tar after {count} samples ({type(e).__name__}: {e})")
        if count != entry["samples"]:
            report.add(f"{name}: {count} samples, manifest says {entry['samples']}")
        report.samples += count
    totals = manifest["totals"]
    if sum(s["samples"] for s in manifest["shards"]) != totals["samples"]:
        report.add("manifest.json: per-shard samples do not add up to totals.samples")
    if totals["samples"] + totals["rejected"] != totals["inputs"]:
        report.add("manifest.json: totals.samples + totals.rejected != totals.inputs")
    rejects_path = directory / fmt.REJECTS
    if rejects_path.is_file():
        lines = [json.loads(line) for line in rejects_path.read_text(encoding="utf-8").splitlines() if line]
        reasons = Counter(r["reason"] for r in lines)
        if len(lines) != totals["rejected"] or any(reasons[k] != v for k, v in manifest["rejected"].items()):
            report.add(f"{fmt.REJECTS}: {len(lines)} lines {dict(reasons)} disagree with manifest.json rejected counts")
    elif totals["rejected"]:
        report.add(f"{fmt.REJECTS}: missing, manifest records {totals['rejected']} rejects")
    return report, manifest


def first_latents(directory: Path, manifest: dict[str, Any], n: int) -> tuple[np.ndarray, list[str]]:
    """The first ``n`` latents in shard order (mean or stored sample) and their captions; for an editing set each
    source is followed by its target (``n`` latents in all)."""
    if "latent" not in manifest:
        raise ValueError(f"{directory}: a {manifest.get('kind')!r} shard set holds no latents to decode")
    members = ["latent.npy", "target.npy"] if manifest.get("kind") == "edit" else ["latent.npy"]
    latents, captions = [], []
    for entry in manifest["shards"]:
        for _key, fields in fmt.iter_samples(Path(directory) / entry["name"]):
            for member in members:
                latents.append(fmt.load_npy(fields[member], f"{entry['name']}:{_key}.{member}"))
                captions.append(fields["txt"].decode("utf-8"))
                if len(latents) == n:
                    return np.stack(latents), captions
    if not latents:
        raise ValueError(f"{directory}: no samples to decode")
    return np.stack(latents), captions


def decode_grid(directory: Path, out_png: Path, n: int = 16, vae: str | None = None, device: str = "cpu",
                manifest: dict[str, Any] | None = None) -> Path:
    """Decode the first ``n`` latents with the manifest's VAE (or ``vae``) into one PNG grid."""
    manifest = manifest or fmt.read_manifest(Path(directory))
    recorded = manifest["vae"]
    codec = fmt.load_codec(vae or recorded["path"], torch.device(device), torch.float32)
    if (codec.config_hash, codec.weights_hash) != (recorded["config_hash"], recorded["weights_hash"]):
        raise ValueError(f"VAE {codec.path} is not the one that encoded {directory} (manifest vae.id "
                         f"{recorded['id']}, this is {codec.vae_id} with other config or weights)")
    latents, _ = first_latents(Path(directory), manifest, n)
    images = codec.decode(torch.from_numpy(latents.astype(np.float32)))   # (n, 3, H, W) in [-1, 1]
    pixels = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    count, height, width = pixels.shape[:3]
    cols = math.ceil(math.sqrt(count))
    rows = math.ceil(count / cols)
    grid = np.full((rows * height, cols * width, 3), 255, np.uint8)
    for i, img in enumerate(pixels):
        r, c = divmod(i, cols)
        grid[r * height:(r + 1) * height, c * width:(c + 1) * width] = img
    buf = io.BytesIO()
    Image.fromarray(grid).save(buf, format="PNG")
    atomic_write_bytes(Path(out_png), buf.getvalue())
    return Path(out_png)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("directory", help="shard set directory (holds manifest.json)")
    p.add_argument("--grid", default=None, help="write a PNG grid of decoded latents here")
    p.add_argument("-n", "--num", type=int, default=16, help="latents to decode into the grid")
    p.add_argument("--vae", default=None, help="VAE directory to decode with (default: the manifest's vae.path)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-hash", action="store_true", help="skip the sha256 check of each shard")
    args = p.parse_args(argv)
    directory = Path(args.directory)
    try:
        report, manifest = validate(directory, check_hash=not args.no_hash)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"inspect_shards: error: {e}", file=sys.stderr)
        return 1
    latent = manifest.get("latent")
    what = (f"latent {tuple(latent['shape'])} {latent['dtype']} store={latent['store']}, VAE {manifest['vae']['id']}"
            if latent else "text only")
    kind = manifest.get("kind", "caption")
    print(f"inspect_shards: {directory}: {kind} set, {report.shards}/{len(manifest['shards'])} shards, "
          f"{report.samples} samples (manifest {manifest['totals']['samples']}), {what}, "
          f"{manifest['totals']['rejected']} rejected")
    for problem in report.problems:
        print(f"  PROBLEM {problem}")
    if args.grid:
        try:
            path = decode_grid(directory, Path(args.grid), args.num, args.vae, args.device, manifest)
        except (FileNotFoundError, ValueError, KeyError) as e:
            print(f"inspect_shards: error: {e}", file=sys.stderr)
            return 1
        print(f"inspect_shards: wrote {path}")
    print("inspect_shards: OK" if report.ok else f"inspect_shards: {len(report.problems)} problem(s)")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
