"""LLaVA-NeXT import/export (lmfusion.hf.llava through `lmfusion convert-hf` / `export-hf`).

Real components: a random tiny ``transformers.LlavaNextForConditionalGeneration`` (CLIP tower, Llama LM, 2 grid
pinpoints) saved with ``save_pretrained(safe_serialization=True)``, its ``LlavaNextProcessor`` (PIL image processor,
tiny WordLevel tokenizer, chat template). Sizes come from the configs below. Tolerance: exact everywhere (max abs
diff 0): conversion only renames, concatenates and splits, so tensors, configs and logits must be identical.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM, LlavaNextConfig, LlavaNextForConditionalGeneration

from lmfusion import hf
from lmfusion.cli import main
from lmfusion.hf import llava
from tests.fixtures_llava import BOI, EOI, IMAGE_TOKEN, TILE, VOCAB, add_processor, llava_config, make_llava

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(HF model, HF dir, converted base dir)."""
    root = tmp_path_factory.mktemp("llava")
    config = llava_config()
    model = make_llava(config)
    model.save_pretrained(root / "hf", safe_serialization=True)
    add_processor(root / "hf", config)
    return model, root / "hf", hf.convert_hf(root / "hf", root / "base")


def logits(model: LlavaNextForConditionalGeneration, hf_dir: Path) -> torch.Tensor:
    """Logits for an image + question through the saved processor (an image whose anyres tiling is 2x1)."""
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(hf_dir)
    pixels = np.random.default_rng(0).integers(0, 256, (70, 40, 3), dtype=np.uint8)
    inputs = processor(images=Image.fromarray(pixels), text="<image> w1 w2", return_tensors="pt")
    with torch.no_grad():
        return model(**inputs).logits


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


# ---------------------------------------------------------------------------------------------------- layout
def test_vlm_base_layout(tiny):
    model, hf_dir, base = tiny
    record = json.loads((base / hf.CONVERSION).read_text())
    assert record["kind"] == "vlm" and llava.base_kind(base) == "vlm"
    assert record["image_token_id"] == IMAGE_TOKEN
    assert record["boi_eoi_source"] == {"boi": f"tokenizer {hf.BOI_TOKEN}", "eoi": f"tokenizer {hf.EOI_TOKEN}"}
    assert sorted(record["processor_files"]) == sorted(p.name for p in hf_dir.iterdir()
                                                       if p.name in llava.PROCESSOR_FILES)
    for name in record["processor_files"]:
        assert (base / name).read_bytes() == (hf_dir / name).read_bytes(), name
    assert json.loads((base / llava.VLM_CONFIG).read_text()) == json.loads((hf_dir / "config.json").read_text())
    # the text base contract is unchanged: load_base_state sees exactly the LM's tensors
    cfg, weights = hf.load_base_state(base)
    with weights:
        assert len(weights) == len(hf.base_shapes(cfg))
    vlm_config, vision = llava.load_vision_state(base)
    with vision:
        hf_names = {k for k in model.state_dict() if "language_model" not in k and k != "lm_head.weight"}
        assert len(vision) == len(hf_names) == len(llava.vision_shapes(vlm_config))
        ours = model.model
        assert torch.equal(vision.get("image_newline"), ours.image_newline)
        assert torch.equal(vision.get("multi_modal_projector.linear_1.weight"),
                           ours.multi_modal_projector.linear_1.weight)
        assert torch.equal(vision.get("vision_tower.encoder.layers.1.self_attn.q_proj.bias"),
                           ours.vision_tower.encoder.layers[1].self_attn.q_proj.bias)


def test_text_base_kind(tmp_path):
    lm = LlamaForCausalLM(llava_config().text_config)
    lm.save_pretrained(tmp_path / "hf", safe_serialization=True)
    base = hf.convert_hf(tmp_path / "hf", tmp_path / "base", boi=BOI, eoi=EOI)
    assert json.loads((base / hf.CONVERSION).read_text())["kind"] == "text" and llava.base_kind(base) == "text"
    with pytest.raises(ValueError, match="kind is 'text'"):
        llava.load_vision_state(base)


