"""megatron-core 0.16.1's DistributedOptimizer checkpoints with torch's AdamW, fixed on any device.

Without apex or Transformer Engine (always on CPU; also on a GPU machine whose container lacks both) megatron falls
back to ``torch.optim.AdamW``, whose per-param ``step`` tensor the DistributedOptimizer checkpoint code gets wrong
in three places (distrib_optimizer.py, megatron-core 0.16.1):

* ``state_dict()`` of a fresh optimizer (which ``sharded_state_dict(..., is_loading=True)`` calls) asserts one
  common step (:642): the state is created first (:func:`init_adam_state_for_load`).
* ``load_state_dict`` gives all params one shared ``step`` tensor (:825) that AdamW advances once per param: the
  resumed run silently drifts. Each param gets its own copy afterwards (:func:`split_shared_adam_steps`).
* loading ``fully_reshardable`` param state copies every state key, ``step`` included, from an entry that has none
  (KeyError, :940): ``step`` is left as loaded from the param groups.

:func:`install` wraps the three methods (idempotent; nothing when apex/TE provide the fused Adam, whose state has
no such tensor). The trainer calls it on every device; :mod:`megatron_ext.cpu` applies the same wrappers in CPU mode.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

__all__ = ["install", "installed", "patches", "torch_optimizers", "init_adam_state_for_load",
           "split_shared_adam_steps"]

_MARK = "_lmfusion_torch_adam_fix"


def _state_dict_with_adam_state(state_dict):
    @functools.wraps(state_dict)
    def wrapper(self):
        init_adam_state_for_load(self)
        return state_dict(self)

    return _marked(wrapper)


def _load_state_dict_with_own_steps(load_state_dict):
    @functools.wraps(load_state_dict)
    def wrapper(self, state_dict):
        load_state_dict(self, state_dict)
        split_shared_adam_steps(self)

    return _marked(wrapper)


def _set_states_keeping_step(set_states):
    @functools.wraps(set_states)
    def wrapper(self, model_param, tensors):
        if "step" not in tensors and not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            step = self.optimizer.state.get(main_param, {}).get("step")
            if step is not None:
                tensors = {**tensors, "step": step}  # copied onto itself: left as loaded
        return set_states(self, model_param, tensors)

    return _marked(wrapper)


def _marked(fn):
    setattr(fn, _MARK, True)
    return fn


_WRAPPERS = (("state_dict", _state_dict_with_adam_state), ("load_state_dict", _load_state_dict_with_own_steps),
             ("_set_main_param_and_optimizer_states", _set_states_keeping_step))


def patches() -> list[tuple[Any, str, Any]]:
    """(DistributedOptimizer, method name, wrapped method) for each fix not applied yet; none with apex/TE."""
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE:
        return []
    cls = distrib_optimizer.DistributedOptimizer
    return [(cls, name, wrap(getattr(cls, name))) for name, wrap in _WRAPPERS
            if not getattr(getattr(cls, name), _MARK, False)]


def install() -> int:
    """Apply the fixes process-wide (any device); returns how many methods were wrapped now."""
    todo = patches()
    for cls, name, value in todo:
        setattr(cls, name, value)
    return len(todo)


def installed() -> bool:
    """True when every fix is in place (or none is needed: apex/TE present)."""
    return not patches()


def torch_optimizers(optimizer: Any) -> list[Any]:
    """The torch optimizers under a megatron (chained / distributed / fp32) optimizer, or the optimizer itself."""
    chained = getattr(optimizer, "chained_optimizers", None)
    if chained is not None:
        return [inner for opt in chained for inner in torch_optimizers(opt)]
    return [getattr(optimizer, "optimizer", optimizer)]


def init_adam_state_for_load(optimizer: Any) -> None:
    """Create the state of a (megatron-wrapped) torch AdamW that has not stepped yet; existing state is kept.

    ``DistributedOptimizer.sharded_state_dict(..., is_loading=True)`` reads the current state (one common
    ``step``, distrib_optimizer.py:642), which a fresh torch AdamW does not have yet. Creates what AdamW's lazy
    init would (zero ``exp_avg``/``exp_avg_sq``, ``step`` 0) without touching the params. The installed fix calls it
    from ``DistributedOptimizer.state_dict``.
    """
    for inner in torch_optimizers(optimizer):
        for group in inner.param_groups:
            for param in group["params"]:
                if param not in inner.state or not inner.state[param]:
                    inner.state[param] = {
                        "step": torch.tensor(0.0),
                        "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
                        "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format),
                    }


def split_shared_adam_steps(optimizer: Any) -> int:
    """Give every param of a (distributed) torch-Adam optimizer its own ``step`` tensor; returns how many split.

    megatron's DistributedOptimizer restores one shared ``step`` tensor for all params (distrib_optimizer.py:825);
    torch's AdamW increments each param's ``step`` in place, so a shared one advances N times per step and the
    resumed run silently drifts. The installed fix calls it at the end of ``DistributedOptimizer.load_state_dict``;
    calling it again is harmless.
    """
    split = 0
    for inner in torch_optimizers(optimizer):
        seen: set[int] = set()
        for state in inner.state.values():
            step = state.get("step")
            if isinstance(step, torch.Tensor):
                if id(step) in seen:
                    state["step"] = step.clone()
                    split += 1
                seen.add(id(state["step"]))
    return split


