"""``model.separation`` (deep / shallow / none) and ``optimizer.text_lr_ratio``: which parameters each separation
builds and trains, the parameter groups' learning rates, and the FLOP accounting that follows. Every expected set is
derived from the config and the spec's slot table, never counted by hand."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lmfusion.config import Config, ModelConfig, OptimConfig, TrainConfig
from lmfusion.model.image_config import ImageIOConfig
from lmfusion.model.weights import is_image_param
from megatron_ext.linear import SharedColumnParallelLinear, SharedRowParallelLinear
from megatron_ext.norm import RoutedRMSNorm, SharedRMSNorm
from megatron_ext.spec import SEPARATIONS, routed_layer_submodules

MODEL = ModelConfig(vocab_size=300, hidden_size=32, ffn_hidden_size=48, num_layers=2, num_attention_heads=4,
                    num_query_groups=2, bos_token_id=1, eos_token_id=2, boi_token_id=3, eoi_token_id=4,
                    attention_backend="sdpa", linear_backend="local",
                    image=ImageIOConfig(latent_channels=3, latent_size=8, patch_size=2, kind="linear"))

ATTN_SLOTS = ("input_layernorm", "linear_qkv", "linear_proj")
MLP_SLOTS = ("pre_mlp_layernorm", "linear_fc1", "linear_fc2")
# where each slot lives in a layer (LMFusionLayer's module tree)
SLOT_PATH = {"input_layernorm": "input_layernorm", "linear_qkv": "self_attention.linear_qkv",
             "linear_proj": "self_attention.linear_proj", "pre_mlp_layernorm": "mlp.pre_mlp_layernorm",
             "linear_fc1": "mlp.linear_fc1", "linear_fc2": "mlp.linear_fc2"}


def _routed_slots(separation: str) -> set[str]:
    """The paper's definition (Section 5.1), written independently of the spec's table."""
    return {"deep": set(ATTN_SLOTS + MLP_SLOTS), "shallow": set(MLP_SLOTS), "none": set()}[separation]


def _expected_names(cfg: ModelConfig, separation: str, model: torch.nn.Module) -> tuple[set[str], set[str]]:
    """(text names, image names) derived from the config: per layer one text weight per slot plus an image twin for
    each routed slot; embedding, head; the final norm routed iff the MLP half is; the image I/O's own parameters."""
    routed = _routed_slots(separation)
    text, image = {"embedding.word_embeddings.weight"}, set()
    if not cfg.tie_word_embeddings:
        text.add("output_layer.weight")
    for i in range(cfg.num_layers):
        for slot, path in SLOT_PATH.items():
            text.add(f"decoder.layers.{i}.{path}.weight")
            if slot in routed:
                image.add(f"decoder.layers.{i}.{path}.image_weight")
    text.add("decoder.final_layernorm.weight")
    if "pre_mlp_layernorm" in routed:
        image.add("decoder.final_layernorm.image_weight")
    for part in ("image_encoder", "image_decoder"):
        image |= {f"{part}.{n}" for n, _ in getattr(model, part).named_parameters()}
    return text, image


@pytest.mark.parametrize("separation", SEPARATIONS)
def test_spec_fills_slots_by_separation(separation):
    slots = routed_layer_submodules("local", separation)
    routed = _routed_slots(separation)
    for slot in ATTN_SLOTS + MLP_SLOTS:
        module = getattr(slots, slot)
        shared = (SharedRMSNorm, SharedColumnParallelLinear, SharedRowParallelLinear)
        assert (module not in shared) == (slot in routed), (slot, module)
    assert (slots.pre_mlp_layernorm is RoutedRMSNorm) == ("pre_mlp_layernorm" in routed)


