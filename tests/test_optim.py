"""Masked-gradient updates: MaskedAdamW / MaskedSGD against torch.optim, the step ops on every
backend against the float64 reference, dynamic masks, and multi_mask_weight_grad / SubnetworkLinear."""
import copy
import pickle

import numpy as np
import pytest
import torch

from conftest import (
    DTYPES,
    INDEX_DTYPES,
    ODD_SIZES,
    assert_bit_identical,
    assert_matches_reference,
    cpu_backends,
    random_indices,
    seeded,
    slow_on_triton,
)
from xlsparse import _ext
from xlsparse.ops import optim as ops
from xlsparse.optim import MaskedAdamW, MaskedSGD

ADAMW_BACKENDS = cpu_backends("masked_adamw_")
SGD_BACKENDS = cpu_backends("masked_sgd_")
SHAPES = [(37, 19), (1,), (4097,), (3, 5, 7)]
needs_ext = pytest.mark.skipif(not _ext.loaded(), reason="compiled extension not built")


def _params(seed=0, shapes=SHAPES, dtype=torch.float32):
    gen = seeded(seed)
    return [torch.randn(s, generator=gen).to(dtype) for s in shapes]


def _masks(params, density, seed=1):
    gen = seeded(seed)
    return [torch.rand(p.shape, generator=gen) < density for p in params]


def _set_grads(params, seed, masks=None, poison_outside=True):
    """Random grads; outside the masks they are NaN, which must never reach anything."""
    gen = seeded(seed)
    grads = [torch.randn(p.shape, generator=gen).to(p.dtype) for p in params]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    if masks is not None and poison_outside:
        for p, m in zip(params, masks):
            p.grad[~m] = float("nan")
    return grads


def _run_pair(opt, ref_opt, ours, theirs, masks, steps, seed=100, scheduler=None, ref_scheduler=None):
    for s in range(steps):
        grads = _set_grads(ours, seed + s, masks)
        for p, g in zip(theirs, grads):
            p.grad = g.clone()
        opt.step()
        ref_opt.step()
        if scheduler is not None:
            scheduler.step()
            ref_scheduler.step()
        opt.zero_grad()
        ref_opt.zero_grad()


def _check_masked(ours, theirs, initial, masks, atol=2e-5, rtol=1e-4):
    for p, r, p0, m in zip(ours, theirs, initial, masks):
        torch.testing.assert_close(p.detach()[m], r.detach()[m], atol=atol, rtol=rtol)
        assert_bit_identical(p.detach()[~m], p0[~m], "params outside the mask")


@pytest.mark.parametrize("backend", slow_on_triton(ADAMW_BACKENDS))
@pytest.mark.parametrize("mode", ["dense", "compact"])
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_matches_torch_for_50_steps(backend, mode, amsgrad, weight_decay, use_backend):
    use_backend(backend)
    initial = _params()
    masks = _masks(initial, 0.3)
    ours = [p.clone().requires_grad_() for p in initial]
    theirs = [p.clone().requires_grad_() for p in initial]
    kw = dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=weight_decay, amsgrad=amsgrad)
    opt = MaskedAdamW(ours, masks, mode=mode, **kw)
    ref = torch.optim.AdamW(theirs, **kw)
    _run_pair(opt, ref, ours, theirs, masks, steps=50)
    _check_masked(ours, theirs, initial, masks)
    for p, m in zip(ours, masks):
        state = opt.state[p]
        if mode == "dense":  # state outside the mask is never written: still the zeros it started as
            assert_bit_identical(state["exp_avg"].view(p.shape)[~m], torch.zeros(int((~m).sum())), "exp_avg outside")
            assert_bit_identical(state["exp_avg_sq"].view(p.shape)[~m], torch.zeros(int((~m).sum())), "exp_avg_sq")
        else:  # compact state has one value per selected entry
            assert state["exp_avg"].numel() == int(m.sum()) == state["indices"].numel()
        assert float(state["step"]) == 50


@pytest.mark.parametrize("backend", ADAMW_BACKENDS)
@pytest.mark.parametrize("per_entry_steps", [False, True])
@pytest.mark.parametrize("beta2", [0.999, 0.9999])
@pytest.mark.parametrize("done", [0, 100000])
def test_adamw_bias_corrections_do_not_cancel_in_fp32(backend, per_entry_steps, beta2, done, use_backend):
    """1 - beta2^t near t = 1 is a cancellation: with beta2^t rounded to fp32 before the
    subtraction, the first steps were 7e-6 (0.999) to 8e-5 (0.9999) off, 30-300x torch's fp32 error.
    `done` steps already taken: a late step, where beta^t is subnormal or zero."""
    use_backend(backend)
    n = 4097
    g = torch.randn(n, generator=seeded(3), dtype=torch.float64)
    t, lr, beta1, eps = done + 1, 1e-2, 0.9, 1e-8
    # from zero state, p = 0: p is the update itself, in float64
    m_hat = (1 - beta1) * g / (1 - beta1**t)
    v_hat = (1 - beta2) * g * g / (1 - beta2**t)
    expected = -lr * m_hat / (v_hat.sqrt() + eps)
    p, m, v = torch.zeros(n), torch.zeros(n), torch.zeros(n)
    steps = torch.full((n,), done, dtype=torch.int32) if per_entry_steps else torch.full((1,), float(done))
    ops.masked_adamw_([p], [g.float()], [None], [m], [v], [], [steps], [], lr=lr, beta1=beta1, beta2=beta2,
                      eps=eps, weight_decay=0.0)
    # only the fp32 rounding of a few operations (a few 1e-8) is allowed
    torch.testing.assert_close(p.double(), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("mode", ["dense", "compact"])
def test_index_masks_dict_masks_and_none(mode):
    initial = _params(3)
    idx = random_indices(initial[0].numel(), 200, torch.int64, seeded(4))
    bool0 = torch.zeros(initial[0].numel(), dtype=torch.bool)
    bool0[idx] = True
    bool0 = bool0.view(initial[0].shape)
    ours = [p.clone().requires_grad_() for p in initial]
    theirs = [p.clone().requires_grad_() for p in initial]
    # dict form: param 0 by indices, param 1 absent (trains fully), the others fully via None
    opt = MaskedAdamW(ours, {ours[0]: idx, ours[2]: None}, lr=1e-2, mode=mode)
    ref = torch.optim.AdamW(theirs, lr=1e-2)
    masks = [bool0] + [torch.ones_like(p, dtype=torch.bool) for p in initial[1:]]
    _run_pair(opt, ref, ours, theirs, masks, steps=10)
    _check_masked(ours, theirs, initial, masks)


def test_masks_none_or_a_lone_tensor_is_a_type_error_naming_masks():
    p = torch.randn(2, 3, requires_grad=True)
    for masks in (None, torch.ones(2, 3, dtype=torch.bool)):
        with pytest.raises(TypeError, match="masks: expected a list aligned with the parameters"):
            MaskedAdamW([p], masks)
        opt = MaskedAdamW([p], [None])
        with pytest.raises(TypeError, match="masks: expected a list aligned with the parameters"):
            opt.update_masks(masks)


@pytest.mark.parametrize("backend", ADAMW_BACKENDS)
@pytest.mark.parametrize("mode", ["dense", "compact"])
def test_l1_to_init_matches_l1_in_the_loss(backend, mode, use_backend):
    """l1_to_init = λ is AdamW on the loss + λ Σ|p − p0|: torch's AdamW with that gradient added."""
    use_backend(backend)
    lam = 0.05
    initial = _params(5)
    masks = _masks(initial, 0.4, seed=6)
    ours = [p.clone().requires_grad_() for p in initial]
    theirs = [p.clone().requires_grad_() for p in initial]
    opt = MaskedAdamW(ours, masks, lr=1e-2, weight_decay=0.01, mode=mode, l1_to_init=lam)
    ref = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.01)
    for s in range(20):
        grads = _set_grads(ours, 200 + s, masks)
        for p, p0, g in zip(theirs, initial, grads):
            p.grad = g + lam * torch.sign(p.detach() - p0)
        opt.step()
        ref.step()
    _check_masked(ours, theirs, initial, masks)
    if mode == "compact":
        assert opt.state[ours[0]]["init"].numel() == int(masks[0].sum())


@pytest.mark.parametrize("mode", ["dense", "compact"])
@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("kind", ["adamw", "sgd", "sgd momentum"])
def test_state_dict_resume_reproduces_the_next_steps(mode, dynamic, kind):
    """Every piece of state comes back, the step counts included: SGD without momentum has no
    per-entry state, and its loaded step counts were once replaced by a fresh zero."""
    initial = _params(7)
    masks = _masks(initial, 0.3, seed=8)
    new_masks = _masks(initial, 0.3, seed=9)

    def make(ps):
        if kind == "adamw":
            return MaskedAdamW(ps, masks, lr=1e-2, weight_decay=0.05, mode=mode, amsgrad=True, l1_to_init=0.01)
        return MaskedSGD(ps, masks, lr=1e-2, weight_decay=0.05, mode=mode, momentum=0.9 if kind == "sgd momentum" else 0)

    ps = [p.clone().requires_grad_() for p in initial]
    opt = make(ps)
    for s in range(5):
        _set_grads(ps, 300 + s)
        opt.step()
    if dynamic:
        opt.update_masks(new_masks)
        _set_grads(ps, 310)
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    saved_params = [p.detach().clone() for p in ps]
    for s in range(5):
        _set_grads(ps, 400 + s)
        opt.step()

    resumed = [p.clone().requires_grad_() for p in saved_params]
    opt2 = make(resumed)
    opt2.load_state_dict(saved)
    for s in range(5):
        _set_grads(resumed, 400 + s)
        opt2.step()
    for a, b in zip(ps, resumed):
        assert_bit_identical(a.detach(), b.detach(), "params after resume")
    for a, b in zip(ps, resumed):
        for key, value in opt.state[a].items():
            assert_bit_identical(value, opt2.state[b][key], f"state {key} after resume")


@pytest.mark.parametrize("opt_class", [MaskedAdamW, MaskedSGD])
@pytest.mark.parametrize("corrupt", ["unsorted", "out of range", "float"])
def test_load_state_dict_checks_the_indices_that_steps_trust(opt_class, corrupt):
    # Steps pass check_indices=False: the optimizer's own indices were checked where they came in.
    # A saved state is one such entry point; bad indices there must raise, not write out of range.
    ps = [p.clone().requires_grad_() for p in _params(7)]
    kw = dict(momentum=0.9) if opt_class is MaskedSGD else {}
    opt = opt_class(ps, _masks(ps, 0.3, seed=8), lr=1e-2, mode="compact", **kw)
    _set_grads(ps, 1)
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    idx = saved["state"][0]["indices"]
    saved["state"][0]["indices"] = {"unsorted": idx.flip(0), "out of range": idx + ps[0].numel(),
                                    "float": idx.float()}[corrupt]
    fresh = opt_class([p.detach().clone().requires_grad_() for p in ps], _masks(ps, 0.3, seed=8), lr=1e-2,
                      mode="compact", **kw)
    with pytest.raises((TypeError, ValueError, IndexError), match="load_state_dict: the indices of param 0"):
        fresh.load_state_dict(saved)


@pytest.mark.parametrize("saved_mode, mode", [("dense", "compact"), ("compact", "dense")])
def test_load_state_dict_refuses_a_state_of_the_other_mode(saved_mode, mode):
    # A 1-D bool mask read as indices (or the reverse) would move the state to the wrong entries.
    p = torch.randn(42, requires_grad=True)
    mask = torch.rand(42, generator=seeded(3)) < 0.4
    opt = MaskedAdamW([p], [mask], lr=1e-2, mode=saved_mode)
    _set_grads([p], 1)
    opt.step()
    fresh = MaskedAdamW([p.detach().clone().requires_grad_()], [mask], lr=1e-2, mode=mode)
    with pytest.raises(ValueError, match=f"param 0 has a {saved_mode}-mode selector"):
        fresh.load_state_dict(copy.deepcopy(opt.state_dict()))


