"""Transformer Engine routed linears: one parameter contract with the local layers, on CPU and GPU.

CPU (every machine): our TE wrappers built on ``tests/fake_te.py``, a stand-in of ``transformer_engine.pytorch``
that behaves as TE 2.9 where our code depends on it. Checked through the same API for both backends:
``megatron_ext.contract.check_routed_linear`` (names, TP attributes, checkpoint keys and shards, at TP 1 and 2),
the base shard each TP rank loads (fc1's stride 2), and a whole model built on either backend: same parameter
names, base weights, twins, trainable set, checkpoint keys and outputs. TP=2 runs in one process: the layers take a
``tp_group`` whose rank and size are what megatron's ``get_pg_rank``/``get_pg_size`` read.

GPU (marked ``gpu``; needs TE): parity with the local layers with real TE GEMMs, fp32 and FP8. TE's cuBLAS GEMMs
may run in TF32, so a relative bound of 1e-2 (TF32 has a 10-bit mantissa; errors of ~1e-3 relative are expected) —
what it catches is wrong routing, which is O(1); FP8: quantisation error, so a loose relative bound (5e-2) — what
matters is that padded groups run and frozen text gets no gradient.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from megatron.core.model_parallel_config import ModelParallelConfig

from lmfusion.config import ModelConfig
from lmfusion.model.image_config import ImageIOConfig
from megatron_ext.contract import check_routed_linear
from megatron_ext.spec import SEPARATIONS
from megatron_ext.linear import ModalityColumnParallelLinear, ModalityRowParallelLinear
from megatron_ext.routing import RoutingPlan
from tests import fake_te

MODEL = ModelConfig(vocab_size=300, hidden_size=32, ffn_hidden_size=48, num_layers=2, num_attention_heads=4,
                    num_query_groups=2, bos_token_id=1, eos_token_id=2, boi_token_id=3, eoi_token_id=4,
                    attention_backend="sdpa", linear_backend="local",
                    image=ImageIOConfig(latent_channels=3, latent_size=8, patch_size=2, kind="linear"))


class TPGroup:
    """What megatron reads of a tensor-parallel group when building and checkpointing a layer: rank and size."""

    def __init__(self, rank: int, size: int):
        self._rank, self._size = rank, size

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size


class DictBase:
    """An in-memory converted base (full TP=1 tensors by megatron name), as ``load_base_weights`` reads one."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def keys(self):
        return self.tensors.keys()

    def shape(self, name):
        return tuple(self.tensors[name].shape)

    def get(self, name, slices=None):
        return self.tensors[name] if slices is None else self.tensors[name][slices]


@pytest.fixture
def te(monkeypatch):
    return fake_te.install(monkeypatch)


def _config(**kw) -> ModelParallelConfig:
    return ModelParallelConfig(params_dtype=torch.float32, use_cpu_initialization=True, **kw)


def _column(backend: str, inp: int, out: int, *, bias: bool, stride: int, group, init=True, routed=True):
    from megatron_ext.linear import SharedColumnParallelLinear
    from megatron_ext.te_linear import TEModalityColumnParallelLinear, TESharedColumnParallelLinear

    cls = {("te", True): TEModalityColumnParallelLinear, ("local", True): ModalityColumnParallelLinear,
           ("te", False): TESharedColumnParallelLinear, ("local", False): SharedColumnParallelLinear}[backend, routed]
    return cls(inp, out, config=_config(perform_initialization=init), init_method=torch.nn.init.xavier_normal_,
               bias=bias, gather_output=False, stride=stride, tp_group=group)


def _row(backend: str, inp: int, out: int, *, bias: bool, group, routed=True):
    from megatron_ext.linear import SharedRowParallelLinear
    from megatron_ext.te_linear import TEModalityRowParallelLinear, TESharedRowParallelLinear

    cls = {("te", True): TEModalityRowParallelLinear, ("local", True): ModalityRowParallelLinear,
           ("te", False): TESharedRowParallelLinear, ("local", False): SharedRowParallelLinear}[backend, routed]
    return cls(inp, out, config=_config(), init_method=torch.nn.init.xavier_normal_, bias=bias,
               input_is_parallel=True, skip_bias_add=False, tp_group=group)


