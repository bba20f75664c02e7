"""``scripts/gpu_check.sh``, the one command that checks a GPU machine, run as its CPU dry run
(``GPU_CHECK_FAKE_CUDA=1``): every section executes on the host with small shapes, so the command cannot rot between
the GPU machines we get. On a CUDA machine the same command runs the real checks (see scripts/gpu_check.py)."""

from __future__ import annotations

import json
import os
import subprocess

from tests.distributed.harness import REPO_ROOT

SECTIONS = {"environment", "gpu_tests", "routed_parity", "model_parity", "flex_vs_sdpa", "train_resume",
            "routed_bench"}


def test_gpu_check_dry_run(tmp_path):
    report_path = tmp_path / "gpu_check.json"
    env = {**os.environ, "GPU_CHECK_FAKE_CUDA": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--out", str(report_path)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "gpu_check_failed_sections: 0"
    report = json.loads(report_path.read_text())
    assert report["mode"] == "cpu-dry-run" and report["failed"] == []
    sections = report["sections"]
    assert set(sections) == SECTIONS and all(s["status"] == "ok" for s in sections.values()), sections
    assert sections["gpu_tests"]["skipped"] >= 1 and "failed" not in sections["gpu_tests"]
    for name in ("routed_parity", "model_parity"):
        errs = sections[name]["rel_err"]
        assert 0 < max(errs.values()) <= sections[name]["tolerance"], errs  # bf16 differs, within tolerance
    assert len(sections["train_resume"]["losses"]) == 3
    assert sections["routed_bench"]["routed_over_dense"] > 0


def test_gpu_check_refuses_without_cuda_unless_dry_run(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    env.pop("GPU_CHECK_FAKE_CUDA", None)
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--out", str(tmp_path / "r.json")], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "no CUDA device here" in proc.stderr
    assert not (tmp_path / "r.json").exists()
