"""Check a GPU machine in one command: ``bash scripts/gpu_check.sh [--out report.json]`` (this module does the work).

Sections, each timed and recorded in a JSON report (``status``: ok | failed | skipped, with the numbers and, on a
failure, the error's last lines); the exit code is 1 if any section failed:

  environment      torch / CUDA / device / peak TFLOP/s; which of Transformer Engine, apex, DeepSpeed import
  gpu_tests        ``pytest -m gpu tests``: Transformer Engine linears, FP8 training vs bf16, DeepSpeed ZeRO-2 bf16
                   vs megatron (the GPU-marked tests; they skip without a GPU)
  routed_parity    a routed column+row pair in bf16 on the device vs fp32 on the host, same weights: outputs and
                   every image-weight gradient within 3e-2 of the reference's largest magnitude (bf16 keeps 8
                   mantissa bits: ~4e-3 per rounding, a few roundings deep)
  model_parity     a tiny LMFusionModel (2 layers + U-Net) in bf16 on the device vs fp32 on the host: logits and
                   noise prediction within 5e-2 of the reference's largest magnitude (bf16 through 2 layers)
  flex_vs_sdpa     FlexAttention vs SDPA with LMFusion's mask, fp32, forward and backward within 1e-4 (CPU: forward
                   only; flex has no CPU backward)
  train_resume     the tiny config through torchrun on 1 rank (NCCL on a GPU, bf16): 3 straight steps vs 2 steps,
                   a save, a resumed 3rd step: losses equal bit for bit
  routed_bench     benchmarks/routed_linear.py at the 8B layer shape at TP=2 in bf16: routed/dense ratio, TFLOP/s

``--cpu`` (or ``GPU_CHECK_FAKE_CUDA=1``) runs every section on the host with small shapes: a dry run that CI executes
so this command cannot rot. Nothing is downloaded; on a machine without network bring the wheels with
``../shared/gpukit/fetch_wheels.sh`` (``scripts/gpu_check.sh`` installs a ``.whl`` folder offline).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

ROUTED_TOL, MODEL_TOL, FLEX_TOL = 3e-2, 5e-2, 1e-4


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref| (0 when both are zero)."""
    ref = ref.detach().float().cpu()
    err = (got.detach().float().cpu() - ref).abs().max()
    scale = ref.abs().max()
    return float(err / scale) if float(scale) > 0 else float(err)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "2")
    return env


def _imports(name: str) -> bool:
    try:
        __import__(name)
        return True
    except Exception:  # TE without its CUDA libraries raises RuntimeError, not ImportError
        return False


# ---------------------------------------------------------------------------------------------------- sections
def environment(ctx) -> dict:
    from lmfusion.training.flops import peak_tflops

    out = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
           "device": str(ctx.device), "fake_cuda": ctx.fake,
           "transformer_engine": _imports("transformer_engine.pytorch"), "apex": _imports("apex"),
           "deepspeed": _imports("deepspeed")}
    if ctx.device.type == "cuda":
        out.update(name=torch.cuda.get_device_name(ctx.device), peak_tflops_bf16=peak_tflops(),
                   memory_gib=round(torch.cuda.get_device_properties(ctx.device).total_memory / 2**30, 1))
    return out


def gpu_tests(ctx) -> dict:
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "tests", "-q", "-p", "no:cacheprovider",
                           "-rs"], cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=ctx.timeout)
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors|deselected)", tail)}
    if proc.returncode not in (0,) or counts.get("failed") or counts.get("error") or counts.get("errors"):
        raise RuntimeError(f"pytest -m gpu: {tail}\n{proc.stdout[-3000:]}{proc.stderr[-2000:]}")
    if not ctx.fake and counts.get("skipped"):
        skipped = [line for line in proc.stdout.splitlines() if line.startswith("SKIPPED")]
        return {"summary": tail, **counts, "skips": skipped}
    return {"summary": tail, **counts}


