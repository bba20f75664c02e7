"""Reading and writing :class:`lmfusion.config.Config`: YAML + ``key=value`` overrides, typed, with clear errors.

Precedence: dataclass defaults < the base checkpoint's model config < the YAML file < ``key=value`` overrides.

* **Keys** are dotted paths into the sections (``train.train_iters=100``, ``model.image.patch_size=2``). An unknown
  key is refused with the closest known one (``unknown key 'train.train_iter' (did you mean 'train.train_iters'?)``).
* **Values** are YAML scalars/lists (``parallel.sequence_parallel=true``, ``data.datasets=[a,b]``) and are converted
  to the field's type: PyYAML reads ``1e-4`` as a string (YAML 1.1), so numbers in strings are accepted for float
  fields; a bool is never taken for an int; anything else is refused naming the key, the value and the type.
* **The model** comes from the base (``init.base_checkpoint``, or the Hugging Face ``config.json`` of
  ``init.hf_dir``): the fields that fix the frozen text model (:data:`TEXT_FIELDS`) are read from it, and a config
  that sets one to another value is refused. Image I/O and backends are the config's.
* **The engine** is the one top-level value: ``engine: megatron`` (default) or ``engine: deepspeed`` (its settings in
  the ``deepspeed`` section).
* **Files build on files**: ``extends: ../llama3_8b.yaml`` at the top of a config reads that file first (relative
  to this one; chains allowed, loops refused) and merges this one over it, so a variant states only what differs.
* **Batch sizes** are set in ``train`` (Megatron's names); ``data.micro_batch_size``/``data.global_batch_size`` are
  refused (the loader takes them from ``train``).
* **Moved keys** (``train.timestep_density``/``timestep_logit_mean``/``timestep_logit_std`` -> ``diffusion.*``) are
  read under their new names, so older run directories' ``config.yaml`` still load.
* The resolved config (:func:`dump_config`) is what a run writes to ``<run>/config.yaml``; loading it gives the
  same :class:`Config` back.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import yaml

from lmfusion.config import (CheckpointConfig, Config, DeepSpeedConfig, DiffusionConfig, Engine, InitConfig,
                             LoggingConfig, ModelConfig, OptimConfig, ParallelConfig, RopeScaling, TrainConfig)
from lmfusion.data.config import DataConfig
from lmfusion.errors import UserError
from lmfusion.model.image_config import ImageIOConfig
from lmfusion.utils import literal_choices

__all__ = ["TEXT_FIELDS", "load_config", "config_from_dict", "parse_overrides", "dump_config", "write_config",
           "resolve_model"]

# The fields that fix the frozen text model's tensors and token ids (same list as inference's loader checks).
TEXT_FIELDS = ("vocab_size", "hidden_size", "ffn_hidden_size", "num_layers", "num_attention_heads",
               "num_query_groups", "head_dim", "rms_norm_eps", "rope_theta", "rope_scaling",
               "max_position_embeddings", "tie_word_embeddings", "bos_token_id", "eos_token_id", "boi_token_id",
               "eoi_token_id")
_SECTIONS = {"parallel": ParallelConfig, "train": TrainConfig, "optimizer": OptimConfig, "init": InitConfig,
             "checkpoint": CheckpointConfig, "logging": LoggingConfig, "deepspeed": DeepSpeedConfig,
             "diffusion": DiffusionConfig}
_SCALARS = {"engine": Engine}  # top-level keys that are values, not sections
_TRAIN_OWNED = ("micro_batch_size", "global_batch_size")
EXTENDS = "extends"
"""Top-level key of a config file naming the file it builds on."""

# Keys that moved: old (section, name) -> new. A config (or an older run's config.yaml) using the old key still loads.
_MOVED = {("train", name): ("diffusion", name)
          for name in ("timestep_density", "timestep_logit_mean", "timestep_logit_std")}


def _section_classes() -> dict[str, type]:
    return {"model": ModelConfig, "data": DataConfig, **_SECTIONS}


# ---------------------------------------------------------------------------------------------------- key paths
def _known_keys(cls: type, prefix: str) -> list[str]:
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        out.append(prefix + f.name)
        inner = _dataclass_of(hints.get(f.name))
        if inner is not None:
            out += _known_keys(inner, f"{prefix}{f.name}.")
    return out


def _all_known_keys() -> list[str]:
    keys = []
    for name, cls in _section_classes().items():
        keys.append(name)
        keys += _known_keys(cls, f"{name}.")
    return keys + list(_SCALARS)


def _unknown(key: str) -> UserError:
    known = _all_known_keys()
    leaf = key.rsplit(".", 1)[-1]
    # a key whose own name contains the unknown one's (train.warmup -> optimizer.lr_warmup_iters) beats a similar
    # spelling in the same section (train.recompute)
    named = [k for k in known if len(leaf) >= 4 and leaf in k.rsplit(".", 1)[-1]]
    close = difflib.get_close_matches(key, named, n=1, cutoff=0.0) if named else \
        difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return UserError(f"unknown config key '{key}'{hint}")


def _dataclass_of(tp: Any) -> Optional[type]:
    """The dataclass inside ``tp`` (itself or Optional[...]), else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if _is_union(tp) and len(args) == 1 and dataclasses.is_dataclass(args[0]):
        return args[0]
    return None


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


