"""A VLM base's understanding path on 2 gloo ranks (torchrun): logits equal HF LlavaNext at TP/SP/PP."""

import pytest

from tests.distributed.harness import case_names, launch

MODULE = "tests.distributed.workers.vlm"


@pytest.mark.parametrize("name", case_names(MODULE))
def test_vlm(name):
    launch(MODULE, 2).check(name)
