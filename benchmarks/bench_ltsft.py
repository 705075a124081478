"""LT-SFT phase 2: one training step (forward, backward, optimizer) of an XLM-R MLM at 1% and 5%
density, three ways (`xlsparse bench --family ltsft`, or `python -m benchmarks.bench_ltsft` in a source tree):

- delta: `LotteryTicketSparseFineTuner`'s sparse phase: linear layers as `SparseDeltaLinear`
  (SDDMM backward), embeddings as `SparseDeltaEmbedding`, the rest through compact `MaskedAdamW`;
- dense-masked (baseline): dense gradients, `grad.mul_(mask)`, torch's AdamW (fused where it
  exists), as composable-sft does;
- compact-only (baseline): dense gradients, compact `MaskedAdamW` (xlsparse before phase 2
  used SparseDeltaLinear).

The delta way computes its loss as the trainer does with `fused_cross_entropy=True` (the
cross-entropy of the model's logits by xlsparse's fused log-softmax + NLL); the baselines take the
model's own loss (torch's log_softmax + nll_loss), as composable-sft's trainer does. One row at 1%
times the delta way with the model's own loss too, which shows what the fused loss adds. Each
step's labels are every position (every way then runs the same whole-sequence logits). One more row,
at 1%, labels 15% of the positions as a masked-LM data collator does: the delta way then runs as
`labelled_positions_only=True` does (the output layer and its log-softmax on the labelled positions
only), the dense-masked way as composable-sft's trainer does (the model's whole-sequence logits);
both give the same loss and gradients.

Shapes: XLM-R base (vocab 250002, hidden 768, 12 layers, FFN 3072; 278M parameters), T = 2048
tokens per step (8 × 256); --quick uses vocab 8000, hidden 256, 2 layers, T = 512. All three ways
select from the same maskable parameters (the base model's, the tied word embedding included) with
the same random masks. The note column gives the gradient plus optimizer-state bytes each way holds
after a step, against 3 × K × 4 bytes, and the entries the first step changed each way, which the
row's check requires to be the same entries, changed by the same amounts. Not measured here:
`DynamicSftArguments`' gradient-accumulation window, where each converted layer adds its dense
weight gradient (dYᵀX, one GEMM with β = 1) into a dense buffer once per step (every unselected
entry is a candidate, so the sum is dense by definition), so window steps cost about what a
dense-masked step does.
"""
import argparse
import contextlib
import gc
import tempfile
from typing import Callable, NamedTuple

import torch

from xlsparse.optim import MaskedAdamW

from .harness import Case, Target, assert_same

FAMILY = "ltsft"
DENSITIES = (0.01, 0.05)
# the share of positions a masked-LM data collator labels (transformers' default mlm_probability)
MLM_LABELLED = 0.15


def _config(quick: bool):
    import transformers

    if quick:
        return transformers.XLMRobertaConfig(vocab_size=8000, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                                             intermediate_size=1024, max_position_embeddings=260, pad_token_id=1,
                                             hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), (4, 128)
    return transformers.XLMRobertaConfig(vocab_size=250002, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                         intermediate_size=3072, max_position_embeddings=514, pad_token_id=1,
                                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), (8, 256)


def _model(cfg, device):
    import transformers

    torch.manual_seed(0)
    return transformers.XLMRobertaForMaskedLM(cfg).to(device).train()


