"""Data-parallel training on torch.distributed: 2 gloo processes on CPU (mp.spawn, 127.0.0.1).

- DDP over a tiny BERT converted with `xlsparse.hf.convert(kind="delta")` and trained with
  `MaskedAdamW` equals one process over the same global batch.
- Mask selection from per-rank importance scores agrees on every rank once the scores are
  all-reduced (`xlsparse.distributed`), and disagrees without it.
- FSDP2: phase 2 of LT-SFT (delta values, masked biases and norms, compact `MaskedAdamW`) on a
  `fully_shard`ed model equals one process, and no entry outside a mask moves on any shard.
- FSDP2: what writes whole tensors into the model (merge, apply, disable, convert, ...) refuses a
  sharded model on every rank before anything changes.
"""
import faulthandler
import os
import socket
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

transformers = pytest.importorskip("transformers")

import xlsparse  # noqa: E402
from xlsparse import distributed as xdist, hf  # noqa: E402
from xlsparse.optim import MaskedAdamW  # noqa: E402

WORLD = 2


def _gather_to(out: str, rank: int, result) -> None:
    """Every rank's `result`, in rank order, saved to `out` by rank 0 (a collective: every rank calls it)."""
    gathered = [None] * WORLD
    dist.all_gather_object(gathered, result)
    if rank == 0:
        torch.save(gathered, out)


STEPS = 4
# Gloo's sum order varies between runs, and 4 Adam steps (lr 1e-2) turn that rounding into up to
# 3e-6 on a value (seen here, 1 run in 6); a wrong step would be off by about lr.
CLOSE = dict(rtol=1e-3, atol=2e-5)
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _guarded(rank: int, worker, port: int, out: str) -> None:
    # gloo waits 30 min for a peer by default; a rank stuck for 120 s (a full run takes 5-15 s)
    # prints every thread's stack to stderr and exits with code 1 instead.
    faulthandler.dump_traceback_later(120, exit=True)
    _init(rank, port)
    keep = worker(rank, out)  # noqa: F841 (held, not freed: see below)
    dist.barrier()
    # Exit without tearing down: freeing the DDP model as the worker returned, after its peer had
    # exited, blocked in C++ in about 1 run in 5 here (the stuck rank's stack ended at that return).
    os._exit(0)


def _spawn(worker, out: str) -> None:
    """Run `worker(rank, out)` on WORLD processes, each in a process group; the worker returns what
    must stay alive until the process exits. A rank that dies without a Python exception
    (the watchdog above, or a crash) gets one more try on a fresh port, with a warning; an
    exception raised in a worker fails the test at once."""
    try:
        mp.spawn(_guarded, args=(worker, _free_port(), out), nprocs=WORLD, join=True)
    except mp.ProcessExitedException as exc:
        warnings.warn(f"{worker.__name__}: a rank died ({exc}); its stacks are in the captured stderr; retrying once")
        mp.spawn(_guarded, args=(worker, _free_port(), out), nprocs=WORLD, join=True)


def _init(rank: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)


def _tiny_bert(cls=transformers.BertForMaskedLM):
    """A tiny BERT masked LM without dropout, from seed 0."""
    torch.manual_seed(0)
    return cls(transformers.BertConfig(vocab_size=61, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=24, max_position_embeddings=16, hidden_dropout_prob=0.0,
                                       attention_probs_dropout_prob=0.0))


def _tiny_model():
    """A converted tiny BERT (no dropout, so ranks and the single process compute the same thing)."""
    model = _tiny_bert()
    hf.convert(model, density=0.2, kind="delta")  # the support is drawn from the seeded global RNG
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith("delta_values") or name == "cls.predictions.transform.dense.weight")
    return model


def _optimizer(model):
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(1)
    # delta values train fully; the head's dense weight trains a random 30% subnetwork
    masks = [None if n.endswith("delta_values") else torch.rand(p.shape, generator=g) < 0.3 for n, p in named]
    return MaskedAdamW([p for _, p in named], masks, lr=1e-2, weight_decay=0.01, mode="dense")


def _global_batch():
    g = torch.Generator().manual_seed(2)
    return torch.randint(3, 61, (STEPS, 2 * WORLD, 7), generator=g)


def _train(model, batches) -> dict:
    opt = _optimizer(model)
    model.train()
    for ids in batches:
        opt.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    inner = model.module if hasattr(model, "module") else model
    return {n: p.detach().clone() for n, p in inner.named_parameters() if p.requires_grad}


def _ddp_worker(rank: int, out: str):
    model = torch.nn.parallel.DistributedDataParallel(_tiny_model())
    per_rank = 2
    batches = [b[rank * per_rank:(rank + 1) * per_rank] for b in _global_batch()]
    trained = _train(model, batches)
    assert xdist.same_on_all_ranks(list(trained.values()))
    if rank == 0:
        torch.save(trained, out)
    return model


def test_ddp_two_gloo_processes_equal_one_process_over_the_global_batch(tmp_path):
    out = str(tmp_path / "ddp.pt")
    _spawn(_ddp_worker, out)
    ddp = torch.load(out, weights_only=True)
    single = _train(_tiny_model(), list(_global_batch()))
    assert set(ddp) == set(single)
    moved = 0
    for name, p in single.items():
        torch.testing.assert_close(ddp[name], p, **CLOSE, msg=lambda m, name=name: f"{name}: {m}")
        moved += int((p != _tiny_model().state_dict()[name]).sum())
    assert moved > 0  # training changed something


# --- mask selection agrees across ranks ---

def _scores(rank: int) -> dict:
    """Per-rank importance scores: different data, hence different scores, on each rank."""
    g = torch.Generator().manual_seed(100 + rank)
    return {"a": torch.rand(8, 9, generator=g), "b": torch.rand(30, generator=g)}


def _mask_worker(rank: int, out: str):
    local = _scores(rank)
    k = 20
    unsynced = xlsparse.functional.topk_mask(list(local.values()), k)
    synced = xdist.topk_mask(list(local.values()), k)
    # rank 1 builds its dict in the other order: entries pair by name, not by position
    order = list(local) if rank == 0 else list(local)[::-1]
    summed = xdist.all_reduce_scores({n: local[n].clone() for n in order})
    try:  # same shapes under another name on rank 1: added to unrelated scores before
        xdist.all_reduce_scores({"a" if rank == 0 else "c": torch.ones(3)})
        mismatch = None
    except ValueError as e:
        mismatch = str(e)
    result = {"same_synced": xdist.same_on_all_ranks(synced), "same_unsynced": xdist.same_on_all_ranks(unsynced),
              "synced": synced, "summed": summed, "mismatch": mismatch}
    if rank == 0:
        torch.save(result, out)