@pytest.mark.parametrize("routed", [True, False])
@pytest.mark.parametrize("backend", ["local", "te"])
@pytest.mark.parametrize("tp_rank, tp_size", [(0, 1), (0, 2), (1, 2)])
def test_routed_linears_follow_the_contract(runtime, te, backend, tp_rank, tp_size, routed):
    """Routed layers and the shared (dense) layers of unseparated slots, on both backends."""
    group = TPGroup(tp_rank, tp_size)
    for bias, stride in ((False, 1), (True, 1), (False, 2), (True, 2)):
        col = _column(backend, 16, 24, bias=bias, stride=stride, group=group, routed=routed)
        check_routed_linear(col, partition_dim=0, stride=stride, bias=bias, routed=routed)
        assert col.weight.shape == (24 // tp_size, 16)
    row = _row(backend, 24, 16, bias=False, group=group, routed=routed)
    check_routed_linear(row, partition_dim=1, bias=False, routed=routed)
    assert row.weight.shape == (16, 24 // tp_size)


def test_fc1_base_shard_is_the_same_for_every_backend(runtime, te):
    """At TP=2 each rank of the fused [gate; up] fc1 loads [gate_r; up_r] (stride 2), whatever the backend; with
    stride 1 rank 0 would load all gate rows and rank 1 all up rows."""
    from lmfusion.model.weights import load_base_weights

    h, ffn = 8, 12
    full = torch.arange(2 * ffn * h, dtype=torch.float32).view(2 * ffn, h)  # rows: gate 0..11, up 12..23
    base = DictBase({"linear_fc1.weight": full})
    gate, up = full[:ffn], full[ffn:]
    for rank in range(2):
        loaded = {}
        for backend in ("local", "te"):
            holder = torch.nn.Module()
            holder.linear_fc1 = _column(backend, h, 2 * ffn, bias=False, stride=2, group=TPGroup(rank, 2),
                                        init=False)
            names = load_base_weights(holder, base, vocab_size=MODEL.vocab_size, tied=False, tp_rank=rank, tp_size=2)
            assert names == ["linear_fc1.weight"], f"{backend}: loaded {names}"
            loaded[backend] = holder.linear_fc1.weight.detach().clone()
        half = ffn // 2
        expected = torch.cat([gate[rank * half:(rank + 1) * half], up[rank * half:(rank + 1) * half]])
        assert torch.equal(loaded["local"], expected)
        assert torch.equal(loaded["te"], expected)


def test_te_layers_take_their_device_and_share_tensors_with_their_gemms(runtime, te):
    from megatron_ext.te_linear import default_device

    assert default_device() == torch.device("cpu")  # no CUDA here; the current CUDA device where there is one
    col = _column("te", 16, 24, bias=True, stride=1, group=TPGroup(0, 1))
    assert col.weight.device.type == "cpu"
    col = col.to(torch.float64)  # .to / .bfloat16 / .cuda: the GEMMs keep using the module's parameters
    text, image = col._gemms
    assert text.weight is col.weight and image.weight is col.image_weight and image.bias is col.image_bias
    plan = RoutingPlan.build(torch.tensor([[0], [1], [1]]))
    y, _ = col(torch.randn(3, 1, 16, dtype=torch.float64), plan)  # the stand-in asserts matching dtypes
    assert y.dtype == torch.float64
    col.eval()
    assert not text.training and not image.training
    from megatron_ext.te_linear import TEModalityColumnParallelLinear

    meta = TEModalityColumnParallelLinear(16, 24, config=_config(perform_initialization=False),
                                          init_method=torch.nn.init.zeros_, bias=False, tp_group=TPGroup(0, 1),
                                          device="meta")  # the device it is given, not a hard-coded "cuda"
    assert {p.device.type for p in meta.parameters()} == {"meta"}


def _full_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("separation", SEPARATIONS)
def test_te_model_loads_freezes_and_checkpoints_like_local(runtime, te, separation):
    """A whole model on either backend, for each separation: the same names, base weights, twins, trainable set,
    checkpoint keys and outputs (the stand-in computes F.linear, so outputs agree to float rounding: 1e-5)."""
    from lmfusion.model.builder import build_model
    from lmfusion.training.synthetic import synthetic_batches

    model_cfg = dataclasses.replace(MODEL, separation=separation)
    random_model = build_model(model_cfg, freeze=False, seed=7)
    tensors = _full_state(random_model)  # a TP=1 base in megatron naming (of which text names only are read)
    for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        tensors[name] = tensors[name][:MODEL.vocab_size]  # a base holds the vocabulary unpadded
    base = DictBase(tensors)
    models = {b: build_model(dataclasses.replace(model_cfg, linear_backend=b), base=base, seed=3)
              for b in ("local", "te")}
    local, te_model = models["local"], models["te"]
    assert [n for n, _ in te_model.named_parameters()] == [n for n, _ in local.named_parameters()]
    state = {b: _full_state(m) for b, m in models.items()}
    for name, value in state["local"].items():
        assert torch.equal(state["te"][name], value), name
    trainable = {b: [n for n, p in m.named_parameters() if p.requires_grad] for b, m in models.items()}
    assert trainable["te"] == trainable["local"]
    assert any(".linear_fc1.image_weight" in n for n in trainable["te"]) == (separation != "none")
    assert sorted(te_model.sharded_state_dict()) == sorted(local.sharded_state_dict())

    batch = next(synthetic_batches(MODEL, seq_length=48, micro_batch_size=2, seed=1))
    n_img = batch.num_images
    assert n_img > 0
    inputs = batch.to_model_inputs(batch.image_latents, torch.full((n_img,), 10, dtype=torch.long))
    outs = {}
    for b, m in models.items():
        out = m(inputs)
        (out.logits.float().pow(2).mean() + out.noise_pred.pow(2).mean()).backward()
        outs[b] = out
    torch.testing.assert_close(outs["te"].logits, outs["local"].logits, rtol=1e-5, atol=1e-5)
    for (name, p_te), (_, p_local) in zip(te_model.named_parameters(), local.named_parameters()):
        if p_local.requires_grad and p_local.grad is not None:
            torch.testing.assert_close(p_te.grad, p_local.grad, rtol=1e-4, atol=1e-6, msg=name)
        if not p_local.requires_grad:
            assert p_te.grad is None, f"{name} is frozen on the TE backend too"


# ------------------------------------------------------------------------------------------------ GPU, real TE
@pytest.fixture(scope="module")
def tp1_nccl():
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
        dist.init_process_group("nccl", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(0)
    yield
    parallel_state.destroy_model_parallel()


def _gpu_layers(backend: str):
    config = ModelParallelConfig(params_dtype=torch.float32, perform_initialization=False)
    if backend == "te":
        from megatron_ext.te_linear import TEModalityColumnParallelLinear as Col, TEModalityRowParallelLinear as Row
    else:
        Col, Row = ModalityColumnParallelLinear, ModalityRowParallelLinear
    col = Col(256, 512, config=config, init_method=torch.nn.init.zeros_, bias=False)
    row = Row(512, 256, config=config, init_method=torch.nn.init.zeros_, bias=False, input_is_parallel=True,
              skip_bias_add=False)
    return col.cuda(), row.cuda()


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, True])
def test_te_matches_local_on_gpu(tp1_nccl, fp8):
    import transformer_engine.pytorch as te_pt

    from megatron_ext.te_linear import fp8_pad_multiple

    if fp8 and not te_pt.fp8.check_fp8_support()[0]:
        pytest.skip("GPU has no FP8 support")
    col, row = _gpu_layers("local")
    for p in list(col.parameters()) + list(row.parameters()):
        torch.nn.init.normal_(p, std=0.05)
    te_col, te_row = _gpu_layers("te")
    check_routed_linear(te_col, partition_dim=0)
    check_routed_linear(te_row, partition_dim=1)
    with torch.no_grad():  # the contract: the same names on both backends
        for te_layer, layer in ((te_col, col), (te_row, row)):
            for name, p in layer.named_parameters():
                te_layer.get_parameter(name).copy_(p)
    for lin in (col, row, te_col, te_row):
        lin.weight.requires_grad_(False)
    s, b = 77, 2  # deliberately not a multiple of 16
    gen = torch.Generator(device="cuda").manual_seed(0)
    ids = (torch.rand(s, b, device="cuda", generator=gen) < 0.4).long()
    x = torch.randn(s, b, 256, device="cuda", generator=gen)
    ref = row(torch.relu(col(x, RoutingPlan.build(ids))[0]), RoutingPlan.build(ids))[0]
    ref.sum().backward()
    plan = RoutingPlan.build(ids, pad_multiple=fp8_pad_multiple(fp8))
    with te_pt.fp8_autocast(enabled=fp8):
        out = te_row(torch.relu(te_col(x, plan)[0]), plan)[0]
    out.sum().backward()

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    bound = 5e-2 if fp8 else 1e-2
    assert rel(out, ref) < bound
    assert rel(te_col.image_weight.grad, col.image_weight.grad) < bound
    assert rel(te_row.image_weight.grad, row.image_weight.grad) < bound
    assert te_col.weight.grad is None and te_row.weight.grad is None
