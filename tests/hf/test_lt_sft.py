"""LT-SFT through the HF Trainer, checked against plain-torch restatements of composable-sft's
rules: step caps, L1 units, accumulated masks over rounds, freezing/untying, composition of
language and task SFTs, multi-source batches, and phase 2's O(K) layers."""
import copy
import json
import math
import os
import re
import warnings

import pytest
import torch
import torch.nn.utils.parametrize
from tiny_models import SHARDING, VOCAB, ask_for_sharding, tiny

import xlsparse
from xlsparse import cli
from xlsparse.diff import SparseDiff
from xlsparse.hf import lt_sft
from xlsparse.hf.lt_sft import (SOURCE_KEY, DynamicSftArguments, KeepUpdatesHandle, LotteryTicketSparseFineTuner,
                                MultiSourceDataset, SftArguments, _masked_lm_nll, training_length)
from xlsparse.nn import SparseDeltaEmbedding, SparseDeltaLinear

transformers = pytest.importorskip("transformers")

HERE = os.path.dirname(os.path.abspath(__file__))  # torchrun scripts import this file from here


class _LMData(torch.utils.data.Dataset):
    def __init__(self, n=8, s=8, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, VOCAB, (n, s), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class _TagData(_LMData):
    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i] % 3}


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, learning_rate=1e-2, save_strategy="no",
                report_to=[], use_cpu=True, disable_tqdm=True, logging_steps=1, weight_decay=0.0, max_grad_norm=0.0,
                lr_scheduler_type="constant")
    base.update(kw)
    return transformers.TrainingArguments(**base)


def _no_dropout(model):
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


# --- arguments ---

def test_arguments_are_validated_naming_the_argument():
    with pytest.raises(ValueError, match="ft_params_proportion"):
        SftArguments(ft_params_proportion=1.5, full_ft_max_steps_per_iteration=1, sparse_ft_max_steps_per_iteration=1)
    with pytest.raises(ValueError, match="n_ft_iterations"):
        SftArguments(n_ft_iterations=0, full_ft_max_steps_per_iteration=1, sparse_ft_max_steps_per_iteration=1)
    with pytest.raises(ValueError, match="full_ft_max_steps_per_iteration"):
        SftArguments(sparse_ft_max_steps_per_iteration=1)  # the full phase has no length
    with pytest.raises(ValueError, match="sparse_ft_min_steps_per_iteration"):
        SftArguments(full_ft_max_steps_per_iteration=1, sparse_ft_max_steps_per_iteration=2,
                     sparse_ft_min_steps_per_iteration=3)
    with pytest.raises(ValueError, match="full_ft_max_steps_per_iteration"):
        SftArguments(full_ft_max_steps_per_iteration=0, sparse_ft_max_steps_per_iteration=1)
    with pytest.raises(ValueError, match="sparse_l1_reg"):
        SftArguments(full_ft_max_steps_per_iteration=1, sparse_ft_max_steps_per_iteration=1, sparse_l1_reg=-1)
    # inf passed the check: the L1 term and its gradients were NaN (inf · 0 at θ0) from the first step
    with pytest.raises(ValueError, match="full_l1_reg = inf: must be a finite number >= 0"):
        SftArguments(full_ft_max_steps_per_iteration=1, sparse_ft_max_steps_per_iteration=1, full_l1_reg=float("inf"))
    # an infinite epoch cap failed at train(), converting epochs to steps (ceil of inf), beside a
    # step cap too; None is "no cap"
    with pytest.raises(ValueError, match="sparse_ft_max_epochs_per_iteration = inf: must be a finite number > 0"):
        SftArguments(full_ft_max_steps_per_iteration=1, sparse_ft_max_epochs_per_iteration=math.inf)


@pytest.mark.parametrize("name, value", [("ft_params_num", 100.7), ("ft_params_num", True),
                                         ("full_ft_max_steps_per_iteration", 2.5), ("sparse_ft_min_steps_per_iteration", 1.5),
                                         ("reselection_steps", True), ("selection_accumulation_steps", 1.5)])
def test_counts_that_are_not_whole_numbers_are_refused_naming_the_argument(name, value):
    # ft_params_num = 100.7 failed in the selection, after the whole full phase had trained;
    # 2.5 max steps ran 2, True counted as 1, 1.5 accumulation steps accumulated 2
    kw = {"full_ft_max_steps_per_iteration": 3, "sparse_ft_max_steps_per_iteration": 3, "reselection_steps": 4,
          "selection_accumulation_steps": 1, name: value}
    with pytest.raises(ValueError, match=rf"\.{name} = "):
        DynamicSftArguments(**kw)


@pytest.mark.parametrize("name, value", [("freeze_head", "false"), ("apply_reg_to_sparse_only", "False"),
                                         ("freeze_layer_norm", 0), ("layer_norm_patterns", "LayerNorm"),
                                         ("maskable_exclude", "bias"), ("maskable_exclude", (1,)),
                                         ("full_ft_max_epochs_per_iteration", True), ("drop_fraction", True),
                                         ("reselection_rate_policy", "exponential"), ("reselection_rate_policy", None)])
def test_values_of_the_wrong_type_are_refused_naming_the_argument(name, value):
    # "false" from a config file is truthy and froze the head; a bare pattern string was read a
    # character at a time ("bias" excluded every name holding an "a"); True ran 1 epoch and
    # drop_fraction=True dropped every entry at each reselection
    kw = {"full_ft_max_steps_per_iteration": 3, "sparse_ft_max_steps_per_iteration": 3, name: value}
    with pytest.raises(ValueError, match=rf"\.{name} = "):
        DynamicSftArguments(**kw)


def test_pattern_lists_parse_from_the_command_line_as_composable_sfts_scripts_parse_sft_arguments():
    # typed tuple[str, ...], HfArgumentParser turned `--maskable_exclude bias` into ('b', 'i', 'a', 's'):
    # every parameter whose name holds one of those letters was excluded (and `--layer_norm_patterns
    # LayerNorm` froze nearly every parameter), silently; a second pattern was refused as unused
    (parsed,) = transformers.HfArgumentParser(SftArguments).parse_args_into_dataclasses(
        ["--full_ft_max_steps_per_iteration", "1", "--sparse_ft_max_steps_per_iteration", "1",
         "--maskable_exclude", "bias", "pooler", "--layer_norm_patterns", "LayerNorm"])
    assert parsed.maskable_exclude == ["bias", "pooler"] and parsed.layer_norm_patterns == ["LayerNorm"]
    (default,) = transformers.HfArgumentParser(SftArguments).parse_args_into_dataclasses(
        ["--full_ft_max_steps_per_iteration", "1", "--sparse_ft_max_steps_per_iteration", "1"])
    assert default == SftArguments(full_ft_max_steps_per_iteration=1, sparse_ft_max_steps_per_iteration=1)

def test_numpy_numbers_are_taken_as_python_numbers_and_checkpoints_are_written(tmp_path):
    # passed by the checks, they reached the checkpoint's sparse_phase.json: json.dump raised
    # "Object of type int64 is not JSON serializable" at the first save of the sparse phase
    np = pytest.importorskip("numpy")
    sft_args = DynamicSftArguments(ft_params_num=np.int64(400), full_ft_max_steps_per_iteration=1,
                                   sparse_ft_max_steps_per_iteration=np.int64(3), reselection_steps=np.int64(2),
                                   selection_accumulation_steps=np.int64(1), drop_fraction=np.float32(0.5),
                                   sparse_l1_reg=np.float32(0.0))
    LotteryTicketSparseFineTuner(model=_no_dropout(tiny("bert")), train_dataset=_LMData(),
                                 args=_args(tmp_path, save_strategy="steps", save_steps=1), sft_args=sft_args).train()
    written = json.loads((tmp_path / "sparse" / "checkpoint-1" / "sparse_phase.json").read_text())
    assert (written["reselection_steps"], written["drop_fraction"]) == (2, 0.5)


def test_a_proportion_of_none_beside_ft_params_num_is_composable_sfts_rule(tmp_path):
    # composable-sft's ft_params_proportion is Optional and read only when ft_params_num is None:
    # proportion=None with a count is its valid configuration; None where a number is needed
    # raised a TypeError (comparing None) that named no argument
    steps = dict(full_ft_max_steps_per_iteration=1, sparse_ft_max_steps_per_iteration=1)
    t = _trainer(tmp_path, tiny("bert"), ft_params_proportion=None, ft_params_num=40)
    assert t.num_tunable() == 40
    for name in ("ft_params_proportion", "full_l1_reg", "sparse_l1_reg"):
        with pytest.raises(ValueError, match=rf"\.{name} = None"):
            SftArguments(**{name: None}, **steps)


def test_untie_on_an_untied_model_and_too_large_k_are_errors(tmp_path):
    steps = dict(full_ft_max_steps_per_iteration=1, sparse_ft_max_steps_per_iteration=1)
    model = tiny("llama")
    model.config.tie_word_embeddings = False
    with pytest.raises(ValueError, match="untie_embeddings"):
        LotteryTicketSparseFineTuner(model=model, args=_args(tmp_path), train_dataset=_LMData(),
                                     sft_args=SftArguments(untie_embeddings=True, **steps))
    with pytest.raises(ValueError, match="ft_params_num"):
        LotteryTicketSparseFineTuner(model=tiny("bert"), args=_args(tmp_path), train_dataset=_LMData(),
                                     sft_args=SftArguments(ft_params_num=10**9, **steps))
    with pytest.raises(ValueError, match="maskable_params"):
        LotteryTicketSparseFineTuner(model=tiny("bert"), args=_args(tmp_path), train_dataset=_LMData(),
                                     maskable_params=["no.such.weight"], sft_args=SftArguments(**steps))
    # K < n_ft_iterations (or a proportion that rounds K to 0) trained a whole run into an SFT of 0 entries
    for k in ({"ft_params_num": 3, "n_ft_iterations": 5}, {"ft_params_proportion": 1e-9}):
        with pytest.raises(ValueError, match="selects no entry"):
            LotteryTicketSparseFineTuner(model=tiny("bert"), args=_args(tmp_path), train_dataset=_LMData(),
                                         sft_args=SftArguments(**k, **steps))


def test_a_max_norm_embedding_is_refused_before_anything_changes(tmp_path):
    """nn.Embedding(max_norm=...) renormalises the rows it reads in place in every forward: entries
    outside the mask changed, and the trained model was not base + trainer.sft (1486 entries of this
    BERT differed, up to 0.03)."""
    model = tiny("bert")
    model.bert.embeddings.word_embeddings.max_norm = 0.05
    before = {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"bert\.embeddings\.word_embeddings .*max_norm"):
        _trainer(tmp_path, model, untie_embeddings=True, freeze_layer_norm=True)
    after = dict(model.named_parameters())
    assert set(after) == set(before)
    assert all(torch.equal(p, before[n][0]) and p.requires_grad == before[n][1] for n, p in after.items())


def test_source_sft_apply_abs_that_is_not_a_bool_is_refused_at_construction(tmp_path):
    # "no" is truthy: it raised only at the first multi-source step, after the full phase had run
    with pytest.raises(TypeError, match="source_sft_apply_abs must be a bool"):
        LotteryTicketSparseFineTuner(model=tiny("bert"), args=_args(tmp_path), train_dataset=_LMData(),
                                     sft_args=SftArguments(full_ft_max_steps_per_iteration=1,
                                                           sparse_ft_max_steps_per_iteration=1, ft_params_num=50),
                                     source_sft_apply_abs="no")


def test_a_composable_sft_maskable_list_that_misses_the_tied_embeddings_is_named(tmp_path):
    # run_mlm.py's list (names under base_model_prefix from named_parameters()) lacks XLM-R's word
    # embeddings under transformers 5, which lists the tied matrix as lm_head.decoder.weight: they
    # were trained whole and stored as an absolute entry without a word.
    model = tiny("xlmr")
    listed = [n for n, p in model.named_parameters() if n.startswith(model.base_model_prefix) and p.requires_grad]
    name = "roberta.embeddings.word_embeddings.weight"
    assert name not in listed
    with pytest.warns(UserWarning, match=rf"maskable_params leaves out \['{name}'\].*'lm_head.decoder.weight'"):
        trainer = LotteryTicketSparseFineTuner(model=model, args=_args(tmp_path), train_dataset=_LMData(),
                                               maskable_params=listed, sft_args=SftArguments(ft_params_num=30, full_ft_max_steps_per_iteration=1, sparse_ft_max_steps_per_iteration=1))
    assert name not in trainer.maskable
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer = LotteryTicketSparseFineTuner(model=tiny("xlmr"), args=_args(tmp_path), train_dataset=_LMData(),
                                               maskable_params=[*listed, name], sft_args=SftArguments(ft_params_num=30, full_ft_max_steps_per_iteration=1, sparse_ft_max_steps_per_iteration=1))
    assert name in trainer.maskable



def test_maskable_params_may_be_any_iterable_of_names_but_not_a_string(tmp_path):
    # a generator was read up by the unknown-name check: no maskable parameter was left and the
    # trainer raised "ft_params_num = 50 exceeds the 0 maskable entries"; a string was read one
    # character at a time ("the model has no parameters ['b', 'e', ...]")
    model = tiny("bert")
    names = [n for n, _ in model.named_parameters() if n.startswith("bert.encoder.")]
    sft_args = SftArguments(ft_params_num=50, full_ft_max_steps_per_iteration=1, sparse_ft_max_steps_per_iteration=1)
    trainer = LotteryTicketSparseFineTuner(model=model, args=_args(tmp_path), train_dataset=_LMData(), sft_args=sft_args,
                                           maskable_params=(n for n in names))
    assert trainer.maskable == names
    with pytest.raises(ValueError, match="maskable_params: expected parameter names"):
        LotteryTicketSparseFineTuner(model=tiny("bert"), args=_args(tmp_path), train_dataset=_LMData(), sft_args=sft_args,
                                     maskable_params=names[0])

@pytest.mark.parametrize("flag", ["freeze_decoder", "freeze_head", "untie_embeddings"])
def test_a_maskable_list_that_misses_the_tied_embeddings_is_named_when_the_trainer_unties_them(tmp_path, flag):
    # The same list, computed on the model as it is handed over (the trainer, not the script as in
    # run_mlm.py, unties): after the untying the word embeddings have no head name left, so they
    # were trained whole and stored as an absolute entry without a word under composable-sft's
    # language-SFT recipe (freeze_decoder) and the other untying flags.
    model = tiny("xlmr")
    listed = [n for n, p in model.named_parameters() if n.startswith(model.base_model_prefix) and p.requires_grad]
    name = "roberta.embeddings.word_embeddings.weight"
    with pytest.warns(UserWarning, match=rf"maskable_params leaves out \['{name}'\].*'lm_head.decoder.weight'"):
        trainer = LotteryTicketSparseFineTuner(model=model, args=_args(tmp_path), train_dataset=_LMData(),
                                               maskable_params=listed, sft_args=SftArguments(
                                                   ft_params_num=30, full_ft_max_steps_per_iteration=1,
                                                   sparse_ft_max_steps_per_iteration=1, **{flag: True}))
    assert name in set(trainer._theta0) - set(trainer.maskable)  # as warned: trained whole


@pytest.mark.parametrize("lo, hi, epochs, batches, accum, expected", [
    # composable-sft's set_training_len, restated case by case
    (None, 7, None, 5, 1, 7),         # no epochs: the max steps
    (100, 7, None, 5, 1, 7),          # ... and the min is ignored
    (None, None, 2, 5, 1, 10),        # epochs alone: ceil(2 * 5)
    (None, 7, 2, 5, 1, 7),            # 10 epoch steps, max 7: the smaller wins
    (None, 20, 2, 5, 1, 10),          # 10 < 20
    (12, 20, 2, 5, 1, 12),            # 10 < min 12: the min
    (None, None, 1.5, 5, 2, 5),       # the Trainer's steps for 1.5 epochs: ceil(1.5 * ceil(5 / 2))
    (None, None, 1, 5, 2, 3),         # 1 epoch of 5 batches at accumulation 2: 3 steps, the last on 1 batch
    (None, None, 1, 1, 4, 1),         # fewer batches than the accumulation: one step
    (None, 4, 1.5, 5, 2, 4),          # 5 epoch steps, max 4
])
def test_training_length_is_composable_sfts_rule(lo, hi, epochs, batches, accum, expected):
    assert training_length(lo, hi, epochs, batches, accum) == expected


# --- freezing and the tied decoder ---

def _trainer(tmp_path, model, **sft):
    sft = {"full_ft_max_steps_per_iteration": 1, "sparse_ft_max_steps_per_iteration": 1, "ft_params_num": 50, **sft}
    return LotteryTicketSparseFineTuner(model=model, args=_args(tmp_path), train_dataset=_LMData(),
                                        sft_args=SftArguments(**sft))


def test_freeze_and_untie_flags_on_xlmr(tmp_path):
    emb_name = "roberta.embeddings.word_embeddings.weight"
    # No flag: the tied matrix is the word embeddings (maskable), never the head's
    t = _trainer(tmp_path, tiny("xlmr"))
    m = t.model
    assert m.get_output_embeddings().weight is m.get_input_embeddings().weight
    assert emb_name in t.maskable and "lm_head.decoder.weight" not in t.maskable
    assert t.num_params == sum(p.numel() for p in m.parameters())
    heads = set(t._theta0) - set(t.maskable)
    assert heads == {"lm_head.bias", "lm_head.dense.weight", "lm_head.dense.bias", "lm_head.layer_norm.weight",
                     "lm_head.layer_norm.bias"}
    # freeze_head: the decoder gets its own frozen copy, every head parameter is frozen, the
    # input embeddings train
    t = _trainer(tmp_path, tiny("xlmr"), freeze_head=True)
    m = t.model
    dec, emb = m.get_output_embeddings().weight, m.get_input_embeddings().weight
    assert dec is not emb and torch.equal(dec, emb) and not dec.requires_grad and emb.requires_grad
    assert not any(p.requires_grad for p in m.lm_head.parameters())
    assert set(t._theta0) == set(t.maskable) and emb_name in t.maskable
    assert t.num_params == sum(p.numel() for p in m.parameters())  # the copy counts in N
    # untie_embeddings: its own trainable copy, a head (stored whole)
    t = _trainer(tmp_path, tiny("xlmr"), untie_embeddings=True)
    dec = t.model.get_output_embeddings().weight
    assert dec is not t.model.get_input_embeddings().weight and dec.requires_grad
    assert "lm_head.decoder.weight" in t._theta0 and "lm_head.decoder.weight" not in t.maskable
    # freeze_decoder: its own frozen copy; the rest of the head trains
    t = _trainer(tmp_path, tiny("xlmr"), freeze_decoder=True)
    assert not t.model.get_output_embeddings().weight.requires_grad and t.model.lm_head.dense.weight.requires_grad
    # freeze_embeddings: the input word embeddings only; freeze_layer_norm
    t = _trainer(tmp_path, tiny("xlmr"), freeze_embeddings=True, freeze_layer_norm=True)
    assert emb_name not in t._theta0 and "roberta.embeddings.position_embeddings.weight" in t.maskable
    assert not any("LayerNorm" in n or "layer_norm" in n for n in t._theta0)
    # exclusion patterns: matching parameters are trained whole
    t = _trainer(tmp_path, tiny("xlmr"), maskable_exclude=(r"position_embeddings",))
    assert "roberta.embeddings.position_embeddings.weight" in set(t._theta0) - set(t.maskable)


@pytest.mark.parametrize("arch", ["qwen3", "mpt"])
def test_freeze_layer_norm_freezes_every_normalisation_module(tmp_path, arch):
    # Qwen3's attention norms (q_norm, k_norm) and MPT's norm_1 / norm_f are norms too: the
    # default patterns missed them, and they trained (and entered the SFT) under freeze_layer_norm
    if arch == "qwen3":
        cfg = transformers.Qwen3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    else:
        cfg = transformers.MptConfig(vocab_size=VOCAB, d_model=32, n_layers=1, n_heads=2)
    torch.manual_seed(0)
    t = _trainer(tmp_path, transformers.AutoModelForCausalLM.from_config(cfg), freeze_layer_norm=True)
    norms = {f"{m}.{n}" for m, mod in t.model.named_modules() if "norm" in type(mod).__name__.lower()
             for n, _ in mod.named_parameters(recurse=False)}
    assert norms and not norms & set(t._theta0)
    assert not any(p.requires_grad for n, p in t.model.named_parameters() if n in norms)
    assert t.maskable  # the rest trains


def test_untie_embeddings_with_freeze_head_trains_the_untied_decoder(tmp_path):
    # composable-sft's run_mlm freezes the head, then unties: the new decoder copy trains (the
    # rest of the head stays frozen). Frozen, untie_embeddings would have done nothing.
    t = _trainer(tmp_path, tiny("xlmr"), freeze_head=True, untie_embeddings=True)
    m = t.model
    dec = m.get_output_embeddings().weight
    assert dec is not m.get_input_embeddings().weight and dec.requires_grad
    assert [n for n, p in m.lm_head.named_parameters() if p.requires_grad] == ["decoder.weight"]
    assert set(t._theta0) - set(t.maskable) == {"lm_head.decoder.weight"}


def test_xlmr_sft_keeps_the_tied_embeddings_sparse(tmp_path):
    t = _trainer(tmp_path, _no_dropout(tiny("xlmr")), ft_params_proportion=0.05, ft_params_num=None)
    t.train()
    assert "lm_head.decoder.weight" not in t.sft.absolute
    assert "roberta.embeddings.word_embeddings.weight" not in t.sft.absolute
    assert t.sft.nnz == int(0.05 * t.num_maskable)
    m = t.model
    assert m.get_output_embeddings().weight is m.get_input_embeddings().weight  # still tied after phase 2


def test_hooks_on_a_layer_keep_running_in_the_sparse_phase(tmp_path):
    model = _no_dropout(tiny("xlmr"))
    name = "roberta.encoder.layer.0.attention.self.query"
    seen = []
    model.get_submodule(name).register_forward_hook(lambda m, args, out: seen.append(type(m).__name__))
    t = _trainer(tmp_path, model)
    t.train()
    assert "Linear" in seen and "SparseDeltaLinear" in seen  # the full phase, then the sparse phase
    seen.clear()
    t.model(input_ids=torch.randint(3, VOCAB, (1, 4)))  # the original module is back, with its hook
    assert seen == ["Linear"]


@pytest.mark.slow  # torch.compile: ~13 s each
def test_torch_compile_reaches_every_phase(tmp_path):
    # torch.compile's wrapper set accelerate's "prepared" mark on the model itself, so the sparse
    # phase and later rounds were handed the bare model: they trained uncompiled
    seen = []

    class Recording(LotteryTicketSparseFineTuner):
        def compute_loss(self, model, inputs, *args, **kwargs):
            if torch.is_grad_enabled():  # not settle_loss_kwargs' no-grad probe of the bare model
                seen.append((self._phase, type(model).__name__))
            return super().compute_loss(model, inputs, *args, **kwargs)

    sfts = []
    for compile_ in (True, False):
        t = Recording(model=_no_dropout(tiny("llama")), train_dataset=_LMData(n=8),
                      args=_args(tmp_path, torch_compile=compile_, torch_compile_backend="eager" if compile_ else None),
                      sft_args=SftArguments(ft_params_num=400, n_ft_iterations=2, full_ft_max_steps_per_iteration=1,
                                            sparse_ft_max_steps_per_iteration=1))
        t.train()
        sfts.append(t.sft)
        if compile_:
            assert seen == [(phase, "OptimizedModule") for phase in ("full", "sparse", "full", "sparse")]
    compiled, eager = sfts
    for name, d in eager.deltas.items():
        assert torch.equal(compiled.deltas[name].indices, d.indices), name
        torch.testing.assert_close(compiled.deltas[name].values, d.values)


