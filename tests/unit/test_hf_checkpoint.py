"""Hugging Face Llama import/export (lmfusion.hf, `lmfusion convert-hf` / `export-hf`).

Real components throughout: random tiny ``transformers.LlamaForCausalLM`` models saved with ``save_pretrained``,
a tiny ``tokenizers`` WordLevel tokenizer, safetensors files. Sizes come from the configs below.
Tolerance: round trips compare logits exactly (max abs diff 0): conversion only renames, concatenates and splits,
and a dtype cast rounds identically on both sides (the reference model is cast to the same dtype).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from lmfusion import hf
from lmfusion.cli import main
from lmfusion.config import ModelConfig

VOCAB = 300  # not a multiple of ModelConfig.vocab_pad_multiple: the base stores the unpadded vocabulary
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
VARIANTS = {
    "gqa_untied": dict(num_key_value_heads=2, tie_word_embeddings=False),
    "mha_tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
    "mqa_llama3_rope": dict(num_key_value_heads=1, tie_word_embeddings=False, rope_parameters=LLAMA3_ROPE),
}
FLAGS_BOI, FLAGS_EOI = VOCAB - 2, VOCAB - 1  # token ids passed with --boi/--eoi-token-id for tokenizer-less models


def llama_config(**overrides) -> LlamaConfig:
    kwargs = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def make_hf_model(config: LlamaConfig, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # HF initialises norms to 1: randomise them so a swapped norm would be caught
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    return model


def save_hf(model: LlamaForCausalLM, directory: Path, **kwargs) -> Path:
    model.save_pretrained(directory, safe_serialization=True, **kwargs)
    return directory


def add_tokenizer(directory: Path):
    """A tiny WordLevel tokenizer with the Llama-3 reserved tokens LMFusion uses for <boi>/<eoi>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["a cat sat on the mat", "a dog ran to the cat"],
                            trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.add_special_tokens({"additional_special_tokens": [hf.BOI_TOKEN, hf.EOI_TOKEN]})
    fast.save_pretrained(directory)
    return fast


def logits(model: LlamaForCausalLM, config: LlamaConfig) -> torch.Tensor:
    ids = torch.randint(0, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request, tmp_path_factory):
    """(name, HF model, HF dir, converted base dir) per variant."""
    root = tmp_path_factory.mktemp(request.param)
    model = make_hf_model(llama_config(**VARIANTS[request.param]))
    hf_dir = save_hf(model, root / "hf")
    base = hf.convert_hf(hf_dir, root / "base", boi=FLAGS_BOI, eoi=FLAGS_EOI)
    return request.param, model, hf_dir, base


