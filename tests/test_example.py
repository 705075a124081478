"""The gettext reader behind the demos, on a real catalogue (the demos themselves: test_demos.py)."""
import os

import pytest

HAS_LOCALES = os.path.isdir("/usr/share/locale/de/LC_MESSAGES")


def test_gettext_reader_on_a_real_catalogue():
    if not HAS_LOCALES:
        pytest.skip("no gettext catalogues on this machine")
    from xlsparse.demos import gettext

    data = gettext.load_parallel(["en", "de"], ["coreutils"], per_domain=20)
    assert len(data["en"]) == len(data["de"]) == 20
    assert all(e.label == 0 for e in data["de"]) and data["en"][0].text != data["de"][0].text
