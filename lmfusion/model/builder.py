"""Build an LMFusionModel for this rank's place in the megatron grid, optionally from a converted base.

The one place a model is built (training chunks of either engine, inference, evaluation): weights are initialised and
loaded on the host (megatron's CPU initialisation draws the same full weights on every machine), then *every* tensor
of the stage (frozen text, twins, norms, U-Net, RoPE table) moves to the runtime ``device`` before DDP, an optimizer
or a cache exists.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core import parallel_state

from lmfusion.config import ModelConfig, to_transformer_config
from lmfusion.model.model import LMFusionModel
from lmfusion.model.weights import BaseTensors, init_image_twins_from_text, load_base_weights, set_trainable

__all__ = ["build_model", "build_model_chunks", "chunk_layout"]


def chunk_layout(num_layers: int, pp: int, pp_rank: int, vpp: int = 1, vp_stage: int = 0) -> tuple[int, int, bool, bool]:
    """(layer offset, layers, pre_process, post_process) of virtual stage ``vp_stage`` of pipeline rank ``pp_rank``.

    Interleaved 1F1B (megatron's layout): chunk ``v`` of rank ``r`` holds layers ``(v * pp + r) * n ... + n - 1``
    with ``n = num_layers / (pp * vpp)``; ``vpp = 1`` is the plain contiguous stage."""
    per_chunk = num_layers // (pp * vpp)
    return ((vp_stage * pp + pp_rank) * per_chunk, per_chunk, vp_stage == 0 and pp_rank == 0,
            vp_stage == vpp - 1 and pp_rank == pp - 1)


def build_model(model_config: ModelConfig, *, base: Optional[BaseTensors] = None, sequence_parallel: bool = False,
                params_dtype: torch.dtype = torch.float32, freeze: bool = True, train_text: bool = False,
                seed: int = 1234,
                device: torch.device | str | None = None, vp_stage: Optional[int] = None,
                **config_overrides) -> LMFusionModel:
    """The local pipeline stage (or virtual stage ``vp_stage`` under an interleaved schedule) at the current megatron
    parallel state, with every tensor on ``device`` (default: left on the host where it was built).

    With ``base``, text weights come from it and image twins are copied from them; otherwise everything keeps
    megatron's random init (twins still copied, so text and image start equal). ``freeze`` sets
    ``requires_grad`` to the image set only, or to everything with ``train_text`` (``optimizer.text_lr_ratio`` > 0:
    the model then checkpoints its text set too); do it before building DDP / the optimizer. ``seed`` seeds the
    CPU generator first: replicated modules (image encoder/decoder) must start identical on every TP rank, and
    megatron's CPU initialisation draws full weights from it before slicing.
    """
    torch.manual_seed(seed)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    vpp = config_overrides.get("virtual_pipeline_model_parallel_size") or 1
    if (vp_stage is None) != (vpp == 1):
        raise ValueError(f"build_model: vp_stage={vp_stage} with virtual_pipeline_model_parallel_size={vpp}")
    config = to_transformer_config(model_config, tp=tp, pp=pp, sequence_parallel=sequence_parallel,
                                   params_dtype=params_dtype, use_cpu_initialization=True,
                                   perform_initialization=base is None, **config_overrides)
    offset, layers, pre, post = chunk_layout(model_config.num_layers, pp, pp_rank, vpp, vp_stage or 0)
    model = LMFusionModel(model_config, config, pre_process=pre, post_process=post, layer_offset=offset,
                          num_local_layers=layers)
    if vp_stage is not None:
        model.vp_stage = vp_stage  # megatron's schedules check it against the chunk they run
    if base is not None:
        load_base_weights(model, base, vocab_size=model_config.vocab_size, tied=model_config.tie_word_embeddings,
                          layer_offset=offset)
    init_image_twins_from_text(model)
    if freeze:
        set_trainable(model, train_text)
    else:
        model.saves_text = train_text  # inference of a run whose text trained: its text comes from the run
    if device is not None:
        model.to(device=device)  # LMFusionModel._apply moves the RoPE table with it
    return model


def build_model_chunks(model_config: ModelConfig, *, vpp: int = 1, **kwargs) -> list[LMFusionModel]:
    """This rank's model chunks for megatron's schedules: ``[stage]``, or under an interleaved schedule (``vpp`` > 1)
    one :func:`build_model` per virtual stage (chunk ``v`` of pipeline rank ``r`` holds the layers
    :func:`chunk_layout` gives). ``kwargs``: :func:`build_model`'s."""
    if vpp == 1:
        return [build_model(model_config, **kwargs)]
    return [build_model(model_config, vp_stage=v, virtual_pipeline_model_parallel_size=vpp, **kwargs)
            for v in range(vpp)]
