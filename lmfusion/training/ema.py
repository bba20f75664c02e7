"""The EMA of the trainable weights, sharded like megatron's distributed-optimizer state (``train.ema``).

BAGEL keeps its EMA as a full replica on every rank, and its users run out of host memory (ByteDance-Seed/Bagel
issues 172, 215). Here each data-parallel rank averages only what its optimizer updates:

* **Distributed optimizer on.** megatron-core's ``DistributedOptimizer`` gives each DP rank a contiguous range of
  every gradient bucket; a parameter's part of it is ``_get_model_param_range_map(param)["param"]`` (a flat range of
  the TP-local tensor), and its fp32 main values are ``shard_fp32_from_float16_groups`` (bf16 models: fp32 copies)
  or ``shard_fp32_groups`` (fp32 models: views of the parameter). The EMA holds one fp32 tensor per such range: per
  rank ``1 / DP`` of the trainable set, no full copy.
* **Distributed optimizer off.** The EMA is of the whole (TP-sharded) fp32 main parameters on each rank (the
  optimizer's ``fp32_from_float16_groups`` in bf16, the parameters in fp32).
* **Update.** After every successful optimizer step (:meth:`ShardedEMA.update`; a skipped step leaves it and its
  step count alone): ``torch._foreach_lerp_(ema, main, 1 - decay)`` over the local ranges, the decay from
  :func:`lmfusion.ema.ema_decay` (diffusers' ``EMAModel`` schedule).
* **Checkpoint** (``ema.*`` keys, next to ``model.*``): each EMA tensor is saved whole in model space under the
  model's checkpoint key with an ``ema.`` prefix, so it reshards like the image set (any TP/PP/DP). Saving with the
  distributed optimizer assembles each tensor on one DP rank only (a sum over DP of zero-padded ranges, exact: every
  element has one non-zero term), parameters spread over DP ranks by size: no rank holds more than its share plus one
  tensor. Loading reads each TP-local tensor and keeps this rank's range (megatron's 'fully_reshardable' optimizer
  state loads the same way).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from lmfusion.ema import EmaConfig, ema_decay
from lmfusion.training.model_setup import unwrap

__all__ = ["ShardedEMA", "EMA_PREFIX", "main_ranges"]

EMA_PREFIX = "ema."
"""Checkpoint keys of the average: the model's keys with this prefix."""


@dataclass
class _Entry:
    key: str  # "<chunk>.<parameter name>"
    param: torch.nn.Parameter
    main: Optional[torch.Tensor]  # flat fp32 main values of this rank's range (None: the range is empty)
    start: int
    end: int
    ema: torch.Tensor  # flat fp32, end - start elements


def _optimizers(optimizer) -> list:
    chained = getattr(optimizer, "chained_optimizers", None)
    return [o for inner in chained for o in _optimizers(inner)] if chained is not None else [optimizer]


