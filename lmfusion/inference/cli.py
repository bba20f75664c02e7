"""Inference: load a checkpoint (:mod:`.load`), text generation with a KV cache (:mod:`.text`), text -> image with
classifier-free guidance and image -> text (:mod:`.image`), interleaved chat (:mod:`.chat`).

The command line (``lmfusion generate``, ``lmfusion caption``, ``lmfusion chat``); it imports
the heavy modules (megatron, diffusers) when a command runs, so ``lmfusion --help`` stays fast::

    lmfusion generate --ckpt DIR --prompt "a red shoe" --out grid.png [--cfg 1.6 --steps 250 --seed 0 --n 4]
    lmfusion generate --ckpt DIR --edit photo.png --prompt "make it red" --out edited.png
    lmfusion generate --ckpt DIR --prompt "Once upon a time" --text [--max-new-tokens 64 --temperature 0 --top-p 1]
    lmfusion caption --ckpt DIR --image x.png          # a VLM base: through its own understanding path
    lmfusion chat --ckpt DIR --out-dir chat_images
    lmfusion chat --ckpt DIR --image x.png "What is in the picture?"   # a VLM base (LLaVA-NeXT): its chat template
    lmfusion chat --ckpt DIR --image x.png --raw "USER: <image>\nWhat is it? ASSISTANT:"
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lmfusion.errors import UserError

__all__ = ["add_subparser"]

_DTYPES = ("fp32", "bf16")


def _common(p: argparse.ArgumentParser, images: bool) -> None:
    p.add_argument("--ckpt", required=True, type=Path,
                   help="base (lmfusion convert-hf), export (lmfusion export-ckpt: safetensors + JSON, safe to take "
                        "from others) or training run/iteration directory (your own runs only: distributed-checkpoint "
                        "files, read with code execution refused)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    p.add_argument("--dtype", choices=_DTYPES, default="fp32", help="parameter dtype (fp32 reproduces HF exactly)")
    p.add_argument("--seed", type=int, default=0, help="seeds image noise and token sampling")
    p.add_argument("--weights", choices=("ema", "raw"), default=None,
                   help="image set: 'ema' (train.ema's average; the default when the checkpoint has one) or 'raw'")
    if images:
        p.add_argument("--vae", default=None,
                       help="override the checkpoint's VAE: 'identity' (pixels), a diffusers VAE directory, or a "
                            "shard directory whose manifest names it")


def _sampling(p: argparse.ArgumentParser, max_new: int) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--stop-token-id", type=int, action="append", default=None,
                   help="stop after this token id (repeatable; default: the model's eos ids)")


def _diffusion(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cfg", type=float, default=1.6, help="classifier-free guidance scale (1 = conditional only)")
    p.add_argument("--sampler", choices=("ddpm", "ddim", "euler"), default=None,
                   help="default: the checkpoint's objective's (ddpm for epsilon and v_prediction; euler, the only "
                        "one, for flow)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: 250 ddpm, 50 ddim/euler)")
    p.add_argument("--clip-x0", default="auto", metavar="auto|none|RANGE",
                   help="clip each step's x0 estimate to [-RANGE, RANGE]; auto: the latents' range (1 for pixels; "
                        "a VAE's latent_range.json), none: never")


def clip_x0_arg(value: str, codec) -> "float | None":
    """``--clip-x0``: 'auto' -> :func:`lmfusion.inference.image.latent_range`, 'none' -> None, else a positive
    number."""
    from lmfusion.inference.image import latent_range

    if value == "auto":
        return latent_range(codec)
    if value == "none":
        return None
    try:
        out = float(value)
    except ValueError:
        out = None
    if out is None or not out > 0:  # not a number, <= 0 or NaN
        raise UserError(f"--clip-x0 must be 'auto', 'none' or a positive number, got {value!r}")
    return out


def _load(args: argparse.Namespace):
    import torch

    from lmfusion.inference.load import load_for_inference

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    return load_for_inference(args.ckpt, device=args.device, dtype=dtype, weights=args.weights)


def _params(args: argparse.Namespace, default_stops: tuple[int, ...] = ()):
    """Sampling parameters (built once before loading to validate them, then with the model's eos ids)."""
    from lmfusion.inference.text import SamplingParams

    stops = args.stop_token_id if args.stop_token_id is not None else default_stops
    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          stop_token_ids=tuple(stops))