def test_language_model_equals_text_only_conversion(tiny, tmp_path):
    """The LM tensors of a VLM base are those a text-only conversion of the same Llama writes, bit for bit."""
    model, _, base = tiny
    lm = LlamaForCausalLM(model.config.text_config).eval()
    lm.model.load_state_dict(model.model.language_model.state_dict())
    lm.lm_head.load_state_dict(model.lm_head.state_dict())
    lm.save_pretrained(tmp_path / "lm", safe_serialization=True)
    text_base = hf.convert_hf(tmp_path / "lm", tmp_path / "text_base", boi=BOI, eoi=EOI)
    ours, theirs = load_file(base / hf.SINGLE_FILE), load_file(text_base / hf.SINGLE_FILE)
    assert sorted(ours) == sorted(theirs)
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    assert (base / hf.BASE_CONFIG).read_text() == (text_base / hf.BASE_CONFIG).read_text()


# ---------------------------------------------------------------------------------------------------- round trips
def test_export_round_trip_is_exact(tiny, tmp_path, capsys):
    model, hf_dir, base = tiny
    assert main(["export-hf", "--ckpt", str(base), "--output", str(tmp_path / "out")]) == 0
    out = tmp_path / "out"
    source, exported = tensors(hf_dir), tensors(out)
    assert sorted(exported) == sorted(source)
    for name in source:
        assert exported[name].dtype == source[name].dtype and torch.equal(exported[name], source[name]), name
    assert json.loads((out / "config.json").read_text()) == json.loads((hf_dir / "config.json").read_text())
    assert LlavaNextConfig.from_pretrained(out).to_dict() == LlavaNextConfig.from_pretrained(hf_dir).to_dict()
    for name in llava.PROCESSOR_FILES + hf.TOKENIZER_FILES:
        assert (out / name).is_file() == (hf_dir / name).is_file(), name
        if (hf_dir / name).is_file():
            assert (out / name).read_bytes() == (hf_dir / name).read_bytes(), name
    reloaded = LlavaNextForConditionalGeneration.from_pretrained(out).eval()
    assert torch.equal(logits(reloaded, out), logits(model, hf_dir))


def test_hub_key_layout_round_trips(tiny, tmp_path):
    """A llava-hf hub checkpoint (``vision_tower.vision_model.*``) converts, and exports back under its own names."""
    model, hf_dir, _ = tiny
    src = tmp_path / "hub"
    src.mkdir()
    for name in ("config.json", *[p.name for p in hf_dir.iterdir() if p.suffix in (".json", ".jinja")]):
        (src / name).write_bytes((hf_dir / name).read_bytes())
    hub = {k.replace("vision_tower.", "vision_tower.vision_model.", 1): t for k, t in tensors(hf_dir).items()}
    save_file(hub, str(src / "model.safetensors"), metadata={"format": "pt"})
    base = hf.convert_hf(src, tmp_path / "base")
    assert json.loads((base / hf.CONVERSION).read_text())["hf_key_prefixes"]["vision_tower"] == \
        "vision_tower.vision_model."
    exported = tensors(hf.export_hf(base, tmp_path / "out"))
    assert sorted(exported) == sorted(hub)
    assert all(torch.equal(exported[k], hub[k]) for k in hub)
    reloaded = LlavaNextForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    assert torch.equal(logits(reloaded, tmp_path / "out"), logits(model, hf_dir))


def test_bf16_export(tiny, tmp_path):
    model, hf_dir, base = tiny
    out = hf.export_hf(base, tmp_path / "out", dtype="bf16")
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    assert config == dict(json.loads((hf_dir / "config.json").read_text()), dtype="bfloat16")
    assert all(t.dtype == torch.bfloat16 for t in tensors(out).values())
    reference = {k: t.to(torch.bfloat16) for k, t in tensors(hf_dir).items()}
    assert all(torch.equal(t, reference[k]) for k, t in tensors(out).items())


