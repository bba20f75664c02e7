"""build_shards / inspect_shards on tiny generated images and tiny random VAEs (saved and loaded back by path).

Every expectation is derived from what the test generated: which inputs are good, why each bad one is bad, the
VAE config's latent channels and downsampling, the shard size. Byte-identity comparisons run every build with one
CPU thread (torchrun's default), because oneDNN's conv results depend on the thread count in the last bits.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import signal
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_tools import _sources, build_shards, inspect_shards
from lmfusion.data import shard_format as fmt
from lmfusion.data.preprocess import center_crop_box

REPO = Path(__file__).resolve().parents[2]
RES = 32
SPS = 4       # inputs per shard
BATCH = 3     # does not divide SPS: batches must still stop at shard boundaries
KL_BLOCKS = (8, 16)


@contextlib.contextmanager
def one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _img(rng: np.random.Generator, w: int, h: int, mode: str = "RGB") -> Image.Image:
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    return img.convert(mode) if mode != "RGB" else img


def make_folder(root: Path, seed: int = 0, bad: bool = True) -> dict[str, str]:
    """Images + sidecars; returns {source id: expected outcome ('ok' or a reject reason)}."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    expect: dict[str, str] = {}
    modes = ("RGB", "RGBA", "L", "P")
    for i in range(9):
        w, h = int(rng.integers(RES, 2 * RES)), int(rng.integers(RES, 2 * RES))
        ext = "png" if i % 2 else "jpg"
        _img(rng, w, h, modes[i % 4] if ext == "png" else "RGB").save(root / f"good{i}.{ext}")
        if i == 4:
            (root / f"good{i}.json").write_text(json.dumps({"caption": f"json caption {i}", "other": 1}))
        else:
            (root / f"good{i}.txt").write_text(f"  a caption for image {i}\n")
        expect[f"good{i}.{ext}"] = "ok"
    if not bad:
        return expect
    buf = io.BytesIO()
    _img(rng, 48, 48).save(buf, format="JPEG")
    (root / "trunc.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "trunc.txt").write_text("truncated")
    expect["trunc.jpg"] = "corrupt_image"
    (root / "text.jpg").write_bytes(b"this is not an image at all")
    (root / "text.txt").write_text("fake")
    expect["text.jpg"] = "not_an_image"
    (root / "notes.bin").write_bytes(b"\x00\x01")
    expect["notes.bin"] = "not_an_image"
    _img(rng, RES, RES).save(root / "nocap.png")
    expect["nocap.png"] = "missing_caption"
    _img(rng, RES, RES).save(root / "jsonnocap.png")
    (root / "jsonnocap.json").write_text(json.dumps({"title": "no caption field"}))
    expect["jsonnocap.png"] = "missing_caption"
    _img(rng, RES, RES).save(root / "empty.png")
    (root / "empty.txt").write_text("   \n")
    expect["empty.png"] = "empty_caption"
    _img(rng, RES - 8, 2 * RES).save(root / "small.png")
    (root / "small.txt").write_text("too small")
    expect["small.png"] = "too_small"
    (root / "orphan.txt").write_text("caption without image")
    expect["orphan.txt"] = "missing_image"
    return expect


def save_kl(path: Path, seed: int = 0) -> Path:
    from diffusers import AutoencoderKL
    torch.manual_seed(seed)
    AutoencoderKL(block_out_channels=KL_BLOCKS, down_block_types=("DownEncoderBlock2D",) * len(KL_BLOCKS),
                  up_block_types=("UpDecoderBlock2D",) * len(KL_BLOCKS), latent_channels=4, norm_num_groups=4,
                  layers_per_block=1, scaling_factor=0.5, shift_factor=0.1).save_pretrained(path)
    return path


def read_set(out: Path) -> dict[str, dict[str, bytes]]:
    manifest = json.loads((out / "manifest.json").read_text())
    samples: dict[str, dict[str, bytes]] = {}
    for entry in manifest["shards"]:
        for key, fields in fmt.iter_samples(out / entry["name"]):
            assert key not in samples, f"duplicate key {key}"
            samples[key] = fields
    return samples


def tar_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("shard-*.tar"))} | \
        {"manifest.json": (out / "manifest.json").read_bytes()}


