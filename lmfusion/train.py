"""``torchrun --nproc_per_node N -m lmfusion.train --config examples/configs/tiny_cpu.yaml [key=value ...]``.

A thin entry point: everything lives in :mod:`lmfusion.training`. The config's ``engine`` picks the trainer:
``megatron`` (default; :class:`lmfusion.training.trainer.Trainer`) or ``deepspeed`` (``engine=deepspeed
deepspeed.zero_stage=2``; :class:`lmfusion.training.deepspeed_engine.DeepSpeedTrainer`);
:func:`lmfusion.training.engines.build_trainer` picks it, for ``lmfusion train`` and this module alike.

The ``__main__`` guard matters: megatron's dist_checkpointing starts a spawn-context process at the first save, which
re-imports the main module.
"""

import sys

from lmfusion.training.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
