"""The end-to-end example runs from the repository and prints its table (slow: CI runs it)."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_LOCALES = os.path.isdir("/usr/share/locale/de/LC_MESSAGES")


@pytest.mark.slow
@pytest.mark.skipif(not HAS_LOCALES, reason="needs the gettext catalogues under /usr/share/locale")
def test_cross_lingual_example_quick(tmp_path):
    pytest.importorskip("transformers")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "cross_lingual_sft.py"), "--quick",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| language | full fine-tuning | task SFT only | language SFT + task SFT |" in out.stdout
    assert "| mean over targets |" in out.stdout
    assert os.path.getsize(tmp_path / "results.png") > 1000


def test_gettext_reader_on_a_real_catalogue():
    if not HAS_LOCALES:
        pytest.skip("no gettext catalogues on this machine")
    from xlsparse.demos import gettext

    data = gettext.load_parallel(["en", "de"], ["coreutils"], per_domain=20)
    assert len(data["en"]) == len(data["de"]) == 20
    assert all(e.label == 0 for e in data["de"]) and data["en"][0].text != data["de"][0].text
