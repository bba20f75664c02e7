"""Build an LMFusionModel for this rank's place in the megatron grid, optionally from a converted base."""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core import parallel_state

from lmfusion.config import ModelConfig, to_transformer_config
from lmfusion.model.model import LMFusionModel
from lmfusion.model.weights import BaseTensors, freeze_text, init_image_twins_from_text, load_base_weights

__all__ = ["build_model"]


def build_model(model_config: ModelConfig, *, base: Optional[BaseTensors] = None, sequence_parallel: bool = False,
                params_dtype: torch.dtype = torch.float32, freeze: bool = True, seed: int = 1234,
                **config_overrides) -> LMFusionModel:
    """The local pipeline stage of the model at the current megatron parallel state.

    With ``base``, text weights come from it and image twins are copied from them; otherwise everything keeps
    megatron's random init (twins still copied, so text and image start equal). ``freeze`` sets
    ``requires_grad`` to the image set only (do it before building DDP / the optimizer). ``seed`` seeds the
    CPU generator first: replicated modules (image encoder/decoder) must start identical on every TP rank, and
    megatron's CPU initialisation draws full weights from it before slicing.
    """
    torch.manual_seed(seed)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    config = to_transformer_config(model_config, tp=tp, pp=pp, sequence_parallel=sequence_parallel,
                                   params_dtype=params_dtype, use_cpu_initialization=True,
                                   perform_initialization=base is None, **config_overrides)
    per_stage = model_config.num_layers // pp
    model = LMFusionModel(model_config, config, pre_process=pp_rank == 0, post_process=pp_rank == pp - 1,
                          layer_offset=pp_rank * per_stage, num_local_layers=per_stage)
    if base is not None:
        load_base_weights(model, base, vocab_size=model_config.vocab_size, tied=model_config.tie_word_embeddings,
                          layer_offset=pp_rank * per_stage)
    init_image_twins_from_text(model)
    if freeze:
        freeze_text(model)
    return model
