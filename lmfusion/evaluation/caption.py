"""Image understanding: greedy captions for a folder of images and their CIDEr (and BLEU-4) against references.

Scores are pycocoevalcap's own ``Cider`` (CIDEr-D, n=4, sigma=6, document frequencies from the evaluated reference
set, as the COCO caption server computes it) and ``Bleu(4)``; both are pure Python. Captions and references are
tokenized first, as ``COCOEvalCap`` does: with pycocoevalcap's ``PTBTokenizer`` (Stanford CoreNLP, needs ``java``) when
Java is on the PATH, else with :func:`simple_tokenize`, a lower-casing splitter that drops the same punctuation marks
PTBTokenizer drops (scores can differ slightly from the PTB ones on possessives and hyphenation; the result records
which tokenizer ran).

Images (``--images``): a folder of image files (encoded with the checkpoint's VAE, as ``lmfusion caption`` does), or
a latent shard set (``data_tools/build_shards.py`` output, recognised by its ``manifest.json``): each sample's
``latent.npy`` is already the scaled VAE latent, so the model captions it directly and no VAE is loaded. The shard
set's VAE must be the checkpoint's (``manifest.json`` key ``vae`` vs the checkpoint record's, by config hash) and its
latent shape the model's. Items are named by file name, or by sample key for shards.

References (``--references``): COCO caption annotations (``{"images": [{"id", "file_name"}], "annotations":
[{"image_id", "caption"}]}``), matched to image files by ``file_name``, or a plain ``{"<file name or stem>":
["caption", ...]}``. Shard samples match by key, then by their source image's name (the sample JSON's ``source``).
Without ``--references``, a shard set's own captions are the references (one per image). Every image needs
references; references without an image are ignored.

Captioning is sharded over ranks (torchrun) and resumable: each rank appends ``captions.rank<r>.jsonl`` and skips
images already captioned there or in any other rank's file.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

__all__ = ["PUNCTUATIONS", "CaptionItem", "simple_tokenize", "tokenize_captions", "read_references", "list_images",
           "is_shard_set", "list_shard_samples", "list_items", "shard_references", "check_shards",
           "caption_scores", "match_references", "caption_folder", "collect_captions", "evaluate_captions"]

# pycocoevalcap.tokenizer.ptbtokenizer.PUNCTUATIONS (importing it is fine, it is a plain list)
from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS  # noqa: E402

from lmfusion.errors import UserError

_TOKEN = re.compile(r"[a-z0-9]+|'[a-z]+|[^\sa-z0-9]+")
_IMAGE_EXT = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def simple_tokenize(text: str) -> str:
    """Lower-cased tokens joined by spaces, PTBTokenizer's punctuation removed
    (``"A Dog's toy."`` -> ``a dog 's toy``)."""
    return " ".join(t for t in _TOKEN.findall(text.lower()) if t not in PUNCTUATIONS)


def tokenize_captions(captions: dict[str, list[str]], tokenizer: str = "auto") -> tuple[dict[str, list[str]], str]:
    """``{id: [caption, ...]}`` tokenized; returns it and the tokenizer used (``ptb`` or ``simple``)."""
    if tokenizer not in ("auto", "ptb", "simple"):
        raise UserError(f"tokenizer must be auto, ptb or simple, got {tokenizer!r}")
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
        raise UserError(f"{len(missing)} captioned image(s) have no references, e.g. {missing[:3]}")
    if not candidates:
        raise UserError("no captions to score")
    refs = {k: references[k] for k in candidates}
    if any(not v for v in refs.values()):
        raise UserError("every image needs at least one reference caption")
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
        raise UserError(f"{path}: cannot read JSON ({e})") from e
    if isinstance(data, dict) and "annotations" in data:
        names = {img["id"]: img["file_name"] for img in data.get("images", [])}
        out: dict[str, list[str]] = {}
        for ann in data["annotations"]:
            key = names.get(ann["image_id"], str(ann["image_id"]))
            out.setdefault(key, []).append(str(ann["caption"]))
        return out
    if isinstance(data, dict) and all(isinstance(v, list) for v in data.values()):
        return {str(k): [str(c) for c in v] for k, v in data.items()}
    raise UserError(f"{path}: expected COCO caption annotations or {{image: [captions]}}")


@dataclass(frozen=True)
class CaptionItem:
    """One image to caption: an image file, or one sample of a latent shard set."""

    name: str  # its key in captions.rank*.jsonl and in the references: the file name, or the shard sample key
    path: Path  # the image file, or the shard tar holding the sample
    caption: Optional[str] = None  # a shard sample's own caption
    source: Optional[str] = None  # a shard sample's source image (sample JSON 'source')

    @property
    def is_latent(self) -> bool:
        return self.path.suffix == ".tar"


def list_images(directory: Path) -> list[CaptionItem]:
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"--images {directory}: no such directory")
    images = sorted(p for p in directory.iterdir() if p.suffix.lower() in _IMAGE_EXT)
    if not images:
        raise UserError(f"--images {directory}: no image files ({', '.join(_IMAGE_EXT)}) and no shard "
                        f"manifest.json")
    return [CaptionItem(p.name, p) for p in images]


