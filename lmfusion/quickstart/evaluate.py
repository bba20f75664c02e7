"""What the quickstart measures, on one process: text kept (perplexity + greedy continuation), images drawn per
class (text -> image with classifier-free guidance, DDIM from diffusers), captions of real test images, and the
independent classifier's verdict on generated vs real images.

All of it goes through the inference API (:mod:`lmfusion.inference`), i.e. what ``lmfusion generate`` and
``lmfusion caption`` run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from lmfusion.quickstart import classifier as clf
from lmfusion.quickstart.data import Dataset, balanced_indices, prompt

__all__ = ["FIXED_TEXT", "PROMPT", "TextProof", "text_perplexity", "text_proof", "sampler_of", "generate_per_class", "caption_images",
           "classifier_view", "class_named", "score_images"]

FIXED_TEXT = ("The Eiffel Tower is a wrought-iron lattice tower in Paris, France. It is named after the engineer "
              "Gustave Eiffel, whose company designed and built the tower between 1887 and 1889.")
PROMPT = "The three primary colors are"


@dataclass
class TextProof:
    perplexity: float
    continuation_ids: list[int]
    continuation: str

    def as_dict(self) -> dict[str, Any]:
        return {"perplexity": self.perplexity, "continuation": self.continuation,
                "continuation_ids": self.continuation_ids}


@torch.no_grad()
def text_perplexity(bundle, texts: Sequence[str]) -> float:
    """Perplexity of ``texts`` (each ``<bos> text``, cut to the context; token-weighted over all of them; fp32,
    text-only inputs, one process)."""
    from lmfusion.inference.text import Session

    model, tok, cfg = bundle.model, bundle.tokenizer, bundle.config
    total, count = 0.0, 0
    for text in texts:
        ids = [cfg.bos_token_id, *tok.encode(text, add_special_tokens=False)][:cfg.max_position_embeddings]
        if len(ids) < 2:
            continue
        logits = Session(model, 1).extend([ids]).logits[:, 0, :cfg.vocab_size].float()  # (s, 1, V) -> (s, V)
        total += float(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="sum"))
        count += len(ids) - 1
    if not count:
        raise ValueError("text_perplexity: no text of two tokens or more")
    return math.exp(total / count)


@torch.no_grad()
def text_proof(bundle, max_new_tokens: int = 24) -> TextProof:
    """Perplexity of :data:`FIXED_TEXT` and the greedy continuation of :data:`PROMPT` (fp32, text-only inputs)."""
    from lmfusion.inference.text import SamplingParams, generate_text

    model, tok, cfg = bundle.model, bundle.tokenizer, bundle.config
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop_token_ids=bundle.meta.stop_token_ids)
    prompt_ids = [cfg.bos_token_id, *tok.encode(PROMPT, add_special_tokens=False)]
    out = generate_text(model, [prompt_ids], params)[0]
    return TextProof(text_perplexity(bundle, [FIXED_TEXT]), out, tok.decode(out, skip_special_tokens=True))


def sampler_of(bundle) -> str:
    """DDIM for the DDPM objectives (few steps, deterministic); flow's Euler sampler for flow."""
    from lmfusion.diffusion import SAMPLERS, default_sampler

    objective = bundle.diffusion.objective
    return "ddim" if "ddim" in SAMPLERS[objective] else default_sampler(objective)


@torch.no_grad()
def generate_per_class(bundle, codec, classes: Sequence[str], per_class: int, steps: int, cfg_scale: float,
                       seed: int = 0, batch_classes: int = 5) -> list[list]:
    """``per_class`` PIL images for each class prompt (:func:`sampler_of`, ``steps``, CFG ``cfg_scale``, x0 clipped
    to the latents' range); list per class."""
    from lmfusion.inference.image import latent_range, text_to_image, to_pil
    from lmfusion.progress import progress

    tok = bundle.tokenizer
    clip_x0 = latent_range(codec)
    out: list[list] = []
    for start in progress(range(0, len(classes), batch_classes), desc="generating", unit="batch"):
        labels = range(start, min(start + batch_classes, len(classes)))
        captions = [tok.encode(prompt(classes, c), add_special_tokens=False) for c in labels]
        latents = text_to_image(bundle.model, captions, n_per_caption=per_class, sampler=sampler_of(bundle),
                                steps=steps, cfg_scale=cfg_scale, seed=seed + start, clip_x0=clip_x0,
                                diffusion=bundle.diffusion)
        images = to_pil(codec, latents)  # caption-major
        out.extend(images[i * per_class:(i + 1) * per_class] for i in range(len(labels)))
    return out


