"""Interleaved generation: text, and whenever the model emits ``<boi>``, an image by diffusion, then ``<eoi>`` and more
text, all in one KV cache (``lmfusion chat``).

One conversation is one sequence. Every sampled token is fed back before the next is drawn; on ``<boi>`` the cache
(ending with ``<boi>``) is the conditional prefix of :func:`lmfusion.inference.image.denoise`, the unconditional one
is a fresh ``<bos> <boi>``; the clean latent (t=0) and ``<eoi>`` are then committed and text continues from the
logits after ``<eoi>``. The prompt is plain text continued by the model (no chat template is applied).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import IO, Optional, Union

import torch
from torch import Tensor

from lmfusion.errors import UserError
from lmfusion.inference.image import DEFAULT_CFG_SCALE, commit_image, denoise, unconditional_session
from lmfusion.config import DiffusionConfig
from lmfusion.inference.text import SamplingParams, Session, sample_next

__all__ = ["ImageOptions", "Conversation", "run_chat"]

Segment = Union[list[int], Tensor]  # text token ids, or one image's clean latent (C, H, W)


@dataclass
class ImageOptions:
    sampler: Optional[str] = None  # None: the objective's default (ddpm; euler for flow)
    steps: Optional[int] = None
    cfg_scale: Optional[float] = DEFAULT_CFG_SCALE  # None: conditional branch only
    max_images: int = 4
    """Images per response; a further ``<boi>`` ends the response."""
    clip_x0: Optional[float] = None  # the latents' range (lmfusion.inference.image.latent_range); None: unclipped
    diffusion: Optional[DiffusionConfig] = None  # the checkpoint's objective (InferenceModel.diffusion); None: epsilon


class Conversation:
    """A growing interleaved sequence; :meth:`respond` appends a user's tokens and generates the continuation."""

    def __init__(self, model: torch.nn.Module, params: SamplingParams, image: ImageOptions,
                 generator: Optional[torch.Generator] = None) -> None:
        self.model, self.params, self.image = model, params, image
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.session = Session(model, 1)
        self.pending: list[int] = [model.model_config.bos_token_id]  # sampled/given tokens not yet in the cache
        self.full = False  # the last response stopped because the model's context was full

    @torch.no_grad()
    def respond(self, tokens: list[int]) -> list[Segment]:
        cfg = self.model.model_config
        chunk = self.pending + list(tokens)
        if not chunk:
            raise UserError("nothing to respond to: empty prompt")
        if len(chunk) > self.session.room():
            raise UserError(f"the conversation is full: this prompt needs {len(chunk)} positions, "
                            f"{self.session.room()} of the model's {self.session.max_positions} "
                            f"(max_position_embeddings) are left; start a new chat")
        logits = self.session.next_logits([chunk])
        self.pending = []
        segments: list[Segment] = []
        text: list[int] = []
        images = 0
        stops = set(self.params.stop_token_ids)
        self.full = False
        image_room = 2 + self.session.image_tokens + 1  # <boi> image <eoi>, then one more token
        for _ in range(self.params.max_new_tokens):
            tok = int(sample_next(logits, self.params, self.generator)[0])
            if tok in stops or (tok == cfg.boi_token_id and images >= self.image.max_images):
                self.pending = [tok]
                break
            if self.session.room() < (image_room if tok == cfg.boi_token_id else 1):
                self.full = True  # the context (max_position_embeddings) is full: the response ends here
                if tok != cfg.boi_token_id:
                    text.append(tok)  # drawn from the last position's logits; it needs no position itself
                break
            if tok != cfg.boi_token_id:
                text.append(tok)
                logits = self.session.next_logits([[tok]])
                continue
            if text:
                segments.append(text)
                text = []
            self.session.extend([[tok]])  # the cache now ends with <boi>: the conditional prefix
            scale = self.image.cfg_scale
            uncond = None if scale is None else unconditional_session(self.model, 1)
            latent = denoise(self.session, uncond, sampler=self.image.sampler, steps=self.image.steps,
                             cfg_scale=1.0 if scale is None else scale, generator=self.generator,
                             clip_x0=self.image.clip_x0, diffusion=self.image.diffusion)
            segments.append(latent[0])
            images += 1
            logits = commit_image(self.session, latent)  # clean image at t=0, then <eoi>
        else:
            self.pending = []  # max_new_tokens reached: the last token is already in the cache
        if text:
            segments.append(text)
        return segments


def run_chat(conversation: Conversation, tokenizer, codec, out_dir: Path, stdin: IO[str], stdout: IO[str]) -> int:
    """Read prompts line by line (until EOF, an empty line or ``/quit``); print text, write images as PNGs."""
    from lmfusion.inference.image import to_pil

    out_dir.mkdir(parents=True, exist_ok=True)
    written = 0
    while True:
        stdout.write("> ")
        stdout.flush()
        line = stdin.readline()
        if not line or line.strip() in ("", "/quit"):
            stdout.write("\n")
            return 0
        for segment in conversation.respond(tokenizer.encode(line.rstrip("\n"), add_special_tokens=False)):
            if isinstance(segment, Tensor):
                path = out_dir / f"chat-{written:03d}.png"
                to_pil(codec, segment[None])[0].save(path, format="PNG")
                written += 1
                stdout.write(f"[image: {path}]\n")
            else:
                stdout.write(tokenizer.decode(segment, skip_special_tokens=True) + "\n")
        if conversation.full:
            stdout.write(f"[the model's context ({conversation.session.max_positions} positions) is full; "
                         f"start a new chat]\n")
            stdout.flush()
            return 0
        stdout.flush()
