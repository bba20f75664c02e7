"""Hugging Face LLaVA-NeXT (``LlavaNextForConditionalGeneration``) <-> an LMFusion *VLM base*: the format, the
config checks and the name mapping (``convert-hf`` / ``export-hf`` dispatch here from :mod:`lmfusion.hf.convert`).

A VLM base is a text base (:mod:`lmfusion.hf.llama`) plus the understanding path, all read-only:

* The language model exactly as a text-only conversion of the same Llama writes it: ``model.safetensors`` (or its
  shards), ``lmfusion_config.json``, in megatron naming. Code that reads a text base reads a VLM base unchanged.
* ``vision.safetensors`` (or ``vision-0000K-of-0000N.safetensors`` + ``vision.safetensors.index.json``): the CLIP
  vision tower, the 2-layer GELU projector and ``image_newline`` under base names ``vision_tower.<CLIP name>``
  (the CLIP module tree ``embeddings``/``pre_layrnorm``/``encoder``/``post_layernorm``, without the ``vision_model.``
  level that transformers 4 had and 5 drops), ``multi_modal_projector.linear_{1,2}.*`` and ``image_newline``.
  ``post_layernorm`` and the layers past ``vision_feature_layer`` are unused by LLaVA but kept for the round trip.
* ``vlm_config.json``: the source ``config.json`` verbatim (``image_token_index``, ``image_grid_pinpoints``,
  ``vision_feature_layer``/``vision_feature_select_strategy``, ``vision_config``, ``text_config``...).
* The processor's files (:data:`PROCESSOR_FILES`) next to the tokenizer's.
* ``conversion.json`` records ``kind: "vlm"`` (text bases: ``"text"``; older ones have no key and are text) and the
  source's key layout (``hf_key_prefixes``), so that export writes the names the source had.

Design choices:

* **The LM is the text path, untouched.** Its HF names are mapped to ``LlamaForCausalLM`` names and go through the
  same :func:`~lmfusion.hf.llama.hf_to_megatron` as a text model, so a VLM base's LM tensors equal a text-only
  conversion's bit for bit and every TP/PP slicing, loader and export of the text path applies.
* **Vision weights apart.** The tower is replicated, frozen and lives on the first pipeline stage only; a separate
  file keeps the text base's tensor set (checked exactly at load) unchanged and lets stages that do not run the
  tower skip it. Every file sits at the top level, so the run record's per-file base hashes cover it.
* **Shapes from the real component.** The expected vision tensors and shapes are those of transformers'
  ``CLIPVisionModel`` built from ``vision_config`` on the meta device; no hand-kept table to drift.
* **Key layouts.** Hub checkpoints (``llava-hf/*``) store ``language_model.model.*``, ``language_model.lm_head.*``,
  ``vision_tower.vision_model.*``, ``multi_modal_projector.*``, ``image_newline``; transformers 5's
  ``save_pretrained`` drops ``vision_model.``; transformers 4.5x wrote ``model.``-prefixed names. All are read;
  each part must use one layout, which is recorded and written back on export.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from lmfusion.errors import UserError
from lmfusion.hf.llama import (CONVERSION, HF_CONFIG, BaseWeights, hf_config_to_model_kwargs, read_json,
                               write_safetensors)

__all__ = ["LLAVA_NEXT", "VLM_CONFIG", "VISION_NAME", "PROCESSOR_FILES", "KINDS", "SAVE_LAYOUT", "is_llava_next",
           "llava_model_kwargs", "resolved_text_config", "image_token_id", "split_llava_state", "join_llava_state",
           "vision_shapes", "check_vision_state", "write_vision", "load_vision_state", "base_kind",
           "export_llava_config", "copy_processor_files"]

LLAVA_NEXT = "LlavaNextForConditionalGeneration"
VLM_CONFIG = "vlm_config.json"
VISION_NAME = "vision"  # vision.safetensors / vision.safetensors.index.json
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "chat_template.json", "chat_template.jinja",
                   "added_tokens.json")
KINDS = ("text", "vlm")
# part -> the HF key prefixes it is found under, most specific first (a key belongs to its first match)
_HF_PREFIXES = {
    "language_model": ("language_model.model.", "model.language_model."),
    "lm_head": ("language_model.lm_head.", "lm_head."),
    "vision_tower": ("vision_tower.vision_model.", "model.vision_tower.vision_model.", "vision_tower.",
                     "model.vision_tower."),
    "multi_modal_projector": ("multi_modal_projector.", "model.multi_modal_projector."),
    "image_newline": ("image_newline", "model.image_newline"),
}
# part -> its prefix in the base (vision parts) or in LlamaForCausalLM naming (the LM, handed to hf_to_megatron)
_OUR_PREFIX = {"language_model": "model.", "lm_head": "lm_head.", "vision_tower": "vision_tower.",
               "multi_modal_projector": "multi_modal_projector.", "image_newline": "image_newline"}
_VISION_PARTS = ("vision_tower", "multi_modal_projector", "image_newline")
# What transformers 5's save_pretrained writes: export's layout for a base without a recorded one.
SAVE_LAYOUT = {"language_model": "language_model.model.", "lm_head": "language_model.lm_head.",
               "vision_tower": "vision_tower.", "multi_modal_projector": "multi_modal_projector.",
               "image_newline": "image_newline"}


# ---------------------------------------------------------------------------------------------------- config
def is_llava_next(hf: Mapping[str, Any]) -> bool:
    """Whether an HF ``config.json`` dict describes a LLaVA-NeXT model."""
    return hf.get("model_type") == "llava_next" or LLAVA_NEXT in (hf.get("architectures") or ())


def _defaults() -> Any:
    from transformers import LlavaNextConfig

    return LlavaNextConfig()


def llava_model_kwargs(hf: Mapping[str, Any], source: str = HF_CONFIG) -> dict[str, Any]:
    """``ModelConfig`` keyword arguments of the language model, after checking every field of a LLaVA-NeXT
    ``config.json`` that LMFusion relies on; a field it cannot serve raises one line naming it."""
    def bad(field: str, value: Any, need: str) -> UserError:
        return UserError(f"{source}: {field}={value!r} is not supported ({need})")

    if hf.get("model_type") != "llava_next":
        raise bad("model_type", hf.get("model_type"), "need 'llava_next'")
    if hf.get("architectures") is not None and list(hf["architectures"]) != [LLAVA_NEXT]:
        raise bad("architectures", hf["architectures"], f"need [{LLAVA_NEXT!r}]")
    text, vision = hf.get("text_config"), hf.get("vision_config")
    if not isinstance(text, Mapping) or text.get("model_type") != "llama":
        raise bad("text_config.model_type", text.get("model_type") if isinstance(text, Mapping) else text,
                  "need 'llama': LMFusion's text modules are Llama layers")
    if not isinstance(vision, Mapping) or vision.get("model_type") != "clip_vision_model":
        raise bad("vision_config.model_type", vision.get("model_type") if isinstance(vision, Mapping) else vision,
                  "need 'clip_vision_model' (a CLIP vision tower)")
    d = _defaults()
    if hf.get("projector_hidden_act", d.projector_hidden_act) != "gelu":
        raise bad("projector_hidden_act", hf.get("projector_hidden_act"), "need 'gelu': the 2-layer GELU projector")
    if hf.get("vision_feature_select_strategy", d.vision_feature_select_strategy) not in ("default", "full"):
        raise bad("vision_feature_select_strategy", hf.get("vision_feature_select_strategy"),
                  "need 'default' or 'full'")
    clip = _clip_config(vision)
    layer = hf.get("vision_feature_layer", d.vision_feature_layer)
    layers = [layer] if isinstance(layer, int) else layer
    n = clip.num_hidden_layers
    if not isinstance(layers, list) or not layers or not all(
            isinstance(i, int) and not isinstance(i, bool) and -(n + 1) <= i <= n for i in layers):
        raise bad("vision_feature_layer", layer, f"need an int or a list of ints in [-{n + 1}, {n}], "
                                                 f"vision_config.num_hidden_layers={n}")
    pins = hf.get("image_grid_pinpoints", d.image_grid_pinpoints)
    if not isinstance(pins, list) or not pins or not all(
            isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(x, int) and x > 0 and
                                                                 x % clip.image_size == 0 for x in p) for p in pins):
        raise bad("image_grid_pinpoints", pins, f"need a list of [height, width] pairs, each a multiple of "
                                                f"vision_config.image_size={clip.image_size}")
    kwargs = hf_config_to_model_kwargs(resolved_text_config(text, source), source=f"{source}: text_config")
    image_token = hf.get("image_token_index", hf.get("image_token_id", d.image_token_index))
    if not isinstance(image_token, int) or not 0 <= image_token < kwargs["vocab_size"]:
        raise bad("image_token_index", image_token, f"need a token id below text_config.vocab_size="
                                                    f"{kwargs['vocab_size']}")
    if "tie_word_embeddings" in hf and bool(hf["tie_word_embeddings"]) != kwargs["tie_word_embeddings"]:
        raise bad("tie_word_embeddings", hf["tie_word_embeddings"],
                  f"need it equal to text_config.tie_word_embeddings={kwargs['tie_word_embeddings']}")
    return kwargs


def resolved_text_config(text: Mapping[str, Any], source: str = HF_CONFIG) -> dict[str, Any]:
    """``text_config`` as transformers reads it: keys it omits take ``LlamaConfig``'s defaults. Hub LLaVA configs
    are sparse (``llava-hf/llama3-llava-next-8b-hf`` leaves ``hidden_size`` etc. to the defaults), unlike a
    standalone Llama ``config.json``, whose missing keys the text path reports."""
    from transformers import LlamaConfig

    try:
        return LlamaConfig.from_dict(dict(text)).to_dict()
    except (TypeError, ValueError) as e:
        raise UserError(f"{source}: text_config is not a valid Llama config ({str(e).splitlines()[0]})") from e


def image_token_id(hf: Mapping[str, Any]) -> int:
    """The ``<image>`` placeholder id of a LLaVA-NeXT config dict (checked by :func:`llava_model_kwargs`)."""
    return hf.get("image_token_index", hf.get("image_token_id", _defaults().image_token_index))


def _clip_config(vision: Mapping[str, Any]) -> Any:
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig.from_dict(dict(vision))


# ---------------------------------------------------------------------------------------------------- names
def split_llava_state(hf_state: Mapping[str, torch.Tensor], source: str = "HF state"
                      ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, str]]:
    """HF LLaVA-NeXT tensors -> ``(LM tensors in LlamaForCausalLM names, vision tensors in base names, layout)``;
    ``layout`` maps each part to the HF prefix it was stored under."""
    lm: dict[str, torch.Tensor] = {}
    vision: dict[str, torch.Tensor] = {}
    used: dict[str, set[str]] = {}
    for key, tensor in hf_state.items():
        match = next(((part, prefix) for part, prefixes in _HF_PREFIXES.items() for prefix in prefixes
                      if key.startswith(prefix)), None)
        if match is None:
            raise UserError(f"{source}: unexpected tensor {key!r} for a LLaVA-NeXT model (expected names under "
                            f"{sorted({p for ps in _HF_PREFIXES.values() for p in ps})})")
        part, prefix = match
        used.setdefault(part, set()).add(prefix)
        ours = _OUR_PREFIX[part] + key[len(prefix):]
        (vision if part in _VISION_PARTS else lm)[ours] = tensor
    for part, prefixes in used.items():
        if len(prefixes) > 1:
            raise UserError(f"{source}: the {part} tensors mix key layouts {sorted(prefixes)}; expected one")
    for part in ("language_model", *_VISION_PARTS):
        if part not in used:
            raise UserError(f"{source}: no {part} tensors (expected names starting with {_HF_PREFIXES[part][0]!r})")
    layout = {part: next(iter(used[part])) if part in used else SAVE_LAYOUT[part] for part in _HF_PREFIXES}
    if "lm_head" not in used:  # a tied LM stores none: follow the LM's layout
        layout["lm_head"] = _HF_PREFIXES["lm_head"][_HF_PREFIXES["language_model"].index(layout["language_model"])]
    return lm, vision, layout


def join_llava_state(lm: Mapping[str, torch.Tensor], vision: Mapping[str, torch.Tensor],
                     layout: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`split_llava_state`: LM (LlamaForCausalLM names) + vision (base names) -> HF names."""
    out = {}
    for state in (lm, vision):
        for key, tensor in state.items():
            part = next(p for p, prefix in _OUR_PREFIX.items() if key.startswith(prefix)
                        and (p in _VISION_PARTS) == (state is vision))
            out[layout.get(part, SAVE_LAYOUT[part]) + key[len(_OUR_PREFIX[part]):]] = tensor
    return out


