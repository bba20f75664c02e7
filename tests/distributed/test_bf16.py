"""``train.precision=bf16`` on CPU (tests/distributed/workers/bf16.py, one ``torchrun`` launch of 2 gloo ranks):
weights-only loads restart the fp32 main params, the sharded EMA averages the fp32 main weights, and the losses at
TP=2 / PP=2 / TP=2+SP / DP=2 track the fp32 run's within the stated bf16 tolerance."""

from __future__ import annotations

import json

import pytest

from tests.distributed.harness import case_names, launch
from tests.fixtures import make_tiny_assets

MODULE = "tests.distributed.workers.bf16"


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("bf16")
    path = root / "spec.json"
    path.write_text(json.dumps(make_tiny_assets(root / "assets")))
    return str(path)


@pytest.mark.parametrize("name", case_names(MODULE))
def test_bf16_cases(name, spec):
    launch(MODULE, 2, extra_env=(("LMFUSION_TRAIN_SPEC", spec),)).check(name)