def _tokenizer(bundle):
    if bundle.tokenizer is None:
        raise FileNotFoundError(f"{bundle.meta.base_dir}: no tokenizer files (tokenizer.json / tokenizer_config.json); "
                                f"a text prompt needs them (convert-hf copies them from the HF directory)")
    return bundle.tokenizer


def _codec(args: argparse.Namespace):
    """The VAE (``--vae``, else the checkpoint's), resolved before the model is built so a missing one fails fast."""
    from lmfusion.inference.load import checkpoint_vae, load_vae, resolve_device

    info, source = checkpoint_vae(args.ckpt)
    return load_vae(args.vae, info, resolve_device(args.device), source=source)


def _is_main() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def _check_context(cfg, encoded: list, args: argparse.Namespace, edit: bool = False) -> None:
    """Refuse prompts that do not fit the model's context (max_position_embeddings) with what they generate."""
    from lmfusion.model.image_config import tokens_per_image

    limit = cfg.max_position_embeddings
    extra = args.max_new_tokens if args.text else 3 + tokens_per_image(cfg.image)  # <bos> <boi> image <eoi>
    what = f"--max-new-tokens {extra}" if args.text else f"<bos>, <boi>, {extra - 3} image tokens and <eoi>"
    if edit:  # <bos> <boi> source <eoi> instruction <boi> target <eoi>
        extra = 5 + 2 * tokens_per_image(cfg.image)
        what = f"<bos>, two images of {tokens_per_image(cfg.image)} tokens and their <boi>/<eoi>"
    for i, ids in enumerate(encoded):
        need = len(ids) + extra + (1 if args.text else 0)
        if need > limit:
            raise UserError(f"--prompt {i + 1}: {len(ids)} tokens plus {what} need {need} positions, expected at "
                            f"most {limit} (the model's max_position_embeddings); shorten the prompt (nothing is "
                            f"truncated)")


def _check_caption_context(cfg, args: argparse.Namespace) -> None:
    """Refuse a caption that cannot fit: <bos> <boi> image <eoi> and --max-new-tokens within the context."""
    from lmfusion.model.image_config import tokens_per_image

    limit, prefix = cfg.max_position_embeddings, 3 + tokens_per_image(cfg.image)
    if prefix + args.max_new_tokens > limit:
        raise UserError(f"--max-new-tokens {args.max_new_tokens}: <bos>, <boi>, {prefix - 3} image tokens and <eoi> "
                        f"plus {args.max_new_tokens} new tokens need {prefix + args.max_new_tokens} positions, "
                        f"expected at most {limit} (the model's max_position_embeddings)")


def _run_generate(args: argparse.Namespace) -> int:
    import torch

    if args.edit is not None and args.text:
        raise UserError("--edit draws an edited image; it cannot be combined with --text")
    if args.edit is not None:
        from lmfusion.inference.image import check_image_file

        check_image_file(args.edit)
    if not args.text and args.out is None:
        raise UserError("--out GRID.png is required for image generation (or pass --text for a text continuation)")
    if args.n < 1:
        raise UserError(f"--n must be >= 1, got {args.n}")
    if args.out is not None and args.out.suffix.lower() != ".png":
        raise UserError(f"--out {args.out}: must end in .png")
    _params(args)
    codec = None if args.text else _codec(args)
    if not args.text and args.sampler is not None:  # fail before the model is built
        from lmfusion.diffusion import check_sampler
        from lmfusion.inference.load import checkpoint_diffusion

        check_sampler(args.sampler, checkpoint_diffusion(args.ckpt).objective)
    bundle = _load(args)
    tok = _tokenizer(bundle)
    cfg = bundle.config
    encoded = [tok.encode(p, add_special_tokens=False) for p in args.prompt]
    _check_context(cfg, encoded, args, edit=args.edit is not None)
    if args.text:
        from lmfusion.inference.text import generate_text

        prompts = [[cfg.bos_token_id, *ids] for ids in encoded]
        gen = torch.Generator().manual_seed(args.seed)
        outputs = generate_text(bundle.model, prompts, _params(args, bundle.meta.stop_token_ids), generator=gen)
        if _is_main():
            for ids in outputs:
                print(tok.decode(ids, skip_special_tokens=True))
        return 0
    from lmfusion.inference.image import check_vae, save_images, text_to_image, to_pil

    check_vae(codec, cfg)
    if args.edit is not None:  # the source image, encoded as captioning does (clean, VAE mean), as context
        from lmfusion.inference.image import edit_image, encode_image

        source = encode_image(codec, cfg, args.edit)
        latents = edit_image(bundle.model, source, encoded, n_per_instruction=args.n, sampler=args.sampler,
                             steps=args.steps, cfg_scale=args.cfg, seed=args.seed,
                             clip_x0=clip_x0_arg(args.clip_x0, codec), diffusion=bundle.diffusion)
    else:
        latents = text_to_image(bundle.model, encoded, n_per_caption=args.n, sampler=args.sampler,
                                steps=args.steps, cfg_scale=args.cfg, seed=args.seed,
                                clip_x0=clip_x0_arg(args.clip_x0, codec), diffusion=bundle.diffusion)
    if _is_main():
        paths = save_images(to_pil(codec, latents), args.out, cols=args.n if len(encoded) > 1 else None)
        print(f"lmfusion generate: wrote {paths[0]} and {len(paths) - 1} image(s) beside it")
    return 0


