"""Process group, megatron parallel state and seeds for a training run (applied in one place, in a fixed order).

Order (torchtitan's ``parallelize`` idea): device -> process group -> CPU mode (no GPU) -> megatron parallel state
(TP, PP, virtual PP; DP is what remains of the world) -> RNG seeds. Works under ``torchrun`` (rendezvous from the
environment), with one process and no launcher (an in-process store), and inside an already initialised group
(tests), which it then leaves alone at :meth:`Runtime.close`.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from lmfusion.config import Config
from megatron_ext.device import select as select_device

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
    place = select_device()  # cuda:LOCAL_RANK + NCCL, or CPU + gloo + megatron CPU mode
    device = place.device
    owns = not dist.is_initialized()
    if owns:
        backend = place.backend
        timeout = datetime.timedelta(seconds=timeout_s)
        if "RANK" in os.environ:  # torchrun / srun-exported environment
            dist.init_process_group(backend, timeout=timeout)
        else:  # one process, no launcher: an in-process store, no port to pick
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    world = dist.get_world_size()
    try:
        dp = cfg.data_parallel_size(world)
    except ValueError:
        if owns:
            dist.destroy_process_group()
        raise
    par = cfg.parallel
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=par.tensor_model_parallel_size,
        pipeline_model_parallel_size=par.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=par.virtual_pipeline_model_parallel_size if par.vpp > 1 else None)
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    # Same default stream on every rank, one stream per TP rank for TP-region randomness (megatron's scheme).
    model_parallel_cuda_manual_seed(cfg.train.seed)
    return Runtime(device=device, rank=dist.get_rank(), world_size=world, dp_size=dp,
                   dp_rank=ps.get_data_parallel_rank(), tp_rank=ps.get_tensor_model_parallel_rank(),
                   pp_rank=ps.get_pipeline_model_parallel_rank(), owns_process_group=owns)
