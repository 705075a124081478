"""Exact resume: N steps, save (model state_dict + optimizer state_dict, which holds the masks),
load into fresh objects, M more steps == N + M uninterrupted steps, bit for bit. Dense and
compact modes, AdamW and SGD, static masks and a dynamic-mask schedule (update_masks)."""
import pytest
import torch
from conftest import assert_bit_identical

from xlsparse import nn as xnn
from xlsparse.optim import MaskedAdamW, MaskedSGD

N, M = 4, 5
DYNAMIC_AT = (2, 6)  # steps before which the masks are re-selected: one before the save, one after


def _model(seed: int):
    torch.manual_seed(seed)
    first = xnn.SparseDeltaLinear.from_linear(torch.nn.Linear(12, 20), density=0.3)
    return torch.nn.Sequential(first, torch.nn.Tanh(), torch.nn.Linear(20, 5))


def _trainable(model):
    head = model[2]
    return [model[0].delta_values, head.weight, head.bias]


def _masks(model, step: int, mode: str):
    """The masks in force from `step` on: None for the delta values, a schedule-dependent random
    subnetwork of the head (bool in dense mode, sorted indices in compact mode)."""
    g = torch.Generator().manual_seed(1000 + step)
    mask = torch.rand(model[2].weight.shape, generator=g) < 0.4
    bias = torch.rand(model[2].bias.shape, generator=g) < 0.5
    if mode == "compact":
        mask, bias = mask.reshape(-1).nonzero().flatten(), bias.nonzero().flatten()
    return [None, mask, bias]


def _optimizer(model, kind: str, mode: str):
    params, masks = _trainable(model), _masks(model, 0, mode)
    if kind == "adamw":
        return MaskedAdamW(params, masks, lr=3e-2, weight_decay=0.05, mode=mode, l1_to_init=1e-3, amsgrad=True)
    return MaskedSGD(params, masks, lr=5e-2, momentum=0.9, nesterov=True, weight_decay=0.01, mode=mode)


def _batch(step: int):
    g = torch.Generator().manual_seed(step)
    return torch.randn(9, 12, generator=g), torch.randint(0, 5, (9,), generator=g)


def _steps(model, opt, start: int, stop: int, mode: str, dynamic: bool) -> None:
    for step in range(start, stop):
        if dynamic and step in DYNAMIC_AT:
            opt.update_masks(_masks(model, step, mode))
        x, y = _batch(step)
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def _flat_state(opt) -> dict:
    out = {}
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                out[f"{i}.{k}"] = v
    return out


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
@pytest.mark.parametrize("mode", ["dense", "compact"])
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_resume_is_bit_identical(tmp_path, kind, mode, dynamic):
    straight = _model(0)
    opt = _optimizer(straight, kind, mode)
    _steps(straight, opt, 0, N + M, mode, dynamic)

    first = _model(0)
    opt1 = _optimizer(first, kind, mode)
    _steps(first, opt1, 0, N, mode, dynamic)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": first.state_dict(), "optimizer": opt1.state_dict()}, path)
    del first, opt1

    ckpt = torch.load(path, weights_only=True)  # plain tensors and containers: no code runs
    resumed = _model(123)  # different init and support: everything must come from the checkpoint
    resumed.load_state_dict(ckpt["model"])
    opt2 = _optimizer(resumed, kind, mode)  # built with the step-0 masks; the checkpoint's win
    opt2.load_state_dict(ckpt["optimizer"])
    _steps(resumed, opt2, N, N + M, mode, dynamic)

    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert_bit_identical(b, a, name)
    sa, sb = _flat_state(opt), _flat_state(opt2)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert_bit_identical(sb[k], sa[k], f"optimizer state {k}")
    assert not torch.equal(straight[0].delta_values, torch.zeros_like(straight[0].delta_values))


def test_resume_of_a_converted_hf_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    from xlsparse import hf

    def build(seed):
        torch.manual_seed(seed)
        cfg = transformers.BertConfig(vocab_size=41, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=20, max_position_embeddings=12, hidden_dropout_prob=0.0,
                                      attention_probs_dropout_prob=0.0)
        model = hf.convert(transformers.BertForMaskedLM(cfg), density=0.1)
        for n, p in model.named_parameters():
            p.requires_grad_(n.endswith("delta_values"))
        params = [p for p in model.parameters() if p.requires_grad]
        return model, MaskedAdamW(params, [None] * len(params), lr=1e-2, mode="compact")

    def run(model, opt, steps):
        for s in steps:
            ids = torch.randint(3, 41, (2, 6), generator=torch.Generator().manual_seed(s))
            opt.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()

    straight, opt = build(0)
    run(straight, opt, range(6))
    first, opt1 = build(0)
    run(first, opt1, range(3))
    torch.save({"model": first.state_dict(), "opt": opt1.state_dict()}, tmp_path / "c.pt")
    ckpt = torch.load(tmp_path / "c.pt", weights_only=True)
    resumed, opt2 = build(0)
    resumed.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    run(resumed, opt2, range(3, 6))
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert_bit_identical(b, a, name)


