"""Cost of the understanding path (frozen vision tower + projector forward) next to a training step, for VLM bases.

What it means. LLaVAFusion training reads latent shards only: no batch carries pixels, so the vision tower never runs
in training and its share of a training step is **0** (it runs at inference and evaluation: ``lmfusion chat``,
``eval lmms``). This benchmark measures what the share *would* be if understanding data with pixels were in the batch:
per packed row of a training step, one understanding image (LLaVA-NeXT anyres: 5 tiles, the most 2x2 pinpoints
give) through the frozen tower + projector, forward only under ``no_grad`` (the tower is frozen: no backward, no
activations kept), next to that row's share of a whole LMFusion training step (forward-backward + optimizer step)::

    share = vision_forward / (vision_forward + training_step / rows_per_step)

The image's placeholder positions and the row's text would replace other row positions (the row length is fixed), so
the step itself is taken as is.

* **FLOP model at the 8B shape** (LLaVA-NeXT-8B): CLIP ViT-L/14-336 (24 layers, hidden 1024, MLP 4096; 577 tokens a
  tile, every layer run: transformers' tower computes all layers, ``vision_feature_layer=-2`` picks one), the 2-layer
  GELU projector 1024 -> 4096 -> 4096 on every tile's 576 patch features, 5 tiles; the training row is one row of
  examples/configs/llama3_8b.yaml (Llama-3-8B, sequence 4096) packed by the trainer's own sequence builder and packer
  (:mod:`lmfusion.training.synthetic`), its FLOPs counted as implemented by :func:`lmfusion.training.flops.step_flops`.
* **Measured on the tiny CPU model**: the trainer's own pieces (megatron DDP + distributed optimizer + scheduler,
  megatron's schedule, the step's noising and loss; benchmarks/_common.py) on a tiny text model with random weights,
  against :class:`lmfusion.model.vision.VisionPath` (transformers' CLIP tower and LLaVA-NeXT projector, random
  weights) on one 5-tile image; medians of interleaved repetitions, one process. The same FLOP model is printed for
  the tiny shape, to compare.

Run (one process)::

    python benchmarks/vlm_understanding.py [--reps 5 --threads 1]

Printed: the FLOP model at 8B and at the tiny shape, the tiny model's median step and vision times, and last the
headline ``understanding_share_tiny_cpu``.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _common import init_single_rank, time_interleaved  # noqa: E402

TILES = 5  # anyres: the base tile + a 2x2 grid (the largest LLaVA-NeXT pinpoint grid of 4 tiles)


def llava_next_8b_config():
    """LLaVA-NeXT-8B's vision side (llava-hf/llama3-llava-next-8b-hf): CLIP ViT-L/14-336, Llama-3-8B width."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768)
    text = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256)
    return LlavaNextConfig(vision_config=vision, text_config=text, vision_feature_layer=-2,
                           image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]])


