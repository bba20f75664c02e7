"""``lmfusion train`` / ``python -m lmfusion.train``, ``lmfusion flops`` and ``lmfusion plot``.

Exit status of ``train``: 0 when training finished or a stop signal was handled (checkpoint saved), 2 for a config or
file error, unreadable training data (``data.max_consecutive_failures`` bad shards in a row) or a checkpoint that could
not be written (disk full; the previous checkpoint stays latest), each one line and no traceback, 1 when the loss or
gradient norm became non-finite (one line naming the step; no checkpoint written).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from lmfusion.errors import USER_ERRORS

__all__ = ["add_subparser", "train_main", "run_training"]


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def _error(e: BaseException, agreed: bool = False) -> None:
    """One line on stderr; ``agreed``: every rank raised the same error (from collectives), rank 0 alone prints."""
    import torch.distributed as dist

    if not agreed or not dist.is_initialized() or dist.get_rank() == 0:
        print(f"lmfusion train: error: {_one_line(e)}", file=sys.stderr, flush=True)


def run_training(config: Optional[str], overrides: Sequence[str]) -> int:
    import warnings

    # megatron warns once per module that it falls back to torch kernels without TE/apex (always so on CPU).
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex) (and Apex )?(are|is) not installed.*")
    from lmfusion.config_io import load_config
    from lmfusion.data import DataError
    from lmfusion.training.engines import build_trainer
    from lmfusion.training.trainer import TrainingDiverged

    trainer = None
    try:
        cfg = load_config(config, overrides)
        trainer = build_trainer(cfg)
        result = trainer.run()
        if trainer.rt.rank == 0:
            print(f"lmfusion train: {result.reason} at step {result.iteration}; checkpoints in {trainer.run_dir}",
                  flush=True)
        return 0
    except TrainingDiverged as e:
        _error(e, agreed=True)
        return 1
    except (*USER_ERRORS, DataError) as e:
        _error(e)
        return 2
    finally:
        if trainer is not None:
            trainer.close()


def _train_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--config", help="YAML config (e.g. examples/configs/tiny_cpu.yaml)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides, e.g. train.train_iters=100 parallel.tensor_model_parallel_size=2")
    return p


def train_main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m lmfusion.train --config X [key=value ...]`` (under torchrun for several ranks)."""
    parser = _train_parser(argparse.ArgumentParser(
        prog="python -m lmfusion.train", description="Train LMFusion (run under torchrun for several ranks)."))
    args = parser.parse_args(argv)
    return run_training(args.config, args.overrides)


def _run_train(args: argparse.Namespace) -> int:
    return run_training(args.config, args.overrides)


# ---------------------------------------------------------------------------------------------------- flops
def _run_flops(args: argparse.Namespace) -> int:
    import itertools

    from lmfusion.config_io import load_config
    from lmfusion.training import flops
    from lmfusion.training.synthetic import synthetic_batches

    try:
        cfg = load_config(args.config, args.overrides)
        source = "base"
    except FileNotFoundError:  # no base here: take the config's model section as written
        cfg = load_config(args.config, args.overrides, resolve_base=False)
        source = f"config's model section; base {cfg.init.base_checkpoint or cfg.init.hf_dir} not found"
    data, train = cfg.data, cfg.train
    rows_per_batch = train.micro_batch_size
    batches_per_step = train.global_batch_size // rows_per_batch
    n = min(args.batches, batches_per_step)
    have_data = bool(data.datasets) and all((Path(d) / "manifest.json").is_file() for d in data.datasets)
    if have_data and not args.synthetic:
        import dataclasses

        from lmfusion.data import MultimodalLoader

        dc = dataclasses.replace(data, num_workers=0, tokenizer=data.tokenizer or (cfg.init.base_checkpoint or ""))
        batches = MultimodalLoader(dc, cfg.model)
        what = f"{n} micro-batches of {', '.join(data.datasets)}"
    else:
        batches = synthetic_batches(cfg.model, data.seq_length, rows_per_batch,
                                    caption_first_prob=data.caption_first_prob, caption_dropout=data.caption_dropout,
                                    caption_tokens=(args.caption_min, args.caption_max), seed=data.seed)
        what = f"{n} synthetic micro-batches (captions {args.caption_min}-{args.caption_max} tokens)"
    counts = flops.TokenCounts()
    for b in itertools.islice(batches, n):
        counts = counts + flops.count_tokens(b.modality_ids, b.document_ids)
    scale = batches_per_step / n  # the step's expected counts from the sampled micro-batches
    step = flops.TokenCounts(*(round(v * scale) for v in counts.as_list()))
    result = flops.compare(cfg.model, step, train.global_batch_size, data.seq_length, args.text_only_share)
    total = step.tokens
    print(f"model: {cfg.model.num_layers} layers, hidden {cfg.model.hidden_size}, vocab {cfg.model.vocab_size} "
          f"(from the {source}); step: {train.global_batch_size} rows x {data.seq_length} tokens, from {what}")
    print(f"tokens/step: image {step.image} ({step.image / total:.1%}), text after an image {step.text_on} "
          f"({step.text_on / total:.1%}), text before any image (incl. padding) {step.text_off} "
          f"({step.text_off / total:.1%}); {step.images} images")
    ref = result["transfusion_recipe"]
    sep = cfg.model.separation
    for key, label in (("lmfusion", "LMFusion (text frozen)" if sep == "deep" else f"LMFusion (text frozen, {sep})"),
                       ("lmfusion_as_implemented", "LMFusion, as autograd runs it"),
                       ("all_trainable", "same model, everything trainable"),
                       ("transfusion_same_data", "Transfusion from scratch, same data"),
                       ("transfusion_recipe", f"Transfusion recipe (+{args.text_only_share:.0%} text-only rows)")):
        print(f"  {label:<48} {result[key]:.4e} FLOPs/step   {result[key] / ref:6.1%} of the Transfusion recipe")
    print(f"lmfusion_over_transfusion_recipe: {result['lmfusion'] / ref:.4f}")
    if cfg.optimizer.trains_text:
        print(f"this config trains the text too (optimizer.text_lr_ratio {cfg.optimizer.text_lr_ratio:g}): its step "
              f"costs 'everything trainable'")
    return 0


