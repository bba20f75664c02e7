"""Training through the real launcher (``torchrun -m lmfusion.train``) and the trainer's cases on 2 gloo ranks.

Inputs are built once per module: a tiny random Llama (HF, safetensors) whose tokenizer is the data fixtures' word
tokenizer, converted with ``convert_hf``, and a shard set of random 8 x 8 images (identity VAE). Runs use
``examples/configs/tiny_cpu.yaml`` with overrides.

* 1 rank, 30 steps (``torchrun``): the loss falls; its metrics are the TP=PP=DP=1 reference for the layout cases.
* 2 ranks: layout parity, resume, reshard, frozen text, NaN guard, signal agreement (tests/distributed/workers/
  train.py, one ``torchrun`` launch).
* 1 rank, ``torchrun``: rectified flow + Min-SNR trains, its checkpoint records the objective, generation uses the
  flow sampler.
* 2 ranks, ``torchrun``: SIGTERM to the workers mid-run -> checkpoint written, every process exits 0; a second
  launch resumes at the next step and its losses equal an uninterrupted run's, bit for bit.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.distributed.harness import REPO_ROOT, case_names, launch
from tests.fixtures import make_tiny_assets

MODULE = "tests.distributed.workers.train"
LAUNCH_TIMEOUT = int(os.environ.get("LMFUSION_LAUNCH_TIMEOUT", "600"))


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    return env


def _torchrun(nproc: int, assets: dict, run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "lmfusion.train", "--config", assets["config"], f"init.base_checkpoint={assets['base']}",
            f"data.datasets=[{assets['shards']}]", f"checkpoint.save={run_dir}", *overrides]


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines)]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    return make_tiny_assets(tmp_path_factory.mktemp("train_assets"))


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory) -> Path:
    """30 steps on 1 rank through torchrun (TP=PP=DP=1)."""
    run_dir = tmp_path_factory.mktemp("train_ref") / "run"
    proc = subprocess.run(_torchrun(1, assets, run_dir, "train.train_iters=30", "logging.tensorboard=true"),
                          cwd=REPO_ROOT, env=_env(),
                          capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return run_dir


def test_loss_falls_over_30_steps_one_rank(reference):
    """On a fixed small dataset the total loss falls: the mean of the last 5 steps is below that of the first 5,
    and the diffusion loss (the trained image path) falls too."""
    records = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 31))
    first, last = records[:5], records[-5:]
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
    assert mean(last, "loss") < mean(first, "loss"), [r["loss"] for r in records]
    assert mean(last, "diffusion_loss") < mean(first, "diffusion_loss")
    assert (reference / "latest").read_text().strip() == "iter_0000030"
    for key in ("lm_loss", "diffusion_loss", "grad_norm", "lr", "tokens_per_s", "tflops_per_device", "loader_wait_s"):
        assert all(math.isfinite(r[key]) for r in records), key
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(reference / "tensorboard"))
    events.Reload()
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([r["loss"] for r in records], rel=1e-6)


def test_plot_and_flops_commands_on_the_run(reference, assets, capsys):
    """``lmfusion plot RUN_DIR`` writes a PNG of the run's losses; ``lmfusion flops`` reads the run's data and
    reports LMFusion below training everything, which is below the Transfusion recipe."""
    from PIL import Image

    from lmfusion.cli import main

    assert main(["plot", str(reference)]) == 0
    with Image.open(reference / "loss.png") as png:
        assert png.format == "PNG" and png.width > png.height > 0
    assert main(["flops", "--config", assets["config"], f"init.base_checkpoint={assets['base']}",
                 f"data.datasets=[{assets['shards']}]", "--batches", "4"]) == 0
    out = capsys.readouterr().out
    per_step = {line.split("FLOPs/step")[0].rsplit(None, 1)[0].strip(): float(line.split("FLOPs/step")[0].split()[-1])
                for line in out.splitlines() if "FLOPs/step" in line}
    lmf, everything = per_step["LMFusion (text frozen)"], per_step["same model, everything trainable"]
    recipe = next(v for k, v in per_step.items() if k.startswith("Transfusion recipe"))
    assert 0 < lmf < everything < recipe
    assert "micro-batches of " + assets["shards"] in out  # the real loader, not synthetic batches


def test_export_loads_from_its_own_base(reference, tmp_path):
    """A training checkpoint refers to its base; the export holds the image set as safetensors and a copy of the
    base, its record pointing at the copy (relative path), and inference loads it from there."""
    from lmfusion.inference.load import load_for_inference
    from lmfusion.inference.export import export_checkpoint
    from lmfusion.rundir.export import EXPORT_JSON, IMAGE_SET

    out = export_checkpoint(reference / "iter_0000030", tmp_path / "export")
    assert json.loads((out / EXPORT_JSON).read_text())["base"] == "base" and (out / IMAGE_SET).is_file()
    loaded = load_for_inference(out)
    assert loaded.meta.kind == "export" and loaded.meta.base_dir.resolve() == (out / "base").resolve()
    with pytest.raises(FileExistsError):
        export_checkpoint(reference / "iter_0000030", out)


def test_cli_export_and_generate_from_a_training_run(reference, tmp_path, capsys):
    """``lmfusion export-ckpt RUN_DIR`` follows 'latest'; ``lmfusion generate --ckpt`` on the run directory and on
    the export gives the same image bytes, and greedy text from the run equals the base's (text is frozen)."""
    from lmfusion.cli import main
    from lmfusion.rundir.export import EXPORT_JSON
    from lmfusion.training.checkpointing import CHECKPOINT_JSON

    assert main(["export-ckpt", str(reference), "--output", str(tmp_path / "export")]) == 0
    assert json.loads((tmp_path / "export" / EXPORT_JSON).read_text())["iteration"] == 30
    grids = []
    for ckpt in (reference, tmp_path / "export"):
        out = tmp_path / f"{len(grids)}.png"
        assert main(["generate", "--ckpt", str(ckpt), "--prompt", "w1 w2", "--out", str(out), "--n", "2",
                     "--sampler", "ddim", "--steps", "3", "--seed", "0", "--vae", "identity"]) == 0
        grids.append(out.read_bytes())
    assert grids[0] == grids[1]
    texts = []
    base = json.loads((reference / "iter_0000030" / CHECKPOINT_JSON).read_text())["base"]
    for ckpt in (reference, base):
        capsys.readouterr()
        assert main(["generate", "--ckpt", str(ckpt), "--prompt", "w1 w2", "--text", "--max-new-tokens", "5"]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and texts[0].strip()
    assert main(["export-ckpt", str(tmp_path), "--output", str(tmp_path / "x")]) == 2


def test_flow_min_snr_run_trains_records_its_objective_and_generates_with_euler(assets, tmp_path, capsys):
    """diffusion.objective=flow + min_snr weighting through the launcher (1 rank, 20 steps): the diffusion loss falls;
    the checkpoint records the objective; generation from it uses the flow sampler by default (the same image bytes
    as --sampler euler) and refuses a DDPM-family sampler with one line; resuming the run as epsilon is refused."""
    from lmfusion.cli import main
    from lmfusion.inference.load import load_for_inference
    from lmfusion.training.checkpointing import CHECKPOINT_JSON

    run_dir = tmp_path / "flow"
    flow = ("diffusion.objective=flow", "diffusion.loss_weighting=min_snr", "diffusion.flow_shift=2")
    proc = subprocess.run(_torchrun(1, assets, run_dir, "train.train_iters=20", *flow), cwd=REPO_ROOT, env=_env(),
                          capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    diff = [r["diffusion_loss"] for r in records]
    assert len(diff) == 20 and all(math.isfinite(d) for d in diff)
    assert sum(diff[-5:]) < sum(diff[:5]), diff
    record = json.loads((run_dir / "iter_0000020" / CHECKPOINT_JSON).read_text())
    assert record["diffusion"]["objective"] == "flow" and record["diffusion"]["flow_shift"] == 2.0
    assert load_for_inference(run_dir).diffusion.objective == "flow"

    args = ["generate", "--ckpt", str(run_dir), "--prompt", "w1 w2", "--n", "2", "--steps", "3", "--seed", "0",
            "--vae", "identity"]
    grids = []
    for extra in ((), ("--sampler", "euler")):
        out = tmp_path / f"{len(grids)}.png"
        assert main([*args, "--out", str(out), *extra]) == 0
        grids.append(out.read_bytes())
    assert grids[0] == grids[1]
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "x.png"), "--sampler", "ddim"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "diffusion.objective=flow" in err and "euler" in err, err

    resumed = subprocess.run(_torchrun(1, assets, run_dir, "train.train_iters=21", "diffusion.objective=epsilon"),
                             cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert resumed.returncode != 0
    assert "diffusion.objective is 'flow' in the checkpoint, 'epsilon' in this config" in \
        resumed.stdout + resumed.stderr


@pytest.fixture(scope="module")
def spec(assets, reference, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("train_spec") / "spec.json"
    path.write_text(json.dumps({**assets, "reference": str(reference / "metrics.jsonl")}))
    return str(path)


@pytest.mark.parametrize("name", case_names(MODULE))
def test_trainer(name, spec):
    launch(MODULE, 2, extra_env=(("LMFUSION_TRAIN_SPEC", spec),)).check(name)


def _wait_for_step(run_dir: Path, proc: subprocess.Popen, step: int, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"training ended (rc={proc.returncode}) before step {step}")
        path = run_dir / "metrics.jsonl"
        if path.is_file() and any(json.loads(line)["step"] >= step for line in path.read_text().splitlines()):
            return
        time.sleep(0.2)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def test_sigterm_saves_exits_0_and_resume_continues_bit_exact(assets, tmp_path):
    """SIGTERM to every worker of a 2-rank torchrun mid-run: they agree, save the step they finished and exit 0
    (so does torchrun). Relaunched with a new train_iters, the run resumes at the next step; its loss sequence equals
    an uninterrupted run's bit for bit."""
    import psutil

    run_dir = tmp_path / "signalled"
    proc = subprocess.Popen(_torchrun(2, assets, run_dir, "train.train_iters=1000", "checkpoint.save_interval=1000"),
                            cwd=REPO_ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_step(run_dir, proc, 2, timeout=LAUNCH_TIMEOUT)
        workers = psutil.Process(proc.pid).children(recursive=True)
        assert len(workers) >= 2, workers
        for w in workers:
            w.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-6000:]
    status = json.loads((run_dir / "exit_status.json").read_text())
    stopped = status["iteration"]
    assert status["reason"] == "signal" and stopped >= 2, status
    assert (run_dir / "latest").read_text().strip() == f"iter_{stopped:07d}"
    assert f"SIGTERM received: saved step {stopped}" in out

    total = stopped + 2
    resumed = subprocess.run(_torchrun(2, assets, run_dir, f"train.train_iters={total}"), cwd=REPO_ROOT, env=_env(),
                             capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-6000:]
    assert f"step {stopped})" in resumed.stdout and f"step {stopped + 1} |" in resumed.stdout
    straight_dir = tmp_path / "straight"
    straight = subprocess.run(_torchrun(2, assets, straight_dir, f"train.train_iters={total}"), cwd=REPO_ROOT,
                              env=_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert straight.returncode == 0, straight.stdout[-3000:] + straight.stderr[-6000:]
    assert _losses(run_dir) == _losses(straight_dir)
    assert [s for s, _ in _losses(run_dir)] == list(range(1, total + 1))


@pytest.mark.gpu
def test_fp8_training_tracks_bf16_on_gpu(assets, tmp_path):
    """TE FP8 (hybrid E4M3/E5M2, delayed scaling) through the launcher: the model pads each routing group to 16
    tokens and runs its TE linears under megatron's fp8 context. Over 5 steps on one GPU every loss is finite and
    within 5% of the bf16 run's (FP8's 3-bit mantissa costs about that much on a 64-wide toy model)."""
    pytest.importorskip("transformer_engine", reason="FP8 needs Transformer Engine")
    runs = {}
    for name, extra in (("bf16", ()), ("fp8", ("train.fp8=hybrid",))):
        run_dir = tmp_path / name
        proc = subprocess.run(_torchrun(1, assets, run_dir, "train.train_iters=5", "train.precision=bf16",
                                        "model.linear_backend=te", *extra),
                              cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
        runs[name] = [loss for _, loss in _losses(run_dir)]
    assert all(math.isfinite(x) for x in runs["fp8"]), runs
    assert runs["fp8"] == pytest.approx(runs["bf16"], rel=0.05), runs
