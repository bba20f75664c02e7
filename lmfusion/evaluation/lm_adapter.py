"""An lm-evaluation-harness model over LMFusion's text path (the frozen Llama), for HellaSwag/PIQA/SIQA/WinoGrande.

:class:`LMFusionLM` subclasses ``lm_eval.api.model.TemplateLM``, so contexts and continuations are split into tokens
exactly as lm-eval's own Hugging Face adapter (``HFLM``) splits them (``_encode_pair``; an empty context is scored
after ``prefix_token_id`` = ``<bos>``), and rolling windows use lm-eval's ``get_rolling_token_windows``. Scoring runs
left-padded batches through :class:`lmfusion.inference.text.Session` (no cache kept): the continuation's log-probs are
read from the last positions of each row. Generation (``generate_until``) is greedy through ``generate_text``.
"""

from __future__ import annotations

from typing import Optional

import torch
from lm_eval import utils
from lm_eval.api.model import TemplateLM

from lmfusion.inference.text import SamplingParams, Session, cut_at_stops, generate_text

__all__ = ["LMFusionLM"]


class LMFusionLM(TemplateLM):
    def __init__(self, bundle, batch_size: int = 8, max_length: Optional[int] = None,
                 add_bos_token: bool = False) -> None:
        super().__init__()
        if bundle.tokenizer is None:
            raise FileNotFoundError(f"{bundle.meta.base_dir}: no tokenizer files; lm-eval needs them")
        self.bundle, self.model, self.tokenizer = bundle, bundle.model, bundle.tokenizer
        self.batch_size = int(batch_size)
        self.max_length = int(max_length or bundle.config.max_position_embeddings)
        self.add_bos_token = add_bos_token
        self.stop_ids = tuple(bundle.meta.stop_token_ids)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens or self.add_bos_token))

    # ------------------------------------------------------------------------------------------------ scoring
    @torch.no_grad()
    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum log p(continuation | context), continuation is greedy) for each (context, continuation) pair."""
        from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

        rows = []
        for ctx, cont in pairs:
            seq = (ctx + cont)[-(self.max_length + 1):][:-1]  # left-truncated, as HFLM does
            rows.append(seq)
        session = Session(self.model, len(rows))
        out = session.extend(rows, commit=False)
        logits = gather_from_tensor_model_parallel_region(out.logits.contiguous())  # (s, b, V)
        logp = torch.log_softmax(logits[..., :self.bundle.config.vocab_size].float(), dim=-1)
        results = []
        for r, (_, cont) in enumerate(pairs):
            lp = logp[-len(cont):, r]  # (len(cont), V): left padding puts every row's last tokens at the end
            target = torch.tensor(cont, device=lp.device)
            results.append((float(lp.gather(-1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all())))
        return results

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        # longest first (lm-eval's order), so padding within a batch is small; results go back in request order
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1] + requests[i][2]))
        out: list = [None] * len(requests)
        for i in range(0, len(order), self.batch_size):
            idx = order[i:i + self.batch_size]
            for j, res in zip(idx, self._score([(requests[j][1], requests[j][2]) for j in idx])):
                out[j] = res
                if requests[j][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[j][0], res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        results = []
        for req in requests:
            (string,) = req.args
            windows = list(map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)))
            scores = self._loglikelihood_tokens([(None, ctx, cont) for ctx, cont in windows])
            total = sum(s for s, _ in scores)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            results.append(total)
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in requests:
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or [self.tokenizer.decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            if kwargs.get("do_sample") or float(kwargs.get("temperature", 0.0) or 0.0) > 0:
                raise ValueError("LMFusionLM.generate_until runs greedy decoding only (do_sample / temperature > 0)")
            max_new = int(kwargs.get("max_gen_toks", 256))
            ctx = self.tok_encode(context)[-(self.max_length - max_new):] or [self.prefix_token_id]
            params = SamplingParams(max_new_tokens=max_new, temperature=0.0, stop_token_ids=self.stop_ids)
            text = cut_at_stops(self.tokenizer.decode(generate_text(self.model, [ctx], params)[0],
                                                      skip_special_tokens=True), until)
            self.cache_hook.add_partial("generate_until", (context, kwargs), text)
            out.append(text)
        return out
