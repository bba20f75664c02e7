"""Process group, megatron parallel state and seeds for a training run (applied in one place, in a fixed order).

Order (torchtitan's ``parallelize`` idea): the layout checked against the world size -> device, process group, CPU
mode (no GPU) and megatron parallel state (TP, PP, virtual PP; DP is what remains of the world), all in
:func:`megatron_ext.device.init_distributed` -> RNG seeds. Works under ``torchrun`` (rendezvous from the
environment), with one process and no launcher (an in-process store), and inside an already initialised group
(tests), which it then leaves alone at :meth:`Runtime.close`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from lmfusion.config import Config
from megatron_ext.device import init_distributed

__all__ = ["Runtime", "init_runtime"]


@dataclass
class Runtime:
    device: torch.device
    rank: int
    world_size: int
    dp_size: int
    dp_rank: int
    tp_rank: int
    pp_rank: int
    owns_process_group: bool

    def close(self) -> None:
        ps.destroy_model_parallel()
        if self.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()


def init_runtime(cfg: Config, timeout_s: int = 1800) -> Runtime:
    """Set up everything distributed for ``cfg``; raises naming the config key when the world does not fit."""
    # The layout is checked against the world before anything is set up (torchrun's WORLD_SIZE, or the group's).
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    dp = cfg.data_parallel_size(world)
    par = cfg.parallel
    place, owns = init_distributed(  # cuda:LOCAL_RANK + NCCL, or CPU + gloo + megatron CPU mode
        None, tensor_model_parallel_size=par.tensor_model_parallel_size,
        pipeline_model_parallel_size=par.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=par.virtual_pipeline_model_parallel_size if par.vpp > 1 else None,
        timeout_s=timeout_s, replace_model_parallel=True)
    device = place.device
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    # Same default stream on every rank, one stream per TP rank for TP-region randomness (megatron's scheme).
    model_parallel_cuda_manual_seed(cfg.train.seed)
    return Runtime(device=device, rank=dist.get_rank(), world_size=world, dp_size=dp,
                   dp_rank=ps.get_data_parallel_rank(), tp_rank=ps.get_tensor_model_parallel_rank(),
                   pp_rank=ps.get_pipeline_model_parallel_rank(), owns_process_group=owns)
