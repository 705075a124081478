"""Language arithmetic: combine with heads, TIES-merging and DARE over sparse diffs, each against a
dense plain-torch restatement of PEFT's math, and the λ sweep on a held-out set."""
import pytest
import torch
from tiny_models import VOCAB, tiny

import xlsparse
from xlsparse import hf
from xlsparse.diff import SparseDelta, SparseDiff
from xlsparse.hf import arithmetic

SHAPES = {"a.weight": (7, 5), "b.weight": (3, 11), "c.weight": (13,)}


def _random_diff(seed: int, density: float = 0.4, dense_name: str | None = None) -> SparseDiff:
    g = torch.Generator().manual_seed(seed)
    deltas, dense = {}, {}
    for name, shape in SHAPES.items():
        numel = torch.Size(shape).numel()
        if name == dense_name:
            dense[name] = torch.randn(shape, generator=g) * (torch.rand(shape, generator=g) < 0.7)
            continue
        idx = torch.randperm(numel, generator=g)[: max(1, int(density * numel))].sort().values
        deltas[name] = SparseDelta(idx, torch.randn(idx.numel(), generator=g), shape)
    return SparseDiff(deltas, dense)


def _dense(diff: SparseDiff) -> dict[str, torch.Tensor]:
    out = {n: torch.zeros(s) for n, s in SHAPES.items()}
    for n, d in diff.deltas.items():
        out[n] = d.to_dense()
    for n, t in diff.dense.items():
        out[n] = t.clone()
    return out


def _ties_dense(diffs, weights, density):
    """PEFT's ties restated on dense tensors: trim each diff globally to int(density · its
    nonzeros) (PEFT's magnitude_based_pruning rounds down), elect the sign of the summed trimmed values (+ at 0), disjoint weighted mean."""
    trimmed = []
    for d in diffs:
        dense = _dense(d)
        flat = torch.cat([dense[n].reshape(-1) for n in SHAPES])
        k = int(density * int((flat != 0).sum()))
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[torch.topk(flat.abs(), k).indices] = True
        flat = flat * keep
        trimmed.append(dict(zip(SHAPES, [p.reshape(SHAPES[n]) for n, p in zip(SHAPES, flat.split(
            [torch.Size(s).numel() for s in SHAPES.values()]))])))
    out = {}
    for n in SHAPES:
        t = torch.stack([tr[n] for tr in trimmed])
        elected = torch.where(t.sum(0) >= 0, 1.0, -1.0)
        agree = t.sign() == elected
        w = torch.tensor(weights).reshape(-1, *([1] * (t.dim() - 1)))
        out[n] = (t * w * agree).sum(0) / agree.sum(0).clamp(min=1)
    return out


@pytest.mark.parametrize("density", [0.3, 0.7, 1.0])
def test_ties_merge_equals_dense_peft_math(density):
    diffs = [_random_diff(1), _random_diff(2, dense_name="b.weight"), _random_diff(3, density=0.8)]
    weights = [1.0, 0.5, -0.7]
    got = arithmetic.ties_merge(diffs, weights, density)
    expect = _ties_dense(diffs, weights, density)
    assert not got.dense
    for n in SHAPES:
        dense = got.deltas[n].to_dense() if n in got.deltas else torch.zeros(SHAPES[n])
        torch.testing.assert_close(dense, expect[n], rtol=1e-6, atol=1e-6)
    # The sign election is not a plain sum: some entry must lose a disagreeing diff's value.
    plain = arithmetic.combine(diffs, weights)
    assert any(not torch.allclose(got.deltas[n].to_dense(), _dense(plain)[n]) for n in got.deltas)


def test_ties_merge_with_every_weight_lambda_is_the_authors_ties_where_they_agree():
    """mklimasz/language-arithmetic's TIES, restated: per flattened vector keep every entry whose
    magnitude reaches the (d - int(K·d))-th smallest (int(K·d) + 1 of them, no ties here), elect
    the sign of the sum (no sum is 0 here), disjoint mean, then θ0 + λ · merged."""
    g = torch.Generator().manual_seed(0)
    d, K, lam = 200, 0.3, 0.7
    vecs = [torch.randn(d, generator=g, dtype=torch.float64) for _ in range(3)]
    kth = d - int(K * d)
    trimmed = torch.stack([v * (v.abs() >= v.abs().kthvalue(kth).values) for v in vecs])
    elected = torch.sign(trimmed.sum(0))
    kept = trimmed * torch.where(elected > 0, trimmed > 0, trimmed < 0)
    authors = lam * kept.sum(0) / (kept != 0).sum(0).clamp(min=1)
    diffs = [SparseDiff({"w": SparseDelta(torch.arange(d), v, (d,))}) for v in vecs]
    got = arithmetic.ties_merge(diffs, [lam] * 3, (int(K * d) + 1) / d).deltas["w"].to_dense()
    torch.testing.assert_close(got, authors, rtol=0, atol=1e-12)


