"""Language arithmetic (Klimaszewski et al. 2024): training-free merges of language diffs, with
TIES-merging and DARE over sparse diffs, and a λ sweep on a held-out set.

What follows the paper and its code (mklimasz/language-arithmetic): a new model is
θ0 + Σ_i w_i φ_i over language (or task) vectors φ_i; two languages are interpolated,
θ0 + λ·φ_target + (1 − λ)·φ_related (their `w1*a1 + w2*a2` with w1 + w2 = 1; λ = 1 is the
target's own vector alone), with the task vector added at weight 1 (their task adapter runs on
top of the merged language adapter, unscaled), and λ picked by a sweep on a dev set.
Their code merges whole adapter weights (no θ0): for weights that do not sum to 1 that is not
θ0 + Σ w_i φ_i. Its w1 goes to the first adapter of each `--lang_mapping` pair (which one is
the target is the caller's choice, as here: `combine` is positional), and it takes one (w1, w2)
per run (`--weights`, 0.9,0.1 in its script): the grid, the dev metric (seqeval F1) and the pick
are left to the runs, so `lambda_sweep`'s rules (its tie to the earliest λ, `heldout_loss`) are
xlsparse's own.
TIES-merging (Yadav et al. 2023) and DARE (Yu et al. 2024) are merges to compare against (their
merging.py has TIES, below, and no DARE); the math here is PEFT's `ties` / `dare_linear`:
  - TIES: trim each φ_i to the top `density` of its entries by magnitude (global over the diff),
    elect per entry the sign of the summed trimmed values (+ where the sum is 0), and take the
    disjoint mean Σ_i [sign agrees] w_i φ_i / #agreeing;
  - DARE: drop each entry with probability p, rescale the survivors by 1 / (1 − p).
What is xlsparse's own: everything runs on the sparse supports (union merges through
`SparseDiff.merge`, global top-K through `xlsparse.functional.topk_mask`), so no weight is ever
densified; "its own nonzeros" means TIES keeps int(density · nnz) entries of each diff (rounded
down, as PEFT's magnitude_based_pruning rounds its int(density · numel)), where PEFT counts every
entry of each dense tensor; and an explicit rule for absolute entries
(classifier heads), which replace a parameter and have no weighted sum (see `combine`).
Where the authors' own TIES (their merging.py) differs from PEFT's, and so from ours: it trims
each flattened vector over all its entries, zeros included, keeping every entry at or above the
threshold magnitude (ties included); it gives an entry whose trimmed values sum to 0 the sign of
the majority over all entries, not +; and it scales the merged vector by one λ, which is
`ties_merge` with every weight λ.
"""
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..diff import SparseDelta, SparseDiff, _refuse_overflow, budget, index_dtype, scale_list
from ..functional import topk_mask
from ..ops import checks
from .model import accepts_compiled
from .subnetworks import _check_batches, _progress


def _absolute_entries(diffs: Sequence[SparseDiff], with_abs: bool, absolute_from: int | None, what: str) -> dict:
    """The absolute entries (heads) the result carries, by one rule for every merge here.

    with_abs=False: none (the result leaves heads as they are; an `absolute_from` then is an
    error, as it would choose nothing). with_abs=True: an entry named by one diff passes through
    unscaled (a replacement value has no weighted sum); an entry named by several is taken from
    diffs[absolute_from], which must be one of them (else, or without `absolute_from`, it is an
    error).
    """
    checks.flag(what, "with_abs", with_abs)  # with_abs="no" is truthy: it kept the heads
    if absolute_from is not None:  # absolute_from=True passed the range check below and chose diffs[1]
        checks.count(what, "absolute_from", absolute_from)
    if absolute_from is not None and not 0 <= absolute_from < len(diffs):
        raise ValueError(f"{what}: absolute_from={absolute_from} is not the index of one of the {len(diffs)} diffs")
    if not with_abs:
        if absolute_from is not None:  # it chooses a head to keep, and with_abs=False keeps none: it did nothing
            raise ValueError(f"{what}: absolute_from={absolute_from} picks the absolute entries that with_abs=False "
                             "drops; give one of the two")
        return {}
    out, owners = {}, {}
    for i, d in enumerate(diffs):
        for name, t in d.absolute.items():
            owners.setdefault(name, []).append(i)
            out.setdefault(name, t)
    for name, who in owners.items():
        if len(who) > 1:
            if absolute_from is None:
                raise ValueError(f"{what}: absolute entry {name!r} is in diffs {who}; absolute values replace a parameter "
                                 "and have no sum: pass absolute_from=<index of the diff whose value wins> or with_abs=False")
            if absolute_from not in who:  # the named diff has no value to win with
                raise ValueError(f"{what}: absolute entry {name!r} is in diffs {who}, but absolute_from={absolute_from} "
                                 "names a diff without it: pass the index of one of them, or with_abs=False")
            out[name] = diffs[absolute_from].absolute[name]
    clash = sorted({name for name in out for d in diffs if name in d.deltas or name in d.dense})
    if clash:  # a replaced value has no sum with a delta: the delta would be dropped on apply
        raise ValueError(f"{what}: {clash[:5]} are absolute entries in one diff and deltas in another; absolute values "
                         "replace a parameter and have no sum with a delta: pass with_abs=False or drop one of them")
    return out