# ---------------------------------------------------------------------------------------------------- layout
def test_converted_layout_matches_contract(variant):
    _, model, _, base = variant
    c = model.config
    sd = model.state_dict()
    nq, ng, hd, L = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.num_hidden_layers
    per_group = nq // ng
    cfg, weights = hf.load_base_state(base)
    with weights:
        names = {"embedding.word_embeddings.weight", "decoder.final_layernorm.weight"}
        names |= {f"decoder.layers.{i}.{s}" for i in range(L) for s in (
            "input_layernorm.weight", "self_attention.linear_qkv.weight", "self_attention.linear_proj.weight",
            "mlp.pre_mlp_layernorm.weight", "mlp.linear_fc1.weight", "mlp.linear_fc2.weight")}
        if not c.tie_word_embeddings:
            names.add("output_layer.weight")
        assert set(weights.keys()) == names
        assert torch.equal(weights.get("embedding.word_embeddings.weight"), sd["model.embed_tokens.weight"])
        assert weights.shape("embedding.word_embeddings.weight")[0] == c.vocab_size  # unpadded
        if not c.tie_word_embeddings:
            assert torch.equal(weights.get("output_layer.weight"), sd["lm_head.weight"])
        assert torch.equal(weights.get("decoder.final_layernorm.weight"), sd["model.norm.weight"])
        for i in range(L):
            hp, mp = f"model.layers.{i}.", f"decoder.layers.{i}."
            qkv = weights.get(mp + "self_attention.linear_qkv.weight")
            assert qkv.shape == (ng * (per_group + 2) * hd, c.hidden_size)
            for g in range(ng):  # megatron's GQA interleave, row block by row block
                block = g * (per_group + 2) * hd
                for j in range(per_group):
                    head = g * per_group + j
                    assert torch.equal(qkv[block + j * hd: block + (j + 1) * hd],
                                       sd[hp + "self_attn.q_proj.weight"][head * hd:(head + 1) * hd])
                key_rows = slice(block + per_group * hd, block + (per_group + 1) * hd)
                assert torch.equal(qkv[key_rows], sd[hp + "self_attn.k_proj.weight"][g * hd:(g + 1) * hd])
                assert torch.equal(qkv[block + (per_group + 1) * hd: block + (per_group + 2) * hd],
                                   sd[hp + "self_attn.v_proj.weight"][g * hd:(g + 1) * hd])
                # a TP rank reads only its rows
                assert torch.equal(weights.get(mp + "self_attention.linear_qkv.weight", (key_rows,)), qkv[key_rows])
            assert torch.equal(weights.get(mp + "mlp.linear_fc1.weight"),
                               torch.cat([sd[hp + "mlp.gate_proj.weight"], sd[hp + "mlp.up_proj.weight"]]))
            for hs, ms in (("input_layernorm", "input_layernorm"),
                           ("post_attention_layernorm", "mlp.pre_mlp_layernorm"),
                           ("self_attn.o_proj", "self_attention.linear_proj"), ("mlp.down_proj", "mlp.linear_fc2")):
                assert torch.equal(weights.get(f"{mp}{ms}.weight"), sd[f"{hp}{hs}.weight"])
            cols = slice(0, c.intermediate_size // 2)
            assert torch.equal(weights.get(mp + "mlp.linear_fc2.weight", (slice(None), cols)),
                               sd[hp + "mlp.down_proj.weight"][:, cols])


def test_model_config_from_hf(variant):
    _, model, hf_dir, base = variant
    c = model.config
    cfg = ModelConfig.load(base / hf.BASE_CONFIG)
    assert (cfg.vocab_size, cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_layers, cfg.num_attention_heads,
            cfg.num_query_groups, cfg.head_dim) == (c.vocab_size, c.hidden_size, c.intermediate_size,
                                                    c.num_hidden_layers, c.num_attention_heads,
                                                    c.num_key_value_heads, c.head_dim)
    assert (cfg.rms_norm_eps, cfg.rope_theta, cfg.max_position_embeddings, cfg.tie_word_embeddings) == (
        c.rms_norm_eps, c.rope_parameters["rope_theta"], c.max_position_embeddings, c.tie_word_embeddings)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.boi_token_id, cfg.eoi_token_id) == (
        c.bos_token_id, c.eos_token_id, FLAGS_BOI, FLAGS_EOI)
    if c.rope_parameters["rope_type"] == "llama3":
        assert {k: getattr(cfg.rope_scaling, k) for k in ("factor", "low_freq_factor", "high_freq_factor",
                                                          "original_max_position_embeddings")} == \
            {k: c.rope_parameters[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                               "original_max_position_embeddings")}
    else:
        assert cfg.rope_scaling is None
    record = json.loads((base / hf.CONVERSION).read_text())
    assert record["source"] == str(hf_dir.resolve())
    assert record["dtype"] == "float32" and record["eos_token_ids"] == [c.eos_token_id]
    assert len(record["source_config_sha256"]) == 64


# ---------------------------------------------------------------------------------------------------- round trips
def test_export_round_trip_identical_logits(variant, tmp_path):
    _, model, _, base = variant
    out = hf.export_hf(base, tmp_path / "exported")
    reloaded = LlamaForCausalLM.from_pretrained(out).eval()
    assert torch.equal(logits(reloaded, model.config), logits(model, model.config))  # max abs diff 0
    original, exported = model.config.to_dict(), reloaded.config.to_dict()
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_parameters", "max_position_embeddings",
                "tie_word_embeddings", "bos_token_id", "eos_token_id", "hidden_act"):
        assert exported[key] == original[key], key


