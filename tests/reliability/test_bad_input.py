"""Bad-input battery: every public op and class, on every CPU backend, rejects bad shapes, dtypes,
devices, indices (unsorted, duplicate, negative, out of range, beyond int32), K > N and
mismatched diffs/models with ValueError / TypeError / IndexError (KeyError for a missing
parameter name) whose message names the argument, and writes nothing when it does.

A "meta" tensor stands in for a tensor on another device. Non-contiguous and empty inputs must
either be handled (same result as the contiguous / trivial case) or rejected cleanly.
"""
import pytest
import torch

import xlsparse
from xlsparse import functional, nn as xnn
from xlsparse.ops import compose as cops, matmul as mops, optim as oops
from xlsparse.optim import MaskedAdamW, MaskedSGD

from conftest import assert_bit_identical, cpu_backends

BIG = 2**32 + 3  # cast to int32 this becomes 3: a truncating kernel would write a wrong, in-range entry


def rejected(call, exc, match, mutated=()):
    """`call()` raises `exc` matching `match`, and every tensor in `mutated` keeps its bits."""
    before = [t.detach().clone() for t in mutated]
    with pytest.raises(exc, match=match):
        call()
    for t, b in zip(mutated, before):
        assert_bit_identical(t.detach(), b, "written by a rejected call")


def case(name, op, call, exc, match, mutated=()):
    return pytest.param(op, call, exc, match, mutated, id=name)