def _check(diffs, weights, what: str) -> tuple[list, list]:
    # one diff, or one number for the weights, raised Python's "... is not iterable", naming no argument
    if isinstance(diffs, SparseDiff):
        raise TypeError(f"{what}: diffs must be a list of SparseDiff objects, got one SparseDiff: pass [diff]")
    diffs = list(diffs)
    if not diffs:
        raise ValueError(f"{what}: no diffs given")
    if not all(isinstance(d, SparseDiff) for d in diffs):
        raise TypeError(f"{what}: diffs must be SparseDiff objects")
    return diffs, scale_list(what, "weights", weights, len(diffs))


def combine(diffs: Sequence[SparseDiff], weights: Sequence[float], with_abs: bool = True,
            absolute_from: int | None = None) -> SparseDiff:
    """Σ_i weights[i] · diffs[i] over the union of the supports (no densifying).

    Absolute entries (heads) are not weighted: with `with_abs=False` the result has none; with
    `with_abs=True` one named by a single diff passes through as it is, and one named by several
    diffs comes from `diffs[absolute_from]`, which must name it (else, or without
    `absolute_from`, a ValueError).
    """
    diffs, weights = _check(diffs, weights, "combine")
    absolute = _absolute_entries(diffs, with_abs, absolute_from, "combine")
    merged = SparseDiff.merge([d.without_absolute() for d in diffs], weights)
    return SparseDiff._trusted(merged.deltas, merged.dense, absolute, merged.base_model)


def _sparse_parts(diff: SparseDiff) -> dict[str, SparseDelta]:
    """Every delta and dense entry of `diff` as a SparseDelta over its nonzero entries."""
    parts = dict(diff.deltas)
    for name, t in diff.dense.items():
        idx = t.reshape(-1).nonzero().squeeze(1)
        parts[name] = SparseDelta._trusted(idx.to(index_dtype(t.numel())), t.reshape(-1)[idx], t.shape)
    return parts


def _trim(diff: SparseDiff, density: float) -> dict[str, SparseDelta]:
    """TIES' trim: the int(density · nnz) largest-magnitude entries of the diff (rounded down, as
    PEFT's magnitude_based_pruning and mergekit's magnitude sparsifier take k), global over its
    parameters (ties to the lowest position, parameters in name order, as the authors flatten a
    state dict; the diff's dict order, which two builds of one diff need not share, chose otherwise)."""
    parts = _sparse_parts(diff)
    names = sorted(parts)
    nonzero = sum(int(torch.count_nonzero(parts[n].values)) for n in names)
    k = budget("ties_merge", nonzero, density=density, floor=True)
    keep = dict(zip(names, topk_mask([parts[n].values for n in names], k))) if names else {}
    return {n: SparseDelta._trusted(d.indices[keep[n]], d.values[keep[n]], d.shape) for n, d in parts.items()}


