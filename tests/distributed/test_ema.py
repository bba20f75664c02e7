"""``train.ema`` end to end: the sharded average on 2 gloo ranks (tests/distributed/workers/ema.py, one ``torchrun``
launch), then, from the runs it leaves, generation, export and evaluation loading with ``--weights ema|raw``.

Generation with the EMA is checked against the average itself: the image set loaded with ``--weights ema`` equals the
gathered EMA the training run wrote (bit for bit), and images drawn with it differ from the raw weights' and equal
those drawn from the export (whose ``ema.safetensors`` holds the same tensors).
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.distributed.harness import case_names, launch
from tests.fixtures import make_tiny_assets

MODULE = "tests.distributed.workers.ema"


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("ema")
    assets = make_tiny_assets(root / "assets")
    path = root / "spec.json"
    data = {**assets, "out": str(root / "out")}
    (root / "out").mkdir()
    path.write_text(json.dumps(data))
    return {**data, "spec": str(path)}


def _launch(spec: dict):
    return launch(MODULE, 2, extra_env=(("LMFUSION_TRAIN_SPEC", spec["spec"]),))


@pytest.mark.parametrize("name", case_names(MODULE))
def test_ema_cases(name, spec):
    _launch(spec).check(name)


@pytest.fixture(scope="module")
def runs(spec):
    from pathlib import Path

    _launch(spec).check("ema_run_for_generation_tests")
    out = Path(spec["out"])
    return out / "ema_run", out / "raw_run", out / "ema_reference.safetensors"


def _generate(ckpt, out, *extra) -> bytes:
    from lmfusion.cli import main

    assert main(["generate", "--ckpt", str(ckpt), "--prompt", "w1 w2", "--out", str(out), "--n", "2",
                 "--sampler", "ddim", "--steps", "3", "--seed", "0", "--vae", "identity", *extra]) == 0
    return out.read_bytes()


def test_loading_uses_the_ema_by_default_and_raw_on_request(runs):
    from safetensors.torch import load_file

    from lmfusion.inference.load import load_for_inference
    from lmfusion.rundir.export import image_set_tensors

    ema_run, _, reference = runs
    want = load_file(str(reference))
    default = load_for_inference(ema_run)
    assert default.meta.weights == "ema"
    got = image_set_tensors(default.model)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    raw = load_for_inference(ema_run, weights="raw")
    assert raw.meta.weights == "raw"
    raw_set = image_set_tensors(raw.model)
    assert any(not torch.equal(raw_set[k], want[k]) for k in want), "the EMA equals the raw weights"


def test_generate_with_ema_differs_from_raw_and_equals_the_export(runs, tmp_path, capsys):
    """``lmfusion generate`` on the run: default == --weights ema != --weights raw; the export holds ema.safetensors
    equal to the average, and generating from it (default: EMA) gives the same image bytes as from the run."""
    from safetensors.torch import load_file

    from lmfusion.cli import main
    from lmfusion.rundir.export import EMA_SET, EXPORT_JSON

    ema_run, _, reference = runs
    default = _generate(ema_run, tmp_path / "default.png")
    ema = _generate(ema_run, tmp_path / "ema.png", "--weights", "ema")
    raw = _generate(ema_run, tmp_path / "raw.png", "--weights", "raw")
    assert default == ema != raw
    export = tmp_path / "export"
    assert main(["export-ckpt", str(ema_run), "--output", str(export)]) == 0
    assert json.loads((export / EXPORT_JSON).read_text())["ema"] == EMA_SET
    want, got = load_file(str(reference)), load_file(str(export / EMA_SET))
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert _generate(export, tmp_path / "export.png") == ema
    assert _generate(export, tmp_path / "export_raw.png", "--weights", "raw") == raw


def test_run_without_ema_refuses_weights_ema_and_falls_back_by_default(runs, tmp_path, capsys):
    from lmfusion.cli import main
    from lmfusion.evaluation.runtime import load_data_parallel
    from lmfusion.rundir.export import EMA_SET, EXPORT_JSON

    _, raw_run, _ = runs
    capsys.readouterr()
    assert main(["generate", "--ckpt", str(raw_run), "--prompt", "w1", "--text", "--max-new-tokens", "2",
                 "--weights", "ema"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--weights ema" in err and "holds no EMA weights" in err
    _generate(raw_run, tmp_path / "x.png")
    assert "holds no EMA weights; using the raw weights" in capsys.readouterr().err
    with pytest.raises(ValueError, match="holds no EMA weights"):
        load_data_parallel(raw_run, "cpu", weights="ema")  # evaluation's loader
    export = tmp_path / "export"
    assert main(["export-ckpt", str(raw_run), "--output", str(export)]) == 0
    assert json.loads((export / EXPORT_JSON).read_text())["ema"] is None and not (export / EMA_SET).exists()
