"""Config: YAML + key=value overrides, typed values, unknown keys with suggestions, cross-section validation, the
model read from the base, the resolved config round trip, and both example configs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from lmfusion.config import Config, DiffusionConfig, ModelConfig
from lmfusion.config_io import TEXT_FIELDS, config_from_dict, dump_config, load_config, parse_overrides, write_config
from lmfusion.model.image_config import ImageIOConfig
from tests.fixtures import TINY_CONFIG, config_only_base

REPO = Path(__file__).resolve().parents[2]
TINY = TINY_CONFIG
LLAMA3_8B = REPO / "examples" / "configs" / "llama3_8b.yaml"


@pytest.fixture
def base(tmp_path) -> Path:
    """A directory holding only a base's lmfusion_config.json (all the config reads)."""
    return config_only_base(tmp_path)


def tiny(base: Path, *overrides: str) -> Config:
    return load_config(TINY, [f"init.base_checkpoint={base}", *overrides])


def test_tiny_example_reads_text_model_from_base_and_the_rest_from_yaml(base):
    cfg = tiny(base)
    want = ModelConfig.load(base / "lmfusion_config.json")
    for key in TEXT_FIELDS:
        assert getattr(cfg.model, key) == getattr(want, key), key
    raw = yaml.safe_load(TINY.read_text())
    assert cfg.model.image == ImageIOConfig(**raw["model"]["image"])
    assert cfg.model.attention_backend == raw["model"]["attention_backend"]
    assert cfg.train.train_iters == raw["train"]["train_iters"]
    assert cfg.optimizer.lr == float(raw["optimizer"]["lr"])
    # the loader's batch sizes are the trainer's
    assert (cfg.data.micro_batch_size, cfg.data.global_batch_size) == (cfg.train.micro_batch_size,
                                                                       cfg.train.global_batch_size)


def test_overrides_win_and_are_typed(base):
    cfg = tiny(base, "train.train_iters=7", "optimizer.lr=3e-4", "parallel.sequence_parallel=true",
               "parallel.tensor_model_parallel_size=2", "data.datasets=[a, b]", "checkpoint.keep_last=null",
               "model.image.patch_size=4", "train.micro_batch_size=4")
    assert cfg.train.train_iters == 7
    assert cfg.optimizer.lr == 3e-4 and isinstance(cfg.optimizer.lr, float)  # YAML 1.1 reads "3e-4" as a string
    assert cfg.parallel.sequence_parallel is True
    assert cfg.data.datasets == ["a", "b"]
    assert cfg.checkpoint.keep_last is None
    assert cfg.model.image.patch_size == 4
    assert cfg.data.micro_batch_size == 4


