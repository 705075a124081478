"""Runs a batch of adversarial calls in this process and reports each outcome as one JSON line.

`python fuzz_driver.py BATCH.json` (run by test_fuzz.py in a subprocess with a memory cap). A case
names an op (or a file loader, or a CLI command), a seed, a dtype and one `mutation`; the driver
builds the arguments, runs the op on the backend under test and on `reference`, and reports:
- "ok": it returned, and every output and written tensor equals the reference's;
- "raised": a documented exception (its type is reported; the test compares it with the
  mutation's documented type), and every tensor the op may write is bit-identical to before;
- anything else ("mismatch", "wrote on error", "undocumented exception") is a failure.
A crash (signal), a hang or a memory blow-up shows up as the subprocess dying.
"""
import contextlib
import io
import json
import os
import resource
import sys
import tempfile
import traceback

import torch

DOCUMENTED = (ValueError, TypeError, IndexError, KeyError)

# What each mutation must give: the Guarantees table of the README.
EXPECTED = {
    "valid": None, "strided": None, "alias": None, "zero_size": None,
    "index_out_of_range": IndexError, "index_extreme": IndexError,
    "index_unsorted": ValueError, "index_duplicate": ValueError, "index_0dim": ValueError,
    "index_float": TypeError, "values_float8": TypeError, "values_int": TypeError,
    "shape_mismatch": ValueError, "meta_mixed": ValueError, "non_finite_scalar": ValueError,
    "all_meta": "any",
}
MUTATIONS = list(EXPECTED)


def cap_memory(extra_bytes: int) -> None:
    """Limit the address space to what the process holds now plus `extra_bytes`."""
    with open("/proc/self/status") as f:
        vm = int(next(line for line in f if line.startswith("VmSize")).split()[1]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + extra_bytes, vm + extra_bytes))


# --- argument builders: (call, args, roles) with roles naming what a mutation may change ---

def _idx(g, numel, k):
    k = max(0, min(k, numel))
    return torch.randperm(numel, generator=g)[:k].sort().values