@pytest.mark.parametrize("freeze_embeddings", [True, False])
def test_an_sft_trained_untied_is_refused_on_a_tied_base_and_reproduces_on_an_untied_one(tmp_path, freeze_embeddings):
    """untie_embeddings stores the decoder whole; on the usual tied base that entry would replace
    the input embeddings too (it did, silently, with freeze_embeddings)."""
    base = _no_dropout(tiny("xlmr"))
    t = _trainer(tmp_path, copy.deepcopy(base), untie_embeddings=True, freeze_embeddings=freeze_embeddings)
    t.train()
    assert "lm_head.decoder.weight" in t.sft.absolute
    x = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        want = t.model.eval()(input_ids=x).logits
    tied = copy.deepcopy(base)
    before = {n: p.detach().clone() for n, p in tied.named_parameters()}
    with pytest.raises(ValueError, match=r"'lm_head.decoder.weight' is an absolute entry .* ties it to "
                                         r"\['roberta.embeddings.word_embeddings.weight'\].* untied first"):
        xlsparse.apply(t.sft, tied)
    assert all(torch.equal(p, before[n]) for n, p in tied.named_parameters())
    untied = copy.deepcopy(base)  # untied as the error says
    untied.get_output_embeddings().weight = torch.nn.Parameter(untied.get_input_embeddings().weight.detach().clone())
    xlsparse.apply(t.sft, untied)
    with torch.no_grad():
        torch.testing.assert_close(untied.eval()(input_ids=x).logits, want, rtol=0, atol=1e-6)


# --- the whole recipe against a plain-torch restatement of composable-sft ---