def _vlm_base(args: argparse.Namespace) -> bool:
    """Whether ``--ckpt`` reads a VLM base (one with a vision tower), without building the model."""
    from lmfusion.hf.llava import base_kind
    from lmfusion.inference.load import checkpoint_base_dir

    return base_kind(checkpoint_base_dir(args.ckpt)) == "vlm"


def _answer(args: argparse.Namespace, question: "str | None", raw: "str | None") -> int:
    """An image + question (or raw text) through the VLM base's own path: processor, vision tower, text modules."""
    import torch

    from lmfusion.inference.image import read_rgb
    from lmfusion.inference.vlm import check_room, generate_with_images, load_processor, understanding_inputs

    image = read_rgb(args.image)
    _params(args)
    bundle = _load(args)
    processor = load_processor(bundle.meta.base_dir)
    inputs = understanding_inputs(processor, image, question=question, raw=raw, source=str(bundle.meta.base_dir))
    ids = inputs["input_ids"][0]
    check_room(ids.numel(), args.max_new_tokens, bundle.config.max_position_embeddings)
    out = generate_with_images(bundle.model, ids, inputs["pixel_values"], inputs["image_sizes"],
                               _params(args, bundle.meta.stop_token_ids),
                               generator=torch.Generator().manual_seed(args.seed))
    if _is_main():
        print(processor.tokenizer.decode(out, skip_special_tokens=True))
    return 0


def _run_caption(args: argparse.Namespace) -> int:
    from lmfusion.inference.image import caption_image, check_image_file, check_vae, encode_image

    check_image_file(args.image)
    if not args.latent and _vlm_base(args):
        from lmfusion.inference.vlm import CAPTION_QUESTION

        return _answer(args, args.question or CAPTION_QUESTION, None)
    _params(args)
    codec = _codec(args)
    bundle = _load(args)
    tok = _tokenizer(bundle)
    check_vae(codec, bundle.config)
    _check_caption_context(bundle.config, args)
    latent = encode_image(codec, bundle.config, args.image)
    ids = caption_image(bundle.model, latent, _params(args, bundle.meta.stop_token_ids))
    if _is_main():
        print(tok.decode(ids, skip_special_tokens=True))
    return 0