def class_named(text: str, classes: Sequence[str]) -> int:
    """The class whose noun the text names (the longest match wins: "t-shirt" over "shirt"); -1 if none."""
    text = text.lower()
    nouns = [c.split(" ", 1)[1].replace("pair of ", "") for c in classes]  # "a pair of trousers" -> "trousers"
    best, length = -1, 0
    for i, noun in enumerate(nouns):
        if noun in text and len(noun) > length:
            best, length = i, len(noun)
    return best


@torch.no_grad()
def caption_images(bundle, codec, paths: Sequence[Path], max_new_tokens: int) -> list[str]:
    """Greedy captions of image files (``<bos> <boi> image <eoi>`` -> text), batched."""
    from lmfusion.inference.image import encode_image
    from lmfusion.inference.text import Image, SamplingParams, generate_text

    cfg, tok = bundle.config, bundle.tokenizer
    prompts = [[cfg.bos_token_id, cfg.boi_token_id, Image(encode_image(codec, cfg, p), 0), cfg.eoi_token_id]
               for p in paths]
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop_token_ids=bundle.meta.stop_token_ids)
    return [tok.decode(ids, skip_special_tokens=True).strip() for ids in generate_text(bundle.model, prompts, params)]


def classifier_view(images: Sequence | np.ndarray, size: int = 28) -> np.ndarray:
    """PIL images (any size, RGB or grey) or uint8 arrays -> (n, 28, 28) uint8 grey, as the classifier takes."""
    from PIL import Image

    out = []
    for im in images:
        im = Image.fromarray(im) if isinstance(im, np.ndarray) else im
        out.append(np.asarray(im.convert("L").resize((size, size), Image.Resampling.BICUBIC), dtype=np.uint8))
    return np.stack(out)


def roundtrip(images: np.ndarray, resolution: int) -> np.ndarray:
    """Real 28 px images through the training pipeline's resize (to ``resolution``, RGB) and back to 28 px grey,
    so real and generated images reach the classifier alike."""
    from PIL import Image

    up = [Image.fromarray(im).convert("RGB").resize((resolution, resolution), Image.Resampling.BICUBIC)
          for im in images]
    return classifier_view(up)


def score_images(model: clf.SmallCNN, ds: Dataset, generated: list[list], resolution: int,
                 reference_size: int = 10000) -> dict[str, Any]:
    """Class accuracy and feature-space Fréchet distance of generated images, and of real test images (the
    reference line: as many per class as generated, so both distances carry the same small-sample bias)."""
    per_class = min(len(g) for g in generated)
    gen = classifier_view([im for g in generated for im in g[:per_class]])
    gen_labels = np.repeat(np.arange(len(generated)), per_class)
    ref_idx = balanced_indices(ds.train_labels, max(1, reference_size // len(ds.classes)), seed=1)
    reference = clf.features(model, roundtrip(ds.train_images[ref_idx], resolution))
    test_all = roundtrip(ds.test_images, resolution)
    real_idx = balanced_indices(ds.test_labels, per_class, seed=2)
    gen_pred = clf.predict(model, gen)
    out = {
        "generated_class_accuracy": float((gen_pred == gen_labels).mean()),
        "real_class_accuracy": float((clf.predict(model, test_all) == ds.test_labels).mean()),
        "generated_feature_fid": clf.frechet(clf.features(model, gen), reference),
        "real_feature_fid": clf.frechet(clf.features(model, test_all[real_idx]), reference),
        "generated_per_class_accuracy": {ds.classes[c]: float((gen_pred[gen_labels == c] == c).mean())
                                         for c in range(len(generated))},
        "fid_reference": f"{len(ref_idx)} real training images; generated and real-test sets of "
                         f"{len(gen)} images each ({per_class} per class)",
    }
    return out