def is_shard_set(directory: Path) -> bool:
    from lmfusion.data.shard_format import MANIFEST

    return (Path(directory) / MANIFEST).is_file()


def list_shard_samples(directory: Path) -> list[CaptionItem]:
    """Every sample of a shard set (manifest order, then tar order), with its caption and source; latents are read
    only when captioned."""
    from lmfusion.data import shard_format as fmt

    directory = Path(directory)
    manifest = fmt.read_manifest(directory)
    items = []
    for entry in manifest.get("shards") or []:
        path = directory / entry["name"]
        if not path.is_file():
            raise FileNotFoundError(f"{path}: listed in {directory / fmt.MANIFEST} but missing")
        for key, fields in fmt.iter_samples(path):
            if "latent.npy" not in fields or "txt" not in fields:
                raise UserError(f"{path}:{key}: sample has no latent.npy or txt member ({sorted(fields)})")
            try:
                source = json.loads(fields["json"]).get("source") if "json" in fields else None
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise UserError(f"{path}:{key}.json: not valid JSON ({e})") from e
            items.append(CaptionItem(key, path, fields["txt"].decode("utf-8").strip(), source))
    if not items:
        raise UserError(f"--images {directory}: the shard set holds no samples")
    return items


def list_items(path: Path) -> list[CaptionItem]:
    """``--images``: a shard set (has ``manifest.json``) or a folder of image files."""
    return list_shard_samples(path) if is_shard_set(path) else list_images(path)


def shard_references(items: list[CaptionItem]) -> dict[str, list[str]]:
    """Each shard sample's own caption as its single reference."""
    return {it.name: [it.caption] for it in items if it.caption}


def check_shards(directory: Path, model_config, checkpoint_vae: Optional[dict]) -> None:
    """The shard latents must fit the model (``latent.shape``) and come from the checkpoint's VAE (config hash)."""
    from lmfusion.data import shard_format as fmt

    manifest = fmt.read_manifest(directory)
    where = Path(directory) / fmt.MANIFEST
    img = model_config.image
    want = [img.latent_channels, img.latent_size, img.latent_size]
    have = list((manifest.get("latent") or {}).get("shape") or [])
    if have != want:
        raise UserError(f"{where}: field 'latent.shape' is {have}, the model takes latents {want}")
    vae = manifest.get("vae") or {}
    if checkpoint_vae and vae.get("config_hash") != checkpoint_vae.get("config_hash"):
        raise UserError(f"{where}: field 'vae' names {vae.get('id')!r}, but the checkpoint was trained on latents "
                        f"of {checkpoint_vae.get('id')!r}; build the shards with that VAE")


