"""Zero-shot cross-lingual transfer with composed sparse fine-tunings, end to end on CPU.

1. Train a tokenizer and a tiny multilingual BERT (θ0) with masked-LM on real text that is on
   this machine, the gettext catalogues under /usr/share/locale: monolingual lines plus
   English-translation pairs in one sequence (translation LM, which aligns the languages).
2. LT-SFT a language SFT φ_L per language (masked-LM on that language's messages).
3. LT-SFT a task SFT φ_task on English only: tell which program a message comes from, trained
   on top of θ0 + φ_en.
4. Zero-shot: evaluate θ0 + φ_L + φ_task on the translations of held-out messages in every
   language, against a full fine-tuning baseline trained on English (θ0 → θ_task).

Run: python examples/cross_lingual_sft.py [--quick]   (prints a table, saves examples/out/results.png)
"""
import argparse
import math
import os
import random
import sys
import time

import torch

from xlsparse.demos import gettext as gettext_corpus

DOMAINS = ["coreutils", "dpkg", "gnupg2", "gtk20"]
SOURCE = "en"
TARGETS = ["de", "fr", "es", "ru"]


def build_tokenizer(texts: list[str], vocab_size: int):
    """A WordPiece tokenizer trained in-process, wrapped for transformers."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=special))
    from tokenizers.processors import TemplateProcessing

    tok.post_processor = TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


class Encoded(torch.utils.data.Dataset):
    """Tokenised lines (and labels) for the HF Trainer."""

    def __init__(self, tokenizer, texts, labels=None, max_len=32):
        self.enc = tokenizer(texts, truncation=True, max_length=max_len)
        self.labels = labels

    def __len__(self):
        return len(self.enc["input_ids"])

    def __getitem__(self, i):
        item = {k: v[i] for k, v in self.enc.items() if k != "token_type_ids"}
        if self.labels is not None:
            item["labels"] = self.labels[i]
        return item


def training_args(out, steps, lr, batch, seed):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=out, max_steps=steps, learning_rate=lr, per_device_train_batch_size=batch,
                             weight_decay=0.0, warmup_steps=0, lr_scheduler_type="linear", logging_steps=10**9,
                             save_strategy="no", report_to=[], seed=seed, use_cpu=True, disable_tqdm=False)


def accuracy(model, tokenizer, examples, batch=128) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(examples), batch):
            chunk = examples[i:i + batch]
            enc = tokenizer([e.text for e in chunk], truncation=True, max_length=32, padding=True, return_tensors="pt")
            enc.pop("token_type_ids", None)
            pred = model(**enc).logits.argmax(-1)
            correct += int((pred == torch.tensor([e.label for e in chunk])).sum())
    return correct / max(len(examples), 1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: fewer steps and languages")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import transformers
    from transformers import (BertConfig, BertForMaskedLM, BertForSequenceClassification,
                              DataCollatorForLanguageModeling, DataCollatorWithPadding, Trainer)

    import xlsparse
    from xlsparse.hf.lt_sft import LotteryTicketSparseFineTuner, SftArguments

    transformers.logging.set_verbosity_error()
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    targets = TARGETS[:2] if args.quick else TARGETS
    langs = [SOURCE] + targets
    scale = 0.25 if args.quick else 1.0
    steps = lambda n: max(2, int(n * scale))  # noqa: E731
    start = time.time()
    os.makedirs(args.out, exist_ok=True)

    # Task data: the same held-out messages in every language; English training messages.
    data = gettext_corpus.load_parallel(langs, DOMAINS, per_domain=int(240 * scale) + 60, seed=args.seed)
    n_test = len(data[SOURCE]) // 3
    test_ids = set(random.Random(1).sample(range(len(data[SOURCE])), n_test))
    train_task = [e for i, e in enumerate(data[SOURCE]) if i not in test_ids]
    test = {lang: [e for i, e in enumerate(data[lang]) if i in test_ids] for lang in langs}
    held_out = {e.text for lang in langs for e in test[lang]}
    held_out_ids = {e.text for e in test[SOURCE]}

    # Unlabelled text per language for the language model, without the test messages.
    mono = {lang: [t for t in gettext_corpus.monolingual_text(lang, int(4000 * scale) + 500) if t not in held_out]
            for lang in langs}
    pairs = [f"{a} | {b}" for lang in targets
             for a, b in gettext_corpus.translation_pairs(lang, int(3000 * scale) + 300, exclude=held_out_ids)]
    tokenizer = build_tokenizer([t for lang in langs for t in mono[lang]] + pairs, vocab_size=4000)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=128, num_hidden_layers=3, num_attention_heads=4,
                        intermediate_size=384, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id)
    mlm = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15)
    print(f"data: {len(train_task)} English task examples, {n_test} test messages x {len(langs)} languages, "
          f"{sum(len(v) for v in mono.values())} unlabelled lines; vocab {len(tokenizer)}")

    # 1. θ0: masked-LM pretraining on all languages, monolingual lines and translation pairs.
    base = BertForMaskedLM(config)
    mixed = [t for lang in langs for t in mono[lang]] + pairs
    random.shuffle(mixed)
    Trainer(model=base, args=training_args(f"{args.out}/pre", steps(600), 1e-3, 32, args.seed),
            train_dataset=Encoded(tokenizer, mixed, max_len=64), data_collator=mlm).train()
    theta0 = {n: p.detach().clone() for n, p in base.named_parameters()}

    # 2. A language SFT per language (LT-SFT with masked-LM), each from θ0.
    sft_args = SftArguments(ft_params_proportion=0.05, full_ft_max_steps_per_iteration=steps(60),
                            sparse_ft_max_steps_per_iteration=steps(60), freeze_head=True, freeze_layer_norm=True)
    lang_sft = {}
    for lang in langs:
        with torch.no_grad():
            for n, p in base.named_parameters():
                p.copy_(theta0[n])
        trainer = LotteryTicketSparseFineTuner(
            model=base, args=training_args(f"{args.out}/lang-{lang}", 1, 5e-4, 32, args.seed),
            train_dataset=Encoded(tokenizer, mono[lang]), data_collator=mlm, sft_args=sft_args)
        trainer.train()
        lang_sft[lang] = trainer.sft
        print(f"language SFT {lang}: {lang_sft[lang].nnz:,} entries ({time.time() - start:.0f} s)")
    with torch.no_grad():
        for n, p in base.named_parameters():
            p.copy_(theta0[n])

    # 3. The task: a classifier on θ0's encoder.
    def classifier():
        torch.manual_seed(args.seed)
        model = BertForSequenceClassification(config.__class__(**{**config.to_dict(), "num_labels": len(DOMAINS)}))
        model.bert.load_state_dict(base.bert.state_dict(), strict=False)
        return model

    task_data = Encoded(tokenizer, [e.text for e in train_task], [e.label for e in train_task])
    pad = DataCollatorWithPadding(tokenizer)

    # Baseline: full fine-tuning on English.
    full = classifier()
    Trainer(model=full, args=training_args(f"{args.out}/full", steps(200), 1e-3, 32, args.seed),
            train_dataset=task_data, data_collator=pad).train()

    # Task SFT: trained on θ0 + φ_en, stored as a diff with the head as an absolute entry.
    task_model = classifier()
    with lang_sft[SOURCE].applied(task_model):
        trainer = LotteryTicketSparseFineTuner(
            model=task_model, args=training_args(f"{args.out}/task", 1, 1e-3, 32, args.seed),
            train_dataset=task_data, data_collator=pad,
            sft_args=SftArguments(ft_params_proportion=0.05, full_ft_max_steps_per_iteration=steps(200),
                                  sparse_ft_max_steps_per_iteration=steps(200), freeze_layer_norm=True))
        trainer.train()
    task_sft = trainer.sft

    # 4. Zero-shot evaluation.
    rows = []
    for lang in langs:
        fresh = classifier()
        with xlsparse.apply([lang_sft[lang], task_sft], fresh):
            composed = accuracy(fresh, tokenizer, test[lang])
        with task_sft.applied(fresh):
            task_only = accuracy(fresh, tokenizer, test[lang])
        rows.append((lang, accuracy(full, tokenizer, test[lang]), task_only, composed))

    print(f"\nzero-shot accuracy on {n_test} held-out messages per language ({len(DOMAINS)} classes, "
          f"chance {1 / len(DOMAINS):.2f}); trained on English only; {time.time() - start:.0f} s in all\n")
    print("| language | full fine-tuning | task SFT only | language SFT + task SFT |")
    print("|---|---|---|---|")
    for lang, f, t, c in rows:
        print(f"| {lang}{' (source)' if lang == SOURCE else ''} | {f:.3f} | {t:.3f} | {c:.3f} |")
    mean = lambda i: sum(r[i] for r in rows if r[0] != SOURCE) / max(len(rows) - 1, 1)  # noqa: E731
    print(f"| mean over targets | {mean(1):.3f} | {mean(2):.3f} | {mean(3):.3f} |")

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return 0
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.27
    xs = range(len(rows))
    for j, label in enumerate(["full fine-tuning", "task SFT only", "language SFT + task SFT"]):
        ax.bar([x + (j - 1) * width for x in xs], [r[j + 1] for r in rows], width, label=label)
    ax.axhline(1 / len(DOMAINS), color="grey", linestyle=":", label="chance")
    ax.set_xticks(list(xs), [r[0] for r in rows])
    ax.set_ylabel("accuracy")
    ax.set_title("Zero-shot cross-lingual transfer (trained on English)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(args.out, "results.png")
    fig.savefig(path, dpi=120)
    print(f"\nplot: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