def _restated_lt_sft(model, batch, k, rounds, full_steps, sparse_steps, lr, wd, decayed, full_l1, sparse_l1, maskable):
    """composable-sft's LT-SFT in plain torch: rounds of (full FT with L1 against θ0, select the
    k // rounds largest |θ − θ0| not selected yet, rewind to the round's start, masked AdamW)."""
    params = dict(model.named_parameters())
    trainable = {n: p for n, p in params.items() if p.requires_grad}
    theta0 = {n: p.detach().clone() for n, p in trainable.items()}
    n_all = sum(p.numel() for p in params.values())
    masks = {n: torch.zeros_like(p, dtype=torch.bool) for n, p in trainable.items() if n in maskable}
    reg_log = []

    def run(steps, lam, masked):
        groups = [{"params": [p for n, p in trainable.items() if n in decayed], "weight_decay": wd},
                  {"params": [p for n, p in trainable.items() if n not in decayed], "weight_decay": 0.0}]
        opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)
        for _ in range(steps):
            opt.zero_grad()
            model(**batch).loss.backward()
            if lam:
                reg = lam * sum((p - theta0[n]).abs().sum() for n, p in trainable.items()) / n_all
                reg.backward()
                reg_log.append(float(reg.detach()))
            if masked:
                for n, m in masks.items():
                    trainable[n].grad.mul_(m)
                before = {n: trainable[n].detach().clone() for n in masks}
            opt.step()
            if masked:  # weight decay too reaches only the selected entries
                with torch.no_grad():
                    for n, m in masks.items():
                        trainable[n].copy_(torch.where(m, trainable[n], before[n]))

    for _ in range(rounds):
        start = {n: p.detach().clone() for n, p in trainable.items()}
        run(full_steps, full_l1, masked=False)
        with torch.no_grad():
            scores = torch.cat([torch.where(masks[n], -1.0, (trainable[n] - theta0[n]).abs()).reshape(-1) for n in masks])
            chosen = torch.zeros_like(scores, dtype=torch.bool)
            chosen[scores.topk(k // rounds).indices] = True
            offset = 0
            for n, m in masks.items():
                m |= chosen[offset:offset + m.numel()].view_as(m)
                offset += m.numel()
            for n, p in trainable.items():
                p.copy_(start[n])
        run(sparse_steps, sparse_l1, masked=True)
    with torch.no_grad():
        sft = {n: ((trainable[n] - theta0[n])[m], m) for n, m in masks.items()}
        heads = {n: p.detach().clone() for n, p in trainable.items() if n not in masks}
    return sft, heads, reg_log


class _Logs(transformers.TrainerCallback):
    def __init__(self):
        self.seen = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.seen.append(dict(logs or {}))


@pytest.mark.parametrize("wd", [0.0, pytest.param(0.05, marks=pytest.mark.slow)])
def test_lt_sft_matches_composable_sft_restated(tmp_path, wd):
    k, rounds, lr = 400, 2, 1e-2
    data = _LMData(n=8)
    batch = {"input_ids": data.ids, "labels": data.ids}
    model = _no_dropout(tiny("bert"))
    reference = copy.deepcopy(model)
    sft_args = SftArguments(ft_params_num=k, n_ft_iterations=rounds, full_ft_max_steps_per_iteration=3,
                            sparse_ft_max_steps_per_iteration=3, full_l1_reg=5.0, sparse_l1_reg=5.0,
                            freeze_layer_norm=True)
    trainer = LotteryTicketSparseFineTuner(model=model, args=_args(tmp_path, weight_decay=wd), train_dataset=data,
                                           sft_args=sft_args)
    for n, p in reference.named_parameters():
        p.requires_grad_(n in trainer._theta0)
    logs = _Logs()
    trainer.add_callback(logs)
    trainer.train()
    sft, heads, reg_log = _restated_lt_sft(reference, batch, k, rounds, 3, 3, lr, wd, trainer._decayed, 5.0, 5.0,
                                           set(trainer.maskable))
    assert trainer.num_params == sum(p.numel() for p in reference.parameters())
    got = trainer.sft
    assert got.nnz == k and set(got.absolute) == set(heads)
    for n, (values, mask) in sft.items():
        if not mask.any():
            assert n not in got.deltas
            continue
        d = got.deltas[n]
        assert torch.equal(d.indices.long(), mask.reshape(-1).nonzero().flatten()), n
        torch.testing.assert_close(d.values, values, atol=2e-5, rtol=1e-3)
    for n, t in heads.items():
        torch.testing.assert_close(got.absolute[n], t, atol=2e-5, rtol=1e-3)
    logged = [h["l1_reg_loss"] for h in logs.seen if "l1_reg_loss" in h]
    torch.testing.assert_close(torch.tensor(logged), torch.tensor(reg_log), atol=1e-7, rtol=1e-3)
    # the model itself is θ0 + SFT: only the selected entries moved
    fresh = _no_dropout(tiny("bert"))
    with got.applied(fresh):
        for (n, p), q in zip(fresh.named_parameters(), model.parameters()):
            torch.testing.assert_close(p, q, atol=1e-6, rtol=0), n


def test_l1_reg_loss_is_logged_per_phase(tmp_path):
    # full phase: 3 steps logged every 2, so step 3's L1 was not logged; the sparse phase
    # (sparse_l1_reg = 0) logged it as its own l1_reg_loss, 0.51
    sft_args = SftArguments(ft_params_num=100, full_ft_max_steps_per_iteration=3, sparse_ft_max_steps_per_iteration=2,
                            full_l1_reg=100.0, sparse_l1_reg=0.0)
    trainer = LotteryTicketSparseFineTuner(model=tiny("bert"), train_dataset=_LMData(), sft_args=sft_args,
                                           args=_args(tmp_path, logging_steps=2))
    seen = []

    class _PhaseLogs(transformers.TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if "loss" in logs:
                seen.append((trainer._phase, "l1_reg_loss" in logs))

    trainer.add_callback(_PhaseLogs())
    trainer.train()
    assert seen == [("full", True), ("sparse", False)]


def test_each_phase_has_its_own_checkpoints_holding_the_sft(tmp_path):
    sft_args = SftArguments(ft_params_num=100, full_ft_max_steps_per_iteration=2, sparse_ft_max_steps_per_iteration=2)
    trainer = LotteryTicketSparseFineTuner(model=tiny("bert"), args=_args(tmp_path, save_strategy="steps", save_steps=2),
                                           train_dataset=_LMData(), sft_args=sft_args)
    trainer.train()
    assert (tmp_path / "full" / "checkpoint-2").is_dir() and (tmp_path / "sparse" / "checkpoint-2").is_dir()
    assert not (tmp_path / "full" / "checkpoint-2" / "sft.safetensors").exists()
    saved = SparseDiff.load(str(tmp_path / "sparse" / "checkpoint-2" / "sft.safetensors"))
    assert saved.nnz == 100
    for n, d in trainer.sft.deltas.items():
        assert torch.equal(saved.deltas[n].indices, d.indices) and torch.equal(saved.deltas[n].values, d.values)
    trainer.save_model(str(tmp_path / "final"))
    assert SparseDiff.load(str(tmp_path / "final" / "sft.safetensors")).nnz == 100
    # a later round's full phase has masks but trains everything: its checkpoints hold no SFT
    rounds = LotteryTicketSparseFineTuner(
        model=tiny("bert"), args=_args(tmp_path / "r", save_strategy="steps", save_steps=2), train_dataset=_LMData(),
        sft_args=SftArguments(ft_params_num=100, n_ft_iterations=2, full_ft_max_steps_per_iteration=2,
                              sparse_ft_max_steps_per_iteration=2))
    rounds.train()
    assert (tmp_path / "r" / "iteration-1" / "full" / "checkpoint-2").is_dir()
    assert not (tmp_path / "r" / "iteration-1" / "full" / "checkpoint-2" / "sft.safetensors").exists()
    assert (tmp_path / "r" / "iteration-1" / "sparse" / "checkpoint-2" / "sft.safetensors").is_file()


def test_a_save_without_an_sft_leaves_no_earlier_sft_in_the_folder(tmp_path):
    # A save outside a sparse phase writes no SFT; an earlier run's sft.safetensors stayed in a
    # reused folder beside the new model's files and passed for its SFT
    sft_args = SftArguments(ft_params_num=100, full_ft_max_steps_per_iteration=1, sparse_ft_max_steps_per_iteration=1)
    trained = LotteryTicketSparseFineTuner(model=tiny("bert"), args=_args(tmp_path), train_dataset=_LMData(),
                                           sft_args=sft_args)
    trained.train()
    trained.save_model(str(tmp_path / "out"))
    assert (tmp_path / "out" / "sft.safetensors").is_file()
    fresh = LotteryTicketSparseFineTuner(model=tiny("bert", seed=1), args=_args(tmp_path / "b"), train_dataset=_LMData(),
                                         sft_args=sft_args)
    fresh.save_model(str(tmp_path / "out"))
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert not (tmp_path / "out" / "sft.safetensors").exists()


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("best_first", [False, True], ids=["best-last", "best-first"])
def test_load_best_model_at_end_gives_the_best_checkpoints_sft(tmp_path, best_first, dynamic):
    # The Trainer's own load copied the checkpoint's folded θ0 + Δ into the frozen bases and the
    # fold then added Δ again (θ0 + 2Δ when the best was the last checkpoint).
    arguments = dict(ft_params_num=300, full_ft_max_steps_per_iteration=2, sparse_ft_max_steps_per_iteration=3)
    sft_args = DynamicSftArguments(**arguments, reselection_steps=2, drop_fraction=0.5, selection_accumulation_steps=1) \
        if dynamic else \
        SftArguments(**arguments)
    model = _no_dropout(tiny("bert"))
    trainer = LotteryTicketSparseFineTuner(
        model=model, train_dataset=_LMData(), eval_dataset=_LMData(n=4, seed=9), sft_args=sft_args,
        args=_args(tmp_path, eval_strategy="steps", eval_steps=1, save_strategy="steps", save_steps=1,
                   load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=best_first))
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best.endswith("checkpoint-1" if best_first else "checkpoint-3") and "sparse" in best
    saved = SparseDiff.load(os.path.join(best, "sft.safetensors"))
    assert set(trainer.sft.deltas) == set(saved.deltas) and set(trainer.sft.absolute) == set(saved.absolute)
    for n, d in trainer.sft.deltas.items():
        assert torch.equal(d.indices, saved.deltas[n].indices) and torch.equal(d.values, saved.deltas[n].values), n
    for n, t in trainer.sft.absolute.items():
        assert torch.equal(t, saved.absolute[n]), n
    fresh = _no_dropout(tiny("bert"))
    with trainer.sft.applied(fresh):
        for (n, p), q in zip(fresh.named_parameters(), model.parameters()):
            torch.testing.assert_close(q, p, rtol=0, atol=1e-6, msg=n)


class _ClippedNorms(transformers.TrainerCallback):
    """After clipping, in the sparse phase: the norm of every gradient, and of those outside the
    masks of the tensors the compact optimizer trains."""

    def __init__(self, trainer):
        self.trainer, self.seen = trainer, []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        t = self.trainer
        if t._phase != "sparse":
            return
        total, outside = 0.0, 0.0
        for name, p in t._trainable().items():
            grad = t._delta_values()[name].grad if name in t._converted else p.grad
            if grad is None:
                continue
            total += float(grad.double().square().sum())
            if name not in t._converted and name in t.maskable:
                off = torch.ones(p.numel(), dtype=torch.bool)
                if name in t._masks:
                    off[t._masks[name].long()] = False
                outside += float(grad.reshape(-1)[off].double().square().sum())
        self.seen.append((total ** 0.5, outside))


def test_phase_two_clips_the_norm_of_what_trains(tmp_path):
    # composable-sft masks the gradients before the Trainer clips; the biases and norms that the
    # compact optimizer trains kept dense gradients, so the clipping norm counted unselected entries.
    trainer = LotteryTicketSparseFineTuner(
        model=_no_dropout(tiny("bert")), args=_args(tmp_path, max_grad_norm=1e-3), train_dataset=_LMData(),
        sft_args=SftArguments(ft_params_num=300, full_ft_max_steps_per_iteration=2, sparse_ft_max_steps_per_iteration=3))
    norms = _ClippedNorms(trainer)
    trainer.add_callback(norms)
    trainer.train()
    assert len(norms.seen) == 3
    for total, outside in norms.seen:
        assert outside == 0.0 and total == pytest.approx(1e-3, rel=1e-4)


def test_phase_two_logs_the_gradient_norm_of_what_trains_without_clipping(tmp_path):
    # without clipping the gradients were masked nowhere: the grad_norm the Trainer logs counted the
    # unselected entries of the tensors the compact optimizer trains (GPT-2's Conv1D weights, biases,
    # norms): 1.32 and 0.68 logged for 1.18 and 0.58, where composable-sft masks before any norm
    trainer = LotteryTicketSparseFineTuner(
        model=_no_dropout(tiny("gpt2")), args=_args(tmp_path), train_dataset=_LMData(),
        sft_args=SftArguments(ft_params_num=400, full_ft_max_steps_per_iteration=1, sparse_ft_max_steps_per_iteration=2))
    norms, logs = _ClippedNorms(trainer), _Logs()
    trainer.add_callback(norms)
    trainer.add_callback(logs)
    trainer.train()
    logged = [h["grad_norm"] for h in logs.seen if "grad_norm" in h][-2:]
    assert len(norms.seen) == 2
    for (total, outside), grad_norm in zip(norms.seen, logged):
        assert outside == 0.0 and grad_norm == pytest.approx(total, rel=1e-5)


# --- phase 2 builds no dense gradient ---

class _Inspect(transformers.TrainerCallback):
    def __init__(self, trainer):
        self.trainer, self.seen = trainer, []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.trainer._phase != "sparse":
            return
        layers = [m for m in self.trainer.model.modules() if isinstance(m, (SparseDeltaLinear, SparseDeltaEmbedding))]
        self.seen.append((len(layers), all(m.weight.grad is None and not m.weight.requires_grad for m in layers),
                          all(m.delta_values.grad is not None for m in layers),
                          sum(p.grad.numel() for p in self.trainer.model.parameters() if p.grad is not None)))


def test_save_model_after_training_writes_the_trained_deltas_in_bfloat16(tmp_path):
    # folded into bf16 weights, a delta below half an ulp of θ0 is lost: θ − θ0 would save it as 0
    trainer = LotteryTicketSparseFineTuner(
        model=_no_dropout(tiny("bert")).to(torch.bfloat16), args=_args(tmp_path, learning_rate=1e-3),
        train_dataset=_LMData(n=16),
        sft_args=SftArguments(ft_params_num=2000, full_ft_max_steps_per_iteration=3, sparse_ft_max_steps_per_iteration=3))
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    saved = SparseDiff.load(str(tmp_path / "final" / "sft.safetensors"))
    assert set(saved.deltas) == set(trainer.sft.deltas)
    for n, d in trainer.sft.deltas.items():
        assert torch.equal(saved.deltas[n].indices, d.indices) and torch.equal(saved.deltas[n].values, d.values), n


def test_phase_two_allocates_no_dense_gradient(tmp_path):
    model = tiny("bert")
    trainer = LotteryTicketSparseFineTuner(
        model=model, args=_args(tmp_path), train_dataset=_LMData(),
        sft_args=SftArguments(ft_params_num=300, full_ft_max_steps_per_iteration=1, sparse_ft_max_steps_per_iteration=2))
    spy = _Inspect(trainer)
    trainer.add_callback(spy)
    trainer.train()
    assert len(spy.seen) == 2
    dense_matrices = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2)
    for count, bases_free, values_have_grads, grad_numel in spy.seen:
        # 12 linear layers in the blocks + word, position and token-type embeddings + tied decoder
        assert count == 16 and bases_free and values_have_grads
        assert grad_numel < dense_matrices // 4  # K-sized value grads plus biases, norms, head
    assert all(type(m) in (torch.nn.Linear, torch.nn.Embedding) or not isinstance(m, (SparseDeltaLinear, SparseDeltaEmbedding))
               for m in model.modules())  # folded back



# --- labelled_positions_only ---

class _MaskedLMData(_LMData):
    """About 30% of the positions labelled, the rest -100, as a masked-LM data collator leaves them."""

    def __init__(self, n=8, s=8, seed=0):
        super().__init__(n, s, seed)
        g = torch.Generator().manual_seed(seed + 1)
        self.labels = torch.where(torch.rand(n, s, generator=g) < 0.3, self.ids, -100)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def _lt_sft_run(tmp_path, model, labelled_positions_only, fused_cross_entropy=False, **args):
    trainer = LotteryTicketSparseFineTuner(
        model=_no_dropout(model),
        args=_args(tmp_path, per_device_train_batch_size=4, train_sampling_strategy="sequential", **args),
        train_dataset=_MaskedLMData(), labelled_positions_only=labelled_positions_only,
        fused_cross_entropy=fused_cross_entropy,
        sft_args=SftArguments(ft_params_num=300, full_ft_max_steps_per_iteration=3, sparse_ft_max_steps_per_iteration=3))
    logs, rows = _Logs(), []

    def count(module, inputs, output):  # the rows of logits each training forward made
        if module is trainer.model.get_output_embeddings() and module.training:
            rows.append(output.shape[:-1].numel())

    trainer.add_callback(logs)
    hook = torch.nn.modules.module.register_module_forward_hook(count)
    try:
        trainer.train()
    finally:
        hook.remove()
    return trainer.sft, [h["loss"] for h in logs.seen if "loss" in h], rows


def _assert_same_run(got, want, got_losses, want_losses):
    """Two runs' SFTs and logged losses agree to fp32 tolerance (the same supports exactly)."""
    assert set(got.deltas) == set(want.deltas) and set(got.absolute) == set(want.absolute)
    for n, d in want.deltas.items():
        assert torch.equal(got.deltas[n].indices, d.indices), n
        torch.testing.assert_close(got.deltas[n].values, d.values, atol=1e-6, rtol=1e-4)
    for n, t in want.absolute.items():
        torch.testing.assert_close(got.absolute[n], t, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(torch.tensor(got_losses), torch.tensor(want_losses), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("arch,args", [("xlmr", {}), ("bert", {"gradient_accumulation_steps": 2}),
                                       ("xlmr", {"label_smoothing_factor": 0.1})])
def test_labelled_positions_only_trains_the_same_sft_on_a_fraction_of_the_logits(tmp_path, arch, args):
    # the model's own loss over whole-sequence logits (False) is the statement of the math
    got, got_losses, got_rows = _lt_sft_run(tmp_path, tiny(arch), True, **args)
    want, want_losses, want_rows = _lt_sft_run(tmp_path, tiny(arch), False, **args)
    _assert_same_run(got, want, got_losses, want_losses)
    labels = _MaskedLMData().labels
    labelled = [int((labels[i:i + 4] != -100).sum()) for i in (0, 4)]  # the two batches of 4, in order
    accum = args.get("gradient_accumulation_steps", 1)
    # each phase a train() of 3 optimizer steps from the first batch; a forward per micro-batch
    assert got_rows == [labelled[b % 2] for b in range(3 * accum)] * 2
    assert want_rows == [4 * labels.shape[1]] * (6 * accum) and sum(labelled) < labels.numel() // 2


def test_labelled_positions_only_is_refused_where_it_cannot_hold(tmp_path):
    for model, flag, compiled, error, match in [
            (tiny("llama"), True, False, ValueError, "labelled_positions_only: a masked-LM model"),
            (tiny("bert"), "yes", False, TypeError, "labelled_positions_only must be a bool"),
            (tiny("bert"), True, True, ValueError, "labelled_positions_only: not with TrainingArguments.torch_compile")]:
        with pytest.raises(error, match=match):
            LotteryTicketSparseFineTuner(model=model, args=_args(tmp_path, torch_compile=compiled),
                                         train_dataset=_LMData(), labelled_positions_only=flag)


@pytest.mark.parametrize("all_labelled", [False, True])
def test_labelled_positions_only_raises_when_the_output_embeddings_are_not_called(tmp_path, all_labelled):
    model = tiny("bert")
    unused = torch.nn.Linear(32, VOCAB)  # what get_output_embeddings() names, never called by the forward
    model.get_output_embeddings = lambda: unused
    data = _LMData() if all_labelled else _MaskedLMData()
    trainer = LotteryTicketSparseFineTuner(
        model=model, args=_args(tmp_path), train_dataset=data, labelled_positions_only=True,
        sft_args=SftArguments(ft_params_num=50, full_ft_max_steps_per_iteration=1, sparse_ft_max_steps_per_iteration=1))
    with pytest.raises(RuntimeError, match="never called its output embeddings"):
        trainer.train()


def test_labelled_positions_only_tells_running_out_of_memory_as_itself(tmp_path):
    # an error before the output embeddings was always told as this option's ("set it False"), out of memory too
    model = tiny("bert")
    trainer = LotteryTicketSparseFineTuner(
        model=model, args=_args(tmp_path), train_dataset=_MaskedLMData(), labelled_positions_only=True,
        sft_args=SftArguments(ft_params_num=50, full_ft_max_steps_per_iteration=1, sparse_ft_max_steps_per_iteration=1))

    def out_of_memory(module, args):
        raise torch.OutOfMemoryError("out of memory in the body")

    model.bert.encoder.register_forward_pre_hook(out_of_memory)
    with pytest.raises(torch.OutOfMemoryError, match="out of memory in the body"):
        trainer.train()
    model.bert.encoder._forward_pre_hooks.clear()
    model.bert.encoder.register_forward_pre_hook(lambda m, a: (_ for _ in ()).throw(ValueError("a bad batch")))
    with pytest.raises(RuntimeError, match=r"never called its output embeddings.*ValueError: a bad batch"):
        trainer.train()


# --- fused_cross_entropy ---

class _PerItemBertForMaskedLM(transformers.BertForMaskedLM):
    """A masked LM whose loss is the labelled positions' summed cross-entropy over
    num_items_in_batch (their mean without it), as transformers' ForMaskedLMLoss computes it."""

    def forward(self, input_ids=None, labels=None, num_items_in_batch=None, **kwargs):
        out = super().forward(input_ids=input_ids, **kwargs)
        if labels is not None:
            nll = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), labels.flatten(), reduction="none")
            count = (labels != -100).sum() if num_items_in_batch is None else num_items_in_batch
            out["loss"] = nll.sum() / count
        return out


class _DoubledLossBertForMaskedLM(transformers.BertForMaskedLM):
    """A masked LM whose loss is not the cross-entropy of its logits."""

    def forward(self, input_ids=None, labels=None, **kwargs):
        out = super().forward(input_ids=input_ids, labels=labels, **kwargs)
        if labels is not None:
            out["loss"] = 2 * out["loss"]
        return out


def _tiny_subclass(cls):
    torch.manual_seed(0)
    return cls(tiny("bert").config).eval()


def test_masked_lm_nll_is_the_cross_entropy_of_the_labelled_positions():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, 11, generator=g) * 4
    labels = torch.randint(0, 11, (2, 5), generator=g).masked_fill_(torch.rand(2, 5, generator=g) < 0.4, -100)
    total, count = _masked_lm_nll(logits, labels)
    # restated: -log softmax(logits)[label], summed over the labelled positions, in float64
    logp = logits.double().log_softmax(-1)
    keep = labels != -100
    want = -logp[keep].gather(1, labels[keep][:, None]).sum()
    assert int(count) == int(keep.sum()) and total.dtype == torch.float32
    torch.testing.assert_close(total.double(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("model,args,labelled_positions_only", [
    ("xlmr", {}, False), ("bert", {"gradient_accumulation_steps": 2}, False), ("bert", {}, True),
    ("per item", {"gradient_accumulation_steps": 2}, False)])
@pytest.mark.slow  # 5 runs of both phases: ~16 s
def test_fused_cross_entropy_trains_the_same_sft_and_logs_the_same_loss(tmp_path, model, args, labelled_positions_only):
    # the model's own loss (fused_cross_entropy=False) is the statement of the math; with 2 micro-batches a
    # "per item" loss divides by both batches' labelled count, a mean loss by its own
    build = (lambda: _tiny_subclass(_PerItemBertForMaskedLM)) if model == "per item" else (lambda: tiny(model))
    got, got_losses, _ = _lt_sft_run(tmp_path, build(), labelled_positions_only, fused_cross_entropy=True, **args)
    want, want_losses, _ = _lt_sft_run(tmp_path, build(), labelled_positions_only, **args)
    _assert_same_run(got, want, got_losses, want_losses)


def test_fused_cross_entropy_learns_a_per_item_loss_over_many_labelled_positions(tmp_path):
    # The first step told the rules apart with num_items_in_batch = count + 1: past 1e5 labelled positions
    # total / (count + 1) is within float32's 1e-5 of the mean, so a per-item model was read as "mean" and,
    # with 2 micro-batches a step, its loss was twice the model's own (9.14 logged for 4.57)
    trainer = LotteryTicketSparseFineTuner(
        model=_tiny_subclass(_PerItemBertForMaskedLM), args=_args(tmp_path, gradient_accumulation_steps=2),
        train_dataset=_LMData(), fused_cross_entropy=True,
        sft_args=SftArguments(ft_params_num=50, full_ft_max_steps_per_iteration=1, sparse_ft_max_steps_per_iteration=1))
    ids = torch.randint(3, VOCAB, (16384, 8), generator=torch.Generator().manual_seed(4))  # 131072 labelled
    num_items = 2 * ids.numel()  # this micro-batch and another as large
    loss = trainer.compute_loss(trainer.model, {"input_ids": ids, "labels": ids}, num_items_in_batch=num_items)
    # restated: the summed cross-entropy over the step's labelled positions
    with torch.no_grad():
        logits = trainer.model(input_ids=ids).logits
    want = torch.nn.functional.cross_entropy(logits.flatten(0, 1).double(), ids.flatten(), reduction="sum") / num_items
    assert trainer._loss_rule == "per item"
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=0)


def test_fused_cross_entropy_calls_the_model_without_labels_after_the_first_step(tmp_path, monkeypatch):
    model = tiny("xlmr")
    calls, nlls = [], []
    nll = lt_sft._masked_lm_nll
    # one NLL over the logits a step: the first step learns its rule from the NLL it trains with
    monkeypatch.setattr(lt_sft, "_masked_lm_nll", lambda *a: nlls.append(torch.is_grad_enabled()) or nll(*a))
    forward = model.forward

    def spy(input_ids=None, labels=None, **kwargs):
        if torch.is_grad_enabled():  # a training step's, not phase 2's probe of which layers the forward reads
            calls.append(labels is not None)
        return forward(input_ids=input_ids, labels=labels, **kwargs)

    model.forward = spy
    trainer = LotteryTicketSparseFineTuner(
        model=model, args=_args(tmp_path, per_device_train_batch_size=4), train_dataset=_MaskedLMData(),
        fused_cross_entropy=True,
        sft_args=SftArguments(ft_params_num=50, full_ft_max_steps_per_iteration=2, sparse_ft_max_steps_per_iteration=2))
    trainer.train()
    assert trainer._loss_rule == "mean" and calls == [True, False, False, False] and nlls == [True] * 4


def test_fused_cross_entropy_is_refused_where_it_cannot_hold(tmp_path):
    for model, flag, args, error, match in [
            (tiny("llama"), True, {}, ValueError, "fused_cross_entropy: a masked-LM model"),
            (tiny("bert"), "yes", {}, TypeError, "fused_cross_entropy must be a bool"),
            (tiny("bert"), True, {"label_smoothing_factor": 0.1}, ValueError, "fused_cross_entropy: the loss would be")]:
        with pytest.raises(error, match=match):
            LotteryTicketSparseFineTuner(model=model, args=_args(tmp_path, **args), train_dataset=_LMData(),
                                         fused_cross_entropy=flag)
    trainer = LotteryTicketSparseFineTuner(
        model=_tiny_subclass(_DoubledLossBertForMaskedLM), args=_args(tmp_path), train_dataset=_MaskedLMData(),
        fused_cross_entropy=True,
        sft_args=SftArguments(ft_params_num=50, full_ft_max_steps_per_iteration=1, sparse_ft_max_steps_per_iteration=1))
    with pytest.raises(ValueError, match="_DoubledLossBertForMaskedLM's loss .* is neither the mean"):
        trainer.train()


# --- composition ---

def _task_model(mlm):
    cfg = copy.deepcopy(mlm.config)
    cfg.num_labels = 3
    torch.manual_seed(7)
    task = transformers.BertForTokenClassification(cfg)
    task.bert.load_state_dict(mlm.bert.state_dict(), strict=False)
    return _no_dropout(task)


def test_language_and_task_sfts_compose_on_a_task_model(tmp_path):
    lang = LotteryTicketSparseFineTuner(model=_no_dropout(tiny("bert")), args=_args(tmp_path / "l"),
                                        train_dataset=_LMData(seed=1),
                                        sft_args=SftArguments(ft_params_num=300, full_ft_max_steps_per_iteration=2,
                                                              sparse_ft_max_steps_per_iteration=2))
    lang.train()
    task_model = _task_model(tiny("bert"))
    task_base = copy.deepcopy(task_model)
    task = LotteryTicketSparseFineTuner(model=task_model, args=_args(tmp_path / "t"), train_dataset=_TagData(seed=2),
                                        sft_args=SftArguments(ft_params_num=300, full_ft_max_steps_per_iteration=2,
                                                              sparse_ft_max_steps_per_iteration=2))
    task.train()
    assert set(lang.sft.absolute) and set(task.sft.absolute) == {"classifier.weight", "classifier.bias"}
    model = copy.deepcopy(task_base)
    with pytest.raises(KeyError):  # the language SFT's MLM head has no place in a task model
        xlsparse.apply([lang.sft, task.sft], model)
    with pytest.raises(ValueError, match="with_abs"):
        SparseDiff.merge([lang.sft, lang.sft])
    # composable-sft's way, restated: θ0 + φ_lang + φ_task on the body, heads skipped
    expected = {n: p.detach().clone() for n, p in task_base.named_parameters()}
    with torch.no_grad():
        for diff in (lang.sft, task.sft):
            for n, d in diff.deltas.items():
                expected[n].view(-1)[d.indices.long()] += d.values
    with xlsparse.apply([lang.sft, task.sft], model, with_abs=False):
        for n, p in model.named_parameters():
            torch.testing.assert_close(p, expected[n], atol=1e-6, rtol=0)
    merged = SparseDiff.merge([lang.sft, task.sft], with_abs=False)
    assert not merged.absolute
    with merged.applied(model):
        for n, p in model.named_parameters():
            torch.testing.assert_close(p, expected[n], atol=1e-6, rtol=0)
    # with the task's classifier: strip only the language SFT's head
    with xlsparse.apply([lang.sft.without_absolute(), task.sft], model):
        torch.testing.assert_close(model.classifier.weight, task.sft.absolute["classifier.weight"])
        ids = _LMData(seed=3).ids
        composed = model(input_ids=ids).logits
    assert not torch.equal(composed, task_base(input_ids=ids).logits)
    # the command line, with the task model class named explicitly
    task_base.save_pretrained(tmp_path / "base")
    lang.sft.save(str(tmp_path / "lang.safetensors"))
    task.sft.save(str(tmp_path / "task.safetensors"))
    common = ["compose", str(tmp_path / "base"), str(tmp_path / "lang.safetensors"), str(tmp_path / "task.safetensors")]
    assert cli.main(common + ["--out", str(tmp_path / "bad")]) == 1
    assert cli.main(common + ["--no-abs", "--model-class", "BertForTokenClassification",
                              "--out", str(tmp_path / "out")]) == 0
    out = transformers.BertForTokenClassification.from_pretrained(tmp_path / "out")
    for n, p in out.named_parameters():
        torch.testing.assert_close(p, expected[n], atol=1e-6, rtol=0)
    # composable-sft's recipe: the language SFT without its head, the task SFT with its classifier
    assert cli.main(common + ["--no-abs-of", str(tmp_path / "lang.safetensors"), "--model-class",
                              "BertForTokenClassification", "--out", str(tmp_path / "recipe")]) == 0
    recipe = transformers.BertForTokenClassification.from_pretrained(tmp_path / "recipe")
    expected.update({n: t for n, t in task.sft.absolute.items()})
    for n, p in recipe.named_parameters():
        torch.testing.assert_close(p, expected[n], atol=1e-6, rtol=0)
    # onto the pretrained masked LM itself, as composable-sft's scripts load it with the task's num_labels
    tiny("bert").save_pretrained(tmp_path / "mlm")  # the pretrained body the task model was built on
    onto_mlm = ["compose", str(tmp_path / "mlm"), *common[2:], "--no-abs-of", str(tmp_path / "lang.safetensors"),
                "--model-class", "BertForTokenClassification"]
    assert cli.main(onto_mlm + ["--out", str(tmp_path / "two")]) == 1  # the config's 2 labels: not the task's 3
    assert cli.main(onto_mlm + ["--num-labels", "0", "--out", str(tmp_path / "none")]) == 1
    assert not os.path.exists(tmp_path / "two") and not os.path.exists(tmp_path / "none")
    assert cli.main(onto_mlm + ["--num-labels", "3", "--out", str(tmp_path / "three")]) == 0
    three = transformers.BertForTokenClassification.from_pretrained(tmp_path / "three")
    assert three.config.num_labels == 3
    for n, p in three.named_parameters():
        torch.testing.assert_close(p, expected[n], atol=1e-6, rtol=0)
    assert cli.main(common + ["--no-abs-of", "other.safetensors", "--out", str(tmp_path / "y")]) == 1
    assert cli.main(common + ["--model-class", "NoSuchModel", "--out", str(tmp_path / "x")]) == 1


# --- multi-source training ---

def test_keep_updates_revert_versus_the_exact_revert():
    model = tiny("bert")
    name = "bert.encoder.layer.0.attention.self.query.weight"
    w = dict(model.named_parameters())[name]
    before = w.detach().clone()
    idx = torch.tensor([3, 10, 40])
    diff = SparseDiff({name: xlsparse.SparseDelta(idx, torch.tensor([0.5, -0.25, 1.0]), w.shape)})
    # training revert: a change made while applied survives, untouched entries return bit-exactly
    handle = KeepUpdatesHandle(diff, model)
    with torch.no_grad():
        w.view(-1)[10] += 0.125   # an update on a diff entry
        w.view(-1)[11] += 0.0625  # an update off the diff
    handle.revert()
    expected = before.clone()
    expected.view(-1)[10] += 0.125
    expected.view(-1)[11] += 0.0625
    torch.testing.assert_close(w, expected, atol=1e-7, rtol=0)
    assert torch.equal(w.view(-1)[[3, 40]], before.view(-1)[[3, 40]])
    # the exact revert (evaluation's): the diff's entries come back as they were
    with torch.no_grad():
        w.copy_(before)
    with diff.applied(model):
        with torch.no_grad():
            w.view(-1)[10] += 0.125
    assert torch.equal(w, before)


def test_keep_updates_revert_returns_unchanged_entries_bit_exactly():
    # the revert added every entry's change, zero too: -0.0 came back +0.0 and an inf NaN (inf - inf)
    model = tiny("bert")
    name = "bert.encoder.layer.0.attention.self.query.weight"
    w = dict(model.named_parameters())[name]
    with torch.no_grad():
        w.view(-1)[[3, 10, 40]] = torch.tensor([-0.0, float("inf"), 0.75])
    before = w.detach().clone()
    diff = SparseDiff({name: xlsparse.SparseDelta(torch.tensor([3, 10, 40]), torch.tensor([0.5, -0.25, 1.0]), w.shape)})
    handle = KeepUpdatesHandle(diff, model)
    with torch.no_grad():
        w.view(-1)[40] += 0.125
    handle.revert()
    expected = before.clone()
    expected.view(-1)[40] += 0.125
    assert torch.equal(w.view(torch.int32), expected.view(torch.int32))  # bits: -0.0 is not +0.0


_SOURCE_NAMES = ["bert.encoder.layer.0.attention.self.query.weight", "bert.encoder.layer.1.output.dense.weight"]


def _source_sfts(base, k: int = 30, names=tuple(_SOURCE_NAMES)) -> dict:
    """Random language SFTs "de" and "fr" on the tiny BERT's matrices `names`, k entries each
    (k < 1: that share of each)."""
    params = dict(base.named_parameters())
    g = torch.Generator().manual_seed(5)
    sources = {}
    for lang in ("de", "fr"):
        deltas = {}
        for n in names:
            size = params[n].numel()
            count = int(k * size) if k < 1 else k
            idx = torch.randperm(size, generator=g)[:count].sort().values
            deltas[n] = xlsparse.SparseDelta(idx, 0.5 * torch.randn(count, generator=g), params[n].shape)
        sources[lang] = SparseDiff(deltas)
    return sources


def _assert_same_sft(a, b, where=None) -> None:
    """The two SFTs are bit-identical: the same entries with the same values, the same heads."""
    assert set(a.deltas) == set(b.deltas) and set(a.absolute) == set(b.absolute), where
    for n in a.deltas:
        assert torch.equal(a.deltas[n].indices, b.deltas[n].indices), (where, n)
        assert torch.equal(a.deltas[n].values, b.deltas[n].values), (where, n)
    for n in a.absolute:
        assert torch.equal(a.absolute[n], b.absolute[n]), (where, n)


def _assert_sft_holds(trainer, trainable: dict) -> None:
    """trainer.sft holds the restated parameters `trainable` ({name: p}) as deltas from θ0 (or whole)."""
    got = trainer.sft
    for n, p in trainable.items():
        if n in got.deltas:
            idx = got.deltas[n].indices.long()
            torch.testing.assert_close(got.deltas[n].values, (p - trainer._theta0[n]).reshape(-1)[idx].detach(),
                                       atol=2e-5, rtol=1e-3)
        elif n in got.absolute:
            torch.testing.assert_close(got.absolute[n], p.detach(), atol=2e-5, rtol=1e-3)


@pytest.mark.parametrize("l1", [0.0, 2000.0])
def test_multi_source_training_applies_each_batch_source_sft(tmp_path, l1):
    # with the L1 term taken on |θ − θ0| after the revert (the module docstring says why); the
    # sources cover half of the embeddings too, where most selected entries are
    base = _no_dropout(tiny("bert"))
    names = _SOURCE_NAMES + ["bert.embeddings.word_embeddings.weight", "bert.embeddings.position_embeddings.weight"]
    params = dict(base.named_parameters())
    sources = _source_sfts(base, k=0.5, names=names)
    data = {"de": _LMData(n=4, seed=1), "fr": _LMData(n=4, seed=2)}
    dataset = MultiSourceDataset(data)
    assert len(dataset) == 8 and dataset[0][SOURCE_KEY] == "de" and dataset[7][SOURCE_KEY] == "fr"
    model = copy.deepcopy(base)
    trainer = LotteryTicketSparseFineTuner(
        model=model, args=_args(tmp_path, per_device_train_batch_size=4), train_dataset=dataset, source_sfts=sources,
        sft_args=SftArguments(ft_params_num=200, full_ft_max_steps_per_iteration=2, sparse_ft_max_steps_per_iteration=2,
                              full_l1_reg=l1, sparse_l1_reg=l1))
    order = []
    original = trainer._activate

    def spy(source, training):
        order.append(source)
        return original(source, training)

    trainer._activate = spy
    trainer.train()
    assert len(order) == 4 and set(order) == {"de", "fr"}
    # restated: the same sources in the same order, each batch's loss and gradient at θ + φ_source,
    # the step on θ; masks from the trainer's own selection (phase 1 is checked elsewhere)
    ref = copy.deepcopy(base)
    trainable = {n: p for n, p in ref.named_parameters() if n in trainer._theta0}
    masks = {n: trainer._masks.get(n) for n in trainer.maskable}
    opt = torch.optim.AdamW(list(trainable.values()), lr=1e-2, weight_decay=0.0)
    for source in order[2:]:
        opt.zero_grad()
        ids = data[source].ids
        with sources[source].applied(ref):
            ref(input_ids=ids, labels=ids).loss.backward()
        n_all = sum(p.numel() for p in ref.parameters())
        with torch.no_grad():
            for n, p in trainable.items():
                p.grad += l1 / n_all * (p - trainer._theta0[n]).sign()
        for n in trainer.maskable:
            grad = trainable[n].grad
            keep = torch.zeros(grad.numel(), dtype=torch.bool)
            if masks[n] is not None:
                keep[masks[n].long()] = True
            grad.mul_(keep.view_as(grad))
        opt.step()
    _assert_sft_holds(trainer, trainable)
    got = trainer.sft
    # the base weights the source SFTs touched are back to θ0 bit-exactly outside the SFT
    for n in names:
        p = dict(model.named_parameters())[n]
        off = torch.ones(p.numel(), dtype=torch.bool)
        if n in got.deltas:
            off[got.deltas[n].indices.long()] = False
        assert torch.equal(p.reshape(-1)[off], params[n].reshape(-1)[off])


@pytest.mark.parametrize("l1", [0.0, 2000.0])
def test_multi_source_gradient_accumulation_gives_each_micro_batch_its_source_sft(tmp_path, l1):
    # one optimizer step accumulates micro-batches of different sources: each runs its forward and
    # backward under its own source SFT, and the L1 term enters once per step with G (= 2) as factor
    base = _no_dropout(tiny("bert"))
    sources = _source_sfts(base, k=0.5, names=_SOURCE_NAMES + ["bert.embeddings.word_embeddings.weight"])
    data = MultiSourceDataset({"de": _LMData(n=4, seed=1), "fr": _LMData(n=4, seed=2)})
    trainer = LotteryTicketSparseFineTuner(
        model=copy.deepcopy(base), args=_args(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2),
        train_dataset=data, source_sfts=sources,
        sft_args=SftArguments(ft_params_num=200, full_ft_max_steps_per_iteration=2, sparse_ft_max_steps_per_iteration=2,
                              full_l1_reg=l1, sparse_l1_reg=l1))
    micro, step = [], trainer.training_step

    def training_step(model, inputs, *args):
        micro.append((trainer._phase, inputs[SOURCE_KEY], inputs["input_ids"].clone()))
        return step(model, inputs, *args)

    trainer.training_step = training_step
    trainer.train()
    sparse = [(source, ids) for phase, source, ids in micro if phase == "sparse"]
    assert len(sparse) == 4 and any(sparse[i][0] != sparse[i + 1][0] for i in (0, 2))  # a step mixing sources
    ref = copy.deepcopy(base)
    trainable = {n: p for n, p in ref.named_parameters() if n in trainer._theta0}
    opt = torch.optim.AdamW(list(trainable.values()), lr=1e-2, weight_decay=0.0)
    n_all = sum(p.numel() for p in ref.parameters())
    for first in (0, 2):
        opt.zero_grad()
        for source, ids in sparse[first:first + 2]:  # BERT's loss is a mean: each micro-batch's is divided by G
            with sources[source].applied(ref):
                (ref(input_ids=ids, labels=ids).loss / 2).backward()
        with torch.no_grad():
            for n, p in trainable.items():
                p.grad += 2 * l1 / n_all * (p - trainer._theta0[n]).sign()
                if n in trainer.maskable:
                    keep = torch.zeros(p.numel(), dtype=torch.bool)
                    if n in trainer._masks:
                        keep[trainer._masks[n].long()] = True
                    p.grad.mul_(keep.view_as(p))
        opt.step()
    _assert_sft_holds(trainer, trainable)


# --- the new layers ---

def test_sparse_delta_embedding_equals_the_dense_table():
    torch.manual_seed(0)
    emb = torch.nn.Embedding(13, 6, padding_idx=0)
    layer = SparseDeltaEmbedding.from_embedding(emb, k=30)
    with torch.no_grad():
        layer.delta_values.normal_()
    ids = torch.tensor([[0, 3, 3, 12], [2, 0, 5, 1]])
    out = layer(ids)
    # the same table as a plain embedding, the delta as a dense trainable offset
    dense = torch.zeros(78)
    dense[layer.delta_indices.long()] = layer.delta_values.detach()
    dense.requires_grad_(True)
    table = (emb.weight.detach().reshape(-1) + dense).view(13, 6)
    ref = torch.nn.functional.embedding(ids, table, padding_idx=0)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(layer.delta_values.grad, dense.grad[layer.delta_indices.long()])
    assert layer.weight.grad is None
    with pytest.raises(ValueError, match="max_norm"):
        SparseDeltaEmbedding.from_embedding(torch.nn.Embedding(5, 2, max_norm=1.0), k=1)


def test_sparse_delta_embedding_refuses_a_scaled_embedding_subclass():
    """XGLM's word embedding multiplies its lookup by embed_scale (sqrt(32) here): from_embedding
    took it as a plain table and the converted layer's output missed the scale (0.29 off)."""
    scaled = tiny("xglm").model.embed_tokens
    assert type(scaled) is not torch.nn.Embedding and scaled.embed_scale != 1.0
    with pytest.raises(TypeError, match="XGLMScaledWordEmbedding"):
        SparseDeltaEmbedding.from_embedding(scaled, k=10)


def test_sparse_delta_embedding_takes_a_negative_padding_idx_from_the_end():
    """nn.Embedding counts a negative padding_idx from the end; compared as given, no token
    matched it and the padding row's delta entries got gradients."""
    layer = SparseDeltaEmbedding(torch.randn(5, 3), torch.tensor([6, 7, 8, 9]), padding_idx=-3)
    with torch.no_grad():
        layer.delta_values.normal_()
    layer(torch.tensor([2, 3, 2])).sum().backward()
    assert layer.padding_idx == 2
    assert torch.equal(layer.delta_values.grad, torch.tensor([0.0, 0.0, 0.0, 1.0]))  # row 2 none, row 3 one token
    with pytest.raises(ValueError, match="padding_idx"):
        SparseDeltaEmbedding(torch.randn(5, 3), torch.tensor([0]), padding_idx=5)


def test_sparse_delta_embedding_takes_int32_ids_on_a_table_past_2_to_the_31_entries():
    """int32 ids times the row width wrapped in int32: on a [2**20, 2**12] table the last row's
    delta entries were not found and its token got W0's row alone."""
    rows, width = 2 ** 20, 2 ** 12
    layer = SparseDeltaEmbedding(torch.zeros(1, 1).expand(rows, width), torch.tensor([(rows - 1) * width + 3]))
    with torch.no_grad():
        layer.delta_values.fill_(1.0)
    for dtype in (torch.int64, torch.int32):
        out = layer(torch.tensor([rows - 1], dtype=dtype))
        assert out[0].nonzero().flatten().tolist() == [3], dtype


def test_sparse_delta_embedding_sums_a_frequent_tokens_gradient_in_float32():
    """A token seen 4096 times with dOut = 1 in bfloat16: its entries' gradient is 4096. The
    gather's backward added the occurrences one at a time in bf16 on the CPU and stopped at 256
    (256 + 1 rounds to 256), so a frequent token's delta trained 16x too slowly."""
    layer = SparseDeltaEmbedding(torch.zeros(10, 4, dtype=torch.bfloat16), torch.arange(40))
    out = layer(torch.full((4096,), 3))
    assert out.dtype == torch.bfloat16
    out.backward(torch.ones(4096, 4, dtype=torch.bfloat16))
    assert layer.delta_values.grad.view(10, 4)[3].tolist() == [4096.0] * 4
    assert not layer.delta_values.grad.view(10, 4)[[0, 1, 2, 4, 5, 6, 7, 8, 9]].any()


def test_set_support_keeps_the_module_and_parameter():
    lin = torch.nn.Linear(5, 4)
    layer = SparseDeltaLinear.from_linear(lin, k=6)
    values, buffer = layer.delta_values, layer.delta_indices
    new = torch.tensor([0, 2, 7, 8, 15, 19], dtype=buffer.dtype)
    layer.set_support(new, torch.arange(6.0))
    assert layer.delta_values is values and layer.delta_indices is buffer and torch.equal(buffer, new)
    x = torch.randn(3, 5)
    w = lin.weight.detach().clone()
    w.view(-1)[new.long()] += torch.arange(6.0)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, w, lin.bias))
    layer.set_support(torch.tensor([1, 3], dtype=buffer.dtype))  # a new K: same Parameter object
    assert layer.delta_values is values and values.numel() == 2 and not values.detach().any()
    with pytest.raises(ValueError):
        layer.set_support(torch.tensor([3, 1]))
    # values as [1, K] read "2 indices but 2 values"; int values were cast to the layer's dtype silently
    with pytest.raises(ValueError, match=r"values of shape \(1, 2\); one per index, 1-D"):
        layer.set_support(torch.tensor([1, 3]), torch.ones(1, 2))
    with pytest.raises(TypeError, match="set_support: values must be floating point"):
        layer.set_support(torch.tensor([1, 3]), torch.tensor([1, 2]))


