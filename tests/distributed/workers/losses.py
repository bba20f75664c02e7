"""Loss cases on 2 gloo ranks: vocab-parallel CE at TP=2, DP-global token normalisation through megatron DDP.

Every rank draws the full data from the same seed, so the single-process reference needs no communication.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule

from lmfusion.losses import DIFFUSION_LOSS_WEIGHT, diffusion_loss, lm_loss, total_loss
from tests.distributed.harness import case, worker_main

VOCAB, HIDDEN, FEATURES = 10, 8, 6
# Per DP rank: (text tokens, of which with a target, image tokens). Rank 0 has no image token at all.
RANK_TOKENS = [(7, 5, 0), (3, 2, 4)]


def _config() -> TransformerConfig:
    return TransformerConfig(num_layers=1, hidden_size=HIDDEN, num_attention_heads=1, use_cpu_initialization=True,
                             pipeline_dtype=torch.float32, gradient_accumulation_fusion=False,
                             masked_softmax_fusion=False, persist_layer_norm=False, apply_rope_fusion=False,
                             bias_activation_fusion=False, bias_dropout_fusion=False)


@case
def tp2_vocab_parallel_ce_equals_full_ce():
    """At TP=2 each rank holds half the vocab; sum, count and the shard's gradient equal torch CE on the full
    logits (fp32, vocab 10, 12 tokens: summation-order rounding only, < 1e-5)."""
    ps.initialize_model_parallel(tensor_model_parallel_size=2)
    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, VOCAB, generator=g) * 3  # (b, s, v), same on every rank
    labels = torch.randint(0, VOCAB, (2, 6), generator=g)
    mask = torch.rand(2, 6, generator=g) < 0.7
    labels[~mask] = -100
    per = VOCAB // tp
    shard = logits[..., rank * per:(rank + 1) * per].clone().requires_grad_()
    total, count = lm_loss(shard.clone(), labels, mask)  # clone: megatron works in place on fp32 logits
    full = logits.clone().requires_grad_()
    ref = F.cross_entropy(full[mask], labels[mask], reduction="sum")
    torch.testing.assert_close(total, ref.detach(), atol=1e-5, rtol=0)
    assert int(count) == int(mask.sum())
    total.backward()
    ref.backward()
    torch.testing.assert_close(shard.grad, full.grad[..., rank * per:(rank + 1) * per], atol=1e-5, rtol=0)


class _Heads(MegatronModule):
    """A shared trunk feeding an LM head and a noise head: both loss terms reach the trunk's gradient."""

    def __init__(self, config: TransformerConfig):
        super().__init__(config=config)
        g = torch.Generator().manual_seed(1)
        self.trunk = torch.nn.Linear(HIDDEN, HIDDEN)
        self.lm_head = torch.nn.Linear(HIDDEN, VOCAB)
        self.eps_head = torch.nn.Linear(HIDDEN, FEATURES)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, text: torch.Tensor, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lm_head(torch.tanh(self.trunk(text))), self.eps_head(torch.tanh(self.trunk(images)))


def _rank_data(r: int) -> dict[str, torch.Tensor]:
    n_text, n_target, n_img = RANK_TOKENS[r]
    g = torch.Generator().manual_seed(10 + r)
    mask = torch.zeros(n_text, dtype=torch.bool)
    mask[torch.randperm(n_text, generator=g)[:n_target]] = True
    return {"text": torch.randn(n_text, HIDDEN, generator=g), "labels": torch.randint(0, VOCAB, (n_text,), generator=g),
            "mask": mask, "images": torch.randn(n_img, HIDDEN, generator=g),
            "noise": torch.randn(n_img, FEATURES, generator=g)}


def _local_loss(model, d, dp_group, grads_averaged_over_dp: bool) -> torch.Tensor:
    logits, pred = model(d["text"], d["images"])
    lm_sum, lm_count = lm_loss(logits, d["labels"], d["mask"])
    diff_sum, diff_count = diffusion_loss(pred, d["noise"])
    # the global counts, as lmfusion.training.step sums them once per step (int64: exact for any token count)
    counts = torch.stack([lm_count, diff_count]).to(torch.int64)
    dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=dp_group)
    loss = total_loss(lm_sum, counts[0], diff_sum, counts[1]).loss
    # megatron DDP averages gradients over the DP ranks: scale by dp, as the trainer's loss does
    return loss * dist.get_world_size(dp_group) if grads_averaged_over_dp else loss


def _reference_grads(config) -> dict[str, torch.Tensor]:
    """Gradient of the global-batch mean loss, one process, plain torch CE/MSE on every rank's data."""
    model = _Heads(config)
    data = [_rank_data(r) for r in range(len(RANK_TOKENS))]
    text = torch.cat([d["text"] for d in data])
    labels, mask = torch.cat([d["labels"] for d in data]), torch.cat([d["mask"] for d in data])
    images, noise = torch.cat([d["images"] for d in data]), torch.cat([d["noise"] for d in data])
    logits, pred = model(text, images)
    lm = F.cross_entropy(logits[mask], labels[mask])  # mean over all text targets of the global batch
    diff = F.mse_loss(pred, noise, reduction="none").mean(-1).mean()  # mean over all image tokens
    (lm + DIFFUSION_LOSS_WEIGHT * diff).backward()
    return {n: p.grad for n, p in model.named_parameters()}


@case
def dp2_gradients_equal_global_mean_gradient():
    """Two DP ranks with different token counts (one without images): megatron DDP's reduced gradient (both
    reduction modes), and a plain all-reduce SUM with grads_averaged_over_dp=False, equal the gradient of the
    global-batch mean loss (fp32, < 1e-6: summation order only)."""
    ps.initialize_model_parallel()
    assert ps.get_data_parallel_world_size() == len(RANK_TOKENS)
    config, group = _config(), ps.get_data_parallel_group()
    d = _rank_data(ps.get_data_parallel_rank())
    ref = _reference_grads(config)
    for average_in_collective in (False, True):
        ddp_config = DistributedDataParallelConfig(average_in_collective=average_in_collective)
        ddp = DistributedDataParallel(config, ddp_config, _Heads(config))
        ddp.zero_grad_buffer()
        _local_loss(ddp, d, group, grads_averaged_over_dp=True).backward()
        ddp.finish_grad_sync()
        for name, p in ddp.module.named_parameters():
            torch.testing.assert_close(p.main_grad, ref[name], atol=1e-6, rtol=0,
                                       msg=lambda m: f"average_in_collective={average_in_collective} {name}: {m}")
    model = _Heads(config)
    _local_loss(model, d, group, grads_averaged_over_dp=False).backward()
    for name, p in model.named_parameters():
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM, group=group)
        torch.testing.assert_close(p.grad, ref[name], atol=1e-6, rtol=0, msg=lambda m: f"summed grads {name}: {m}")


if __name__ == "__main__":
    worker_main()
