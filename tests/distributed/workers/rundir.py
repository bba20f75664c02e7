"""Run-directory cases on a real tiny run (1 gloo rank): resume semantics, integrity, lock, latest, base hash, trust.

Inputs as tests/distributed/workers/train.py (``LMFUSION_TRAIN_SPEC``). Each case names its issue-#18 item.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest

from lmfusion import rundir
from lmfusion.inference.export import export_checkpoint
from lmfusion.training.trainer import Trainer
from tests.distributed.harness import case, worker_main
from tests.distributed.workers.megatron_common import shared_tmpdir
from tests.distributed.workers.train import config, train


def _run(run_dir: str, *overrides: str) -> Trainer:
    t = train(config(run_dir, *overrides))
    t.close()
    return t


class _Eval:
    def __init__(self, code: str):
        self.code = code

    def __reduce__(self):
        return eval, (self.code,)


@case
def changed_schedule_is_an_error_unless_overridden_or_kept():
    """Item 3: optimizer.lr changed on resume -> one line naming the key and both values; override_scheduler takes
    the config's lr, use_checkpoint_scheduler keeps the checkpoint's."""
    run_dir = shared_tmpdir()
    _run(run_dir, "train.train_iters=3")
    with pytest.raises(ValueError, match=r"scheduler max_lr is 0.001 in the checkpoint, 0.005 in this config "
                                         r"\(optimizer.lr\)"):
        _run(run_dir, "train.train_iters=4", "optimizer.lr=5e-3")
    for flag, lr in (("override_scheduler", 5e-3), ("use_checkpoint_scheduler", 1e-3)):
        copy = shared_tmpdir()
        shutil.copytree(run_dir, copy, dirs_exist_ok=True)
        t = _run(copy, "train.train_iters=4", "optimizer.lr=5e-3", f"checkpoint.{flag}=true")
        got = t.history[0]["lr"]
        assert [h["step"] for h in t.history] == [4] and abs(got - lr) < 1e-2 * lr, (flag, got)


@case
def damaged_files_stop_the_resume_with_one_line():
    """Items 4, 7: 64 flipped bytes in a .distcp, a truncated common.pt, a missing .metadata: the resume stops before
    loading with one line naming the file."""
    run_dir = Path(shared_tmpdir())
    _run(str(run_dir), "train.train_iters=2")
    it = run_dir / rundir.iter_name(2)
    pristine = Path(shared_tmpdir()) / "pristine"
    shutil.copytree(it, pristine)
    cases = {"__0_0.distcp": "flip", "common.pt": "truncate", ".metadata": "remove"}
    for name, damage in cases.items():
        shutil.rmtree(it)
        shutil.copytree(pristine, it)
        f = it / name
        if damage == "flip":
            data = bytearray(f.read_bytes())
            data[2000:2064] = bytes(b ^ 0xFF for b in data[2000:2064])
            f.write_bytes(bytes(data))
        elif damage == "truncate":
            f.write_bytes(f.read_bytes()[:50])
        else:
            f.unlink()
        with pytest.raises(ValueError) as e:
            _run(str(run_dir), "train.train_iters=3")
        assert str(e.value).startswith(str(f)) and "\n" not in str(e.value), (name, str(e.value))


@case
def a_second_training_into_the_directory_is_refused():
    """Item 5: while a trainer holds the run directory, another one stops at setup naming the holder."""
    run_dir = shared_tmpdir()
    first = Trainer(config(run_dir, "train.train_iters=1")).setup()
    try:
        with pytest.raises(rundir.RunLocked, match=rf"held by a running training .* pid {os.getpid()}"):
            Trainer(config(run_dir, "train.train_iters=1")).setup()
    finally:
        first.close()
    assert not (Path(run_dir) / rundir.LOCK).exists()


@case
def latest_left_behind_resumes_from_the_newest_checkpoint():
    """Item 6: latest still names step 1 after step 2's directory was renamed (crash in between): the relaunch
    resumes at step 2 (does not redo it), repairs latest and saves step 3."""
    run_dir = Path(shared_tmpdir())
    _run(str(run_dir), "train.train_iters=2", "checkpoint.save_interval=1", "checkpoint.keep_last=null")
    (run_dir / rundir.LATEST).write_text(rundir.iter_name(1) + "\n")
    t = _run(str(run_dir), "train.train_iters=3", "checkpoint.save_interval=1", "checkpoint.keep_last=null")
    assert [h["step"] for h in t.history] == [3], t.history
    assert (run_dir / rundir.LATEST).read_text().strip() == rundir.iter_name(3)


@case
def replaced_base_stops_generation_and_export_and_exports_load_without_unpickling():
    """Items 2 and 1: the base directory replaced by another conversion of a same-shape model -> load_for_inference
    and export-ckpt refuse it by its hash. The export of the genuine run loads with pickle and torch.load disabled
    (nothing to unpickle) and gives the run's image weights; a payload planted in the run's .metadata (manifest and
    record rewritten to match, as an attacker would) is refused and never runs."""
    import torch

    from lmfusion.inference.load import load_for_inference
    from tests.distributed.workers.train import spec
    from tests.fixtures import make_tiny_assets

    root = Path(shared_tmpdir())
    make_tiny_assets(root)
    run_dir = root / "run"
    t = train(config(str(run_dir), "train.train_iters=1", f"init.base_checkpoint={root / 'base'}"))
    t.close()
    ref = load_for_inference(run_dir, device="cpu")
    want = {n: p.clone() for n, p in ref.model.named_parameters()}
    out = export_checkpoint(run_dir / rundir.iter_name(1), root / "export")

    import pickle as _pickle
    real_load, real_unpickler, real_torch_load = _pickle.load, _pickle.Unpickler, torch.load

    def refuse(*a, **k):
        raise AssertionError("unpickling while loading an export")

    _pickle.load, _pickle.Unpickler, torch.load = refuse, refuse, refuse
    try:
        got = load_for_inference(out, device="cpu")
    finally:
        _pickle.load, _pickle.Unpickler, torch.load = real_load, real_unpickler, real_torch_load
    for n, p in got.model.named_parameters():
        assert torch.equal(p, want[n]), n

    planted = root / "planted"
    shutil.copytree(run_dir, planted)
    it = planted / rundir.iter_name(1)
    marker = root / "ran"
    code = (f"__import__('pathlib').Path({str(marker)!r}).touch() or "
            f"__import__('pickle').loads({(it / '.metadata').read_bytes()!r})")
    (it / ".metadata").write_bytes(pickle.dumps(_Eval(code)))
    record = rundir.read_record(it)
    record["integrity"] = rundir.integrity.write_manifest(it, rundir.integrity.hash_files(it))
    (it / rundir.CHECKPOINT_JSON).write_text(json.dumps(record))
    with pytest.raises(ValueError, match="refuses to unpickle"):
        _run(str(planted), "train.train_iters=2", f"init.base_checkpoint={root / 'base'}")
    with pytest.raises(ValueError, match="refuses to unpickle"):
        load_for_inference(planted, device="cpu")
    assert not marker.exists()

    shutil.rmtree(root / "base")
    shutil.copytree(spec()["base"], root / "base")  # same shapes, another conversion
    for load in (lambda: load_for_inference(run_dir, device="cpu"),
                 lambda: export_checkpoint(run_dir / rundir.iter_name(1), root / "export2")):
        with pytest.raises(ValueError, match=r"conversion.json: sha256 \w+, expected \w+ .* replaced"):
            load()


@case
def replaced_base_weights_stop_resume_generation_and_export():
    """Item 2: the base's model.safetensors replaced by another same-shape model (every tensor changed, shapes and
    dtypes kept) while its conversion.json stays: resume, load_for_inference (generation) and export-ckpt refuse it,
    naming the weight file. The record lists the base's files; before the change all three load."""
    import torch
    from safetensors.torch import load_file, save_file

    from lmfusion.inference.load import load_for_inference
    from tests.distributed.workers.train import spec

    root = Path(shared_tmpdir())
    base = root / "base"
    shutil.copytree(spec()["base"], base)
    run_dir = root / "run"
    _run(str(run_dir), "train.train_iters=1", f"init.base_checkpoint={base}")
    record = rundir.read_record(run_dir / rundir.iter_name(1))
    assert "model.safetensors" in record["base_files"], record.get("base_files")
    load_for_inference(run_dir, device="cpu")

    weights = load_file(str(base / "model.safetensors"))
    other = {k: (v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v) for k, v in weights.items()}
    from safetensors import safe_open

    with safe_open(str(base / "model.safetensors"), framework="pt") as f:
        metadata = f.metadata()
    save_file(other, str(root / "other.safetensors"), metadata=metadata)
    assert (root / "other.safetensors").stat().st_size == (base / "model.safetensors").stat().st_size
    os.replace(root / "other.safetensors", base / "model.safetensors")
    words = r"base/model.safetensors: sha256 \w+, expected \w+ \(the base .* replaced or changed"
    with pytest.raises(ValueError, match=words):
        _run(str(run_dir), "train.train_iters=2", f"init.base_checkpoint={base}")
    with pytest.raises(ValueError, match=words):
        load_for_inference(run_dir, device="cpu")
    with pytest.raises(ValueError, match=words):
        export_checkpoint(run_dir / rundir.iter_name(1), root / "export")


@case
def image_config_mismatch_on_resume_names_the_field():
    """Item 7: resuming with another image-module setting names that field and both values in one line (not two
    whole configs)."""
    run_dir = shared_tmpdir()
    _run(run_dir, "train.train_iters=1")
    with pytest.raises(ValueError) as e:
        _run(run_dir, "train.train_iters=2", "model.image.norm_groups=4")
    text = str(e.value)
    assert "model.image.norm_groups is 8 in the checkpoint, 4 in this config" in text and "\n" not in text, text
    assert "block_channels" not in text, text


if __name__ == "__main__":
    worker_main()
