"""Frozen-aware FLOP accounting: token classes against a brute-force reading of the batch and the attention mask,
per-weight FLOPs against the base checkpoint's tensor shapes, and the module's rule (trainable 6n, frozen on the
gradient path 4n, frozen off it 2n) as differences between the accounting modes."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch

from lmfusion.config import ModelConfig
from lmfusion.hf import base_shapes
from lmfusion.model.attention import AttentionMask
from lmfusion.model.image_config import ImageIOConfig, tokens_per_image
from lmfusion.training import flops
from lmfusion.training.synthetic import synthetic_batches

MODEL = ModelConfig(vocab_size=300, hidden_size=64, ffn_hidden_size=96, num_layers=2, num_attention_heads=4,
                    num_query_groups=2, bos_token_id=1, eos_token_id=2, boi_token_id=3, eoi_token_id=4,
                    image=ImageIOConfig(latent_channels=3, latent_size=8, patch_size=2, kind="unet",
                                        block_channels=(16, 16), norm_groups=8, layers_per_block=1))
SEQ = 96


def batches(n: int = 3, **kw):
    return list(itertools.islice(synthetic_batches(MODEL, SEQ, 2, seed=5, **kw), n))


def image_ids(batch) -> torch.Tensor:
    T = tokens_per_image(MODEL.image)
    ids = torch.full(batch.tokens.shape, -1, dtype=torch.long)
    for j, (row, start) in enumerate(zip(batch.image_batch.tolist(), batch.image_start.tolist())):
        ids[row, start:start + T] = j
    return ids


def brute_force(batch) -> flops.TokenCounts:
    """Position by position: a text position is on the gradient path iff an image of its document precedes it;
    key counts are the rows of the dense LMFusion mask."""
    mask = AttentionMask(batch.document_ids, image_ids(batch)).dense[:, 0]  # (b, s, s)
    c = flops.TokenCounts(images=batch.num_images)
    for r in range(batch.tokens.shape[0]):
        seen: dict[int, bool] = {}
        for t in range(batch.tokens.shape[1]):
            doc, img = int(batch.document_ids[r, t]), bool(batch.modality_ids[r, t])
            on = img or seen.get(doc, False)
            keys = int(mask[r, t].sum())
            if img:
                c.image += 1
                seen[doc] = True
            elif on:
                c.text_on += 1
            else:
                c.text_off += 1
            if on:
                c.attn_on += keys
            else:
                c.attn_off += keys
    return c


def test_token_classes_and_attention_pairs_match_brute_force():
    bs = batches(4)
    assert any(bool(b.image_first.any()) for b in bs) and any(not bool(b.image_first.all()) for b in bs)
    for b in bs:
        assert flops.count_tokens(b.modality_ids, b.document_ids) == brute_force(b)


def test_per_weight_flops_come_from_the_base_tensor_shapes():
    shapes = base_shapes(MODEL)
    per_layer = sum(math.prod(shapes[f"decoder.layers.0.{k}"]) for k in (
        "self_attention.linear_qkv.weight", "self_attention.linear_proj.weight", "mlp.linear_fc1.weight",
        "mlp.linear_fc2.weight"))
    f = flops.model_flops(MODEL)
    assert f.layer_linear == 2 * per_layer
    assert f.lm_head == 2 * math.prod(shapes["output_layer.weight"])
    assert f.attn_pair == 2 * 2 * MODEL.num_attention_heads * MODEL.head_dim  # QK^T and AV, multiply-add = 2
    assert f.image_io > 0


def test_frozen_text_saves_exactly_what_design_says():
    """all_trainable - lmfusion = per text-after-image token 2n (6n -> 4n), per text-before-image token 4n
    (6n -> 2n), at every layer and at the LM head; attention backward for off-path queries (2 of 3 parts)."""
    f = flops.model_flops(MODEL)
    for b in batches(3):
        c = flops.count_tokens(b.modality_ids, b.document_ids)
        saved = flops.step_flops(MODEL, c, "all_trainable") - flops.step_flops(MODEL, c, "lmfusion")
        n_layers, n_head = f.layer_linear / 2, f.lm_head / 2
        want = (MODEL.num_layers * n_layers + n_head) * (2 * c.text_on + 4 * c.text_off) \
            + 2 * f.attn_pair * MODEL.num_layers * c.attn_off
        assert saved == pytest.approx(want, rel=1e-12)
        assert flops.step_flops(MODEL, c, "transfusion") == flops.step_flops(MODEL, c, "all_trainable")


def test_image_only_step_costs_the_same_frozen_or_not_and_flops_add_up():
    c = flops.TokenCounts(image=64, images=4, attn_on=640)
    assert flops.step_flops(MODEL, c, "lmfusion") == flops.step_flops(MODEL, c, "all_trainable")
    a, b = [flops.count_tokens(x.modality_ids, x.document_ids) for x in batches(2)]
    for mode in ("lmfusion", "all_trainable"):
        assert flops.step_flops(MODEL, a + b, mode) == pytest.approx(
            flops.step_flops(MODEL, a, mode) + flops.step_flops(MODEL, b, mode), rel=1e-12)


def test_as_implemented_counts_head_and_attention_backward_through_off_path_text():
    """The routed GEMMs skip off-path text's data gradient; the LM head (every position) and attention do not."""
    c = flops.count_tokens(batches(1)[0].modality_ids, batches(1)[0].document_ids)
    ideal = flops.step_flops(MODEL, c, "lmfusion")
    implemented = flops.step_flops(MODEL, c, "lmfusion", as_implemented=True)
    f = flops.model_flops(MODEL)
    extra = f.lm_head * c.text_off + f.lm_head * c.image \
        + 2 * f.attn_pair * MODEL.num_layers * c.attn_off
    assert implemented - ideal == pytest.approx(extra, rel=1e-12)


