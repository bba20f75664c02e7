"""``train.recompute=full``: each layer re-runs in backward, through torch's checkpoint on the local path and
through Transformer Engine's with TE linears (TE's re-enters the forward's ``fp8_autocast`` on recompute; torch's
does not). The TE path runs on CPU against ``tests/fake_te.py``, whose ``distributed.checkpoint`` re-enters FP8 the
way TE's does and whose ``Linear`` records whether FP8 was active at every call. Gradients with and without
recompute are compared exactly: the same operations run in the same order (no dropout), so any difference is a
recompute that ran something else."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lmfusion.config import ModelConfig
from lmfusion.model.image_config import ImageIOConfig
from lmfusion.training.model_setup import recompute_layers
from tests import fake_te

MODEL = ModelConfig(vocab_size=300, hidden_size=32, ffn_hidden_size=48, num_layers=2, num_attention_heads=4,
                    num_query_groups=2, bos_token_id=1, eos_token_id=2, boi_token_id=3, eoi_token_id=4,
                    attention_backend="sdpa", linear_backend="local",
                    image=ImageIOConfig(latent_channels=3, latent_size=8, patch_size=2, kind="linear"))


@pytest.fixture(scope="module")
def inputs():
    from lmfusion.training.synthetic import synthetic_batches

    batch = next(synthetic_batches(MODEL, seq_length=48, micro_batch_size=2, seed=2))
    assert batch.num_images > 0
    return batch.to_model_inputs(batch.image_latents, torch.full((batch.num_images,), 10, dtype=torch.long))


def _grads(backend: str, recompute: bool, inputs, fp8: bool = False):
    from lmfusion.model.builder import build_model

    model = build_model(dataclasses.replace(MODEL, linear_backend=backend), freeze=True, seed=3)
    names = [n for n, _ in model.named_parameters()]
    if recompute:
        recompute_layers(model)
        assert [n for n, _ in model.named_parameters()] == names  # checkpoint keys unchanged
        assert all("forward" not in vars(layer) for layer in model.decoder.layers)  # no instance patching
    with fake_te.fp8_autocast(enabled=fp8):
        out = model(inputs)
    (out.logits.pow(2).mean() + out.noise_pred.pow(2).mean()).backward()  # backward outside autocast, as megatron
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_local_recompute_uses_torch_checkpoint_and_gives_identical_gradients(runtime, inputs, monkeypatch):
    te = fake_te.install(monkeypatch)
    calls = []
    original = torch.utils.checkpoint.checkpoint

    def spy(*args, **kwargs):
        calls.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", spy)
    plain = _grads("local", False, inputs)
    assert not calls
    recomputed = _grads("local", True, inputs)
    assert len(calls) == MODEL.num_layers and te.distributed.calls == 0
    assert plain.keys() == recomputed.keys() and any(".image_weight" in n for n in plain)
    for name, grad in plain.items():
        assert torch.equal(recomputed[name], grad), name


def test_te_recompute_uses_te_checkpoint_and_recomputes_in_fp8(runtime, inputs, monkeypatch):
    te = fake_te.install(monkeypatch)
    plain = _grads("te", False, inputs, fp8=True)
    forward_calls = len(te.Linear.fp8_log)
    assert forward_calls > 0 and all(te.Linear.fp8_log)
    te.Linear.fp8_log.clear()
    recomputed = _grads("te", True, inputs, fp8=True)
    assert te.distributed.calls == MODEL.num_layers
    log = te.Linear.fp8_log
    assert len(log) == 2 * forward_calls, "every routed GEMM runs again in backward"
    assert all(log), f"{log.count(False)} of {len(log)} GEMM calls (the recompute) ran outside fp8_autocast"
    assert plain.keys() == recomputed.keys()
    for name, grad in plain.items():
        assert torch.equal(recomputed[name], grad), name
