"""Hugging Face Llama <-> LMFusion base checkpoint: the format, the name mapping and reading (``convert-hf`` and
``export-hf`` are :mod:`lmfusion.hf.convert`).

A base directory holds the text model only, in megatron naming, as full (TP=1) tensors:

* ``model.safetensors``, or above ``max_shard_size`` HF-style shards ``model-0000K-of-0000N.safetensors`` with
  ``model.safetensors.index.json`` (``weight_map``); ``lmfusion_config.json`` (:class:`ModelConfig`);
  ``conversion.json`` (provenance); the tokenizer files of the source.
* Names: ``embedding.word_embeddings.weight`` (V, h); per layer ``decoder.layers.N.`` +
  ``input_layernorm.weight``, ``self_attention.linear_qkv.weight``, ``self_attention.linear_proj.weight`` (= o_proj),
  ``mlp.pre_mlp_layernorm.weight`` (= post_attention_layernorm), ``mlp.linear_fc1.weight`` (= [gate; up]),
  ``mlp.linear_fc2.weight`` (= down); ``decoder.final_layernorm.weight``; ``output_layer.weight`` unless tied.
  Image twins are not stored: the model copies text -> image at load.

Design choices:

* **TP/PP-agnostic.** Tensors are full and the vocabulary unpadded; each rank slices what it owns at load, reading
  only that slice from disk (:meth:`BaseWeights.get` with ``slices``). ``tp``/``pp`` given to :func:`convert_hf`
  only check divisibility early and are recorded; one base serves every layout.
* **Fused QKV in megatron's GQA interleave**: per query group g, its ``np/ng`` query heads, then key head g, then
  value head g. No RoPE permutation: HF Llama weights are already in rotate-half layout (the Meta -> HF conversion
  permuted them), which is what megatron's non-interleaved RoPE computes.
* **Safetensors only.** Torch pickles (``pytorch_model.bin``) are refused, never unpickled.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from lmfusion.config import ModelConfig, RopeScaling
from lmfusion.errors import UserError

__all__ = ["HF_CONFIG", "BASE_CONFIG", "CONVERSION", "SINGLE_FILE", "INDEX_FILE", "TOKENIZER_FILES", "BOI_TOKEN",
           "EOI_TOKEN", "DEFAULT_MAX_SHARD_SIZE", "read_hf_llama", "hf_config_to_model_kwargs", "hf_eos_token_ids",
           "hf_to_megatron", "megatron_to_hf", "base_shapes", "load_base_state", "BaseWeights",
           "tokenizer_token_id", "hf_config_of", "write_safetensors", "read_json"]

HF_CONFIG, BASE_CONFIG, CONVERSION = "config.json", "lmfusion_config.json", "conversion.json"
SINGLE_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "generation_config.json")
BOI_TOKEN, EOI_TOKEN = "<|reserved_special_token_0|>", "<|reserved_special_token_1|>"
DEFAULT_MAX_SHARD_SIZE = "5GB"
_SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}
# Per-layer one-to-one renames: (HF suffix, megatron suffix); the shapes follow from the config.
_LAYER_RENAMES = (("input_layernorm.weight", "input_layernorm.weight"),
                  ("self_attn.o_proj.weight", "self_attention.linear_proj.weight"),
                  ("post_attention_layernorm.weight", "mlp.pre_mlp_layernorm.weight"),
                  ("mlp.down_proj.weight", "mlp.linear_fc2.weight"))


# ---------------------------------------------------------------------------------------------------- HF config
def hf_config_to_model_kwargs(hf: Mapping[str, Any], source: str = HF_CONFIG) -> dict[str, Any]:
    """``ModelConfig`` keyword arguments from an HF Llama ``config.json`` dict (boi/eoi not included).

    Reads both rope layouts: transformers 5 (``rope_parameters`` with ``rope_theta`` inside) and earlier
    (top-level ``rope_theta``, ``rope_scaling`` with ``rope_type`` or ``type``). Raises ValueError naming the key.
    """
    from transformers import LlamaConfig

    def unsupported(key: str, need: str) -> UserError:
        return UserError(f"{source}: {key}={hf.get(key)!r} is not supported ({need})")

    if hf.get("model_type") != "llama":
        raise unsupported("model_type", "need 'llama'")
    if hf.get("architectures") is not None and list(hf["architectures"]) != ["LlamaForCausalLM"]:
        raise unsupported("architectures", "need ['LlamaForCausalLM']")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise unsupported(key, "LMFusion's Llama layers have no biases")
    if hf.get("hidden_act", "silu") != "silu":
        raise unsupported("hidden_act", "need 'silu' (SwiGLU)")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "bos_token_id", "eos_token_id"):
        if hf.get(key) is None:
            raise UserError(f"{source}: {key!r} is missing or null")
    defaults = LlamaConfig()  # transformers' defaults for keys an older config.json may omit
    rope_theta, rope_scaling = _rope(hf, source, defaults.rope_parameters["rope_theta"])
    return dict(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], ffn_hidden_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"], num_attention_heads=hf["num_attention_heads"],
        num_query_groups=hf.get("num_key_value_heads") or hf["num_attention_heads"], head_dim=hf.get("head_dim"),
        rms_norm_eps=hf.get("rms_norm_eps", defaults.rms_norm_eps), rope_theta=float(rope_theta),
        rope_scaling=rope_scaling,
        max_position_embeddings=hf.get("max_position_embeddings", defaults.max_position_embeddings),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", defaults.tie_word_embeddings)),
        bos_token_id=hf["bos_token_id"], eos_token_id=hf_eos_token_ids(hf, source)[0])


def hf_eos_token_ids(hf: Mapping[str, Any], source: str = HF_CONFIG) -> list[int]:
    """``eos_token_id`` as a list (Llama-3 instruct configs list several; the model uses the first)."""
    eos = hf.get("eos_token_id")
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    if not eos or not all(isinstance(e, int) for e in eos):
        raise UserError(f"{source}: eos_token_id={hf.get('eos_token_id')!r} must be an int or a non-empty list")
    return eos


def _rope(hf: Mapping[str, Any], source: str, default_theta: float) -> tuple[float, Optional[RopeScaling]]:
    if hf.get("rope_parameters"):  # transformers >= 5
        key, params = "rope_parameters", dict(hf["rope_parameters"])
        theta = params.get("rope_theta", hf.get("rope_theta", default_theta))
    else:
        key, params = "rope_scaling", dict(hf.get("rope_scaling") or {})
        theta = hf.get("rope_theta", default_theta)
    if any(isinstance(v, Mapping) for v in params.values()):
        raise UserError(f"{source}: {key} holds per-layer-type parameters {sorted(params)}; Llama has one set")
    rope_type = params.get("rope_type", params.get("type")) or "default"
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise UserError(f"{source}: {key}.rope_type={rope_type!r} is not supported (need 'default' or 'llama3')")
    names = [f.name for f in fields(RopeScaling)]
    missing = [n for n in names if n not in params]
    if missing:
        raise UserError(f"{source}: {key} (rope_type 'llama3') lacks {missing}")
    return theta, RopeScaling(**{n: params[n] for n in names})


def hf_config_of(cfg: ModelConfig, eos_ids: list[int], dtype: torch.dtype):
    from transformers import LlamaConfig

    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        rope = {"rope_type": "llama3", "rope_theta": cfg.rope_theta,
                **{f.name: getattr(cfg.rope_scaling, f.name) for f in fields(RopeScaling)}}
    return LlamaConfig(
        architectures=["LlamaForCausalLM"], vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_query_groups, head_dim=cfg.head_dim,
        rms_norm_eps=cfg.rms_norm_eps, rope_parameters=rope, max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings, bos_token_id=cfg.bos_token_id,
        eos_token_id=eos_ids[0] if len(eos_ids) == 1 else eos_ids, hidden_act="silu", attention_bias=False,
        mlp_bias=False, dtype=str(dtype).removeprefix("torch."))


# ---------------------------------------------------------------------------------------------------- name mapping
def base_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a base checkpoint for ``cfg`` and its full (TP=1) shape."""
    h, hd, nq, ng, ffn, v = (cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_query_groups,
                             cfg.ffn_hidden_size, cfg.vocab_size)
    shapes: dict[str, tuple[int, ...]] = {"embedding.word_embeddings.weight": (v, h)}
    for i in range(cfg.num_layers):
        p = f"decoder.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (h,),
                       p + "self_attention.linear_qkv.weight": ((nq + 2 * ng) * hd, h),
                       p + "self_attention.linear_proj.weight": (h, nq * hd),
                       p + "mlp.pre_mlp_layernorm.weight": (h,),
                       p + "mlp.linear_fc1.weight": (2 * ffn, h), p + "mlp.linear_fc2.weight": (h, ffn)})
    shapes["decoder.final_layernorm.weight"] = (h,)
    if not cfg.tie_word_embeddings:
        shapes["output_layer.weight"] = (v, h)
    return shapes


