"""Cost of ``train.ema``: one EMA update over one training step, on the quickstart's shape.

The model is the quickstart's (SmolLM2-135M-Instruct's shape: hidden 576, FFN 1536, 30 layers, 9 heads, 3 KV heads,
vocabulary 49,152; text frozen, random weights; the quickstart's U-Net image I/O on 4 x 8 x 8 latents; sequence 128;
global batch 2 of one row), built by the trainer's own pieces (lmfusion.training: megatron DDP + distributed
optimizer + scheduler, megatron's schedule, the step's noising and loss). A step is forward-backward + optimizer
step; the update is :meth:`lmfusion.training.ema.ShardedEMA.update` (``torch._foreach_lerp_`` over this rank's shard
of the fp32 main parameters). Timing: medians of interleaved repetitions.

Run it as the quickstart runs, 2 data-parallel ranks on 2 cores (each rank averages half of the image set and runs
one micro-batch), or in one process (all of both)::

    torchrun --nproc_per_node 2 benchmarks/ema.py [--reps 5]
    python benchmarks/ema.py [--reps 5 --threads 2]

Printed: the trainable and averaged element counts, the median step and update times (rank 0's), and last the
headline ``ema_update_over_step`` (target <= 0.02).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _common import add_quickstart_shape_args, init_data_parallel  # noqa: E402


def _config(args):
    from _common import train_config

    return train_config(vocab=args.vocab, hidden=args.hidden, ffn=args.ffn, layers=args.layers, heads=args.heads,
                        kv_heads=args.kv_heads, seq=args.seq, global_batch=args.global_batch, precision=args.precision,
                        ema=True, image={"latent_channels": 4, "latent_size": 8, "patch_size": 4, "kind": "unet",
                                         "block_channels": [64, 64], "downsample": [False, False],
                                         "layers_per_block": 1, "norm_groups": 16})


def main(argv=None) -> float:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_quickstart_shape_args(p)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    init_data_parallel()
    import torch.distributed as dist

    from _common import build_step, time_interleaved
    from lmfusion.training.ema import ShardedEMA

    cfg = _config(args)
    tm, step = build_step(cfg, args)
    ema = ShardedEMA(cfg.train.ema, tm.chunks, tm.optimizer)

    times = time_interleaved({"step": step, "ema": ema.update}, reps=args.reps)
    trainable = sum(p.numel() for c in tm.chunks for p in c.parameters() if p.requires_grad)
    ratio = times["ema"] / times["step"]
    if dist.get_rank() == 0:
        dp = dist.get_world_size()  # every rank data parallel
        n_mb = args.global_batch // dp
        print(f"model: hidden {args.hidden}, ffn {args.ffn}, {args.layers} layers, vocab {args.vocab}, seq "
              f"{args.seq}; {dp} data-parallel rank(s) x {args.threads} thread(s), {n_mb} micro-batch(es) each, "
              f"{args.precision}")
        print(f"trainable elements {trainable:,}; averaged on this rank {ema.numel:,} (distributed-optimizer shard: "
              f"{ema.sharded})")
        print(f"step time median {times['step']:.4f} s; EMA update median {times['ema']:.5f} s")
        print(f"ema_update_over_step: {ratio:.4f}")
    return ratio


if __name__ == "__main__":
    main()
