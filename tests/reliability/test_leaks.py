"""No leaks: 1,000 training steps of a tiny converted model (forward, backward through the
SDDMM/SpMM autograd, a masked optimizer step, and an apply/revert of a diff every 10 steps) do
not grow the process's resident memory beyond a small bound after warm-up."""
import gc

import pytest
import torch

transformers = pytest.importorskip("transformers")

import xlsparse  # noqa: E402
from xlsparse import hf  # noqa: E402
from xlsparse.optim import MaskedAdamW  # noqa: E402

WARMUP, STEPS = 100, 1000
BOUND_MB = 8


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["dense", "compact"])
def test_rss_is_flat_over_1000_steps(mode):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=53, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=24, max_position_embeddings=12)
    model = hf.convert(transformers.BertForMaskedLM(cfg), density=0.1)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    masks = [None if n.endswith("delta_values") else torch.rand(p.shape) < 0.5 for n, p in named]
    opt = MaskedAdamW([p for _, p in named], masks, lr=1e-3, mode=mode)
    diff = hf.extract_diff(model)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 53, (64, 4, 8), generator=g)
    rss = []
    for step in range(WARMUP + STEPS):
        if step == WARMUP:
            gc.collect()
            rss.append(_rss_mb())
        batch = ids[step % 64]
        opt.zero_grad(set_to_none=True)
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        if step % 10 == 0:
            with diff.applied(model, alpha=0.5):
                pass
            xlsparse.functional.topk_mask([p.detach() for _, p in named[:3]], 10)
    gc.collect()
    rss.append(_rss_mb())
    assert rss[1] - rss[0] < BOUND_MB, f"RSS grew from {rss[0]:.1f} MB to {rss[1]:.1f} MB over {STEPS} steps"
