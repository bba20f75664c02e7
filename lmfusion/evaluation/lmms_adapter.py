"""An lmms-eval model over a VLM base's understanding path (LLaVA-NeXT: frozen vision tower + projector, text modules).

:class:`LMFusionLMMS` subclasses ``lmms_eval.api.model.lmms`` (registered as ``lmfusion``), so every lmms-eval image
task (MME, POPE, MMBench, SEED-Bench, ... or a local YAML task) runs on our model. lmms-eval hands it ``Instance``
requests whose ``args`` are ``(context, continuation | generation kwargs, doc_to_visual, doc_id, task, split)``; the
images are ``doc_to_visual(self.task_dict[task][split][doc_id])``, PIL images, as for lmms-eval's own ``llava_hf``.

Design choices:

* **The base's own processor and chat template.** The prompt is the user turn ``[image, ..., text]`` (images first,
  as LLaVA-NeXT's templates place them; ``<image>`` written in the context marks the places instead) rendered with
  the processor's chat template and a generation prompt, then ``processor(images=..., text=...)``: HF's tiling and
  placeholder counts. ``chat_template=False`` (or a processor without one) sends the context as it is, one
  ``<image>`` line per image in front (lmms-eval's ``llava_hf`` convention).
* **Scores as lm-eval defines them.** ``loglikelihood`` is the *sum* of the continuation tokens' log-probs and
  whether each is the greedy token (lmms-eval's ``llava_hf`` returns the mean loss instead; lm-eval's convention
  is what the rest of LMFusion reports). The continuation is tokenized alone (no special tokens) after the
  processed prompt. ``generate_until`` is greedy only (:func:`lmfusion.inference.vlm.generate_with_images`).
* **lmms-eval 0.7.3 and loglikelihood.** Its evaluator passes every response through ``unwrap_generation_output``,
  which turns a ``(float, bool)`` tuple into a string, so ``multiple_choice`` / ``loglikelihood`` tasks fail in
  ``process_results`` for every model (its own ``llava_hf`` too). Most image benchmarks (MME, POPE, MMBench, ...)
  are ``generate_until``; :meth:`LMFusionLMMS.loglikelihood` is right for callers that use it directly
  (tests/unit/test_eval_lmms.py checks it against HF) and for lmms-eval once fixed.
* **One request at a time.** Each request carries its own images, tile count and placeholder count: no padding and
  no cross-request batching (as ``llava_hf``). Nothing is truncated: a prompt longer than the model's context is a
  one-line error.

lmms-eval is imported when this module is: :func:`require_lmms_eval` is the one place that says how to install it.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from lmfusion.errors import UserError

LMMS_EVAL_PIN = "lmms-eval==0.7.3"
INSTALL_HINT = (f"pip install --no-deps {LMMS_EVAL_PIN} tenacity (what scripts/setup.sh does; its declared "
                f"dependencies would replace the CPU torch and add a CUDA torchvision)")


def require_lmms_eval() -> None:
    """Import lmms-eval's model API, or raise a one-line :class:`UserError` saying how to install it."""
    try:
        import lmms_eval.api.model  # noqa: F401
        import lmms_eval.evaluator  # noqa: F401
    except ImportError as e:
        raise UserError(f"lmfusion eval lmms needs lmms-eval, which cannot be imported ({e}); {INSTALL_HINT}") from e


require_lmms_eval()

from lmms_eval.api.instance import Instance  # noqa: E402
from lmms_eval.api.model import lmms  # noqa: E402
from lmms_eval.api.registry import register_model  # noqa: E402

from lmfusion.inference.text import SamplingParams, cut_at_stops, generate_text  # noqa: E402
from lmfusion.inference.vlm import generate_with_images  # noqa: E402
from lmfusion.model.model import ModelInputs  # noqa: E402

__all__ = ["LMFusionLMMS", "LMMS_EVAL_PIN", "INSTALL_HINT", "require_lmms_eval", "load_processor"]


