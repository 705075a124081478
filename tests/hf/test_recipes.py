"""The five recipes on tiny models: LT-SFT through the HF Trainer, language subnetworks with
dynamic masks and Reptile, continual updates with URIEL, language arithmetic, X-ELM ensembles."""
import copy

import pytest
import torch
from tiny_models import VOCAB, batch, tiny

import xlsparse
from xlsparse import hf
from xlsparse.diff import SparseDiff
from xlsparse.hf import arithmetic, continual, subnetworks, xelm
from xlsparse.hf.lt_sft import LotteryTicketSparseFineTuner, SftArguments


class _LMData(torch.utils.data.Dataset):
    def __init__(self, n=32, s=8, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, VOCAB, (n, s), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _lm_batches(n, seed, b=4, s=8):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, VOCAB, (b, s), generator=g)
        out.append({"input_ids": ids, "labels": ids})
    return out


def _args(tmp_path):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, learning_rate=1e-2,
                             max_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
                             logging_steps=1000, weight_decay=0.0)


def test_lt_sft_with_the_hf_trainer(tmp_path):
    model = tiny("bert")
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    k = 300
    trainer = LotteryTicketSparseFineTuner(
        model=model, args=_args(tmp_path), train_dataset=_LMData(),
        sft_args=SftArguments(ft_params_num=k, full_ft_max_steps_per_iteration=3, sparse_ft_max_steps_per_iteration=3,
                              freeze_head=True, freeze_embeddings=True, freeze_layer_norm=True))
    trainer.train()
    sft = trainer.sft
    assert isinstance(sft, SparseDiff) and sft.nnz == k and not sft.absolute
    assert not any("embeddings" in n or "LayerNorm" in n for n in sft.deltas)
    # Only the selected entries moved from θ0, and the diff says by how much.
    after = dict(model.named_parameters())
    with torch.no_grad():
        for n, p in after.items():
            moved = (p != theta0[n]).reshape(-1).nonzero().flatten()
            chosen = sft.deltas[n].indices.long() if n in sft.deltas else torch.zeros(0, dtype=torch.long)
            assert set(moved.tolist()) <= set(chosen.tolist()), n
            if n in sft.deltas:
                torch.testing.assert_close(p.reshape(-1)[chosen] - theta0[n].reshape(-1)[chosen], sft.deltas[n].values)
    # The SFT composes onto the original model.
    model.eval()
    fresh = tiny("bert")
    ids = batch()
    with sft.applied(fresh):
        torch.testing.assert_close(fresh(input_ids=ids).logits, model(input_ids=ids).logits)


def test_lt_sft_composes_language_and_task(tmp_path):
    lang = LotteryTicketSparseFineTuner(model=tiny("bert"), args=_args(tmp_path), train_dataset=_LMData(seed=1),
                                        sft_args=SftArguments(ft_params_proportion=0.02, full_ft_max_steps_per_iteration=2,
                                                              sparse_ft_max_steps_per_iteration=2, full_l1_reg=0.1,
                                                              sparse_l1_reg=0.01))
    lang.train()
    task = LotteryTicketSparseFineTuner(model=tiny("bert"), args=_args(tmp_path), train_dataset=_LMData(seed=2),
                                        sft_args=SftArguments(ft_params_proportion=0.02, full_ft_max_steps_per_iteration=2,
                                                              sparse_ft_max_steps_per_iteration=2))
    task.train()
    base = tiny("bert")
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    with xlsparse.apply([lang.sft, task.sft], base):
        changed = sum(int((p != before[n]).sum()) for n, p in base.named_parameters())
        assert changed > 0
    for n, p in base.named_parameters():
        assert torch.equal(p, before[n])
