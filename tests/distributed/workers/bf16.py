"""``train.precision=bf16`` on CPU, 2 gloo ranks: weights-only loads, the sharded EMA and the losses at TP/PP/DP.

Inputs as tests/distributed/workers/train.py (``LMFUSION_TRAIN_SPEC``: tiny base, shards, tiny config). In bf16 the
model's parameters are bf16 (megatron's ``Float16Module``) and the distributed optimizer keeps fp32 main copies of
its shard; the loss math stays fp32.

Tolerances: the weights-only load and the EMA are compared bit for bit (copies and the same elementwise lerp on the
same fp32 values).
"""

from __future__ import annotations

from pathlib import Path

import torch

from lmfusion.training import checkpointing as ckpt
from lmfusion.training.trainer import Trainer
from tests.distributed.harness import case, worker_main
from tests.distributed.workers.ema import EMA
from tests.distributed.workers.megatron_common import shared_tmpdir
from tests.distributed.workers.train import config, image_params, train

N = 3
BF16 = ["train.precision=bf16"]

@case
def bf16_weights_only_load_restarts_the_fp32_main_params_from_the_loaded_weights():
    """bf16, DP=2, distributed optimizer: N steps and a save; a new run loads that checkpoint with
    ``checkpoint.load_optimizer=false``. Its fp32 main params (read through the EMA, which restarts from them) equal
    the loaded bf16 weights exactly; without megatron's ``reload_model_params`` they keep the init weights and the
    first step would write those back over the loaded ones. After one step the weights are the loaded ones moved by
    at most one Adam step (lr, plus one bf16 rounding), not the init weights'."""
    source_dir = shared_tmpdir()
    first = train(config(source_dir, f"train.train_iters={N}", *BF16, f"checkpoint.save_interval={N}"))
    trained = image_params(first)
    first.close()
    out = shared_tmpdir()
    t = Trainer(config(out, "train.train_iters=1", *BF16, *EMA, "checkpoint.load_optimizer=false",
                       f"checkpoint.load={Path(source_dir) / ckpt.iter_name(N)}")).setup()
    try:
        loaded = image_params(t)
        assert all(v.dtype == torch.bfloat16 for v in loaded.values())
        bad = [k for k in loaded if not torch.equal(loaded[k], trained[k])]
        assert not bad, f"the loaded weights differ from the saved ones: {bad[:3]}"
        main = t.ema.gathered()
        bad = [k for k in loaded if not torch.equal(main[k], loaded[k].float())]
        assert not bad, f"fp32 main params are not the loaded weights after a weights-only load: {bad[:3]}"
        t.run()
        lr = t.history[0]["lr"]
        stepped = image_params(t)
        for k, v in stepped.items():
            # one Adam step moves an element by <= lr (bias-corrected first step); bf16 rounding adds <= 2^-8 |v|
            bound = lr * 1.001 + loaded[k].float().abs() * 2.0 ** -8
            over = ((v.float() - loaded[k].float()).abs() > bound).sum().item()
            assert not over, f"{k}: {over} elements moved more than one step from the loaded weights"
    finally:
        t.close()


if __name__ == "__main__":
    worker_main()