def routed_parity(ctx) -> dict:
    from megatron.core.model_parallel_config import ModelParallelConfig

    from megatron_ext.linear import ModalityColumnParallelLinear, ModalityRowParallelLinear
    from megatron_ext.routing import RoutingPlan

    h, f, n = (1024, 2816, 2048) if not ctx.fake else (128, 352, 256)
    cfg = ModelParallelConfig(use_cpu_initialization=True, params_dtype=torch.float32)

    def pair(seed: int):
        g = torch.Generator().manual_seed(seed)
        init = lambda w: w.data.copy_(0.02 * torch.randn(w.shape, generator=g))  # noqa: E731
        c = ModalityColumnParallelLinear(h, f, config=cfg, init_method=init, bias=False)
        r = ModalityRowParallelLinear(f, h, config=cfg, init_method=init, bias=False, input_is_parallel=True,
                                      skip_bias_add=False)
        with torch.no_grad():  # twins start as copies of text in LMFusion; perturbed so a mix-up shows
            for mod in (c, r):
                mod.image_weight.add_(0.01 * torch.randn(mod.image_weight.shape, generator=g))
                mod.weight.requires_grad_(False)  # frozen text, as in training
        return c, r

    gen = torch.Generator().manual_seed(0)
    col, row = pair(1)
    dev_col, dev_row = (m.to(device=ctx.device, dtype=torch.bfloat16) for m in pair(1))
    x = torch.randn(n, 1, h, generator=gen)
    ids = (torch.rand(n, 1, generator=gen) < 0.5).long()

    def run(c, r, device, dtype):
        xi = x.to(device=device, dtype=dtype).detach().clone().requires_grad_(True)
        plan = RoutingPlan.build(ids.to(device))
        hdn, _ = c(xi, plan, keep_grouped=True)
        out, _ = r(torch.nn.functional.silu(hdn), plan, input_grouped=True)
        out.float().square().mean().backward()
        return out, xi.grad, c.image_weight.grad, r.image_weight.grad

    ref = run(col, row, torch.device("cpu"), torch.float32)
    got = run(dev_col, dev_row, ctx.device, torch.bfloat16)
    errs = dict(zip(("output", "input_grad", "fc1_image_grad", "fc2_image_grad"), map(_rel_err, got, ref)))
    if max(errs.values()) > ROUTED_TOL or dev_col.weight.grad is not None:
        raise AssertionError(f"routed bf16 vs fp32: {errs} (tolerance {ROUTED_TOL}); frozen text grad: "
                             f"{dev_col.weight.grad is not None}")
    return {"shape": {"hidden": h, "ffn": f, "tokens": n}, "rel_err": errs, "tolerance": ROUTED_TOL}


def model_parity(ctx) -> dict:
    from lmfusion.config_io import load_config
    from lmfusion.hf import load_base_state
    from lmfusion.model.builder import build_model
    from lmfusion.model.weights import is_image_param
    from lmfusion.training.step import prepare_micro_batch
    from lmfusion.training.synthetic import synthetic_batches

    cfg = load_config(ctx.assets["config"], [f"init.base_checkpoint={ctx.assets['base']}"])
    _, weights = load_base_state(ctx.assets["base"])
    model_cfg = cfg.model  # resolved from the base: the text architecture, plus the tiny config's image I/O
    batch = next(synthetic_batches(model_cfg, 64, 2, seed=3))
    outs = {}
    for name, device, dtype in (("ref", torch.device("cpu"), torch.float32), ("dev", ctx.device, torch.bfloat16)):
        model = build_model(model_cfg, base=weights, device=device, seed=5)  # fp32 text weights from the base
        g = torch.Generator().manual_seed(6)
        with torch.no_grad():  # stand-in for training: the U-Net's output layer starts at zero
            for pname, param in model.named_parameters():
                if is_image_param(pname):
                    param.add_((0.05 * torch.randn(param.shape, generator=g)).to(param.device))
        model = model.to(dtype=dtype).eval()  # what Float16Module does in training
        mb = prepare_micro_batch(batch, seed=0, step=0, dp_rank=0, index=0, device=device, dtype=dtype, cap=500)
        with torch.no_grad():
            outs[name] = model(mb.inputs)
    weights.close()
    errs = {"logits": _rel_err(outs["dev"].logits, outs["ref"].logits),
            "noise_pred": _rel_err(outs["dev"].noise_pred, outs["ref"].noise_pred)}
    if max(errs.values()) > MODEL_TOL:
        raise AssertionError(f"model bf16 on {ctx.device} vs fp32 on cpu: {errs} (tolerance {MODEL_TOL})")
    return {"rel_err": errs, "tolerance": MODEL_TOL, "images": batch.num_images}


