"""Load a checkpoint for inference: a converted base, or a training checkpoint that refers to one.

Three kinds of ``--ckpt`` directory (the run directory's contract is :mod:`lmfusion.rundir`'s):

* **Base** (``lmfusion convert-hf``): ``lmfusion_config.json`` + safetensors + tokenizer files. Image twins start as
  copies of the text weights and the U-Net is random: text generation is the base LLM's, images are meaningless.
* **Export** (``lmfusion export-ckpt``): safetensors + JSON only, the image set and a copy of its base; nothing is
  unpickled: the form to share and to load from others.
* **Training checkpoint** (the user's own runs: megatron/torch distributed checkpoint files, read with code execution
  refused, see :mod:`lmfusion.rundir.trust`)::

      RUN_DIR/latest                        the newest complete iteration directory's name (a hint)
      RUN_DIR/iter_0000100/lmfusion_checkpoint.json
          {"base": "/path/to/base",         absolute, or relative to this JSON's directory
           "base_conversion_sha256": "...", the base's identity, checked before anything is built
           "integrity": {...},              sha256 of integrity.json, which hashes every other file (verified)
           "model": {...},                  ModelConfig.to_dict() of the trained model
           "vae": {...} | null,             the shard manifest's "vae" block (shard_format.LatentCodec.describe())
           "diffusion": {...},              DiffusionConfig of the run (objective -> sampler); absent: epsilon
           "model_key_prefix": ""}          optional: prefix of the model's keys in the sharded checkpoint
      RUN_DIR/iter_0000100/<megatron dist_checkpointing files of model.sharded_state_dict(prefix)>

  ``--ckpt`` may name the run directory (its newest complete iteration) or one iteration directory. The text weights come
  from the base, the image set from the dist checkpoint, which megatron reshards: it loads at any TP size. A run
  trained with ``optimizer.text_lr_ratio`` > 0 (``"text_lr_ratio"`` in its record) holds its text set too, which
  then replaces the base's.

Inference runs in one process by default: a one-rank gloo (CPU) or NCCL (GPU) group in an in-process store, megatron
model parallel state TP=PP=1, megatron CPU mode on CPU. Under ``torchrun`` the group spans the launched ranks and
TP = world size (every rank runs the same sampling with the same seeds; logits are gathered over TP).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any, NamedTuple, Optional

import torch

from lmfusion import rundir
from lmfusion.config import DiffusionConfig, ModelConfig
from lmfusion.errors import UserError
from lmfusion.hf import BASE_CONFIG, CONVERSION, load_base_state
from lmfusion.rundir import CHECKPOINT_JSON, LATEST
from lmfusion.rundir.export import EMA_SET, EXPORT_JSON, IMAGE_SET, is_export, load_export, read_export

__all__ = ["CHECKPOINT_JSON", "LATEST", "TEXT_FIELDS", "CheckpointMeta", "InferenceModel", "init_runtime",
           "resolve_device", "resolve_checkpoint", "record_diffusion", "checkpoint_base_dir", "checkpoint_diffusion",
           "checkpoint_vae",
           "load_for_inference", "load_vae", "load_tokenizer", "choose_weights"]

# Fields a training checkpoint's model config must share with its base (they fix the frozen text model's tensors
# and the meaning of its token ids); image, attention/linear backend and vocabulary padding may differ.
TEXT_FIELDS = ("vocab_size", "hidden_size", "ffn_hidden_size", "num_layers", "num_attention_heads",
               "num_query_groups", "head_dim", "rms_norm_eps", "rope_theta", "rope_scaling",
               "max_position_embeddings", "tie_word_embeddings", "bos_token_id", "eos_token_id", "boi_token_id",
               "eoi_token_id")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


@dataclasses.dataclass(frozen=True)
class CheckpointMeta:
    kind: str  # "base" | "training" | "export"
    path: Path  # the directory loaded (an iteration directory for training checkpoints)
    base_dir: Path
    stop_token_ids: tuple[int, ...]  # eos ids of the source model (Llama-3 instruct lists several)
    weights: str = "raw"  # "ema" (train.ema's average of the image set) or "raw"
    text_lr_ratio: float = 0.0  # > 0: the run trained its text set (it drifts from the base by design)


class InferenceModel(NamedTuple):
    model: torch.nn.Module  # LMFusionModel, eval mode, on the requested device
    config: ModelConfig
    tokenizer: Any  # transformers tokenizer, or None when the base has no tokenizer files
    vae: Optional[dict[str, Any]]  # the shard manifest's "vae" block, or None (base checkpoints)
    meta: CheckpointMeta
    diffusion: DiffusionConfig = DiffusionConfig()  # the objective it was trained with (its samplers)


# ---------------------------------------------------------------------------------------------------- runtime
def init_runtime(device: torch.device, tensor_model_parallel_size: Optional[int] = None) -> None:
    """Process group + megatron parallel state (+ CPU mode on CPU), each only if not set up already
    (:func:`megatron_ext.device.init_distributed`).

    ``tensor_model_parallel_size``: default every rank (one model sharded over all); 1 gives data parallelism
    (every rank a whole model, as sharded evaluation wants)."""
    from megatron_ext.device import init_distributed

    init_distributed(device, tensor_model_parallel_size=tensor_model_parallel_size)


# ---------------------------------------------------------------------------------------------------- files
_read_json = rundir.read_json


def resolve_checkpoint(ckpt: str | Path) -> tuple[str, Path]:
    """``("base", dir)``, ``("export", dir)`` or ``("training", iteration_dir)`` for a ``--ckpt`` argument."""
    ckpt = Path(ckpt).expanduser()
    if not ckpt.is_dir():
        raise FileNotFoundError(f"{ckpt}: no such checkpoint directory")
    if (ckpt / BASE_CONFIG).is_file():
        return "base", ckpt
    if is_export(ckpt):
        return "export", ckpt
    found = rundir.find_checkpoint(ckpt)
    if found is not None:
        return "training", found
    if (ckpt / "config.json").is_file():
        raise UserError(f"{ckpt}: a Hugging Face directory, not an LMFusion checkpoint; convert it first with "
                        f"`lmfusion convert-hf --hf-dir {ckpt} --output BASE_DIR`")
    raise FileNotFoundError(f"{ckpt}: expected a base ({BASE_CONFIG}), an export ({EXPORT_JSON}) or a training "
                            f"checkpoint (iter_*/{CHECKPOINT_JSON}), found none")


def _stop_token_ids(base_dir: Path, cfg: ModelConfig) -> tuple[int, ...]:
    ids = [cfg.eos_token_id]
    if (base_dir / CONVERSION).is_file():
        ids += [i for i in _read_json(base_dir / CONVERSION).get("eos_token_ids") or [] if isinstance(i, int)]
    return tuple(dict.fromkeys(ids))


def load_tokenizer(base_dir: Path):
    """The base's tokenizer (transformers ``AutoTokenizer``, local files only), or None if it has none."""
    if not any((base_dir / name).is_file() for name in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(base_dir), local_files_only=True)
    except (OSError, ValueError) as e:
        raise UserError(f"{base_dir}: cannot load the tokenizer files ({e})") from e


