"""Build WebDataset shards of VAE latents from images + captions (the only place the VAE encoder runs for training).

Usage::

    python data_tools/build_shards.py INPUT [INPUT ...] --output DIR --vae PATH|identity [--resolution 256]
    torchrun --nproc_per_node N data_tools/build_shards.py ...        # ranks from RANK/WORLD_SIZE
    python data_tools/build_shards.py ... --rank R --world-size W     # e.g. one SLURM array task per rank
    python data_tools/build_shards.py --merge-only --output DIR       # write manifest.json once all shards exist

INPUT is a directory of images with ``.txt``/``.json`` sidecar captions, a ``.jsonl``/``.csv``/``.parquet``
manifest of (image, caption) rows, or an img2dataset-style ``.tar`` (see ``_sources.py``). The format of the output
is described in ``lmfusion/data/shard_format.py``.

Kinds (``--kind``, recorded as the manifest's ``kind``): ``caption`` (the above); ``edit``: a manifest of
(source image, instruction, target image) rows (columns ``image``, ``instruction``, ``target``); both images are
encoded, the source as ``latent.npy``, the target as ``target.npy``; a row whose target is missing is rejected
like a missing image, its detail naming the file; ``text``: plain ``.txt`` files (one document each; a directory
is walked for them) or ``.jsonl`` rows with a ``text`` field, stored as text, no VAE (``data_tools/_text_shards.py``).

Design:

* **Sharding by input position, not by rank.** Inputs are enumerated in a fixed order and indexed; shard ``i`` holds
  the valid samples among inputs ``[i*S, (i+1)*S)`` (``S = --samples-per-shard``, so a shard holds at most S
  samples) and is built by rank ``i % world_size``. Ranks are disjoint and together complete (no integer-division
  drops); names never collide; the output does not depend on the number of ranks, and a resume may use another one.
* **Crash safety.** A shard is written to ``.shard-XXXXXX.tar.tmp``; its stats go to ``.build/`` and then the tar is
  renamed into place, so an existing ``shard-XXXXXX.tar`` is always complete. A rerun skips complete shards and
  rebuilds the others from scratch: no sample is lost or duplicated.
* **Merge.** Each rank, when done, merges if every shard is complete; the last rank to finish therefore writes
  ``manifest.json`` and ``rejects.jsonl``. No process group is needed, so SLURM array tasks and torchrun ranks
  behave the same (``--merge-only`` redoes it by hand).
* **Determinism.** Batches never cross shards, so batch composition depends only on the inputs; ``--store sample``
  draws noise from a CPU generator seeded by (``--seed``, input index); tar metadata is fixed. Same inputs and
  options give byte-identical shards (on the same device type and dtype, which the fingerprint records, and the
  same number of CPU threads: oneDNN's conv results differ in the last bits between thread counts, and torchrun
  sets OMP_NUM_THREADS=1; a resume with another thread count is allowed and stays complete and duplicate-free).
* **Overlap.** Decode/crop run in DataLoader workers (``--workers``) while the main process encodes; images travel
  as uint8 (4x less than float) and are normalised on the device.

Testing hook: ``LMFUSION_BUILD_SHARDS_DIE_AFTER=K`` SIGKILLs the process after it has written K samples.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `data_tools` and `lmfusion` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from data_tools._sources import REASONS, Item, Loaded, Rejected, enumerate_inputs, load_item
from lmfusion.data import shard_format as fmt
from lmfusion.progress import progress
from lmfusion.utils import atomic_write_bytes

STORES = ("auto", "mean_std", "mean", "sample")
DIE_AFTER_ENV = "LMFUSION_BUILD_SHARDS_DIE_AFTER"


class BuildError(RuntimeError):
    """A run-level failure with a one-line message for the user."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("inputs", nargs="*", help="image folders, .jsonl/.csv/.parquet manifests, img2dataset .tar files")
    p.add_argument("--output", required=True, help="output directory for shards + manifest.json")
    p.add_argument("--vae", default=None, help="local diffusers AutoencoderKL/AutoencoderTiny directory, or "
                                               "'identity' to store pixels in [-1, 1]")
    p.add_argument("--resolution", type=int, default=256, help="square output size in pixels")
    p.add_argument("--min-size", type=int, default=None,
                   help="reject images whose shorter side is below this (default: --resolution)")
    p.add_argument("--samples-per-shard", type=int, default=1000,
                   help="inputs per shard; a shard holds at most this many samples (fewer if some are rejected)")
    p.add_argument("--store", choices=STORES, default="auto",
                   help="mean_std: latent mean + std (loader samples); mean: mean only; sample: one draw per image "
                        "(seeded by --seed and the input index); auto: mean_std for AutoencoderKL, else mean")
    p.add_argument("--latent-dtype", choices=("float16", "float32"), default="float16")
    p.add_argument("--seed", type=int, default=0, help="seed of --store sample draws")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="DataLoader decode workers")
    p.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK if available, else cpu), cpu, cuda:N")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="VAE compute dtype; auto: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--kind", choices=fmt.KINDS, default="caption",
                   help="caption: images + captions; edit: (image, instruction, target) manifest rows; text: plain "
                        "text (.txt files or .jsonl rows), no VAE")
    p.add_argument("--image-field", default="image", help="manifest column with the image path")
    p.add_argument("--caption-field", default=None,
                   help="manifest column with the caption (default: 'caption'; 'instruction' for --kind edit)")
    p.add_argument("--target-field", default="target", help="--kind edit: manifest column with the target image")
    p.add_argument("--text-field", default="text", help="--kind text: field of .jsonl rows holding the text")
    p.add_argument("--caption-key", default="caption", help="field of a .json sidecar holding the caption")
    p.add_argument("--max-reject-fraction", type=float, default=0.2,
                   help="fail the run if more than this fraction of inputs is rejected")
    p.add_argument("--rank", type=int, default=None, help="this rank (default: $RANK or 0)")
    p.add_argument("--world-size", type=int, default=None, help="number of ranks (default: $WORLD_SIZE or 1)")
    p.add_argument("--merge-only", action="store_true", help="only merge per-shard stats into manifest.json")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    args = p.parse_args(argv)
    if args.caption_field is None:
        args.caption_field = "instruction" if args.kind == "edit" else "caption"
    if not args.merge_only:
        if not args.inputs:
            p.error("give at least one input (folder, manifest or tar)")
        if args.vae is None and args.kind != "text":
            p.error("--vae is required (a diffusers VAE directory or 'identity')")
    if args.resolution <= 0 or args.samples_per_shard <= 0 or args.batch_size <= 0:
        p.error("--resolution, --samples-per-shard and --batch-size must be positive")
    if not 0.0 <= args.max_reject_fraction <= 1.0:
        p.error("--max-reject-fraction must be in [0, 1]")
    return args


