"""lm-eval adapter (lmfusion.evaluation.lm_adapter): on the ckpts fixture's tiny converted Llama, loglikelihood,
loglikelihood_rolling and greedy generate_until requests (lm-eval ``Instance`` objects, no dataset download) give
what lm-eval's own Hugging Face adapter (HFLM) gives on the source HF model.

Tolerance: fp32 on both sides; only summation order and left padding differ (1e-4 absolute on summed log-probs of a
few tokens; observed ~1e-6). Greedy flags and generated text must be equal."""

from __future__ import annotations

import pytest
import torch


from lm_eval.api.instance import Instance  # noqa: E402

from lmfusion.evaluation.lm_adapter import LMFusionLM  # noqa: E402
from lmfusion.inference.load import load_for_inference  # noqa: E402

PAIRS = [("a photo of a", " cat"), ("the quick brown fox", " jumps over the lazy dog"), ("", "hello world"),
         ("a drawing of a red shoe, ", "twice")]
TOL = 1e-4


def _requests(kind, args_list):
    return [Instance(request_type=kind, doc={}, arguments=args, idx=i) for i, args in enumerate(args_list)]


@pytest.fixture(scope="module")
def models(ckpts):
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer, LlamaForCausalLM

    root, _ = ckpts
    hf_model = LlamaForCausalLM.from_pretrained(root / "hf", torch_dtype=torch.float32).eval()
    ref = HFLM(pretrained=hf_model, tokenizer=AutoTokenizer.from_pretrained(root / "hf"), batch_size=2,
               device="cpu", add_bos_token=False)
    ours = LMFusionLM(load_for_inference(root / "base", device="cpu"), batch_size=3)
    return ours, ref


def test_loglikelihood_matches_hf_adapter(models):
    ours, ref = models
    got, want = ours.loglikelihood(_requests("loglikelihood", PAIRS)), ref.loglikelihood(_requests("loglikelihood",
                                                                                                    PAIRS))
    for (g, g_greedy), (w, w_greedy) in zip(got, want):
        assert g == pytest.approx(w, abs=TOL)
        assert g_greedy == w_greedy


def test_rolling_and_generation_match_hf_adapter(models):
    ours, ref = models
    texts = [("a photo of a cat sitting on a mat",), ("hello world, this is a tiny tokenizer",)]
    got = ours.loglikelihood_rolling(_requests("loglikelihood_rolling", texts))
    want = ref.loglikelihood_rolling(_requests("loglikelihood_rolling", texts))
    assert got == pytest.approx(want, abs=TOL)
    gen = [("a photo of", {"until": ["\n"], "max_gen_toks": 6, "do_sample": False})]
    assert ours.generate_until(_requests("generate_until", gen)) == ref.generate_until(_requests("generate_until",
                                                                                                 gen))
