"""Generation (lmfusion.inference): text with a KV cache, text -> image with CFG, captioning, interleaved chat, CLI.

One process, a one-rank gloo group (megatron TP=PP=1, CPU mode: the ``runtime`` fixture of tests/conftest.py). The
model (the ``ckpts`` fixture, tests/fixtures.py) is a tiny random Hugging Face Llama converted with our importer,
plus a byte-level BPE tokenizer trained there. Images use the identity VAE (pixels in [-1, 1], 3 x 8 x 8) and a
training checkpoint written through megatron dist_checkpointing, whose image set is perturbed (the decoder's output
layer is zero at init, which would make every prediction 0).

Tolerances: fp32 throughout. Greedy text must equal HF ``generate`` token for token (the text path is the frozen
Llama: only summation order differs, ~1e-6 on logits). Left-padded batches vs single rows differ by summation order
only: latents after 3 DDIM steps within 1e-4 of their largest magnitude (observed ~3e-5).
"""

from __future__ import annotations

import dataclasses
import io
import json

import pytest
import torch

from lmfusion.cli import main
from lmfusion.hf import load_base_state
from lmfusion.inference.chat import Conversation, ImageOptions
from lmfusion.inference.image import caption_image, commit_image, encode_image, text_to_image
from lmfusion.inference.load import CHECKPOINT_JSON, load_for_inference, load_vae
from lmfusion.inference.text import Image, SamplingParams, Session, generate_text, sample_next
from lmfusion.model.builder import build_model
from lmfusion.model.image_io import patchify, tokens_per_image
from lmfusion.model.model import ModelInputs
from tests.fixtures import GEN_IMAGE as IMAGE
from tests.fixtures import GEN_PROMPTS as PROMPTS
from tests.fixtures import perturb_image_set

STEPS = 3  # denoising steps in tests
BATCH_TOL = 1e-4

@pytest.fixture(scope="module")
def base(ckpts):
    return load_for_inference(ckpts[0] / "base", device="cpu")


@pytest.fixture(scope="module")
def trained(ckpts):
    return load_for_inference(ckpts[0] / "run", device="cpu")


def _hf_generate(hf_dir, prompt: list[int], max_new: int) -> list[int]:
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False)
    return out[0, len(prompt):].tolist()


def _prompt_ids(bundle, text: str) -> list[int]:
    return [bundle.config.bos_token_id, *bundle.tokenizer.encode(text, add_special_tokens=False)]


# ---------------------------------------------------------------------------------------------------- loading
def test_training_checkpoint_loads_the_saved_image_set_and_base_text(ckpts, trained):
    _, saved = ckpts
    got = dict(trained.model.named_parameters())
    assert trained.meta.kind == "training" and trained.meta.path.name == "iter_0000007"
    assert trained.vae["kind"] == "identity" and trained.config.image == IMAGE
    bad = [n for n, p in saved.items() if not torch.equal(got[n], p)]
    assert not bad, f"parameters differ after loading: {bad[:4]}"


def test_checkpoint_config_mismatch_is_a_clear_error(ckpts, runtime, tmp_path):
    root, _ = ckpts
    record = json.loads((root / "run" / "iter_0000007" / CHECKPOINT_JSON).read_text())
    record["base"] = str(root / "base")
    record["model"]["num_layers"] += 1
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / CHECKPOINT_JSON).write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"model\.num_layers=3 does not match the base"):
        load_for_inference(tmp_path / "text", device="cpu")
    # an image config other than the one saved: megatron's shape check, reported against the checkpoint
    import shutil

    shutil.copytree(root / "run" / "iter_0000007", tmp_path / "image")
    record["model"]["num_layers"] -= 1
    record["model"]["image"]["block_channels"] = [32, 32]
    (tmp_path / "image" / CHECKPOINT_JSON).write_text(json.dumps(record))
    with pytest.raises(ValueError, match="cannot read the distributed checkpoint"):
        load_for_inference(tmp_path / "image", device="cpu")


# ---------------------------------------------------------------------------------------------------- text
def test_greedy_text_equals_hf_generate(ckpts, base):
    """A left-padded batch of prompts of different lengths, each compared with HF generate on its own."""
    root, _ = ckpts
    max_new = 12
    prompts = [_prompt_ids(base, p) for p in PROMPTS]
    params = SamplingParams(max_new_tokens=max_new, stop_token_ids=base.meta.stop_token_ids)
    got = generate_text(base.model, prompts, params)
    for prompt, tokens in zip(prompts, got):
        assert tokens == _hf_generate(root / "hf", prompt, max_new)


