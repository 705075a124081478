"""Language-specific subnetworks (Choenni et al. 2023) against shared weights.

The gettext task classifier on the pretrained encoder (bundled multilingual-e5-small by default)
is fine-tuned on several languages at once, four ways, with the same data and steps:
- shared: every language updates every trainable weight (the naive way);
- static subnetworks: each language updates only its own subnetwork of the transformer-body
  linear weights, chosen once from importance scores (|grad × weight|) on its data;
- dynamic subnetworks: the same, the masks re-selected from recent batches during training;
- meta-learning: first-order MAML as udify-metalearning runs it: per language a masked SGD inner
  step on its rows of one batch (support), the gradient at the adapted weights on its rows of the
  next batch (query), an AdamW outer step; subnetworks are the static masks.
Accuracy per language on held-out messages, the training languages (seen) and zero-shot ones
(unseen) reported apart.
"""
import os
import random
import time
from dataclasses import dataclass

import torch

from . import ltsft, task

METHOD = "subnetworks"
VARIANTS = ("shared", "static", "dynamic", "meta (FOMAML)")


@dataclass
class Settings:
    seen: list[str]
    unseen: list[str]
    per_domain: int
    steps: int
    batch: int  # per step, mixed over the seen languages
    score_batches: int  # per language, for importance scores
    reselect_every: int  # dynamic: steps between re-selections
    seeds: list[int]
    density: float = 0.5  # share of the body linear weights in each language's subnetwork
    lr: float = 1e-4
    inner_lr: float = 1e-4  # first-order MAML's masked SGD inner step (udify-metalearning's example value)


def settings(quick: bool, seeds: int | None = None) -> Settings:
    if quick:
        # 4 batches of 8: with 3 of 4, seed 0's one pair lacked a language and the meta arm took no step
        s = Settings(seen=["en", "de"], unseen=["ja"], per_domain=8, steps=4, batch=8, score_batches=1,
                     reselect_every=2, seeds=[0])
    else:
        s = Settings(seen=["en", "de", "ru", "ja"], unseen=["fr", "tr", "zh_CN"], per_domain=100, steps=100, batch=16,
                     score_batches=2, reselect_every=25, seeds=[0])
    if seeds is not None:
        s.seeds = list(range(seeds))
    return s


def _mixed_batches(tokenizer, data: task.TaskData, langs: list[str], batch: int, steps: int, seed: int):
    """`steps` batches mixing the languages, each with its per-example language ids."""
    from transformers import DataCollatorWithPadding

    collate = DataCollatorWithPadding(tokenizer)
    pool = [(i, e) for i, lang in enumerate(langs) for e in data.train_by_lang[lang]]
    rng = random.Random(seed)
    out = []
    for _ in range(steps):
        chunk = rng.sample(pool, min(batch, len(pool)))
        b = collate([{**tokenizer(e.text, truncation=True, max_length=task.MAX_LEN, return_token_type_ids=False),
                      "labels": e.label} for _, e in chunk])
        b["language_ids"] = torch.tensor([i for i, _ in chunk])
        out.append(b)
    return out


def _by_language(batches: list[dict], n_langs: int) -> dict[int, list[dict]]:
    """Split mixed batches into per-language batches (for scores and for the meta-learning episodes)."""
    out = {i: [] for i in range(n_langs)}
    for b in batches:
        for i in range(n_langs):
            rows = b["language_ids"] == i
            if rows.any():
                out[i].append({k: v[rows] for k, v in b.items() if k != "language_ids"})
    return out


# --- the method-specific calls, kept in one place ------------------------------------------------

def _scores_and_masks(model, per_lang: dict[str, list[dict]], body: list[str], density: float):
    from ..hf.subnetworks import importance_scores, select_masks

    return select_masks(importance_scores(model, per_lang, params=body), density=density)


