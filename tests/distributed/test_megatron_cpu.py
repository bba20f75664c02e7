"""megatron-core on CPU/gloo (megatron_ext.cpu): every piece LMFusion relies on, checked on 2 and 4 gloo ranks
against a single-process reference. One torchrun launch per world size runs all of that size's cases.

What each case proves and its tolerance is in its docstring in ``tests/distributed/workers/megatron_cpu.py`` and
``megatron_train.py``; exact means ``torch.equal``.
"""

from __future__ import annotations

import pytest

from tests.distributed.harness import launch

MODULE = "tests.distributed.workers.megatron_cpu"

CASES = {
    2: (
        "groups_tp2",  # 1. process groups as documented
        "mappings_tp2",  # 2. all TP/SP mappings, fwd + bwd, exact
        "uneven_split_gloo_limit_tp2",  # 2. uneven SP splits: gloo limit pinned (raises, never wrong)
        "rng_tracker_tp2",  # 6. RNG streams exact vs fresh generators
        "recompute_dropout_tp2",  # 6. activation recompute with dropout, exact
        "pipeline_1f1b_pp2",  # 3. 1F1B, exact
        "pipeline_interleaved_pp2_vpp2",  # 3. interleaved, both batch_p2p_comm settings, exact (+ canary)
        "ddp_optimizer_dp2",  # 4. DDP + (distributed) optimizer, frozen params, clipping, ≤1e-6
        "resume_bit_exact_dp2",  # 5. checkpoint resume, exact (+ canaries for the CPU-mode wrappers)
        "multi_bucket_checkpoint_bug_dp2",  # 5. megatron 0.16.1 multi-bucket save bug pinned
        "reshard_tp2_to_tp1",  # 5. save tp=2, load tp=1, exact weights
    ),
    4: (
        "groups_tp2_pp2",  # 1.
        "groups_tp2_dp2",  # 1.
        "mappings_tp4",  # 2.
        "pipeline_tp2_pp2",  # 3. tp2 x pp2, ≤1e-6
        "ddp_optimizer_dp4",  # 4.
    ),
}


def _run(nproc: int):
    return launch(MODULE, nproc, CASES[nproc])


@pytest.mark.parametrize("name", CASES[2])
def test_two_ranks(name):
    _run(2).check(name)


@pytest.mark.parametrize("name", CASES[4])
def test_four_ranks(name):
    _run(4).check(name)