@pytest.mark.parametrize("opt_class", [MaskedAdamW, MaskedSGD])
def test_load_state_dict_refuses_a_step_count_of_another_size(opt_class):
    p = torch.randn(42, requires_grad=True)
    mask = torch.rand(42, generator=seeded(3)) < 0.4
    opt = opt_class([p], [mask], lr=1e-2)
    _set_grads([p], 1)
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    saved["state"][0]["step"] = torch.zeros(5)
    fresh = opt_class([p.detach().clone().requires_grad_()], [mask], lr=1e-2)
    with pytest.raises(ValueError, match="the step count of param 0 has 5 entries"):
        fresh.load_state_dict(saved)


def test_load_state_dict_refuses_compact_state_of_another_shape():
    # A compact state is [K]; torch's AdamW state of a [2, 4] param has K = 8 entries too, and was
    # taken as the moments (and l1 anchor) of another parameter's 8 selected entries.
    w = torch.randn(4, 6, requires_grad=True)
    idx = torch.tensor([1, 3, 5, 7, 9, 11, 13, 20])
    other = torch.randn(2, 4, requires_grad=True)
    torch_opt = torch.optim.AdamW([other], lr=1e-2)
    other.grad = torch.ones(2, 4)
    torch_opt.step()
    fresh = MaskedAdamW([w], [idx], lr=1e-2, mode="compact")
    with pytest.raises(ValueError, match=r"state 'exp_avg' of param 0 has shape \(2, 4\)"):
        fresh.load_state_dict(copy.deepcopy(torch_opt.state_dict()))
    opt = MaskedAdamW([w], [idx], lr=1e-2, mode="compact", l1_to_init=0.1)
    _set_grads([w], 1)
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    saved["state"][0]["init"] = saved["state"][0]["init"].reshape(2, 4)
    with pytest.raises(ValueError, match=r"state 'init' of param 0 has shape \(2, 4\)"):
        MaskedAdamW([w.detach().clone().requires_grad_()], [idx], lr=1e-2, mode="compact",
                    l1_to_init=0.1).load_state_dict(saved)
    # the whole param's shape stays fine where the state covers every entry (torch's AdamW state)
    dense = MaskedAdamW([w.detach().clone().requires_grad_()], [None], lr=1e-2, mode="compact")
    full = torch.optim.AdamW([w], lr=1e-2)
    w.grad = torch.ones(4, 6)
    full.step()
    dense.load_state_dict(copy.deepcopy(full.state_dict()))


@pytest.mark.parametrize("opt_class", [MaskedAdamW, MaskedSGD])
def test_a_refused_load_state_dict_leaves_the_optimizer_as_it_was(opt_class):
    # the checks ran after torch's loader had replaced the state and the groups: a refused state
    # left its lr (and a state the next step trips on) in the optimizer
    p = torch.randn(42, requires_grad=True)
    mask = torch.rand(42, generator=seeded(3)) < 0.4
    kwargs = {"momentum": 0.9} if opt_class is MaskedSGD else {}
    opt = opt_class([p], [mask], lr=1e-2, **kwargs)
    _set_grads([p], 1)
    opt.step()
    before = copy.deepcopy(opt.state_dict())
    bad = copy.deepcopy(before)
    bad["param_groups"][0]["lr"] = 99.0
    bad["state"][0]["step"] = torch.zeros(5)
    with pytest.raises(ValueError, match="the step count of param 0 has 5 entries"):
        opt.load_state_dict(bad)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert after["state"][0].keys() == before["state"][0].keys()
    for key, value in before["state"][0].items():
        assert torch.equal(after["state"][0][key], value), key


@pytest.mark.parametrize("as_number", [float, int, np.float32, np.int64, "float64 default"])
@pytest.mark.parametrize("opt_class", [MaskedAdamW, MaskedSGD])
def test_load_state_dict_takes_a_step_count_saved_as_a_number(opt_class, as_number):
    # torch's older optimizers saved the count as a Python number; it means the same shared count.
    p = torch.randn(42, requires_grad=True)
    mask = torch.rand(42, generator=seeded(3)) < 0.4
    kwargs = {"momentum": 0.9} if opt_class is MaskedSGD else {}
    opt = opt_class([p], [mask], lr=1e-2, **kwargs)
    for seed in (1, 2):
        _set_grads([p], seed)
        opt.step()
    numeric = copy.deepcopy(opt.state_dict())
    count = numeric["state"][0]["step"].item()
    numeric["state"][0]["step"] = float(count) if as_number == "float64 default" else as_number(count)
    runs = []
    for saved in (copy.deepcopy(opt.state_dict()), numeric):
        q = p.detach().clone().requires_grad_()
        fresh = opt_class([q], [mask], lr=1e-2, **kwargs)
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64 if as_number == "float64 default" else default)
        try:
            fresh.load_state_dict(saved)
        finally:
            torch.set_default_dtype(default)
        _set_grads([q], 3)
        fresh.step()
        runs.append(q.detach())
    assert_bit_identical(runs[1], runs[0], "param after a step from a numeric step count")


@pytest.mark.parametrize("backend", ADAMW_BACKENDS)
@pytest.mark.parametrize("mode", ["dense", "compact"])
def test_update_masks_keeps_adds_and_freezes(backend, mode, use_backend):
    """Kept entries continue as if nothing happened; added entries run a fresh AdamW from step 1;
    dropped entries freeze."""
    use_backend(backend)
    initial = [torch.randn(40, 30, generator=seeded(10))]
    gen = seeded(11)
    old = torch.rand(40, 30, generator=gen) < 0.4
    new = torch.rand(40, 30, generator=gen) < 0.4
    kept, added, dropped = old & new, new & ~old, old & ~new
    kw = dict(lr=1e-2, weight_decay=0.1, amsgrad=True)
    ours = [initial[0].clone().requires_grad_()]
    opt = MaskedAdamW(ours, [old], mode=mode, **kw)
    steady = [initial[0].clone().requires_grad_()]  # never updated: the reference for kept entries
    steady_opt = torch.optim.AdamW(steady, **kw)
    for s in range(6):
        g = _set_grads(ours, 500 + s)[0]
        steady[0].grad = g.clone()
        opt.step()
        steady_opt.step()
    at_switch = ours[0].detach().clone()
    fresh = [at_switch.clone().requires_grad_()]  # a new AdamW from here: the reference for added entries
    fresh_opt = torch.optim.AdamW(fresh, **kw)
    opt.update_masks([new])
    for s in range(6):
        g = _set_grads(ours, 600 + s, [new])[0]
        steady[0].grad = g.clone()
        fresh[0].grad = g.clone()
        opt.step()
        steady_opt.step()
        fresh_opt.step()
    p = ours[0].detach()
    torch.testing.assert_close(p[kept], steady[0].detach()[kept], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(p[added], fresh[0].detach()[added], atol=2e-5, rtol=1e-4)
    assert_bit_identical(p[dropped], at_switch[dropped], "dropped entries")
    assert_bit_identical(p[~old & ~new], initial[0][~old & ~new], "never-selected entries")


def test_update_masks_without_new_entries_keeps_one_step_count():
    ps = [torch.randn(20, 20).requires_grad_()]
    old = torch.rand(20, 20, generator=seeded(12)) < 0.5
    for mode in ("dense", "compact"):
        opt = MaskedAdamW(ps, [old], mode=mode)
        _set_grads(ps, 1)
        opt.step()
        opt.update_masks([old & (torch.rand(20, 20, generator=seeded(13)) < 0.5)])
        assert opt.state[ps[0]]["step"].numel() == 1


@pytest.mark.parametrize("mode", ["dense", "compact"])
def test_update_masks_with_a_dict_changes_only_the_parameters_it_names(mode):
    # a parameter left out of the dict kept no mask: it trained whole from then on
    ps = [torch.randn(20, 20).requires_grad_(), torch.randn(20, 20).requires_grad_()]
    old = [torch.rand(20, 20, generator=seeded(20 + i)) < 0.3 for i in range(2)]
    new0 = torch.rand(20, 20, generator=seeded(22)) < 0.3
    opt = MaskedAdamW(ps, old, mode=mode, lr=1e-2)
    opt.update_masks({ps[0]: new0})
    before = ps[1].detach().clone()
    _set_grads(ps, 3, [new0, old[1]])  # NaN outside the masks: a step that reads them poisons p
    opt.step()
    assert torch.isfinite(ps[1]).all() and not torch.equal(ps[1][old[1]], before[old[1]])
    assert_bit_identical(ps[1][~old[1]], before[~old[1]], "entries outside the kept mask")
    opt.update_masks({ps[1]: None})  # None, named, still opens a parameter whole
    _set_grads(ps, 4, [new0, torch.ones(20, 20, dtype=torch.bool)])
    opt.step()
    assert not torch.equal(ps[1][~old[1]], before[~old[1]])


def test_param_groups_and_lr_scheduler():
    initial = _params(14)
    masks = _masks(initial, 0.5, seed=15)
    ours = [p.clone().requires_grad_() for p in initial]
    theirs = [p.clone().requires_grad_() for p in initial]
    groups = lambda ps: [{"params": ps[:2], "lr": 3e-2, "weight_decay": 0.2}, {"params": ps[2:]}]  # noqa: E731
    opt = MaskedAdamW(groups(ours), masks, lr=1e-2, weight_decay=0.0)
    ref = torch.optim.AdamW(groups(theirs), lr=1e-2, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref, step_size=3, gamma=0.5)
    _run_pair(opt, ref, ours, theirs, masks, steps=10, scheduler=sched, ref_scheduler=ref_sched)
    _check_masked(ours, theirs, initial, masks)
    assert opt.param_groups[0]["lr"] == ref.param_groups[0]["lr"]


@pytest.mark.parametrize("backend", ADAMW_BACKENDS)
def test_amp_found_inf_skips_and_grad_scale_unscales(backend, use_backend):
    use_backend(backend)
    initial = _params(16)
    masks = _masks(initial, 0.5, seed=17)
    ours = [p.clone().requires_grad_() for p in initial]
    plain = [p.clone().requires_grad_() for p in initial]
    opt = MaskedAdamW(ours, masks, lr=1e-2)
    ref = MaskedAdamW(plain, masks, lr=1e-2)
    grads = _set_grads(plain, 18)
    ref.step()
    for p, g in zip(ours, grads):
        p.grad = g * 1024.0
    opt.grad_scale = torch.tensor([1024.0])
    opt.found_inf = torch.tensor([1.0])  # skipped: nothing moves
    opt.step()
    for p, p0 in zip(ours, initial):
        assert_bit_identical(p.detach(), p0, "params after a skipped step")
    assert float(opt.state[ours[0]]["step"]) == 0
    opt.found_inf = torch.tensor([0.0])
    opt.step()
    for a, b in zip(ours, plain):
        torch.testing.assert_close(a.detach(), b.detach())


def test_decay_the_base_follows_a_step_grad_scaler_skipped():
    """MaskedAdamW on Δ plus the decay_the_base_ hook is AdamW on θ = θ0 + Δ: a step GradScaler
    skips (an inf gradient) changes neither (the hook decayed θ0's share anyway)."""
    from xlsparse.optim import decay_the_base_

    theta0 = torch.tensor([1.0, -2.0, 4.0])
    delta = torch.zeros(3, requires_grad=True)
    opt = MaskedAdamW([delta], [None], lr=0.1, weight_decay=0.5, mode="compact")
    opt.register_step_post_hook(lambda o, *a: decay_the_base_(o, {delta: theta0}))
    theta = theta0.clone().requires_grad_()
    topt = torch.optim.AdamW([theta], lr=0.1, weight_decay=0.5)
    for grad in ([1.0, float("inf"), 1.0], [1.0, -3.0, 0.5]):  # skipped, then taken
        for p, o in ((delta, opt), (theta, topt)):
            scaler = torch.amp.GradScaler("cpu", init_scale=4.0, growth_interval=1000)
            scaler.scale(torch.ones(()))
            p.grad = torch.tensor(grad) * 4.0
            scaler.step(o)
        torch.testing.assert_close(theta0 + delta.detach(), theta.detach())




@pytest.mark.parametrize("key", ["mask", "masks", "indices"])
def test_a_mask_in_a_param_group_is_refused(key):
    """A mask given as a group key was kept and never read: the group's params trained whole."""
    p, q = torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(4))
    mask = torch.tensor([True, False, False, False])
    with pytest.raises(ValueError, match=key):
        MaskedAdamW([{"params": [q], key: mask}], [None])
    opt = MaskedAdamW([p], [None], lr=0.1)
    with pytest.raises(ValueError, match=key):
        opt.add_param_group({"params": [q], key: mask})
    assert len(opt.param_groups) == 1
    state = opt.state_dict()
    state["param_groups"][0][key] = mask
    with pytest.raises(ValueError, match=key):
        opt.load_state_dict(state)

