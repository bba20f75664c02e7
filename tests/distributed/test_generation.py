"""Generation at TP=2 on 2 gloo ranks (torchrun): HF-equal greedy text and TP=1-equal images from a training
checkpoint resharded at load. Single-process generation tests are in tests/unit/test_generation.py."""

import pytest

from tests.distributed.harness import case_names, launch

MODULE = "tests.distributed.workers.generation"


@pytest.mark.parametrize("name", case_names(MODULE))
def test_generation(name):
    launch(MODULE, 2).check(name)