def test_kv_cache_generation_equals_no_cache(trained):
    """Greedy and seeded top-p sampling, with a clean image in one prompt, cached or recomputed."""
    cfg = trained.config
    image = Image(torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(0)).clamp(-1, 1), 0)
    prompts = [_prompt_ids(trained, PROMPTS[0]),
               [cfg.bos_token_id, cfg.boi_token_id, image, cfg.eoi_token_id, *_prompt_ids(trained, "a")[1:]]]
    for params in (SamplingParams(max_new_tokens=10),
                   SamplingParams(max_new_tokens=10, temperature=0.8, top_p=0.9)):
        runs = [generate_text(trained.model, prompts, params, torch.Generator().manual_seed(5), use_cache=c)
                for c in (True, False)]
        assert runs[0] == runs[1], params


def test_sampling_top_p_temperature_and_stop_tokens(trained):
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()[None].expand(400, -1)
    gen = torch.Generator().manual_seed(0)
    for top_p in (0.4, 0.7, 0.9):  # keeps the fewest top tokens whose mass reaches top_p
        keep = int((probs.cumsum(0) < top_p).sum()) + 1
        drawn = set(sample_next(logits, SamplingParams(temperature=1.0, top_p=top_p), gen).tolist())
        assert drawn == set(range(keep)), (top_p, drawn)
    cold = sample_next(logits, SamplingParams(temperature=1e-3), gen)
    assert bool((cold == 0).all())  # temperature -> 0 approaches greedy
    # a stop token ends its own row only; the stop token is kept
    prompts = [_prompt_ids(trained, p) for p in PROMPTS]
    free = generate_text(trained.model, prompts, SamplingParams(max_new_tokens=6))
    stop = free[0][1]
    assert stop not in free[1] and stop != free[0][0]
    stopped = generate_text(trained.model, prompts, SamplingParams(max_new_tokens=6, stop_token_ids=(stop,)))
    assert stopped == [free[0][:2], free[1]]


def test_bf16_inference_runs(ckpts, tmp_path):
    """--dtype bf16: megatron's modules and the image encoder/decoder alike (one dtype through the image path)."""
    bundle = load_for_inference(ckpts[0] / "run", device="cpu", dtype=torch.bfloat16)
    assert {p.dtype for p in bundle.model.parameters()} == {torch.bfloat16}
    caps = [bundle.tokenizer.encode(PROMPTS[0], add_special_tokens=False)]
    latents = text_to_image(bundle.model, caps, sampler="ddim", steps=2, seed=0)
    assert latents.dtype == torch.float32 and torch.isfinite(latents).all()
    assert len(caption_image(bundle.model, latents[0].clamp(-1, 1), SamplingParams(max_new_tokens=3))) == 3


def test_cli_text_on_base_and_training_checkpoints(ckpts, base, capsys):
    root, _ = ckpts
    want = base.tokenizer.decode(_hf_generate(root / "hf", _prompt_ids(base, PROMPTS[0]), 8),
                                 skip_special_tokens=True)
    for ckpt in (root / "base", root / "run"):
        assert main(["generate", "--ckpt", str(ckpt), "--prompt", PROMPTS[0], "--text", "--max-new-tokens", "8",
                     "--device", "cpu"]) == 0
        assert capsys.readouterr().out == want + "\n"


# ---------------------------------------------------------------------------------------------------- images
def test_same_seed_same_images_and_batches_match_single_prompts(trained):
    caps = [trained.tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS]
    a = text_to_image(trained.model, caps, n_per_caption=2, sampler="ddpm", steps=STEPS, seed=3)
    b = text_to_image(trained.model, caps, n_per_caption=2, sampler="ddpm", steps=STEPS, seed=3)
    c = text_to_image(trained.model, caps, n_per_caption=2, sampler="ddpm", steps=STEPS, seed=4)
    assert a.shape == (4, 3, 8, 8) and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(a, c)
    # DDIM is deterministic given the initial noise: row 0 of a left-padded batch = the first caption alone
    batch = text_to_image(trained.model, caps[::-1], sampler="ddim", steps=STEPS, seed=3)
    alone = text_to_image(trained.model, caps[1:], sampler="ddim", steps=STEPS, seed=3)
    # untrained noise predictions blow x0 up at the noisiest step (1 / sqrt(abar) ~ 1e3): compare relative to the scale
    torch.testing.assert_close(batch[:1], alone, atol=BATCH_TOL * float(alone.abs().max()), rtol=0)


