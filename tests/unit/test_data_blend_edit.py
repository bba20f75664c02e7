"""Text-only shards blended with image-caption shards, and editing shards (multi-image documents): exact counts of
what each document trains, the blend's proportions, exact resume with a blend, the editing mask and noise flags,
the builder's errors, and a real forward/backward on an editing micro-batch.

Every expectation is derived from the inputs written here, the DataConfig and the model config.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import math

import numpy as np
import pytest
import torch

from data_tools import build_shards
from lmfusion.data import MultimodalLoader
from lmfusion.model.image_io import patchify, tokens_per_image
from tests.fixtures import RES, perturb_image_set, WORDS, build_set, data_config, make_images, make_tokenizer, manifest, model_config

SPS = 4
SEQ = 64


def _build(args: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        rc = build_shards.main([str(a) for a in args] + ["--workers", "0", "--no-progress"])
    return rc, err.getvalue()


def _texts(n: int, seed: int) -> list[str]:
    """``n`` texts of words; the first is longer than one row (2.5 x SEQ words) so it must be cut into pieces."""
    rng = np.random.default_rng(seed)
    lengths = [int(2.5 * SEQ)] + [int(rng.integers(1, 30)) for _ in range(n - 1)]
    return [" ".join(rng.choice(WORDS, size=k)) for k in lengths]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("blend")
    make_images(root / "img", 12, seed=5, prefix="a")
    tok = make_tokenizer(root / "tok")
    texts = _texts(10, seed=6)
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    rc, err = _build([root / "corpus.jsonl", "--kind", "text", "--output", root / "text",
                      "--samples-per-shard", SPS])
    assert rc == 0, err
    # Editing triples: sources and targets are distinct random images, instructions are words.
    make_images(root / "src", 6, seed=7, prefix="s")
    make_images(root / "tgt", 6, seed=8, prefix="t")
    rows = [{"image": f"src/s{i:04d}.png", "instruction": f"w{i} w{i + 1}", "target": f"tgt/t{i:04d}.png"}
            for i in range(6)]
    (root / "edits.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc, err = _build([root / "edits.jsonl", "--kind", "edit", "--output", root / "edit", "--vae", "identity",
                      "--resolution", RES, "--samples-per-shard", SPS, "--latent-dtype", "float32"])
    assert rc == 0, err
    return {"img": build_set(root / "caption", root / "img", SPS), "text": root / "text", "edit": root / "edit",
            "texts": texts, "rows": rows, "tok": tok, "mc": model_config(tok), "root": root}


def _docs(batch):
    """Per row and document: (tokens, positions in the row)."""
    out = []
    for r in range(batch.tokens.shape[0]):
        ids = batch.document_ids[r]
        for j in range(int(ids.max()) + 1):
            pos = (ids == j).nonzero().flatten()
            out.append((r, pos))
    return out


def test_text_shards_hold_text_and_no_vae(env):
    m = manifest(env["text"])
    assert m["kind"] == "text" and "vae" not in m and "latent" not in m
    assert m["totals"]["samples"] == len(env["texts"]) and m["totals"]["shards"] == math.ceil(len(env["texts"]) / SPS)


def test_text_only_rows_train_lm_only_with_exact_counts(env):
    from lmfusion.training.step import prepare_micro_batch

    cfg = data_config([env["text"]], env["tok"], seq_length=SEQ)
    loader = MultimodalLoader(cfg, env["mc"])
    n_words = [len(t.split()) for t in env["texts"]]
    piece = SEQ - 2
    expected_docs = sum(max(1, math.ceil(n / piece)) for n in n_words)
    seen, words = {}, 0
    for batch in itertools.islice(loader, 12):
        assert batch.num_images == 0 and int(batch.modality_ids.sum()) == 0
        assert float(batch.image_loss_mask.sum()) == 0.0 and batch.image_latents.shape[0] == 0
        mc = env["mc"]
        lm = 0
        for (r, pos), sid in zip(_docs(batch), [s for row in batch.sample_ids for s in row]):
            tokens = batch.tokens[r, pos].tolist()
            assert tokens[0] == mc.bos_token_id and mc.boi_token_id not in tokens
            lm += len(pos) - 1  # every next-token target inside a text document is trained
            if sid.endswith(":0"):
                seen[sid] = tokens
        assert int(batch.text_loss_mask.sum()) == lm
        mb = prepare_micro_batch(batch, seed=0, step=0, dp_rank=0, index=0, device=torch.device("cpu"),
                                 dtype=torch.float32, cap=500)
        assert mb.image_tokens == 0 and mb.target is None and mb.lm_tokens == lm
    assert len(seen) == expected_docs  # the first epoch's pieces, each once
    for sid, tokens in seen.items():
        words += len(tokens) - 1 - int(tokens[-1] == env["mc"].eos_token_id)
    assert words == sum(n_words)  # no word of a long text is lost to truncation


def test_text_only_micro_batch_diffusion_term_is_zero(env, runtime):
    from lmfusion.model.model import LMFusionOutput
    from lmfusion.training.step import StepLoss, prepare_micro_batch

    batch = next(MultimodalLoader(data_config([env["text"]], env["tok"], seq_length=SEQ), env["mc"]))
    mb = prepare_micro_batch(batch, seed=0, step=0, dp_rank=0, index=0, device=torch.device("cpu"),
                             dtype=torch.float32, cap=500)
    logits = torch.randn(*mb.labels.shape, env["mc"].vocab_size, generator=torch.Generator().manual_seed(0))
    terms = StepLoss(mb.lm_tokens, mb.image_tokens, 1, 1, 5.0, env["mc"].image.patch_size).terms(
        mb, LMFusionOutput(logits, None))
    assert float(terms.diffusion) == 0.0 and int(terms.lm_tokens) == int(batch.text_loss_mask.sum()) > 0
    assert int(terms.image_tokens) == 0 and float(terms.lm) > 0


def test_fifty_fifty_blend_proportions_and_exact_resume(env):
    cfg = data_config([env["img"], env["text"]], env["tok"], seq_length=SEQ, weights=[0.5, 0.5], num_workers=0)
    loader = MultimodalLoader(cfg, env["mc"])
    batches = list(itertools.islice(loader, 40))
    ids = [s for b in batches for row in b.sample_ids for s in row]
    n_text = sum(s.startswith("1:") for s in ids)
    n = len(ids)
    # Packing keeps the draw order (a document waits for the next row, never dropped), so the documents delivered
    # are the first n draws: Binomial(n, 1/2). 4 sigma: a wrong weight (e.g. 2/3) fails, a seed change does not.
    assert abs(n_text - n / 2) <= 4 * math.sqrt(n / 4), (n_text, n)
    assert 0 < n_text < n
    # Exact resume with the blend: mid-step, two workers after zero.
    cut = loader.micro_batches_per_step + 1
    first = MultimodalLoader(cfg, env["mc"])
    head = list(itertools.islice(first, cut))
    state = json.loads(json.dumps(first.state_dict()))
    resumed = MultimodalLoader(data_config([env["img"], env["text"]], env["tok"], seq_length=SEQ,
                                           weights=[0.5, 0.5], num_workers=2), env["mc"])
    resumed.load_state_dict(state)
    tail = list(itertools.islice(resumed, 6))
    resumed.close()
    for x, y in zip(head + tail, batches):
        assert x.sample_ids == y.sample_ids and x.image_keys == y.image_keys
        for name, value in vars(x).items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, getattr(y, name)), name


def _edit_batch(env):
    return next(MultimodalLoader(data_config([env["edit"]], env["tok"], seq_length=SEQ, caption_dropout=0.0),
                                 env["mc"]))


def test_edit_document_layout_flags_and_noise(env):
    from lmfusion.training.step import prepare_micro_batch

    mc, T = env["mc"], tokens_per_image(env["mc"].image)
    batch = _edit_batch(env)
    docs = [s for row in batch.sample_ids for s in row]
    assert batch.num_images == 2 * len(docs) > 0
    assert batch.image_noised.tolist() == [False, True] * len(docs)  # (source, target) per document
    assert float(batch.text_loss_mask.sum()) == 0.0  # the instruction conditions, it is not a target
    assert int(batch.image_loss_mask.sum()) == T * len(docs)  # targets only
    rows = dict(enumerate(env["rows"]))
    for j, (r, pos) in enumerate(_docs(batch)):
        tokens = batch.tokens[r, pos].tolist()
        key = int(docs[j].split(":")[1])
        ins = [int(t) for t in _ids(env, rows[key]["instruction"])]
        s0, t0 = batch.image_start[2 * j].item(), batch.image_start[2 * j + 1].item()
        src, tgt = s0 - pos[0].item(), t0 - pos[0].item()
        assert tokens[:2] == [mc.bos_token_id, mc.boi_token_id] and src == 2
        assert tokens[src + T] == mc.eoi_token_id and tokens[src + T + 1: tgt - 1] == ins
        assert tokens[tgt - 1] == mc.boi_token_id and tokens[tgt + T:] == [mc.eoi_token_id, mc.eos_token_id]
        assert float(batch.image_loss_mask[r, s0:s0 + T].sum()) == 0
        assert float(batch.image_loss_mask[r, t0:t0 + T].sum()) == T
    mb = prepare_micro_batch(batch, seed=0, step=0, dp_rank=0, index=0, device=torch.device("cpu"),
                             dtype=torch.float32, cap=500)
    src, tgt = ~batch.image_noised, batch.image_noised
    assert torch.equal(mb.inputs.image_latents[src], batch.image_latents[src])  # clean: no noise
    assert bool((mb.inputs.image_timesteps[src] == 0).all()) and bool((mb.inputs.image_timesteps[tgt] > 0).all())
    assert not torch.equal(mb.inputs.image_latents[tgt], batch.image_latents[tgt])
    assert mb.image_tokens == T * len(docs) and mb.image_trained.tolist() == tgt.tolist()
    # the source's latent is the source image, the target's the target image (identity VAE: pixels in [-1, 1])
    from PIL import Image

    key = int(docs[0].split(":")[1])
    pixels = np.asarray(Image.open(env["root"] / env["rows"][key]["image"]), dtype=np.float32) / 127.5 - 1
    assert np.allclose(batch.image_latents[0].numpy(), pixels.transpose(2, 0, 1), atol=1e-6)


def _ids(env, text):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(env["tok"], local_files_only=True)(text, add_special_tokens=False)["input_ids"]


def test_edit_source_gets_no_diffusion_loss(env, runtime):
    from lmfusion.model.model import LMFusionOutput
    from lmfusion.training.step import StepLoss, prepare_micro_batch

    batch = _edit_batch(env)
    mb = prepare_micro_batch(batch, seed=0, step=0, dp_rank=0, index=0, device=torch.device("cpu"),
                             dtype=torch.float32, cap=500)
    logits = torch.zeros(*mb.labels.shape, env["mc"].vocab_size)
    loss = StepLoss(mb.lm_tokens, mb.image_tokens, 1, 1, 5.0, env["mc"].image.patch_size)
    pred = torch.randn(mb.target.shape, generator=torch.Generator().manual_seed(1))
    base = loss.terms(mb, LMFusionOutput(logits.clone(), pred))
    moved = pred.clone()
    moved[~batch.image_noised] += 10.0  # any prediction at the source: the loss does not move
    assert torch.equal(loss.terms(mb, LMFusionOutput(logits.clone(), moved)).diffusion, base.diffusion)
    moved = pred.clone()
    moved[batch.image_noised] += 10.0
    assert float(loss.terms(mb, LMFusionOutput(logits.clone(), moved)).diffusion) > float(base.diffusion)
    p = env["mc"].image.patch_size
    want = (patchify(pred, p) - patchify(mb.target, p)).pow(2).mean(-1)[batch.image_noised].sum() / mb.image_tokens
    torch.testing.assert_close(base.diffusion, want)


def test_edit_mask_target_sees_source_and_instruction(env):
    from lmfusion.model.attention import dense_mask

    T = tokens_per_image(env["mc"].image)
    batch = _edit_batch(env)
    inputs = batch.to_model_inputs(batch.image_latents, torch.zeros(batch.num_images, dtype=torch.long))
    _, image_ids, _ = inputs.image_layout(T)
    mask = dense_mask(batch.document_ids, image_ids)[:, 0]  # (b, q, k)
    r, pos = _docs(batch)[0]
    s0, t0 = batch.image_start[0].item(), batch.image_start[1].item()
    src, instr, tgt = range(s0, s0 + T), range(s0 + T + 1, t0 - 1), range(t0, t0 + T)
    assert len(instr) > 0
    assert all(bool(mask[r, q, k]) for q in tgt for k in [*src, *instr, *tgt])  # target sees all, bidirectionally
    assert not any(bool(mask[r, q, k]) for q in [*src, *instr] for k in tgt)  # nothing earlier sees the target
    assert all(bool(mask[r, q, k]) for q in src for k in src)


def test_builder_bad_triples_name_the_file(env, tmp_path):
    rows = [dict(r) for r in env["rows"][:2]]
    rows[1]["target"] = "tgt/missing.png"
    for r in rows:
        for k in ("image", "target"):
            r[k] = str(env["root"] / r[k])
    (tmp_path / "bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc, err = _build([tmp_path / "bad.jsonl", "--kind", "edit", "--output", tmp_path / "out", "--vae", "identity",
                      "--resolution", RES])
    assert rc == 1 and len(err.strip().splitlines()) == 1
    assert str(env["root"] / "tgt" / "missing.png") in err and "target" in err
    (tmp_path / "nocol.jsonl").write_text(json.dumps({"image": rows[0]["image"], "instruction": "w1"}) + "\n")
    rc, err = _build([tmp_path / "nocol.jsonl", "--kind", "edit", "--output", tmp_path / "out2", "--vae",
                      "identity", "--resolution", RES])
    assert rc == 1 and len(err.strip().splitlines()) == 1 and "'target'" in err


def test_train_step_on_an_editing_shard(env, runtime):
    """A real forward and backward of the tiny model on an editing micro-batch: finite loss, gradients reach the
    image set, and the source image's latent changes the target's prediction (it conditions it)."""
    from lmfusion.model.builder import build_model
    from lmfusion.training.step import StepLoss, prepare_micro_batch

    mc = env["mc"]
    model = build_model(mc)
    batch = _edit_batch(env)
    mb = prepare_micro_batch(batch, seed=0, step=0, dp_rank=0, index=0, device=torch.device("cpu"),
                             dtype=torch.float32, cap=500)
    out = model(mb.inputs)
    terms = StepLoss(mb.lm_tokens, mb.image_tokens, 1, 1, 5.0, mc.image.patch_size).terms(mb, out)
    assert torch.isfinite(terms.loss) and float(terms.diffusion) > 0 and int(terms.lm_tokens) == 0
    terms.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(float(g.abs().sum()) > 0 for g in grads)
    perturb_image_set(model, seed=3)  # the output layer starts at zero: move it so predictions differ
    with torch.no_grad():
        out = model(mb.inputs)
        latents = mb.inputs.image_latents.clone()
        latents[~batch.image_noised] = -latents[~batch.image_noised]
        other = model(type(mb.inputs)(**{**vars(mb.inputs), "image_latents": latents}))
    tgt = batch.image_noised
    assert (other.noise_pred[tgt] - out.noise_pred[tgt]).abs().max() > 1e-4


def test_run_records_the_vae_of_the_first_image_set_when_text_comes_first(env):
    """The checkpoint's VAE (what ``generate``/``--edit`` decode and encode with) comes from the first set that has
    one: a blend listing its text set first must not leave the run without a VAE."""
    from types import SimpleNamespace

    from lmfusion.training.trainer import Trainer

    fake = SimpleNamespace(cfg=SimpleNamespace(data=SimpleNamespace(datasets=[str(env["text"]), str(env["edit"])])))
    assert Trainer._vae_block(fake) == manifest(env["edit"])["vae"] is not None


def _inspect(directory, *args) -> tuple[int, str]:
    from data_tools import inspect_shards

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        rc = inspect_shards.main([str(directory), *map(str, args)])
    return rc, out.getvalue()


def test_inspect_shards_validates_text_and_edit_sets_and_names_a_bad_target(env, tmp_path):
    import shutil

    from lmfusion.data import shard_format as fmt

    rc, out = _inspect(env["text"])
    assert rc == 0 and "text set" in out and f"{len(env['texts'])} samples" in out, out
    assert _inspect(env["text"], "--grid", tmp_path / "t.png")[0] == 1  # nothing to decode: an error, not a crash
    rc, out = _inspect(env["edit"], "--grid", tmp_path / "e.png", "-n", 4)
    assert rc == 0 and "edit set" in out and (tmp_path / "e.png").is_file(), out

    bad = tmp_path / "edit"
    shutil.copytree(env["edit"], bad)
    shard = bad / manifest(bad)["shards"][0]["name"]
    samples = list(fmt.iter_samples(shard))
    key, fields = samples[0]
    target = fmt.load_npy(fields["target.npy"], "target")
    fields["target.npy"] = fmt.npy_bytes(target[:, :-1])  # a target of another shape than the manifest's latents
    writer = fmt.DeterministicTarWriter(shard)
    for k, fs in samples:
        for name, data in fs.items():
            writer.add(f"{k}.{name}", data)
    writer.close()
    rc, out = _inspect(bad, "--no-hash")
    assert rc == 1 and f"{shard.name}:{key}.target.npy: shape" in out, out