def test_hf_to_megatron_and_back_is_exact(variant):
    _, model, _, base = variant
    cfg = ModelConfig.load(base / hf.BASE_CONFIG)
    sd = {k: v for k, v in model.state_dict().items()
          if not (model.config.tie_word_embeddings and k == "lm_head.weight")}
    back = hf.megatron_to_hf(hf.hf_to_megatron(sd, cfg), cfg)
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_sharded_input_and_output(tmp_path):
    config = llama_config()
    model = make_hf_model(config, seed=2)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    shard = param_bytes // 3  # forces several shards on both sides
    hf_dir = save_hf(model, tmp_path / "hf", max_shard_size=shard)
    assert (hf_dir / hf.INDEX_FILE).is_file() and not (hf_dir / hf.SINGLE_FILE).exists()
    base = hf.convert_hf(hf_dir, tmp_path / "base", boi=FLAGS_BOI, eoi=FLAGS_EOI, max_shard_size=shard)
    index = json.loads((base / hf.INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (base / hf.SINGLE_FILE).exists()
    assert index["metadata"]["total_size"] == param_bytes
    out = hf.export_hf(base, tmp_path / "exported", max_shard_size=shard)
    assert (out / hf.INDEX_FILE).is_file()
    assert torch.equal(logits(LlamaForCausalLM.from_pretrained(out).eval(), config), logits(model, config))


def test_bf16_conversion_and_export(tmp_path):
    config = llama_config()
    model = make_hf_model(config, seed=3)
    hf_dir = save_hf(model, tmp_path / "hf")
    base = hf.convert_hf(hf_dir, tmp_path / "base", dtype="bf16", boi=FLAGS_BOI, eoi=FLAGS_EOI)
    assert json.loads((base / hf.CONVERSION).read_text())["dtype"] == "bfloat16"
    stored = load_file(base / hf.SINGLE_FILE)
    assert torch.equal(stored["embedding.word_embeddings.weight"],
                       model.model.embed_tokens.weight.detach().to(torch.bfloat16))
    out = hf.export_hf(base, tmp_path / "exported")  # dtype defaults to the stored bf16
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    reloaded = LlamaForCausalLM.from_pretrained(out).eval()
    assert reloaded.dtype == torch.bfloat16
    # Reference: the original loaded as bf16 by transformers (weights rounded the same way, RoPE buffer kept in
    # fp32 as from_pretrained does; model.to(bf16) would also round that buffer). Exact.
    reference = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16).eval()
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), reference.state_dict().values()))
    assert torch.equal(logits(reloaded, config), logits(reference, config))


def test_export_from_training_state_with_padded_vocab(variant, tmp_path):
    _, model, _, base = variant
    cfg, weights = hf.load_base_state(base)
    with weights:
        state = {k: weights.get(k) for k in weights.keys()}
    padded = cfg.padded_vocab_size(tp=2)
    for key in ("embedding.word_embeddings.weight", "output_layer.weight"):
        if key in state:  # as gathered from a TP run: megatron pads the vocabulary with extra rows
            state[key] = torch.cat([state[key], torch.randn(padded - cfg.vocab_size, cfg.hidden_size)])
    out = hf.export_hf(base, tmp_path / "exported", state=state)
    assert torch.equal(logits(LlamaForCausalLM.from_pretrained(out).eval(), model.config),
                       logits(model, model.config))