@pytest.mark.slow  # 2 processes: ~10-20 s
def test_topk_over_all_reduced_scores_picks_one_mask_on_every_rank(tmp_path):
    out = str(tmp_path / "masks.pt")
    _spawn(_mask_worker, out)
    res = torch.load(out, weights_only=True)
    assert res["same_synced"] and not res["same_unsynced"]
    assert "different names or shapes" in res["mismatch"]
    total = {n: _scores(0)[n] + _scores(1)[n] for n in ("a", "b")}
    for n in total:
        assert torch.equal(res["summed"][n], total[n])
    want = xlsparse.functional.topk_mask(list(total.values()), 20)
    for got, w in zip(res["synced"], want):
        assert torch.equal(got, w)


def _mismatch_worker(rank: int, out: str):
    """Inputs that differ between the ranks: each call must answer alike on every rank, and the
    ranks' collectives must stay paired (the last call sums correctly)."""
    def outcome(call):
        try:
            return repr(call())
        except (TypeError, ValueError) as exc:
            return type(exc).__name__
    got = {
        # rank 1 alone has an integer score: it raised alone, rank 0 waited in the all-reduce
        "int": outcome(lambda: xdist.all_reduce_scores([torch.ones(4) if rank == 0 else torch.ones(4, dtype=torch.int64)])),
        # rank 1 alone has nothing to reduce: it returned, rank 0's check paired with its next collective
        "empty": outcome(lambda: xdist.all_reduce_scores({"a": torch.ones(3)} if rank == 0 else {})),
        # same shapes, other dtypes: buffers of other byte sizes (gloo aborted the process)
        "dtype": outcome(lambda: xdist.all_reduce_scores([torch.ones(4, dtype=torch.float32 if rank == 0 else torch.float64)])),
        "op": outcome(lambda: xdist.all_reduce_scores([torch.ones(2)], op="sum" if rank == 0 else "mean")),
        # other numbers of tensors: checksum buffers of other sizes (gloo aborted the process)
        "count": outcome(lambda: xdist.same_on_all_ranks([torch.ones(3)] + [torch.ones(2)] * rank)),
        "none": outcome(lambda: xdist.same_on_all_ranks([torch.ones(3)] if rank == 0 else [])),
        "bits_alike_dtypes_not": outcome(lambda: xdist.same_on_all_ranks([torch.zeros(3, dtype=torch.float32 if rank == 0 else torch.int32)])),
        "after": outcome(lambda: xdist.all_reduce_scores([torch.full((2,), float(rank + 1))])[0].tolist()),
    }
    _gather_to(out, rank, got)


@pytest.mark.slow  # 2 processes: ~10-20 s
def test_scores_or_checks_that_differ_between_ranks_answer_alike_on_every_rank(tmp_path):
    out = str(tmp_path / "mismatch.pt")
    _spawn(_mismatch_worker, out)
    r0, r1 = torch.load(out, weights_only=False)
    assert (r0["int"], r1["int"]) == ("ValueError", "TypeError")  # rank 1 names its own error
    for key in ("empty", "dtype", "op"):
        assert r0[key] == r1[key] == "ValueError", key
    for key in ("count", "none", "bits_alike_dtypes_not"):
        assert r0[key] == r1[key] == "False", key
    assert r0["after"] == r1["after"] == "[3.0, 3.0]"


def _subnetwork_model():
    """The tiny BERT converted to per-language subnetworks (random 10% masks for de and fr)."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=61, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=24, max_position_embeddings=16)
    model = transformers.BertForMaskedLM(cfg)
    names = [f"{n}.weight" for n in hf.model.target_names(model)]
    named = dict(model.named_parameters())
    g = torch.Generator().manual_seed(6)
    hf.convert(model, kind="subnetwork",
               masks={lang: {n: torch.rand(named[n].shape, generator=g) < 0.1 for n in names} for lang in ("de", "fr")})
    return model


def _probe(lang: str, rank: int) -> dict:
    ids = torch.randint(3, 61, (2, 7), generator=torch.Generator().manual_seed(200 + 10 * rank + len(lang)))
    return {"input_ids": ids, "labels": ids}


def _reselected_masks(model) -> dict:
    from xlsparse.nn import SubnetworkLinear
    return {name: layer.masks.clone() for name, layer in hf.model._converted(model, SubnetworkLinear)}


def _dynamic_masks_worker(rank: int, out: str):
    from types import SimpleNamespace

    from xlsparse.hf.subnetworks import DynamicMasksCallback

    model = _subnetwork_model()
    # each process probes a batch of its own (its shard of the data)
    callback = DynamicMasksCallback({lang: [_probe(lang, rank)] for lang in ("de", "fr")}, every=1, density=0.1)
    callback.on_step_end(None, SimpleNamespace(global_step=1), None, model=model, optimizer=None)
    masks = _reselected_masks(model)
    result = {"same": xdist.same_on_all_ranks(masks), "masks": masks}
    if rank == 0:
        torch.save(result, out)


@pytest.mark.slow  # 2 processes: ~10-20 s
def test_dynamic_subnetwork_masks_are_selected_from_every_process_s_probe_scores(tmp_path):
    from types import SimpleNamespace

    from xlsparse.hf.subnetworks import DynamicMasksCallback

    out = str(tmp_path / "dynamic.pt")
    _spawn(_dynamic_masks_worker, out)
    got = torch.load(out, weights_only=True)
    assert got["same"], "the processes selected different masks from their own probe scores"
    # one process scoring both probe batches before one re-selection: the same ranking (the mean
    # over 2 processes is the sum halved, exactly)
    model = _subnetwork_model()
    callback = DynamicMasksCallback({lang: [_probe(lang, 0), _probe(lang, 1)] for lang in ("de", "fr")}, every=2,
                                    density=0.1)
    for step in (1, 2):
        callback.on_step_end(None, SimpleNamespace(global_step=step), None, model=model, optimizer=None)
    want = _reselected_masks(model)
    assert set(got["masks"]) == set(want)
    for name, m in want.items():
        assert torch.equal(got["masks"][name], m), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64, torch.int64, torch.bool])
def test_fingerprint_sees_any_one_change_and_any_swap(dtype):
    gen = torch.Generator().manual_seed(0)
    t = (torch.randn(1000, generator=gen) * 1000).to(dtype)
    base = xdist.fingerprint(t)
    assert torch.equal(base, xdist.fingerprint(t.clone()))
    for _ in range(50):
        i, j = torch.randint(0, t.numel(), (2,), generator=gen).tolist()
        if t[i].item() != t[j].item():
            swapped = t.clone()
            swapped[[i, j]] = t[[j, i]]
            assert not torch.equal(xdist.fingerprint(swapped), base), (i, j)
        flipped = t.clone()
        flipped.view(torch.uint8)[i * t.element_size()] ^= 1 << (i % 8)  # one bit of entry i
        assert not torch.equal(xdist.fingerprint(flipped), base), i
    assert not torch.equal(xdist.fingerprint(torch.tensor([1.0])), xdist.fingerprint(torch.tensor([1.0, 0.0])))
    signed_zero = torch.tensor([0.0, 1.0])
    assert not torch.equal(xdist.fingerprint(signed_zero), xdist.fingerprint(torch.tensor([-0.0, 1.0])))


def test_helpers_are_no_ops_without_a_process_group():
    scores = {"a": torch.rand(5)}
    before = scores["a"].clone()
    assert xdist.all_reduce_scores(scores) is scores and torch.equal(scores["a"], before)
    assert xdist.same_on_all_ranks([torch.ones(3)])
    assert torch.equal(xdist.topk_mask([before], 2)[0], xlsparse.functional.topk_mask([before], 2)[0])
    # a lone tensor was iterated as its rows: one mask per row, each of k entries, silently
    with pytest.raises(TypeError, match="topk_mask: tensors must be a list of tensors, got a tensor"):
        xdist.topk_mask(torch.rand(3, 4), 2)
    with pytest.raises(ValueError, match="op"):
        xdist.all_reduce_scores(scores, op="max")
    with pytest.raises(TypeError, match="tensors"):
        xdist.all_reduce_scores("scores")


# --- FSDP2 (fully_shard) on gloo: LT-SFT's phase 2 with the frozen base sharded ---

def _phase_two_model():
    """The tiny model as phase 2 trains it: every delta value (mask None), and a fixed random 30%
    of each LayerNorm and bias (odd sizes, so FSDP2's dim-0 chunks cut through the masks)."""
    model = _tiny_model()
    g = torch.Generator().manual_seed(5)
    masks = {}
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith("delta_values") or name.endswith("bias") or "LayerNorm" in name)
        if p.requires_grad and not name.endswith("delta_values"):
            masks[name] = torch.rand(p.shape, generator=g) < 0.3
    return model, masks


