"""The model section of the config: a Llama-3 text architecture plus the image side's settings
(:class:`ModelConfig`), and :func:`to_transformer_config`, the one adapter to megatron's ``TransformerConfig``.
Re-exported by :mod:`lmfusion.config`, which gathers every section.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import torch

from lmfusion.errors import UserError
from lmfusion.model.image_config import ImageIOConfig
from lmfusion.utils import check_choices

__all__ = ["ModelConfig", "RopeScaling", "to_transformer_config", "LLAMA3_BOI", "LLAMA3_EOI", "AttentionBackend",
           "LinearBackend", "Separation"]

# Choice fields: the annotation is the one list of allowed values (config_io and __post_init__ both read it).
AttentionBackend = Literal["auto", "sdpa", "flex", "te"]  # 'te' is typed so that the refusal can say why
LinearBackend = Literal["auto", "local", "te"]
Separation = Literal["deep", "shallow", "none"]

LLAMA3_BOI = 128002  # <|reserved_special_token_0|>
LLAMA3_EOI = 128003  # <|reserved_special_token_1|>


@dataclass
class RopeScaling:
    """Llama-3.1 RoPE frequency scaling (HF ``rope_scaling`` with ``rope_type: llama3``)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.high_freq_factor <= self.low_freq_factor:
            raise UserError(f"rope_scaling.high_freq_factor ({self.high_freq_factor}) must exceed "
                            f"low_freq_factor ({self.low_freq_factor})")


@dataclass
class ModelConfig:
    """LMFusion model: a Llama-3 text model plus image twins and image input/output layers."""

    vocab_size: int = 128256
    """Tokenizer vocabulary size (the embedding is padded to a multiple of ``vocab_pad_multiple * tp``)."""
    hidden_size: int = 4096
    ffn_hidden_size: int = 14336
    num_layers: int = 32
    num_attention_heads: int = 32
    num_query_groups: int = 8
    """Key/value heads (GQA); equal to ``num_attention_heads`` for plain multi-head attention."""
    head_dim: Optional[int] = None
    """Per-head size; default ``hidden_size // num_attention_heads``."""
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: Optional[RopeScaling] = None
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    vocab_pad_multiple: int = 128
    """Megatron pads the vocabulary to this multiple times TP so every rank holds an equal slice."""
    boi_token_id: int = LLAMA3_BOI
    """Begin-of-image token (default: Llama-3 ``<|reserved_special_token_0|>``)."""
    eoi_token_id: int = LLAMA3_EOI
    """End-of-image token (default: Llama-3 ``<|reserved_special_token_1|>``)."""
    bos_token_id: int = 128000
    eos_token_id: int = 128001
    image: ImageIOConfig = field(default_factory=ImageIOConfig)
    attention_backend: AttentionBackend = "auto"
    """'sdpa' (explicit mask; CPU), 'flex' (GPU default), or 'auto'. ('te' is refused: Transformer Engine has no
    fused kernel for this arbitrary mask; see lmfusion/model/attention.py.)"""
    linear_backend: LinearBackend = "auto"
    """'local' (pure torch), 'te' (Transformer Engine), or 'auto' (TE when it imports and a GPU is present)."""
    separation: Separation = "deep"
    """Which layer modules have an image twin (paper Section 5.1; megatron_ext/spec.py): 'deep' (all), 'shallow'
    (FFN, its norm, final norm) or 'none' (only the image encoder/decoder are image-specific). Same base for all."""

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScaling(**self.rope_scaling)
        if isinstance(self.image, dict):
            img = dict(self.image)
            for key in ("block_channels", "downsample"):
                if key in img and isinstance(img[key], list):
                    img[key] = tuple(img[key])
            self.image = ImageIOConfig(**img)
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise UserError(f"model.hidden_size {self.hidden_size} is not divisible by "
                                f"model.num_attention_heads {self.num_attention_heads}; set model.head_dim")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_query_groups:
            raise UserError(f"model.num_attention_heads {self.num_attention_heads} is not a multiple of "
                            f"model.num_query_groups {self.num_query_groups}")
        for name in ("boi_token_id", "eoi_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if not 0 <= value < self.vocab_size:
                raise UserError(f"model.{name} {value} is outside the vocabulary [0, {self.vocab_size}); "
                                f"set it to a token id the tokenizer reserves")
        if self.boi_token_id == self.eoi_token_id:
            raise UserError(f"model.boi_token_id and model.eoi_token_id are both {self.boi_token_id}")
        if self.attention_backend == "te":
            from lmfusion.model.attention import TE_REFUSED

            raise UserError(f"model.{TE_REFUSED}")
        check_choices("model", self, attention_backend=AttentionBackend, linear_backend=LinearBackend,
                      separation=Separation)

    # ------------------------------------------------------------------ derived
    def padded_vocab_size(self, tp: int) -> int:
        multiple = self.vocab_pad_multiple * tp
        return -(-self.vocab_size // multiple) * multiple

    def check_parallel(self, tp: int, pp: int = 1) -> None:
        """Clear errors for TP/PP sizes that do not divide the model."""
        for name in ("num_attention_heads", "num_query_groups", "ffn_hidden_size"):
            if getattr(self, name) % tp:
                raise UserError(f"tensor_model_parallel_size {tp} does not divide model.{name} "
                                f"{getattr(self, name)}")
        if self.num_layers % pp:
            raise UserError(f"pipeline_model_parallel_size {pp} does not divide model.num_layers {self.num_layers}")

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise UserError(f"{source}: unknown model key(s) {unknown}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        from lmfusion.utils import atomic_write_text

        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"{path}: cannot read model config ({e})") from e
        return cls.from_dict(data, source=str(path))


def to_transformer_config(model: ModelConfig, *, tp: int = 1, pp: int = 1, sequence_parallel: bool = False,
                          params_dtype: torch.dtype = torch.float32, use_cpu_initialization: bool = True,
                          perform_initialization: bool = True, **overrides: Any):
    """The megatron ``TransformerConfig`` for ``model`` at the given parallel sizes (the one adapter)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    model.check_parallel(tp, pp)
    kwargs: dict[str, Any] = dict(
        num_layers=model.num_layers, hidden_size=model.hidden_size, ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads, num_query_groups=model.num_query_groups,
        kv_channels=model.head_dim, layernorm_epsilon=model.rms_norm_eps, normalization="RMSNorm",
        gated_linear_unit=True, add_bias_linear=False, add_qkv_bias=False, hidden_dropout=0.0,
        attention_dropout=0.0, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        sequence_parallel=sequence_parallel and tp > 1, params_dtype=params_dtype, pipeline_dtype=params_dtype,
        use_cpu_initialization=use_cpu_initialization, perform_initialization=perform_initialization,
        bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        apply_rope_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False,
        bf16=params_dtype == torch.bfloat16,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)
