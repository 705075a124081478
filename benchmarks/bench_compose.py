"""Sparse-diff composition benchmarks (`xlsparse bench --family compose`).

Rows: sparse_axpy_ on one tensor; applying a language diff plus a task diff to tensors shaped
like xlm-roberta-base (about 278M parameters) in one fused call, against composable-sft's way and
an index_add_ loop; the bit-exact revert; global top-K over about 100M elements in 200 tensors,
against torch.topk on torch.cat and against composable-sft's way (Python list + np.partition),
the latter on a 10M-element subset because on the full set it takes minutes and ~5 GB. Beside
them, apply and revert of one diff on the real 5% LT-SFT support of e5-small (real_masks.py).
"""
import torch

import xlsparse
from xlsparse.diff import _reorder
from xlsparse.functional import topk_mask
from xlsparse.ops.compose import sparse_axpy_

from . import baselines, real_masks
from .harness import LINE_BYTES, Case, Target, assert_same, backend_of, cache_lines

FAMILY = "compose"
REVERT_NOTE = "handle.revert() of an apply made before the timer: restores the saved values"


def axpy_bytes(indices: torch.Tensor, value_size: int) -> int:
    """Indices and values streamed once; each touched cache line of the dense tensor read and written."""
    return indices.numel() * (indices.element_size() + value_size) + 2 * LINE_BYTES * cache_lines(indices, 4)


def apply_bytes(nnz: int, lines: int) -> int:
    """Both diffs' int32 indices and fp32 values read, the displaced values written (4 bytes each),
    and every touched line of the weights read and written."""
    return nnz * (4 + 4 + 4) + 2 * LINE_BYTES * lines


def revert_bytes(nnz: int, lines: int) -> int:
    """The indices and saved values read; every touched line of the weights written. The read
    that a partial line write needs first is not counted (one convention for every row: a
    written line counts once), so this share errs low."""
    return nnz * (4 + 4) + LINE_BYTES * lines


def topk_bytes(n: int, value_size: int = 4) -> int:
    """Every value read once and every bool mask entry written once: a global top-K need read its
    data only once (it can keep its candidates as it streams), so a second read pass is the
    implementation's choice and not counted (counting it read 2 x 4 + 1 bytes an entry, not 5)."""
    return n * (value_size + 1)


def _revert_row(diffs, params, alphas):
    """A revert row's (setup, fn): each timed call is the public `revert()` (its later-apply and
    placement checks and its lock included) of an apply that `setup` made before the timer started."""
    handles = []
    return lambda: handles.append(xlsparse.apply(diffs, params, alphas)), lambda: handles.pop().revert()


def _axpy_case(n: int, density: float, device) -> Case:
    gen = torch.Generator().manual_seed(0)
    k = int(n * density)
    dense = torch.randn(n, generator=gen).to(device)
    idx = torch.randperm(n, generator=gen)[:k].sort().values.to(device)
    vals = torch.randn(k, generator=gen).to(device)

    def check():  # on a copy of the first million entries and the indices that fall there
        m = min(n, 2**20)
        part = idx[idx < m]
        ours, theirs = dense[:m].clone(), dense[:m].clone()
        sparse_axpy_(ours, part, vals[: part.numel()], 1e-3)
        baselines.index_add_axpy(theirs, part, vals[: part.numel()], 1e-3)
        assert_same("sparse_axpy_ vs index_add_", ours, theirs, rtol=1e-6)

    return Case(
        check=check,
        op="sparse_axpy_",
        shape=f"[{n}]",
        density=density,
        dtype="float32",
        backend=backend_of("sparse_axpy_", dense.device),
        fn=lambda: sparse_axpy_(dense, idx, vals, 1e-3),
        baseline=lambda: baselines.index_add_axpy(dense, idx, vals, 1e-3),
        baseline_name="index_add_",
        bytes=axpy_bytes(idx, vals.element_size()),
    )