@pytest.mark.parametrize("ratio", [0.0, 0.1])
@pytest.mark.parametrize("separation", SEPARATIONS)
def test_parameter_and_trainable_sets(runtime, separation, ratio):
    from lmfusion.model.builder import build_model

    cfg = dataclasses.replace(MODEL, separation=separation)
    model = build_model(cfg, freeze=True, train_text=ratio > 0, seed=3)
    text, image = _expected_names(cfg, separation, model)
    names = {n for n, _ in model.named_parameters()}
    assert names == text | image
    assert {n for n in names if is_image_param(n)} == image
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == (text | image if ratio > 0 else image)
    # the checkpointed set is the trainable set: frozen text stays in the base
    assert set(model.sharded_state_dict()) == trainable
    if separation == "none" and ratio == 0:  # only the U-Net / patchify image I/O trains
        assert trainable and all(n.startswith(("image_encoder.", "image_decoder.")) for n in trainable)
    # image twins start as the text weights: the same base serves every separation
    params = dict(model.named_parameters())
    for n in image:
        if n.rpartition(".")[2].startswith("image_"):
            assert torch.equal(params[n], params[n.replace(".image_", ".")])


@pytest.mark.parametrize("separation", SEPARATIONS)
def test_frozen_run_only_image_params_get_grads(runtime, separation):
    """Text frozen (ratio 0): backward reaches exactly the image set; shared slots get no gradient."""
    from lmfusion.model.builder import build_model
    from lmfusion.training.synthetic import synthetic_batches

    cfg = dataclasses.replace(MODEL, separation=separation)
    model = build_model(cfg, freeze=True, seed=3)
    batch = next(synthetic_batches(cfg, seq_length=48, micro_batch_size=2, seed=2))
    out = model(batch.to_model_inputs(batch.image_latents, torch.full((batch.num_images,), 10, dtype=torch.long)))
    (out.logits.float().pow(2).mean() + out.noise_pred.pow(2).mean()).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, _ in model.named_parameters() if is_image_param(n)}


def _cfg(separation: str, ratio: float, lr_mult: float = 1.0) -> Config:
    return Config(model=dataclasses.replace(MODEL, separation=separation),
                  train=TrainConfig(train_iters=10, micro_batch_size=1, global_batch_size=1),
                  optimizer=OptimConfig(lr=1e-3, min_lr=1e-4, lr_warmup_iters=0, text_lr_ratio=ratio,
                                        lr_mult=lr_mult))


@pytest.mark.parametrize("separation,ratio,lr_mult", [("deep", 0.1, 1.0), ("none", 1.0, 1.0),
                                                      ("shallow", 0.25, 3.0), ("none", 0.0, 1.0)])
def test_text_param_groups_get_lr_times_ratio(runtime, separation, ratio, lr_mult):
    """megatron's parameter groups: text parameters at lr x ratio (max and min), image I/O at lr x lr_mult, twins at
    lr; with ratio 0 no group holds a text parameter."""
    from lmfusion.model.builder import build_model
    from lmfusion.training.model_setup import IMAGE_IO_NAMES, optimizer_config, param_groups
    import fnmatch

    cfg = _cfg(separation, ratio, lr_mult)
    o = cfg.optimizer
    model = build_model(cfg.model, freeze=True, train_text=o.trains_text, seed=3)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = param_groups(model, cfg, optimizer_config(cfg, torch.float32))
    seen = set()
    for g in groups:
        for p in g["params"]:
            n = names[id(p)]
            seen.add(n)
            if not is_image_param(n):
                want = (o.lr * ratio, o.min_lr * ratio)
            elif any(fnmatch.fnmatch(n, pat) for pat in IMAGE_IO_NAMES):
                want = (o.lr * lr_mult, o.min_lr * lr_mult)
            else:
                want = (o.lr, o.min_lr)
            assert (g.get("max_lr", o.lr), g.get("min_lr", o.min_lr)) == pytest.approx(want), n
    assert seen == {n for n, p in model.named_parameters() if p.requires_grad}