def test_ties_merge_of_half_diffs_rounds_once():
    # bfloat16 diffs: the weighted sum over agreeing diffs, divided by their count, is rounded to
    # bfloat16 once (within half an ulp of the float64 math), not once before the division too
    g = torch.Generator().manual_seed(0)
    n = 4000
    vals = [(torch.rand(n, generator=g) + 0.5).bfloat16() for _ in range(3)]  # one sign: every diff agrees
    diffs = [SparseDiff({"w": SparseDelta(torch.arange(n), v, (n,))}) for v in vals]
    weights = [0.7, 1.3, 0.45]
    got = arithmetic.ties_merge(diffs, weights, 1.0).deltas["w"].values
    assert got.dtype == torch.bfloat16
    exact = sum(w * v.double() for w, v in zip(weights, vals)) / 3
    ulps = (got.double() - exact).abs() / torch.exp2(torch.floor(torch.log2(exact.abs())) - 7)
    assert ulps.max() <= 0.5 + 1e-3, f"{ulps.max():.3f} bfloat16 ulps from the float64 result"


def test_ties_merge_of_float16_diffs_sums_wide_and_refuses_an_overflowing_result():
    # TIES of two float16 diffs of 40000 at each entry: both kept, one sign, disjoint mean 40000,
    # which float16 holds; the election's float16 sum (80000) raised as merge's overflow.
    big = SparseDiff({"w": SparseDelta(torch.arange(3), torch.full((3,), 40000.0, dtype=torch.float16), (3,))})
    got = arithmetic.ties_merge([big, big], None, 1.0).deltas["w"].values
    assert got.dtype == torch.float16 and torch.equal(got, torch.full((3,), 40000.0, dtype=torch.float16))
    # A weight 10^5 on a value 1: the mean 10^5 is past 65504, and the result held an inf that
    # apply wrote into the model (combine refuses the same sum).
    one = SparseDiff({"w": SparseDelta(torch.arange(3), torch.tensor([1.0, -2.0, 3.0], dtype=torch.float16), (3,))})
    with pytest.raises(ValueError, match=r"ties_merge: the merged value of 'w' overflows torch.float16"):
        arithmetic.ties_merge([one], [1e5], 1.0)
    wide = arithmetic.ties_merge([one.to(dtype=torch.float32)], [1e5], 1.0).deltas["w"].values  # the way out it names
    torch.testing.assert_close(wide, torch.tensor([1e5, -2e5, 3e5]))


def test_trim_keeps_its_own_share_of_each_diff():
    small, big = _random_diff(4, density=0.1), _random_diff(5, density=0.9)
    for d in (small, big):
        kept = arithmetic.ties_merge([d], [1.0], 0.5)
        assert kept.nnz == int(0.5 * d.nnz)


def test_trim_breaks_ties_by_parameter_name_not_dict_order():
    # Equal magnitudes across parameters: the trim keeps the one first in the flattened vector,
    # parameters in name order as the authors' state_dict_to_vector sorts them, so a diff built
    # (or loaded) with its parameters in another order is trimmed alike.
    vals = {"b.weight": torch.tensor([2.0, -1.0, 2.0]), "a.weight": torch.tensor([1.0, -2.0, 3.0])}
    flat = torch.cat([vals[n] for n in sorted(vals)])
    k = int(0.5 * flat.numel())
    order = torch.sort(flat.abs(), descending=True, stable=True).indices  # ties to the lowest position
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[order[:k]] = True
    expect = dict(zip(sorted(vals), (flat * keep).split(3)))
    for names in (["b.weight", "a.weight"], ["a.weight", "b.weight"]):
        diff = SparseDiff({n: SparseDelta(torch.arange(3), vals[n], (3,)) for n in names})
        got = arithmetic.ties_merge([diff], None, 0.5)
        assert list(got.deltas) == names  # the diff's own order is kept in the result
        for n in names:
            torch.testing.assert_close(got.deltas[n].to_dense(), expect[n], rtol=0, atol=0)