def _build(op: str, g, dtype, zero: bool):
    from xlsparse import functional
    from xlsparse.ops import compose as c, matmul as m, optim as o

    def r(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    # Mostly tiny, sometimes past a kernel's block of 16 output columns (where aliasing would show).
    high = 40 if int(torch.randint(0, 3, (1,), generator=g)) == 0 else 6
    t = 0 if zero else int(torch.randint(1, high, (1,), generator=g))
    a, b = (int(v) for v in torch.randint(1, high, (2,), generator=g))
    k = 0 if zero else int(torch.randint(1, a * b + 1, (1,), generator=g))
    if op == "sparse_axpy_":
        return (lambda d, i, v, s=0.5: c.sparse_axpy_(d, i, v, s), {"d": r(a, b), "i": _idx(g, a * b, k), "v": r(k)},
                {"out": ["d"], "idx": [("i", a * b)], "val": ["v"], "alias": ("v", "d"), "scalar": True})
    if op == "apply_diffs_":
        return (lambda d0, d1, i0, i1, v0, v1, s=-0.5: c.apply_diffs_([d0, d1], [i0, i1], [v0, v1], [0, 1], [1.0, s]),
                {"d0": r(a, b), "d1": r(b), "i0": _idx(g, a * b, k), "i1": _idx(g, b, 1), "v0": r(k), "v1": r(1)},
                {"out": ["d0", "d1"], "idx": [("i0", a * b)], "val": ["v0"], "alias": ("v0", "d0"), "scalar": True})
    if op == "merge_deltas":
        return (lambda i0, i1, v0, v1, s=2.0: c.merge_deltas([i0, i1], [v0, v1], [1.0, s], a * b),
                {"i0": _idx(g, a * b, k), "i1": _idx(g, a * b, 2), "v0": r(k), "v1": r(min(2, a * b))},
                {"out": [], "idx": [("i0", a * b)], "val": ["v0"], "scalar": True})
    if op == "topk_masks":
        return (lambda x0, x1: c.topk_masks([x0, x1], min(k, a * b)), {"x0": r(a, b), "x1": r(b)},
                {"out": [], "idx": [], "val": ["x0"], "shape": None})
    if op == "sddmm":
        return (lambda dy, x, i: m.sddmm(dy, x, i), {"dy": r(t, a), "x": r(t, b), "i": _idx(g, a * b, k)},
                {"out": [], "idx": [("i", a * b)], "val": ["x"]})
    if op == "spmm_":
        return (lambda out, x, i, v: m.spmm_(out, x, i, v), {"out": r(t, a), "x": r(t, a), "i": _idx(g, a * a, k),
                                                              "v": r(min(k, a * a))},
                {"out": ["out"], "idx": [("i", a * a)], "val": ["v", "x"], "alias": ("x", "out")})
    if op == "spmm_routed":
        order = torch.randperm(max(t, 1), generator=g)[:t]
        return (lambda out, x, i, v, tok: m.spmm_(out, x, i, v, tok, torch.tensor([0, t])),
                {"out": r(t, a), "x": r(t, b), "i": _idx(g, a * b, k), "v": r(k), "tok": order},
                {"out": ["out"], "idx": [("i", a * b), ("tok", t)], "val": ["v", "x"]})
    if op in ("ensemble_logprobs", "ensemble_nll"):
        e, v = a, b + 1
        z, lw = r(e, t, v), r(t, e)
        if op == "ensemble_logprobs":
            return (lambda z, lw: functional.ensemble_logprobs(z, lw, "prob"), {"z": z, "lw": lw},
                    {"out": [], "idx": [], "val": ["z", "lw"]})
        y = torch.randint(0, v, (t,), generator=g)
        return (lambda z, lw, y: functional.ensemble_nll(z, lw, y, "logit"), {"z": z, "lw": lw, "y": y},
                {"out": [], "idx": [("y", v)], "val": ["z", "lw"], "unordered": True, "repeats": True})
    if op in ("ensemble_logprobs_backward", "ensemble_nll_backward"):
        e, v = a, b + 1
        z, lw = torch.randn(e, t, v, generator=g).to(dtype), torch.randn(t, e, generator=g).to(dtype)
        y = torch.randint(0, v, (t,), generator=g)
        if op == "ensemble_logprobs_backward":
            out, lse = m.ensemble_logprobs_reference(z, lw, True)
            return (lambda gr, z, lw, out, lse: m.ensemble_logprobs_backward(gr, z, lw, out, lse, True),
                    {"gr": r(t, v), "z": z, "lw": lw, "out": out, "lse": lse},
                    {"out": [], "idx": [], "val": ["gr", "z"], "shape": "lse"})
        nll, lse = m.ensemble_nll_reference(z, lw, y, True)
        return (lambda gr, z, lw, y, nll, lse: m.ensemble_nll_backward(gr, z, lw, y, nll, lse, True),
                {"gr": r(t).to(nll.dtype), "z": z, "lw": lw, "y": y, "nll": nll, "lse": lse},
                {"out": [], "idx": [("y", v)], "val": ["gr", "z"], "shape": "lse", "unordered": True, "repeats": True})
    if op in ("masked_adamw_", "masked_sgd_"):
        n = a * b
        sel = _idx(g, n, k)
        args = {"p": r(a, b), "grad": r(a, b), "sel": sel, "m1": torch.zeros(sel.numel(), dtype=dtype),
                "m2": torch.zeros(sel.numel(), dtype=dtype), "st": torch.zeros((), dtype=torch.float32)}
        if op == "masked_adamw_":
            call = lambda p, grad, sel, m1, m2, st, s=0.1: o.masked_adamw_(  # noqa: E731
                [p], [grad], [sel], [m1], [m2], [], [st], [], lr=s, beta1=0.9, beta2=0.99, eps=1e-8,
                weight_decay=0.01)
        else:
            call = lambda p, grad, sel, m1, m2, st, s=0.1: o.masked_sgd_(  # noqa: E731
                [p], [grad], [sel], [m1], [st], lr=s, momentum=0.9)
        return (call, args, {"out": ["p", "m1", "m2", "st"], "idx": [("sel", n)], "val": ["grad"],
                             "alias": ("grad", "p"), "scalar": True})
    if op == "multi_mask_weight_grad":
        masks = torch.rand(2, a, b, generator=g) < 0.5
        order = torch.randperm(max(t, 1), generator=g)[:t]
        return (lambda dy, x, masks, order, offsets: o.multi_mask_weight_grad(dy, x, masks, order, offsets), {"dy": r(t, a), "x": r(t, b), "masks": masks, "order": order,
                                           "offsets": torch.tensor([0, t // 2, t])},
                {"out": [], "idx": [("order", t)], "val": ["x"], "unordered": True})
    if op == "sparse_delta_linear":
        return (lambda x, w, i, v: functional.sparse_delta_linear(x, w, None, i, v),
                {"x": r(t, b), "w": r(a, b), "i": _idx(g, a * b, k), "v": r(k)},
                {"out": [], "idx": [("i", a * b)], "val": ["v", "x"]})
    raise KeyError(op)


OPS = ["sparse_axpy_", "apply_diffs_", "merge_deltas", "topk_masks", "sddmm", "spmm_", "spmm_routed",
       "ensemble_logprobs", "ensemble_nll", "ensemble_logprobs_backward", "ensemble_nll_backward", "masked_adamw_",
       "masked_sgd_", "multi_mask_weight_grad", "sparse_delta_linear"]


def _strided(t):
    """The same values in a non-contiguous tensor."""
    if t.dim() == 0:
        return t
    wide = torch.empty(*t.shape, 2, dtype=t.dtype)
    wide[..., 0] = t
    return wide[..., 0]


def _mutate(args: dict, roles: dict, mutation: str) -> bool:
    """Apply `mutation` in place of args; False when it does not apply to this op (run it valid)."""
    idx = roles["idx"]
    if mutation == "strided":
        for name in roles["val"] + [n for n, _ in idx]:
            args[name] = _strided(args[name])
        return True
    if mutation == "alias":
        if "alias" not in roles:
            return False
        src, dst = roles["alias"]
        if args[src].numel() > args[dst].numel() or args[dst].numel() == 0:
            return False
        args[src] = args[dst].view(-1)[: args[src].numel()].view(args[src].shape)
        return True
    if mutation in ("index_out_of_range", "index_extreme", "index_unsorted", "index_duplicate", "index_0dim",
                    "index_float"):
        if not idx:
            return False
        name, bound = idx[0]
        i = args[name]
        if mutation == "index_0dim":
            args[name] = i.new_tensor(0)
            return True
        if i.numel() == 0:
            return False
        if mutation == "index_float":
            args[name] = i.float()
        elif mutation == "index_out_of_range":
            i[-1] = bound
        elif mutation == "index_extreme":
            i[-1] = 2**62
        elif mutation in ("index_unsorted", "index_duplicate"):
            if i.numel() < 2 or roles.get("unordered" if mutation == "index_unsorted" else "repeats"):
                return False
            if mutation == "index_unsorted":
                args[name] = i.flip(0)
            else:
                i[1] = i[0]
        return True
    if mutation in ("values_float8", "values_int"):
        name = roles["val"][0]
        args[name] = args[name].to(torch.float8_e4m3fn if mutation == "values_float8" else torch.int32)
        return True
    if mutation == "non_finite_scalar":
        if not roles.get("scalar"):
            return False
        args["s"] = float("nan")
        return True
    if mutation == "shape_mismatch":
        name = roles.get("shape", roles["val"][0])
        if name is None:
            return False
        args[name] = torch.cat([args[name].reshape(-1), args[name].reshape(-1)[:1]]) if args[name].numel() \
            else torch.zeros(3, dtype=args[name].dtype)
        return True
    if mutation == "meta_mixed":
        name = roles["val"][0]
        args[name] = args[name].to("meta")
        return True
    if mutation == "all_meta":
        for name in args:
            args[name] = args[name].to("meta")
        return True
    return mutation in ("valid", "zero_size")


def _tensors(x):
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for y in x for t in _tensors(y)]
    return []


def _same(a, b, dtype) -> bool:
    ta, tb = _tensors(a), _tensors(b)
    if len(ta) != len(tb):
        return False
    tol = {torch.float64: 1e-9, torch.float32: 1e-4}.get(dtype, 2e-2)
    for x, y in zip(ta, tb):
        if x.shape != y.shape or x.dtype != y.dtype:
            return False
        if x.dtype == torch.bool or not x.is_floating_point():
            if not torch.equal(x, y):
                return False
        elif not torch.allclose(x.double(), y.double(), rtol=tol, atol=tol * max(1.0, y.double().abs().max().item()
                                                                                 if y.numel() else 1.0),
                                equal_nan=True):
            return False
    return True


def _attempt(op, seed, dtype, mutation, backend):
    """(outcome, result or exception, written tensors before/after)."""
    os.environ["XLSPARSE_BACKEND"] = backend
    g = torch.Generator().manual_seed(seed)
    call, args, roles = _build(op, g, dtype, mutation == "zero_size")
    applied = _mutate(args, roles, mutation)
    before = {n: args[n].clone() for n in roles["out"] if args[n].device.type != "meta"}
    try:
        result = call(**args)
    except DOCUMENTED as exc:
        changed = [n for n, t in before.items() if not torch.equal(t.view(torch.uint8) if t.dim() else t,
                                                                      args[n].view(torch.uint8) if t.dim() else args[n])
                   and not (t.isnan() & args[n].isnan()).all()]
        return ("wrote on error" if changed else "raised"), type(exc).__name__, str(exc)[:200], applied, None
    except Exception as exc:  # noqa: BLE001 - the point is to catch what is not documented
        return "undocumented exception", type(exc).__name__, "".join(traceback.format_exception(exc))[-600:], applied, None
    return "ok", None, None, applied, (result, [args[n] for n in roles["out"]])


def run_op_case(case: dict) -> dict:
    op, seed, mutation, backend = case["op"], case["seed"], case["mutation"], case["backend"]
    dtype = getattr(torch, case["dtype"])
    outcome, exc, msg, applied, got = _attempt(op, seed, dtype, mutation, backend)
    report = {**case, "outcome": outcome, "exception": exc, "message": msg, "applied": applied}
    if outcome == "ok" and mutation != "all_meta":
        _, ref_exc, ref_msg, _, want = _attempt(op, seed, dtype, mutation, "reference")
        if want is None:
            report.update(outcome="reference raised", message=f"{ref_exc}: {ref_msg}")
        elif not _same(got, want, dtype):
            report["outcome"] = "mismatch"
    return report


# --- files and the command line ---

def run_file_case(case: dict) -> dict:
    """Corrupt a valid file (truncate, flip a byte, or rewrite a field) and load it; then run the
    CLI on it: exit status 0 or 1 with one line on stderr, and no output file on failure."""
    from xlsparse import SparseDelta, SparseDiff, cli

    g = torch.Generator().manual_seed(case["seed"])
    folder = tempfile.mkdtemp()
    diff = SparseDiff({"a.weight": SparseDelta(torch.tensor([1, 5, 17]), torch.randn(3, generator=g), (4, 5)),
                       "b.weight": SparseDelta(torch.tensor([0, 2]), torch.randn(2, generator=g), (3,))},
                      {"a.bias": torch.randn(4, generator=g)})
    composable = case["kind"] == "composable"
    path = os.path.join(folder, "pytorch_diff.bin" if composable else "d.safetensors")
    (diff.save_composable_sft if composable else diff.save)(path)
    data = bytearray(open(path, "rb").read())
    pos = case["position"] % max(1, len(data))
    if case["corruption"] == "truncate":
        data = data[:pos]
    elif case["corruption"] == "flip":
        data[pos] ^= case["xor"] or 1
    elif case["corruption"] == "insert":
        data[pos:pos] = bytes([case["xor"]]) * 8
    open(path, "wb").write(bytes(data))
    report = {**case, "outcome": "ok"}
    try:
        (SparseDiff.load_composable_sft if composable else SparseDiff.load)(path)
    except (ValueError, IndexError) as exc:
        report.update(outcome="raised", exception=type(exc).__name__)
    except Exception as exc:  # noqa: BLE001
        report.update(outcome="undocumented exception", exception=type(exc).__name__, message=repr(exc)[:300])
        return report
    out = os.path.join(folder, "out.safetensors")
    argv = ["convert-composable-sft", path, out] if composable else ["info", path]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = cli.main(argv)
        except SystemExit as exc:
            code = exc.code
    lines = err.getvalue().strip().splitlines()
    if code not in (0, 1) or (code == 1 and len(lines) != 1) or "Traceback" in err.getvalue():
        report.update(outcome="cli not clean", message=f"exit {code}: {err.getvalue()[-300:]}")
    elif (code == 0) != (report["outcome"] == "ok") or (code == 1 and os.path.exists(out)):
        report.update(outcome="cli disagrees with the loader", message=f"exit {code}")
    return report


def main(batch_path: str) -> None:
    cases = json.load(open(batch_path))
    cap_memory(int(cases[0].get("memory_cap", 2 << 30)) if cases else 2 << 30)
    for case in cases:
        report = run_file_case(case) if case.get("op") == "file" else run_op_case(case)
        print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