def test_scheduler_sets_text_lr_to_ratio(runtime):
    """Through megatron's (distributed) optimizer and scheduler: after some steps of the schedule the groups holding
    the text parameters (as many elements as the text set) run at the image twins' lr x ratio."""
    from lmfusion.training.model_setup import build_train_model, unwrap

    cfg = _cfg("deep", 0.1)
    o = cfg.optimizer
    tm = build_train_model(cfg, None, device=torch.device("cpu"))
    tm.scheduler.step(3)
    model = unwrap(tm.chunks[0])
    text_numel = sum(p.numel() for n, p in model.named_parameters() if not is_image_param(n))
    image_numel = sum(p.numel() for n, p in model.named_parameters() if is_image_param(n))
    by_kind = {"text": [], "image": []}
    for g in tm.optimizer.param_groups:  # fp32 main-parameter shards (one data-parallel rank: whole tensors)
        kind = "text" if g["max_lr"] == pytest.approx(o.lr * o.text_lr_ratio) else "image"
        by_kind[kind].append(g)
    assert sum(p.numel() for g in by_kind["text"] for p in g["params"]) == text_numel
    assert sum(p.numel() for g in by_kind["image"] for p in g["params"]) == image_numel
    image_lr = {g["lr"] for g in by_kind["image"]}
    assert len(image_lr) == 1 and 0 < image_lr.copy().pop() < o.lr
    for g in by_kind["text"]:
        assert g["lr"] == pytest.approx(image_lr.copy().pop() * o.text_lr_ratio)


def test_config_rejects_bad_values():
    from lmfusion.errors import UserError

    with pytest.raises(UserError, match="model.separation"):
        dataclasses.replace(MODEL, separation="medium")
    with pytest.raises(UserError, match="optimizer.text_lr_ratio"):
        OptimConfig(text_lr_ratio=-0.1)


def test_flops_follow_separation_and_frozen_text():
    """Image tokens cost 6n through routed slots and 4n through shared frozen ones; with trained text the trainer
    counts everything trainable."""
    from lmfusion.training.flops import TokenCounts, model_flops, step_flops

    counts = TokenCounts(text_off=5, text_on=7, image=11, images=1, attn_on=30, attn_off=20)
    f = {s: model_flops(dataclasses.replace(MODEL, separation=s)) for s in SEPARATIONS}
    flops = {s: step_flops(dataclasses.replace(MODEL, separation=s), counts) for s in SEPARATIONS}
    per_image_token_layer = {s: 3 * f[s].image_trainable_linear + 2 * (f[s].layer_linear - f[s].image_trainable_linear)
                             for s in SEPARATIONS}
    for a, b in (("deep", "shallow"), ("shallow", "none")):
        want = MODEL.num_layers * counts.image * (per_image_token_layer[a] - per_image_token_layer[b])
        assert flops[a] - flops[b] == pytest.approx(want)
    assert f["none"].image_trainable_linear == 0 and f["deep"].image_trainable_linear == f["deep"].layer_linear
    everything = step_flops(MODEL, counts, "all_trainable")
    assert all(flops[s] < everything for s in SEPARATIONS)


def test_deepspeed_refuses_text_training():
    from lmfusion.errors import UserError

    with pytest.raises(UserError, match="engine=deepspeed: optimizer.text_lr_ratio=0.1"):
        dataclasses.replace(_cfg("deep", 0.1), engine="deepspeed")


def test_resume_checks_read_older_records_as_deep_frozen(tmp_path):
    """A record from before these settings (no separation, no ratio) is a deep, frozen-text run."""
    from lmfusion.errors import UserError
    from lmfusion.training.trainer import check_training_setup

    old = {"model": {k: v for k, v in MODEL.to_dict().items() if k != "separation"}}
    check_training_setup(old, _cfg("deep", 0.0), tmp_path)
    with pytest.raises(UserError, match="model.separation is 'deep' in the checkpoint, 'none' in this config"):
        check_training_setup(old, _cfg("none", 0.0), tmp_path)
    with pytest.raises(UserError, match="optimizer.text_lr_ratio is 0.0 in the checkpoint, 1.0 in this config"):
        check_training_setup(old, _cfg("deep", 1.0), tmp_path)
    ratio_changed = {**old, "model": MODEL.to_dict(), "text_lr_ratio": 0.5}
    with pytest.raises(UserError, match="parameter groups differ"):
        check_training_setup(ratio_changed, _cfg("deep", 1.0), tmp_path)