def ties_merge(diffs: Sequence[SparseDiff], weights: Sequence[float] | None, density: float, with_abs: bool = True,
               absolute_from: int | None = None) -> SparseDiff:
    """TIES-merging over sparse diffs: trim, elect sign, disjoint mean (PEFT's `ties` math).

    1. Trim: each diff keeps its int(density · nnz) largest-magnitude nonzero entries (PEFT's
       k, rounded down), global over its parameters (dense entries count with their nonzeros).
    2. Elect: per entry, the sign of the sum of the trimmed (unweighted) values; + where it is 0.
    3. Disjoint mean: Σ_i [sign(φ_i) = elected] · weights[i] · φ_i / #{i : sign(φ_i) = elected}
       (weights None: 1 each).
    Entries no diff keeps are absent from the result. Every step is a union merge of sorted
    supports, summed in at least float32; absolute entries follow `combine`'s rule. A
    half-precision result past the dtype's largest value raises.
    """
    diffs, weights = _check(diffs, weights, "ties_merge")
    absolute = _absolute_entries(diffs, with_abs, absolute_from, "ties_merge")
    trims = [_trim(d, density) for d in diffs]
    dtypes = {}  # each result entry in its diffs' promoted dtype, as merge gives it
    for parts in trims:
        for name, delta in parts.items():
            dtypes[name] = torch.promote_types(dtypes.get(name, delta.values.dtype), delta.values.dtype)
    # every sum in at least float32: a half-type sign election overflowed (two float16 40000s
    # raised as merge's error), and a weighted sum rounded to a half type before the division by
    # the count would round each value twice
    wide = [{n: p.to(dtype=torch.promote_types(p.values.dtype, torch.float32)) for n, p in parts.items()}
            for parts in trims]
    # each with its base model: merge warns, as combine does, when the diffs name different ones
    trimmed = [SparseDiff._trusted(parts, base_model=d.base_model) for parts, d in zip(wide, diffs)]
    elected = SparseDiff.merge(trimmed)  # Σ_i trimmed φ_i on the union of the supports
    agreeing, ones = [], []
    for t in trimmed:
        kept, count = {}, {}
        for name, delta in t.deltas.items():
            total = elected.deltas[name]
            at = torch.searchsorted(total.indices.long(), delta.indices.long())
            agree = delta.values.sign() == torch.where(total.values[at] >= 0, 1.0, -1.0).to(delta.values.dtype)
            kept[name] = SparseDelta._trusted(delta.indices[agree], delta.values[agree], delta.shape)
            count[name] = SparseDelta._trusted(delta.indices[agree], torch.ones(int(agree.sum()), dtype=torch.float32,
                                                                                 device=delta.values.device), delta.shape)
        agreeing.append(SparseDiff._trusted(kept))
        ones.append(SparseDiff._trusted(count))
    numerator = SparseDiff.merge(agreeing, weights)
    counts = SparseDiff.merge(ones)  # the same supports as `numerator`: the union of the agreeing entries
    deltas = {}
    for name, num in numerator.deltas.items():
        mean = num.values / counts.deltas[name].values.to(num.values.dtype)
        values = mean.to(dtypes[name])
        # rounded to a half type, a mean past its largest value became an inf that apply wrote
        _refuse_overflow(name, values, [mean], "ties_merge", f"the merged value of {name!r}")
        deltas[name] = SparseDelta._trusted(num.indices, values, num.shape)
    return SparseDiff._trusted(deltas, {}, absolute, elected.base_model)


def _refuse_rescaled_overflow(name: str, rescaled: torch.Tensor, values: torch.Tensor, drop: float) -> None:
    """A finite half-precision value rescaled to inf is refused, as `merge` refuses such a sum:
    applied, the inf was written into the model."""
    _refuse_overflow(name, rescaled, [values], "dare", f"{name!r} rescaled by 1 / (1 - drop) = {1 / (1 - drop):g}",
                     "rescale it as float32: dare(diff.to(dtype=torch.float32), ...)")


