"""Backend selection for routed layer specs."""

import pytest

from megatron_ext import te_linear
from megatron_ext.linear import ModalityColumnParallelLinear, ModalityRowParallelLinear
from megatron_ext.spec import resolve_backend, routed_layer_submodules


def test_local_backend_slots():
    slots = routed_layer_submodules("local")
    assert slots.linear_qkv is ModalityColumnParallelLinear and slots.linear_fc1 is ModalityColumnParallelLinear
    assert slots.linear_proj is ModalityRowParallelLinear and slots.linear_fc2 is ModalityRowParallelLinear


def test_unknown_backend_named():
    with pytest.raises(ValueError, match="'tpu'"):
        resolve_backend("tpu")


def test_te_backend_without_te_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(te_linear, "HAVE_TE", False)  # as on a machine without TE, wherever this runs
    with pytest.raises(RuntimeError, match="needs Transformer Engine"):
        routed_layer_submodules("te")
    assert resolve_backend("auto") == "local"