def test_ties_merge_warns_like_combine_when_the_diffs_name_different_base_models():
    a, b = _random_diff(1), _random_diff(2)
    a.base_model, b.base_model = "xlm-roberta-base", "bert-base-multilingual-cased"
    for merge in (arithmetic.combine, lambda d, w: arithmetic.ties_merge(d, w, 0.5)):
        with pytest.warns(UserWarning, match="different base models"):
            assert merge([a, b], [1.0, 1.0]).base_model is None
    b.base_model = None  # one named base and one unknown: the named one is kept
    assert arithmetic.ties_merge([a, b], None, 0.5).base_model == "xlm-roberta-base"


def test_dare_drops_and_rescales_only_stored_entries():
    big = torch.Size((4000, 50))
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(big.numel(), generator=g)[:20000].sort().values
    diff = SparseDiff({"w": SparseDelta(idx, torch.randn(idx.numel(), generator=g), big)},
                      {"d": torch.randn(300, generator=g)})
    drop = 0.3
    out = arithmetic.dare(diff, drop, seed=7)
    dense_in, dense_out = diff.deltas["w"].to_dense(), out.deltas["w"].to_dense()
    survived = dense_out != 0
    # Survivors are the stored entries, rescaled by 1 / (1 - drop); nothing new appears.
    assert bool((dense_in[survived] != 0).all())
    torch.testing.assert_close(dense_out[survived], dense_in[survived] / (1 - drop))
    kept = survived.sum().item() / idx.numel()
    assert abs(kept - (1 - drop)) < 4 * (drop * (1 - drop) / idx.numel()) ** 0.5
    d_kept = out.dense["d"] != 0
    torch.testing.assert_close(out.dense["d"][d_kept], diff.dense["d"][d_kept] / (1 - drop))
    # Same seed, same diff; another seed, another one; unbiased on average.
    assert torch.equal(arithmetic.dare(diff, drop, seed=7).deltas["w"].indices, out.deltas["w"].indices)
    assert not torch.equal(arithmetic.dare(diff, drop, seed=8).deltas["w"].indices, out.deltas["w"].indices)
    small = SparseDiff({"w": SparseDelta(torch.arange(5), torch.tensor([1.0, -2.0, 3.0, 0.5, -1.5]), (5,))})
    mean = sum(arithmetic.dare(small, 0.5, seed=s).deltas["w"].to_dense() for s in range(4000)) / 4000
    torch.testing.assert_close(mean, small.deltas["w"].to_dense(), atol=0.15, rtol=0)
    with pytest.raises(ValueError, match="drop"):
        arithmetic.dare(diff, 1.0)


def test_dare_draws_in_parameter_name_order_not_dict_order():
    # one uniform per stored entry (per element of a dense entry) from Generator(seed), parameters
    # in name order, so two builds of one diff with their parameters in another order agree
    g = torch.Generator().manual_seed(0)
    parts = {"c.weight": SparseDelta(torch.tensor([1, 4, 5, 9]), torch.randn(4, generator=g), (10,)),
             "a.weight": SparseDelta(torch.tensor([0, 2, 3]), torch.randn(3, generator=g), (6,))}
    dense = {"b.weight": torch.randn(5, generator=g)}
    gen = torch.Generator().manual_seed(11)
    draws = {n: torch.rand(size, generator=gen, dtype=torch.float64) for n, size in
             (("a.weight", 3), ("b.weight", 5), ("c.weight", 4))}
    for order in (["c.weight", "a.weight"], ["a.weight", "c.weight"]):
        got = arithmetic.dare(SparseDiff({n: parts[n] for n in order}, dense), 0.4, seed=11)
        assert list(got.deltas) == order
        for n in order:
            keep = draws[n] >= 0.4
            assert torch.equal(got.deltas[n].indices, parts[n].indices[keep])
            torch.testing.assert_close(got.deltas[n].values, parts[n].values[keep] / 0.6)
        torch.testing.assert_close(got.dense["b.weight"], torch.where(draws["b.weight"] >= 0.4, dense["b.weight"] / 0.6, 0.0))


