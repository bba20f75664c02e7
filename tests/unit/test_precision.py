"""``train.precision``: 'auto' picks bf16 on a GPU and on a CPU with bf16 matrix instructions (AMX-BF16 or
AVX512-BF16), fp32 on other CPUs; explicit choices are kept. The CPU check is patched both ways and also compared
with the kernel's own CPU flags."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmfusion.config_io import load_config
from lmfusion.training import model_setup
from tests.fixtures import TINY_CONFIG, config_only_base


def _cfg(tmp_path: Path, precision: str):
    return load_config(TINY_CONFIG, [f"init.base_checkpoint={config_only_base(tmp_path)}",
                                     f"train.precision={precision}"])


def _cpu(monkeypatch, amx: bool, avx512_bf16: bool, cuda: bool = False) -> None:
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)


@pytest.mark.parametrize("amx, avx, want, why", [
    (True, True, "bf16", "auto: CPU has AMX-BF16"),
    (False, True, "bf16", "auto: CPU has AVX512-BF16"),
    (False, False, "fp32", "auto: CPU has no bf16 matrix instructions"),
])
def test_auto_on_a_cpu_follows_its_bf16_matrix_instructions(tmp_path, monkeypatch, amx, avx, want, why):
    _cpu(monkeypatch, amx, avx)
    cfg = _cfg(tmp_path, "auto")
    assert model_setup.resolve_precision(cfg) == (want, why)
    assert model_setup.params_dtype(cfg) == {"bf16": torch.bfloat16, "fp32": torch.float32}[want]


def test_auto_on_a_gpu_is_bf16_and_explicit_choices_are_kept(tmp_path, monkeypatch):
    _cpu(monkeypatch, False, False, cuda=True)
    assert model_setup.resolve_precision(_cfg(tmp_path, "auto")) == ("bf16", "auto: GPU")
    for cuda in (True, False):
        _cpu(monkeypatch, True, True, cuda=cuda)
        for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            cfg = _cfg(tmp_path, precision)
            assert model_setup.resolve_precision(cfg) == (precision, "train.precision")
            assert model_setup.params_dtype(cfg) == dtype


def test_cpu_check_agrees_with_the_kernels_cpu_flags():
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():  # not Linux: nothing independent to compare with; the patched cases above still run
        return
    flags = set()
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    found = model_setup.cpu_bf16_matmul()
    assert (found == "AMX-BF16") == ("amx_bf16" in flags and "amx_tile" in flags), (found, sorted(flags & {"amx_bf16", "amx_tile"}))
    if "amx_tile" not in flags:
        assert (found == "AVX512-BF16") == ("avx512_bf16" in flags), found
