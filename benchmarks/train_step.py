"""One LMFusion training step with the text frozen vs the same model with everything trainable, same batch.

Both variants run the trainer's own pieces (lmfusion.training): megatron DDP + distributed optimizer + the
OptimizerParamScheduler, megatron's forward-backward schedule, the step's noising and loss. The batch is packed by
the loader's sequence builder and packer (80/20 caption-first, 10% caption dropout, captions of 8-40 tokens: the
length range of COCO/CC-style captions in Llama-3 tokens) with random token ids and latents; both variants see the
same micro-batches. Timing: median of interleaved repetitions of a whole optimizer step.

Printed: the measured time ratio frozen / everything-trainable; the FLOP model's prediction of that ratio for the
batch's actual token classes (lmfusion.training.flops's 6n / 4n / 2n rule: no backward through text
that precedes every image of its document, whose data gradient the routed GEMMs skip); the prediction "as
implemented" (autograd still runs attention's backward for that text and the LM head's GEMMs on every position);
and last, the headline ``measured_over_predicted`` (target <= 1.05). Neither prediction counts the optimizer step
(AdamW over 3-4x more parameters when everything trains) or the dense embedding gradient of the trainable baseline:
both make the measured ratio lower than the FLOP ratio.

Usage: python benchmarks/train_step.py [--hidden 768 --layers 4 --seq 1024 --reps 3 --threads N]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config(args):
    from _common import train_config

    heads = args.hidden // 64
    return train_config(vocab=args.vocab, hidden=args.hidden, ffn=args.ffn, layers=args.layers, heads=heads,
                        kv_heads=max(1, heads // 2), seq=args.seq, global_batch=args.micro_batches,
                        image={"latent_channels": 4, "latent_size": args.latent, "patch_size": 2, "kind": "unet",
                               "block_channels": [64, 128], "downsample": [False, False], "layers_per_block": 1,
                               "norm_groups": 32})


def main(argv=None) -> float:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--ffn", type=int, default=2048)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--latent", type=int, default=16, help="latent side (tokens per image = (latent/2)^2)")
    p.add_argument("--micro-batches", type=int, default=2, help="micro-batches (of one row) per step")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from _common import init_single_rank

    init_single_rank("cpu")  # megatron CPU mode
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from _common import optimizer_step, step_inputs
    from lmfusion.training import flops
    from lmfusion.training.model_setup import build_train_model

    cfg = _config(args)
    model_parallel_cuda_manual_seed(cfg.train.seed)
    mbs, loss = step_inputs(cfg, args.micro_batches, torch.float32)
    counts = sum((mb.counts for mb in mbs), flops.TokenCounts())

    variants = {name: build_train_model(cfg, None, train_text=train_text)
                for name, train_text in (("frozen", False), ("all_trainable", True))}
    trainable = {k: sum(p.numel() for c in v.chunks for p in c.parameters() if p.requires_grad)
                 for k, v in variants.items()}
    steps = {name: optimizer_step(tm, mbs, loss, args.seq) for name, tm in variants.items()}

    times: dict[str, list[float]] = {k: [] for k in variants}
    for step in steps.values():  # warm-up
        step()
    for _ in range(args.reps):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}

    measured = med["frozen"] / med["all_trainable"]
    all_flops = flops.step_flops(cfg.model, counts, "all_trainable")
    predicted = flops.step_flops(cfg.model, counts, "lmfusion") / all_flops
    implemented = (flops.step_flops(cfg.model, counts, "lmfusion", as_implemented=True)
                   / flops.step_flops(cfg.model, counts, "all_trainable", as_implemented=True))
    total = counts.tokens
    print(f"model: hidden {args.hidden}, ffn {args.ffn}, {args.layers} layers, vocab {args.vocab}, seq {args.seq}, "
          f"{tokens_per_image(cfg)} tokens/image; {args.micro_batches} micro-batches; {args.threads} threads")
    print(f"batch: image {counts.image / total:.1%}, text after an image {counts.text_on / total:.1%}, text before "
          f"any image (incl. padding) {counts.text_off / total:.1%}; {counts.images} images")
    print(f"trainable parameters: frozen text {trainable['frozen']:,}, everything {trainable['all_trainable']:,}")
    for k in variants:
        print(f"step time {k:<14} median {med[k]:.3f} s  ({', '.join(f'{t:.3f}' for t in times[k])})")
    print(f"measured_ratio (frozen / all trainable): {measured:.4f}")
    print(f"predicted_ratio (FLOP model, 6n/4n/2n rule): {predicted:.4f}")
    print(f"predicted_ratio_as_implemented (attention backward for pre-image text, LM head on every position): "
          f"{implemented:.4f}")
    print(f"measured_over_as_implemented: {measured / implemented:.4f}")
    print(f"measured_over_predicted: {measured / predicted:.4f}")
    return measured / predicted


def tokens_per_image(cfg) -> int:
    from lmfusion.model.image_io import tokens_per_image as tpi

    return tpi(cfg.model.image)


if __name__ == "__main__":
    main()