def _cases():
    g = torch.Generator().manual_seed(0)
    d = torch.randn(12, generator=g)
    i, v = torch.tensor([1, 5, 9]), torch.randn(3, generator=g)
    # --- composition ---
    out = [
        case("axpy meta indices", "sparse_axpy_", lambda: cops.sparse_axpy_(d, i.to("meta"), v), ValueError, "device", [d]),
        case("axpy meta values", "sparse_axpy_", lambda: cops.sparse_axpy_(d, i, v.to("meta")), ValueError, "device", [d]),
        case("axpy int64 beyond int32", "sparse_axpy_", lambda: cops.sparse_axpy_(d, torch.tensor([1, BIG]), v[:2]),
             IndexError, "out of range", [d]),
        case("axpy negative", "sparse_axpy_", lambda: cops.sparse_axpy_(d, torch.tensor([-2, 1, 3]), v), IndexError,
             "out of range", [d]),
        case("axpy K > N", "sparse_axpy_", lambda: cops.sparse_axpy_(d, torch.arange(13), torch.randn(13)), IndexError,
             "out of range", [d]),
        case("axpy bool indices", "sparse_axpy_", lambda: cops.sparse_axpy_(d, i.bool(), v), TypeError, "indices", [d]),
        case("apply target", "apply_diffs_", lambda: cops.apply_diffs_([d], [i], [v], [1], [1.0]), IndexError, "target", [d]),
        case("apply lengths", "apply_diffs_", lambda: cops.apply_diffs_([d], [i], [v, v], [0], [1.0]), ValueError,
             "one entry each", [d]),
        case("apply alphas", "apply_diffs_", lambda: cops.apply_diffs_([d], [i], [v], [0], []), ValueError, "alphas", [d]),
        case("apply second entry bad", "apply_diffs_",
             lambda: cops.apply_diffs_([d], [i, torch.tensor([3, 2])], [v, v[:2]], [0, 0], [1.0, 1.0]), ValueError,
             "entry 1", [d]),
        case("apply mixed index dtypes", "apply_diffs_",
             lambda: cops.apply_diffs_([d], [i, i.int()], [v, v], [0, 0], [1.0, 1.0]), TypeError, "index dtype", [d]),
        case("apply beyond int32", "apply_diffs_",
             lambda: cops.apply_diffs_([d], [torch.tensor([0, BIG])], [v[:2]], [0], [1.0]), IndexError, "out of range", [d]),
        case("apply meta", "apply_diffs_", lambda: cops.apply_diffs_([d], [i], [v.to("meta")], [0], [1.0]), ValueError,
             "device", [d]),
        case("restore saved shape", "restore_diffs_", lambda: cops.restore_diffs_([d], [i], [v[:2]], [0]), ValueError,
             "entries", [d]),
        case("restore unsorted", "restore_diffs_", lambda: cops.restore_diffs_([d], [i.flip(0)], [v], [0]), ValueError,
             "sorted", [d]),
        case("merge none", "merge_deltas", lambda: cops.merge_deltas([], [], [], 12), ValueError, "at least one"),
        case("merge weights", "merge_deltas", lambda: cops.merge_deltas([i], [v], [1.0, 2.0], 12), ValueError, "weights"),
        case("merge out of range", "merge_deltas", lambda: cops.merge_deltas([i], [v], [1.0], 9), IndexError,
             "out of range"),
        case("merge duplicate", "merge_deltas", lambda: cops.merge_deltas([torch.tensor([2, 2])], [v[:2]], [1.0], 12),
             ValueError, "sorted and unique"),
        case("merge index dtypes", "merge_deltas", lambda: cops.merge_deltas([i, i.int()], [v, v], [1.0, 1.0], 12),
             TypeError, "index dtype"),
        case("merge value dtypes", "merge_deltas", lambda: cops.merge_deltas([i, i], [v, v.double()], [1.0, 1.0], 12),
             TypeError, "dtype"),
        case("merge meta", "merge_deltas", lambda: cops.merge_deltas([i, i.to("meta")], [v, v], [1.0, 1.0], 12),
             ValueError, "device"),
        case("topk K > N", "topk_masks", lambda: cops.topk_masks([d, d], 25), ValueError, "k = 25"),
        case("topk negative k", "topk_masks", lambda: cops.topk_masks([d], -1), ValueError, "k = -1"),
        case("topk NaN", "topk_masks", lambda: cops.topk_masks([d, torch.tensor([1.0, float("nan")])], 3), ValueError,
             "NaN"),
        case("topk int tensor", "topk_masks", lambda: cops.topk_masks([torch.arange(4)], 1), TypeError, "floating"),
        case("topk dtypes", "topk_masks", lambda: cops.topk_masks([d, d.double()], 1), TypeError, "dtype"),
        case("topk meta", "topk_masks", lambda: cops.topk_masks([d, d.to("meta")], 1), ValueError, "device"),
        case("topk_mask K > N", "topk_masks", lambda: functional.topk_mask([d], 13), ValueError, "k = 13"),
    ]
    # --- matmul ---
    x, dy = torch.randn(4, 3, generator=g), torch.randn(4, 5, generator=g)
    idx, vals = torch.tensor([0, 4, 9]), torch.randn(3, generator=g)
    w, b = torch.randn(5, 3, generator=g), torch.randn(5, generator=g)
    y = torch.randn(4, 5, generator=g)
    out += [
        case("sddmm negative", "sddmm", lambda: mops.sddmm(dy, x, torch.tensor([-1, 4])), IndexError, "out of range"),
        case("sddmm beyond int32", "sddmm", lambda: mops.sddmm(dy, x, torch.tensor([0, BIG])), IndexError, "out of range"),
        case("sddmm 1-D x", "sddmm", lambda: mops.sddmm(dy, x[0], idx), ValueError, "2-D"),
        case("sddmm int", "sddmm", lambda: mops.sddmm(dy.int(), x.int(), idx), TypeError, "floating"),
        # the backend follows x's device: a meta grad_out is the mismatch a forced backend still sees
        case("sddmm meta grad_out", "sddmm", lambda: mops.sddmm(dy.to("meta"), x, idx), ValueError, "device"),
        case("sddmm token_index dtype", "sddmm", lambda: mops.sddmm(dy, x, idx, torch.tensor([0, 1]).int()), TypeError,
             "token_index"),
        case("sddmm negative token", "sddmm", lambda: mops.sddmm(dy, x, idx, torch.tensor([-1, 1])), IndexError, "token"),
        case("spmm negative", "spmm_", lambda: mops.spmm_(y, x, torch.tensor([-1, 4]), vals[:2]), IndexError,
             "out of range", [y]),
        case("spmm beyond int32", "spmm_", lambda: mops.spmm_(y, x, torch.tensor([0, BIG]), vals[:2]), IndexError,
             "out of range", [y]),
        case("spmm unsorted", "spmm_", lambda: mops.spmm_(y, x, idx.flip(0), vals), ValueError, "sorted", [y]),
        case("spmm tokens", "spmm_", lambda: mops.spmm_(y, x[:3], idx, vals), ValueError, "token counts", [y]),
        case("spmm meta values", "spmm_", lambda: mops.spmm_(y, x, idx, vals.to("meta")), ValueError, "values", [y]),
        case("spmm token out of range", "spmm_", lambda: mops.spmm_(y, x, idx, vals, torch.tensor([0, 4])), IndexError,
             "token", [y]),
        case("linear weight 1-D", "sddmm", lambda: functional.sparse_delta_linear(x, w[0], b, idx, vals), ValueError,
             "weight"),
        case("linear int weight", "sddmm",
             lambda: functional.sparse_delta_linear(x.long(), w.long(), None, idx, vals), TypeError, "weight"),
        case("linear out of range", "sddmm",
             lambda: functional.sparse_delta_linear(x, w, b, torch.tensor([0, 15]), vals[:2]), IndexError, "out of range"),
        case("linear unsorted", "sddmm", lambda: functional.sparse_delta_linear(x, w, b, idx.flip(0), vals), ValueError,
             "sorted"),
        case("linear beyond int32", "sddmm",
             lambda: functional.sparse_delta_linear(x, w, b, torch.tensor([0, BIG]), vals[:2]), IndexError, "out of range"),
        case("multi unsorted", "spmm_",
             lambda: functional.multi_delta_linear(x, w, b, [idx.flip(0)], [vals], route=torch.zeros(4, dtype=torch.long)),
             ValueError, "sorted"),
        case("multi gates int", "spmm_",
             lambda: functional.multi_delta_linear(x, w, b, [idx], [vals], gates=torch.ones(4, 1, dtype=torch.long)),
             TypeError, "gates"),
        case("multi route -2", "spmm_",
             lambda: functional.multi_delta_linear(x, w, b, [idx], [vals], route=torch.tensor([0, -2, 0, 0])), IndexError,
             "ids"),
        case("ensemble no experts", "ensemble_logprobs",
             lambda: functional.ensemble_logprobs(torch.randn(0, 2, 3), torch.randn(2, 0)), ValueError, "E > 0"),
        case("nll meta targets", "ensemble_nll",
             lambda: functional.ensemble_nll(torch.randn(2, 2, 3), torch.randn(2, 2), torch.tensor([0, 1]).to("meta")),
             ValueError, "targets must be on"),
        case("nll negative target", "ensemble_nll",
             lambda: functional.ensemble_nll(torch.randn(2, 2, 3), torch.randn(2, 2), torch.tensor([0, -1])), IndexError,
             "targets"),
    ]
    # --- optimizer steps ---
    p, gr = torch.randn(20, generator=g), torch.randn(20, generator=g)
    k = torch.tensor([2, 7, 11])
    m1, m2, st = torch.rand(3), torch.rand(3), torch.tensor(2.0)

    def adamw(params, grads, sel, m, v, steps):
        return lambda: oops.masked_adamw_(params, grads, sel, m, v, [], steps, [], lr=0.1, beta1=0.9, beta2=0.99,
                                          eps=1e-8, weight_decay=0.0)

    def sgd(params, grads, sel, buf, steps, momentum=0.9):
        return lambda: oops.masked_sgd_(params, grads, sel, buf, steps, lr=0.1, momentum=momentum)

    mut = [p, m1, m2, st]
    out += [
        case("adamw negative index", "masked_adamw_", adamw([p], [gr], [torch.tensor([-1, 2, 3])], [m1], [m2], [st]),
             IndexError, "out of range", mut),
        case("adamw beyond int32", "masked_adamw_", adamw([p], [gr], [torch.tensor([1, 2, BIG])], [m1], [m2], [st]),
             IndexError, "out of range", mut),
        case("adamw duplicate", "masked_adamw_", adamw([p], [gr], [torch.tensor([1, 2, 2])], [m1], [m2], [st]),
             ValueError, "sorted and unique", mut),
        case("adamw K > N", "masked_adamw_", adamw([p], [gr], [torch.arange(21)], [torch.rand(21)], [torch.rand(21)], [st]),
             ValueError, "more than", mut),
        case("adamw meta grad", "masked_adamw_", adamw([p], [gr.to("meta")], [k], [m1], [m2], [st]), ValueError, "grads",
             mut),
        case("adamw meta indices", "masked_adamw_", adamw([p], [gr], [k.to("meta")], [m1], [m2], [st]), ValueError,
             "indices", mut),
        case("adamw non-contiguous param", "masked_adamw_",
             adamw([torch.randn(20, 2)[:, 0]], [gr], [k], [m1], [m2], [st]), ValueError, "params", mut),
        case("adamw state dtype", "masked_adamw_", adamw([p], [gr], [k], [m1.double()], [m2], [st]), TypeError, "exp_avgs",
             mut),
        case("adamw second param bad", "masked_adamw_",
             adamw([p, p.clone()], [gr, gr[:3]], [k, k], [m1, m1.clone()], [m2, m2.clone()], [st, st.clone()]), ValueError,
             "grads\\[1\\]", mut),
        case("sgd unsorted", "masked_sgd_", sgd([p], [gr], [k.flip(0)], [m1], [st]), ValueError, "sorted", mut),
        case("sgd buffer size", "masked_sgd_", sgd([p], [gr], [k], [m1[:2]], [st]), ValueError, "momentum_buffers", mut),
        case("sgd mask shape", "masked_sgd_", sgd([p], [gr], [torch.ones(19, dtype=torch.bool)], [p.clone()], [st]),
             ValueError, "masks", mut),
        case("sgd meta step", "masked_sgd_", sgd([p], [gr], [k], [m1], [st.to("meta")]), ValueError, "steps", mut),
    ]
    # --- per-language weight gradient ---
    go, inp = torch.randn(6, 4, generator=g), torch.randn(6, 3, generator=g)
    masks = torch.rand(2, 4, 3, generator=g) > 0.5
    order, offsets = torch.arange(6), torch.tensor([0, 3, 6])
    out += [
        case("mmwg masks dtype", "multi_mask_weight_grad",
             lambda: oops.multi_mask_weight_grad(go, inp, masks.float(), order, offsets), TypeError, "masks"),
        case("mmwg masks shape", "multi_mask_weight_grad",
             lambda: oops.multi_mask_weight_grad(go, inp, masks[:, :3], order, offsets), ValueError, "masks"),
        case("mmwg order range", "multi_mask_weight_grad",
             lambda: oops.multi_mask_weight_grad(go, inp, masks, torch.tensor([0, 1, 2, 3, 4, 6]), offsets), IndexError,
             "order"),
        case("mmwg negative order", "multi_mask_weight_grad",
             lambda: oops.multi_mask_weight_grad(go, inp, masks, torch.tensor([0, 1, 2, 3, 4, -1]), offsets), IndexError,
             "order"),
        case("mmwg offsets", "multi_mask_weight_grad",
             lambda: oops.multi_mask_weight_grad(go, inp, masks, order, torch.tensor([0, 4, 3])), ValueError, "offsets"),
        case("mmwg offsets dtype", "multi_mask_weight_grad",
             lambda: oops.multi_mask_weight_grad(go, inp, masks, order, offsets.int()), TypeError, "offsets"),
        case("mmwg meta", "multi_mask_weight_grad",
             lambda: oops.multi_mask_weight_grad(go, inp.to("meta"), masks, order, offsets), ValueError, "device"),
        case("mmwg tokens", "multi_mask_weight_grad",
             lambda: oops.multi_mask_weight_grad(go, inp[:5], masks, order, offsets), ValueError, "same T"),
    ]
    return out


