"""Training on a VLM base (LLaVAFusion) on 2 gloo ranks: the LMFusion recipe unchanged, on the same latent shards.

The pytest side writes a tiny random LLaVA-NeXT (tests/unit/test_hf_llava.py's config: CLIP tower, Llama LM) and its
processor, converts it with ``convert_hf`` and builds a shard set of random 8 x 8 images (identity VAE); the run is
``examples/configs/tiny_cpu.yaml`` with overrides. fp32.

Tolerances: image-module gradients at TP=2 vs the TP=1 run 1e-5 (the issue's bound; same weights and batch, only the
summation order differs); understanding logits before/after training and every frozen tensor: bit for bit; logits vs
HF's LlavaNextForConditionalGeneration 1e-4 (tests/distributed/workers/vlm.py).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state

from lmfusion.config_io import load_config
from lmfusion.model.model import ModelInputs
from lmfusion.training.model_setup import unwrap
from lmfusion.training.trainer import Trainer
from tests.distributed.harness import case, worker_main
from tests.distributed.workers.model import gather_vocab, grid, run_schedule, shared_tmpdir
from tests.distributed.workers.train import train as train_to_end
from tests.fixtures import TINY_CONFIG

GRAD_TOL = 1e-5
LOGIT_TOL = 1e-4
STEPS = 3
_TORCHRUN_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "MASTER_ADDR",
                 "MASTER_PORT", "TORCHELASTIC_RUN_ID")
@functools.lru_cache(maxsize=None)
def assets() -> dict[str, str]:
    """:func:`make_vlm_assets`' paths, built by the pytest side (``LMFUSION_VLM_SPEC``, a JSON file): the shard
    builder splits its work by the torchrun ranks it finds in the environment."""
    return json.loads(Path(os.environ["LMFUSION_VLM_SPEC"]).read_text())


def config(run_dir: Path, *overrides: str):
    a = assets()
    return load_config(TINY_CONFIG, [f"init.base_checkpoint={a['base']}", f"data.datasets=[{a['shards']}]",
                                     f"checkpoint.save={run_dir}", *overrides])


class GradCapture(Trainer):
    """Keeps every trainable parameter's reduced gradient (megatron DDP's ``main_grad``) of the first step."""

    grads: dict[str, torch.Tensor] | None = None

    def forward_backward_step(self, micro_batches):
        out = super().forward_backward_step(micro_batches)
        if self.grads is None:
            self.grads = {n: p.main_grad.detach().clone() for c in self.tm.chunks
                          for n, p in unwrap(c).named_parameters() if p.requires_grad}
        return out


def train(cfg) -> GradCapture:
    return train_to_end(cfg, GradCapture)


def question_inputs(processor, size=(70, 40)) -> dict:
    from PIL import Image

    pixels = np.random.default_rng(sum(size)).integers(0, 256, (*size, 3), dtype=np.uint8)
    return processor(images=Image.fromarray(pixels), text="<image> w1 w2 w3", return_tensors="pt")


def understanding_logits(ckpt: str | Path, inputs) -> tuple[torch.Tensor, torch.nn.Module]:
    """Full-vocabulary logits (b, s, V) of an image + question through ``load_for_inference(ckpt)`` at the current
    TP size, via megatron's schedule."""
    from lmfusion.inference.load import load_for_inference

    model = load_for_inference(ckpt, device="cpu").model
    tokens = inputs["input_ids"]
    batch = ModelInputs(tokens=tokens, document_ids=torch.zeros_like(tokens), pixel_values=inputs["pixel_values"],
                        image_sizes=inputs["image_sizes"])
    with torch.no_grad():
        logits = run_schedule(model, batch, None, forward_only=True)["logits"]
    return gather_vocab(logits)[..., : model.model_config.vocab_size].transpose(0, 1), model


def _tp_shard(full: torch.Tensor, param: torch.Tensor, tp: int) -> torch.Tensor:
    """This TP rank's part of a full (TP=1) tensor, as megatron shards ``param`` (partition dim and stride)."""
    if not getattr(param, "tensor_model_parallel", False) or tp == 1:
        return full
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    chunks = full.chunk(tp * stride, dim=dim)
    rank = parallel_state.get_tensor_model_parallel_rank()
    return torch.cat([chunks[s * tp + rank] for s in range(stride)], dim=dim)


