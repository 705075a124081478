"""Regression tests of the op-layer defects of issue 11, each on every backend that runs here."""
import os
import stat
import subprocess
import threading

import pytest
import torch

import xlsparse
from xlsparse import SparseDelta, SparseDiff, functional
from xlsparse.ops import compose as cops, matmul as mops

from conftest import assert_bit_identical, child_python, cpu_backends

INF = float("inf")


@pytest.mark.parametrize("backend", cpu_backends("spmm_"))
def test_spmm_out_aliasing_x_reads_x_as_before(backend, use_backend):
    """out += x Δᵀ with out and x one tensor: x is read as it was before the call, everywhere."""
    use_backend(backend)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 4, generator=g)
    idx, vals = torch.tensor([0, 5, 6, 15]), torch.randn(4, generator=g)
    want = x.clone()
    mops.spmm_reference(want, x.clone(), idx, vals)
    mops.spmm_(x, x, idx, vals)
    torch.testing.assert_close(x, want)


@pytest.mark.parametrize("backend", cpu_backends("sddmm"))
def test_duplicate_token_index_is_refused(backend, use_backend):
    use_backend(backend)
    x, dy = torch.randn(4, 3), torch.randn(4, 2)
    idx, vals = torch.tensor([0, 4]), torch.randn(2)
    twice = torch.tensor([1, 2, 1])
    with pytest.raises(ValueError, match="more than once"):
        mops.sddmm(dy, x, idx, twice)
    out = torch.randn(4, 2)
    before = out.clone()
    with pytest.raises(ValueError, match="more than once"):
        mops.spmm_(out, x, idx, vals, twice)
    assert_bit_identical(out, before, "refused spmm_")
    # a duplicate outside the selected range is fine: only the selection is read
    mops.sddmm(dy, x, idx, twice, torch.tensor([0, 2]))