# --- SpIEL-style dynamic reselection ---

def _restated_dynamic_phase(model, batch, masks, theta0, heads, steps, lr, every, window, fraction):
    """Phase 2 with SpIEL's drop/regrow in plain torch: Adam by hand with per-entry step counts
    on dense tensors; every `every` steps (not after the last), per 2-D tensor: drop the
    int(fraction(step)·K) smallest |θ − θ0| (stable), regrow as many largest |Σ grad over the last
    `window` steps| among entries not kept (stable); dropped go to θ0, dropped/regrown get zero
    state and step 0. `fraction`: a number, or the rate as a function of the step."""
    rate = fraction if callable(fraction) else (lambda step: fraction)
    params = dict(model.named_parameters())
    names = list(masks) + list(heads)
    state = {n: [torch.zeros_like(params[n]) for _ in range(2)] + [torch.zeros_like(params[n], dtype=torch.int32)]
             for n in names}
    b1, b2, eps = 0.9, 0.999, 1e-8
    acc = {}
    for step in range(1, steps + 1):
        model.zero_grad()
        model(**batch).loss.backward()
        if (-step) % every < window and step < steps:
            for n in masks:
                if params[n].dim() == 2:
                    acc[n] = acc.get(n, 0) + params[n].grad.detach().clone()
        with torch.no_grad():
            for n in names:
                p, (m, v, t) = params[n], state[n]
                sel = masks[n] if n in masks else torch.ones_like(p, dtype=torch.bool)
                g = p.grad
                m.copy_(torch.where(sel, b1 * m + (1 - b1) * g, m))
                v.copy_(torch.where(sel, b2 * v + (1 - b2) * g * g, v))
                t += sel.to(torch.int32)
                tf = t.to(p.dtype).clamp(min=1)
                step_size = lr / (1 - b1 ** tf)
                denom = (v.sqrt() / (1 - b2 ** tf).sqrt()) + eps
                p.copy_(torch.where(sel, p - step_size * m / denom, p))
            if step % every == 0 and step < steps:
                for n in list(acc):
                    mask, p = masks[n], params[n]
                    flat = mask.reshape(-1)
                    idx = flat.nonzero().flatten()
                    k_drop = int(rate(step) * idx.numel())
                    delta = (p - theta0[n]).reshape(-1)[idx].abs()
                    drop = idx[torch.sort(delta, stable=True).indices[:k_drop]]
                    kept = flat.clone()
                    kept[drop] = False
                    cand = (~kept).nonzero().flatten()
                    grow = cand[torch.sort(acc[n].abs().reshape(-1)[cand], descending=True, stable=True).indices[:k_drop]]
                    new = kept.clone()
                    new[grow] = True
                    gone, fresh = flat & ~new, new & ~flat
                    p.view(-1)[gone] = theta0[n].reshape(-1)[gone]
                    for s in state[n]:
                        s.view(-1)[gone | fresh] = 0
                    flat.copy_(new)
                acc = {}
    return {n: ((params[n] - theta0[n]).reshape(-1)[m.reshape(-1)], m) for n, m in masks.items()}


# SpIEL's reselection_rate_policy (AlanAnsell/peft, SftSelector.end_selection_phase), restated:
# the rate after step s of T, from the initial rate f
_SPIEL_RATES = {"constant": lambda f, s, t: f, "linear": lambda f, s, t: f * (1 - s / t),
                "cosine": lambda f, s, t: f * (1 + math.cos(math.pi * s / t)) / 2}


@pytest.mark.parametrize("policy", list(_SPIEL_RATES))
def test_dynamic_reselection_matches_a_plain_torch_restatement(tmp_path, policy):
    from xlsparse.hf.lt_sft import DynamicSftArguments

    data = _LMData(n=8)
    batch = {"input_ids": data.ids, "labels": data.ids}
    model = _no_dropout(tiny("bert"))
    reference = copy.deepcopy(model)
    sft_args = DynamicSftArguments(ft_params_num=400, full_ft_max_steps_per_iteration=2, sparse_ft_max_steps_per_iteration=7,
                                   reselection_steps=3, selection_accumulation_steps=2, drop_fraction=0.5,
                                   reselection_rate_policy=policy)
    trainer = LotteryTicketSparseFineTuner(model=model, args=_args(tmp_path), train_dataset=data, sft_args=sft_args)
    initial = {}

    class _Grab(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if trainer._phase == "sparse":
                initial.update({n: m.clone() for n, m in trainer._masks.items()})

    trainer.add_callback(_Grab())
    trainer.train()
    theta0 = trainer._theta0
    masks = {}
    for n in trainer.maskable:
        m = torch.zeros(theta0[n].numel(), dtype=torch.bool)
        if n in initial:
            m[initial[n].long()] = True
        masks[n] = m.view_as(theta0[n])
    heads = [n for n in theta0 if n not in trainer.maskable]
    for n, p in reference.named_parameters():
        p.requires_grad_(n in theta0)
    expected = _restated_dynamic_phase(reference, batch, masks, theta0, heads, 7, 1e-2, 3, 2,
                                       lambda step: _SPIEL_RATES[policy](0.5, step, 7))
    got = trainer.sft
    moved = 0
    for n, (values, mask) in expected.items():
        idx = mask.reshape(-1).nonzero().flatten()
        if not idx.numel():
            assert n not in got.deltas
            continue
        assert torch.equal(got.deltas[n].indices.long(), idx), n
        torch.testing.assert_close(got.deltas[n].values, values, atol=2e-5, rtol=1e-3)
        before = initial[n].long() if n in initial else torch.zeros(0, dtype=torch.long)
        moved += int((~torch.isin(idx, before)).sum())
    assert got.nnz == 400
    assert moved > 0  # the support did change


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_dynamic_mode_names_the_matrices_it_cannot_reselect(tmp_path, arch):
    # GPT-2's Conv1D weights (8 of its 10 matrices here) train through the compact optimizer:
    # only wte and wpe were reselected, silently
    sft_args = DynamicSftArguments(ft_params_num=400, full_ft_max_steps_per_iteration=1, sparse_ft_max_steps_per_iteration=3,
                                   reselection_steps=2, selection_accumulation_steps=1, drop_fraction=0.5)
    trainer = LotteryTicketSparseFineTuner(model=tiny(arch), train_dataset=_LMData(), sft_args=sft_args, args=_args(tmp_path))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        trainer.train()
    said = [str(w.message) for w in seen if "keep their phase-1 support" in str(w.message)]
    if arch == "gpt2":
        assert len(said) == 1 and "8 matrices" in said[0] and "transformer.h.0.attn.c_attn.weight" in said[0]
    else:  # every matrix is a SparseDelta layer
        assert not said


@pytest.mark.parametrize("every", [4, 6])
def test_a_dynamic_phase_no_longer_than_reselection_steps_is_refused_before_training(tmp_path, every):
    # a reselection follows a reselection_steps-th step but never the last: a sparse phase of at most
    # reselection_steps steps ran exactly static LT-SFT, silently. 2 epochs of 2 batches: 4 steps
    sft_args = DynamicSftArguments(ft_params_num=300, full_ft_max_steps_per_iteration=1,
                                   sparse_ft_max_epochs_per_iteration=2, reselection_steps=every,
                                   selection_accumulation_steps=1)
    trainer = LotteryTicketSparseFineTuner(model=tiny("bert"), train_dataset=_LMData(n=8), sft_args=sft_args,
                                           args=_args(tmp_path, per_device_train_batch_size=4))
    with pytest.raises(ValueError, match=f"reselection_steps = {every}: the sparse phase runs 4 optimizer steps"):
        trainer.train()
    assert not os.listdir(tmp_path) and not trainer._masks
    for (n, p), q in zip(trainer.model.named_parameters(), tiny("bert").parameters()):
        assert torch.equal(p, q), n


def test_dynamic_mode_with_only_biases_and_norms_maskable_is_refused_at_construction(tmp_path):
    # their supports are never reselected: the run was static LT-SFT under the dynamic name, silently
    model = tiny("bert")
    vectors = [n for n, p in model.named_parameters() if p.dim() == 1]
    sft_args = DynamicSftArguments(ft_params_num=20, full_ft_max_steps_per_iteration=1,
                                   sparse_ft_max_steps_per_iteration=4, reselection_steps=2,
                                   selection_accumulation_steps=1)
    with pytest.raises(ValueError, match="no maskable parameter is a matrix"):
        LotteryTicketSparseFineTuner(model=model, train_dataset=_LMData(), sft_args=sft_args, args=_args(tmp_path),
                                     maskable_params=vectors)
    static = SftArguments(ft_params_num=20, full_ft_max_steps_per_iteration=1, sparse_ft_max_steps_per_iteration=4)
    LotteryTicketSparseFineTuner(model=model, train_dataset=_LMData(), sft_args=static, args=_args(tmp_path),
                                 maskable_params=vectors)  # static LT-SFT of vectors is fine


def test_dynamic_mode_names_the_tensors_too_small_to_drop_an_entry(tmp_path):
    # int(drop_fraction × K_t) = 0 for a tensor of fewer than 10 entries at 0.1: it never changed its
    # support, silently
    sft_args = DynamicSftArguments(ft_params_num=400, full_ft_max_steps_per_iteration=2,
                                   sparse_ft_max_steps_per_iteration=3, reselection_steps=2,
                                   selection_accumulation_steps=1, drop_fraction=0.1)
    trainer = LotteryTicketSparseFineTuner(model=tiny("bert"), train_dataset=_LMData(), sft_args=sft_args,
                                           args=_args(tmp_path))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        trainer.train()
    sizes = [d.indices.numel() for d in trainer.sft.deltas.values() if len(d.shape) == 2]  # all converted in bert
    small = [k for k in sizes if k < 10]
    assert small  # the case at hand
    said = [str(w.message) for w in seen if "drop none" in str(w.message)]
    assert said == [f"DynamicSftArguments.drop_fraction = 0.1: {len(small)} of the {len(sizes)} converted tensors "
                    f"holding entries drop none (int(rate × K_t) = 0 at the first reselection, rate 0.1; the smallest "
                    f"holds K_t = {min(small)}) and keep their phase-1 support (no reselection)"]


def test_dynamic_mode_keeps_gradient_buffers_only_for_tensors_that_drop_entries(tmp_path):
    # a tensor with int(drop_fraction × K_t) = 0 never reselects, yet got a dense float32 buffer
    # and a dYᵀX GEMM every step of each window
    sft_args = DynamicSftArguments(ft_params_num=400, full_ft_max_steps_per_iteration=2,
                                   sparse_ft_max_steps_per_iteration=3, reselection_steps=2,
                                   selection_accumulation_steps=1, drop_fraction=0.1)
    trainer = LotteryTicketSparseFineTuner(model=tiny("bert"), train_dataset=_LMData(), sft_args=sft_args,
                                           args=_args(tmp_path))
    buffered = []

    class _Spy(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if trainer._reselection.grads:  # the window's step, before the callback after it reselects
                sizes = {n: layers[0][2].delta_indices.numel() for n, layers in trainer._converted.items()}
                buffered.append((set(trainer._reselection.grads), {n for n, k in sizes.items() if int(0.1 * k) > 0},
                                 {n for n, k in sizes.items() if k}))

    trainer.callback_handler.callbacks.insert(0, _Spy())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    assert buffered
    for got, dropping, holding in buffered:
        assert got == dropping and dropping != holding  # some tensors hold entries but drop none


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_full_phase_that_diverged_is_named_before_the_selection(tmp_path, bad):
    # NaN: the selection raised topk_masks' "tensors[0] holds NaN", naming no parameter; inf: the
    # entry ranked first and was selected, silently
    trainer = LotteryTicketSparseFineTuner(
        model=tiny("bert"), args=_args(tmp_path), train_dataset=_LMData(),
        sft_args=SftArguments(ft_params_num=50, full_ft_max_steps_per_iteration=1, sparse_ft_max_steps_per_iteration=1))
    name = "bert.encoder.layer.1.output.dense.weight"

    class _Diverge(transformers.TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kwargs):
            if trainer._phase == "full":
                with torch.no_grad():
                    dict(model.named_parameters())[name][0, 1] = bad

    trainer.add_callback(_Diverge())
    with pytest.raises(ValueError, match=rf"the full phase left NaN or inf in 1 maskable parameters, e.g. \['{name}'\]"):
        trainer.train()
    assert not trainer._masks


def test_resuming_a_sparse_checkpoint_continues_bit_exactly(tmp_path):
    sft_args = SftArguments(ft_params_num=300, full_ft_max_steps_per_iteration=2, sparse_ft_max_steps_per_iteration=3)
    whole = LotteryTicketSparseFineTuner(model=_no_dropout(tiny("bert")), train_dataset=_LMData(n=16), sft_args=sft_args,
                                         args=_args(tmp_path, save_strategy="steps", save_steps=1, weight_decay=0.01,
                                                    lr_scheduler_type="linear"))
    whole.train()
    resumed = LotteryTicketSparseFineTuner(model=_no_dropout(tiny("bert")), train_dataset=_LMData(n=16),
                                           sft_args=sft_args, args=_args(tmp_path / "again", weight_decay=0.01,
                                                                         lr_scheduler_type="linear",
                                                                         save_strategy="steps", save_steps=1))
    original = {c: (tmp_path / "sparse" / c / "sft.safetensors").read_bytes() for c in ("checkpoint-2", "checkpoint-3")}
    resumed.train(resume_from_checkpoint=str(tmp_path / "sparse" / "checkpoint-1"))
    # the resumed run writes its own output_dir and leaves the first run's checkpoints alone
    assert resumed.args.output_dir == str(tmp_path / "again")
    assert (tmp_path / "again" / "sparse" / "checkpoint-3" / "sft.safetensors").is_file()
    assert all((tmp_path / "sparse" / c / "sft.safetensors").read_bytes() == data for c, data in original.items())
    _assert_same_sft(whole.sft, resumed.sft)
    with pytest.raises(ValueError, match="sparse phase"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-1"))


@pytest.mark.parametrize("best", [False, True], ids=["last", "load-best"])
def test_resuming_the_last_checkpoint_of_a_round_goes_on_with_the_next_round_bit_exactly(tmp_path, best):
    # the Trainer checks max_steps only after a step: resumed within an epoch at its phase's last
    # step, round 0's sparse phase took a 3rd step of 2 (and round 1 started from another RNG state);
    # with load_best_model_at_end the phase's end loads its best checkpoint, not the last
    sft_args = SftArguments(ft_params_num=300, n_ft_iterations=2, full_ft_max_steps_per_iteration=1,
                            sparse_ft_max_steps_per_iteration=2)
    kw = dict(eval_strategy="steps", eval_steps=1, load_best_model_at_end=True, metric_for_best_model="eval_loss",
              greater_is_better=True) if best else {}

    def trainer(out):  # dropout on: round 1 draws from the RNG state round 0 left
        return LotteryTicketSparseFineTuner(model=tiny("bert"), train_dataset=_LMData(n=24), sft_args=sft_args,
                                            eval_dataset=_LMData(n=4, seed=9) if best else None,
                                            args=_args(out, save_strategy="steps", save_steps=1, **kw))

    whole = trainer(tmp_path)
    whole.train()
    if best:
        assert not whole.state.best_model_checkpoint.endswith("checkpoint-2")
    for checkpoint in ("iteration-0/sparse/checkpoint-2", "iteration-1/sparse/checkpoint-2"):
        resumed = trainer(tmp_path / "again" / checkpoint.replace("/", "-"))
        result = resumed.train(resume_from_checkpoint=str(tmp_path / checkpoint))
        assert result.global_step == 2  # the last sparse phase's (iteration-1: resumed at its end, no step left)
        _assert_same_sft(whole.sft, resumed.sft, checkpoint)
        for (n, p), q in zip(whole.model.named_parameters(), resumed.model.parameters()):
            assert torch.equal(p, q), (checkpoint, n)


def test_resuming_a_checkpoint_saved_with_save_only_model_is_refused_before_anything_changes(tmp_path):
    # it holds no optimizer, scheduler or RNG state: the sparse phase went on with fresh moments, silently
    sft_args = SftArguments(ft_params_num=300, full_ft_max_steps_per_iteration=2, sparse_ft_max_steps_per_iteration=3)
    LotteryTicketSparseFineTuner(model=tiny("bert"), train_dataset=_LMData(n=16), sft_args=sft_args,
                                 args=_args(tmp_path, save_strategy="steps", save_steps=1, save_only_model=True)).train()
    resumed = LotteryTicketSparseFineTuner(model=tiny("bert"), train_dataset=_LMData(n=16), sft_args=sft_args,
                                           args=_args(tmp_path / "again"))
    before = {n: p.detach().clone() for n, p in resumed.model.named_parameters()}
    with pytest.raises(ValueError, match="checkpoint-1 holds no optimizer.pt .*save_only_model"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "sparse" / "checkpoint-1"))
    for n, p in resumed.model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_resuming_a_dynamic_run_at_every_step_continues_bit_exactly(tmp_path):
    # a checkpoint inside a gradient window lost the sums so far: resumed from checkpoint-2, 6 tensors
    # ended on another support and the deltas differed by up to 0.0127
    def trainer(out, steps=7, **kw):
        return LotteryTicketSparseFineTuner(
            model=_no_dropout(tiny("bert")), train_dataset=_LMData(n=16),
            args=_args(out, weight_decay=0.01, lr_scheduler_type="linear", **kw),
            sft_args=DynamicSftArguments(ft_params_num=400, full_ft_max_steps_per_iteration=2,
                                         sparse_ft_max_steps_per_iteration=steps, reselection_steps=3,
                                         selection_accumulation_steps=2, drop_fraction=0.5,
                                         reselection_rate_policy="linear"))

    whole = trainer(tmp_path, save_strategy="steps", save_steps=1)
    whole.train()
    # steps 2-3 and 5-6 sum gradients for the reselections after steps 3 and 6
    sums = "reselection_gradients_0.safetensors"
    windowed = [c for c in range(1, 8) if (tmp_path / "sparse" / f"checkpoint-{c}" / sums).is_file()]
    assert windowed == [2, 5]
    for c in range(1, 8):
        resumed = trainer(tmp_path / f"again-{c}")
        resumed.train(resume_from_checkpoint=str(tmp_path / "sparse" / f"checkpoint-{c}"))
        _assert_same_sft(whole.sft, resumed.sft, c)
    # the linear drop rate decays over the phase's length: resumed with another, the resumed
    # reselections dropped other shares than the run's, silently
    with pytest.raises(ValueError, match=re.escape("sparse_phase_steps = 7 (this trainer: 9)")):
        trainer(tmp_path / "again", steps=9).train(resume_from_checkpoint=str(tmp_path / "sparse" / "checkpoint-3"))
    # each process summed its own batches: another number of processes cannot continue the window
    settings = tmp_path / "sparse" / "checkpoint-2" / "sparse_phase.json"
    settings.write_text(settings.read_text().replace('"gradient_sums": 1', '"gradient_sums": 2'))
    with pytest.raises(ValueError, match="resume it with 2 processes"):
        trainer(tmp_path / "again").train(resume_from_checkpoint=str(settings.parent))
    # a checkpoint written before the policy existed dropped at a constant rate: not this run's
    settings = tmp_path / "sparse" / "checkpoint-4" / "sparse_phase.json"
    written = json.loads(settings.read_text())
    del written["reselection_rate_policy"]
    settings.write_text(json.dumps(written))
    with pytest.raises(ValueError, match="reselection_rate_policy = 'constant' \\(this trainer: 'linear'\\)"):
        trainer(tmp_path / "again").train(resume_from_checkpoint=str(settings.parent))
    # one written before the window's sums were saved cannot say whether it lay inside one (a KeyError before)
    written = json.loads(settings.read_text())
    written["reselection_rate_policy"] = "linear"
    del written["gradient_sums"]
    settings.write_text(json.dumps(written))
    with pytest.raises(ValueError, match="did not record whether it lies inside a reselection's gradient window"):
        trainer(tmp_path / "again").train(resume_from_checkpoint=str(settings.parent))


def test_a_dynamic_run_taps_no_gradients_for_a_reselection_after_its_last_step(tmp_path):
    # windows end at the reselections after steps 4 and 8; the one for step 12 opened at step 10 of 11,
    # tapping dense gradients for two steps that no reselection used
    LotteryTicketSparseFineTuner(
        model=_no_dropout(tiny("bert")), train_dataset=_LMData(n=16), args=_args(tmp_path, save_strategy="steps",
                                                                                 save_steps=1),
        sft_args=DynamicSftArguments(ft_params_num=400, full_ft_max_steps_per_iteration=1,
                                     sparse_ft_max_steps_per_iteration=11, reselection_steps=4,
                                     selection_accumulation_steps=3, drop_fraction=0.5)).train()
    sums = "reselection_gradients_0.safetensors"
    assert [c for c in range(1, 12) if (tmp_path / "sparse" / f"checkpoint-{c}" / sums).is_file()] == [2, 3, 6, 7]


def test_resuming_with_other_sft_arguments_is_refused_before_anything_changes(tmp_path):
    # Built with another K or n_ft_iterations, the resumed run trained on the checkpoint's support
    # and left an SFT of 150 or 300 entries where its K was 300 or 600
    import shutil

    def sft_args(**kw):
        return SftArguments(**{"ft_params_num": 300, "n_ft_iterations": 2, "full_ft_max_steps_per_iteration": 1,
                               "sparse_ft_max_steps_per_iteration": 1, **kw})

    LotteryTicketSparseFineTuner(model=tiny("bert"), train_dataset=_LMData(), sft_args=sft_args(),
                                 args=_args(tmp_path, save_strategy="steps", save_steps=1)).train()
    shutil.copytree(tmp_path / "iteration-1", tmp_path / "iteration-5")
    for args, round_, match in [(sft_args(ft_params_num=600), 1, "has 300 entries"),
                                (sft_args(n_ft_iterations=1), 0, "has 150 entries"),
                                (sft_args(), 5, "round 5")]:
        resumed = LotteryTicketSparseFineTuner(model=tiny("bert"), train_dataset=_LMData(), sft_args=args,
                                               args=_args(tmp_path / "again"))
        with pytest.raises(ValueError, match=match):
            resumed.train(resume_from_checkpoint=str(tmp_path / f"iteration-{round_}" / "sparse" / "checkpoint-1"))
        assert not resumed._masks
        for (n, p), q in zip(resumed.model.named_parameters(), tiny("bert").parameters()):
            assert torch.equal(p, q), n


def test_resuming_with_other_sparse_phase_settings_is_refused_naming_them(tmp_path):
    # a dynamic run's checkpoint was resumed by a static trainer, or one with another drop_fraction,
    # and trained on the other way, silently
    base = dict(ft_params_num=300, full_ft_max_steps_per_iteration=1, sparse_ft_max_steps_per_iteration=3)
    dynamic = dict(reselection_steps=2, selection_accumulation_steps=1, drop_fraction=0.5)
    first = LotteryTicketSparseFineTuner(model=tiny("bert"), train_dataset=_LMData(), sft_args=DynamicSftArguments(
        **base, **dynamic), args=_args(tmp_path, save_strategy="steps", save_steps=1))
    first.train()
    checkpoint = tmp_path / "sparse" / "checkpoint-1"
    for sft_args, named in [
            (SftArguments(**base), "dynamic = True (this trainer: False), reselection_steps = 2 (this trainer: None)"),
            (DynamicSftArguments(**base, **{**dynamic, "drop_fraction": 0.1}),
             "drop_fraction = 0.5 (this trainer: 0.1)"),
            (DynamicSftArguments(**base, **dynamic, sparse_l1_reg=1.0), "sparse_l1_reg = 0.0 (this trainer: 1.0)")]:
        resumed = LotteryTicketSparseFineTuner(model=tiny("bert"), train_dataset=_LMData(), sft_args=sft_args,
                                               args=_args(tmp_path / "again"))
        with pytest.raises(ValueError, match=re.escape(named)):
            resumed.train(resume_from_checkpoint=str(checkpoint))
        assert not resumed._masks
        for (n, p), q in zip(resumed.model.named_parameters(), tiny("bert").parameters()):
            assert torch.equal(p, q), n
    os.remove(checkpoint / "sparse_phase.json")
    resumed = LotteryTicketSparseFineTuner(model=tiny("bert"), train_dataset=_LMData(), args=_args(tmp_path / "again"),
                                           sft_args=DynamicSftArguments(**base, **dynamic))
    with pytest.raises(ValueError, match="holds no sparse_phase.json"):
        resumed.train(resume_from_checkpoint=str(checkpoint))


def test_resuming_on_another_base_model_is_refused_before_anything_changes(tmp_path):
    # The trainer took the checkpoint's SFT and trained it on its own base: another model of the
    # same shapes (here another seed) silently got a resumed SFT of 300 entries
    sft_args = SftArguments(ft_params_num=300, full_ft_max_steps_per_iteration=1, sparse_ft_max_steps_per_iteration=2)
    LotteryTicketSparseFineTuner(model=tiny("bert"), train_dataset=_LMData(), sft_args=sft_args,
                                 args=_args(tmp_path, save_strategy="steps", save_steps=1)).train()
    resumed = LotteryTicketSparseFineTuner(model=tiny("bert", seed=1), train_dataset=_LMData(), sft_args=sft_args,
                                           args=_args(tmp_path / "again"))
    with pytest.raises(ValueError, match="another base model"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "sparse" / "checkpoint-1"))
    assert not resumed._masks
    for (n, p), q in zip(resumed.model.named_parameters(), tiny("bert", seed=1).parameters()):
        assert torch.equal(p, q), n


def test_resuming_on_a_base_with_other_frozen_parameters_is_refused(tmp_path):
    # The resume loads only what trains: the checkpoint's frozen word embeddings were neither loaded
    # nor checked, so a base that differs there alone trained the checkpoint's SFT on it, silently
    sft_args = SftArguments(ft_params_num=300, full_ft_max_steps_per_iteration=1, sparse_ft_max_steps_per_iteration=2,
                            freeze_embeddings=True)
    LotteryTicketSparseFineTuner(model=tiny("bert"), train_dataset=_LMData(), sft_args=sft_args,
                                 args=_args(tmp_path, save_strategy="steps", save_steps=1)).train()
    other = tiny("bert")
    with torch.no_grad():
        other.bert.embeddings.word_embeddings.weight[5, 3] += 1.0
    resumed = LotteryTicketSparseFineTuner(model=other, train_dataset=_LMData(), sft_args=sft_args,
                                           args=_args(tmp_path / "again"))
    with pytest.raises(ValueError, match="another base model.*word_embeddings.weight.* in 1 entries"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "sparse" / "checkpoint-1"))
    assert not resumed._masks
    # the same base resumes
    LotteryTicketSparseFineTuner(model=tiny("bert"), train_dataset=_LMData(), sft_args=sft_args,
                                 args=_args(tmp_path / "same")).train(
        resume_from_checkpoint=str(tmp_path / "sparse" / "checkpoint-1"))