@pytest.mark.parametrize("override, message", [
    ("train.train_iter=3", "unknown config key 'train.train_iter' (did you mean 'train.train_iters'?)"),
    ("paralel.tensor_model_parallel_size=2", "(did you mean 'parallel'?)"),
    ("model.image.patch_sz=2", "(did you mean 'model.image.patch_size'?)"),
    ("train.warmup=10", "(did you mean 'optimizer.lr_warmup_iters'?)"),  # issue #18: not train.recompute
    ("train.train_iters=ten", "config key 'train.train_iters': expected an integer, got 'ten'"),
    ("train.train_iters=true", "config key 'train.train_iters': expected an integer, got True"),
    ("train.train_iters=2.5", "expected an integer"),
    ("parallel.sequence_parallel=1", "config key 'parallel.sequence_parallel': expected true or false"),
    ("data.micro_batch_size=2", "config key 'data.micro_batch_size': set train.micro_batch_size instead"),
    ("parallel.tensor_model_parallel_size=3", "tensor_model_parallel_size 3 does not divide model.num_attention_"),
    ("parallel.pipeline_model_parallel_size=4", "pipeline_model_parallel_size 4 does not divide model.num_layers"),
    ("parallel.sequence_parallel=true", "parallel.sequence_parallel=true needs parallel.tensor_model_parallel_size"),
    ("train.global_batch_size=7", "train.global_batch_size 7 is not a multiple of train.micro_batch_size"),
    ("optimizer.lr_warmup_iters=500", "optimizer.lr_warmup_iters 500 must be below the decay length"),
    ("train.precision=fp16", "train.precision must be one of"),
    # the old train.timestep_* keys are read as diffusion.* (moved): errors name the new key
    ("train.timestep_density=lognormal", "diffusion.timestep_density must be one of ('uniform', "
                                         "'logit_normal'), got 'lognormal'"),
    ("train.timestep_logit_std=0", "diffusion.timestep_logit_std must be > 0, got 0"),
    ("diffusion.objective=x0", "diffusion.objective must be one of ('epsilon', 'v_prediction', "
                               "'flow'), got 'x0'"),
    ("diffusion.loss_weighting=snr", "diffusion.loss_weighting must be one of ('none', 'min_snr')"),
    ("diffusion.flow_shift=3", "diffusion.flow_shift=3.0 applies to diffusion.objective=flow only"),
    ("diffusion.min_snr_gamma=0", "diffusion.min_snr_gamma must be > 0, got 0"),
    ("optimizer.lr_mult=0", "optimizer.lr_mult must be > 0, got 0"),
    ("checkpoint.exit_signals=[SIGFOO]", "checkpoint.exit_signals: ['SIGFOO'] are not signal names"),
    ("model.hidden_size=128", "model.hidden_size=128 conflicts with the base"),
    ("model.attention_backend=te", "model.attention_backend 'te' is not supported"),
    ("init.hf_dir=/somewhere", "init: set exactly one of init.base_checkpoint"),
    ("parallel.overlap_grad_reduce=true", "checkpoint.optimizer_sharding=dp_reshardable"),
])
def test_errors_name_the_key(base, override, message):
    with pytest.raises(ValueError) as info:
        tiny(base, override)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_bad_override_syntax_and_missing_files(base, tmp_path):
    with pytest.raises(ValueError, match="is not key=value"):
        parse_overrides(["train.train_iters"])
    with pytest.raises(FileNotFoundError, match="no such config file"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(FileNotFoundError, match="init.base_checkpoint"):
        load_config(TINY, [f"init.base_checkpoint={tmp_path / 'missing'}"])
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="expected a mapping of sections"):
        load_config(tmp_path / "list.yaml")


def test_parse_overrides_builds_nested_dict():
    assert parse_overrides(["a.b.c=1", "a.b.d=[x, y]", "a.e=null", "f=some text"]) == \
        {"a": {"b": {"c": 1, "d": ["x", "y"]}, "e": None}, "f": "some text"}


def test_resolved_config_round_trips(base, tmp_path):
    cfg = tiny(base, "parallel.tensor_model_parallel_size=2", "train.train_iters=11")
    path = tmp_path / "run" / "config.yaml"
    write_config(cfg, path)
    text = path.read_text()
    assert "micro_batch_size" not in yaml.safe_load(text)["data"]  # batch sizes live under train only
    again = load_config(path)  # resolves against the base again: every text field must still match
    assert again == cfg
    assert config_from_dict(yaml.safe_load(dump_config(cfg)), resolve_base=False) == cfg