CASES = _cases()


def _backends_of(op):
    return [pytest.param(c.values[0], b, *c.values[1:], id=f"{c.id}-{b}") for c in CASES if c.values[0] == op
            for b in cpu_backends(op)]


@pytest.mark.parametrize("op,backend,call,exc,match,mutated",
                         [p for op in dict.fromkeys(c.values[0] for c in CASES) for p in _backends_of(op)])
def test_op_rejects_bad_input_and_writes_nothing(op, backend, call, exc, match, mutated, use_backend):
    use_backend(backend)
    rejected(call, exc, match, mutated)


# --- non-contiguous and empty inputs are handled like their contiguous / trivial twins ---

@pytest.mark.parametrize("backend", cpu_backends("sparse_axpy_"))
def test_non_contiguous_indices_and_values_are_handled(backend, use_backend):
    use_backend(backend)
    g = torch.Generator().manual_seed(1)
    dense = torch.randn(40, generator=g)
    idx = torch.tensor([[1, 0], [5, 0], [17, 0], [33, 0]])[:, 0]  # stride 2
    val = torch.randn(4, 2, generator=g)[:, 1]
    assert not idx.is_contiguous() and not val.is_contiguous()
    expect = dense.clone()
    cops.sparse_axpy_(expect, idx.contiguous(), val.contiguous(), 0.5)
    got = dense.clone()
    try:
        cops.sparse_axpy_(got, idx, val, 0.5)
    except ValueError as exc:  # rejecting is allowed, if it says why and writes nothing
        assert "contiguous" in str(exc)
        assert_bit_identical(got, dense, "rejected non-contiguous call")
        return
    assert_bit_identical(got, expect, "non-contiguous indices/values")


