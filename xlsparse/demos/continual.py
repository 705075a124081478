"""Continual multilingual learning, LAFT-URIEL (Badola et al. 2023): a naive update vs a
language-aware one.

On the pretrained encoder (bundled multilingual-e5-small by default), a classifier for the
gettext task is fine-tuned on the training messages of every language at once. Then a batch of
new labelled messages (the dev split) arrives in a few languages, and the model is updated on it:
- naive: every entry of the body's linear weights may change;
- language-aware: each update language changes only its subset, chosen from importance scores on
  every language's data, discounted by how much the typologically distant languages (URIEL) need
  the same entries.
Both use the same optimizer, steps and data. Reported, as in the paper: per-language accuracy on
the held-out test messages before and after, the share of languages that improve, and the mean
size of the losses where a language got worse.
"""
import copy
import os
import random
import time
from dataclasses import dataclass

import torch

from . import ltsft, task
from .arithmetic import ISO3

METHOD = "continual"
FROZEN = ltsft.EMBEDDINGS + (r"LayerNorm",)
HEAD = ("classifier.", "pooler.")


@dataclass
class Settings:
    langs: list[str]  # every language the model serves (English first)
    update_langs: list[str]  # the languages the new batch comes in
    per_domain: int
    train_steps: int  # multilingual fine-tuning before the update
    update_batches: int  # new batches per update language
    score_batches: int  # batches per language for the importance scores
    batch: int
    seeds: list[int]  # vary the order and sampling of the new batches, and the updates' dropout
    density: float = 0.05
    lr_train: float = 1e-4
    lr_update: float = 1e-4


def where_worse(losses: list) -> str:
    """The mean loss where a language got worse, over the seeds where one did (None: none did);
    such a seed has no loss to average, and counting it as 0 shrank the mean."""
    kept = [v for v in losses if v is not None]
    if not kept:
        return "none got worse"
    return task.fmt(kept) + (f" ({len(kept)} of {len(losses)} seeds)" if len(kept) < len(losses) else "")


def settings(quick: bool, seeds: int | None = None) -> Settings:
    if quick:
        s = Settings(langs=["en", "de", "ja"], update_langs=["de"], per_domain=8, train_steps=3, update_batches=1,
                     score_batches=1, batch=4, seeds=[0])
    else:
        s = Settings(langs=["en", "de", "fr", "es", "ru", "pl", "tr", "ja", "zh_CN"], update_langs=["de", "ja", "tr"],
                     per_domain=100, train_steps=150, update_batches=8, score_batches=3, batch=16, seeds=[0, 1, 2])
    if seeds is not None:
        s.seeds = list(range(seeds))
    return s


