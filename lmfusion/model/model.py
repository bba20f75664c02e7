"""LMFusionModel: a Llama-3 text model with image twins, on megatron-core (TP, SP, PP).

    tokens --embedding (frozen)--+
                                  +--> hidden (s, b, h) --> LMFusionLayer x L --> routed final norm --+--> LM head (frozen) --> logits
    x_t, t --image encoder ------+   (image tokens replace their positions)                          +--> image decoder --> predicted noise

Pipeline parallelism: the first stage (``pre_process``) embeds text and image tokens, the last (``post_process``)
holds the final norm, LM head and image decoder; other stages take their input through ``set_input_tensor``.
Every stage builds the micro-batch's routing plan, mask and RoPE table once from the same
:class:`ModelInputs` (they are cheap and identical on all stages) and hands them to each of its layers.

Tied embeddings: with frozen text the last stage may hold its own frozen copy of the embedding as the LM head (no
embedding-gradient sync between stages is needed); at PP=1 the head reads the embedding parameter itself. When the
text trains (``optimizer.text_lr_ratio`` > 0) the copy is kept equal as megatron's GPTModel keeps it: the embedding
group sums both stages' gradients (:meth:`LMFusionModel.tie_trained_embedding`).

``model.separation`` decides which layer slots (and the final norm) are routed or shared (``megatron_ext/spec.py``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from megatron.core import parallel_state
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.tensor_parallel import ColumnParallelLinear, VocabParallelEmbedding
from megatron.core.tensor_parallel.mappings import (
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_tp_sharded_tensor_for_checkpoint,
    sharded_state_dict_default,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from lmfusion.config import ModelConfig
from lmfusion.errors import UserError
from lmfusion.model.attention import AttentionMask
from lmfusion.model.image_io import build_image_io, tokens_per_image
from lmfusion.model.kv_cache import KVCache
from lmfusion.model.layer import LayerContext, lmfusion_layer_spec
from lmfusion.model.weights import is_image_param
from megatron_ext.linear import tag_partitioned
from megatron_ext.routing import IMAGE, RoutingPlan
from megatron_ext.te_linear import fp8_pad_multiple
from megatron_ext.spec import resolve_backend, routed_layer_submodules

__all__ = ["ModelInputs", "LMFusionOutput", "LMFusionModel", "resolve_attention_backend", "text_before_images"]


def resolve_attention_backend(name: str) -> str:
    if name == "auto":
        return "flex" if torch.cuda.is_available() else "sdpa"
    return name


@dataclass
class ModelInputs:
    """One micro-batch as the model sees it. Image ``j`` occupies ``tokens_per_image`` positions starting at
    ``image_start[j]`` in row ``image_batch[j]`` (between its ``<boi>`` and ``<eoi>`` tokens).

    tokens: (b, s) token ids (any id at image positions; they are replaced by image tokens).
    document_ids: (b, s) packed-document id per token, -1 for padding (attention never crosses documents).
    position_ids: (b, s) RoPE positions, or None for 0..s-1 in every row.
    image_latents: (n_img, C, H, W) noisy latents x_t fed to the image encoder (clean ones for understanding).
    image_timesteps: (n_img,) diffusion step of each image.
    image_batch / image_start: (n_img,) row and first position of each image.
    pixel_values / image_sizes: understanding images of a VLM base (LLaVA-NeXT processor output), whose features
    replace the ``<image>`` placeholder tokens (:mod:`lmfusion.model.vision`); those stay text tokens.
    """

    tokens: Tensor
    document_ids: Tensor
    position_ids: Optional[Tensor] = None
    image_latents: Optional[Tensor] = None
    image_timesteps: Optional[Tensor] = None
    image_batch: Optional[Tensor] = None
    image_start: Optional[Tensor] = None
    pixel_values: Optional[Tensor] = None
    image_sizes: Optional[Tensor] = None

    @property
    def num_images(self) -> int:
        return 0 if self.image_batch is None else int(self.image_batch.numel())

    def image_layout(self, n_tokens: int) -> tuple[Tensor, Tensor, Tensor]:
        """(modality_ids (b, s), image_ids (b, s), flat (n_img * n_tokens,) indices into the (s, b) flattening)."""
        b, s = self.tokens.shape
        device = self.tokens.device
        modality = torch.zeros(b, s, dtype=torch.long, device=device)
        image_ids = torch.full((b, s), -1, dtype=torch.long, device=device)
        if self.num_images == 0:
            return modality, image_ids, torch.empty(0, dtype=torch.long, device=device)
        for name in ("image_latents", "image_timesteps", "image_start"):
            value = getattr(self, name)
            if value is None or value.shape[0] != self.num_images:
                raise ValueError(f"ModelInputs.{name} must have {self.num_images} entries (one per image)")
        start, row = self.image_start.long(), self.image_batch.long()
        if bool((start < 0).any()) or bool((start + n_tokens > s).any()) or bool((row < 0).any() | (row >= b).any()):
            raise ValueError(f"ModelInputs: an image ({n_tokens} tokens) does not fit in the (b={b}, s={s}) batch")
        pos = start[:, None] + torch.arange(n_tokens, device=device)  # (n_img, T)
        rows = row[:, None].expand_as(pos)
        if int(modality[rows, pos].sum()) or torch.unique(rows * s + pos).numel() != pos.numel():
            raise ValueError("ModelInputs: images overlap")
        modality[rows, pos] = IMAGE
        image_ids[rows, pos] = torch.arange(self.num_images, device=device)[:, None].expand_as(pos)
        flat = (pos * b + rows).reshape(-1)  # token index in the (s, b) flattening
        return modality, image_ids, flat


def text_before_images(modality: Tensor, document_ids: Tensor) -> Tensor:
    """(b, s) bool: text tokens with no image token earlier in their document (padding, id -1, included).

    Such a token attends only to earlier text of its document (the attention rule), so with the text weights
    frozen its hidden states at every layer are fixed by its tokens: nothing trainable reaches it.
    """
    b, s = modality.shape
    pos = torch.arange(s, device=modality.device).expand(b, s)
    docs = document_ids.long() + 1  # padding -1 -> 0
    width = int(docs.max()) + 1 if docs.numel() else 1
    slot = docs + width * torch.arange(b, device=modality.device)[:, None]  # (row, document) -> one index
    is_image = modality == IMAGE
    first_image = torch.full((b * width,), s, dtype=torch.long, device=modality.device)
    first_image.scatter_reduce_(0, slot[is_image], pos[is_image], reduce="amin")
    return ~is_image & (pos < first_image[slot])


@dataclass
class LMFusionOutput:
    """Last-stage output. logits: (s, b, padded_vocab / tp), vocab-parallel; noise_pred: (n_img, C, H, W)."""

    logits: Tensor
    noise_pred: Optional[Tensor]


class TextEmbedding(MegatronModule):
    """Holds ``word_embeddings`` (megatron naming); a MegatronModule so its TP shards checkpoint as shards."""

    def __init__(self, config: TransformerConfig, padded_vocab: int, hidden: int):
        super().__init__(config=config)
        self.word_embeddings = VocabParallelEmbedding(padded_vocab, hidden, init_method=config.init_method,
                                                      config=config)


class Decoder(MegatronModule):
    """``layers`` (this stage's) and, on the last stage, ``final_layernorm``.

    ``sharded_state_dict`` numbers layers globally, as megatron's TransformerBlock: checkpoint keys are
    ``decoder.layers.*`` with the layer index as a sharded axis, so a checkpoint reshards across PP sizes. (A plain
    ``ModuleList`` between MegatronModules would be saved TP-replicated: only TP rank 0's shard would survive.)
    """

    def __init__(self, config: TransformerConfig, layers: list[MegatronModule]):
        super().__init__(config=config)
        self.layers = torch.nn.ModuleList(layers)
        self.recompute: Optional[Callable[..., Tensor]] = None
        """Activation recompute: ``recompute(layer, hidden, ctx)`` runs a layer so that backward re-runs it (a
        checkpoint function); None runs layers plainly. Set by the trainer (``train.recompute``)."""

    def forward(self, hidden: Tensor, ctx: LayerContext) -> Tensor:
        """This stage's layers: (s[/tp], b, h) -> (s[/tp], b, h)."""
        for layer in self.layers:
            hidden = layer(hidden, ctx) if self.recompute is None else self.recompute(layer, hidden, ctx)
        return hidden

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        out = {}
        for local, layer in enumerate(self.layers):
            local_prefix = f"{prefix}layers.{local}."
            sd = layer.sharded_state_dict(local_prefix, [(0, layer.layer_number - 1, self.config.num_layers)],
                                          metadata)
            replace_prefix_for_sharding(sd, local_prefix, f"{prefix}layers.")
            out.update(sd)
        for name, module in self.named_children():
            if module is not self.layers:
                out.update(sharded_state_dict_default(module, f"{prefix}{name}.", sharded_offsets, metadata))
        return out


def llama3_inv_freq(model_config: ModelConfig) -> Tensor:
    """RoPE inverse frequencies with Llama-3.1 scaling (``model_config.rope_scaling``), from transformers'
    ``ROPE_INIT_FUNCTIONS["llama3"]``: the same formula megatron applies with fixed constants, taking a base's own."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rs = model_config.rope_scaling
    hf = LlamaConfig(hidden_size=model_config.hidden_size, num_attention_heads=model_config.num_attention_heads,
                     head_dim=model_config.head_dim,  # transformers warns unless the context exceeds the original
                     max_position_embeddings=max(
                         model_config.max_position_embeddings, rs.original_max_position_embeddings + 1),
                     rope_parameters=dict(rope_type="llama3", rope_theta=model_config.rope_theta, factor=rs.factor,
                                          low_freq_factor=rs.low_freq_factor, high_freq_factor=rs.high_freq_factor,
                                          original_max_position_embeddings=rs.original_max_position_embeddings))
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, device=torch.device("cpu"))
    return inv_freq.float()


class _Rotary(RotaryEmbedding):
    """megatron's RoPE with its table kept where the model is: megatron's ``get_emb`` moves a host ``inv_freq`` to
    ``torch.cuda.current_device()`` on first use, which would drag a host model's table (an fp32 CPU reference on a
    GPU machine) onto the GPU. :meth:`LMFusionModel._apply` moves it with the model instead."""

    def get_emb(self, max_seq_len: int, offset: int = 0) -> Tensor:
        freqs = self.get_freqs_non_repeated(max_seq_len, offset)  # (s, d/2)
        return torch.cat((freqs, freqs), dim=-1)[:, None, None, :]  # (s, 1, 1, d), not interleaved (Llama)


class LMFusionModel(MegatronModule):
    def __init__(self, model_config: ModelConfig, config: TransformerConfig, pre_process: bool = True,
                 post_process: bool = True, layer_offset: Optional[int] = None, num_local_layers: Optional[int] = None):
        super().__init__(config=config)
        self.model_type = ModelType.encoder_or_decoder  # read by megatron's schedules
        # read by megatron's finalize_model_grads at PP>1: with frozen text a tied head is a frozen copy on the last
        # stage and no embedding-gradient sync across stages is needed (trained text: tie_trained_embedding)
        self.share_embeddings_and_output_weights = False
        self.model_config = model_config
        self.pre_process, self.post_process = pre_process, post_process
        tp = config.tensor_model_parallel_size
        pp = config.pipeline_model_parallel_size
        model_config.check_parallel(tp, pp)
        self.padded_vocab_size = model_config.padded_vocab_size(tp)
        self.image_tokens = tokens_per_image(model_config.image)
        if num_local_layers is None:
            num_local_layers = model_config.num_layers // pp
        if layer_offset is None:
            layer_offset = parallel_state.get_pipeline_model_parallel_rank() * num_local_layers
        self.layer_offset = layer_offset
        self.attention_backend = resolve_attention_backend(model_config.attention_backend)
        linear_backend = resolve_backend(model_config.linear_backend)
        if config.fp8 and linear_backend != "te":
            raise UserError(f"fp8={config.fp8!r} needs model.linear_backend 'te' (Transformer Engine linears); "
                            f"it resolved to {linear_backend!r}")
        # Under FP8 every routed GEMM's token count must be a multiple of 16: the plan pads each modality group.
        self.routing_pad_multiple = fp8_pad_multiple(bool(config.fp8))
        self.input_tensor: Optional[Tensor] = None

        self.rotary = _Rotary(kv_channels=model_config.head_dim, rotary_percent=1.0,
                              rotary_base=model_config.rope_theta, use_cpu_initialization=True)
        if model_config.rope_scaling is not None:
            # megatron's public switch (RotaryEmbedding(rope_scaling=True, rope_scaling_factor=f)) fixes the Llama-3.1
            # constants (low/high frequency factors 1 and 4, original context 8192); a base may configure others, so
            # the frequencies come from transformers' public RoPE table, the reference a converted base is checked
            # against (tests/distributed/workers/model.py's gqa_rope_scaling case compares logits with HF's Llama).
            self.rotary.inv_freq = llama3_inv_freq(model_config).to(self.rotary.inv_freq.device)

        encoder, decoder = build_image_io(model_config.image, model_config.hidden_size)
        # Module names follow megatron's GPTModel (embedding.word_embeddings, decoder.layers.N..., output_layer),
        # which is also the naming of a converted base checkpoint (lmfusion/hf/llama.py).
        if pre_process:
            self.embedding = TextEmbedding(config, self.padded_vocab_size, model_config.hidden_size)
            self.image_encoder = encoder
        slots = routed_layer_submodules(linear_backend, model_config.separation)  # model.separation fills the slots
        spec = lmfusion_layer_spec(slots)
        self.decoder = Decoder(config, [
            build_module(spec, config=config, layer_number=layer_offset + i + 1,
                         attention_backend=self.attention_backend)
            for i in range(num_local_layers)])
        if post_process:
            # routed or shared as the pre-MLP norm (megatron_ext/spec.py, "Separation depth")
            self.decoder.final_layernorm = build_module(slots.pre_mlp_layernorm, config=config,
                                                        hidden_size=model_config.hidden_size,
                                                        eps=model_config.rms_norm_eps)
            self.share_embedding = model_config.tie_word_embeddings and pre_process
            self.output_layer = ColumnParallelLinear(
                model_config.hidden_size, self.padded_vocab_size, config=config, init_method=config.init_method,
                bias=False, gather_output=False, skip_weight_param_allocation=self.share_embedding)
            self.image_decoder = decoder
            if not self.share_embedding:
                tag_partitioned(self.output_layer.weight, 0, 1)
        if pre_process:
            tag_partitioned(self.embedding.word_embeddings.weight, 0, 1)
        self.saves_text = False
        """Checkpoint the text parameters too (``optimizer.text_lr_ratio`` > 0: they train in the run). Set by
        :func:`lmfusion.model.weights.set_trainable` / inference loading, from the run's record."""

    def shared_embedding_or_output_weight(self) -> Tensor:
        """megatron's hook (``finalize_model_grads`` all-reduces its gradient between the first and last stage when
        ``share_embeddings_and_output_weights``): this stage's copy of a tied embedding."""
        return self.embedding.word_embeddings.weight if self.pre_process else self.output_layer.weight

    def tie_trained_embedding(self) -> None:
        """Tied embeddings that train at PP > 1: the last stage's head copy gets the first stage's gradient added
        (megatron's embedding group) and is left out of the gradient norm (``shared``), as megatron's GPTModel."""
        tied_copy = self.model_config.tie_word_embeddings and self.post_process and not self.pre_process
        self.share_embeddings_and_output_weights = tied_copy or (
            self.model_config.tie_word_embeddings and self.pre_process and not self.post_process)
        if tied_copy:
            self.output_layer.weight.shared = True

    def _apply(self, fn, recurse=True):
        """``.to(device)``/``.cuda()`` move RoPE's frequency table too. megatron keeps it as a plain tensor attribute
        (fp32 on purpose: a buffer would be cast by ``.bfloat16()``) and would otherwise move it lazily to
        ``torch.cuda.current_device()`` at the first forward, wherever the model is. Its dtype stays fp32."""
        out = super()._apply(fn, recurse)
        inv_freq = self.rotary.inv_freq
        device = fn(inv_freq).device
        if device != inv_freq.device:
            self.rotary.inv_freq = inv_freq.to(device)
        return out

    # ------------------------------------------------------------------ checkpointing
    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        """The image set, and the text set when it trains (``saves_text``): frozen text lives in the base checkpoint,
        which a training checkpoint refers to instead of copying (docs/architecture.md, "Checkpoint"). Layer indices
        are a sharded axis and every TP-sharded tensor keeps its sharding, so checkpoints load at other TP/PP sizes.
        A tied head's copy on the last stage is saved under the embedding's key as a replica (megatron's
        ``tie_embeddings_and_output_weights_state_dict``), so the text set reshards across PP sizes too."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)  # megatron's dense layers (embedding, head) index it
        full = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        # a VLM base's vision path (attached for inference) is frozen and always the base's
        keep = {k: v for k, v in full.items() if (is_image_param(k[len(prefix):]) or self.saves_text)
                and not k.endswith("_extra_state") and not k[len(prefix):].startswith("vision.")}
        head = f"{prefix}output_layer.weight"
        if self.saves_text and head in keep and self.model_config.tie_word_embeddings:
            keep[head] = make_tp_sharded_tensor_for_checkpoint(
                tensor=self.output_layer.weight, key=f"{prefix}embedding.word_embeddings.weight",
                replica_id=(1, 0, parallel_state.get_data_parallel_rank(with_context_parallel=True)),
                allow_shape_mismatch=True)
        return keep

    # ------------------------------------------------------------------ megatron pipeline hooks
    def set_input_tensor(self, input_tensor) -> None:
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        self.input_tensor = input_tensor

    # ------------------------------------------------------------------ per micro-batch context
    def _tp(self) -> tuple[int, int]:
        group = parallel_state.get_tensor_model_parallel_group()
        return group.rank(), group.size()

    def _text_frozen(self) -> bool:
        """No text-side parameter trains (LMFusion's setting): text before every image of its document is then a
        constant of the step, and the routed GEMMs skip its data gradient (``RoutingPlan.build``'s ``no_dgrad``)."""
        return not any(p.requires_grad for n, p in self.named_parameters() if not is_image_param(n))

    def build_context(self, inputs: ModelInputs, kv_cache: Optional[KVCache] = None
                      ) -> tuple[LayerContext, Tensor, Tensor, Tensor]:
        """Routing plan, SP shard, RoPE table and mask for one micro-batch; also the image token indices,
        the step's image ids and positions (for the KV cache)."""
        modality, image_ids, flat = inputs.image_layout(self.image_tokens)
        no_dgrad = None
        if kv_cache is None and torch.is_grad_enabled() and self._text_frozen():
            no_dgrad = text_before_images(modality, inputs.document_ids).t().contiguous()
        # (s, b): megatron's token order
        plan = RoutingPlan.build(modality.t().contiguous(), pad_multiple=self.routing_pad_multiple,
                                 no_dgrad=no_dgrad)
        sp_shard = None
        tp_rank, tp_size = self._tp()
        if self.config.sequence_parallel and tp_size > 1:
            if kv_cache is not None:
                raise ValueError("KV-cache decoding runs without sequence parallelism")
            sp_shard = (tp_rank, tp_size)
        b, s = inputs.tokens.shape
        positions = inputs.position_ids
        if positions is None:
            positions = (kv_cache.next_positions(b, s, inputs.tokens.device) if kv_cache is not None
                         else torch.arange(s, device=inputs.tokens.device).expand(b, s))
        max_pos = int(positions.max()) + 1 if positions.numel() else 1
        table = self.rotary.get_emb(max_pos)  # (max_pos, 1, 1, d)
        rotary = table[positions.t()].squeeze(2).squeeze(2).unsqueeze(2)  # (s, b, 1, d)
        if kv_cache is None:
            mask = AttentionMask(inputs.document_ids, image_ids)
        else:
            mask = AttentionMask(*kv_cache.full_ids(inputs.document_ids, image_ids), q_len=s)
        ctx = LayerContext(plan=plan, sp_shard=sp_shard, rotary=rotary, mask=mask, kv_cache=kv_cache)
        return ctx, flat, image_ids, positions

    # ------------------------------------------------------------------ forward
    def embed(self, inputs: ModelInputs, flat_image_index: Tensor) -> Tensor:
        """(s, b, h) input hidden states: text embeddings, image encoder tokens at image positions."""
        tokens = inputs.tokens.clamp(0, self.model_config.vocab_size - 1)
        hidden = self.embedding.word_embeddings(tokens).transpose(0, 1).contiguous()  # (b, s, h) -> (s, b, h)
        if inputs.num_images:
            img = self.image_encoder(inputs.image_latents, inputs.image_timesteps)  # (n_img, T, h)
            s, b, h = hidden.shape
            hidden = hidden.view(s * b, h).index_put((flat_image_index,), img.reshape(-1, h).to(hidden.dtype))
            hidden = hidden.view(s, b, h)
        if inputs.pixel_values is not None:  # a VLM base's understanding images (lmfusion/model/vision.py)
            if getattr(self, "vision", None) is None:
                raise UserError("inputs carry pixel_values but the model has no vision path (a VLM base's: "
                                "lmfusion.model.vision.attach_vision_path)")
            hidden = self.vision.place(hidden, inputs.tokens, inputs.pixel_values, inputs.image_sizes)
        if self.config.sequence_parallel and self._tp()[1] > 1:
            hidden = scatter_to_sequence_parallel_region(hidden)  # (s/tp, b, h)
        return hidden

    def _mask_vocab_padding(self, logits: Tensor) -> Tensor:
        """Padded vocabulary rows (zeros) would give logit 0 and join the softmax, so the loss would depend on the
        TP size (the padding is a multiple of 128 * tp) and differ from HF's: push them to the dtype's minimum."""
        vocab, local = self.model_config.vocab_size, logits.shape[-1]
        start = self._tp()[0] * local
        if start + local <= vocab:
            return logits
        ids = torch.arange(start, start + local, device=logits.device)
        return logits.masked_fill(ids >= vocab, torch.finfo(logits.dtype).min)

    def _fp8_context(self):
        """TE ``fp8_autocast`` with the config's recipe (megatron's own context) under FP8; a no-op otherwise."""
        if not self.config.fp8:
            return contextlib.nullcontext()
        from megatron.core.fp8_utils import get_fp8_context  # imports megatron's optimizer stack: only when used

        return get_fp8_context(self.config)

    def forward(self, inputs: ModelInputs, kv_cache: Optional[KVCache] = None):
        """First/middle stages return hidden states (s[/tp], b, h); the last returns :class:`LMFusionOutput`.

        With ``kv_cache`` (generation, single stage) the step attends to the cached positions too and, when the
        cache commits, is appended to it."""
        ctx, flat, image_ids, positions = self.build_context(inputs, kv_cache)
        hidden = self.embed(inputs, flat) if self.pre_process else self.input_tensor
        if hidden is None:
            raise RuntimeError("LMFusionModel: a non-first pipeline stage needs set_input_tensor() before forward")
        with self._fp8_context():
            hidden = self.decoder(hidden, ctx)
        if kv_cache is not None and kv_cache.commit:
            kv_cache.commit_ids(inputs.document_ids, image_ids, positions)
        if not self.post_process:
            return hidden
        hidden = self.decoder.final_layernorm(hidden, ctx.plan, ctx.sp_shard)
        weight = self.embedding.word_embeddings.weight if self.share_embedding else None
        logits, _ = self.output_layer(hidden, weight=weight)  # (s, b, V/tp); gathers the sequence under SP
        logits = self._mask_vocab_padding(logits)
        noise_pred = None
        if inputs.num_images:
            full = hidden
            if self.config.sequence_parallel and self._tp()[1] > 1:
                # The decoder runs replicated on every TP rank: gather without summing gradients back.
                full = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
            s, b, h = full.shape
            img = full.reshape(s * b, h).index_select(0, flat).view(inputs.num_images, self.image_tokens, h)
            noise_pred = self.image_decoder(img, inputs.image_latents, inputs.image_timesteps)
        return LMFusionOutput(logits=logits, noise_pred=noise_pred)