def test_dare_rescales_bit_for_bit_as_peft_random_pruning():
    # PEFT's random_pruning: tensor * mask / density, density = 1 - drop (a division, not a
    # product with the reciprocal, which rounds some float32 values elsewhere)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2000, generator=g)
    diff = SparseDiff({"w": SparseDelta(torch.arange(2000), x, (2000,))}, {"d": x.clone()})
    for drop in (0.1, 0.3, 0.9):
        gen = torch.Generator().manual_seed(5)
        draws = {n: torch.rand(2000, generator=gen, dtype=torch.float64) for n in ("d", "w")}
        got = arithmetic.dare(diff, drop, seed=5)
        peft = {n: x * (draws[n] >= drop) / (1 - drop) for n in ("d", "w")}
        assert torch.equal(got.dense["d"], peft["d"])
        assert torch.equal(got.deltas["w"].to_dense(), peft["w"])


def test_dare_refuses_a_half_value_its_rescaling_overflows():
    # 40000 is a finite float16; rescaled by 1 / (1 - 0.5) it is 80000 > 65504, which float16 holds as inf
    big = torch.full((64,), 40000.0, dtype=torch.float16)
    for diff in (SparseDiff({"x": SparseDelta(torch.arange(64), big, (64,))}), SparseDiff({}, {"x": big})):
        with pytest.raises(ValueError, match=r"dare: 'x' rescaled by 1 / \(1 - drop\) = 2 overflows torch.float16"):
            arithmetic.dare(diff, 0.5, seed=0)
        wide = arithmetic.dare(diff.to(dtype=torch.float32), 0.5, seed=0)  # the way out it names
        values = wide.deltas["x"].values if wide.deltas else wide.dense["x"][wide.dense["x"] != 0]
        assert values.numel() and bool((values == 80000.0).all())
    small = SparseDiff({"x": SparseDelta(torch.arange(64), big / 4, (64,))})  # 20000: fits
    assert bool(torch.isfinite(arithmetic.dare(small, 0.5, seed=0).deltas["x"].values).all())


def test_ties_and_dare_never_densify():
    """A 10^10-element parameter would need 40 GB dense; the sparse paths touch its K entries only."""
    shape = (100_000, 100_000)
    a = SparseDiff({"w": SparseDelta(torch.tensor([3, 10**9, 9 * 10**9]), torch.tensor([1.0, -2.0, 3.0]), shape)})
    b = SparseDiff({"w": SparseDelta(torch.tensor([3, 10**9 + 1]), torch.tensor([-0.5, 4.0]), shape)})
    merged = arithmetic.ties_merge([a, b], [1.0, 1.0], 1.0)
    assert merged.deltas["w"].indices.tolist() == [3, 10**9, 10**9 + 1, 9 * 10**9]
    torch.testing.assert_close(merged.deltas["w"].values, torch.tensor([1.0, -2.0, 4.0, 3.0]))
    assert arithmetic.dare(a, 0.5, seed=0).deltas["w"].shape == shape


def test_combine_with_heads():
    head_a, head_b = torch.randn(4, 3), torch.randn(4, 3)
    a = SparseDiff({"w": SparseDelta(torch.tensor([0, 2]), torch.tensor([1.0, 2.0]), (5,))}, absolute={"head": head_a})
    b = SparseDiff({"w": SparseDelta(torch.tensor([2, 4]), torch.tensor([3.0, 4.0]), (5,))}, absolute={"head": head_b})
    with pytest.raises(ValueError, match="absolute_from"):
        arithmetic.combine([a, b], [1.0, 0.5])
    for merge in (arithmetic.combine, lambda d, w, **kw: arithmetic.ties_merge(d, w, 1.0, **kw)):
        assert torch.equal(merge([a, b], [1.0, 0.5], absolute_from=1).absolute["head"], head_b)
        assert not merge([a, b], [1.0, 0.5], with_abs=False).absolute
    out = arithmetic.combine([a, b], [1.0, 0.5], absolute_from=0)
    torch.testing.assert_close(out.deltas["w"].to_dense(), torch.tensor([1.0, 0.0, 3.5, 0.0, 2.0]))
    assert torch.equal(out.absolute["head"], head_a)
    # A head named by one diff passes through unscaled.
    c = SparseDiff({"w": SparseDelta(torch.tensor([1]), torch.tensor([1.0]), (5,))})
    assert torch.equal(arithmetic.combine([a, c], [0.25, 1.0]).absolute["head"], head_a)
    # Several diffs name the head and absolute_from picks one without it: no owner wins silently.
    for merge in (arithmetic.combine, lambda d, w, **kw: arithmetic.ties_merge(d, w, 1.0, **kw)):
        with pytest.raises(ValueError, match="absolute_from=2"):
            merge([a, b, c], [1.0, 1.0, 1.0], absolute_from=2)
    # A head in one diff and a delta of the same tensor in another: the result held both, and its
    # apply replaced the tensor by the head, dropping the weighted delta silently.
    d = SparseDiff({"head": SparseDelta(torch.tensor([0, 5]), torch.tensor([1.0, -2.0]), (4, 3))})
    for merge in (arithmetic.combine, lambda d, w, **kw: arithmetic.ties_merge(d, w, 1.0, **kw)):
        with pytest.raises(ValueError, match=r"\['head'\] are absolute entries in one diff and deltas in another"):
            merge([a, d], [1.0, 0.5])
        assert "head" in merge([a, d], [1.0, 0.5], with_abs=False).deltas