def _train_subnetworks(model, batches, masks, s: Settings, langs, body, dynamic: bool) -> None:
    """Mixed batches, each language's gradient only inside its own mask (SubnetworkLinear)."""
    from tqdm.auto import tqdm

    from .. import hf
    from ..hf.subnetworks import set_masks
    from ..optim import MaskedAdamW

    hf.convert(model, kind="subnetwork", masks=masks)
    ltsft.set_trainable(model, ltsft.EMBEDDINGS + (r"LayerNorm",))
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = MaskedAdamW(trainable, [None] * len(trainable), lr=s.lr, weight_decay=0.0)
    model.train()
    for step, b in enumerate(tqdm(batches, desc="dynamic" if dynamic else "static", leave=False)):
        if dynamic and step and step % s.reselect_every == 0:
            recent = _by_language(batches[max(0, step - s.reselect_every):step], len(langs))
            model.eval()  # scored without dropout, as the static masks were (and DynamicMasksCallback scores)
            set_masks(model, _scores_and_masks(model, {lang: recent[i] for i, lang in enumerate(langs)}, body,
                                               s.density), opt)
            model.train()
        inputs = {k: v for k, v in b.items() if k != "language_ids"}
        opt.zero_grad(set_to_none=True)
        with hf.route(model, b["language_ids"]):
            model(**inputs).loss.backward()
        opt.step()


def _train_fomaml(model, batches, masks, s: Settings, langs) -> int:
    """First-order MAML over pairs of mixed batches: each language's rows of the first are its
    support batch, its rows of the second its query batch, so the variant sees the same examples
    as the others in half as many (outer) steps. A pair that lacks a language is skipped: the outer
    AdamW spans every language's subnetwork, and its momentum would move an absent one's. Returns
    the number of outer steps taken."""
    from tqdm.auto import tqdm

    from ..hf.subnetworks import fomaml_optimizer, fomaml_step

    outer = fomaml_optimizer(model, masks, lr=s.lr, weight_decay=0.0)
    model.train()
    taken = 0
    for support_batch, query_batch in tqdm(list(zip(batches[0::2], batches[1::2])), desc="first-order MAML",
                                           leave=False):
        support, query = _by_language([support_batch], len(langs)), _by_language([query_batch], len(langs))
        if not all(support[i] and query[i] for i in range(len(langs))):
            continue
        fomaml_step(model, {lang: support[i] for i, lang in enumerate(langs)},
                    {lang: query[i][0] for i, lang in enumerate(langs)}, masks, inner_lr=s.inner_lr, inner_steps=1,
                    outer_optimizer=outer)
        taken += 1
    return taken


def _train_shared(model, batches, s: Settings) -> None:
    from tqdm.auto import tqdm

    ltsft.set_trainable(model, ltsft.EMBEDDINGS + (r"LayerNorm",))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=s.lr, weight_decay=0.0)
    model.train()
    for b in tqdm(batches, desc="shared", leave=False):
        opt.zero_grad(set_to_none=True)
        model(**{k: v for k, v in b.items() if k != "language_ids"}).loss.backward()
        opt.step()


