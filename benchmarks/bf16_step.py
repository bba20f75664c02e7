"""Step time of bf16 training over fp32 on the CPU, quickstart shape, measured in one run.

The model and batch are the quickstart's (benchmarks/_common.py: SmolLM2-135M's shape, text frozen, random weights,
the quickstart's U-Net image I/O, sequence 128, global batch 2 of one row), built by the trainer's own pieces
(megatron DDP + distributed optimizer + scheduler, megatron's schedule, the step's noising and loss). Variants, all in
one process and timed interleaved (medians), so that load on the machine hits them alike:

* ``fp32``: ``train.precision=fp32``;
* ``bf16_fp32_reduce``: ``train.precision=bf16``: bf16 parameters and activations (megatron's ``Float16Module``), fp32
  main weights, optimizer state and loss math; gradients accumulated and reduced over DP in fp32 (megatron's default);
* ``bf16``: the same with ``parallel.grad_reduce_in_fp32=false``: gradient buffer and DP reduce-scatter in bf16 (half
  the bytes over gloo), the optimizer's main gradients still fp32.

``--profile`` adds a ``torch.profiler`` breakdown of one step per variant: the top operators by self CPU time and the
share of the step in GEMMs, attention, convolutions (the U-Net), communication, casts/copies, the optimizer and the rest.

Run it as the quickstart runs (2 data-parallel ranks on 2 cores) or in one process::

    torchrun --nproc_per_node 2 benchmarks/bf16_step.py [--reps 5] [--profile]
    python benchmarks/bf16_step.py [--reps 5 --threads 2]

bf16 only pays off on a CPU with bf16 matrix instructions (AMX-BF16 / AVX512-BF16: ``lmfusion.training.model_setup.
cpu_bf16_matmul``); elsewhere torch emulates bf16 GEMMs far slower than fp32 and the ratio is > 1. Printed: the
CPU's bf16 instructions, the median step per variant (rank 0's), ``bf16_fp32_reduce_over_fp32``, and last
``bf16_over_fp32: X`` (the ``bf16`` variant; target <= 0.5).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _common import (add_quickstart_shape_args, build_step, init_data_parallel,  # noqa: E402
                     quickstart_shape_config, time_interleaved)

# Operator name -> category of the profile breakdown (first match wins; names as torch.profiler reports them).
CATEGORIES = (
    ("gemm", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::linear", "aten::matmul")),
    ("attention", ("scaled_dot_product", "attention")),
    ("convolution", ("conv",)),
    # gloo runs collectives on its own threads: on the calling thread they show as c10d/gloo ops, clones of their
    # buffers (cast/copy) and waiting (in the step's wall time, not in any operator's self CPU time)
    ("communication", ("gloo", "c10d", "all_reduce", "reduce_scatter", "all_gather", "broadcast")),
    ("cast/copy", ("aten::copy_", "aten::to", "aten::_to_copy", "aten::clone", "aten::contiguous", "aten::cat",
                   "aten::index", "aten::index_select", "aten::gather", "aten::scatter")),
    ("optimizer", ("adam", "_foreach", "clip", "norm")),
)


def _category(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k.lower() in low for k in keys):
            return cat
    return "other"


def profile(step, top: int) -> tuple[float, dict[str, float], list[tuple[str, float]]]:
    """One profiled step: (total self CPU seconds, seconds per category, top operators by self CPU seconds)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    per_op = [(e.key, e.self_cpu_time_total / 1e6) for e in prof.key_averages()]
    total = sum(t for _, t in per_op)
    cats: dict[str, float] = defaultdict(float)
    for name, t in per_op:
        cats[_category(name)] += t
    return total, dict(cats), sorted(per_op, key=lambda x: -x[1])[:top]


def main(argv=None) -> float:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_quickstart_shape_args(p)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--variants", default="fp32,bf16_fp32_reduce,bf16",
                   help="comma-separated subset to run (the ratios need fp32 and the bf16 variant they name)")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler breakdown of one step per variant")
    p.add_argument("--top", type=int, default=12, help="operators listed per profiled variant")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    init_data_parallel()
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from lmfusion.training.model_setup import cpu_bf16_matmul

    chosen = args.variants.split(",")
    known = ("fp32", "bf16_fp32_reduce", "bf16")
    if set(chosen) - set(known) or "fp32" not in chosen or not {"bf16", "bf16_fp32_reduce"} & set(chosen):
        p.error(f"--variants {args.variants!r}: expected fp32 and at least one of bf16, bf16_fp32_reduce "
                f"(from {', '.join(known)}): a ratio needs both sides")
    steps = {}
    for name, precision, parallel in (("fp32", "fp32", {}), ("bf16_fp32_reduce", "bf16", {}),
                                      ("bf16", "bf16", {"grad_reduce_in_fp32": False})):
        if name not in chosen:
            continue
        cfg = quickstart_shape_config(args, precision, parallel=parallel)
        steps[name] = build_step(cfg, args)[1]
    times = time_interleaved(steps, reps=args.reps)
    profiles = {name: profile(step, args.top) for name, step in steps.items()} if args.profile else {}
    headline = "bf16" if "bf16" in times else "bf16_fp32_reduce"
    ratio = times[headline] / times["fp32"]
    if dist.get_rank() == 0:
        dp = ps.get_data_parallel_world_size()
        print(f"model: hidden {args.hidden}, ffn {args.ffn}, {args.layers} layers, vocab {args.vocab}, seq "
              f"{args.seq}; {dp} data-parallel rank(s) x {args.threads} thread(s), global batch {args.global_batch}")
        print(f"CPU bf16 matrix instructions: {cpu_bf16_matmul() or 'none (bf16 GEMMs are emulated)'}")
        for name, (total, cats, top) in profiles.items():
            shares = ", ".join(f"{c} {t / total:.1%}" for c, t in sorted(cats.items(), key=lambda x: -x[1]))
            print(f"profile {name}: {total:.3f} s self CPU (the rest of the step's wall time is waiting: "
                  f"communication, other processes); {shares}")
            for op, t in top:
                print(f"    {op:<48} {t:8.4f} s  {t / total:6.1%}  [{_category(op)}]")
        for name, t in times.items():
            print(f"step time {name:<16} median {t:.4f} s")
        if headline == "bf16" and "bf16_fp32_reduce" in times:
            print(f"bf16_fp32_reduce_over_fp32: {times['bf16_fp32_reduce'] / times['fp32']:.4f}")
        print(f"{headline}_over_fp32: {ratio:.4f}")
    return ratio


if __name__ == "__main__":
    main()