def tiny_config(text_hidden: int):
    """A tiny LLaVA-NeXT vision side (the tests' shape: 28 px tiles, 7 px patches); its 2x2 pinpoint gives 5 tiles."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                              image_size=28, patch_size=7, projection_dim=16)
    text = LlamaConfig(hidden_size=text_hidden, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=300)
    return LlavaNextConfig(vision_config=vision, text_config=text, image_grid_pinpoints=[[28, 56], [56, 28], [56, 56]])


def vision_flops(config, tiles: int = TILES) -> float:
    """Forward FLOPs of the tower (every layer) and the projector for one image of ``tiles`` tiles."""
    v, h_text = config.vision_config, config.text_config.hidden_size
    h, ffn, patches = v.hidden_size, v.intermediate_size, (v.image_size // v.patch_size) ** 2
    tokens = patches + 1  # + CLS
    embed = 2 * patches * 3 * v.patch_size ** 2 * h
    layer = tokens * (2 * 4 * h * h + 2 * 2 * h * ffn) + 2 * 2 * tokens * tokens * h  # QKVO + MLP; QK^T and AV
    projector = patches * 2 * (h * h_text + h_text * h_text)  # on every patch feature, before anyres packing
    return float(tiles * (embed + v.num_hidden_layers * layer + projector))


def row_step_flops(model_cfg, seq: int) -> float:
    """FLOPs of one packed training row (forward + backward as implemented), rows as the trainer packs them."""
    import itertools

    from lmfusion.training.flops import count_tokens, step_flops
    from lmfusion.training.synthetic import synthetic_batches

    rows = list(itertools.islice(synthetic_batches(model_cfg, seq, 1, seed=0), 8))
    counts = sum((count_tokens(b.modality_ids, b.document_ids) for b in rows[1:]),
                 count_tokens(rows[0].modality_ids, rows[0].document_ids))
    return step_flops(model_cfg, counts, as_implemented=True) / len(rows)


def flop_share(vision: float, row: float) -> float:
    return vision / (vision + row)


def main(argv=None) -> float:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--ffn", type=int, default=96)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=300)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--global-batch", type=int, default=2, help="rows per step (one per micro-batch)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from lmfusion.config_io import load_config

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    big = load_config(os.path.join(repo, "examples", "configs", "llama3_8b.yaml"), resolve_base=False)
    v8, r8 = vision_flops(llava_next_8b_config()), row_step_flops(big.model, big.data.seq_length)
    print(f"8B FLOP model: vision tower + projector forward, {TILES} tiles: {v8 / 1e12:.3f} TFLOP; one training row "
          f"(seq {big.data.seq_length}, forward + backward): {r8 / 1e12:.3f} TFLOP")
    print(f"understanding_share_8b_flops: {flop_share(v8, r8):.4f}")

    init_single_rank("cpu")
    from _common import build_step, train_config
    from lmfusion.model.vision import VisionPath

    cfg = train_config(vocab=args.vocab, hidden=args.hidden, ffn=args.ffn, layers=args.layers, heads=args.heads,
                       kv_heads=args.kv_heads, seq=args.seq, global_batch=args.global_batch,
                       image={"latent_channels": 4, "latent_size": 8, "patch_size": 4, "kind": "unet",
                              "block_channels": [64, 64], "downsample": [False, False], "layers_per_block": 1,
                              "norm_groups": 16})
    _, step = build_step(cfg, args)
    tiny = tiny_config(args.hidden)
    vision = VisionPath(tiny.to_dict())
    side = tiny.vision_config.image_size
    pixels = torch.randn(1, TILES, 3, side, side)  # (images, tiles, C, H, W): one image, base tile + 2x2 grid
    sizes = torch.tensor([[2 * side, 2 * side]])

    def vision_forward() -> None:
        with torch.no_grad():
            vision(pixels, sizes)

    tv, rt = vision_flops(tiny), row_step_flops(cfg.model, args.seq)
    print(f"tiny FLOP model: vision {tv / 1e6:.2f} MFLOP, one training row {rt / 1e6:.2f} MFLOP, share "
          f"{flop_share(tv, rt):.4f}")
    times = time_interleaved({"step": step, "vision": vision_forward}, reps=args.reps)
    per_row = times["step"] / args.global_batch
    share = times["vision"] / (times["vision"] + per_row)
    print(f"tiny model: hidden {args.hidden}, {args.layers} layers, seq {args.seq}, {args.global_batch} rows a step, "
          f"{args.threads} thread(s); CLIP {tiny.vision_config.num_hidden_layers} layers x "
          f"{tiny.vision_config.hidden_size}, {TILES} tiles of {side} px")
    print(f"step time median {times['step']:.4f} s ({per_row:.4f} s a row); vision forward median "
          f"{times['vision']:.5f} s")
    print(f"understanding_share_tiny_cpu: {share:.4f}")
    return share


if __name__ == "__main__":
    main()
