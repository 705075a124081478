"""Real multilingual text that is already on the machine: gettext catalogues.

Every `/usr/share/locale/<lang>/LC_MESSAGES/<domain>.mo` maps English messages (msgid) to their
translation (msgstr), so the same message exists in many languages: a parallel corpus. The task
used by the example is to tell which program (domain) a message comes from; it is learnt from
English and evaluated zero-shot on the translations.
"""
import os
import random
import struct
from dataclasses import dataclass

LOCALE_DIR = "/usr/share/locale"


def read_mo(path: str) -> dict[str, str]:
    """msgid -> msgstr of one compiled catalogue, without plural forms, contexts or the header."""
    with open(path, "rb") as f:
        data = f.read()
    magic = struct.unpack("<I", data[:4])[0]
    endian = "<" if magic == 0x950412DE else ">"
    if struct.unpack(endian + "I", data[:4])[0] != 0x950412DE:
        raise ValueError(f"{path}: not a gettext .mo file")
    count, orig_at, trans_at = struct.unpack(endian + "3I", data[8:20])
    messages = {}
    for i in range(count):
        olen, ooff = struct.unpack(endian + "2I", data[orig_at + 8 * i: orig_at + 8 * i + 8])
        tlen, toff = struct.unpack(endian + "2I", data[trans_at + 8 * i: trans_at + 8 * i + 8])
        msgid = data[ooff: ooff + olen]
        msgstr = data[toff: toff + tlen]
        if not msgid or b"\x00" in msgid or b"\x04" in msgid or not msgstr:
            continue
        try:
            messages[msgid.decode("utf-8")] = msgstr.decode("utf-8")
        except UnicodeDecodeError:
            continue
    return messages


def clean(text: str) -> str:
    """One line, without the accelerator marks and format directives that carry no language."""
    for mark in ("_", "&"):
        text = text.replace(mark, "")
    return " ".join(text.split())


@dataclass
class Example:
    text: str
    label: int
    lang: str


def load_parallel(langs: list[str], domains: list[str], per_domain: int, seed: int = 0,
                  locale_dir: str = LOCALE_DIR) -> dict[str, list[Example]]:
    """For each language ("en" = the msgids), up to `per_domain` messages of each domain.

    Only messages translated into every requested language are kept, so all languages see the
    same messages: a parallel test set.
    """
    rng = random.Random(seed)
    out: dict[str, list[Example]] = {lang: [] for lang in langs}
    for label, domain in enumerate(domains):
        catalogues = {}
        for lang in langs:
            if lang == "en":
                continue
            path = os.path.join(locale_dir, lang, "LC_MESSAGES", domain + ".mo")
            if not os.path.exists(path):
                raise FileNotFoundError(f"{path} is missing: choose languages and domains present on this machine")
            catalogues[lang] = read_mo(path)
        shared = sorted(set.intersection(*(set(c) for c in catalogues.values())))
        shared = [m for m in shared if 3 <= len(clean(m).split()) <= 24]
        rng.shuffle(shared)
        for msgid in shared[:per_domain]:
            for lang in langs:
                text = clean(msgid if lang == "en" else catalogues[lang][msgid])
                out[lang].append(Example(text, label, lang))
    return out


def translation_pairs(lang: str, max_pairs: int, exclude: set[str] = frozenset(), locale_dir: str = LOCALE_DIR) -> list[tuple[str, str]]:
    """(English, translation) message pairs of one language from all its catalogues, without the
    msgids in `exclude`: parallel text for translation-language-model pretraining."""
    pairs = []
    lang_dir = os.path.join(locale_dir, lang, "LC_MESSAGES")
    for name in sorted(os.listdir(lang_dir)):
        if name.endswith(".mo"):
            for msgid, msgstr in read_mo(os.path.join(lang_dir, name)).items():
                if msgid not in exclude and len(msgid.split()) >= 3:
                    pairs.append((clean(msgid), clean(msgstr)))
        if len(pairs) >= max_pairs:
            break
    return pairs[:max_pairs]


def monolingual_text(lang: str, max_lines: int, exclude: set[str] = frozenset(), locale_dir: str = LOCALE_DIR) -> list[str]:
    """Unlabelled lines of one language from all its catalogues, for masked-LM training.

    `exclude` holds msgids kept out (the task's test messages), so the language model never sees them.
    """
    lines = []
    lang_dir = os.path.join(locale_dir, lang, "LC_MESSAGES")
    source = os.path.join(locale_dir, "de", "LC_MESSAGES") if lang == "en" else lang_dir
    for name in sorted(os.listdir(source)):
        if not name.endswith(".mo"):
            continue
        for msgid, msgstr in read_mo(os.path.join(source, name)).items():
            if msgid in exclude:
                continue
            text = clean(msgid if lang == "en" else msgstr)
            if len(text.split()) >= 3:
                lines.append(text)
        if len(lines) >= max_lines:
            break
    return lines[:max_lines]
