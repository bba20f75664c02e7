"""The run-directory contract on real tiny runs (tests/distributed/workers/rundir.py), one torchrun launch, 1 rank."""

from __future__ import annotations

import json

import pytest

from tests.distributed.harness import case_names, launch
from tests.fixtures import make_tiny_assets

MODULE = "tests.distributed.workers.rundir"


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("rundir_assets")
    path = root / "spec.json"
    path.write_text(json.dumps(make_tiny_assets(root)))
    return str(path)


@pytest.mark.parametrize("name", case_names(MODULE))
def test_rundir(name, spec):
    launch(MODULE, 1, extra_env=(("LMFUSION_TRAIN_SPEC", spec),)).check(name)
