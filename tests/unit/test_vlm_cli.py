"""The VLM command line: ``lmfusion chat --image IMG "question"`` / ``--raw TEXT`` and ``lmfusion caption`` answer
through a VLM base's own understanding path, ``lmfusion generate`` keeps drawing with the image modules.

Real components: a tiny random LLaVA-NeXT with its processor and a content-list chat template, converted with
``convert-hf`` (tests/fixtures_llava.py ``make_vlm_assets``), and a run trained on it for 2 steps through
the real launcher (``torchrun -m lmfusion.train``, 1 rank). Greedy tokens must equal HF
``LlavaNextForConditionalGeneration.generate`` on the processor's output for the same image and text, exactly, for
the base and for the trained run (its understanding path is the base's, bit for bit). fp32.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lmfusion.cli import main

REPO = Path(__file__).resolve().parents[2]
NEW = 8  # new tokens per answer
QUESTION = "w3 w9 w4"


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    """(assets, HF model, HF processor, run directory, image path)."""
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    from tests.fixtures_llava import make_vlm_assets

    root = tmp_path_factory.mktemp("vlm_cli")
    assets = make_vlm_assets(root)
    run = root / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                           "-m", "lmfusion.train", "--config", assets["config"],
                           f"init.base_checkpoint={assets['base']}", f"data.datasets=[{assets['shards']}]",
                           f"checkpoint.save={run}", "train.train_iters=2", "checkpoint.save_interval=2"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    image = root / "photo.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (70, 40, 3), dtype=np.uint8)).save(image)
    hf_model = LlavaNextForConditionalGeneration.from_pretrained(assets["hf"]).eval()
    return assets, hf_model, AutoProcessor.from_pretrained(assets["hf"]), run, image


def hf_chat_inputs(processor, image: Path, question: str):
    messages = [{"role": "user", "content": [{"type": "image", "image": Image.open(image).convert("RGB")},
                                             {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                         return_tensors="pt")


def hf_greedy(model, inputs, n: int = NEW, stops=None) -> list[int]:
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, do_sample=False, eos_token_id=stops, pad_token_id=0)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def printed(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 0
    return capsys.readouterr().out.strip()


def one_line_error(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("which", ["base", "run"])
def test_greedy_answer_tokens_equal_hf_generate(vlm, which):
    """The CLI's path (load_for_inference, the base's processor and chat template, generate_with_images) gives HF's
    greedy tokens, for the base and for the trained run."""
    from lmfusion.inference.image import read_rgb
    from lmfusion.inference.load import load_for_inference
    from lmfusion.inference.text import SamplingParams
    from lmfusion.inference.vlm import generate_with_images, load_processor, understanding_inputs

    assets, hf_model, processor, run, image = vlm
    bundle = load_for_inference(assets["base"] if which == "base" else run, device="cpu")
    assert bundle.meta.kind == ("base" if which == "base" else "training")
    inputs = understanding_inputs(load_processor(bundle.meta.base_dir), read_rgb(image), question=QUESTION)
    want_inputs = hf_chat_inputs(processor, image, QUESTION)
    assert torch.equal(inputs["input_ids"], want_inputs["input_ids"])
    assert int((inputs["input_ids"] == hf_model.config.image_token_index).sum()) > 1  # the image's features
    want = hf_greedy(hf_model, want_inputs)
    assert len(want) == NEW and len(set(want)) > 1
    got = generate_with_images(bundle.model, inputs["input_ids"][0], inputs["pixel_values"], inputs["image_sizes"],
                               SamplingParams(max_new_tokens=NEW))
    assert got == want


@pytest.mark.parametrize("which", ["base", "run"])
def test_chat_image_question_and_raw_print_hf_answers(vlm, which, capsys):
    """``chat --image IMG "question"`` prints the decoded HF answer (chat template, the model's eos ids as stops);
    ``--raw TEXT`` sends TEXT as it is with the image at its <image>."""
    assets, hf_model, processor, run, image = vlm
    ckpt = assets["base"] if which == "base" else str(run)
    eos = hf_model.config.text_config.eos_token_id
    common = ["--ckpt", ckpt, "--image", str(image), "--max-new-tokens", str(NEW)]
    want = hf_greedy(hf_model, hf_chat_inputs(processor, image, QUESTION), stops=eos)
    assert printed(capsys, ["chat", *common, QUESTION]) == processor.tokenizer.decode(want, skip_special_tokens=True)
    raw = "w5 <image> w6 w7"
    inputs = processor(images=Image.open(image).convert("RGB"), text=raw, return_tensors="pt")
    want = hf_greedy(hf_model, inputs, stops=eos)
    answer = printed(capsys, ["chat", *common, "--raw", raw])
    assert answer == processor.tokenizer.decode(want, skip_special_tokens=True)


def test_caption_takes_the_vlm_path_on_a_vlm_base(vlm, capsys):
    """``caption`` on a run over a VLM base answers lmms-eval's caption prompt through the understanding path (HF's
    tokens); ``--latent`` captions through the VAE latent and the image modules instead; ``--help`` says so."""
    from lmfusion.inference.vlm import CAPTION_QUESTION

    assets, hf_model, processor, run, image = vlm
    eos = hf_model.config.text_config.eos_token_id
    args = ["caption", "--ckpt", str(run), "--image", str(image), "--max-new-tokens", str(NEW)]
    want = hf_greedy(hf_model, hf_chat_inputs(processor, image, CAPTION_QUESTION), stops=eos)
    assert printed(capsys, args) == processor.tokenizer.decode(want, skip_special_tokens=True)
    want = hf_greedy(hf_model, hf_chat_inputs(processor, image, "w1 w2"), stops=eos)
    assert printed(capsys, [*args, "--question", "w1 w2"]) == processor.tokenizer.decode(want, skip_special_tokens=True)
    printed(capsys, [*args, "--latent"])  # the image modules' caption of the identity-VAE latent
    with pytest.raises(SystemExit):
        main(["caption", "--help"])
    assert "vision tower" in " ".join(capsys.readouterr().out.split())


def test_generate_draws_with_the_image_modules_not_the_vision_tower(vlm, tmp_path, capsys, monkeypatch):
    """``generate --prompt`` on a run over a VLM base draws through the image modules: the vision tower is never
    called (patched to fail) and the grid is written."""
    from lmfusion.model.vision import VisionPath

    _, _, _, run, _ = vlm

    def refuse(*args, **kwargs):
        raise AssertionError("the vision tower ran while drawing")

    monkeypatch.setattr(VisionPath, "forward", refuse)
    out = tmp_path / "grid.png"
    printed(capsys, ["generate", "--ckpt", str(run), "--prompt", "w1 w2", "--out", str(out), "--n", "2",
                     "--sampler", "ddim", "--steps", "2", "--seed", "0"])
    with Image.open(out) as png:
        assert png.format == "PNG" and png.width > 0


def test_bad_image_input_is_one_line(vlm, tmp_path, capsys):
    from transformers import LlamaForCausalLM

    from lmfusion import hf
    from tests.fixtures_llava import BOI, EOI, llava_config

    assets, _, _, run, image = vlm
    base = ["chat", "--ckpt", assets["base"]]
    assert "no such image" in one_line_error(capsys, [*base, "--image", str(tmp_path / "none.png"), QUESTION])
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not a picture")
    assert "not an image" in one_line_error(capsys, [*base, "--image", str(junk), QUESTION])
    assert "needs --image" in one_line_error(capsys, [*base, QUESTION])
    assert "one of them" in one_line_error(capsys, [*base, "--image", str(image)])
    assert "0 <image> markers" in one_line_error(capsys, [*base, "--image", str(image), "--raw", "w1 w2"])
    assert "no such image" in one_line_error(capsys, ["caption", "--ckpt", str(run), "--image",
                                                      str(tmp_path / "none.png")])
    LlamaForCausalLM(llava_config().text_config).save_pretrained(tmp_path / "hf", safe_serialization=True)
    text_base = hf.convert_hf(tmp_path / "hf", tmp_path / "text_base", boi=BOI, eoi=EOI)
    assert json.loads((text_base / hf.CONVERSION).read_text())["kind"] == "text"
    err = one_line_error(capsys, ["chat", "--ckpt", str(text_base), "--image", str(image), QUESTION])
    assert "no vision tower" in err


def test_raw_text_gets_one_bos(tmp_path):
    """``--raw`` text: the tokenizer's BOS is added as the processor adds it, but not a second time to text that
    starts with it (HF's processor apply_chat_template decides the same way)."""
    from tokenizers import processors
    from transformers import AutoProcessor

    from lmfusion.inference.vlm import understanding_inputs
    from tests.fixtures_llava import add_processor, llava_config

    processor = add_processor(tmp_path, llava_config())
    backend = processor.tokenizer.backend_tokenizer
    bos = processor.tokenizer.bos_token
    backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A",
                                                           special_tokens=[(bos, processor.tokenizer.bos_token_id)])
    processor.save_pretrained(tmp_path)
    processor = AutoProcessor.from_pretrained(tmp_path)
    image = Image.fromarray(np.zeros((40, 70, 3), dtype=np.uint8))
    ids = [understanding_inputs(processor, image, raw=text)["input_ids"][0].tolist()
           for text in ("w5 <image> w6", f"{bos} w5 <image> w6")]
    assert ids[0] == ids[1] and ids[0].count(processor.tokenizer.bos_token_id) == 1 and ids[0][0] == ids[1][0]
    assert ids[0][0] == processor.tokenizer.bos_token_id
