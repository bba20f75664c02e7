"""Shared benchmark helpers: a one-rank process group, interleaved median-of-N timing, and the training benchmarks'
config, micro-batches and optimizer step (the trainer's own pieces)."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Optional


def init_single_rank(device: Optional[str] = None) -> None:
    """One-rank process group + megatron model-parallel state (TP=PP=1), for layers that need parallel_state;
    ``device`` default: this rank's GPU when CUDA is available, else the CPU in megatron CPU mode
    (:func:`megatron_ext.device.init_distributed`)."""
    from megatron_ext.device import init_distributed

    init_distributed(device, tensor_model_parallel_size=1)


def time_interleaved(fns: dict[str, Callable[[], None]], reps: int, warmup: int = 1,
                     sync: Optional[Callable[[], None]] = None) -> dict[str, float]:
    """Median seconds per call of each fn, running them round-robin so drift hits all alike. ``sync`` (e.g.
    ``torch.cuda.synchronize``) is called before and after each timed call: GPU work is asynchronous."""
    sync = sync or (lambda: None)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            samples[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in samples.items()}


def train_config(*, vocab: int, hidden: int, ffn: int, layers: int, heads: int, kv_heads: int, seq: int,
                 image: dict[str, Any], global_batch: int, precision: str = "fp32", ema: bool = False):
    """A training config with random text weights (no base, no run directory) and one-row micro-batches."""
    from lmfusion.config_io import config_from_dict

    train: dict[str, Any] = {"micro_batch_size": 1, "global_batch_size": global_batch, "train_iters": 1000,
                             "precision": precision}
    if ema:
        train["ema"] = {"enabled": True}
    return config_from_dict({
        "model": {"vocab_size": vocab, "hidden_size": hidden, "ffn_hidden_size": ffn, "num_layers": layers,
                  "num_attention_heads": heads, "num_query_groups": kv_heads, "max_position_embeddings": seq,
                  "bos_token_id": 1, "eos_token_id": 2, "boi_token_id": 3, "eoi_token_id": 4,
                  "attention_backend": "sdpa", "linear_backend": "local", "image": image},
        "data": {"seq_length": seq, "num_workers": 0},
        "train": train,
        "optimizer": {"lr": 1e-4, "lr_warmup_iters": 0},
        "init": {"base_checkpoint": "none"}, "checkpoint": {"save": "none"},
        "logging": {"tensorboard": False}}, resolve_base=False)


def step_inputs(cfg, num_microbatches: int, dtype):
    """This data-parallel rank's noised synthetic micro-batches and the step's loss (token counts summed over DP, as
    the trainer does): ``(micro_batches, loss)``."""
    import itertools

    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from lmfusion.training.step import StepLoss, prepare_micro_batch
    from lmfusion.training.synthetic import synthetic_batches

    seq, rank, dp = cfg.data.seq_length, ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    batches = itertools.islice(synthetic_batches(cfg.model, seq, 1, seed=rank), num_microbatches)
    mbs = [prepare_micro_batch(b, seed=0, step=1, dp_rank=rank, index=i, device=torch.device("cpu"), dtype=dtype,
                               cap=cfg.train.image_first_max_timestep, diffusion=cfg.diffusion)
           for i, b in enumerate(batches)]
    counts = torch.tensor([sum(m.lm_tokens for m in mbs), sum(m.image_tokens for m in mbs)], dtype=torch.float64)
    dist.all_reduce(counts, group=ps.get_data_parallel_group())
    img = cfg.model.image
    return mbs, StepLoss(int(counts[0]), int(counts[1]), dp, len(mbs), cfg.train.diffusion_loss_weight,
                         img.patch_size * img.downsample_factor)


def optimizer_step(tm, micro_batches: list, loss, seq: int) -> Callable[[], None]:
    """One whole training step of ``tm`` (:class:`lmfusion.training.model_setup.TrainModel`) over ``micro_batches``:
    zero grads, megatron's forward-backward schedule, optimizer step, scheduler step."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        return model(mb.inputs), lambda out, mb=mb: loss(mb, out)

    def step() -> None:
        for chunk in tm.chunks:
            chunk.zero_grad_buffer()
        tm.optimizer.zero_grad()
        get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter(micro_batches),
                                    model=tm.chunks, num_microbatches=len(micro_batches), seq_length=seq,
                                    micro_batch_size=1, decoder_seq_length=seq, forward_only=False)
        tm.optimizer.step()
        tm.scheduler.step(increment=1)

    return step


def add_quickstart_shape_args(p) -> None:
    """The quickstart's shapes (SmolLM2-135M text, examples/configs/quickstart.yaml image I/O and batch) as flags."""
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--ffn", type=int, default=1536)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--global-batch", type=int, default=2, help="rows per step over all ranks (one per micro-batch)")
    p.add_argument("--threads", type=int, default=1, help="threads per rank (the quickstart: 2 ranks x 1)")


def quickstart_shape_config(args, precision: str, train: Optional[dict] = None, parallel: Optional[dict] = None):
    """A Config of the quickstart's shapes (random weights: no base) at ``precision``; ``train``/``parallel``: extra
    fields of those sections."""
    from lmfusion.config_io import config_from_dict

    return config_from_dict({
        "model": {"vocab_size": args.vocab, "hidden_size": args.hidden, "ffn_hidden_size": args.ffn,
                  "num_layers": args.layers, "num_attention_heads": args.heads, "num_query_groups": args.kv_heads,
                  "max_position_embeddings": args.seq, "bos_token_id": 1, "eos_token_id": 2, "boi_token_id": 3,
                  "eoi_token_id": 4, "attention_backend": "sdpa", "linear_backend": "local",
                  "image": {"latent_channels": 4, "latent_size": 8, "patch_size": 4, "kind": "unet",
                            "block_channels": [64, 64], "downsample": [False, False], "layers_per_block": 1,
                            "norm_groups": 16}},
        "parallel": {"use_distributed_optimizer": True, **(parallel or {})},
        "data": {"seq_length": args.seq, "num_workers": 0},
        "train": {"micro_batch_size": 1, "global_batch_size": args.global_batch, "train_iters": 1000,
                  "precision": precision, **(train or {})},
        "diffusion": {"objective": "flow", "timestep_density": "logit_normal"},
        "optimizer": {"lr": 1e-4, "lr_warmup_iters": 0},
        "init": {"base_checkpoint": "none"}, "checkpoint": {"save": "none"},
        "logging": {"tensorboard": False}}, resolve_base=False)


def init_data_parallel() -> None:
    """Megatron CPU mode; under torchrun every rank data parallel (as the quickstart), else one rank."""
    import os

    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_ext import cpu

    cpu.enable()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
        parallel_state.initialize_model_parallel(1, 1)
    else:
        init_single_rank("cpu")


def build_step(cfg, args, tm=None):
    """``(tm, step)``: the trainer's model/DDP/optimizer for ``cfg`` (built unless given) and one whole optimizer step
    (:func:`optimizer_step` over this rank's :func:`step_inputs`) as a closure."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from lmfusion.training.model_setup import build_train_model, params_dtype

    dp = ps.get_data_parallel_world_size()
    if args.global_batch % dp:
        raise SystemExit(f"--global-batch {args.global_batch} is not a multiple of the {dp} data-parallel ranks")
    model_parallel_cuda_manual_seed(cfg.train.seed)
    mbs, loss = step_inputs(cfg, args.global_batch // dp, params_dtype(cfg))
    tm = tm if tm is not None else build_train_model(cfg, None)
    return tm, optimizer_step(tm, mbs, loss, args.seq)