# ---------------------------------------------------------------------------------------------------- config layouts
def test_old_and_new_rope_layouts_agree():
    new = llama_config(rope_parameters=LLAMA3_ROPE).to_dict()
    old = {k: v for k, v in new.items() if k not in ("rope_parameters", "dtype")}
    old.update(rope_theta=LLAMA3_ROPE["rope_theta"], torch_dtype="bfloat16",
               rope_scaling={"type" if k == "rope_type" else k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"})
    assert hf.hf_config_to_model_kwargs(old) == hf.hf_config_to_model_kwargs(new)
    # and transformers reads the old layout the same way
    assert LlamaConfig.from_dict(old).rope_parameters["rope_theta"] == LLAMA3_ROPE["rope_theta"]
    plain = {k: v for k, v in old.items() if k != "rope_scaling"}
    assert hf.hf_config_to_model_kwargs(plain)["rope_scaling"] is None
    eos_list = dict(new, eos_token_id=[new["eos_token_id"], new["bos_token_id"]])
    assert hf.hf_config_to_model_kwargs(eos_list)["eos_token_id"] == new["eos_token_id"]
    assert hf.hf_eos_token_ids(eos_list) == eos_list["eos_token_id"]


@pytest.mark.parametrize("key,value", [
    ("model_type", "mistral"), ("architectures", ["MistralForCausalLM"]), ("attention_bias", True),
    ("mlp_bias", True), ("hidden_act", "gelu")])
def test_unsupported_architecture_names_key(key, value):
    cfg = dict(llama_config().to_dict(), **{key: value})
    with pytest.raises(ValueError, match=rf"{key}={value!r}".replace("[", r"\[").replace("]", r"\]")):
        hf.hf_config_to_model_kwargs(cfg)


def test_unsupported_rope_type_names_key():
    cfg = llama_config().to_dict()
    cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0}
    with pytest.raises(ValueError, match=r"rope_parameters\.rope_type='yarn'"):
        hf.hf_config_to_model_kwargs(cfg)


# ---------------------------------------------------------------------------------------------------- tokenizer
def test_tokenizer_files_and_boi_eoi_defaults(tmp_path):
    config = llama_config()
    hf_dir = save_hf(make_hf_model(config, seed=4), tmp_path / "hf")
    tok = add_tokenizer(hf_dir)
    base = hf.convert_hf(hf_dir, tmp_path / "base")  # no flags: ids from the tokenizer
    cfg = ModelConfig.load(base / hf.BASE_CONFIG)
    assert (cfg.boi_token_id, cfg.eoi_token_id) == tuple(tok.convert_tokens_to_ids([hf.BOI_TOKEN, hf.EOI_TOKEN]))
    present = [name for name in hf.TOKENIZER_FILES if (hf_dir / name).is_file()]
    assert "tokenizer.json" in present
    for name in present:
        assert (base / name).read_bytes() == (hf_dir / name).read_bytes()
    out = hf.export_hf(base, tmp_path / "exported")
    assert AutoTokenizer.from_pretrained(out).convert_tokens_to_ids(hf.BOI_TOKEN) == cfg.boi_token_id


def test_missing_tokenizer_asks_for_flags(variant, tmp_path):
    _, _, hf_dir, _ = variant
    with pytest.raises(ValueError, match="--boi-token-id"):
        hf.convert_hf(hf_dir, tmp_path / "base")


# ---------------------------------------------------------------------------------------------------- errors + CLI
def test_cli_convert_and_export(variant, tmp_path, capsys):
    _, model, hf_dir, _ = variant
    base, out = tmp_path / "base", tmp_path / "exported"
    tp, pp = model.config.num_key_value_heads, model.config.num_hidden_layers  # the largest sizes that divide
    assert main(["convert-hf", "--hf-dir", str(hf_dir), "--output", str(base), "--tp", str(tp), "--pp", str(pp),
                 "--dtype", "fp32", "--boi-token-id", str(FLAGS_BOI), "--eoi-token-id", str(FLAGS_EOI)]) == 0
    assert json.loads((base / hf.CONVERSION).read_text())["checked_parallel"] == {"tp": tp, "pp": pp}
    assert main(["export-hf", "--ckpt", str(base), "--output", str(out)]) == 0
    assert torch.equal(logits(LlamaForCausalLM.from_pretrained(out).eval(), model.config),
                       logits(model, model.config))


def run_cli_error(capsys, argv: list[str]) -> str:
    capsys.readouterr()  # drop what the test's own HF saves printed
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    return err


def convert_argv(hf_dir: Path, output: Path, *extra: str) -> list[str]:
    return ["convert-hf", "--hf-dir", str(hf_dir), "--output", str(output), "--boi-token-id", str(FLAGS_BOI),
            "--eoi-token-id", str(FLAGS_EOI), *extra]


def test_error_pickle_only(tmp_path, capsys):
    model = make_hf_model(llama_config())
    hf_dir = tmp_path / "hf"
    model.config.save_pretrained(hf_dir)
    torch.save(model.state_dict(), hf_dir / "pytorch_model.bin")
    err = run_cli_error(capsys, convert_argv(hf_dir, tmp_path / "base"))
    assert "pytorch_model.bin" in err and "safetensors" in err


def test_error_wrong_model_type(variant, tmp_path, capsys):
    _, model, _, _ = variant
    hf_dir = save_hf(model, tmp_path / "hf")
    cfg = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps(dict(cfg, model_type="mistral")))
    assert "model_type='mistral'" in run_cli_error(capsys, convert_argv(hf_dir, tmp_path / "base"))


