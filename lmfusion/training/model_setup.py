"""The trainable side of a run: model chunks, megatron DDP over the image parameters, optimizer and LR schedule.

* **Chunks.** One :class:`LMFusionModel` stage per rank, or ``virtual_pipeline_model_parallel_size`` chunks
  (interleaved 1F1B: chunk ``v`` of pipeline rank ``r`` holds layers ``(v * pp + r) * n ...``).
* **Frozen text.** :func:`~lmfusion.model.builder.build_model` sets ``requires_grad`` on the image set only, before
  DDP and the optimizer exist: megatron DDP allocates gradient buffers for trainable parameters only, and the
  (distributed) optimizer holds state for them only.
* **Precision.** bf16 (``train.precision``; 'auto': on a GPU or a CPU with AMX/AVX512-BF16, :func:`resolve_precision`):
  parameters are built in bf16 and wrapped in megatron's ``Float16Module``; the optimizer keeps fp32 main parameters
  and gradients are reduced in fp32 (bf16 with ``parallel.grad_reduce_in_fp32=false``). fp32 otherwise.
* **Activation recompute** (``train.recompute: full``): every transformer layer's forward is re-run in backward
  (``torch.utils.checkpoint``, or TE's checkpoint with TE linears; :func:`recompute_layers`). No dropout, so
  no RNG-tracker state needs replaying.
* **Per-group learning rates** (``optimizer.lr_mult``): the image I/O blocks (trained from scratch) get ``lr_mult`` x
  the schedule's lr and min_lr, the image twins (copies of pretrained text weights) the schedule's own, through
  megatron-core 0.16.1's parameter-group overrides (``get_megatron_optimizer(config_overrides=...)`` with a
  ``ParamKey`` on the I/O modules' names, added to ``get_standard_config_overrides``' weight-decay exemptions). Its
  ``OptimizerParamScheduler`` reads each group's ``max_lr``/``min_lr`` (it ignores ``lr_mult``, which is set too: it
  names the group in optimizer checkpoints). :func:`param_group_overrides`; the DeepSpeed engine uses the same.
* **Shared builders.** Both engines build the optimizer config (:func:`optimizer_config`), parameter groups
  (:func:`param_groups`), LR/WD schedule (:func:`build_scheduler`) and recompute (:func:`recompute_layers`) here.
* **Optimizer state checkpoints** (megatron-core 0.16.1): 'fully_reshardable' needs one gradient bucket
  (``overlap_grad_reduce`` off gives exactly one); :func:`check_buckets` refuses more.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from lmfusion.config import Config
from lmfusion.errors import UserError
from lmfusion.model.builder import build_model_chunks
from lmfusion.model.model import LMFusionModel
from lmfusion.model.weights import is_image_param
from megatron_ext import cpu, torch_adam
from megatron_ext.device import runtime_device

__all__ = ["TrainModel", "params_dtype", "resolve_precision", "cpu_bf16_matmul", "build_train_model", "check_buckets",
           "unwrap", "IMAGE_IO_NAMES", "param_group_overrides", "optimizer_config", "param_groups", "build_scheduler",
           "recompute_layers"]

#: Parameter names (fnmatch, through DDP / Float16Module ``module.`` prefixes) of the image I/O blocks.
IMAGE_IO_NAMES = ("image_encoder.*", "*.image_encoder.*", "image_decoder.*", "*.image_decoder.*")


@dataclass
class TrainModel:
    chunks: list[DistributedDataParallel]
    """DDP-wrapped model chunks (one without virtual pipeline)."""
    optimizer: Any
    scheduler: OptimizerParamScheduler
    config: Any
    """megatron TransformerConfig of chunk 0 (the schedules read it)."""


def cpu_bf16_matmul() -> str | None:
    """The CPU's bf16 matrix instructions ('AMX-BF16' or 'AVX512-BF16', what oneDNN's bf16 GEMMs use), or None: on
    a CPU without them torch's bf16 GEMMs are emulated and far slower than fp32."""
    import torch.cpu

    if torch.cpu._is_amx_tile_supported():
        return "AMX-BF16"
    if torch.cpu._is_avx512_bf16_supported():
        return "AVX512-BF16"
    return None


def resolve_precision(cfg: Config) -> tuple[str, str]:
    """``(precision, why)``: 'auto' is bf16 on a GPU, bf16 on a CPU with bf16 matrix instructions (3.5-10x the fp32
    GEMM rate there, docs/performance.md), fp32 otherwise."""
    precision = cfg.train.precision
    if precision != "auto":
        return precision, "train.precision"
    if torch.cuda.is_available():
        return "bf16", "auto: GPU"
    found = cpu_bf16_matmul()
    return ("bf16", f"auto: CPU has {found}") if found else ("fp32", "auto: CPU has no bf16 matrix instructions")


