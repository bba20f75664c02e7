"""The LMFusion attention mask and its backends (lmfusion.model.attention).

Layouts are built by hand from segments; the mask is checked as a set of rules, then the backends are checked against
the explicit-softmax reference on random layouts.
"""

from __future__ import annotations


import pytest
import torch

from lmfusion.model.attention import (
    PADDING_DOCUMENT_ID,
    TEXT_IMAGE_ID,
    AttentionMask,
    CoreAttention,
    attend,
    dense_mask,
)

# fp32 attention over <= 64 keys: backends differ only in summation order; observed <= 1e-6, 1e-5 leaves margin.
FP32_TOL = 1e-5

# Flex on CPU runs eagerly (unfused) and says so once; expected here.
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def build_ids(docs: list[list[tuple[str, int]]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence from documents of ("t", n) text / ("i", n) image segments, then ``pad`` padding tokens.

    Returns (document_ids, image_ids), each (1, s).
    """
    doc_ids: list[int] = []
    img_ids: list[int] = []
    next_image = 0
    for d, segments in enumerate(docs):
        for kind, n in segments:
            doc_ids += [d] * n
            if kind == "i":
                img_ids += [next_image] * n
                next_image += 1
            else:
                img_ids += [TEXT_IMAGE_ID] * n
    doc_ids += [PADDING_DOCUMENT_ID] * pad
    img_ids += [TEXT_IMAGE_ID] * pad
    return torch.tensor([doc_ids]), torch.tensor([img_ids])


def positions(image_ids: torch.Tensor, image: int) -> list[int]:
    return (image_ids[0] == image).nonzero().flatten().tolist()


# One document: text(3) image(4) text(2) image(3) text(2); a second document: text(2) image(2) text(1); padding(3).
DOCS = [[("t", 3), ("i", 4), ("t", 2), ("i", 3), ("t", 2)], [("t", 2), ("i", 2), ("t", 1)]]
PAD = 3


@pytest.fixture(scope="module")
def layout() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    doc, img = build_ids(DOCS, pad=PAD)
    return doc, img, dense_mask(doc, img)[0, 0]  # mask (s, s)


def test_image_tokens_see_their_image_and_everything_before(layout):
    doc, img, mask = layout
    for image in range(int(img.max()) + 1):
        pos = positions(img, image)
        first, last = pos[0], pos[-1]
        d = int(doc[0, first])
        same_doc_before = [k for k in range(first) if doc[0, k] == d]
        for q in pos:
            assert mask[q, pos].all(), f"image {image}: token {q} must see its whole image"
            assert mask[q, same_doc_before].all(), f"image {image}: token {q} must see its document before the image"
            assert not mask[q, last + 1:].any(), f"image {image}: token {q} must not see anything after its image"


def test_text_after_image_sees_whole_image_and_text_before_does_not(layout):
    doc, img, mask = layout
    for image in range(int(img.max()) + 1):
        pos = positions(img, image)
        d = int(doc[0, pos[0]])
        text = [k for k in range(doc.shape[1]) if doc[0, k] == d and img[0, k] == TEXT_IMAGE_ID]
        after = [k for k in text if k > pos[-1]]
        before = [k for k in text if k < pos[0]]
        assert after and before, "layout must have text on both sides of each image"
        for q in after:
            assert mask[q, pos].all(), f"text {q} after image {image} must see the whole image"
        for q in before:
            assert not mask[q, pos].any(), f"text {q} before image {image} must not see it"


def test_text_is_causal_within_a_document(layout):
    doc, img, mask = layout
    for q in range(doc.shape[1]):
        if img[0, q] != TEXT_IMAGE_ID or doc[0, q] == PADDING_DOCUMENT_ID:
            continue
        for k in range(doc.shape[1]):
            if doc[0, k] == doc[0, q]:
                assert bool(mask[q, k]) == (k <= q), f"text token {q} vs key {k}"


def test_nothing_crosses_documents_and_padding_sees_only_itself(layout):
    doc, img, mask = layout
    s = doc.shape[1]
    for q in range(s):
        for k in range(s):
            if doc[0, q] == PADDING_DOCUMENT_ID or doc[0, k] == PADDING_DOCUMENT_ID:
                assert bool(mask[q, k]) == (q == k), f"padding: ({q}, {k})"
            elif doc[0, q] != doc[0, k]:
                assert not mask[q, k], f"token {q} must not see token {k} of another document"
    assert mask.any(dim=-1).all(), "every row must attend at least one key (no NaN rows)"


def test_later_image_sees_earlier_image_not_the_reverse(layout):
    doc, img, mask = layout
    first, second = positions(img, 0), positions(img, 1)
    assert doc[0, first[0]] == doc[0, second[0]], "the first two images share a document"
    assert mask[second][:, first].all()
    assert not mask[first][:, second].any()


def random_ids(batch: int, seq: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random packed layouts: documents of random text/image spans, then padding (lengths drawn from `generator`)."""
    docs, imgs = [], []
    for _ in range(batch):
        doc_row, img_row, d, image = [], [], 0, 0
        n_pad = int(torch.randint(0, seq // 4, (), generator=generator))
        while len(doc_row) < seq - n_pad:
            doc_len = int(torch.randint(1, seq, (), generator=generator))
            start = len(doc_row)
            while len(doc_row) - start < doc_len and len(doc_row) < seq - n_pad:
                n = int(torch.randint(1, 8, (), generator=generator))
                is_image = bool(torch.rand((), generator=generator) < 0.5)
                n = min(n, seq - n_pad - len(doc_row))
                doc_row += [d] * n
                img_row += [image if is_image else TEXT_IMAGE_ID] * n
                image += int(is_image)
            d += 1
        docs.append(doc_row + [PADDING_DOCUMENT_ID] * n_pad)
        imgs.append(img_row + [TEXT_IMAGE_ID] * n_pad)
    return torch.tensor(docs), torch.tensor(imgs)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("q_len", [None, 5])
def test_backends_match_reference_forward(seed: int, q_len: int | None):
    g = torch.Generator().manual_seed(seed)
    b, hq, hkv, s, d = 2, 4, 2, 40, 16
    doc, img = random_ids(b, s, g)
    mask = AttentionMask(doc, img, q_len=q_len)
    sq = s if q_len is None else q_len
    q = torch.randn(b, hq, sq, d, generator=g)
    k, v = torch.randn(2, b, hkv, s, d, generator=g)
    ref = attend(q, k, v, mask, "reference")
    assert torch.isfinite(ref).all()
    for backend in ("sdpa", "flex"):
        out = attend(q, k, v, mask, backend)
        torch.testing.assert_close(out, ref, atol=FP32_TOL, rtol=0, msg=f"backend {backend}")


def test_kv_cache_rows_equal_full_sequence_rows():
    g = torch.Generator().manual_seed(7)
    b, h, s, d, q_len = 2, 2, 32, 8, 6
    doc, img = random_ids(b, s, g)
    q, k, v = torch.randn(3, b, h, s, d, generator=g)
    full = attend(q, k, v, AttentionMask(doc, img), "sdpa")
    tail = attend(q[:, :, -q_len:], k, v, AttentionMask(doc, img, q_len=q_len), "sdpa")
    torch.testing.assert_close(tail, full[:, :, -q_len:], atol=FP32_TOL, rtol=0)
    torch.testing.assert_close(dense_mask(doc, img, q_len), dense_mask(doc, img)[:, :, -q_len:], atol=0, rtol=0)


def test_gqa_equals_repeated_kv_heads():
    g = torch.Generator().manual_seed(3)
    b, hq, hkv, s, d = 2, 6, 2, 24, 8
    doc, img = random_ids(b, s, g)
    mask = AttentionMask(doc, img)
    q = torch.randn(b, hq, s, d, generator=g)
    k, v = torch.randn(2, b, hkv, s, d, generator=g)
    k_rep, v_rep = (t.repeat_interleave(hq // hkv, dim=1) for t in (k, v))
    for backend in ("reference", "sdpa", "flex"):
        torch.testing.assert_close(attend(q, k, v, mask, backend), attend(q, k_rep, v_rep, mask, backend),
                                   atol=FP32_TOL, rtol=0, msg=f"backend {backend}")


def test_sdpa_backward_matches_reference():
    g = torch.Generator().manual_seed(11)
    b, hq, hkv, s, d = 2, 4, 2, 32, 8
    doc, img = random_ids(b, s, g)
    mask = AttentionMask(doc, img)
    inputs = [torch.randn(b, hq, s, d, generator=g), *torch.randn(2, b, hkv, s, d, generator=g)]
    upstream = torch.randn(b, hq, s, d, generator=g)
    grads = {}
    for backend in ("reference", "sdpa"):
        leaves = [t.clone().requires_grad_() for t in inputs]
        (attend(*leaves, mask, backend) * upstream).sum().backward()
        grads[backend] = [t.grad for t in leaves]
    for name, ref, got in zip("qkv", grads["reference"], grads["sdpa"]):
        torch.testing.assert_close(got, ref, atol=FP32_TOL, rtol=0, msg=f"d{name}")


def test_core_attention_module_and_errors():
    doc, img = build_ids(DOCS, pad=PAD)
    s = doc.shape[1]
    mask = AttentionMask(doc, img)
    core = CoreAttention(num_heads=4, num_kv_heads=2, head_dim=8, backend="sdpa")
    q, k = torch.randn(1, 4, s, 8), torch.randn(1, 2, s, 8)
    torch.testing.assert_close(core(q, k, k, mask), attend(q, k, k, mask, "reference"), atol=FP32_TOL, rtol=0)
    with pytest.raises(ValueError, match="hq=4, hkv=3"):
        attend(q, torch.randn(1, 3, s, 8), torch.randn(1, 3, s, 8), mask)
    with pytest.raises(ValueError, match="num_heads a multiple of num_kv_heads"):
        CoreAttention(num_heads=4, num_kv_heads=3, head_dim=8)
    with pytest.raises(ValueError, match="q_len=0"):
        AttentionMask(doc, img, q_len=0)
    with pytest.raises(ValueError, match="unknown attention backend 'xformers'"):
        attend(q, k, k, mask, "xformers")  # type: ignore[arg-type]


def test_te_backend_is_refused_naming_flex():
    """TE's DotProductAttention runs an arbitrary mask unfused (the full score matrix saved per layer): refused, on
    any machine, with the alternative named."""
    with pytest.raises(ValueError, match="use 'flex'") as info:
        CoreAttention(num_heads=2, num_kv_heads=1, head_dim=8, backend="te")  # type: ignore[arg-type]
    assert "\n" not in str(info.value)
    g = torch.Generator().manual_seed(5)
    doc, img = random_ids(1, 8, g)
    q = torch.randn(1, 2, 8, 8, generator=g)
    with pytest.raises(ValueError, match="use 'flex'"):
        attend(q, q, q, AttentionMask(doc, img), "te")  # type: ignore[arg-type]
