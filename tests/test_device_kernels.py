"""Every kernel of the test device against the float64 reference, one generic comparison per op.

The device is CUDA when torch sees one (benchmarks/gpu.sh runs this file on a GPU: the CUDA C++
and Triton kernels on CUDA tensors, at sizes that fill the chip), else the CPU (the CPU kernels,
and Triton under TRITON_INTERPRET=1, at small sizes: the comparison itself is tested there).

Each case builds its arguments three times from one seeded draw: the kernel's (the dtype, on the
device), plain PyTorch's (the op's reference implementation in the same dtype, on the device) and
the truth (the reference in float64 on the CPU). Every output and every argument the op writes is
compared: floating tensors by flash-attention's rule (`assert_close_to_float64`: float64 to 1e-10
of the largest value), integer and bool tensors exactly."""
import pytest
import torch

from conftest import assert_close_to_float64, random_indices, seeded
from xlsparse import functional
from xlsparse.ops import compose, matmul, optim, registry

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# (T, O, I) of the matmul cases: odd sizes, and on a GPU one large enough for many thread blocks.
SHAPES = [(127, 33, 29), (3, 17, 1)] + ([(4099, 256, 192)] if ON_GPU else [])
NUMEL = 20011 if ON_GPU else 1013  # per tensor of the compose and optimizer cases
LINEAR_SHAPE = (515, 384, 256) if ON_GPU else (127, 33, 29)  # (T, O, I) of the layer cases


def kernels(op: str) -> list[str]:
    return [b for b in registry.usable(op, DEVICE) if b != "reference"]


class Args:
    """Casts for one build: `data` for tensors in the op's dtype, `put` for the rest. Data is
    rounded to the case's dtype first, so the float64 build holds the same values as the others."""

    def __init__(self, case_dtype, dtype, device):
        self.case_dtype, self.dtype, self.device = case_dtype, dtype, device

    def data(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.case_dtype).to(self.dtype).to(self.device)

    def put(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device)


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)


def _run(fn, build, seed, backend, args, monkeypatch):
    monkeypatch.setenv("XLSPARSE_BACKEND", backend)
    device = args.device
    args = build(args, seeded(seed))
    result = fn(*args)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return [t.cpu() for t in _tensors((result, args))]


def compare(fn, build, seed, backend, dtype, monkeypatch, what, extra_ulps=0.0):
    got = _run(fn, build, seed, backend, Args(dtype, dtype, DEVICE), monkeypatch)
    plain = _run(fn, build, seed, "reference", Args(dtype, dtype, DEVICE), monkeypatch)
    truth = _run(fn, build, seed, "reference", Args(dtype, torch.float64, torch.device("cpu")), monkeypatch)
    assert len(got) == len(truth), what
    for n, (g, p, r) in enumerate(zip(got, plain, truth)):
        name = f"{what}, tensor {n}"
        assert g.dtype == p.dtype, f"{name}: {g.dtype}, plain PyTorch's {p.dtype}"
        if not g.is_floating_point():  # indices, masks, counts
            assert g.shape == r.shape and torch.equal(g, r), f"{name}: {(g != r).sum().item()} entries differ"
        else:
            assert_close_to_float64(g, r, p, name, extra_ulps)


# --- the cases: (op, function, build(args, gen) -> argument list) ---


