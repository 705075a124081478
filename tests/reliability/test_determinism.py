"""Determinism: the ops give bit-identical results on repeated runs and with 1 or 2 threads.

Each workload is fingerprinted (sha256 of the output bits) in fresh processes started with
torch.set_num_threads(1) and (2), and twice in this process. Sizes are large enough that the
C++ kernels split the work over both threads.
"""
import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def _digest(*tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().contiguous().cpu()
        if t.dtype in (torch.bfloat16, torch.float16):
            t = t.view(torch.int16)
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def fingerprints() -> dict:
    """{workload: digest} for every op, on the backend chosen by XLSPARSE_BACKEND (or the default)."""
    import xlsparse
    from xlsparse import functional
    from xlsparse.ops import compose as cops, matmul as mops, optim as oops

    g = torch.Generator().manual_seed(0)
    out = {}

    def idx(n, k):
        return torch.randperm(n, generator=g)[:k].sort().values

    # composition: three overlapping diffs on two tensors, then revert
    for dtype in (torch.float32, torch.bfloat16):
        dense = [torch.randn(300_000, generator=g).to(dtype), torch.randn(700, 300, generator=g).to(dtype)]
        orig = [d.clone() for d in dense]
        ids = [idx(300_000, 90_000), idx(300_000, 90_000), idx(210_000, 60_000)]
        vals = [torch.randn(i.numel(), generator=g).to(dtype) for i in ids]
        saved = cops.apply_diffs_(dense, ids, vals, [0, 0, 1], [0.5, -1.25, 3.0])
        out[f"apply {dtype}"] = _digest(*dense, *saved)
        cops.restore_diffs_(dense, ids, saved, [0, 0, 1])
        out[f"revert {dtype}"] = _digest(*dense)
        assert all(torch.equal(a.view(torch.int16 if a.element_size() == 2 else torch.int32),
                               b.view(torch.int16 if b.element_size() == 2 else torch.int32)) for a, b in zip(dense, orig))
        mi, mv = cops.merge_deltas(ids[:2], vals[:2], [0.3, 0.7], 300_000)
        out[f"merge {dtype}"] = _digest(mi, mv)
        # top-K with many ties: few distinct magnitudes
        scores = [(torch.randint(-50, 51, (n,), generator=g) * 0.01).to(dtype) for n in (200_000, 123_457, 5)]
        out[f"topk {dtype}"] = _digest(*functional.topk_mask(scores, 77_777))
    # optimizers: three steps, dense mask and compact indices, shared and per-entry step counts
    for sel_kind in ("mask", "indices"):
        p = torch.randn(400_000, generator=g)
        chosen = idx(400_000, 120_000)
        sel = torch.zeros(400_000, dtype=torch.bool).index_fill_(0, chosen, True) if sel_kind == "mask" else chosen.int()
        n = 400_000 if sel_kind == "mask" else chosen.numel()
        m, v, buf = torch.zeros(n), torch.zeros(n), torch.zeros(n)
        step, step2 = torch.tensor(0.0), torch.zeros(n, dtype=torch.int32)
        q = p.clone()
        for _ in range(3):
            grad = torch.randn(400_000, generator=g)
            oops.masked_adamw_([p], [grad], [sel], [m], [v], [], [step], [], lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
                               weight_decay=0.01)
            oops.masked_sgd_([q], [grad], [sel], [buf], [step2], lr=1e-2, momentum=0.9, weight_decay=0.01)
        out[f"adamw {sel_kind}"] = _digest(p, m, v, step)
        out[f"sgd {sel_kind}"] = _digest(q, buf, step2)
    # matmul: SDDMM (a sum over tokens per entry), SpMM, the layers' backward, gate gradients
    t, o, i = 257, 96, 80
    x, dy = torch.randn(t, i, generator=g), torch.randn(t, o, generator=g)
    k = idx(o * i, 3000)
    vals = torch.randn(k.numel(), generator=g)
    out["sddmm"] = _digest(mops.sddmm(dy, x, k))
    out["spmm"] = _digest(mops.spmm_(dy.clone(), x, k, vals), mops.spmm_(x.clone(), dy, k, vals, transpose=True))
    w = torch.randn(o, i, generator=g)
    v1 = vals.clone().requires_grad_()
    xg = x.clone().requires_grad_()
    functional.sparse_delta_linear(xg, w, None, k, v1).square().sum().backward()
    out["sparse_delta_linear grads"] = _digest(xg.grad, v1.grad)
    gates = torch.rand(t, 2, generator=g).requires_grad_()
    k2 = idx(o * i, 2000)
    v2 = torch.randn(k2.numel(), generator=g).requires_grad_()
    v1.grad = None
    functional.multi_delta_linear(x, w, None, [k, k2], [v1, v2], gates=gates).square().sum().backward()
    out["multi_delta_linear gate grads"] = _digest(gates.grad, v1.grad, v2.grad)
    ids = torch.randint(-1, 3, (t,), generator=g)
    groups = xlsparse.routing.TokenGroups.build(ids, 3)
    masks = torch.rand(3, o, i, generator=g) < 0.3
    out["multi_mask_weight_grad"] = _digest(oops.multi_mask_weight_grad(dy, x, masks, groups.order, groups.offsets))
    return out


def _in_subprocess(threads: int, backend: str) -> dict:
    from conftest import child_python  # here: this file also runs as a script, without tests/ on its path

    env = dict(os.environ, XLSPARSE_BACKEND=backend, OMP_NUM_THREADS=str(threads))
    res = subprocess.run(child_python(os.path.join(HERE, "test_determinism.py"), str(threads)), env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # child processes per thread count: ~10 s each
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_bit_identical_across_runs_and_thread_counts(backend, use_backend):
    from xlsparse import _ext

    if backend == "cpu" and not _ext.loaded():
        pytest.skip("no compiled extension")
    one, two = _in_subprocess(1, backend), _in_subprocess(2, backend)
    use_backend(backend)
    here = fingerprints()
    assert here == fingerprints(), "two runs in one process differ"
    differ = sorted(k for k in one if one[k] != two[k])
    assert not differ, f"1 vs 2 threads differ on {differ}"
    assert here == two


if __name__ == "__main__":
    torch.set_num_threads(int(sys.argv[1]))
    print(json.dumps(fingerprints()))
