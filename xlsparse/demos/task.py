"""What every demo shares: the gettext task (which program wrote a UI message), the model
loading, a masked-LM head that scores only masked positions, training and evaluation helpers,
the markdown table and the per-language bar chart."""
import contextlib
import math
import os
import random
import re
import statistics
from dataclasses import dataclass, field

import torch
from torch import nn

from . import DEFAULT_MODEL, gettext

SOURCE = "en"
DOMAINS = ["gtk20", "glib20", "coreutils", "dpkg", "apt", "xkeyboard-config", "libc", "systemd"]
# Present with all eight domains on a Debian/Ubuntu machine with these locales installed.
TARGETS = ["de", "fr", "es", "it", "nl", "pl", "cs", "ru", "tr", "ja", "zh_CN"]
MAX_LEN = 32


@dataclass
class TaskData:
    """English training messages, and the same held-out messages in every language."""

    train: list  # gettext.Example, English
    test: dict[str, list]  # language -> Example list, parallel across languages
    dev: dict[str, list]  # language -> Example list (disjoint from test), for choices such as λ
    held_out: set[str] = field(default_factory=set)  # every test/dev text: kept out of language-model data
    train_by_lang: dict[str, list] = field(default_factory=dict)  # the training messages in every language

    @property
    def n_classes(self) -> int:
        return len(DOMAINS)


def load_task(langs: list[str], per_domain: int, seed: int = 0, dev_share: float = 0.15, test_share: float = 0.35) -> TaskData:
    """Split the parallel messages by message (never by language): train (English), dev, test."""
    data = gettext.load_parallel(sorted(set(langs) | {SOURCE}), DOMAINS, per_domain=per_domain, seed=seed)
    n = len(data[SOURCE])
    order = list(range(n))
    random.Random(seed + 1).shuffle(order)
    n_test, n_dev = int(test_share * n), int(dev_share * n)
    test_ids, dev_ids = set(order[:n_test]), set(order[n_test:n_test + n_dev])
    train_by_lang = {lang: [e for i, e in enumerate(ex) if i not in test_ids and i not in dev_ids] for lang, ex in data.items()}
    test = {lang: [e for i, e in enumerate(ex) if i in test_ids] for lang, ex in data.items()}
    dev = {lang: [e for i, e in enumerate(ex) if i in dev_ids] for lang, ex in data.items()}
    held_out = {e.text for split in (test, dev) for ex in split.values() for e in ex}
    return TaskData(train_by_lang[SOURCE], test, dev, held_out, train_by_lang)


