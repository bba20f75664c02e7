"""AdamW step on CPU: the per-tensor loop megatron gets without apex/TE vs torch's fused CPU kernel.

Without apex or Transformer Engine, megatron-core builds ``torch.optim.AdamW`` with default arguments, which on CPU
runs ``_single_tensor_adamw``; ``megatron_ext.cpu.fuse_adam`` (called by the trainer in CPU mode) switches the
param groups to ``fused=True``. The params are the image-side weights LMFusion trains on SmolLM2-135M (30 layers:
QKV 960x576, output 576x576, gated fc1 3072x576, fc2 576x1536, two norms), or ``--layers`` of them; both
optimizers step the same params and gradients, interleaved; then the fused params are checked against the loop's.

Printed: median seconds per step of each, and last the headline ``fused_over_loop`` (lower is better).

Usage: python benchmarks/cpu_adam.py [--layers 30 --reps 5 --threads 1]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> float:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--ffn", type=int, default=1536)
    p.add_argument("--kv", type=int, default=192, help="key/value width (3 KV heads of 64 in SmolLM2-135M)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="one rank's share of the quickstart's 2 cores")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from _common import time_interleaved

    from megatron_ext.cpu import fuse_adam

    h = args.hidden
    shapes = [(h + 2 * args.kv, h), (h, h), (2 * args.ffn, h), (h, args.ffn), (h,), (h,)] * args.layers
    g = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=g) * 0.02 for s in shapes]
    grads = [torch.randn(s, generator=g) * 1e-3 for s in shapes]

    def make():
        params = [torch.nn.Parameter(x.clone()) for x in init]
        for param, grad in zip(params, grads):
            param.grad = grad.clone()
        return params, torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)

    (loop_params, loop), (fused_params, fused) = make(), make()
    if fuse_adam(fused) != 1:
        raise SystemExit("fuse_adam did not switch the optimizer")
    times = time_interleaved({"loop": loop.step, "fused": fused.step}, reps=args.reps)
    worst = max(float((a - b).detach().abs().max()) for a, b in zip(loop_params, fused_params))
    n = sum(x.numel() for x in init)
    print(f"params: {n / 1e6:.1f}M in {len(shapes)} tensors, {args.threads} thread(s), "
          f"{args.reps + 1} steps each")
    print(f"step time loop   median {times['loop']:.4f} s")
    print(f"step time fused  median {times['fused']:.4f} s")
    print(f"max |fused - loop| after all steps: {worst:.2e}")
    ratio = times["fused"] / times["loop"]
    print(f"fused_over_loop: {ratio:.3f}")
    return ratio


if __name__ == "__main__":
    main()