@case
def tp2_training_keeps_the_understanding_path_bitwise():
    """TP=2, 3 steps on latent shards from a VLM base: image-module gradients of step 1 equal the TP=1 run's (1e-5);
    the training model holds no vision tensor (no grads, optimizer state or DP reduction for it) and its checkpoint
    none either; afterwards every text weight equals the base's and every vision-tower / projector / newline tensor
    loaded for the run equals HF's, bit for bit; the understanding logits on an image + question equal the base's
    bit for bit (and HF's to 1e-4) while the image set did train."""
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    from lmfusion.hf import load_base_state
    from lmfusion.model.builder import build_model

    a = assets()
    common = ("parallel.use_distributed_optimizer=false",  # every rank holds the whole reduced gradient
              f"checkpoint.save_interval={STEPS}")
    ref = train(config(shared_tmpdir(), "train.train_iters=1", *common))
    ref_grads = ref.grads
    ref.close()
    run_dir = shared_tmpdir()
    trainer = train(config(run_dir, f"train.train_iters={STEPS}", "parallel.tensor_model_parallel_size=2", *common))
    errors = []
    try:
        model = unwrap(trainer.tm.chunks[0])
        names = [n for n, _ in model.named_parameters()]
        if any(n.startswith("vision.") for n in names) or getattr(model, "vision", None) is not None:
            errors.append("the training model holds the vision tower")
        if set(trainer.grads) != {n for n, p in model.named_parameters() if p.requires_grad} or not trainer.grads:
            errors.append("captured gradients are not the trainable set")
        for name, param in model.named_parameters():
            if param.requires_grad:
                err = (trainer.grads[name] - _tp_shard(ref_grads[name], param, 2)).abs().max().item()
                if err > GRAD_TOL:
                    errors.append(f"{name}: step-1 gradient differs from the TP=1 run's by {err:.2e}")
        cfg = trainer.cfg
        _, base = load_base_state(cfg.init.base_checkpoint)
        with base:
            fresh = build_model(cfg.model, base=base)
        want = dict(fresh.named_parameters())
        text = [(n, p) for n, p in model.named_parameters() if not p.requires_grad]
        changed = [n for n, p in text if not torch.equal(p, want[n])]
        if not text or changed:
            errors.append(f"{len(changed)} of {len(text)} text weights differ from the base: {changed[:3]}")
        moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, want[n])]
        if not moved:
            errors.append("no image parameter moved: the run did not train")
    finally:
        trainer.close()
    iter_dir = Path(run_dir) / f"iter_{STEPS:07d}"
    saved = dist_checkpointing.load_plain_tensors(str(iter_dir))
    if any("vision" in k or "multi_modal_projector" in k or "image_newline" in k for k in saved):
        errors.append("the training checkpoint holds vision tensors")
    record = json.loads((iter_dir / "lmfusion_checkpoint.json").read_text())
    if "vision.safetensors" not in record.get("base_files", {}):
        errors.append("the run record does not pin the base's vision weights")

    hf_model = LlavaNextForConditionalGeneration.from_pretrained(a["hf"]).eval()
    inputs = question_inputs(AutoProcessor.from_pretrained(a["hf"]))
    grid(2, 1)
    before, _ = understanding_logits(a["base"], inputs)
    after, loaded = understanding_logits(run_dir, inputs)
    if not torch.equal(before, after):
        errors.append(f"understanding logits changed by {(before - after).abs().max().item():.2e}")
    with torch.no_grad():
        err = (after - hf_model(**inputs).logits).abs().max().item()
    if err > LOGIT_TOL:
        errors.append(f"understanding logits differ from HF's by {err:.2e}")
    hf_parts = {"vision_tower": hf_model.model.vision_tower,
                "multi_modal_projector": hf_model.model.multi_modal_projector}
    for part, module in hf_parts.items():
        ours = getattr(loaded.vision, part).state_dict()
        theirs = module.state_dict()
        if ours.keys() != theirs.keys() or not all(torch.equal(ours[k], theirs[k]) for k in ours):
            errors.append(f"{part}: tensors differ from HF's")
    if not torch.equal(loaded.vision.image_newline, hf_model.model.image_newline):
        errors.append("image_newline differs from HF's")
    if errors:
        raise AssertionError("\n".join(errors[:30]))


@case
def vlm_run_resumes_bit_exact_and_exports():
    """A run on a VLM base resumes like any run (1 + 1 steps = 2 straight, bit for bit); its export copies the base
    whole (vision weights, vlm_config.json, processor files) and answers through the understanding path with the same
    logits as the run directory."""
    from transformers import AutoProcessor

    from lmfusion.hf.llava import VLM_CONFIG, base_kind

    a = assets()
    straight = train(config(shared_tmpdir(), "train.train_iters=2", "checkpoint.save_interval=1"))
    want = [h["loss"] for h in straight.history]
    straight.close()
    run_dir = shared_tmpdir()
    got = []
    for iters in (1, 2):
        t = train(config(run_dir, f"train.train_iters={iters}", "checkpoint.save_interval=1"))
        got += [h["loss"] for h in t.history]
        t.close()
    assert got == want, f"resumed losses {got} != straight {want}"

    out = Path(shared_tmpdir()) / "export"
    if dist.get_rank() == 0:  # the command line, in a process of its own (one rank, not this torchrun group)
        env = {k: v for k, v in os.environ.items() if k not in _TORCHRUN_ENV}
        proc = subprocess.run([sys.executable, "-m", "lmfusion.cli", "export-ckpt", str(run_dir), "--output",
                               str(out)], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    dist.barrier()
    base = out / "base"
    assert base_kind(base) == "vlm" and (base / VLM_CONFIG).is_file() and (base / "vision.safetensors").is_file()
    for name in json.loads((Path(a["base"]) / "conversion.json").read_text())["processor_files"]:
        assert (base / name).read_bytes() == (Path(a["base"]) / name).read_bytes(), name
    inputs = question_inputs(AutoProcessor.from_pretrained(base))
    grid(dist.get_world_size(), 1)
    from_run, _ = understanding_logits(run_dir, inputs)
    from_export, _ = understanding_logits(out, inputs)
    assert torch.equal(from_run, from_export)


if __name__ == "__main__":
    worker_main()
