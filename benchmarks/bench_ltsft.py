"""LT-SFT phase 2: one training step (forward, backward, optimizer) of an XLM-R MLM at 1% and 5%
density, three ways (`xlsparse bench --family ltsft`, or `python benchmarks/bench_ltsft.py`):

- delta: `LotteryTicketSparseFineTuner`'s sparse phase: linear layers as `SparseDeltaLinear`
  (SDDMM backward), embeddings as `SparseDeltaEmbedding`, the rest through compact `MaskedAdamW`;
- dense-masked (baseline): dense gradients, `grad.mul_(mask)`, torch's AdamW (fused where it
  exists), as composable-sft does;
- compact-only (baseline): dense gradients, compact `MaskedAdamW` (xlsparse before phase 2
  used SparseDeltaLinear).

Shapes: XLM-R base (vocab 250002, hidden 768, 12 layers, FFN 3072; 278M parameters), T = 2048
tokens per step (8 × 256); --quick uses vocab 8000, hidden 256, 2 layers, T = 512. The note
column gives the gradient plus optimizer-state bytes each way holds after a step, against
3 × K × 4 bytes. Not measured here: `DynamicSftArguments`' gradient-accumulation window, where
each converted layer adds its dense weight gradient (dYᵀX, one GEMM with β = 1) into a dense
buffer once per step (every unselected entry is a candidate, so the sum is dense by definition),
so window steps cost about what a dense-masked step does.
"""
import argparse
import contextlib
import tempfile

import torch

from xlsparse.benchmarks.harness import Case, Target
from xlsparse.optim import MaskedAdamW

FAMILY = "ltsft"
DENSITIES = (0.01, 0.05)


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


def _batch(cfg, shape, device):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, cfg.vocab_size, shape, generator=g).to(device)
    return {"input_ids": ids, "labels": ids}


def _step_flops(cfg, shape, k_linear: int) -> int:
    """The flops the delta way must compute in one step: the forward and dX GEMMs of every linear
    layer (the V-word output layer included), the attention products forward (QKᵀ, PV) and
    backward (twice as many), and 2·T·K for the SDDMMs of the converted matrices' K entries. The
    dense-masked way adds a dense dW GEMM per matrix; embeddings, norms and softmaxes are left
    out (memory-bound, under 1% of the flops at XLM-R-base size)."""
    batch, seq = shape
    tokens, h, f = batch * seq, cfg.hidden_size, cfg.intermediate_size
    linear = cfg.num_hidden_layers * (4 * h * h + 2 * h * f) + h * h + cfg.vocab_size * h
    attention = cfg.num_hidden_layers * 2 * (2 * batch * seq * seq * h)
    return 2 * (2 * tokens * linear) + 3 * attention + 2 * tokens * k_linear


def _random_masks(named: dict, density: float) -> dict:
    """Sorted random flat indices at `density` for every body parameter (the maskable ones)."""
    g = torch.Generator().manual_seed(2)
    out = {}
    for name, p in named.items():
        k = max(1, round(density * p.numel()))
        out[name] = torch.randperm(p.numel(), generator=g)[:k].sort().values.to(device=p.device, dtype=torch.int32)
    return out


def _body(model) -> dict:
    return {n: p for n, p in model.named_parameters() if n.startswith("roberta.")}


def _state_bytes(optimizer, params) -> int:
    total = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    for st in optimizer.state.values():
        total += sum(t.numel() * t.element_size() for k, t in st.items()
                     if isinstance(t, torch.Tensor) and k not in ("step", "indices", "mask"))
    return total


