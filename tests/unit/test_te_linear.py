"""Transformer Engine routed linears (GPU only): parity with the local routed layers, FP8 with padding.

Single process, TP=1. fp32 parity: TE's cuBLAS GEMMs may run in TF32, so a relative bound of 1e-2 (TF32 has a
10-bit mantissa; errors of ~1e-3 relative are expected) — what it catches is wrong routing, which is O(1);
FP8: quantisation error, so a loose relative bound (5e-2) — what matters is that padded groups run and frozen text
gets no gradient.
"""

import os

import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def tp1():
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_ext.te_linear import HAVE_TE

    if not HAVE_TE:
        pytest.skip("Transformer Engine is not installed (pip install 'lmfusion[gpu]' in a CUDA container)")
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
        dist.init_process_group("nccl", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    torch.cuda.manual_seed(0)
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(0)
    yield
    parallel_state.destroy_model_parallel()


def _layers(te_backend: bool):
    from megatron.core.model_parallel_config import ModelParallelConfig

    from megatron_ext.linear import ModalityColumnParallelLinear, ModalityRowParallelLinear
    from megatron_ext.te_linear import TEModalityColumnParallelLinear, TEModalityRowParallelLinear

    cfg = ModelParallelConfig(params_dtype=torch.float32, perform_initialization=False)
    col_cls = TEModalityColumnParallelLinear if te_backend else ModalityColumnParallelLinear
    row_cls = TEModalityRowParallelLinear if te_backend else ModalityRowParallelLinear
    col = col_cls(256, 512, config=cfg, init_method=torch.nn.init.zeros_, bias=False)
    row = row_cls(512, 256, config=cfg, init_method=torch.nn.init.zeros_, bias=False, input_is_parallel=True,
                  skip_bias_add=False)
    return col.cuda(), row.cuda()


def _copy(te_col, te_row, col, row):
    with torch.no_grad():
        te_col.text.weight.copy_(col.weight)
        te_col.image.weight.copy_(col.image_weight)
        te_row.text.weight.copy_(row.weight)
        te_row.image.weight.copy_(row.image_weight)


@pytest.mark.parametrize("fp8", [False, True])
def test_te_matches_local(tp1, fp8):
    import transformer_engine.pytorch as te

    from megatron_ext.routing import RoutingPlan
    from megatron_ext.te_linear import fp8_pad_multiple

    if fp8 and not te.fp8.check_fp8_support()[0]:
        pytest.skip("GPU has no FP8 support")
    col, row = _layers(False)
    for p in list(col.parameters()) + list(row.parameters()):
        torch.nn.init.normal_(p, std=0.05)
    te_col, te_row = _layers(True)
    _copy(te_col, te_row, col, row)
    for lin in (col, row):
        lin.weight.requires_grad_(False)
    for lin in (te_col.text, te_row.text):
        lin.weight.requires_grad_(False)
    s, b = 77, 2  # deliberately not a multiple of 16
    gen = torch.Generator(device="cuda").manual_seed(0)
    ids = (torch.rand(s, b, device="cuda", generator=gen) < 0.4).long()
    x = torch.randn(s, b, 256, device="cuda", generator=gen)
    ref = row(torch.relu(col(x, RoutingPlan.build(ids))[0]), RoutingPlan.build(ids))[0]
    ref.sum().backward()
    plan = RoutingPlan.build(ids, pad_multiple=fp8_pad_multiple(fp8))
    with te.fp8_autocast(enabled=fp8):
        out = te_row(torch.relu(te_col(x, plan)[0]), plan)[0]
    out.sum().backward()
    if fp8:
        rel = (out - ref).norm() / ref.norm()
        assert rel < 5e-2, f"fp8 relative error {rel:.3e}"
        g_rel = (te_col.image.weight.grad - col.image_weight.grad).norm() / col.image_weight.grad.norm()
        assert g_rel < 5e-2, f"fp8 image weight-grad relative error {g_rel:.3e}"
    else:
        def rel(a, b):
            return ((a - b).norm() / b.norm()).item()

        assert rel(out, ref) < 1e-2
        assert rel(te_col.image.weight.grad, col.image_weight.grad) < 1e-2
        assert rel(te_row.image.weight.grad, row.image_weight.grad) < 1e-2
    assert te_col.text.weight.grad is None and te_row.text.weight.grad is None
