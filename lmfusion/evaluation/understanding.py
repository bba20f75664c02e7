"""``lmfusion eval lmms``: lmms-eval image-understanding tasks through a VLM base's own path, beside the base's scores.

The LLaVAFusion recipe freezes the whole VLM (vision tower, projector, text modules) and trains only the image
modules, which understanding inputs never reach: a checkpoint must score exactly as its base. This command shows it
task by task, as ``lmfusion eval text`` (:mod:`.text`) does for the text benchmarks, whose pieces it shares:

* **Offline.** Datasets come from the local Hugging Face cache or from local files a task YAML names
  (``--include-path DIR``: lmms-eval task YAMLs, e.g. ``dataset_path: json`` over a JSONL file of image paths and a
  ``doc_to_visual`` that opens them); a missing one is a one-line error before any model loads.
* **The base beside ours.** For a training checkpoint the base is the converted base it names (``--base CKPT``:
  another LMFusion checkpoint). Every metric is compared exactly, every loglikelihood within
  :data:`~lmfusion.evaluation.text.LOGLIK_TOL` (in fact bit-identical: same weights, same code), every generated text
  exactly; a difference is flagged on screen, in ``results.json`` (section ``lmms``) and ``table1.md``, exit 1.
* **The model** is :class:`lmfusion.evaluation.lmms_adapter.LMFusionLMMS`; lmms-eval is imported when the command
  runs, with a one-line install hint when it is missing (its declared dependencies would replace the CPU torch).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from lmfusion.errors import UserError
from lmfusion.evaluation.text import (LOGLIK_TOL, compare, offline_datasets, task_manager, task_metrics, task_names,
                                      task_responses)

__all__ = ["load_lmms_tasks", "run_lmms"]


def _dataset_files(manager, name: str) -> Optional[str]:
    """The task YAML's ``dataset_path`` (for error messages), or None."""
    from lmms_eval import utils

    entry = manager.task_index.get(name) or {}
    try:
        return utils.load_yaml_config(entry["yaml_path"], mode="simple").get("dataset_path")
    except Exception:  # an unreadable YAML fails again, with its own message, when the task loads
        return None


def _unwrap_retry(error: BaseException) -> BaseException:
    """lmms-eval builds tasks under tenacity's ``@retry`` (5 tries, 2 s apart): the error is its last try's."""
    attempt = getattr(error, "last_attempt", None)  # tenacity.RetryError
    inner = attempt.exception() if attempt is not None else None
    return inner if inner is not None else error


def load_lmms_tasks(names: list[str], include_path: Optional[Path] = None) -> dict[str, Any]:
    """``{task name: Task}`` with datasets loaded (offline); one-line errors for unknown tasks and missing data."""
    offline_datasets()
    from lmfusion.evaluation.lmms_adapter import require_lmms_eval

    require_lmms_eval()
    from lmms_eval.tasks import TaskManager

    manager = task_manager(TaskManager, names, include_path)
    tasks = {}
    for name in names:
        if name not in manager.task_index:
            raise UserError(f"--tasks {name}: not an lmms-eval task; add its YAML with --include-path DIR")
        try:
            loaded = manager.load_task_or_group([name])
        except Exception as raised:  # datasets' offline miss, a local data file missing, DatasetNotFoundError & co.
            e = _unwrap_retry(raised)
            if isinstance(e, (ConnectionError, FileNotFoundError)) or \
                    type(e).__module__.startswith(("datasets", "huggingface_hub")):
                path = _dataset_files(manager, name)
                fetch = ("" if path in (None, "json", "csv", "parquet", "imagefolder") else
                         f"; on a machine with network run python -c \"import datasets; "
                         f"datasets.load_dataset({path!r})\" and copy its HF_HOME here")
                raise FileNotFoundError(
                    f"--tasks {name}: dataset {path} cannot be read offline ({type(e).__name__}: {e}); lmms-eval "
                    f"tasks read the local Hugging Face datasets cache (HF_HOME) or local files{fetch}") from raised
            raise
        tasks.update(_leaf_tasks(loaded))
    return tasks


