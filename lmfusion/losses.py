"""LMFusion loss: LM cross-entropy + lambda x diffusion MSE, each normalised by its global token count.

The model returns per-token outputs; :func:`lm_loss` and :func:`diffusion_loss` turn them into local *sums* and
*counts*, and :func:`total_loss` divides each sum by the count it is given: the caller passes global counts, so the
gradient is that of the global token mean whatever each rank holds (a rank may have no image tokens at all).

The trainer (:mod:`lmfusion.training.step`) passes the step's counts, summed over its micro-batches and the
data-parallel group once per step, and scales the loss by ``dp x num_microbatches``, which undoes megatron DDP's mean
over DP ranks and the schedule's mean over micro-batches: the gradient is then the step's global token mean.

**Reported values** (``LossTerms.lm``, ``.diffusion``) are detached local contributions ``S_r / N``: summed over the
DP group and the step's micro-batches (not averaged) they give the step's global mean of each term.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
from torch import Tensor

__all__ = ["DIFFUSION_LOSS_WEIGHT", "LossTerms", "lm_loss", "diffusion_loss", "total_loss"]

DIFFUSION_LOSS_WEIGHT = 5.0  # lambda in LMFusion / Transfusion


def lm_loss(vocab_parallel_logits: Tensor, labels: Tensor, loss_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Cross-entropy summed over the tokens where ``loss_mask`` is set: returns (sum fp32 scalar, count int64 scalar).

    ``vocab_parallel_logits``: (..., v / tp), this tensor-parallel rank's vocab shard (megatron's output layer
    without gather). ``labels``, ``loss_mask``: (...), the same leading shape. Megatron's
    ``vocab_parallel_cross_entropy`` documents (s, b, v) logits with (s, b) targets, but it flattens all leading
    dims, so (b, s, v) with (b, s) labels gives the same per-token losses; only the labels' layout must match the
    logits'. Requires megatron's ``parallel_state`` to be initialised (TP=1 included).

    Megatron's kernel subtracts the max and exponentiates **in place** on ``logits.float()``: for fp32 logits that is
    the caller's tensor, which holds softmax probabilities afterwards. Do not reuse the logits (clone first to do so).
    Labels at masked positions may be any integer (e.g. -100): they are out of every vocab shard and give a finite,
    ignored loss.
    """
    if labels.shape != vocab_parallel_logits.shape[:-1] or loss_mask.shape != labels.shape:
        raise ValueError(f"labels {tuple(labels.shape)} and loss_mask {tuple(loss_mask.shape)} must equal the logits' "
                         f"leading shape {tuple(vocab_parallel_logits.shape[:-1])}")
    mask = loss_mask.bool()
    per_token = vocab_parallel_cross_entropy(vocab_parallel_logits, labels.long())  # (...) fp32
    # where(), not a product: a masked token's loss never reaches the sum or the gradient, even if it were inf.
    total = torch.where(mask, per_token, torch.zeros((), dtype=per_token.dtype, device=per_token.device)).sum()
    return total, mask.sum()


def diffusion_loss(pred: Tensor, target: Tensor, image_mask: Tensor | None = None,
                   weight: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Squared error, averaged over each token's elements and summed over tokens: (sum fp32 scalar, count int64).

    ``pred``, ``target``: (..., f), one row of ``f`` latent elements per image token; ``image_mask``: (...) bool,
    which rows count (None: all); ``weight``: broadcastable to (...), each row's weight (e.g. Min-SNR per image, as
    (n_img, 1) for (n_img, tokens, f) rows; None: unweighted). The count is of rows, not of weights. For image
    tensors (n, C, H, W), ``image_io.patchify(x, cfg.patch_size * cfg.downsample_factor)`` gives the per-token layout
    (n, tokens_per_image, f) in the sequence's token order.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    if image_mask is not None and image_mask.shape != pred.shape[:-1]:
        raise ValueError(f"image_mask {tuple(image_mask.shape)} must equal pred's leading shape "
                         f"{tuple(pred.shape[:-1])}")
    per_token = (pred.float() - target.float()).pow(2).mean(dim=-1)  # (...): fp32 whatever the model dtype
    if weight is not None:
        try:
            fits = torch.broadcast_shapes(weight.shape, per_token.shape) == per_token.shape
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(f"weight {tuple(weight.shape)} does not broadcast to the rows {tuple(per_token.shape)}")
        per_token = per_token * weight.float()
    if image_mask is None:
        return per_token.sum(), torch.tensor(per_token.numel(), dtype=torch.int64, device=per_token.device)
    mask = image_mask.bool()
    total = torch.where(mask, per_token, torch.zeros((), dtype=per_token.dtype, device=per_token.device)).sum()
    return total, mask.sum()


@dataclass
class LossTerms:
    """What :func:`total_loss` returns.

    ``loss``: the tensor to back-propagate (the caller scales it for its gradient reduction; see module docstring).
    ``lm``, ``diffusion``: detached local contributions S_r / N of each unweighted term (sum over DP = global mean).
    ``lm_tokens``, ``image_tokens``: the counts given, int64.
    """

    loss: Tensor
    lm: Tensor
    diffusion: Tensor
    lm_tokens: Tensor
    image_tokens: Tensor


def total_loss(
    lm_sum: Tensor,
    lm_count: Tensor,
    diff_sum: Tensor,
    diff_count: Tensor,
    lam: float = DIFFUSION_LOSS_WEIGHT,
) -> LossTerms:
    """lm_sum / N_lm + lam * diff_sum / N_diff for the (global) counts ``N`` given.

    A term whose count is 0 contributes exactly 0 (its sum is then 0 too), never NaN.
    """
    counts = torch.stack([lm_count.reshape(()), diff_count.reshape(())]).to(torch.int64)  # (2,)
    n_lm, n_diff = counts.clamp(min=1).to(lm_sum.dtype).unbind()  # clamp: 0/0 -> 0/1 = 0
    lm_term, diff_term = lm_sum / n_lm, diff_sum / n_diff
    loss = lm_term + lam * diff_term
    return LossTerms(loss=loss, lm=lm_term.detach(), diffusion=diff_term.detach(),
                     lm_tokens=counts[0], image_tokens=counts[1])