def test_hf_dir_fields_come_from_config_json_and_tokenizer_ids_from_the_config(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 45, "hidden_size": 64,
        "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "bos_token_id": 1, "eos_token_id": 2, "rope_theta": 10000.0, "max_position_embeddings": 128}))
    cfg = load_config(TINY, ["init.base_checkpoint=null", f"init.hf_dir={hf}", "model.boi_token_id=3",
                             "model.eoi_token_id=4"])
    assert (cfg.model.hidden_size, cfg.model.num_query_groups, cfg.model.rope_theta) == (64, 2, 10000.0)
    assert (cfg.model.boi_token_id, cfg.model.eoi_token_id) == (3, 4)
    with pytest.raises(ValueError, match="does not define <|reserved_special_token_0|>; set model.boi_token_id"):
        load_config(TINY, ["init.base_checkpoint=null", f"init.hf_dir={hf}"])


def test_llama3_8b_example_is_the_paper_recipe_and_fits_its_slurm_layout():
    cfg = load_config(LLAMA3_8B, resolve_base=False)  # the base lives on the cluster
    assert cfg.model == dataclasses.replace(ModelConfig(), image=cfg.model.image)  # Llama-3-8B's architecture
    o = cfg.optimizer
    assert (o.adam_beta1, o.adam_beta2, o.adam_eps, o.lr, o.min_lr, o.lr_warmup_iters, o.clip_grad) == \
        (0.9, 0.95, 1e-8, 1e-4, 1.5e-5, 4000, 1.0)
    assert o.lr_decay_style == "cosine"
    assert cfg.data.seq_length == 4096 and cfg.train.diffusion_loss_weight == 5.0
    assert cfg.data.caption_first_prob == 0.8
    from lmfusion.model.image_io import tokens_per_image

    assert cfg.model.image.latent_size * 8 == 256 and tokens_per_image(cfg.model.image) == 256  # 256 px, VAE /8
    assert cfg.data_parallel_size(64) == 64 // cfg.parallel.tensor_model_parallel_size  # 8 nodes x 8 GPUs
    assert cfg.checkpoint.optimizer_sharding == "dp_reshardable" and cfg.parallel.overlap_grad_reduce
    # the paper's diffusion recipe: epsilon, uniform noise levels, no loss weighting, one learning rate
    assert cfg.diffusion == DiffusionConfig() and cfg.diffusion.objective == "epsilon"
    assert (cfg.diffusion.timestep_density, cfg.diffusion.loss_weighting, o.lr_mult) == ("uniform", "none", 1.0)
    assert cfg.train.image_first_max_timestep == 500


def test_moved_timestep_keys_still_load_and_conflicts_name_both(base):
    """``train.timestep_*`` (before the ``diffusion`` section) read as ``diffusion.timestep_*``: an older run's
    config.yaml loads to the same config; the resolved config writes the new keys only."""
    old = tiny(base, "train.timestep_density=logit_normal", "train.timestep_logit_mean=1.5")
    new = tiny(base, "diffusion.timestep_density=logit_normal", "diffusion.timestep_logit_mean=1.5")
    assert old == new and old.diffusion.timestep_logit_mean == 1.5 and old.diffusion.density.kind == "logit_normal"
    dumped = yaml.safe_load(dump_config(old))
    assert "timestep_density" not in dumped["train"] and dumped["diffusion"]["timestep_density"] == "logit_normal"
    assert tiny(base, "train.timestep_logit_std=2", "diffusion.timestep_logit_std=2").diffusion.timestep_logit_std == 2
    with pytest.raises(ValueError, match=r"config key 'train.timestep_logit_std' moved to "
                                         r"'diffusion.timestep_logit_std'; both are set \(2 and 3\)"):
        tiny(base, "train.timestep_logit_std=2", "diffusion.timestep_logit_std=3")


def test_quickstart_example_keeps_its_noise_levels_in_the_diffusion_section():
    cfg = load_config(REPO / "examples" / "configs" / "quickstart.yaml", ["init.base_checkpoint=unread"],
                      resolve_base=False)
    d = cfg.diffusion
    assert (d.objective, d.timestep_density, d.timestep_logit_mean, d.timestep_logit_std) == \
        ("flow", "logit_normal", 1.0, 1.0)


def test_world_size_checks(base):
    cfg = tiny(base, "parallel.tensor_model_parallel_size=2")
    assert cfg.data_parallel_size(4) == 2
    with pytest.raises(ValueError, match="world size 3 is not a multiple"):
        cfg.data_parallel_size(3)
    with pytest.raises(ValueError, match="not a multiple of train.micro_batch_size 2 x data-parallel size 8"):
        cfg.data_parallel_size(16)


# ---------------------------------------------------------------------------------------------------- engine: deepspeed
def test_engine_defaults_to_megatron_and_deepspeed_section_is_typed(base, tmp_path):
    assert tiny(base).engine == "megatron"
    cfg = tiny(base, "engine=deepspeed", "deepspeed.zero_stage=3", "deepspeed.offload_param=true",
               "deepspeed.reduce_bucket_size=1e6")
    assert (cfg.engine, cfg.deepspeed.zero_stage, cfg.deepspeed.offload_param) == ("deepspeed", 3, True)
    assert cfg.deepspeed.reduce_bucket_size == 1_000_000 and isinstance(cfg.deepspeed.reduce_bucket_size, int)
    path = tmp_path / "config.yaml"
    write_config(cfg, path)
    assert yaml.safe_load(path.read_text())["engine"] == "deepspeed"
    assert load_config(path) == cfg
    assert config_from_dict(yaml.safe_load(dump_config(cfg)), resolve_base=False) == cfg


@pytest.mark.parametrize("overrides, message", [
    (["engine=fsdp"], "engine must be one of ('megatron', 'deepspeed'), got 'fsdp'"),
    (["engin=deepspeed"], "unknown config key 'engin' (did you mean 'engine'?)"),
    (["engine=deepspeed", "deepspeed.zero_stage=0"], "deepspeed.zero_stage must be 1, 2 or 3, got 0"),
    (["engine=deepspeed", "deepspeed.zero_stage=4"], "deepspeed.zero_stage must be 1, 2 or 3, got 4"),
    (["engine=deepspeed", "deepspeed.offload_param=true"], "deepspeed.offload_param=true needs deepspeed.zero_stage=3"),
    (["deepspeed.zero_stg=2"], "(did you mean 'deepspeed.zero_stage'?)"),
    (["engine=deepspeed", "parallel.tensor_model_parallel_size=2"],
     "engine=deepspeed needs parallel.tensor_model_parallel_size=1 (ZeRO is data-parallel only), got 2"),
    (["engine=deepspeed", "parallel.pipeline_model_parallel_size=2"],
     "engine=deepspeed needs parallel.pipeline_model_parallel_size=1"),
    (["engine=deepspeed", "checkpoint.async_save=true"],
     "engine=deepspeed: checkpoint.async_save=true is megatron-only"),
    (["engine=deepspeed", "train.fp8=hybrid"], "engine=deepspeed: train.fp8='hybrid' is megatron-only"),
])
def test_deepspeed_errors_name_the_key(base, overrides, message):
    with pytest.raises(ValueError) as info:
        tiny(base, *overrides)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_deepspeed_section_is_ignored_by_the_megatron_engine(base):
    """TP/PP layouts stay valid under engine=megatron whatever the deepspeed section says."""
    cfg = tiny(base, "parallel.tensor_model_parallel_size=2", "deepspeed.zero_stage=3")
    assert cfg.engine == "megatron" and cfg.parallel.tensor_model_parallel_size == 2


def test_extends_builds_on_another_file_relative_to_it_and_refuses_loops(base, tmp_path):
    (tmp_path / "sub").mkdir()
    middle = tmp_path / "sub" / "middle.yaml"
    middle.write_text(f"extends: {TINY}\ntrain:\n  train_iters: 11\noptimizer:\n  lr: 3.0e-4\n")
    top = tmp_path / "sub" / "top.yaml"
    top.write_text("extends: middle.yaml\noptimizer:\n  lr: 5.0e-4\n")
    cfg = load_config(top, [f"init.base_checkpoint={base}", "train.seed=9"])
    want = tiny(base, "train.train_iters=11", "optimizer.lr=5e-4", "train.seed=9")
    assert cfg == want  # the chain merges key by key: the last file wins, the rest comes from below, then overrides
    assert "extends" not in yaml.safe_load(dump_config(cfg))
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(Exception, match="'extends' loops back"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("extends: nowhere.yaml\n")
    with pytest.raises(FileNotFoundError, match=r"nowhere.yaml: no such config file \(extended by .*c.yaml\)"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("extends: [x]\n")
    with pytest.raises(Exception, match="field 'extends' expected the path of a config file"):
        load_config(tmp_path / "d.yaml")


LLAVAFUSION_8B = REPO / "examples" / "configs" / "llavafusion_8b.yaml"
# llava-hf/llama3-llava-next-8b-hf's config.json as the hub stores it: a sparse text_config (LlamaConfig defaults
# fill the rest), the <image> token added after Llama-3's vocabulary, which is padded to a multiple of 64.
LLAVA_NEXT_8B_CONFIG = {
    "architectures": ["LlavaNextForConditionalGeneration"], "model_type": "llava_next", "image_token_index": 128256,
    "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
    "projector_hidden_act": "gelu", "tie_word_embeddings": False, "use_image_newline_parameter": True,
    "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 128320,
    "text_config": {"_name_or_path": "meta-llama/Meta-Llama-3-8B-Instruct", "architectures": ["LlamaForCausalLM"],
                    "bos_token_id": 128000, "eos_token_id": 128009, "intermediate_size": 14336,
                    "max_position_embeddings": 8192, "model_type": "llama", "num_key_value_heads": 8,
                    "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "vocab_size": 128320},
    "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                      "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24,
                      "patch_size": 14, "projection_dim": 768, "vocab_size": 32000},
}


def test_llavafusion_8b_example_is_the_llama3_recipe_on_a_llava_next_base(tmp_path):
    """The LLaVAFusion config loads and validates; every section but the base and run directory is llama3_8b.yaml's
    (the paper's recipe unchanged); the text fields it repeats are those a conversion of LLaVA-NeXT-8B's config.json
    gives, and it loads against such a base (a mismatch would be refused by name)."""
    from lmfusion.hf.llava import llava_model_kwargs

    cfg = load_config(LLAVAFUSION_8B, resolve_base=False)
    paper = load_config(LLAMA3_8B, resolve_base=False)
    for section in ("parallel", "data", "train", "optimizer", "diffusion", "logging"):
        assert getattr(cfg, section) == getattr(paper, section), section
    assert dataclasses.replace(cfg.checkpoint, save=paper.checkpoint.save) == paper.checkpoint
    assert cfg.model.image == paper.model.image and cfg.engine == paper.engine
    assert cfg.init.base_checkpoint != paper.init.base_checkpoint and cfg.checkpoint.save != paper.checkpoint.save
    lm = ModelConfig(**llava_model_kwargs(LLAVA_NEXT_8B_CONFIG), boi_token_id=128002, eoi_token_id=128003)
    written = yaml.safe_load(LLAVAFUSION_8B.read_text())["model"]
    for key in set(written) & set(TEXT_FIELDS):
        assert getattr(lm, key) == written[key], key
    lm.save(tmp_path / "base" / "lmfusion_config.json")
    resolved = load_config(LLAVAFUSION_8B, [f"init.base_checkpoint={tmp_path / 'base'}"])
    assert all(getattr(resolved.model, k) == getattr(lm, k) for k in TEXT_FIELDS)
    assert resolved.model.vocab_size == 128320 and resolved.model.eos_token_id == 128009
    assert resolved.data_parallel_size(64) == 64 // resolved.parallel.tensor_model_parallel_size


def test_hf_dir_may_be_a_llava_next_directory(tmp_path):
    """init.hf_dir on a LLaVA-NeXT directory reads its language model's fields (converted into the run on launch)."""
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(LLAVA_NEXT_8B_CONFIG))
    cfg = load_config(LLAMA3_8B, ["init.base_checkpoint=null", f"init.hf_dir={hf}", "model.vocab_size=128320",
                                  "model.eos_token_id=128009"])
    assert (cfg.model.vocab_size, cfg.model.hidden_size, cfg.model.rope_theta) == (128320, 4096, 500000.0)


def test_edit_finetune_example_starts_from_the_pretraining_run_with_a_fresh_optimizer():
    edit = load_config(REPO / "examples" / "configs" / "edit_finetune_8b.yaml", resolve_base=False)
    recipe = load_config(LLAMA3_8B, resolve_base=False)
    assert edit.checkpoint.load == recipe.checkpoint.save and edit.checkpoint.load_optimizer is False
    assert edit.checkpoint.save != recipe.checkpoint.save
    assert edit.model == recipe.model and edit.parallel == recipe.parallel and edit.diffusion == recipe.diffusion
    assert edit.optimizer.lr == recipe.optimizer.lr and edit.train.train_iters < recipe.train.train_iters