@pytest.mark.parametrize("backend", cpu_backends("sddmm"))
def test_non_contiguous_activations_are_handled(backend, use_backend):
    use_backend(backend)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 6, generator=g).t()  # [6, 3], non-contiguous
    dy = torch.randn(5, 6, generator=g).t()
    idx = torch.tensor([0, 4, 9, 14])
    vals = torch.randn(4, generator=g)
    w = torch.randn(5, 3, generator=g)
    assert_bit_identical(mops.sddmm(dy, x, idx), mops.sddmm(dy.contiguous(), x.contiguous(), idx), "sddmm")
    y = functional.sparse_delta_linear(x, w, None, idx, vals)
    assert_bit_identical(y, functional.sparse_delta_linear(x.contiguous(), w, None, idx, vals), "linear")
    out = torch.randn(5, 6, generator=g).t()  # [6, 5], non-contiguous
    before = out.clone()
    with pytest.raises(ValueError, match="out must be contiguous"):
        mops.spmm_(out, x, idx, vals)
    assert_bit_identical(out, before, "rejected spmm_")


@pytest.mark.parametrize("op", ["sparse_axpy_", "sddmm", "masked_adamw_", "topk_masks"])
def test_empty_tensors(op, use_backend):
    for backend in cpu_backends(op):
        use_backend(backend)
        e_idx, e_val = torch.zeros(0, dtype=torch.long), torch.zeros(0)
        if op == "sparse_axpy_":
            d = torch.randn(5)
            before = d.clone()
            cops.sparse_axpy_(d, e_idx, e_val)
            assert_bit_identical(d, before, "K = 0")
            cops.sparse_axpy_(torch.zeros(0), e_idx, e_val)
        elif op == "sddmm":
            assert mops.sddmm(torch.randn(3, 4), torch.randn(3, 2), e_idx).shape == (0,)
            assert torch.equal(mops.sddmm(torch.zeros(0, 4), torch.zeros(0, 2), torch.tensor([0, 7])), torch.zeros(2))
        elif op == "masked_adamw_":
            p = torch.randn(6)
            before = p.clone()
            oops.masked_adamw_([p], [torch.randn(6)], [e_idx], [e_val], [e_val.clone()], [], [torch.tensor(0.0)], [],
                               lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1)
            assert_bit_identical(p, before, "empty mask")
        else:
            (m,) = cops.topk_masks([torch.zeros(0)], 0)
            assert m.shape == (0,)
            assert cops.topk_masks([], 0) == []