def _rewrite_weights(hf_dir: Path, edit) -> None:
    path = hf_dir / hf.SINGLE_FILE
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_error_missing_tensor(tmp_path, capsys):
    hf_dir = save_hf(make_hf_model(llama_config()), tmp_path / "hf")
    key = "model.layers.1.self_attn.k_proj.weight"
    _rewrite_weights(hf_dir, lambda t: t.pop(key))
    err = run_cli_error(capsys, convert_argv(hf_dir, tmp_path / "base"))
    assert "missing tensor" in err and key in err
    assert not (tmp_path / "base").exists() and not list(tmp_path.glob("base.tmp-*"))  # nothing half-written


def test_error_shape_mismatch(tmp_path, capsys):
    config = llama_config()
    hf_dir = save_hf(make_hf_model(config), tmp_path / "hf")
    key = "model.layers.0.mlp.up_proj.weight"
    wrong = (config.intermediate_size + 1, config.hidden_size)
    _rewrite_weights(hf_dir, lambda t: t.__setitem__(key, torch.zeros(wrong)))
    err = run_cli_error(capsys, convert_argv(hf_dir, tmp_path / "base"))
    assert key in err and str(wrong) in err and str((config.intermediate_size, config.hidden_size)) in err


def test_error_existing_output_and_overwrite(variant, tmp_path, capsys):
    _, _, hf_dir, _ = variant
    out = tmp_path / "base"
    out.mkdir()
    (out / "keep.txt").write_text("not a checkpoint")
    assert "--overwrite" in run_cli_error(capsys, convert_argv(hf_dir, out))
    assert (out / "keep.txt").exists()
    assert main(convert_argv(hf_dir, out, "--overwrite")) == 0
    assert not (out / "keep.txt").exists() and (out / hf.BASE_CONFIG).is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["base"]  # no tmp/old directories left behind


def test_error_parallel_sizes_checked(variant, tmp_path, capsys):
    _, model, hf_dir, _ = variant
    tp = model.config.num_attention_heads + 1
    assert "tensor_model_parallel_size" in run_cli_error(capsys, convert_argv(hf_dir, tmp_path / "b", "--tp", str(tp)))


def test_error_boi_equal_to_eos(variant, tmp_path, capsys):
    _, model, hf_dir, _ = variant
    argv = ["convert-hf", "--hf-dir", str(hf_dir), "--output", str(tmp_path / "b"),
            "--boi-token-id", str(model.config.eos_token_id), "--eoi-token-id", str(FLAGS_EOI)]
    assert "equal the bos/eos ids" in run_cli_error(capsys, argv)