def test_cfg_scale_one_equals_conditional_only(trained):
    caps = [trained.tokenizer.encode(PROMPTS[0], add_special_tokens=False)]
    cond = text_to_image(trained.model, caps, sampler="ddim", steps=STEPS, cfg_scale=None, seed=0)
    one = text_to_image(trained.model, caps, sampler="ddim", steps=STEPS, cfg_scale=1.0, seed=0)
    guided = text_to_image(trained.model, caps, sampler="ddim", steps=STEPS, cfg_scale=3.0, seed=0)
    assert torch.equal(cond, one)
    assert (guided - cond).abs().max() > 1e-3, "guidance had no effect: the unconditional branch is not used"


def test_image_tokens_attend_bidirectionally_during_sampling(ckpts, runtime):
    """Linear patchify (no convolution spreads a patch): changing the last patch's latent changes the first image
    token's predicted noise in a sampling step (cache + commit=False), not the text before the image; the step equals
    the full no-cache forward."""
    root, _ = ckpts
    cfg, weights = load_base_state(root / "base")
    cfg = dataclasses.replace(cfg, image=dataclasses.replace(IMAGE, kind="linear"), attention_backend="sdpa",
                              linear_backend="local")
    with weights:
        model = build_model(cfg, base=weights, freeze=False).eval()
    perturb_image_set(model, seed=2)
    p, n_tok = IMAGE.patch_size, tokens_per_image(IMAGE)
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    x2 = x.clone()
    x2[..., -p:, -p:] += 1.0  # the last patch only
    prefix = [cfg.bos_token_id, 5, 6, 7, cfg.boi_token_id]
    t = 500

    def step(latent):
        session = Session(model, 1)
        session.extend([prefix])
        return patchify(session.extend([[Image(latent[0], t)]], commit=False).noise_pred, p)  # (1, n_tok, f)

    def full(latent):
        tokens = torch.tensor([prefix + [0] * n_tok + [cfg.eoi_token_id]])
        with torch.no_grad():
            return model(ModelInputs(tokens=tokens, document_ids=torch.zeros_like(tokens), image_latents=latent,
                                     image_timesteps=torch.tensor([t]), image_batch=torch.tensor([0]),
                                     image_start=torch.tensor([len(prefix)])))

    a, b = step(x), step(x2)
    assert torch.equal(patchify(x, p)[:, 0], patchify(x2, p)[:, 0])
    assert (a[:, 0] - b[:, 0]).abs().max() > 1e-4, "an earlier image token does not see a later one"
    fa, fb = full(x), full(x2)
    torch.testing.assert_close(patchify(fa.noise_pred, p), a, atol=1e-5, rtol=0)
    assert torch.equal(fa.logits[: len(prefix)], fb.logits[: len(prefix)]), "text before the image saw the image"
    assert (fa.logits[-1] - fb.logits[-1]).abs().max() > 1e-4, "<eoi> after the image does not see it"


def test_cli_generate_writes_grid_and_images(ckpts, tmp_path, capsys):
    from PIL import Image as PILImage

    root, _ = ckpts
    out = tmp_path / "grid.png"
    args = ["generate", "--ckpt", str(root / "run"), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--n", "2",
            "--out", str(out), "--steps", str(STEPS), "--cfg", "1.6", "--seed", "1", "--device", "cpu"]
    assert main(args) == 0
    files = sorted(tmp_path.glob("grid-*.png"))
    assert len(files) == 4 and "wrote" in capsys.readouterr().out
    with PILImage.open(files[0]) as im:
        assert im.size == (8, 8) and im.mode == "RGB"
    with PILImage.open(out) as grid:
        assert grid.size[0] > 2 * 8 and grid.size[1] > 2 * 8  # 2 x 2 with padding