def test_merges_refuse_bools_and_fractions_where_they_were_read_as_numbers():
    w = SparseDelta(torch.tensor([0, 2]), torch.tensor([1.0, 2.0]), (5,))
    a, b = SparseDiff({"w": w}, absolute={"h": torch.ones(2)}), SparseDiff({"w": w}, absolute={"h": torch.zeros(2)})
    # absolute_from=True took the head of diffs[1]; density=True kept every entry (no trim);
    # drop=False dropped nothing; seeds 1.2 and 1.7 were both seed 1
    with pytest.raises(TypeError, match="combine: absolute_from must be an int"):
        arithmetic.combine([a, b], [1.0, 0.5], absolute_from=True)
    with pytest.raises(ValueError, match="combine: absolute_from=1 picks the absolute entries that with_abs=False"):
        arithmetic.combine([a, b], [1.0, 0.5], with_abs=False, absolute_from=1)  # it did nothing
    with pytest.raises(TypeError, match="ties_merge: density must be a number"):
        arithmetic.ties_merge([a, b], [1.0, 0.5], True, with_abs=False)
    with pytest.raises(TypeError, match="dare: drop must be a number"):
        arithmetic.dare(a, False)
    with pytest.raises(TypeError, match="dare: seed must be an int"):
        arithmetic.dare(a, 0.5, seed=1.7)
    with pytest.raises(ValueError, match=r"ties_merge: density must be in \[0, 1\], got 1.5"):
        arithmetic.ties_merge([a, b], [1.0, 0.5], 1.5, with_abs=False)



@pytest.mark.parametrize("bad", ["0.5", True, None, torch.tensor(True)], ids=["str", "bool", "None", "bool tensor"])
def test_merges_refuse_weights_that_are_not_numbers(bad):
    # combine read float("0.5") as 0.5 and True as 1.0 (the sum came out 2 · φ)
    d = _random_diff(0)
    with pytest.raises(TypeError, match=r"combine: weights\[0\] must be a number"):
        arithmetic.combine([d, d], [bad, 1.0])
    with pytest.raises(TypeError, match=r"ties_merge: weights\[1\] must be a number"):
        arithmetic.ties_merge([d, d], [1.0, bad], 0.5)


def test_merges_name_the_argument_given_one_diff_or_one_weight():
    # Python's "'SparseDiff' object is not iterable" / "'float' object is not iterable" named no argument
    d = _random_diff(0)
    for what, merge in (("combine", arithmetic.combine), ("ties_merge", lambda ds, w: arithmetic.ties_merge(ds, w, 0.5))):
        with pytest.raises(TypeError, match=fr"^{what}: diffs must be a list of SparseDiff objects, got one SparseDiff"):
            merge(d, [1.0])
        for weight in (0.5, torch.tensor(0.5)):
            with pytest.raises(TypeError, match=fr"^{what}: weights must be a list of numbers, one per diff"):
                merge([d], weight)


def test_merges_refuse_a_density_or_drop_given_as_a_string():
    # they raised, but as a bare "'<=' not supported between instances of 'float' and 'str'"
    d = _random_diff(0)
    with pytest.raises(TypeError, match="ties_merge: density must be a number"):
        arithmetic.ties_merge([d, d], [1.0, 1.0], "0.5")
    with pytest.raises(TypeError, match="dare: drop must be a number"):
        arithmetic.dare(d, "0.5")