def dare(diff: SparseDiff, drop: float, seed: int = 0) -> SparseDiff:
    """DARE: drop each stored entry with probability `drop` and rescale the survivors by
    1 / (1 − drop), so the expected diff is unchanged.

    Sparse deltas lose their dropped entries from the support; dense entries are zeroed where
    dropped and stay dense. Draws come from a CPU `torch.Generator` seeded with `seed`, one
    uniform per stored entry (every element of a dense entry), parameters in name order: the same
    seed gives the same diff. Absolute entries are replacements, not deltas, and pass through. A finite
    half-precision value that the rescaling takes past the dtype's largest one raises.

    PEFT's `dare_linear` is `combine([dare(φ_i, drop, seed_i)], weights)` (weights after the
    rescale, as there) with a different seed per diff: its masks come from one advancing global
    generator, so each task tensor gets its own. One seed for all draws the same uniforms for
    diffs whose parameters hold as many stored entries, so same-support diffs (dense ones, say)
    would drop the same positions.
    """
    if not isinstance(diff, SparseDiff):
        raise TypeError(f"dare: diff must be a SparseDiff, got {type(diff).__name__}")
    checks.finite("dare", drop=drop)  # drop=False passed the range check: no entry dropped
    if not 0.0 <= drop < 1.0:
        raise ValueError(f"dare: drop must be in [0, 1), got {drop}")
    # int(seed) made seeds 1.2 and 1.7 one seed
    gen = torch.Generator().manual_seed(checks.count("dare", "seed", seed))
    keep_prob = 1.0 - drop
    # drawn in name order: in the diff's dict order, two builds of one diff took other entries
    sizes = {**{n: (d.nnz,) for n, d in diff.deltas.items()}, **{n: t.shape for n, t in diff.dense.items()}}
    keeps = {n: torch.rand(sizes[n], generator=gen, dtype=torch.float64) >= drop for n in sorted(sizes)}
    deltas, dense = {}, {}
    for name, d in diff.deltas.items():
        keep = keeps[name].to(d.values.device)
        # divided, as PEFT's random_pruning divides by its density: times the reciprocal rounded
        # some float32 values 1 ulp away
        deltas[name] = SparseDelta._trusted(d.indices[keep], d.values[keep] / keep_prob, d.shape)
        _refuse_rescaled_overflow(name, deltas[name].values, d.values, drop)
    for name, t in diff.dense.items():
        keep = keeps[name].to(t.device)
        dense[name] = torch.where(keep, t / keep_prob, torch.zeros((), dtype=t.dtype, device=t.device))
        _refuse_rescaled_overflow(name, dense[name], t, drop)
    return SparseDiff._trusted(deltas, dense, diff.absolute, diff.base_model)


def heldout_loss(batches: Iterable, loss_fn: Callable | None = None) -> Callable[[nn.Module], float]:
    """An `evaluate` for `lambda_sweep`: the mean loss over held-out `batches` (lower is better),
    in eval mode and without gradients, each batch's loss weighted by its number of examples as
    HF's `Trainer.evaluate` weighs them in `eval_loss` (`find_batch_size`; a short last batch
    counted as much as a full one before); when a batch has no tensor to count, each weighs 1.
    A batch of no example is skipped; batches that hold none at all raise."""
    _check_batches("heldout_loss", "batches", batches)
    batches = list(batches)
    if not batches:
        raise ValueError("heldout_loss: no held-out batches")
    loss_fn = loss_fn or (lambda m, b: m(**b).loss)
    from transformers.trainer_pt_utils import find_batch_size

    sizes = [find_batch_size(b) for b in batches]
    sizes = sizes if None not in sizes else [1] * len(batches)
    # a batch of no example weighs 0, but its loss (a mean over nothing) is NaN, and 0 · NaN made
    # every λ's score NaN; with no example at all the mean divided by zero
    batches, sizes = [b for b, n in zip(batches, sizes) if n], [n for n in sizes if n]
    if not batches:
        raise ValueError("heldout_loss: the batches hold no example")

    def evaluate(model: nn.Module) -> float:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                return sum(float(loss_fn(model, b)) * n for b, n in zip(batches, sizes)) / sum(sizes)
        finally:
            model.train(was_training)

    return evaluate


