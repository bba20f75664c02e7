"""Losses on 2 gloo ranks (torchrun): vocab-parallel CE at TP=2, DP-global normalisation through megatron DDP."""

import pytest

from tests.distributed.harness import case_names, launch

MODULE = "tests.distributed.workers.losses"
CASES = case_names(MODULE)


@pytest.mark.parametrize("name", CASES)
def test_losses(name):
    launch(MODULE, 2).check(name)
