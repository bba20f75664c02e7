"""Module specs for routed layers: the slots name text/image-routed modules; a spec fills them.

As megatron-core's ``gpt_layer_specs``: a layer names its slots (``input_layernorm``, ``linear_qkv``,
``linear_proj``, ``pre_mlp_layernorm``, ``linear_fc1``, ``linear_fc2``) and the spec fills them with local (pure
torch) or Transformer Engine modules. Swapping a backend changes the spec, not the model: both backends follow one
parameter contract (names, TP strides, checkpoint keys; :mod:`megatron_ext.contract`).

:class:`RoutedMLP` fills a routed layer's ``mlp`` slot: norm -> fc1 -> SwiGLU -> fc2, its norm fused in as in
megatron's Transformer Engine spec (``TELayerNormColumnParallelLinear``; here the checkpoint key stays
``mlp.pre_mlp_layernorm``). The layer (``lmfusion/model/layer.py``) owns both residual adds and the sequence-parallel
shard, which it passes down.

**Separation depth** (paper Section 5.1) is which slots a spec fills with routed modules and which with shared (dense)
ones of the same call signature (:data:`SEPARATIONS`; the layer's forward is the same for all):

* ``deep`` (LMFusion): every slot routed.
* ``shallow``: the MLP slot routed (``pre_mlp_layernorm``, ``linear_fc1``, ``linear_fc2``), attention shared
  (``input_layernorm``, ``linear_qkv``, ``linear_proj``). The pre-MLP norm goes with the FFN: its scale multiplies
  fc1's input feature-wise, i.e. it is a diagonal factor of fc1, so a shared norm in front of modality FFNs would
  only tie one factor of the FFN across modalities; separation at the FFN then means the whole FFN sub-block.
* ``none``: every slot shared; only the image encoder/decoder (outside the layers) are image-specific.

The model's final norm (``decoder.final_layernorm``) is filled like ``pre_mlp_layernorm``: it closes the residual
stream that the FFNs write, and feeds the modality heads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch
import torch.nn.functional as F
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_ext.linear import (
    ModalityColumnParallelLinear,
    ModalityRowParallelLinear,
    SharedColumnParallelLinear,
    SharedRowParallelLinear,
)
from megatron_ext.norm import RoutedRMSNorm, SharedRMSNorm
from megatron_ext.routing import RoutingPlan
from megatron_ext import te_linear
from megatron_ext.te_linear import (
    TEModalityColumnParallelLinear,
    TEModalityRowParallelLinear,
    TESharedColumnParallelLinear,
    TESharedRowParallelLinear,
    require_te,
)

__all__ = ["SEPARATIONS", "RoutedLayerSubmodules", "RoutedMLPSubmodules", "RoutedMLP", "routed_layer_submodules",
           "routed_mlp_spec", "resolve_backend"]

SEPARATIONS = ("deep", "shallow", "none")

# (norm, column, row) modules per backend: routed (one weight per modality) and shared (one for both)
_ROUTED = {"local": (RoutedRMSNorm, ModalityColumnParallelLinear, ModalityRowParallelLinear),
           "te": (RoutedRMSNorm, TEModalityColumnParallelLinear, TEModalityRowParallelLinear)}
_SHARED = {"local": (SharedRMSNorm, SharedColumnParallelLinear, SharedRowParallelLinear),
           "te": (SharedRMSNorm, TESharedColumnParallelLinear, TESharedRowParallelLinear)}
# which halves of the layer are routed: (attention half, MLP half)
_ROUTED_HALVES = {"deep": (True, True), "shallow": (False, True), "none": (False, False)}

Slot = Union[ModuleSpec, type]


@dataclass
class RoutedMLPSubmodules:
    pre_mlp_layernorm: Slot = RoutedRMSNorm
    linear_fc1: Slot = ModalityColumnParallelLinear
    linear_fc2: Slot = ModalityRowParallelLinear


@dataclass
class RoutedLayerSubmodules:
    """Every slot of an LMFusion layer that a spec fills with a routed or a shared module; the core attention
    (always shared) is the layer's own."""

    input_layernorm: Slot = RoutedRMSNorm
    linear_qkv: Slot = ModalityColumnParallelLinear
    linear_proj: Slot = ModalityRowParallelLinear
    pre_mlp_layernorm: Slot = RoutedRMSNorm
    linear_fc1: Slot = ModalityColumnParallelLinear
    linear_fc2: Slot = ModalityRowParallelLinear


