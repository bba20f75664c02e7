"""An independent judge: a small CNN trained on the real training images (never on generated ones).

It scores generated images by class accuracy (does the classifier see the class they were prompted with?) and by
the Fréchet distance between Gaussians fitted to its 128-d penultimate features (an FID in this network's feature
space instead of Inception's; same formula, :func:`lmfusion.evaluation.fid.frechet_distance`). The real test images
give the reference line for both. Trained once (Adam, 2 epochs, ~89% test accuracy on Fashion-MNIST) and cached as
safetensors keyed by the dataset.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["SmallCNN", "to_input", "train_classifier", "load_or_train", "predict", "features", "frechet"]

FEATURES = 128


class SmallCNN(nn.Module):
    """(b, 1, 28, 28) in [-1, 1] -> logits (b, classes); ``features`` is the 128-d penultimate activation."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # (b, 32, 14, 14)
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (b, 64, 7, 7)
            nn.Flatten(), nn.Linear(64 * 7 * 7, FEATURES), nn.ReLU())
        self.head = nn.Linear(FEATURES, classes)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


def to_input(images: np.ndarray | Tensor) -> Tensor:
    """uint8 images (n, 28, 28) -> (n, 1, 28, 28) float32 in [-1, 1]."""
    x = torch.from_numpy(np.array(images, dtype=np.float32))  # a copy: IDX arrays are read-only views
    if x.ndim != 3 or tuple(x.shape[1:]) != (28, 28):
        raise ValueError(f"classifier input must be (n, 28, 28) uint8, got {tuple(x.shape)}")
    return (x / 127.5 - 1.0)[:, None]


@torch.no_grad()
def _batched(fn: Callable[[Tensor], Tensor], x: Tensor, batch: int = 1000) -> Tensor:
    return torch.cat([fn(x[i:i + batch]) for i in range(0, len(x), batch)])


def predict(model: SmallCNN, images: np.ndarray) -> np.ndarray:
    return _batched(model, to_input(images)).argmax(-1).numpy()


def features(model: SmallCNN, images: np.ndarray) -> np.ndarray:
    return _batched(model.features, to_input(images)).double().numpy()


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature sets ``a`` and ``b`` (n, d)."""
    from lmfusion.evaluation.fid import frechet_distance, statistics

    return frechet_distance(*statistics(a), *statistics(b))


def train_classifier(images: np.ndarray, labels: np.ndarray, classes: int, epochs: int = 2, seed: int = 0,
                     batch_size: int = 128) -> SmallCNN:
    from lmfusion.progress import progress

    torch.manual_seed(seed)
    model = SmallCNN(classes)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = to_input(images), torch.as_tensor(labels, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        bar = progress(range(0, len(x), batch_size), desc=f"classifier epoch {epoch + 1}/{epochs}", leave=False)
        for i in bar:
            idx = order[i:i + batch_size]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if i % (50 * batch_size) == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


def load_or_train(ds, cache_dir: Path, log: Callable[[str], None] = print, epochs: int = 2,
                  seed: int = 0) -> tuple[SmallCNN, dict]:
    """The cached classifier of dataset ``ds`` (:class:`lmfusion.quickstart.data.Dataset`), trained if missing;
    returns (model, info) where info has its test accuracy. A non-zero ``seed`` is part of the cache key."""
    import time

    from safetensors.torch import load_file, save_file

    from lmfusion.utils import atomic_write_text

    key = f"{ds.name}-cnn-e{epochs}" + (f"-s{seed}" if seed else "")
    weights, meta = cache_dir / f"{key}.safetensors", cache_dir / f"{key}.json"
    model = SmallCNN(len(ds.classes))
    if weights.is_file() and meta.is_file():
        model.load_state_dict(load_file(str(weights)))
        info = json.loads(meta.read_text())
        log(f"classifier: {weights} (cached; test accuracy {info['test_accuracy']:.4f})")
        return model.eval(), info
    log(f"classifier: training a small CNN on {len(ds.train_images)} real {ds.name} images ({epochs} epochs)")
    t0 = time.perf_counter()
    model = train_classifier(ds.train_images, ds.train_labels, len(ds.classes), epochs, seed=seed)
    acc = float((predict(model, ds.test_images) == ds.test_labels).mean())
    info = {"dataset": ds.name, "epochs": epochs, "seed": seed, "test_accuracy": acc, "train_seconds": time.perf_counter() - t0}
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = weights.with_name(f".{weights.name}.tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    tmp.replace(weights)
    atomic_write_text(meta, json.dumps(info, indent=2) + "\n")
    log(f"classifier: test accuracy {acc:.4f} in {info['train_seconds']:.0f} s -> {weights}")
    return model, info