@pytest.mark.parametrize("mode", ["dense", "compact"])
def test_decay_the_base_leaves_unselected_entries_of_a_masked_delta(mode):
    """With a mask on Δ, the hook decays θ0 only at the selected entries: there MaskedAdamW plus
    the hook is AdamW on those entries of θ = θ0 + Δ alone; the other entries of Δ stay bit-identical."""
    from xlsparse.optim import decay_the_base_

    gen = seeded(23)
    theta0 = torch.randn(12, generator=gen, dtype=torch.float64)
    delta = torch.nn.Parameter(0.1 * torch.randn(12, generator=gen, dtype=torch.float64))
    mask = torch.rand(12, generator=gen) < 0.5
    assert mask.any() and not mask.all()
    before = delta.detach().clone()
    opt = MaskedAdamW([delta], [mask], lr=0.1, weight_decay=0.2, mode=mode)
    opt.register_step_post_hook(lambda o, *a: decay_the_base_(o, {delta: theta0}))
    theta = torch.nn.Parameter((theta0 + before)[mask])
    topt = torch.optim.AdamW([theta], lr=0.1, weight_decay=0.2)
    for _ in range(3):
        grad = torch.randn(12, generator=gen, dtype=torch.float64)
        delta.grad, theta.grad = grad.clone(), grad[mask].clone()
        opt.step()
        topt.step()
    torch.testing.assert_close((theta0 + delta.detach())[mask], theta.detach())
    assert_bit_identical(delta.detach()[~mask], before[~mask], "unselected entries of the delta")


def test_grad_scaler_drives_the_optimizer():
    model = torch.nn.Linear(8, 4)
    mask = torch.rand(4, 8, generator=seeded(19)) < 0.5
    opt = MaskedAdamW([model.weight], [mask], lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    before = model.weight.detach().clone()
    loss = model(torch.randn(5, 8)).square().sum()
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    moved = model.weight.detach() != before
    assert moved[mask].any() and not moved[~mask].any()



@pytest.mark.parametrize("mode", ["dense", "compact"])
@pytest.mark.parametrize("make", [lambda ps, m, mode: MaskedAdamW(ps, m, lr=1e-2, mode=mode, l1_to_init=1e-3),
                                  lambda ps, m, mode: MaskedSGD(ps, m, lr=1e-2, momentum=0.9, mode=mode)],
                         ids=["adamw", "sgd"])
def test_a_model_cast_before_the_first_step_trains_as_if_cast_first(make, mode):
    """torch's optimizers make their state at the first step, in the param's dtype, so a model cast
    to bfloat16 between construction and the first step trains; the state made here at construction
    stayed float32 and the step raised a TypeError about exp_avgs[0]. After a step, a cast is
    refused (torch's step raises too), writing nothing."""
    models = [torch.nn.Linear(8, 4) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    masks = [torch.rand(4, 8, generator=seeded(3)) < 0.5, None]
    early = make(list(models[0].parameters()), masks, mode)
    for model in models:
        model.to(torch.bfloat16)
    late = make(list(models[1].parameters()), masks, mode)
    x = torch.randn(5, 8, generator=seeded(4)).bfloat16()
    for model, opt in zip(models, (early, late)):
        for _ in range(2):
            opt.zero_grad()
            model(x).float().square().sum().backward()
            opt.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert_bit_identical(a.detach(), b.detach(), "cast before the first step")
    models[0].to(torch.float32)
    models[0](x.float()).square().sum().backward()
    before = [p.detach().clone() for p in models[0].parameters()]
    with pytest.raises(ValueError, match=r"param 0 of param group 0 is torch.float32, but its optimizer state .* is "
                                         r"torch.bfloat16: the parameter was cast after it stepped"):
        early.step()
    for p, b in zip(models[0].parameters(), before):
        assert_bit_identical(p.detach(), b, "a refused step")
    # update_masks keeps the kept entries' state in its dtype: compact mode remade it in the param's,
    # and the next step trained on moments rounded to bfloat16, where dense mode refused
    early.update_masks([masks[0] | (torch.rand(4, 8, generator=seeded(5)) < 0.3), None])
    with pytest.raises(ValueError, match=r"the parameter was cast after it stepped"):
        early.step()


def test_nan_gradients_follow_torch():
    """A NaN gradient on a selected entry makes that entry NaN, as in torch.optim.AdamW; NaN outside
    the mask is never read."""
    p = torch.randn(10).requires_grad_()
    mask = torch.zeros(10, dtype=torch.bool)
    mask[:5] = True
    for mode in ("dense", "compact"):
        q = p.detach().clone().requires_grad_()
        opt = MaskedAdamW([q], [mask], mode=mode)
        q.grad = torch.randn(10)
        q.grad[2] = float("nan")
        q.grad[7] = float("nan")
        opt.step()
        assert torch.isnan(q[2]) and not torch.isnan(q[[0, 1, 3, 4]]).any()
        assert_bit_identical(q.detach()[5:], p.detach()[5:], "outside the mask")


@pytest.mark.parametrize("backend", SGD_BACKENDS)
@pytest.mark.parametrize("mode", ["dense", "compact"])
@pytest.mark.parametrize("kw", [dict(), dict(momentum=0.9, weight_decay=0.1), dict(momentum=0.9, nesterov=True),
                                dict(momentum=0.5, dampening=0.3)], ids=["plain", "momentum", "nesterov", "dampening"])
def test_sgd_matches_torch(backend, mode, kw, use_backend):
    use_backend(backend)
    initial = _params(20)
    masks = _masks(initial, 0.3, seed=21)
    ours = [p.clone().requires_grad_() for p in initial]
    theirs = [p.clone().requires_grad_() for p in initial]
    opt = MaskedSGD(ours, masks, lr=0.05, mode=mode, **kw)
    ref = torch.optim.SGD(theirs, lr=0.05, **kw)
    _run_pair(opt, ref, ours, theirs, masks, steps=20)
    _check_masked(ours, theirs, initial, masks)


@pytest.mark.parametrize("mode", ["dense", "compact"])
@pytest.mark.parametrize("kw", [dict(momentum=0.9, dampening=0.1, weight_decay=0.01),
                                dict(momentum=0.9, nesterov=True)], ids=["dampening", "nesterov"])
def test_sgd_continues_from_a_torch_sgd_state(mode, kw):
    # torch's SGD saves a momentum buffer and no step count; the buffer must be used, not restarted.
    initial = _params(22, dtype=torch.float64)
    theirs = [p.clone().requires_grad_() for p in initial]
    ref = torch.optim.SGD(theirs, lr=0.05, foreach=False, **kw)
    _continue_from_torch(ref, theirs, lambda ours: MaskedSGD(ours, [None] * len(ours), lr=0.05, mode=mode, **kw), 500)


def _continue_from_torch(ref, theirs, make_ours, seed):
    """Three steps of torch's `ref`, its state loaded into ours, then three steps of both: equal."""
    for s in range(3):
        _set_grads(theirs, seed + s)
        ref.step()
    ours = [p.detach().clone().requires_grad_() for p in theirs]
    opt = make_ours(ours)
    opt.load_state_dict(copy.deepcopy(ref.state_dict()))
    for s in range(3, 6):
        _set_grads(theirs, seed + s)
        _set_grads(ours, seed + s)
        ref.step()
        opt.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["dense", "compact"])
@pytest.mark.parametrize("opt_class, torch_class, kw", [
    (MaskedAdamW, torch.optim.AdamW, dict(betas=(0.8, 0.9), weight_decay=0.05, amsgrad=True)),
    (MaskedSGD, torch.optim.SGD, dict(momentum=0.9, dampening=0.1, weight_decay=0.01))], ids=["adamw", "sgd"])
def test_add_param_group_trains_every_entry_of_the_new_params(mode, opt_class, torch_class, kw):
    # torch on the first param's masked entries from step 0, and on every entry of the added one
    # (its own lr) from the step it joined, in float64.
    first, added = _params(23, shapes=[(7, 5), (11,)], dtype=torch.float64)
    mask = torch.rand(first.shape, generator=seeded(24)) < 0.4
    ours = [first.clone().requires_grad_(), added.clone().requires_grad_()]
    theirs = [first[mask].clone().requires_grad_(), added.clone().requires_grad_()]
    opt = opt_class([ours[0]], [mask], lr=0.05, mode=mode, **kw)
    ref = torch_class([theirs[0]], lr=0.05, foreach=False, **kw)
    for s in range(4):
        if s == 1:
            opt.add_param_group({"params": [ours[1]], "lr": 0.1})
            ref.add_param_group({"params": [theirs[1]], "lr": 0.1})
        grads = _set_grads(ours[:1 + (s >= 1)], 600 + s)
        for p, g, m in zip(theirs, grads, [mask, None]):
            p.grad = g[m] if m is not None else g.clone()
        opt.step()
        ref.step()
    torch.testing.assert_close(ours[0].detach()[mask], theirs[0].detach(), rtol=1e-12, atol=1e-12)
    assert_bit_identical(ours[0].detach()[~mask], first[~mask], "outside the mask")
    torch.testing.assert_close(ours[1].detach(), theirs[1].detach(), rtol=1e-12, atol=1e-12)

    strided = torch.randn(4, 3, dtype=torch.float64).t().requires_grad_()
    with pytest.raises(ValueError, match="contiguous"):
        opt.add_param_group({"params": [strided]})
    assert len(opt.param_groups) == 2


@pytest.mark.parametrize("opt_class", [MaskedAdamW, MaskedSGD])
def test_a_parameter_twice_in_one_group_is_refused_at_construction(opt_class):
    # torch only warns about it; the masked step refused it later, at step(), after a training
    # script had built everything around the optimizer.
    p, q = torch.ones(4, requires_grad=True), torch.ones(4, requires_grad=True)
    with pytest.raises(ValueError, match="appears twice"):
        opt_class([p, p], [None, None], lr=0.1)
    opt = opt_class([p], [None], lr=0.1)
    with pytest.raises(ValueError, match="appears twice"):
        opt.add_param_group({"params": [q, q]})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("opt_class, group, match", [
    (MaskedAdamW, dict(eps=-1.0), "epsilon"), (MaskedAdamW, dict(lr=-1.0), "learning rate"),
    (MaskedAdamW, dict(betas=(1.5, 0.9)), "betas"), (MaskedAdamW, dict(weight_decay=-5.0), "weight_decay"),
    (MaskedAdamW, dict(betas=0.9), "betas must be a pair"),  # was a bare "object of type 'float' has no len()"
    (MaskedAdamW, dict(lr=float("nan")), "lr must be finite"), (MaskedSGD, dict(lr=-1.0), "must be >= 0"),
    (MaskedSGD, dict(momentum=-0.5), "must be >= 0"), (MaskedSGD, dict(nesterov=True), "Nesterov")])
def test_a_group_s_own_hyper_parameters_are_checked_as_the_defaults_are(opt_class, group, match):
    # Only the constructor's defaults were checked: a group with eps=-1 stepped a weight from 1 to -154.
    p, q = torch.ones(4, requires_grad=True), torch.ones(4, requires_grad=True)
    with pytest.raises((ValueError, TypeError), match=match):
        opt_class([{"params": [p], **group}], [None], lr=0.1)
    opt = opt_class([p], [None], lr=0.1)
    with pytest.raises((ValueError, TypeError), match=match):
        opt.add_param_group({"params": [q], **group})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("where", ["constructor", "add_param_group", "load_state_dict"])
@pytest.mark.parametrize("opt_class, torch_class, group", [
    (MaskedAdamW, torch.optim.AdamW, dict(maximize=True)),
    (MaskedSGD, torch.optim.SGD, dict(maximize=True, momentum=0.9)),
    (MaskedAdamW, torch.optim.Adam, dict(weight_decay=0.1))], ids=["adamw-maximize", "sgd-maximize", "adam-l2"])
def test_group_keys_that_change_the_math_are_refused(where, opt_class, torch_class, group):
    # The kernels run neither maximize nor Adam's L2 weight decay: such a group must not step silently.
    match = "maximize" if "maximize" in group else "decoupled_weight_decay"
    p, q = torch.randn(6, requires_grad=True), torch.randn(4, requires_grad=True)
    if torch_class is torch.optim.Adam:
        group = dict(group, decoupled_weight_decay=False)
    if where == "constructor":
        with pytest.raises(ValueError, match=match):
            opt_class([{"params": [p], **group}], [None], lr=0.1)
        if "maximize" in group:  # torch's keyword too: it was a TypeError (unexpected keyword)
            with pytest.raises(ValueError, match=match):
                opt_class([p], [None], lr=0.1, maximize=True)
        return
    opt = opt_class([p], [None], lr=0.1, **({"momentum": 0.9} if opt_class is MaskedSGD else {}))
    p.grad = torch.ones(6)
    opt.step()
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=match):
        if where == "add_param_group":
            opt.add_param_group({"params": [q], **group})
        else:
            ref = torch_class([p.detach().clone().requires_grad_()], lr=0.1, **group)
            ref.param_groups[0]["params"][0].grad = torch.ones(6)
            ref.step()
            opt.load_state_dict(ref.state_dict())
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert after["state"][0].keys() == before["state"][0].keys()
    for key, value in before["state"][0].items():
        if value is not None:  # the mask: None is every entry
            assert_bit_identical(after["state"][0][key], value, key)