def test_resuming_with_a_head_initialised_anew_is_refused_when_the_l1_term_pulls_it(tmp_path):
    # The L1 term pulls a head (trained whole) toward its θ0, which a checkpoint's weights do not
    # hold: resumed on a model whose head had another initialisation, the head was pulled toward
    # that and ended 0.03 away from the uninterrupted run's, silently
    def model(seed):
        m = _no_dropout(tiny("bert"))
        torch.manual_seed(seed)
        m.cls.predictions.transform.dense.reset_parameters()  # a freshly initialised head
        return m

    def trainer(m, out, l1=5000.0, **kw):
        sft_args = SftArguments(ft_params_num=300, full_ft_max_steps_per_iteration=1,
                                sparse_ft_max_steps_per_iteration=3, sparse_l1_reg=l1)
        return LotteryTicketSparseFineTuner(model=m, train_dataset=_LMData(n=16), sft_args=sft_args,
                                            args=_args(out, **kw))

    whole = trainer(model(1), tmp_path, save_strategy="steps", save_steps=1)
    whole.train()
    checkpoint = str(tmp_path / "sparse" / "checkpoint-1")
    with pytest.raises(ValueError, match=r"started \['cls.predictions.transform.dense.weight', "
                                         r"'cls.predictions.transform.dense.bias'\].*L1 term"):
        trainer(model(2), tmp_path / "other").train(resume_from_checkpoint=checkpoint)
    same = trainer(model(1), tmp_path / "same")
    same.train(resume_from_checkpoint=checkpoint)
    _assert_same_sft(whole.sft, same.sft)
    # without an L1 term the head's θ0 is read nowhere: the resume goes on
    unpulled = trainer(model(1), tmp_path / "unpulled", l1=0.0, save_strategy="steps", save_steps=1)
    unpulled.train()
    trainer(model(2), tmp_path / "again", l1=0.0).train(resume_from_checkpoint=str(tmp_path / "unpulled" / "sparse" /
                                                                                  "checkpoint-1"))


def test_resuming_multi_source_training_in_a_later_epoch_continues_bit_exactly(tmp_path):
    # 2 sources x 4 items in batches of 2: 4 batches an epoch; checkpoint 5 is one step into the
    # sparse phase's second epoch, whose batch order the resumed sampler must reproduce
    def trainer(out, source_sft_apply_abs=False, sources=None, **kw):
        data = MultiSourceDataset({"de": _LMData(n=4, seed=1), "fr": _LMData(n=4, seed=2)})
        return LotteryTicketSparseFineTuner(
            model=_no_dropout(tiny("bert")), args=_args(out, per_device_train_batch_size=2, **kw), train_dataset=data,
            source_sfts=sources or _source_sfts(tiny("bert")), source_sft_apply_abs=source_sft_apply_abs,
            sft_args=SftArguments(ft_params_num=300, full_ft_max_steps_per_iteration=2, sparse_ft_max_steps_per_iteration=7))

    whole = trainer(tmp_path, save_strategy="steps", save_steps=1)
    whole.train()
    resumed = trainer(tmp_path / "again")
    resumed.train(resume_from_checkpoint=str(tmp_path / "sparse" / "checkpoint-5"))
    _assert_same_sft(whole.sft, resumed.sft)
    # the source SFTs' heads applied or not change every step: a resume the other way went on silently
    other = trainer(tmp_path / "other", source_sft_apply_abs=True)
    with pytest.raises(ValueError, match=re.escape("source_sft_apply_abs = False (this trainer: True)")):
        other.train(resume_from_checkpoint=str(tmp_path / "sparse" / "checkpoint-5"))
    # other source SFTs: the resumed steps trained under them, silently
    sources = _source_sfts(tiny("bert"))
    sources["fr"] = 0.5 * sources["fr"]
    with pytest.raises(ValueError, match="source_sfts = .*'fr'"):
        trainer(tmp_path / "swapped", sources=sources).train(resume_from_checkpoint=str(tmp_path / "sparse" / "checkpoint-5"))


def test_a_ddp_run_resumed_in_a_later_epoch_takes_that_epoch_s_batch_order(tmp_path):
    # Under DDP accelerate wraps the sampler in a BatchSamplerShard, which has no set_epoch; a resumed
    # run's skip wrapper around that shard hid the sampler from the Trainer's set_epoch, so the resumed
    # epoch replayed epoch 0's order (items trained twice, others not at all that epoch). One process
    # (rank 0 of 2) stands for the run: accelerate's own sharding, the Trainer's own resume calls.
    from accelerate.data_loader import prepare_data_loader

    from xlsparse.hf.lt_sft import SingleSourceBatchSampler

    data = MultiSourceDataset({"de": _LMData(n=8, seed=1), "fr": _LMData(n=8, seed=2)})
    trainer = LotteryTicketSparseFineTuner(
        model=tiny("bert"), args=_args(tmp_path, per_device_train_batch_size=2), train_dataset=data,
        source_sfts={"de": SparseDiff({}), "fr": SparseDiff({})},
        sft_args=SftArguments(ft_params_num=50, full_ft_max_steps_per_iteration=1, sparse_ft_max_steps_per_iteration=1))
    trainer.accelerator.prepare = lambda dl: prepare_data_loader(dl, num_processes=2, process_index=0,
                                                                 put_on_device=False)
    loader = trainer._multisource_loader(data, 2, shuffle=True, replicas=2, training=True)
    resumed = trainer.get_resumed_dataloader(loader, 1)  # one step into the epoch
    # what transformers' Trainer does at the start of an epoch
    resumed.set_epoch(1)
    underlying = getattr(resumed.batch_sampler, "batch_sampler", None)
    if hasattr(underlying, "set_epoch"):
        underlying.set_epoch(1)
    got = [b["input_ids"] for b in resumed]
    # restated: epoch 1's global batches, of which rank 0 takes every other one, less the first
    order = SingleSourceBatchSampler(data, 2, seed=trainer.args.seed, num_replicas=2)
    order.set_epoch(1)
    expected = [torch.stack([data[p]["input_ids"] for p in b]) for b in list(order)[0::2][1:]]
    assert len(got) == len(expected) == 3
    for g, e in zip(got, expected):
        assert torch.equal(g, e)


def _fixed_selection(trainer):
    """Replace phase 1's selection with a fixed random one (phase 1 under DDP rounds differently,
    and Adam's near-equal first steps make its top-K fragile): phase 2 is compared alone."""
    def select(k):
        g = torch.Generator().manual_seed(11)
        params = trainer._params()
        scores = [torch.rand(params[n].numel(), generator=g) for n in trainer.maskable]
        for n, m in zip(trainer.maskable, xlsparse.functional.topk_mask(scores, k)):
            if m.any():
                trainer._masks[n] = m.nonzero().flatten().to(torch.int32)
    trainer._select = select
    return trainer


# The end of a torchrun script: every process's `outcome`, gathered, saved by process 0 (formatted with `out`).
_GATHER_OUTCOME = '''gathered = [None, None]
torch.distributed.all_gather_object(gathered, outcome)
if torch.distributed.get_rank() == 0:
    torch.save(gathered, {out!r} + "/outcomes.pt")
torch.distributed.barrier()
torch.distributed.destroy_process_group()
'''


_DDP_SCRIPT = '''
import os, sys, torch
sys.path.insert(0, {tests!r})
from test_lt_sft import _LMData, _PerItemBertForMaskedLM, _args, _ddp_sft_args, _fixed_selection, _no_dropout, _tiny_subclass
from tiny_models import tiny
from xlsparse.hf.lt_sft import LotteryTicketSparseFineTuner
model = _no_dropout(_tiny_subclass(_PerItemBertForMaskedLM) if {fused!r} else tiny("bert"))
if {other_init!r} and os.environ["RANK"] == "1":  # a model built from a per-process seed: DDP trains process 0's
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)), alpha=0.01)
trainer = LotteryTicketSparseFineTuner(
    model=model, args=_args({out!r}, per_device_train_batch_size=4, logging_steps=1000,
                                                # a per-item loss divides by both processes' count and needs
                                                # it; BertForMaskedLM's mean with it on (the default) runs in
                                                # test_distributed's HF-Trainer DDP test
                                                average_tokens_across_devices={fused!r}),
    train_dataset=_LMData(n=8), sft_args=_ddp_sft_args({dynamic!r}), fused_cross_entropy={fused!r})
_fixed_selection(trainer).train()
if trainer.args.process_index == 0:
    assert trainer.args.world_size == 2, trainer.args.world_size
    trainer.sft.save({out!r} + "/ddp.safetensors")
# Tear the gloo group down before exit: a rank that exits with it alive can abort in gloo's
# threads ("terminate called without an active exception", seen once in CI).
torch.distributed.barrier()
torch.distributed.destroy_process_group()
'''


def _ddp_sft_args(dynamic: bool):
    """The DDP test's arguments: a static support, or one re-selected after steps 2 and 4 (from
    gradients that each process taps from its own half of the batch)."""
    from xlsparse.hf.lt_sft import DynamicSftArguments

    common = dict(ft_params_num=300, full_ft_max_steps_per_iteration=2, sparse_ft_max_steps_per_iteration=5,
                  sparse_l1_reg=5.0)
    if dynamic:
        return DynamicSftArguments(**common, reselection_steps=2, selection_accumulation_steps=2, drop_fraction=0.3)
    return SftArguments(**common)


@pytest.mark.slow
@pytest.mark.parametrize("dynamic, other_init, fused", [(False, False, False), (True, False, False), (False, True, False),
                                                        (False, False, True)],
                         ids=["static", "dynamic", "another_model_on_process_1", "fused_per_item_loss"])