def run(argv: list[str]) -> int:
    with one_thread():
        return build_shards.main([str(a) for a in argv] + ["--no-progress"])


@pytest.fixture(scope="module")
def kl_vae(tmp_path_factory) -> Path:
    return save_kl(tmp_path_factory.mktemp("vae") / "kl")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("data") / "images"
    return root, make_folder(root)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, kl_vae, folder) -> Path:
    """The shard set every resume / multi-rank run must reproduce byte for byte (--store sample, 2 workers)."""
    out = tmp_path_factory.mktemp("ref") / "shards"
    assert run([folder[0], "--output", out, "--vae", kl_vae, "--resolution", RES, "--samples-per-shard", SPS,
                "--batch-size", BATCH, "--workers", 2, "--store", "sample", "--max-reject-fraction", 1]) == 0
    return out


def common(folder_root: Path, out: Path, vae: Path) -> list:
    return [folder_root, "--output", out, "--vae", vae, "--resolution", RES, "--samples-per-shard", SPS,
            "--batch-size", BATCH, "--store", "sample", "--max-reject-fraction", 1]


def test_shapes_manifest_numbers_and_rejects(tmp_path, kl_vae, folder):
    root, expect = folder
    out = tmp_path / "out"
    assert run([root, "--output", out, "--vae", kl_vae, "--resolution", RES, "--samples-per-shard", SPS,
                "--batch-size", BATCH, "--workers", 1, "--max-reject-fraction", 1]) == 0
    m = json.loads((out / "manifest.json").read_text())
    config = json.loads((kl_vae / "config.json").read_text())
    down = 2 ** (len(config["block_out_channels"]) - 1)
    shape = [config["latent_channels"], RES // down, RES // down]
    n_ok = sum(v == "ok" for v in expect.values())
    want_rejects = Counter(v for v in expect.values() if v != "ok")
    assert m["latent"] == {"shape": shape, "dtype": "float16", "store": "mean_std", "std": True, "seed": None,
                           "members": ["latent.npy", "std.npy", "txt", "json"]}
    assert m["vae"]["scaling_factor"] == config["scaling_factor"] and m["vae"]["shift_factor"] == config["shift_factor"]
    assert m["vae"]["kind"] == "AutoencoderKL" and m["vae"]["path"] == str(kl_vae.resolve())
    assert m["totals"] == {"inputs": len(expect), "samples": n_ok, "rejected": len(expect) - n_ok,
                           "shards": math.ceil(len(expect) / SPS)}
    assert {k: v for k, v in m["rejected"].items() if v} == dict(want_rejects)
    assert [s["inputs"] for s in m["shards"]] == [min(SPS, len(expect) - i * SPS) for i in range(len(m["shards"]))]
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert {r["source"]: r["reason"] for r in rejects} == {k: v for k, v in expect.items() if v != "ok"}
    assert all(r["shard"] == r["index"] // SPS for r in rejects)

    samples = read_set(out)
    assert len(samples) == n_ok
    items = {i.source: i for i in _sources.enumerate_inputs([str(root)])}
    vae = fmt.load_codec(str(kl_vae), torch.device("cpu"), torch.float32).model
    for key, fields in samples.items():
        meta = json.loads(fields["json"])
        assert expect[meta["source"]] == "ok" and meta["key"] == key
        lat = fmt.load_npy(fields["latent.npy"], key)
        std = fmt.load_npy(fields["std.npy"], key)
        assert list(lat.shape) == shape and lat.dtype == np.float16 and (std > 0).all()
        w, h = Image.open(root / meta["source"]).size
        assert meta["original_size"] == [w, h] and meta["crop_box"] == list(center_crop_box(w, h))
        # The stored latent is the VAE's mean with shift and scale applied (checked against diffusers directly).
        loaded = _sources.load_item(items[meta["source"]], RES, RES)
        assert fields["txt"].decode() == loaded.caption == loaded.caption.strip()
        x = torch.from_numpy(loaded.pixels.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
        with torch.no_grad():
            dist = vae.encode(x).latent_dist
        want = ((dist.mean - config["shift_factor"]) * config["scaling_factor"])[0].numpy()
        np.testing.assert_allclose(lat.astype(np.float32), want, atol=2e-2, rtol=1e-2)
        np.testing.assert_allclose(std.astype(np.float32), (dist.std * config["scaling_factor"])[0].numpy(),
                                   atol=2e-2, rtol=1e-2)


def test_deterministic_resume_after_sigkill(tmp_path, kl_vae, folder, reference):
    root, expect = folder
    out = tmp_path / "out"
    die_after = SPS + 2  # one shard complete, the next one half written when the process dies
    env = {**os.environ, build_shards.DIE_AFTER_ENV: str(die_after), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "data_tools" / "build_shards.py"),
                           *map(str, common(root, out, kl_vae)), "--workers", "0", "--no-progress"],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not (out / "manifest.json").exists()
    complete = sorted(p.name for p in out.glob("shard-*.tar"))
    assert complete and len(complete) < math.ceil(len(expect) / SPS)
    assert list(out.glob(".shard-*.tar.tmp")), "the killed shard's temporary file should be left behind"
    assert run(common(root, out, kl_vae) + ["--workers", "1"]) == 0
    assert tar_bytes(out) == tar_bytes(reference)          # resumed == uninterrupted, byte for byte
    assert len(read_set(out)) == sum(v == "ok" for v in expect.values())
    assert not list(out.glob(".shard-*"))


def test_torchrun_two_ranks_match_single_process(tmp_path, kl_vae, folder, reference):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != build_shards.DIE_AFTER_ENV}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "data_tools/build_shards.py", *map(str, common(folder[0], out, kl_vae)),
                           "--workers", "0", "--no-progress"], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "rank 0/2" in proc.stdout and "rank 1/2" in proc.stdout
    assert tar_bytes(out) == tar_bytes(reference)
    assert (out / "rejects.jsonl").read_bytes() == (reference / "rejects.jsonl").read_bytes()