def _run_chat(args: argparse.Namespace) -> int:
    import torch

    from lmfusion.inference.chat import Conversation, ImageOptions, run_chat
    from lmfusion.inference.image import check_image_file, check_vae

    if args.image is not None or args.raw is not None or args.question is not None:  # one answer about an image
        if args.image is None:
            raise UserError("a question or --raw TEXT needs --image IMG (without them, chat reads prompts from stdin)")
        if (args.question is None) == (args.raw is None):
            raise UserError("--image: give a question or --raw TEXT (one of them)")
        check_image_file(args.image)
        if not _vlm_base(args):
            raise UserError(f"--image: the base of {args.ckpt} has no vision tower (a text-only base); image "
                            f"understanding needs a VLM base (convert-hf of a LlavaNextForConditionalGeneration "
                            f"directory)")
        return _answer(args, args.question, args.raw)
    _params(args)
    codec = _codec(args)
    bundle = _load(args)
    tok = _tokenizer(bundle)
    check_vae(codec, bundle.config)
    conv = Conversation(bundle.model, _params(args, bundle.meta.stop_token_ids),
                        ImageOptions(sampler=args.sampler, steps=args.steps, cfg_scale=args.cfg,
                                     max_images=args.max_images, clip_x0=clip_x0_arg(args.clip_x0, codec),
                                     diffusion=bundle.diffusion),
                        generator=torch.Generator().manual_seed(args.seed))
    return run_chat(conv, tok, codec, args.out_dir, sys.stdin, sys.stdout)


def add_subparser(subparsers: "argparse._SubParsersAction") -> None:
    """Register ``generate``, ``caption`` and ``chat``."""
    p = subparsers.add_parser("generate", help="text -> image grid (diffusion + CFG), or --text continuation",
                              description="Generate images for text prompts (PNG grid at --out, each image "
                                          "beside it), or with --text print the prompt's text continuation.")
    _common(p, images=True)
    p.add_argument("--prompt", action="append", required=True, help="caption / prompt (repeatable: a batch)")
    p.add_argument("--out", type=Path, default=None, help="grid PNG path (images: <stem>-NNN.png beside it)")
    p.add_argument("--n", type=int, default=1, help="images per prompt")
    p.add_argument("--text", action="store_true", help="print the text continuation instead of drawing")
    p.add_argument("--edit", type=Path, default=None, metavar="IMG",
                   help="edit this image: it is encoded with the run's VAE as clean context and --prompt is the "
                        "instruction (a model fine-tuned on editing shards)")
    _diffusion(p)
    _sampling(p, max_new=64)
    p.set_defaults(run=_run_generate)

    p = subparsers.add_parser("caption", help="image -> text (greedy; a VLM base's own path when it has one)",
                              description="Caption an image. On a checkpoint whose base is a vision-language model "
                                          "(a LLaVA-NeXT base: it has a vision tower) the image goes through the "
                                          "base's own understanding path (vision tower, projector, language model) "
                                          "with --question in its chat template. Otherwise, or with --latent, the "
                                          "image is encoded with the checkpoint's VAE (clean, t=0) and captioned "
                                          "through the image modules.")
    _common(p, images=True)
    p.add_argument("--image", required=True, type=Path, help="image file (any format Pillow reads)")
    p.add_argument("--question", default=None, metavar="TEXT",
                   help="VLM path: the instruction asked about the image (default: lmms-eval's COCO caption "
                        "prompt)")
    p.add_argument("--latent", action="store_true",
                   help="caption through the VAE latent and the image modules even on a VLM base")
    _sampling(p, max_new=32)
    p.set_defaults(run=_run_caption)

    p = subparsers.add_parser("chat", help="interleaved text and images on stdin/stdout; --image: ask about an image",
                              description="Read prompts from stdin; the model's text is printed and, when it emits "
                                          "<boi>, an image is drawn by diffusion and written to --out-dir. With "
                                          "--image IMG \"question\" (a VLM base), answer once about the image "
                                          "through the base's own understanding path and chat template.")
    _common(p, images=True)
    p.add_argument("question", nargs="?", default=None,
                   help="with --image: the question, put in the base's chat template with the image before it")
    p.add_argument("--image", type=Path, default=None, metavar="IMG",
                   help="an image to ask about (needs a VLM base: LLaVA-NeXT converted with convert-hf)")
    p.add_argument("--raw", default=None, metavar="TEXT",
                   help="with --image: send TEXT as it is (no chat template), <image> marking where the image goes")
    p.add_argument("--out-dir", type=Path, default=Path("chat_images"), help="where images are written")
    p.add_argument("--max-images", type=int, default=4, help="images per response")
    _diffusion(p)
    _sampling(p, max_new=128)
    p.set_defaults(run=_run_chat)
