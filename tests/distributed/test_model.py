"""LMFusionModel on 2 gloo ranks (torchrun): HF text parity at TP/SP/PP, mixed-batch TP/SP/PP parity, frozen text,
checkpoint resharding. The tiny test model has 4 heads / 2 kv heads / 2 layers, so 2 ranks is the largest grid."""

import pytest

from tests.distributed.harness import case_names, launch

MODULE = "tests.distributed.workers.model"


@pytest.mark.parametrize("name", case_names(MODULE))
def test_model(name):
    launch(MODULE, 2).check(name)
