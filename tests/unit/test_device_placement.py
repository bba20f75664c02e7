"""The runtime device contract (megatron_ext.device): every builder puts *every* tensor of the model on the runtime
device — parameters, buffers and the plain tensor attributes megatron keeps (RoPE's frequency table) — and every
entry point (the megatron trainer, the DeepSpeed engine, inference, evaluation) asks for it; the distributed
optimizer's torch-AdamW checkpoint fixes are installed by the trainer whatever the device.

A GPU is not needed to show it: ``meta`` is a device other than the host, and a model built for it must hold no
tensor anywhere else. One process, a one-rank gloo group (megatron TP=PP=1, CPU mode).
"""

from __future__ import annotations

import types

import pytest
import torch

from lmfusion.config_io import load_config
from lmfusion.model.builder import build_model, chunk_layout
from lmfusion.model.image_io import ImageIOConfig
from megatron_ext import device as device_contract
from tests.fixtures import convert_tiny_llama

IMAGE = ImageIOConfig(latent_channels=3, latent_size=8, patch_size=2, kind="unet", block_channels=(16, 16),
                      norm_groups=8, layers_per_block=1)


@pytest.fixture(scope="module")
def tiny(runtime, tmp_path_factory):
    root = tmp_path_factory.mktemp("device")
    convert_tiny_llama(root, num_key_value_heads=2, tie_word_embeddings=False)
    return root


def tensors_off_device(model: torch.nn.Module, device_type: str) -> list[str]:
    """Every parameter, buffer and plain tensor attribute of every submodule that is not on ``device_type``."""
    off = []
    for prefix, module in model.named_modules():
        named = [*module._parameters.items(), *module._buffers.items(),
                 *((k, v) for k, v in vars(module).items() if isinstance(v, torch.Tensor))]
        off += [f"{prefix}.{name} ({t.device})" for name, t in named
                if t is not None and t.device.type != device_type]
    return off


def _build(root, **kw):
    _, cfg, weights = convert_tiny_llama.load(root, IMAGE)
    with weights:
        return cfg, build_model(cfg, base=weights, **kw)


def test_build_model_puts_every_tensor_on_the_device(tiny):
    _, model = _build(tiny, device="meta")
    assert model.rotary.inv_freq.device.type == "meta"  # megatron keeps it as a plain attribute, not a buffer
    assert tensors_off_device(model, "meta") == []
    assert sum(p.numel() for p in model.parameters()) > 0


def test_moving_a_built_model_moves_rope_and_keeps_it_fp32(tiny):
    _, model = _build(tiny)
    assert tensors_off_device(model, "cpu") == []
    inv_freq = model.rotary.inv_freq.clone()
    model.bfloat16()  # what megatron's Float16Module does: RoPE frequencies must not lose precision
    assert model.rotary.inv_freq.dtype == torch.float32 and torch.equal(model.rotary.inv_freq, inv_freq)
    model.to("meta")
    assert tensors_off_device(model, "meta") == []
    assert model.rotary.inv_freq.dtype == torch.float32


def test_virtual_stages_are_built_by_the_same_builder():
    """Interleaved layout (megatron's): chunk v of rank r holds layers (v * pp + r) * n ..."""
    assert chunk_layout(8, pp=2, pp_rank=1, vpp=2, vp_stage=0) == (2, 2, False, False)
    assert chunk_layout(8, pp=2, pp_rank=1, vpp=2, vp_stage=1) == (6, 2, False, True)
    assert chunk_layout(8, pp=2, pp_rank=0, vpp=2, vp_stage=0) == (0, 2, True, False)
    assert chunk_layout(8, pp=1, pp_rank=0) == (0, 8, True, True)


class _Built(Exception):
    """Raised by the spy once the builder has been called: the rest of the entry point is not under test."""


@pytest.fixture
def spy_build(monkeypatch):
    seen = {}

    def spy(model_config, **kwargs):
        seen.update(kwargs)
        raise _Built

    return seen, spy


def _train_config(tiny):
    return load_config("examples/configs/tiny_cpu.yaml", [f"init.base_checkpoint={tiny / 'base'}"])


def test_megatron_trainer_builds_on_the_runtime_device_and_fixes_the_optimizer(tiny, spy_build, monkeypatch):
    from megatron.core.optimizer import distrib_optimizer

    from lmfusion.model import builder
    from lmfusion.training import model_setup
    from lmfusion.training.trainer import Trainer
    from megatron_ext import cpu, torch_adam

    seen, spy = spy_build
    monkeypatch.setattr(builder, "build_model", spy)  # build_model_chunks' one call
    cfg = _train_config(tiny)
    with pytest.raises(_Built):
        model_setup.build_train_model(cfg, None)
    assert seen["device"] == device_contract.runtime_device()
    trainer = object.__new__(Trainer)
    trainer.cfg, trainer.rt = cfg, types.SimpleNamespace(device=torch.device("meta"))
    with pytest.raises(_Built):
        trainer.build_train_model(None)
    assert seen["device"] == torch.device("meta")

    # Outside CPU mode (a GPU without apex/TE), with megatron's own methods back, the trainer installs the fixes.
    cls = distrib_optimizer.DistributedOptimizer
    for name in ("state_dict", "load_state_dict", "_set_main_param_and_optimizer_states"):
        monkeypatch.setattr(cls, name, cpu._original(cls, name) if cpu.is_enabled() else getattr(cls, name))
    assert not torch_adam.installed()
    with pytest.raises(_Built):
        model_setup.build_train_model(cfg, None)
    assert torch_adam.installed()


def test_deepspeed_engine_builds_on_the_runtime_device(tiny, spy_build, monkeypatch):
    from lmfusion.training import deepspeed_engine

    seen, spy = spy_build
    monkeypatch.setattr(deepspeed_engine, "build_model", spy)
    engine = object.__new__(deepspeed_engine.DeepSpeedTrainer)
    engine.cfg = _train_config(tiny)
    engine.rt = types.SimpleNamespace(device=torch.device("meta"), dp_size=1)
    with pytest.raises(_Built):
        engine.build_train_model(None)
    assert seen["device"] == torch.device("meta")


def test_inference_and_evaluation_build_on_the_requested_device(tiny, spy_build, monkeypatch):
    from lmfusion.evaluation.runtime import load_data_parallel
    from lmfusion.inference.load import load_for_inference
    from lmfusion.model import builder

    seen, spy = spy_build
    monkeypatch.setattr(builder, "build_model", spy)
    with pytest.raises(_Built):
        load_for_inference(tiny / "base", device="cpu")
    assert seen["device"] == torch.device("cpu")
    seen.clear()
    with pytest.raises(_Built):
        load_data_parallel(tiny / "base", device=None)
    assert seen["device"] == device_contract.placement(None).device


def test_placement_contract():
    cpu = device_contract.placement("cpu")
    assert (cpu.device, cpu.backend, cpu.cpu_mode) == (torch.device("cpu"), "gloo", True)
    cuda = device_contract.placement("cuda:1")
    assert (cuda.device, cuda.backend, cuda.cpu_mode) == (torch.device("cuda", 1), "nccl", False)
    assert device_contract.placement(None).device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="'meta': expected 'cuda', 'cuda:N' or 'cpu'"):
        device_contract.placement("meta")

