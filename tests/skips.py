"""The only reasons a test may skip: a missing GPU (and, on a GPU machine, GPU-only extras).

Everything ``scripts/setup.sh`` installs is a hard requirement of the tests: a test that needs it imports it and fails
when it is missing, so a broken install step can never pass as a skip. ``tests/conftest.py`` fails the run when any
test skips for a reason that does not start with one of these.
"""

import torch

NO_GPU = "needs a CUDA GPU"
"""GPU-marked tests on a machine without CUDA (``conftest.pytest_collection_modifyitems``)."""

GPU_ONLY_EXTRAS = ("needs Transformer Engine", "GPU has no FP8 support")
"""On a CUDA machine: what the optional ``gpu`` extra or the card itself may lack."""


def allowed_reasons() -> tuple[str, ...]:
    return (NO_GPU, *GPU_ONLY_EXTRAS) if torch.cuda.is_available() else (NO_GPU,)


def is_allowed(reason: str) -> bool:
    reason = reason.removeprefix("Skipped: ")
    return reason.startswith(allowed_reasons())
