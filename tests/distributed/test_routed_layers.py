"""Routed linears / norm / MLP on 2 and 4 gloo ranks (torchrun), parity with an unsharded reference."""

import pytest

from tests.distributed.harness import case_names, launch

MODULE = "tests.distributed.workers.routed"
CASES = case_names(MODULE)


@pytest.mark.parametrize("nproc", [2, 4])
@pytest.mark.parametrize("name", CASES)
def test_routed(nproc, name):
    launch(MODULE, nproc).check(name)
