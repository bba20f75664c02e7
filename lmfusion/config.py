"""Typed configuration: the model section (:mod:`lmfusion.model.config`, re-exported here) and the training
sections (parallel, train, optimizer, init, checkpoint, logging; ``data`` is :class:`lmfusion.data.DataConfig`),
gathered in :class:`Config`.

Conventions (lingua / torchtitan): small dataclasses with a docstring per field and ``__post_init__`` checks that
name the field and the expected value; :func:`to_transformer_config` is the one adapter to megatron's
``TransformerConfig``. Reading YAML, ``key=value`` overrides and unknown-key suggestions live in
:mod:`lmfusion.config_io`. Names of the main knobs are Megatron's (``tensor_model_parallel_size``,
``train_iters``, ``micro_batch_size``, ``save_interval``...).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from lmfusion.data.config import DataConfig
from lmfusion.diffusion_config import OBJECTIVES, DiffusionConfig
from lmfusion.errors import UserError
from lmfusion.ema import EmaConfig
from lmfusion.model.config import LLAMA3_BOI, LLAMA3_EOI, ModelConfig, RopeScaling, to_transformer_config
from lmfusion.utils import check_choices, literal_choices

__all__ = ["ModelConfig", "RopeScaling", "to_transformer_config", "LLAMA3_BOI", "LLAMA3_EOI", "ParallelConfig",
           "TrainConfig", "OptimConfig", "InitConfig", "CheckpointConfig", "LoggingConfig", "DeepSpeedConfig",
           "ENGINES", "OBJECTIVES", "DiffusionConfig", "Config"]

# Choice fields: the annotation is the one list of allowed values (config_io and __post_init__ both read it).
Precision = Literal["auto", "bf16", "fp32"]
Recompute = Literal["none", "full"]
Fp8 = Optional[Literal["hybrid", "e4m3"]]
Fp8Recipe = Literal["delayed", "tensorwise", "mxfp8", "blockwise"]
LrDecayStyle = Literal["cosine", "linear", "constant", "inverse-square-root"]
OptimizerSharding = Literal["fully_reshardable", "dp_reshardable"]
Engine = Literal["megatron", "deepspeed"]
ENGINES = literal_choices(Engine)


# ---------------------------------------------------------------------------------------------------- training sections
def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def _check_positive(section: str, obj: Any, *names: str) -> None:
    for name in names:
        _check(getattr(obj, name) >= 1, f"{section}.{name} must be >= 1, got {getattr(obj, name)}")


@dataclass
class ParallelConfig:
    """Megatron parallel layout. World size = TP x PP x DP (DP follows from the number of ranks)."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    """Model chunks per pipeline rank (interleaved 1F1B); None: one chunk."""
    sequence_parallel: bool = False
    """Shard norms/activations along the sequence over the TP group (needs TP > 1)."""
    use_distributed_optimizer: bool = True
    """Shard optimizer state (and fp32 main params) over data-parallel ranks."""
    overlap_grad_reduce: bool = False
    """Overlap the DP gradient reduction with backward. Splits the grad buffer into buckets; megatron-core 0.16.1's
    ``fully_reshardable`` optimizer checkpoint is corrupt with more than one bucket (fixed upstream in Megatron-LM
    PR #5077), so it needs ``checkpoint.optimizer_sharding: dp_reshardable``."""
    ddp_bucket_size: Optional[int] = None
    """Elements per gradient bucket with overlap_grad_reduce (None: megatron's default, max(4e7, 1e6 x DP))."""
    grad_reduce_in_fp32: bool = True
    """bf16 runs: keep the DDP gradient buffer in fp32 and reduce over DP in fp32 (megatron's default). False: the
    buffer and the DP reduce-scatter/all-reduce are bf16 (half the bytes over gloo; micro-batch gradients accumulate
    in bf16); the optimizer's main gradients and weights stay fp32. No effect in fp32 runs."""

    def __post_init__(self) -> None:
        _check_positive("parallel", self, "tensor_model_parallel_size", "pipeline_model_parallel_size")
        vpp = self.virtual_pipeline_model_parallel_size
        if vpp is not None:
            _check(vpp >= 1, f"parallel.virtual_pipeline_model_parallel_size must be >= 1, got {vpp}")
            _check(vpp == 1 or self.pipeline_model_parallel_size > 1,
                   "parallel.virtual_pipeline_model_parallel_size > 1 needs pipeline_model_parallel_size > 1")
        _check(not self.sequence_parallel or self.tensor_model_parallel_size > 1,
               "parallel.sequence_parallel=true needs parallel.tensor_model_parallel_size > 1")

    @property
    def vpp(self) -> int:
        return self.virtual_pipeline_model_parallel_size or 1


@dataclass
class TrainConfig:
    """The training loop."""

    train_iters: int = 10000
    """Optimizer steps to train for (the run stops here; resuming continues up to it)."""
    micro_batch_size: int = 1
    """Packed rows per micro-batch (per data-parallel rank)."""
    global_batch_size: int = 1
    """Packed rows per optimizer step over all DP ranks; gradient accumulation = global / (micro x DP)."""
    seed: int = 1234
    """Seeds model init (U-Net), megatron's RNG tracker and the per-image diffusion noise."""
    precision: Precision = "auto"
    """'auto' (bf16 on a GPU or on a CPU with bf16 matrix instructions, AMX-BF16 / AVX512-BF16; fp32 otherwise),
    'bf16' or 'fp32'. The choice is printed at start."""
    recompute: Recompute = "none"
    """Activation recompute: 'none' or 'full' (each transformer layer re-runs its forward in backward)."""
    fp8: Fp8 = None
    """Transformer Engine FP8: None, 'hybrid' (E4M3 forward, E5M2 gradients) or 'e4m3'. Needs TE and a GPU."""
    fp8_recipe: Fp8Recipe = "delayed"
    """TE recipe: 'delayed' (DelayedScaling), 'tensorwise' (Float8CurrentScaling), 'mxfp8' or 'blockwise'."""
    diffusion_loss_weight: float = 5.0
    """lambda: loss = LM cross-entropy + lambda x diffusion MSE (paper: 5)."""
    image_first_max_timestep: int = 500
    """Noise-level cap for images that come before their caption, in steps of the 1000-step cosine DDPM schedule
    (paper: 500). ``diffusion.objective: flow`` caps at the flow noise level with the same signal-to-noise ratio."""
    ema: EmaConfig = field(default_factory=EmaConfig)
    """EMA of the trainable weights (:class:`lmfusion.ema.EmaConfig`; off by default)."""

    def __post_init__(self) -> None:
        _check_positive("train", self, "train_iters", "micro_batch_size", "global_batch_size")
        _check(self.global_batch_size % self.micro_batch_size == 0,
               f"train.global_batch_size {self.global_batch_size} is not a multiple of train.micro_batch_size "
               f"{self.micro_batch_size}")
        check_choices("train", self, precision=Precision, recompute=Recompute, fp8=Fp8, fp8_recipe=Fp8Recipe)
        _check(self.diffusion_loss_weight >= 0, f"train.diffusion_loss_weight must be >= 0, got "
               f"{self.diffusion_loss_weight}")
        _check(0 <= self.image_first_max_timestep < 1000,
               f"train.image_first_max_timestep must be in [0, 999], got {self.image_first_max_timestep}")

@dataclass
class OptimConfig:
    """AdamW + learning-rate schedule (megatron ``OptimizerConfig`` + ``OptimizerParamScheduler``). Paper: AdamW
    (0.9, 0.95, 1e-8), lr 1e-4, 4000 warm-up steps, cosine to 1.5e-5, gradient clipping 1.0."""

    lr: float = 1e-4
    min_lr: float = 1.5e-5
    lr_warmup_iters: int = 4000
    """Linear warm-up from 0 over this many steps."""
    lr_decay_iters: Optional[int] = None
    """Steps over which lr decays to min_lr (None: train.train_iters)."""
    lr_decay_style: LrDecayStyle = "cosine"
    """'cosine', 'linear', 'constant' or 'inverse-square-root'."""
    weight_decay: float = 0.1
    """Decoupled weight decay (biases and norm weights are exempt, as in Megatron)."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    """Global gradient-norm clipping threshold (0: off)."""
    lr_mult: float = 1.0
    """Learning-rate multiplier of the image I/O blocks (U-Net down/up or linear patchify; trained from scratch):
    their lr (and min_lr) is ``lr_mult`` x the schedule's, which the image twins (copied from the pretrained text
    weights) follow unscaled. A megatron-core parameter-group override; 1: one schedule for all."""
    text_lr_ratio: float = 0.0
    """Learning rate of every non-image parameter as a multiple of the schedule's (paper Section 5.1: eta_text /
    eta_img). 0: frozen (LMFusion); > 0: trained, and checkpointed in the run."""

    def __post_init__(self) -> None:
        _check(self.lr > 0 and 0 <= self.min_lr <= self.lr,
               f"optimizer.lr must be > 0 and optimizer.min_lr in [0, lr], got lr={self.lr} min_lr={self.min_lr}")
        _check(self.lr_warmup_iters >= 0, f"optimizer.lr_warmup_iters must be >= 0, got {self.lr_warmup_iters}")
        check_choices("optimizer", self, lr_decay_style=LrDecayStyle)
        for name in ("adam_beta1", "adam_beta2"):
            _check(0 <= getattr(self, name) < 1, f"optimizer.{name} must be in [0, 1), got {getattr(self, name)}")
        _check(self.adam_eps > 0 and self.weight_decay >= 0 and self.clip_grad >= 0,
               "optimizer.adam_eps must be > 0, optimizer.weight_decay and optimizer.clip_grad >= 0")
        _check(self.lr_mult > 0, f"optimizer.lr_mult must be > 0, got {self.lr_mult}")
        _check(self.text_lr_ratio >= 0, f"optimizer.text_lr_ratio must be >= 0, got {self.text_lr_ratio}")

    @property
    def trains_text(self) -> bool:
        return self.text_lr_ratio > 0


@dataclass
class InitConfig:
    """Where the frozen text model comes from: exactly one of a converted base or a Hugging Face directory."""

    base_checkpoint: Optional[str] = None
    """A base directory from ``lmfusion convert-hf`` (read-only; training checkpoints refer to it)."""
    hf_dir: Optional[str] = None
    """A local Hugging Face Llama directory, converted on the fly (once) into ``convert_to``."""
    convert_to: Optional[str] = None
    """Where ``hf_dir`` is converted (default: ``<checkpoint.save>/base``)."""

    def __post_init__(self) -> None:
        _check((self.base_checkpoint is None) != (self.hf_dir is None),
               "init: set exactly one of init.base_checkpoint (a converted base) and init.hf_dir (a Hugging Face "
               f"Llama directory); got base_checkpoint={self.base_checkpoint!r} hf_dir={self.hf_dir!r}")


@dataclass
class CheckpointConfig:
    """Training checkpoints (megatron dist_checkpointing) in the run directory ``save``."""

    save: Optional[str] = None
    """Run directory: checkpoints ``iter_NNNNNNN/``, ``latest``, config.yaml, metrics, TensorBoard logs."""
    save_interval: int = 1000
    """Save every this many steps (and always at exit)."""
    load: Optional[str] = None
    """Run (or iteration) directory to start from when ``save`` holds no checkpoint yet. A checkpoint in ``save``
    always wins: a requeued or relaunched run resumes where it stopped."""
    keep_last: Optional[int] = 3
    """Keep the newest K iteration directories (None: all)."""
    async_save: bool = False
    """Write checkpoints in the background (GPU only); ``latest`` moves once every rank finished writing."""
    optimizer_sharding: OptimizerSharding = "fully_reshardable"
    """Distributed-optimizer state layout: 'fully_reshardable' (loads at any TP/PP/DP; needs one grad bucket, i.e.
    parallel.overlap_grad_reduce=false, in megatron-core 0.16.1) or 'dp_reshardable' (any bucketing; same TP/PP)."""
    load_optimizer: bool = True
    """Restore optimizer + scheduler state (false: fresh optimizer, weights only)."""
    override_scheduler: bool = False
    """On resume, take the LR/weight-decay schedule settings from this config where they differ from the checkpoint's
    (megatron's --override-opt_param-scheduler). Without it or ``use_checkpoint_scheduler`` a difference is an
    error naming the key and both values."""
    use_checkpoint_scheduler: bool = False
    """On resume, keep the checkpoint's schedule settings where they differ from this config's
    (megatron's --use-checkpoint-opt_param-scheduler)."""
    exit_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    """Signals that make every rank save a checkpoint at the next step boundary and exit 0."""

    def __post_init__(self) -> None:
        _check(self.save is not None, "checkpoint.save is not set: name the run directory")
        _check_positive("checkpoint", self, "save_interval")
        _check(not (self.override_scheduler and self.use_checkpoint_scheduler),
               "checkpoint.override_scheduler and checkpoint.use_checkpoint_scheduler are both true: choose one")
        _check(self.keep_last is None or self.keep_last >= 1,
               f"checkpoint.keep_last must be >= 1 or null, got {self.keep_last}")
        check_choices("checkpoint", self, optimizer_sharding=OptimizerSharding)
        import signal

        bad = [s for s in self.exit_signals if not isinstance(getattr(signal, str(s), None), signal.Signals)]
        _check(not bad, f"checkpoint.exit_signals: {bad} are not signal names (e.g. SIGTERM, SIGUSR1)")


@dataclass
class LoggingConfig:
    """Console, ``metrics.jsonl`` and TensorBoard."""

    log_interval: int = 1
    """Print and write metrics every this many steps."""
    tensorboard: bool = True
    """Write TensorBoard scalars (needs the ``tensorboard`` package)."""
    tensorboard_dir: Optional[str] = None
    """Default: ``<checkpoint.save>/tensorboard``."""
    peak_tflops: Optional[float] = None
    """Per-device dense peak for MFU (default: looked up for known GPUs, e.g. H100 bf16 989; none on CPU)."""

    def __post_init__(self) -> None:
        _check_positive("logging", self, "log_interval")


@dataclass
class DeepSpeedConfig:
    """The DeepSpeed engine (``engine: deepspeed``): ZeRO data parallelism over the image set, TP = PP = 1. Read only
    when ``engine`` is ``deepspeed``; the rest of the run (optimizer, schedule, clipping, batch sizes, precision,
    checkpoint directory) comes from the other sections, as for the megatron engine."""

    zero_stage: int = 1
    """ZeRO stage: 1 (optimizer state sharded over data-parallel ranks), 2 (+ gradients), 3 (+ parameters, the
    frozen text model included)."""
    offload_optimizer: bool = False
    """ZeRO-Offload: fp32 optimizer state and the Adam step on the CPU (DeepSpeedCPUAdam, compiled on first use)."""
    offload_param: bool = False
    """Parameters on the CPU between uses (ZeRO-3 only)."""
    overlap_comm: bool = False
    """Overlap gradient reduction with backward (stages 2 and 3)."""
    reduce_bucket_size: int = 500_000_000
    """Elements per gradient-reduction bucket."""
    allgather_bucket_size: int = 500_000_000
    """Elements per parameter all-gather bucket (stages 1 and 2)."""

    def __post_init__(self) -> None:
        _check(self.zero_stage in (1, 2, 3), f"deepspeed.zero_stage must be 1, 2 or 3, got {self.zero_stage}")
        _check(not self.offload_param or self.zero_stage == 3,
               f"deepspeed.offload_param=true needs deepspeed.zero_stage=3, got {self.zero_stage}")
        _check_positive("deepspeed", self, "reduce_bucket_size", "allgather_bucket_size")


@dataclass
class Config:
    """Everything a training run reads. Build it with :func:`lmfusion.config_io.load_config`."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    """The loader's settings; its batch sizes are set from ``train``."""
    train: TrainConfig = field(default_factory=TrainConfig)
    optimizer: OptimConfig = field(default_factory=OptimConfig)
    # Placeholders so that Config() constructs; a run always names its base and run directory (load_config).
    init: InitConfig = field(default_factory=lambda: InitConfig(base_checkpoint=""))
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(save=""))
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    engine: Engine = "megatron"
    """Training engine: 'megatron' (megatron-core DDP + distributed optimizer; TP/PP/SP/DP) or 'deepspeed' (ZeRO
    stage ``deepspeed.zero_stage`` over data-parallel ranks only; needs the ``deepspeed`` package)."""
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)

    def __post_init__(self) -> None:
        # The loader's batch sizes are the trainer's (Megatron's train.* names are the ones users set).
        self.data = dataclasses.replace(self.data, micro_batch_size=self.train.micro_batch_size,
                                        global_batch_size=self.train.global_batch_size)
        par, model = self.parallel, self.model
        tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
        try:
            model.check_parallel(tp, pp * par.vpp)
        except ValueError as e:
            raise UserError(f"parallel: {e}" + (f" (pipeline {pp} x virtual {par.vpp} chunks)" if par.vpp > 1
                                                 else "")) from None
        _check(not par.sequence_parallel or self.data.seq_length % tp == 0,
               f"parallel.sequence_parallel: data.seq_length {self.data.seq_length} is not a multiple of "
               f"parallel.tensor_model_parallel_size {tp}")
        _check(not (par.overlap_grad_reduce and par.use_distributed_optimizer
                    and self.checkpoint.optimizer_sharding == "fully_reshardable"),
               "parallel.overlap_grad_reduce=true with checkpoint.optimizer_sharding=fully_reshardable: megatron-core "
               "0.16.1 writes a corrupt optimizer checkpoint with several grad buckets (Megatron-LM PR #5077); use "
               "checkpoint.optimizer_sharding=dp_reshardable or overlap_grad_reduce=false")
        _check(self.engine in ENGINES, f"engine must be one of {ENGINES}, got {self.engine!r}")
        if self.engine == "deepspeed":
            self._check_deepspeed()
        decay = self.optimizer.lr_decay_iters or self.train.train_iters
        _check(self.optimizer.lr_warmup_iters < decay,
               f"optimizer.lr_warmup_iters {self.optimizer.lr_warmup_iters} must be below the decay length {decay} "
               f"(optimizer.lr_decay_iters, default train.train_iters)")

    def _check_deepspeed(self) -> None:
        """What the DeepSpeed engine does not do, refused naming the key."""
        par = self.parallel
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size"):
            _check(getattr(par, name) == 1, f"engine=deepspeed needs parallel.{name}=1 (ZeRO is data-parallel "
                   f"only), got {getattr(par, name)}; use engine=megatron for tensor/pipeline parallelism")
        _check(par.vpp == 1, "engine=deepspeed: parallel.virtual_pipeline_model_parallel_size must be null or 1")
        _check(self.train.fp8 is None, f"engine=deepspeed: train.fp8={self.train.fp8!r} is megatron-only (Transformer "
               f"Engine); set train.fp8=null")
        _check(not self.checkpoint.async_save, "engine=deepspeed: checkpoint.async_save=true is megatron-only; set "
               "checkpoint.async_save=false")
        _check(not self.optimizer.trains_text, f"engine=deepspeed: optimizer.text_lr_ratio="
               f"{self.optimizer.text_lr_ratio} is megatron-only (the DeepSpeed engine trains and checkpoints the "
               f"image set); set it to 0")
        _check(not self.train.ema.enabled, "engine=deepspeed: train.ema.enabled=true is megatron-only (the EMA is "
               "sharded like megatron's distributed optimizer); set train.ema.enabled=false or engine=megatron")

    def data_parallel_size(self, world_size: int) -> int:
        """DP for ``world_size`` ranks; raises naming the keys when the layout does not fit."""
        par = self.parallel
        mp = par.tensor_model_parallel_size * par.pipeline_model_parallel_size
        _check(world_size % mp == 0, f"world size {world_size} is not a multiple of parallel.tensor_model_parallel_"
               f"size x parallel.pipeline_model_parallel_size = {mp}")
        dp = world_size // mp
        per_step = self.train.micro_batch_size * dp
        _check(self.train.global_batch_size % per_step == 0,
               f"train.global_batch_size {self.train.global_batch_size} is not a multiple of train.micro_batch_size "
               f"{self.train.micro_batch_size} x data-parallel size {dp}")
        return dp

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