# --- data classes and the model-facing API ---

def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))


def test_sparse_delta_rejects_bad_parts():
    v = torch.randn(3)
    bad = [
        ((torch.tensor([0, 2, 2]), v, (4, 4)), ValueError, "sorted and unique"),
        ((torch.tensor([3, 2, 5]), v, (4, 4)), ValueError, "sorted and unique"),
        ((torch.tensor([-1, 2, 5]), v, (4, 4)), IndexError, "indices\\[0\\] = -1"),
        ((torch.tensor([0, 2, 16]), v, (4, 4)), IndexError, "indices\\[2\\] = 16"),
        ((torch.tensor([0, 2, BIG]), v, (4, 4)), IndexError, f"{BIG}"),
        ((torch.tensor([0.0, 2.0, 5.0]), v, (4, 4)), TypeError, "integer"),
        ((torch.tensor([0, 2, 5]), v.long(), (4, 4)), TypeError, "floating"),
        ((torch.tensor([0, 2]), v, (4, 4)), ValueError, "2 indices but 3 values"),
        ((torch.tensor([0, 2, 5]), v, (4, -4)), ValueError, "negative"),
        ((torch.tensor([0, 2, 5]), v, "4x4"), TypeError, "shape"),
        ((torch.tensor([0, 2, 5]), v, (2**40, 2**40)), ValueError, "more than int64"),
        ((torch.tensor([0, 2, 5]), v.to("meta"), (4, 4)), ValueError, "meta"),
        ((torch.tensor([[0, 2, 5]]), v, (4, 4)), ValueError, "1-D"),
    ]
    for args, exc, match in bad:
        with pytest.raises(exc, match=match):
            xlsparse.SparseDelta(*args)
    with pytest.raises(TypeError, match="'w'"):
        xlsparse.SparseDiff({"w": (torch.tensor([0]), torch.ones(1))})
    with pytest.raises(IndexError, match="'w'"):
        xlsparse.SparseDiff({"w": xlsparse.SparseDelta._trusted(torch.tensor([9]), torch.ones(1), (2, 2))})
    d = xlsparse.SparseDelta(torch.tensor([1]), torch.ones(1), (2, 2))
    with pytest.raises(ValueError, match="more than one"):
        xlsparse.SparseDiff({"w": d}, {"w": torch.zeros(2, 2)})
    with pytest.raises(TypeError, match="'b'"):
        xlsparse.SparseDiff({}, {"b": torch.zeros(2, dtype=torch.long)})


