"""``model.separation`` and ``optimizer.text_lr_ratio`` on 2 gloo ranks (tests/distributed/workers/separation.py):
text-training gradients at TP=2 / TP=2+SP / PP=2 against TP=1 for every separation; a text-training run's
checkpoint, bit-exact resume and layout agreement (tied embeddings at PP=2); one-line errors for a resume with
another separation or text setting."""

from __future__ import annotations

import json

import pytest

from tests.distributed.harness import case_names, launch
from tests.fixtures import make_tiny_assets

MODULE = "tests.distributed.workers.separation"


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> str:
    assets = make_tiny_assets(tmp_path_factory.mktemp("separation_assets"))
    path = tmp_path_factory.mktemp("separation_spec") / "spec.json"
    path.write_text(json.dumps(assets))
    return str(path)


@pytest.mark.parametrize("name", case_names(MODULE))
def test_separation(name, spec):
    launch(MODULE, 2, extra_env=(("LMFUSION_TRAIN_SPEC", spec),)).check(name)