def test_phase_two_under_ddp_gives_the_single_process_sft(tmp_path, dynamic, other_init, fused):
    # another_model_on_process_1: DDP trains process 0's model, but process 1 took its own as θ0, so
    # its L1 pull and its rewind went elsewhere and the replicas drifted apart. fused_per_item_loss:
    # fused_cross_entropy's loss goes through the Trainer's scaling by the number of processes, which
    # a per-item loss needs; the single process computes the model's own loss
    from conftest import torchrun

    torchrun(_DDP_SCRIPT, tmp_path, 29631 + dynamic + 2 * other_init + 4 * fused, timeout=600, tests=HERE,
             dynamic=dynamic, other_init=other_init, fused=fused)
    ddp = SparseDiff.load(str(tmp_path / "ddp.safetensors"))
    single = LotteryTicketSparseFineTuner(
        model=_no_dropout(_tiny_subclass(_PerItemBertForMaskedLM) if fused else tiny("bert")), args=_args(tmp_path / "one"),
        train_dataset=_LMData(n=8), sft_args=_ddp_sft_args(dynamic))
    initial = {}
    if dynamic:
        class _Grab(transformers.TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                if single._phase == "sparse":
                    initial.update({n: m.clone() for n, m in single._masks.items()})

        single.add_callback(_Grab())
    _fixed_selection(single).train()
    assert set(ddp.deltas) == set(single.sft.deltas)
    for n, d in single.sft.deltas.items():
        assert torch.equal(ddp.deltas[n].indices, d.indices), n
        torch.testing.assert_close(ddp.deltas[n].values, d.values, atol=2e-5, rtol=1e-3)
    if dynamic:  # the supports did move, and moved alike
        assert any(not torch.equal(initial[n].long(), d.indices.long()) for n, d in single.sft.deltas.items() if n in initial)


def test_multi_source_loaders_take_the_trainers_loader_settings(tmp_path):
    # persistent workers, prefetch and the Trainer's worker seeding were accepted and not used
    data = MultiSourceDataset({"de": _LMData(n=4, seed=1), "fr": _LMData(n=4, seed=2)})
    trainer = LotteryTicketSparseFineTuner(
        model=tiny("bert"), train_dataset=data, eval_dataset=data, source_sfts={"de": SparseDiff({}), "fr": SparseDiff({})},
        args=_args(tmp_path, per_device_train_batch_size=4, dataloader_num_workers=2, dataloader_persistent_workers=True,
                   dataloader_prefetch_factor=3),
        sft_args=SftArguments(ft_params_num=50, full_ft_max_steps_per_iteration=1, sparse_ft_max_steps_per_iteration=1))
    train, evaluation = trainer.get_train_dataloader(), trainer.get_eval_dataloader()
    for loader in (train, evaluation):
        assert loader.num_workers == 2 and loader.persistent_workers and loader.prefetch_factor == 3
    assert train.worker_init_fn.func is transformers.trainer_utils.seed_worker and evaluation.worker_init_fn is None
    assert sorted(b[SOURCE_KEY] for b in train) == ["de", "fr"]


def test_multi_source_needs_source_sfts_and_batches_that_name_a_source(tmp_path):
    steps = SftArguments(ft_params_num=50, full_ft_max_steps_per_iteration=1, sparse_ft_max_steps_per_iteration=1)
    with pytest.raises(ValueError, match="source_sfts"):
        LotteryTicketSparseFineTuner(model=tiny("bert"), args=_args(tmp_path), sft_args=steps,
                                     train_dataset=MultiSourceDataset({"de": _LMData(n=4)}))
    trainer = LotteryTicketSparseFineTuner(model=tiny("bert"), args=_args(tmp_path), sft_args=steps,
                                           train_dataset=_LMData(), source_sfts={"de": SparseDiff({})})
    with pytest.raises(ValueError, match=SOURCE_KEY):
        trainer.train()
    for factor in (0.5, 1.5, 0, True):  # int() dropped a source at 0.5 and counted 1.5 once
        with pytest.raises(ValueError, match="whole numbers"):
            MultiSourceDataset({"de": _LMData(n=4)}, upsampling={"de": factor})
    assert len(MultiSourceDataset({"de": _LMData(n=4), "fr": _LMData(n=3)}, upsampling={"fr": 2})) == 10
    # a NumPy integer (a factor read with NumPy) is a whole number: it was refused as not one
    import numpy as np

    assert len(MultiSourceDataset({"de": _LMData(n=4)}, upsampling={"de": np.int64(2)})) == 8


def test_a_multi_source_eval_set_without_source_sfts_is_refused(tmp_path):
    # evaluate() and predict() of a MultiSourceDataset on a trainer without source_sfts ran every
    # batch on the bare model, silently; a dict of such eval sets raised "argument of type
    # 'NoneType' is not iterable"
    steps = SftArguments(ft_params_num=50, full_ft_max_steps_per_iteration=1, sparse_ft_max_steps_per_iteration=1)
    data = MultiSourceDataset({"de": _LMData(n=4)})
    with pytest.raises(ValueError, match="no source SFTs"):
        LotteryTicketSparseFineTuner(model=tiny("bert"), args=_args(tmp_path), sft_args=steps, train_dataset=_LMData(),
                                     eval_dataset={"both": data})
    trainer = LotteryTicketSparseFineTuner(model=tiny("bert"), args=_args(tmp_path), sft_args=steps,
                                           train_dataset=_LMData())
    with pytest.raises(ValueError, match="no source SFTs"):
        trainer.evaluate(eval_dataset=data)
    with pytest.raises(ValueError, match="no source SFTs"):
        trainer.predict(data)


def test_batches_that_name_a_source_without_source_sfts_are_refused(tmp_path):
    # a dataset of the user's own whose items name their source, batched by MultiSourceCollator,
    # trained on the bare model when the trainer had no source_sfts: the source was dropped silently
    from xlsparse.hf.lt_sft import MultiSourceCollator

    class Named(_LMData):
        def __getitem__(self, i):
            return {**super().__getitem__(i), SOURCE_KEY: "de"}

    trainer = LotteryTicketSparseFineTuner(
        model=tiny("bert"), args=_args(tmp_path, remove_unused_columns=False), train_dataset=Named(n=4),
        data_collator=MultiSourceCollator(),
        sft_args=SftArguments(ft_params_num=50, full_ft_max_steps_per_iteration=1, sparse_ft_max_steps_per_iteration=1))
    with pytest.raises(ValueError, match="no source SFTs"):
        trainer.train()


def test_a_multi_source_dataset_without_items_is_refused():
    # training on it ran no full-phase step (the Trainer only logs that its epoch had no sample),
    # selected the first K entries (|θ − θ0| = 0 everywhere) and stopped in phase 2 with a bare StopIteration
    with pytest.raises(ValueError, match="hold no items"):
        MultiSourceDataset({"de": [], "fr": _LMData(n=0)})
    assert len(MultiSourceDataset({"de": [], "fr": _LMData(n=2)})) == 2  # an empty source among others is skipped


def test_an_upsampled_source_is_batched_one_pass_per_repetition():
    # composable-sft runs an upsampled source's loader once per repetition: u * ceil(n / b)
    # batches, no item twice in one batch. All copies were shuffled together (the same example
    # twice in a batch, ceil(u * n / b) batches, so fewer steps per epoch).
    from xlsparse.hf.lt_sft import SingleSourceBatchSampler

    data = MultiSourceDataset({"de": _LMData(n=3), "fr": _LMData(n=2)}, upsampling={"de": 2})
    for seed in range(20):
        batches = list(SingleSourceBatchSampler(data, batch_size=2, seed=seed))
        assert len(batches) == 2 * 2 + 1
        de = [[data.order[p][1] for p in b] for b in batches if data.order[b[0]][0] == "de"]
        assert all(len(set(b)) == len(b) for b in de), de
        assert sorted(i for b in de for i in b) == [0, 0, 1, 1, 2, 2]


def test_under_ddp_the_batches_of_one_step_share_a_source():
    # Accelerate hands consecutive batches to the processes in turn: one step's batches came from
    # different sources, so each process trained with another source SFT applied and DDP averaged
    # them (one process, or composable-sft on every process, trains one source per step).
    from xlsparse.hf.lt_sft import SingleSourceBatchSampler

    data = MultiSourceDataset({"de": _LMData(n=5), "fr": _LMData(n=3)}, upsampling={"fr": 2})
    for drop_last in (False, True):
        for seed in range(10):
            batches = list(SingleSourceBatchSampler(data, batch_size=2, seed=seed, drop_last=drop_last, num_replicas=2))
            assert len(batches) % 2 == 0 and all(len(b) == 2 for b in batches)
            steps = [batches[i] + batches[i + 1] for i in range(0, len(batches), 2)]
            sources = [{data.order[p][0] for p in step} for step in steps]
            assert all(len(s) == 1 for s in sources), sources
            if not drop_last:  # every item of every pass is trained (a short last step wraps around its pass)
                for source, reps in (("de", 1), ("fr", 2)):
                    seen = sorted({data.order[p][1] for step in steps for p in step if data.order[p][0] == source})
                    assert seen == list(range(len(data.datasets[source]))), (source, seen)
                    items = sum(len(step) for step in steps if data.order[step[0]][0] == source)
                    assert items == reps * 4 * math.ceil(len(data.datasets[source]) / 4), (source, items)
    # one process: the batches are as before
    one = list(SingleSourceBatchSampler(data, batch_size=2, seed=3))
    assert sorted(len(b) for b in one) == [1, 1, 1, 2, 2, 2, 2]


_MULTI_SOURCE_DDP_SCRIPT = '''
import os, sys, torch
sys.path.insert(0, {tests!r})
from test_lt_sft import _fixed_selection, _multi_source_trainer
from xlsparse.hf.lt_sft import SOURCE_KEY
trainer = _multi_source_trainer({out!r}, per_device_train_batch_size=2, average_tokens_across_devices=False)
sources = [b[SOURCE_KEY] for b in trainer.get_train_dataloader()]
gathered = [None, None]
torch.distributed.all_gather_object(gathered, sources)
_fixed_selection(trainer).train()
if trainer.args.process_index == 0:
    torch.save(gathered, {out!r} + "/sources.pt")
    trainer.sft.save({out!r} + "/ddp.safetensors")
torch.distributed.barrier()
torch.distributed.destroy_process_group()
'''


def _multi_source_trainer(out, sparse_steps=4, **kw):
    data = MultiSourceDataset({"de": _LMData(n=8, seed=1), "fr": _LMData(n=8, seed=2)})
    return LotteryTicketSparseFineTuner(
        model=_no_dropout(tiny("bert")), args=_args(out, logging_steps=1000, **kw), train_dataset=data,
        source_sfts=_source_sfts(tiny("bert")),
        sft_args=SftArguments(ft_params_num=300, full_ft_max_steps_per_iteration=2,
                              sparse_ft_max_steps_per_iteration=sparse_steps))


@pytest.mark.slow
def test_multi_source_batches_of_one_step_share_a_source_on_every_process(tmp_path):
    from conftest import torchrun

    torchrun(_MULTI_SOURCE_DDP_SCRIPT, tmp_path, 29641, tests=HERE)
    rank0, rank1 = torch.load(tmp_path / "sources.pt", weights_only=False)
    assert len(rank0) == len(rank1) == 4  # 16 items, 2 processes, batches of 2
    assert rank0 == rank1  # each step: one source on both processes
    # and phase 2 gives one process's SFT over the same global batches (4 per step; off by 0.066 before)
    ddp = SparseDiff.load(str(tmp_path / "ddp.safetensors"))
    single = _multi_source_trainer(tmp_path / "one", per_device_train_batch_size=4)
    _fixed_selection(single).train()
    assert set(ddp.deltas) == set(single.sft.deltas)
    for n, d in single.sft.deltas.items():
        assert torch.equal(ddp.deltas[n].indices, d.indices), n
        torch.testing.assert_close(ddp.deltas[n].values, d.values, atol=2e-5, rtol=1e-3)


_MULTI_SOURCE_DDP_RESUME_SCRIPT = '''
import sys, torch
sys.path.insert(0, {tests!r})
from test_lt_sft import _fixed_selection, _multi_source_trainer
from xlsparse.hf.lt_sft import SOURCE_KEY
def run(out, resume=None):
    trainer = _multi_source_trainer(out, per_device_train_batch_size=2, average_tokens_across_devices=False,
                                    sparse_steps=7, save_strategy="steps", save_steps=1)
    seen, step = [], trainer.training_step
    def training_step(model, inputs, *args):
        if trainer._phase == "sparse":
            seen.append((inputs[SOURCE_KEY], inputs["input_ids"].tolist()))
        return step(model, inputs, *args)
    trainer.training_step = training_step
    _fixed_selection(trainer).train(resume_from_checkpoint=resume)
    return seen
whole = run({out!r} + "/whole")
resumed = run({out!r} + "/resumed", resume={out!r} + "/whole/sparse/checkpoint-5")
outcome = (whole, resumed)
''' + _GATHER_OUTCOME + '''
import os
os._exit(0)  # past the results: rank 1 aborted once in gloo's teardown ("terminate called ...")
'''


@pytest.mark.slow
def test_multi_source_under_ddp_resumed_in_a_later_epoch_trains_the_uninterrupted_run_s_batches(tmp_path):
    # 16 items, 2 processes, batches of 2: 4 steps an epoch; checkpoint 5 is one step into the sparse
    # phase's second epoch. The resumed epoch replayed epoch 0's order (see the test above).
    from conftest import torchrun

    torchrun(_MULTI_SOURCE_DDP_RESUME_SCRIPT, tmp_path, 29691, timeout=600, tests=HERE)
    for whole, resumed in torch.load(tmp_path / "outcomes.pt", weights_only=False):
        assert len(whole) == 7 and len(resumed) == 2
        assert resumed == whole[5:]


_ACCELERATOR_CONFIG_SCRIPT = '''
import sys, torch
sys.path.insert(0, {tests!r})
from test_lt_sft import _fixed_selection, _multi_source_trainer
from xlsparse.hf.lt_sft import SOURCE_KEY
outcomes = []
for dispatch_split in ((True, False), (True, True)):
    try:
        _multi_source_trainer({out!r}, per_device_train_batch_size=2, average_tokens_across_devices=False,
                              accelerator_config=dict(zip(("dispatch_batches", "split_batches"), dispatch_split)))
        outcomes.append(None)
    except ValueError as exc:
        outcomes.append(str(exc))
trainer = _multi_source_trainer({out!r}, per_device_train_batch_size=4, average_tokens_across_devices=False,
                                accelerator_config={{"split_batches": True}})
seen, step = [], trainer.training_step
def training_step(model, inputs, *args):
    seen.append((inputs[SOURCE_KEY], len(inputs["input_ids"])))
    return step(model, inputs, *args)
trainer.training_step = training_step
_fixed_selection(trainer).train()
gathered = [None, None]
torch.distributed.all_gather_object(gathered, (outcomes, seen))
if trainer.args.process_index == 0:
    torch.save(gathered, {out!r} + "/seen.pt")
torch.distributed.barrier()
torch.distributed.destroy_process_group()
# the results are saved: leave without the interpreter's teardown, where rank 1 aborted in 2 of
# about 20 runs ("terminate called without an active exception", a C++ thread at exit)
import os
os._exit(0)
'''


@pytest.mark.slow
def test_multi_source_refuses_dispatched_batches_and_splits_one_source_s_batches(tmp_path):
    # Dispatched batches are concatenated and broadcast by the main process, tensors only: training
    # stopped at its first batch with accelerate's TypeError over the batch's source string. Split
    # batches work: each step's batch is one source's, split over the processes.
    from conftest import torchrun

    torchrun(_ACCELERATOR_CONFIG_SCRIPT, tmp_path, 29661, tests=HERE)
    (outcomes0, seen0), (outcomes1, seen1) = torch.load(tmp_path / "seen.pt", weights_only=False)
    for outcome in outcomes0 + outcomes1:
        assert outcome is not None and "dispatch_batches" in outcome, outcome
    assert len(seen0) == len(seen1) == 2 + 4  # the full phase's steps, then the sparse phase's
    assert [s for s, _ in seen0] == [s for s, _ in seen1]  # each step: one source on both processes
    assert all(n == 2 for _, n in seen0 + seen1)  # the batch of 4, split


_SHARDED_EVAL_SCRIPT = '''
import sys, torch
sys.path.insert(0, {tests!r})
from test_lt_sft import _LMData, _args, _no_dropout, _source_sfts, tiny
from xlsparse.hf.lt_sft import LotteryTicketSparseFineTuner, MultiSourceDataset, SftArguments
data = MultiSourceDataset({{"de": _LMData(n=3, seed=1), "fr": _LMData(n=4, seed=2)}})
steps = SftArguments(ft_params_num=50, full_ft_max_steps_per_iteration=1, sparse_ft_max_steps_per_iteration=1)
args = _args({out!r}, per_device_eval_batch_size=2, average_tokens_across_devices=False)
outcome = []
for given in ("at construction", "to evaluate"):
    try:
        trainer = LotteryTicketSparseFineTuner(model=_no_dropout(tiny("bert")), args=args, source_sfts=_source_sfts(tiny("bert")),
                                               eval_dataset=data if given == "at construction" else None, sft_args=steps)
        trainer.prediction_step = None  # nothing may be evaluated
        trainer.evaluate(eval_dataset=data)
        outcome.append(None)
    except ValueError as exc:
        outcome.append(str(exc))
''' + _GATHER_OUTCOME


@pytest.mark.slow
def test_multi_source_evaluation_on_several_processes_is_refused(tmp_path):
    # Accelerate deals eval batches out whole and skipped a round whose second batch was a source's
    # short last one: on 2 processes, {"de": 3 items, "fr": 4} in batches of 2 evaluated fr alone
    # (eval_loss 4.5616 against one process's 4.5493 over all 7)
    from conftest import torchrun

    torchrun(_SHARDED_EVAL_SCRIPT, tmp_path, 29671, tests=HERE)
    for outcomes in torch.load(tmp_path / "outcomes.pt", weights_only=False):
        assert len(outcomes) == 2 and all(o is not None and "one process only" in o for o in outcomes), outcomes


def test_a_dict_of_eval_sets_evaluates_each_multi_source_set_under_its_sources(tmp_path):
    # the Trainer asks for a dict's eval sets by name: the name missed the multi-source loader, and
    # evaluation stopped with "the batch has no '_source' key (use MultiSourceDataset)"
    data = MultiSourceDataset({"de": _LMData(n=3, seed=1), "fr": _LMData(n=4, seed=2)})
    steps = SftArguments(ft_params_num=50, full_ft_max_steps_per_iteration=1, sparse_ft_max_steps_per_iteration=1)
    trainer = LotteryTicketSparseFineTuner(model=_no_dropout(tiny("bert")), args=_args(tmp_path, per_device_eval_batch_size=2),
                                           eval_dataset={"both": data}, source_sfts=_source_sfts(tiny("bert")),
                                           sft_args=steps)
    named = trainer.evaluate()["eval_both_loss"]
    assert named == trainer.evaluate(eval_dataset=data)["eval_loss"]


def test_predict_on_a_multi_source_dataset_runs_each_batch_under_its_source_sft(tmp_path):
    # predict() takes its batches from get_test_dataloader, which was not overridden: it stopped with
    # "the batch has no '_source' key (use MultiSourceDataset)"
    data = MultiSourceDataset({"de": _LMData(n=4, seed=1), "fr": _LMData(n=4, seed=2)})
    sources = _source_sfts(tiny("bert"))
    steps = SftArguments(ft_params_num=50, full_ft_max_steps_per_iteration=1, sparse_ft_max_steps_per_iteration=1)
    trainer = LotteryTicketSparseFineTuner(model=_no_dropout(tiny("bert")), args=_args(tmp_path, per_device_eval_batch_size=4),
                                           source_sfts=sources, sft_args=steps)
    got = trainer.predict(data).metrics["test_loss"]
    model = _no_dropout(tiny("bert")).eval()
    losses = []
    with torch.no_grad():
        for source in ("de", "fr"):  # one batch of 4 items per source
            ids = data.datasets[source].ids
            with sources[source].applied(model):
                losses.append(model(input_ids=ids, labels=ids).loss.item())
    assert got == pytest.approx(sum(losses) / 2, rel=1e-5)


def test_multi_source_eval_batches_take_the_trainer_s_eval_batch_size(tmp_path):
    # per device × the GPUs that DataParallel splits a batch over, as the Trainer's own loader: the
    # multi-source one took the per-device size, and each GPU evaluated a fraction of a batch
    data = MultiSourceDataset({"de": _LMData(n=4, seed=1), "fr": _LMData(n=4, seed=2)})
    steps = SftArguments(ft_params_num=50, full_ft_max_steps_per_iteration=1, sparse_ft_max_steps_per_iteration=1)
    trainer = LotteryTicketSparseFineTuner(model=_no_dropout(tiny("bert")), args=_args(tmp_path, per_device_eval_batch_size=2),
                                           source_sfts=_source_sfts(tiny("bert")), sft_args=steps)
    trainer.args._n_gpu = 2  # what TrainingArguments sets on a machine with 2 GPUs and one process
    assert trainer.args.eval_batch_size == 4
    assert [len(b["input_ids"]) for b in trainer.get_eval_dataloader(data)] == [4, 4]


def test_a_source_without_an_sft_raises_naming_it_and_the_known_ones(tmp_path):
    # a source missing from source_sfts (a misspelt name) trained and evaluated on the bare model, silently
    data = MultiSourceDataset({"de": _LMData(n=4, seed=1), "fr": _LMData(n=4, seed=2)})
    steps = SftArguments(ft_params_num=50, full_ft_max_steps_per_iteration=1, sparse_ft_max_steps_per_iteration=1)
    sfts = {"de": SparseDiff({}), "fra": SparseDiff({})}
    with pytest.raises(ValueError, match=r"source_sfts has no SFT for the source 'fr' \(it has \['de', 'fra'\]\)"):
        LotteryTicketSparseFineTuner(model=tiny("bert"), args=_args(tmp_path), sft_args=steps, train_dataset=data,
                                     source_sfts=sfts)
    trainer = LotteryTicketSparseFineTuner(model=tiny("bert"), args=_args(tmp_path), sft_args=steps, source_sfts=sfts)
    with pytest.raises(ValueError, match="source 'fr'"):
        trainer.predict(data)


def test_a_source_sft_the_model_cannot_take_is_refused_at_construction_naming_the_source(tmp_path):
    # a head the model lacks (applied with source_sft_apply_abs), or a body name it lacks, raised a
    # bare KeyError ("apply: diff 0: ...") at the first batch of that source
    steps = SftArguments(ft_params_num=50, full_ft_max_steps_per_iteration=1, sparse_ft_max_steps_per_iteration=1)
    model = tiny("bert")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    good = _source_sfts(model)
    head = SparseDiff({}, absolute={"classifier.weight": torch.zeros(3, 32)})  # a task head, on a masked LM
    misnamed = SparseDiff({"no.such.weight": good["de"].deltas[_SOURCE_NAMES[0]]})
    for sfts, with_abs in (({**good, "fr": head}, True), ({"de": misnamed}, False)):
        with pytest.raises(ValueError, match=r"source_sfts\['(fr|de)'\]: apply: diff 0: the model has no parameter"):
            LotteryTicketSparseFineTuner(model=model, args=_args(tmp_path), sft_args=steps, source_sfts=sfts,
                                         source_sft_apply_abs=with_abs)
    # without source_sft_apply_abs the heads are not applied; the check leaves the model as it was
    LotteryTicketSparseFineTuner(model=model, args=_args(tmp_path), sft_args=steps, source_sfts={**good, "fr": head})
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_multi_source_loader_keeps_the_dataloader_arguments(tmp_path):
    data = MultiSourceDataset({"de": _LMData(n=5, seed=1), "fr": _LMData(n=3, seed=2)})
    steps = SftArguments(ft_params_num=50, full_ft_max_steps_per_iteration=1, sparse_ft_max_steps_per_iteration=1)
    sizes = {}
    for drop in (False, True):
        trainer = LotteryTicketSparseFineTuner(
            model=tiny("bert"), args=_args(tmp_path, per_device_train_batch_size=2, dataloader_drop_last=drop),
            sft_args=steps, train_dataset=data, source_sfts={"de": SparseDiff({}), "fr": SparseDiff({})})
        sizes[drop] = sorted(len(b["input_ids"]) for b in trainer.get_train_dataloader())
    assert sizes == {False: [1, 1, 2, 2, 2], True: [2, 2, 2]}


def test_multi_source_batches_are_shuffled_by_data_seed_as_the_trainer_s_are(tmp_path):
    # the Trainer orders its data by data_seed when given (seed otherwise); the multi-source
    # sampler took seed alone, so another data_seed gave the same order
    data = MultiSourceDataset({"de": _LMData(n=8, seed=1), "fr": _LMData(n=8, seed=2)})
    steps = SftArguments(ft_params_num=50, full_ft_max_steps_per_iteration=1, sparse_ft_max_steps_per_iteration=1)

    def order(**kw):
        trainer = LotteryTicketSparseFineTuner(
            model=tiny("bert"), args=_args(tmp_path, per_device_train_batch_size=2, **kw), sft_args=steps,
            train_dataset=data, source_sfts={"de": SparseDiff({}), "fr": SparseDiff({})})
        return [b["input_ids"][:, 0].tolist() for b in trainer.get_train_dataloader()]

    assert order(data_seed=1) != order(data_seed=2)
    assert order(seed=5, data_seed=1) == order(seed=6, data_seed=1)
    assert order(seed=5) != order(seed=6)


def test_multi_source_batches_follow_the_train_sampling_strategy_or_refuse_it(tmp_path):
    # the multi-source sampler shuffled whatever TrainingArguments.train_sampling_strategy said:
    # "sequential" trained shuffled, and "group_by_length" grouped nothing
    data = MultiSourceDataset({"de": _LMData(n=4, seed=1), "fr": _LMData(n=3, seed=2)})
    steps = SftArguments(ft_params_num=50, full_ft_max_steps_per_iteration=1, sparse_ft_max_steps_per_iteration=1)
    sfts = {"de": SparseDiff({}), "fr": SparseDiff({})}
    trainer = LotteryTicketSparseFineTuner(
        model=tiny("bert"), args=_args(tmp_path, per_device_train_batch_size=2, train_sampling_strategy="sequential"),
        sft_args=steps, train_dataset=data, source_sfts=sfts)
    got = torch.cat([b["input_ids"] for b in trainer.get_train_dataloader()])
    assert torch.equal(got, torch.stack([data[i]["input_ids"] for i in range(len(data))]))
    for strategy in ("group_by_length", "batch_rebalance"):
        with pytest.raises(ValueError, match=f"train_sampling_strategy = '{strategy}'"):
            LotteryTicketSparseFineTuner(model=tiny("bert"), args=_args(tmp_path, train_sampling_strategy=strategy),
                                         sft_args=steps, train_dataset=data, source_sfts=sfts)


class _IndexedData(_LMData):
    def __getitem__(self, i):
        return {**super().__getitem__(i), "idx": torch.tensor(i)}


def test_multi_source_batches_drop_unused_columns_as_the_trainer_s_do(tmp_path):
    # the multi-source loaders collated every column, remove_unused_columns or not: the model got them all
    data = MultiSourceDataset({"de": _IndexedData(n=4, seed=1), "fr": _IndexedData(n=3, seed=2)})
    steps = SftArguments(ft_params_num=50, full_ft_max_steps_per_iteration=1, sparse_ft_max_steps_per_iteration=1)
    for remove in (True, False):
        trainer = LotteryTicketSparseFineTuner(
            model=tiny("bert"), args=_args(tmp_path, per_device_train_batch_size=2, remove_unused_columns=remove),
            sft_args=steps, train_dataset=data, eval_dataset=data, source_sfts={"de": SparseDiff({}), "fr": SparseDiff({})})
        for loader in (trainer.get_train_dataloader(), trainer.get_eval_dataloader(), trainer.get_test_dataloader(data)):
            assert set(next(iter(loader))) == {"input_ids", "labels", SOURCE_KEY} | (set() if remove else {"idx"})


def _padding_collator():
    """transformers' DataCollatorWithPadding over a word-level tokenizer of the tiny models' vocabulary."""
    from tokenizers import Tokenizer, models

    vocab = {"[PAD]": 0, "[UNK]": 1, **{f"t{i}": i for i in range(2, VOCAB)}}
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")),
                                               pad_token="[PAD]", unk_token="[UNK]")
    return transformers.DataCollatorWithPadding(tok)


def test_multi_source_batches_of_a_batch_encoding_collator_train_under_their_source(tmp_path):
    # DataCollatorWithPadding (and DataCollatorForLanguageModeling) return a BatchEncoding, a mapping
    # that is not a dict: the source was not taken out of it, and every multi-source step raised that
    # the batch had no `_source` key. Restated: each batch runs under its source's SFT, so the run
    # equals one whose collator hands the same batch over as a plain dict
    base = _no_dropout(tiny("bert"))
    sources = _source_sfts(base, k=0.5)
    data = MultiSourceDataset({"de": _LMData(n=4, seed=1), "fr": _LMData(n=4, seed=2)})
    padding = _padding_collator()
    assert isinstance(padding([data.datasets["de"][0], data.datasets["de"][1]]), transformers.BatchEncoding)
    runs = {}
    for kind, collate in (("batch_encoding", padding), ("dict", lambda f: dict(padding(f)))):
        trainer = LotteryTicketSparseFineTuner(
            model=copy.deepcopy(base), args=_args(tmp_path / kind, per_device_train_batch_size=4), data_collator=collate,
            train_dataset=data, eval_dataset=data, source_sfts=sources,
            sft_args=SftArguments(ft_params_num=200, full_ft_max_steps_per_iteration=2, sparse_ft_max_steps_per_iteration=2))
        seen = []
        original = trainer._activate
        trainer._activate = lambda source, training, original=original: seen.append(source) or original(source, training)
        trainer.train()
        runs[kind] = (trainer.sft, trainer.evaluate()["eval_loss"], seen)
    assert set(runs["batch_encoding"][2]) == {"de", "fr"}
    assert runs["batch_encoding"][2] == runs["dict"][2]
    _assert_same_sft(runs["batch_encoding"][0], runs["dict"][0])
    assert runs["batch_encoding"][1] == runs["dict"][1]