def test_int32_indices_above_2_31_elements_are_widened():
    """A shape of 2^31 + elements gets int64 indices; an index past 2^31 keeps its value."""
    d = xlsparse.SparseDelta(torch.tensor([5, 2**31 + 7]), torch.ones(2), (2**16, 2**16))
    assert d.indices.dtype == torch.int64 and int(d.indices[1]) == 2**31 + 7
    small = xlsparse.SparseDelta(torch.tensor([5, 7]), torch.ones(2), (4, 4))
    assert small.indices.dtype == torch.int32


@pytest.mark.parametrize("backend", cpu_backends("apply_diffs_"))
def test_apply_rejects_mismatched_diffs_and_writes_nothing(backend, use_backend):
    use_backend(backend)
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    good = xlsparse.SparseDiff({"0.weight": xlsparse.SparseDelta(torch.tensor([1, 3]), torch.ones(2), (5, 4))})
    shape = xlsparse.SparseDiff({"2.weight": xlsparse.SparseDelta(torch.tensor([1]), torch.ones(1), (3, 4))})
    missing = xlsparse.SparseDiff({"9.weight": xlsparse.SparseDelta(torch.tensor([1]), torch.ones(1), (5, 4))})
    dense_shape = xlsparse.SparseDiff({}, {"0.bias": torch.ones(4)})
    for diffs, alphas, exc, match in [
        ([good, shape], None, ValueError, "'2.weight' has shape"),
        ([good, missing], None, KeyError, "'9.weight'"),
        ([good, dense_shape], None, ValueError, "'0.bias'"),
        ([good], [1.0, 2.0], ValueError, "alphas"),
        ([good, "diff"], None, TypeError, "SparseDiff"),
    ]:
        with pytest.raises(exc, match=match):
            xlsparse.apply(diffs, model, alphas)
        for p, b in zip(model.parameters(), before):
            assert_bit_identical(p.detach(), b, f"model after a rejected apply ({match})")
    with pytest.raises(TypeError, match="nn.Module"):
        xlsparse.apply([good], [1, 2, 3])


def test_optimizers_reject_bad_arguments_and_masks():
    p = torch.nn.Parameter(torch.randn(4, 5))
    for opt in (MaskedAdamW, MaskedSGD):
        for masks, exc, match in [
            ([torch.ones(4, 5, dtype=torch.bool).to("meta")], ValueError, "masks\\[0\\]"),
            ([torch.tensor([0, BIG])], IndexError, "masks\\[0\\]"),
            ([torch.tensor([-1, 3])], IndexError, "masks\\[0\\]"),
            ([torch.arange(21)], IndexError, "masks\\[0\\]"),
            ([torch.ones(4, 5)], TypeError, "masks\\[0\\]"),
            ([], ValueError, "masks"),
        ]:
            for mode in ("dense", "compact"):
                with pytest.raises(exc, match=match):
                    opt([p], masks, mode=mode)
        with pytest.raises(ValueError, match="lr|learning rate"):
            opt([p], [None], lr=-1.0)
    with pytest.raises(ValueError, match="betas"):
        MaskedAdamW([p], [None], betas=(1.0, 0.9))
    with pytest.raises(ValueError, match="epsilon"):
        MaskedAdamW([p], [None], eps=-1.0)
    with pytest.raises(ValueError, match="betas"):  # the third was ignored
        MaskedAdamW([p], [None], betas=(0.9, 0.999, 0.5))
    with pytest.raises(TypeError, match="amsgrad"):  # "no" is truthy: amsgrad ran
        MaskedAdamW([p], [None], amsgrad="no")
    with pytest.raises(TypeError, match="nesterov"):
        MaskedSGD([p], [None], momentum=0.9, nesterov=1)
    with pytest.raises(ValueError, match="Nesterov"):
        MaskedSGD([p], [None], nesterov=True)
    for opt in (MaskedAdamW, MaskedSGD):  # a group's own mode would be ignored
        with pytest.raises(ValueError, match="mode"):
            opt([{"params": [p], "mode": "compact"}], [None], mode="dense")
        with pytest.raises(ValueError, match="mode"):
            opt([torch.nn.Parameter(torch.randn(3))], [None]).add_param_group({"params": [p], "mode": "compact"})
        opt([{"params": [p], "mode": "compact"}], [None], mode="compact")  # the same mode: fine
    opt = MaskedAdamW([p], [None])
    with pytest.raises(ValueError, match="masks"):
        opt.update_masks([torch.ones(5, 4, dtype=torch.bool)])
    p.grad = torch.randn(4, 5).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


