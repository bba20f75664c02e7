"""CLIP score (lmfusion.evaluation.fid.clip_score) with a real open_clip model: random weights (no CLIP weights are
installable offline) saved to a local file, loaded back by clip_score through open_clip's own checkpoint loader, and
compared with the score computed by hand from the same model: ``100 * max(cos(image, text), 0)`` per pair, averaged.

open_clip needs a torchvision that imports beside the installed torch; the project venv's CPU torch 2.13.0 has none,
so this test skips there. It runs in a side venv (torch 2.14.1 + torchvision 0.29.1 + open-clip-torch; see
examples/eval_coco.md). Tolerance: the same fp32 model and inputs on both sides, only the batching differs (1e-4 on
scores of order 10)."""

from __future__ import annotations

import pytest
import torch


def _import_open_clip():
    try:
        import open_clip  # noqa: F401  (imports torchvision)
    except Exception as e:  # ImportError, or torchvision's 'operator torchvision::nms does not exist' RuntimeError
        pytest.skip(f"open_clip/torchvision do not import beside torch {torch.__version__}: {type(e).__name__}: "
                    f"{str(e).splitlines()[0][:120] if str(e) else ''}")
    return open_clip


MODEL = "ViT-B-32"
PROMPTS = ["a red square", "a green field", "a blue sky", "a white wall", "a black cat"]


def test_clip_score_loads_local_weights_and_matches_by_hand(tmp_path):
    """Two weight files: a random model and the same model with its text projection negated, which flips the sign
    of every cosine. Whatever the signs, one file has positive cosines (its score is their mean, not 0) and the
    clamp is exercised on the other; both must equal the by-hand score of the model loaded from that file."""
    open_clip = _import_open_clip()
    from PIL import Image

    from lmfusion.evaluation.fid import clip_score

    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(MODEL, pretrained=None)
    model.eval()
    gen = torch.Generator().manual_seed(1)
    paths = []
    for i in range(len(PROMPTS)):
        p = tmp_path / f"{i}.png"
        pixels = torch.randint(0, 256, (40, 48, 3), generator=gen, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(p)
        paths.append(p)
    tokenizer = open_clip.get_tokenizer(MODEL)
    with torch.no_grad():
        ims = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in paths])
        img = model.encode_image(ims)
        txt = model.encode_text(tokenizer(PROMPTS))
    cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)  # (n,)

    scores = {}
    for sign in (1, -1):
        state = model.state_dict()
        state["text_projection"] = sign * state["text_projection"]
        weights = tmp_path / f"clip_random_{sign}.pt"
        torch.save(state, weights)
        got = clip_score(paths, PROMPTS, MODEL, weights, batch_size=2)  # batches of 2, 2, 1
        want = float((100 * sign * cos).clamp_min(0).mean())
        assert got == pytest.approx(want, abs=1e-4), (sign, got, want, (100 * cos).tolist())
        scores[sign] = got
    assert max(scores.values()) > 0  # not a degenerate all-zero comparison


def test_missing_clip_weights_is_a_clear_error(tmp_path):
    from lmfusion.evaluation.fid import clip_score

    with pytest.raises(FileNotFoundError, match="--clip-weights"):
        clip_score([tmp_path / "a.png"], ["x"], MODEL, tmp_path / "absent.bin")