def _phase_two_train(model, masks, rank=None) -> dict:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = MaskedAdamW([p for _, p in named], [masks.get(n) for n, _ in named], lr=1e-2, weight_decay=0.01,
                      mode="compact")
    model.train()
    for b in _global_batch():
        ids = b if rank is None else b[rank * 2:(rank + 1) * 2]
        opt.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    full = lambda p: p.full_tensor() if hasattr(p, "full_tensor") else p  # noqa: E731
    return {n: full(p).detach().clone() for n, p in named}


def _fsdp_worker(rank: int, out: str):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model, masks = _phase_two_model()
    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in model.bert.encoder.layer:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    trained = _phase_two_train(model, masks, rank)
    if rank == 0:
        torch.save(trained, out)
    return model


@pytest.mark.slow  # 2 processes: ~10-20 s
def test_fsdp2_on_gloo_trains_phase_two_like_one_process(tmp_path):
    pytest.importorskip("torch.distributed.fsdp")
    out = str(tmp_path / "fsdp.pt")
    _spawn(_fsdp_worker, out)
    sharded = torch.load(out, weights_only=True)
    model, masks = _phase_two_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    single = _phase_two_train(model, masks)
    assert set(sharded) == set(single) and any(n.endswith("delta_values") for n in single)
    for name, p in single.items():
        torch.testing.assert_close(sharded[name], p, **CLOSE, msg=lambda m, name=name: f"{name}: {m}")
        if name in masks:  # outside its mask an entry never moves, on any shard
            assert torch.equal(sharded[name][~masks[name]], before[name][~masks[name]]), name
            assert not torch.equal(sharded[name][masks[name]], before[name][masks[name]]), name