def _lm_batches(n, seed, b=4, s=8):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": ids, "labels": ids} for ids in (torch.randint(3, VOCAB, (b, s), generator=g) for _ in range(n))]


def test_lambda_sweep_finds_the_best_and_restores_the_model():
    model = tiny("bert")
    name = f"{hf.model.target_names(model)[0]}.weight"
    target = dict(model.named_parameters())[name]
    before = target.detach().clone()
    phi = SparseDiff({name: xlsparse.SparseDelta(torch.tensor([0, 5]), torch.tensor([1.0, -1.0]), target.shape)})
    best, scores = arithmetic.lambda_sweep(model, lambda lam: arithmetic.combine([phi], [lam]), [-1.0, 0.0, 0.5, 2.0],
                                           evaluate=lambda m: -abs(float(dict(m.named_parameters())[name].detach().view(-1)[0]) - float(before.view(-1)[0]) - 0.5),
                                           progress=False)
    assert best == 0.5 and set(scores) == {-1.0, 0.0, 0.5, 2.0}
    assert torch.equal(target, before)
    # a NaN score is never picked: max/min with a NaN first returned it
    canned = iter([float("nan"), 1.0, 3.0])
    sweep = arithmetic.lambda_sweep(model, lambda lam: phi, [0.0, 0.5, 1.0], evaluate=lambda m: next(canned),
                                    higher_is_better=False, progress=False)
    assert sweep.best == 0.5
    with pytest.raises(ValueError, match="no λ gave a finite score"):
        arithmetic.lambda_sweep(model, lambda lam: phi, [0.0], evaluate=lambda m: float("nan"), progress=False)
    with pytest.raises(TypeError, match="higher_is_better must be a bool"):  # "no" is truthy: the worst λ won
        arithmetic.lambda_sweep(model, lambda lam: phi, [0.0, 1.0], evaluate=lambda m: 1.0, higher_is_better="no",
                                progress=False)
    with pytest.raises(TypeError, match="lambda_sweep: progress must be a bool"):  # "no" showed the bars
        arithmetic.lambda_sweep(model, lambda lam: phi, [0.0, 1.0], evaluate=lambda m: 1.0, progress="no")


def test_lambda_sweep_refuses_a_make_diff_that_is_not_a_function_returning_a_sparse_diff():
    # a SparseDiff given as make_diff, or a make_diff returning a dict, raised Python's bare
    # "not callable" / "has no attribute 'applied'", naming no argument
    model = tiny("bert")
    name = f"{hf.model.target_names(model)[0]}.weight"
    shape = dict(model.named_parameters())[name].shape
    phi = SparseDiff({name: xlsparse.SparseDelta(torch.tensor([0]), torch.tensor([1.0]), shape)})
    with pytest.raises(TypeError, match="lambda_sweep: make_diff must be a function, got a SparseDiff"):
        arithmetic.lambda_sweep(model, phi, [0.5], evaluate=lambda m: 1.0, progress=False)
    with pytest.raises(TypeError, match="lambda_sweep: evaluate must be a function, got a float"):
        arithmetic.lambda_sweep(model, lambda lam: phi, [0.5], evaluate=1.0, progress=False)
    with pytest.raises(TypeError, match=r"make_diff\(0.5\) returned a dict, not a SparseDiff"):
        arithmetic.lambda_sweep(model, lambda lam: dict(phi.deltas), [0.5], evaluate=lambda m: 1.0, progress=False)