@pytest.mark.parametrize("opt_class, torch_class, kw", [
    (MaskedAdamW, torch.optim.AdamW, dict(amsgrad=True)), (MaskedSGD, torch.optim.SGD, dict(momentum=0.9))],
    ids=["adamw", "sgd"])
def test_a_torch_state_loads_into_a_masked_compact_optimizer_as_into_a_dense_one(opt_class, torch_class, kw):
    """A torch state keeps the masks given so far (load_state_dict's docstring): dense mode stepped the
    masked entries with their moments, compact mode raised ("has 20 entries; its mask selects 12")."""
    gen = seeded(5)
    w = torch.nn.Parameter(torch.randn(4, 5, generator=gen, dtype=torch.float64))
    mask = torch.rand(4, 5, generator=gen) < 0.5
    ref = torch_class([w], lr=0.05, foreach=False, **kw)
    for _ in range(2):
        w.grad = torch.randn(4, 5, generator=gen, dtype=torch.float64)
        ref.step()
    grads = [torch.randn(4, 5, generator=gen, dtype=torch.float64) for _ in range(2)]
    ours = {}
    for mode in ("dense", "compact"):
        p = torch.nn.Parameter(w.detach().clone())
        opt = opt_class([p], [mask], lr=0.05, mode=mode, **kw)
        opt.load_state_dict(copy.deepcopy(ref.state_dict()))
        for g in grads:
            p.grad = g.clone()
            opt.step()
        ours[mode] = (p, opt)
    (dense, dense_opt), (compact, compact_opt) = ours["dense"], ours["compact"]
    assert_bit_identical(compact.detach(), dense.detach(), "params")
    for key in opt_class._STATE_KEYS:
        assert_bit_identical(compact_opt.state[compact][key], dense_opt.state[dense][key][mask.reshape(-1)], key)


@pytest.mark.parametrize("mode", ["dense", "compact"])
def test_adamw_continues_from_a_torch_adam_state_without_weight_decay(mode):
    # torch.optim.Adam without weight decay is AdamW without weight decay: its state loads.
    initial = _params(25, dtype=torch.float64)
    theirs = [p.clone().requires_grad_() for p in initial]
    ref = torch.optim.Adam(theirs, lr=0.05, betas=(0.8, 0.9), foreach=False)
    _continue_from_torch(ref, theirs, lambda ours: MaskedAdamW(ours, [None] * len(ours), lr=0.05, mode=mode), 700)


@pytest.mark.parametrize("mode", ["dense", "compact"])
def test_update_masks_after_loading_a_torch_adamw_state(mode):
    # torch keeps exp_avg in the param's shape; update_masks indexed it by flat positions and raised
    # IndexError (dense: a 1-D mask of added entries on a 2-D state; compact: flat indices taken as rows).
    p = torch.nn.Parameter(torch.randn(6, 5, dtype=torch.float64))
    torch_opt = torch.optim.AdamW([p], lr=0.05, foreach=False)
    p.grad = torch.randn(6, 5, dtype=torch.float64)
    torch_opt.step()
    opt = MaskedAdamW([p], [None], lr=0.05, mode=mode)
    opt.load_state_dict(torch_opt.state_dict())
    m, v = (torch_opt.state[p][k].clone() for k in ("exp_avg", "exp_avg_sq"))
    kept = torch.zeros(6, 5, dtype=torch.bool)
    kept[1:4, 2:] = True
    opt.update_masks([kept])
    new = kept.clone()
    new[0, :2] = True  # dropped by the first update, added back by the second: zero state, step 0
    opt.update_masks([new])
    t = torch.where(kept, 2.0, 1.0).to(torch.float64)  # the count after the next step
    m[~kept], v[~kept] = 0, 0
    before = p.detach().clone()
    p.grad = torch.randn(6, 5, dtype=torch.float64)
    opt.step()
    g, lr, wd, (b1, b2) = p.grad[new], 0.05, 0.01, (0.9, 0.999)
    m2, v2 = b1 * m[new] + (1 - b1) * g, b2 * v[new] + (1 - b2) * g * g
    t = t[new]
    want = before[new] * (1 - lr * wd) - lr / (1 - b1 ** t) * m2 / (v2.sqrt() / (1 - b2 ** t) ** 0.5 + 1e-8)
    torch.testing.assert_close(p.detach()[new], want, rtol=1e-12, atol=0)
    assert_bit_identical(p.detach()[~new], before[~new], "entries outside the new mask")


@pytest.mark.parametrize("mode", ["dense", "compact"])
def test_sgd_momentum_turned_on_mid_run_starts_its_buffer_as_torch_does(mode):
    """Momentum 0 for two steps, then 0.9 with dampening 0.5 (as OneCycleLR cycles it): torch starts
    the buffer at the gradient; the step count had counted the momentum-0 steps, so the buffer
    started at zero ((1 - d)·g: 0.103 off), and OneCycleLR on momentum=0 raised."""
    g = torch.Generator().manual_seed(0)
    p0 = torch.randn(4, 6, generator=g, dtype=torch.float64)
    mask = torch.rand(4, 6, generator=g) < 0.5
    ours, theirs = p0.clone().requires_grad_(), p0.clone().requires_grad_()
    opt = MaskedSGD([ours], [mask], lr=0.1, mode=mode)
    ref = torch.optim.SGD([theirs], lr=0.1)
    for step in range(5):
        if step == 2:
            for o in (opt, ref):
                o.param_groups[0].update(momentum=0.9, dampening=0.5)
        grad = torch.randn(4, 6, generator=g, dtype=torch.float64)
        ours.grad, theirs.grad = grad.clone(), torch.where(mask, grad, 0)
        opt.step()
        ref.step()
        with torch.no_grad():
            theirs[~mask] = p0[~mask]
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)
    opt = MaskedSGD([ours], [mask], lr=0.1, mode=mode)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=3)
    ours.grad = torch.ones_like(ours)
    opt.step()
    scheduler.step()
    assert opt.param_groups[0]["momentum"] > 0


@pytest.mark.parametrize("key", ["differentiable", "fused", "capturable"])
def test_a_param_group_asking_for_a_torch_implementation_switch_is_refused(key):
    # the constructor refuses them, but a group dict kept them and the step ignored them
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match=f"a param group has {key}=True"):
        MaskedSGD([{"params": [p], key: True}], [None], lr=0.1)
    opt = MaskedAdamW([p], [None], lr=0.1)
    with pytest.raises(ValueError, match=f"a param group has {key}=True"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], key: True})


def test_a_masked_sgd_group_with_l1_to_init_is_refused():
    # MaskedSGD's constructor has no l1_to_init, but a group dict kept it and no step pulled toward θ0
    p, q = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="l1_to_init"):
        MaskedSGD([{"params": [p], "l1_to_init": 0.5}], [None], lr=0.1)
    opt = MaskedSGD([p], [None], lr=0.1)
    with pytest.raises(ValueError, match="l1_to_init"):
        opt.add_param_group({"params": [q], "l1_to_init": 0.5})
    assert len(opt.param_groups) == 1
    opt.param_groups[0]["l1_to_init"] = 0.5
    p.grad = torch.ones(3)
    with pytest.raises(ValueError, match="l1_to_init"):
        opt.step()
    assert_bit_identical(p.detach(), torch.ones(3), "param after a refused step")


def test_l1_to_init_anchor_survives_loading_a_torch_adamw_state():
    # torch's load replaced the whole state: the anchor taken at construction was lost, and the next
    # step raised "l1_to_init was turned on after construction"
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(5, generator=g)
    theirs, ours, twin = (torch.nn.Parameter(w0.clone()) for _ in range(3))
    ref = torch.optim.AdamW([theirs], lr=0.1)
    theirs.grad = torch.randn(5, generator=g)
    ref.step()
    opt = MaskedAdamW([ours], [None], lr=0.1, l1_to_init=0.05)
    fresh = MaskedAdamW([twin], [None], lr=0.1, l1_to_init=0.05)
    opt.load_state_dict(ref.state_dict())
    assert torch.equal(opt.state[ours]["init"], fresh.state[twin]["init"])
    ours.grad = torch.randn(5, generator=g)
    opt.step()


@pytest.mark.parametrize("mode", ["dense", "compact"])
def test_sgd_update_masks_after_momentum_was_turned_on_and_before_it_stepped(mode):
    # OneCycleLR sets momentum 0.95 on a MaskedSGD built without momentum; update_masks before the
    # next step raised KeyError 'momentum_buffer' (dense mode: with the new mask already in place).
    p = torch.nn.Parameter(torch.randn(6, dtype=torch.float64))
    ref = p.detach()[:3].clone().requires_grad_()
    opt = MaskedSGD([p], [torch.tensor([1, 0, 1, 0, 1, 0], dtype=torch.bool)], lr=0.1, mode=mode)
    ref_opt = torch.optim.SGD([ref], lr=0.1)
    for o in (opt, ref_opt):
        o.param_groups[0]["momentum"] = 0.9
    opt.update_masks([torch.tensor([1, 1, 1, 0, 0, 0], dtype=torch.bool)])
    before = p.detach().clone()
    gen = seeded(3)
    for _ in range(3):
        g = torch.randn(6, generator=gen, dtype=torch.float64)
        p.grad, ref.grad = g.clone(), g[:3].clone()
        opt.step()
        ref_opt.step()
    torch.testing.assert_close(p.detach()[:3], ref.detach(), rtol=0, atol=1e-15)
    assert_bit_identical(p.detach()[3:], before[3:], "entries outside the new mask")


def test_sgd_update_masks_restarts_momentum_on_new_entries():
    p = torch.randn(30).requires_grad_()
    old = torch.arange(30) < 20
    new = torch.arange(30) >= 10
    for mode in ("dense", "compact"):
        q = p.detach().clone().requires_grad_()
        opt = MaskedSGD([q], [old], lr=0.1, momentum=0.9, mode=mode)
        for s in range(3):
            _set_grads([q], 700 + s)
            opt.step()
        opt.update_masks([new])
        before = q.detach().clone()
        g = _set_grads([q], 800)[0]
        opt.step()
        # an added entry's first step with momentum is plain SGD (the buffer starts as the gradient)
        torch.testing.assert_close(q.detach()[20:], before[20:] - 0.1 * g[20:])
        assert_bit_identical(q.detach()[:10], before[:10], "dropped entries")


