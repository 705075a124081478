"""Routing metadata: tokens grouped stably by id, −1 dropped, per-example ids expanded."""
import pytest
import torch

import xlsparse
from xlsparse import functional, routing
from xlsparse import nn as xnn


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


@pytest.mark.parametrize("ids,n,exc", [([0, 5], 2, IndexError), ([0, -2], 2, IndexError), ([3, 3], 3, IndexError)])
def test_bad_ids(ids, n, exc):
    """Read back with the counts in one go: the range check still names both ends."""
    lo, hi = min(ids), max(ids)
    with pytest.raises(exc, match=rf"ids must lie in \[-1, {n}\), got min {lo}, max {hi}"):
        routing.TokenGroups.build(torch.tensor(ids), n)


def test_groups_of_no_tokens():
    g = routing.TokenGroups.build(torch.zeros(0, dtype=torch.long), 3)
    assert g.host_counts == (0, 0, 0) and g.counts.tolist() == [0, 0, 0] and g.order.numel() == 0
    assert g.offsets.tolist() == [0, 0, 0, 0] and g.active() == []


@pytest.mark.parametrize("bad", [2, -2])
def test_a_compiled_routed_layer_refuses_ids_out_of_range(bad):
    """Under torch.compile the host check is skipped: id 2 of a two-delta layer (or -2) ran the
    base alone, silently (eager raises IndexError)."""
    torch.manual_seed(0)
    deltas = {n: xlsparse.SparseDelta.from_dense(torch.randn(6, 8), k=10) for n in ("a", "b")}
    layer = xnn.MultiDeltaLinear.from_linear(torch.nn.Linear(8, 6), deltas).eval()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x = torch.randn(4, 8)
    with torch.no_grad():
        ok = compiled(x, route=torch.tensor([0, 1, -1, 1]))
        torch.testing.assert_close(ok[2], layer.weight @ x[2] + layer.bias)  # -1: the base alone
        with pytest.raises(RuntimeError, match=r"ids must lie in \[-1, 2\)"):
            compiled(x, route=torch.tensor([0, 1, bad, 1]))
        with xlsparse.routing.use(torch.tensor([0, bad, 1, -1]), 2), pytest.raises(RuntimeError, match="ids must lie"):
            compiled(x)


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
    ((1, 8), r"one input shared by the batch's examples"),  # DeBERTa's relative-position rows
])
def test_the_shape_error_says_what_repeated_or_flattened_the_rows(lead, hint):
    with pytest.raises(ValueError, match=hint):
        routing.Routing(torch.tensor([0, 1]), 2).tokens(lead)


def test_empty_ids():
    with pytest.raises(ValueError, match="empty"):
        routing.Routing(torch.zeros(0, dtype=torch.long), 2).tokens((2, 3))
    # two examples of no token: empty ids fit neither them nor their tokens (a ZeroDivisionError in the hint)
    with pytest.raises(ValueError, match=r"language ids of shape \[0\] fit neither the batch's examples \[2\]"):
        routing.Routing(torch.zeros(0, dtype=torch.long), 2).tokens((2, 0))


@pytest.mark.parametrize("lead", [(0,), (0, 5)])
def test_an_empty_batch_with_empty_ids_gives_an_empty_output_as_nn_linear_does(lead):
    """Zero tokens with zero language ids: SubnetworkLinear and MultiDeltaLinear return an empty
    output (and zero gradients), as the nn.Linear they replace does, instead of raising."""
    gen = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(6, 4)
    masks = {lang: torch.rand(4, 6, generator=gen) < 0.5 for lang in ("de", "fr")}
    subnet = xnn.SubnetworkLinear.from_linear(linear, masks)
    deltas = {lang: xlsparse.SparseDelta(i, torch.randn(i.numel(), generator=gen), (4, 6))
              for lang, i in (("de", torch.tensor([1, 7])), ("fr", torch.tensor([0, 9, 20])))}
    multi = xnn.MultiDeltaLinear.from_linear(linear, deltas)
    ids = torch.zeros(0, dtype=torch.long)
    for layer, call in ((subnet, lambda x: subnet(x, ids)),
                        (multi, lambda x: multi(x, route=routing.Routing(ids, 2).tokens(x.shape[:-1])))):
        x = torch.randn(*lead, 6, requires_grad=True)
        y = call(x)
        assert y.shape == (*lead, 4)
        y.sum().backward()
        assert x.grad.shape == x.shape
        assert all(p.grad is None or not p.grad.any() for p in layer.parameters())
    assert torch.equal(routing.Routing(ids, 2).tokens(lead).order, torch.zeros(0, dtype=torch.long))


def test_per_token_ids_route_a_layer_of_one_row_per_example_by_each_example_s_id():
    """A pooled head (BERT's pooler, a sequence classifier's dense) sees [B, H]: per-token ids whose
    every example holds one id route its row to that id (a one-language batch routed per token, as
    the meta-learning recipes route it, raised "fit neither"); an example of several ids still raises."""
    ids = torch.tensor([[1, 1, 1], [0, 0, 0], [-1, -1, -1], [1, 1, 1]])
    groups = routing.Routing(ids, 2).tokens((4,))
    assert torch.equal(groups.ids, torch.tensor([1, 0, -1, 1]))
    assert torch.equal(groups.order, torch.tensor([1, 0, 3])) and groups.host_counts == (1, 2)
    mixed = torch.tensor([[1, 1, 0], [0, 0, 0]])
    with pytest.raises(ValueError, match=r"fit neither.*one row per example \(a pooled head\)"):
        routing.Routing(mixed, 2).tokens((2,))
    assert torch.equal(routing.Routing(mixed, 2).tokens((2, 3)).ids, mixed.reshape(-1))  # the tokens themselves