def _selection(a, gen, t, mode):
    if mode == "all":
        return None, None, None
    if mode == "scaled":
        return None, None, a.put(torch.rand(t, generator=gen) * 2 - 0.5)
    order = torch.randperm(t, generator=gen)
    return a.put(order), a.put(torch.tensor([t // 4, t - t // 5])), None


def sddmm_case(shape, density, mode):
    t, o, i = shape

    def build(a, gen):
        dy, x = torch.randn(t, o, generator=gen), torch.randn(t, i, generator=gen)
        idx = random_indices(o * i, round(o * i * density), torch.int32, gen)
        return [a.data(dy), a.data(x), a.put(idx), *_selection(a, gen, t, mode)]

    return matmul.sddmm, build


def spmm_case(shape, density, mode, transpose):
    t, o, i = shape

    def build(a, gen):
        k = round(o * i * density)
        idx, vals = random_indices(o * i, k, torch.int64, gen), torch.randn(k, generator=gen)
        x = torch.randn(t, o if transpose else i, generator=gen)
        out = torch.randn(t, i if transpose else o, generator=gen)
        return [a.data(out), a.data(x), a.put(idx), a.data(vals), *_selection(a, gen, t, mode), transpose]

    return matmul.spmm_, build


def multi_mask_case(shape, languages):
    t, o, i = shape

    def build(a, gen):
        dy, x = torch.randn(t, o, generator=gen), torch.randn(t, i, generator=gen)
        masks = torch.rand(languages, o, i, generator=gen) < 0.3
        lang = torch.randint(-1, languages, (t,), generator=gen)  # -1: a token in no group
        order = torch.argsort(lang, stable=True)[(lang < 0).sum():]
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.bincount(lang[lang >= 0], minlength=languages).cumsum(0)])
        return [a.data(dy), a.data(x), a.put(masks), a.put(order), a.put(offsets)]

    return optim.multi_mask_weight_grad, build


def ensemble_case(shape, space, nll):
    e, t, v = shape
    prob = space == "prob"

    def forward(a, gen):
        z = 3 * torch.randn(e, t, v, generator=gen)
        lw = torch.log_softmax(torch.randn(t, e, generator=gen), -1)
        y = torch.randint(0, v, (t,), generator=gen)
        return [a.data(z), a.data(lw), *([a.put(y)] if nll else []), prob]

    def backward(a, gen):
        z, lw, *rest = forward(a, gen)
        fwd = matmul.ensemble_nll_reference if nll else matmul.ensemble_logprobs_reference
        wide = [t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in (z, lw, *rest)]
        out, lse = fwd(*wide)
        grad = torch.randn(out.shape, generator=gen)
        acc = torch.float64 if a.dtype == torch.float64 else torch.float32
        # nll and its gradient are in the accumulation dtype; log-probs in the logits' dtype.
        saved = [grad.to(acc).to(a.device), out.to(acc)] if nll else [a.data(grad), out.to(a.dtype)]
        return [saved[0], z, lw, *([rest[0]] if nll else []), saved[1], lse.to(acc), prob]

    if nll:
        return (matmul.ensemble_nll_op, forward), (matmul.ensemble_nll_backward, backward)
    return (matmul.ensemble_logprobs_op, forward), (matmul.ensemble_logprobs_backward, backward)


def sparse_axpy_case(index_dtype):
    def build(a, gen):
        dense = torch.randn(NUMEL, generator=gen)
        idx = random_indices(NUMEL, NUMEL // 7, index_dtype, gen)
        return [a.data(dense), a.put(idx), a.data(torch.randn(idx.numel(), generator=gen)), -0.75]

    return compose.sparse_axpy_, build


def _diffs(a, gen):
    """Two tensors, three overlapping entries (two on the first)."""
    dense = [torch.randn(NUMEL, generator=gen), torch.randn(NUMEL // 3, 3, generator=gen)]
    target = [0, 1, 0]
    sizes = [NUMEL // 5, NUMEL // 2, NUMEL // 9]
    idx = [random_indices(dense[t].numel(), k, [torch.int32, torch.int64][n % 2], gen)
           for n, (t, k) in enumerate(zip(target, sizes))]
    vals = [torch.randn(k, generator=gen) for k in sizes]
    return [a.data(d) for d in dense], [a.put(i) for i in idx], [a.data(v) for v in vals], target


def apply_diffs_case():
    def build(a, gen):
        return [*_diffs(a, gen), [1.0, -0.5, 0.3]]

    return compose.apply_diffs_, build


def merge_deltas_case():
    def build(a, gen):
        _, idx, vals, _ = _diffs(a, gen)
        return [idx[:1] + idx[2:], vals[:1] + vals[2:], [0.5, -2.0], NUMEL]

    return compose.merge_deltas, build


def topk_case(ties):
    def build(a, gen):
        xs = [torch.randn(NUMEL, generator=gen), torch.randn(NUMEL // 4, 4, generator=gen)]
        if ties:  # few distinct magnitudes: the order among equal ones decides
            xs = [x.mul(4).round() for x in xs]
        return [[a.data(x) for x in xs], NUMEL // 10]

    return compose.topk_masks, build


def _selectors(kind, p, gen, a):
    if kind == "all":
        return None, p.numel()
    if kind == "mask":
        return a.put(torch.rand(p.shape, generator=gen) < 0.3), p.numel()
    idx = random_indices(p.numel(), p.numel() // 4, torch.int32, gen)
    return a.put(idx), idx.numel()


def masked_adamw_case(kind, amsgrad, per_entry_steps):
    def build(a, gen):
        params = [torch.randn(NUMEL, generator=gen), torch.randn(NUMEL // 4, 4, generator=gen)]
        sel, states, steps = [], [[], [], []], []
        for p in params:
            s, n = _selectors(kind, p, gen, a)
            sel.append(s)
            shape = p.shape if kind != "indices" else (n,)
            states[0].append(a.data(torch.randn(shape, generator=gen) * 0.1))
            states[1].append(a.data(torch.rand(shape, generator=gen) * 0.01))
            states[2].append(a.data(torch.rand(shape, generator=gen) * 0.02))
            if per_entry_steps:
                steps.append(a.put(torch.randint(0, 5, shape, generator=gen, dtype=torch.int32)))
            else:
                steps.append(a.put(torch.tensor([3.0])))
        grads = [a.data(torch.randn(p.shape, generator=gen)) for p in params]
        inits = [a.data(torch.randn(st.shape, generator=gen)) for st in states[0]]
        return [[a.data(p) for p in params], grads, sel, *states, steps, inits]

    def step(*args):
        optim.masked_adamw_(*args, lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-6, weight_decay=0.1,
                            l1_to_init=1e-3, amsgrad=amsgrad)

    return step, build


def masked_sgd_case(kind, nesterov):
    def build(a, gen):
        params = [torch.randn(NUMEL, generator=gen), torch.randn(NUMEL // 4, 4, generator=gen)]
        sel, bufs = [], []
        for p in params:
            s, n = _selectors(kind, p, gen, a)
            sel.append(s)
            bufs.append(a.data(torch.randn(p.shape if kind != "indices" else (n,), generator=gen)))
        grads = [a.data(torch.randn(p.shape, generator=gen)) for p in params]
        steps = [a.put(torch.tensor([2.0])) for _ in params]
        return [[a.data(p) for p in params], grads, sel, bufs, steps]

    def step(*args):
        optim.masked_sgd_(*args, lr=0.1, momentum=0.9, dampening=0.0 if nesterov else 0.2,
                          weight_decay=0.01, nesterov=nesterov)

    return step, build


CASES = {}
for shape in SHAPES:
    for density, mode in [(0.01, "all"), (0.3, "all"), (0.3, "routed"), (0.3, "scaled"), (1.0, "all")]:
        CASES[f"sddmm-{shape}-{density}-{mode}"] = ("sddmm", *sddmm_case(shape, density, mode))
        for transpose in (False, True):
            CASES[f"spmm_-{shape}-{density}-{mode}-T{int(transpose)}"] = ("spmm_", *spmm_case(shape, density, mode, transpose))
    CASES[f"multi_mask_weight_grad-{shape}"] = ("multi_mask_weight_grad", *multi_mask_case(shape, 4))
for shape in [(3, 5, 127), (2, 3, 4097)] + ([(4, 128, 32000)] if ON_GPU else []):
    for space in ("prob", "logit"):
        for nll in (False, True):
            (f_fwd, b_fwd), (f_bwd, b_bwd) = ensemble_case(shape, space, nll)
            name = "ensemble_nll" if nll else "ensemble_logprobs"
            CASES[f"{name}-{shape}-{space}"] = (name, f_fwd, b_fwd)
            # The gradients reduce over V classes in another order than the reference (and the CPU
            # kernel's exp/log are polynomials within ~2 ulp): sqrt(V) ulps more, as in test_matmul.
            CASES[f"{name}_backward-{shape}-{space}"] = (f"{name}_backward", f_bwd, b_bwd, shape[2] ** 0.5)
for index_dtype in (torch.int32, torch.int64):
    CASES[f"sparse_axpy_-{index_dtype}"] = ("sparse_axpy_", *sparse_axpy_case(index_dtype))
CASES["apply_diffs_"] = ("apply_diffs_", *apply_diffs_case())
CASES["merge_deltas"] = ("merge_deltas", *merge_deltas_case())
for ties in (False, True):
    CASES[f"topk_masks-ties{int(ties)}"] = ("topk_masks", *topk_case(ties))
for kind in ("all", "mask", "indices"):
    for amsgrad in (False, True):
        CASES[f"masked_adamw_-{kind}-ams{int(amsgrad)}"] = ("masked_adamw_", *masked_adamw_case(kind, amsgrad, False))
    CASES[f"masked_sgd_-{kind}"] = ("masked_sgd_", *masked_sgd_case(kind, kind == "mask"))
CASES["masked_adamw_-indices-entry_steps"] = ("masked_adamw_", *masked_adamw_case("indices", False, True))

PARAMS = [pytest.param(name, backend, id=f"{name}-{backend}") for name, (op, *_) in CASES.items() for backend in kernels(op)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,backend", PARAMS)
def test_kernel_matches_float64(name, backend, dtype, monkeypatch):
    op, fn, build, *extra_ulps = CASES[name]
    if op == "topk_masks" and dtype != torch.float32:
        pytest.skip("the top-K order is exact only when every build holds the same magnitudes")
    if backend == "triton" and not ON_GPU and "4097" in name:
        pytest.skip("large vocabularies are slow under the Triton interpreter")
    compare(fn, build, len(name), backend, dtype, monkeypatch, f"{name} {backend} {dtype}", *extra_ulps)


@pytest.mark.parametrize("backend", kernels("restore_diffs_"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_restore_puts_back_every_bit(backend, dtype, monkeypatch):
    monkeypatch.setenv("XLSPARSE_BACKEND", backend)
    dense, idx, vals, target = _diffs(Args(dtype, dtype, DEVICE), seeded(5))
    before = [d.clone() for d in dense]
    saved = compose.apply_diffs_(dense, idx, vals, target, [1.0, -0.5, 0.3])
    assert any(not torch.equal(b, d) for b, d in zip(before, dense)), "the apply changed nothing"
    compose.restore_diffs_(dense, idx, saved, target)
    for b, d in zip(before, dense):
        assert torch.equal(b.view(-1).view(torch.uint8), d.view(-1).view(torch.uint8))


# --- the layers: forward and backward on the device against float64 autograd of the dense sum ---


def _layer_run(device, dtype, inputs, trainable, forward, gy):
    """forward(*leaves) and the gradients of `trainable` leaves (None for the others)."""
    leaves = [[v.to(dtype).to(device).requires_grad_(n in trainable) for v in t] if isinstance(t, list)
              else t.to(dtype).to(device).requires_grad_(n in trainable) for n, t in enumerate(inputs)]
    y = forward(*leaves)
    flat = [v for t in leaves for v in (t if isinstance(t, list) else [t])]
    need = [v for v in flat if v.requires_grad]
    grads = iter(torch.autograd.grad(y, need, gy.to(dtype).to(device), allow_unused=True))
    out = [y] + [next(grads) if v.requires_grad else None for v in flat]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return [None if g is None else g.cpu() for g in out]


def _compare_layer(got, plain, truth, what):
    for n, (g, p, r) in enumerate(zip(got, plain, truth)):
        if r is None or g is None:
            assert g is None and r is None, f"{what}, output {n}: {g is None} vs {r is None}"
        else:
            assert_close_to_float64(g, r, p, f"{what}, output {n}")


@pytest.mark.parametrize("backend", kernels("sddmm"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("merged", [True, False], ids=["merged", "spmm"])
@pytest.mark.parametrize("train_weight", [False, True], ids=["frozen", "trained"])
def test_sparse_delta_linear_matches_float64(backend, dtype, merged, train_weight, monkeypatch):
    monkeypatch.setenv("XLSPARSE_BACKEND", backend)
    monkeypatch.setattr(functional, "merge_pays", lambda *a: merged)
    t, o, i = LINEAR_SHAPE
    gen = seeded(11)
    k = o * i // 50
    idx = random_indices(o * i, k, torch.int64, gen)
    inputs = [torch.randn(t, i, generator=gen), torch.randn(o, i, generator=gen) / i**0.5, torch.randn(o, generator=gen),
              torch.randn(k, generator=gen)]
    gy = torch.randn(t, o, generator=gen)
    trainable = {0, 2, 3} | ({1} if train_weight else set())

    def ours(x, w, b, v):
        return functional.sparse_delta_linear(x, w, b, idx.to(x.device), v)

    def dense(x, w, b, v):
        return torch.nn.functional.linear(x, w.reshape(-1).index_add(0, idx.to(x.device), v).view(o, i), b)

    rounded = [v.to(dtype) for v in inputs]
    got = _layer_run(DEVICE, dtype, rounded, trainable, ours, gy)
    plain = _layer_run(DEVICE, dtype, rounded, trainable, dense, gy)
    truth = _layer_run(torch.device("cpu"), torch.float64, rounded, trainable, dense, gy.to(dtype))
    _compare_layer(got, plain, truth, f"sparse_delta_linear {backend} {dtype}")


@pytest.mark.parametrize("backend", kernels("spmm_"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["route", "gates"])
def test_multi_delta_linear_matches_float64(backend, dtype, kind, monkeypatch):
    monkeypatch.setenv("XLSPARSE_BACKEND", backend)
    t, o, i = LINEAR_SHAPE
    gen = seeded(12)
    sizes = [o * i // 100, 0, o * i // 20]
    idx = [random_indices(o * i, k, torch.int32, gen) for k in sizes]
    inputs = [torch.randn(t, i, generator=gen), torch.randn(o, generator=gen), torch.rand(t, 3, generator=gen),
              [torch.randn(k, generator=gen) for k in sizes]]
    w = torch.randn(o, i, generator=gen) / i**0.5
    ids = torch.randint(-1, 3, (t,), generator=gen)
    gy = torch.randn(t, o, generator=gen)
    trainable = {0, 1, 3} | ({2} if kind == "gates" else set())

    def ours(x, b, gates, vals):
        route = ids.to(x.device) if kind == "route" else None
        return functional.multi_delta_linear(x, w.to(x), b, [j.to(x.device) for j in idx], vals, route=route,
                                             gates=gates if kind == "gates" else None)

    def dense(x, b, gates, vals):
        y = torch.nn.functional.linear(x, w.to(x), b)
        for e, (j, v) in enumerate(zip(idx, vals)):
            delta = torch.zeros(o * i, dtype=x.dtype, device=x.device).index_add(0, j.long().to(x.device), v)
            s = gates[:, e:e + 1] if kind == "gates" else (ids.to(x.device) == e).to(x.dtype)[:, None]
            y = y + s * (x @ delta.view(o, i).T)
        return y

    rounded = [[v.to(dtype) for v in t] if isinstance(t, list) else t.to(dtype) for t in inputs]
    w = w.to(dtype)
    got = _layer_run(DEVICE, dtype, rounded, trainable, ours, gy)
    plain = _layer_run(DEVICE, dtype, rounded, trainable, dense, gy)
    truth = _layer_run(torch.device("cpu"), torch.float64, rounded, trainable, dense, gy.to(dtype))
    if kind == "route":  # a delta that owns no token gets None from ours, zeros from the dense sum
        for e in range(3):
            if not (ids == e).any():
                truth[4 + e] = plain[4 + e] = None
    _compare_layer(got, plain, truth, f"multi_delta_linear {backend} {dtype} {kind}")


@pytest.mark.parametrize("backend", kernels("sddmm"))
def test_sddmm_sums_long_token_runs_as_precisely_as_torch(backend, monkeypatch):
    """16411 tokens: a kernel that adds its token blocks' partial sums one after the other drifts
    from float64 faster than torch's pairwise sum (Triton's was 3.3x further than torch's, past
    the allowance, before it compensated its sum)."""
    fn, build = sddmm_case((16411, 40, 30), 0.5, "all")
    compare(fn, build, 3, backend, torch.float32, monkeypatch, f"sddmm over 16411 tokens, {backend}")


@pytest.mark.parametrize("bias_masks", [False, True], ids=["shared", "masked"])
def test_subnetwork_linear_bias_grad_sums_long_token_runs_in_float32(bias_masks):
    """4096 tokens of one language with dY = 1 in bfloat16: the bias gradient is 4096, as
    nn.Linear's (dy.sum(0) accumulates in float32). Summed by index_add_ in bf16, CUDA's atomics
    round after every token and the sum stops at 256 (256 + 1 rounds back to 256 in bf16)."""
    from xlsparse.nn import SubnetworkLinear
    T, O, I = 4096, 3, 5
    lin = torch.nn.Linear(I, O, device=DEVICE, dtype=torch.bfloat16)
    bmasks = {"a": torch.ones(O, dtype=torch.bool, device=DEVICE)} if bias_masks else None
    layer = SubnetworkLinear.from_linear(lin, {"a": torch.ones(O, I, dtype=torch.bool, device=DEVICE)},
                                         bias_masks=bmasks)
    x = torch.randn(T, I, device=DEVICE, dtype=torch.bfloat16)
    layer(x, language_ids=torch.zeros(T, dtype=torch.long, device=DEVICE)).backward(
        torch.ones(T, O, device=DEVICE, dtype=torch.bfloat16))
    assert layer.bias.grad.tolist() == [4096.0] * O


def test_all_indices_names_the_first_bad_tensor_of_many():
    """The batched check reads every tensor's summary at once (one host sync on a GPU) and still
    raises for the first bad tensor in order, with the single check's message and type."""
    from xlsparse.ops import checks

    def item(name, values, numel=100):
        return (name, torch.tensor(values, device=DEVICE), numel)

    good = [item(f"good {n}", [n, n + 1, 50]) for n in range(5)] + [item("empty", [])]
    checks.all_indices(good)
    cases = [([item("unsorted", [3, 2, 7]), item("late", [1, 100])], ValueError, "unsorted: .*position 1 holds 2 after 3"),
             ([item("repeated", [4, 4])], ValueError, "repeated: .*position 1 holds 4 after 4"),
             ([item("low", [-1, 5]), item("unsorted", [3, 2])], IndexError, r"low: .*min -1, max 5"),
             ([item("high", [5, 100]), item("unsorted", [3, 2])], IndexError, r"high: .*\[0, 100\): min 5, max 100")]
    for bad, error, message in cases:
        with pytest.raises(error, match=message):
            checks.all_indices(good + bad)
