"""One shared way to run test cases on N gloo ranks through the real launcher (torchrun).

Starting a process group costs seconds (megatron import + rendezvous), so a worker module holds many cases and one
``torchrun`` launch runs them all; pytest then reports each case on its own.

Worker side (a module under ``tests/distributed/workers``)::

    from tests.distributed.harness import case, worker_main

    @case
    def tp_parity():
        ...  # runs on every rank, inside an initialised gloo process group, megatron CPU mode on

    if __name__ == "__main__":
        worker_main()

Pytest side::

    run = launch("tests.distributed.workers.routed", nproc=2)   # session-cached
    run.check("tp_parity")                                        # raises with every failing rank's traceback

Each case starts with no megatron model-parallel state and must set up what it needs; the harness destroys
model-parallel state after each case. A case failing on one rank while others wait in a collective makes them
fail with gloo's timeout (``LMFUSION_TEST_TIMEOUT``, default 300 s) rather than hang.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib
import json
import os
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parents[2]
_CASES: dict[str, Callable[[], None]] = {}


def case(fn: Callable[[], None]) -> Callable[[], None]:
    """Register a worker case under its function name."""
    _CASES[fn.__name__] = fn
    return fn


def case_names(module: str) -> list[str]:
    """Names of the cases a worker module registers (imports it; runs nothing)."""
    mod = importlib.import_module(module)
    return [name for name, fn in _CASES.items() if fn.__module__ == mod.__name__]


def worker_main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--results", required=True)
    parser.add_argument("cases", nargs="*")
    args = parser.parse_args()

    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_ext import cpu

    timeout = datetime.timedelta(seconds=int(os.environ.get("LMFUSION_TEST_TIMEOUT", "300")))
    dist.init_process_group(backend="gloo", timeout=timeout)
    cpu.enable()
    rank = dist.get_rank()
    torch.set_num_threads(1)

    main_module = sys.modules["__main__"].__name__
    selected = args.cases or [n for n, fn in _CASES.items() if fn.__module__ == main_module]
    results: dict[str, str | None] = {}
    out = Path(args.results) / f"rank{rank}.json"
    for name in selected:
        try:
            _CASES[name]()
            results[name] = None
        except BaseException:  # report and go on to the next case
            results[name] = traceback.format_exc()
        finally:
            parallel_state.destroy_model_parallel()
            out.write_text(json.dumps(results))  # after each case: a crash still leaves earlier results
        try:
            dist.barrier()
        except BaseException:
            break
    dist.destroy_process_group()


class Run:
    """Results of one launch: ``results[case][rank]`` is None (passed) or a traceback."""

    def __init__(self, module: str, nproc: int, results: dict[str, dict[int, str | None]], log: str, rc: int):
        self.module, self.nproc, self.results, self.log, self.rc = module, nproc, results, log, rc

    def check(self, name: str) -> None:
        per_rank = self.results.get(name, {})
        problems = []
        for rank in range(self.nproc):
            if rank not in per_rank:
                problems.append(f"rank {rank}: case did not run (launcher rc={self.rc})")
            elif per_rank[rank] is not None:
                problems.append(f"rank {rank}:\n{per_rank[rank]}")
        if problems:
            tail = self.log[-6000:]
            raise AssertionError(f"{self.module}::{name} on {self.nproc} ranks\n" + "\n".join(problems) + f"\n--- launcher output (tail) ---\n{tail}")


@functools.lru_cache(maxsize=None)
def launch(module: str, nproc: int, cases: tuple[str, ...] = (), extra_env: tuple[tuple[str, str], ...] = ()) -> Run:
    """Run a worker module's cases on ``nproc`` gloo ranks with torchrun (cached per arguments)."""
    results_dir = tempfile.mkdtemp(prefix="lmfusion-dist-")
    env = dict(os.environ)
    env.update(dict(extra_env))
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "-m", module, "--results", results_dir, *cases,
    ]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=int(os.environ.get("LMFUSION_LAUNCH_TIMEOUT", "1500")))
    results: dict[str, dict[int, str | None]] = {}
    for rank in range(nproc):
        path = Path(results_dir) / f"rank{rank}.json"
        if path.exists():
            for name, outcome in json.loads(path.read_text()).items():
                results.setdefault(name, {})[rank] = outcome
    return Run(module, nproc, results, proc.stdout + proc.stderr, proc.returncode)