@pytest.mark.parametrize("opt_name", ["adamw", "sgd"])
@pytest.mark.parametrize("mode", ["dense", "compact"])
def test_nan_and_inf_gradients_follow_torch(opt_name, mode):
    """A NaN/Inf gradient on a selected entry does what torch's optimizer does to that entry;
    entries outside the mask never change, whatever the gradient holds there."""
    gen = torch.Generator().manual_seed(3)
    w0 = torch.randn(30, generator=gen)
    mask = torch.rand(30, generator=gen) > 0.5
    mask[[0, 1, 2]] = True
    mask[[3, 4]] = False
    grads = [torch.randn(30, generator=gen) for _ in range(3)]
    grads[1][[0, 3]] = float("nan")
    grads[1][[1, 4]] = float("inf")
    grads[2][2] = -float("inf")
    p, ref = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    if opt_name == "adamw":
        opt, tref = MaskedAdamW([p], [mask], lr=0.1, mode=mode), torch.optim.AdamW([ref], lr=0.1, foreach=False)
    else:
        opt, tref = MaskedSGD([p], [mask], lr=0.1, momentum=0.9, mode=mode), torch.optim.SGD([ref], lr=0.1, momentum=0.9)
    for gr in grads:
        p.grad, ref.grad = gr.clone(), gr.clone()
        opt.step()
        tref.step()
    assert_bit_identical(p.detach()[~mask], w0[~mask], "entries outside the mask")
    got, want = p.detach()[mask], ref.detach()[mask]
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
    assert got.isnan().any()
    fin = want.isfinite()
    torch.testing.assert_close(got[fin], want[fin], rtol=1e-5, atol=1e-6)


def test_layers_reject_bad_input():
    lin = torch.nn.Linear(4, 3)
    layer = xnn.SparseDeltaLinear.from_linear(lin, k=5)
    for call, exc, match in [
        (lambda: xnn.SparseDeltaLinear.from_linear(lin, indices=torch.tensor([0, 12])), IndexError, "out of range"),
        (lambda: xnn.SparseDeltaLinear.from_linear(lin, indices=torch.tensor([-1, 2])), IndexError, "out of range"),
        (lambda: xnn.SparseDeltaLinear.from_linear(lin, indices=torch.tensor([1.0])), TypeError, "indices"),
        (lambda: xnn.SparseDeltaLinear.from_linear(lin, density=1.5), ValueError, "density"),
        (lambda: xnn.SparseDeltaLinear.from_linear(lin), ValueError, "exactly one"),
        (lambda: layer(torch.randn(2, 5)), ValueError, "features"),
        (lambda: layer(torch.randn(2, 4, dtype=torch.float64)), TypeError, "dtype"),
        (lambda: xnn.MultiDeltaLinear.from_linear(
            lin, {"de": xlsparse.SparseDelta(torch.tensor([1]), torch.ones(1), (4, 3))}), ValueError, "'de'"),
        (lambda: xnn.MultiDeltaLinear.from_linear(
            lin, {"de": xlsparse.SparseDelta._trusted(torch.tensor([2, 1]), torch.ones(2), (3, 4))}), ValueError, "sorted"),
        (lambda: xnn.SubnetworkLinear.from_linear(lin, {"de": torch.ones(4, 3, dtype=torch.bool)}), ValueError, "'de'"),
        (lambda: xnn.SubnetworkLinear.from_linear(lin, {"de": torch.ones(3, 4)}), TypeError, "'de'"),
        (lambda: xnn.SubnetworkLinear.from_linear(lin, {}), ValueError, "masks"),
        (lambda: xnn.SubnetworkLinear.from_linear(lin, {"de": torch.ones(3, 4, dtype=torch.bool)},
                                                  bias_masks={"fr": torch.ones(3, dtype=torch.bool)}), ValueError,
         "bias_masks"),
    ]:
        with pytest.raises(exc, match=match):
            call()
    sub = xnn.SubnetworkLinear.from_linear(torch.nn.Linear(4, 3), {"de": torch.ones(3, 4, dtype=torch.bool)})
    with pytest.raises(IndexError, match="ids"):
        sub(torch.randn(2, 4), language_ids=torch.tensor([0, 1]))
    multi = xnn.MultiDeltaLinear.from_linear(lin, {"de": xlsparse.SparseDelta(torch.tensor([1]), torch.ones(1), (3, 4))})
    with pytest.raises(IndexError, match="ids"):
        multi(torch.randn(2, 4), route=torch.tensor([0, 3]))