def flex_vs_sdpa(ctx) -> dict:
    from lmfusion.model.attention import AttentionMask, attend

    b, hq, hkv, s, d = (2, 8, 2, 1024, 64) if not ctx.fake else (1, 4, 2, 128, 32)
    gen = torch.Generator().manual_seed(1)
    doc = torch.zeros(b, s, dtype=torch.long)
    doc[:, s // 2:] = 1  # two packed documents per row
    img = torch.full((b, s), -1, dtype=torch.long)
    img[:, s // 8: s // 4] = 0  # one image inside the first document
    img[:, 5 * s // 8: 3 * s // 4] = 1
    mask = AttentionMask(doc.to(ctx.device), img.to(ctx.device))
    q = torch.randn(b, hq, s, d, generator=gen)
    k, v = torch.randn(2, b, hkv, s, d, generator=gen)
    backward = ctx.device.type == "cuda"  # FlexAttention has no CPU backward (by design)
    results = {}
    for backend in ("sdpa", "flex"):
        qi, ki, vi = (t.to(ctx.device).requires_grad_(backward) for t in (q, k, v))
        out = attend(qi, ki, vi, mask, backend)
        grads = ()
        if backward:
            out.square().sum().backward()
            grads = (qi.grad, ki.grad, vi.grad)
        results[backend] = (out, *grads)
    errs = [_rel_err(a, r) for a, r in zip(results["flex"], results["sdpa"])]
    if max(errs) > FLEX_TOL:
        raise AssertionError(f"flex vs sdpa (fp32): {errs} (tolerance {FLEX_TOL})")
    return {"rel_err_out_dq_dk_dv": errs, "backward": backward, "tolerance": FLEX_TOL}


def train_resume(ctx) -> dict:
    work = Path(ctx.workdir) / "train"

    def launch(run_dir: Path, steps: int) -> list[float]:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m",
               "lmfusion.train", "--config", ctx.assets["config"], f"init.base_checkpoint={ctx.assets['base']}",
               f"data.datasets=[{ctx.assets['shards']}]", f"checkpoint.save={run_dir}",
               f"train.train_iters={steps}", "checkpoint.save_interval=2",
               f"train.precision={'bf16' if ctx.device.type == 'cuda' else 'fp32'}"]
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=ctx.timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"torchrun exited {proc.returncode}: {proc.stderr[-3000:]}")
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line)["loss"] for line in lines]

    straight = launch(work / "straight", 3)
    first = launch(work / "resumed", 2)
    resumed = launch(work / "resumed", 3)
    if resumed != straight or first != straight[:2]:
        raise AssertionError(f"resume differs: straight {straight}, first run {first}, resumed {resumed}")
    return {"losses": straight, "backend": "nccl" if ctx.device.type == "cuda" else "gloo"}


def routed_bench(ctx) -> dict:
    shape = (["--hidden", "4096", "--ffn", "7168", "--tokens", "8192", "--reps", "5"] if not ctx.fake
             else ["--hidden", "128", "--ffn", "256", "--tokens", "256", "--reps", "1"])
    cmd = [sys.executable, str(REPO_ROOT / "benchmarks" / "routed_linear.py"), "--device", ctx.device.type,
           "--dtype", "bf16", *shape]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=ctx.timeout)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    ratio = float(lines[-1].split(":")[1])
    tflops = [float(line.rstrip(" |").rsplit("|", 1)[1]) for line in lines if re.match(r"\| \d+/\d+ ", line)]
    return {"routed_over_dense": ratio, "routed_tflops": tflops, "table": lines[:-1]}


SECTIONS = {"environment": environment, "gpu_tests": gpu_tests, "routed_parity": routed_parity,
            "model_parity": model_parity, "flex_vs_sdpa": flex_vs_sdpa, "train_resume": train_resume,
            "routed_bench": routed_bench}


class _Context:
    def __init__(self, fake: bool, workdir: str, timeout: int):
        self.fake, self.workdir, self.timeout = fake, workdir, timeout
        self.device = torch.device("cpu") if fake else torch.device("cuda", 0)
        self.assets: dict = {}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", ".") + "/gpu_check.json", help="JSON report path")
    p.add_argument("--cpu", action="store_true", default=os.environ.get("GPU_CHECK_FAKE_CUDA") == "1",
                   help="dry run on the host (also GPU_CHECK_FAKE_CUDA=1)")
    p.add_argument("--only", nargs="*", choices=sorted(SECTIONS), help="run these sections only")
    p.add_argument("--timeout", type=int, default=420, help="seconds per subprocess")
    args = p.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); run with --cpu / "
              "GPU_CHECK_FAKE_CUDA=1 for the dry run", file=sys.stderr)
        return 2
    from megatron_ext.device import select
    from lmfusion.inference.load import init_runtime

    report = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "mode": "cpu-dry-run" if args.cpu else "gpu",
              "sections": {}}
    failed = []
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as workdir:
        ctx = _Context(args.cpu, workdir, args.timeout)
        select(ctx.device)
        init_runtime(ctx.device, tensor_model_parallel_size=1)
        from tests.distributed.workers.train import make_tiny_assets

        ctx.assets = make_tiny_assets(Path(workdir) / "assets")
        for name, fn in SECTIONS.items():
            if args.only and name not in args.only:
                continue
            t0 = time.perf_counter()
            try:
                result = {"status": "ok", **fn(ctx)}
            except Exception as e:  # record and go on: one report shows every section
                result = {"status": "failed", "error": f"{type(e).__name__}: {e}"[-4000:],
                          "traceback": traceback.format_exc()[-4000:]}
                failed.append(name)
            result["seconds"] = round(time.perf_counter() - t0, 1)
            report["sections"][name] = result
            print(f"gpu_check {name}: {result['status']} ({result['seconds']} s)", flush=True)
    report["failed"] = failed
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(f"gpu_check: report {out}")
    print(f"gpu_check_failed_sections: {len(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
