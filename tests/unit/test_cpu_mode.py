"""megatron_ext.cpu in one process: what enable() changes, that disable() restores all of it, and the helpers.

Every test enables CPU mode through the fixture and disables it afterwards, so no other test sees it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_ext import cpu


@pytest.fixture
def cpu_mode():
    assert not cpu.is_enabled(), "CPU mode leaked in from another test"
    cpu.enable()
    try:
        yield
    finally:
        cpu.disable()


def _megatron_attrs():
    """The objects enable() patches, read fresh (identity compared before/after)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.pipeline_parallel import p2p_communication
    from megatron.core.tensor_parallel import random as mrandom

    return {
        "current_device": torch.cuda.current_device,
        "manual_seed": torch.cuda.manual_seed,
        "get_rng_state": torch.cuda.get_rng_state,
        "Stream": torch.cuda.Stream,
        "tracker": mrandom._CUDA_RNG_STATE_TRACKER,
        "set_cuda_rng_state": mrandom._set_cuda_rng_state,
        "batched_p2p": p2p_communication._batched_p2p_ops,
        "dist_opt_state_dict": DistributedOptimizer.state_dict,
        "dist_opt_load": DistributedOptimizer.load_state_dict,
    }


def test_cuda_device_arguments_map_to_cpu(cpu_mode):
    assert torch.empty(2, device="cuda").device.type == "cpu"
    assert torch.zeros(2, device="cuda:0").device.type == "cpu"
    assert torch.ones(2, device=torch.device("cuda")).device.type == "cpu"
    assert torch.tensor([1.0], device=torch.cuda.current_device()).device.type == "cpu"
    assert torch.full((2,), 3.0, device=0).device.type == "cpu"  # an int names a CUDA device
    x = torch.arange(4.0)
    assert x.cuda() is x
    assert x.to("cuda").device.type == "cpu"
    assert x.to(0).device.type == "cpu"
    assert x.to(device="cuda", dtype=torch.float64).dtype == torch.float64
    assert x.to(torch.device("cuda"), torch.float16).dtype == torch.float16
    assert x.to(torch.int32).dtype == torch.int32  # dtype-only calls untouched
    assert torch.empty_like(x, device="cuda").device.type == "cpu"