@dataclass
class LambdaSweep:
    """The result of `lambda_sweep`: the best λ and {λ: score}; unpacks as `best, scores`."""

    best: float
    scores: dict
    higher_is_better: bool = True

    def __iter__(self):
        return iter((self.best, self.scores))

    def table(self) -> str:
        """A markdown table, one row per λ, the best one marked."""
        rows = ["| λ | score | |", "|---|---|---|"]
        for lam, score in self.scores.items():
            rows.append(f"| {lam:g} | {score:.4f} | {'best' if lam == self.best else ''} |")
        return "\n".join(rows)


@accepts_compiled
def lambda_sweep(model: nn.Module, make_diff: Callable[[float], SparseDiff], lambdas: Sequence[float],
                 evaluate: Callable[[nn.Module], float] | None = None, higher_is_better: bool | None = None,
                 progress: bool = True, heldout: Iterable | None = None) -> LambdaSweep:
    """Evaluate `model` + `make_diff(λ)` for every λ; returns a `LambdaSweep` (best λ, {λ: score},
    `.table()`), which unpacks as `best, scores`.

    Give `evaluate(model) -> float` (higher is better unless `higher_is_better=False`), or
    `heldout` batches, scored by `heldout_loss` (lower is better: `higher_is_better=True` raises).
    Each diff is applied with one fused call and reverted bit-exactly before the next, so the
    model leaves the sweep exactly as it came.
    A λ whose score is not finite is never picked (an error when no score is); a tie goes to the
    earliest λ in `lambdas`. The paper's use:
    `make_diff = lambda l: combine([phi_target, phi_related, phi_task], [l, 1 - l, 1])`, λ in [0, 1].
    """
    lambdas = list(lambdas)  # `not` of a NumPy or torch grid (linspace) raised "ambiguous"; a generator was never empty
    if not lambdas:
        raise ValueError("lambda_sweep: no λ given")
    checks.finite("lambda_sweep", **{f"lambdas[{i}]": lam for i, lam in enumerate(lambdas)})
    lambdas = [float(lam) for lam in lambdas]  # a torch grid's 0-d tensors keyed the scores by identity
    for i, lam in enumerate(lambdas):  # its scores are keyed by λ: a repeat was evaluated again and overwrote the first
        if lam in lambdas[:i]:
            raise ValueError(f"lambda_sweep: lambdas[{i}] = {lam:g} repeats lambdas[{lambdas.index(lam)}]")
    if higher_is_better is not None:
        checks.flag("lambda_sweep", "higher_is_better", higher_is_better)  # "no" is truthy: the worst λ won
    if (evaluate is None) == (heldout is None):
        raise ValueError("lambda_sweep: give exactly one of evaluate or heldout")
    for name, f in (("make_diff", make_diff), ("evaluate", evaluate)):
        if f is not None and not callable(f):
            raise TypeError(f"lambda_sweep: {name} must be a function, got a {type(f).__name__}")
    if heldout is not None:
        _check_batches("lambda_sweep", "heldout", heldout)
        if higher_is_better:  # it was dropped: the lowest loss won
            raise ValueError("lambda_sweep: higher_is_better=True does not apply to heldout, scored by its mean loss "
                             "(lower is better); leave higher_is_better out, or pass evaluate")
        evaluate, higher_is_better = heldout_loss(heldout), False
    elif higher_is_better is None:
        higher_is_better = True
    scores = {}
    for lam in _progress("lambda_sweep", lambdas, "λ sweep", progress):
        diff = make_diff(lam)
        if not isinstance(diff, SparseDiff):  # a bare AttributeError ('... has no attribute applied') before
            raise TypeError(f"lambda_sweep: make_diff({lam:g}) returned a {type(diff).__name__}, not a SparseDiff "
                            "(return the diff; the sweep applies and reverts it)")
        with diff.applied(model):
            scores[lam] = float(evaluate(model))
    finite = {lam: v for lam, v in scores.items() if math.isfinite(v)}
    if not finite:  # max/min with a NaN first would have returned it
        raise ValueError(f"lambda_sweep: no λ gave a finite score: {scores}")
    pick = max if higher_is_better else min
    return LambdaSweep(pick(finite, key=finite.get), scores, higher_is_better)
