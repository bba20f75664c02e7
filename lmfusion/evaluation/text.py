"""``lmfusion eval text``: lm-eval tasks through our text path, beside the base model's scores.

Design choices:

* **Offline.** Datasets come from the local Hugging Face datasets cache (or from local files a task YAML names):
  the command sets ``HF_DATASETS_OFFLINE`` / ``HF_HUB_OFFLINE`` before lm-eval imports ``datasets``, so a missing
  dataset fails at once (instead of retrying the Hub) with one line naming the dataset, the cache directory and the
  command that downloads it on a machine with network.
* **Tasks before the model.** Tasks (and their datasets) load first; an unknown task or a missing dataset costs no
  model load. The same Task objects are then evaluated for the checkpoint and for the base.
* **The base beside ours.** For a training checkpoint the base is the converted base it names (through our adapter;
  with frozen text every score must be identical; a run with ``optimizer.text_lr_ratio`` > 0 trained its text and
  the differences are reported as its drift, not as an error); ``--base CKPT`` names another LMFusion checkpoint,
  ``--base-hf`` the source Hugging Face model through lm-eval's own HF adapter. Every metric (``acc``, ``acc_norm``,
  ...) is compared exactly, and so is every request's response: loglikelihoods within :data:`LOGLIK_TOL`, generated
  text exactly (metrics alone are weak: tiny or weak models often pick the same choices). Any difference is flagged
  in the output, in ``results.json`` and ``table1.md``, and the exit status is 1 (0 for a run that trained its text,
  whose differences are its drift).
* Extra task configs (``--include-path``: a directory of lm-eval task YAMLs) make small local tasks possible, e.g. a
  ``dataset_path: json`` task over a JSONL file; the tests use one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from lmfusion.errors import UserError

__all__ = ["LM_EVAL_TASKS", "LOGLIK_TOL", "task_names", "offline_datasets", "task_manager", "load_tasks",
           "task_metrics", "task_responses", "headline", "compare", "run_text"]

LM_EVAL_TASKS = {"siqa": "social_iqa"}  # our short names -> lm-eval task names
# Per-request loglikelihood tolerance vs the base: 0 in fact for our adapter on the same weights (same code, same
# order); fp32 HF vs ours differ by summation order only (~1e-6 on a few tokens, tests/unit/test_eval_lm_adapter.py).
LOGLIK_TOL = 1e-4
_OFFLINE_VARS = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")


def task_names(spec: str) -> list[str]:
    names = [t.strip() for t in spec.split(",") if t.strip()]
    if not names:
        raise UserError("--tasks: no task names")
    return names


def offline_datasets() -> None:
    """No network for datasets: the env switches before ``datasets`` is imported (and its flag if it already is)."""
    import sys

    for var in _OFFLINE_VARS:
        os.environ.setdefault(var, "1")
    if "datasets" in sys.modules:  # imported earlier in this process (tests, notebooks): its flag was read then
        sys.modules["datasets"].config.HF_HUB_OFFLINE = True


def _dataset_of(manager, name: str) -> tuple[Optional[str], Optional[str]]:
    """(dataset_path, dataset_name) from the task index's parsed YAML (includes resolved), or Nones."""
    entry = manager.task_index.get(name)
    cfg = (getattr(entry, "cfg", None) or {}) if entry is not None else {}
    return cfg.get("dataset_path"), cfg.get("dataset_name")


def _missing_dataset(task: str, path: Optional[str], name: Optional[str], error: BaseException) -> FileNotFoundError:
    import datasets
    from huggingface_hub import constants

    if path in (None, "json", "csv", "text", "parquet"):  # a local-file task: its files are what is missing
        return FileNotFoundError(f"--tasks {task}: its dataset files cannot be read ({error})")
    args = repr(path) + (f", {name!r}" if name else "")
    return FileNotFoundError(
        f"--tasks {task}: dataset {path}{'/' + name if name else ''} is not in the local datasets cache "
        f"{datasets.config.HF_DATASETS_CACHE} (eval text runs offline); on a machine with network run python -c "
        f"\"import datasets; datasets.load_dataset({args})\" and copy its HF_HOME (datasets/ and hub/) to "
        f"{constants.HF_HOME} here, or set HF_HOME / HF_DATASETS_CACHE to the copy")