def main_ranges(optimizer) -> tuple[dict[int, tuple[torch.Tensor, int, int]], bool]:
    """``id(model param) -> (flat fp32 main tensor, start, end)`` for what this rank's optimizer updates, and whether
    that is a distributed-optimizer shard."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    out: dict[int, tuple[torch.Tensor, int, int]] = {}
    sharded = False
    for opt in _optimizers(optimizer):
        if isinstance(opt, DistributedOptimizer):
            sharded = True
            pairs = [*zip(opt.model_float16_groups, opt.shard_fp32_from_float16_groups),
                     *zip(opt.model_fp32_groups, opt.shard_fp32_groups)]
            for models, mains in pairs:
                for p, main in zip(models, mains):
                    # the range this DP rank owns, from the optimizer's public buffer maps (what its private
                    # _get_model_param_range_map reads)
                    gbuf, dtype, bucket = opt.model_param_gbuf_map[p]
                    r = opt.gbuf_ranges[gbuf][dtype][bucket]["param_map"][p]["param"]
                    out[id(p)] = (main.view(-1), r.start, r.end)
        elif isinstance(opt, Float16OptimizerWithFloat16Params):
            for models, mains in zip(opt.float16_groups, opt.fp32_from_float16_groups):
                for p, main in zip(models, mains):
                    out[id(p)] = (main.view(-1), 0, p.numel())
            for group in opt.fp32_from_fp32_groups:
                for p in group:
                    out[id(p)] = (p.view(-1), 0, p.numel())
        else:  # FP32Optimizer: the parameters are the main values
            for group in opt.param_groups:
                for p in group["params"]:
                    out[id(p)] = (p.view(-1), 0, p.numel())
    return out, sharded


class ShardedEMA:
    """The average of this rank's part of the trainable weights of ``chunks`` (DDP model chunks), for the megatron
    ``optimizer`` built over them. Starts as a copy of the current main values, ``steps`` 0."""

    def __init__(self, cfg: EmaConfig, chunks: list, optimizer):
        self.cfg = cfg
        self.steps = 0
        ranges, self.sharded = main_ranges(optimizer)
        self.entries: list[_Entry] = []
        for i, chunk in enumerate(chunks):
            for name, p in unwrap(chunk).named_parameters():
                if not p.requires_grad:
                    continue
                main, start, end = ranges.get(id(p), (None, 0, 0))
                if main is not None and main.numel() != end - start:
                    raise RuntimeError(f"EMA: {name}: main shard has {main.numel()} elements, range {start}:{end}")
                ema = main.detach().float().clone() if main is not None else torch.empty(0, device=p.device)
                self.entries.append(_Entry(f"{i}.{name}", p, main if end > start else None, start, end, ema))
        self._ema = [e.ema for e in self.entries if e.main is not None]
        self._main = [e.main for e in self.entries if e.main is not None]
        self.dp_group = ps.get_data_parallel_group()

    @property
    def numel(self) -> int:
        """Elements this rank averages."""
        return sum(e.ema.numel() for e in self.entries)

    @torch.no_grad()
    def update(self) -> float:
        """One EMA step after a successful optimizer step; returns its decay."""
        self.steps += 1
        decay = ema_decay(self.cfg, self.steps)
        if self._ema:
            torch._foreach_lerp_(self._ema, self._main, 1.0 - decay)
        return decay

    @torch.no_grad()
    def reset(self) -> None:
        """Restart the average from the current main values (a checkpoint without one was loaded)."""
        self.steps = 0
        for e in self.entries:
            if e.main is not None:
                e.ema.copy_(e.main)

    # ------------------------------------------------------------------ checkpoint
    def state(self) -> dict[str, Any]:
        """The JSON part (train_state.json)."""
        return {"steps": self.steps, "sharded": self.sharded}

    def _model_entries(self, model_sds: list[dict[str, Any]]) -> list[tuple[_Entry, Any]]:
        """Each entry with its parameter's ShardedTensor (or factory) from the chunks' model sharded state dicts."""
        from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

        by_data = {}
        for sd in model_sds:
            for sh in sd.values():
                if isinstance(sh, (ShardedTensor, ShardedTensorFactory)):
                    by_data[id(sh.data)] = sh
        out = []
        for e in self.entries:
            sh = by_data.get(id(e.param))
            if sh is None:
                raise RuntimeError(f"EMA: trainable parameter {e.key} has no entry in the model's sharded state dict")
            out.append((e, sh))
        return out

    def _full(self, e: _Entry) -> torch.Tensor:
        """Zero-padded flat TP-local tensor holding this rank's range."""
        buf = torch.zeros(e.param.numel(), dtype=torch.float32, device=e.ema.device)
        if e.main is not None:
            buf[e.start:e.end] = e.ema
        return buf

    def sharded_state_dict(self, model_sds: list[dict[str, Any]], is_loading: bool) -> dict[str, Any]:
        """``{entry key: ShardedTensor}``, the model's checkpoint metadata with keys prefixed ``ema.`` and fp32 data.
        Saving with the distributed optimizer is a collective over the DP group (each tensor assembled on one rank)."""
        from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

        def sharded(sh, data, replica_id):
            kwargs = dict(key=EMA_PREFIX + sh.key, data=data, replica_id=replica_id)
            if not isinstance(sh, ShardedTensorFactory):
                kwargs["dtype"] = torch.float32
            return replace(sh, **kwargs)

        out: dict[str, Any] = {}
        dp_size, dp_rank = self.dp_group.size(), self.dp_group.rank()
        load = [0] * dp_size
        for e, sh in self._model_entries(model_sds):
            if is_loading:
                out[e.key] = sharded(sh, torch.empty(e.param.shape, dtype=torch.float32, device=e.ema.device),
                                     sh.replica_id)
            elif not self.sharded:
                out[e.key] = sharded(sh, e.ema.view(e.param.shape), sh.replica_id)
            else:
                owner = min(range(dp_size), key=lambda r: load[r])  # the same choice on every DP rank
                load[owner] += e.param.numel()
                buf = self._full(e)
                dist.reduce(buf, dst=dist.get_global_rank(self.dp_group, owner), group=self.dp_group)
                if dp_rank == owner:  # its DP replica index is 0: the owner writes, the others hold nothing
                    rid = sh.replica_id
                    rid = (*rid[:-1], 0) if isinstance(rid, tuple) else 0
                    out[e.key] = sharded(sh, buf.view(e.param.shape), rid)
        return out

    @torch.no_grad()
    def load(self, loaded: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        """Keep this rank's range of each loaded (TP-local, whole) tensor; ``state``: :meth:`state`'s JSON."""
        for e in self.entries:
            if e.main is not None:
                e.ema.copy_(loaded[e.key].reshape(-1)[e.start:e.end])
        self.steps = int(state["steps"])

    # ------------------------------------------------------------------ inspection
    @torch.no_grad()
    def gathered(self) -> dict[str, torch.Tensor]:
        """Every entry's whole TP-local average on every rank (a collective over DP). For tests and inspection only:
        it materialises the full average that training never holds."""
        out = {}
        for e in self.entries:
            buf = self._full(e)
            if self.sharded:
                dist.all_reduce(buf, group=self.dp_group)
            out[e.key] = buf.view(e.param.shape)
        return out