def xlmr_shapes(layers: int = 12, hidden: int = 768, ffn: int = 3072, vocab: int = 250002) -> dict[str, tuple]:
    """Parameter shapes of xlm-roberta-base (278M parameters with the defaults)."""
    shapes = {"embeddings.word_embeddings.weight": (vocab, hidden), "embeddings.position_embeddings.weight": (514, hidden),
              "embeddings.token_type_embeddings.weight": (1, hidden), "embeddings.LayerNorm.weight": (hidden,),
              "embeddings.LayerNorm.bias": (hidden,)}
    for i in range(layers):
        p = f"encoder.layer.{i}."
        for m in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            shapes[p + m + ".weight"], shapes[p + m + ".bias"] = (hidden, hidden), (hidden,)
        shapes[p + "intermediate.dense.weight"], shapes[p + "intermediate.dense.bias"] = (ffn, hidden), (ffn,)
        shapes[p + "output.dense.weight"], shapes[p + "output.dense.bias"] = (hidden, ffn), (hidden,)
        for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
            shapes[p + ln + ".weight"], shapes[p + ln + ".bias"] = (hidden,), (hidden,)
    shapes["pooler.dense.weight"], shapes["pooler.dense.bias"] = (hidden, hidden), (hidden,)
    return shapes


def _random_diff(shapes: dict, density: float, seed: int, device="cpu") -> xlsparse.SparseDiff:
    gen = torch.Generator().manual_seed(seed)
    deltas = {}
    for name, shape in shapes.items():
        numel = torch.Size(shape).numel()
        k = int(numel * density)
        # k sorted unique positions without a randperm of numel: sort random draws, drop repeats.
        idx = torch.unique(torch.randint(0, numel, (k,), generator=gen))
        values = torch.randn(idx.numel(), generator=gen) * 1e-3
        deltas[name] = xlsparse.SparseDelta._trusted(idx.int().to(device), values.to(device), shape)
    return xlsparse.SparseDiff._trusted(deltas)


def _encode_composable(diff: xlsparse.SparseDiff) -> dict:
    """composable-sft's encoding of a diff (column-major, delta-encoded), steps as int64 tensors."""
    out = {}
    for name, d in diff.deltas.items():
        column = _reorder(d.indices.long(), d.shape, to_row=False)
        order = torch.argsort(column)
        column = column[order]
        out[name] = {"index_steps": torch.cat([column[:1], column[1:] - column[:-1]]), "values": d.values[order]}
    return out


def _apply_check(params: dict, diffs: list, alphas: list, baseline, names: list):
    """A check for the apply/revert rows, on copies of the tensors `names` (a layer's worth: copies
    of all 278M parameters would cost more than the row): xlsparse's apply gives what
    `baseline(copies)` gives, and its revert puts back the exact bits."""

    def check():
        start = {n: params[n].clone() for n in names}
        sub = [xlsparse.SparseDiff._trusted({n: d.deltas[n] for n in names if n in d.deltas}) for d in diffs]
        ours = {n: t.clone() for n, t in start.items()}
        handle = xlsparse.apply(sub, ours, alphas)
        theirs = {n: t.clone() for n, t in start.items()}
        baseline(theirs)
        assert_same("apply vs baseline", tuple(ours[n] for n in names), tuple(theirs[n] for n in names), rtol=1e-6)
        handle._restore()
        if not all(torch.equal(ours[n], start[n]) for n in names):
            raise ValueError("check revert: the restore did not put back the exact bits")

    return check