def resolve_backend(backend: str) -> str:
    """'local', 'te' or 'auto' (TE when it imports and a GPU is present) -> 'local' | 'te'."""
    if backend not in ("local", "te", "auto"):
        raise ValueError(f"backend must be 'local', 'te' or 'auto', got {backend!r}")
    if backend == "auto":
        return "te" if te_linear.HAVE_TE and torch.cuda.is_available() else "local"
    if backend == "te":
        require_te("backend 'te'")
    return backend


def routed_layer_submodules(backend: str = "auto", separation: str = "deep") -> RoutedLayerSubmodules:
    """The layer's slots filled for ``backend`` and ``separation`` (module docstring). Norms are torch RMSNorms in
    both backends (TE has no routed norm)."""
    if separation not in _ROUTED_HALVES:
        raise ValueError(f"separation must be one of {SEPARATIONS}, got {separation!r}")
    backend = resolve_backend(backend)
    attn_half, mlp_half = ((_ROUTED if routed else _SHARED)[backend] for routed in _ROUTED_HALVES[separation])
    return RoutedLayerSubmodules(input_layernorm=attn_half[0], linear_qkv=attn_half[1], linear_proj=attn_half[2],
                                 pre_mlp_layernorm=mlp_half[0], linear_fc1=mlp_half[1], linear_fc2=mlp_half[2])


def routed_mlp_spec(backend: str = "auto", separation: str = "deep") -> ModuleSpec:
    slots = routed_layer_submodules(backend, separation)
    return ModuleSpec(module=RoutedMLP, submodules=RoutedMLPSubmodules(
        pre_mlp_layernorm=slots.pre_mlp_layernorm, linear_fc1=slots.linear_fc1, linear_fc2=slots.linear_fc2))


class RoutedMLP(MegatronModule):
    """``fc2(silu(gate) * up)`` of ``norm(h)``, gate/up from one fused fc1, every weight routed by modality.

    fc1's output stays grouped by modality into fc2 (local backend): one permutation in, one out.
    """

    def __init__(self, config: TransformerConfig, submodules: RoutedMLPSubmodules):
        super().__init__(config=config)
        h, ffn = config.hidden_size, config.ffn_hidden_size
        self.pre_mlp_layernorm = build_module(submodules.pre_mlp_layernorm, config=config, hidden_size=h,
                                              eps=config.layernorm_epsilon)
        self.linear_fc1 = build_module(submodules.linear_fc1, h, 2 * ffn, config=config,
                                       init_method=config.init_method, bias=config.add_bias_linear,
                                       gather_output=False, skip_bias_add=False, is_expert=False,
                                       stride=2)  # gate and up interleave per TP shard
        self.linear_fc2 = build_module(submodules.linear_fc2, ffn, h, config=config,
                                       init_method=config.output_layer_init_method,
                                       bias=config.add_bias_linear, input_is_parallel=True,
                                       skip_bias_add=False, is_expert=False)
        self._grouped = isinstance(self.linear_fc1, ModalityColumnParallelLinear) and isinstance(
            self.linear_fc2, ModalityRowParallelLinear)

    def forward(self, hidden: torch.Tensor, plan: RoutingPlan, sp_shard: tuple[int, int] | None = None
                ) -> torch.Tensor:
        """hidden (s, b, h), or this rank's (s/tp, b, h) shard ``sp_shard`` = (tp_rank, tp_size) of the plan's
        sequence under sequence parallelism; returns the MLP's output (the residual add is the layer's)."""
        x = self.pre_mlp_layernorm(hidden, plan, sp_shard)
        y, _ = self.linear_fc1(x, plan, keep_grouped=self._grouped)  # (rows, 2*ffn/tp) or (s, b, 2*ffn/tp)
        gate, up = torch.chunk(y, 2, dim=-1)
        act = F.silu(gate) * up
        if self._grouped:
            out, _ = self.linear_fc2(act, plan, input_grouped=True)
        else:
            out, _ = self.linear_fc2(act, plan)
        return out

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        """As megatron's MLP: fc1's fused [gate; up] is saved as two separately sharded halves (both modalities),
        so a checkpoint reshards across TP sizes."""
        out = {}
        for name, module in self._modules.items():
            sub = module.sharded_state_dict(f"{prefix}{name}.", sharded_offsets, metadata)
            if name == "linear_fc1":
                for key in list(sub):
                    if key.rsplit(".", 1)[-1] in ("weight", "bias", "image_weight", "image_bias"):
                        sub[key] = apply_swiglu_sharded_factory(
                            sub[key], sharded_offsets, (metadata or {}).get("singleton_local_shards", False))
            out.update(sub)
        return out
