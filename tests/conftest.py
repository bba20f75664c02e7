"""Shared pytest setup: GPU-marked tests skip with a reason where no CUDA device is present."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="module")
def _isolate_process_state():
    """In-process CLI calls (``lmfusion generate``, ``eval``, ...) set up torch.distributed, megatron's parallel state
    and megatron_ext's CPU mode for the whole process, as a real command does. Undo what a test module started, so
    the next module (e.g. test_cpu_mode, which asserts CPU mode is off) starts from a clean process."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_ext import cpu

    had = dist.is_initialized(), parallel_state.model_parallel_is_initialized(), cpu.is_enabled()
    yield
    if not had[1] and parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if not had[0] and dist.is_initialized():
        dist.destroy_process_group()
    if not had[2] and cpu.is_enabled():
        cpu.disable()
