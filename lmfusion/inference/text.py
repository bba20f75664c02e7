"""Text generation with the KV cache: greedy, temperature, top-p, stop tokens; images (clean latents) in prompts.

A :class:`Session` is a batch of growing sequences and their :class:`~lmfusion.model.kv_cache.KVCache`. Its
:meth:`Session.extend` appends one chunk per row: token ids and :class:`Image` items (a latent at a diffusion step,
occupying ``tokens_per_image`` positions). Design choices:

* **Left padding, explicit positions.** Rows of different lengths are left-padded with document id -1 (padding
  attends only itself; no real token attends it, see ``lmfusion.model.attention``), and every row carries its own
  RoPE positions, continuing from its own length. The last position of every chunk is therefore each row's newest
  token, and a left-padded batch gives each row the logits it would get alone.
* **Non-committing chunks** (``commit=False``) attend the cache without joining it: diffusion sampling evaluates the
  same image positions at every denoising step on top of a prefix computed once (:mod:`lmfusion.inference.image`).
* **The text path is the frozen Llama**: for text-only prompts greedy decoding in fp32 yields exactly the base
  Hugging Face model's ``generate`` tokens (tests/unit/test_generation.py).
* Sampling draws on the CPU from a caller-provided ``torch.Generator``, so a seed gives the same tokens on any device
  and on every tensor-parallel rank.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from lmfusion.errors import UserError
from lmfusion.model.image_io import tokens_per_image
from lmfusion.model.kv_cache import KVCache
from lmfusion.model.model import LMFusionOutput, ModelInputs

__all__ = ["Image", "Item", "SamplingParams", "Session", "last_logits", "sample_next", "generate_text", "cut_at_stops"]


@dataclass
class Image:
    """An image in a sequence: its (scaled) VAE latent (C, H, W) at diffusion timestep ``timestep`` (0 = clean; a
    DDPM step, or the flow objective's 1000 s, a float)."""

    latent: Tensor
    timestep: Union[int, float] = 0


Item = Union[int, Image]


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0
    """0 = greedy (argmax); > 0 samples from softmax(logits / temperature)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (with temperature > 0)."""
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    """Generation of a row ends after it emits one of these (the stop token is part of the output)."""

    def __post_init__(self) -> None:
        self.stop_token_ids = tuple(int(t) for t in self.stop_token_ids)
        if self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise UserError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")


def last_logits(out: LMFusionOutput, vocab_size: int) -> Tensor:
    """(b, V) float32 logits of each row's last position, gathered over tensor-parallel ranks, padding dropped."""
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    logits = out.logits[-1]  # (s, b, V/tp) -> (b, V/tp)
    return gather_from_tensor_model_parallel_region(logits.contiguous())[:, :vocab_size].float()


def sample_next(logits: Tensor, params: SamplingParams, generator: Optional[torch.Generator] = None) -> Tensor:
    """(b, V) logits -> (b,) next token ids (on the logits' device)."""
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float().cpu() / params.temperature, dim=-1)  # (b, V)
    if params.top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(dim=-1) - sorted_p  # mass of the tokens ranked above each one
        sorted_p = sorted_p.masked_fill(before >= params.top_p, 0.0)  # the top token always stays (before = 0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1).to(logits.device)


