"""Language-specific subnetworks (Choenni et al. 2023): importance scores per language, a mask
per language, mixed-language training where each language updates only its own subnetwork,
dynamic re-selection, and a first-order meta-learning (Reptile) loop with masked inner steps."""
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from ..diff import budget
from ..functional import topk_mask
from ..nn import SubnetworkLinear
from ..optim import MaskedSGD
from .model import _converted, languages


def _progress(iterable, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, leave=False)


def importance_scores(model: nn.Module, batches: Mapping[str, Iterable], method: str = "grad_x_weight",
                      params: Iterable[str] | None = None, loss_fn: Callable | None = None,
                      progress: bool = True) -> dict[str, dict[str, torch.Tensor]]:
    """Per language, accumulated parameter importance over its batches.

    `batches`: {language: iterable of model inputs (dicts)}. `method`: "grad_x_weight" sums
    |∂L/∂θ · θ| (first-order Taylor importance), "fisher" sums (∂L/∂θ)² (empirical Fisher).
    `params`: names to score (default: every parameter that requires grad). `loss_fn(model,
    batch)` defaults to `model(**batch).loss`. The model's gradients are left cleared.
    Returns {language: {parameter name: float32 tensor of the parameter's shape}}.
    """
    if method not in ("grad_x_weight", "fisher"):
        raise ValueError(f"importance_scores: method must be 'grad_x_weight' or 'fisher', got {method!r}")
    named = dict(model.named_parameters())
    names = list(params) if params is not None else [n for n, p in named.items() if p.requires_grad]
    missing = [n for n in names if n not in named]
    if missing:
        raise ValueError(f"importance_scores: the model has no parameters {missing[:5]}")
    loss_fn = loss_fn or (lambda m, b: m(**b).loss)
    scores = {}
    for lang, lang_batches in batches.items():
        acc = {n: torch.zeros_like(named[n], dtype=torch.float32) for n in names}
        for batch in _progress(lang_batches, f"importance {lang}", progress):
            model.zero_grad(set_to_none=True)
            loss_fn(model, batch).backward()
            with torch.no_grad():
                for n in names:
                    g = named[n].grad
                    if g is None:
                        continue
                    acc[n] += (g * named[n]).abs().float() if method == "grad_x_weight" else g.float().square()
        scores[lang] = acc
    model.zero_grad(set_to_none=True)
    return scores


def select_masks(scores: Mapping[str, Mapping[str, torch.Tensor]], density: float) -> dict[str, dict[str, torch.Tensor]]:
    """A mask per language: the `density` share of its most important entries, global over the
    scored parameters (exactly K entries, ties to the lowest position)."""
    masks = {}
    for lang, named in scores.items():
        names = list(named)
        k = budget("select_masks", sum(named[n].numel() for n in names), density=density)
        masks[lang] = dict(zip(names, topk_mask([named[n] for n in names], k)))
    return masks


def set_masks(model: nn.Module, masks: Mapping[str, Mapping[str, torch.Tensor]], optimizer=None) -> None:
    """Give every SubnetworkLinear of a converted model new per-language masks (dynamic
    re-selection) and, if an xlsparse optimizer is given, re-mask it to the union of the
    languages' masks with `update_masks` (kept entries keep their state)."""
    order = languages(model)
    if list(masks) != order:
        raise ValueError(f"set_masks: languages {list(masks)} differ from the model's {order}")
    unions = {}
    for name, layer in _converted(model, SubnetworkLinear):
        key = f"{name}.weight"
        per_lang = {lang: masks[lang].get(key, torch.zeros_like(layer.weight, dtype=torch.bool)) for lang in order}
        if getattr(layer, "_xlsparse_transposed", False):
            per_lang = {lang: m.t() for lang, m in per_lang.items()}
        layer.set_masks(per_lang)
        unions[layer.weight] = layer.trainable_mask()
    if optimizer is not None:
        optimizer.update_masks({p: unions.get(p) for group in optimizer.param_groups for p in group["params"]})


def reptile_step(model: nn.Module, batches: Mapping[str, Iterable], masks: Mapping[str, Mapping[str, torch.Tensor]],
                 inner_lr: float = 1e-3, outer_lr: float = 0.5, inner_steps: int = 1, loss_fn: Callable | None = None,
                 progress: bool = False) -> dict[str, float]:
    """One first-order meta-learning (Reptile) step with masked inner loops.

    For each language, starting from the current θ, `inner_steps` MaskedSGD steps update only
    that language's subnetwork (`masks[lang]`: {parameter name: BoolTensor}; parameters absent
    from it stay fixed). Then θ ← θ + outer_lr · mean_l(θ_l − θ). Returns each language's last
    inner loss.
    """
    loss_fn = loss_fn or (lambda m, b: m(**b).loss)
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    start = {n: p.detach().clone() for n, p in named.items()}
    total = {n: torch.zeros_like(p) for n, p in named.items()}
    losses = {}
    for lang, lang_batches in _progress(batches.items(), "reptile", progress):
        lang_masks = masks[lang]
        params = [p for n, p in named.items() if n in lang_masks]
        opt = MaskedSGD(params, [lang_masks[n] for n, p in named.items() if n in lang_masks], lr=inner_lr)
        it = iter(lang_batches)
        for _ in range(inner_steps):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model, next(it))
            loss.backward()
            opt.step()
            losses[lang] = float(loss.detach())
        with torch.no_grad():
            for n, p in named.items():
                total[n] += p - start[n]
                p.copy_(start[n])
    with torch.no_grad():
        for n, p in named.items():
            p.add_(total[n], alpha=outer_lr / max(len(batches), 1))
    model.zero_grad(set_to_none=True)
    return losses
