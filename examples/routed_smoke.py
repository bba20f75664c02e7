"""Smoke run of a modality-routed layer stack on megatron-core, through torchrun (README's main job for now).

What it shows, honestly: a stack of routed SwiGLU MLP blocks (routed RMSNorm + routed column/row parallel
linears; no attention yet — the full LMFusion model is a later issue) runs under tensor + sequence parallelism
on gloo ranks, matches an unsharded per-token reference, keeps the text weights frozen (no gradient, unchanged
after training) and trains the image weights: a toy regression loss on the image tokens goes down.

    torchrun --nproc_per_node 2 examples/routed_smoke.py [--layers 4 --hidden 64 --steps 30]

On a GPU machine every rank runs on its own GPU with NCCL (megatron_ext.device), on CPU with gloo.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_ext.device import init_distributed
from megatron_ext.routing import RoutingPlan
from megatron_ext.spec import routed_mlp_spec


def reference_stack(x, ids, weights, eps):
    """Per-token math on full tensors: both modalities computed, then selected (clear, independent of ours)."""
    img = ids.unsqueeze(-1) == 1
    for norm_w, fc1, fc2 in weights:
        x32 = x.float()
        xn = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        xn = torch.where(img, xn * norm_w[1], xn * norm_w[0])
        y = torch.where(img, F.linear(xn, fc1[1]), F.linear(xn, fc1[0]))
        gate, up = y.chunk(2, dim=-1)
        a = F.silu(gate) * up
        x = x + torch.where(img, F.linear(a, fc2[1]), F.linear(a, fc2[0]))
    return x


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--ffn", type=int, default=176)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--lr", type=float, default=3e-3)
    args = p.parse_args(argv)

    place, _ = init_distributed()  # cuda:LOCAL_RANK (NCCL), or CPU (gloo) with megatron's CPU mode; TP = world
    dev = place.device
    tp = dist.get_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    config = TransformerConfig(num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=args.ffn,
                               num_attention_heads=4, tensor_model_parallel_size=tp, sequence_parallel=tp > 1,
                               use_cpu_initialization=True, params_dtype=torch.float32, add_bias_linear=False,
                               gated_linear_unit=True, perform_initialization=False)

    # Full weights from one seed on every rank: text and image twins start equal (as LMFusion initialises them).
    gen = torch.Generator().manual_seed(0)
    full = []
    for _ in range(args.layers):
        norm = 1 + 0.1 * torch.randn(args.hidden, generator=gen)
        fc1 = torch.randn(2 * args.ffn, args.hidden, generator=gen) / args.hidden ** 0.5
        fc2 = torch.randn(args.hidden, args.ffn, generator=gen) / args.ffn ** 0.5
        norm, fc1, fc2 = norm.to(dev), fc1.to(dev), fc2.to(dev)
        full.append(((norm, norm.clone()), (fc1, fc1.clone()), (fc2, fc2.clone())))

    def chunk(t, dim):
        return t.chunk(tp, dim=dim)[rank].contiguous()

    stack = torch.nn.ModuleList(build_module(routed_mlp_spec("local"), config=config) for _ in range(args.layers))
    stack.to(dev)
    with torch.no_grad():
        for mlp, (norm, fc1, fc2) in zip(stack, full):
            for m, name in enumerate(("weight", "image_weight")):
                gate, up = fc1[m].chunk(2)
                getattr(mlp.pre_mlp_layernorm, name).copy_(norm[m])
                getattr(mlp.linear_fc1, name).copy_(torch.cat([chunk(gate, 0), chunk(up, 0)]))
                getattr(mlp.linear_fc2, name).copy_(chunk(fc2[m], 1))
    text_params = [mod.weight for mlp in stack for mod in (mlp.pre_mlp_layernorm, mlp.linear_fc1, mlp.linear_fc2)]
    for prm in text_params:
        prm.requires_grad_(False)
    text_before = [prm.detach().clone() for prm in text_params]

    # One micro-batch: a caption, then an image span, per sequence (s, b).
    ids = torch.zeros(args.seq, args.batch, dtype=torch.long, device=dev)
    ids[args.seq // 4: 3 * args.seq // 4] = 1
    plan = RoutingPlan.build(ids)
    x_full = torch.randn(args.seq, args.batch, args.hidden, generator=gen).to(dev)
    target_full = torch.randn(args.seq, args.batch, args.hidden, generator=gen).to(dev)
    x_local = chunk(x_full, 0) if config.sequence_parallel else x_full
    target = chunk(target_full, 0) if config.sequence_parallel else target_full
    img_local = plan.local_modality_ids(rank, tp).view(x_local.shape[:2]) if config.sequence_parallel else ids

    sp_shard = (rank, tp) if config.sequence_parallel else None

    def run(x):
        for mlp in stack:
            x = x + mlp(x, plan, sp_shard)  # the residual add is the layer's
        return x

    out = run(x_local)
    ref = reference_stack(x_full, ids, full, config.layernorm_epsilon)
    ref_local = chunk(ref, 0) if config.sequence_parallel else ref
    err = (out - ref_local).abs().max().detach()
    dist.all_reduce(err, op=dist.ReduceOp.MAX)

    trainable = [prm for prm in stack.parameters() if prm.requires_grad]
    opt = torch.optim.Adam(trainable, lr=args.lr)
    tp_group = parallel_state.get_tensor_model_parallel_group()
    losses = []
    for _ in range(args.steps):
        out = run(x_local)
        mask = (img_local == 1).unsqueeze(-1).float()
        local = (((out - target) ** 2) * mask).sum()
        count = mask.sum() * args.hidden
        stats = torch.stack([local.detach(), count])
        dist.all_reduce(stats, group=tp_group)  # SP: each rank holds a sequence shard
        (local / stats[1]).backward()
        for prm in trainable:  # finalize_model_grads' job for sequence-parallel (replicated) norm weights
            if getattr(prm, "sequence_parallel", False):
                if prm.grad is None:
                    prm.grad = torch.zeros_like(prm)
                dist.all_reduce(prm.grad, group=tp_group)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append((stats[0] / stats[1]).item())
    text_unchanged = all(torch.equal(a, b) for a, b in zip(text_before, text_params))
    no_text_grads = all(prm.grad is None for prm in text_params)
    if dist.get_rank() == 0:
        print(f"routed MLP stack: {args.layers} layers, TP={tp}, sequence_parallel={config.sequence_parallel}, "
              f"{plan.counts[0]} text + {plan.counts[1]} image tokens")
        print(f"max |sharded - unsharded reference| = {err.item():.2e}  (fp32; expect < 1e-5)")
        print(f"image-token loss: step 1 {losses[0]:.4f} -> step {len(losses)} {losses[-1]:.4f}")
        print(f"text weights unchanged bit for bit: {text_unchanged}; text weights got no gradient: {no_text_grads}")
    ok = err.item() < 1e-5 and losses[-1] < losses[0] and text_unchanged and no_text_grads
    dist.destroy_process_group()
    if not ok:
        raise SystemExit("routed smoke run FAILED")
    if parallel_state.get_tensor_model_parallel_rank() == 0 and rank == 0:
        print("routed smoke run OK")


if __name__ == "__main__":
    main()