def language_text(lang: str, max_lines: int, exclude: set[str]) -> list[str]:
    """Unlabelled lines of one language for masked-LM training, without any task test/dev text."""
    return [t for t in gettext.monolingual_text(lang, max_lines + len(exclude) // 8) if t not in exclude][:max_lines]


# --- models -------------------------------------------------------------------------------------

def load_encoder(name: str, model_class=None, **config_kwargs):
    """(model, tokenizer). "e5-small" is the bundled multilingual-e5-small (needs the
    `examples` extra); anything else is a Hugging Face model name or folder."""
    if name == DEFAULT_MODEL:
        from ..hf.models import load_multilingual_e5_small

        return load_multilingual_e5_small(model_class, **config_kwargs)
    import transformers

    model_class = model_class or transformers.AutoModel
    if model_class.__name__.startswith("Bert"):  # a Bert* class asked for: use the Auto* twin for any architecture
        model_class = getattr(transformers, "AutoModel" + model_class.__name__[len("Bert"):], transformers.AutoModel)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(name)
        return model_class.from_pretrained(name, **config_kwargs), tokenizer
    except OSError as exc:  # transformers' message names the Hub or a file, never the option
        raise OSError(f"demo: --model {name}: cannot load it: {exc}") from exc


def classifier(name: str, n_classes: int, seed: int):
    """A sequence classifier on the pretrained encoder; its head is seeded by `seed`."""
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    model, tokenizer = load_encoder(name, BertForSequenceClassification, num_labels=n_classes)
    return model, tokenizer


class MaskedLMHead(nn.Module):
    """BERT's MLM transform (dense, GELU, LayerNorm) and an output bias; the output weights are
    the encoder's word embeddings, passed in."""

    def __init__(self, hidden: int, vocab: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden, eps=eps)
        self.bias = nn.Parameter(torch.zeros(vocab))

    def forward(self, hidden: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
        return self.norm(nn.functional.gelu(self.dense(hidden))) @ words.T + self.bias


class MaskedLM(nn.Module):
    """A masked-LM head over an encoder that scores only the masked positions and only the
    vocabulary seen in the training text.

    The bundled e5 checkpoint has no MLM head, and a full 250k-way softmax over every position
    would dominate the step time on a CPU; scoring masked tokens against the rows of the (tied)
    word embeddings of the words that occur costs a few percent of it. Parameter names of the
    encoder stay those of a `*ForSequenceClassification` model (`<prefix>.encoder...`), so a
    language SFT trained here applies to the task classifier unchanged.
    """

    def __init__(self, model: nn.Module, vocab_ids: torch.Tensor):
        super().__init__()
        encoder = model.base_model
        self.prefix = self.base_model_prefix = model.base_model_prefix  # LT-SFT's freeze_head reads it
        setattr(self, self.prefix, encoder)
        self.config = encoder.config
        self.cls = MaskedLMHead(self.config.hidden_size, len(vocab_ids), self.config.layer_norm_eps)
        self.register_buffer("vocab_ids", vocab_ids, persistent=False)
        remap = torch.full((self.config.vocab_size,), -100, dtype=torch.long)
        remap[vocab_ids] = torch.arange(len(vocab_ids))
        self.register_buffer("remap", remap, persistent=False)

    def get_input_embeddings(self) -> nn.Module:
        return getattr(self, self.prefix).get_input_embeddings()

    def get_output_embeddings(self):
        return None  # the head reads the input embeddings' rows; no separate output matrix

    def forward(self, input_ids, attention_mask=None, labels=None, **_):
        encoder = getattr(self, self.prefix)
        hidden = encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        chosen = labels != -100
        words = encoder.get_input_embeddings().weight[self.vocab_ids]
        logits = self.cls(hidden[chosen], words)
        loss = nn.functional.cross_entropy(logits, self.remap[labels[chosen]])
        return {"loss": loss}


def vocabulary_of(tokenizer, texts: list[str]) -> torch.Tensor:
    """Sorted ids of every token in `texts` (plus the specials)."""
    ids = set(tokenizer.all_special_ids)
    # verbose=False: no "longer than 512 tokens" warning, only the ids are wanted here
    for enc in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]:
        ids.update(enc)
    return torch.tensor(sorted(ids))


class Encoded(torch.utils.data.Dataset):
    """Tokenised lines (and labels) for the HF Trainer."""

    def __init__(self, tokenizer, texts, labels=None, max_len=MAX_LEN):
        self.enc = tokenizer(texts, truncation=True, max_length=max_len, return_token_type_ids=False)
        self.labels = labels

    def __len__(self):
        return len(self.enc["input_ids"])

    def __getitem__(self, i):
        item = {k: v[i] for k, v in self.enc.items()}
        if self.labels is not None:
            item["labels"] = self.labels[i]
        return item


def task_dataset(tokenizer, examples) -> Encoded:
    return Encoded(tokenizer, [e.text for e in examples], [e.label for e in examples])


def training_args(out: str, steps: int, lr: float, batch: int, seed: int, warmup: float = 0.1):
    """TrainingArguments for a short CPU run with a tqdm bar and no checkpoints."""
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=out, max_steps=steps, learning_rate=lr, per_device_train_batch_size=batch,
                             weight_decay=0.0, warmup_steps=max(1, int(warmup * steps)), lr_scheduler_type="linear",
                             logging_steps=10**9, save_strategy="no", report_to=[], seed=seed, data_seed=seed,
                             use_cpu=not torch.cuda.is_available(), disable_tqdm=False, dataloader_num_workers=0)


def freeze(model: nn.Module, patterns) -> None:
    """requires_grad False on every parameter whose name matches one of the regexes."""
    for name, p in model.named_parameters():
        if any(re.search(pat, name) for pat in patterns):
            p.requires_grad_(False)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def restore(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(state[n])


def accuracy(model, tokenizer, examples, batch: int = 256) -> float:
    """Share of examples whose argmax class is the label."""
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    with torch.no_grad():
        for i in range(0, len(examples), batch):
            chunk = examples[i:i + batch]
            enc = tokenizer([e.text for e in chunk], truncation=True, max_length=MAX_LEN, padding=True,
                            return_tensors="pt", return_token_type_ids=False).to(device)
            pred = model(**enc).logits.argmax(-1).cpu()
            correct += int((pred == torch.tensor([e.label for e in chunk])).sum())
    return correct / max(len(examples), 1)


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values: list[float]) -> str:
    """"0.512 ± 0.013" over seeds (sample standard deviation), or one number for one seed."""
    m, s = mean_std(values)
    return f"{m:.3f} ± {s:.3f}" if len(values) > 1 else f"{m:.3f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def bar_chart(path: str, title: str, langs: list[str], series: dict[str, list[list[float]]], ylabel: str,
              chance: float | None = None) -> str | None:
    """A per-language grouped bar chart (mean over seeds, error bar = std); returns the path,
    or None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install xlsparse[examples])")
        return None
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(langs) * len(series) / 2 + 2), 4))
    width = 0.8 / len(series)
    for j, (label, per_lang) in enumerate(series.items()):
        stats = [mean_std(v) for v in per_lang]
        xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(langs))]
        ax.bar(xs, [m for m, _ in stats], width, yerr=[s for _, s in stats], label=label, capsize=2)
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle=":", label="chance")
    ax.set_xticks(range(len(langs)), langs)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def check_finite(name: str, values) -> None:
    """Demos must never print a NaN as a result."""
    bad = [v for v in values if not math.isfinite(v)]
    if bad:
        raise RuntimeError(f"{name}: non-finite results {bad[:3]}")


def ensure_dir(path: str) -> str:
    os.makedirs(path, exist_ok=True)
    return path


def write_results(out: str, method: str, markdown: str, results: dict) -> None:
    """`<out>/<method>.md` (the printed tables) and `<out>/<method>.json` (every number); removes
    the Trainer's scratch folder `<out>/tmp`."""
    import json

    # Only its empty folders, which are all the Trainer leaves (save_strategy "no"): an rmtree also
    # deleted a `tmp` folder of the user's (`--out .` removed ./tmp with whatever it held).
    for folder, _, _ in os.walk(os.path.join(out, "tmp"), topdown=False):
        with contextlib.suppress(OSError):  # not empty: not ours to remove
            os.rmdir(folder)

    with open(os.path.join(out, f"{method}.md"), "w") as f:
        f.write(markdown)
    with open(os.path.join(out, f"{method}.json"), "w") as f:
        json.dump(results, f, indent=1)