def _dense_masked(cfg, shape, density, device):
    model = _model(cfg, device)
    masks = {n: torch.zeros(p.numel(), dtype=torch.bool, device=device).index_fill_(0, idx.long(), True).view_as(p)
             for (n, p), idx in zip(_body(model).items(), _random_masks(_body(model), density).values())}
    named = dict(model.named_parameters())
    try:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=True)
    except (RuntimeError, TypeError):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, foreach=True)
    batch = _batch(cfg, shape, device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        for n, m in masks.items():
            named[n].grad.mul_(m)
        optimizer.step()

    return step, lambda: _state_bytes(optimizer, model.parameters())


def _compact_only(cfg, shape, density, device):
    model = _model(cfg, device)
    body = _body(model)
    masks = dict(zip(body.values(), _random_masks(body, density).values()))
    optimizer = MaskedAdamW(model.parameters(), masks, lr=1e-4, weight_decay=0.0, mode="compact")
    return _training_step(model, optimizer, _batch(cfg, shape, device))


def _delta(cfg, shape, density, device):
    from transformers import TrainingArguments

    from xlsparse.hf.lt_sft import LotteryTicketSparseFineTuner, SftArguments

    model = _model(cfg, device)
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), report_to=[], use_cpu=device == "cpu",
                             learning_rate=1e-4, weight_decay=0.0, save_strategy="no", disable_tqdm=True)
    trainer = LotteryTicketSparseFineTuner(model=model, args=args, sft_args=SftArguments(
        full_ft_max_steps_per_iteration=1, sparse_ft_max_steps_per_iteration=1, ft_params_proportion=density))
    params = trainer._params()
    trainer._masks = _random_masks({n: params[n] for n in trainer.maskable}, density)
    trainer._phase = "sparse"
    trainer._convert()  # the sparse phase's own conversion
    return _training_step(model, trainer.create_optimizer(), _batch(cfg, shape, device))


def _training_step(model, optimizer, batch):
    """(one optimizer step on `batch`, the bytes of gradients and optimizer state it holds)."""

    def step():
        optimizer.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        optimizer.step()

    return step, lambda: _state_bytes(optimizer, model.parameters())


def cases(quick: bool = False, device: str = "cpu"):
    """The rows, built one at a time: at XLM-R-base size each way holds a 278M-parameter model with
    its gradients and optimizer state (about 5 GB), so only the current pair is kept alive."""
    cfg, shape = _config(quick)
    tokens = shape[0] * shape[1]
    live = {}  # the models of the row being measured; the rows' closures reach them only through it
    for density in DENSITIES:
        live.clear()
        live["delta"], delta_bytes = _delta(cfg, shape, density, device)
        body = {n: p for n, p in _model(cfg, "meta").named_parameters() if n.startswith("roberta.")}
        k = sum(round(density * p.numel()) for p in body.values())
        # SDDMM entries: the body's linear weights and the word embeddings, which the tied decoder reads
        k_linear = sum(round(density * p.numel()) for n, p in body.items() if p.dim() == 2 and "position" not in n
                       and "token_type" not in n)
        for name, build in (("dense grads + grad*mask + AdamW", _dense_masked),
                            ("dense grads + compact MaskedAdamW", _compact_only)):
            live.pop("base", None)  # the previous row's baseline model goes before the next is built
            live["base"], base_bytes = build(cfg, shape, density, device)
            live["delta"](), live["base"]()  # one step each, so that grads and optimizer state exist
            note = (f"grad+state MiB: xlsparse {delta_bytes() / 2**20:.1f}, baseline {base_bytes() / 2**20:.1f}, "
                    f"3*K*4 = {3 * k * 4 / 2**20:.1f}; 1 warm-up + 3 timed pairs")
            targets = ()
            if name.startswith("dense grads + grad"):
                targets = (Target(f"lt-sft phase-2 step, {100 * density:g}%: >= 1.3x the dense-masked way", "speedup", 1.3),)
            yield Case(op="lt-sft phase-2 step", shape=f"V={cfg.vocab_size} H={cfg.hidden_size} "
                       f"L={cfg.num_hidden_layers} T={tokens}", dtype="float32", fn=lambda: live["delta"](),
                       baseline=lambda: live["base"](), baseline_name=name, density=density, backend="delta layers",
                       flops=_step_flops(cfg, shape, k_linear), note=note, targets=targets, pairs=3)  # a step takes about 30 s at full size
    live.clear()


def main() -> None:
    """Run this family alone with the installed harness (as `xlsparse bench --family ltsft` does)."""
    from xlsparse.benchmarks import harness

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
