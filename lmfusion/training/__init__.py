"""Training: runtime (process group, megatron parallel state), model setup (DDP over the image set, distributed
optimizer, LR schedule), the step (noise, schedule, loss), checkpoints, signals, metrics and FLOP accounting.

    from lmfusion.config_io import load_config
    from lmfusion.training.engines import build_trainer
    build_trainer(load_config("examples/configs/tiny_cpu.yaml", ["train.train_iters=10"])).run()

Submodules import megatron; this package file imports nothing so that ``lmfusion.training.flops`` stays light.
"""
