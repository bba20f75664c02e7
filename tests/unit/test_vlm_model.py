"""The understanding path of a VLM base (lmfusion.model.vision) against HF's LlavaNextForConditionalGeneration.

One process, a one-rank gloo group (megatron TP=PP=1, CPU mode: the ``runtime`` fixture). The model is a tiny random
LLaVA-NeXT (tests/unit/test_hf_llava.py) converted with ``convert-hf``; our model is built from that base with the
image set perturbed, so that placeholder tokens routed through the image modules instead of the text ones would change
the logits. Tolerance 1e-4 (fp32): the same weights, but megatron's attention (SDPA with an explicit mask), fused
QKV/fc1 GEMMs and RoPE table differ from HF's in summation order (observed differences ~1e-6).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

from lmfusion import hf
from lmfusion.model.model import ModelInputs
from lmfusion.model.vision import attach_vision_path
from lmfusion.model.weights import trainable_parameter_names
from tests.fixtures_llava import PATCH, TILE, VOCAB, add_processor, llava_config, make_llava

# (h, w): a 2x1 tile grid, a 1x2 grid, a 2x1 grid that unpadding trims by a feature column a side, a small 1x2 one
SIZES = [(70, 40), (40, 70), (70, 20), (20, 30)]


@pytest.fixture(scope="module")
def vlm(runtime, tmp_path_factory):
    """(HF model, processor, our model at TP=PP=1 with the base's vision path, the base directory)."""
    from lmfusion.model.builder import build_model
    from tests.fixtures import GEN_IMAGE, perturb_image_set

    root = tmp_path_factory.mktemp("vlm")
    config = llava_config()
    model = make_llava(config, seed=5)
    model.save_pretrained(root / "hf", safe_serialization=True)
    processor = add_processor(root / "hf", config)
    base = hf.convert_hf(root / "hf", root / "base")
    cfg, weights = hf.load_base_state(base)
    cfg = dataclasses.replace(cfg, image=GEN_IMAGE, attention_backend="sdpa", linear_backend="local")
    with weights:
        ours = build_model(cfg, base=weights)
    perturb_image_set(ours, seed=7)
    attach_vision_path(ours, base)
    return model, processor, ours.eval(), base


def processed(processor, size: tuple[int, int], text: str = "<image> w1 w2 w3"):
    from PIL import Image

    pixels = np.random.default_rng(sum(size)).integers(0, 256, (*size, 3), dtype=np.uint8)
    return processor(images=Image.fromarray(pixels), text=text, return_tensors="pt")


def our_logits(model, inputs) -> torch.Tensor:
    tokens = inputs["input_ids"]
    out = model(ModelInputs(tokens=tokens, document_ids=torch.zeros_like(tokens),
                            pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"]))
    return out.logits.transpose(0, 1)[..., :VOCAB]  # (s, b, V_pad) -> (b, s, V)


def test_sizes_make_different_tilings():
    pins = llava_config().image_grid_pinpoints
    assert len({get_anyres_image_grid_shape(list(s), pins, TILE) for s in SIZES[:2]}) == 2


@pytest.mark.parametrize("size", SIZES)
def test_logits_equal_hf(vlm, size):
    model, processor, ours, _ = vlm
    inputs = processed(processor, size)
    with torch.no_grad():
        expected = model(**inputs).logits
        got = our_logits(ours, inputs)
    assert got.shape == expected.shape
    assert (got - expected).abs().max() < 1e-4


def test_features_equal_hf(vlm):
    model, processor, ours, _ = vlm
    inputs = processed(processor, SIZES[0])
    with torch.no_grad():
        expected = torch.cat(model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"],
                                                            return_dict=True).pooler_output)
        got = ours.vision(inputs["pixel_values"], inputs["image_sizes"])
    assert torch.equal(got, expected)  # the same modules on the same input: bit-identical
    assert got.shape[0] == int((inputs["input_ids"] == model.config.image_token_index).sum())


def test_vision_path_is_frozen(vlm):
    _, processor, ours, _ = vlm
    vision_names = [f"vision.{n}" for n, _ in ours.vision.named_parameters()]
    assert vision_names and not any(p.requires_grad for p in ours.vision.parameters())
    assert not set(vision_names) & set(trainable_parameter_names(ours))
    assert not any(k.startswith("vision.") for k in ours.sharded_state_dict())
    ours.train()
    assert not ours.vision.training  # dropout stays off inside the frozen tower
    inputs = processed(processor, SIZES[1])
    our_logits(ours, inputs).float().square().mean().backward()
    assert all(p.grad is None for p in ours.vision.parameters())
    ours.zero_grad(set_to_none=True)
    ours.eval()


def test_placeholder_count_mismatch_is_one_line(vlm):
    _, processor, ours, _ = vlm
    inputs = processed(processor, SIZES[0])
    tokens = inputs["input_ids"].clone()
    tokens[0, 0] = 3  # one placeholder fewer
    with pytest.raises(ValueError, match=r"<image> placeholders .* features"):
        ours(ModelInputs(tokens=tokens, document_ids=torch.zeros_like(tokens),
                         pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"]))


def test_a_size_is_unpadded(vlm):
    """One of SIZES loses feature columns to unpadding (so the parity above covers ``unpad_image``)."""
    _, processor, _, _ = vlm
    pins, side = llava_config().image_grid_pinpoints, TILE // PATCH
    grids = [get_anyres_image_grid_shape(list(s), pins, TILE) for s in SIZES]
    full = [side * side + rows * side * (cols * side + 1) for rows, cols in grids]  # base tile + rows with newlines
    got = [int((processed(processor, s)["input_ids"] == llava_config().image_token_index).sum()) for s in SIZES]
    assert any(g < f for g, f in zip(got, full))


@pytest.mark.parametrize("size", SIZES[:2])
def test_greedy_tokens_equal_hf_generate(vlm, size):
    from lmfusion.inference.text import SamplingParams
    from lmfusion.inference.vlm import generate_with_images

    model, processor, ours, _ = vlm
    inputs = processed(processor, size)
    n = 12
    with torch.no_grad():
        want = model.generate(**inputs, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    want = want[0, inputs["input_ids"].shape[1]:].tolist()
    assert len(want) == n and len(set(want)) > 1  # a real sequence, not one repeated token
    got = generate_with_images(ours, inputs["input_ids"][0], inputs["pixel_values"], inputs["image_sizes"],
                               SamplingParams(max_new_tokens=n))
    assert got == want


def test_load_for_inference_attaches_the_vision_path(vlm, tmp_path):
    """``load_for_inference`` of a VLM base (what ``generate``/``chat``/``caption`` use) gives the understanding path:
    greedy tokens equal HF's generate."""
    from lmfusion.inference.load import load_for_inference
    from lmfusion.inference.text import SamplingParams
    from lmfusion.inference.vlm import generate_with_images

    model, processor, _, base = vlm
    loaded = load_for_inference(base, device="cpu").model
    assert loaded.vision is not None and not any(p.requires_grad for p in loaded.vision.parameters())
    inputs = processed(processor, SIZES[2])
    with torch.no_grad():
        want = model.generate(**inputs, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    got = generate_with_images(loaded, inputs["input_ids"][0], inputs["pixel_values"], inputs["image_sizes"],
                               SamplingParams(max_new_tokens=6))
    assert got == want[0, inputs["input_ids"].shape[1]:].tolist()


def test_training_checkpoint_keeps_the_understanding_path(vlm, tmp_path):
    """A training checkpoint on a VLM base (image set moved by a perturbation standing in for training) answers via the
    base's understanding path unchanged: its logits on an image + question are bit-identical to the base's, and the
    image set did load (the image modules differ from the base's)."""
    import json

    from megatron.core import dist_checkpointing

    from lmfusion.inference.load import load_for_inference
    from lmfusion.model.builder import build_model
    from lmfusion.rundir import CHECKPOINT_JSON, LATEST, base_files, base_sha256
    from tests.fixtures import GEN_IMAGE, perturb_image_set

    _, processor, _, base = vlm
    cfg, weights = hf.load_base_state(base)
    cfg = dataclasses.replace(cfg, image=GEN_IMAGE, attention_backend="sdpa", linear_backend="local")
    with weights:
        trained = build_model(cfg, base=weights)
    perturb_image_set(trained, seed=13)
    iter_dir = tmp_path / "run" / "iter_0000003"
    iter_dir.mkdir(parents=True)
    dist_checkpointing.save(trained.sharded_state_dict(), str(iter_dir))
    (iter_dir / CHECKPOINT_JSON).write_text(json.dumps({
        "base": str(base), "model": cfg.to_dict(), "vae": {"kind": "identity"},
        "base_conversion_sha256": base_sha256(base), "base_files": base_files(base)}))
    (tmp_path / "run" / LATEST).write_text("3\n")
    assert "vision.safetensors" in base_files(base)  # the run record pins the vision weights too

    run, plain = load_for_inference(tmp_path / "run", device="cpu").model, load_for_inference(base, device="cpu").model
    image_params = [(n, p) for n, p in run.named_parameters() if n.endswith("image_weight")]
    assert image_params and not all(torch.equal(p, dict(plain.named_parameters())[n]) for n, p in image_params)
    inputs = processed(processor, SIZES[0])
    with torch.no_grad():
        assert torch.equal(our_logits(run, inputs), our_logits(plain, inputs))