def params_dtype(cfg: Config) -> torch.dtype:
    return torch.bfloat16 if resolve_precision(cfg)[0] == "bf16" else torch.float32


def unwrap(chunk: torch.nn.Module) -> LMFusionModel:
    """The LMFusionModel inside DDP / Float16Module wrappers."""
    while not isinstance(chunk, LMFusionModel):
        chunk = chunk.module
    return chunk


def _fp8_overrides(cfg: Config) -> dict[str, Any]:
    return {} if cfg.train.fp8 is None else {"fp8": cfg.train.fp8, "fp8_recipe": cfg.train.fp8_recipe}


def recompute_layers(model: LMFusionModel) -> None:
    """``train.recompute=full``: every layer of ``model`` re-runs its forward in backward (non-reentrant: a layer
    takes a non-tensor context). With Transformer Engine linears through TE's checkpoint, which re-enters the
    forward's ``fp8_autocast`` on recompute (torch's checkpoint would recompute outside it: not in FP8, against
    other scaling factors); torch's otherwise. The decoder calls the checkpoint around each layer, so modules and
    parameter names are unchanged."""
    from megatron_ext.te_linear import has_te_linears, te_checkpoint

    if has_te_linears(model.decoder):
        model.decoder.recompute = te_checkpoint
    else:
        from torch.utils import checkpoint as torch_checkpoint

        def recompute(layer, hidden, ctx):
            return torch_checkpoint.checkpoint(layer, hidden, ctx, use_reentrant=False)

        model.decoder.recompute = recompute


def check_buckets(cfg: Config, chunks: list[DistributedDataParallel]) -> None:
    """Refuse a 'fully_reshardable' distributed-optimizer checkpoint over more than one gradient bucket
    (megatron-core 0.16.1 writes it corrupt: Megatron-LM PR #5077)."""
    if not cfg.parallel.use_distributed_optimizer or cfg.checkpoint.optimizer_sharding != "fully_reshardable":
        return
    buckets = sum(len(buf.buckets) for chunk in chunks for buf in chunk.buffers)
    if buckets > len(chunks):
        raise UserError(f"checkpoint.optimizer_sharding=fully_reshardable with {buckets} gradient buckets: megatron-"
                        f"core 0.16.1 saves such optimizer state corrupt; use checkpoint.optimizer_sharding="
                        f"dp_reshardable or parallel.overlap_grad_reduce=false")


def _is_text_param(param: torch.nn.Parameter, name: str) -> bool:
    """A text parameter, named through any DDP / Float16Module ``module.`` prefixes."""
    parts = name.split(".")
    while parts and parts[0] == "module":
        parts.pop(0)
    return not is_image_param(".".join(parts))


def param_group_overrides(cfg: Config, opt_config: OptimizerConfig):
    """megatron-core ``config_overrides`` for ``optimizer.lr_mult`` and ``optimizer.text_lr_ratio``; None (megatron's
    default groups) when neither applies."""
    o = cfg.optimizer
    if o.lr_mult == 1.0 and not o.trains_text:
        return None
    from megatron.core.optimizer import ParamKey, get_standard_config_overrides
    from megatron.core.optimizer import ParamWithNamePredicate
    from megatron.core.optimizer_param_scheduler import ParamGroupOverride

    overrides = get_standard_config_overrides(opt_config)  # biases and 1-D weights: wd_mult 0, as by default
    if o.lr_mult != 1.0:
        overrides[ParamKey(name=IMAGE_IO_NAMES)] = ParamGroupOverride(max_lr=o.lr * o.lr_mult,
                                                                      min_lr=o.min_lr * o.lr_mult, lr_mult=o.lr_mult)
    if o.trains_text:
        text = ParamWithNamePredicate(name="lmfusion_text", fn=_is_text_param)
        overrides[ParamKey(with_name_predicate=text)] = ParamGroupOverride(
            max_lr=o.lr * o.text_lr_ratio, min_lr=o.min_lr * o.text_lr_ratio, lr_mult=o.text_lr_ratio)
    return overrides


def optimizer_config(cfg: Config, dtype: torch.dtype) -> OptimizerConfig:
    """megatron's ``OptimizerConfig`` of ``cfg.optimizer`` (AdamW) for parameters of ``dtype``."""
    o = cfg.optimizer
    return OptimizerConfig(
        optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay, adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2, adam_eps=o.adam_eps, clip_grad=o.clip_grad, bf16=dtype == torch.bfloat16,
        params_dtype=dtype, use_distributed_optimizer=cfg.parallel.use_distributed_optimizer)