def vision_shapes(hf: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every vision tensor of a VLM base (base names) and its shape, from transformers' ``CLIPVisionModel`` built
    from ``vision_config`` on the meta device, and the projector/newline sizes of ``config.json``."""
    from transformers import CLIPVisionModel

    d = _defaults()
    clip = _clip_config(hf["vision_config"])
    with torch.device("meta"):
        tower = CLIPVisionModel(clip)
    tower = getattr(tower, "vision_model", tower)  # transformers 4 nests the tree one level down
    shapes = {f"vision_tower.{k}": tuple(v.shape) for k, v in tower.state_dict().items()}
    text_hidden = hf["text_config"]["hidden_size"]
    layer = hf.get("vision_feature_layer", d.vision_feature_layer)
    n_layers = 1 if isinstance(layer, int) else len(layer)
    shapes["multi_modal_projector.linear_1.weight"] = (text_hidden, clip.hidden_size * n_layers)
    shapes["multi_modal_projector.linear_2.weight"] = (text_hidden, text_hidden)
    if hf.get("multimodal_projector_bias", d.multimodal_projector_bias):
        shapes["multi_modal_projector.linear_1.bias"] = (text_hidden,)
        shapes["multi_modal_projector.linear_2.bias"] = (text_hidden,)
    shapes["image_newline"] = (text_hidden,)
    return shapes


def check_vision_state(names_shapes: Mapping[str, tuple[int, ...]], hf: Mapping[str, Any], source: str) -> None:
    """Every expected vision tensor present with its shape, and nothing else; one line naming the first fault."""
    expected = vision_shapes(hf)
    for name, shape in expected.items():
        if name not in names_shapes:
            raise UserError(f"{source}: missing vision tensor {name!r}")
        if tuple(names_shapes[name]) != shape:
            raise UserError(f"{source}: vision tensor {name!r} has shape {tuple(names_shapes[name])}, "
                            f"expected {shape}")
    extra = sorted(set(names_shapes) - set(expected))
    if extra:
        raise UserError(f"{source}: unexpected vision tensor(s) {extra[:5]} for its vision_config")


# ---------------------------------------------------------------------------------------------------- base files
def write_vision(directory: Path, vision: Mapping[str, torch.Tensor], hf: Mapping[str, Any],
                 max_shard_size: int | str) -> list[str]:
    """Write ``vision.safetensors`` (or its shards) and ``vlm_config.json`` into a base being built."""
    files = write_safetensors(directory, vision, max_shard_size, name=VISION_NAME)
    (directory / VLM_CONFIG).write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    return files


def load_vision_state(base_dir: str | Path) -> tuple[dict[str, Any], BaseWeights]:
    """``(vlm_config.json dict, lazy vision weights)`` of a VLM base; every tensor's presence and shape checked."""
    base_dir = Path(base_dir)
    if base_kind(base_dir) != "vlm":
        raise UserError(f"{base_dir}/{CONVERSION}: kind is 'text'; a vision-language base (convert-hf of a "
                        f"{LLAVA_NEXT} directory) is needed")
    hf = read_json(base_dir / VLM_CONFIG)
    weights = BaseWeights(base_dir, name=VISION_NAME)
    try:
        check_vision_state({k: weights.shape(k) for k in weights.keys()}, hf, str(base_dir))
    except BaseException:
        weights.close()
        raise
    return hf, weights


def base_kind(base_dir: str | Path) -> str:
    """'text' or 'vlm', as ``conversion.json`` records it (bases converted before kinds existed are text)."""
    base_dir = Path(base_dir)
    record = read_json(base_dir / CONVERSION) if (base_dir / CONVERSION).is_file() else {}
    kind = record.get("kind", "text")
    if kind not in KINDS:
        raise UserError(f"{base_dir / CONVERSION}: kind={kind!r}, expected one of {list(KINDS)}")
    if (kind == "vlm") != (base_dir / VLM_CONFIG).is_file():
        raise UserError(f"{base_dir / CONVERSION}: kind={kind!r} but {VLM_CONFIG} is "
                        f"{'missing' if kind == 'vlm' else 'present'}")
    return kind


def export_llava_config(hf: Mapping[str, Any], text_hf: Mapping[str, Any], dtype: Optional[torch.dtype]
                        ) -> dict[str, Any]:
    """The ``config.json`` to export: the stored source config, its ``text_config`` replaced by ``text_hf`` (the
    base's ``lmfusion_config.json`` as HF Llama keys) only where the base's config was edited since conversion, and
    its dtype key set to ``dtype``."""
    def modelled(text: Mapping[str, Any]) -> dict[str, Any]:
        kwargs = hf_config_to_model_kwargs(resolved_text_config(text))
        kwargs["head_dim"] = kwargs["head_dim"] or kwargs["hidden_size"] // kwargs["num_attention_heads"]
        return kwargs

    out = json.loads(json.dumps(hf))
    stored = out["text_config"]
    if modelled(stored) != modelled(text_hf):  # the base's config wins; drop the pre-5 rope keys it replaces
        stored = {k: v for k, v in stored.items() if k not in ("rope_theta", "rope_scaling")}
        keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_parameters", "max_position_embeddings",
                "tie_word_embeddings", "bos_token_id", "eos_token_id")
        out["text_config"] = {**stored, **{k: text_hf[k] for k in keys}}
    if dtype is not None:
        name = str(dtype).removeprefix("torch.")
        for config in (out, out["text_config"], out["vision_config"]):
            key = "torch_dtype" if "torch_dtype" in config and "dtype" not in config else "dtype"
            if config is out or config.get(key) is not None:
                config[key] = name
    return out


def copy_processor_files(src: Path, dst: Path) -> list[str]:
    """Copy the processor's files (image processor, processor, chat template) that ``src`` has."""
    import shutil

    copied = [name for name in PROCESSOR_FILES if (src / name).is_file()]
    for name in copied:
        shutil.copy2(src / name, dst / name)
    return copied