def load_processor(base_dir):
    """The VLM base's processor (``AutoProcessor``: image processor, tokenizer, chat template), local files only."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(str(base_dir), local_files_only=True)
    except (OSError, ValueError) as e:
        raise UserError(f"{base_dir}: cannot load the VLM base's processor files ({e})") from e


@register_model("lmfusion")
class LMFusionLMMS(lmms):
    def __init__(self, bundle, processor, chat_template: bool = True, max_new_tokens: int = 256) -> None:
        super().__init__()
        if getattr(bundle.model, "vision", None) is None:
            raise UserError(f"{bundle.meta.path}: its base {bundle.meta.base_dir} has no vision path (a text-only "
                            f"base); lmfusion eval lmms needs a VLM base (convert-hf of a LLaVA-NeXT directory)")
        self.bundle, self.model, self.processor = bundle, bundle.model, processor
        self.tokenizer = processor.tokenizer
        self.image_token = getattr(processor, "image_token", "<image>")
        self.chat_template = processor.chat_template if chat_template else None
        self.max_length = int(bundle.config.max_position_embeddings)
        self.max_new_tokens = int(max_new_tokens)
        self.stop_ids = tuple(bundle.meta.stop_token_ids)
        self.device = next(self.model.parameters()).device

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: Optional[dict] = None) -> "LMFusionLMMS":
        """``ckpt=DIR[,device=cpu][,weights=ema|raw][,chat_template=false]`` (lmms-eval's ``--model_args``)."""
        from lmms_eval import utils

        from lmfusion.evaluation import runtime

        args = utils.simple_parse_args_string(arg_string)
        if "ckpt" not in args:
            raise UserError(f"--model_args {arg_string!r}: expected ckpt=DIR (an LMFusion checkpoint on a VLM base)")
        device = args.get("device") or (additional_config or {}).get("device")
        bundle = runtime.load_data_parallel(args["ckpt"], device, weights=args.get("weights"))
        return cls(bundle, load_processor(bundle.meta.base_dir), chat_template=bool(args.get("chat_template", True)))

    # ------------------------------------------------------------------------------------------------ inputs
    def _visuals(self, doc_to_visual, task: str, split: str, doc_id: int) -> list:
        from PIL import Image

        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) or []
        if not all(isinstance(v, Image.Image) for v in visuals):
            kinds = sorted({type(v).__name__ for v in visuals if not isinstance(v, Image.Image)})
            raise UserError(f"task {task}: doc_to_visual gave {kinds}; LMFusion's VLM path takes images only")
        return [v.convert("RGB") for v in visuals]

    def prompt(self, context: str, n_images: int) -> str:
        """The text the processor gets: the user turn through the chat template, or the raw context."""
        if self.chat_template is None:
            if self.image_token in context or n_images == 0:
                return context
            return "\n".join([self.image_token] * n_images) + "\n" + context
        if self.image_token in context:  # the task placed its images: keep that order
            parts = context.split(self.image_token)
            content: list[dict[str, Any]] = [{"type": "text", "text": parts[0]}] if parts[0] else []
            for part in parts[1:]:
                content += [{"type": "image"}] + ([{"type": "text", "text": part}] if part else [])
        else:
            content = [{"type": "image"}] * n_images + [{"type": "text", "text": context}]
        return self.processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                  add_generation_prompt=True)

    def encode(self, context: str, visuals: list) -> dict:
        """Processor output for one request: ``input_ids`` (1, s), and ``pixel_values`` / ``image_sizes`` with
        images."""
        text = self.prompt(context, len(visuals))
        enc = self.processor(images=visuals or None, text=text, return_tensors="pt")
        placed = int((enc["input_ids"] == self.tokenizer.convert_tokens_to_ids(self.image_token)).any(-1).sum())
        if visuals and not placed:
            raise UserError(f"the prompt has no {self.image_token} placeholder for its {len(visuals)} image(s): "
                            f"{text!r}")
        return enc

    # ------------------------------------------------------------------------------------------------ scoring
    @torch.no_grad()
    def _score(self, enc: dict, cont: list[int]) -> tuple[float, bool]:
        from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

        ctx = enc["input_ids"][0].tolist()
        tokens = torch.tensor([ctx + cont], device=self.device)  # (1, s)
        if tokens.shape[1] > self.max_length:
            raise UserError(f"a request needs {tokens.shape[1]} positions, expected at most {self.max_length} (the "
                            f"model's max_position_embeddings); nothing is truncated")
        pixels = enc.get("pixel_values")
        out = self.model(ModelInputs(tokens=tokens, document_ids=torch.zeros_like(tokens),
                                     pixel_values=None if pixels is None else pixels.to(self.device),
                                     image_sizes=enc.get("image_sizes")))
        logits = gather_from_tensor_model_parallel_region(out.logits.contiguous())  # (s, 1, V)
        logp = torch.log_softmax(logits[-len(cont) - 1:-1, 0, :self.bundle.config.vocab_size].float(), dim=-1)
        target = torch.tensor(cont, device=logp.device)  # position i predicts token i + 1
        return float(logp.gather(-1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        out = []
        for req in requests:
            context, target, doc_to_visual, doc_id, task, split = req.args
            doc = self.task_dict[task][split][doc_id]
            continuation = target if isinstance(target, str) else target(doc)
            cont = self.tokenizer.encode(str(continuation), add_special_tokens=False)
            if not cont:
                raise UserError(f"task {task} doc {doc_id}: empty continuation {continuation!r}")
            res = self._score(self.encode(context, self._visuals(doc_to_visual, task, split, doc_id)), cont)
            self.cache_hook.add_partial("loglikelihood", (context, continuation), res)
            out.append(res)
        return out

    def generate_until(self, requests: list[Instance]) -> list[str]:
        out = []
        for req in requests:
            context, kwargs, doc_to_visual, doc_id, task, split = req.args
            kwargs = dict(kwargs or {})
            if kwargs.get("do_sample") or float(kwargs.get("temperature", 0.0) or 0.0) > 0:
                raise UserError(f"task {task}: LMFusion's lmms-eval adapter decodes greedily only (do_sample / "
                                f"temperature > 0 in its generation_kwargs)")
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            enc = self.encode(context, self._visuals(doc_to_visual, task, split, doc_id))
            ids = enc["input_ids"][0]
            room = self.max_length - len(ids)
            if room < 1:
                raise UserError(f"task {task} doc {doc_id}: the prompt takes {len(ids)} positions, the model has "
                                f"{self.max_length}; nothing is truncated")
            max_new = min(int(kwargs.get("max_new_tokens", self.max_new_tokens)), room)
            params = SamplingParams(max_new_tokens=max_new, temperature=0.0, stop_token_ids=self.stop_ids)
            if "pixel_values" in enc:
                tokens = generate_with_images(self.model, ids, enc["pixel_values"], enc["image_sizes"], params)
            else:
                tokens = generate_text(self.model, [ids.tolist()], params)[0]
            text = cut_at_stops(self.tokenizer.decode(tokens, skip_special_tokens=True), until)
            self.cache_hook.add_partial("generate_until", (context, kwargs), text)
            out.append(text)
        return out

    def generate_until_multi_round(self, requests) -> list[str]:
        raise UserError("LMFusion's lmms-eval adapter has no multi-round generation (generate_until_multi_round); "
                        "choose tasks with output_type generate_until, loglikelihood or multiple_choice")