def param_groups(model: torch.nn.Module, cfg: Config, opt_config: OptimizerConfig) -> list[dict[str, Any]]:
    """The trainable parameters of ``model`` in the groups megatron's optimizer builds (biases and 1-D weights get
    ``wd_mult`` 0; ``optimizer.lr_mult``'s ``max_lr``/``min_lr``), for an optimizer megatron does not build (the
    DeepSpeed engine's). Empty groups are dropped. A collective (megatron aligns the groups across ranks)."""
    from megatron.core.optimizer import _get_param_groups  # megatron-core 0.16.1 (pinned): no public equivalent

    return [g for g in _get_param_groups([model], opt_config, param_group_overrides(cfg, opt_config)) if g["params"]]


def build_scheduler(cfg: Config, optimizer) -> OptimizerParamScheduler:
    """megatron's LR/WD schedule over ``optimizer``'s parameter groups: warmup, decay to ``min_lr``, constant WD.
    Megatron's default parameter groups exempt biases and 1-D weights (norms) from weight decay through a wd_mult of 0
    that only the scheduler applies: it is always used."""
    o = cfg.optimizer
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=o.lr, min_lr=o.min_lr, lr_warmup_steps=o.lr_warmup_iters,
        lr_decay_steps=o.lr_decay_iters or cfg.train.train_iters, lr_decay_style=o.lr_decay_style,
        start_wd=o.weight_decay, end_wd=o.weight_decay, wd_incr_steps=cfg.train.train_iters,
        wd_incr_style="constant")


def build_train_model(cfg: Config, base, train_text: bool = False, device: torch.device | None = None) -> TrainModel:
    """Model chunks (text from ``base``; random when None) on ``device`` (default: the runtime device), DDP, megatron
    optimizer and LR/WD scheduler, wired for the schedules. The text weights train when ``optimizer.text_lr_ratio``
    > 0 or ``train_text`` (the everything-trainable baseline of benchmarks, at the schedule's lr)."""
    if cfg.train.fp8 is not None:
        from megatron_ext.te_linear import HAVE_TE

        if not (HAVE_TE and torch.cuda.is_available()):
            raise UserError(f"train.fp8={cfg.train.fp8!r} needs Transformer Engine and a GPU")
    # megatron's torch-AdamW fallback (no apex/TE: CPU, or a GPU container without them) checkpoints its `step` state
    # wrongly; the fixes apply on every device, not only in CPU mode.
    torch_adam.install()
    dtype = params_dtype(cfg)
    chunks = build_model_chunks(cfg.model, vpp=cfg.parallel.vpp, base=base,
                                sequence_parallel=cfg.parallel.sequence_parallel, params_dtype=dtype,
                                seed=cfg.train.seed, train_text=train_text or cfg.optimizer.trains_text,
                                device=runtime_device() if device is None else device, **_fp8_overrides(cfg))
    if cfg.train.recompute == "full":
        for model in chunks:
            recompute_layers(model)
    tconfig = chunks[0].config
    if dtype == torch.bfloat16:
        from megatron.core.transformer.module import Float16Module

        wrapped = [Float16Module(m.config, m) for m in chunks]
    else:
        wrapped = list(chunks)
    par = cfg.parallel
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=par.grad_reduce_in_fp32, overlap_grad_reduce=par.overlap_grad_reduce,
        use_distributed_optimizer=par.use_distributed_optimizer, bucket_size=par.ddp_bucket_size)
    ddp = [DistributedDataParallel(m.config, ddp_config, m, disable_bucketing=i > 0)
           for i, m in enumerate(wrapped)]
    check_buckets(cfg, ddp)
    opt_config = optimizer_config(cfg, dtype)
    optimizer = get_megatron_optimizer(opt_config, ddp, config_overrides=param_group_overrides(cfg, opt_config))
    if cpu.is_enabled():
        cpu.fuse_adam(optimizer)  # torch's fused CPU AdamW, not megatron's per-tensor loop (docs/performance.md)
    scheduler = build_scheduler(cfg, optimizer)
    # What megatron's training loop wires into the config the schedules read.
    tconfig.grad_scale_func = optimizer.scale_loss
    tconfig.finalize_model_grads_func = finalize_model_grads
    if par.overlap_grad_reduce:
        no_sync = [c.no_sync for c in ddp]
        tconfig.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    for m in chunks[1:]:
        m.config.grad_scale_func = tconfig.grad_scale_func
    return TrainModel(chunks=ddp, optimizer=optimizer, scheduler=scheduler, config=tconfig)
