"""Language arithmetic (Klimaszewski et al. 2024): a low-data target language's own SFT vs
λ·φ_target + (1 − λ)·φ_related, the related language picked by URIEL and λ swept on the target's
dev set.

On the pretrained encoder (bundled multilingual-e5-small by default), LT-SFT language SFTs by
masked LM: plenty of text for English and the candidate related languages, little for each
target. A task SFT is trained on English (θ0 + φ_en), as in the LT-SFT demo. On the target:
θ0 + φ_target + φ_task (the naive way: its own SFT) against θ0 + (λ·φ_target + (1 − λ)·φ_related)
+ φ_task, the paper's interpolation, λ chosen on the target's labelled dev messages (so not
zero-shot) from a fixed grid that includes 1 (a tie keeps the larger λ, so the sweep may keep the
naive way), reported on the test messages.
"""
import os
import time
from dataclasses import dataclass

from . import ltsft, task

METHOD = "arithmetic"
ISO3 = {"en": "eng", "de": "deu", "fr": "fra", "es": "spa", "it": "ita", "nl": "nld", "pl": "pol", "cs": "ces",
        "ru": "rus", "uk": "ukr", "tr": "tur", "ja": "jpn", "zh_CN": "cmn"}


@dataclass
class Settings(ltsft.Settings):
    pool: tuple[str, ...] = ()  # candidate related languages (plenty of text)
    target_lines: int = 0  # masked-LM lines of each low-data target
    lambdas: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)


def settings(quick: bool, seeds: int | None = None) -> Settings:
    if quick:
        s = Settings(targets=["nl"], per_domain=8, lang_lines=32, head_steps=2, lang_steps=2, task_steps=3, batch=4,
                     seeds=[0], pool=("de", "ja"), target_lines=16, lambdas=(0.0, 0.5, 1.0))
    else:
        s = Settings(targets=["nl", "cs"], per_domain=100, lang_lines=3000, head_steps=60, lang_steps=60,
                     task_steps=60, batch=16, seeds=[0, 1], pool=("de", "pl", "ru", "ja"), target_lines=200)
    if seeds is not None:
        s.seeds = list(range(seeds))
    return s


def related_language(target: str, pool) -> tuple[str, float]:
    """The pool language closest to `target` by URIEL distance (ties: the first in the pool)."""
    from ..hf.continual import uriel_distance

    distances = {p: uriel_distance(ISO3[target], ISO3[p]) for p in pool}
    best = min(pool, key=lambda p: distances[p])
    return best, distances[best]


def sweep_and_compose(model, phi_target, phi_related, phi_task, lambdas, dev_score):
    """The method-specific calls, kept in one place: λ swept on dev over
    combine([φ_target, φ_related, φ_task], [λ, 1 − λ, 1]); returns (best λ, {λ: dev score}).
    Swept from the largest λ down, so a tie keeps the λ closest to the target's own SFT (λ = 1):
    a dev score that cannot tell λs apart is no reason to move away from the naive way."""
    from ..hf.arithmetic import lambda_sweep

    return lambda_sweep(model, lambda lam: interpolated(phi_target, phi_related, phi_task, lam),
                        sorted(lambdas, reverse=True), dev_score)


def interpolated(phi_target, phi_related, phi_task, lam: float):
    """The paper's language vector λ·φ_target + (1 − λ)·φ_related, plus the task SFT."""
    from ..hf.arithmetic import combine

    return combine([phi_target, phi_related, phi_task], [lam, 1.0 - lam, 1.0])