def _fsdp_optimizer_state_worker(rank: int, out: str):
    """MaskedAdamW over fully_shard-ed parameters, trained whole (mask None) and split evenly, so
    both ranks hold per-shard state of one size: a per-rank state_dict round trip restores each
    rank's own state; torch.distributed.checkpoint, which keeps one copy of a plain tensor (it
    takes it for a replicated one), must be refused rather than hand a rank the other's moments."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model, _ = _phase_two_model()
    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in model.bert.encoder.layer:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and p.numel() % WORLD == 0]
    for n, p in model.named_parameters():
        p.requires_grad_(any(n == m for m, _ in named))
    opt = MaskedAdamW([p for _, p in named], [None] * len(named), lr=1e-2, mode="compact")
    model.train()
    for b in list(_global_batch())[:2]:
        opt.zero_grad(set_to_none=True)
        model(input_ids=b[rank * 2:(rank + 1) * 2], labels=b[rank * 2:(rank + 1) * 2]).loss.backward()
        opt.step()
    saved = {(i, k): v.clone() for i, (_, p) in enumerate(named) for k, v in opt.state[p].items()
             if isinstance(v, torch.Tensor)}
    again = MaskedAdamW([p for _, p in named], [None] * len(named), lr=1e-2, mode="compact")
    again.load_state_dict(opt.state_dict())
    own = all(torch.equal(again.state[p][k], saved[(i, k)]) for i, (_, p) in enumerate(named) for k in opt.state[p]
              if (i, k) in saved)
    ckpt = os.path.join(os.path.dirname(out), "dcp")
    dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=ckpt)
    fresh = MaskedAdamW([p for _, p in named], [None] * len(named), lr=1e-2, mode="compact")
    sd = {"optim": get_optimizer_state_dict(model, fresh)}
    dcp.load(sd, checkpoint_id=ckpt)
    try:
        set_optimizer_state_dict(model, fresh, sd["optim"])
        refused = ""
    except ValueError as exc:
        refused = str(exc)
    restored = all(torch.equal(fresh.state[p][k], saved[(i, k)]) for i, (_, p) in enumerate(named) for k in opt.state[p]
                   if (i, k) in saved)
    # The usual mistake: rank 0 alone saves, every rank loads that file. Rank 0 holds its own
    # state, so only rank 1 would refuse, and rank 0 would wait for it in the next collective.
    rank0_file = os.path.join(os.path.dirname(out), "rank0_optim.pt")
    if rank == 0:
        torch.save(opt.state_dict(), rank0_file)
    dist.barrier()
    try:
        MaskedAdamW([p for _, p in named], [None] * len(named), lr=1e-2, mode="compact").load_state_dict(
            torch.load(rank0_file, weights_only=True))
        rank0_refused = False
    except ValueError:
        rank0_refused = True
    result = torch.tensor([own, bool(refused) or restored, "shard" in refused or restored, rank0_refused])
    gathered = [torch.zeros(4, dtype=torch.bool) for _ in range(WORLD)]
    dist.all_gather(gathered, result)
    if rank == 0:
        torch.save(torch.stack(gathered), out)
    return model


@pytest.mark.slow  # 2 processes: ~10-20 s
def test_fsdp2_masked_adamw_state_is_per_rank_and_checkpoint_reading_another_rank_is_refused(tmp_path):
    pytest.importorskip("torch.distributed.checkpoint.state_dict")
    out = str(tmp_path / "state.pt")
    _spawn(_fsdp_optimizer_state_worker, out)
    got = torch.load(out, weights_only=True)
    assert got[:, 0].all(), "a per-rank state_dict round trip changed a rank's state"
    # either the rank read its own state back, or it was refused with an error naming the shard;
    # before the fix each rank silently took the other rank's moments for some parameters
    assert got[:, 1].all() and got[:, 2].all(), got
    # every rank refuses rank 0's file, rank 0 too: a rank that loaded would hang in its next collective
    assert got[:, 3].all(), got


_WHOLE_MASK = torch.tensor([0, 2])  # within each rank's half of an 8-entry bias


def _bias_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8))
    model[0].weight.requires_grad_(False)
    return model


def _bias_step(model, opt):
    opt.zero_grad(set_to_none=True)
    model(torch.ones(2, 3)).pow(2).sum().backward()
    opt.step()


def _whole_state_worker(rank: int, out: str):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = _bias_model()
    fully_shard(model, mesh=init_device_mesh("cpu", (WORLD,)))
    opt = MaskedAdamW([model[0].bias], [_WHOLE_MASK], lr=0.1, mode="compact")
    try:
        opt.load_state_dict(torch.load(out + ".whole", weights_only=True))
        refused = ""
    except ValueError as exc:
        refused = str(exc)
    _bias_step(model, opt)  # with the state refused, the optimizer steps from its own (fresh) state
    result = (refused, model[0].bias.full_tensor().detach().clone())
    _gather_to(out, rank, result)
    return model


@pytest.mark.slow  # 2 processes: ~10-20 s
def test_fsdp2_refuses_optimizer_state_saved_over_the_whole_parameter(tmp_path):
    # A compact state saved without FSDP2 holds whole-parameter flat indices; indices that all lie
    # within a shard's size passed as that shard's own, and rank 1 trained entries 4 and 6.
    pytest.importorskip("torch.distributed.fsdp")
    out = str(tmp_path / "whole.pt")
    model = _bias_model()
    before = model[0].bias.detach().clone()
    opt = MaskedAdamW([model[0].bias], [_WHOLE_MASK], lr=0.1, mode="compact")
    _bias_step(model, opt)
    torch.save(opt.state_dict(), out + ".whole")
    _spawn(_whole_state_worker, out)
    outside = torch.ones(8, dtype=torch.bool)
    outside[_WHOLE_MASK] = False
    for refused, bias in torch.load(out, weights_only=False):
        assert "whole parameter" in refused, refused
        assert torch.equal(bias[outside], before[outside])  # no entry outside the mask moved


# --- FSDP2: reading the trained diff back (extract_diff, save_pretrained) ---

def _saved_model():
    """The tiny model converted with a head to save: delta values and the head train fully."""
    model = _tiny_bert()
    hf.convert(model, density=0.2, kind="delta", modules_to_save=["cls.predictions.transform"])
    return model


def _saved_train(model, rank=None):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = MaskedAdamW(params, [None] * len(params), lr=1e-2, mode="dense")
    model.train()
    for b in list(_global_batch())[:2]:
        ids = b if rank is None else b[rank * 2:(rank + 1) * 2]
        opt.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()


def _fsdp_save_worker(rank: int, out: str):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    model = _saved_model()
    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in model.bert.encoder.layer:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    _saved_train(model, rank)
    diff = hf.extract_diff(model)  # every rank: a collective
    hf.save_pretrained(model, f"{out}.rank{rank}")  # every rank gathers; rank 0 alone writes
    resharded = all(isinstance(p, DTensor) for p in model.parameters())
    # transformers' save as the Trainer runs it under FSDP: a full state dict, the main process alone
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    warned = []
    if rank == 0:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.save_pretrained(f"{out}.transformers", state_dict=full)
        warned = [str(w.message) for w in caught if "FSDP2" in str(w.message)]
        warned.append(sorted(os.listdir(f"{out}.transformers")))
    _gather_to(out, rank, (diff, resharded, warned))
    return model


@pytest.mark.slow  # 2 processes: ~10-20 s
def test_fsdp2_extract_diff_and_save_pretrained_give_the_single_process_diff(tmp_path):
    # Both raised a raw DTensor error ("Cannot flatten unevenly sharded tensor") under fully_shard.
    pytest.importorskip("torch.distributed.fsdp")
    out = str(tmp_path / "saved.pt")
    _spawn(_fsdp_save_worker, out)
    gathered = torch.load(out, weights_only=False)
    single = _saved_model()
    _saved_train(single)
    expected = hf.extract_diff(single)
    saved = xlsparse.SparseDiff.load(os.path.join(out + ".rank0", hf.model.DIFF_NAME))
    assert not os.path.exists(out + ".rank1")  # one process writes
    # model.save_pretrained on the main process alone cannot gather: it warns (it waited for good)
    *warned, files = gathered[0][2]
    assert warned and "every process" in warned[0] and hf.model.DIFF_NAME not in files, gathered[0][2]
    for diff, resharded, _ in gathered:
        assert resharded  # the parameters are sharded again afterwards
        assert set(diff.deltas) == set(expected.deltas) and set(diff.absolute) == set(expected.absolute)
        assert expected.absolute  # the head is in it
        for name, d in expected.deltas.items():
            assert torch.equal(diff.deltas[name].indices, d.indices), name
            torch.testing.assert_close(diff.deltas[name].values, d.values, **CLOSE)
        for name, t in expected.absolute.items():
            torch.testing.assert_close(diff.absolute[name], t, **CLOSE)
    for name, d in gathered[0][0].deltas.items():  # the file holds what rank 0 extracted
        assert torch.equal(saved.deltas[name].values, d.values) and torch.equal(saved.deltas[name].indices, d.indices)
    for name, t in gathered[0][0].absolute.items():
        assert torch.equal(saved.absolute[name], t)


def _dtensor_scores_worker(rank: int, out: str):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = _bias_model()
    fully_shard(model, mesh=init_device_mesh("cpu", (WORLD,)))
    model(torch.full((2, 3), float(rank + 1))).pow(2).sum().backward()
    scores = {"bias": model[0].bias.grad.abs()}  # a DTensor: FSDP2 already averaged the gradient
    before = scores["bias"].full_tensor().clone()
    try:
        xdist.all_reduce_scores(scores)
        refused = ""
    except TypeError as exc:
        refused = str(exc)
    try:  # it raised a bare AssertionError from inside DTensor's dispatch
        xdist.same_on_all_ranks([model[0].weight])
        same_refused = ""
    except TypeError as exc:
        same_refused = str(exc)
    _gather_to(out, rank, (refused, torch.equal(scores["bias"].full_tensor(), before), same_refused))
    return model


@pytest.mark.slow  # 2 processes: ~10-20 s
def test_all_reduce_scores_and_same_on_all_ranks_refuse_dtensors_on_every_rank(tmp_path):
    # It raised torch's "c10d.allreduce_.default does not have a sharding strategy registered".
    pytest.importorskip("torch.distributed.fsdp")
    out = str(tmp_path / "scores.pt")
    _spawn(_dtensor_scores_worker, out)
    for refused, unchanged, same_refused in torch.load(out, weights_only=False):
        assert "DTensor" in refused and "full_tensor()" in refused, refused
        assert unchanged
        assert "same_on_all_ranks: tensor 0 is a DTensor" in same_refused, same_refused


def _meta_masks(named: dict, prefix: str = "") -> dict:
    """Random 30% subnetworks of the dense layers for de and fr, named with `prefix` (DDP's "module.")."""
    g = torch.Generator().manual_seed(3)
    names = sorted(n for n in named if n.endswith("dense.weight"))
    return {lang: {prefix + n: torch.rand(named[n].shape, generator=g) < 0.3 for n in names} for lang in ("de", "fr")}


def _meta_batches(ranks) -> tuple[dict, dict]:
    """(support, query) per language: each rank's 2 examples, concatenated over `ranks`."""
    def batch(seed):
        ids = torch.cat([torch.randint(3, 61, (2, 7), generator=torch.Generator().manual_seed(400 + 10 * r + seed))
                         for r in ranks])
        return {"input_ids": ids, "labels": ids}
    return {"de": batch(0), "fr": batch(1)}, {"de": batch(5), "fr": batch(6)}


def _scored_model():
    """The tiny BERT without conversion, in eval mode (no dropout)."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=61, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=24, max_position_embeddings=16)
    return transformers.BertForMaskedLM(cfg).eval()


_SCORED = "bert.encoder.layer.0.intermediate.dense.weight"


def _scored_example(rank: int) -> dict:
    ids = torch.randint(3, 61, (1, 7), generator=torch.Generator().manual_seed(300 + rank))
    return {"input_ids": ids, "labels": ids}


def _wrapped_scores_worker(rank: int, out: str):
    from torch.distributed.device_mesh import init_device_mesh

    from xlsparse.hf.subnetworks import importance_scores, structured_importance

    def outcome(model, structured=False):
        try:  # every parameter (the DDP wrapper names them module.<name>)
            if structured:
                structured_importance(model, [_scored_example(rank)])
            else:
                importance_scores(model, {"de": [_scored_example(rank)]}, progress=False)
            return ""
        except ValueError as exc:
            return str(exc)

    ddp = torch.nn.parallel.DistributedDataParallel(_scored_model())
    sharded = _shard(_scored_model(), init_device_mesh("cpu", (WORLD,)))
    # the way that works: each process scores its own examples on the unwrapped model, then sums
    own = importance_scores(ddp.module, {"de": [_scored_example(rank)]}, params=[_SCORED], progress=False)
    _gather_to(out, rank, (outcome(ddp), outcome(sharded), xdist.all_reduce_scores(own)["de"][_SCORED],
                           _continual_outcome(ddp, rank), outcome(ddp, True), outcome(sharded, True)))
    return ddp, sharded


def _continual_outcome(ddp, rank: int) -> str:
    """continual_update on a DDP-wrapped model: its error, or whether the replicas still agree."""
    from xlsparse.hf import continual

    ids = _meta_batches([rank])[0]["de"]["input_ids"]
    masks = _meta_masks(dict(ddp.module.named_parameters()), "module.")
    try:
        continual.continual_update(ddp, [{"input_ids": ids, "labels": ids, "language_ids": torch.tensor([0, 1])}],
                                   masks, lr=1e-2, progress=False)
    except ValueError as exc:
        return str(exc)
    return f"the replicas agree: {xdist.same_on_all_ranks(list(ddp.module.parameters()))}"


@pytest.mark.slow  # 2 processes: ~10-20 s
def test_importance_scores_refuse_a_model_whose_backward_averages_the_processes_examples(tmp_path):
    # Each example's backward through DDP or FSDP2 averaged its gradient with the other process's
    # example before |g·θ|: the scores were Σ|mean|, not the sum over both processes' examples
    # (FSDP2's came back as DTensors, which all_reduce_scores sends to topk_mask as they are).
    # continual_update on a DDP wrapper froze the parameters outside the masks after DDP had
    # registered them: their buckets never synced, and each process stepped its own gradients.
    # structured_importance skipped the backward of an example without a labelled token on one
    # process only: the other waited in the backward's collective forever.
    pytest.importorskip("torch.distributed.fsdp")
    from xlsparse.hf.subnetworks import importance_scores

    out = str(tmp_path / "wrapped.pt")
    _spawn(_wrapped_scores_worker, out)
    want = importance_scores(_scored_model(), {"de": [_scored_example(0), _scored_example(1)]}, params=[_SCORED],
                             progress=False)["de"][_SCORED]
    for ddp, sharded, summed, continual, *structured in torch.load(out, weights_only=False):
        for said in (ddp, structured[0]):
            assert "DistributedDataParallel" in said and "model.module" in said, said
        for said in (sharded, structured[1]):
            assert "FSDP2" in said and "all_reduce_scores" in said, said
        torch.testing.assert_close(summed, want)
        assert "DistributedDataParallel" in continual and "continual_trainer" in continual, continual



def _fomaml(model, masks, support, query) -> None:
    from xlsparse.hf import subnetworks

    opt = subnetworks.fomaml_optimizer(model, masks, lr=1e-2)
    subnetworks.fomaml_step(model, support, query, masks, inner_lr=0.5, inner_steps=1, outer_optimizer=opt)


def _fomaml_worker(rank: int, out: str):
    from torch.distributed.device_mesh import init_device_mesh

    model = _scored_model()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    _fomaml(ddp, _meta_masks(dict(model.named_parameters()), "module."), *_meta_batches([rank]))
    trained = {n: p.detach().clone() for n, p in model.named_parameters()}
    # rank 1's fr query has no labelled token (a NaN loss): both processes refuse, neither waits
    support, query = _meta_batches([rank])
    if rank == 1:
        query["fr"] = {**query["fr"], "labels": torch.full_like(query["fr"]["labels"], -100)}
    try:
        _fomaml(ddp, _meta_masks(dict(model.named_parameters()), "module."), support, query)
        not_finite = ""
    except ValueError as exc:
        not_finite = str(exc)
    not_finite += "" if all(torch.equal(p, trained[n]) for n, p in model.named_parameters()) else " (model changed)"
    sharded = _shard(_scored_model(), init_device_mesh("cpu", (WORLD,)))
    try:
        _fomaml(sharded, _meta_masks(dict(sharded.named_parameters())), *_meta_batches([rank]))
        refused = ""
    except ValueError as exc:
        refused = str(exc)
    _gather_to(out, rank, (xdist.same_on_all_ranks(trained), trained, refused, not_finite))
    return ddp, sharded


@pytest.mark.slow  # 2 processes: ~10-20 s
def test_fomaml_step_under_ddp_equals_one_process_over_both_processes_batches(tmp_path):
    # The outer gradient came from torch.autograd.grad, which DDP's hooks never see: each process
    # stepped with its own query gradient, and the replicas drifted apart. On an FSDP2-sharded
    # model it failed with a size mismatch or "build it with fomaml_optimizer", naming nothing.
    pytest.importorskip("torch.distributed.fsdp")
    out = str(tmp_path / "fomaml.pt")
    _spawn(_fomaml_worker, out)
    (same, trained, refused, not_finite), (_, _, refused_1, not_finite_1) = torch.load(out, weights_only=True)
    assert same, "the processes' models differ after fomaml_step"
    for said in (refused, refused_1):
        assert "fomaml_step" in said and "FSDP2" in said, said
    assert not_finite.startswith("fomaml_step: the loss on another process was not finite"), not_finite
    assert not_finite_1.startswith("fomaml_step: the loss of ['fr'] was not finite"), not_finite_1
    assert "(model changed)" not in not_finite + not_finite_1
    model = _scored_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _fomaml(model, _meta_masks(dict(model.named_parameters())), *_meta_batches([0, 1]))
    for name, p in model.named_parameters():
        torch.testing.assert_close(trained[name], p.detach(), **CLOSE, msg=lambda m, name=name: f"{name}: {m}")
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())



def _reversed(batches: dict) -> dict:
    return dict(reversed(list(batches.items())))


def _ddp_meta(rank: int):
    """The scored model, its DDP wrapper, masks named as the wrapper names them, and this rank's batches."""
    model = _scored_model()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    return model, ddp, _meta_masks(dict(model.named_parameters()), "module."), *_meta_batches([rank])


def _meta_order_worker(rank: int, out: str):
    from xlsparse.hf import subnetworks

    results = []
    for step in ("fomaml", "reptile"):
        model, ddp, masks, support, query = _ddp_meta(rank)
        if rank == 1:  # the same languages, listed in the other order
            support, query, masks = _reversed(support), _reversed(query), _reversed(masks)
        if step == "fomaml":
            _fomaml(ddp, masks, support, query)
        else:
            subnetworks.reptile_step(ddp, {lang: [b] for lang, b in support.items()}, masks, inner_lr=0.5)
        results.append({n: p.detach().clone() for n, p in model.named_parameters()})
    refused = []
    for change in ("languages", "masks"):
        model, ddp, masks, support, query = _ddp_meta(rank)
        if rank == 1 and change == "languages":  # fr on process 0 only
            support, query, masks = ({"de": d["de"]} for d in (support, query, masks))
        if rank == 1 and change == "masks":  # drawn per process
            masks = {lang: {n: ~m for n, m in named.items()} for lang, named in masks.items()}
        try:
            _fomaml(ddp, masks, support, query)
            refused.append("")
        except ValueError as exc:
            refused.append(str(exc))
        refused[-1] += "" if all(torch.equal(p, q) for p, q in zip(model.parameters(), _scored_model().parameters())) \
            else " (model changed)"
    _gather_to(out, rank, (results, refused))


@pytest.mark.slow  # 2 processes: ~10-20 s
def test_meta_steps_under_ddp_take_the_languages_in_one_order_and_refuse_other_languages_or_masks(tmp_path):
    # Each process stepped its languages in its dicts' order, and DDP averaged the gradient of one
    # process's de with the other's fr: the replicas drifted apart (off by 2e-2 from one process).
    # A language on one process only, or masks drawn per process, were not checked either.
    from xlsparse.hf import subnetworks

    out = str(tmp_path / "meta_order.pt")
    _spawn(_meta_order_worker, out)
    ranks = torch.load(out, weights_only=True)
    fomaml_model, reptile_model = _scored_model(), _scored_model()
    _fomaml(fomaml_model, _meta_masks(dict(fomaml_model.named_parameters())), *_meta_batches([0, 1]))
    support = _meta_batches([0, 1])[0]
    subnetworks.reptile_step(reptile_model, {lang: [b] for lang, b in support.items()},
                             _meta_masks(dict(reptile_model.named_parameters())), inner_lr=0.5)
    for results, refused in ranks:
        for trained, model in zip(results, (fomaml_model, reptile_model)):
            for name, p in model.named_parameters():
                torch.testing.assert_close(trained[name], p.detach(), **CLOSE, msg=lambda m, name=name: f"{name}: {m}")
        for said in refused:
            assert said.startswith("fomaml_step: the processes of the DistributedDataParallel model were given other "
                                   "languages or other masks"), said


# --- FSDP2: what writes whole tensors into the model refuses, before anything changes ---

def _shard(model, mesh, part: bool = False):
    """fully_shard every encoder layer and the root, or (`part`) the last encoder layer alone."""
    from torch.distributed.fsdp import fully_shard

    if part:
        fully_shard(model.bert.encoder.layer[-1], mesh=mesh)
        return model
    for layer in model.bert.encoder.layer:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _full(model) -> dict:
    return {n: ((p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone(), p.requires_grad)
            for n, p in model.named_parameters()}


def _fsdp_refusals_worker(rank: int, out: str):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (WORLD,))
    single = _saved_model()
    _saved_train(single)
    diff = hf.extract_diff(single)
    if rank == 0:
        hf.save_pretrained(single, f"{out}.saved")
    dist.barrier()

    def disabled(m):
        with hf.disable(m):
            pass

    calls = {"merge": hf.merge, "unmerge": hf.unmerge, "merge_and_unload": hf.merge_and_unload,
             "apply": lambda m: xlsparse.apply([diff], m), "SparseDiff.apply": diff.apply, "disable": disabled,
             "from_pretrained": lambda m: hf.from_pretrained(m, f"{out}.saved"),
             "convert": lambda m: hf.convert(m, density=0.2, kind="delta"),
             # reads, but a shard is not the tensor: it raised a raw DTensor error either way round
             "from_models(tuned)": lambda m: xlsparse.SparseDiff.from_models(_saved_model(), m, k=10),
             "from_models(base)": lambda m: xlsparse.SparseDiff.from_models(m, _saved_model(), k=10)}
    outcomes, config = {}, single.config
    for (name, call), part in [(c, part) for c in calls.items() for part in (False, True)]:
        torch.manual_seed(0)  # from_pretrained: the base the diff was trained from
        fresh = transformers.BertForMaskedLM(config) if name in ("from_pretrained", "convert") else _saved_model()
        model = _shard(fresh, mesh, part)
        before, types = _full(model), [type(m) for m in model.modules()]
        try:
            call(model)
            refused = ""
        except ValueError as exc:
            refused = str(exc)
        after = _full(model)
        same = types == [type(m) for m in model.modules()] and all(
            torch.equal(before[n][0], after[n][0]) and before[n][1] == after[n][1] for n in before)
        merged = [n for n, m in model.named_modules() if getattr(m, "merged", False)]
        converted = hasattr(model, "xlsparse_config") == (name not in ("from_pretrained", "convert"))
        outcomes[name, part] = (refused, same and not merged, converted)
    # an apply made before fully_shard: its revert would write into tensors the model no longer holds
    model = _saved_model()
    handle = xlsparse.apply(diff, model)
    _shard(model, mesh)
    try:
        handle.revert()
        refused = ""
    except ValueError as exc:
        refused = str(exc)
    outcomes["revert", False] = (refused, not handle.reverted, True)
    _gather_to(out, rank, outcomes)  # a collective after the refusals: every rank is still in step
    return model


@pytest.mark.slow  # 2 processes: ~10-20 s
def test_fsdp2_merge_apply_disable_and_from_pretrained_refuse_on_every_rank_before_changing_anything(tmp_path):
    # They raised torch's raw "Attempted to access the data pointer on an invalid python storage"
    # (or "got mixed torch.Tensor and DTensor"); merge on a model sharded in part (the last encoder
    # layer) merged the first layer's 6 linears, then raised. convert raised the raw error too.
    pytest.importorskip("torch.distributed.fsdp")
    out = str(tmp_path / "refusals.pt")
    _spawn(_fsdp_refusals_worker, out)
    for outcomes in torch.load(out, weights_only=False):
        assert len(outcomes) == 21
        for name, (refused, unchanged, converted) in outcomes.items():
            assert "FSDP2" in refused and "nothing was changed" in refused, (name, refused)
            assert unchanged and converted, name


def _sharded_lt_sft_worker(rank: int, out: str):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from xlsparse.hf.lt_sft import LotteryTicketSparseFineTuner, SftArguments

    model = _tiny_model()
    model = transformers.BertForMaskedLM(model.config)  # unconverted: LT-SFT's base
    fully_shard(model, mesh=init_device_mesh("cpu", (WORLD,)))
    args = transformers.TrainingArguments(output_dir=os.path.dirname(out), per_device_train_batch_size=2,
                                          save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True)
    data = [{"input_ids": ids, "labels": ids} for ids in _global_batch()[0]]
    before = {n: p.full_tensor().clone() for n, p in model.named_parameters()}
    try:
        LotteryTicketSparseFineTuner(model=model, args=args, train_dataset=data, sft_args=SftArguments(
            ft_params_num=50, full_ft_max_steps_per_iteration=1, sparse_ft_max_steps_per_iteration=1)).train()
        said = "trained"
    except ValueError as exc:
        said = str(exc)
    unchanged = all(torch.equal(p.full_tensor(), before[n]) for n, p in model.named_parameters())
    if rank == 0:
        torch.save({"said": said, "unchanged": unchanged}, out)
    return model


@pytest.mark.slow  # 2 processes: ~10-20 s
def test_lt_sft_refuses_a_sharded_model_naming_fsdp2(tmp_path):
    # θ0 and its selection read whole tensors: a model sharded with fully_shard failed at
    # construction with a raw "invalid python storage" error
    pytest.importorskip("torch.distributed.fsdp")
    out = str(tmp_path / "said.pt")
    _spawn(_sharded_lt_sft_worker, out)
    got = torch.load(out, weights_only=True)
    assert "sharded with FSDP2" in got["said"] and "LotteryTicketSparseFineTuner" in got["said"], got["said"]
    assert got["unchanged"]


# --- an xlsparse Trainer run by the HF Trainer under DDP, as torchrun starts it ---

class _ZeroWhenUnlabelledBert(transformers.BertForMaskedLM):
    """A masked LM whose loss is the mean over the labelled positions, 0 with none, and which
    ignores num_items_in_batch (as BERT's own, which is NaN with none)."""

    def forward(self, input_ids=None, labels=None, num_items_in_batch=None, **kwargs):
        out = super().forward(input_ids=input_ids, **kwargs)
        if labels is not None:
            nll = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), labels.flatten(), reduction="sum")
            out["loss"] = nll / (labels != -100).sum().clamp(min=1)
        return out