def _apply_cases(quick: bool, device) -> list[Case]:
    shapes = xlmr_shapes(layers=1, vocab=8000) if quick else xlmr_shapes()
    n = sum(torch.Size(s).numel() for s in shapes.values())
    gen = torch.Generator().manual_seed(1)
    params = {name: (torch.randn(shape, generator=gen) * 0.02).to(device) for name, shape in shapes.items()}
    cases = []
    for density in (0.01, 0.05):
        lang, task = _random_diff(shapes, density, 2, device), _random_diff(shapes, density, 3, device)
        diffs, alphas = [lang, task], [1.0, 1.0]
        nnz = lang.nnz + task.nnz
        lines = sum(cache_lines(torch.unique(torch.cat([lang.deltas[k].indices, task.deltas[k].indices])), 4) for k in shapes)
        moved = apply_bytes(nnz, lines)
        judged = density == 0.01
        shape = f"xlm-r-base {'shapes, 1 layer, 8k vocab: ' if quick else ''}{n / 1e6:.0f}M params, 2 diffs"
        apply = lambda diffs=diffs: xlsparse.apply(diffs, params, alphas)  # noqa: E731
        # composable-sft decodes each diff once, at load; its apply and revert use the decoded tensors.
        loaded = [{name: baselines.composable_sft_decode(enc, shapes[name])
                   for name, enc in _encode_composable(d).items()} for d in diffs]
        small = [n for n in shapes if n.startswith(("encoder.layer.0.", "embeddings.position"))]
        check = _apply_check(params, diffs, alphas, lambda p, loaded=loaded: baselines.composable_sft_apply(
            p, [{n: coo for n, coo in d.items() if n in p} for d in loaded]), small)
        cases.append(Case(op="apply lang+task", shape=shape, density=density, dtype="float32",
                          backend=backend_of("apply_diffs_", device), fn=apply, check=check,
                          baseline=lambda loaded=loaded: baselines.composable_sft_apply(params, loaded),
                          baseline_name="composable-sft (param += sparse COO)", bytes=moved,
                          targets=(Target("apply lang+task diffs, 1%: >= 80% of copy bandwidth (lines touched)",
                                          "roofline", 0.80),) if judged else ()))
        plain = [{k: (d.indices, d.values) for k, d in diff.deltas.items()} for diff in diffs]
        loop_check = _apply_check(params, diffs, alphas, lambda p, plain=plain: baselines.index_add_apply(
            p, [{n: v for n, v in d.items() if n in p} for d in plain], alphas), small)
        cases.append(Case(op="apply lang+task", shape=shape, density=density, dtype="float32",
                          backend=backend_of("apply_diffs_", device), fn=apply, check=loop_check,
                          baseline=lambda plain=plain: baselines.index_add_apply(params, plain, alphas),
                          baseline_name="index_add_ loop", bytes=moved))
        setup, revert = _revert_row(diffs, params, alphas)
        cases.append(Case(op="revert (bit-exact)", shape=shape, density=density, dtype="float32",
                          backend=backend_of("restore_diffs_", device), fn=revert, setup=setup,
                          baseline=lambda loaded=loaded: baselines.composable_sft_revert(params, loaded),
                          baseline_name="composable-sft revert (param -= sparse COO; not exact)",
                          bytes=revert_bytes(nnz, lines), note=REVERT_NOTE,
                          targets=(Target("revert lang+task diffs, 1%: >= 80% of copy bandwidth (lines touched)",
                                          "roofline", 0.80),) if judged else ()))
    return cases


def _real_mask_apply_cases(quick: bool, device) -> list[Case]:
    """Apply and revert one diff on the real 5% LT-SFT support of e5-small's encoder linear weights
    (the last two layers with --quick): its skew decides how many cache lines are touched."""
    masks = real_masks.load()
    if masks is None:
        return []
    names = real_masks.weights(masks, quick)
    gen = torch.Generator().manual_seed(6)
    params = {n: (torch.randn(masks[n][1], generator=gen) * 0.02).to(device) for n in names}
    deltas = {}
    for n in names:
        idx, shape = masks[n]
        values = torch.randn(idx.numel(), generator=gen) * 1e-3
        deltas[n] = xlsparse.SparseDelta._trusted(idx.int().to(device), values.to(device), shape)
    diff = xlsparse.SparseDiff._trusted(deltas)
    numel = sum(p.numel() for p in params.values())
    lines = sum(cache_lines(d.indices, 4) for d in deltas.values())
    shape = f"e5-small encoder, {len(names)} weights, {numel / 1e6:.1f}M params, 1 diff"
    label = f"{real_masks.LABEL} ({len(names)} weights)"
    plain = [{n: (d.indices, d.values) for n, d in deltas.items()}]
    setup, revert = _revert_row([diff], params, [1.0])
    check = _apply_check(params, [diff], [1.0], lambda p: baselines.index_add_apply(
        p, [{n: v for n, v in plain[0].items() if n in p}], [1.0]), names)
    return [Case(op="apply LT-SFT diff", shape=shape, density=diff.nnz / numel, dtype="float32",
                 backend=backend_of("apply_diffs_", device), fn=lambda: xlsparse.apply([diff], params, [1.0]),
                 check=check,
                 baseline=lambda: baselines.index_add_apply(params, plain, [1.0]), baseline_name="index_add_ loop",
                 bytes=apply_bytes(diff.nnz, lines), masks=label),
            Case(op="revert (bit-exact)", shape=shape, density=diff.nnz / numel, dtype="float32",
                 backend=backend_of("restore_diffs_", device), fn=revert, setup=setup,
                 baseline=lambda: baselines.index_add_apply(params, plain, [-1.0]),
                 baseline_name="index_add_ loop, subtract (not exact)", bytes=revert_bytes(diff.nnz, lines),
                 note=REVERT_NOTE, masks=label)]