def test_lambda_sweep_takes_a_numpy_or_torch_grid():
    # λ·φ scored by the moved entry: a grid from np.linspace or torch.linspace raised "ambiguous"
    # truth value, naming no argument; the torch grid's λs keyed the scores as 0-d tensors
    import numpy as np

    layer = torch.nn.Linear(3, 2)
    with torch.no_grad():
        layer.weight.fill_(0.25)  # every score exact in float32
    w0 = 0.25
    phi = SparseDiff({"weight": SparseDelta(torch.tensor([0]), torch.tensor([2.0]), (2, 3))})
    expect = {lam: -abs(w0 + 2.0 * lam - (w0 + 1.0)) for lam in (0.0, 0.5, 1.0)}  # best: θ0 + 1 at λ = 0.5
    for grid in ([0.0, 0.5, 1.0], np.linspace(0, 1, 3), torch.linspace(0, 1, 3), (lam for lam in (0.0, 0.5, 1.0))):
        sweep = arithmetic.lambda_sweep(layer, lambda lam: arithmetic.combine([phi], [lam]), grid, progress=False,
                                        evaluate=lambda m: -abs(float(m.weight[0, 0].detach()) - (w0 + 1.0)))
        assert sweep.best == 0.5 and type(sweep.best) is float
        assert sweep.scores == pytest.approx(expect) and all(type(lam) is float for lam in sweep.scores)
    with pytest.raises(ValueError, match="lambda_sweep: no λ given"):  # it said "no λ gave a finite score: {}"
        arithmetic.lambda_sweep(layer, lambda lam: phi, iter(()), evaluate=lambda m: 1.0, progress=False)
    with pytest.raises(TypeError, match=r"lambda_sweep: lambdas\[1\] must be a number"):
        arithmetic.lambda_sweep(layer, lambda lam: phi, [0.0, "0.5"], evaluate=lambda m: 1.0, progress=False)
    # scores are keyed by λ: a repeated λ was evaluated again and its second score overwrote the first
    calls = []
    with pytest.raises(ValueError, match=r"lambda_sweep: lambdas\[2\] = 0.5 repeats lambdas\[1\]"):
        arithmetic.lambda_sweep(layer, lambda lam: calls.append(lam) or phi, [0.0, 0.5, torch.tensor(0.5)],
                                evaluate=lambda m: 1.0, progress=False)
    assert calls == []  # refused before any λ was evaluated


def test_the_papers_interpolation_of_two_language_vectors():
    # Klimaszewski et al. 2024 / mklimasz/language-arithmetic: θ0 + λ·φ_target + (1 − λ)·φ_related
    from xlsparse.demos.arithmetic import interpolated

    model = tiny("bert")
    named = dict(model.named_parameters())
    names = [f"{n}.weight" for n in hf.model.target_names(model)][:2]
    g = torch.Generator().manual_seed(3)
    target, related, task = (SparseDiff({n: SparseDelta.from_dense(torch.randn(named[n].shape, generator=g), k=30)
                                         for n in names}) for _ in range(3))
    for lam in (0.0, 0.25, 1.0):
        expect = {n: named[n].detach().double().clone() for n in names}
        for diff, w in ((target, lam), (related, 1 - lam), (task, 1.0)):
            for n, d in diff.deltas.items():
                expect[n].view(-1)[d.indices.long()] += w * d.values.double()
        with interpolated(target, related, task, lam).applied(model):
            for n in names:
                torch.testing.assert_close(named[n].detach().double(), expect[n], rtol=0, atol=1e-6)


def test_lambda_sweep_on_a_heldout_set_returns_the_table():
    model = tiny("llama")
    heldout = _lm_batches(2, 9)
    named = dict(model.named_parameters())
    names = [f"{n}.weight" for n in hf.model.target_names(model)][:3]
    g = torch.Generator().manual_seed(0)
    phi = SparseDiff({n: SparseDelta.from_dense(torch.randn(named[n].shape, generator=g) * 0.5, k=40) for n in names})
    sweep = arithmetic.lambda_sweep(model, lambda lam: arithmetic.combine([phi], [lam]), [0.0, 1.0, 3.0],
                                    heldout=heldout, progress=False)
    expect = {}
    for lam in (0.0, 1.0, 3.0):
        with phi.applied(model, alpha=lam), torch.no_grad():
            expect[lam] = sum(float(model(**b).loss) for b in heldout) / len(heldout)
    assert sweep.scores == pytest.approx(expect)
    assert sweep.best == min(expect, key=expect.get) and not sweep.higher_is_better
    assert "| 3 |" in sweep.table() and "best" in sweep.table()
    with pytest.raises(ValueError, match="exactly one"):
        arithmetic.lambda_sweep(model, lambda lam: phi, [1.0], progress=False)
    # higher_is_better=True beside heldout was dropped without a word: the lowest loss won
    with pytest.raises(ValueError, match="lambda_sweep: higher_is_better=True .* heldout"):
        arithmetic.lambda_sweep(model, lambda lam: phi, [1.0], heldout=heldout, higher_is_better=True, progress=False)
    agreed = arithmetic.lambda_sweep(model, lambda lam: arithmetic.combine([phi], [lam]), [0.0, 1.0, 3.0],
                                     heldout=heldout, higher_is_better=False, progress=False)
    assert agreed.best == sweep.best and not agreed.higher_is_better
    # one batch (a dict) was read as its keys: the sweep failed in the model's forward with a bare TypeError
    with pytest.raises(TypeError, match=r"^heldout_loss: batches .* one batch \(a dict\): pass \[batch\]"):
        arithmetic.heldout_loss(heldout[0])
    with pytest.raises(TypeError, match=r"^lambda_sweep: heldout .* one batch \(a dict\): pass \[batch\]"):
        arithmetic.lambda_sweep(model, lambda lam: phi, [1.0], heldout=heldout[0], progress=False)


