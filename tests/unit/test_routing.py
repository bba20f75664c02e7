"""RoutingPlan: permutation, inverse, counts and padding against direct definitions."""

import pytest
import torch

from megatron_ext.routing import IMAGE, TEXT, RoutingPlan


def _ids(kind: str, s: int = 13, b: int = 3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return {
        "mixed": (torch.rand(s, b, generator=gen) < 0.3).long(),
        "all_text": torch.zeros(s, b, dtype=torch.long),
        "all_image": torch.ones(s, b, dtype=torch.long),
        "empty": torch.zeros(0, b, dtype=torch.long),
    }[kind]


@pytest.mark.parametrize("kind", ["mixed", "all_text", "all_image", "empty"])
@pytest.mark.parametrize("pad", [1, 4, 16])
def test_plan_groups_and_inverts(kind, pad):
    ids = _ids(kind)
    plan = RoutingPlan.build(ids, pad_multiple=pad)
    flat = ids.reshape(-1)
    assert plan.counts == (int((flat == TEXT).sum()), int((flat == IMAGE).sum()))
    assert all(p % pad == 0 and p - c < pad and p >= c for c, p in zip(plan.counts, plan.padded_counts))
    x = torch.randn(flat.numel(), 5)
    xg = plan.group(x)
    assert xg.shape[0] == sum(plan.padded_counts)
    off = plan.offsets
    for m in (TEXT, IMAGE):
        rows = xg[off[m]: off[m] + plan.counts[m]]
        # stable: the group's tokens in sequence order
        assert torch.equal(rows, x[flat == m])
        assert torch.count_nonzero(xg[off[m] + plan.counts[m]: off[m + 1]]) == 0  # padding is zero
    assert torch.equal(plan.ungroup(xg), x)
    assert sorted(m for m, _ in plan.group_slices()) == [m for m in (TEXT, IMAGE) if plan.counts[m]]


def test_single_modality_detection():
    assert RoutingPlan.build(_ids("all_text")).single_modality == TEXT
    assert RoutingPlan.build(_ids("all_image")).single_modality == IMAGE
    assert RoutingPlan.build(_ids("mixed")).single_modality is None
    assert RoutingPlan.build(_ids("all_text"), pad_multiple=16).single_modality is None  # padded: not a no-op
    split = torch.zeros(13, 3, dtype=torch.bool)
    split[5:] = True  # later text marked no-dgrad goes first: a real permutation
    assert RoutingPlan.build(_ids("all_text"), no_dgrad=split).single_modality is None
    everything = torch.ones(13, 3, dtype=torch.bool)  # all marked: the identity order
    assert RoutingPlan.build(_ids("all_text"), no_dgrad=everything).single_modality == TEXT


def test_local_ids_split_sequence():
    ids = _ids("mixed", s=8, b=2)
    plan = RoutingPlan.build(ids)
    parts = [plan.local_modality_ids(r, 4) for r in range(4)]
    assert torch.equal(torch.cat(parts), ids.reshape(-1))
    with pytest.raises(ValueError, match="sequence length 8 is not divisible by tensor-parallel size 3"):
        plan.local_modality_ids(0, 3)


@pytest.mark.parametrize("ids,needle", [
    (torch.tensor([0, 1, 2]), "modality id 2"),
    (torch.tensor([0, -3]), "modality id -3"),
    (torch.tensor([0.0, 1.0]), "integer tensor"),
    (torch.zeros(2, 2, 2, dtype=torch.long), "shape (2, 2, 2)"),
])
def test_bad_ids(ids, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        RoutingPlan.build(ids)


def test_bad_pad_and_shapes():
    with pytest.raises(ValueError, match="pad_multiple"):
        RoutingPlan.build(torch.zeros(3, dtype=torch.long), pad_multiple=0)
    plan = RoutingPlan.build(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="covers 3 tokens"):
        plan.group(torch.zeros(4, 2))


@pytest.mark.parametrize("pad", [1, 16])
def test_no_dgrad_text_leads_its_group_and_routed_linear_skips_only_its_data_gradient(pad):
    from megatron_ext.linear import routed_linear

    ids = _ids("mixed")
    gen = torch.Generator().manual_seed(1)
    skip = torch.rand(ids.shape, generator=gen) < 0.5
    plan = RoutingPlan.build(ids, pad_multiple=pad, no_dgrad=skip)
    flat, marked = ids.reshape(-1), skip.reshape(-1) & (ids.reshape(-1) == TEXT)
    assert plan.text_no_dgrad == int(marked.sum()) > 0
    x = torch.randn(flat.numel(), 5, generator=gen)
    xg, off = plan.group(x), plan.offsets
    # Marked text first, then the other text, each in sequence order; image group unchanged; inverse exact.
    assert torch.equal(xg[off[TEXT]: off[TEXT] + plan.text_no_dgrad], x[marked])
    assert torch.equal(xg[off[TEXT] + plan.text_no_dgrad: off[TEXT] + plan.counts[TEXT]], x[(flat == TEXT) & ~marked])
    assert torch.equal(xg[off[IMAGE]: off[IMAGE] + plan.counts[IMAGE]], x[flat == IMAGE])
    assert torch.equal(plan.ungroup(xg), x)

    w_text, w_image = torch.randn(7, 5, generator=gen), torch.randn(7, 5, generator=gen, requires_grad=True)
    xr = x.clone().requires_grad_(True)
    dy = torch.randn(flat.numel(), 7, generator=gen)
    routed_linear(xr, plan, (w_text, w_image)).backward(dy)
    w = torch.where((flat == TEXT)[:, None, None], w_text, w_image.detach())  # (n, 7, 5) per-token weight
    dx_ref = torch.einsum("no,noi->ni", dy, w)
    torch.testing.assert_close(xr.grad[~marked], dx_ref[~marked])
    assert torch.count_nonzero(xr.grad[marked]) == 0  # skipped: zeros, not computed
    torch.testing.assert_close(w_image.grad, dy[flat == IMAGE].t() @ x[flat == IMAGE])


def test_no_dgrad_must_match_the_ids():
    with pytest.raises(ValueError, match=r"no_dgrad must be a bool tensor shaped like modality_ids \(13, 3\)"):
        RoutingPlan.build(_ids("mixed"), no_dgrad=torch.zeros(13, dtype=torch.bool))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("pad", [1, 16])
def test_shard_modality_against_the_ids(seed, pad):
    """The host-side shard modality equals what the ids say, for every SP shard, whatever the image layout."""
    gen = torch.Generator().manual_seed(seed)
    s, b = 16, 2
    ids = torch.zeros(s, b, dtype=torch.long)
    for _ in range(seed % 3 + 1):  # a few image blocks of random length, anywhere
        start, length, row = (int(torch.randint(lo, hi, (1,), generator=gen)) for lo, hi in ((0, s), (1, 7), (0, b)))
        ids[start:start + length, row] = IMAGE
    if seed == 5:
        ids[:] = IMAGE
    plan = RoutingPlan.build(ids, pad_multiple=pad)
    for tp in (1, 2, 4, 8):
        for rank in range(tp):
            present = torch.unique(ids[rank * s // tp:(rank + 1) * s // tp]).tolist()
            assert plan.shard_modality(rank, tp) == (present[0] if len(present) == 1 else None), (rank, tp, ids)
    flat = RoutingPlan.build(ids.reshape(-1))
    assert flat.shard_modality() == plan.shard_modality()
    with pytest.raises(ValueError, match=r"needs a plan built from \(s, b\) modality ids"):
        flat.shard_modality(0, 2)
    assert RoutingPlan.build(_ids("empty")).shard_modality(0, 2) is None