def test_multi_source_batches_follow_auto_find_batch_size(tmp_path):
    # the multi-source loader took per_device_train_batch_size: after an out-of-memory error the
    # Trainer retried with smaller sizes, and got batches of 4 until none was left
    from transformers import default_data_collator

    sizes = []

    def collate(items):
        sizes.append(len(items))
        if len(items) > 2:
            raise RuntimeError("CUDA out of memory.")  # accelerate's find_executable_batch_size reads this
        return default_data_collator(items)

    data = MultiSourceDataset({"de": _LMData(n=4, seed=1), "fr": _LMData(n=4, seed=2)})
    LotteryTicketSparseFineTuner(
        model=tiny("bert"), args=_args(tmp_path, per_device_train_batch_size=4, auto_find_batch_size=True),
        train_dataset=data, data_collator=collate, source_sfts={"de": SparseDiff({}), "fr": SparseDiff({})},
        sft_args=SftArguments(ft_params_num=50, full_ft_max_steps_per_iteration=2,
                              sparse_ft_max_steps_per_iteration=2)).train()
    assert sizes[0] == 4 and set(sizes[-4:]) == {2}


def test_a_phase_in_epochs_keeps_its_epochs_when_auto_find_batch_size_lowers_the_batch(tmp_path):
    # the phase's steps were counted at the first batch size: at half the batch it ran half an epoch
    from transformers import default_data_collator

    def collate(items):
        if len(items) > 2:
            raise RuntimeError("CUDA out of memory.")  # accelerate's find_executable_batch_size reads this
        return default_data_collator(items)

    ends = []

    class _Ends(transformers.TrainerCallback):
        def on_train_end(self, args, state, control, **kwargs):
            ends.append((trainer._phase, state.global_step, state.epoch))

    trainer = LotteryTicketSparseFineTuner(
        model=tiny("bert"), args=_args(tmp_path, per_device_train_batch_size=4, auto_find_batch_size=True),
        train_dataset=_LMData(n=8), data_collator=collate, callbacks=[_Ends()],
        sft_args=SftArguments(ft_params_num=50, full_ft_max_epochs_per_iteration=1, sparse_ft_max_steps_per_iteration=1))
    trainer.train()
    assert ends == [("full", 4, 1.0), ("sparse", 1, 0.25)]


def test_train_gives_the_training_arguments_back_as_they_were(tmp_path):
    # each phase sets args.max_steps in place; the last phase's length stayed, so a Trainer given the
    # same TrainingArguments next (a task SFT after a language SFT) ran 1 step for its 3 epochs
    args = _args(tmp_path, per_device_train_batch_size=4, num_train_epochs=3)
    LotteryTicketSparseFineTuner(model=tiny("bert"), args=args, train_dataset=_LMData(),
                                 sft_args=SftArguments(ft_params_num=50, full_ft_max_steps_per_iteration=2,
                                                       sparse_ft_max_steps_per_iteration=1)).train()
    assert (args.max_steps, args.output_dir) == (-1, str(tmp_path))
    plain = transformers.Trainer(model=tiny("bert"), args=args, train_dataset=_LMData())
    plain.train()
    assert plain.state.global_step == 6


@pytest.mark.parametrize("given, named", [({"max_steps": 5}, "max_steps = 5"),
                                          ({"num_train_epochs": 10}, "num_train_epochs = 10"),
                                          ({"max_steps": 5, "num_train_epochs": 10},
                                           "max_steps = 5 and num_train_epochs = 10 are")])
def test_training_arguments_lengths_the_phases_do_not_use_are_named(tmp_path, given, named):
    # each phase sets max_steps itself: a run length given to TrainingArguments did nothing, silently
    with pytest.warns(UserWarning, match=f"TrainingArguments.{named}.* not used"):
        LotteryTicketSparseFineTuner(model=tiny("bert"), args=_args(tmp_path, **given), train_dataset=_LMData(),
                                     sft_args=SftArguments(ft_params_num=50, full_ft_max_steps_per_iteration=1,
                                                           sparse_ft_max_steps_per_iteration=1))


def test_the_trainer_runs_the_capped_number_of_steps(tmp_path):
    class _Count(transformers.TrainerCallback):
        def __init__(self):
            self.steps = {}

        def on_step_end(self, args, state, control, **kwargs):
            self.steps[trainer._phase] = self.steps.get(trainer._phase, 0) + 1

    # 16 items in batches of 4 with 2 accumulation steps: 2 optimizer steps per epoch
    sft_args = SftArguments(ft_params_num=50, full_ft_max_epochs_per_iteration=2, full_ft_max_steps_per_iteration=3,
                            sparse_ft_max_epochs_per_iteration=1, sparse_ft_min_steps_per_iteration=3)
    trainer = LotteryTicketSparseFineTuner(model=tiny("bert"), train_dataset=_LMData(n=16), sft_args=sft_args,
                                           args=_args(tmp_path, per_device_train_batch_size=4,
                                                      gradient_accumulation_steps=2))
    count = _Count()
    trainer.add_callback(count)
    trainer.train()
    assert count.steps == {"full": 3, "sparse": 3}  # min(4 epoch steps, 3); max(2 epoch steps, min 3)


def test_an_epoch_with_leftover_micro_batches_is_trained_whole(tmp_path):
    # 5 batches per epoch at accumulation 2: the phase ran 5 // 2 = 2 steps, 4 of the 5 batches,
    # where the HF Trainer (which composable-sft hands the epochs) steps on the leftover one too
    seen = {}

    class _Counting(LotteryTicketSparseFineTuner):
        def training_step(self, *args, **kwargs):
            seen[self._phase] = seen.get(self._phase, 0) + 1
            return super().training_step(*args, **kwargs)

    sft_args = SftArguments(ft_params_num=50, full_ft_max_epochs_per_iteration=1, sparse_ft_max_epochs_per_iteration=2)
    trainer = _Counting(model=tiny("bert"), train_dataset=_LMData(n=10), sft_args=sft_args,
                        args=_args(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2))
    trainer.train()
    assert seen == {"full": 5, "sparse": 10}



def test_a_phase_in_epochs_on_data_without_a_length_is_refused_before_training(tmp_path):
    # the sparse phase's epochs over an IterableDataset raised a bare TypeError from len(), and
    # only after the whole full phase had trained
    class _Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield from _LMData()

    model = tiny("bert")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    sft_args = SftArguments(ft_params_num=50, full_ft_max_steps_per_iteration=2, sparse_ft_max_epochs_per_iteration=1)
    trainer = LotteryTicketSparseFineTuner(model=model, train_dataset=_Stream(), sft_args=sft_args,
                                           args=_args(tmp_path, per_device_train_batch_size=4, max_steps=2))
    with pytest.raises(ValueError, match="sparse_ft_max_epochs_per_iteration = 1: the training data has no length"):
        trainer.train()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())

def test_reselection_sums_a_bf16_model_s_gradients_in_float32():
    # the candidate gradients of a bf16 model were summed in a bf16 buffer: a step's gradient
    # below half a bf16 step of the running sum was lost, and regrowth ranked by that sum
    from types import SimpleNamespace

    from xlsparse.hf.lt_sft import _Reselection

    gen = torch.Generator().manual_seed(0)
    layer = SparseDeltaLinear.from_linear(torch.nn.Linear(16, 8).to(torch.bfloat16), k=10)
    sft_args = DynamicSftArguments(ft_params_num=10, full_ft_max_steps_per_iteration=1, sparse_ft_max_steps_per_iteration=9,
                                   reselection_steps=4, selection_accumulation_steps=4)
    trainer = SimpleNamespace(_phase="sparse", _converted={"w": [(None, None, layer)]}, sft_args=sft_args,
                              _loss_scale=lambda: None, _drop_count=lambda name, step, total: 1)
    tap = _Reselection(trainer)
    tap.on_step_begin(None, SimpleNamespace(global_step=0, max_steps=10), None)
    expect = torch.zeros(8, 16, dtype=torch.float64)
    for scale in (1.0, 1e-3, 1e-3, 1e-3):  # a large step, then small ones
        x = (torch.randn(5, 16, generator=gen) * scale).to(torch.bfloat16)
        dy = torch.randn(5, 8, generator=gen).to(torch.bfloat16)
        layer(x).backward(dy)
        expect += dy.double().t() @ x.double()
    for h in tap.hooks:
        h.remove()
    got = tap.grads["w"]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expect, rtol=1e-5, atol=1e-6)


def test_the_l1_term_is_scaled_like_the_gradients_under_a_grad_scaler(tmp_path):
    # fp16's GradScaler scales the loss's gradients until the optimizer unscales them: an L1
    # gradient added unscaled (as composable-sft's reg_loss.backward()) shrank by the loss scale,
    # and a strong L1 no longer shaped the selection. A power-of-two scale changes nothing at all.
    def run(scale, out):
        sft_args = SftArguments(ft_params_num=400, full_ft_max_steps_per_iteration=3,
                                sparse_ft_max_steps_per_iteration=3, full_l1_reg=50.0, sparse_l1_reg=50.0)
        trainer = LotteryTicketSparseFineTuner(model=_no_dropout(tiny("bert")), args=_args(out), sft_args=sft_args,
                                               train_dataset=_LMData(n=8))
        if scale is not None:  # what Trainer(fp16=True) gets from accelerate on a GPU
            trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=10**6)
        trainer.train()
        return trainer.sft

    plain, scaled = run(None, tmp_path / "a"), run(2.0 ** 14, tmp_path / "b")
    assert set(plain.deltas) == set(scaled.deltas)
    for n, d in plain.deltas.items():
        assert torch.equal(d.indices, scaled.deltas[n].indices), n
        assert torch.equal(d.values, scaled.deltas[n].values), n


@pytest.mark.parametrize("arch", ["bert", "gpt2"])  # a mean loss that ignores num_items_in_batch; a summed one
def test_gradient_accumulation_gives_the_gradient_and_loss_of_the_whole_batch(tmp_path, arch):
    # transformers 5.25 passes num_items_in_batch to BERT's masked-LM forward (it takes **kwargs),
    # which ignores it and returns a mean, and then does not divide by the accumulation steps: the
    # gradient was 2x the whole batch's and the logged loss 2x (the L1 term 2x weaker beside it)
    def first_step(batch, accumulation, out):
        model = _no_dropout(tiny(arch))
        trainer = LotteryTicketSparseFineTuner(
            model=model, train_dataset=_LMData(n=8), args=_args(out, per_device_train_batch_size=batch,
                                                                 gradient_accumulation_steps=accumulation),
            sft_args=SftArguments(ft_params_num=400, full_ft_max_steps_per_iteration=1, sparse_ft_max_steps_per_iteration=1))
        grads = {}

        class _Grads(transformers.TrainerCallback):
            def on_pre_optimizer_step(self, args, state, control, **kwargs):
                if not grads:
                    grads.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})

        trainer.add_callback(_Grads())
        trainer.train()
        return next(h["loss"] for h in trainer.state.log_history if "loss" in h), grads

    (loss, grads), (accumulated_loss, accumulated) = first_step(8, 1, tmp_path / "a"), first_step(4, 2, tmp_path / "b")
    assert accumulated_loss == pytest.approx(loss, rel=1e-5)
    assert grads.keys() == accumulated.keys()
    for n, g in grads.items():
        torch.testing.assert_close(accumulated[n], g, rtol=1e-4, atol=1e-6)


def test_a_tensor_no_gradient_reached_in_the_window_keeps_its_support():
    # all its scores 0, it dropped its smallest |Δ| and regrew the lowest positions (SpIEL, whose
    # hooks never fired on it, keeps its support)
    from types import SimpleNamespace

    layers = {n: SparseDeltaLinear.from_linear(torch.nn.Linear(6, 4), k=5) for n in ("reached", "idle")}
    grads = {"reached": torch.randn(4, 6, generator=torch.Generator().manual_seed(0)), "idle": torch.zeros(4, 6)}
    moved = {}
    trainer = SimpleNamespace(_converted={n: [(None, None, layer)] for n, layer in layers.items()},
                              optimizer=SimpleNamespace(state={}), _drop_count=lambda name, step, total: 2,
                              _set_support=lambda name, idx, values: moved.setdefault(name, idx))
    LotteryTicketSparseFineTuner._reselect(trainer, grads, 4, 10)
    assert set(moved) == {"reached"}
    expect, _, _ = lt_sft._drop_and_regrow(layers["reached"].delta_indices, layers["reached"].delta_values, grads["reached"], 2)
    assert torch.equal(moved["reached"], expect)


def test_reselection_unscales_gradients_under_a_grad_scaler_and_skips_overflowed_steps():
    # under fp16's GradScaler dY arrives multiplied by the loss scale, and an overflowed step's dY
    # holds infs: summed as they came, the scale weighed steps unevenly and an inf topped regrowth
    from types import SimpleNamespace

    from xlsparse.hf.lt_sft import _Reselection

    gen = torch.Generator().manual_seed(1)
    layer = SparseDeltaLinear.from_linear(torch.nn.Linear(16, 8), k=10)
    embedding = SparseDeltaEmbedding.from_embedding(torch.nn.Embedding(20, 8, padding_idx=0), k=10)
    sft_args = DynamicSftArguments(ft_params_num=10, full_ft_max_steps_per_iteration=1, sparse_ft_max_steps_per_iteration=9,
                                   reselection_steps=4, selection_accumulation_steps=4)
    scale = [1.0]
    trainer = SimpleNamespace(_phase="sparse", _converted={"w": [(None, None, layer)], "e": [(None, None, embedding)]},
                              sft_args=sft_args, _loss_scale=lambda: scale[0], _drop_count=lambda name, step, total: 1)
    tap = _Reselection(trainer)
    want_w, want_e = torch.zeros(8, 16, dtype=torch.float64), torch.zeros(20, 8, dtype=torch.float64)
    for i, (s, overflow) in enumerate(((1024.0, False), (2048.0, True), (512.0, False))):
        scale[0] = s
        tap.on_step_begin(None, SimpleNamespace(global_step=i, max_steps=10), None)
        x, ids = torch.randn(5, 16, generator=gen), torch.randint(0, 20, (5,), generator=gen)
        dy = torch.randn(5, 8, generator=gen)
        if overflow:
            dy[0, 0] = float("inf")
        layer(x).backward(dy * s)
        embedding(ids).backward(dy * s)
        scale[0] = s / 2 if overflow else s  # GradScaler.update() backs off after a skipped step
        tap.on_step_end(None, SimpleNamespace(global_step=i + 1, max_steps=10), None)
        if not overflow:
            want_w += dy.double().t() @ x.double()
            want_e.index_add_(0, ids, dy.double() * (ids != 0).double().unsqueeze(1))
    for h in tap.hooks:
        h.remove()
    torch.testing.assert_close(tap.grads["w"].double(), want_w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tap.grads["e"].double(), want_e, rtol=1e-5, atol=1e-5)


def _train_watching_phase_two(model, tmp_path, sft_args, **trainer_kwargs):
    """Train `model`; after every sparse step, the largest |logit| gap between the model in
    training and θ0 + its SFT so far (they must be equal). Returns (trainer, gaps)."""
    theta0 = copy.deepcopy(model)
    x = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(5))
    gaps = []

    class _Check(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if trainer._phase == "sparse":
                with torch.no_grad():
                    got = trainer.model.eval()(input_ids=x).logits
                    trainer.model.train()
                    ref = copy.deepcopy(theta0)
                    with trainer.current_sft().applied(ref):
                        gaps.append(float((got - ref(input_ids=x).logits).abs().max()))

    trainer = LotteryTicketSparseFineTuner(model=model, args=_args(tmp_path), train_dataset=_LMData(),
                                           sft_args=sft_args, **trainer_kwargs)
    trainer.add_callback(_Check())
    trainer.train()
    return trainer, gaps


@pytest.mark.parametrize("legacy", [True, False])
def test_a_weight_the_model_reads_itself_is_not_converted(tmp_path, legacy):
    """DeBERTa-v2 reads `rel_embeddings.weight` (and, legacy=False, its MLM head reads
    `word_embeddings.weight`) without calling the module: as a SparseDeltaEmbedding's frozen base
    that read saw θ0, the selected entries never trained, and phase 2 computed something other
    than θ0 + SFT."""
    cfg = transformers.DebertaV2Config(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=48, max_position_embeddings=32, relative_attention=True,
                                       position_buckets=8, pos_att_type=["p2c", "c2p"], max_relative_positions=16,
                                       legacy=legacy)
    torch.manual_seed(0)
    model = _no_dropout(transformers.DebertaV2ForMaskedLM(cfg))
    trainer, gaps = _train_watching_phase_two(
        model, tmp_path, SftArguments(ft_params_proportion=0.3, full_ft_max_steps_per_iteration=3,
                                      sparse_ft_max_steps_per_iteration=3),
        maskable_params=[n for n, _ in model.named_parameters() if n.startswith("deberta.")])
    rel = trainer.sft.deltas["deberta.encoder.rel_embeddings.weight"]
    assert rel.nnz and rel.values.abs().max() > 0  # the selected entries trained
    assert len(gaps) == 3 and max(gaps) < 1e-5  # the model in training is θ0 + its SFT


def test_a_head_that_liger_reads_itself_trains_as_without_liger(tmp_path, monkeypatch):
    """TrainingArguments.use_liger_kernel makes a causal LM's training forward compute the loss
    from `lm_head.weight` itself (Liger's fused linear cross-entropy; eval forwards call the
    module, so the probe did not see it): a converted head's phase 2 read θ0, its deltas got no
    gradient, and the head's entries ended at 0 in the SFT. Liger is stood in for by that read."""
    import types

    from transformers.modeling_outputs import CausalLMOutputWithPast

    def fake_liger(model, config):  # what Liger's llama forward does with the head, in plain torch
        def forward(self, input_ids=None, labels=None, num_items_in_batch=None, **kw):
            if not (self.training and labels is not None):
                return type(self).forward(self, input_ids=input_ids, labels=labels, **kw)
            hidden = self.model(input_ids=input_ids, **kw).last_hidden_state
            logits = hidden[:, :-1] @ self.lm_head.weight.t()
            return CausalLMOutputWithPast(loss=torch.nn.functional.cross_entropy(logits.flatten(0, 1),
                                                                                   labels[:, 1:].flatten()))
        model.forward = types.MethodType(forward, model)

    monkeypatch.setattr(transformers.trainer, "apply_liger_kernel", fake_liger)
    runs = []
    for liger in (False, True):
        model = _no_dropout(tiny("llama"))
        trainer = LotteryTicketSparseFineTuner(
            model=model, args=_args(tmp_path, use_liger_kernel=liger), train_dataset=_LMData(),
            sft_args=SftArguments(full_ft_max_steps_per_iteration=1, sparse_ft_max_steps_per_iteration=3,
                                  ft_params_num=400), maskable_params=[n for n, _ in model.named_parameters()])
        trainer.train()
        runs.append((trainer.sft.deltas["lm_head.weight"], [h["loss"] for h in trainer.state.log_history if "loss" in h]))
    (plain, plain_losses), (head, losses) = runs
    assert plain.nnz and plain.values.abs().max() > 0
    torch.testing.assert_close(head.indices, plain.indices)
    torch.testing.assert_close(head.values, plain.values, rtol=1e-4, atol=1e-6)
    assert losses == pytest.approx(plain_losses, rel=1e-5)


def test_a_matrix_an_embedding_subclass_shares_with_the_head_trains_as_one(tmp_path):
    """XGLM's word embedding (an nn.Embedding subclass that scales its output) is tied to its
    nn.Linear head: converting the head alone made the shared matrix a frozen θ0 that the
    embedding kept reading, so phase 2 trained a model other than θ0 + its SFT."""
    model = _no_dropout(tiny("xglm"))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    trainer, gaps = _train_watching_phase_two(model, tmp_path, SftArguments(
        ft_params_proportion=0.2, full_ft_max_steps_per_iteration=3, sparse_ft_max_steps_per_iteration=3))
    assert trainer.sft.deltas["model.embed_tokens.weight"].nnz
    assert len(gaps) == 3 and max(gaps) < 1e-5  # the model in training is θ0 + its SFT
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied


@pytest.mark.parametrize("optim", ["sgd", "adafactor", "rmsprop", "adagrad"])
def test_an_optimizer_the_sparse_phase_cannot_run_is_refused(tmp_path, optim):
    # the full phase ran it and the sparse phase silently ran AdamW instead
    steps = dict(full_ft_max_steps_per_iteration=1, sparse_ft_max_steps_per_iteration=1)
    with pytest.raises(ValueError, match=f"optim = '{optim}'"):
        LotteryTicketSparseFineTuner(model=tiny("bert"), args=_args(tmp_path, optim=optim), train_dataset=_LMData(),
                                     sft_args=SftArguments(**steps))
    with pytest.raises(ValueError, match="optimizer_cls_and_kwargs"):
        LotteryTicketSparseFineTuner(model=tiny("bert"), args=_args(tmp_path), train_dataset=_LMData(),
                                     optimizer_cls_and_kwargs=(torch.optim.SGD, {}), sft_args=SftArguments(**steps))
    # a scheduler alone: each phase set it aside and built the TrainingArguments' one, silently
    model = tiny("bert")
    scheduler = torch.optim.lr_scheduler.LinearLR(torch.optim.AdamW(model.parameters()), total_iters=2)
    with pytest.raises(ValueError, match="`optimizers`"):
        LotteryTicketSparseFineTuner(model=model, args=_args(tmp_path), train_dataset=_LMData(),
                                     optimizers=(None, scheduler), sft_args=SftArguments(**steps))
    LotteryTicketSparseFineTuner(model=tiny("bert"), args=_args(tmp_path, optim="adamw_torch_fused"),
                                 train_dataset=_LMData(), sft_args=SftArguments(**steps))


_FSDP_SCRIPT = '''
import sys, torch
sys.path.insert(0, {tests!r})
from test_lt_sft import _LMData, _args
from tiny_models import tiny
from xlsparse.hf.lt_sft import LotteryTicketSparseFineTuner, SftArguments
try:
    LotteryTicketSparseFineTuner(model=tiny("bert"), args=_args({out!r}, fsdp=True, fsdp_config={{"fsdp_version": 2}}),
                                 train_dataset=_LMData(), sft_args=SftArguments(full_ft_max_steps_per_iteration=1,
                                                                                sparse_ft_max_steps_per_iteration=1))
    outcome = None
except ValueError as exc:
    outcome = str(exc)
''' + _GATHER_OUTCOME


@pytest.mark.slow
def test_accelerates_fsdp_plugin_is_refused_on_every_process(tmp_path):
    # Accelerate's FSDP swaps every parameter for a sharded one when train() wraps the model; the
    # trainer kept the old ones, saw |θ − θ0| = 0 and selected the first K entries of the word
    # embeddings. On a CPU, accelerate dropped the plugin unasked and trained DDP: refused there too.
    from conftest import torchrun

    torchrun(_FSDP_SCRIPT, tmp_path, 29651, tests=HERE)
    outcomes = torch.load(tmp_path / "outcomes.pt", weights_only=False)
    assert all(o is not None and "FSDP plugin" in o for o in outcomes), outcomes


@pytest.mark.parametrize("how", SHARDING)
def test_accelerate_launched_with_fsdp_or_deepspeed_is_refused_up_front(tmp_path, monkeypatch, how):
    # `accelerate launch` with an FSDP or DeepSpeed config says so through the environment.
    # DeepSpeed was accepted: ZeRO 1/2 point the optimizer at flat copies of the parameters, and
    # an `optimizer` in its config trains with DeepSpeed's dense Adam, not the sparse phase's.
    steps = SftArguments(full_ft_max_steps_per_iteration=1, sparse_ft_max_steps_per_iteration=1)
    with pytest.raises(ValueError, match=f"(?s){how}.*LotteryTicketSparseFineTuner does not run under"):
        LotteryTicketSparseFineTuner(model=tiny("bert"), args=ask_for_sharding(monkeypatch, _args(tmp_path), how),
                                     train_dataset=_LMData(), sft_args=steps)
    assert not [f for _, _, files in os.walk(tmp_path) for f in files]


def test_a_max_steps_the_phases_do_not_run_is_named(tmp_path):
    # each phase sets TrainingArguments.max_steps to its own length, so max_steps=1000 trained 2 + 2 steps, silently
    steps = SftArguments(full_ft_max_steps_per_iteration=2, sparse_ft_max_steps_per_iteration=2)
    with pytest.warns(UserWarning, match="TrainingArguments.max_steps = 1000 is not used"):
        LotteryTicketSparseFineTuner(model=tiny("bert"), args=_args(tmp_path, max_steps=1000), train_dataset=_LMData(),
                                     sft_args=steps)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a phase's own length (the demos give it, for the warmup) is not flagged
        LotteryTicketSparseFineTuner(model=tiny("bert"), args=_args(tmp_path, max_steps=2), train_dataset=_LMData(),
                                     sft_args=steps)


def test_model_init_is_refused(tmp_path):
    # the Trainer's train() builds a fresh model from model_init, and each phase is a train(): the
    # full phase, the selection and phase 2 each started from another fresh model, and the SFT
    # came back as 200 entries of 0.0
    steps = SftArguments(full_ft_max_steps_per_iteration=2, sparse_ft_max_steps_per_iteration=2, ft_params_num=200)
    with pytest.raises(ValueError, match="model_init"):
        LotteryTicketSparseFineTuner(model_init=lambda: tiny("bert"), args=_args(tmp_path, max_steps=2),
                                     train_dataset=_LMData(), sft_args=steps)
    assert not [f for _, _, files in os.walk(tmp_path) for f in files]


def test_freeze_head_freezes_the_lm_head_of_a_model_without_its_prefix_attribute(tmp_path):
    # (m)T5's base_model_prefix "transformer" is no attribute: freeze_head froze nothing
    torch.manual_seed(0)
    model = transformers.MT5ForConditionalGeneration(transformers.MT5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=2, tie_word_embeddings=False))
    t = _trainer(tmp_path, model, freeze_head=True)
    assert not model.lm_head.weight.requires_grad and "lm_head.weight" not in t._theta0
    assert model.shared.weight.requires_grad
    with pytest.raises(ValueError, match="freeze_head"):  # a bare encoder names no head
        _trainer(tmp_path, transformers.BertModel(tiny("bert").config), freeze_head=True)