def test_cli_errors_are_one_line(ckpts, tmp_path, capsys):
    root, _ = ckpts
    assert main(["generate", "--ckpt", str(root / "base"), "--prompt", "x", "--out", str(tmp_path / "g.png"),
                 "--device", "cpu"]) == 2
    assert "no VAE" in capsys.readouterr().err
    bad = tmp_path / "x.png"
    bad.write_bytes(b"not a png at all")
    assert main(["caption", "--ckpt", str(root / "run"), "--image", str(bad), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "not an image Pillow can read" in err and str(bad) in err and err.count("\n") == 1
    assert main(["generate", "--ckpt", str(root / "hf"), "--prompt", "x", "--text"]) == 2
    assert "convert-hf" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- captions, chat
def test_caption_end_to_end(ckpts, trained, tmp_path, capsys):
    from PIL import Image as PILImage

    root, _ = ckpts
    path = tmp_path / "x.png"
    pixels = torch.randint(0, 256, (8, 8, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    PILImage.fromarray(pixels.numpy()).save(path)
    codec = load_vae(None, trained.vae, torch.device("cpu"))
    latent = encode_image(codec, trained.config, path)
    torch.testing.assert_close(latent, pixels.permute(2, 0, 1).float() / 127.5 - 1)  # identity VAE: the pixels
    params = SamplingParams(max_new_tokens=6, stop_token_ids=trained.meta.stop_token_ids)
    ids = caption_image(trained.model, latent, params)
    assert 1 <= len(ids) <= 6
    assert main(["caption", "--ckpt", str(root / "run"), "--image", str(path), "--max-new-tokens", "6",
                 "--device", "cpu"]) == 0
    assert capsys.readouterr().out == trained.tokenizer.decode(ids, skip_special_tokens=True) + "\n"


def test_real_vae_from_a_shard_manifest(ckpts, trained, tmp_path, capsys):
    """A diffusers AutoencoderKL (random weights; none are installable) through a real shard set: --vae SHARD_DIR
    finds it in the manifest; captioning encodes an image exactly as the shard builder stored it; generation decodes
    latents to pixels at the VAE's scale; a VAE other than the manifest's is refused."""
    from diffusers import AutoencoderKL
    from PIL import Image as PILImage

    from data_tools import build_shards
    from lmfusion.data import shard_format as fmt

    root, _ = ckpts
    factor = 2
    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8,) * 2, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=IMAGE.latent_channels, norm_num_groups=4,
                  layers_per_block=1, scaling_factor=0.5, shift_factor=0.1).save_pretrained(tmp_path / "kl")
    size = IMAGE.latent_size * factor
    (tmp_path / "images").mkdir()
    pixels = torch.randint(0, 256, (2 * size, 3 * size, 3), generator=torch.Generator().manual_seed(0),
                           dtype=torch.uint8)
    PILImage.fromarray(pixels.numpy()).save(tmp_path / "images" / "a.png")  # not square: centre-cropped
    (tmp_path / "images" / "a.txt").write_text(PROMPTS[0])
    shards = tmp_path / "shards"
    assert build_shards.main([str(tmp_path / "images"), "--output", str(shards), "--vae", str(tmp_path / "kl"),
                              "--resolution", str(size), "--latent-dtype", "float32", "--workers", "0",
                              "--no-progress"]) == 0
    (stored,) = [fmt.load_npy(f["latent.npy"], "latent") for _, f in fmt.iter_samples(next(shards.glob("*.tar")))]
    codec = load_vae(str(shards), None, torch.device("cpu"))
    latent = encode_image(codec, trained.config, tmp_path / "images" / "a.png")
    torch.testing.assert_close(latent, torch.from_numpy(stored), atol=1e-5, rtol=0)  # same preprocessing + scaling

    out = tmp_path / "g.png"
    assert main(["generate", "--ckpt", str(root / "run"), "--prompt", PROMPTS[0], "--out", str(out), "--steps",
                 str(STEPS), "--vae", str(shards), "--device", "cpu"]) == 0
    with PILImage.open(tmp_path / "g-000.png") as im:
        assert im.size == (size, size)
    capsys.readouterr()
    wrong = dict(codec.describe(), config_hash="0" * 64)
    with pytest.raises(ValueError, match="not the one the shards were built with"):
        load_vae(None, wrong, torch.device("cpu"))


def test_interleaved_chat_draws_on_boi_then_continues(ckpts, trained):
    """A model that emits <boi> after the prompt (its LM-head row set to twice the greedy token's): the image equals
    text_to_image for the same caption and seed, and the text after <eoi> continues from the right cache."""
    cfg, model = trained.config, trained.model
    prompt = trained.tokenizer.encode(PROMPTS[0], add_special_tokens=False)
    head = model.output_layer.weight
    saved = head[cfg.boi_token_id].clone()
    session = Session(model, 1)
    logits = session.next_logits([[cfg.bos_token_id, *prompt]])
    greedy = int(logits.argmax())
    assert logits[0, greedy] > 0
    try:
        with torch.no_grad():
            head[cfg.boi_token_id] = 2 * head[greedy]
        opts = ImageOptions(sampler="ddim", steps=STEPS, cfg_scale=1.6, max_images=1)
        conv = Conversation(model, SamplingParams(max_new_tokens=6), opts, torch.Generator().manual_seed(9))
        segments = conv.respond(prompt)
        want = text_to_image(model, [prompt], sampler="ddim", steps=STEPS, cfg_scale=1.6, seed=9)
        # reference for the continuation: the same sequence through a fresh cache
        ref = Session(model, 1)
        ref.extend([[cfg.bos_token_id, *prompt, cfg.boi_token_id]])
        after_eoi = commit_image(ref, want)
    finally:
        with torch.no_grad():
            head[cfg.boi_token_id] = saved
    assert isinstance(segments[0], torch.Tensor)
    # the chat's prefix went through the cache in two chunks (prompt, then the sampled <boi>), text_to_image's in one:
    # summation order differs, so compare relative to the (blown-up, untrained) latents' scale as for batches
    torch.testing.assert_close(segments[0], want[0], atol=BATCH_TOL * float(want.abs().max()), rtol=0)
    n_img = tokens_per_image(cfg.image)
    assert conv.session.cache.length >= 1 + len(prompt) + 1 + n_img + 1
    assert int(conv.session.cache.image_ids[0].ge(0).sum()) == n_img
    if len(segments) > 1:  # text after the image starts with the greedy token after <eoi>
        assert segments[1][0] == int(after_eoi.argmax())
    else:  # the model stopped at once (a second <boi> ends the response): it was the greedy token after <eoi>
        assert conv.pending == [int(after_eoi.argmax())]


def test_cli_chat_reads_stdin(ckpts, tmp_path, capsys, monkeypatch):
    root, _ = ckpts
    monkeypatch.setattr("sys.stdin", io.StringIO(PROMPTS[0] + "\nand then\n\n"))
    assert main(["chat", "--ckpt", str(root / "run"), "--out-dir", str(tmp_path), "--steps", str(STEPS),
                 "--max-new-tokens", "5", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.count("> ") == 3


def test_prompt_longer_than_the_context_is_refused_in_one_line(ckpts, base, capsys):
    """Issue #18 item 7: a prompt that, with what it generates, exceeds max_position_embeddings is refused by name
    (before, it ran on past the context without a word)."""
    root, _ = ckpts
    word = PROMPTS[0].split()[0]
    limit = base.config.max_position_embeddings
    long_prompt = " ".join([word] * limit)
    for extra in (["--text", "--max-new-tokens", "4"], ["--out", str(root / "x.png"), "--vae", "identity"]):
        assert main(["generate", "--ckpt", str(root / "base"), "--prompt", long_prompt, "--device", "cpu",
                     *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert "--prompt 1:" in err and f"expected at most {limit}" in err and "\n" not in err, err


def test_caption_and_chat_stop_at_the_context(ckpts, trained, tmp_path, capsys):
    """Issue #18 item 7, caption and chat: a caption whose prefix and --max-new-tokens exceed max_position_embeddings
    is refused in one line; a chat fills the context to exactly its limit, says so and ends, and a prompt that cannot
    fit is refused by name; no Session ever runs past the context."""
    from PIL import Image as PILImage

    from lmfusion.errors import UserError

    root, _ = ckpts
    cfg, model = trained.config, trained.model
    limit, n_img = cfg.max_position_embeddings, tokens_per_image(cfg.image)
    path = tmp_path / "img.png"
    PILImage.new("RGB", (8, 8), (200, 30, 30)).save(path)
    too_many = str(limit - 3 - n_img + 1)
    assert main(["caption", "--ckpt", str(root / "run"), "--image", str(path), "--max-new-tokens", too_many,
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (earlier lines: notes on the checkpoint's weights)
    assert err.startswith("lmfusion caption: error: --max-new-tokens") and f"expected at most {limit}" in err, err

    session = Session(model, 1)
    with pytest.raises(UserError, match=f"needs {limit + 1} positions, expected at most {limit}"):
        session.next_logits([[cfg.bos_token_id] * (limit + 1)])
    assert session.room() == limit  # nothing was committed

    prompt = trained.tokenizer.encode(PROMPTS[0], add_special_tokens=False)
    conv = Conversation(model, SamplingParams(max_new_tokens=2 * limit), ImageOptions(steps=STEPS, max_images=0),
                        torch.Generator().manual_seed(3))
    segments = conv.respond(prompt)
    assert conv.full and conv.session.room() == 0
    # every committed token is in the cache, plus the last one drawn from the final position's logits
    assert 1 + len(prompt) + sum(len(s) for s in segments) == limit + 1
    with pytest.raises(UserError, match="the conversation is full"):
        conv.respond(prompt)
    out = io.StringIO()
    from lmfusion.inference.chat import run_chat

    conv = Conversation(model, SamplingParams(max_new_tokens=2 * limit), ImageOptions(steps=STEPS, max_images=0),
                        torch.Generator().manual_seed(3))
    assert run_chat(conv, trained.tokenizer, None, tmp_path / "chat", io.StringIO(PROMPTS[0] + "\nmore\n"), out) == 0
    assert f"context ({limit} positions) is full" in out.getvalue() and out.getvalue().count("> ") == 1