class _ShardLatents:
    """Latents of shard samples, one tar held in memory at a time (items arrive in shard order)."""

    def __init__(self) -> None:
        self._path, self._members = None, {}

    def __call__(self, item: CaptionItem):
        import torch

        from lmfusion.data.shard_format import iter_samples, load_npy

        if item.path != self._path:
            self._members = {k: f["latent.npy"] for k, f in iter_samples(item.path)}
            self._path = item.path
        arr = load_npy(self._members[item.name], f"{item.path}:{item.name}.latent.npy")
        return torch.from_numpy(arr.astype("float32"))  # (C, h, w), already scaled


def match_references(items: list[CaptionItem], references: dict[str, list[str]]) -> dict[str, list[str]]:
    """References keyed by each item's name (looked up by name, stem, then a shard sample's source name/stem)."""
    out, missing = {}, []
    for it in items:
        keys = [it.name, Path(it.name).stem]
        if it.source:
            keys += [it.source, Path(it.source).name, Path(it.source).stem]
        refs = next((references[k] for k in keys if k in references), None)
        if refs is None:
            missing.append(it.name)
        else:
            out[it.name] = refs
    if missing:
        raise UserError(f"{len(missing)} image(s) have no reference captions, e.g. {missing[:3]}")
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


def caption_folder(bundle, codec, images: list[CaptionItem], out_dir: Path, *, rank: int = 0, world: int = 1,
                   batch_size: int = 8, max_new_tokens: int = 32) -> int:
    """Caption this rank's share of ``images`` not captioned yet; append to ``captions.rank<r>.jsonl``. Returns how
    many were captioned now. ``codec`` encodes image files; shard latents need none (pass None)."""
    from lmfusion.evaluation.runtime import shard
    from lmfusion.inference.image import encode_image
    from lmfusion.inference.text import Image, SamplingParams, generate_text

    cfg, tok = bundle.config, bundle.tokenizer
    if tok is None:
        raise FileNotFoundError(f"{bundle.meta.base_dir}: no tokenizer files; captions need them")
    device = next(bundle.model.parameters()).device
    shard_latent = _ShardLatents()

    def latent(item: CaptionItem):
        if item.is_latent:
            return shard_latent(item).to(device)
        if codec is None:
            raise UserError(f"{item.path}: an image file needs a VAE to encode it")
        return encode_image(codec, cfg, item.path)

    out_dir.mkdir(parents=True, exist_ok=True)
    done = _read_done(out_dir)
    todo = [it for it in shard(images, rank, world) if it.name not in done]
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop_token_ids=bundle.meta.stop_token_ids)
    with open(out_dir / f"captions.rank{rank}.jsonl", "a", encoding="utf-8") as f:
        for i in range(0, len(todo), batch_size):
            chunk = todo[i:i + batch_size]
            prompts = [[cfg.bos_token_id, cfg.boi_token_id, Image(latent(it), 0), cfg.eoi_token_id] for it in chunk]
            for it, ids in zip(chunk, generate_text(bundle.model, prompts, params)):
                text = tok.decode(ids, skip_special_tokens=True).strip()
                f.write(json.dumps({"image": it.name, "caption": text}) + "\n")
            f.flush()
    return len(todo)


def collect_captions(out_dir: Path, images: Iterable[CaptionItem]) -> dict[str, str]:
    done = _read_done(out_dir)
    missing = [it.name for it in images if it.name not in done]
    if missing:
        raise UserError(f"{out_dir}: {len(missing)} image(s) not captioned, e.g. {missing[:3]}")
    return {it.name: done[it.name] for it in images}


def evaluate_captions(out_dir: Path, images: list[CaptionItem], references: dict[str, list[str]],
                      tokenizer: str = "auto", extra: Optional[dict] = None) -> dict:
    """Score the captions in ``out_dir`` and write ``caption_results.json``."""
    from lmfusion.utils import atomic_write_text

    refs = match_references(images, references)
    result = caption_scores(collect_captions(out_dir, images), refs, tokenizer)
    result.update(extra or {})
    atomic_write_text(out_dir / "caption_results.json", json.dumps(result, indent=1))
    return result