@pytest.mark.parametrize("flag", ["untie_embeddings", "freeze_head"])
def test_the_untied_lm_head_of_a_model_without_its_prefix_attribute_is_a_head(tmp_path, flag):
    # (m)T5 has no body under base_model_prefix, so every trainable parameter was maskable: the copy
    # untie_embeddings trains (a head, stored whole) was fine-tuned sparsely inside K instead
    torch.manual_seed(0)
    model = transformers.MT5ForConditionalGeneration(transformers.MT5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=2))
    t = _trainer(tmp_path, model, **{flag: True})
    assert model.lm_head.weight is not model.shared.weight and "lm_head.weight" not in t.maskable
    assert ("lm_head.weight" in t._theta0) == (flag == "untie_embeddings") and "shared.weight" in t.maskable


@pytest.mark.parametrize("flag", ["freeze_head", "freeze_decoder"])
def test_freezing_a_decoder_that_get_output_embeddings_does_not_return_is_refused(tmp_path, flag):
    # DeBERTa-v2 with legacy=False projects onto the vocabulary with the word embeddings themselves;
    # its get_output_embeddings() is the head's [hidden, hidden] dense. freeze_decoder froze that
    # dense, and under either flag the real decoder (the word embeddings) trained, silently
    def build(legacy):
        torch.manual_seed(0)
        return transformers.DebertaV2ForMaskedLM(transformers.DebertaV2Config(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
            legacy=legacy))

    model = build(False)
    with pytest.raises(ValueError, match=rf"{flag}: DebertaV2ForMaskedLM.get_output_embeddings\(\) has a weight of "
                                         rf"shape \(32, 32\), not one row per token of the input embeddings' "
                                         rf"\({VOCAB}, 32\)"):
        _trainer(tmp_path, model, **{flag: True})
    assert all(p.requires_grad for p in model.parameters())
    t = _trainer(tmp_path, build(True), **{flag: True})  # the legacy head's decoder: its own frozen copy
    dec, emb = t.model.get_output_embeddings().weight, t.model.get_input_embeddings().weight
    assert dec is not emb and not dec.requires_grad and emb.requires_grad


@pytest.mark.parametrize("flag", ["freeze_head", "untie_embeddings", "freeze_decoder"])
def test_untying_a_model_whose_forward_reads_the_tie_flag_is_refused_before_anything_changes(tmp_path, flag):
    # SwitchTransformers scales its decoder output by d_model^-0.5 only while
    # config.tie_word_embeddings is True; untying set it False, and the untrained model's logits
    # grew by sqrt(d_model) (5.66x here): phase 1 trained, and the SFT was taken from, another model
    torch.manual_seed(0)
    model = transformers.SwitchTransformersForConditionalGeneration(transformers.SwitchTransformersConfig(
        vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=48, expert_capacity=8, num_layers=2, num_sparse_encoder_layers=1,
        num_decoder_layers=2, num_sparse_decoder_layers=1, num_heads=2, num_experts=2, decoder_start_token_id=0)).eval()
    x = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(input_ids=x, decoder_input_ids=x).logits
    with pytest.raises(ValueError, match=rf"{flag}: SwitchTransformersForConditionalGeneration's forward reads "
                                         r"config.tie_word_embeddings"):
        _trainer(tmp_path, model, **{flag: True})
    assert model.lm_head.weight is model.shared.weight and model.config.tie_word_embeddings
    with torch.no_grad():
        assert torch.equal(model(input_ids=x, decoder_input_ids=x).logits, before)
    _trainer(tmp_path, model)  # tied, it trains


def test_a_model_saved_after_untying_its_head_reloads_with_its_shared_embeddings(tmp_path):
    # untying sets config.tie_word_embeddings = False, and transformers 5 then ties nothing on load:
    # mBART's encoder and decoder embed_tokens (one tensor with `shared`) were left out of the file as
    # duplicates, and the reloaded model ran on freshly initialised embeddings (0.5 off), silently
    torch.manual_seed(0)
    model = _no_dropout(transformers.MBartForConditionalGeneration(transformers.MBartConfig(
        vocab_size=VOCAB, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=24, decoder_ffn_dim=24, max_position_embeddings=32)))
    t = _trainer(tmp_path, model, freeze_head=True)
    t.train()
    t.save_model(str(tmp_path / "out"))
    reloaded = transformers.MBartForConditionalGeneration.from_pretrained(str(tmp_path / "out")).eval()
    ids = _LMData().ids[:2]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits, rtol=0, atol=0)


def test_a_second_train_call_is_refused_rather_than_exceeding_k(tmp_path):
    # the first run's masks counted as selected: the second SFT held 2K entries
    trainer = LotteryTicketSparseFineTuner(
        model=tiny("bert"), args=_args(tmp_path), train_dataset=_LMData(),
        sft_args=SftArguments(ft_params_num=300, full_ft_max_steps_per_iteration=1, sparse_ft_max_steps_per_iteration=1))
    trainer.train()
    assert trainer.sft.nnz == 300
    with pytest.raises(ValueError, match="ran already"):
        trainer.train()
    assert trainer.sft.nnz == 300


@pytest.mark.parametrize("rounds", [1, 2])
def test_a_dynamic_phase_stopped_inside_a_window_leaves_no_taps(tmp_path, rounds):
    # the taps stayed in the hook dicts the original modules got back: a later backward raised
    class _StopEarly(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if trainer._phase == "sparse" and state.global_step == 1:
                control.should_training_stop = True

    trainer = LotteryTicketSparseFineTuner(
        model=tiny("bert"), args=_args(tmp_path), train_dataset=_LMData(), callbacks=[_StopEarly()],
        sft_args=DynamicSftArguments(ft_params_num=300, n_ft_iterations=rounds, full_ft_max_steps_per_iteration=2,
                                     sparse_ft_max_steps_per_iteration=4, reselection_steps=2,
                                     selection_accumulation_steps=2, drop_fraction=0.5))
    trainer.train()
    assert not trainer._reselection.hooks and not trainer._reselection.grads
    model = trainer.model.train()
    model(input_ids=_LMData().ids[:2], labels=_LMData().ids[:2]).loss.backward()


def test_dynamic_reselection_trains_under_bf16_autocast(tmp_path):
    # the tap multiplied the bf16 output gradient by the float32 input: a dtype error
    trainer = LotteryTicketSparseFineTuner(
        model=tiny("bert"), args=_args(tmp_path, bf16=True), train_dataset=_LMData(),
        sft_args=DynamicSftArguments(ft_params_num=300, full_ft_max_steps_per_iteration=2,
                                     sparse_ft_max_steps_per_iteration=4, reselection_steps=2,
                                     selection_accumulation_steps=1, drop_fraction=0.5))
    before = {}

    class _Supports(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if trainer._phase == "sparse" and state.global_step == 0:
                before.update({n: trainer._masks[n].clone() for n in trainer._converted if n in trainer._masks})

    trainer.add_callback(_Supports())
    trainer.train()
    assert trainer.sft.nnz == 300
    assert before and any(not torch.equal(before[n], trainer.sft.deltas[n].indices) for n in before)  # reselected


def test_a_step_that_overflows_mid_network_adds_nothing_to_the_regrowth_gradients(tmp_path):
    # fp16 overflow in the middle of the network leaves the dY of the layers above it finite; the
    # scaler skips the step, yet those layers' taps added it (only a non-finite dY was skipped):
    # their regrowth gradients held the skipped step, the layers below did not.
    def first_reselection(where):
        model = _no_dropout(tiny("bert"))
        sft_args = DynamicSftArguments(ft_params_num=300, full_ft_max_steps_per_iteration=2,
                                       sparse_ft_max_steps_per_iteration=4, reselection_steps=2,
                                       selection_accumulation_steps=2, drop_fraction=0.5)
        trainer = LotteryTicketSparseFineTuner(model=model, args=_args(tmp_path / where), train_dataset=_LMData(n=8),
                                               sft_args=sft_args)
        trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 14, growth_interval=10 ** 6)
        step, seen = [0], {}

        class _Step(transformers.TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                step[0] = state.global_step + 1 if trainer._phase == "sparse" else 0

        trainer.add_callback(_Step())

        def overflow(module, inputs, output):
            out = output[0] if isinstance(output, tuple) else output
            if step[0] == 1 and out.requires_grad:  # the sparse phase's first step overflows
                out.register_hook(lambda g: g.index_put((torch.tensor(0),) * g.dim(), torch.tensor(float("inf"))))

        (model.cls if where == "output" else model.bert.encoder.layer[0]).register_forward_hook(overflow)
        reselect = trainer._reselect

        def grab(grads, *when):
            if not seen:
                seen.update({n: g.clone() for n, g in grads.items()})
            return reselect(grads, *when)

        trainer._reselect = grab
        trainer.train()
        assert trainer.accelerator.scaler.get_scale() == 2.0 ** 13  # one step was skipped
        return seen

    everywhere, above = first_reselection("output"), first_reselection("middle")
    assert set(everywhere) == set(above)
    for n in everywhere:
        assert torch.equal(everywhere[n], above[n]), n


@pytest.mark.parametrize("arch", ["gpt2", "t5"])
def test_the_model_after_training_is_the_base_plus_its_sft_bit_for_bit(tmp_path, arch):
    """GPT-2's Conv1D weights and T5's shared embedding train through the compact optimizer, and
    their SFT entries are θ − θ0, rounded: base + SFT missed the trained model by an ulp here and
    there, so the model the trainer left was not θ0 + φ (nor what a composition rebuilds)."""
    if arch == "t5":
        torch.manual_seed(0)
        base = transformers.T5ForConditionalGeneration(transformers.T5Config(
            vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=48, num_layers=2, num_heads=2, decoder_start_token_id=0)).eval()
    else:
        base = tiny(arch)
    base = _no_dropout(base)
    model = copy.deepcopy(base)
    trainer = LotteryTicketSparseFineTuner(
        model=model, args=_args(tmp_path, weight_decay=0.1), train_dataset=_LMData(n=16),
        sft_args=SftArguments(ft_params_num=800, full_ft_max_steps_per_iteration=3, sparse_ft_max_steps_per_iteration=4))
    trainer.train()
    with trainer.sft.applied(base):
        composed = base.state_dict()
        for name, t in model.state_dict().items():
            assert torch.equal(t, composed[name]), name


def test_a_non_contiguous_weight_folds_back_and_saves_in_phase_two(tmp_path):
    """A linear whose weight is stored transposed (no flat view) trained a whole sparse phase, then
    the fold at its end (and any checkpoint save inside it) raised on `.view(-1)`: the deltas were
    never folded back and the model kept its SparseDeltaLinear layers."""
    base = _no_dropout(tiny("llama"))
    model = copy.deepcopy(base)
    up = model.model.layers[0].mlp.up_proj
    up.weight = torch.nn.Parameter(up.weight.detach().t().contiguous().t())
    assert not up.weight.is_contiguous()
    trainer = LotteryTicketSparseFineTuner(
        model=model, args=_args(tmp_path, save_strategy="steps", save_steps=2), train_dataset=_LMData(),
        sft_args=SftArguments(ft_params_num=400, full_ft_max_steps_per_iteration=2,
                              sparse_ft_max_steps_per_iteration=2))
    trainer.train()
    assert model.model.layers[0].mlp.up_proj is up and trainer.sft.deltas["model.layers.0.mlp.up_proj.weight"].nnz
    assert os.path.isdir(os.path.join(str(tmp_path), "sparse", "checkpoint-2"))
    with trainer.sft.applied(base):
        composed = base.state_dict()
        for name, t in model.state_dict().items():
            assert torch.equal(t, composed[name]), name


def test_a_non_contiguous_weight_shared_by_two_linears_trains_both_phases(tmp_path):
    """One transposed-storage weight in two linears is not converted: the compact MaskedAdamW
    trains it in phase 2, and refused it as non-contiguous only then, after phase 1 had trained."""
    def build(strided):
        model = _no_dropout(tiny("llama"))
        first = model.model.layers[0].self_attn.q_proj
        if strided:
            first.weight = torch.nn.Parameter(first.weight.detach().t().contiguous().t())
        model.model.layers[1].self_attn.q_proj.weight = first.weight
        return model

    model, base = build(True), build(False)  # apply takes contiguous weights; the same values
    shared = model.model.layers[0].self_attn.q_proj.weight
    assert not shared.is_contiguous()
    trainer = LotteryTicketSparseFineTuner(
        model=model, args=_args(tmp_path), train_dataset=_LMData(n=8),
        sft_args=SftArguments(ft_params_num=400, full_ft_max_steps_per_iteration=2,
                              sparse_ft_max_steps_per_iteration=2))
    trainer.train()
    assert model.model.layers[0].self_attn.q_proj.weight is shared is model.model.layers[1].self_attn.q_proj.weight
    assert trainer.sft.deltas["model.layers.0.self_attn.q_proj.weight"].nnz
    with trainer.sft.applied(base):  # the model is θ0 + its SFT, the shared weight included
        composed = base.state_dict()
        for name, t in model.state_dict().items():
            assert torch.equal(t, composed[name]), name


def test_a_strided_view_of_another_parameter_is_refused_at_construction(tmp_path):
    """Two Parameters over one storage, one of them transposed: row-major storage for the strided one
    would untie them (the other would stop seeing its updates), so it is refused before anything trains."""
    model = _no_dropout(tiny("llama"))
    first = model.model.layers[0].self_attn.q_proj
    model.model.layers[1].self_attn.q_proj.weight = torch.nn.Parameter(first.weight.detach().t())
    view = model.model.layers[1].self_attn.q_proj.weight
    before = {n: t.clone() for n, t in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.q_proj\.weight.*model\.layers\.0"):
        LotteryTicketSparseFineTuner(model=model, args=_args(tmp_path), train_dataset=_LMData(n=8),
                                     sft_args=SftArguments(ft_params_num=400, full_ft_max_steps_per_iteration=1,
                                                           sparse_ft_max_steps_per_iteration=1))
    assert view.untyped_storage().data_ptr() == first.weight.untyped_storage().data_ptr() and not view.is_contiguous()
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())


class _Twice(torch.nn.Module):
    def forward(self, w):
        return 2.0 * w


@pytest.mark.parametrize("case", ["parametrized", "shared", "pre_hook", "aliased"])
def test_phase_two_equals_the_dense_masked_restatement_for_unusual_linears(tmp_path, case):
    """A parametrized linear (its weight computed from another parameter), one Parameter in two
    linears, a forward pre-hook that scales the input, and one module registered under two names
    (the name named_modules gives first is not the one the model calls; as transformers 4's T5
    held `shared` as `encoder.embed_tokens`): phase 2 trains them (converted or through the
    compact optimizer) as composable-sft's masked dense training does, and the model it leaves is
    θ0 + its SFT bit for bit. Aliased, the layer was swapped at its first name only: the model
    called the original with θ0, and its selected entries stayed 0."""
    layers = []

    def build():
        model = _no_dropout(tiny("llama"))
        first, second = model.model.layers[0], model.model.layers[1]
        if case == "parametrized":
            torch.nn.utils.parametrize.register_parametrization(first.self_attn.q_proj, "weight", _Twice())
        elif case == "shared":
            second.self_attn.q_proj.weight = first.self_attn.q_proj.weight
        elif case == "aliased":
            first.mlp.alias = second.mlp.up_proj  # first seen as model.layers.0.mlp.alias
        else:
            first.mlp.up_proj.register_forward_pre_hook(lambda m, args: (args[0] * 1.5,))
        return model

    data = _LMData(n=8)
    model, reference, base = build(), build(), build()
    trainer = LotteryTicketSparseFineTuner(model=model, args=_args(tmp_path), train_dataset=data, sft_args=SftArguments(
        ft_params_num=400, full_ft_max_steps_per_iteration=3, sparse_ft_max_steps_per_iteration=3,
        freeze_layer_norm=True))
    for n, p in reference.named_parameters():
        p.requires_grad_(n in trainer._theta0)
    trainer.train()
    sft, _, _ = _restated_lt_sft(reference, {"input_ids": data.ids, "labels": data.ids}, 400, 1, 3, 3, 1e-2, 0.0,
                                 trainer._decayed, 0.0, 0.0, set(trainer.maskable))
    assert any(mask.any() for mask in (m for _, m in sft.values()))
    for n, (values, mask) in sft.items():
        if mask.any():
            d = trainer.sft.deltas[n]
            assert torch.equal(d.indices.long(), mask.reshape(-1).nonzero().flatten()), n
            torch.testing.assert_close(d.values, values, atol=2e-5, rtol=1e-3)
    with trainer.sft.applied(base):
        composed = base.state_dict()
        for name, t in model.state_dict().items():
            assert torch.equal(t, composed[name]), name


@pytest.mark.parametrize("arch, flag", [("albert", None), ("opt", "untie_embeddings"),
                                        pytest.param("t5", "freeze_head", marks=pytest.mark.slow),
                                        pytest.param("distilbert", "freeze_head", marks=pytest.mark.slow)])
def test_shared_parameters_count_once_and_train_once(tmp_path, arch, flag):
    """ALBERT's one layer runs at all three depths (its linears are converted once, their gradient
    the sum over the depths), T5's `shared` is four modules' weight, DistilBERT's and OPT's heads
    are tied: K and N count each tensor once, the SFT equals composable-sft's masked dense training
    restated in plain torch, frozen parameters never move, and base (untied as the flag unties it)
    + SFT is the trained model bit for bit."""
    data = _LMData(n=8)
    model = tiny(arch)
    sft_args = SftArguments(ft_params_num=300, full_ft_max_steps_per_iteration=2, sparse_ft_max_steps_per_iteration=2,
                            **({flag: True} if flag else {}))
    trainer = LotteryTicketSparseFineTuner(model=model, args=_args(tmp_path), train_dataset=data, sft_args=sft_args)
    reference = copy.deepcopy(model)  # untied as the trainer left it; deepcopy keeps the sharing
    for n, p in reference.named_parameters():
        p.requires_grad_(n in trainer._theta0)
    unique = {id(p): p for p in model.parameters()}
    assert trainer.num_params == sum(p.numel() for p in unique.values())
    assert trainer.num_maskable == sum(dict(model.named_parameters())[n].numel() for n in trainer.maskable)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainer.train()
    sft, heads, _ = _restated_lt_sft(reference, {"input_ids": data.ids, "labels": data.ids}, 300, 1, 2, 2, 1e-2, 0.0,
                                     trainer._decayed, 0.0, 0.0, set(trainer.maskable))
    got = trainer.sft
    assert got.nnz == 300 and set(got.absolute) == set(heads)
    for n, (values, mask) in sft.items():
        assert (n in got.deltas) == bool(mask.any()), n
        if mask.any():
            assert torch.equal(got.deltas[n].indices.long(), mask.reshape(-1).nonzero().flatten()), n
            torch.testing.assert_close(got.deltas[n].values, values, atol=2e-5, rtol=1e-3)
    for n, t in heads.items():
        torch.testing.assert_close(got.absolute[n], t, atol=2e-5, rtol=1e-3)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    base = tiny(arch)
    if flag:
        out = base.get_output_embeddings()
        out.weight = torch.nn.Parameter(out.weight.detach().clone())
    with got.applied(base):
        composed = base.state_dict()
        for name, t in model.state_dict().items():
            assert torch.equal(t, composed[name]), name


def test_resume_checks_read_the_pytorch_model_bin_files_of_transformers_4(tmp_path):
    # with save_safetensors=False, transformers 4.x checkpoints hold pytorch_model*.bin: the
    # checks that run before a resume (another base, another SFT) refused them as holding nothing
    from safetensors.torch import save_file

    from xlsparse.hf.lt_sft import _load_weights

    state = {n: t.clone() for n, t in tiny("bert").state_dict().items()}  # tied tensors: one copy each
    names = sorted(state)
    half = len(names) // 2
    safe, bins, empty = (tmp_path / n for n in ("safe", "bin", "empty"))
    for d in (safe, bins, empty):
        d.mkdir()
    save_file(state, str(safe / "model.safetensors"))
    torch.save({n: state[n] for n in names[:half]}, bins / "pytorch_model-00001-of-00002.bin")  # sharded
    torch.save({n: state[n] for n in names[half:]}, bins / "pytorch_model-00002-of-00002.bin")
    for folder in (safe, bins):
        got = _load_weights(str(folder))
        assert set(got) == set(state) and all(torch.equal(got[n], state[n]) for n in state)
    with pytest.raises(ValueError, match="holds no model.*safetensors or pytorch_model"):
        _load_weights(str(empty))
