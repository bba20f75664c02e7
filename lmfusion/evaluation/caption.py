"""Image understanding: greedy captions for a folder of images and their CIDEr (and BLEU-4) against references.

Scores are pycocoevalcap's own ``Cider`` (CIDEr-D, n=4, sigma=6, document frequencies from the evaluated reference
set, as the COCO caption server computes it) and ``Bleu(4)``; both are pure Python. Captions and references are
tokenized first, as ``COCOEvalCap`` does: with pycocoevalcap's ``PTBTokenizer`` (Stanford CoreNLP, needs ``java``) when
Java is on the PATH, else with :func:`simple_tokenize`, a lower-casing splitter that drops the same punctuation marks
PTBTokenizer drops (scores can differ slightly from the PTB ones on possessives and hyphenation; the result records
which tokenizer ran).

References (``--references``): COCO caption annotations (``{"images": [{"id", "file_name"}], "annotations":
[{"image_id", "caption"}]}``), matched to image files by ``file_name``, or a plain ``{"<file name or stem>":
["caption", ...]}``. Every image in ``--images`` needs references; references without an image are ignored.

Captioning is sharded over ranks (torchrun) and resumable: each rank appends ``captions.rank<r>.jsonl`` and skips
images already captioned there or in any other rank's file.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Iterable, Optional

__all__ = ["PUNCTUATIONS", "simple_tokenize", "tokenize_captions", "read_references", "list_images",
           "caption_scores", "match_references", "caption_folder", "collect_captions", "evaluate_captions"]

# pycocoevalcap.tokenizer.ptbtokenizer.PUNCTUATIONS (importing it is fine, it is a plain list)
from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS  # noqa: E402

_TOKEN = re.compile(r"[a-z0-9]+|'[a-z]+|[^\sa-z0-9]+")
_IMAGE_EXT = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def simple_tokenize(text: str) -> str:
    """Lower-cased tokens joined by spaces, PTBTokenizer's punctuation removed (``"A Dog's toy."`` -> ``a dog 's toy``)."""
    return " ".join(t for t in _TOKEN.findall(text.lower()) if t not in PUNCTUATIONS)


def tokenize_captions(captions: dict[str, list[str]], tokenizer: str = "auto") -> tuple[dict[str, list[str]], str]:
    """``{id: [caption, ...]}`` tokenized; returns it and the tokenizer used (``ptb`` or ``simple``)."""
    if tokenizer not in ("auto", "ptb", "simple"):
        raise ValueError(f"tokenizer must be auto, ptb or simple, got {tokenizer!r}")
    if tokenizer == "ptb" or (tokenizer == "auto" and shutil.which("java")):
        if not shutil.which("java"):
            raise FileNotFoundError("--tokenizer ptb needs 'java' on the PATH (pycocoevalcap runs Stanford CoreNLP)")
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        return PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()}), "ptb"
    return {k: [simple_tokenize(c) for c in v] for k, v in captions.items()}, "simple"


def caption_scores(candidates: dict[str, str], references: dict[str, list[str]],
                   tokenizer: str = "auto") -> dict[str, object]:
    """Corpus CIDEr (CIDEr-D) and BLEU-4 of ``candidates`` (one caption per id) against ``references``."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    missing = sorted(set(candidates) - set(references))
    if missing:
        raise ValueError(f"{len(missing)} captioned image(s) have no references, e.g. {missing[:3]}")
    if not candidates:
        raise ValueError("no captions to score")
    refs = {k: references[k] for k in candidates}
    if any(not v for v in refs.values()):
        raise ValueError("every image needs at least one reference caption")
    gts, tok = tokenize_captions(refs, tokenizer)
    res, _ = tokenize_captions({k: [v] for k, v in candidates.items()}, tok)
    cider, per_image = Cider().compute_score(gts, res)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return {"cider": float(cider), "bleu4": float(bleu[3]), "n_images": len(candidates), "tokenizer": tok,
            "per_image_cider": {k: float(s) for k, s in zip(gts.keys(), per_image)}}


def read_references(path: Path) -> dict[str, list[str]]:
    """``{file name: [captions]}`` (plain format keys are kept as given: a file name or a stem)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such references file") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read JSON ({e})") from e
    if isinstance(data, dict) and "annotations" in data:
        names = {img["id"]: img["file_name"] for img in data.get("images", [])}
        out: dict[str, list[str]] = {}
        for ann in data["annotations"]:
            key = names.get(ann["image_id"], str(ann["image_id"]))
            out.setdefault(key, []).append(str(ann["caption"]))
        return out
    if isinstance(data, dict) and all(isinstance(v, list) for v in data.values()):
        return {str(k): [str(c) for c in v] for k, v in data.items()}
    raise ValueError(f"{path}: expected COCO caption annotations or {{image: [captions]}}")


