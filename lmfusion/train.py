"""``torchrun --nproc_per_node N -m lmfusion.train --config examples/configs/tiny_cpu.yaml [key=value ...]``.

A thin entry point: everything lives in :mod:`lmfusion.training`. The ``__main__`` guard matters: megatron's
dist_checkpointing starts a spawn-context process at the first save, which re-imports the main module.
"""

import sys

from lmfusion.training.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
