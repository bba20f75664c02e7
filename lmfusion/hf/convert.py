"""``lmfusion convert-hf`` / ``lmfusion export-hf``: a Hugging Face Llama directory -> an LMFusion base, and back.

The base format and the name mapping are :mod:`lmfusion.hf.llama`'s. Output directories are built in
``<output>.tmp-XXXX`` and moved into place with ``os.replace`` (atomic); ``--overwrite`` swaps an old one aside first.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Iterator, Mapping, Optional

import torch

from lmfusion.config import ModelConfig
from lmfusion.errors import UserError
from lmfusion.hf import llava
from lmfusion.hf.llama import (BASE_CONFIG, BOI_TOKEN, CONVERSION, DEFAULT_MAX_SHARD_SIZE, EOI_TOKEN, HF_CONFIG,
                               TOKENIZER_FILES, BaseWeights, hf_config_of, hf_config_to_model_kwargs,
                               hf_eos_token_ids, hf_to_megatron, load_base_state, megatron_to_hf, read_json,
                               tokenizer_token_id, write_safetensors)

__all__ = ["convert_hf", "export_hf", "add_subparser"]

_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "half": torch.float16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32}


def _resolve_dtype(dtype: str | torch.dtype | None, source: str = "--dtype") -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).removeprefix("torch.")
    if key not in _DTYPES:
        raise UserError(f"{source}: dtype {dtype!r} is not one of {sorted(_DTYPES)}")
    return _DTYPES[key]


def _copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    copied = [name for name in TOKENIZER_FILES if (src / name).is_file()]
    for name in copied:
        shutil.copy2(src / name, dst / name)
    return copied


@contextlib.contextmanager
def _atomic_dir(output: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``output`` (``os.replace``), else it is removed."""
    if output.exists():
        if not output.is_dir():
            raise FileExistsError(f"{output}: exists and is not a directory")
        if any(output.iterdir()) and not overwrite:
            raise FileExistsError(f"{output}: exists and is not empty; pass --overwrite to replace it")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{output.name}.tmp-", dir=output.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; a base is shared read-only
        yield tmp
        if output.exists() and any(output.iterdir()):  # --overwrite: move the old one aside, then swap
            old = output.with_name(f"{output.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(output, old)
            os.replace(tmp, output)
            shutil.rmtree(old)
        else:
            os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("lmfusion", "transformers", "safetensors", "torch"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "unknown"
    return out


def convert_hf(hf_dir: str | Path, output: str | Path, *, tp: int = 1, pp: int = 1,
               dtype: str | torch.dtype | None = None, boi: Optional[int] = None, eoi: Optional[int] = None,
               overwrite: bool = False, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """Convert a Hugging Face Llama directory into an LMFusion base directory at ``output``; returns ``output``.
    A ``LlavaNextForConditionalGeneration`` directory makes a VLM base (:mod:`lmfusion.hf.llava`): the same text
    base of its language model plus the vision tower, projector, ``image_newline`` and the processor's files.

    The base holds full tensors, so it is TP/PP-agnostic: each rank slices at load. ``tp``/``pp`` only check that
    the model divides (``ModelConfig.check_parallel``) and are recorded. ``dtype``: 'bf16'|'fp16'|'fp32' (default:
    the HF config's ``dtype``/``torch_dtype``, else as stored). ``boi``/``eoi`` default to the tokenizer's
    ``<|reserved_special_token_0|>``/``<|reserved_special_token_1|>``.
    """
    hf_dir, output = Path(hf_dir), Path(output)
    if output.exists() and output.is_dir() and any(output.iterdir()) and not overwrite:  # fail before reading weights
        raise FileExistsError(f"{output}: exists and is not empty; pass --overwrite to replace it")
    hf_config = read_json(hf_dir / HF_CONFIG)
    vlm = llava.is_llava_next(hf_config)
    source = str(hf_dir / HF_CONFIG)
    kwargs = llava.llava_model_kwargs(hf_config, source) if vlm else hf_config_to_model_kwargs(hf_config, source)
    with BaseWeights(hf_dir) as weights:
        hf_state = {name: weights.get(name) for name in weights.keys()}
    vision, layout = {}, {}
    if vlm:
        hf_state, vision, layout = llava.split_llava_state(hf_state, source=str(hf_dir))
        llava.check_vision_state({k: tuple(t.shape) for k, t in vision.items()}, hf_config, str(hf_dir))
    ids, id_sources = {}, {}
    for name, given, token, flag in (("boi", boi, BOI_TOKEN, "--boi-token-id"),
                                     ("eoi", eoi, EOI_TOKEN, "--eoi-token-id")):
        ids[name] = given if given is not None else tokenizer_token_id(hf_dir, token)
        id_sources[name] = "flag" if given is not None else f"tokenizer {token}"
        if ids[name] is None:
            raise UserError(f"{hf_dir}: the tokenizer files do not define {token}; pass {flag} (a token id the "
                            f"tokenizer reserves)")
    cfg = ModelConfig(**kwargs, boi_token_id=ids["boi"], eoi_token_id=ids["eoi"])
    text_config = hf_config["text_config"] if vlm else hf_config  # the LM's eos ids
    reserved = {cfg.bos_token_id, *hf_eos_token_ids(text_config)}
    if vlm:
        reserved.add(llava.image_token_id(hf_config))
    clash = {ids["boi"], ids["eoi"]} & reserved
    if clash:
        raise UserError(f"boi/eoi token id(s) {sorted(clash)} equal the bos/eos{'/image' if vlm else ''} ids of "
                        f"{hf_dir / HF_CONFIG}")
    cfg.check_parallel(tp, pp)
    target = _resolve_dtype(dtype) or _resolve_dtype(hf_config.get("dtype") or hf_config.get("torch_dtype"),
                                                      source=str(hf_dir / HF_CONFIG))
    state = hf_to_megatron(hf_state, cfg, source=str(hf_dir))
    if target is not None:
        state = {k: t.to(target) for k, t in state.items()}
        vision = {k: t.to(target) for k, t in vision.items()}
    stored = state["embedding.word_embeddings.weight"].dtype
    with _atomic_dir(output, overwrite) as tmp:
        files = write_safetensors(tmp, state, max_shard_size)
        cfg.save(tmp / BASE_CONFIG)
        tokenizer_files = _copy_tokenizer_files(hf_dir, tmp)
        versions = _versions()
        record = {
            "format": "lmfusion-base", "format_version": 1, "created_by": "lmfusion convert-hf",
            "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "source": str(hf_dir.resolve()),
            "source_config_sha256": hashlib.sha256((hf_dir / HF_CONFIG).read_bytes()).hexdigest(),
            "dtype": str(stored).removeprefix("torch."), "versions": versions,
            "transformers_version": versions["transformers"], "eos_token_ids": hf_eos_token_ids(text_config),
            "boi_eoi_source": id_sources, "checked_parallel": {"tp": tp, "pp": pp},
            "weight_files": files, "tokenizer_files": tokenizer_files, "num_tensors": len(state),
            "kind": "vlm" if vlm else "text"}
        if vlm:
            record.update(hf_architecture=llava.LLAVA_NEXT, hf_key_prefixes=layout,
                          image_token_id=llava.image_token_id(hf_config),
                          vision_weight_files=llava.write_vision(tmp, vision, hf_config, max_shard_size),
                          num_vision_tensors=len(vision),
                          processor_files=llava.copy_processor_files(hf_dir, tmp))
        (tmp / CONVERSION).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return output


def export_hf(base_dir: str | Path, output: str | Path, dtype: str | torch.dtype | None = None, *,
              state: Optional[Mapping[str, torch.Tensor]] = None, overwrite: bool = False,
              max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """Write a Hugging Face Llama directory (config.json, safetensors, tokenizer files) from a base; returns it.
    A VLM base exports a ``LlavaNextForConditionalGeneration`` directory in its source's key layout.

    ``state``: text weights in megatron naming (full tensors, e.g. gathered from a training checkpoint) to export
    instead of the base's own; rows of the embedding/output layer beyond ``vocab_size`` (megatron's vocabulary
    padding) are dropped. ``dtype`` defaults to the weights' dtype.
    """
    base_dir, output = Path(base_dir), Path(output)
    if state is None:
        cfg, weights = load_base_state(base_dir)
        with weights:
            state = {name: weights.get(name) for name in weights.keys()}
    else:
        if not (base_dir / BASE_CONFIG).is_file():
            raise FileNotFoundError(f"{base_dir}: no {BASE_CONFIG}")
        cfg = ModelConfig.load(base_dir / BASE_CONFIG)
        state = {k: (t[: cfg.vocab_size] if k in ("embedding.word_embeddings.weight", "output_layer.weight")
                     and t.shape[0] > cfg.vocab_size else t) for k, t in state.items()}
    hf_state = megatron_to_hf(state, cfg, source=str(base_dir))
    target = _resolve_dtype(dtype) or hf_state["model.embed_tokens.weight"].dtype
    hf_state = {k: t.to(target) for k, t in hf_state.items()}
    record = json.loads((base_dir / CONVERSION).read_text()) if (base_dir / CONVERSION).is_file() else {}
    eos_ids = record.get("eos_token_ids") or [cfg.eos_token_id]
    if eos_ids[0] != cfg.eos_token_id:  # the base config was edited after conversion: it wins
        eos_ids = [cfg.eos_token_id]
    vlm = llava.base_kind(base_dir) == "vlm"
    if vlm:  # the same LM, inside the LLaVA-NeXT layout the source had
        vlm_config, vision_weights = llava.load_vision_state(base_dir)
        with vision_weights:
            vision = {k: vision_weights.get(k).to(target) for k in vision_weights.keys()}
        hf_state = llava.join_llava_state(hf_state, vision, record.get("hf_key_prefixes") or llava.SAVE_LAYOUT)
        vlm_config = llava.export_llava_config(vlm_config, hf_config_of(cfg, eos_ids, target).to_dict(), target)
    with _atomic_dir(output, overwrite) as tmp:
        if vlm:
            (tmp / HF_CONFIG).write_text(json.dumps(vlm_config, indent=2, sort_keys=True) + "\n")
            llava.copy_processor_files(base_dir, tmp)
        else:
            hf_config_of(cfg, eos_ids, target).save_pretrained(tmp)
        write_safetensors(tmp, hf_state, max_shard_size)
        _copy_tokenizer_files(base_dir, tmp)
    return output


# ---------------------------------------------------------------------------------------------------- CLI
def _run_convert(args: argparse.Namespace) -> int:
    out = convert_hf(args.hf_dir, args.output, tp=args.tp, pp=args.pp, dtype=args.dtype, boi=args.boi_token_id,
                     eoi=args.eoi_token_id, overwrite=args.overwrite, max_shard_size=args.max_shard_size)
    print(f"lmfusion convert-hf: wrote {out}")
    return 0


def _run_export(args: argparse.Namespace) -> int:
    out = export_hf(args.ckpt, args.output, dtype=args.dtype, overwrite=args.overwrite,
                    max_shard_size=args.max_shard_size)
    print(f"lmfusion export-hf: wrote {out}")
    return 0


def add_subparser(subparsers: "argparse._SubParsersAction") -> None:
    """Register ``convert-hf`` and ``export-hf``."""
    p = subparsers.add_parser(
        "convert-hf", help="Hugging Face Llama or LLaVA-NeXT directory -> LMFusion base checkpoint",
        description="Convert a local Hugging Face Llama directory (safetensors) into an LMFusion base checkpoint; "
                    "a LlavaNextForConditionalGeneration directory (Llama LM, CLIP tower) makes a VLM base. "
                    "The base holds full tensors and serves every TP/PP layout (each rank slices at load); "
                    "--tp/--pp only check that the model divides and are recorded.")
    p.add_argument("--hf-dir", required=True, type=Path, help="directory with config.json and *.safetensors")
    p.add_argument("--output", required=True, type=Path, help="base checkpoint directory to create")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size to validate (not baked in)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to validate (not baked in)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="stored dtype (default: the HF config's)")
    p.add_argument("--boi-token-id", type=int, help=f"begin-of-image token id (default: the tokenizer's {BOI_TOKEN})")
    p.add_argument("--eoi-token-id", type=int, help=f"end-of-image token id (default: the tokenizer's {EOI_TOKEN})")
    p.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE, help="shard above this size (default 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    p.set_defaults(run=_run_convert)

    p = subparsers.add_parser("export-hf", help="LMFusion base checkpoint -> Hugging Face Llama directory",
                              description="Write the text model as a Hugging Face LlamaForCausalLM directory; a VLM "
                                          "base as a LlavaNextForConditionalGeneration directory.")
    p.add_argument("--ckpt", required=True, type=Path, help="base checkpoint directory (from convert-hf)")
    p.add_argument("--output", required=True, type=Path, help="Hugging Face directory to create")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="dtype to write (default: as stored)")
    p.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE, help="shard above this size (default 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    p.set_defaults(run=_run_export)