def _check_text_fields(trained: ModelConfig, base: ModelConfig, source: Path, base_dir: Path) -> None:
    for key in TEXT_FIELDS:
        a, b = getattr(trained, key), getattr(base, key)
        if a != b:
            raise UserError(f"{source}: model.{key}={a!r} does not match the base {base_dir / BASE_CONFIG} "
                            f"({b!r}); checkpoint and base config mismatch")


# ---------------------------------------------------------------------------------------------------- loading
def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device``, or this rank's CUDA device when CUDA is available, else CPU (:mod:`megatron_ext.device`)."""
    from megatron_ext.device import placement

    try:
        return placement(device).device
    except ValueError as e:  # megatron_ext sits below lmfusion: here a bad device is the user's --device
        raise UserError(str(e)) from None


def _read_record(kind: str, path: Path) -> tuple[dict[str, Any], Path]:
    """A training checkpoint's or an export's record and its path."""
    if kind == "export":
        return read_export(path), path / EXPORT_JSON
    return rundir.read_record(path), path / CHECKPOINT_JSON


def record_diffusion(record: dict[str, Any], record_path: Path) -> DiffusionConfig:
    """The diffusion section a record holds; records written before objectives were configurable are epsilon."""
    data = record.get("diffusion")
    if data is None:
        return DiffusionConfig()
    if not isinstance(data, dict):
        raise UserError(f"{record_path}: key 'diffusion' expected an object, found {type(data).__name__}")
    try:
        return DiffusionConfig(**data)
    except (TypeError, ValueError) as e:
        raise UserError(f"{record_path}: key 'diffusion': {e}") from None


