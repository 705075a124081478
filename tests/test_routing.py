"""Routing metadata: tokens grouped stably by id, −1 dropped, per-example ids expanded."""
import pytest
import torch

from xlsparse import routing


def test_groups_are_stable_and_drop_unrouted():
    ids = torch.tensor([2, -1, 0, 2, 0, -1, 1, 2])
    g = routing.TokenGroups.build(ids, 4)
    assert g.counts.tolist() == [2, 1, 3, 0]
    assert g.offsets.tolist() == [0, 2, 3, 6, 6]
    assert g.order.tolist() == [2, 4, 6, 0, 3, 7]
    assert g.active() == [0, 1, 2]


def test_per_example_ids_expand_once_and_cache():
    with routing.use(torch.tensor([1, 0, -1]), 2) as r:
        assert routing.current() is r
        g = r.tokens(12)
        assert g.ids.tolist() == [1] * 4 + [0] * 4 + [-1] * 4
        assert r.tokens(12) is g
    assert routing.current() is None


@pytest.mark.parametrize("ids,n,exc", [([0, 5], 2, IndexError), ([0, -2], 2, IndexError)])
def test_bad_ids(ids, n, exc):
    with pytest.raises(exc):
        routing.TokenGroups.build(torch.tensor(ids), n)


def test_shape_mismatch():
    with pytest.raises(ValueError, match="divide"):
        routing.Routing(torch.tensor([0, 1, 0]), 2).tokens(8)
