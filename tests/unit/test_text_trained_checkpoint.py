"""A run that trained its text (``optimizer.text_lr_ratio`` > 0, here with ``model.separation: shallow``): inference
loads its text set from the run (not the base), the export carries it, and ``eval text`` reports the drift from the
base instead of failing on it. The checkpoint is written as the trainer writes one (the model's sharded state dict,
the record with the model config and the ratio); its weights are the base's moved by a seeded pattern."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from lmfusion.model.weights import is_image_param

RATIO = 0.1


@pytest.fixture(scope="module")
def trained(runtime, tmp_path_factory):
    """(root, parameters by name) of root/run: a text-trained checkpoint on root/base."""
    from megatron.core import dist_checkpointing

    from lmfusion.inference.load import CHECKPOINT_JSON, LATEST, load_vae
    from lmfusion.model.builder import build_model
    from lmfusion.rundir import base_files, base_sha256
    from tests.fixtures import GEN_IMAGE, convert_tiny_llama, write_bpe_tokenizer

    root = tmp_path_factory.mktemp("text_trained")
    (root / "hf").mkdir()
    write_bpe_tokenizer(root / "hf")
    convert_tiny_llama(root, num_key_value_heads=2, tie_word_embeddings=False)
    _, cfg, weights = convert_tiny_llama.load(root, GEN_IMAGE)
    cfg = dataclasses.replace(cfg, separation="shallow")
    with weights:
        model = build_model(cfg, base=weights, train_text=True)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # stand-in for training: every parameter moves, text included
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    iter_dir = root / "run" / "iter_0000005"
    iter_dir.mkdir(parents=True)
    dist_checkpointing.save(model.sharded_state_dict(), str(iter_dir))
    record = {"base": "../../base", "model": cfg.to_dict(), "vae": load_vae("identity", None, "cpu").describe(),
              "base_conversion_sha256": base_sha256(root / "base"), "base_files": base_files(root / "base"),
              "text_lr_ratio": RATIO}
    (iter_dir / CHECKPOINT_JSON).write_text(json.dumps(record))
    (root / "run" / LATEST).write_text("5\n")
    return root, {n: p.detach().clone() for n, p in model.named_parameters()}


def _check_params(model, want) -> None:
    got = dict(model.named_parameters())
    assert set(got) == set(want)
    bad = [n for n in want if not torch.equal(got[n], want[n])]
    assert not bad, f"{len(bad)} parameters differ from the run's, e.g. {bad[:3]}"


def test_inference_loads_the_runs_text_not_the_base(trained):
    from lmfusion.inference.load import load_for_inference

    root, want = trained
    bundle = load_for_inference(root / "run", device="cpu")
    assert bundle.meta.text_lr_ratio == RATIO and bundle.config.separation == "shallow"
    _check_params(bundle.model, want)
    base = load_for_inference(root / "base", device="cpu")
    text = [n for n, _ in base.model.named_parameters() if not is_image_param(n)]
    moved = dict(bundle.model.named_parameters())
    assert text and all(not torch.equal(p, moved[n]) for n, p in base.model.named_parameters() if n in text)


def test_export_carries_the_text_set(trained, tmp_path):
    from lmfusion.inference.export import export_checkpoint
    from lmfusion.inference.load import load_for_inference

    root, want = trained
    out = export_checkpoint(root / "run" / "iter_0000005", tmp_path / "export")
    bundle = load_for_inference(out, device="cpu")
    assert bundle.meta.kind == "export" and bundle.meta.text_lr_ratio == RATIO
    _check_params(bundle.model, want)


def test_eval_text_reports_drift_for_trained_text(trained, tmp_path, capsys, monkeypatch):
    """Text scores differ from the base's (the text trained): reported as drift, exit 0, and the table says so."""
    import datasets

    from lmfusion.cli import main

    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", datasets.config.HF_HUB_OFFLINE)
    root, _ = trained
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    docs = [{"context": "a photo of", "choices": ["cat", "dog", "mat", "fox"], "label": i % 4} for i in range(4)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tasks / "drift_mc.yaml").write_text(
        f"task: drift_mc\ndataset_path: json\ndataset_kwargs:\n  cache_dir: {tmp_path / 'cache'}\n  data_files:\n"
        f"    test: {tmp_path / 'docs.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: '{{context}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    out = tmp_path / "out"
    assert main(["eval", "text", "--ckpt", str(root / "run"), "--tasks", "drift_mc", "--include-path", str(tasks),
                 "--out", str(out), "--device", "cpu", "--batch-size", "4"]) == 0
    text = json.loads((out / "results.json").read_text())["text"]
    assert text["text_lr_ratio"] == RATIO and text["differences"]  # the loglikelihoods moved with the text
    assert "drift from the base" in capsys.readouterr().out
    table = (out / "table1.md").read_text()
    assert "drift from the base" in table and "Base (frozen text)" not in table


def test_hf_export_holds_the_trained_text(trained, tmp_path):
    """``export-ckpt --hf``: the Hugging Face Llama written from the run gives our model's text logits (the trained
    text, not the base's; fp32, 1e-4 as the HF parity tests)."""
    from lmfusion.cli import main
    from lmfusion.inference.load import load_for_inference
    from lmfusion.model.model import ModelInputs
    from tests.fixtures import hf_logits

    root, _ = trained
    out = tmp_path / "hf"
    assert main(["export-ckpt", str(root / "run"), "--output", str(out), "--hf"]) == 0
    bundle = load_for_inference(root / "run", device="cpu")
    tokens = torch.randint(0, bundle.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = bundle.model(ModelInputs(tokens=tokens, document_ids=torch.zeros_like(tokens))).logits
    ours = ours.transpose(0, 1)[..., : bundle.config.vocab_size]  # (s, b, V) -> (b, s, V)
    theirs = hf_logits(out, tokens)
    assert (ours - theirs).abs().max().item() < 1e-4
    assert (ours - hf_logits(root / "hf", tokens)).abs().max().item() > 1e-2  # the base's text differs