@pytest.mark.parametrize("opt_class, key, off, on, mode", [
    (MaskedSGD, "momentum", 0.0, 0.5, "compact"), (MaskedAdamW, "amsgrad", False, True, "compact"),
    (MaskedAdamW, "amsgrad", False, True, "dense")])  # dense SGD: a re-added entry's buffer restarts anyway
def test_update_masks_moves_state_a_group_leaves_unused_at_that_moment(opt_class, key, off, on, mode):
    """update_masks while a group's momentum (OneCycleLR with base_momentum=0) or amsgrad is off: the
    momentum buffer / max_exp_avg_sq stayed at the old positions, and once back on, each kept entry
    read another entry's (compact: entry 4 took entry 2's buffer), and dense mode kept a re-added
    entry's old max_exp_avg_sq."""
    kw = dict(momentum=on) if opt_class is MaskedSGD else dict(amsgrad=on, weight_decay=0.0)
    p = torch.nn.Parameter(torch.zeros(6, dtype=torch.float64))
    opt = opt_class([p], [torch.tensor([0, 1, 2, 4])], lr=0.1, mode=mode, **kw)
    p.grad = torch.tensor([1.0, 5.0, 2.0, 0.0, 3.0, 0.0], dtype=torch.float64)
    opt.step()
    opt.update_masks([torch.tensor([0, 2, 4])])  # drops entry 1
    p.grad = torch.tensor([1.0, 0.0, 2.0, 0.0, 3.0, 0.0], dtype=torch.float64)
    opt.step()
    twin = copy.deepcopy(opt)
    for o, value in ((opt, off), (twin, on)):
        o.param_groups[0][key] = value
        o.update_masks([torch.tensor([1, 4, 5])])  # keeps 4, adds 1 back and 5 (the same K)
        o.param_groups[0][key] = on
    q = twin.param_groups[0]["params"][0]
    for o, param in ((opt, p), (twin, q)):
        param.grad = torch.tensor([0.0, 0.5, 0.1, 0.0, 0.2, 0.3], dtype=torch.float64)
        o.step()
    assert_bit_identical(p.detach(), q.detach(), "params after the step")
    for k in opt_class._STATE_KEYS:
        assert_bit_identical(opt.state[p][k], twin.state[q][k], k)


# --- bad input ---

def test_bad_masks_raise():
    p = torch.randn(4, 5).requires_grad_()
    cases = [
        ([torch.ones(5, 4, dtype=torch.bool)], ValueError, "shape"),
        ([torch.ones(4, 5)], TypeError, "bool or int32/int64"),
        ([torch.tensor([3, 1])], ValueError, "sorted and unique"),
        ([torch.tensor([1, 1])], ValueError, "sorted and unique"),
        ([torch.tensor([1, 20])], IndexError, "out of range"),
        ([torch.tensor([[1, 2]])], ValueError, "1-D"),
        ([None, None], ValueError, "2 entries for 1 parameters"),
        (["mask"], TypeError, "expected a bool tensor"),
        ({torch.randn(2): None}, ValueError, "not a parameter"),
    ]
    for masks, exc, msg in cases:
        for mode in ("dense", "compact"):
            with pytest.raises(exc, match=msg):
                MaskedAdamW([p], masks, mode=mode)
    with pytest.raises(ValueError, match="mode"):
        MaskedAdamW([p], [None], mode="sparse")
    with pytest.raises(ValueError, match="contiguous"):
        MaskedAdamW([torch.randn(5, 4).t().requires_grad_()], [None])


@pytest.mark.parametrize("copy_of", ["deepcopy", "pickle"])
def test_a_copied_optimizer_keeps_its_mode_and_steps_as_the_original(copy_of):
    # torch's __getstate__ keeps defaults, state and param groups only: a copy lost `mode` and failed
    # its next compact step with an AttributeError
    import pickle

    params = _params()
    masks = _masks(params, 0.3)
    opt = MaskedAdamW(params, masks, lr=1e-2, mode="compact")
    _set_grads(params, 5, masks)
    opt.step()
    params2, opt2 = copy.deepcopy((params, opt)) if copy_of == "deepcopy" else pickle.loads(pickle.dumps((params, opt)))
    assert opt2.mode == "compact"
    for p, q in zip(params, params2):
        q.grad = p.grad.clone()
    opt.step()
    opt2.step()
    for p, q in zip(params, params2):
        assert_bit_identical(p, q, "copy stepped otherwise")


def _op_args(n=50, k=10, dtype=torch.float32, index_dtype=torch.int64, seed=0):
    gen = seeded(seed)
    p = torch.randn(n, generator=gen).to(dtype)
    g = torch.randn(n, generator=gen).to(dtype)
    idx = random_indices(n, k, index_dtype, gen)
    m = torch.rand(k, generator=gen).to(dtype)
    v = torch.rand(k, generator=gen).to(dtype)
    step = torch.tensor(3.0)
    return p, g, idx, m, v, step


def _bad_op_calls():
    p, g, idx, m, v, step = _op_args()
    return [
        ("unsorted", ([p], [g], [idx.flip(0)], [m], [v], [], [step], []), ValueError, "sorted and unique"),
        ("out of range", ([p], [g], [torch.cat([idx[:-1], torch.tensor([50])])], [m], [v], [], [step], []),
         IndexError, "out of range"),
        ("state size", ([p], [g], [idx], [m[:-1]], [v], [], [step], []), ValueError, "entries"),
        ("grad shape", ([p], [g[:-1]], [idx], [m], [v], [], [step], []), ValueError, "grads"),
        ("grad dtype", ([p], [g.double()], [idx], [m], [v], [], [step], []), TypeError, "dtype"),
        ("mask shape", ([p], [g], [torch.ones(49, dtype=torch.bool)], [p.clone()], [p.clone()], [], [step], []),
         ValueError, "masks"),
        ("float selector", ([p], [g], [torch.ones(10)], [m], [v], [], [step], []), TypeError, "bool mask or int"),
        ("step dtype", ([p], [g], [idx], [m], [v], [], [torch.tensor(3)], []), ValueError, "steps"),
        ("list lengths", ([p], [g], [idx], [m, m], [v], [], [step], []), ValueError, "exp_avgs"),
        ("int param", ([p.int()], [g.int()], [idx], [m.int()], [v.int()], [], [step], []), TypeError, "floating"),
        ("grad missing", ([p], [None], [idx], [m], [v], [], [step], []), TypeError, r"grads\[0\] must be a tensor"),
        ("state in a param", ([p, p.clone()], [g, g], [idx, idx], [m, p[10:20]], [v, v.clone()], [], [step, step.clone()],
                              []), ValueError, r"params\[0\] and exp_avgs\[1\] share memory"),
    ]


@pytest.mark.parametrize("backend", ADAMW_BACKENDS)
@pytest.mark.parametrize("name,args,exc,msg", _bad_op_calls(), ids=[c[0] for c in _bad_op_calls()])
def test_bad_op_input_raises_and_writes_nothing(backend, name, args, exc, msg, use_backend):
    use_backend(backend)
    before = [t.clone() for t in args[0] + args[3] + args[4]]
    with pytest.raises(exc, match=msg):
        ops.masked_adamw_(*args, lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1)
    for a, b in zip(args[0] + args[3] + args[4], before):
        assert_bit_identical(a, b, "written by a rejected call")




_BAD_ADAMW = [("lr", dict(lr=-0.1)), ("eps", dict(eps=-1e-8)), ("beta1", dict(beta1=1.5)), ("beta1", dict(beta1=-0.1)),
              ("beta2", dict(beta2=1.0)), ("weight_decay", dict(weight_decay=-0.1)), ("l1_to_init", dict(l1_to_init=-0.5)),
              ("lr", dict(lr=float("nan"))), ("amsgrad", dict(amsgrad="no"))]
_BAD_SGD = [("lr", dict(lr=-0.1)), ("momentum", dict(momentum=-0.5)), ("weight_decay", dict(weight_decay=-0.1)),
            ("dampening", dict(dampening=float("nan"))), ("Nesterov", dict(nesterov=True, momentum=0.0)),
            ("Nesterov", dict(nesterov=True, dampening=0.5)), ("nesterov", dict(nesterov=1))]


@pytest.mark.parametrize("backend", ADAMW_BACKENDS)
@pytest.mark.parametrize("name,bad", _BAD_ADAMW, ids=[f"{n}={list(b.values())[0]}" for n, b in _BAD_ADAMW])
def test_adamw_op_refuses_an_out_of_range_hyperparameter_and_writes_nothing(backend, name, bad, use_backend):
    # torch.optim.AdamW refuses these; the op took lr=-0.1 (an ascent step) or beta2=1 (NaN) and wrote it
    use_backend(backend)
    p, g, idx, m, v, step = _op_args()
    before = [t.clone() for t in (p, m, v, step)]
    hyper = {**dict(lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, l1_to_init=0.5), **bad}
    with pytest.raises((ValueError, TypeError), match=rf"masked_adamw_: {name}"):
        ops.masked_adamw_([p], [g], [idx], [m], [v], [], [step], [p[idx].clone()], **hyper)
    for a, b in zip((p, m, v, step), before):
        assert_bit_identical(a, b, "written by a rejected call")


@pytest.mark.parametrize("backend", SGD_BACKENDS)
@pytest.mark.parametrize("name,bad", _BAD_SGD, ids=[f"{n}={list(b.values())[0]}" for n, b in _BAD_SGD])
def test_sgd_op_refuses_an_out_of_range_hyperparameter_and_writes_nothing(backend, name, bad, use_backend):
    # torch.optim.SGD refuses these; nesterov=True with no momentum was silently plain SGD
    use_backend(backend)
    p, g, idx, m, _, step = _op_args()
    before = [t.clone() for t in (p, m, step)]
    with pytest.raises((ValueError, TypeError), match=rf"masked_sgd_: {name}"):
        ops.masked_sgd_([p], [g], [idx], [m], [step], **{"lr": 0.1, "momentum": 0.9, **bad})
    for a, b in zip((p, m, step), before):
        assert_bit_identical(a, b, "written by a rejected call")


@pytest.mark.parametrize("backend", SGD_BACKENDS)
def test_step_ops_refuse_a_param_that_requires_grad_with_grad_mode_on_and_write_nothing(backend, use_backend):
    # torch refuses an in-place write into such a leaf, and so did the reference backend; the
    # compiled kernels stepped the Parameter outside autograd's view (the optimizers step under no_grad)
    use_backend(backend)
    p, g, idx, m, v, step = _op_args()
    p = torch.nn.Parameter(p)
    before = [t.clone() for t in (p.detach(), m, v, step)]
    with pytest.raises(RuntimeError, match=r"masked_sgd_: params\[0\] is a leaf that requires grad"):
        ops.masked_sgd_([p], [g], [idx], [m], [step], lr=0.1, momentum=0.9)
    with pytest.raises(RuntimeError, match=r"masked_adamw_: params\[0\] is a leaf that requires grad"):
        ops.masked_adamw_([p], [g], [idx], [m], [v], [], [step], None, lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8,
                          weight_decay=0.0)
    for a, b in zip((p.detach(), m, v, step), before):
        assert_bit_identical(a, b, "written by a rejected call")
    with torch.no_grad():  # as the optimizers call it
        ops.masked_sgd_([p], [g], [idx], [m], [step], lr=0.1, momentum=0.9)
    assert not torch.equal(p.detach(), before[0])


@pytest.mark.parametrize("opt_class, key, value", [
    (MaskedAdamW, "lr", -1.0), (MaskedAdamW, "eps", -1.0), (MaskedAdamW, "betas", (0.9, 1.0)),
    (MaskedAdamW, "weight_decay", float("nan")), (MaskedSGD, "lr", -1.0), (MaskedSGD, "momentum", -0.5)])