def _batches(tokenizer, examples, batch: int, count: int, seed: int) -> list[dict]:
    from transformers import DataCollatorWithPadding

    collate = DataCollatorWithPadding(tokenizer)
    data = task.task_dataset(tokenizer, examples)
    order = list(range(len(data)))
    random.Random(seed).shuffle(order)
    order = (order * (1 + batch * count // max(len(order), 1)))[:batch * count]
    return [collate([data[i] for i in order[j:j + batch]]) for j in range(0, len(order), batch)]


def _mixed_batches(tokenizer, by_lang: dict, batch: int, count: int, seed: int) -> list[dict]:
    """Mixed multilingual batches, as the paper's updates arrive: examples of every update
    language shuffled together, each carrying its `language_ids` (the index in `by_lang`)."""
    from transformers import DataCollatorWithPadding

    collate = DataCollatorWithPadding(tokenizer)
    data = {lang: task.task_dataset(tokenizer, examples) for lang, examples in by_lang.items()}
    rows = [(i, lang, j) for i, lang in enumerate(data) for j in range(len(data[lang]))]
    random.Random(seed).shuffle(rows)
    rows = (rows * (1 + batch * count // max(len(rows), 1)))[:batch * count]
    return [collate([dict(data[lang][j], language_ids=i) for i, lang, j in rows[k:k + batch]])
            for k in range(0, len(rows), batch)]


def _update(model, batches, masks, lr):
    """The method-specific call, kept in one place: one routed, masked step per mixed batch."""
    from ..hf.continual import continual_update

    model.train()
    continual_update(model, batches, masks, lr=lr)


def _naive_update(model, batches, weights: list[str], lr):
    """The naive way on the same batches and weights: every entry may change."""
    named = dict(model.named_parameters())
    for name, p in named.items():
        p.requires_grad_(name in weights)
    opt = torch.optim.AdamW([named[n] for n in weights], lr=lr, weight_decay=0.0)
    model.train()
    for batch in batches:
        opt.zero_grad(set_to_none=True)
        model(**{k: v for k, v in batch.items() if k != "language_ids"}).loss.backward()
        opt.step()


def _aware_masks(model, tokenizer, data, s: Settings, body: list[str]):
    """The method-specific calls, kept in one place: importance scores on every language, then
    URIEL-aware subsets for the update languages."""
    from ..hf.continual import language_aware_masks
    from ..hf.subnetworks import importance_scores

    score_data = {lang: _batches(tokenizer, data.train_by_lang[lang], s.batch, s.score_batches, 0) for lang in s.langs}
    scores = importance_scores(model, score_data, params=body)
    masks = language_aware_masks(scores, {lang: ISO3[lang] for lang in s.langs}, density=s.density)
    return {lang: masks[lang] for lang in s.update_langs}


def run(quick: bool = False, model_name: str = task.DEFAULT_MODEL, out: str = "demo-out", seeds: int | None = None) -> dict:
    """Fine-tune, update both ways, evaluate, print the table, write `<out>/continual.{md,json,png}`."""
    from transformers import DataCollatorWithPadding, Trainer

    from ..hf.continual import per_language_report

    s = settings(quick, seeds)
    start = time.time()
    data = task.load_task(s.langs, s.per_domain)
    model, tokenizer = task.classifier(model_name, len(task.DOMAINS), seed=0)
    task.ensure_dir(out)  # made only once the model loaded: a bad --model leaves no folder
    print(f"{METHOD}: fine-tune on {len(s.langs)} languages, then update on new messages in {s.update_langs}", flush=True)

    ltsft.set_trainable(model, FROZEN)
    mixed = [e for lang in s.langs for e in data.train_by_lang[lang]]
    Trainer(model=model, args=task.training_args(f"{out}/tmp/train", s.train_steps, s.lr_train, s.batch, 0),
            train_dataset=task.task_dataset(tokenizer, mixed), data_collator=DataCollatorWithPadding(tokenizer)).train()
    # The update changes the body's linear weights (the layers LAFT routes), in both arms.
    weights = [n for n, p in model.named_parameters() if p.requires_grad and not n.startswith(HEAD)
               and not n.startswith(f"{model.base_model_prefix}.pooler.") and n.endswith(".weight")
               and isinstance(model.get_submodule(n[: -len(".weight")]), torch.nn.Linear)]
    before = {lang: task.accuracy(model, tokenizer, data.test[lang]) for lang in s.langs}

    aware_masks = _aware_masks(model, tokenizer, data, s, weights)
    runs = ("naive", "language-aware")
    after = {kind: {lang: [] for lang in s.langs} for kind in runs}
    reports = {kind: [] for kind in runs}
    for seed in s.seeds:
        new = _mixed_batches(tokenizer, {lang: data.dev[lang] for lang in s.update_langs}, s.batch,
                             s.update_batches * len(s.update_langs), seed)
        for kind in runs:
            updated = copy.deepcopy(model)  # each arm starts from the same fine-tuned model
            torch.manual_seed(seed)  # and the same dropout draws: paired arms, each seed independent of the others
            if kind == "naive":
                _naive_update(updated, new, weights, s.lr_update)
            else:
                _update(updated, new, aware_masks, s.lr_update)
            scores = {lang: task.accuracy(updated.eval(), tokenizer, data.test[lang]) for lang in s.langs}
            for lang in s.langs:
                after[kind][lang].append(scores[lang])
            report = per_language_report(before, scores)
            reports[kind].append((report.improved / len(s.langs), report.mean_loss if report.worsened else None,
                                  report.mean_change))
        print(f"seed {seed}: " + "; ".join(f"{k}: improved {r[-1][0]:.0%}, mean loss where worse "
                                           f"{where_worse([r[-1][1]])}" for k, r in reports.items()), flush=True)
    for kind in after.values():
        for values in kind.values():
            task.check_finite(METHOD, values)

    rows = [[lang + (" (updated)" if lang in s.update_langs else ""), f"{before[lang]:.3f}",
             task.fmt(after["naive"][lang]), task.fmt(after["language-aware"][lang])] for lang in s.langs]
    for i, label in enumerate(["share of languages improved", "mean loss where worse", "mean change"]):
        cell = where_worse if i == 1 else task.fmt
        rows.append([f"**{label}**", "", cell([r[i] for r in reports["naive"]]),
                     cell([r[i] for r in reports["language-aware"]])])
    elapsed = time.time() - start
    from ..diff import budget

    named = dict(model.named_parameters())
    entries = sum(named[n].numel() for n in weights)
    k = budget(METHOD, entries, density=s.density)  # the rule the masks use
    summary = (f"Accuracy ({len(task.DOMAINS)} programs) on {len(data.test[task.SOURCE])} held-out messages per "
               f"language, after multilingual fine-tuning ({s.train_steps} steps) and after an update on "
               f"{s.update_batches * len(s.update_langs)} batches of {s.batch} drawn from the update languages' "
               f"{sum(len(data.dev[lang]) for lang in s.update_langs)} dev messages, shuffled together (cycled when "
               f"fewer); mean ± std over {len(s.seeds)} seed(s) of the new batches. Both arms update the body's "
               f"linear weights only; language-aware subsets: {k:,} entries per language ({s.density:.0%}). Model {model_name}; total {elapsed:.0f} s.")
    text = (f"### Continual update (LAFT-URIEL): naive vs language-aware\n\n{summary}\n\n"
            f"{task.markdown_table(['language', 'before', 'naive update', 'language-aware update'], rows)}\n")
    print("\n" + text)
    plot = task.bar_chart(os.path.join(out, f"{METHOD}.png"), "Continual update: change in accuracy per language",
                          s.langs, {kind: [[a - before[lang] for a in after[kind][lang]] for lang in s.langs]
                                    for kind in after}, "accuracy after − before")
    sizes = {f"language-aware subset {lang}": {"nnz": int(sum(int(m.sum()) for n, m in aware_masks[lang].items())),
                                               "k": k, "entries": entries} for lang in s.update_langs}
    results = {"method": METHOD, "model": model_name, "quick": quick, "seeds": s.seeds, "density": s.density,
               "before": before, "accuracy": after, "reports": reports, "sizes": sizes, "seconds": elapsed, "plot": plot}
    task.write_results(out, METHOD, text, results)
    return results