# ---------------------------------------------------------------------------------------------------- typed values
def _coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` as type ``tp`` (the field's annotation), or ValueError naming ``key``."""
    def bad(expected: str) -> UserError:
        return UserError(f"config key '{key}': expected {expected}, got {value!r}")

    if tp is Any:
        return value
    choices = literal_choices(tp)
    if choices is not None:  # the same one line as the dataclasses' own checks
        if value not in choices:
            raise UserError(f"{key} must be one of {choices}, got {value!r}")
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if _is_union(tp):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ValueError as e:
                errors.append(e)
        raise errors[0] if len(errors) == 1 else bad(" or ".join(str(a) for a in args))
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise bad(f"a mapping of {tp.__name__} fields")
        return _build(tp, value, key + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad("true or false")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise bad("an integer")
        try:
            number = float(value) if isinstance(value, str) else value
        except ValueError:
            raise bad("an integer") from None
        if number != int(number):
            raise bad("an integer")
        return int(number)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise bad("a number")
        try:
            return float(value)
        except ValueError:
            raise bad("a number") from None
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad("a string")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad("a list")
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            raise bad(f"a tuple {args}")
        item = args[0] if args else Any
        out = [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise bad("a mapping")
        return dict(value)
    return value


def _build(cls: type, data: Mapping[str, Any], prefix: str):
    """``cls(**data)`` with every value converted to its field's type; unknown keys refused with a suggestion."""
    if not isinstance(data, Mapping):
        raise UserError(f"config section '{prefix.rstrip('.')}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise _unknown(prefix + str(key))
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise UserError(f"config section '{prefix.rstrip('.')}': {e}") from None


# ---------------------------------------------------------------------------------------------------- overrides
def parse_overrides(overrides: Iterable[str]) -> dict[str, Any]:
    """``["train.train_iters=10", "data.datasets=[a,b]"]`` -> nested dict (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"override {item!r} is not key=value (e.g. train.train_iters=100)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise UserError(f"override {item!r}: value is not valid YAML ({e})") from None
        _set_path(out, key.split("."), value, key)
    return out


def _set_path(tree: dict[str, Any], parts: list[str], value: Any, key: str) -> None:
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"override '{key}': '{part}' is a value, not a section")
    node[parts[-1]] = value


def _merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge (``top`` wins); mappings merge, everything else is replaced."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


# ---------------------------------------------------------------------------------------------------- model
def _base_model_fields(init: InitConfig, user_model: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """The text fields of the base named by ``init`` and where they were read."""
    from lmfusion import hf

    if init.base_checkpoint is not None:
        path = Path(init.base_checkpoint).expanduser() / hf.BASE_CONFIG
        if not path.is_file():
            raise FileNotFoundError(f"init.base_checkpoint: {path} does not exist (convert a Hugging Face model with "
                                    f"`lmfusion convert-hf`, or set init.hf_dir)")
        base = ModelConfig.load(path)
        return {k: getattr(base, k) for k in TEXT_FIELDS}, str(path)
    hf_dir = Path(init.hf_dir).expanduser()
    path = hf_dir / hf.HF_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"init.hf_dir: {path} does not exist")
    from lmfusion.hf import llava

    hf_config = json.loads(path.read_text())
    fields = (llava.llava_model_kwargs(hf_config, str(path)) if llava.is_llava_next(hf_config)  # a VLM's LM
              else hf.hf_config_to_model_kwargs(hf_config, source=str(path)))
    for name, token in (("boi_token_id", hf.BOI_TOKEN), ("eoi_token_id", hf.EOI_TOKEN)):
        if name in user_model:
            fields[name] = _coerce(user_model[name], int, f"model.{name}")
        else:
            token_id = hf.tokenizer_token_id(hf_dir, token)
            if token_id is None:
                raise UserError(f"init.hf_dir: the tokenizer of {hf_dir} does not define {token}; set "
                                f"model.{name}")
            fields[name] = token_id
    return fields, str(path)


def resolve_model(init: InitConfig, user_model: Mapping[str, Any]) -> ModelConfig:
    """The run's ModelConfig: text fields from the base, the rest from the config (``user_model``: its YAML dict)."""
    base_fields, source = _base_model_fields(init, user_model)
    base_model = ModelConfig(**{k: v for k, v in base_fields.items() if k in TEXT_FIELDS})
    model = _build(ModelConfig, _merge(dataclasses.asdict(base_model), user_model), "model.")
    for key in TEXT_FIELDS:
        if key in user_model and getattr(model, key) != getattr(base_model, key):
            raise UserError(f"model.{key}={getattr(model, key)!r} conflicts with the base ({source}: "
                            f"{getattr(base_model, key)!r}); the frozen text model fixes it, remove the key")
    return model


# ---------------------------------------------------------------------------------------------------- entry points
def config_from_dict(data: Mapping[str, Any], resolve_base: bool = True) -> Config:
    """A :class:`Config` from a nested dict (YAML + overrides merged). ``resolve_base=False`` takes the model
    section as given (no base read): for a resolved config, or tests."""
    if not isinstance(data, Mapping):
        raise UserError(f"config must be a mapping of sections, got {type(data).__name__}")
    classes = _section_classes()
    for key in data:
        if key not in classes and key not in _SCALARS:
            raise _unknown(str(key))
    data = _move_keys(data)
    data_section = dict(data.get("data") or {})
    for key in _TRAIN_OWNED:
        if key in data_section:
            raise UserError(f"config key 'data.{key}': set train.{key} instead (the loader takes it from there)")
    sections = {name: _build(cls, data.get(name) or {}, f"{name}.") for name, cls in _SECTIONS.items()}
    model_dict = dict(data.get("model") or {})
    if resolve_base:
        model = resolve_model(sections["init"], model_dict)
    else:
        model = _build(ModelConfig, model_dict, "model.")
    data_cfg = _build(classes["data"], {**data_section, "micro_batch_size": sections["train"].micro_batch_size,
                                        "global_batch_size": sections["train"].global_batch_size}, "data.")
    scalars = {k: _coerce(data[k], tp, k) for k, tp in _SCALARS.items() if data.get(k) is not None}
    return Config(model=model, data=data_cfg, **sections, **scalars)


def _move_keys(data: Mapping[str, Any]) -> dict[str, Any]:
    """Old keys (:data:`_MOVED`) under their new names; setting both to different values is refused."""
    out = dict(data)
    for (old_sec, key), (new_sec, new_key) in _MOVED.items():
        old = out.get(old_sec)
        if not isinstance(old, Mapping) or key not in old:
            continue
        old = dict(old)
        value = old.pop(key)
        new = dict(out.get(new_sec) or {})
        if new_key in new and new[new_key] != value:
            raise ValueError(f"config key '{old_sec}.{key}' moved to '{new_sec}.{new_key}'; both are set "
                             f"({value!r} and {new[new_key]!r}): keep '{new_sec}.{new_key}' only")
        new[new_key] = value
        out[old_sec], out[new_sec] = old, new
    return out


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file's mapping with its ``extends`` chain merged under it (the named file, relative to this one,
    first; this file's keys win; mappings merge key by key, lists and scalars are replaced)."""
    if not path.is_file():
        where = f" (extended by {chain[-1]})" if chain else ""
        raise FileNotFoundError(f"{path}: no such config file{where}")
    if path.resolve() in chain:
        raise UserError(f"{path}: 'extends' loops back to a file already read ({' -> '.join(map(str, chain))})")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path}: invalid YAML ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    parent = data.pop(EXTENDS, None)
    if parent is None:
        return data
    if not isinstance(parent, str) or not parent:
        raise UserError(f"{path}: field '{EXTENDS}' expected the path of a config file, found {parent!r}")
    return _merge(_read_yaml(path.parent / parent, (*chain, path.resolve())), data)


def load_config(path: str | Path | None, overrides: Sequence[str] = (), resolve_base: bool = True) -> Config:
    """Read a YAML config (``path`` may be None: overrides only; ``extends: FILE`` at its top builds on another)
    and apply ``key=value`` overrides."""
    data = _read_yaml(Path(path)) if path is not None else {}
    return config_from_dict(_merge(data, parse_overrides(overrides)), resolve_base=resolve_base)


def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    return obj


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML (every field, defaults included). Batch sizes appear under ``train`` only."""
    tree = _plain(cfg)
    for key in _TRAIN_OWNED:
        tree["data"].pop(key, None)
    return yaml.safe_dump(tree, sort_keys=False, default_flow_style=None, width=120)


def write_config(cfg: Config, path: str | Path) -> None:
    """Atomically write :func:`dump_config` to ``path``."""
    from lmfusion.utils import atomic_write_text

    atomic_write_text(Path(path), dump_config(cfg))


# RopeScaling / ImageIOConfig are reached through ModelConfig's annotations; keep the names imported for get_type_hints.
_ = (RopeScaling, ImageIOConfig)