def test_a_group_value_changed_after_construction_is_checked_before_any_step(opt_class, key, value):
    # A scheduler or a user may set group["lr"] = -1 after construction: it stepped uphill. The
    # check runs over every group before any writes, so the first group does not step alone.
    p, q = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(3))
    opt = opt_class([{"params": [p]}, {"params": [q]}], [None, None], lr=0.1, momentum=0.9) if opt_class is MaskedSGD \
        else opt_class([{"params": [p]}, {"params": [q]}], [None, None], lr=0.1)
    opt.param_groups[1][key] = value
    p.grad, q.grad = torch.full((4,), 0.5), torch.full((3,), 0.5)
    before = copy.deepcopy((p.detach(), q.detach(), opt.state_dict()["state"]))
    with pytest.raises(ValueError, match="beta2" if key == "betas" else key):
        opt.step()
    after = (p.detach(), q.detach(), opt.state_dict()["state"])
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])
    for i, st in before[2].items():
        for k, t in st.items():
            if isinstance(t, torch.Tensor):
                assert_bit_identical(after[2][i][k], t, f"state {i} {k}")


@pytest.mark.parametrize("opt_class, key, value", [(MaskedAdamW, "l1_to_init", 0.1), (MaskedAdamW, "amsgrad", True)])
def test_state_turned_on_after_construction_is_refused_before_any_group_steps(opt_class, key, value):
    # The refusal came from the second group's update, after the first group had stepped (1 -> 0.899);
    # amsgrad's was a bare KeyError 'max_exp_avg_sq' there.
    # (MaskedSGD's momentum may be turned on: test_sgd_momentum_turned_on_mid_run_starts_its_buffer_as_torch_does)
    p, q = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(3))
    opt = opt_class([{"params": [p]}, {"params": [q]}], [None, None], lr=0.1)
    opt.param_groups[1][key] = value
    p.grad, q.grad = torch.full((4,), 0.5), torch.full((3,), 0.5)
    with pytest.raises(RuntimeError, match="turned on after construction"):
        opt.step()
    assert torch.equal(p.detach(), torch.ones(4)) and float(opt.state[p]["step"]) == 0


@pytest.mark.parametrize("opt_class", [MaskedAdamW, MaskedSGD])
def test_a_sparse_gradient_is_refused_before_any_group_steps(opt_class):
    # The refusal came while bucketing the second group, after the first group had stepped.
    p, emb = torch.nn.Parameter(torch.ones(4)), torch.nn.Embedding(5, 3, sparse=True)
    opt = opt_class([{"params": [p]}, {"params": [emb.weight]}], [None, None], lr=0.1)
    weights = emb.weight.detach().clone()
    p.grad = torch.full((4,), 0.5)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()
    assert torch.equal(p.detach(), torch.ones(4)) and float(opt.state[p]["step"]) == 0
    assert torch.equal(emb.weight.detach(), weights)


@pytest.mark.parametrize("opt_class", [MaskedAdamW, MaskedSGD])
def test_a_param_made_non_contiguous_after_construction_is_refused_before_any_group_steps(opt_class):
    # conv.to(memory_format=torch.channels_last) after the optimizer was built: the kernel refused the
    # weight ("params[0] must be contiguous") after the first group had stepped, so a retry stepped it twice
    p, conv = torch.nn.Parameter(torch.ones(4)), torch.nn.Conv2d(2, 3, 2)
    opt = opt_class([{"params": [p]}, {"params": [conv.weight]}], [None, None], lr=0.1)
    conv.to(memory_format=torch.channels_last)
    weights = conv.weight.detach().clone()
    p.grad, conv.weight.grad = torch.full((4,), 0.5), torch.ones_like(conv.weight)
    with pytest.raises(ValueError, match="param 0 of param group 1 is not contiguous"):
        opt.step()
    assert torch.equal(p.detach(), torch.ones(4)) and float(opt.state[p]["step"]) == 0
    assert torch.equal(conv.weight.detach(), weights)


@pytest.mark.parametrize("backend", ADAMW_BACKENDS)
@pytest.mark.parametrize("inits", [0, 2])
def test_l1_to_init_without_one_init_per_param_raises_and_writes_nothing(backend, inits, use_backend):
    """The reference step took an empty inits list with l1_to_init on and ran without the L1 term."""
    use_backend(backend)
    p, g, idx, m, v, step = _op_args()
    before = [t.clone() for t in (p, m, v, step)]
    with pytest.raises(ValueError, match="inits"):
        ops.masked_adamw_([p], [g], [idx], [m], [v], [], [step], [p[idx].clone()] * inits, lr=0.1, beta1=0.9,
                          beta2=0.99, eps=1e-8, weight_decay=0.1, l1_to_init=0.5)
    for a, b in zip((p, m, v, step), before):
        assert_bit_identical(a, b, "written by a rejected call")
# --- the step ops, every dtype and selection, against the float64 reference ---

def _selector(kind, n, k, index_dtype, gen):
    if kind == "all":
        return None
    idx = random_indices(n, k, index_dtype, gen)
    if kind == "indices":
        return idx
    mask = torch.zeros(n, dtype=torch.bool)
    mask[idx.long()] = True
    return mask


@pytest.mark.parametrize("backend", ADAMW_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("n", ODD_SIZES)
@pytest.mark.parametrize("kind,density,own_step", [("all", 1.0, False), ("all", 1.0, True), ("mask", 0.3, False),
                                                   ("mask", 0.3, True), ("indices", 0.0, False),
                                                   ("indices", 0.3, True), ("indices", 1.0, False)])
def test_adamw_op_matches_float64_reference(backend, dtype, n, kind, density, own_step, use_backend):
    use_backend(backend)
    gen = seeded(n * 13 + int(density * 10))
    index_dtype = INDEX_DTYPES[round(density * 10) % 2]  # int32 at K=0 and K=N, int64 at 30%
    k = round(n * density)
    sel = _selector(kind, n, k, index_dtype, gen)
    s = k if kind == "indices" else n
    p = torch.randn(n, generator=gen).to(dtype)
    g = torch.randn(n, generator=gen).to(dtype)
    state = [torch.randn(s, generator=gen).to(dtype), torch.rand(s, generator=gen).to(dtype),
             torch.rand(s, generator=gen).to(dtype) + 0.5]
    init = (p.clone() if kind != "indices" else p[sel.long()].clone()) + torch.randn(s, generator=gen).to(dtype)
    step = torch.randint(0, 5, (s,), generator=gen, dtype=torch.int32) if own_step else torch.tensor(4.0)
    hyper = dict(lr=0.05, beta1=0.9, beta2=0.99, eps=1e-6, weight_decay=0.1, l1_to_init=0.01, amsgrad=True)

    def run(p, g, state, step, init):
        ops.masked_adamw_reference([p], [g], [sel], [state[0]], [state[1]], [state[2]], [step], [init],
                                   *hyper.values())

    ref = [t.double() for t in (p, g, init)]
    ref_state = [t.double() for t in state]
    ref_step = step.clone()
    run(ref[0], ref[1], ref_state, ref_step, ref[2])
    plain, plain_state, plain_step = p.clone(), [t.clone() for t in state], step.clone()
    run(plain, g, plain_state, plain_step, init)
    before = p.clone()
    state_before = [t.clone() for t in state]
    ops.masked_adamw_([p], [g], [sel], [state[0]], [state[1]], [state[2]], [step], [init], **hyper)

    chosen = torch.ones(n, dtype=torch.bool) if sel is None else torch.zeros(n, dtype=torch.bool)
    if sel is not None:
        chosen[sel.long() if kind == "indices" else sel] = True
    assert_matches_reference(p[chosen], ref[0][chosen], plain[chosen], f"param {backend} {dtype}")
    assert_bit_identical(p[~chosen], before[~chosen], "params outside the selection")
    schosen = chosen if kind != "indices" else torch.ones(s, dtype=torch.bool)
    for name, out, r, pl, b in zip(("exp_avg", "exp_avg_sq", "max_exp_avg_sq"), state, ref_state, plain_state,
                                   state_before):
        assert_matches_reference(out[schosen], r[schosen], pl[schosen], name)
        assert_bit_identical(out[~schosen], b[~schosen], f"{name} outside the selection")
    assert_bit_identical(step, ref_step, "step counts")


@pytest.mark.parametrize("backend", ADAMW_BACKENDS)
@pytest.mark.parametrize("beta2", [0.999, 0.9999])
def test_adamw_op_first_step_with_betas_near_one(backend, beta2, use_backend):
    """A first step from zero state (LT-SFT's new entries) with torch's default β2 and a larger
    one: 1 − β must be formed in float64, as torch does; 1 − fp32(0.999) is 1.3e-5 off."""
    use_backend(backend)
    n = 4097
    gen = seeded(7)
    p, g = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    hyper = dict(lr=1e-3, beta1=0.9, beta2=beta2, eps=1e-8, weight_decay=0.01, l1_to_init=0.0, amsgrad=False)
    fresh = lambda dtype: [torch.zeros(n, dtype=dtype) for _ in range(3)]  # noqa: E731
    lists = lambda state: [[t] for t in state]  # noqa: E731  (one list per state tensor)
    ref, ref_state = p.double(), fresh(torch.float64)
    ops.masked_adamw_reference([ref], [g.double()], [None], *lists(ref_state), [torch.tensor(0.0)], [None],
                               *hyper.values())
    plain, plain_state = p.clone(), fresh(torch.float32)
    ops.masked_adamw_reference([plain], [g], [None], *lists(plain_state), [torch.tensor(0.0)], [None], *hyper.values())
    state = fresh(torch.float32)
    ops.masked_adamw_([p], [g], [None], *lists(state), [torch.tensor(0.0)], [None], **hyper)
    assert_matches_reference(p, ref, plain, f"param {backend}")
    for name, out, r, pl in zip(("exp_avg", "exp_avg_sq"), state, ref_state, plain_state):
        assert_matches_reference(out, r, pl, f"{name} {backend} beta2={beta2}")


@pytest.mark.parametrize("backend", SGD_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("kind", ["all", "mask", "indices"])
@pytest.mark.parametrize("own_step", [False, True])
def test_sgd_op_matches_float64_reference(backend, dtype, kind, own_step, use_backend):
    use_backend(backend)
    n = 4097
    gen = seeded(31)
    sel = _selector(kind, n, 1000, torch.int32, gen)
    s = 1000 if kind == "indices" else n
    p = torch.randn(n, generator=gen).to(dtype)
    g = torch.randn(n, generator=gen).to(dtype)
    buf = torch.randn(s, generator=gen).to(dtype)
    step = torch.randint(0, 2, (s,), generator=gen, dtype=torch.int32) if own_step else torch.tensor(2.0)
    hyper = dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.05, nesterov=False)
    ref_p, ref_buf, ref_step = p.double(), buf.double(), step.clone()
    ops.masked_sgd_reference([ref_p], [g.double()], [sel], [ref_buf], [ref_step], *hyper.values())
    plain_p, plain_buf = p.clone(), buf.clone()
    ops.masked_sgd_reference([plain_p], [g], [sel], [plain_buf], [step.clone()], *hyper.values())
    before = p.clone()
    ops.masked_sgd_([p], [g], [sel], [buf], [step], **hyper)
    chosen = torch.ones(n, dtype=torch.bool) if sel is None else torch.zeros(n, dtype=torch.bool)
    if sel is not None:
        chosen[sel.long() if kind == "indices" else sel] = True
    assert_matches_reference(p[chosen], ref_p[chosen], plain_p[chosen], "param")
    assert_bit_identical(p[~chosen], before[~chosen], "outside")
    schosen = chosen if kind != "indices" else torch.ones(s, dtype=torch.bool)
    assert_matches_reference(buf[schosen], ref_buf[schosen], plain_buf[schosen], "momentum buffer")
    assert_bit_identical(step, ref_step, "step counts")


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_opcheck_step_ops(dtype):
    p, g, idx, m, v, step = _op_args(dtype=dtype, index_dtype=torch.int32)
    mask = torch.rand(50, generator=seeded(3)) < 0.5
    args = ([p, p.clone()], [g, g.clone()], [idx, mask], [m, torch.zeros_like(p)], [v, torch.ones_like(p)],
            [v.clone(), torch.ones_like(p)], [step, torch.zeros(50, dtype=torch.int32)], [m.clone(), p.clone()],
            0.1, 0.9, 0.99, 1e-8, 0.1, 0.01, True, torch.tensor([2.0]), torch.tensor([0.0]))
    torch.library.opcheck(torch.ops.xlsparse.masked_adamw_.default, args)
    sgd_args = ([p, p.clone()], [g, g.clone()], [idx, None], [m, torch.zeros_like(p)], [step, step.clone()],
                0.1, 0.9, 0.0, 0.1, True, None, None)
    torch.library.opcheck(torch.ops.xlsparse.masked_sgd_.default, sgd_args)


@pytest.mark.skipif("triton" not in ADAMW_BACKENDS, reason="triton not usable here")
def test_opcheck_triton_step_ops():
    import xlsparse.triton.optim  # noqa: F401  (registers the triton ops)

    p, g, idx, m, v, step = _op_args()
    tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.xlsparse.triton_masked_adamw_.default,
                          ([p], [g], [idx], [m], [v], [], [step], [], 0.1, 0.9, 0.99, 1e-8, 0.1, 0.0, False),
                          test_utils=tests)
    torch.library.opcheck(torch.ops.xlsparse.triton_masked_sgd_.default,
                          ([p], [g], [idx], [m], [step], 0.1, 0.9, 0.0, 0.1, False), test_utils=tests)