def checkpoint_vae(ckpt: str | Path) -> tuple[Optional[dict[str, Any]], str]:
    """The VAE block a checkpoint records (None for a base) and where it was read, without building the model."""
    kind, path = resolve_checkpoint(ckpt)
    if kind == "base":
        return None, f"checkpoint {path}"
    record, record_path = _read_record(kind, path)
    return record.get("vae"), str(record_path)


def checkpoint_base_dir(ckpt: str | Path) -> Path:
    """The base directory a checkpoint (base, export or training checkpoint) reads its frozen model from, without
    building the model."""
    kind, path = resolve_checkpoint(ckpt)
    if kind == "base":
        return path
    record, record_path = _read_record(kind, path)
    return rundir.resolve_base(record, record_path)


def checkpoint_diffusion(ckpt: str | Path) -> DiffusionConfig:
    """The objective a checkpoint was trained with (a base: epsilon, untrained), without building the model."""
    kind, path = resolve_checkpoint(ckpt)
    if kind == "base":
        return DiffusionConfig()
    return record_diffusion(*_read_record(kind, path))


def choose_weights(weights: Optional[str], has_ema: bool, source: Path, kind: str) -> str:
    """``--weights``: 'ema', 'raw', or None (the EMA when the checkpoint has one, else raw with a note on stderr)."""
    if weights not in (None, "ema", "raw"):
        raise UserError(f"--weights must be 'ema' or 'raw', got {weights!r}")
    if weights == "raw":
        return "raw"
    if has_ema:
        return "ema"
    if weights == "ema":
        raise UserError(f"--weights ema: {source} holds no EMA weights (trained without train.ema.enabled=true); "
                        f"use --weights raw")
    if kind != "base":  # a base has no trained weights at all: nothing to note
        print(f"lmfusion: {source} holds no EMA weights; using the raw weights", file=sys.stderr, flush=True)
    return "raw"


