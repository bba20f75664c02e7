"""The DeepSpeed engine (``engine: deepspeed``) on 2 CPU ranks through the real launcher.

* One ``torchrun`` launch of tests/distributed/workers/train_deepspeed.py (DP = 2): ZeRO-1, -2, -3 and ZeRO-3 with
  CPU offload + activation recompute each match the megatron engine's losses (step 1 bit for bit, then 1e-5; the
  worker's docstring says why); ZeRO-1/2/3 resume bit for bit from ``latest``, keep only the image set in the optimizer and the text weights
  at the base, and write checkpoints that ``lmfusion generate --ckpt`` loads; bf16 against the megatron engine's
  bf16; refused layouts, weights-only loading, NaN guards and signals.
* ``torchrun -m lmfusion.train ... engine=deepspeed``: the entry point dispatches to the engine; the image weights
  inference loads from the run directory are the ones in DeepSpeed's own model-states file.

Needs ``deepspeed`` (``DS_BUILD_OPS=0 pip install -e '.[deepspeed]'``; scripts/setup.sh installs it). On CPU its
first use compiles DeepSpeed's shared-memory comm op into ``TORCH_EXTENSIONS_DIR`` (~1 min on 2 cores, once per
machine), and ZeRO-Offload compiles DeepSpeedCPUAdam (~1-2 min, once). Every ZeRO stage, CPU offload and bf16 run
on CPU; the GPU-marked test at the end runs the same engine on CUDA/NCCL (one GPU, bf16).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import deepspeed  # noqa: E402,F401  (scripts/setup.sh installs it: a missing DeepSpeed fails here, never skips)

from tests.distributed.harness import REPO_ROOT, case_names, launch  # noqa: E402
from tests.fixtures import make_tiny_assets  # noqa: E402

MODULE = "tests.distributed.workers.train_deepspeed"
LAUNCH_TIMEOUT = int(os.environ.get("LMFUSION_LAUNCH_TIMEOUT", "900"))


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    return make_tiny_assets(tmp_path_factory.mktemp("ds_assets"))


@pytest.fixture(scope="module")
def spec(assets, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("ds_spec") / "spec.json"
    path.write_text(json.dumps(assets))
    return str(path)


@pytest.mark.parametrize("name", case_names(MODULE))
def test_deepspeed_trainer(name, spec):
    launch(MODULE, 2, extra_env=(("LMFUSION_TRAIN_SPEC", spec),)).check(name)


def test_entry_point_trains_with_deepspeed_and_inference_reads_its_weights(assets, tmp_path):
    """``torchrun -m lmfusion.train ... engine=deepspeed deepspeed.zero_stage=2``: 3 steps, checkpoints at 2 and 3,
    ``latest`` on step 3; ``load_for_inference(RUN)`` (what ``lmfusion generate --ckpt RUN`` calls) gets exactly
    the image weights of DeepSpeed's model-states file of that step."""
    import torch

    from lmfusion.inference.load import load_for_inference

    run_dir = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "lmfusion.train",
         "--config", assets["config"], f"init.base_checkpoint={assets['base']}", f"data.datasets=[{assets['shards']}]",
         f"checkpoint.save={run_dir}", "train.train_iters=3", "checkpoint.save_interval=2", "engine=deepspeed",
         "deepspeed.zero_stage=2"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "lmfusion train: finished at step 3" in proc.stdout
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert (run_dir / "latest").read_text().strip() == "iter_0000003"
    assert (run_dir / "iter_0000002" / "train_state.json").is_file()
    state = json.loads((run_dir / "iter_0000003" / "train_state.json").read_text())
    assert state["parallel"] == {"engine": "deepspeed", "zero_stage": 2, "dp": 2}

    saved = torch.load(run_dir / "iter_0000003" / "mp_rank_00_model_states.pt", map_location="cpu",
                       weights_only=True)["module"]
    loaded = load_for_inference(run_dir, device="cpu")
    params = dict(loaded.model.named_parameters())
    trainable = {n for n in params if n in saved}
    assert trainable and all(torch.equal(params[n], saved[n]) for n in trainable)
    from lmfusion.model.weights import is_image_param

    assert trainable == {n for n in params if is_image_param(n)}, "the model-states file holds text weights"


@pytest.mark.gpu
def test_bf16_tracks_the_megatron_engine_on_gpu(assets, tmp_path):
    """bf16 (DeepSpeed's bf16 mode: bf16 weights, fp32 master weights and optimizer state) at ZeRO-2 on one GPU: 3
    finite losses, the first within 1e-2 of the megatron engine's bf16 run (same bf16 weights and forward; CUDA
    kernels may round differently between the engines' module wrappers). The CPU cases cover the engine's logic;
    this one covers CUDA placement and NCCL."""
    import math

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    runs = {}
    for name, extra in (("megatron", ()), ("deepspeed", ("engine=deepspeed", "deepspeed.zero_stage=2"))):
        run_dir = tmp_path / name
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m",
             "lmfusion.train", "--config", assets["config"], f"init.base_checkpoint={assets['base']}",
             f"data.datasets=[{assets['shards']}]", f"checkpoint.save={run_dir}", "train.train_iters=3",
             "train.precision=bf16", *extra],
            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
        runs[name] = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(runs["deepspeed"]) == 3 and all(math.isfinite(v) for v in runs["deepspeed"])
    assert abs(runs["deepspeed"][0] - runs["megatron"][0]) <= 1e-2, runs