def test_rank_split_is_disjoint_and_complete(tmp_path, kl_vae, folder, reference):
    out = tmp_path / "out"
    world = 3
    for rank in range(world):
        assert run(common(folder[0], out, kl_vae) + ["--workers", "0", "--rank", rank, "--world-size", world]) == 0
        built = {p.name for p in out.glob("shard-*.tar")}
        assert built == {fmt.shard_name(s) for s in range(len(json.loads(
            (reference / "manifest.json").read_text())["shards"])) if s % world <= rank}
    assert tar_bytes(out) == tar_bytes(reference)


def test_mixed_manifests_and_tars(tmp_path):
    rng = np.random.default_rng(1)
    img_dir = tmp_path / "img"
    img_dir.mkdir()
    for i in range(4):
        _img(rng, RES + 4 * i, RES + 8, "RGB").save(img_dir / f"m{i}.png")
    rows = [json.dumps({"image": "img/m0.png", "caption": "jsonl zero"}), "{not json",
            json.dumps({"caption": "no image field"}), json.dumps({"image": "img/m1.png", "caption": 7}),
            json.dumps({"image": "img/missing.png", "caption": "gone"}),
            json.dumps({"image": str(img_dir / "m1.png"), "caption": "absolute path"})]
    (tmp_path / "rows.jsonl").write_text("\n".join(rows) + "\n")
    (tmp_path / "rows.csv").write_text('image,caption\nimg/m2.png,"csv, two"\nimg/m3.png,\nimg/m3.png,x,extra\n')
    tar_path = tmp_path / "wds.tar"
    with tarfile.open(tar_path, "w") as tar:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for i, (ext, fmt_name) in enumerate((("jpg", "JPEG"), ("png", "PNG"), ("webp", "WEBP"))):
            buf = io.BytesIO()
            _img(rng, RES + 8, RES).save(buf, format=fmt_name)
            add(f"{i:05d}.{ext}", buf.getvalue())
            if ext == "png":
                add(f"{i:05d}.json", json.dumps({"caption": "tar json caption"}).encode())
            else:
                add(f"{i:05d}.txt", f"tar caption {i}".encode())
        add("00009.txt", b"caption whose image is missing")
    expected = {"ok": 2 + 1 + 3, "bad_row": 3 + 1, "missing_image": 1 + 1, "missing_caption": 0, "empty_caption": 1}
    out = tmp_path / "out"
    assert run([tmp_path / "rows.jsonl", tmp_path / "rows.csv", tar_path, "--output", out, "--vae", "identity",
                "--resolution", RES, "--samples-per-shard", 5, "--batch-size", 2, "--workers", 0,
                "--latent-dtype", "float32", "--max-reject-fraction", 1]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["totals"]["samples"] == expected["ok"] and m["totals"]["inputs"] == sum(expected.values())
    assert {k: v for k, v in m["rejected"].items() if v} == {k: v for k, v in expected.items() if k != "ok" and v}
    assert m["latent"]["shape"] == [3, RES, RES] and m["latent"]["store"] == "mean" and m["vae"]["kind"] == "identity"
    items = {i.source: i for i in _sources.enumerate_inputs([str(tmp_path / "rows.jsonl"), str(tmp_path / "rows.csv"),
                                                            str(tar_path)])}
    for key, fields in read_set(out).items():
        meta = json.loads(fields["json"])
        loaded = _sources.load_item(items[meta["source"]], RES, RES)
        pixels = loaded.pixels.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1  # identity stores [-1, 1] pixels
        np.testing.assert_allclose(fmt.load_npy(fields["latent.npy"], key), pixels, atol=1e-6)
        assert fields["txt"].decode() == loaded.caption


def test_tiny_vae_store_rules_and_option_change(tmp_path, folder):
    from diffusers import AutoencoderTiny
    cfg = dict(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 1),
               num_decoder_blocks=(1, 1), latent_channels=4)
    AutoencoderTiny(**cfg).save_pretrained(tmp_path / "tiny")
    out = tmp_path / "out"
    args = [folder[0], "--output", out, "--vae", tmp_path / "tiny", "--resolution", RES, "--samples-per-shard", 8,
            "--workers", 0, "--max-reject-fraction", 1]
    assert run(args) == 0
    m = json.loads((out / "manifest.json").read_text())
    down = 2 ** (len(cfg["encoder_block_out_channels"]) - 1)
    assert m["latent"]["shape"] == [cfg["latent_channels"], RES // down, RES // down]
    assert m["latent"]["store"] == "mean" and m["latent"]["members"] == ["latent.npy", "txt", "json"]
    assert all(set(f) == {"latent.npy", "txt", "json"} for f in read_set(out).values())
    assert run(args[:-2] + ["--store", "mean_std", "--output", tmp_path / "o2"]) == 1  # no std from a tiny VAE
    before = tar_bytes(out)
    assert run(args + ["--resolution", RES * 2]) == 1       # other options into the same output: refused
    assert tar_bytes(out) == before


def test_reject_thresholds(tmp_path, kl_vae, capsys):
    root = tmp_path / "images"
    expect = make_folder(root, seed=3)
    out = tmp_path / "out"
    args = [root, "--output", out, "--vae", kl_vae, "--resolution", RES, "--samples-per-shard", SPS, "--workers", 0]
    frac = sum(v != "ok" for v in expect.values()) / len(expect)
    assert run(args + ["--max-reject-fraction", frac / 2]) == 1
    err = capsys.readouterr().err
    assert "--max-reject-fraction" in err and "rejects.jsonl" in err and len(err.strip().splitlines()) == 1
    assert not (out / "manifest.json").exists()
    assert len((out / "rejects.jsonl").read_text().splitlines()) == sum(v != "ok" for v in expect.values())
    assert run(args + ["--max-reject-fraction", frac]) == 0  # complete shards are reused, only the merge reruns
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.jpg").write_bytes(b"garbage")
    (bad / "a.txt").write_text("caption")
    assert run([bad, "--output", tmp_path / "o2", "--vae", "identity", "--resolution", RES, "--workers", 0]) == 1
    assert "no valid samples" in capsys.readouterr().err


def test_inspect_tool(tmp_path, kl_vae, reference, capsys):
    report, manifest = inspect_shards.validate(reference)
    assert report.ok and report.samples == manifest["totals"]["samples"]
    n = min(5, report.samples)
    assert inspect_shards.main([str(reference), "--grid", str(tmp_path / "g.png"), "-n", str(n)]) == 0
    cols = math.ceil(math.sqrt(n))
    assert Image.open(tmp_path / "g.png").size == (cols * RES, math.ceil(n / cols) * RES)
    other = save_kl(tmp_path / "other_vae", seed=1)  # same config, other weights: must not decode these latents
    assert inspect_shards.main([str(reference), "--grid", str(tmp_path / "g2.png"), "--vae", str(other)]) == 1
    assert "is not the one that encoded" in capsys.readouterr().err and not (tmp_path / "g2.png").exists()
    # Tamper: a NaN latent in a rewritten shard, and a missing shard.
    broken = tmp_path / "broken"
    broken.mkdir()
    for p in reference.iterdir():
        if p.is_file():
            (broken / p.name).write_bytes(p.read_bytes())
    first = manifest["shards"][0]["name"]
    samples = list(fmt.iter_samples(reference / first))
    writer = fmt.DeterministicTarWriter(broken / first)
    for i, (key, fields) in enumerate(samples):
        for name, data in fields.items():
            if i == 0 and name == "latent.npy":
                arr = fmt.load_npy(data, key).copy()
                arr.flat[0] = np.nan
                data = fmt.npy_bytes(arr)
            writer.add(f"{key}.{name}", data)
    writer.close()
    (broken / manifest["shards"][-1]["name"]).unlink()
    report, _ = inspect_shards.validate(broken)
    text = "\n".join(report.problems)
    assert f"{first}:{samples[0][0]}.latent.npy: 1 NaN/inf" in text
    assert f"{manifest['shards'][-1]['name']}: listed in manifest.json but missing" in text
    assert inspect_shards.main([str(broken)]) == 1


def test_parquet_manifest(tmp_path):
    import pyarrow as pa  # the parquet extra: scripts/setup.sh installs it
    import pyarrow.parquet as pq
    rng = np.random.default_rng(2)
    for i in range(3):
        _img(rng, RES, RES).save(tmp_path / f"p{i}.png")
    pq.write_table(pa.table({"image": ["p0.png", "p1.png", None, "p2.png"], "caption": ["a", "b", "c", None]}),
                   tmp_path / "rows.parquet")
    out = tmp_path / "out"
    assert run([tmp_path / "rows.parquet", "--output", out, "--vae", "identity", "--resolution", RES,
                "--workers", 0, "--max-reject-fraction", 1]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["totals"]["samples"] == 2 and m["rejected"]["bad_row"] == 1 and m["rejected"]["missing_caption"] == 1


def test_slurm_script_dry_run():
    script = REPO / "slurm" / "build_shards.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    env = {**os.environ, "DRY_RUN": "1", "SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "2",
           "SLURM_ARRAY_TASK_COUNT": "4"}
    proc = subprocess.run(["bash", str(script), "in", "--output", "out", "--vae", "identity"], env=env,
                          capture_output=True, text=True, check=True)
    assert "build_shards.py in --output out --vae identity --rank 3 --world-size 4" in proc.stdout


def test_benchmark_headline_is_last_line(capsys):
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_build_shards", REPO / "benchmarks" / "build_shards.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    with one_thread():
        ratio = bench.main(["--images", "4", "--image-size", "40", "--resolution", str(RES), "--batch-size", "2",
                            "--workers", "0", "--repeats", "1"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == f"build_shards_vs_encoder_only: {ratio:.3f}" and ratio > 0