def load_for_inference(ckpt: str | Path, device: str | torch.device | None = None,
                       dtype: torch.dtype = torch.float32, attention_backend: str = "sdpa",
                       weights: Optional[str] = None) -> InferenceModel:
    """Build the model for ``ckpt`` (base, export or training checkpoint) in eval mode on ``device`` (default: CUDA if
    available). ``dtype``: parameter dtype (fp32 reproduces the HF model's greedy text exactly). ``weights``: the
    image set to use, 'ema' (``train.ema``'s average), 'raw', or None: 'ema' when the checkpoint has one
    (:func:`choose_weights`).

    ``attention_backend`` defaults to SDPA with a dense mask: decoding steps have few queries (the mask is small) and
    a new key length at every step, which would recompile the shape-specialised compiled FlexAttention each time."""
    from lmfusion.model.builder import build_model

    device = resolve_device(device)
    kind, path = resolve_checkpoint(ckpt)
    saved = _read_record(kind, path)[0] if kind != "base" else {}
    ema_key = saved.get("ema_key_prefix") if kind == "training" else saved.get("ema")
    chosen = choose_weights(weights, bool(ema_key), path, kind)  # `weights` is the base's tensors below
    vae, prefix, diffusion = None, "", DiffusionConfig()
    if kind == "base":
        base_dir = path
        cfg, weights = load_base_state(base_dir)
    else:
        record, record_path = _read_record(kind, path)
        base_dir = rundir.resolve_base(record, record_path)
        if not (base_dir / BASE_CONFIG).is_file():
            raise FileNotFoundError(f"{record_path}: key 'base' names {base_dir}, which has no {BASE_CONFIG}")
        rundir.check_base(record, record_path, base_dir)
        cfg = ModelConfig.from_dict(record["model"], source=f"{record_path} key 'model'")
        vae = record.get("vae")
        diffusion = record_diffusion(record, record_path)
        prefix = str(record.get("model_key_prefix") or "")
        base_cfg, weights = load_base_state(base_dir)
        try:
            _check_text_fields(cfg, base_cfg, record_path, base_dir)
        except ValueError:
            weights.close()
            raise
    # backends are this machine's choice, not the checkpoint's (it may have been trained with TE on GPUs)
    cfg = dataclasses.replace(cfg, attention_backend=attention_backend, linear_backend="auto")
    init_runtime(device)
    try:
        if kind != "base" and not rundir.integrity.verify(path, record):
            print(f"lmfusion: {path} predates integrity manifests; its files are not verified", file=sys.stderr,
                  flush=True)
    except ValueError:
        weights.close()
        raise
    with weights:
        # a run whose text trained (optimizer.text_lr_ratio > 0) holds its text set too: loaded over the base's below
        model = build_model(cfg, base=weights, params_dtype=dtype, freeze=False, device=device,
                            train_text=float(saved.get("text_lr_ratio") or 0) > 0)
    if kind == "training":
        rundir.load_image_set(model, path, ema_key if chosen == "ema" else prefix)
    elif kind == "export":
        load_export(model, path, EMA_SET if chosen == "ema" else IMAGE_SET)
    from lmfusion.hf.llava import base_kind
    from lmfusion.model.vision import attach_vision_path

    if base_kind(base_dir) == "vlm":  # a VLM base's understanding path (lmfusion/model/vision.py), cast below
        attach_vision_path(model, base_dir)
    model.requires_grad_(False)
    # params_dtype covers megatron's modules only; the image encoder/decoder (plain torch) follow here, as megatron's
    # Float16Module casts the whole model in training.
    model = model.to(dtype=dtype).eval()
    meta = CheckpointMeta(kind, path, base_dir, _stop_token_ids(base_dir, cfg), chosen,
                          float(saved.get("text_lr_ratio") or 0))
    return InferenceModel(model, cfg, load_tokenizer(base_dir), vae, meta, diffusion)


# ---------------------------------------------------------------------------------------------------- VAE
def load_vae(spec: Optional[str], info: Optional[dict[str, Any]], device: torch.device, source: str = "checkpoint"):
    """The latent codec (``lmfusion.data.shard_format.LatentCodec``) to encode/decode images with.

    ``spec`` (``--vae``) wins: ``identity`` (pixels in [-1, 1]), a shard-set directory (its ``manifest.json``
    names the VAE), or a diffusers VAE directory. Otherwise ``info``: the shard manifest's ``vae`` block recorded in
    the checkpoint; the VAE found at its path must be the one the shards were built with (config hash)."""
    from lmfusion.data import shard_format as fmt

    if spec is None and info is None:
        raise UserError(f"no VAE: {source} names none (base checkpoints never do); pass --vae identity, a "
                        f"diffusers VAE directory, or the shard directory the model was trained on")
    if spec is not None and spec != "identity" and (Path(spec) / fmt.MANIFEST).is_file():
        info, source, spec = fmt.read_manifest(Path(spec)).get("vae"), str(Path(spec) / fmt.MANIFEST), None
        if not isinstance(info, dict):
            raise UserError(f"{source}: key 'vae' is missing")
    if spec is not None:
        if spec != "identity" and not Path(spec).expanduser().exists():
            raise FileNotFoundError(f"--vae {spec}: no such directory (expected 'identity', a diffusers VAE "
                                    f"directory or a shard directory)")
        return fmt.load_codec(spec, device, torch.float32)
    if info.get("kind") == "identity":
        return fmt.load_codec("identity", device, torch.float32)
    path = info.get("path")
    if not path or not Path(path).exists():
        raise FileNotFoundError(f"{source}: the VAE {info.get('id', path)!r} is not at {path!r}; pass --vae DIR")
    codec = fmt.load_codec(str(path), device, torch.float32)
    want = info.get("config_hash")
    if want and codec.config_hash != want:
        raise UserError(f"{source}: the VAE at {path} (config hash {codec.config_hash[:12]}) is not the one the "
                        f"shards were built with ({want[:12]})")
    return codec
