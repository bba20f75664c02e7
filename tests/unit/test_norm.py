"""RoutedRMSNorm: the Llama formula with each token's modality weight, and no host sync per call.

The reference is written directly (``torch.where`` over the ids, HF's fp32 normalisation); outputs are compared
exactly (both are the same elementwise products), gradients to 1e-6 (a where-sum and an index_select backward may
add in a different order)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_ext.norm import RoutedRMSNorm
from megatron_ext.routing import IMAGE, TEXT, RoutingPlan

S, B, H = 8, 2, 16


@contextlib.contextmanager
def no_host_sync(monkeypatch):
    """Raise on every way a tensor's value reaches Python (what would stall a GPU stream): ``item``, ``int``,
    ``bool``, ``float``, ``tolist``, data-dependent shapes (``unique``, ``nonzero``)."""

    def refuse(name):
        def raiser(*args, **kwargs):
            raise AssertionError(f"host sync: {name} called")
        return raiser

    with monkeypatch.context() as m:
        for name in ("item", "__int__", "__bool__", "__float__", "__index__", "tolist", "unique", "nonzero"):
            m.setattr(torch.Tensor, name, refuse(f"Tensor.{name}"))
        for name in ("unique", "nonzero", "bincount", "unique_consecutive"):
            m.setattr(torch, name, refuse(f"torch.{name}"))
        yield


def _norm() -> RoutedRMSNorm:
    config = TransformerConfig(num_layers=1, hidden_size=H, num_attention_heads=1, params_dtype=torch.float32)
    norm = RoutedRMSNorm(config, H, eps=1e-5)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(H, generator=gen))
        norm.image_weight.copy_(torch.randn(H, generator=gen))
    return norm


def _layouts() -> dict[str, torch.Tensor]:
    mixed_late = torch.zeros(S, B, dtype=torch.long)
    mixed_late[5:7, 1] = IMAGE  # SP tp=2: shard 0 all text, shard 1 mixed
    image_first = torch.zeros(S, B, dtype=torch.long)
    image_first[:4] = IMAGE  # shard 0 all image, shard 1 all text
    return {"mixed_late": mixed_late, "image_first": image_first,
            "all_text": torch.zeros(S, B, dtype=torch.long), "all_image": torch.ones(S, B, dtype=torch.long)}


@pytest.mark.parametrize("layout", list(_layouts()))
@pytest.mark.parametrize("sp_shard", [None, (0, 2), (1, 2), (3, 4)])
def test_routed_norm_matches_formula_without_host_sync(monkeypatch, layout, sp_shard):
    ids = _layouts()[layout]
    plan = RoutingPlan.build(ids)  # built once per micro-batch, outside the per-layer path
    rows = slice(None) if sp_shard is None else slice(sp_shard[0] * S // sp_shard[1],
                                                       (sp_shard[0] + 1) * S // sp_shard[1])
    local = ids[rows]  # (s_local, b)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(local.shape[0], B, H, generator=gen, requires_grad=True)
    dy = torch.randn(local.shape[0], B, H, generator=gen)

    norm = _norm()
    with no_host_sync(monkeypatch):
        out = norm(x, plan, sp_shard)
        out.backward(dy)

    ref_norm = _norm()
    xr = x.detach().clone().requires_grad_(True)
    x32 = xr.float()
    xn = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(xr.dtype)
    w = torch.where((local == IMAGE)[..., None], ref_norm.image_weight, ref_norm.weight)  # (s_local, b, h)
    ref = w * xn
    ref.backward(dy)
    assert torch.equal(out, ref)
    torch.testing.assert_close(x.grad, xr.grad, rtol=0, atol=1e-6)
    for name in ("weight", "image_weight"):
        got, want = getattr(norm, name).grad, getattr(ref_norm, name).grad
        modality = TEXT if name == "weight" else IMAGE
        if not bool((local == modality).any()):
            assert got is None, f"{name}: no token of its modality, so no gradient (as the routed linears)"
        else:
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