def run(quick: bool = False, model_name: str = task.DEFAULT_MODEL, out: str = "demo-out", seeds: int | None = None) -> dict:
    """Train the four variants, evaluate, print the table, write `<out>/subnetworks.{md,json,png}`."""
    from .. import hf

    s = settings(quick, seeds)
    start = time.time()
    langs = s.seen + s.unseen
    data = task.load_task(langs, s.per_domain)
    print(f"{METHOD}: trained on {s.seen}, zero-shot on {s.unseen}; subnetworks of {s.density:.0%}", flush=True)
    acc = {v: {lang: [] for lang in langs} for v in VARIANTS}
    sizes, outer_steps = {}, []
    for seed in s.seeds:
        model, tokenizer = task.classifier(model_name, len(task.DOMAINS), seed=seed)
        task.ensure_dir(out)  # made only once a model loaded: a bad --model leaves no folder
        ltsft.set_trainable(model, ltsft.EMBEDDINGS + (r"LayerNorm",))
        body = [f"{n}.weight" for n in hf.model.target_names(model)]
        theta0 = task.snapshot(model)
        batches = _mixed_batches(tokenizer, data, s.seen, s.batch, s.steps, seed)
        score_data = _by_language(_mixed_batches(tokenizer, data, s.seen, s.batch, s.score_batches * len(s.seen), seed + 7),
                                  len(s.seen))
        masks = _scores_and_masks(model, {lang: score_data[i] for i, lang in enumerate(s.seen)}, body, s.density)
        for lang, m in masks.items():
            sizes[f"subnetwork {lang} seed {seed}"] = {"nnz": sum(int(t.sum()) for t in m.values()),
                                                       "entries": sum(t.numel() for t in m.values())}
        for variant in VARIANTS:
            model, tokenizer = task.classifier(model_name, len(task.DOMAINS), seed=seed)  # a fresh, unconverted copy
            task.restore(model, theta0)
            if variant == "shared":
                _train_shared(model, batches, s)
            elif variant == "meta (FOMAML)":
                ltsft.set_trainable(model, ltsft.EMBEDDINGS + (r"LayerNorm",))
                # Outside the body's subnetworks (biases, pooler, classifier) every language may update.
                others = {n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters()
                          if p.requires_grad and n not in body}
                outer_steps.append(_train_fomaml(model, batches, {lang: {**masks[lang], **others} for lang in s.seen},
                                                 s, s.seen))
                if not outer_steps[-1]:  # its column would be the untrained model's accuracy
                    raise RuntimeError(f"{METHOD}: seed {seed}: first-order MAML took no outer step: no pair of "
                                       f"its {s.steps} batches of {s.batch} held every seen language")
            else:
                _train_subnetworks(model, batches, masks, s, s.seen, body, dynamic=variant == "dynamic")
            for lang in langs:
                acc[variant][lang].append(task.accuracy(model, tokenizer, data.test[lang]))
            print(f"seed {seed} {variant}: seen {_mean(acc[variant], s.seen):.3f}, unseen {_mean(acc[variant], s.unseen):.3f} "
                  f"({time.time() - start:.0f} s)", flush=True)
    for v in acc.values():
        for values in v.values():
            task.check_finite(METHOD, values)

    rows = [[lang, "seen" if lang in s.seen else "unseen"] + [task.fmt(acc[v][lang]) for v in VARIANTS] for lang in langs]
    for label, group in (("**mean seen**", s.seen), ("**mean unseen**", s.unseen)):
        rows.append([label, ""] + [task.fmt([sum(acc[v][lang][i] for lang in group) / len(group)
                                             for i in range(len(s.seeds))]) for v in VARIANTS])
    elapsed = time.time() - start
    summary = (f"Accuracy ({len(task.DOMAINS)} programs, chance {1 / len(task.DOMAINS):.3f}) on "
               f"{len(data.test[task.SOURCE])} held-out messages per language after {s.steps} steps of {s.batch} "
               f"mixed-language examples; mean ± std over {len(s.seeds)} seed(s). Subnetworks: {s.density:.0%} of the "
               f"body linear weights per language; dynamic re-selection every {s.reselect_every} steps; first-order MAML "
               f"over pairs of batches ({', '.join(map(str, outer_steps))} of {s.steps // 2} outer steps taken per "
               f"seed; a pair lacking a language is skipped), inner SGD lr {s.inner_lr}, outer AdamW lr {s.lr}. "
               f"Model {model_name}; total {elapsed:.0f} s.")
    text = (f"### Language-specific subnetworks vs shared weights\n\n{summary}\n\n"
            f"{task.markdown_table(['language', 'trained on'] + list(VARIANTS), rows)}\n")
    print("\n" + text)
    plot = task.bar_chart(os.path.join(out, f"{METHOD}.png"), "Shared weights vs language subnetworks", langs,
                          {v: [acc[v][lang] for lang in langs] for v in VARIANTS}, "accuracy", chance=1 / len(task.DOMAINS))
    results = {"method": METHOD, "model": model_name, "quick": quick, "seeds": s.seeds, "density": s.density,
               "accuracy": acc, "meta_outer_steps": outer_steps, "sizes": sizes, "seconds": elapsed, "plot": plot}
    task.write_results(out, METHOD, text, results)
    return results


def _mean(per_lang, group) -> float:
    return sum(per_lang[lang][-1] for lang in group) / len(group)
