"""Image generation eval: sharded, resumable generation of a prompt file to PNGs, then FID and CLIP score.

Layout of ``--out``::

    OUT/cfg_<scale>/<prompt index:06d>_<k>.png   k < n images per prompt, one folder per guidance scale
    OUT/results.json, OUT/table1.md              FID / CLIP per scale, written by rank 0 once every rank is done

Prompt ``i`` (0-based line of the JSONL) is drawn by rank ``i % world`` (:func:`lmfusion.evaluation.runtime.shard`).
A prompt whose ``n`` PNGs all exist is skipped, so a killed run restarts where it stopped; PNGs are written to a
temporary name and renamed, so a file that exists is complete. Noise comes from ``seed + index of the batch's first
prompt``: a rerun with the same world size and batch size redraws the same images, another split draws others
(from the same distribution). ``cfg 1.0`` samples the conditional branch only (no second forward).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from lmfusion.errors import UserError

__all__ = ["Prompt", "read_prompts", "image_path", "cfg_dir", "pending", "generate_images"]


@dataclass(frozen=True)
class Prompt:
    index: int
    text: str


def read_prompts(path: Path, limit: Optional[int] = None) -> list[Prompt]:
    """Prompts of a JSONL file (key ``prompt``, ``caption`` or ``text`` on each line), in file order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--prompts {path}: no such file")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{n}: not JSON ({e})") from e
        text = next((rec[k] for k in ("prompt", "caption", "text") if isinstance(rec, dict) and k in rec), None)
        if not isinstance(text, str):
            raise UserError(f"{path}:{n}: needs a string 'prompt' (or 'caption' / 'text')")
        out.append(Prompt(len(out), text))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise UserError(f"--prompts {path}: no prompts")
    return out


def cfg_dir(out_dir: Path, scale: float) -> Path:
    return Path(out_dir) / f"cfg_{scale:g}"


def image_path(out_dir: Path, scale: float, index: int, k: int) -> Path:
    return cfg_dir(out_dir, scale) / f"{index:06d}_{k}.png"


def pending(prompts: Sequence[Prompt], out_dir: Path, scale: float, n: int, rank: int, world: int) -> list[Prompt]:
    """This rank's prompts that still miss at least one of their ``n`` images."""
    from lmfusion.evaluation.runtime import shard

    return [p for p in shard(prompts, rank, world)
            if not all(image_path(out_dir, scale, p.index, k).is_file() for k in range(n))]


def generate_images(bundle, codec, prompts: Sequence[Prompt], out_dir: Path, *, cfg_scales: Sequence[float],
                    n: int = 1, steps: Optional[int] = None, sampler: Optional[str] = None, batch_size: int = 4,
                    seed: int = 0,
                    rank: int = 0, world: int = 1, clip_x0: Optional[float] = None) -> int:
    """Draw this rank's missing images for every guidance scale; returns how many prompts were drawn now.
    ``sampler``: one of the checkpoint's objective's (``bundle.diffusion``; None: its default)."""
    from lmfusion.inference import image

    if n < 1 or batch_size < 1:
        raise UserError(f"--n and --batch-size must be >= 1, got {n} and {batch_size}")
    tok = bundle.tokenizer
    if tok is None:
        raise FileNotFoundError(f"{bundle.meta.base_dir}: no tokenizer files; prompts need them")
    drawn = 0
    for scale in cfg_scales:
        cfg_dir(out_dir, scale).mkdir(parents=True, exist_ok=True)
        todo = pending(prompts, out_dir, scale, n, rank, world)
        for i in range(0, len(todo), batch_size):
            chunk = todo[i:i + batch_size]
            captions = [tok.encode(p.text, add_special_tokens=False) for p in chunk]
            latents = image.text_to_image(bundle.model, captions, n_per_caption=n, sampler=sampler, steps=steps,
                                          cfg_scale=None if scale == 1.0 else scale, seed=seed + chunk[0].index,
                                          clip_x0=clip_x0, diffusion=bundle.diffusion)
            images = image.to_pil(codec, latents)  # caption-major: prompt j's k-th image is j * n + k
            for j, p in enumerate(chunk):
                for k in range(n):
                    path = image_path(out_dir, scale, p.index, k)
                    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.png")
                    images[j * n + k].save(tmp, format="PNG")
                    os.replace(tmp, path)
            drawn += len(chunk)
    return drawn