# ---------------------------------------------------------------------------------------------------- bad input
def run_cli_error(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    return err


def convert_argv(hf_dir: Path, output: Path) -> list[str]:
    return ["convert-hf", "--hf-dir", str(hf_dir), "--output", str(output)]


def edited_copy(hf_dir: Path, dst: Path, edit=None) -> Path:
    dst.mkdir()
    for p in hf_dir.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    if edit is not None:
        config = json.loads((dst / "config.json").read_text())
        edit(config)
        (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_pickled_checkpoint_refused(tiny, tmp_path, capsys):
    model, hf_dir, _ = tiny
    src = tmp_path / "pickled"
    src.mkdir()
    (src / "config.json").write_bytes((hf_dir / "config.json").read_bytes())
    torch.save(model.state_dict(), src / "pytorch_model.bin")
    err = run_cli_error(capsys, convert_argv(src, tmp_path / "base"))
    assert "pytorch_model.bin" in err and "safetensors" in err
    assert not (tmp_path / "base").exists()


@pytest.mark.parametrize("field, edit, expected", [
    ("text_config.model_type", lambda c: c["text_config"].update(model_type="mistral"), "'mistral'"),
    ("vision_config.model_type", lambda c: c["vision_config"].update(model_type="siglip_vision_model"),
     "'siglip_vision_model'"),
    ("projector_hidden_act", lambda c: c.update(projector_hidden_act="relu"), "'relu'"),
    ("image_grid_pinpoints", lambda c: c.update(image_grid_pinpoints=[[TILE, TILE + 1]]), "multiple"),
    ("vision_feature_layer", lambda c: c.update(vision_feature_layer=7), "7"),
    ("vision_feature_select_strategy", lambda c: c.update(vision_feature_select_strategy="cls"), "'cls'"),
    ("image_token_index", lambda c: c.update(image_token_index=VOCAB), str(VOCAB)),
    ("text_config.hidden_act", lambda c: c["text_config"].update(hidden_act="gelu"), "'gelu'"),
])
def test_bad_config_names_the_field(tiny, tmp_path, capsys, field, edit, expected):
    _, hf_dir, _ = tiny
    src = edited_copy(hf_dir, tmp_path / "src", edit)
    err = run_cli_error(capsys, convert_argv(src, tmp_path / "base"))
    assert field.split(".")[-1] in err and field.split(".")[0] in err and expected in err, err
    assert not (tmp_path / "base").exists()


def test_bad_weights_name_the_tensor(tiny, tmp_path, capsys):
    _, hf_dir, _ = tiny
    state = tensors(hf_dir)
    src = edited_copy(hf_dir, tmp_path / "missing")
    name = "multi_modal_projector.linear_2.weight"
    save_file({k: t for k, t in state.items() if k != name}, str(src / "model.safetensors"))
    assert name in run_cli_error(capsys, convert_argv(src, tmp_path / "b1"))
    src = edited_copy(hf_dir, tmp_path / "mixed")  # one vision tensor under the hub layout, the rest not
    key = "vision_tower.post_layernorm.weight"
    save_file({(k.replace("vision_tower.", "vision_tower.vision_model.") if k == key else k): t
               for k, t in state.items()}, str(src / "model.safetensors"))
    assert "mix key layouts" in run_cli_error(capsys, convert_argv(src, tmp_path / "b2"))


def test_sharded_base_and_bf16_conversion(tiny, tmp_path, capsys):
    """Small shards (LM and vision files both split, with their indexes) and a bf16 conversion: the export equals the
    source cast to bf16, tensor for tensor, and loads in transformers."""
    model, hf_dir, _ = tiny
    base = tmp_path / "base"
    assert main(["convert-hf", "--hf-dir", str(hf_dir), "--output", str(base), "--dtype", "bf16",
                 "--max-shard-size", "20KB"]) == 0
    record = json.loads((base / hf.CONVERSION).read_text())
    assert len(record["weight_files"]) > 1 and len(record["vision_weight_files"]) > 1
    assert (base / hf.INDEX_FILE).is_file() and (base / f"{llava.VISION_NAME}.safetensors.index.json").is_file()
    assert record["dtype"] == "bfloat16"
    out = hf.export_hf(base, tmp_path / "out")
    exported, source = tensors(out), tensors(hf_dir)
    assert sorted(exported) == sorted(source)
    assert all(torch.equal(exported[k], source[k].to(torch.bfloat16)) for k in source)
    assert json.loads((out / "config.json").read_text()) == dict(json.loads((hf_dir / "config.json").read_text()),
                                                                 dtype="bfloat16")
    LlavaNextForConditionalGeneration.from_pretrained(out)


def test_sparse_hub_text_config(tiny, tmp_path):
    """Hub LLaVA configs leave Llama defaults out of text_config (transformers fills them): the conversion reads them
    as transformers does, and the export gives back the sparse config as it was."""
    model, hf_dir, _ = tiny
    assert model.config.text_config.bos_token_id == LlamaConfig().bos_token_id  # the default, so it may be omitted
    src = edited_copy(hf_dir, tmp_path / "sparse", lambda c: c["text_config"].pop("bos_token_id"))
    base = hf.convert_hf(src, tmp_path / "base")
    assert json.loads((base / hf.BASE_CONFIG).read_text())["bos_token_id"] == LlamaConfig().bos_token_id
    out = hf.export_hf(base, tmp_path / "out")
    assert json.loads((out / "config.json").read_text()) == json.loads((src / "config.json").read_text())
