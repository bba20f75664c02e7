"""The understanding path of a VLM base (LLaVA-NeXT): frozen CLIP vision tower -> 2-layer GELU projector ->
anyres packing with ``image_newline``, whose features take the ``<image>`` placeholder positions of the first
pipeline stage's input embeddings.

    pixels (n_tiles, 3, H, W) --CLIP tower--> hidden_states[vision_feature_layer] (drop CLS: 'default')
        --projector--> (n_tiles, p*p, h) --anyres: base tile + grid tiles unpadded, a newline per row--> (n_feat, h)
    tokens --embedding--> (b, s, h);  positions where token == image_token_index  <-- features, in row-major order

Design choices:

* **Transformers' ``CLIPVisionModel`` and ``LlavaNextMultiModalProjector``, not megatron.core.models.vision.** The
  tower and projector are the very modules HF's ``LlavaNextForConditionalGeneration`` runs, so the features equal
  HF's by construction (quick-GELU, pre-LN, ``hidden_states[vision_feature_layer]`` selection, which megatron's
  ``CLIPViTModel`` does not expose: it returns the last layer, so LLaVA on megatron truncates the tower). The anyres
  helpers (``select_best_resolution`` via ``get_anyres_image_grid_shape``, ``image_size_to_num_patches``,
  ``unpad_image``) are imported from transformers too; only the packing loop (``pack_image_features``, a method
  that needs a whole ``LlavaNextModel``) is restated below, line for line.
* **Replicated, not TP-sharded.** The tower is small next to the LM (CLIP-L/336: 0.3 B of LLaVA-NeXT-8B's 8.4 B
  parameters, ~4% of its FLOPs per image token) and frozen: every TP rank of the first pipeline stage runs it
  whole, before the sequence-parallel scatter, with no collective at all. Sharding would save ~0.6 GB per rank in
  bf16 at the cost of two all-reduces per tower layer.
* **Frozen, out of every training structure.** Parameters have ``requires_grad=False`` (megatron's DDP gives them
  no grad buffer and no data-parallel reduction, the optimizer no state), the forward runs under ``no_grad`` (no
  activations kept), and :meth:`~lmfusion.model.model.LMFusionModel.sharded_state_dict` keeps the image set only,
  so training checkpoints never hold it: it is read from the base like the text model.
* **Routed as text.** Placeholder positions carry text token ids, so the routing plan sends them through the text
  (frozen) modules, as the VLM was trained. Generation images (latents) keep the image modules.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import Tensor, nn

from lmfusion.errors import UserError

__all__ = ["VisionPath", "load_vision_path", "attach_vision_path"]


class VisionPath(nn.Module):
    """CLIP tower + projector + ``image_newline`` of a LLaVA-NeXT config (``vlm_config.json`` dict); state-dict
    names are the VLM base's (``vision_tower.*``, ``multi_modal_projector.*``, ``image_newline``)."""

    def __init__(self, hf_config: Mapping[str, Any]):
        super().__init__()
        from transformers import CLIPVisionModel, LlavaNextConfig
        from transformers.models.llava_next.modeling_llava_next import LlavaNextMultiModalProjector

        self.config = LlavaNextConfig.from_dict(dict(hf_config))
        self.vision_tower = CLIPVisionModel(self.config.vision_config)
        self.multi_modal_projector = LlavaNextMultiModalProjector(self.config)
        self.image_newline = nn.Parameter(torch.zeros(self.config.text_config.hidden_size))
        self.image_token_id = self.config.image_token_index
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "VisionPath":
        return super().train(False)  # frozen: dropout stays off whatever the model around it does

    # ------------------------------------------------------------------ weights
    @torch.no_grad()
    def load(self, weights: Any) -> None:
        """Copy every tensor of a VLM base's vision weights (``lmfusion.hf.llava.load_vision_state``)."""
        tower = getattr(self.vision_tower, "vision_model", self.vision_tower)  # transformers 4 nests one level
        targets = {f"vision_tower.{k}": v for k, v in tower.state_dict(keep_vars=True).items()}
        targets.update({f"multi_modal_projector.{k}": v
                        for k, v in self.multi_modal_projector.state_dict(keep_vars=True).items()})
        targets["image_newline"] = self.image_newline
        missing = sorted(set(targets) - set(weights.keys()))
        if missing:
            raise UserError(f"VLM base vision weights lack {missing[:3]}")
        for name, param in targets.items():
            param.copy_(weights.get(name))

    # ------------------------------------------------------------------ features
    @torch.no_grad()
    def forward(self, pixel_values: Tensor, image_sizes: Tensor) -> Tensor:
        """(n_features, h) features of a batch of images as ``LlavaNextModel.get_image_features`` computes them, in
        image order. ``pixel_values``: (n_img, max_tiles, 3, H, W) as the processor pads them, or the tiles of all
        images stacked (n_tiles, 3, H, W); ``image_sizes``: (n_img, 2) original (height, width)."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        cfg = self.config
        tiles = [image_size_to_num_patches(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
                 for size in image_sizes]
        if pixel_values.dim() == 5:  # (n_img, max_tiles, 3, H, W) -> the real tiles of each image
            pixel_values = torch.cat([pv[:n] for pv, n in zip(pixel_values, tiles)], dim=0)
        elif pixel_values.dim() != 4:
            raise UserError(f"pixel_values: shape {tuple(pixel_values.shape)}, expected 4 or 5 dimensions")
        if pixel_values.shape[0] != sum(tiles):
            raise UserError(f"pixel_values: {pixel_values.shape[0]} tiles, but image_sizes "
                            f"{image_sizes.tolist()} make {sum(tiles)} under image_grid_pinpoints")
        param = self.image_newline
        out = self.vision_tower(pixel_values.to(param.device, param.dtype), output_hidden_states=True)
        layer = cfg.vision_feature_layer
        if isinstance(layer, int):
            selected = out.hidden_states[layer]  # (n_tiles, 1 + p*p, c)
        else:
            selected = torch.cat([out.hidden_states[i] for i in layer], dim=-1)
        if cfg.vision_feature_select_strategy == "default":
            selected = selected[:, 1:]  # drop CLS
        features = self.multi_modal_projector(selected)  # (n_tiles, p*p, h)
        return torch.cat([self._pack(f, size) for f, size in zip(features.split(tiles), image_sizes)], dim=0)

    def _pack(self, feature: Tensor, image_size: Tensor) -> Tensor:
        """One image: (tiles, p*p, h) -> (n, h); ``LlavaNextModel.pack_image_features``'s steps, in its order."""
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

        cfg = self.config
        if feature.shape[0] == 1:
            return torch.cat((feature[0], self.image_newline[None].to(feature)), dim=0)
        base, grid = feature[0], feature[1:]  # the resized whole image, then the anyres grid
        side = cfg.vision_config.image_size // cfg.vision_config.patch_size
        rows, cols = get_anyres_image_grid_shape(image_size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
        grid = grid.view(rows, cols, side, side, -1)  # (rows, cols, p, p, h)
        grid = grid.permute(4, 0, 2, 1, 3).contiguous().flatten(1, 2).flatten(2, 3)  # (h, rows*p, cols*p)
        grid = unpad_image(grid, image_size)  # drop the padding the processor added around the image
        newline = self.image_newline[:, None, None].expand(*grid.shape[:-1], 1).to(grid)
        grid = torch.cat((grid, newline), dim=-1)  # a newline embedding ends every feature row
        grid = grid.flatten(1, 2).transpose(0, 1)  # (rows' * (cols' + 1), h)
        return torch.cat((base, grid), dim=0)

    def place(self, hidden: Tensor, tokens: Tensor, pixel_values: Tensor, image_sizes: Tensor) -> Tensor:
        """``hidden`` (s, b, h) with the image features at the ``<image>`` positions of ``tokens`` (b, s), filled
        in row-major (b, s) order as HF's ``masked_scatter`` does."""
        features = self(pixel_values, image_sizes)
        mask = tokens == self.image_token_id  # (b, s)
        if int(mask.sum()) != features.shape[0]:
            raise UserError(f"tokens hold {int(mask.sum())} <image> placeholders (id {self.image_token_id}) but "
                            f"the {len(image_sizes)} image(s) give {features.shape[0]} features")
        rows = hidden.transpose(0, 1)  # (b, s, h): the fill order is row-major over (b, s)
        rows = rows.masked_scatter(mask[..., None].to(rows.device), features.to(rows.dtype))
        return rows.transpose(0, 1).contiguous()


def load_vision_path(base_dir: str | Path, device: torch.device | str | None = None,
                     dtype: Optional[torch.dtype] = None) -> VisionPath:
    """The frozen :class:`VisionPath` of a VLM base, its weights loaded."""
    from lmfusion.hf.llava import load_vision_state

    hf_config, weights = load_vision_state(base_dir)
    path = VisionPath(hf_config)
    with weights:
        path.load(weights)
    return path.to(device=device, dtype=dtype)


def attach_vision_path(model: nn.Module, base_dir: str | Path) -> Optional[VisionPath]:
    """Give a built model's first pipeline stage the base's vision path (``model.vision``); other stages get none.
    Call it after :func:`lmfusion.model.builder.build_model` (whose base loading reads the text weights only)."""
    if not getattr(model, "pre_process", False):
        return None
    param = next(model.parameters())
    model.vision = load_vision_path(base_dir, device=param.device, dtype=param.dtype)
    return model.vision


def with_pixels(inputs: Any, pixel_values: Tensor, image_sizes: Tensor) -> Any:
    """``inputs`` (:class:`~lmfusion.model.model.ModelInputs`) with understanding images added."""
    return dataclasses.replace(inputs, pixel_values=pixel_values, image_sizes=image_sizes)
