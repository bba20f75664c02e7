"""Modality-routed RMSNorm: one weight per modality, the Llama formula.

``y = w_m * (x / sqrt(mean(x^2) + eps))`` for a token of modality m, computed in fp32 and cast back before the
weight multiply, exactly as Hugging Face's ``LlamaRMSNorm`` does (so frozen text norms reproduce HF bit for bit
in fp32). The normalisation has no weights and is shared; only the final scale is routed, by gathering each
token's weight row (one (tokens, h) gather — cheaper than grouping the tokens for an elementwise op). When every
token has one modality only that weight is used; the other gets no gradient (as in the routed linears).
:class:`SharedRMSNorm` is the dense form for a slot both modalities share (``model.separation`` shallow / none): the
same formula and call signature, one ``weight``, the routing plan ignored.

With sequence parallelism the norm runs on this rank's sequence shard; pass ``sp_shard=(tp_rank, tp_size)``. Its
weights carry ``sequence_parallel=True`` so megatron's ``finalize_model_grads`` all-reduces their gradients over the
TP group.

No host sync: whether the tokens (of the shard) share one modality is a host-side fact of the routing plan, read
once when the plan is built (``RoutingPlan.shard_modality``), not from the ids on every call (an 8B model runs
65 norms per micro-batch).
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint
from torch.nn import Parameter

from megatron_ext.routing import TEXT, RoutingPlan

__all__ = ["RoutedRMSNorm", "SharedRMSNorm"]


class RoutedRMSNorm(MegatronModule):
    """``forward(x, plan)``: x (s, b, h) — (s/tp, b, h) under SP — normalised with its tokens' modality weight."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **unused):
        super().__init__(config=config)
        self.hidden_size = hidden_size
        self.eps = eps
        self.weight = Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.image_weight = Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        for p in (self.weight, self.image_weight):
            setattr(p, "sequence_parallel", config.sequence_parallel)

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

    def forward(self, x: torch.Tensor, plan: RoutingPlan, sp_shard: tuple[int, int] | None = None) -> torch.Tensor:
        """``sp_shard``: (tp_rank, tp_size) when x is that sequence-parallel shard of the plan's sequence."""
        if x.shape[-1] != self.hidden_size:
            raise ValueError(f"RoutedRMSNorm: expected hidden size {self.hidden_size}, got {x.shape[-1]}")
        if sp_shard is None:
            ids, single = plan.modality_ids, plan.shard_modality()
        else:
            ids, single = plan.local_modality_ids(*sp_shard), plan.shard_modality(*sp_shard)
        tokens = x.numel() // self.hidden_size
        if ids.numel() != tokens:
            raise ValueError(f"RoutedRMSNorm: {ids.numel()} modality ids for {tokens} tokens")
        xn = self._normalise(x)
        if single is not None:
            return (self.weight if single == TEXT else self.image_weight) * xn
        weights = torch.stack([self.weight, self.image_weight])  # (2, h)
        w = weights.index_select(0, ids).view(x.shape)  # (s, b, h) each token's row
        return w * xn

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """Replicated over TP (norm weights are not sharded)."""
        state_dict = self.state_dict(prefix="", keep_vars=True)
        dp_cp_group = (metadata or {}).get("dp_cp_group")
        tp_group = parallel_state.get_tensor_model_parallel_group() if dp_cp_group is not None else None
        return make_sharded_tensors_for_checkpoint(state_dict, prefix, {}, sharded_offsets, tp_group=tp_group,
                                                   dp_cp_group=dp_cp_group)


class SharedRMSNorm(MegatronModule):
    """One RMSNorm ``weight`` for both modalities, with :class:`RoutedRMSNorm`'s call signature (the plan is
    ignored) so that a layer spec can fill a norm slot with either."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **unused):
        super().__init__(config=config)
        self.hidden_size = hidden_size
        self.eps = eps
        self.weight = Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    _normalise = RoutedRMSNorm._normalise

    def forward(self, x: torch.Tensor, plan: RoutingPlan | None = None, sp_shard: tuple[int, int] | None = None
                ) -> torch.Tensor:
        if x.shape[-1] != self.hidden_size:
            raise ValueError(f"SharedRMSNorm: expected hidden size {self.hidden_size}, got {x.shape[-1]}")
        return self.weight * self._normalise(x)

    sharded_state_dict = RoutedRMSNorm.sharded_state_dict