def test_hf_convert_rejects_mismatched_diffs_and_arguments():
    transformers = pytest.importorskip("transformers")
    from xlsparse import hf

    def tiny():
        torch.manual_seed(0)
        cfg = transformers.BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=12, max_position_embeddings=16)
        return transformers.BertModel(cfg)

    name = "encoder.layer.0.attention.self.query.weight"
    wrong_shape = xlsparse.SparseDiff({name: xlsparse.SparseDelta(torch.tensor([1]), torch.ones(1), (4, 4))})
    missing = xlsparse.SparseDiff({"encoder.layer.7.output.dense.weight":
                                   xlsparse.SparseDelta(torch.tensor([1]), torch.ones(1), (8, 12))})
    for kwargs, exc, match in [
        (dict(kind="lora", density=0.1), ValueError, "kind"),
        (dict(target_modules=["nothing"], density=0.1), ValueError, "matched no linear"),
        (dict(density=0.1, k=3), ValueError, "exactly one"),
        (dict(k=10**9), ValueError, "k = "),
        (dict(density=2.0), ValueError, "density"),
        (dict(diffs={"de": wrong_shape}), TypeError, "diffs"),
        (dict(diffs=wrong_shape), ValueError, name),
        (dict(diffs=missing), ValueError, "encoder.layer.7.output.dense.weight"),
        (dict(kind="multi", diffs={"de": wrong_shape}), ValueError, name),
        (dict(kind="multi", diffs={"de": missing}), ValueError, "encoder.layer.7.output.dense.weight"),
        (dict(kind="multi", diffs=wrong_shape), TypeError, "diffs"),
        (dict(kind="subnetwork", masks={"de": {name: torch.ones(4, 4, dtype=torch.bool)}}), ValueError, name),
        (dict(kind="subnetwork", masks={"de": {"nope.weight": torch.ones(8, 8, dtype=torch.bool)}}), ValueError,
         "nope.weight"),
        (dict(kind="subnetwork", masks=None), TypeError, "masks"),
        (dict(kind="subnetwork", masks={"de": {name: torch.ones(8, 8, dtype=torch.bool)}}, diffs=missing), ValueError,
         "diffs"),
        (dict(kind="multi", diffs={1: xlsparse.SparseDiff({}), "1": xlsparse.SparseDiff({})}), ValueError, "twice"),
        (dict(kind="subnetwork", masks={0: {}, "0": {}}), ValueError, "twice"),
        # a later layer's mask not bool: refused before the first layer is swapped
        (dict(kind="subnetwork", masks={"de": {name: torch.ones(8, 8, dtype=torch.bool),
                                               "encoder.layer.0.output.dense.weight": torch.ones(8, 12)}}),
         TypeError, "bool tensor"),
        (dict(kind="subnetwork", masks={"de": torch.ones(8, 8, dtype=torch.bool)}), TypeError, "masks"),
    ]:
        model = tiny()
        before = {n: t.detach().clone() for n, t in model.state_dict().items()}
        types = [(n, type(m)) for n, m in model.named_modules()]
        with pytest.raises(exc, match=match):
            hf.convert(model, **kwargs)
        assert [(n, type(m)) for n, m in model.named_modules()] == types, f"convert swapped layers before raising ({kwargs})"
        after = model.state_dict()
        assert set(after) == set(before), f"convert changed the model's structure before raising ({kwargs})"
        for n, t in before.items():
            assert_bit_identical(after[n], t, n)
