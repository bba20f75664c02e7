"""Latents from ``--store mean_std`` shards (a tiny random AutoencoderKL): the loader draws mean + std * eps with a
generator seeded per sample visit, so draws are reproducible, differ between epochs, and are standard normal."""

from __future__ import annotations

import contextlib
import io
import itertools
import math

import numpy as np
import pytest
import torch

from data_tools import build_shards
from lmfusion.data import shard_format as fmt
from lmfusion.data import MultimodalLoader
from tests.fixtures import data_config, make_images, make_tokenizer, manifest, model_config

RES, BLOCKS, CHANNELS = 16, (8, 16), 4


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from diffusers import AutoencoderKL

    root = tmp_path_factory.mktemp("kl")
    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=BLOCKS, down_block_types=("DownEncoderBlock2D",) * len(BLOCKS),
                  up_block_types=("UpDecoderBlock2D",) * len(BLOCKS), latent_channels=CHANNELS, norm_num_groups=4,
                  layers_per_block=1, scaling_factor=0.5).save_pretrained(root / "vae")
    images = root / "img"
    make_images(images, 12, seed=5)
    # the fixture's images are smaller than RES: --min-size 1 lets the builder resize them up
    with contextlib.redirect_stdout(io.StringIO()):
        assert build_shards.main([str(images), "--output", str(root / "set"), "--vae", str(root / "vae"),
                                  "--resolution", str(RES), "--min-size", "1", "--samples-per-shard", "4",
                                  "--workers", "0", "--store", "mean_std", "--no-progress"]) == 0
    tok = make_tokenizer(root / "tok")
    side = RES // 2 ** (len(BLOCKS) - 1)
    stored = {}
    for entry in manifest(root / "set")["shards"]:
        for key, fields in fmt.iter_samples(root / "set" / entry["name"]):
            stored[key] = (np.load(io.BytesIO(fields["latent.npy"]), allow_pickle=False).astype(np.float32),
                           np.load(io.BytesIO(fields["std.npy"]), allow_pickle=False).astype(np.float32))
    return root / "set", tok, model_config(tok, latent_size=side, channels=CHANNELS), stored


def _draws(batches):
    for b in batches:
        ids = [s for row in b.sample_ids for s in row]
        for j, sid in enumerate(ids):
            yield sid, b.image_latents[j].numpy()


def test_latent_draws(env):
    shards, tok, mc, stored = env
    assert manifest(shards)["latent"]["store"] == "mean_std"
    cfg = data_config([shards], tok, caption_dropout=0.0)
    first = list(_draws(itertools.islice(MultimodalLoader(cfg, mc), 20)))
    again = list(_draws(itertools.islice(MultimodalLoader(cfg, mc), 20)))
    assert [s for s, _ in first] == [s for s, _ in again]
    assert all(np.array_equal(x, y) for (_, x), (_, y) in zip(first, again))  # seeded: reproducible
    z, by_key = [], {}
    for sid, latent in first:
        _, key, epoch = sid.split(":")
        mean, std = stored[key]
        z.append(((latent - mean) / std).ravel())
        by_key.setdefault(key, {})[epoch] = latent
    z = np.concatenate(z).astype(np.float64)
    n = z.size  # eps ~ N(0, 1): mean within 5 sigma, variance within 5 sigma (var of s^2 is 2/n for a normal)
    assert abs(z.mean()) <= 5 / math.sqrt(n) and abs(z.var() - 1) <= 5 * math.sqrt(2 / n), (z.mean(), z.var())
    twice = [v for v in by_key.values() if len(v) > 1]
    assert twice and all(not np.array_equal(*list(v.values())[:2]) for v in twice)  # a new draw every epoch
