"""Routed column+row pair vs a dense megatron pair vs compute-both-then-select: forward+backward time.

All three see the same tokens and do the same work per token except as noted:
  dense   megatron ColumnParallelLinear + RowParallelLinear holding one modality's weights (the floor: what a
          text-only Llama layer costs)
  routed  ModalityColumnParallelLinear + ModalityRowParallelLinear, tokens routed by a RoutingPlan (fc1 output
          stays grouped into fc2, as in RoutedMLP)
  select  both modalities' weights applied to every token, then torch.where (what masking-based ports do)
Everything is trainable (same GEMM count as dense). A frozen-text routed pair is reported too (no text weight
gradient GEMM: faster than dense by the text share of the weight-gradient work).

Usage: python benchmarks/routed_linear.py [--hidden 2048 --ffn 5632 --tokens 4096 --reps 3]
       python benchmarks/routed_linear.py --device cuda --dtype bf16 --hidden 4096 --ffn 7168 --tokens 8192
           (the 8B layer at TP=2: fc2's local input is 14336 / 2; scripts/gpu_check.sh runs this)
Last line: routed_over_dense: <max ratio over the mixes>   (target <= 1.08 on CPU)
TFLOP/s columns count the pair's fwd+bwd GEMMs (3 x 2 x 2 n h f; frozen-text rows skip the text weight gradients).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import init_single_rank, time_interleaved  # noqa: E402


def main(argv=None) -> float:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=5632)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--device", default="cpu", help="cpu | cuda (layers built on the host, then moved)")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    sync = torch.cuda.synchronize if device.type == "cuda" else None

    init_single_rank(args.device)
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from megatron_ext.linear import ModalityColumnParallelLinear, ModalityRowParallelLinear
    from megatron_ext.routing import RoutingPlan

    h, f, n = args.hidden, args.ffn, args.tokens
    cfg = ModelParallelConfig(use_cpu_initialization=True, params_dtype=torch.float32)
    init = lambda w: torch.nn.init.normal_(w, std=0.02)  # noqa: E731
    dense_col = ColumnParallelLinear(h, f, config=cfg, init_method=init, bias=False)
    dense_row = RowParallelLinear(f, h, config=cfg, init_method=init, bias=False, input_is_parallel=True,
                                  skip_bias_add=False)
    col = ModalityColumnParallelLinear(h, f, config=cfg, init_method=init, bias=False)
    row = ModalityRowParallelLinear(f, h, config=cfg, init_method=init, bias=False, input_is_parallel=True,
                                    skip_bias_add=False)
    frozen_col = ModalityColumnParallelLinear(h, f, config=cfg, init_method=init, bias=False)
    frozen_row = ModalityRowParallelLinear(f, h, config=cfg, init_method=init, bias=False, input_is_parallel=True,
                                           skip_bias_add=False)
    frozen_col.weight.requires_grad_(False)
    frozen_row.weight.requires_grad_(False)
    for mod in (dense_col, dense_row, col, row, frozen_col, frozen_row):
        mod.to(device=device, dtype=dtype)
    x = torch.randn(n, 1, h).to(device=device, dtype=dtype)
    gen = torch.Generator().manual_seed(0)

    def zero_grads():
        for mod in (dense_col, dense_row, col, row, frozen_col, frozen_row):
            for prm in mod.parameters():
                prm.grad = None

    def dense_step():
        xi = x.clone().requires_grad_(True)
        hdn, _ = dense_col(xi)
        out, _ = dense_row(F.gelu(hdn))
        out.sum().backward()
        zero_grads()

    def routed_step(c, r, plan):
        xi = x.clone().requires_grad_(True)
        hdn, _ = c(xi, plan, keep_grouped=True)
        out, _ = r(F.gelu(hdn), plan, input_grouped=True)
        out.sum().backward()
        zero_grads()

    def select_step(ids):
        xi = x.clone().requires_grad_(True)
        img = (ids == 1).view(n, 1, 1)
        hdn = torch.where(img, F.linear(xi, col.image_weight), F.linear(xi, col.weight))
        a = F.gelu(hdn)
        out = torch.where(img, F.linear(a, row.image_weight), F.linear(a, row.weight))
        out.sum().backward()
        zero_grads()

    rows = []
    worst = 0.0
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"# h={h} ffn={f} tokens={n} {args.dtype} on {where} reps={args.reps} (median s, fwd+bwd)")
    print("| text/image | dense | routed | routed frozen-text | select | routed/dense | frozen/dense | select/dense "
          "| routed TFLOP/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    flops = 12.0 * n * h * f  # two GEMMs, fwd (2nhf each) + dgrad + wgrad
    for text_frac in (0.5, 0.8):
        ids = (torch.rand(n, 1, generator=gen) >= text_frac).long().to(device)  # random order: worst for locality
        plan = RoutingPlan.build(ids)
        t = time_interleaved({
            "dense": dense_step,
            "routed": lambda: routed_step(col, row, plan),
            "frozen": lambda: routed_step(frozen_col, frozen_row, plan),
            "select": lambda: select_step(ids),
        }, reps=args.reps, sync=sync)
        ratio = t["routed"] / t["dense"]
        worst = max(worst, ratio)
        mix = f"{round(100 * text_frac)}/{round(100 * (1 - text_frac))}"
        rows.append(mix)
        print(f"| {mix} | {t['dense']:.3f} | {t['routed']:.3f} | {t['frozen']:.3f} | {t['select']:.3f} "
              f"| {ratio:.3f} | {t['frozen'] / t['dense']:.3f} | {t['select'] / t['dense']:.3f} "
              f"| {flops / t['routed'] / 1e12:.3g} |")
    print(f"routed_over_dense: {worst:.3f}")
    return worst


if __name__ == "__main__":
    main()