def resolve_rank(args: argparse.Namespace) -> tuple[int, int]:
    """(rank, world_size) from flags, else torchrun's environment, else (0, 1)."""
    rank = args.rank if args.rank is not None else int(os.environ.get("RANK", 0))
    world = args.world_size if args.world_size is not None else int(os.environ.get("WORLD_SIZE", 1))
    if world < 1 or not 0 <= rank < world:
        raise BuildError(f"rank {rank} is not in [0, world size {world})")
    return rank, world


def resolve_device(spec: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cuda":  # one GPU per local rank under torchrun
        spec = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    device = torch.device(spec)
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = False  # algorithm choice must not vary between runs
        torch.backends.cudnn.deterministic = True
    return device, getattr(torch, dtype)


# -------------------------------------------------------------------------------------------- data pipeline
class ItemDataset(Dataset):
    """Map-style view of the enumerated inputs; ``__getitem__`` decodes in a worker."""

    def __init__(self, items: list[Item], resolution: int, min_size: int, caption_key: str) -> None:
        self.items, self.resolution, self.min_size, self.caption_key = items, resolution, min_size, caption_key

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Loaded | Rejected:
        return load_item(self.items[index], self.resolution, self.min_size, self.caption_key)


@dataclass
class Batch:
    pixels: torch.Tensor | None        # (n, res, res, 3) uint8, stacked in the worker
    loaded: list[Loaded]               # pixels dropped (they are in `pixels`)
    rejected: list[Rejected]
    targets: torch.Tensor | None = None  # --kind edit: (n, res, res, 3) uint8 target images

    def pin_memory(self) -> "Batch":
        """Called by DataLoader(pin_memory=True): page-locked pixels make the host-to-GPU copy asynchronous."""
        if self.pixels is not None:
            self.pixels = self.pixels.pin_memory()
        return self


def collate(results: list[Loaded | Rejected]) -> Batch:
    loaded = [r for r in results if isinstance(r, Loaded)]
    pixels = torch.from_numpy(np.stack([r.pixels for r in loaded])) if loaded else None
    edit = bool(loaded) and loaded[0].target_pixels is not None
    targets = torch.from_numpy(np.stack([r.target_pixels for r in loaded])) if edit else None
    for r in loaded:
        r.pixels = r.target_pixels = np.empty(0, np.uint8)
    return Batch(pixels, loaded, [r for r in results if isinstance(r, Rejected)], targets)


# -------------------------------------------------------------------------------------------------- writing
def _tmp_tar(out: Path, shard: int) -> Path:
    return out / f".{fmt.shard_name(shard)}.tmp"


def _stats_path(out: Path, shard: int) -> Path:
    return out / fmt.BUILD_DIR / f"{fmt.shard_name(shard)}.json"


class ShardWriter:
    """Writes one shard to its temporary name; ``finalize`` writes the stats and renames the tar into place."""

    def __init__(self, out: Path, shard: int, n_inputs: int, fingerprint: str) -> None:
        self.out, self.shard, self.n_inputs, self.fingerprint = out, shard, n_inputs, fingerprint
        self.tar = fmt.DeterministicTarWriter(_tmp_tar(out, shard))
        self.samples = 0
        self.rejects: list[dict[str, Any]] = []
        self.latent_shape: list[int] | None = None

    def add(self, loaded: Loaded, latent: np.ndarray | None, std: np.ndarray | None, vae_id: str,
            target: np.ndarray | None = None, target_std: np.ndarray | None = None) -> None:
        """One sample; ``latent`` None: text only (``--kind text``); ``target``: an editing triple's target."""
        key = fmt.sample_key(loaded.index)
        for name, array in (("latent", latent), ("std", std), ("target", target), ("target_std", target_std)):
            if array is not None:
                self.tar.add(f"{key}.{name}.npy", fmt.npy_bytes(array))
        self.tar.add(f"{key}.txt", loaded.caption.encode("utf-8"))
        meta = {"key": key, "source": loaded.source, "original_size": list(loaded.original_size),
                "crop_box": list(loaded.crop_box), "vae": vae_id}
        self.tar.add(f"{key}.json", json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8"))
        self.samples += 1
        self.latent_shape = list(latent.shape) if latent is not None else None

    def finalize(self) -> None:
        self.tar.close()
        tmp = _tmp_tar(self.out, self.shard)
        reasons = Counter(r["reason"] for r in self.rejects)
        stats = {"shard": self.shard, "name": fmt.shard_name(self.shard), "fingerprint": self.fingerprint,
                 "inputs": self.n_inputs, "samples": self.samples, "rejected": sum(reasons.values()),
                 "rejected_by_reason": dict(sorted(reasons.items())), "latent_shape": self.latent_shape,
                 "sha256": fmt.sha256_file(tmp), "bytes": tmp.stat().st_size,
                 "rejects": sorted(self.rejects, key=lambda r: r["index"])}
        if self.samples + stats["rejected"] != self.n_inputs:  # an accounting bug must never pass silently
            raise AssertionError(f"{stats['name']}: {self.samples} samples + {stats['rejected']} rejects "
                                 f"!= {self.n_inputs} inputs")
        fmt.atomic_write_json(_stats_path(self.out, self.shard), stats)
        os.replace(tmp, self.out / fmt.shard_name(self.shard))  # the tar appears last: it marks completion


def shard_complete(out: Path, shard: int, fingerprint: str) -> bool:
    """A shard is complete when its tar and its stats exist; stats from other options are an error."""
    tar, stats = out / fmt.shard_name(shard), _stats_path(out, shard)
    if not (tar.is_file() and stats.is_file()):
        return False
    recorded = json.loads(stats.read_text(encoding="utf-8")).get("fingerprint")
    if recorded != fingerprint:
        raise BuildError(f"{tar} was built with other inputs/options (fingerprint {str(recorded)[:12]} != "
                         f"{fingerprint[:12]}); use a new --output or delete the old shards")
    return True


# ---------------------------------------------------------------------------------------------------- merge
def merge(out: Path, max_reject_fraction: float) -> dict[str, Any] | None:
    """Write manifest.json + rejects.jsonl if every planned shard is complete; None if some are missing."""
    plan_path = out / fmt.BUILD_DIR / "plan.json"
    if not plan_path.is_file():
        raise BuildError(f"{plan_path}: missing; run build_shards on this --output first")
    plan = json.loads(plan_path.read_text(encoding="utf-8"))
    stats = []
    for shard in range(plan["num_shards"]):
        if not shard_complete(out, shard, plan["fingerprint"]):
            return None
        stats.append(json.loads(_stats_path(out, shard).read_text(encoding="utf-8")))
    shapes = {tuple(s["latent_shape"]) for s in stats if s["latent_shape"] is not None}
    if len(shapes) > 1:
        raise BuildError(f"{out}: shards disagree on latent shape: {sorted(shapes)}")
    reasons = Counter({r: 0 for r in REASONS})
    for s in stats:
        reasons.update(s["rejected_by_reason"])
    totals = {"inputs": sum(s["inputs"] for s in stats), "samples": sum(s["samples"] for s in stats),
              "rejected": sum(s["rejected"] for s in stats), "shards": len(stats)}
    rejects = "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for s in stats for r in s["rejects"])
    atomic_write_bytes(out / fmt.REJECTS, rejects.encode("utf-8"))
    by_reason = ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items()) if v) or "none"
    first = next((r["detail"] for s in stats for r in s["rejects"]), "")
    if totals["samples"] == 0:
        raise BuildError(f"no valid samples: all {totals['inputs']} inputs rejected ({by_reason}; first: {first}); "
                         f"see {out / fmt.REJECTS}")
    fraction = totals["rejected"] / max(totals["inputs"], 1)
    if fraction > max_reject_fraction:
        raise BuildError(f"{totals['rejected']} of {totals['inputs']} inputs rejected ({fraction:.1%} > "
                         f"--max-reject-fraction {max_reject_fraction}; {by_reason}; first: {first}); "
                         f"see {out / fmt.REJECTS}")
    store, kind = plan["store"], plan.get("kind", "caption")
    std = ["std.npy"] if store == "mean_std" else []
    members = {"caption": ["latent.npy", *std], "text": [],
               "edit": ["latent.npy", *std, "target.npy", *(["target_std.npy"] if std else [])]}[kind]
    latent = None if kind == "text" else {
        "shape": list(shapes.pop()), "dtype": plan["latent_dtype"], "store": store, "std": store == "mean_std",
        "seed": plan["options"]["seed"] if store == "sample" else None, "members": members + ["txt", "json"]}
    manifest = {
        "format": fmt.FORMAT_NAME, "format_version": fmt.FORMAT_VERSION,
        **({"kind": kind} if kind != "caption" else {}),
        **({"vae": plan["vae"], "latent": latent} if latent is not None else {"members": ["txt", "json"]}),
        "resolution": plan["resolution"], "samples_per_shard": plan["samples_per_shard"],
        "key_digits": fmt.KEY_DIGITS,
        "shards": [{k: s[k] for k in ("name", "inputs", "samples", "rejected", "sha256", "bytes")} for s in stats],
        "totals": totals, "rejected": dict(sorted(reasons.items())),
        "fingerprint": plan["fingerprint"], "options": plan["options"],
    }
    fmt.atomic_write_json(out / fmt.MANIFEST, manifest)
    return manifest