# Compiles the step kernels for an sm_90 GPU in a child without the interpreter (Triton's bundled
# ptxas; no GPU needed): the interpreter runs the kernels as Python and misses GPU compile errors.
_COMPILE_STEP_KERNELS = """
import re
import sys
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from xlsparse.triton import optim as O

own = sys.argv[1] == "own"
step = "*i32" if own else "*fp32"
common = dict(BLOCK=1024, SEL=2, OWN_STEP=own, HAS_SCALE=True, HAS_INF=True, ACC=tl.float32)
kernels = [(O._masked_adamw_kernel, dict(common, AMSGRAD=True, L1=True)),
           (O._masked_sgd_kernel, dict(common, MOMENTUM=True, NESTEROV=False))]
for fn, consts in kernels:
    sig = {a: "constexpr" if a in consts else "i32" if a == "n" else "*i64" if a == "sel_ptr" else step
           if a == "step_ptr" else "*fp64" if a == "hp_ptr" else "*fp32" for a in fn.arg_names}
    ptx = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32)).asm["ptx"]
    approximate = set(re.findall(r"\\b(?:sqrt|div|rcp)\\.(?:approx|full)[.a-z0-9]*", ptx))
    assert not approximate, f"{fn.__name__}: {sorted(approximate)}"
"""


@pytest.mark.slow  # Triton's compiler for a GPU target: ~9 s each
@pytest.mark.skipif("triton" not in ADAMW_BACKENDS, reason="triton not usable here")
@pytest.mark.parametrize("steps", ["own", "shared"])
def test_triton_step_kernels_compile_for_a_gpu(steps):
    """Per-entry step counts (int32, one per state entry) once failed to compile on a GPU: the
    interpreter never saw `_step_count` return a block on one path and a scalar on the other.
    The fp32 step uses IEEE sqrt and division, as torch and the CUDA kernel do (Triton's default
    fp32 sqrt and `/` are approximate: sqrt.approx.ftz, div.full)."""
    import os
    import subprocess

    from conftest import child_python

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(child_python("-c", _COMPILE_STEP_KERNELS, steps), env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]


# --- multi_mask_weight_grad and SubnetworkLinear ---

MMWG_BACKENDS = cpu_backends("multi_mask_weight_grad")


def _per_language_loop(grad_out, x, masks, ids):
    """The reference every user would write: one dense masked product per language, float64."""
    dw = torch.zeros(grad_out.shape[1], x.shape[1], dtype=torch.float64)
    for lang in range(masks.shape[0]):
        sel = ids == lang
        dw += masks[lang] * (grad_out[sel].double().t() @ x[sel].double())
    return dw


def _mmwg_case(t, o, i, num_ids, dtype, seed):
    from xlsparse.routing import TokenGroups

    gen = seeded(seed)
    grad_out = torch.randn(t, o, generator=gen).to(dtype)
    x = torch.randn(t, i, generator=gen).to(dtype)
    masks = torch.rand(num_ids, o, i, generator=gen) < 0.4
    ids = torch.randint(-1, num_ids, (t,), generator=gen)
    groups = TokenGroups.build(ids, num_ids)
    return grad_out, x, masks, ids, groups


@pytest.mark.parametrize("backend", MMWG_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("t,o,i,num_ids", [(1, 1, 1, 1), (3, 5, 7, 2), (127, 33, 65, 4), (300, 97, 3, 3)])
def test_multi_mask_weight_grad_matches_per_language_loop(backend, dtype, t, o, i, num_ids, use_backend):
    use_backend(backend)
    grad_out, x, masks, ids, groups = _mmwg_case(t, o, i, num_ids, dtype, seed=t + o)
    out = ops.multi_mask_weight_grad(grad_out, x, masks, groups.order, groups.offsets)
    ref64 = _per_language_loop(grad_out, x, masks, ids)
    plain = sum(masks[lang] * (grad_out[ids == lang].t() @ x[ids == lang]) for lang in range(num_ids))
    assert out.dtype == dtype
    if dtype == torch.float64:  # plain PyTorch is the reference itself here; allow another summation order
        torch.testing.assert_close(out, ref64, rtol=1e-12, atol=1e-12)
    else:
        assert_matches_reference(out, ref64, plain.to(dtype), f"{backend} {dtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_multi_mask_weight_grad_cpu_token_chunks_cut_across_languages(dtype):
    # The CPU kernel gathers at most 2**21 input entries at a time: with 3000 columns, the 1112
    # routed tokens of 1500 go in 2 chunks of 556, whose edge falls inside a language's token group
    # (and the first chunk's pieces overwrite the uninitialised output).
    grad_out, x, masks, ids, groups = _mmwg_case(1500, 21, 3000, 3, dtype, seed=12)
    out = ops.multi_mask_weight_grad(grad_out, x, masks, groups.order, groups.offsets)
    ref64 = _per_language_loop(grad_out, x, masks, ids)
    if dtype == torch.float64:
        torch.testing.assert_close(out, ref64, rtol=1e-12, atol=1e-12)
    else:
        plain = sum(masks[lang] * (grad_out[ids == lang].t() @ x[ids == lang]) for lang in range(3))
        assert_matches_reference(out, ref64, plain, "cpu float32, chunked")


@pytest.mark.parametrize("backend", MMWG_BACKENDS)
def test_multi_mask_weight_grad_edge_cases(backend, use_backend):
    use_backend(backend)
    grad_out, x, masks, ids, groups = _mmwg_case(40, 9, 11, 3, torch.float32, seed=3)
    # every token unrouted: zero gradient
    none = torch.full((40,), -1)
    from xlsparse.routing import TokenGroups

    g0 = TokenGroups.build(none, 3)
    assert_bit_identical(ops.multi_mask_weight_grad(grad_out, x, masks, g0.order, g0.offsets), torch.zeros(9, 11),
                         "no routed tokens")
    # the −1 tokens never count, whatever they hold
    poisoned = grad_out.clone()
    poisoned[ids == -1] = float("nan")
    out = ops.multi_mask_weight_grad(poisoned, x, masks, groups.order, groups.offsets)
    torch.testing.assert_close(out, _per_language_loop(grad_out, x, masks, ids).float(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", MMWG_BACKENDS)
def test_multi_mask_weight_grad_bad_input(backend, use_backend):
    use_backend(backend)
    grad_out, x, masks, ids, groups = _mmwg_case(10, 4, 5, 2, torch.float32, seed=4)
    with pytest.raises(TypeError, match="bool"):
        ops.multi_mask_weight_grad(grad_out, x, masks.float(), groups.order, groups.offsets)
    with pytest.raises(ValueError, match="masks must have shape"):
        ops.multi_mask_weight_grad(grad_out, x, masks[:, :3], groups.order, groups.offsets)
    with pytest.raises(ValueError, match="same T"):
        ops.multi_mask_weight_grad(grad_out[:5], x, masks, groups.order, groups.offsets)
    with pytest.raises(ValueError, match="L \\+ 1"):
        ops.multi_mask_weight_grad(grad_out, x, masks, groups.order, groups.offsets[:2])
    with pytest.raises(IndexError, match="order holds token"):
        ops.multi_mask_weight_grad(grad_out, x, masks, groups.order + 10, groups.offsets)
    with pytest.raises(TypeError, match="dtype"):
        ops.multi_mask_weight_grad(grad_out.double(), x, masks, groups.order, groups.offsets)


@needs_ext
def test_opcheck_and_gradcheck_multi_mask_weight_grad():
    grad_out, x, masks, ids, groups = _mmwg_case(30, 6, 7, 3, torch.float64, seed=5)
    args = (grad_out, x, masks, groups.order, groups.offsets)
    torch.library.opcheck(torch.ops.xlsparse.multi_mask_weight_grad.default, args)
    grad_out.requires_grad_()
    x.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda g, x: ops.multi_mask_weight_grad(g, x, masks, groups.order, groups.offsets), (grad_out, x))
    # a direct op call may list a token twice (the wrapper refuses it): the forward counts it twice,
    # and the backward wrote its gradient once
    order = torch.cat([groups.order[:1], groups.order])
    offsets = torch.cat([groups.offsets[:1], groups.offsets[1:] + 1])
    assert torch.autograd.gradcheck(
        lambda g, x: torch.ops.xlsparse.multi_mask_weight_grad(g, x, masks, order, offsets), (grad_out, x))


@pytest.mark.skipif("triton" not in MMWG_BACKENDS, reason="triton not usable here")
def test_opcheck_triton_multi_mask_weight_grad():
    import xlsparse.triton.optim  # noqa: F401

    grad_out, x, masks, ids, groups = _mmwg_case(30, 6, 7, 3, torch.float32, seed=6)
    tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.xlsparse.triton_multi_mask_weight_grad.default,
                          (grad_out, x, masks, groups.order, groups.offsets), test_utils=tests)


def _subnetwork_case(seed=7, bias_masks=False):
    from xlsparse.nn import SubnetworkLinear

    gen = seeded(seed)
    linear = torch.nn.Linear(13, 9).double()
    masks = {lang: torch.rand(9, 13, generator=gen) < 0.5 for lang in ("en", "de", "sw")}
    bmasks = {lang: torch.rand(9, generator=gen) < 0.5 for lang in masks} if bias_masks else None
    layer = SubnetworkLinear.from_linear(linear, masks, bias_masks=bmasks)
    x = torch.randn(4, 5, 13, generator=gen, dtype=torch.float64)
    ids = torch.randint(-1, 3, (4, 5), generator=gen)
    return layer, masks, bmasks, x, ids


def _loop_grads(layer, masks, bmasks, x, ids):
    """Per-language loop reference: each language's own backward, masked, summed (float64)."""
    gw = torch.zeros_like(layer.weight)
    gb = torch.zeros_like(layer.bias)
    xf = x.reshape(-1, x.shape[-1])
    for lang, name in enumerate(masks):
        sel = ids.reshape(-1) == lang
        w = layer.weight.detach().clone().requires_grad_()
        b = layer.bias.detach().clone().requires_grad_()
        torch.nn.functional.linear(xf[sel], w, b).square().sum().backward()
        gw += masks[name] * w.grad
        gb += (bmasks[name] if bmasks else 1) * b.grad
    return gw, gb


@pytest.mark.parametrize("backend", MMWG_BACKENDS)
@pytest.mark.parametrize("bias_masks", [False, True])
@pytest.mark.parametrize("how", ["argument", "route", "per_example"])
def test_subnetwork_linear_matches_per_language_loop(backend, bias_masks, how, use_backend):
    from xlsparse import routing

    use_backend(backend)
    layer, masks, bmasks, x, ids = _subnetwork_case(bias_masks=bias_masks)
    if how == "per_example":
        ids = torch.tensor([2, -1, 0, 1]).unsqueeze(1).expand(4, 5)
    xg = x.clone().requires_grad_()
    if how == "argument":
        y = layer(xg, language_ids=ids)
    else:
        with routing.use(ids[:, 0] if how == "per_example" else ids, 3):
            y = layer(xg)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, layer.weight, layer.bias))
    y.square().sum().backward()
    gw, gb = _loop_grads(layer, masks, bmasks, x, ids)
    torch.testing.assert_close(layer.weight.grad, gw)
    torch.testing.assert_close(layer.bias.grad, gb)
    # dX is the ordinary dense gradient
    xd = x.clone().requires_grad_()
    torch.nn.functional.linear(xd, layer.weight.detach(), layer.bias.detach()).square().sum().backward()
    torch.testing.assert_close(xg.grad, xd.grad)