def run(quick: bool = False, model_name: str = task.DEFAULT_MODEL, out: str = "demo-out", seeds: int | None = None) -> dict:
    """Train, sweep, evaluate, print the table, write `<out>/arithmetic.{md,json,png}`."""
    from ..hf.arithmetic import combine

    s = settings(quick, seeds)
    start = time.time()
    related = {t: related_language(t, s.pool) for t in s.targets}
    chosen = sorted({r for r, _ in related.values()})
    langs = [task.SOURCE] + chosen + s.targets
    data = task.load_task(langs, s.per_domain)  # related languages too, so their test translations stay unseen
    model, tokenizer = task.classifier(model_name, len(task.DOMAINS), seed=0)
    task.ensure_dir(out)  # made only once the model loaded: a bad --model leaves no folder
    print(f"{METHOD}: targets {s.targets} with {s.target_lines} lines each; related by URIEL: "
          + ", ".join(f"{t} → {r} ({d:.3f})" for t, (r, d) in related.items()), flush=True)
    theta0 = task.snapshot(model)
    lines = {t: s.target_lines for t in s.targets}
    lang_sft, lang_k = ltsft.language_sfts(model, tokenizer, langs, data, s, out, lines=lines)
    sizes = {f"language SFT {lang}": (d.nnz, lang_k[lang]) for lang, d in lang_sft.items()}

    acc = {kind: {t: [] for t in s.targets} for kind in ("own", "arithmetic")}
    picked = {t: [] for t in s.targets}
    for seed in s.seeds:
        task.restore(model, theta0)
        ltsft.reset_head(model, seed)
        phi_task, k_task = ltsft.task_sft(model, tokenizer, data, s, seed, lang_sft[task.SOURCE], out)
        sizes[f"task SFT seed {seed}"] = (phi_task.nnz, k_task)
        task.restore(model, theta0)
        for t in s.targets:
            phi_t, phi_r = lang_sft[t], lang_sft[related[t][0]]
            with combine([phi_t, phi_task], [1.0, 1.0]).applied(model):
                acc["own"][t].append(task.accuracy(model, tokenizer, data.test[t]))
            best, _ = sweep_and_compose(model, phi_t, phi_r, phi_task, s.lambdas,
                                        lambda m, t=t: task.accuracy(m, tokenizer, data.dev[t]))
            picked[t].append(best)
            with interpolated(phi_t, phi_r, phi_task, best).applied(model):
                acc["arithmetic"][t].append(task.accuracy(model, tokenizer, data.test[t]))
        print(f"seed {seed}: " + ", ".join(f"{t}: own {acc['own'][t][-1]:.3f}, with {related[t][0]} "
                                           f"{acc['arithmetic'][t][-1]:.3f} (λ={picked[t][-1]})" for t in s.targets),
              flush=True)
    for kind in acc.values():
        for values in kind.values():
            task.check_finite(METHOD, values)
    task.restore(model, theta0)

    header = ["target", "related (URIEL distance)", "own SFT", "λ·own + (1 − λ)·related", "λ chosen on dev", "gain"]
    rows = [[t, f"{related[t][0]} ({related[t][1]:.3f})", task.fmt(acc["own"][t]), task.fmt(acc["arithmetic"][t]),
             ", ".join(str(x) for x in picked[t]), task.fmt([a - o for a, o in zip(acc["arithmetic"][t], acc["own"][t])])]
            for t in s.targets]
    elapsed = time.time() - start
    summary = (f"Accuracy ({len(task.DOMAINS)} programs, chance {1 / len(task.DOMAINS):.3f}) on "
               f"{len(data.test[task.SOURCE])} held-out messages per target; task SFT trained on English; mean ± std "
               f"over {len(s.seeds)} seed(s). Targets have {s.target_lines} masked-LM lines, related languages "
               f"{s.lang_lines}; λ grid {list(s.lambdas)} chosen on {len(data.dev[task.SOURCE])} labelled dev "
               f"messages of each target (so not zero-shot; a tie keeps the larger λ). "
               f"Model {model_name}; total {elapsed:.0f} s.")
    sizes_table = task.markdown_table(["SFT", "entries", "K requested"], [[k, f"{n:,}", f"{r:,}"] for k, (n, r) in sizes.items()])
    text = (f"### Language arithmetic: own SFT vs λ·own + (1 − λ)·related\n\n{summary}\n\n"
            f"{task.markdown_table(header, rows)}\n\n{sizes_table}\n")
    print("\n" + text)
    plot = task.bar_chart(os.path.join(out, f"{METHOD}.png"), "Language arithmetic for low-data targets", s.targets,
                          {"own SFT": [acc["own"][t] for t in s.targets],
                           "λ·own + (1 − λ)·related (λ on dev)": [acc["arithmetic"][t] for t in s.targets]},
                          "accuracy", chance=1 / len(task.DOMAINS))
    results = {"method": METHOD, "model": model_name, "quick": quick, "seeds": s.seeds, "density": s.density, "targets": s.targets,
               "related": related, "accuracy": acc, "lambda": picked,
               "sizes": {k: {"nnz": n, "k": r} for k, (n, r) in sizes.items()}, "seconds": elapsed, "plot": plot}
    task.write_results(out, METHOD, text, results)
    return results