class Session:
    """A batch of ``b`` sequences growing through one KV cache."""

    def __init__(self, model: torch.nn.Module, batch_size: int) -> None:
        self.model = model
        cfg = model.model_config
        self.vocab_size = cfg.vocab_size
        self.image_tokens = tokens_per_image(cfg.image)
        self.latent_shape = (cfg.image.latent_channels, cfg.image.latent_size, cfg.image.latent_size)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.batch_size = batch_size
        self.cache = KVCache()
        self.lengths = torch.zeros(batch_size, dtype=torch.long)  # next RoPE position of each row
        self.max_positions = int(cfg.max_position_embeddings)

    def room(self) -> int:
        """Positions left in the fullest row before the model's context (max_position_embeddings) is full."""
        return self.max_positions - int(self.lengths.max())

    def _length(self, item: Item) -> int:
        return self.image_tokens if isinstance(item, Image) else 1

    def inputs(self, rows: Sequence[Sequence[Item]]) -> tuple[ModelInputs, Tensor]:
        """Left-padded :class:`ModelInputs` for one chunk per row, and each row's chunk length."""
        if len(rows) != self.batch_size:
            raise ValueError(f"session holds {self.batch_size} rows, got {len(rows)} chunks")
        lengths = torch.tensor([sum(self._length(x) for x in row) for row in rows], dtype=torch.long)
        if int(lengths.min()) < 1:
            raise ValueError("every row's chunk must hold at least one token or image")
        b, s = self.batch_size, int(lengths.max())
        tokens = torch.zeros(b, s, dtype=torch.long)
        docs = torch.full((b, s), -1, dtype=torch.long)  # -1: padding
        positions = torch.zeros(b, s, dtype=torch.long)
        latents, steps, img_row, img_start = [], [], [], []
        for r, row in enumerate(rows):
            col = s - int(lengths[r])
            docs[r, col:] = 0
            positions[r, col:] = self.lengths[r] + torch.arange(int(lengths[r]))
            for item in row:
                if isinstance(item, Image):
                    if tuple(item.latent.shape) != self.latent_shape:
                        raise ValueError(f"image latent {tuple(item.latent.shape)} does not match the model's "
                                         f"{self.latent_shape}")
                    latents.append(item.latent)
                    step = item.timestep
                    steps.append(step.item() if isinstance(step, torch.Tensor) else step)
                    img_row.append(r)
                    img_start.append(col)
                else:
                    tokens[r, col] = int(item)
                col += self._length(item)
        dev = self.device
        inputs = ModelInputs(tokens=tokens.to(dev), document_ids=docs.to(dev), position_ids=positions.to(dev))
        if latents:
            inputs.image_latents = torch.stack([x.to(dev, self.dtype) for x in latents])  # (n_img, C, H, W)
            # int64 when every timestep is an integer (DDPM steps), float32 otherwise (flow): the timestep embedding
            # takes either, and gives the same values for the same integers.
            dtype = torch.long if all(isinstance(v, numbers.Integral) for v in steps) else torch.float32
            inputs.image_timesteps = torch.tensor(steps, dtype=dtype, device=dev)
            inputs.image_batch = torch.tensor(img_row, dtype=torch.long, device=dev)
            inputs.image_start = torch.tensor(img_start, dtype=torch.long, device=dev)
        return inputs, lengths

    @torch.no_grad()
    def extend(self, rows: Sequence[Sequence[Item]], commit: bool = True) -> LMFusionOutput:
        """Run one chunk per row against the cache; with ``commit`` the chunk joins the sequences."""
        inputs, lengths = self.inputs(rows)
        need = int((self.lengths + lengths).max())
        if need > self.max_positions:
            raise UserError(f"the sequence needs {need} positions, expected at most {self.max_positions} (the "
                            f"model's max_position_embeddings); shorten the input (nothing is truncated)")
        self.cache.commit = commit
        try:
            out = self.model(inputs, kv_cache=self.cache)
        finally:
            self.cache.commit = True
        if commit:
            self.lengths += lengths
        return out

    def next_logits(self, rows: Sequence[Sequence[Item]]) -> Tensor:
        """Commit one chunk per row; (b, V) logits for each row's next token."""
        return last_logits(self.extend(rows), self.vocab_size)


@torch.no_grad()
def generate_text(model: torch.nn.Module, prompts: Sequence[Sequence[Item]], params: SamplingParams,
                  generator: Optional[torch.Generator] = None, use_cache: bool = True) -> list[list[int]]:
    """New tokens for each prompt (a row stops after a stop token, which it keeps, or at ``max_new_tokens``).

    ``use_cache=False`` recomputes every sequence from scratch at each step (the reference the cache is tested
    against)."""
    b = len(prompts)
    if b == 0:
        return []
    out: list[list[int]] = [[] for _ in range(b)]
    done = [False] * b
    stops = set(params.stop_token_ids)
    session = Session(model, b)
    logits = session.next_logits(prompts)
    for step in range(params.max_new_tokens):
        tokens = sample_next(logits, params, generator).tolist()
        for r, tok in enumerate(tokens):
            if not done[r]:
                out[r].append(tok)
                done[r] = tok in stops
        if all(done) or step == params.max_new_tokens - 1:
            break
        if use_cache:
            logits = session.next_logits([[tok] for tok in tokens])  # finished rows run on, their output unused
        else:
            session = Session(model, b)
            logits = session.next_logits([list(p) + o for p, o in zip(prompts, out)])
    return out


def cut_at_stops(text: str, stops: Sequence[str]) -> str:
    """``text`` up to the first occurrence of each stop string in turn (lm-eval's and lmms-eval's ``until``, cut as
    their own models cut)."""
    for stop in stops:
        if stop:
            text = text.split(stop)[0]
    return text