class _Reader:
    """Takes tensors out of a state dict by name, checking shapes, and reports the names left unused."""

    def __init__(self, state: Mapping[str, torch.Tensor], source: str):
        self.state, self.source, self.used = state, source, set()

    def __call__(self, key: str, shape: tuple[int, ...]) -> torch.Tensor:
        if key not in self.state:
            raise UserError(f"{self.source}: missing tensor {key!r}")
        t = self.state[key]
        if tuple(t.shape) != tuple(shape):
            raise UserError(f"{self.source}: tensor {key!r} has shape {tuple(t.shape)}, expected {tuple(shape)}")
        self.used.add(key)
        return t

    def check_all_used(self, ignorable: tuple[str, ...] = ()) -> None:
        extra = sorted(k for k in self.state if k not in self.used and not k.endswith(ignorable))
        if extra:
            raise UserError(f"{self.source}: unexpected tensor(s) {extra[:5]}{' ...' if len(extra) > 5 else ''} "
                            f"for a {len(self.used)}-tensor model of this config")


def hf_to_megatron(hf_state: Mapping[str, torch.Tensor], cfg: ModelConfig,
                   source: str = "HF state") -> dict[str, torch.Tensor]:
    """HF ``LlamaForCausalLM`` names -> base (megatron) names; the inverse of :func:`megatron_to_hf`."""
    h, hd, nq, ng, ffn, v = (cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_query_groups,
                             cfg.ffn_hidden_size, cfg.vocab_size)
    take = _Reader(hf_state, source)
    out = {"embedding.word_embeddings.weight": take("model.embed_tokens.weight", (v, h))}
    shapes = base_shapes(cfg)
    for i in range(cfg.num_layers):
        hp, mp = f"model.layers.{i}.", f"decoder.layers.{i}."
        for hs, ms in _LAYER_RENAMES:
            out[mp + ms] = take(hp + hs, shapes[mp + ms])
        q = take(hp + "self_attn.q_proj.weight", (nq * hd, h)).reshape(ng, nq // ng, hd, h)
        k = take(hp + "self_attn.k_proj.weight", (ng * hd, h)).reshape(ng, 1, hd, h)
        val = take(hp + "self_attn.v_proj.weight", (ng * hd, h)).reshape(ng, 1, hd, h)
        qkv = torch.cat([q, k, val], dim=1)  # (ng, nq/ng + 2, hd, h): group g = its queries, key g, value g
        out[mp + "self_attention.linear_qkv.weight"] = qkv.reshape(-1, h)
        out[mp + "mlp.linear_fc1.weight"] = torch.cat([take(hp + "mlp.gate_proj.weight", (ffn, h)),
                                                       take(hp + "mlp.up_proj.weight", (ffn, h))])
    out["decoder.final_layernorm.weight"] = take("model.norm.weight", (h,))
    if not cfg.tie_word_embeddings:
        out["output_layer.weight"] = take("lm_head.weight", (v, h))
    # Older checkpoints store the RoPE buffer; tied ones may still store lm_head (HF ignores it too).
    take.check_all_used(("rotary_emb.inv_freq",) + (("lm_head.weight",) if cfg.tie_word_embeddings else ()))
    return out


def megatron_to_hf(state: Mapping[str, torch.Tensor], cfg: ModelConfig,
                   source: str = "base state") -> dict[str, torch.Tensor]:
    """Base (megatron) names -> HF ``LlamaForCausalLM`` names; the inverse of :func:`hf_to_megatron`."""
    h, hd, nq, ng, ffn = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_query_groups, \
        cfg.ffn_hidden_size
    take = _Reader(state, source)
    shapes = base_shapes(cfg)
    embedding = "embedding.word_embeddings.weight"
    out = {"model.embed_tokens.weight": take(embedding, shapes[embedding])}
    for i in range(cfg.num_layers):
        hp, mp = f"model.layers.{i}.", f"decoder.layers.{i}."
        for hs, ms in _LAYER_RENAMES:
            out[hp + hs] = take(mp + ms, shapes[mp + ms])
        qkv = take(mp + "self_attention.linear_qkv.weight", shapes[mp + "self_attention.linear_qkv.weight"])
        qkv = qkv.reshape(ng, nq // ng + 2, hd, h)
        # clone(): the pieces would otherwise share storage, which safetensors refuses to save
        out[hp + "self_attn.q_proj.weight"] = qkv[:, : nq // ng].reshape(nq * hd, h).clone()
        out[hp + "self_attn.k_proj.weight"] = qkv[:, -2].reshape(ng * hd, h).clone()
        out[hp + "self_attn.v_proj.weight"] = qkv[:, -1].reshape(ng * hd, h).clone()
        gate, up = take(mp + "mlp.linear_fc1.weight", (2 * ffn, h)).split(ffn)
        out[hp + "mlp.gate_proj.weight"], out[hp + "mlp.up_proj.weight"] = gate.clone(), up.clone()
    out["model.norm.weight"] = take("decoder.final_layernorm.weight", (h,))
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = take("output_layer.weight", shapes["output_layer.weight"])
    take.check_all_used()
    return out


# ---------------------------------------------------------------------------------------------------- safetensors IO
def write_safetensors(directory: Path, state: Mapping[str, torch.Tensor], max_shard_size: int | str,
                      name: str = "model") -> list[str]:
    """``model.safetensors``, or HF-style shards + index above ``max_shard_size`` (int bytes or '5GB', '500MB').
    ``name``: the file stem (``vision`` writes ``vision.safetensors`` / ``vision.safetensors.index.json``)."""
    from huggingface_hub import split_torch_state_dict_into_shards  # what transformers' save_pretrained uses
    from safetensors.torch import save_file

    tensors = {k: t.contiguous() for k, t in state.items()}
    try:
        split = split_torch_state_dict_into_shards(tensors, max_shard_size=max_shard_size,
                                                   filename_pattern=name + "{suffix}.safetensors")
    except ValueError as e:
        raise UserError(f"max_shard_size {max_shard_size!r}: {e}") from e
    for fname, names in split.filename_to_tensors.items():
        save_file({k: tensors[k] for k in names}, str(directory / fname), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (directory / f"{name}.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return sorted(split.filename_to_tensors)


class BaseWeights:
    """Lazy, read-only access to a safetensors directory (single file or index + shards).

    ``get(name, slices)`` reads only the requested slice (safetensors ``get_slice``), so a TP rank of an 8B model
    does not read full tensors. Use as a context manager, or call :meth:`close`. ``name``: the file stem
    (``model`` reads ``model.safetensors`` or ``model.safetensors.index.json``; a VLM base's ``vision``).
    """

    def __init__(self, directory: str | Path, name: str = "model"):
        self.directory = Path(directory)
        self._file_of = _weight_files(self.directory, name)
        self._handles: dict[Path, Any] = {}

    def keys(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, name: object) -> bool:
        return name in self._file_of

    def __len__(self) -> int:
        return len(self._file_of)

    def _open(self, name: str):
        from safetensors import safe_open

        if name not in self._file_of:
            raise UserError(f"{self.directory}: no tensor {name!r}")
        path = self._file_of[name]
        if path not in self._handles:
            handle = safe_open(str(path), framework="pt")
            self._handles[path] = (handle, set(handle.keys()))
        handle, names = self._handles[path]
        if name not in names:
            raise UserError(f"{self.directory}: its safetensors index maps {name!r} to {path.name}, which lacks it")
        return handle

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._open(name).get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        return _SAFETENSORS_DTYPES[self._open(name).get_slice(name).get_dtype()]

    def get(self, name: str, slices: Optional[tuple[slice, ...] | slice] = None) -> torch.Tensor:
        """The tensor ``name``, or only ``tensor[slices]`` read from disk (e.g. ``(slice(a, b),)`` for rows)."""
        handle = self._open(name)
        return handle.get_tensor(name) if slices is None else handle.get_slice(name)[slices]

    __getitem__ = get

    def close(self) -> None:
        for handle, _ in self._handles.values():
            handle.__exit__(None, None, None)
        self._handles.clear()

    def __enter__(self) -> "BaseWeights":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _weight_files(directory: Path, name: str = "model") -> dict[str, Path]:
    """Tensor name -> file, from the index or the single file; refuses torch pickles."""
    from safetensors import safe_open

    single, index = f"{name}.safetensors", f"{name}.safetensors.index.json"
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such directory")
    if (directory / index).is_file():
        index_path = directory / index
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(f"{index_path}: not a safetensors index with a 'weight_map' ({e!r})") from e
        for fname in sorted(set(weight_map.values())):
            if not (directory / fname).is_file():
                raise FileNotFoundError(f"{index_path}: shard {fname} does not exist")
        return {key: directory / fname for key, fname in weight_map.items()}
    if (directory / single).is_file():
        with safe_open(str(directory / single), framework="pt") as f:
            return {key: directory / single for key in f.keys()}
    pickles = [p for p in ("pytorch_model.bin", "pytorch_model.bin.index.json") if (directory / p).exists()]
    if pickles:
        raise UserError(f"{directory}: only {pickles[0]} (a torch pickle) found; LMFusion never unpickles weights. "
                        f"Re-save it as safetensors: <its model class>.from_pretrained(dir).save_pretrained(new_dir)")
    raise FileNotFoundError(f"{directory}: no {single} or {index}")


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: invalid JSON ({e})") from e


def read_hf_llama(hf_dir: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(ModelConfig kwargs without boi/eoi, HF state dict)`` from a Hugging Face Llama directory."""
    hf_dir = Path(hf_dir)
    kwargs = hf_config_to_model_kwargs(read_json(hf_dir / HF_CONFIG), source=str(hf_dir / HF_CONFIG))
    with BaseWeights(hf_dir) as weights:
        return kwargs, {name: weights.get(name) for name in weights.keys()}


def load_base_state(base_dir: str | Path) -> tuple[ModelConfig, BaseWeights]:
    """The config and lazy weights of a converted base; every tensor's presence and shape is checked (headers only)."""
    base_dir = Path(base_dir)
    if not (base_dir / BASE_CONFIG).is_file():
        raise FileNotFoundError(f"{base_dir}: no {BASE_CONFIG}; is this a converted base (lmfusion convert-hf)?")
    cfg = ModelConfig.load(base_dir / BASE_CONFIG)
    weights = BaseWeights(base_dir)
    try:
        expected = base_shapes(cfg)
        for name, shape in expected.items():
            if name not in weights:
                raise UserError(f"{base_dir}: missing tensor {name!r}")
            if weights.shape(name) != shape:
                raise UserError(f"{base_dir}: tensor {name!r} has shape {weights.shape(name)}, expected {shape}")
        extra = sorted(set(weights.keys()) - set(expected))
        if extra:
            raise UserError(f"{base_dir}: unexpected tensor(s) {extra[:5]} for {BASE_CONFIG}")
    except BaseException:
        weights.close()
        raise
    return cfg, weights


def tokenizer_token_id(directory: Path, token: str) -> Optional[int]:
    """The id of ``token`` in the tokenizer files of ``directory`` (tokenizer.json, else tokenizer_config.json)."""
    if (directory / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        token_id = Tokenizer.from_file(str(directory / "tokenizer.json")).token_to_id(token)
        if token_id is not None:
            return token_id
    if (directory / "tokenizer_config.json").is_file():
        decoder = read_json(directory / "tokenizer_config.json").get("added_tokens_decoder") or {}
        for token_id, entry in decoder.items():
            if isinstance(entry, Mapping) and entry.get("content") == token:
                return int(token_id)
    return None