@pytest.mark.parametrize("opt_cls", [MaskedAdamW, MaskedSGD])
@pytest.mark.parametrize("tokens", [8, 80], ids=["spmm", "written-into-w0"])
def test_layer_forward_sees_every_optimizer_step(opt_cls, tokens):
    """After every step the layer computes with the new values, on both forward paths (an SpMM term
    below `functional.MERGE_MIN_TOKENS` tokens, Δ written into W0 above), and W0 stays W0."""
    torch.manual_seed(0)
    layer = xnn.SparseDeltaLinear.from_linear(torch.nn.Linear(6, 8), density=0.5)
    base = layer.weight.detach().clone()
    opt = opt_cls([layer.delta_values], [None], lr=0.1)
    x = torch.randn(tokens, 6)
    for _ in range(3):
        opt.zero_grad()
        layer(x).square().sum().backward()
        opt.step()
        fresh = torch.nn.functional.linear(x, layer.weight + torch.zeros_like(layer.weight).view(-1).index_put(
            (layer.delta_indices.long(),), layer.delta_values.detach()).view_as(layer.weight), layer.bias)
        torch.testing.assert_close(layer(x), fresh, rtol=1e-5, atol=1e-4)  # the SpMM path sums in another order
        assert_bit_identical(layer.weight, base, "base weight")


def test_in_place_ops_bump_version_counters(use_backend):
    from conftest import cpu_backends
    from xlsparse.ops import compose as cops, matmul as mops, optim as oops

    for backend in cpu_backends("sparse_axpy_"):
        use_backend(backend)
        d = torch.randn(10)
        cops.sparse_axpy_(d, torch.tensor([1]), torch.ones(1))
        saved = cops.apply_diffs_([d], [torch.tensor([2])], [torch.ones(1)], [0], [1.0])
        cops.restore_diffs_([d], [torch.tensor([2])], saved, [0])
        assert d._version >= 3, backend
        y = torch.randn(2, 3)
        mops.spmm_(y, torch.randn(2, 2), torch.tensor([1]), torch.ones(1))
        assert y._version >= 1, backend
        p, m, v, s = torch.randn(4), torch.zeros(4), torch.zeros(4), torch.tensor(0.0)
        oops.masked_adamw_([p], [torch.randn(4)], [None], [m], [v], [], [s], [], lr=0.1, beta1=0.9, beta2=0.99,
                           eps=1e-8, weight_decay=0.0)
        oops.masked_sgd_([p], [torch.randn(4)], [None], [m], [s], lr=0.1, momentum=0.9)
        assert p._version >= 2 and m._version >= 2 and s._version >= 2, backend


_TORCH_TWIN = {MaskedAdamW: (torch.optim.AdamW, dict(lr=1e-2, betas=(0.8, 0.9), weight_decay=0.05)),
               MaskedSGD: (torch.optim.SGD, dict(lr=1e-2, momentum=0.9, dampening=0.1, weight_decay=0.01))}


@pytest.mark.parametrize("opt_cls", [MaskedAdamW, MaskedSGD])
@pytest.mark.parametrize("mode", ["dense", "compact"])
def test_resume_keeps_a_mask_that_became_every_entry(tmp_path, opt_cls, mode):
    """update_masks([None]) before the save; the resumed optimizer is built with the first mask, as
    a resuming script does. The saved "every entry" wins: the resumed run equals the uninterrupted
    one bit for bit, and both equal torch's optimizer in float64 run on the first mask's entries
    from step 0 and, fresh, on the other entries from the change on."""
    torch_cls, kw = _TORCH_TWIN[opt_cls]
    gen = torch.Generator().manual_seed(0)
    init = torch.randn(8, 8, generator=gen, dtype=torch.float64)
    m0 = torch.rand(8, 8, generator=gen) < 0.3
    grads = [torch.randn(8, 8, generator=gen, dtype=torch.float64) for _ in range(6)]
    change, cut = 1, 3

    def steps(p, opt, start, stop):
        for t in range(start, stop):
            if t == change:
                opt.update_masks([None])
            p.grad = grads[t].clone()
            opt.step()

    straight = torch.nn.Parameter(init.clone())
    opt = opt_cls([straight], [m0], mode=mode, **kw)
    steps(straight, opt, 0, 6)

    first = torch.nn.Parameter(init.clone())
    opt1 = opt_cls([first], [m0], mode=mode, **kw)
    steps(first, opt1, 0, cut)
    torch.save({"p": first.detach(), "opt": opt1.state_dict()}, tmp_path / "c.pt")
    ckpt = torch.load(tmp_path / "c.pt", weights_only=True)
    resumed = torch.nn.Parameter(ckpt["p"].clone())
    opt2 = opt_cls([resumed], [m0], mode=mode, **kw)
    opt2.load_state_dict(ckpt["opt"])
    steps(resumed, opt2, cut, 6)
    assert_bit_identical(resumed.detach(), straight.detach(), "params after resume")

    kept, added = torch.nn.Parameter(init[m0].clone()), torch.nn.Parameter(init[~m0].clone())
    torch_kept, torch_added = torch_cls([kept], foreach=False, **kw), torch_cls([added], foreach=False, **kw)
    for t, g in enumerate(grads):
        kept.grad = g[m0].clone()
        torch_kept.step()
        if t >= change:
            added.grad = g[~m0].clone()
            torch_added.step()
    expected = init.clone()
    expected[m0], expected[~m0] = kept.detach(), added.detach()
    torch.testing.assert_close(straight.detach(), expected, rtol=1e-12, atol=1e-12)