def _topk_cases(quick: bool, device) -> list[Case]:
    gen = torch.Generator().manual_seed(4)
    sizes = [(512, 768), (768, 768)] * (4 if quick else 100)
    tensors = [torch.randn(s, generator=gen).to(device) for s in sizes]
    n = sum(t.numel() for t in tensors)
    k = n // 100
    backend = backend_of("topk_masks", device)
    moved = topk_bytes(n)
    def check():  # k entries, and the same k-th largest |x| as torch.topk's selection
        masks = topk_mask(tensors, k)
        chosen = torch.cat([t.reshape(-1).abs()[m.reshape(-1)] for t, m in zip(tensors, masks)])
        theirs = torch.cat([t.reshape(-1).abs() for t in tensors])[baselines.topk_cat(tensors, k)]
        if chosen.numel() != k:
            raise ValueError(f"check global top-K: {chosen.numel()} entries selected, not {k}")
        assert_same("global top-K |x| vs torch.topk (k-th largest)", chosen.min().reshape(1), theirs.min().reshape(1),
                    rtol=0.0)

    cases = [Case(op="global top-K |x|", shape=f"{n / 1e6:.0f}M in {len(tensors)} tensors", density=0.01, dtype="float32",
                  backend=backend, fn=lambda: topk_mask(tensors, k), baseline=lambda: baselines.topk_cat(tensors, k),
                  baseline_name="torch.topk(torch.cat)", bytes=moved, check=check)]
    if torch.device(device).type != "cpu":  # composable-sft's way runs on the host only
        return cases
    # composable-sft's way is too slow for the full set: time both on a subset of the tensors.
    subset = tensors[: 2 if quick else 20]
    m = sum(t.numel() for t in subset)

    def check_subset():  # composable-sft's threshold is the k-th largest |x| ours selects
        masks = topk_mask(subset, m // 100)
        chosen = torch.cat([t.reshape(-1).abs()[s.reshape(-1)] for t, s in zip(subset, masks)])
        assert_same("global top-K |x| vs composable-sft's threshold", chosen.min().reshape(1),
                    torch.tensor([baselines.composable_sft_threshold(subset, m // 100)]), rtol=0.0)

    cases.append(Case(op="global top-K |x|", shape=f"{m / 1e6:.0f}M in {len(subset)} tensors (subset)", density=0.01,
                      dtype="float32", backend=backend, fn=lambda: topk_mask(subset, m // 100),
                      baseline=lambda: baselines.composable_sft_threshold(subset, m // 100),
                      baseline_name="composable-sft (list + np.partition)", bytes=topk_bytes(m), check=check_subset))
    return cases


def cases(quick: bool = False, device: str = "cpu") -> list[Case]:
    n = 8 * 2**20 if quick else 64 * 2**20
    return ([_axpy_case(n, d, device) for d in (0.01, 0.05)] + _apply_cases(quick, device)
            + _real_mask_apply_cases(quick, device) + _topk_cases(quick, device))