def test_transfusion_recipe_adds_text_only_rows():
    c = flops.count_tokens(batches(1)[0].modality_ids, batches(1)[0].document_ids)
    none = flops.compare(MODEL, c, rows=2, seq_length=SEQ, text_only_share=0.0)
    half = flops.compare(MODEL, c, rows=2, seq_length=SEQ, text_only_share=0.5)
    assert none["transfusion_recipe"] == none["transfusion_same_data"]
    assert half["transfusion_recipe"] == pytest.approx(
        half["transfusion_same_data"] + 2 * flops.text_only_row_flops(MODEL, SEQ), rel=1e-12)
    with pytest.raises(ValueError, match="text_only_share"):
        flops.compare(MODEL, c, rows=2, seq_length=SEQ, text_only_share=1.0)


def test_image_io_flops_scale_with_the_image_configuration():
    small = flops.model_flops(MODEL).image_io
    wider = dataclasses.replace(MODEL, image=dataclasses.replace(MODEL.image, block_channels=(32, 32)))
    assert flops.model_flops(wider).image_io > small


def test_synthetic_batches_follow_the_loader_layout():
    """80/20 caption-first: among documents with a caption, the image-first share is near 0.2."""
    bs = batches(40, caption_dropout=0.0)
    first = torch.cat([b.image_first for b in bs])
    assert 0.1 < first.float().mean().item() < 0.3
    T = tokens_per_image(MODEL.image)
    for b in bs[:5]:
        assert int(b.image_loss_mask.sum()) == b.num_images * T


def test_peak_tflops():
    assert flops.peak_tflops(123.0) == 123.0
    if not torch.cuda.is_available():
        assert flops.peak_tflops(None) is None


@pytest.mark.parametrize("device_name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.4),  # SXM
    ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA H100 NVL", 835.5),
    ("NVIDIA H200", 989.4),
    ("NVIDIA H200 NVL", 835.5),
    ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100-PCIE-40GB", 312.0),
    ("NVIDIA B200", 2250.0),
])
def test_peak_tflops_by_device_name(monkeypatch, device_name, peak):
    """The variant of a GPU family decides its peak: H100 SXM, PCIe and NVL differ by 30%."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: device_name)
    assert flops.peak_tflops(None) == peak
    assert flops.peak_tflops(500.0) == 500.0  # the configured value wins


def test_unknown_gpu_has_no_peak_and_says_which_key_to_set(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA GeForce RTX 9090")
    with pytest.warns(UserWarning, match=r"RTX 9090.*logging\.peak_tflops"):
        assert flops.peak_tflops(None) is None