def list_images(directory: Path) -> list[Path]:
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"--images {directory}: no such directory")
    images = sorted(p for p in directory.iterdir() if p.suffix.lower() in _IMAGE_EXT)
    if not images:
        raise ValueError(f"--images {directory}: no image files ({', '.join(_IMAGE_EXT)})")
    return images


def match_references(images: list[Path], references: dict[str, list[str]]) -> dict[str, list[str]]:
    """References keyed by each image's file name (looked up by name, then by stem)."""
    out, missing = {}, []
    for p in images:
        refs = references.get(p.name, references.get(p.stem))
        if refs is None:
            missing.append(p.name)
        else:
            out[p.name] = refs
    if missing:
        raise ValueError(f"{len(missing)} image(s) have no reference captions, e.g. {missing[:3]}")
    return out


def _read_done(out_dir: Path) -> dict[str, str]:
    done = {}
    for f in sorted(out_dir.glob("captions.rank*.jsonl")):
        for line in f.read_text(encoding="utf-8").splitlines():
            if line.strip():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a killed run: that image is captioned again
                done[rec["image"]] = rec["caption"]
    return done


def caption_folder(bundle, codec, images: list[Path], out_dir: Path, *, rank: int = 0, world: int = 1,
                   batch_size: int = 8, max_new_tokens: int = 32) -> int:
    """Caption this rank's share of ``images`` not captioned yet; append to ``captions.rank<r>.jsonl``. Returns how
    many were captioned now."""
    from lmfusion.evaluation.runtime import shard
    from lmfusion.inference.image import encode_image
    from lmfusion.inference.text import Image, SamplingParams, generate_text

    cfg, tok = bundle.config, bundle.tokenizer
    out_dir.mkdir(parents=True, exist_ok=True)
    done = _read_done(out_dir)
    todo = [p for p in shard(images, rank, world) if p.name not in done]
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop_token_ids=bundle.meta.stop_token_ids)
    with open(out_dir / f"captions.rank{rank}.jsonl", "a", encoding="utf-8") as f:
        for i in range(0, len(todo), batch_size):
            chunk = todo[i:i + batch_size]
            prompts = [[cfg.bos_token_id, cfg.boi_token_id, Image(encode_image(codec, cfg, p), 0), cfg.eoi_token_id]
                       for p in chunk]
            for p, ids in zip(chunk, generate_text(bundle.model, prompts, params)):
                text = tok.decode(ids, skip_special_tokens=True).strip()
                f.write(json.dumps({"image": p.name, "caption": text}) + "\n")
            f.flush()
    return len(todo)


def collect_captions(out_dir: Path, images: Iterable[Path]) -> dict[str, str]:
    done = _read_done(out_dir)
    missing = [p.name for p in images if p.name not in done]
    if missing:
        raise ValueError(f"{out_dir}: {len(missing)} image(s) not captioned, e.g. {missing[:3]}")
    return {p.name: done[p.name] for p in images}


def evaluate_captions(out_dir: Path, images: list[Path], references: dict[str, list[str]],
                      tokenizer: str = "auto", extra: Optional[dict] = None) -> dict:
    """Score the captions in ``out_dir`` and write ``caption_results.json``."""
    from lmfusion.evaluation.runtime import atomic_write_text

    refs = match_references(images, references)
    result = caption_scores(collect_captions(out_dir, images), refs, tokenizer)
    result.update(extra or {})
    atomic_write_text(out_dir / "caption_results.json", json.dumps(result, indent=1))
    return result
