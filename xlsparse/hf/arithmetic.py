"""Language arithmetic (Klimaszewski et al. 2024): training-free weighted merges of language
diffs, and a λ sweep that keeps the best merge on a dev set."""
from collections.abc import Callable, Sequence

from torch import nn

from ..diff import SparseDiff


def combine(diffs: Sequence[SparseDiff], weights: Sequence[float]) -> SparseDiff:
    """Σ_i weights[i] · diffs[i] over the union of the supports (no densifying)."""
    return SparseDiff.merge(list(diffs), list(weights))


def lambda_sweep(model: nn.Module, make_diff: Callable[[float], SparseDiff], lambdas: Sequence[float],
                 evaluate: Callable[[nn.Module], float], higher_is_better: bool = True,
                 progress: bool = True) -> tuple[float, dict[float, float]]:
    """Evaluate `model` + `make_diff(λ)` for every λ and return (best λ, {λ: score}).

    Each diff is applied with one fused call and reverted bit-exactly before the next, so the
    model leaves the sweep exactly as it came. Typical use: `make_diff = lambda l: combine([phi_a,
    phi_b], [1.0, l])`.
    """
    if not lambdas:
        raise ValueError("lambda_sweep: no λ given")
    from .subnetworks import _progress

    scores = {}
    for lam in _progress(list(lambdas), "λ sweep", progress):
        with make_diff(lam).applied(model):
            scores[lam] = float(evaluate(model))
    pick = max if higher_is_better else min
    best = pick(scores, key=scores.get)
    return best, scores
