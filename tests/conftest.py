"""Shared pytest setup: GPU-marked tests skip with a reason where no CUDA device is present, and any other skip
fails the run (the allowed reasons live in ``tests/skips.py``); fixtures several test modules use (``runtime``,
``ckpts``; their helpers live in ``tests/fixtures.py``)."""

import pytest
import torch

from tests import skips

_DISALLOWED_SKIPS: list[tuple[str, str]] = []


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=f"{skips.NO_GPU} (none on this machine)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # not item.keywords: it holds path names too
            item.add_marker(skip)


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


def _record(report) -> None:
    if report.skipped:
        reason = getattr(report, "wasxfail", None) or _skip_reason(report)
        if hasattr(report, "wasxfail") or not skips.is_allowed(reason):
            _DISALLOWED_SKIPS.append((report.nodeid, reason))


def pytest_runtest_logreport(report):
    _record(report)


def pytest_collectreport(report):
    _record(report)  # a module-level importorskip skips the whole module at collection


def pytest_terminal_summary(terminalreporter):
    if _DISALLOWED_SKIPS:
        terminalreporter.section("skips that are not allowed (tests/skips.py)", red=True)
        for nodeid, reason in _DISALLOWED_SKIPS:
            terminalreporter.line(f"{nodeid}: {reason}")
        terminalreporter.line("only a missing GPU may skip a test: install what scripts/setup.sh installs")


def pytest_sessionfinish(session, exitstatus):
    if _DISALLOWED_SKIPS and exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = 1


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


@pytest.fixture(scope="module")
def runtime():
    """One gloo rank, megatron TP=PP=1, CPU mode: what an in-process inference command sets up. Undone after the
    module by ``_isolate_process_state``."""
    from megatron_ext.device import init_distributed

    init_distributed("cpu", tensor_model_parallel_size=1)


@pytest.fixture(scope="module")
def ckpts(runtime, tmp_path_factory):
    """``(root, params)``: root/hf (a tiny HF Llama + tokenizer), root/base (convert-hf), root/run (a training
    checkpoint on root/base, image set perturbed); params: that checkpoint's parameters by name."""
    from tests.fixtures import write_generation_checkpoints

    root = tmp_path_factory.mktemp("gen")
    return root, write_generation_checkpoints(root)
