"""``model.separation`` and ``optimizer.text_lr_ratio`` on 2 gloo ranks.

* Model level (the tiny converted Llama of ``workers/model.py``): with the text set trainable, loss and *every*
  gradient (text and image) at TP=2, TP=2+SP and PP=2 equal the TP=PP=1 model's, for each separation (1e-5, the
  tolerance of ``workers/model.py``: only summation order differs).
* Trainer level (``LMFUSION_TRAIN_SPEC``: the tiny base and shards of ``tests/distributed/test_train.py``): a run with
  ``text_lr_ratio`` > 0 trains the text set (moved from the base, base directory untouched), checkpoints it with its
  optimizer state, resumes bit for bit; TP=2, PP=2 (tied embeddings: the head copy stays equal to the embedding) and
  DP=2 give the same step-1 loss; resuming with another separation or text setting is a one-line error.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state

from lmfusion.errors import UserError
from lmfusion.model.builder import build_model
from lmfusion.model.weights import is_image_param
from lmfusion.training import checkpointing as ckpt
from lmfusion.training.model_setup import unwrap
from lmfusion.training.trainer import Trainer
from megatron_ext.spec import SEPARATIONS
from tests.distributed.harness import case, worker_main
from tests.distributed.workers.megatron_common import shared_tmpdir
from tests.distributed.workers.model import (
    GRAD_TOL,
    _global_name,
    converted,
    grid,
    last_stage,
    loss_of,
    mixed_inputs,
    run_schedule,
)
from tests.distributed.workers.engine_cases import tree_digest
from tests.distributed.workers.train import PARITY_TOL, config, losses, train
from tests.fixtures import make_tiny_assets

RATIO = 0.5


def _full_grads(cfg, base, inputs, extra):
    grid(1, 1)
    model = build_model(cfg, base=base, train_text=True)
    loss = loss_of(model(inputs), extra)
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _local_ref(ref: torch.Tensor, param: torch.Tensor, tp: int, tp_rank: int) -> torch.Tensor:
    if getattr(param, "tensor_model_parallel", False) and tp > 1:
        dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
        if ref.shape[dim] != param.shape[dim] * tp:  # the vocabulary is padded to a multiple of 128 x tp
            pad = list(ref.shape)
            pad[dim] = param.shape[dim] * tp - ref.shape[dim]
            ref = torch.cat([ref, ref.new_zeros(pad)], dim=dim)
        chunks = ref.chunk(tp * stride, dim=dim)
        ref = torch.cat([chunks[s * tp + tp_rank] for s in range(stride)], dim=dim)
    return ref


@case
def text_training_grads_match_tp1_at_tp2_sp_and_pp2():
    world = dist.get_world_size()
    _, base_cfg, base = converted("gqa_untied")
    errors = []
    for separation in SEPARATIONS:
        cfg = dataclasses.replace(base_cfg, separation=separation)
        inputs, extra = mixed_inputs(cfg)
        ref_loss, ref_grads = _full_grads(cfg, base, inputs, extra)
        text_in_ref = [n for n in ref_grads if not is_image_param(n)]
        if not text_in_ref:
            errors.append(f"{separation}: the reference has no text gradient")
        for tp, pp, sp in ((world, 1, False), (world, 1, True), (1, world, False)):
            tag = f"{separation} tp={tp} pp={pp} sp={sp}"
            grid(tp, pp)
            model = build_model(cfg, base=base, sequence_parallel=sp, train_text=True)
            got = run_schedule(model, inputs, extra, forward_only=False)
            if last_stage() and abs(got["loss"].item() - ref_loss.item()) > GRAD_TOL:
                errors.append(f"{tag}: loss {got['loss'].item():.6f} vs {ref_loss.item():.6f}")
            tp_rank = parallel_state.get_tensor_model_parallel_rank()
            tp_group = parallel_state.get_tensor_model_parallel_group()
            compared = {"text": 0, "image": 0}
            for name, param in model.named_parameters():
                if not param.requires_grad:
                    errors.append(f"{tag}: {name} is frozen with text_lr_ratio > 0")
                    continue
                grad = param.grad
                if getattr(param, "sequence_parallel", False) and sp:  # finalize_model_grads' TP all-reduce
                    grad = torch.zeros_like(param) if grad is None else grad.clone()
                    dist.all_reduce(grad, group=tp_group)
                ref = ref_grads.get(_global_name(name, model.layer_offset))
                if ref is None:
                    if grad is not None and grad.abs().max() > 0:
                        errors.append(f"{tag}: {name} has a gradient, the reference none")
                    continue
                if grad is None:
                    errors.append(f"{tag}: {name} has no gradient")
                    continue
                err = (grad - _local_ref(ref, param, tp, tp_rank)).abs().max().item()
                compared["image" if is_image_param(name) else "text"] += 1
                if err > GRAD_TOL:
                    errors.append(f"{tag}: {name} grad differs by {err:.2e}")
            if not compared["text"] or not compared["image"]:
                errors.append(f"{tag}: compared {compared}")
    if errors:
        raise AssertionError("\n".join(errors[:30]))


# ------------------------------------------------------------------------------------------------- trainer
N = 2


def _trained(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {f"{i}.{n}": p.detach().clone() for i, c in enumerate(trainer.tm.chunks)
            for n, p in unwrap(c).named_parameters() if p.requires_grad}


@case
def text_lr_ratio_trains_checkpoints_and_resumes_bit_exact():
    """TP=2, shallow separation, ratio 0.5: 2N straight steps vs N + resume + N give identical losses and identical
    text and image weights; the checkpoint holds the text weights and their Adam state; text moved away from the
    base and the base directory is byte for byte unchanged. Resuming with another separation or with frozen text
    fails in one line naming the key."""
    from lmfusion.hf import load_base_state

    cfg_args = ["parallel.tensor_model_parallel_size=2", "model.separation=shallow",
                f"optimizer.text_lr_ratio={RATIO}", f"checkpoint.save_interval={N}", "checkpoint.keep_last=null"]
    base_dir = Path(config(shared_tmpdir()).init.base_checkpoint)
    base_digest = tree_digest(base_dir)
    straight_dir = shared_tmpdir()
    straight = train(config(straight_dir, f"train.train_iters={2 * N}", *cfg_args))
    want_losses, want = losses(straight), _trained(straight)
    model = unwrap(straight.tm.chunks[0])
    _, base = load_base_state(base_dir)
    with base:  # at the run's layout (TP=2), before the trainer closes it
        fresh = dict(build_model(straight.cfg.model, base=base).named_parameters())
    straight.close()
    text = [n for n, _ in model.named_parameters() if not is_image_param(n)]
    # (a vocabulary shard of padding rows only, zero in the base, gets no gradient: TP rank 1 of this tiny vocab)
    still = [n for n in text if torch.equal(dict(model.named_parameters())[n], fresh[n]) and fresh[n].any()]
    assert text and not still, f"{len(still)} of {len(text)} text weights equal the base: {still}"

    split_dir = shared_tmpdir()
    train(config(split_dir, f"train.train_iters={N}", *cfg_args)).close()
    second = train(config(split_dir, f"train.train_iters={2 * N}", *cfg_args))
    try:
        got = losses(second)
        assert got == want_losses[N:], f"resumed losses {got} != straight {want_losses[N:]}"
        for k, v in _trained(second).items():
            assert torch.equal(v, want[k]), f"{k} differs after resume"
    finally:
        second.close()
    saved = dist_checkpointing.load_plain_tensors(str(Path(straight_dir) / ckpt.iter_name(N)))
    for key in ("decoder.layers.self_attention.linear_qkv.weight", "embedding.word_embeddings.weight",
                "decoder.layers.mlp.linear_fc2.image_weight"):  # layer index: a sharded axis of one key
        assert key in saved, f"checkpoint lacks {key}"
    assert any(k.startswith("optimizer.state.exp_avg.") and "linear_qkv.weight" in k for k in saved), \
        "no Adam state for the text weights"
    assert tree_digest(base_dir) == base_digest, "the base directory changed"

    for override, needle in (("model.separation=deep", "model.separation is 'shallow' in the checkpoint"),
                             ("optimizer.text_lr_ratio=0", "optimizer.text_lr_ratio is 0.5 in the checkpoint")):
        args = [a for a in cfg_args if a.split("=")[0] != override.split("=")[0]] + [override]
        t = Trainer(config(straight_dir, f"train.train_iters={2 * N + 1}", *args))
        try:
            t.setup()
        except UserError as e:
            assert needle in str(e) and "\n" not in str(e), str(e)
        else:
            raise AssertionError(f"resume with {override} did not fail")
        finally:
            t.close()


@case
def text_training_layouts_agree_and_tied_head_stays_synced():
    """A tied-embedding base, separation none, ratio 1 (only the image I/O is image-specific): TP=2, PP=2 and DP=2 each
    train 3 steps; step-1 losses agree (1e-5) and later ones stay close (Adam amplifies rounding); under PP=2 the
    last stage's head copy equals the first stage's embedding bit for bit after every update (megatron's embedding
    group sums their gradients)."""
    root = Path(shared_tmpdir())
    if dist.get_rank() == 0:
        make_tiny_assets(root, tie_word_embeddings=True)
    dist.barrier()
    runs = {}
    layouts = {"tp2": ["parallel.tensor_model_parallel_size=2"], "pp2": ["parallel.pipeline_model_parallel_size=2"],
               "dp2": []}
    for name, overrides in layouts.items():
        trainer = train(config(shared_tmpdir(), "train.train_iters=3", f"init.base_checkpoint={root / 'base'}",
                               "model.tie_word_embeddings=true", "model.separation=none", "optimizer.text_lr_ratio=1",
                               *overrides))
        try:
            runs[name] = losses(trainer)
            model = unwrap(trainer.tm.chunks[0])
            if name == "pp2":
                group = parallel_state.get_pipeline_model_parallel_group()
                mine = model.shared_embedding_or_output_weight().detach().clone()
                other = [torch.empty_like(mine) for _ in range(group.size())]
                dist.all_gather(other, mine, group=group)
                assert torch.equal(other[0], other[-1]), "tied embedding and head copy diverged"
                assert not torch.equal(other[0], _base_embedding(root / "base", model, mine)), "embedding did not train"
        finally:
            trainer.close()
    ref = runs["dp2"]
    for name, got in runs.items():
        assert len(got) == 3 and abs(got[0] - ref[0]) <= PARITY_TOL, runs
        assert max(abs(a - b) for a, b in zip(got, ref)) <= 1e-3, runs


def _base_embedding(base_dir: Path, model, like: torch.Tensor) -> torch.Tensor:
    """The base's embedding rows of this rank (TP=1 here), zero-padded as the model pads its vocabulary."""
    from lmfusion.hf import load_base_state

    _, base = load_base_state(base_dir)
    with base:
        full = base.get("embedding.word_embeddings.weight")
    out = torch.zeros_like(like)
    out[: full.shape[0]] = full
    return out


if __name__ == "__main__":
    worker_main()
