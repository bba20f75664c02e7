"""lmms-eval adapter (lmfusion.evaluation.lmms_adapter) and ``lmfusion eval lmms`` on a tiny random LLaVA-NeXT base.

Real components: a random ``LlavaNextForConditionalGeneration`` and its processor (tests/unit/test_hf_llava.py) with a
chat template of LLaVA-NeXT's shape (a user turn whose content lists images, then text), ``convert-hf``; lmms-eval's own
``Instance``, ``TaskManager``, a task YAML (written here over a JSONL file of PNG paths, ``dataset_path: json``:
nothing downloaded) and ``simple_evaluate``.

* Adapter vs Hugging Face, on lmms-eval ``Instance`` requests: loglikelihood (image + question, continuation) gives
  the sum of log-probs HF's model gives on the same processor output (1e-4, fp32; summation order differs, as
  tests/unit/test_vlm_model.py) and the same greedy flag; generate_until gives HF ``generate``'s greedy text.
* ``eval lmms`` on a training checkpoint (image set perturbed, standing in for training) beside its base: every
  metric and generated text identical, exit 0; exact_match is the 1/2 built in (even documents' answers are HF's own
  greedy answers). Against another VLM base (other random weights): generated texts differ, flagged, exit 1.
* The end-to-end task is generate_until: lmms-eval 0.7.3's evaluator turns every loglikelihood response (a
  ``(float, bool)`` tuple) into a string (``unwrap_generation_output``), so its multiple_choice / loglikelihood tasks
  fail for every model; the adapter's loglikelihood is checked on requests directly (first test).
* Errors: a missing local data file and a text-only base are one-line errors.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lmfusion import hf
from lmfusion.cli import main
from tests.fixtures_llava import VOCAB, add_processor, llava_config, make_llava

# LLaVA-NeXT's template shape (llama3-llava-next-8b-hf): header, images first, then text, then the assistant header;
# the words are the tiny tokenizer's (w0 ... w293).
TEMPLATE = ("{% for m in messages %}w1 {% for c in m['content'] %}{% if c['type'] == 'image' %}<image> {% endif %}"
            "{% endfor %}{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
            " w2 {% endfor %}{% if add_generation_prompt %}w3{% endif %}")
SIZES = [(70, 40), (40, 70), (70, 20), (20, 30), (30, 30), (56, 28)]
CHOICES = ["w10", "w11 w12", "w13", "w14 w15 w16"]
VQA = "lmfusion_tiny_image_vqa"
MAX_NEW, UNTIL = 3, "w1 "  # a stop string the tiny model may emit (the turn header)


def _base(root, seed):
    config = llava_config()
    make_llava(config, seed=seed).save_pretrained(root / "hf", safe_serialization=True)
    processor = add_processor(root / "hf", config)
    processor.chat_template = TEMPLATE
    processor.save_pretrained(root / "hf")
    return hf.convert_hf(root / "hf", root / "base")


def _training_checkpoint(base, run):
    """A training checkpoint on ``base`` whose image set moved (what training changes)."""
    import dataclasses

    from megatron.core import dist_checkpointing

    from lmfusion.model.builder import build_model
    from lmfusion.rundir import CHECKPOINT_JSON, LATEST, base_files, base_sha256
    from tests.fixtures import GEN_IMAGE, perturb_image_set

    cfg, weights = hf.load_base_state(base)
    cfg = dataclasses.replace(cfg, image=GEN_IMAGE, attention_backend="sdpa", linear_backend="local")
    with weights:
        model = build_model(cfg, base=weights)
    perturb_image_set(model, seed=13)
    iter_dir = run / "iter_0000002"
    iter_dir.mkdir(parents=True)
    dist_checkpointing.save(model.sharded_state_dict(), str(iter_dir))
    (iter_dir / CHECKPOINT_JSON).write_text(json.dumps({
        "base": str(base), "model": cfg.to_dict(), "vae": {"kind": "identity"},
        "base_conversion_sha256": base_sha256(base), "base_files": base_files(base)}))
    (run / LATEST).write_text("2\n")
    return run


@pytest.fixture(scope="module")
def vlm(runtime, tmp_path_factory):
    """root/base (a VLM base), root/run (a training checkpoint on it), root/other/base (other weights), root/tasks."""
    from PIL import Image

    root = tmp_path_factory.mktemp("lmms")
    base = _base(root, seed=3)
    _training_checkpoint(base, root / "run")
    (root / "other").mkdir()
    _base(root / "other", seed=4)
    model, processor = _hf(root)
    docs = []
    for i, size in enumerate(SIZES):
        path = root / f"img{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
        doc = {"image": str(path), "question": f"w{20 + i} w{30 + i}"}
        # even documents: HF's own greedy answer (so exact_match is 1/2 for the base, not a trivial 0)
        doc["answer"] = _hf_generate(model, processor, doc, MAX_NEW).split(UNTIL)[0].strip() if i % 2 == 0 else "w99"
        docs.append(doc)
    tasks = root / "tasks"
    tasks.mkdir()
    (root / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tasks / "utils.py").write_text("from PIL import Image\n\n\ndef doc_to_visual(doc):\n"
                                    "    return [Image.open(doc['image']).convert('RGB')]\n")
    data = (f"dataset_path: json\ndataset_kwargs:\n  cache_dir: {root / 'datasets_cache'}\n  data_files:\n"
            f"    test: {root / 'docs.jsonl'}\ntest_split: test\ndoc_to_visual: !function utils.doc_to_visual\n"
            "doc_to_text: '{{question}}'\n")
    (tasks / f"{VQA}.yaml").write_text(
        f"task: {VQA}\n{data}output_type: generate_until\ndoc_to_target: answer\n"
        f"generation_kwargs:\n  max_new_tokens: {MAX_NEW}\n  until: ['{UNTIL}']\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")
    return root, docs


@pytest.fixture(autouse=True)
def _restore_offline_flag(monkeypatch):
    """eval lmms switches datasets offline for its process; keep that from leaking into other tests."""
    import datasets

    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", datasets.config.HF_HUB_OFFLINE)


def _adapter(ckpt):
    from lmfusion.evaluation.lmms_adapter import LMFusionLMMS, load_processor
    from lmfusion.inference.load import load_for_inference

    bundle = load_for_inference(ckpt, device="cpu")
    return LMFusionLMMS(bundle, load_processor(bundle.meta.base_dir))


def _hf(root):
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    model = LlavaNextForConditionalGeneration.from_pretrained(root / "hf", torch_dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(root / "hf")


def _hf_inputs(processor, doc) -> dict:
    from PIL import Image

    content = [{"type": "image"}, {"type": "text", "text": doc["question"]}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    return processor(images=Image.open(doc["image"]).convert("RGB"), text=text, return_tensors="pt")


def _hf_generate(model, processor, doc, n: int) -> str:
    enc = _hf_inputs(processor, doc)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return processor.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def _hf_loglikelihood(model, processor, doc, continuation: str) -> tuple[float, bool]:
    enc = _hf_inputs(processor, doc)
    cont = processor.tokenizer.encode(continuation, add_special_tokens=False)
    ids = torch.cat([enc["input_ids"], torch.tensor([cont])], dim=1)
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=enc["pixel_values"], image_sizes=enc["image_sizes"]).logits
    logp = torch.log_softmax(logits[0, -len(cont) - 1:-1, :VOCAB].float(), dim=-1)
    target = torch.tensor(cont)
    return float(logp.gather(-1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())


def _requests(kind, docs, second):
    from lmms_eval.api.instance import Instance

    def doc_to_visual(doc):
        from PIL import Image

        return [Image.open(doc["image"])]

    return [Instance(request_type=kind, arguments=(d["question"], second(d), doc_to_visual, i, "t", "test"), idx=0,
                     metadata={"task": "t", "doc_id": i, "repeats": 1}) for i, d in enumerate(docs)]


def test_adapter_matches_hf(vlm):
    root, docs = vlm
    ours = _adapter(root / "base")
    ours.task_dict = {"t": {"test": docs}}
    model, processor = _hf(root)
    got = ours.loglikelihood(_requests("loglikelihood", docs, lambda d: " " + CHOICES[1]))
    for (g, g_greedy), d in zip(got, docs):
        w, w_greedy = _hf_loglikelihood(model, processor, d, " " + CHOICES[1])
        assert g == pytest.approx(w, abs=1e-4) and g_greedy == w_greedy
    gen = ours.generate_until(_requests("generate_until", docs[:2], lambda d: {"max_new_tokens": 5}))
    for text, d in zip(gen, docs[:2]):
        assert text.strip() and text == _hf_generate(model, processor, d, 5)


def _eval_lmms(ckpt, root, out, *extra):
    return main(["eval", "lmms", "--ckpt", str(ckpt), "--tasks", VQA, "--include-path", str(root / "tasks"),
                 "--out", str(out), "--device", "cpu", *extra])


def test_eval_lmms_training_checkpoint_beside_its_base(vlm, tmp_path, capsys):
    root, docs = vlm
    out = tmp_path / "out"
    assert _eval_lmms(root / "run", root, out) == 0
    r = json.loads((out / "results.json").read_text())["lmms"]
    assert r["differences"] == [] and r["metrics"] == r["base_metrics"]
    assert r["base_source"] == str((root / "base").resolve())
    assert r["metrics"] == {VQA: {"exact_match": sum(i % 2 == 0 for i in range(len(docs))) / len(docs)}}
    assert "same as the base" in capsys.readouterr().out
    table = (out / "table1.md").read_text()
    assert f"{VQA} exact_match" in table and "Base (frozen VLM)" in table and "differ" not in table


def test_eval_lmms_flags_a_different_base(vlm, tmp_path, capsys):
    root, _ = vlm
    out = tmp_path / "out"
    assert _eval_lmms(root / "run", root, out, "--base", str(root / "other" / "base")) == 1
    r = json.loads((out / "results.json").read_text())["lmms"]
    assert any(d.startswith(f"{VQA} ") and "generated text(s) differ" in d for d in r["differences"])
    assert "WARNING: understanding scores differ" in capsys.readouterr().out
    assert "Understanding scores differ from the base model's" in (out / "table1.md").read_text()


def test_text_base_and_missing_data_are_one_line_errors(vlm, ckpts, tmp_path, capsys):
    root, _ = vlm
    (tmp_path / "tasks").mkdir()
    yaml = (root / "tasks" / f"{VQA}.yaml").read_text()
    yaml = yaml.replace(str(root / "docs.jsonl"), str(tmp_path / "absent.jsonl"))
    (tmp_path / "tasks" / f"{VQA}.yaml").write_text(yaml)
    (tmp_path / "tasks" / "utils.py").write_text((root / "tasks" / "utils.py").read_text())
    assert main(["eval", "lmms", "--ckpt", str(root / "run"), "--tasks", VQA, "--include-path", str(tmp_path / "tasks"),
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--tasks {VQA}: dataset json cannot be read offline" in err
    assert main(["eval", "lmms", "--ckpt", str(ckpts[0] / "base"), "--tasks", VQA, "--include-path",
                 str(root / "tasks"), "--out", str(tmp_path / "o")]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after datasets' progress lines: tasks load first
    assert last.startswith("lmfusion eval: error: ") and "has no vision path (a text-only base)" in last
    assert not (tmp_path / "o" / "results.json").exists()


def test_registered_and_built_from_model_args(vlm):
    """lmms-eval's ``--model lmfusion --model_args ckpt=...`` route: the registry entry and create_from_arg_string."""
    from lmms_eval.api.registry import MODEL_REGISTRY

    from lmfusion.evaluation.lmms_adapter import LMFusionLMMS

    root, docs = vlm
    assert MODEL_REGISTRY["lmfusion"] is LMFusionLMMS
    lm = LMFusionLMMS.create_from_arg_string(f"ckpt={root / 'run'},device=cpu,chat_template=false")
    assert lm.bundle.meta.kind == "training" and lm.chat_template is None
    assert lm.prompt(docs[0]["question"], 1) == f"<image>\n{docs[0]['question']}"  # llava_hf's raw convention
    with pytest.raises(Exception, match="expected ckpt=DIR"):
        LMFusionLMMS.create_from_arg_string("device=cpu")