@pytest.mark.parametrize("bias_masks", [False, True])
def test_subnetwork_linear_second_order_gradients_are_masked_per_language(bias_masks):
    # With create_graph (a gradient penalty on dX, second-order MAML) dX = dY W was a plain product,
    # whose own gradient reached every weight entry: entries outside every mask, and from tokens of id -1
    layer, masks, bmasks, x, ids = _subnetwork_case(bias_masks=bias_masks)
    stacked, flat = torch.stack(list(masks.values())), ids.reshape(-1)
    bstacked = torch.stack(list(bmasks.values())) if bmasks else None

    def restated(xs, w, b):
        # token t of language l reads W (and b) through entries outside M_l detached: no gradient there
        rows = []
        for t, lang in enumerate(flat.tolist()):
            wt = w.detach() if lang < 0 else torch.where(stacked[lang], w, w.detach())
            bt = b.detach() if lang < 0 else (torch.where(bstacked[lang], b, b.detach()) if bmasks else b)
            rows.append(torch.nn.functional.linear(xs[t], wt, bt))
        return torch.stack(rows)

    def loss_and_grads(forward, w, b, xs):
        (gx,) = torch.autograd.grad(forward(xs).square().sum(), xs, create_graph=True)
        gw, gb = torch.autograd.grad(forward(xs).tanh().sum(), (w, b), create_graph=True)
        loss = gx.square().sum() + (gw.square().sum() + gb.square().sum()) * (xs ** 3).sum()
        return torch.autograd.grad(loss, (w, b, xs))

    xf = x.reshape(-1, x.shape[-1])
    got = loss_and_grads(lambda xs: layer(xs, language_ids=flat), layer.weight, layer.bias, xf.clone().requires_grad_())
    w, b = (p.detach().clone().requires_grad_() for p in (layer.weight, layer.bias))
    want = loss_and_grads(lambda xs: restated(xs, w, b), w, b, xf.clone().requires_grad_())
    assert not got[0][~stacked.any(0)].any(), "a second-order gradient reached entries outside every mask"
    for g, r, name in zip(got, want, ("weight", "bias", "x")):
        torch.testing.assert_close(g, r, msg=name)


def test_subnetwork_linear_without_route_raises_in_training_and_in_an_eval_backward_into_its_weight():
    # Eval mode with no routing ran every token as id -1: loss.backward() gave the weight and bias
    # all-zero gradients, silently (a model from HF's from_pretrained is in eval mode). Its output and
    # the input's gradient need no ids; ids of -1, asked for, still mean no update.
    layer, masks, _, x, _ = _subnetwork_case()
    with pytest.raises(RuntimeError, match="no language routing"):
        layer.train()(x)
    with pytest.raises(RuntimeError, match="no language routing"):
        layer.eval()(x).sum().backward()
    x.requires_grad_(True)
    gx, = torch.autograd.grad(layer(x).square().sum(), x)
    plain = torch.nn.functional.linear(x, layer.weight, layer.bias)
    torch.testing.assert_close(gx, (2 * plain) @ layer.weight)
    layer.weight.grad = layer.bias.grad = None
    layer(x, language_ids=torch.full(x.shape[:2], -1)).sum().backward()
    assert_bit_identical(layer.weight.grad, torch.zeros_like(layer.weight), "weight grad of ids -1")
    assert_bit_identical(layer.bias.grad, torch.zeros_like(layer.bias), "bias grad of ids -1")


def test_subnetwork_linear_takes_language_ids_as_a_list_as_route_does():
    # MultiDeltaLinear's route= and routing.use take a list; language_ids=[...] raised AttributeError ('.to')
    layer, masks, bmasks, x, ids = _subnetwork_case()
    layer(x, language_ids=ids.tolist()).square().sum().backward()
    gw, gb = _loop_grads(layer, masks, bmasks, x, ids)
    torch.testing.assert_close(layer.weight.grad, gw)
    torch.testing.assert_close(layer.bias.grad, gb)
    with pytest.raises(TypeError, match="integers"):
        layer(x, language_ids=ids.double().tolist())


def test_subnetwork_linear_bad_masks():
    from xlsparse.nn import SubnetworkLinear

    linear = torch.nn.Linear(4, 3)
    with pytest.raises(ValueError, match="shape"):
        SubnetworkLinear.from_linear(linear, {"en": torch.ones(4, 3, dtype=torch.bool)})
    with pytest.raises(TypeError, match="bool"):
        SubnetworkLinear.from_linear(linear, {"en": torch.ones(3, 4)})
    with pytest.raises(ValueError, match="non-empty"):
        SubnetworkLinear.from_linear(linear, {})


@pytest.mark.parametrize("assign", [False, True, "deepcopy", "pickle"])
def test_an_optimizer_load_checks_a_subnetwork_weight_loaded_with_assign(assign):
    # load_state_dict(assign=True) makes the state dict's tensor the layer's weight, which the optimizer's
    # check (a loaded selector must be the union of the layer's masks) did not know until the next
    # set_masks: a state masking other entries loaded silently, and stepped entries no language trains
    from xlsparse.nn import SubnetworkLinear

    g = torch.Generator().manual_seed(0)
    layer = SubnetworkLinear.from_linear(torch.nn.Linear(7, 5), {lang: torch.rand(5, 7, generator=g) < 0.4
                                                                  for lang in ("de", "fr")})
    other = torch.rand(5, 7, generator=g) < 0.4  # the masks of another run
    assert not torch.equal(other, layer.trainable_mask())
    saved = MaskedAdamW([layer.weight], [other]).state_dict()
    if assign == "deepcopy":  # a copied layer's weight is a new tensor, unknown to the check until set_masks
        layer = copy.deepcopy(layer)
    elif assign == "pickle":
        layer = pickle.loads(pickle.dumps(layer))
    else:
        layer.load_state_dict({k: v.clone() for k, v in layer.state_dict().items()}, assign=assign)
    opt = MaskedAdamW([layer.weight], [layer.trainable_mask()])
    with pytest.raises(ValueError, match="union of the layer's masks"):
        opt.load_state_dict(copy.deepcopy(saved))
    opt.load_state_dict(MaskedAdamW([layer.weight], [layer.trainable_mask()]).state_dict())  # the layer's own masks


@needs_ext
def test_torch_compile_fullgraph_subnetwork_linear():
    layer, masks, bmasks, x, ids = _subnetwork_case(bias_masks=True)
    model = torch.nn.Sequential(layer)

    def loss(x, ids):
        return model[0](torch.tanh(x), language_ids=ids).square().sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    compiled(x, ids).backward()
    got = layer.weight.grad.clone(), layer.bias.grad.clone()
    layer.weight.grad = layer.bias.grad = None
    gw, gb = _loop_grads(layer, masks, bmasks, torch.tanh(x), ids)
    torch.testing.assert_close(got[0], gw)
    torch.testing.assert_close(got[1], gb)


@needs_ext
@pytest.mark.parametrize("fullgraph", [False, True])
def test_torch_compile_refuses_a_tensor_written_twice(fullgraph):
    """A compiled step has no addresses to compare: a param (or state) given twice passed the
    checks and the kernel stepped it twice, where eager refuses it."""
    p, g = torch.randn(4, 5, generator=seeded(1)), torch.randn(4, 5, generator=seeded(2))
    m, v = [torch.zeros(4, 5) for _ in range(2)], [torch.zeros(4, 5) for _ in range(2)]
    steps = [torch.zeros(1), torch.zeros(1)]

    def step(p, g, m, v, steps):
        ops.masked_adamw_([p, p], [g, g], [None, None], m, v, [], steps, [None, None], lr=0.1, beta1=0.9,
                          beta2=0.99, eps=1e-8, weight_decay=0.0)
        return p * 1

    before = p.clone()
    # eager (after the graph break) names the shared memory; a full graph fails at the same check
    with pytest.raises(Exception, match="share memory" if not fullgraph else ""):
        torch.compile(step, backend="aot_eager", fullgraph=fullgraph)(p, g, m, v, steps)
    assert_bit_identical(p, before, "written by a refused call")
    assert all(float(s) == 0 for s in steps)


@pytest.mark.parametrize("mode", ["dense", "compact"])
def test_a_parameter_swapped_into_the_groups_is_refused_before_any_step(mode):
    # accelerate's FSDP2 prepare puts the sharded parameters in place of the optimizer's own: the
    # new ones had no state and no mask, and the step stopped with KeyError 'step'
    kept, swapped = torch.nn.Parameter(torch.zeros(3, 4)), torch.nn.Parameter(torch.zeros(4, 4))
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[0] = True
    opt = MaskedAdamW([{"params": [kept]}, {"params": [torch.nn.Parameter(torch.zeros(4, 4))]}], [None, mask],
                      lr=0.1, mode=mode)
    opt.param_groups[1]["params"] = [swapped]
    kept.grad, swapped.grad = torch.ones(3, 4), torch.ones(4, 4)
    with pytest.raises(ValueError, match="param 0 of param group 1 is not a parameter this optimizer was built with"):
        opt.step()
    assert not kept.any() and not swapped.any()


@pytest.mark.parametrize("opt_class", [MaskedAdamW, MaskedSGD])
def test_a_step_that_finds_no_gradient_before_any_update_warns(opt_class):
    # fully_shard after the optimizer was built swaps the module's parameters for new ones: the
    # optimizer's never get a gradient and every step did nothing, with nothing said.
    import warnings

    gen = seeded(3)
    lin = torch.nn.Linear(4, 3)
    masks = [torch.rand(3, 4, generator=gen) < 0.5, torch.rand(3, generator=gen) < 0.5]
    opt = opt_class(lin.parameters(), masks, lr=0.1)
    lin.weight, lin.bias = (torch.nn.Parameter(p.detach().clone()) for p in (lin.weight, lin.bias))
    lin(torch.randn(2, 4, generator=gen)).sum().backward()
    with pytest.warns(UserWarning, match="no parameter has a gradient.*fully_shard"):
        opt.step()
    # an optimizer whose parameters get gradients says nothing, nor later when a step has none
    own = torch.nn.Linear(4, 3)
    opt = opt_class(own.parameters(), masks, lr=0.1)
    before = own.weight.detach().clone()
    own(torch.randn(2, 4, generator=gen)).sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
        opt.zero_grad()
        opt.step()
    assert not torch.equal(own.weight.detach()[masks[0]], before[masks[0]])


@pytest.mark.parametrize("mode", ["dense", "compact"])
def test_masked_adamw_steps_parameters_that_are_disjoint_slices_of_one_buffer(mode):
    # slices of one flat buffer were refused as "share memory", though no entry is written twice
    g = torch.Generator().manual_seed(0)
    buf = torch.randn(40, generator=g)
    shared = [torch.nn.Parameter(buf[:24].view(4, 6)), torch.nn.Parameter(buf[24:].view(4, 4))]
    apart = [torch.nn.Parameter(p.detach().clone()) for p in shared]
    masks = [torch.rand(p.shape, generator=g) < 0.5 for p in shared]
    grads = [torch.randn(p.shape, generator=g) for p in shared]
    for params in (shared, apart):
        opt = MaskedAdamW(params, masks, lr=0.1, weight_decay=0.1, mode=mode)
        for _ in range(2):
            for p, gr in zip(params, grads):
                p.grad = gr.clone()
            opt.step()
    for a, b in zip(shared, apart):
        assert torch.equal(a.detach(), b.detach())
    assert torch.equal(buf[:24].view(4, 6), shared[0].detach())  # written in place, in the buffer
