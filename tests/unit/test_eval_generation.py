"""Generation eval (lmfusion.evaluation.generation): sharding over 2 ranks draws every prompt exactly once, and a
rerun draws only what is missing. The two ranks run in this process with explicit rank/world (the split is the
only rank-dependent part); the model is the ckpts fixture's tiny training checkpoint (identity VAE, 8 px)."""

from __future__ import annotations

import json

import torch

from lmfusion.evaluation import generation as gen
from lmfusion.evaluation.runtime import shard
from lmfusion.inference.load import load_for_inference, load_vae

PROMPTS = ["a cat", "a red shoe", "a dog", "two birds", "a bag"]  # odd count: ranks get 3 and 2


def test_shard_covers_every_item_once():
    for n in range(7):
        parts = [shard(list(range(n)), r, 3) for r in range(3)]
        assert sorted(sum(parts, [])) == list(range(n))


def test_two_ranks_draw_each_prompt_once_and_resume(ckpts, tmp_path, monkeypatch):
    root, _ = ckpts
    bundle = load_for_inference(root / "run", device="cpu")
    codec = load_vae("identity", None, torch.device("cpu"))
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    prompts = gen.read_prompts(tmp_path / "p.jsonl")
    calls = []

    import lmfusion.inference.image as image

    orig = image.text_to_image

    def counting(model, captions, **kw):
        calls.append(len(captions))
        return orig(model, captions, **kw)

    monkeypatch.setattr(image, "text_to_image", counting)
    out = tmp_path / "out"
    kw = dict(cfg_scales=[1.0, 1.5], n=2, steps=2, sampler="ddim", batch_size=2, world=2)
    drawn = [gen.generate_images(bundle, codec, prompts, out, rank=r, **kw) for r in range(2)]
    assert drawn == [2 * 3, 2 * 2]  # per scale: rank 0 prompts 0, 2, 4; rank 1 prompts 1, 3
    for scale in (1.0, 1.5):
        names = sorted(p.name for p in gen.cfg_dir(out, scale).iterdir())
        assert names == [f"{i:06d}_{k}.png" for i in range(len(PROMPTS)) for k in range(2)]
    assert sum(calls) == 2 * len(PROMPTS)
    # resume: everything present -> nothing drawn; one image lost -> only its prompt is drawn again
    assert [gen.generate_images(bundle, codec, prompts, out, rank=r, **kw) for r in range(2)] == [0, 0]
    before = gen.image_path(out, 1.5, 1, 0).read_bytes()
    gen.image_path(out, 1.5, 3, 1).unlink()
    calls.clear()
    assert [gen.generate_images(bundle, codec, prompts, out, rank=r, **kw) for r in range(2)] == [0, 1]
    assert calls == [1] and gen.image_path(out, 1.5, 3, 1).is_file()
    assert gen.image_path(out, 1.5, 1, 0).read_bytes() == before  # untouched

