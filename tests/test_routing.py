"""Routing metadata: tokens grouped stably by id, −1 dropped, per-example ids expanded."""
import pytest
import torch

from xlsparse import functional, routing


def test_groups_are_stable_and_drop_unrouted():
    ids = torch.tensor([2, -1, 0, 2, 0, -1, 1, 2])
    g = routing.TokenGroups.build(ids, 4)
    assert g.counts.tolist() == [2, 1, 3, 0] and g.host_counts == (2, 1, 3, 0)
    assert g.offsets.tolist() == [0, 2, 3, 6, 6]
    assert g.order.tolist() == [2, 4, 6, 0, 3, 7]
    assert g.active() == [0, 1, 2]


def test_per_example_ids_expand_once_and_cache():
    with routing.use(torch.tensor([1, 0, -1]), 2) as r:
        assert routing.current() is r
        g = r.tokens((3, 4))
        assert g.ids.tolist() == [1] * 4 + [0] * 4 + [-1] * 4
        assert r.tokens((3, 4)) is g
    assert routing.current() is None


def test_per_token_ids_keep_their_order():
    ids = torch.tensor([[0, 1, -1], [1, 1, 0]])
    assert routing.Routing(ids, 2).tokens((2, 3)).ids.tolist() == [0, 1, -1, 1, 1, 0]
    # a layer that sees the tokens flattened ([T, H]) gets the same row-major ids
    assert routing.Routing(ids, 2).tokens((6,)).ids.tolist() == [0, 1, -1, 1, 1, 0]


@pytest.mark.parametrize("ids,n,exc", [([0, 5], 2, IndexError), ([0, -2], 2, IndexError)])
def test_bad_ids(ids, n, exc):
    with pytest.raises(exc):
        routing.TokenGroups.build(torch.tensor(ids), n)


@pytest.mark.parametrize("ids", [torch.tensor([0.9, 1.0]), torch.tensor([True, False])])
def test_float_and_bool_ids_are_refused_not_truncated(ids):
    # multi_delta_linear(route=[0.9, ...]) sent the token to delta 0
    with pytest.raises(TypeError, match="ids must be integers"):
        routing.TokenGroups.build(ids, 2)
    with pytest.raises(TypeError, match="ids must be integers"):
        functional.multi_delta_linear(torch.randn(2, 3), torch.randn(4, 3), None, [torch.tensor([0]), torch.tensor([1])],
                                      [torch.randn(1), torch.randn(1)], route=ids)


@pytest.mark.parametrize("ids,lead", [
    ([0, 1], (4, 3)),            # 2 example ids for a batch of 4: 12 tokens divide by 2, still wrong
    ([0, 1, 0, 1, 0, 1], (2, 3)),  # as many ids as tokens, but given per example
    ([[0, 1, 0], [1, 0, 1]], (3, 2)),  # per-token ids of the transposed shape
])
def test_ids_of_the_wrong_shape_name_both_shapes(ids, lead):
    with pytest.raises(ValueError, match=r"route: language ids of shape .* fit neither"):
        routing.Routing(torch.tensor(ids), 2).tokens(lead)


@pytest.mark.parametrize("lead,hint", [
    ((4, 3), r"generate\(num_beams=.*language_ids=ids"),  # generate's beams repeat the examples
    ((6,), r"flattened: give one id per token \[B, S\]"),  # OPT's feed-forward sees [B * S, H]
])
def test_the_shape_error_says_what_repeated_or_flattened_the_rows(lead, hint):
    with pytest.raises(ValueError, match=hint):
        routing.Routing(torch.tensor([0, 1]), 2).tokens(lead)


def test_empty_ids():
    with pytest.raises(ValueError, match="empty"):
        routing.Routing(torch.zeros(0, dtype=torch.long), 2).tokens((2, 3))
