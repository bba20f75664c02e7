"""The quickstart's data: Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (gzipped IDX files), or
scikit-learn's 8 x 8 digits when the package is missing; captions in several phrasings; shards built with
``data_tools/build_shards.py`` from the latents of the quickstart's own small VAE (:mod:`lmfusion.quickstart.vae`,
which says why a VAE and not pixels). The shard builder resizes to ``resolution`` (28 -> 32) and feeds RGB in
[-1, 1] to the VAE; the classifier sees images resized back to 28 px, grey.
"""

from __future__ import annotations

import gzip
import json
import random
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from lmfusion.errors import UserError

__all__ = ["FASHION_DIR", "FASHION_CLASSES", "DIGIT_CLASSES", "TEMPLATES", "Dataset", "read_idx", "load_dataset",
           "caption", "prompt", "write_image_folder", "build_shards"]

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
#: Class nouns with their article, in label order.
FASHION_CLASSES = ("a t-shirt", "a pair of trousers", "a pullover", "a dress", "a coat", "a sandal", "a shirt",
                   "a sneaker", "a bag", "an ankle boot")
DIGIT_CLASSES = tuple(f"the digit {w}" for w in ("zero", "one", "two", "three", "four", "five", "six", "seven",
                                                  "eight", "nine"))
#: Caption phrasings used in training; generation prompts use the first.
TEMPLATES = ("a photo of {}", "a picture of {}", "an image of {}", "{}", "a black and white photo of {}",
             "a small grey picture of {}")


@dataclass
class Dataset:
    name: str                 # "fashion-mnist" or "sklearn-digits"
    source: str               # where it was read from
    classes: tuple[str, ...]
    train_images: np.ndarray  # (n, 28, 28) uint8, white object on black
    train_labels: np.ndarray  # (n,) int64
    test_images: np.ndarray
    test_labels: np.ndarray
    fallback_reason: str = ""  # why the fallback was used ("" for Fashion-MNIST)

    @property
    def size(self) -> int:
        return int(self.train_images.shape[-1])


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped or not) as a numpy array; ValueError naming the file when malformed."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise UserError(f"{path}: unreadable ({e})") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise UserError(f"{path}: not an unsigned-byte IDX file (magic {data[:4].hex()})")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise UserError(f"{path}: header says {dims} ({int(np.prod(dims))} bytes) but holds {body.size}")
    return body.reshape(dims)


def _fashion(root: Path) -> Dataset:
    arrays = {}
    for split, (img, lab) in _FILES.items():
        images, labels = read_idx(root / img), read_idx(root / lab).astype(np.int64)
        if images.ndim != 3 or labels.shape != images.shape[:1]:
            raise UserError(f"{root / img}: shape {images.shape} does not match labels {labels.shape}")
        arrays[split] = (images, labels)
    return Dataset("fashion-mnist", str(root), FASHION_CLASSES, *arrays["train"], *arrays["test"])


def _digits(reason: str) -> Dataset:
    """scikit-learn's 1,797 8 x 8 digits (0..16), upscaled to 28 px; 20% held out as the test split."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.stack([np.asarray(Image.fromarray((im * 255 / 16).astype(np.uint8)).resize(
        (28, 28), Image.Resampling.BICUBIC)) for im in d.images])
    order = np.random.default_rng(0).permutation(len(images))
    cut = int(0.8 * len(order))
    tr, te = order[:cut], order[cut:]
    labels = d.target.astype(np.int64)
    return Dataset("sklearn-digits", "sklearn.datasets.load_digits", DIGIT_CLASSES, images[tr], labels[tr],
                   images[te], labels[te], fallback_reason=reason)


def load_dataset(root: Path = FASHION_DIR) -> Dataset:
    """Fashion-MNIST from ``root``, else the digits fallback (``fallback_reason`` says why)."""
    missing = [name for files in _FILES.values() for name in files if not (root / name).is_file()]
    if not missing:
        return _fashion(root)
    return _digits(f"Fashion-MNIST not found ({root / missing[0]} missing; install the Debian package "
                   f"dataset-fashion-mnist); using scikit-learn's 8x8 digits instead")


def caption(classes: tuple[str, ...], label: int, rng: random.Random) -> str:
    return rng.choice(TEMPLATES).format(classes[label])


def prompt(classes: tuple[str, ...], label: int) -> str:
    """The generation prompt of a class (the first phrasing)."""
    return TEMPLATES[0].format(classes[label])


def balanced_indices(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """``per_class`` indices of each label (fewer if a class has fewer), interleaved in a seeded order."""
    rng = np.random.default_rng(seed)
    picked = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in np.unique(labels)]
    out = np.concatenate(picked)
    return out[rng.permutation(len(out))]


def write_image_folder(ds: Dataset, out: Path, per_class: int, seed: int = 0) -> tuple[Path, int]:
    """PNG + ``.txt`` caption pairs of a balanced training subset (``build_shards``' folder input); reuses a
    complete folder. Returns (folder, number of images)."""
    from PIL import Image

    from lmfusion.utils import atomic_write_text

    idx = balanced_indices(ds.train_labels, per_class, seed)
    done = out / "done.json"
    want = {"dataset": ds.name, "source": ds.source, "per_class": per_class, "seed": seed, "n": int(len(idx))}
    if done.is_file() and json.loads(done.read_text()) == want:
        return out / "images", len(idx)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i, j in enumerate(idx):
        stem = images / f"{i:06d}"
        Image.fromarray(ds.train_images[j]).save(stem.with_suffix(".png"))
        stem.with_suffix(".txt").write_text(caption(ds.classes, int(ds.train_labels[j]), rng) + "\n")
    atomic_write_text(done, json.dumps(want) + "\n")
    return images, len(idx)


def build_shards(images: Path, out: Path, resolution: int, log: Callable[[str], None] = print,
                 vae: str = "identity") -> Path:
    """``data_tools/build_shards.py IMAGES --output OUT --vae VAE --resolution R`` (skips a complete set)."""
    from data_tools import build_shards as bs
    from lmfusion.data import shard_format as fmt

    if (out / fmt.MANIFEST).is_file():
        log(f"shards: {out} (cached)")
        return out
    argv = [str(images), "--output", str(out), "--vae", vae, "--resolution", str(resolution),
            "--min-size", "8", "--samples-per-shard", "2000", "--workers", "0", "--device", "cpu",
            "--no-progress"]
    log("shards: python data_tools/build_shards.py " + " ".join(argv))
    status = bs.main(argv)
    if status != 0:
        raise UserError(f"data_tools/build_shards.py failed (status {status}) building {out}")
    return out