def test_backward_allocations_outside_the_mode(cpu_mode):
    """Function modes are off inside autograd backward: current_device() itself must name the CPU."""

    class Double(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return 2 * x

        @staticmethod
        def backward(ctx, grad):
            out = torch.empty(grad.shape, device=torch.cuda.current_device())
            return out.copy_(2 * grad)

    x = torch.ones(3, requires_grad=True)
    Double.apply(x).sum().backward()
    assert torch.equal(x.grad, torch.full((3,), 2.0))


def test_tensor_type_answers_cuda_names(cpu_mode):
    assert torch.zeros(1).type() == "torch.cuda.FloatTensor"
    assert torch.zeros(1, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
    assert torch.zeros(1, dtype=torch.float16).type() == "torch.cuda.HalfTensor"
    assert torch.zeros(1, dtype=torch.int64).type() == "torch.cuda.LongTensor"
    assert torch.zeros(1).type(torch.float64).dtype == torch.float64  # the conversion form still converts


def test_torch_cuda_stand_ins(cpu_mode):
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.set_device(0)
    stream = torch.cuda.Stream(device=torch.cuda.current_device())
    assert isinstance(stream, torch.cuda.Stream)  # a class: usable in isinstance and `| None` annotations
    with torch.cuda.stream(stream):
        torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.Event().record()


def test_cuda_rng_is_the_cpu_generator(cpu_mode):
    torch.cuda.manual_seed(7)
    a = torch.rand(5)
    torch.manual_seed(7)
    assert torch.equal(a, torch.rand(5))
    state = torch.cuda.get_rng_state()
    b = torch.rand(5)
    torch.cuda.set_rng_state(state)
    assert torch.equal(b, torch.rand(5))


def test_rng_tracker_forks_cpu_states(cpu_mode):
    from megatron.core import tensor_parallel

    tracker = tensor_parallel.get_cuda_rng_tracker()
    assert isinstance(tracker, cpu.CpuRNGStatesTracker)
    tracker.reset()
    tracker.add("a", 11)
    tracker.add("b", 12)
    with pytest.raises(Exception, match="already exists"):
        tracker.add("c", 11)
    torch.manual_seed(0)
    with tracker.fork("a"):
        a1 = torch.rand(3)
        with tracker.fork("b"):  # nested: b's stream, then back to a's where it was
            b1 = torch.rand(3)
        a2 = torch.rand(3)
    default = torch.rand(3)
    torch.manual_seed(11)
    assert torch.equal(torch.cat([a1, a2]), torch.rand(6))
    torch.manual_seed(12)
    assert torch.equal(b1, torch.rand(3))
    torch.manual_seed(0)
    assert torch.equal(default, torch.rand(3)), "forks must not advance the default stream"


def test_recompute_restores_rng_exactly(cpu_mode):
    """tensor_parallel.checkpoint needs torch.cuda.get_rng_state (it raised on a CPU build before)."""
    from megatron.core import tensor_parallel

    tracker = tensor_parallel.get_cuda_rng_tracker()
    tracker.reset()
    tracker.add("model-parallel-rng", 3)
    w = torch.randn(4, 4, requires_grad=True)

    def block(x):
        with tracker.fork():
            return F.dropout(x @ w, p=0.5)

    x = torch.randn(2, 4, requires_grad=True)  # checkpoint's output needs a grad-requiring input
    states = torch.get_rng_state(), tracker.get_states()
    block(x).sum().backward()
    want = w.grad.clone()
    w.grad = None
    torch.set_rng_state(states[0]), tracker.set_states(states[1])
    out = tensor_parallel.checkpoint(block, False, x)
    with tracker.fork():
        torch.rand(10)  # move the stream on before backward
    out.sum().backward()
    assert torch.equal(w.grad, want)


def test_enable_is_idempotent_and_disable_restores_everything():
    before = _megatron_attrs()
    type_name = torch.zeros(1).type()
    cpu.enable()
    try:
        patched = _megatron_attrs()
        assert all(patched[k] is not before[k] for k in before), [k for k in before if patched[k] is before[k]]
        cpu.enable()  # a second enable must not record patched values as originals
        assert _megatron_attrs() == patched
    finally:
        cpu.disable()
    assert not cpu.is_enabled()
    assert _megatron_attrs() == before
    assert torch.zeros(1).type() == type_name == "torch.FloatTensor"
    with pytest.raises((RuntimeError, AssertionError)):
        torch.empty(1, device="cuda")  # the mode is gone
    cpu.disable()  # disabling twice is harmless


def test_refuses_where_cuda_is_available(monkeypatch):
    before = _megatron_attrs()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(RuntimeError, match="CUDA is available"):
        cpu.enable()
    assert not cpu.is_enabled()
    assert _megatron_attrs() == before


def test_check_config():
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.transformer import TransformerConfig

    base = dict(num_layers=2, hidden_size=8, num_attention_heads=2, bias_activation_fusion=False,
                bias_dropout_fusion=False, masked_softmax_fusion=False, gradient_accumulation_fusion=False,
                persist_layer_norm=False, apply_rope_fusion=False)
    cpu.check_config(TransformerConfig(**base))
    with pytest.raises(ValueError, match="masked_softmax_fusion"):
        cpu.check_config(TransformerConfig(**{**base, "masked_softmax_fusion": True}))
    pipeline = dict(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2,
                    pipeline_dtype=torch.float32)
    cpu.check_config(ModelParallelConfig(**pipeline))  # batch_p2p_comm is fixed by enable(), not refused
    with pytest.raises(ValueError, match="variable_seq_lengths"):
        cpu.check_config(ModelParallelConfig(**pipeline, variable_seq_lengths=True))


def _adam(params):
    return torch.optim.AdamW(params, lr=0.1, weight_decay=0.1, foreach=False)


def test_init_adam_state_is_what_lazy_init_creates():
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(3)) for _ in range(2)]
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    lazy, eager = _adam(ps), _adam(qs)
    cpu.init_adam_state_for_load(eager)
    assert all(eager.state[q]["step"].item() == 0 for q in qs)
    for _ in range(2):
        for p, q in zip(ps, qs):
            p.grad = q.grad = torch.ones(3)
        lazy.step(), eager.step()
    assert all(torch.equal(p, q) for p, q in zip(ps, qs))


def test_split_shared_adam_steps():
    """One step tensor shared by all params (what DistributedOptimizer.load_state_dict gives) is advanced once
    per param by AdamW; split, each param advances once per step."""
    ps = [torch.nn.Parameter(torch.ones(2)) for _ in range(3)]
    opt = _adam(ps)
    cpu.init_adam_state_for_load(opt)
    shared = torch.tensor(5.0)
    for p in ps:
        opt.state[p]["step"] = shared
    assert cpu.split_shared_adam_steps(opt) == 2
    assert cpu.split_shared_adam_steps(opt) == 0
    for p in ps:
        p.grad = torch.ones(2)
    opt.step()
    assert [opt.state[p]["step"].item() for p in ps] == [6.0, 6.0, 6.0]


def test_fuse_adam_matches_the_per_tensor_loop():
    """The fused CPU kernel computes AdamW's update: same params after several steps (fp32 rounding), with weight
    decay, a wrapped optimizer (``.optimizer``, as megatron's) and state created by init_adam_state_for_load."""
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(37, 5)), torch.nn.Parameter(torch.randn(11))]
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    start = [p.detach().clone() for p in ps]
    loop, fused = _adam(ps), _adam(qs)

    class Wrapped:  # megatron's optimizers hold the torch one as .optimizer
        optimizer = fused

    assert cpu.fuse_adam(Wrapped()) == 1
    assert fused.param_groups[0]["fused"] and not fused.param_groups[0]["foreach"]
    assert cpu.fuse_adam(Wrapped()) == 0  # already fused
    cpu.init_adam_state_for_load(fused)
    for step in range(5):
        grads = [torch.randn_like(p) for p in ps]
        for p, q, g in zip(ps, qs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        loop.step(), fused.step()
    for p, q, p0 in zip(ps, qs, start):
        assert float((p - p0).abs().max()) > 0.1  # lr 0.1 x 5 steps moved them
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-6)
    assert [fused.state[q]["step"].item() for q in qs] == [5.0, 5.0]