def test_triton_reads_strided_index_and_token_tensors():
    if "triton" not in cpu_backends("sddmm"):
        pytest.skip("triton not usable here")
    import xlsparse.triton.matmul as tm

    g = torch.Generator().manual_seed(1)
    x, dy = torch.randn(6, 4, generator=g), torch.randn(6, 3, generator=g)
    idx = torch.tensor([[0, 9], [3, 9], [7, 9], [11, 9]])[:, 0]  # strided
    tok = torch.tensor([[5, 0], [1, 0], [2, 0]])[:, 0]
    got = tm.triton_sddmm(dy, x, idx, tok, None, None)
    want = mops.sddmm_reference(dy, x, idx.contiguous(), tok.contiguous())
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", cpu_backends("ensemble_logprobs"))
def test_ensemble_prob_space_banned_class_is_minus_inf_with_finite_grads(backend, use_backend):
    use_backend(backend)
    g = torch.Generator().manual_seed(2)
    z = torch.randn(3, 4, 6, generator=g)
    z[:, :, 2] = -INF  # every expert bans class 2
    z.requires_grad_(True)
    lw = torch.log_softmax(torch.randn(4, 3, generator=g), -1).requires_grad_(True)
    out = functional.ensemble_logprobs(z, lw, "prob")
    assert (out[:, 2] == -INF).all() and not out.isnan().any()
    (out.masked_fill(out.isinf(), 0) * torch.randn(out.shape, generator=g)).sum().backward()
    assert torch.isfinite(z.grad).all() and torch.isfinite(lw.grad).all()
    # the gradient equals plain autograd on the finite classes' mixture
    z2 = z.detach()[:, :, [0, 1, 3, 4, 5]].clone().requires_grad_(True)
    lw2 = lw.detach().clone().requires_grad_(True)
    mix = torch.logsumexp(lw2.T[:, :, None] + torch.log_softmax(z2, -1), 0)
    torch.testing.assert_close(out.detach()[:, [0, 1, 3, 4, 5]], mix.detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", cpu_backends("ensemble_logprobs"))
@pytest.mark.parametrize("nll", [False, True], ids=["logprobs", "nll"])
def test_ensemble_logit_space_expert_banning_a_class_gives_finite_weight_grads(backend, nll, use_backend):
    """One expert gives class 2 a logit of −inf, so the mixed logit is −inf and its probability 0.
    A loss that never touches class 2 then has the gradients of the mixture of the other classes:
    0 · (−inf) must count 0 in d log_weights, not NaN."""
    use_backend(backend)
    g = torch.Generator().manual_seed(3)
    z = torch.randn(3, 4, 6, generator=g)
    z[1, :, 2] = -INF
    lw = torch.log_softmax(torch.randn(4, 3, generator=g), -1)
    y = torch.tensor([0, 5, 1, 3])  # never class 2
    gy = torch.randn(4, 6, generator=g)
    gy[:, 2] = 0.0
    keep = [0, 1, 3, 4, 5]

    def loss(z, lw, ours):
        if ours:
            if nll:
                return functional.ensemble_nll(z, lw, y, "logit").sum()
            return (functional.ensemble_logprobs(z, lw, "logit").masked_fill(gy == 0, 0) * gy).sum()
        out = torch.log_softmax((lw.T.exp()[:, :, None] * z).sum(0), -1)  # the finite classes' mixture
        if nll:
            return -out.gather(1, torch.tensor([0, 4, 1, 2])[:, None]).sum()  # y in the kept columns
        return (out * gy[:, keep].double()).sum()

    z1, lw1 = z.clone().requires_grad_(True), lw.clone().requires_grad_(True)
    loss(z1, lw1, True).backward()
    z2, lw2 = z[:, :, keep].double().requires_grad_(True), lw.double().requires_grad_(True)
    loss(z2, lw2, False).backward()
    assert torch.isfinite(lw1.grad).all() and torch.isfinite(z1.grad).all()
    torch.testing.assert_close(lw1.grad.double(), lw2.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(z1.grad[:, :, keep].double(), z2.grad, atol=1e-5, rtol=1e-5)
    assert (z1.grad[:, :, 2] == 0).all()


@pytest.mark.parametrize("backend", cpu_backends("ensemble_nll"))
def test_ensemble_prob_space_nll_with_an_expert_banning_another_class(backend, use_backend):
    """An expert's −inf logit at a class that is not the target leaves every gradient finite and
    equal to float64 autograd of the mixture (the reference once took z · onehot: 0 · (−inf))."""
    use_backend(backend)
    g = torch.Generator().manual_seed(4)
    z = torch.randn(3, 4, 6, generator=g)
    z[1, :, 2] = -INF
    lw = torch.log_softmax(torch.randn(4, 3, generator=g), -1)
    y = torch.tensor([0, 5, 1, 3])
    gy = torch.randn(4, generator=g)
    z1, lw1 = z.clone().requires_grad_(True), lw.clone().requires_grad_(True)
    (functional.ensemble_nll(z1, lw1, y, "prob") * gy).sum().backward()
    z2, lw2 = z.double().requires_grad_(True), lw.double().requires_grad_(True)
    mix = torch.logsumexp(lw2.T[:, :, None] + torch.log_softmax(z2, -1), 0)
    (-mix.gather(1, y[:, None])[:, 0] * gy.double()).sum().backward()
    assert torch.isfinite(z1.grad).all() and torch.isfinite(lw1.grad).all()
    torch.testing.assert_close(lw1.grad.double(), lw2.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(z1.grad.double(), z2.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", cpu_backends("ensemble_logprobs"))
def test_ensemble_saved_lse_of_an_expert_banning_every_class_is_minus_inf(backend, use_backend):
    """log Σ exp(−inf) = −inf, as torch.logsumexp (a GPU kernel and the CPU kernel once saved NaN);
    the other tokens are untouched by that row."""
    use_backend(backend)
    g = torch.Generator().manual_seed(6)
    z = torch.randn(2, 3, 5, generator=g)
    z[1, 0, :] = -INF
    lw = torch.log_softmax(torch.randn(3, 2, generator=g), -1)
    out, lse = mops.ensemble_logprobs_op(z, lw, True)
    assert lse[1, 0] == -INF
    torch.testing.assert_close(lse, torch.logsumexp(z, -1))
    ref = torch.logsumexp(lw.T[:, 1:, None] + torch.log_softmax(z[:, 1:], -1), 0)
    torch.testing.assert_close(out[1:], ref)


@pytest.mark.parametrize("backend", cpu_backends("ensemble_nll_backward"))
def test_ensemble_backward_refuses_saved_tensors_that_do_not_fit(backend, use_backend):
    use_backend(backend)
    z, lw = torch.randn(2, 3, 5), torch.randn(3, 2)
    y = torch.tensor([0, 4, 2])
    nll, lse = mops.ensemble_nll_op(z, lw, y, True)
    with pytest.raises(IndexError, match="targets"):
        mops.ensemble_nll_backward(torch.ones(3), z, lw, torch.tensor([0, 99, 2]), nll, lse, True)
    with pytest.raises(ValueError, match="lse"):
        mops.ensemble_nll_backward(torch.ones(3), z, lw, y, nll, lse[:, :1], True)
    with pytest.raises(ValueError, match="grad"):
        mops.ensemble_nll_backward(torch.ones(2), z, lw, y, nll, lse, True)
    # a half-precision nll would put the posterior off by its rounding: nll and its grad are float32
    zb = z.bfloat16()
    nllb, lseb = mops.ensemble_nll_op(zb, lw, y, True)
    assert nllb.dtype == torch.float32
    with pytest.raises(TypeError, match="float32"):
        mops.ensemble_nll_backward(torch.ones(3), zb, lw, y, nllb.bfloat16(), lseb, True)
    with pytest.raises(TypeError, match="float32"):
        mops.ensemble_nll_backward(torch.ones(3, dtype=torch.bfloat16), zb, lw, y, nllb, lseb, True)
    out, lse = mops.ensemble_logprobs_op(z, lw, False)
    with pytest.raises(ValueError, match="lse"):
        mops.ensemble_logprobs_backward(torch.ones(3, 5), z, lw, out, lse.expand(2, 3), False)


def test_compiled_backward_ops_refuse_saved_tensors_that_do_not_fit():
    """A direct call of the C++ op (no Python wrapper) is guarded too: an error, not a segfault."""
    if "cpu" not in cpu_backends("ensemble_nll_backward"):
        pytest.skip("no compiled extension")
    z, lw, y = torch.randn(2, 3, 5), torch.randn(3, 2), torch.tensor([0, 4, 2])
    nll, lse = torch.ops.xlsparse.ensemble_nll(z, lw, y, True)
    with pytest.raises(IndexError):
        torch.ops.xlsparse.ensemble_nll_backward(torch.ones(3), z, lw, torch.tensor([0, 10**9, 2]), nll, lse, True)
    with pytest.raises(ValueError):
        torch.ops.xlsparse.ensemble_nll_backward(torch.ones(3), z, lw, y, nll[:1], lse, True)
    with pytest.raises(ValueError):
        torch.ops.xlsparse.ensemble_logprobs_backward(torch.ones(3, 5), z, lw, torch.ones(3, 5), lse[:, :1], True)


def _model():
    m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    return m


def test_apply_writes_nothing_when_a_later_entry_fails():
    m = _model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    good = SparseDiff({"0.weight": SparseDelta(torch.tensor([1, 5]), torch.randn(2), (3, 4))})
    bad_dense = SparseDiff({"1.weight": SparseDelta(torch.tensor([0]), torch.randn(1), (2, 3))},
                           {"0.bias": torch.randn(5)})  # wrong shape
    with pytest.raises(ValueError):
        xlsparse.apply([good, bad_dense], m)
    missing = SparseDiff(absolute={"nope": torch.randn(2)})
    with pytest.raises(KeyError):
        xlsparse.apply([good, missing], m)
    with pytest.raises(ValueError, match="finite"):
        xlsparse.apply([good], m, alphas=[float("nan")])
    for k, v in m.state_dict().items():
        assert_bit_identical(v, before[k], k)


def test_concurrent_apply_on_one_model_is_refused():
    m = _model()
    diff = SparseDiff({"0.weight": SparseDelta(torch.tensor([1, 5]), torch.randn(2), (3, 4))})
    before = m[0].weight.detach().clone()
    entered, release = threading.Event(), threading.Event()
    real = cops.apply_diffs_

    def slow_apply(*args):  # holds the first apply inside its write section
        entered.set()
        release.wait(10)
        return real(*args)

    errors = []
    cops.apply_diffs_ = slow_apply
    try:
        first = threading.Thread(target=lambda: errors.append(xlsparse.apply([diff], m)))
        first.start()
        entered.wait(10)
        cops.apply_diffs_ = real
        with pytest.raises(RuntimeError, match="another thread"):
            xlsparse.apply([diff], m)
        release.set()
        first.join(10)
    finally:
        cops.apply_diffs_ = real
        release.set()
    handle = errors[0]
    handle.revert()
    assert_bit_identical(m[0].weight.detach(), before, "after revert")


def test_composable_sft_index_overflow_raises_and_cli_exits_nonzero(tmp_path):
    path = tmp_path / "pytorch_diff.bin"
    steps = [2**62, 2**62, 2**62]  # the running sum wraps past int64
    torch.save({"diffs": {"w": {"size": torch.Size([4, 4]), "index_steps": steps, "values": torch.randn(3)}},
                "abs": {}}, path)
    with pytest.raises(ValueError, match="overflow"):
        SparseDiff.load_composable_sft(str(path))
    run = subprocess.run(child_python("-m", "xlsparse.cli", "convert-composable-sft", str(path),
                                      str(tmp_path / "out.safetensors")), capture_output=True, text=True)
    assert run.returncode != 0
    assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert not (tmp_path / "out.safetensors").exists()


def test_saved_files_respect_the_umask(tmp_path):
    diff = SparseDiff({"w": SparseDelta(torch.tensor([1]), torch.randn(1), (3,))})
    old = os.umask(0o022)
    try:
        diff.save(str(tmp_path / "d.safetensors"))
        diff.save_composable_sft(str(tmp_path / "d.bin"))
    finally:
        os.umask(old)
    for name in ("d.safetensors", "d.bin"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o644


def _rewrite_meta(path, edit):
    """Rewrite the xlsparse metadata of a saved file through safetensors itself."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["xlsparse"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(meta, tensors)
    save_file(tensors, str(path), metadata={"xlsparse": json.dumps(meta)})


@pytest.mark.parametrize("case", ["duplicate name", "float shape", "float version", "bool version", "string nnz"])
def test_file_metadata_is_validated_not_coerced(tmp_path, case):
    path = tmp_path / "d.safetensors"
    SparseDiff({"a": SparseDelta(torch.tensor([1]), torch.randn(1), (2, 3)),
                "b": SparseDelta(torch.tensor([0]), torch.randn(1), (2, 3))}).save(str(path))

    def edit(meta, tensors):
        if case == "duplicate name":
            meta["deltas"][1]["name"] = "a"
        elif case == "float shape":
            meta["deltas"][0]["shape"] = [2.0, 3.0]
        elif case == "float version":
            meta["format_version"] = 1.0
        elif case == "bool version":
            meta["format_version"] = True
        else:
            meta["deltas"][0]["nnz"] = "1"

    _rewrite_meta(path, edit)
    with pytest.raises(ValueError):
        SparseDiff.load(str(path))


def test_masked_adamw_keeps_its_masks_when_the_loaded_state_has_none():
    p = torch.nn.Parameter(torch.randn(10))
    mask = torch.zeros(10, dtype=torch.bool)
    mask[:3] = True
    for mode in ("dense", "compact"):
        plain = torch.optim.AdamW([p], lr=0.1)
        p.grad = torch.ones(10)
        plain.step()
        opt = xlsparse.optim.MaskedAdamW([p], [mask], lr=0.1, mode=mode)
        state = plain.state_dict() if mode == "dense" else {"state": {}, "param_groups": opt.state_dict()["param_groups"]}
        opt.load_state_dict(state)
        before = p.detach().clone()
        opt.step()
        changed = (p.detach() != before)
        assert changed[:3].all() and not changed[3:].any(), mode


@pytest.mark.parametrize("name", ["lr", "eps", "weight_decay", "betas"])
def test_non_finite_hyperparameters_are_refused(name):
    p = torch.nn.Parameter(torch.randn(4))
    kwargs = {name: (0.9, float("nan")) if name == "betas" else float("nan")}
    with pytest.raises(ValueError, match="beta2" if name == "betas" else name):
        xlsparse.optim.MaskedAdamW([p], [None], **kwargs)
    with pytest.raises(ValueError, match="lr"):
        xlsparse.optim.MaskedSGD([p], [None], lr=float("inf"))


def test_cpu_spmm_scratch_is_bounded_by_the_token_count():
    """One very wide token row: the CPU kernels' scratch is [width, tokens], not [width, 256]."""
    if "cpu" not in cpu_backends("spmm_"):
        pytest.skip("no compiled extension")
    code = (
        "import resource, torch, xlsparse\n"
        "from xlsparse.ops import matmul as m\n"
        "x = torch.randn(1, 1 << 21); out = torch.zeros(1, 4)\n"
        "idx = torch.tensor([0, (1 << 21) + 5, 3 * (1 << 21) - 1]); vals = torch.randn(3)\n"
        "vm = int(next(l for l in open('/proc/self/status') if l.startswith('VmSize')).split()[1]) * 1024\n"
        "resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), vm + (1 << 30)))\n"  # 2 GiB more would not fit
        "m.spmm_(out, x, idx, vals); m.sddmm(out, x, idx); m.spmm_(x, out, idx, vals, transpose=True)\n"
        "print('ok')\n")
    env = {**os.environ, "XLSPARSE_BACKEND": "cpu", "OMP_NUM_THREADS": "2"}
    run = subprocess.run(child_python("-c", code), capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0 and "ok" in run.stdout, run.stderr[-2000:]
