"""SLURM scripts: syntax (``bash -n``), the dry-run launch commands, and one real run of ``slurm/pretrain_8b.sh``
on this machine with stand-ins for ``srun`` (runs its command) and ``scontrol`` (records a requeue): SIGUSR1 sent to
every process of the job step, as ``#SBATCH --signal`` does, makes the trainer save and exit 0 while torchrun
ignores it, and the script requeues the job."""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
PRETRAIN = REPO / "slurm" / "pretrain_8b.sh"
SCRIPTS = [PRETRAIN, REPO / "slurm" / "build_shards.sh"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def _dry_run(env: dict[str, str], *args: str) -> list[list[str]]:
    proc = subprocess.run(["bash", str(PRETRAIN), *args], env={**os.environ, "DRY_RUN": "1", "PYTHON": sys.executable,
                                                              **env},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [shlex.split(line) for line in proc.stdout.splitlines() if line and not line.startswith("#")]


def _sbatch(name: str) -> str:
    lines = [line for line in PRETRAIN.read_text().splitlines() if line.startswith(f"#SBATCH --{name}")]
    assert len(lines) == 1, name
    return lines[0].split("=", 1)[1] if "=" in lines[0] else ""


def test_dry_run_prints_srun_torchrun_and_requeue():
    launch, requeue = _dry_run({"SLURM_NNODES": "8", "SLURM_JOB_ID": "4242", "MASTER_ADDR": "node001"},
                               "train.train_iters=10")
    assert launch[0] == "srun" and "--kill-on-bad-exit=1" in launch
    assert 'trap "" USR1' in launch[launch.index("-c") + 1]  # torchrun must survive SIGUSR1
    run = launch[launch.index("torch.distributed.run") - 2:]
    opt = lambda name: run[run.index(name) + 1]  # noqa: E731
    assert (opt("--nnodes"), opt("--nproc_per_node"), opt("--rdzv_backend")) == ("8", "8", "c10d")
    assert opt("--rdzv_endpoint") == "node001:29500" and opt("--rdzv_id") == "4242"
    config = Path(opt("--config"))
    assert config == REPO / "examples" / "configs" / "llama3_8b.yaml"
    assert run[run.index("-m", run.index("torch.distributed.run")) + 1] == "lmfusion.train"
    assert run[-1] == "train.train_iters=10"  # user overrides come last (they win)
    overrides = dict(a.split("=", 1) for a in run if "=" in a and not a.startswith("-"))
    par = yaml.safe_load(config.read_text())["parallel"]
    assert int(overrides["parallel.tensor_model_parallel_size"]) == par["tensor_model_parallel_size"]
    assert int(overrides["parallel.pipeline_model_parallel_size"]) == par["pipeline_model_parallel_size"]
    assert overrides["parallel.sequence_parallel"] == str(par["sequence_parallel"]).lower()
    assert requeue == ["scontrol", "requeue", "4242"]
    nodes, gpus = int(_sbatch("nodes")), int(_sbatch("gpus-per-node"))
    assert nodes * gpus % (par["tensor_model_parallel_size"] * par["pipeline_model_parallel_size"]) == 0
    assert _sbatch("signal").startswith("USR1@") and _sbatch("requeue") == ""


@pytest.mark.parametrize("name", ["llama3_8b", "llavafusion_8b"])
def test_dry_run_takes_each_8b_config_unchanged(name):
    """CONFIG=examples/configs/<name>.yaml: the trainer gets that file, its run directory is the config's
    checkpoint.save (under REPO_DIR), the script's layout overrides equal the config's own (nothing changes it), and a
    checkpoint.save= argument moves the run directory the requeue check reads."""
    config = REPO / "examples" / "configs" / f"{name}.yaml"
    raw = yaml.safe_load(config.read_text())
    launch, _ = _dry_run({"CONFIG": str(config), "REPO_DIR": str(REPO)})
    run = launch[launch.index("torch.distributed.run") - 2:]
    assert run[run.index("--config") + 1] == str(config)
    overrides = dict(a.split("=", 1) for a in run if "=" in a and not a.startswith("-"))
    assert overrides["checkpoint.save"] == str(REPO / raw["checkpoint"]["save"])
    par = raw["parallel"]
    assert int(overrides["parallel.tensor_model_parallel_size"]) == par["tensor_model_parallel_size"]
    assert int(overrides["parallel.pipeline_model_parallel_size"]) == par["pipeline_model_parallel_size"]
    assert overrides["parallel.sequence_parallel"] == str(par["sequence_parallel"]).lower()
    assert overrides["train.recompute"] == raw["train"].get("recompute", "none")
    proc = subprocess.run(["bash", str(PRETRAIN), "checkpoint.save=/elsewhere/run"],
                          env={**os.environ, "DRY_RUN": "1", "PYTHON": sys.executable, "CONFIG": str(config)},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "/elsewhere/run/exit_status.json" in proc.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_script_runs_signal_saves_and_requeues(tmp_path):
    from tests.fixtures import make_tiny_assets

    import psutil

    assets = make_tiny_assets(tmp_path / "assets")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    (bin_dir / "scontrol").write_text(f'#!/bin/bash\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    run_dir = tmp_path / "run"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHON": sys.executable,
           "REPO_DIR": str(tmp_path),  # the script cds there and creates logs/; the code comes from PYTHONPATH
           "CONFIG": assets["config"], "RUN_DIR": str(run_dir), "GPUS_PER_NODE": "2", "TP": "2", "PP": "1",
           "SP": "false", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "SLURM_NNODES": "1",
           "SLURM_JOB_ID": "777", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    args = [f"init.base_checkpoint={assets['base']}", f"data.datasets=[{assets['shards']}]", "train.train_iters=1000",
            "checkpoint.save_interval=1000"]
    proc = subprocess.Popen(["bash", str(PRETRAIN), *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        end = time.monotonic() + 300
        metrics = run_dir / "metrics.jsonl"
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
            assert proc.poll() is None, proc.communicate()[0][-4000:]
            assert time.monotonic() < end, "no training step within 300 s"
            time.sleep(0.2)
        for p in psutil.Process(proc.pid).children(recursive=True):  # the job step, not the batch shell
            p.send_signal(signal.SIGUSR1)
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-6000:]
    status = json.loads((run_dir / "exit_status.json").read_text())
    assert status["reason"] == "signal", status
    assert (run_dir / "latest").read_text().strip() == f"iter_{status['iteration']:07d}"
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "777"]
    assert "requeueing job 777" in out
