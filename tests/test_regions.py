"""`build_regions`: the batched grouping of tokens by their column of mask values equals grouping sample by sample."""

from __future__ import annotations

import pytest
import torch

from moviepostproduction.compose.conditioning import build_regions


def regions_per_sample(masks: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: one torch.unique per sample (what build_regions did before it was batched)."""
    b, r, n = masks.shape
    index = torch.zeros(b, n, dtype=torch.long)
    found = []
    for i in range(b):
        uniq, inverse = torch.unique(masks[i].T, dim=0, return_inverse=True)  # (U_i, R), (N,)
        index[i] = inverse
        found.append(uniq)
    region_masks = masks.new_zeros(b, max(x.shape[0] for x in found), r)
    for i, uniq in enumerate(found):
        region_masks[i, : uniq.shape[0]] = uniq
    return index, region_masks * weights[:, None, :]


def random_masks(b: int, r: int, n: int, soft: bool, gen: torch.Generator) -> torch.Tensor:
    masks = (torch.rand(b, r, n, generator=gen) < 0.4).float()  # (B, R, N) overlapping boxes
    if soft:  # a few distinct soft values, so columns repeat
        masks = masks * torch.randint(1, 4, (b, r, n), generator=gen).float() / 4
    masks[0] = 0  # a sample without any box: one region
    return masks


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_batched_regions_equal_the_per_sample_grouping(soft, dtype):
    gen = torch.Generator().manual_seed(3)
    masks = random_masks(5, 3, 40, soft, gen).to(dtype)
    weights = torch.rand(5, 3, generator=gen).to(dtype)
    got = build_regions(masks, weights)
    index, coef = regions_per_sample(masks, weights)
    assert torch.equal(got.index, index)
    assert got.coef.dtype == dtype and torch.equal(got.coef, coef)
    assert got.coef.shape[1] == int(got.index.max()) + 1  # padded to the largest sample's region count


def test_regions_of_a_batch_do_not_depend_on_the_other_samples():
    gen = torch.Generator().manual_seed(4)
    masks, weights = random_masks(4, 2, 30, True, gen), torch.rand(4, 2, generator=gen)
    whole = build_regions(masks, weights)
    for i in range(4):
        alone = build_regions(masks[i : i + 1], weights[i : i + 1])
        assert torch.equal(whole.index[i], alone.index[0])
        u = alone.coef.shape[1]
        assert torch.equal(whole.coef[i, :u], alone.coef[0])
        assert not whole.coef[i, u:].any()  # padding rows are zero


def test_a_batch_is_grouped_by_one_unique_call(monkeypatch):
    """torch.unique synchronises a GPU with the host: once per forward, not once per sample (training batches of 256
    made that 1024 synchronisations per step, docs/toy-model.md "A GPU session")."""
    calls = []
    unique = torch.unique
    monkeypatch.setattr(torch, "unique", lambda *a, **k: calls.append(1) or unique(*a, **k))
    gen = torch.Generator().manual_seed(5)
    build_regions(random_masks(64, 3, 16, False, gen), torch.rand(64, 3, generator=gen))
    assert len(calls) == 1


def test_regions_keep_the_gradient_of_the_weights():
    masks = torch.tensor([[[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]]])  # (1, 2, 3): regions {0}, {0, 1}, {1}
    weights = torch.tensor([[0.3, 0.6]], requires_grad=True)
    got = build_regions(masks, weights)
    got.coef.sum().backward()
    assert torch.equal(weights.grad, torch.tensor([[2.0, 2.0]]))  # each ref is in two of the three regions
    assert got.index.tolist() == [[1, 2, 0]]  # regions in lexicographic order of their mask columns


def test_no_refs_and_no_samples_give_empty_region_maps():
    none = build_regions(torch.zeros(2, 0, 5), torch.zeros(2, 0))
    assert none.index.shape == (2, 5) and not none.index.any() and none.coef.shape == (2, 1, 0)
    empty = build_regions(torch.zeros(0, 2, 5), torch.zeros(0, 2))
    assert empty.index.shape == (0, 5) and empty.coef.shape == (0, 1, 2)
