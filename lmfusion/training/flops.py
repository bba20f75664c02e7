"""Frozen-aware FLOP accounting: what one training step costs, per token class.

Per token and weight matrix of ``n`` parameters: forward 2n; backward through it (input gradient) 2n if the token is
on the gradient path; weight gradient 2n if the weight trains. So a trainable weight costs 6n, a frozen one on the
gradient path 4n, a frozen one off it 2n. In LMFusion:

* **image tokens** run through the trainable image set: 6n.
* **text tokens after an image of their document** (their hidden states depend on image weights through attention)
  run through the frozen text set but are on the gradient path: 4n.
* **text tokens before the first image of their document** (captions of caption-first samples, padding): nothing
  trainable is upstream, so no backward is needed: 2n. The routed GEMMs skip their data gradient
  (``RoutingPlan.build``'s ``no_dgrad``); autograd still runs the weight-free parts of their backward (attention
  dQ/dK/dV) and the frozen LM head's data gradient at every position, which :func:`step_flops` with
  ``as_implemented=True`` counts.
* **LM head** (frozen) at every position: 4n at on-path text positions, 2n elsewhere (image positions carry no loss).
* **attention** (no weights): 4 x heads x head_dim FLOPs per (query, key) pair the mask allows and layer, forward;
  x3 for on-path queries (backward computes dQ and dK/dV).
* **image encoder/decoder** (trainable): counted once per image with torch's FlopCounterMode, x3.
* **separation** (``model.separation``): image tokens run the routed slots' image twins (trainable: 6n) but the
  shared slots' frozen weights (4n): all of the layer's weights under 'deep', the FFN under 'shallow', none under
  'none'. With ``optimizer.text_lr_ratio`` > 0 every weight trains: the trainer counts 'all_trainable'.

Compared with: **everything trainable** (same LMFusion model, text unfrozen: 6n everywhere, LM head 6n at text
positions) and **Transfusion from scratch** (one dense weight set, all trainable; per step the same FLOPs as
"everything trainable" on the same data, but the paper's Transfusion recipe also trains on text-only data, which a
frozen-text LMFusion needs none of: ``text_only_share`` adds that many text-only rows).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from lmfusion.config import ModelConfig
from lmfusion.errors import UserError

__all__ = ["TokenCounts", "count_tokens", "ModelFlops", "model_flops", "step_flops", "compare", "peak_tflops",
           "datasheet_peak"]


@dataclass
class TokenCounts:
    """Token classes of a micro-batch or step (sums add up: ``a + b``)."""

    text_off: int = 0
    """Text (and padding) positions before the first image of their document: off the gradient path."""
    text_on: int = 0
    """Text positions after an image of their document."""
    image: int = 0
    images: int = 0
    attn_off: int = 0
    """(query, key) pairs the attention mask allows, with an off-path query."""
    attn_on: int = 0
    """(query, key) pairs with an on-path (image or text_on) query."""

    def __add__(self, other: "TokenCounts") -> "TokenCounts":
        return TokenCounts(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))

    @property
    def tokens(self) -> int:
        return self.text_off + self.text_on + self.image

    def as_list(self) -> list[int]:
        return list(dataclasses.astuple(self))


def count_tokens(modality_ids: Tensor, document_ids: Tensor) -> TokenCounts:
    """Classify every position of a (b, s) batch: 1 in ``modality_ids`` marks image tokens; documents are contiguous
    runs of one ``document_ids`` value per row (padding, -1, counts as text without images). Attention pairs follow
    the LMFusion mask: causal within a document plus every pair inside one image; a padding position attends only
    itself."""
    modality = modality_ids.long().cpu()
    docs = document_ids.long().cpu()
    b, s = modality.shape
    pos = torch.arange(s).expand(b, s)
    new_doc = torch.ones(b, s, dtype=torch.bool)
    new_doc[:, 1:] = docs[:, 1:] != docs[:, :-1]
    doc_start = torch.cummax(torch.where(new_doc, pos, torch.zeros_like(pos)), dim=1).values
    pos_in_doc = pos - doc_start  # (b, s)
    is_img = modality == 1
    # images seen so far in the document (inclusive): cumulative count minus the count before the document start
    cum = torch.cumsum(is_img.long(), dim=1)
    before = torch.gather(cum - is_img.long(), 1, doc_start)
    seen_image = (cum - before) > 0
    text_on = ~is_img & seen_image
    text_off = ~is_img & ~seen_image
    # keys per query: causal within the document, plus the later tokens of the query's own image
    new_img = is_img & ~torch.cat([torch.zeros(b, 1, dtype=torch.bool), is_img[:, :-1] & ~new_doc[:, 1:]], dim=1)
    img_start = torch.cummax(torch.where(new_img, pos, torch.zeros_like(pos)), dim=1).values
    run_len = _run_lengths(is_img, new_img)
    later_in_image = torch.where(is_img, run_len - (pos - img_start) - 1, torch.zeros_like(pos))
    keys = pos_in_doc + 1 + later_in_image
    keys = torch.where(docs < 0, torch.ones_like(keys), keys)  # padding attends only itself (attention.py)
    on = is_img | text_on
    return TokenCounts(text_off=int(text_off.sum()), text_on=int(text_on.sum()), image=int(is_img.sum()),
                       images=int(new_img.sum()), attn_off=int(keys[~on].sum()), attn_on=int(keys[on].sum()))


def _run_lengths(mask: Tensor, starts: Tensor) -> Tensor:
    """Length of the run of ``mask`` each position belongs to (0 outside runs); ``starts`` marks run starts."""
    run_id = torch.cumsum(starts.long(), dim=1) * mask.long()  # 1.. per row, 0 outside
    b = mask.shape[0]
    out = torch.zeros_like(run_id)
    for r in range(b):
        ids = run_id[r]
        counts = torch.bincount(ids)
        out[r] = torch.where(ids > 0, counts[ids], torch.zeros_like(ids))
    return out


@dataclass
class ModelFlops:
    """Forward FLOPs per unit of the model (LMFusion: per modality set, one set active per token)."""

    layer_linear: int
    """Per token and layer: 2 x (QKV + O + FC1 + FC2 parameters)."""
    lm_head: int
    """Per position: 2 x vocab x hidden."""
    attn_pair: int
    """Per (query, key) pair and layer: QK^T + AV."""
    image_io: int
    """Per image: image encoder + decoder forward."""
    num_layers: int
    routed_linear: int = -1
    """The part of ``layer_linear`` in routed slots (``model.separation``; -1: all of it)."""

    @property
    def image_trainable_linear(self) -> int:
        return self.layer_linear if self.routed_linear < 0 else self.routed_linear


def _image_io_flops(image_cfg, hidden: int) -> int:
    return _image_io_flops_cached(json.dumps(dataclasses.asdict(image_cfg), sort_keys=True), hidden)


@functools.lru_cache(maxsize=16)
def _image_io_flops_cached(image_json: str, hidden: int) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    from lmfusion.model.image_io import ImageIOConfig, build_image_io, tokens_per_image

    image_cfg = ImageIOConfig(**json.loads(image_json))

    with torch.device("meta"):  # shapes only: no memory, no init cost, any size
        encoder, decoder = build_image_io(image_cfg, hidden)
        x = torch.zeros(1, image_cfg.latent_channels, image_cfg.latent_size, image_cfg.latent_size)
        t = torch.zeros(1, dtype=torch.long)
        tokens = torch.zeros(1, tokens_per_image(image_cfg), hidden)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        encoder(x, t)
        decoder(tokens, x, t)
    return int(counter.get_total_flops())


def model_flops(cfg: ModelConfig) -> ModelFlops:
    h, d = cfg.hidden_size, cfg.head_dim
    qkv = h * (cfg.num_attention_heads + 2 * cfg.num_query_groups) * d
    proj = cfg.num_attention_heads * d * h
    mlp = 3 * h * cfg.ffn_hidden_size  # fused [gate; up] + down
    routed = {"deep": qkv + proj + mlp, "shallow": mlp, "none": 0}[cfg.separation]
    return ModelFlops(layer_linear=2 * (qkv + proj + mlp), lm_head=2 * cfg.vocab_size * h,
                      attn_pair=4 * cfg.num_attention_heads * d, image_io=_image_io_flops(cfg.image, h),
                      num_layers=cfg.num_layers, routed_linear=2 * routed)


def step_flops(cfg: ModelConfig, counts: TokenCounts, mode: str = "lmfusion", as_implemented: bool = False) -> float:
    """FLOPs of one step over ``counts`` (forward + backward). ``mode``: 'lmfusion' (text frozen), 'all_trainable'
    (text trained too) or 'transfusion' (one dense trainable set; same per-step FLOPs as 'all_trainable').
    ``as_implemented``: count backward through off-path text as autograd runs it (see module docstring)."""
    f = model_flops(cfg)
    L = f.num_layers
    c = counts
    text_tokens = c.text_off + c.text_on
    if mode == "lmfusion":
        off_mult = 2 if as_implemented else 1  # the LM head's data gradient runs at every position
        routed = f.image_trainable_linear  # image tokens: 6n through routed twins, 4n through shared frozen slots
        shared = f.layer_linear - routed  # megatron's dense layers run the data gradient of every token
        layers = L * (c.image * (3 * routed + 2 * shared) + f.layer_linear * 2 * c.text_on
                      + c.text_off * (routed + off_mult * shared))
        head = f.lm_head * (2 * c.text_on + off_mult * c.text_off + off_mult * c.image)
        attn = f.attn_pair * L * (3 * c.attn_on + (3 if as_implemented else 1) * c.attn_off)
    elif mode in ("all_trainable", "transfusion"):
        layers = f.layer_linear * L * 3 * c.tokens
        head = f.lm_head * (3 * text_tokens + (3 if as_implemented else 1) * c.image)
        attn = f.attn_pair * L * 3 * (c.attn_on + c.attn_off)
    else:
        raise ValueError(f"step_flops: mode must be lmfusion|all_trainable|transfusion, got {mode!r}")
    return float(layers + head + attn + 3 * f.image_io * c.images)


def text_only_row_flops(cfg: ModelConfig, seq_length: int) -> float:
    """A trainable dense model on one row of text-only data (one document filling the row)."""
    f = model_flops(cfg)
    pairs = seq_length * (seq_length + 1) // 2
    return float(3 * seq_length * (f.layer_linear * f.num_layers + f.lm_head) + 3 * f.attn_pair * f.num_layers * pairs)


def compare(cfg: ModelConfig, counts: TokenCounts, rows: int, seq_length: int,
            text_only_share: float = 0.5) -> dict[str, float]:
    """Per-step FLOPs of LMFusion, everything trainable, Transfusion on the same data, and Transfusion's recipe
    (its step also holds ``text_only_share`` of text-only rows: ``rows x share / (1 - share)`` extra rows)."""
    if not 0 <= text_only_share < 1:
        raise UserError(f"text_only_share must be in [0, 1), got {text_only_share}")
    out = {"lmfusion": step_flops(cfg, counts, "lmfusion"),
           "lmfusion_as_implemented": step_flops(cfg, counts, "lmfusion", as_implemented=True),
           "all_trainable": step_flops(cfg, counts, "all_trainable"),
           "transfusion_same_data": step_flops(cfg, counts, "transfusion")}
    extra_rows = rows * text_only_share / (1 - text_only_share)
    out["transfusion_recipe"] = out["transfusion_same_data"] + extra_rows * text_only_row_flops(cfg, seq_length)
    return out


# Dense (no sparsity) bf16 peak TFLOP/s per device: NVIDIA's datasheets give the sparse figure, halved here.
# Matched in order against ``torch.cuda.get_device_name()`` (case-insensitive), so variants come before the family:
# H100 SXM reports "NVIDIA H100 80GB HBM3", the PCIe card "NVIDIA H100 PCIe", the NVL card "NVIDIA H100 NVL".
_PEAKS = (
    ("H100 PCIe", 756.0),  # 1,513 sparse
    ("H100 NVL", 835.5),  # 1,671 sparse
    ("H200 NVL", 835.5),  # 1,671 sparse
    ("GH200", 989.4),  # the Grace Hopper superchip's H100/H200 runs at SXM clocks
    ("H200", 989.4),  # SXM, 1,979 sparse
    ("H100", 989.4),  # SXM ("H100 80GB HBM3"), 1,979 sparse
    ("A100", 312.0),  # SXM and PCIe alike
    ("B200", 2250.0),  # 4.5 PFLOP/s sparse
    ("L40S", 362.0),  # 733 sparse
)


def datasheet_peak(device_name: str) -> Optional[float]:
    """Dense bf16 peak TFLOP/s for a CUDA device name, or None when the device is not in the table."""
    name = device_name.lower()
    return next((peak for key, peak in _PEAKS if key.lower() in name), None)


def peak_tflops(configured: Optional[float] = None) -> Optional[float]:
    """The configured peak, else the datasheet value for the visible GPU, else None (CPU, or a GPU not in the table:
    no MFU; a warning then says to set ``logging.peak_tflops``)."""
    if configured is not None:
        return configured
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    peak = datasheet_peak(name)
    if peak is None:
        warnings.warn(f"no dense bf16 peak known for GPU {name!r}: MFU is not reported; set logging.peak_tflops "
                      f"(TFLOP/s per device) to report it", stacklevel=2)
    return peak