# ---------------------------------------------------------------------------------------------------- plot
def _run_plot(args: argparse.Namespace) -> int:
    from lmfusion.errors import UserError
    from lmfusion.training.plot import plot_runs

    if args.output is None and len(args.run_dirs) > 1:
        raise UserError("lmfusion plot: several run directories need --output PNG")
    out = plot_runs(args.run_dirs, args.output or args.run_dirs[0] / "loss.png",
                    [m for m in args.metrics.split(",") if m],
                    args.labels.split(",") if args.labels else None)
    print(f"lmfusion plot: wrote {out}")
    return 0


# ---------------------------------------------------------------------------------------------------- export-ckpt
def _run_export(args: argparse.Namespace) -> int:
    from lmfusion import rundir
    from lmfusion.inference.export import export_checkpoint, export_text_hf

    iter_dir = rundir.find_checkpoint(args.ckpt)
    if iter_dir is None:
        raise FileNotFoundError(f"{args.ckpt}: expected a training iteration directory or a run directory with a "
                                f"complete iter_*/{rundir.CHECKPOINT_JSON}, found neither")
    if args.hf:
        out = export_text_hf(iter_dir, args.output)
        print(f"lmfusion export-ckpt: wrote {out} ({iter_dir.name}: the text model as a Hugging Face directory)")
        return 0
    out = export_checkpoint(iter_dir, args.output)
    print(f"lmfusion export-ckpt: wrote {out} ({iter_dir.name}: image set as safetensors + its base)")
    return 0


def add_subparser(subparsers: "argparse._SubParsersAction") -> None:
    """Register ``train``, ``flops``, ``plot`` and ``export-ckpt``."""
    p = _train_parser(subparsers.add_parser(
        "train", help="train LMFusion (run under torchrun for several ranks)",
        description="Train LMFusion from a YAML config with key=value overrides. Resumes from checkpoint.save "
                    "automatically. Same as `python -m lmfusion.train`."))
    p.set_defaults(run=_run_train)

    p = subparsers.add_parser(
        "flops", help="per-step FLOPs: LMFusion vs everything trainable vs Transfusion from scratch",
        description="Frozen-aware FLOPs of one training step of a config, from its data (or synthetic batches laid "
                    "out like the loader's), compared with training everything and with a from-scratch "
                    "Transfusion (the paper's '50%% of the FLOPs' claim).")
    p.add_argument("--config", required=True, help="YAML config")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--batches", type=int, default=8, help="micro-batches to sample (default 8)")
    p.add_argument("--synthetic", action="store_true", help="synthetic batches even when data.datasets exist")
    p.add_argument("--caption-min", type=int, default=8, help="synthetic caption length range, tokens (8)")
    p.add_argument("--caption-max", type=int, default=40, help="(40)")
    p.add_argument("--text-only-share", type=float, default=0.5,
                   help="share of text-only rows in Transfusion's training mix (paper: 1:1, i.e. 0.5)")
    p.set_defaults(run=_run_flops)

    p = subparsers.add_parser("plot", help="metric curves of one or several training runs as a PNG",
                              description="Plot metrics of RUN_DIR/metrics.jsonl against the step (default: total, "
                                          "LM and diffusion loss), one panel per metric; several runs share the "
                                          "panels, one colour each, with a legend (comparing ablations).")
    p.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR",
                   help="training run directories (checkpoint.save)")
    p.add_argument("--output", type=Path, help="PNG to write (default RUN_DIR/loss.png for one run)")
    p.add_argument("--metrics", default=",".join(("loss", "lm_loss", "diffusion_loss")),
                   help="comma-separated metrics.jsonl keys, one panel each (e.g. lm_loss,diffusion_loss,grad_norm)")
    p.add_argument("--labels", default=None, help="comma-separated legend names, one per run (default: directory names)")
    p.set_defaults(run=_run_plot)

    p = subparsers.add_parser("export-ckpt", help="a training checkpoint as safetensors + JSON, with its base",
                              description="Write a training iteration (RUN_DIR: its newest complete one) as an "
                                          "export: the image set as safetensors, a copy of the frozen base and a "
                                          "JSON record with every file's sha256. Nothing in it is unpickled when "
                                          "loaded: the form to share (generate, caption, chat, eval read it).")
    p.add_argument("ckpt", type=Path, help="run directory or iter_XXXXXXX directory")
    p.add_argument("--output", type=Path, required=True, help="new directory to write")
    p.add_argument("--hf", action="store_true",
                   help="write the run's text model as a Hugging Face directory instead (the text set it trained "
                        "when optimizer.text_lr_ratio > 0, else its base's)")
    p.set_defaults(run=_run_export)