def task_manager(manager_class: type, wanted: list[str], include_path: Optional[Path] = None):
    """A task index of lm-eval's (or lmms-eval's, same interface) ``TaskManager`` class: ``include_path``'s YAMLs
    alone when they hold every ``wanted`` task (indexing the harness's own thousands of task YAMLs takes ~15 s),
    else theirs with the harness's."""
    if include_path is not None and not Path(include_path).exists():
        raise FileNotFoundError(f"--include-path {include_path}: no such directory or file")
    if include_path is not None:
        manager = manager_class(include_path=str(include_path), include_defaults=False)
        if all(n in manager.task_index for n in wanted):
            return manager
    return manager_class(include_path=str(include_path) if include_path is not None else None)


def load_tasks(names: list[str], include_path: Optional[Path] = None) -> dict[str, Any]:
    """``{lm-eval task name: Task}`` with datasets loaded (offline); one-line errors for unknown tasks and missing
    datasets."""
    offline_datasets()
    from lm_eval.tasks import TaskManager

    manager = task_manager(TaskManager, [LM_EVAL_TASKS.get(n, n) for n in names], include_path)
    tasks = {}
    for short in names:
        name = LM_EVAL_TASKS.get(short, short)
        if name not in manager.task_index:
            raise UserError(f"--tasks {short}: not an lm-eval task{' (' + name + ')' if name != short else ''}; "
                            f"add its YAML with --include-path DIR")
        try:
            loaded = manager.load([name])["tasks"]
        except (ConnectionError, FileNotFoundError) as e:  # datasets' offline miss / local data_files missing
            raise _missing_dataset(short, *_dataset_of(manager, name), e) from e
        except Exception as e:  # datasets' DatasetNotFoundError & co.
            if type(e).__module__.startswith(("datasets", "huggingface_hub")):
                raise _missing_dataset(short, *_dataset_of(manager, name), e) from e
            raise
        tasks.update(loaded)
    return tasks


