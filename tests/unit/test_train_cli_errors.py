"""``python -m lmfusion.train`` failures a user meets, through the real entry point (one process, no launcher): each
is one line on stderr naming what failed, exit status 2, no traceback (issue #18 item 7).

* every shard of the data set unreadable (in the training process and in a DataLoader worker, whose error torch
  re-raises with the worker's traceback inside the message);
* the disk filling up while a checkpoint is written, synchronously and with ``checkpoint.async_save`` (megatron's
  writer processes): simulated by making megatron's per-item write raise ENOSPC for the step-2 checkpoint, in the
  forked writer processes that really write it. The step-1 checkpoint stays ``latest``, nothing named ``iter_0000002``
  appears and the temporary directory is gone.

Inputs: a tiny converted base and shard set (tests/distributed/workers/train.py ``make_tiny_assets``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures import make_tiny_assets

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = int(os.environ.get("LMFUSION_LAUNCH_TIMEOUT", "600"))

# Runs the training entry point after making megatron's checkpoint writer fail with ENOSPC on the files of step 2's
# checkpoint. The patched function is the one the writer processes (forked from this one) call for every item.
_DISK_FULL = """
import errno, functools, os, sys
from megatron.core.dist_checkpointing.strategies import filesystem_async as fa
real = fa._write_item
@functools.wraps(real)  # megatron inspects its signature
def write_item(*args, **kwargs):
    stream = next(a for a in args if hasattr(a, "write") and hasattr(a, "name"))
    if ".tmp_iter_0000002" in str(stream.name):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(stream.name))
    return real(*args, **kwargs)
fa._write_item = write_item
from lmfusion.training.cli import train_main
sys.exit(train_main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    return make_tiny_assets(tmp_path_factory.mktemp("cli_assets"))


def _train(assets: dict, run_dir: Path, *overrides: str, code: str | None = None,
           shards: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop("RANK", None)
    entry = ["-c", code] if code else ["-m", "lmfusion.train"]
    args = ["--config", assets["config"], f"init.base_checkpoint={assets['base']}",
            f"data.datasets=[{shards or assets['shards']}]", f"checkpoint.save={run_dir}", *overrides]
    return subprocess.run([sys.executable, *entry, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT)


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-4000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("lmfusion train: error:")]
    assert len(errors) == 1, proc.stderr[-4000:]
    return errors[0]


@pytest.mark.parametrize("workers", [0, 1])
def test_every_shard_bad_is_one_line_naming_the_shards(assets, tmp_path, workers):
    """Every shard of the set corrupted (sha256 no longer the manifest's): one error line naming the set, the shards
    and what was expected, with or without DataLoader workers."""
    import shutil

    shards = tmp_path / "shards"
    shutil.copytree(assets["shards"], shards)
    tars = sorted(shards.glob("*.tar"))
    assert tars
    for tar in tars:
        data = bytearray(tar.read_bytes())
        data[len(data) // 2] ^= 0xFF
        tar.write_bytes(bytes(data))
    proc = _train(assets, tmp_path / "run", "train.train_iters=1", f"data.num_workers={workers}",
                  "data.streams=1", shards=str(shards))
    line = _one_error_line(proc)
    assert f"{shards}: 3 unreadable shards in a row (" in line, line
    assert sum(tar.name in line for tar in tars) == 3, line
    assert "expected readable shards" in line and "data.max_consecutive_failures=3" in line, line
    assert "sha256 differs from the manifest" in line, line


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_disk_full_during_a_checkpoint_is_one_line_and_leaves_no_partial_checkpoint(assets, tmp_path, mode):
    run_dir = tmp_path / "run"
    proc = _train(assets, run_dir, "train.train_iters=2", "checkpoint.save_interval=1", "checkpoint.keep_last=null",
                  f"checkpoint.async_save={'true' if mode == 'async' else 'false'}", code=_DISK_FULL)
    line = _one_error_line(proc)
    tmp = run_dir / ".tmp_iter_0000002"
    assert f"no space left on device writing {tmp}/__0_" in line and ".distcp" in line, line
    assert "previous checkpoint stays latest" in line, line
    assert (run_dir / "latest").read_text().strip() == "iter_0000001"
    assert not (run_dir / "iter_0000002").exists() and not tmp.exists()
    assert (run_dir / "iter_0000001" / "lmfusion_checkpoint.json").is_file()
