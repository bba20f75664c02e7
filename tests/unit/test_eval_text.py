"""``lmfusion eval text`` end to end through the CLI on a small local lm-eval task (a task YAML over a JSONL file
written here, ``dataset_path: json``; nothing downloaded), on the ckpts fixture's tiny training checkpoint.

* The checkpoint's scores sit beside its base's and are identical (text is frozen): exit 0, no differences; the
  accuracy equals the one recomputed from the adapter's own loglikelihoods (argmax over choices, by hand).
* ``--base-hf`` another model (a differently seeded tiny Llama, through lm-eval's own HF adapter): differences are
  flagged, exit 1 (tiny random models often pick the same choices, so the per-request loglikelihoods are what
  differs; LOGLIK_TOL is stated in lmfusion.evaluation.text). That the HF adapter and ours agree on the same model
  is tests/unit/test_eval_lm_adapter.py.
* Missing datasets and dataset files are one-line errors before any model loads."""

from __future__ import annotations

import json
import random

import pytest


from lmfusion.cli import main  # noqa: E402
from lmfusion.evaluation.text import LOGLIK_TOL  # noqa: E402
from tests.fixtures import GEN_PROMPTS as PROMPTS  # noqa: E402

TASK = "lmfusion_tiny_mc"
N_DOCS = 16
WORDS = "a photo of cat sitting on mat drawing red shoe quick brown fox jumps over lazy dog".split() + PROMPTS[:1]


def _write_task(root, data_file, dataset_path="json", name=TASK):
    """A multiple-choice task (4 choices) in lm-eval's YAML format over a local JSONL file."""
    root.mkdir(parents=True, exist_ok=True)
    kwargs = (f"dataset_kwargs:\n  cache_dir: {root / 'datasets_cache'}\n  data_files:\n    test: {data_file}\n"
              if dataset_path == "json" else "")
    (root / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: {dataset_path}\n{kwargs}test_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: '{{context}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n")
    return root


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval_task")
    rng = random.Random(0)
    docs = []
    for _ in range(N_DOCS):
        ctx = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))
        choices = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3))) for _ in range(4)]
        docs.append({"context": ctx, "choices": choices, "label": rng.randrange(4)})
    (root / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    return _write_task(root / "tasks", root / "docs.jsonl"), docs


@pytest.fixture(autouse=True)
def _restore_offline_flag(monkeypatch):
    """eval text switches datasets offline for its process; keep that from leaking into other tests."""
    import datasets

    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", datasets.config.HF_HUB_OFFLINE)


def _eval_text(ckpt, task_dir, out, *extra):
    return main(["eval", "text", "--ckpt", str(ckpt), "--tasks", TASK, "--include-path", str(task_dir), "--out",
                 str(out), "--device", "cpu", "--batch-size", "4", *extra])


def _by_hand_accuracy(ckpt, docs) -> float:
    """acc from the adapter's loglikelihoods of context + choice (lm-eval's target delimiter is ' ')."""
    from lm_eval.api.instance import Instance

    from lmfusion.evaluation.lm_adapter import LMFusionLM
    from lmfusion.inference.load import load_for_inference

    lm = LMFusionLM(load_for_inference(ckpt, device="cpu"), batch_size=4)
    correct = 0
    for d in docs:
        reqs = [Instance("loglikelihood", d, (d["context"], " " + c), i) for i, c in enumerate(d["choices"])]
        scores = [s for s, _ in lm.loglikelihood(reqs)]
        correct += int(max(range(4), key=scores.__getitem__) == d["label"])
    return correct / len(docs)


def test_eval_text_training_checkpoint_beside_its_base(ckpts, task, tmp_path, capsys):
    root, _ = ckpts
    task_dir, docs = task
    out = tmp_path / "out"
    assert _eval_text(root / "run", task_dir, out) == 0
    text = json.loads((out / "results.json").read_text())["text"]
    assert text["differences"] == [] and text["metrics"] == text["base_metrics"]
    assert text["max_loglik_diff"] == 0.0  # same weights, same code: bit for bit
    assert text["base_source"] == str((root / "base").resolve())
    metrics = text["metrics"][TASK]
    assert set(metrics) == {"acc", "acc_norm"}
    assert metrics["acc"] == pytest.approx(_by_hand_accuracy(root / "run", docs), abs=1e-12)
    assert "same as the base" in capsys.readouterr().out
    table = (out / "table1.md").read_text()
    assert TASK in table and "Base (frozen text)" in table and "differ" not in table


def test_eval_text_flags_a_different_base(ckpts, task, tmp_path, capsys):
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    root, _ = ckpts
    other = tmp_path / "other_hf"  # the source model's architecture and tokenizer, other random weights
    torch.manual_seed(5)
    LlamaForCausalLM(LlamaConfig.from_pretrained(root / "hf")).save_pretrained(other, safe_serialization=True)
    for f in (root / "hf").glob("*token*"):
        shutil.copy(f, other / f.name)
    out = tmp_path / "out"
    assert _eval_text(root / "run", task[0], out, "--base-hf", str(other)) == 1
    text = json.loads((out / "results.json").read_text())["text"]
    assert text["base_source"] == f"HF {other}"
    assert text["max_loglik_diff"] > LOGLIK_TOL
    assert any("loglikelihoods differ by up to" in d for d in text["differences"])
    assert "WARNING: text scores differ" in capsys.readouterr().out
    assert "Text scores differ from the base model's" in (out / "table1.md").read_text()


def test_missing_datasets_are_one_line_errors(ckpts, tmp_path, capsys):
    root, _ = ckpts
    hub = _write_task(tmp_path / "hub", None, dataset_path="lmfusion-test/absent-dataset", name="absent_hub")
    assert main(["eval", "text", "--ckpt", str(root / "run"), "--tasks", "absent_hub", "--include-path", str(hub),
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "lmfusion-test/absent-dataset is not in the local datasets cache" in err
    assert "datasets.load_dataset('lmfusion-test/absent-dataset')" in err and "HF_HOME" in err

    local = _write_task(tmp_path / "local", tmp_path / "absent.jsonl")
    assert _eval_text(root / "run", local, tmp_path / "o") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--tasks {TASK}: its dataset files cannot be read" in err

    assert not (tmp_path / "o" / "results.json").exists()