def _leaf_tasks(loaded: dict) -> dict[str, Any]:
    """``{task name: Task}`` of a ``load_task_or_group`` result: a group (e.g. ``mmbench``) nests its subtasks."""
    out = {}
    for key, value in loaded.items():
        if isinstance(value, tuple):  # (group, task)
            value = value[1]
        if isinstance(value, dict):
            out.update(_leaf_tasks(value))
        elif value is not None:
            out[key if isinstance(key, str) else value.config.task] = value
    return out


def _filelock_compat() -> None:
    """lmms-eval 0.7.3's ``simple_evaluate`` first patches ``filelock._api.FileLockMeta`` (a cross-class lock cache
    against multi-rank dataset-lock deadlocks); filelock 4 has no ``filelock._api``, so the patch raises. One process
    has no such contention: with filelock 4, mark the patch as applied (its own guard) so it is skipped."""
    import importlib.util

    from lmms_eval import evaluator

    if importlib.util.find_spec("filelock._api") is None and hasattr(evaluator, "_enable_reentrant_filelocks"):
        evaluator._enable_reentrant_filelocks._patched = True


def _evaluate(lm, tasks: dict[str, Any], args) -> dict[str, dict]:
    from lmms_eval.evaluator import simple_evaluate

    _filelock_compat()

    results = simple_evaluate(model=lm, tasks=list(tasks.values()), limit=args.limit, log_samples=True,
                              bootstrap_iters=0, process_docs_parallel=1, verbosity="WARNING")
    return {"metrics": task_metrics(results, tasks), "responses": task_responses(results, tasks)}  # lm-eval's layout


def _model(ckpt, args):
    from lmfusion.evaluation import runtime
    from lmfusion.evaluation.lmms_adapter import LMFusionLMMS, load_processor

    # understanding runs through the frozen VLM only: the image set (EMA or raw) cannot change a score
    bundle = runtime.load_data_parallel(ckpt, args.device, weights=args.weights or "raw")
    return LMFusionLMMS(bundle, load_processor(bundle.meta.base_dir), chat_template=args.chat_template == "auto",
                        max_new_tokens=args.max_new_tokens)


def run_lmms(args) -> int:
    from lmfusion.evaluation.report import merge_results

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("eval lmms runs in one process: start it without torchrun")
    tasks = load_lmms_tasks(task_names(args.tasks), args.include_path)
    lm = _model(args.ckpt, args)
    ours = _evaluate(lm, tasks, args)
    base, base_name = None, None
    if args.base is not None or lm.bundle.meta.kind == "training":
        base_dir = args.base if args.base is not None else lm.bundle.meta.base_dir
        del lm  # one model in memory at a time
        base, base_name = _evaluate(_model(base_dir, args), tasks, args), str(base_dir)
    diffs, max_diff = compare(ours, base) if base is not None else ([], None)
    for t, m in ours["metrics"].items():
        print(f"lmfusion eval lmms: {t}: " + ", ".join(f"{k} {v:.4f}" for k, v in m.items())
              + ("" if base is None else " | base: " + ", ".join(f"{k} {v:.4f}" for k, v in
                                                                base["metrics"][t].items())))
    if diffs:
        print("lmfusion eval lmms: WARNING: understanding scores differ from the base model's (the VLM is frozen): "
              + "; ".join(diffs))
    elif base is not None:
        print(f"lmfusion eval lmms: same as the base ({base_name}): every metric and generated text equal, "
              f"loglikelihoods within {LOGLIK_TOL:g}")
    merge_results(args.out, "lmms", {"metrics": ours["metrics"],
                                     "base_metrics": None if base is None else base["metrics"],
                                     "base_source": base_name, "max_loglik_diff": max_diff, "differences": diffs,
                                     "limit": args.limit, "chat_template": args.chat_template}, args.name)
    return 1 if diffs else 0
