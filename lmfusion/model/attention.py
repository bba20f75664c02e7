"""Shared self-attention of LMFusion: one mask definition, several kernels.

The mask (Transfusion/LMFusion): a token ``q`` may attend key ``k`` iff both are in the same packed document and
``k <= q`` (causal) or both belong to the same image (bidirectional inside an image). Consequences the tests pin:
image tokens see their whole image and everything before it; text after an image sees the whole image; text
before an image does not; nothing crosses a document boundary; any number of images per sequence.

Id conventions (per token, shape (b, s), integer):

* ``document_ids``: the packed document a token belongs to, ``>= 0``. **Padding tokens carry -1**; they attend only
  themselves (the diagonal is always allowed), so no softmax row is empty (an all-masked row gives NaN in SDPA and
  flex). No real token attends a padding token. Padding outputs are garbage by design: give them no loss.
* ``image_ids``: ``-1`` for text (and padding), otherwise an id per image, distinct from the other images of its
  document (a running counter over the packed sequence is simplest; since the rule also requires the same
  document, ids may restart per document). ``<boi>``/``<eoi>`` are text tokens: they are causal.

Positions in the mask are indices into the packed sequence (not RoPE positions).

Backends (tensors in (b, h, s, d); GQA: ``hq`` a multiple of ``hkv``; softmax scale ``1/sqrt(d)``):

* ``"reference"``: explicit ``softmax(q k^T * scale + mask) v`` in plain torch. For tests only (O(s^2) memory).
* ``"sdpa"``: ``F.scaled_dot_product_attention`` with the dense boolean mask (True = attend). The CPU/test path;
  forward and backward.
* ``"flex"``: FlexAttention with a block mask built from :func:`make_mask_mod`; the GPU default (compiled there,
  eager on CPU). On CPU only its forward works: with inputs that require grad, torch raises NotImplementedError
  ("FlexAttention does not support backward on CPU") at the forward call (torch 2.13); train on CPU with "sdpa".

Transformer Engine's ``DotProductAttention`` is refused (:data:`TE_REFUSED`): with an arbitrary mask it has no
fused kernel and falls back to its unfused path, which saves the full score matrix for backward (at 8B, 32 heads x
4096^2 bf16 scores: 1 GiB per layer and micro-batch). FlexAttention runs this mask block-sparse and fused.

KV cache: ``q`` may be shorter than ``k``/``v``; the queries are then the *last* ``s_q`` positions of the sequence the
ids describe (ids always cover the full key length). The mask rows are those of the full mask, sliced.

Build one :class:`AttentionMask` per micro-batch and pass it to every layer: it caches the dense mask / block mask.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

__all__ = [
    "Backend",
    "BACKENDS",
    "PADDING_DOCUMENT_ID",
    "TEXT_IMAGE_ID",
    "allowed",
    "make_mask_mod",
    "dense_mask",
    "AttentionMask",
    "attend",
    "CoreAttention",
    "TE_REFUSED",
]

Backend = Literal["reference", "sdpa", "flex"]
BACKENDS: tuple[str, ...] = ("reference", "sdpa", "flex")
PADDING_DOCUMENT_ID = -1
TEXT_IMAGE_ID = -1

TE_REFUSED = ("attention_backend 'te' is not supported: Transformer Engine runs LMFusion's arbitrary mask in its "
              "unfused kernel (~1 GiB of saved scores per layer at 8B); use 'flex' (fused, block-sparse) or 'auto'")


def allowed(q_doc: Tensor, k_doc: Tensor, q_img: Tensor, k_img: Tensor, q_pos: Tensor, k_pos: Tensor) -> Tensor:
    """The one mask definition: may query ``q`` attend key ``k``? (True = attend.)

    Elementwise on broadcastable tensors, so the same code builds the dense mask (whole (s_q, s_k) grids) and the
    FlexAttention ``mask_mod`` (scalar tensors under vmap).
    """
    same_doc = (q_doc == k_doc) & (q_doc != PADDING_DOCUMENT_ID)
    same_image = (q_img == k_img) & (q_img != TEXT_IMAGE_ID)
    # The diagonal keeps padding rows non-empty; for real tokens it is already causal-allowed.
    return (same_doc & ((k_pos <= q_pos) | same_image)) | (k_pos == q_pos)


def _check_ids(document_ids: Tensor, image_ids: Tensor) -> None:
    if document_ids.dim() != 2 or document_ids.shape != image_ids.shape:
        raise ValueError(
            f"document_ids and image_ids must both be (b, s); got {tuple(document_ids.shape)} and "
            f"{tuple(image_ids.shape)}"
        )
    for name, ids in (("document_ids", document_ids), ("image_ids", image_ids)):
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor, got {ids.dtype}")


def _q_offset(s_k: int, q_len: int | None) -> int:
    q_len = s_k if q_len is None else q_len
    if not 0 < q_len <= s_k:
        raise ValueError(f"q_len={q_len} must be in [1, {s_k}] (the ids' sequence length)")
    return s_k - q_len


def make_mask_mod(document_ids: Tensor, image_ids: Tensor, q_len: int | None = None) -> Callable[..., Tensor]:
    """A FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` for ``create_block_mask``.

    ``document_ids``/``image_ids``: (b, s_k). With ``q_len < s_k`` the query index ``q_idx`` counts from the first of
    the last ``q_len`` positions (KV-cache decoding).
    """
    _check_ids(document_ids, image_ids)
    offset = _q_offset(document_ids.shape[1], q_len)

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        q_pos = q_idx + offset
        return allowed(
            document_ids[b, q_pos], document_ids[b, kv_idx], image_ids[b, q_pos], image_ids[b, kv_idx], q_pos, kv_idx
        )

    return mask_mod


def dense_mask(document_ids: Tensor, image_ids: Tensor, q_len: int | None = None) -> Tensor:
    """Boolean mask for SDPA, True = attend: ids (b, s_k) -> (b, 1, q_len, s_k) (q_len defaults to s_k).

    With ``q_len < s_k`` these are the last ``q_len`` rows of the full (s_k, s_k) mask (computed directly).
    """
    _check_ids(document_ids, image_ids)
    s_k = document_ids.shape[1]
    offset = _q_offset(s_k, q_len)
    k_pos = torch.arange(s_k, device=document_ids.device)
    q_pos = k_pos[offset:]
    q_doc, q_img = document_ids[:, offset:, None], image_ids[:, offset:, None]  # (b, s_q, 1)
    k_doc, k_img = document_ids[:, None, :], image_ids[:, None, :]  # (b, 1, s_k)
    mask = allowed(q_doc, k_doc, q_img, k_img, q_pos[:, None], k_pos[None, :])  # (b, s_q, s_k)
    return mask.unsqueeze(1)  # (b, 1, s_q, s_k): broadcast over heads


@dataclass(eq=False)
class AttentionMask:
    """The mask of one micro-batch, shared by every layer; materialised lazily per backend and cached.

    ``document_ids``, ``image_ids``: (b, s_k) integer ids (conventions in the module docstring).
    ``q_len``: number of query positions (the last ones); None = s_k (training / prefill).
    """

    document_ids: Tensor
    image_ids: Tensor
    q_len: int | None = None

    def __post_init__(self) -> None:
        _check_ids(self.document_ids, self.image_ids)
        _q_offset(self.kv_len, self.q_len)

    @property
    def kv_len(self) -> int:
        return self.document_ids.shape[1]

    @property
    def query_len(self) -> int:
        return self.kv_len if self.q_len is None else self.q_len

    @functools.cached_property
    def dense(self) -> Tensor:
        """(b, 1, s_q, s_k) bool, True = attend."""
        return dense_mask(self.document_ids, self.image_ids, self.q_len)

    @functools.cached_property
    def block_mask(self) -> BlockMask:
        """FlexAttention block mask (one head-broadcast mask per batch element)."""
        return create_block_mask(
            make_mask_mod(self.document_ids, self.image_ids, self.q_len),
            B=self.document_ids.shape[0],
            H=None,
            Q_LEN=self.query_len,
            KV_LEN=self.kv_len,
            device=self.document_ids.device,
        )


def _check_qkv(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask) -> None:
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise ValueError(f"q must be (b, hq, s_q, d) and k, v equal (b, hkv, s_k, d); got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    (b, hq, s_q, d), (bk, hkv, s_k, dk) = q.shape, k.shape
    if (b, d) != (bk, dk):
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch or head dim")
    if hq % hkv != 0:
        raise ValueError(f"GQA needs hq a multiple of hkv; got hq={hq}, hkv={hkv}")
    if (b, s_q, s_k) != (mask.document_ids.shape[0], mask.query_len, mask.kv_len):
        raise ValueError(f"mask is for (b={mask.document_ids.shape[0]}, s_q={mask.query_len}, s_k={mask.kv_len}) "
                         f"but q/k give (b={b}, s_q={s_q}, s_k={s_k})")


def _reference(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # (b, hq, s_k, d)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (b, hq, s_q, s_k)
    scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1) @ v  # (b, hq, s_q, d)


@functools.cache
def _compiled_flex() -> Callable[..., Tensor]:
    # Eager flex on GPU materialises the full score matrix; compiled it is the fused kernel.
    return torch.compile(flex_attention, dynamic=False)


def attend(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, backend: Backend = "sdpa") -> Tensor:
    """Masked softmax attention: q (b, hq, s_q, d), k/v (b, hkv, s_k, d) -> (b, hq, s_q, d)."""
    _check_qkv(q, k, v, mask)
    scale = 1.0 / math.sqrt(q.shape[-1])
    gqa = q.shape[1] != k.shape[1]
    if backend == "reference":
        return _reference(q, k, v, mask.dense)
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense, scale=scale, enable_gqa=gqa)
    if backend == "flex":
        fn = _compiled_flex() if q.is_cuda else flex_attention
        return fn(q, k, v, block_mask=mask.block_mask, scale=scale, enable_gqa=gqa)
    if backend == "te":
        raise ValueError(TE_REFUSED)
    raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")


class CoreAttention(nn.Module):
    """Core attention of one layer (no projections): softmax(q k^T / sqrt(d)) v under the LMFusion mask.

    Head counts are per tensor-parallel partition. No parameters.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, backend: Backend = "sdpa") -> None:
        super().__init__()
        if backend == "te":
            raise ValueError(TE_REFUSED)
        if backend not in BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"GQA needs num_heads a multiple of num_kv_heads; got {num_heads} and {num_kv_heads}")
        self.num_heads, self.num_kv_heads, self.head_dim, self.backend = num_heads, num_kv_heads, head_dim, backend

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask) -> Tensor:
        """q (b, hq, s_q, d), k/v (b, hkv, s_k, d) -> (b, hq, s_q, d)."""
        if q.shape[1] != self.num_heads or k.shape[1] != self.num_kv_heads or q.shape[-1] != self.head_dim:
            raise ValueError(f"CoreAttention built for hq={self.num_heads}, hkv={self.num_kv_heads}, "
                             f"d={self.head_dim}; got q {tuple(q.shape)}, k {tuple(k.shape)}")
        return attend(q, k, v, mask, self.backend)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, backend={self.backend}"