def test_heldout_loss_weighs_batches_by_their_examples_as_trainer_evaluate():
    """HF's Trainer.evaluate reports eval_loss as Σ_b n_b·loss_b / Σ_b n_b over batches of n_b
    examples: a short last batch counts by its size (the plain mean of batch losses weighed it as
    a full one). A custom loss_fn over batches without tensors weighs each batch alike."""
    model = tiny("llama")
    full, short = _lm_batches(1, 10, b=5)[0], _lm_batches(1, 11, b=1)[0]
    with torch.no_grad():
        losses = [float(model(**b).loss) for b in (full, short)]
    assert abs(losses[0] - losses[1]) > 1e-3
    assert arithmetic.heldout_loss([full, short])(model) == pytest.approx((5 * losses[0] + losses[1]) / 6)
    data = {"full": full, "short": short}
    plain = arithmetic.heldout_loss(["full", "short"], loss_fn=lambda m, key: m(**data[key]).loss)
    assert plain(model) == pytest.approx(sum(losses) / 2)


def test_heldout_loss_skips_batches_of_no_example():
    """A batch of no example weighs 0, but its loss is a mean over nothing (NaN): 0 · NaN made every
    λ's score NaN. With no example at all the mean divided by zero (a bare ZeroDivisionError)."""
    model = tiny("llama")
    full = _lm_batches(1, 10, b=5)[0]
    empty = {k: v[:0] for k, v in full.items()}
    with torch.no_grad():
        want = float(model(**full).loss)
    assert arithmetic.heldout_loss([empty, full, empty])(model) == pytest.approx(want)
    with pytest.raises(ValueError, match="^heldout_loss: the batches hold no example"):
        arithmetic.heldout_loss([empty])


def test_a_diff_with_int64_indices_merges_and_applies_with_others():
    # A layer built from int64 flat indices (torch.nonzero's) kept them, so hf.extract_diff gave
    # int64 deltas below 2^31; merge, combine, ties_merge and apply with a loaded (int32) diff of the
    # same weight then raised "index dtype torch.int32 does not match delta 0's torch.int64".
    layer = xlsparse.nn.SparseDeltaLinear.from_linear(torch.nn.Linear(5, 4, bias=False),
                                                      indices=torch.tensor([1, 6, 11], dtype=torch.int64))
    with torch.no_grad():
        layer.delta_values.copy_(torch.tensor([1.0, -2.0, 3.0]))
    mine = hf.extract_diff(torch.nn.Sequential(layer))
    assert mine.deltas["0.weight"].indices.dtype == torch.int64
    other = SparseDiff({"0.weight": SparseDelta(torch.tensor([6, 7]), torch.tensor([0.5, 4.0]), (4, 5))})
    want = (0.5 * mine.deltas["0.weight"].to_dense() + 2.0 * other.deltas["0.weight"].to_dense()).double()
    for mixed in (SparseDiff.merge([mine, other], [0.5, 2.0]), arithmetic.combine([other, mine], [2.0, 0.5])):
        assert torch.equal(mixed.deltas["0.weight"].to_dense().double(), want)
    arithmetic.ties_merge([mine, other], [0.5, 2.0], density=1.0)
    target = torch.nn.Sequential(torch.nn.Linear(5, 4, bias=False))
    w0 = target[0].weight.detach().clone()
    with xlsparse.apply([mine, other], target, alphas=[0.5, 2.0]):
        torch.testing.assert_close(target[0].weight.detach().double(), w0.double() + want, rtol=0, atol=1e-6)
    assert torch.equal(target[0].weight.detach(), w0)