def _lt_sft_run(out: str, per_device: int, accumulation: int, unlabelled: tuple, l1: float):
    """LT-SFT (both phases) of a tiny BERT on 16 sequences taken in order, examples `unlabelled`
    without labels; the first 2 are a DDP run's process 0's first micro-batch."""
    from xlsparse.hf.lt_sft import LotteryTicketSparseFineTuner, SftArguments

    model = _tiny_bert(_ZeroWhenUnlabelledBert)
    ids = torch.randint(3, 61, (16, 8), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[list(unlabelled)] = -100
    args = transformers.TrainingArguments(
        output_dir=out, per_device_train_batch_size=per_device, gradient_accumulation_steps=accumulation,
        learning_rate=1e-2, lr_scheduler_type="constant", max_grad_norm=0.0, save_strategy="no", report_to=[],
        use_cpu=True, disable_tqdm=True, train_sampling_strategy="sequential", dataloader_drop_last=True)
    trainer = LotteryTicketSparseFineTuner(
        model=model, args=args, train_dataset=[{"input_ids": i, "labels": y} for i, y in zip(ids, labels)],
        sft_args=SftArguments(ft_params_num=300, full_ft_max_steps_per_iteration=2, sparse_ft_max_steps_per_iteration=2,
                              full_l1_reg=l1, sparse_l1_reg=l1))
    trainer.train()
    return trainer


def _subnetwork_and_expert_run(out: str, per_device: int, accumulation: int) -> tuple:
    """A SubnetworkTrainer (two languages, random structured masks) and an ExpertTrainer, each 2
    steps on 16 sequences taken in order: (their trainers, their trained values)."""
    from xlsparse.hf import subnetworks
    from xlsparse.hf.xelm import ExpertTrainer

    ids = torch.randint(3, 61, (16, 8), generator=torch.Generator().manual_seed(3))
    args = dict(per_device_train_batch_size=per_device, gradient_accumulation_steps=accumulation, max_steps=2,
                learning_rate=1e-2, lr_scheduler_type="constant", weight_decay=0.1, max_grad_norm=1.0,
                save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
                train_sampling_strategy="sequential", dataloader_drop_last=True)
    model = _tiny_bert()
    g = torch.Generator().manual_seed(4)
    heads, neurons = torch.rand(2, 2, generator=g), torch.rand(2, 24, generator=g)
    masks = {lang: subnetworks.structured_masks(model, heads + i, neurons.flip(i), 0.5, 0.25) for i, lang in enumerate("ab")}
    hf.convert(model, list({n[: -len(".weight")] for n in masks["a"]}), kind="subnetwork", masks=masks)
    mixed = [{"input_ids": x, "labels": x, "language_ids": torch.tensor(i % 2)} for i, x in enumerate(ids)]
    sub = subnetworks.SubnetworkTrainer(model=model, train_dataset=mixed,
                                        args=transformers.TrainingArguments(output_dir=out + "-sub", **args))
    sub.train()
    # the expert's support is drawn under the Trainer's seed: the same on every process
    expert = ExpertTrainer(_tiny_bert(), density=0.05, train_dataset=[{"input_ids": x, "labels": x} for x in ids],
                           args=transformers.TrainingArguments(output_dir=out + "-expert", **args))
    expert.train()
    return (sub, expert), ({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
                           {n: (d.indices, d.values) for n, d in expert.expert().deltas.items()})


# (per-process micro-batch, accumulation, unlabelled examples, L1) of each DDP run; accelerate deals
# the sequential batches of 2 out in turn, so process r's micro-batches are the 2nd, 4th, ... from r
_HF_DDP_RUNS = {"l1, accumulated": (2, 2, (), 5.0), "process 0 starts unlabelled": (2, 1, (0, 1), 0.0)}


def _hf_ddp_worker(rank: int, out: str):
    # what torchrun sets: accelerate then takes the process group as MULTI_CPU and the Trainer wraps in DDP
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT="0")
    got = {}
    for name, run in _HF_DDP_RUNS.items():
        trainer = _lt_sft_run(f"{out}.{rank}", *run)
        assert trainer.args.world_size == WORLD
        assert isinstance(trainer.model_wrapped, torch.nn.parallel.DistributedDataParallel)
        got[name] = {n: (d.indices, d.values) for n, d in trainer.sft.deltas.items()}
    trainers, got["subnetwork, expert"] = _subnetwork_and_expert_run(f"{out}.{rank}", 2, 2)
    for trainer in trainers:
        assert isinstance(trainer.model_wrapped, torch.nn.parallel.DistributedDataParallel)
    _gather_to(out, rank, got)


@pytest.mark.slow
def test_xlsparse_trainers_under_the_hf_trainer_s_ddp_equal_one_process(tmp_path):
    # LT-SFT (both phases, selection included), SubnetworkTrainer and ExpertTrainer, over the same
    # global batches. A process whose first
    # micro-batch had nothing labelled settled `settle_loss_kwargs` a step after the others and
    # then joined transformers' count of the batch's items alone: the run hung
    out = str(tmp_path / "sfts.pt")
    _spawn(_hf_ddp_worker, out)
    ranks = torch.load(out, weights_only=True)
    for name, (per_device, accumulation, unlabelled, l1) in _HF_DDP_RUNS.items():
        # one process over the same micro-batches: the first run's global batch as one, the second's
        # as 2 accumulated (a mean loss weighs each process's micro-batch alike, not each position)
        single = (_lt_sft_run(str(tmp_path / name), WORLD * per_device, accumulation, unlabelled, l1) if l1
                  else _lt_sft_run(str(tmp_path / name), per_device, WORLD * accumulation, unlabelled, l1)).sft
        assert set(single.deltas) == set(ranks[0][name]), name
        for n, d in single.deltas.items():
            for rank in range(WORLD):
                idx, values = ranks[rank][name][n]
                assert torch.equal(idx, d.indices), (name, n, rank)
                torch.testing.assert_close(values, d.values, **CLOSE, msg=lambda m, n=n: f"{name} {n}: {m}")
    _, (trained, expert) = _subnetwork_and_expert_run(str(tmp_path / "one"), 2 * WORLD, 2)
    for rank in range(WORLD):
        got_trained, got_expert = ranks[rank]["subnetwork, expert"]
        assert set(got_trained) == set(trained) and set(got_expert) == set(expert)
        for n, p in trained.items():
            torch.testing.assert_close(got_trained[n], p, **CLOSE, msg=lambda m, n=n: f"subnetwork {n}: {m}")
        for n, (idx, values) in expert.items():
            assert torch.equal(got_expert[n][0], idx), n
            torch.testing.assert_close(got_expert[n][1], values, **CLOSE, msg=lambda m, n=n: f"expert {n}: {m}")
