"""One LMFusion transformer layer: routed pre-norm attention and routed SwiGLU MLP around one shared attention.

    h = x + proj_m(attention(rope(qkv_m(norm_m(x)))))      m = each token's modality (text / image)
    y = h + fc2_m(silu(gate) * up),  [gate; up] = fc1_m(norm2_m(h))

Every ``_m`` module is routed by the micro-batch's :class:`~megatron_ext.routing.RoutingPlan`; the attention
(softmax over all keys of the sequence, with the LMFusion mask) is shared by both modalities. Tensors are
megatron's (s, b, h), (s/tp, b, h) under sequence parallelism; heads are split over tensor-parallel ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import apply_rotary_pos_emb
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from lmfusion.model.attention import AttentionMask, CoreAttention
from lmfusion.model.kv_cache import KVCache
from megatron_ext.routing import RoutingPlan
from megatron_ext.spec import RoutedLayerSubmodules, RoutedMLP, RoutedMLPSubmodules

__all__ = ["LayerContext", "RoutedSelfAttention", "LMFusionLayer", "lmfusion_layer_spec"]


@dataclass
class LayerContext:
    """What every layer of one micro-batch shares, computed once by the model."""

    plan: RoutingPlan
    """Token grouping over the full (s, b) sequence."""
    sp_shard: Optional[tuple[int, int]]
    """(tp_rank, tp_size) of this rank's sequence shard under SP (None without SP)."""
    rotary: Tensor
    """RoPE frequencies (s, b, 1, head_dim) for megatron's ``apply_rotary_pos_emb``."""
    mask: AttentionMask
    kv_cache: Optional["KVCache"] = None
    """Generation: keys/values of earlier positions (the mask then covers cached + new keys)."""


class RoutedSelfAttention(MegatronModule):
    """Fused QKV (megatron's GQA-interleaved layout) + RoPE + shared core attention + routed output projection.
    Takes the normalised input; the residual add is the layer's."""

    def __init__(self, config: TransformerConfig, submodules: RoutedLayerSubmodules, attention_backend: str,
                 layer_number: int = 1):
        super().__init__(config=config)
        self.layer_number = layer_number
        tp = config.tensor_model_parallel_size
        self.heads = config.num_attention_heads // tp  # query heads on this rank
        self.groups = config.num_query_groups // tp  # kv heads on this rank
        self.head_dim = config.kv_channels
        qkv_size = (config.num_attention_heads + 2 * config.num_query_groups) * self.head_dim
        self.linear_qkv = build_module(submodules.linear_qkv, config.hidden_size, qkv_size, config=config,
                                       init_method=config.init_method, bias=False, gather_output=False,
                                       skip_bias_add=False, is_expert=False)
        self.core_attention = CoreAttention(self.heads, self.groups, self.head_dim, backend=attention_backend)
        self.linear_proj = build_module(submodules.linear_proj, config.num_attention_heads * self.head_dim,
                                        config.hidden_size, config=config,
                                        init_method=config.output_layer_init_method, bias=False,
                                        input_is_parallel=True, skip_bias_add=False, is_expert=False)

    def forward(self, x: Tensor, ctx: LayerContext) -> Tensor:
        qkv, _ = self.linear_qkv(x, ctx.plan)  # (s, b, (heads + 2*groups) * d), full sequence
        s, b = qkv.shape[:2]
        per_group = self.heads // self.groups
        qkv = qkv.view(s, b, self.groups, (per_group + 2) * self.head_dim)
        q, k, v = torch.split(qkv, [per_group * self.head_dim, self.head_dim, self.head_dim], dim=-1)
        q = q.reshape(s, b, self.heads, self.head_dim)  # query heads of a group are contiguous
        k = apply_rotary_pos_emb(k.contiguous(), ctx.rotary, config=self.config)  # (s, b, groups, d)
        q = apply_rotary_pos_emb(q, ctx.rotary, config=self.config)
        if ctx.kv_cache is not None:
            k, v = ctx.kv_cache.extend(self.layer_number, k, v.contiguous())  # (s_cached + s, b, groups, d)
        # (s, b, h, d) -> (b, h, s, d) for the core attention
        out = self.core_attention(q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3), ctx.mask)
        out = out.permute(2, 0, 1, 3).reshape(s, b, self.heads * self.head_dim)  # (s, b, heads*d)
        proj, _ = self.linear_proj(out, ctx.plan)  # (s, b, h) or (s/tp, b, h) under SP
        return proj


class LMFusionLayer(MegatronModule):
    """Attention half then MLP half, both routed; ``forward(hidden, ctx)``. The layer owns both residual adds and
    hands each half the context's routing plan and sequence-parallel shard; a spec fills its slots
    (:class:`~megatron_ext.spec.RoutedLayerSubmodules`). The MLP half's norm runs inside the ``mlp`` slot
    (``mlp.pre_mlp_layernorm``, the checkpoint key of every base and training checkpoint), as megatron's TE spec
    fuses it into ``mlp.linear_fc1``."""

    def __init__(self, config: TransformerConfig, submodules: RoutedLayerSubmodules, layer_number: int = 1,
                 attention_backend: str = "sdpa"):
        super().__init__(config=config)
        self.layer_number = layer_number
        self.input_layernorm = build_module(submodules.input_layernorm, config=config,
                                            hidden_size=config.hidden_size, eps=config.layernorm_epsilon)
        self.self_attention = RoutedSelfAttention(config, submodules, attention_backend, layer_number)
        self.mlp = RoutedMLP(config, RoutedMLPSubmodules(pre_mlp_layernorm=submodules.pre_mlp_layernorm,
                                                         linear_fc1=submodules.linear_fc1,
                                                         linear_fc2=submodules.linear_fc2))

    def forward(self, hidden: Tensor, ctx: LayerContext) -> Tensor:
        hidden = hidden + self.self_attention(self.input_layernorm(hidden, ctx.plan, ctx.sp_shard), ctx)
        return hidden + self.mlp(hidden, ctx.plan, ctx.sp_shard)


def lmfusion_layer_spec(submodules: RoutedLayerSubmodules) -> ModuleSpec:
    return ModuleSpec(module=LMFusionLayer, submodules=submodules)
