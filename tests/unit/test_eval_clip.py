"""CLIP score (lmfusion.evaluation.fid.clip_score) with a real transformers ``CLIPModel``: a tiny random-weight model
(no CLIP weights are installable offline), a byte-level BPE ``CLIPTokenizer`` over a letter vocabulary, and the PIL
``CLIPImageProcessorPil``, saved with ``save_pretrained`` into one directory and loaded back by clip_score. The score
is compared with one computed by hand from the in-memory model: ``get_image_features`` / ``get_text_features`` one
pair at a time, normalised, ``100 * max(cos, 0)`` per pair, averaged. Tolerance: the same fp32 model and inputs on
both sides, only the batching and padding differ (1e-4 on scores of order 10)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmfusion.evaluation.fid import clip_score
from tests.fixtures import CLIP_MAX_POSITIONS as MAX_POSITIONS
from tests.fixtures import save_tiny_clip, tiny_clip

PROMPTS = ["a red square", "a green field", "a blue sky", "a white wall",
           "a black cat sitting on a long white wall"]  # 30 tokens > MAX_POSITIONS - 2


def _write_images(directory: Path, n: int) -> list[Path]:
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(1)
    paths = []
    for i in range(n):
        p = directory / f"{i}.png"
        pixels = torch.randint(0, 256, (40, 48, 3), generator=gen, dtype=torch.uint8).numpy()  # resized + cropped
        Image.fromarray(pixels).save(p)
        paths.append(p)
    return paths


def _cosines_by_hand(model, tokenizer, processor, paths, prompts) -> torch.Tensor:
    """cos(image, text) per pair, one pair at a time; a prompt is cut to its first MAX_POSITIONS - 2 tokens between
    the start and end tokens (CLIP pools at the end token)."""
    from PIL import Image

    cos = []
    with torch.no_grad():
        for p, text in zip(paths, prompts):
            pixels = processor(images=[Image.open(p).convert("RGB")], return_tensors="pt")["pixel_values"]
            ids = tokenizer(text, add_special_tokens=False)["input_ids"][:MAX_POSITIONS - 2]
            ids = torch.tensor([[tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]])
            img = model.get_image_features(pixel_values=pixels).pooler_output
            txt = model.get_text_features(input_ids=ids).pooler_output
            cos.append(torch.nn.functional.cosine_similarity(img, txt, dim=-1))
    return torch.cat(cos)


def test_clip_score_loads_local_dir_and_matches_by_hand(tmp_path):
    """Two directories: a random model and the same model with its text projection negated, which flips the sign
    of every cosine. The seed gives cosines of both signs, so the per-pair clamp cuts some pairs in each directory:
    the two scores sum to ``100 * mean |cos|`` (without the clamp they would sum to 0, and clamping the mean, as
    torchmetrics does, would give ``100 * |mean cos|``). The last prompt is longer than the text model's positions
    and must be truncated (HF's CLIP raises on a longer input). The second directory holds its tokenizer as
    vocab.json + merges.txt."""
    model, tokenizer, processor = tiny_clip()
    assert tokenizer.tokenize("a white wall") == ["a</w>", "whi", "t", "e</w>", "w", "a", "l", "l</w>"]
    assert len(tokenizer(PROMPTS[-1])["input_ids"]) > MAX_POSITIONS
    paths = _write_images(tmp_path / "img", len(PROMPTS))
    cos = _cosines_by_hand(model, tokenizer, processor, paths, PROMPTS)
    assert (cos > 0).any() and (cos < 0).any(), cos  # the clamp cuts pairs under either sign

    scores = {}
    for sign in (1, -1):
        directory = save_tiny_clip(tmp_path / f"clip{sign}", text_sign=sign, bpe_files=sign < 0)
        got = clip_score(paths, PROMPTS, directory, batch_size=2)  # batches of 2, 2, 1; padded within a batch
        want = float((100 * sign * cos).clamp_min(0).mean())
        assert got == pytest.approx(want, abs=1e-4), (sign, got, want, (100 * cos).tolist())
        scores[sign] = got
    assert scores[1] + scores[-1] == pytest.approx(float(100 * cos.abs().mean()), abs=2e-4)
    assert abs(float(100 * cos.mean())) < float(100 * cos.abs().mean()) - 1  # the two clamps differ here


def _one_line_error(exc_type, *args) -> str:
    with pytest.raises(exc_type) as e:
        clip_score(*args)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_clip_dir_errors_are_one_line(tmp_path):
    image = _write_images(tmp_path / "img", 1)
    absent = tmp_path / "absent"
    message = _one_line_error(FileNotFoundError, image, ["a"], absent)
    assert f"{absent}: no such directory" in message and "openai/clip-vit-large-patch14" in message
    assert "save_pretrained" in message

    # pickled weights only: refused before anything is loaded
    model, tokenizer, processor = tiny_clip()
    pickled = tmp_path / "pickled"
    model.config.save_pretrained(pickled)
    tokenizer.save_pretrained(pickled)
    processor.save_pretrained(pickled)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    message = _one_line_error(ValueError, image, ["a"], pickled)
    assert f"{pickled}: weights only as pickled pytorch_model.bin" in message and "model.safetensors" in message

    no_tokenizer = save_tiny_clip(tmp_path / "no_tok")
    (no_tokenizer / "tokenizer.json").unlink()
    message = _one_line_error(FileNotFoundError, image, ["a"], no_tokenizer)
    assert f"{no_tokenizer}: no tokenizer" in message

    with pytest.raises(ValueError, match="one prompt per image"):
        clip_score(image, ["a", "b"], no_tokenizer)