def test_missing_lmms_eval_is_a_one_line_error(monkeypatch, tmp_path, capsys):
    """Without lmms-eval the command stops before loading anything, saying how to install it without its CUDA deps."""
    import sys

    for name in [m for m in sys.modules if m == "lmms_eval" or m.startswith("lmms_eval.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "lmms_eval", None)  # what an absent package gives: ImportError
    monkeypatch.delitem(sys.modules, "lmfusion.evaluation.lmms_adapter", raising=False)
    assert main(["eval", "lmms", "--ckpt", str(tmp_path), "--tasks", VQA, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs lmms-eval" in err and "--no-deps lmms-eval==0.7.3" in err


def test_a_group_loads_its_tasks(vlm, tmp_path):
    """``--tasks GROUP`` (lmms-eval group YAML, as ``mmbench``) evaluates the group's tasks."""
    from lmfusion.evaluation.understanding import load_lmms_tasks

    root, _ = vlm
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for f in (root / "tasks").iterdir():
        if f.is_file():
            (tasks / f.name).write_text(f.read_text())
    (tasks / "group.yaml").write_text(f"group: lmfusion_tiny_group\ntask:\n  - {VQA}\n")
    loaded = load_lmms_tasks(["lmfusion_tiny_group"], tasks)
    assert list(loaded) == [VQA] and loaded[VQA].config.task == VQA
