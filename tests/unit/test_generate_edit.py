"""``lmfusion generate --edit IMG --prompt TEXT``: the source image is encoded through the run's VAE as clean
context and the target is sampled after the instruction. Shape and determinism, and that the source conditions
the output (another source, another image; the same source, the same image)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from lmfusion.cli import main
from lmfusion.inference.image import edit_image, encode_image
from lmfusion.inference.load import load_for_inference, load_vae
from tests.fixtures import GEN_IMAGE

STEPS = 3  # denoising steps in tests
SIDE = GEN_IMAGE.latent_size  # identity VAE: pixels = latents


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("edit_src")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(2):
        paths.append(root / f"src{i}.png")
        PILImage.fromarray(rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)).save(paths[-1])
    return paths


def _edit(ckpts, tmp_path, source, name, seed=1):
    root, _ = ckpts
    out = tmp_path / f"{name}.png"
    args = ["generate", "--ckpt", str(root / "run"), "--edit", str(source), "--prompt", "make it red",
            "--out", str(out), "--steps", str(STEPS), "--cfg", "1.6", "--seed", str(seed), "--device", "cpu"]
    assert main(args) == 0
    with PILImage.open(tmp_path / f"{name}-000.png") as im:
        assert im.size == (SIDE, SIDE) and im.mode == "RGB"
        return np.asarray(im).copy()


def test_cli_edit_writes_a_deterministic_image_conditioned_on_the_source(ckpts, sources, tmp_path, capsys):
    a = _edit(ckpts, tmp_path, sources[0], "a")
    again = _edit(ckpts, tmp_path, sources[0], "again")
    other = _edit(ckpts, tmp_path, sources[1], "other")
    assert "wrote" in capsys.readouterr().out
    assert np.array_equal(a, again)  # same source, seed and prompt: the same image
    assert not np.array_equal(a, other)  # only the source changed


def test_edit_image_latents_depend_on_the_source(ckpts, sources):
    root, _ = ckpts
    bundle = load_for_inference(root / "run", device="cpu")
    codec = load_vae("identity", None, torch.device("cpu"))
    tok = bundle.tokenizer
    ids = [tok.encode("make it red", add_special_tokens=False)]
    lat = [encode_image(codec, bundle.config, p) for p in sources]
    x = edit_image(bundle.model, lat[0], ids, steps=STEPS, seed=2, diffusion=bundle.diffusion)
    y = edit_image(bundle.model, lat[1], ids, steps=STEPS, seed=2, diffusion=bundle.diffusion)
    assert x.shape == (1, GEN_IMAGE.latent_channels, SIDE, SIDE)
    assert torch.equal(x, edit_image(bundle.model, lat[0], ids, steps=STEPS, seed=2, diffusion=bundle.diffusion))
    assert (x - y).abs().max() > 1e-4


def test_cli_edit_bad_image_is_one_line(ckpts, tmp_path, capsys):
    root, _ = ckpts
    rc = main(["generate", "--ckpt", str(root / "run"), "--edit", str(tmp_path / "nope.png"), "--prompt", "x",
               "--out", str(tmp_path / "o.png"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc != 0 and "nope.png" in err and len(err.strip().splitlines()) == 1
