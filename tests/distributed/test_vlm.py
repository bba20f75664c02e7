"""A VLM base on 2 gloo ranks (torchrun): understanding logits equal HF LlavaNext at TP/SP/PP; training on it keeps
the understanding path bit for bit."""

import json

import pytest

from tests.distributed.harness import case_names, launch

MODULE = "tests.distributed.workers.vlm"


@pytest.mark.parametrize("name", case_names(MODULE))
def test_vlm(name):
    launch(MODULE, 2).check(name)


TRAIN_MODULE = "tests.distributed.workers.vlm_train"


@pytest.fixture(scope="module")
def vlm_spec(tmp_path_factory) -> str:
    from tests.fixtures_llava import make_vlm_assets

    root = tmp_path_factory.mktemp("vlm_train")
    path = root / "spec.json"
    path.write_text(json.dumps(make_vlm_assets(root)))
    return str(path)


@pytest.mark.parametrize("name", case_names(TRAIN_MODULE))
def test_vlm_training(name, vlm_spec):
    """LMFusion training on a VLM base at TP=2 keeps the understanding path bitwise; resume and export work."""
    launch(TRAIN_MODULE, 2, extra_env=(("LMFUSION_VLM_SPEC", vlm_spec),)).check(name)
