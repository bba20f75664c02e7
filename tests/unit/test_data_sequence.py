"""Sequence building and packing: layouts, truncation, packing invariants, label/mask rules, statistical ratios.

Expectations are derived from the ModelConfig (special ids, tokens_per_image), the DataConfig and the captions the
fixtures wrote; ratios are checked against 5-sigma binomial bounds (false-failure probability ~6e-7 per check).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from lmfusion.data import IGNORE_INDEX, MultimodalLoader, Packer, SequenceBuilder, collate
from lmfusion.model.image_io import tokens_per_image
from tests.fixtures import MAX_WORDS, build_set, data_config, make_images, make_tokenizer, model_config

N_IMAGES, SPS = 36, 5


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("seq")
    captions = make_images(root / "img", N_IMAGES, seed=1)
    shards = build_set(root / "set", root / "img", SPS)
    tok = make_tokenizer(root / "tok")
    return shards, tok, model_config(tok), captions


def _builder(mc, seq_length, first=0.8, drop=0.1):
    return SequenceBuilder(bos=mc.bos_token_id, eos=mc.eos_token_id, boi=mc.boi_token_id, eoi=mc.eoi_token_id,
                           placeholder=mc.eos_token_id, tokens_per_image=tokens_per_image(mc.image),
                           seq_length=seq_length, caption_first_prob=first, caption_dropout=drop)


def _documents(batch, T):
    """Per document: (row, start, end, image_start); from document_ids and the image positions."""
    out = []
    for row in range(batch.tokens.shape[0]):
        ids = batch.document_ids[row]
        starts = batch.image_start[batch.image_batch == row].tolist()
        for j, doc in enumerate(sorted(set(ids.tolist()) - {-1})):
            pos = (ids == doc).nonzero().flatten()
            out.append((row, int(pos[0]), int(pos[-1]) + 1, starts[j]))
    return out


def test_layouts_and_truncation(env):
    _, _, mc, _ = env
    T = tokens_per_image(mc.image)
    seq = T + 4 + 6
    b = _builder(mc, seq)
    latent = np.zeros((1, 1, 1), np.float32)
    cap = list(range(10, 13))
    first = b.build(cap, dropped=False, caption_first=True, latent=latent, sample_id="a")
    assert first.tokens.tolist() == [mc.bos_token_id, *cap, mc.boi_token_id, *[mc.eos_token_id] * T,
                                     mc.eoi_token_id, mc.eos_token_id]
    assert first.image_offset == 2 + len(cap) and not first.image_first
    second = b.build(cap, dropped=False, caption_first=False, latent=latent, sample_id="b")
    assert second.tokens.tolist() == [mc.bos_token_id, mc.boi_token_id, *[mc.eos_token_id] * T, mc.eoi_token_id,
                                      *cap, mc.eos_token_id]
    assert second.image_offset == 2 and second.image_first
    for caption_first in (True, False):  # dropped: the CFG unconditional prefix <bos> <boi>, never image-first
        dropped = b.build(cap, dropped=True, caption_first=caption_first, latent=latent, sample_id="c")
        assert dropped.tokens[:2].tolist() == [mc.bos_token_id, mc.boi_token_id] and not dropped.image_first
        assert len(dropped) == T + 4
    long_cap = list(range(10, 10 + 2 * seq))
    for caption_first in (True, False):
        doc = b.build(long_cap, dropped=False, caption_first=caption_first, latent=latent, sample_id="d")
        assert doc.truncated and len(doc) <= seq and doc.caption_tokens == seq - T - 4
        img = doc.tokens[doc.image_offset - 1: doc.image_offset + T + 1]  # <boi> image <eoi>: whole
        assert img[0] == mc.boi_token_id and img[-1] == mc.eoi_token_id
    with pytest.raises(ValueError, match="seq_length"):
        _builder(mc, T + 3)


def test_packer_keeps_order_and_defers_what_does_not_fit(env):
    _, _, mc, _ = env
    T = tokens_per_image(mc.image)
    seq = 2 * (T + 4) + 3
    b = _builder(mc, seq)
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 8, size=30)
    docs = iter([(b.build(list(range(10, 10 + int(n))), False, True, np.zeros(1, np.float32), str(i)), i)
                 for i, n in enumerate(lengths)])
    packer = Packer(seq, lambda: next(docs))
    seen = []
    for _ in range(8):
        row = packer.next_row()
        assert sum(len(d) for d in row) <= seq and row
        seen += [int(d.sample_id) for d in row]
        nxt = packer.pending
        if nxt is not None:  # greedy: the first document left out did not fit
            assert sum(len(d) for d in row) + len(nxt[0]) > seq
            assert packer.resume_state() == nxt[1] == int(nxt[0].sample_id)
    assert seen == list(range(len(seen)))


def test_row_rules_on_loader_batches(env):
    shards, tok, mc, _ = env
    T = tokens_per_image(mc.image)
    cfg = data_config([shards], tok, seq_length=3 * (T + 4) + MAX_WORDS)
    loader = MultimodalLoader(cfg, mc)
    boi, eoi, bos, eos = mc.boi_token_id, mc.eoi_token_id, mc.bos_token_id, mc.eos_token_id
    for batch in itertools.islice(loader, 12):
        b, s = batch.tokens.shape
        assert (b, s) == (cfg.micro_batch_size, cfg.seq_length)
        for name in ("tokens", "labels", "modality_ids", "document_ids", "position_ids"):
            assert getattr(batch, name).dtype == torch.int64, name
        assert batch.image_latents.shape == (batch.num_images, mc.image.latent_channels, mc.image.latent_size,
                                             mc.image.latent_size)
        assert torch.equal(batch.image_loss_mask, batch.modality_ids.float())
        assert int(batch.modality_ids.sum()) == batch.num_images * T
        docs = _documents(batch, T)
        assert len(docs) == batch.num_images  # one image per document
        for row, start, end, img in docs:
            assert start <= img - 1 and img + T < end  # <boi> image <eoi> inside its document: never split
            assert batch.tokens[row, img - 1] == boi and batch.tokens[row, img + T] == eoi
            assert batch.modality_ids[row, img:img + T].all() and batch.modality_ids[row, img - 1] == 0
            assert batch.tokens[row, start] == bos and batch.tokens[row, end - 1] == eos
            assert torch.equal(batch.position_ids[row, start:end], torch.arange(end - start))
        # label shift: every trained label is the next token of the same document; nothing else is trained
        trained = batch.text_loss_mask.bool()
        assert torch.equal(batch.labels[trained], batch.tokens[:, 1:][trained[:, :-1]])
        assert (batch.labels[~trained] == IGNORE_INDEX).all() and not trained[:, -1].any()
        nxt_doc = torch.cat([batch.document_ids[:, 1:], torch.full((b, 1), -2)], 1)
        assert (batch.document_ids[trained] == nxt_doc[trained]).all()
        assert (batch.document_ids[trained] >= 0).all()
        nxt_mod = torch.cat([batch.modality_ids[:, 1:], torch.ones(b, 1, dtype=torch.long)], 1)
        assert (batch.modality_ids[trained] == 0).all() and (nxt_mod[trained] == 0).all()  # text -> text only
        assert (batch.labels[trained] != boi).all()  # no loss on <boi>
        eoi_pos = batch.tokens == eoi
        assert trained[eoi_pos].all()  # <eoi> -> caption (image first) or <eos> (caption first) is trained
        pad = batch.document_ids == -1  # padding: a suffix of the row, nothing trained, no images
        assert not trained[pad].any() and (batch.modality_ids[pad] == 0).all()
        for row in range(b):
            p = pad[row].nonzero().flatten()
            assert p.numel() == 0 or int(p[0]) + p.numel() == s


def test_caption_first_and_dropout_ratios(env):
    """Over n documents, dropped ~ Binomial(n, dropout); among kept captions, caption-first ~ Binomial(k, p)."""
    shards, tok, mc, _ = env
    T = tokens_per_image(mc.image)
    cfg = data_config([shards], tok, seq_length=4 * (T + 4 + MAX_WORDS), micro_batch_size=4, global_batch_size=8,
                      caption_first_prob=0.7, caption_dropout=0.2)
    loader = MultimodalLoader(cfg, mc)
    n = dropped = kept = caption_first = 0
    for batch in itertools.islice(loader, 150):
        for j in range(batch.num_images):
            row, start = int(batch.image_batch[j]), int(batch.image_start[j])
            before = batch.tokens[row, start - 2] == mc.bos_token_id  # <bos> <boi>: nothing before the image
            after = batch.tokens[row, start + T + 1] == mc.eos_token_id  # <eoi> <eos>: nothing after it
            n += 1
            if before and after:
                dropped += 1
                assert not batch.image_first[j]
                continue
            kept += 1
            caption_first += int(not before)
            assert bool(batch.image_first[j]) == bool(before)

    def within(count, total, p):
        return abs(count - total * p) <= 5 * math.sqrt(total * p * (1 - p))

    assert n > 1000
    assert within(dropped, n, cfg.caption_dropout), (dropped, n)
    assert within(caption_first, kept, cfg.caption_first_prob), (caption_first, kept)


def test_collate_empty_row_and_model_inputs(env):
    _, _, mc, _ = env
    T = tokens_per_image(mc.image)
    b = _builder(mc, T + 4 + 2)
    shape = (mc.image.latent_channels, mc.image.latent_size, mc.image.latent_size)
    doc = b.build([10, 11], False, True, np.ones(shape, np.float32), "x")
    batch = collate([[doc], []], b.seq_length, T, mc.eos_token_id, mc.boi_token_id, shape)
    assert batch.num_images == 1 and (batch.document_ids[1] == -1).all()
    noisy, t = torch.randn(1, *shape), torch.tensor([7])
    inputs = batch.to_model_inputs(noisy, t)
    modality, _, _ = inputs.image_layout(T)
    assert torch.equal(modality, batch.modality_ids)  # the model places images exactly where the loader did
    assert inputs.image_latents is noisy and inputs.image_timesteps is t
    with pytest.raises(ValueError, match="timesteps"):
        batch.to_model_inputs(noisy, torch.tensor([1, 2]))
