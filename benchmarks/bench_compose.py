"""Sparse-diff composition benchmarks (`xlsparse bench --family compose`).

Rows: sparse_axpy_ on one tensor; applying a language diff plus a task diff to tensors shaped
like xlm-roberta-base (about 278M parameters) in one fused call, against composable-sft's way and
an index_add_ loop; the bit-exact revert; global top-K over about 100M elements in 200 tensors,
against torch.topk on torch.cat and against composable-sft's way (Python list + np.partition),
the latter on a 10M-element subset because on the full set it takes minutes and ~5 GB.
"""
import torch

import xlsparse
from xlsparse.benchmarks import baselines
from xlsparse.benchmarks.harness import Case, cache_lines
from xlsparse.diff import _reorder
from xlsparse.ops.registry import backend_for
from xlsparse.ops.compose import restore_diffs_, sparse_axpy_
from xlsparse.functional import topk_mask

FAMILY = "compose"


def _axpy_case(n: int, density: float) -> Case:
    gen = torch.Generator().manual_seed(0)
    k = int(n * density)
    dense = torch.randn(n, generator=gen)
    idx = torch.randperm(n, generator=gen)[:k].sort().values
    vals = torch.randn(k, generator=gen)
    # Bytes: indices and values streamed once, each touched cache line of dense read and written.
    moved = k * (idx.element_size() + vals.element_size()) + 2 * 64 * cache_lines(idx, 4)
    return Case(
        op="sparse_axpy_",
        shape=f"[{n}]",
        density=density,
        dtype="float32",
        backend=backend_for("sparse_axpy_", dense.device),
        fn=lambda: sparse_axpy_(dense, idx, vals, 1e-3),
        baseline=lambda: baselines.index_add_axpy(dense, idx, vals, 1e-3),
        baseline_name="index_add_",
        bytes=moved,
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


def _random_diff(shapes: dict, density: float, seed: int) -> xlsparse.SparseDiff:
    gen = torch.Generator().manual_seed(seed)
    deltas = {}
    for name, shape in shapes.items():
        numel = torch.Size(shape).numel()
        k = int(numel * density)
        # k sorted unique positions without a randperm of numel: sort random draws, drop repeats.
        idx = torch.unique(torch.randint(0, numel, (k,), generator=gen))
        deltas[name] = xlsparse.SparseDelta._trusted(idx.int(), torch.randn(idx.numel(), generator=gen) * 1e-3, shape)
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


def _apply_cases(quick: bool) -> list[Case]:
    shapes = xlmr_shapes(layers=1, vocab=8000) if quick else xlmr_shapes()
    n = sum(torch.Size(s).numel() for s in shapes.values())
    gen = torch.Generator().manual_seed(1)
    params = {name: torch.randn(shape, generator=gen) * 0.02 for name, shape in shapes.items()}
    cases = []
    for density in (0.01, 0.05):
        lang, task = _random_diff(shapes, density, 2), _random_diff(shapes, density, 3)
        diffs, alphas = [lang, task], [1.0, 1.0]
        nnz = lang.nnz + task.nnz
        lines = sum(cache_lines(torch.unique(torch.cat([lang.deltas[k].indices, task.deltas[k].indices])), 4) for k in shapes)
        # Bytes: both diffs' indices and values read, displaced values written, touched lines of W read + written.
        moved = nnz * (4 + 4 + 4) + 2 * 64 * lines
        shape = f"xlm-r-base {n / 1e6:.0f}M params, 2 diffs"
        apply = lambda diffs=diffs: xlsparse.apply(diffs, params, alphas)  # noqa: E731
        encoded = [_encode_composable(d) for d in diffs]
        cases.append(Case(op="apply lang+task", shape=shape, density=density, dtype="float32",
                          backend=backend_for("apply_diffs_", torch.device("cpu")), fn=apply,
                          baseline=lambda encoded=encoded: baselines.composable_sft_apply(params, encoded, alphas),
                          baseline_name="composable-sft (decode, dense diff, add)", bytes=moved))
        plain = [{k: (d.indices.long(), d.values) for k, d in diff.deltas.items()} for diff in diffs]
        cases.append(Case(op="apply lang+task", shape=shape, density=density, dtype="float32",
                          backend=backend_for("apply_diffs_", torch.device("cpu")), fn=apply,
                          baseline=lambda plain=plain: baselines.index_add_apply(params, plain, alphas),
                          baseline_name="index_add_ loop", bytes=moved))
        # The revert restores the displaced values; repeating it rewrites the same bits.
        handle = xlsparse.apply(diffs, params, alphas)
        revert = lambda h=handle: restore_diffs_(h._dense, h._indices, h._saved, h._target)  # noqa: E731
        cases.append(Case(op="revert (bit-exact)", shape=shape, density=density, dtype="float32",
                          backend=backend_for("restore_diffs_", torch.device("cpu")), fn=revert,
                          baseline=lambda encoded=encoded: baselines.composable_sft_apply(params, encoded, [-1.0, -1.0]),
                          baseline_name="composable-sft revert (subtract; not exact)",
                          bytes=nnz * (4 + 4) + 64 * lines, note="revert = restore of the saved values"))
    return cases


def _topk_cases(quick: bool) -> list[Case]:
    gen = torch.Generator().manual_seed(4)
    sizes = [(512, 768), (768, 768)] * (4 if quick else 100)
    tensors = [torch.randn(s, generator=gen) for s in sizes]
    n = sum(t.numel() for t in tensors)
    k = n // 100
    backend = backend_for("topk_masks", torch.device("cpu"))
    # Bytes: the histogram pass and the mask pass read the data; the masks are written once.
    moved = 2 * 4 * n + n
    cases = [Case(op="global top-K |x|", shape=f"{n / 1e6:.0f}M in {len(tensors)} tensors", density=0.01, dtype="float32",
                  backend=backend, fn=lambda: topk_mask(tensors, k), baseline=lambda: baselines.topk_cat(tensors, k),
                  baseline_name="torch.topk(torch.cat)", bytes=moved)]
    # composable-sft's way is too slow for the full set: time both on a subset of the tensors.
    subset = tensors[: 2 if quick else 20]
    m = sum(t.numel() for t in subset)
    cases.append(Case(op="global top-K |x|", shape=f"{m / 1e6:.0f}M in {len(subset)} tensors (subset)", density=0.01,
                      dtype="float32", backend=backend, fn=lambda: topk_mask(subset, m // 100),
                      baseline=lambda: baselines.composable_sft_threshold(subset, m // 100),
                      baseline_name="composable-sft (list + np.partition)", bytes=2 * 4 * m + m))
    return cases


def cases(quick: bool = False) -> list[Case]:
    n = 8 * 2**20 if quick else 64 * 2**20
    return [_axpy_case(n, d) for d in (0.01, 0.05)] + _apply_cases(quick) + _topk_cases(quick)
