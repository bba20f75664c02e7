"""LM / diffusion losses and their normalisation (lmfusion.losses), single process (TP=1, DP=1).

Multi-rank behaviour (vocab-parallel CE at TP=2, DP-global normalisation through megatron DDP) is in
tests/distributed/test_losses.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state

from lmfusion.losses import DIFFUSION_LOSS_WEIGHT, diffusion_loss, lm_loss, total_loss

# fp32 sums of <= 100 per-token losses of size O(1): rounding differences stay below 1e-5.
FP32_TOL = 1e-5
VOCAB = 13


@pytest.fixture(scope="module", autouse=True)
def megatron_tp1(tmp_path_factory):
    """A one-rank gloo group with megatron's parallel state (vocab_parallel_cross_entropy needs its TP group)."""
    created = not dist.is_initialized()
    if created:
        store = tmp_path_factory.mktemp("dist") / "store"
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    owns_state = not parallel_state.model_parallel_is_initialized()
    if owns_state:
        parallel_state.initialize_model_parallel()
    yield
    if owns_state:
        parallel_state.destroy_model_parallel()
    if created:
        dist.destroy_process_group()


def make_batch(b: int, s: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, s, VOCAB, generator=g) * 3
    labels = torch.randint(0, VOCAB, (b, s), generator=g)
    loss_mask = torch.rand(b, s, generator=g) < 0.7
    labels[~loss_mask] = -100  # masked positions may hold an ignore label
    return logits, labels, loss_mask


def test_lm_loss_equals_torch_cross_entropy_on_unmasked_tokens():
    logits, labels, mask = make_batch(3, 8, seed=0)
    leaf = logits.clone().requires_grad_()
    total, count = lm_loss(leaf.clone(), labels, mask)  # clone: megatron works in place on fp32 logits
    ref_leaf = logits.clone().requires_grad_()
    ref = F.cross_entropy(ref_leaf[mask], labels[mask], reduction="sum")
    assert count.dtype == torch.int64 and int(count) == int(mask.sum())
    torch.testing.assert_close(total, ref, atol=FP32_TOL, rtol=0)
    total.backward()
    ref.backward()
    torch.testing.assert_close(leaf.grad, ref_leaf.grad, atol=FP32_TOL, rtol=0)
    assert leaf.grad[~mask].abs().max() == 0, "masked tokens must get exactly zero gradient"


def test_lm_loss_layout_sbv_equals_bsv():
    # megatron documents (s, b, v) logits with (s, b) targets; it flattens leading dims, so (b, s, v) works alike.
    logits, labels, mask = make_batch(2, 5, seed=1)
    bsv, _ = lm_loss(logits.clone(), labels, mask)
    sbv, _ = lm_loss(logits.transpose(0, 1).contiguous(), labels.t().contiguous(), mask.t().contiguous())
    torch.testing.assert_close(bsv, sbv, atol=FP32_TOL, rtol=0)


def test_lm_loss_bf16_logits_and_shape_errors():
    logits, labels, mask = make_batch(2, 4, seed=2)
    total, _ = lm_loss(logits.bfloat16(), labels, mask)
    ref = F.cross_entropy(logits.bfloat16().float()[mask], labels[mask], reduction="sum")
    assert total.dtype == torch.float32  # megatron upcasts
    torch.testing.assert_close(total, ref, atol=FP32_TOL, rtol=0)  # same bf16 inputs, fp32 math on both sides
    with pytest.raises(ValueError, match=r"labels \(2, 3\)"):
        lm_loss(logits, labels[:, :3], mask[:, :3])


def test_diffusion_loss_is_per_token_mean_summed():
    g = torch.Generator().manual_seed(0)
    n, tokens, f = 2, 6, 16
    pred, target = torch.randn(2, n, tokens, f, generator=g)
    mask = torch.rand(n, tokens, generator=g) < 0.5
    total, count = diffusion_loss(pred, target, mask)
    ref = sum(F.mse_loss(pred[i, j], target[i, j]) for i in range(n) for j in range(tokens) if mask[i, j])
    torch.testing.assert_close(total, ref, atol=FP32_TOL, rtol=0)
    assert int(count) == int(mask.sum())
    all_total, all_count = diffusion_loss(pred, target)
    torch.testing.assert_close(all_total, F.mse_loss(pred, target, reduction="sum") / f, atol=FP32_TOL, rtol=0)
    assert int(all_count) == n * tokens


def test_total_loss_single_rank():
    lm_sum, lm_count = torch.tensor(12.0), torch.tensor(8)
    diff_sum, diff_count = torch.tensor(3.0), torch.tensor(4)
    out = total_loss(lm_sum, lm_count, diff_sum, diff_count)
    expected = 12.0 / 8 + DIFFUSION_LOSS_WEIGHT * 3.0 / 4
    torch.testing.assert_close(out.loss, torch.tensor(expected), atol=0, rtol=1e-7)  # one fp32 rounding per op
    assert int(out.lm_tokens) == 8 and int(out.image_tokens) == 4


def test_zero_image_tokens_gives_zero_diffusion_term_and_no_nan():
    logits, labels, mask = make_batch(2, 4, seed=3)
    leaf = logits.clone().requires_grad_()
    pred = torch.randn(0, 16, requires_grad=True)  # a micro-batch without images
    lm_sum, lm_count = lm_loss(leaf.clone(), labels, mask)
    diff_sum, diff_count = diffusion_loss(pred, torch.zeros(0, 16))
    out = total_loss(lm_sum, lm_count, diff_sum, diff_count)
    assert int(diff_count) == 0 and float(out.diffusion) == 0.0
    torch.testing.assert_close(out.loss, lm_sum / lm_count, atol=FP32_TOL, rtol=0)
    out.loss.backward()
    assert torch.isfinite(leaf.grad).all()
    # No text targets at all: the LM term is 0 too.
    empty = total_loss(torch.tensor(0.0), torch.tensor(0), torch.tensor(0.0), torch.tensor(0))
    assert float(empty.loss) == 0.0
