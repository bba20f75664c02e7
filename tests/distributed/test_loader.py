"""Loader on 4 gloo ranks (torchrun, TP=2 x DP=2): see tests/distributed/workers/loader.py."""

import json

import pytest

from tests.distributed.harness import case_names, launch
from tests.fixtures import build_set, data_config, make_images, make_tokenizer

MODULE = "tests.distributed.workers.loader"


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("dist_loader")
    make_images(root / "img", 24, seed=7)
    shards = build_set(root / "set", root / "img", 4)
    tok = make_tokenizer(root / "tok")
    path = root / "spec.json"
    path.write_text(json.dumps({"data": vars(data_config([shards], tok, num_workers=1)), "tokenizer": str(tok)}))
    return str(path)


@pytest.mark.parametrize("name", case_names(MODULE))
def test_loader(name, spec):
    launch(MODULE, 4, extra_env=(("LMFUSION_LOADER_SPEC", spec),)).check(name)