def _batch(cfg, shape, device, labelled=1.0):
    """Every position labelled, or (labelled < 1) a random share of them, the rest -100 as a
    masked-LM data collator leaves them."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, cfg.vocab_size, shape, generator=g)
    labels = ids if labelled == 1.0 else torch.where(torch.rand(shape, generator=g) < labelled, ids, -100)
    return {"input_ids": ids.to(device), "labels": labels.to(device)}


def _step_flops(cfg, shape, k_linear: int, k_words: int, head_tokens: int) -> int:
    """The flops the delta way must compute in one step: the forward and dX GEMMs of every linear
    layer (the V-word output layer on the `head_tokens` positions it runs on), the attention
    products forward (QKᵀ, PV) and backward (twice as many), and 2·T·K for the SDDMMs of the
    converted matrices' K entries (`k_linear` in the body, `k_words` in the word embeddings, whose
    SDDMM is the tied output layer's, over `head_tokens`). The dense-masked way adds a dense dW GEMM
    per matrix; embeddings, norms and softmaxes are left out (memory-bound, under 1% of the flops at
    XLM-R-base size)."""
    batch, seq = shape
    tokens, h, f = batch * seq, cfg.hidden_size, cfg.intermediate_size
    linear = cfg.num_hidden_layers * (4 * h * h + 2 * h * f) + h * h
    attention = cfg.num_hidden_layers * 2 * (2 * batch * seq * seq * h)
    return (2 * (2 * tokens * linear + 2 * head_tokens * cfg.vocab_size * h) + 3 * attention
            + 2 * tokens * k_linear + 2 * head_tokens * k_words)


def _random_masks(named: dict, density: float) -> dict:
    """Sorted random flat indices at `density` for every body parameter (the maskable ones)."""
    g = torch.Generator().manual_seed(2)
    out = {}
    for name, p in named.items():
        k = max(1, round(density * p.numel()))
        out[name] = torch.randperm(p.numel(), generator=g)[:k].sort().values.to(device=p.device, dtype=torch.int32)
    return out


def _body(model) -> dict:
    """The maskable parameters, each once by identity: the base model's (the trainer's default).
    transformers 5 lists the tied word embedding only as the head's `lm_head.decoder.weight`, so a
    filter on `model.named_parameters()` names would leave the largest matrix out."""
    return {f"roberta.{n}": p for n, p in model.roberta.named_parameters()}


def _named(model) -> dict:
    """Every parameter once, under the names the trainer gives them: the body's, then the head's."""
    body = _body(model)
    seen = {id(p) for p in body.values()}
    return body | {n: p for n, p in model.named_parameters() if id(p) not in seen}


class _Way(NamedTuple):
    step: Callable[[], None]  # one optimizer step on the row's batch
    state_bytes: Callable[[], int]  # the bytes of gradients and optimizer state it holds
    weights: Callable[[], dict]  # {name: a flat copy of the weights the model computes with}
    masks: dict  # {name: the sorted flat indices it may change}
    model: torch.nn.Module  # the model it trains


def _state_bytes(optimizer, params) -> int:
    total = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    for st in optimizer.state.values():
        total += sum(t.numel() * t.element_size() for k, t in st.items()
                     if isinstance(t, torch.Tensor) and k not in ("step", "indices", "mask"))
    return total


def _weights(model) -> dict:
    return {n: p.detach().reshape(-1).clone() for n, p in _named(model).items()}


def _dense_masked(cfg, shape, density, device, labelled=1.0):
    model = _model(cfg, device)
    body = _body(model)
    indices = _random_masks(body, density)
    masks = [(p, torch.zeros(p.numel(), dtype=torch.bool, device=device).index_fill_(0, idx.long(), True).view_as(p))
             for p, idx in zip(body.values(), indices.values())]
    try:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=True)
    except (RuntimeError, TypeError):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, foreach=True)
    batch = _batch(cfg, shape, device, labelled)

    def step():
        optimizer.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        for p, m in masks:
            p.grad.mul_(m)
        optimizer.step()

    return _Way(step, lambda: _state_bytes(optimizer, model.parameters()), lambda: _weights(model), indices, model)


def _compact_only(cfg, shape, density, device, labelled=1.0):
    model = _model(cfg, device)
    body = _body(model)
    indices = _random_masks(body, density)
    optimizer = MaskedAdamW(model.parameters(), dict(zip(body.values(), indices.values())), lr=1e-4, weight_decay=0.0,
                            mode="compact")
    step, state_bytes = _training_step(model, optimizer, _batch(cfg, shape, device, labelled))
    return _Way(step, state_bytes, lambda: _weights(model), indices, model)


def _delta(cfg, shape, density, device, labelled=1.0, fused=True):
    """The trainer's sparse phase, its loss as the trainer computes it (`fused`: with
    `fused_cross_entropy=True`); with `labelled` < 1, as `labelled_positions_only=True` runs it."""
    from transformers import TrainingArguments

    from xlsparse.hf.lt_sft import LotteryTicketSparseFineTuner, SftArguments, _labelled_positions

    model = _model(cfg, device)
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), report_to=[], use_cpu=device == "cpu",
                             learning_rate=1e-4, weight_decay=0.0, save_strategy="no", disable_tqdm=True)
    trainer = LotteryTicketSparseFineTuner(model=model, args=args, fused_cross_entropy=fused, sft_args=SftArguments(
        full_ft_max_steps_per_iteration=1, sparse_ft_max_steps_per_iteration=1, ft_params_proportion=density))
    trainer._masks = _random_masks(_body(model), density)
    trainer._phase = "sparse"
    trainer._convert()  # the sparse phase's own conversion

    def weights():
        """θ0 plus the SFT the trainer holds (the converted layers' deltas, the heads whole)."""
        sft = trainer.current_sft()
        theta = {n: t.reshape(-1).clone() for n, t in trainer._theta0.items()}
        for n, d in sft.deltas.items():
            theta[n][d.indices.long()] += d.values
        theta |= {n: t.reshape(-1).clone() for n, t in sft.absolute.items()}
        return theta

    batch = _batch(cfg, shape, device, labelled)
    step, state_bytes = _training_step(model, trainer.create_optimizer(), batch,
                                       lambda: _labelled_positions(model, batch) if labelled < 1.0 else None,
                                       loss=lambda run: trainer.compute_loss(model, run))
    return _Way(step, state_bytes, weights, trainer._masks, model)


def _training_step(model, optimizer, batch, inputs=lambda: None, loss=None):
    """(one optimizer step on `batch`, the bytes of gradients and optimizer state it holds).
    `inputs()`: None, or a context manager that gives the inputs to run instead; `loss(inputs)`:
    the loss (default: the model's own)."""

    def step():
        optimizer.zero_grad(set_to_none=True)
        with inputs() or contextlib.nullcontext(batch) as run:
            (loss(run) if loss else model(**run).loss).backward()
        optimizer.step()

    return step, lambda: _state_bytes(optimizer, model.parameters())


def _one_step(way: _Way) -> dict:
    """Take `way`'s first step: {name: (the flat positions it changed, their change)}."""
    before = way.weights()
    way.step()
    changed = {}
    for n, after in way.weights().items():
        pos = (after != before[n]).nonzero().squeeze(1)
        changed[n] = (pos, after[pos] - before[n][pos])
    return changed


def _entries(changed: dict) -> int:
    return sum(pos.numel() for pos, _ in changed.values())


def _same_step(ours: dict, theirs: dict) -> None:
    """Raise unless the first steps changed the same entries by about the same amounts. A first AdamW step
    moves an entry by lr·g/(|g| + eps); the ways sum g in different orders, which shows most where |g| nears
    eps (up to 1e-3 of lr at --quick size, 1.6e-2 at XLM-R-base size), so the tolerance is 10% of the largest
    change, lr; a wrong step differs by up to 2·lr."""
    if ours.keys() != theirs.keys():
        raise ValueError(f"check lt-sft step: the ways train different parameters "
                         f"({sorted(ours.keys() ^ theirs.keys())})")
    for n, (pos, _) in ours.items():
        if not torch.equal(pos, theirs[n][0]):
            raise ValueError(f"check lt-sft step: one step changed {pos.numel()} entries of {n} the xlsparse way, "
                             f"{theirs[n][0].numel()} the baseline's (in all {_entries(ours)} against "
                             f"{_entries(theirs)})")
    assert_same("lt-sft step", torch.cat([d for _, d in ours.values()]), torch.cat([theirs[n][1] for n in ours]),
                rtol=0.1)


def cases(quick: bool = False, device: str = "cpu"):
    """The rows, built one at a time: at XLM-R-base size each way holds a 278M-parameter model with
    its gradients and optimizer state (about 5 GB), so only the current pair is kept alive. Each row
    builds both ways from the same initial model and takes one step with each before it is timed, so
    that grads and optimizer state exist; its check compares what those first steps changed."""
    cfg, shape = _config(quick)
    tokens = shape[0] * shape[1]
    live = {}  # the ways of the row being measured; the rows' closures reach them only through it
    masked = "dense grads + grad*mask + AdamW"
    rows = [(density, name, build, 1.0, True) for density in DENSITIES
            for name, build in ((masked, _dense_masked), ("dense grads + compact MaskedAdamW", _compact_only))]
    rows.append((DENSITIES[0], masked, _dense_masked, 1.0, False))  # what the fused loss adds, at 1%
    rows.append((DENSITIES[0], f"{masked}, whole-sequence logits, {MLM_LABELLED:.0%} labelled", _dense_masked,
                 MLM_LABELLED, True))
    for density, name, build, labelled, fused in rows:
        live.clear()  # the previous row's models go before the next are built; the trainer holds
        gc.collect()  # reference cycles, so its model (1 GB plus θ0) lived on until a collection ran
        live["delta"] = _delta(cfg, shape, density, device, labelled, fused)
        live["base"] = build(cfg, shape, density, device, labelled)
        ours, theirs = _one_step(live["delta"]), _one_step(live["base"])
        masks, body = live["delta"].masks, _body(live["base"].model)  # the baseline's model is not converted
        k = sum(idx.numel() for idx in masks.values())
        # SDDMM entries: the body's linear weights, and the word embeddings, which the tied decoder reads
        k_linear = sum(masks[n].numel() for n, p in body.items() if p.dim() == 2 and "embeddings" not in n)
        k_words = sum(masks[n].numel() for n in body if "word_embeddings" in n)
        labels = _batch(cfg, shape, "cpu", labelled)["labels"]
        head_tokens = int((labels != -100).sum()) if labelled < 1.0 else tokens
        note = (f"grad+state MiB: xlsparse {live['delta'].state_bytes() / 2**20:.1f}, baseline "
                f"{live['base'].state_bytes() / 2**20:.1f}, 3*K*4 = {3 * k * 4 / 2**20:.1f}; entries one step "
                f"changed: xlsparse {_entries(ours)}, baseline {_entries(theirs)}; 1 warm-up + 3 timed pairs")
        targets = ()
        if name == masked and fused:  # issue 12's target: the same logits both ways
            targets = (Target(f"lt-sft phase-2 step, {100 * density:g}%: >= 1.3x the dense-masked way", "speedup", 1.3),)
        yield Case(op="lt-sft phase-2 step", shape=f"V={cfg.vocab_size} H={cfg.hidden_size} "
                   f"L={cfg.num_hidden_layers} T={tokens}", dtype="float32", fn=lambda: live["delta"].step(),
                   baseline=lambda: live["base"].step(), baseline_name=name, density=density,
                   backend="delta layers" + (", fused cross-entropy" if fused else ", the model's own loss")
                   + (", labelled_positions_only" if labelled < 1.0 else ""),
                   flops=_step_flops(cfg, shape, k_linear, k_words, head_tokens), note=note, targets=targets,
                   check=lambda ours=ours, theirs=theirs: _same_step(ours, theirs),
                   pairs=3)  # a step takes about 30 s at full size
    live.clear()
    gc.collect()


def main() -> None:
    """Run this family alone (as `xlsparse bench --family ltsft` does), with its own tree's harness."""
    from . import harness

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args()
    machine = harness.describe_machine(args.device)
    monitor = harness.LoadMonitor()
    before = harness.measure_ceilings(machine, quick=args.quick)
    rows = [harness.measure(case, args.device, quick=args.quick) for case in cases(quick=args.quick, device=args.device)]
    after = harness.measure_ceilings(machine, quick=args.quick)
    load = monitor.finish()
    for row in rows:
        harness.judge(row, harness.best_ceilings(before, after))
    lines = harness.header_lines(machine, before, after, load, args.quick)
    lines += [""] + harness.format_table(rows) + [""] + [f"- {r.baseline}, {100 * r.density:g}%: {r.note}" for r in rows]
    lines += [""] + harness.format_targets(rows, args.quick)
    with contextlib.suppress(BrokenPipeError):
        print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