def task_metrics(results: dict, tasks: dict[str, Any]) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` of lm-eval's results (filter suffix dropped; stderrs and aliases left out)."""
    out = {}
    for name in tasks:
        r = results["results"][name]
        out[name] = {k.split(",")[0]: float(v) for k, v in r.items()
                     if "," in k and "_stderr" not in k and isinstance(v, (int, float))}
    return out


def task_responses(results: dict, tasks: dict[str, Any]) -> dict[str, dict[int, list]]:
    """``{task: {doc_id: [response per request]}}``: a float loglikelihood, or generated text."""
    out = {}
    for name in tasks:
        out[name] = {s["doc_id"]: [r[0] if isinstance(r, (tuple, list)) else r for r in s["filtered_resps"]]
                     for s in results["samples"][name]}
    return out


def headline(metrics: dict[str, dict[str, float]]) -> dict[str, float]:
    """One number per task for the table: acc_norm where reported (as the paper's HellaSwag/PIQA/SIQA), else acc."""
    inverse = {v: k for k, v in LM_EVAL_TASKS.items()}
    out = {}
    for name, m in metrics.items():
        key = next((k for k in ("acc_norm", "acc") if k in m), None)
        if key is not None:
            out[inverse.get(name, name)] = m[key]
    return out


def _response_gaps(ours: dict, base: dict) -> dict[str, tuple[float, int, int]]:
    """Per task: (largest |loglikelihood difference|, generated texts that differ, documents without a base match)."""
    out = {}
    for t, docs in ours["responses"].items():
        worst, texts, missing = 0.0, 0, 0
        for doc, resps in docs.items():
            other = base["responses"].get(t, {}).get(doc)
            if other is None or len(other) != len(resps):
                missing += 1
                continue
            for a, b in zip(resps, other):
                if isinstance(a, str) or isinstance(b, str):
                    texts += a != b
                else:
                    worst = max(worst, abs(float(a) - float(b)))
        out[t] = (worst, texts, missing)
    return out


def compare(ours: dict, base: dict) -> tuple[list[str], float]:
    """What differs between two :func:`_evaluate` results (any metric, exactly; any loglikelihood beyond
    :data:`LOGLIK_TOL`; any generated text), and the largest loglikelihood difference."""
    diffs = [f"{t} {k} {v:.6g} vs base {base['metrics'].get(t, {}).get(k, float('nan')):.6g}"
             for t, m in ours["metrics"].items() for k, v in m.items() if base["metrics"].get(t, {}).get(k) != v]
    gaps = _response_gaps(ours, base)
    for t, (worst, texts, missing) in gaps.items():
        if worst > LOGLIK_TOL:
            diffs.append(f"{t} loglikelihoods differ by up to {worst:.3g} (tolerance {LOGLIK_TOL:g})")
        if texts:
            diffs.append(f"{t} {texts} generated text(s) differ")
        if missing:
            diffs.append(f"{t} {missing} document(s) without a matching base response")
    return diffs, max((g[0] for g in gaps.values()), default=0.0)


def _evaluate(lm, tasks: dict[str, Any], args) -> dict[str, dict]:
    """``{"metrics": {task: {metric: value}}, "responses": {task: {doc_id: [...]}}}``."""
    import lm_eval

    results = lm_eval.simple_evaluate(model=lm, tasks=list(tasks.values()), num_fewshot=args.num_fewshot,
                                      limit=args.limit, log_samples=True, bootstrap_iters=0)
    return {"metrics": task_metrics(results, tasks), "responses": task_responses(results, tasks)}


def run_text(args) -> int:
    from lmfusion.evaluation import runtime
    from lmfusion.evaluation.report import merge_results

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("eval text runs in one process: start it without torchrun")
    if args.base is not None and args.base_hf is not None:
        raise UserError("--base and --base-hf: give one (the base to compare with)")
    if args.base_hf is not None and not (Path(args.base_hf) / "config.json").is_file():
        raise FileNotFoundError(f"--base-hf {args.base_hf}: no config.json (a Hugging Face model directory)")
    tasks = load_tasks(task_names(args.tasks), args.include_path)
    from lmfusion.evaluation.lm_adapter import LMFusionLM

    # text runs through the text weights only: the image set (EMA or raw) cannot change a score, so no note
    bundle = runtime.load_data_parallel(args.ckpt, args.device, weights=args.weights or "raw")
    text_ratio = bundle.meta.text_lr_ratio  # > 0: text trained in the run, differences are its drift
    ours = _evaluate(LMFusionLM(bundle, args.batch_size), tasks, args)
    base, base_name = None, None
    if args.base_hf is not None:
        from lm_eval.models.huggingface import HFLM

        ref = HFLM(pretrained=str(args.base_hf), batch_size=args.batch_size, device=args.device or "cpu",
                   add_bos_token=False, dtype="float32")  # fp32 as our side: LOGLIK_TOL assumes it
        base, base_name = _evaluate(ref, tasks, args), f"HF {args.base_hf}"
    elif args.base is not None or bundle.meta.kind == "training":
        base_dir = args.base if args.base is not None else bundle.meta.base_dir
        del bundle  # one model in memory at a time
        base = _evaluate(LMFusionLM(runtime.load_data_parallel(base_dir, args.device), args.batch_size), tasks, args)
        base_name = str(base_dir)
    diffs, max_diff = compare(ours, base) if base is not None else ([], None)
    for t, m in ours["metrics"].items():
        print(f"lmfusion eval text: {t}: " + ", ".join(f"{k} {v:.4f}" for k, v in m.items())
              + ("" if base is None else " | base: " + ", ".join(f"{k} {v:.4f}" for k, v in
                                                                base["metrics"][t].items())))
    if diffs and text_ratio > 0:
        print(f"lmfusion eval text: text trained in this run (optimizer.text_lr_ratio {text_ratio:g}); drift from "
              f"the base ({base_name}): " + "; ".join(diffs))
    elif diffs:
        print("lmfusion eval text: WARNING: text scores differ from the base model's (text is frozen): "
              + "; ".join(diffs))
    elif base is not None:
        print(f"lmfusion eval text: same as the base ({base_name}): every metric equal, loglikelihoods within "
              f"{LOGLIK_TOL:g}")
    base_metrics = None if base is None else base["metrics"]
    merge_results(args.out, "text", {"ours": headline(ours["metrics"]),
                                     "base": None if base is None else headline(base_metrics),
                                     "metrics": ours["metrics"], "base_metrics": base_metrics,
                                     "base_source": base_name, "max_loglik_diff": max_diff,
                                     "differences": diffs, "text_lr_ratio": text_ratio, "limit": args.limit,
                                     "num_fewshot": args.num_fewshot},
                  args.name)
    return 1 if diffs and text_ratio == 0 else 0