# ---------------------------------------------------------------------------------------------------- build
def _resolve_store(store: str, deterministic: bool, kind: str) -> str:
    if store == "auto":
        return "mean" if deterministic else "mean_std"
    if deterministic and store == "mean_std":
        raise BuildError(f"--store mean_std needs a distribution; {kind} encodes deterministically: use --store mean")
    return "mean" if deterministic else store  # a draw from a deterministic encoder is its mean


def _sample_noise(indices: list[int], shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Per-input standard normal noise from a CPU generator seeded by (seed, index): batch- and device-independent."""
    out = []
    for index in indices:
        digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
        out.append(torch.randn(shape, generator=gen))
    return torch.stack(out)


def build(args: argparse.Namespace) -> dict[str, Any]:
    """Build this rank's shards, then merge if all shards exist. Returns a summary dict."""
    out = Path(args.output).expanduser().resolve()
    rank, world = resolve_rank(args)
    if args.merge_only:
        manifest = merge(out, args.max_reject_fraction)
        if manifest is None:
            raise BuildError(f"{out}: some shards are still missing; finish the build (rerun it) before merging")
        return {"rank": rank, "manifest": manifest, "built_inputs": 0, "elapsed_s": 0.0}
    (out / fmt.BUILD_DIR).mkdir(parents=True, exist_ok=True)
    if args.kind == "text":
        from data_tools._text_shards import build_text

        manifest = build_text(args, out, rank, world, sys.modules[__name__])
        return {"rank": rank, "manifest": manifest, "built_inputs": 0, "elapsed_s": 0.0}
    min_size = args.resolution if args.min_size is None else args.min_size
    device, dtype = resolve_device(args.device, args.dtype)

    edit = args.kind == "edit"
    items = enumerate_inputs(args.inputs, args.image_field, args.caption_field, args.target_field if edit else "")
    if not items:
        raise BuildError(f"no inputs found in {args.inputs}")
    codec = fmt.load_codec(args.vae, device, dtype)
    store = _resolve_store(args.store, codec.deterministic, codec.kind)
    num_shards = math.ceil(len(items) / args.samples_per_shard)
    options = {"inputs": [str(Path(i).expanduser().resolve()) for i in args.inputs], "resolution": args.resolution,
               "min_size": min_size, "samples_per_shard": args.samples_per_shard, "store": store,
               "latent_dtype": args.latent_dtype, "seed": args.seed, "batch_size": args.batch_size,
               "image_field": args.image_field, "caption_field": args.caption_field,
               "caption_key": args.caption_key, "device_type": device.type,
               "items_sha256": hashlib.sha256("\n".join(i.source for i in items).encode()).hexdigest(),
               **({"kind": "edit", "target_field": args.target_field} if edit else {})}
    fingerprint = hashlib.sha256(json.dumps([options, codec.describe()], sort_keys=True).encode()).hexdigest()
    plan = {"fingerprint": fingerprint, "num_shards": num_shards, "kind": args.kind, "num_inputs": len(items), "store": store,
            "latent_dtype": args.latent_dtype, "resolution": args.resolution,
            "samples_per_shard": args.samples_per_shard, "vae": codec.describe(), "options": options}
    plan_path = out / fmt.BUILD_DIR / "plan.json"
    if plan_path.is_file():
        old = json.loads(plan_path.read_text(encoding="utf-8"))
        if old.get("fingerprint") != fingerprint:
            changed = sorted(k for k in set(old.get("options", {})) | set(options)
                             if old.get("options", {}).get(k) != options.get(k))
            if old.get("vae") != plan["vae"]:
                changed.append("vae")
            raise BuildError(f"{out} holds a build with other inputs/options (changed: {', '.join(changed)}); "
                             "use a new --output or delete it")
    fmt.atomic_write_json(plan_path, plan)

    mine = [s for s in range(num_shards) if s % world == rank]
    pending = [s for s in mine if not shard_complete(out, s, fingerprint)]
    batches: list[tuple[int, list[int], bool]] = []  # (shard, input indices, last batch of the shard)
    for s in pending:
        lo, hi = s * args.samples_per_shard, min((s + 1) * args.samples_per_shard, len(items))
        starts = list(range(lo, hi, args.batch_size))
        batches += [(s, list(range(b, min(b + args.batch_size, hi))), b == starts[-1]) for b in starts]
    n_pending = sum(len(b[1]) for b in batches)
    print(f"build_shards rank {rank}/{world}: {len(items)} inputs -> {num_shards} shards; mine {len(mine)}, "
          f"{len(mine) - len(pending)} already complete, {len(pending)} to build; VAE {codec.vae_id}, "
          f"store {store}, {device} {str(dtype).removeprefix('torch.')}", flush=True)

    workers = args.workers if batches else 0
    loader = DataLoader(ItemDataset(items, args.resolution, min_size, args.caption_key),
                        batch_sampler=[b[1] for b in batches], collate_fn=collate, num_workers=workers,
                        pin_memory=device.type == "cuda", prefetch_factor=4 if workers > 0 else None)
    die_after = int(os.environ.get(DIE_AFTER_ENV, "0") or 0)
    written, writer, t0 = 0, None, time.perf_counter()
    bar = progress(total=n_pending, unit="img", desc=f"rank {rank}", disable=args.no_progress or n_pending == 0,
                   dynamic_ncols=True, mininterval=1.0)
    for (shard, indices, last), batch in zip(batches, loader):
        if writer is None:
            lo = shard * args.samples_per_shard
            writer = ShardWriter(out, shard, min(args.samples_per_shard, len(items) - lo), fingerprint)
        writer.rejects += [r.record(shard) for r in batch.rejected]
        if batch.pixels is not None:
            pixels = batch.pixels if batch.targets is None else torch.cat([batch.pixels, batch.targets])
            x = pixels.to(device, non_blocking=True).permute(0, 3, 1, 2)  # (n, H, W, 3) u8 -> (n, 3, H, W)
            x = x.to(codec.dtype, memory_format=torch.contiguous_format).div_(127.5).sub_(1.0)  # -> [-1, 1]
            mean, std = codec.encode(x)
            if store == "sample":  # targets (second half) draw from (seed, -1 - index): distinct from sources
                keys = [r.index for r in batch.loaded] + ([-1 - r.index for r in batch.loaded] if edit else [])
                noise = _sample_noise(keys, tuple(mean.shape[1:]), args.seed)
                mean, std = mean + std * noise.to(mean.device), None
            np_dtype = getattr(np, args.latent_dtype)
            mean_np = mean.cpu().numpy().astype(np_dtype)
            std_np = std.cpu().numpy().astype(np_dtype) if std is not None and store == "mean_std" else None
            n = len(batch.loaded)
            for i, loaded in enumerate(batch.loaded):
                tgt = (mean_np[n + i], std_np[n + i] if std_np is not None else None) if edit else (None, None)
                writer.add(loaded, mean_np[i], std_np[i] if std_np is not None else None, codec.vae_id, *tgt)
                written += 1
                if die_after and written >= die_after:
                    os.kill(os.getpid(), signal.SIGKILL)  # testing hook: die mid-shard, like a preempted job
        bar.update(len(indices))
        if last:
            writer.finalize()
            writer = None
    bar.close()
    elapsed = time.perf_counter() - t0
    manifest = merge(out, args.max_reject_fraction)
    if manifest is None:
        print(f"build_shards rank {rank}: done; other ranks' shards are still missing. The last rank to finish "
              f"writes manifest.json (or run --merge-only --output {out}).", flush=True)
    return {"rank": rank, "manifest": manifest, "built_inputs": n_pending, "elapsed_s": elapsed,
            "images_per_s": n_pending / elapsed if elapsed > 0 else 0.0}


def summarize(summary: dict[str, Any], out: Path) -> str:
    m = summary["manifest"]
    t = m["totals"]
    reasons = ", ".join(f"{k} {v}" for k, v in m["rejected"].items() if v) or "none"
    if m.get("kind") == "text":
        return (f"build_shards: {t['shards']} text shards, {t['samples']} documents of {t['inputs']} inputs, "
                f"{t['rejected']} rejected ({reasons})\nbuild_shards: wrote {out / fmt.MANIFEST} and "
                f"{out / fmt.REJECTS}")
    rate = f"; this rank {summary['built_inputs']} inputs at {summary.get('images_per_s', 0):.1f} images/s" \
        if summary["built_inputs"] else ""
    kind = "; editing triples" if m.get("kind") == "edit" else ""
    return (f"build_shards: {t['shards']} shards, {t['samples']} samples of {t['inputs']} inputs, "
            f"{t['rejected']} rejected ({reasons}){kind}; latent {tuple(m['latent']['shape'])} {m['latent']['dtype']} "
            f"store={m['latent']['store']}, VAE {m['vae']['id']}{rate}\n"
            f"build_shards: wrote {out / fmt.MANIFEST} and {out / fmt.REJECTS}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        summary = build(args)
    except (BuildError, FileNotFoundError, ValueError, ImportError) as e:
        print(f"build_shards: error: {e}", file=sys.stderr, flush=True)
        return 1
    if summary["manifest"] is not None:
        print(summarize(summary, Path(args.output).expanduser().resolve()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
