"""Language-specific subnetworks (Choenni et al. 2023): importance scores per language, a mask
per language, mixed-language training where each language updates only its own subnetwork,
static or dynamic masks, and first-order MAML over the subnetworks.

What follows the paper and its authors' code (udify-metalearning for the meta-learning loop):
  - subnetworks are whole attention heads and FFN neurons chosen by gradient-based importance
    (Michel et al. 2019: I_h = Σ_examples |∂L/∂ξ_h| for a gate ξ_h on head h's output);
    `structured_importance`, `structured_masks`;
  - static masks, or dynamic ones re-selected during training from accumulated scores
    (`DynamicMasksCallback`);
  - first-order MAML: inner SGD steps on a language's support batch inside its subnetwork, the
    outer gradient taken at the adapted weights on its query batch, the outer step with AdamW
    (`fomaml_step`), separate inner and outer learning rates.
What is xlsparse's own:
  - a language's gradient is masked inside one mixed-language backward (`SubnetworkLinear`
    with routing and the multi-mask kernel), instead of one batch per language;
  - per-entry masks (`importance_scores` + `select_masks`) stay an option beside heads/neurons;
  - for grouped-query attention a K/V head is kept when any of its query heads is;
  - the dynamic callback scores one probe batch per language each step (the paper scores
    on its training data) and the optimizer state follows `MaskedAdamW.update_masks`;
  - `reptile_step` (Reptile) is kept as a cheaper first-order alternative.
"""
import contextlib
import itertools
import math
import os
import re
import warnings
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn
from torch.utils.data import DataLoader, SequentialSampler

from ..diff import budget, refuse_sharded
from ..distributed import all_reduce_scores, any_rank_of, same_on_all_ranks
from ..functional import topk_mask
from ..nn import SubnetworkLinear
from ..ops import checks
from ..optim import MaskedAdamW, MaskedSGD, _local
from .model import (_conv1d_weights, _converted, _grow_subnetworks, _language_ids,
                    _refuse_liger_on_converted_head, _refuse_max_norm, _restore_subnet_coverage, _saved_module_params,
                    _subnet_base, _subnet_coverage, _swap_conv1d_layout, accepts_compiled, languages, route)


def _progress(op: str, iterable, desc: str, enabled: bool):
    """`iterable` with a progress bar when `enabled`, which `op`'s `progress` gave."""
    if not checks.flag(op, "progress", enabled):
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, leave=False)


def _in_language(op: str, model: nn.Module, lang: str, batch: Mapping):
    """Route a one-language batch of `op` to `lang` when the model has routed layers (a converted
    model trains nothing unrouted); a plain model needs no routing."""
    if lang not in languages(model):
        return contextlib.nullcontext()
    if batch.get("language_ids") is not None:
        # `model(**batch)` routes by the field, inside this route: a batch of `lang` whose field named
        # another language trained only where both masks open, silently
        # −1 (no update: per-token padding) may stay; the batch must still train its language
        given = _language_ids(languages(model), batch["language_ids"])
        own = given == languages(model).index(lang)
        if not bool((own | (given == -1)).all()) or not bool(own.any()):
            raise ValueError(f"{op}: the batches of {lang!r} carry language_ids {given.tolist()}, which route them to other "
                             "languages (or to none); drop the field or give each batch under its own language")
    ids = next(v for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() > 0)  # B: a 0-dim field has none
    return _one_language(route(model, [lang] * ids.shape[0]), languages(model).index(lang))


@contextlib.contextmanager
def _one_language(routed, index: int):
    """`routed` (the route of a batch of one language) giving every row of every layer the id
    `index`, whatever the layer's input: OPT's feed-forward sees the tokens flattened [B·S, H], a
    pooled head one row per example [B, H], and DeBERTa's query and key projections also the
    relative-position embeddings [1, 2·span, H] that the examples share (a batch of more than one
    example raised there, though all its rows are in this language)."""
    with routed as active:
        active.one_id = index
        yield active


@contextlib.contextmanager
def _unmasked(model: nn.Module):
    """Every SubnetworkLinear as a plain linear inside the block (`SubnetworkLinear.unmasked`):
    scores need the true ∂L/∂W, not the gradient masked to the current subnetwork, which is 0
    outside it and would keep re-selection from ever choosing a new entry."""
    layers = [layer for _, layer in _converted(model, SubnetworkLinear)]
    for layer in layers:
        layer.unmasked = True
    try:
        yield
    finally:
        for layer in layers:
            layer.unmasked = False


def _check_batches(op: str, name: str, batches) -> None:
    """`batches` must be an iterable of batches: one batch (a dict) iterates as its keys, read as batches."""
    if isinstance(batches, Mapping):
        raise TypeError(f"{op}: {name} must be an iterable of batches, got one batch (a dict): pass [batch]")


def _check_by_language(op: str, name: str, value, of: str) -> None:
    """`value` (the argument `name`) must be a {language: ...} mapping (`of` says what each language
    maps to): a list, iterated as the languages, failed on its first batch as "unhashable type"."""
    if not isinstance(value, Mapping):
        raise TypeError(f"{op}: {name} must map each language to {of}, got a {type(value).__name__}")


def _check_language_batches(op: str, batches, name: str = "batches") -> None:
    """`batches` (the argument `name`) must be {language: iterable of batches}. One batch given
    instead has tensors where the batches go and its field names where the languages go."""
    _check_by_language(op, name, batches, "its batches, {language: [batch, ...]}")
    for lang, lang_batches in batches.items():
        if isinstance(lang_batches, torch.Tensor):
            raise TypeError(f"{op}: {name}[{lang!r}] is a tensor, not that language's batches: one batch was given "
                            "where {language: [batch, ...]} goes")
        _check_batches(op, f"{name}[{lang!r}]", lang_batches)


def _refuse_distributed_model(op: str, model: nn.Module, named: dict) -> None:
    """Scores are taken per process, on an unwrapped, unsharded model. Under DDP or FSDP2 every
    backward is a collective: an example one process skips (its loss NaN: no labelled token) left
    the others waiting forever, and DDP's and FSDP2's backward average each example's gradient
    with the other processes' examples before |g·θ| or g² is taken."""
    instead = ("score an unwrapped, unsharded model in each process (each its own examples), then sum the scores with "
               "xlsparse.distributed.all_reduce_scores")
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise ValueError(f"{op}: model is wrapped by DistributedDataParallel, whose every backward is a collective "
                         f"that averages the processes' gradients; pass model.module: {instead}")
    refuse_sharded(op, named, f"Its every backward would be a collective; {instead}")


def _examples(batch: Mapping, what: str = "importance_scores") -> list[dict]:
    """The batch split into batches of one example (every tensor sliced along its first dim)."""
    sizes = {v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() > 0}
    if len(sizes) != 1:
        raise ValueError(f"{what}: the tensors of a batch in batches must share the batch size as their "
                         f"first dim, got first dims {sorted(sizes)}")
    return [{k: v[i: i + 1] if isinstance(v, torch.Tensor) and v.dim() > 0 else v for k, v in batch.items()}
            for i in range(sizes.pop())]


@accepts_compiled
def importance_scores(model: nn.Module, batches: Mapping[str, Iterable], method: str = "grad_x_weight",
                      params: Iterable[str] | None = None, loss_fn: Callable | None = None,
                      progress: bool = True) -> dict[str, dict[str, torch.Tensor]]:
    """Per language, accumulated parameter importance over the examples of its batches.

    `batches`: {language: iterable of model inputs (dicts whose tensors all have the batch size
    first)}. With ℓ_i the loss of example i alone (`loss_fn(model, batch)` on a batch of that
    one example; default `model(**batch).loss`), `method` "grad_x_weight" sums |∂ℓ_i/∂θ · θ|
    over the examples (first-order Taylor importance) and "fisher" sums (∂ℓ_i/∂θ)² (empirical
    Fisher): one backward per example, so the scores do not depend on how examples are
    batched. An example whose loss is NaN (no labelled token) adds nothing; an infinite loss raises
    ValueError (its gradient is inf or NaN). `params`: names to
    score (default: every parameter that requires grad; a named one that does not raises). On a converted model ∂ℓ_i/∂θ of a
    SubnetworkLinear weight is the full gradient, not masked to the language's current
    subnetwork, so entries outside it are scored too. The model's gradients are left cleared.
    Returns {language: {parameter name: float32 tensor}} (the products taken in float32 too, for
    a bfloat16 or float16 model) in the model's own layout, the layout
    masks take (a GPT-2 Conv1D weight's scores are [in, out], converted or not). Under
    torch.distributed each process scores its own examples on its unwrapped model and sums the
    scores with `xlsparse.distributed.all_reduce_scores`; a DDP wrapper or an FSDP2-sharded model
    raises ValueError (`_refuse_distributed_model`).
    """
    if method not in ("grad_x_weight", "fisher"):
        raise ValueError(f"importance_scores: method must be 'grad_x_weight' or 'fisher', got {method!r}")
    _check_language_batches("importance_scores", batches)
    named = dict(model.named_parameters())
    _refuse_distributed_model("importance_scores", model, named)
    if isinstance(params, str):  # read a character at a time: "the model has no parameters ['x', '.', ...]"
        raise TypeError(f"importance_scores: params must be a list of parameter names, got the str {params!r}; "
                        "pass [name]")
    names = list(params) if params is not None else [n for n, p in named.items() if p.requires_grad]
    missing = [n for n in names if n not in named]
    if missing:
        # a tied tensor's other names (T5's lm_head.weight is shared.weight) were "no parameters" too
        every = dict(model.named_parameters(remove_duplicate=False))
        canonical = {id(p): n for n, p in named.items()}
        tied = [f"{n!r} is {canonical[id(every[n])]!r}" for n in missing if n in every]
        raise ValueError(f"importance_scores: the model has no parameters {missing[:5]}"
                         + (f" under those names ({', '.join(tied[:5])}: one tensor, named once)" if tied else ""))
    frozen = [n for n in names if not named[n].requires_grad]
    if frozen:  # no gradient reaches them: their scores would be all zeros, ranked as if real
        raise ValueError(f"importance_scores: params name {frozen[:5]}, which do not require grad, so they would "
                         "score 0 everywhere; unfreeze them (requires_grad_(True)) for scoring, or leave them out")
    loss_fn = loss_fn or (lambda m, b: m(**b).loss)
    scores = {}
    try:  # cleared when a backward fails too: its partial gradients were left for the caller's next step
        for lang, lang_batches in batches.items():
            acc = {n: torch.zeros_like(named[n], dtype=torch.float32) for n in names}
            examples = (x for batch in lang_batches for x in _examples(batch))
            for example in _progress("importance_scores", examples, f"importance {lang}", progress):
                model.zero_grad(set_to_none=True)
                with _in_language("importance_scores", model, lang, example), _unmasked(model):
                    loss = loss_fn(model, example)
                    if not _scored("importance_scores", loss, f" of {lang!r}"):
                        continue
                    # in the block: gradient checkpointing recomputes the forward here, routed and unmasked as it ran
                    loss.backward()
                with torch.no_grad():
                    for n in names:
                        g = named[n].grad
                        if g is None:
                            continue
                        # widened before the product: a bfloat16 product rounds each term (2⁻⁹ relative)
                        g = g.float()
                        acc[n] += (g * named[n].float()).abs() if method == "grad_x_weight" else g.square()
            scores[lang] = _swap_conv1d_layout(model, acc)
    finally:
        model.zero_grad(set_to_none=True)
    return scores


def _scored(op: str, loss: torch.Tensor, where: str) -> bool:
    """Whether an example's loss is scored: a NaN loss (no labelled token) adds nothing; an infinite
    one raises (a labelled token of probability 0, or a half-precision overflow): its backward
    added inf or NaN into the scores, silently."""
    value = float(loss.detach())
    if math.isinf(value):
        raise ValueError(f"{op}: an example{where} has an infinite loss ({value}), whose gradient would put inf or NaN "
                         "into the scores; score in float32, or leave out examples whose labels have probability 0")
    return not math.isnan(value)


def _check_importances(op: str, what: str, named: Mapping[str, torch.Tensor]) -> None:
    """Importance scores (`what`: {name: tensor}) must be finite and >= 0: masks keep the largest
    magnitudes (topk_mask), so a negative score ranked by its size as if it were important."""
    if not isinstance(named, Mapping) or not all(isinstance(t, torch.Tensor) for t in named.values()):
        # a list or one tensor failed on `.items()`, and a list of scores in torch.isfinite, unnamed
        raise TypeError(f"{op}: {what} must be {{parameter name: tensor of scores}}, got a {type(named).__name__}"
                        + (" holding other values" if isinstance(named, Mapping) else ""))
    bad = [n for n, t in named.items() if not bool((torch.isfinite(t) & (t >= 0)).all())]
    if bad:
        raise ValueError(f"{op}: {what} must be finite and >= 0 (importances), got other values in {bad[:3]}")


def _refuse_unscored(op: str, lang: str, named: Mapping[str, torch.Tensor], k: int) -> None:
    """importance_scores gives all zeros to a language with no batches or no labelled token: its
    "top" entries were then the first K by position (the first rows of the first parameter)."""
    if k and not any(bool(t.any()) for t in named.values()):
        raise ValueError(f"{op}: scores[{lang!r}] are all zero (no example of {lang!r} was scored: its batches were "
                         "empty or had no labelled token), so its top entries would be the first ones by position; "
                         "score it on batches with labelled tokens")


def select_masks(scores: Mapping[str, Mapping[str, torch.Tensor]], density: float) -> dict[str, dict[str, torch.Tensor]]:
    """A mask per language: the `density` share of its most important entries, global over the
    scored parameters (exactly K entries, ties to the lowest position). Scores must be finite
    and >= 0; a language whose scores are all zero (none of its examples was scored) raises."""
    _check_by_language("select_masks", "scores", scores, "its scores, {name: tensor}")
    masks = {}
    for lang, named in scores.items():
        names = list(named)
        _check_importances("select_masks", f"scores[{lang!r}]", named)
        k = budget("select_masks", sum(named[n].numel() for n in names), density=density)
        _refuse_unscored("select_masks", lang, named, k)
        masks[lang] = dict(zip(names, topk_mask([named[n] for n in names], k)))
    return masks


@accepts_compiled
def set_masks(model: nn.Module, masks: Mapping[str, Mapping[str, torch.Tensor]], optimizer=None) -> None:
    """Give every SubnetworkLinear of a converted model new per-language masks (dynamic
    re-selection) and, if an xlsparse optimizer is given, re-mask it to the union of the
    languages' masks with `update_masks` (kept entries keep their state; its other parameters
    keep their masks). An xlsparse optimizer over the layers that is not given refuses its next
    step when a layer's union of masks changed (it would train the old entries). Masks are in the
    model's own layout (GPT-2 Conv1D: [in, out]); every shape is checked before any layer changes.
    `extract_diff`, `save_pretrained` and `disable` then cover every entry that any mask so far
    opened: an entry that leaves the masks keeps what it learned, so it stays in the diff."""
    order = languages(model)
    _check_by_language("set_masks", "masks", masks, "its masks, {name: mask}")
    if list(masks) != order:
        raise ValueError(f"set_masks: languages {list(masks)} differ from the model's {order}")
    # before any layer changes: a torch AdamW raised AttributeError (no update_masks) after every
    # layer had taken the new masks, so the model and its optimizer trained different supports
    _check_remaskable("set_masks", optimizer)
    routed = {f"{name}.weight" for name, _ in _converted(model, SubnetworkLinear)}
    for lang in order:  # a name no layer reads would be dropped, leaving every layer an empty mask
        if not isinstance(masks[lang], Mapping):  # a list failed on `.get`; one tensor's rows were read as names
            raise TypeError(f"set_masks: masks[{lang!r}] must be {{parameter name: bool tensor}}, got a "
                            f"{type(masks[lang]).__name__}")
        unknown = sorted(n for n in masks[lang] if n not in routed)
        if unknown:
            raise ValueError(f"set_masks: masks[{lang!r}] name {unknown[:5]}, which are not weights of the model's "
                             "SubnetworkLinear layers; give masks of the converted layers only (names as in "
                             "model.named_parameters())")
    new = []
    for name, layer in _converted(model, SubnetworkLinear):
        key = f"{name}.weight"
        shape = tuple(layer.weight.shape)[::-1] if layer.transposed else tuple(layer.weight.shape)
        for lang in order:
            m = masks[lang].get(key)
            tensor = isinstance(m, torch.Tensor)
            if m is not None and (not tensor or m.dtype != torch.bool or tuple(m.shape) != shape):
                got = f"{m.dtype} {tuple(m.shape)}" if tensor else type(m).__name__
                raise ValueError(f"set_masks: masks[{lang!r}][{key!r}] must be a bool tensor of shape {shape}, got {got}")
        # On the layer's device: a language without this layer got CPU zeros, and torch.stack of those
        # with another language's CUDA mask raised a device mismatch.
        device = layer.weight.device
        per_lang = {lang: masks[lang][key].to(device) if key in masks[lang]
                    else torch.zeros(shape, dtype=torch.bool, device=device) for lang in order}
        new.append((name, layer, {lang: (m.t() if layer.transposed else m) for lang, m in per_lang.items()}))
    _grow_subnetworks(model, {name: torch.stack(list(per_lang.values())).any(0) for name, _, per_lang in new})
    for _, layer, per_lang in new:
        layer.set_masks(per_lang)
    if optimizer is not None:
        _follow_masks(_unwrap(optimizer), [layer for _, layer, _ in new])


def _check_remaskable(op: str, optimizer) -> None:
    """`optimizer` (None, or one behind accelerate's wrapper) must be an xlsparse masked optimizer,
    which `set_masks` re-masks."""
    from ..optim import _MaskedOptimizer

    if optimizer is not None and not isinstance(_unwrap(optimizer), _MaskedOptimizer):
        raise TypeError(f"{op}: optimizer must be an xlsparse masked optimizer (MaskedAdamW, MaskedSGD), which "
                        f"set_masks re-masks; got {type(_unwrap(optimizer)).__name__}; nothing was changed")


def _follow_masks(optimizer, layers: list) -> None:
    """Re-mask an xlsparse optimizer to the union of the `layers`' masks (`update_masks`: kept
    entries keep their state); its other parameters keep the entries it trains now."""
    trained = {p for group in optimizer.param_groups for p in group["params"]}
    optimizer.update_masks({layer.weight: layer.trainable_mask() for layer in layers if layer.weight in trained})


def _stored_masks(model: nn.Module, lang_masks: Mapping[str, torch.Tensor], what: str, lang: str,
                  trainable: bool = False) -> dict[str, torch.Tensor]:
    """One language's masks ({parameter name: bool tensor} in the model's own layout), each
    checked against its parameter (`trainable`: one that requires grad) and put in the layout the
    parameter is stored in (a converted GPT-2 Conv1D's [out, in]); plus all-true masks for the
    parameters of convert's `modules_to_save` that the masks do not name: a new head trains whole
    in every language, as SubnetworkTrainer trains it."""
    if not isinstance(lang_masks, Mapping):  # one language's masks given for all: a bare AttributeError on .items()
        raise TypeError(f"{what}: masks[{lang!r}] must be {{parameter name: bool tensor}}, got a "
                        f"{type(lang_masks).__name__}; masks map each language to its masks, {{language: {{name: mask}}}}")
    named = dict(model.named_parameters())
    flipped = _conv1d_weights(model)
    stored = {}
    for n, m in lang_masks.items():
        if n not in named:
            raise ValueError(f"{what}: masks[{lang!r}] name an unknown parameter {n!r}")
        if trainable and not named[n].requires_grad:
            raise ValueError(f"{what}: masks[{lang!r}] name {n!r}, which does not require grad")
        shape = tuple(named[n].shape)[::-1] if n in flipped else tuple(named[n].shape)
        if not isinstance(m, torch.Tensor) or m.dtype != torch.bool or tuple(m.shape) != shape:
            got = f"{m.dtype} {tuple(m.shape)}" if isinstance(m, torch.Tensor) else type(m).__name__
            layout = " (the model's own layout: a GPT-2 Conv1D weight's [in, out])" if n in flipped else ""
            raise ValueError(f"{what}: masks[{lang!r}][{n!r}] must be a bool tensor of shape {shape}{layout}, got {got}")
        stored[n] = m.t().contiguous() if n in flipped else m
    for n, p in _saved_module_params(model).items():
        if p.requires_grad:  # a part of a saved module that the user froze stays fixed, as in SubnetworkTrainer
            stored.setdefault(n, torch.ones(p.shape, dtype=torch.bool, device=p.device))
    return stored


def _check_routed(model: nn.Module, stored: Mapping[str, Mapping[str, torch.Tensor]], what: str) -> None:
    """On a converted model each SubnetworkLinear masks a language's gradient by the layer's own
    mask for that language: masks that open entries the layer closes (or name a language the
    layer does not route) would leave those entries untrained without a word."""
    own = {}  # {parameter name: the layer's per-language masks of it}
    for n, layer in _converted(model, SubnetworkLinear):
        own[f"{n}.weight"] = layer.masks
        if layer.bias_masks is not None:  # a per-language bias masks its gradient alike (a shared one does not)
            own[f"{n}.bias"] = layer.bias_masks
    if not own:
        return
    order = languages(model)
    for lang, lang_masks in stored.items():
        for n, m in lang_masks.items():
            layer_masks = own.get(n)
            if layer_masks is None or not bool(m.any()):
                continue
            if lang not in order:
                raise ValueError(f"{what}: masks[{lang!r}] name {n!r}, a layer converted for the languages {order} "
                                 f"only; it would route no gradient for {lang!r}")
            closed = m & ~layer_masks[order.index(lang)].to(m.device)
            if bool(closed.any()):
                raise ValueError(f"{what}: masks[{lang!r}][{n!r}] opens {int(closed.sum())} entries that the converted "
                                 f"layer's own mask for {lang!r} closes; the layer masks the gradient, so they would "
                                 "never train: pass the layers' masks, or give them these with set_masks first")


def _refuse_empty_subnetworks(op: str, stored: Mapping) -> None:
    """A language whose masks open no entry would train nothing, yet count in the meta-update's
    mean (fomaml_step failed inside torch's optimizer: "empty parameter list"); a step of no
    language at all moved nothing and returned {}."""
    if not stored:
        raise ValueError(f"{op}: no language was given (its batches name none), so the step would change nothing")
    empty = [lang for lang, masks in stored.items() if not any(bool(m.any()) for m in masks.values())]
    if empty:
        raise ValueError(f"{op}: the masks of languages {empty} open no entry (nor name a modules_to_save "
                         "parameter), so their inner steps would train nothing")


@accepts_compiled
def _refuse_nonfinite_losses(op: str, model: nn.Module, bad: dict) -> None:
    """Raise when a language's loss, or a gradient its step used, was not finite at some step
    (`_finite_step`): NaN is an HF model's loss on a batch with no labelled token, whose gradient
    is zero, so the language moved nothing and still counted in the mean (the others' update
    shrank by (L-1)/L); a diverged step, or a finite loss whose half-precision backward
    overflowed, wrote inf/NaN. Checked on every process of a DDP model together, after the last
    collective of the step."""
    if any_rank_of(model, bool(bad)):
        where = f"of {list(bad)}" if bad else "on another process"
        raise ValueError(f"{op}: the loss {where} was not finite, or its gradient was not (NaN loss: a batch with no "
                         "labelled token, or a diverged step; inf/NaN gradient of a finite loss: e.g. a half-precision "
                         "backward that overflowed); the model was left as it was")


def _refuse_differing_languages(op: str, model: nn.Module, stored: Mapping) -> None:
    """Under DDP every inner and query backward averages its gradient with the other processes'
    backward at the same position, so all must step the same languages in one order (the steps
    take them sorted) by the same masks: languages listed in another order on one process (a dict
    built from a set of names), or masks drawn per process, averaged one language's gradient with
    another's, silently, and the replicas drifted apart. One check on every process, before any step."""
    if not isinstance(model, nn.parallel.DistributedDataParallel):
        return
    device = next(model.parameters()).device  # NCCL reduces GPU tensors only; masks may be given on the CPU
    if not same_on_all_ranks({lang: {n: _as_words(m.to(device)) for n, m in masks.items()}
                              for lang, masks in stored.items()}, model.process_group):
        raise ValueError(f"{op}: the processes of the DistributedDataParallel model were given other languages or "
                         "other masks; give every process the same languages and masks (each its own batches)")


def _as_words(mask: torch.Tensor) -> torch.Tensor:
    """A bool mask's bytes as 32-bit words where they divide: `fingerprint` sums one word per
    element, so 4x fewer words (1.4 s per 1e8 mask entries as bytes on a CPU, 0.5 s as words)."""
    flat = mask.reshape(-1).view(torch.uint8)
    return flat.view(torch.int32) if flat.numel() % 4 == 0 and flat.storage_offset() % 4 == 0 else flat


def _finite_step(loss: float, optimizer) -> bool:
    """Whether a step of `optimizer` on this loss and the gradients now in `.grad` may be taken: the
    loss is finite, and so is every gradient entry the step reads (a parameter's masked entries, or
    all of one it trains whole; an inf/NaN outside a mask is never read). A finite loss can still
    have inf/NaN gradients (a half-precision backward that overflowed), which the step would write
    into the weights and the optimizer state. One flag per parameter, whose temporaries go before
    the next (gathering the masked gradients first held a second copy of them all), read back
    together: one host sync."""
    if not math.isfinite(loss):
        return False
    flags = []
    for p in optimizer._all_params():
        if p.grad is None:
            continue
        g, selector = _local(p.grad), optimizer._selector_of(p)
        if selector is None:
            flags.append(torch.isfinite(g).all())
        elif selector.dtype == torch.bool:  # dense mode
            flags.append((torch.isfinite(g) | ~selector).all())
        else:  # compact mode: the K flat indices the step reads
            flags.append(torch.isfinite(g.reshape(-1).index_select(0, selector)).all())
    return not flags or bool(torch.stack([f.to(flags[0].device) for f in flags]).all())


def reptile_step(model: nn.Module, batches: Mapping[str, Iterable], masks: Mapping[str, Mapping[str, torch.Tensor]],
                 inner_lr: float = 1e-3, outer_lr: float = 0.5, inner_steps: int = 1, loss_fn: Callable | None = None,
                 progress: bool = False) -> dict[str, float]:
    """One first-order meta-learning (Reptile) step with masked inner loops.

    For each language, starting from the current θ, `inner_steps` MaskedSGD steps update only
    that language's subnetwork (`masks[lang]`: {parameter name: BoolTensor} in the model's own
    layout, as `structured_masks` and `select_masks` give them; parameters absent from it stay
    fixed, but for convert's `modules_to_save`, which train whole; masks that open no entry are
    refused). Then θ ← θ + outer_lr · mean_l(θ_l − θ), summed in float32 (at least) and rounded
    once into θ's dtype (bfloat16 or float16 too). A language's first `inner_steps` batches are taken from an
    iterator (one batch, or fewer than `inner_steps`, are cycled, as in `fomaml_step`); a list of
    more than `inner_steps` is refused. Returns each language's last inner loss; a loss that is
    not finite at any inner step (NaN: a batch with no labelled token), or a finite loss with an
    inf/NaN gradient on an entry the step reads (a half-precision backward that overflowed),
    raises before the update, θ as it was. The model's
    train/eval mode is the caller's: HF's `from_pretrained` returns it in eval mode (no dropout).
    udify-metalearning has no Reptile; this is Nichol et al.'s batched form (all languages from
    the same θ, their moves averaged), with plain SGD inner steps, a fresh optimizer per language
    and no state carried between steps (Nichol et al. use Adam inside the inner loop).
    """
    loss_fn = loss_fn or (lambda m, b: m(**b).loss)
    # a NaN outer_lr wrote NaN into every trainable parameter; inner_steps=1.5 failed in islice, unnamed
    checks.finite("reptile_step", outer_lr=outer_lr)
    if float(outer_lr) < 0:  # θ moved away from every language's adapted weights (inner_lr < 0 is refused too)
        raise ValueError(f"reptile_step: outer_lr must be >= 0 (invalid learning rate), got {outer_lr}")
    _check_by_language("reptile_step", "batches", batches, "its batches, {language: [batch, ...]}")
    _check_by_language("reptile_step", "masks", masks, "its masks, {language: {name: mask}}")
    if checks.count("reptile_step", "inner_steps", inner_steps) < 1:
        raise ValueError(f"reptile_step: inner_steps must be at least 1, got {inner_steps}")
    missing = [lang for lang in batches if lang not in masks]
    if missing:
        raise ValueError(f"reptile_step: no masks for languages {missing}")
    _refuse_unused_batches("reptile_step", "batches", batches, inner_steps)
    # taken before any step: a language short of batches once stopped mid-loop, its weights not restored
    taken = {lang: [b] if isinstance(b, Mapping) else list(itertools.islice(b, inner_steps)) for lang, b in batches.items()}
    empty = [lang for lang, b in taken.items() if not b]
    if empty:
        raise ValueError(f"reptile_step: batches for languages {empty} are empty")
    stored = {lang: _stored_masks(model, masks[lang], "reptile_step", lang, trainable=True) for lang in batches}
    _refuse_empty_subnetworks("reptile_step", stored)
    _refuse_max_norm(model, "reptile_step")
    _check_routed(model, stored, "reptile_step")
    _refuse_differing_languages("reptile_step", model, stored)
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    start = {n: p.detach().clone() for n, p in named.items()}
    # float32 at least: Σ_l (θ_l − θ) summed in bfloat16 rounded at every language (a large move and
    # its opposite cancelled the small ones), and the update is rounded once, into θ's dtype
    wide = {n: torch.promote_types(p.dtype, torch.float32) for n, p in named.items()}
    total = {n: torch.zeros_like(p, dtype=wide[n]) for n, p in named.items()}
    losses, bad = {}, {}  # bad: the languages with a non-finite loss, in order
    order = sorted(taken, key=str)  # one order on every process (`_refuse_differing_languages`)
    for lang, lang_batches in _progress("reptile_step", [(lang, taken[lang]) for lang in order], "reptile", progress):
        lang_masks = stored[lang]
        opt = MaskedSGD([named[n] for n in lang_masks], list(lang_masks.values()), lr=inner_lr)
        try:  # θ is restored even when a later batch fails after the first steps moved it
            for step in range(inner_steps):
                opt.zero_grad(set_to_none=True)
                batch = lang_batches[step % len(lang_batches)]
                with _in_language("reptile_step", model, lang, batch):
                    loss = loss_fn(model, batch)
                    loss.backward()  # routed: gradient checkpointing recomputes the forward here
                losses[lang] = float(loss.detach())
                if not _finite_step(losses[lang], opt):  # its step may write inf/NaN: θ is restored, refused below
                    bad[lang] = None
                opt.step()
            with torch.no_grad():
                for n, p in named.items():
                    total[n] += p.to(wide[n]) - start[n].to(wide[n])
        finally:
            with torch.no_grad():
                for n, p in named.items():
                    p.copy_(start[n])
            model.zero_grad(set_to_none=True)  # a failed backward's partial gradients too
    _refuse_nonfinite_losses("reptile_step", model, bad)
    with torch.no_grad():
        for n, p in named.items():
            p.copy_(torch.add(p.to(wide[n]), total[n], alpha=outer_lr / max(len(batches), 1)))
    model.zero_grad(set_to_none=True)
    return {lang: losses[lang] for lang in taken}  # in the caller's order, not the steps' sorted one


# --- structured subnetworks: attention heads and FFN neurons ---

_LAYOUTS = [  # (architecture, layer prefix pattern, {part: suffix})
    ("bert", r"(.*\.layer\.\d+)\.attention\.self\.query", {
        "q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
        "o": "attention.output.dense", "ffn_in": "intermediate.dense", "ffn_out": "output.dense"}),
    ("llama", r"(.*\.layers\.\d+)\.self_attn\.q_proj", {
        "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
        "ffn_in": ("mlp.gate_proj", "mlp.up_proj"), "ffn_out": "mlp.down_proj"}),
    ("gpt2", r"(.*\.h\.\d+)\.attn\.c_attn", {"qkv": "attn.c_attn", "o": "attn.c_proj", "ffn_in": "mlp.c_fc",
                                             "ffn_out": "mlp.c_proj"}),
]


@accepts_compiled
def block_layout(model: nn.Module) -> tuple[str, list[dict]]:
    """(architecture, one {part: module name} per layer) for BERT/XLM-R, Llama-style and GPT-2
    models: which modules hold each layer's Q, K, V, O and FFN-in/FFN-out weights."""
    names = [n for n, _ in model.named_modules()]
    present = set(names)
    for arch, pattern, parts in _LAYOUTS:
        prefixes = [m.group(1) for n in names if (m := re.fullmatch(pattern, n))]
        layers = []
        for prefix in prefixes:
            layer = {}
            for part, suffix in parts.items():
                layer[part] = tuple(f"{prefix}.{x}" for x in suffix) if isinstance(suffix, tuple) else f"{prefix}.{suffix}"
            layers.append(layer)
        # every part must exist: XGLM, OPT and mBART name their query `self_attn.q_proj` as Llama does,
        # but not their output projection or FFN
        if layers and all(n in present for layer in layers for v in layer.values()
                          for n in (v if isinstance(v, tuple) else (v,))):
            return arch, layers
    raise ValueError("structured subnetworks: unknown architecture (BERT/XLM-R, Llama-style and GPT-2 blocks are "
                     "supported); use per-entry masks (importance_scores + select_masks) instead")


def _heads(model: nn.Module) -> tuple[int, int]:
    cfg = model.config
    heads = getattr(cfg, "num_attention_heads", None) or cfg.n_head
    return heads, getattr(cfg, "num_key_value_heads", None) or heads


@accepts_compiled
def structured_importance(model: nn.Module, batches: Iterable, loss_fn: Callable | None = None,
                          progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient-based importance of every attention head and FFN neuron (Michel et al. 2019):
    (head scores [L, H], neuron scores [L, F]).

    A gate ξ multiplying a head's output (or a neuron's activation) has ∂ℓ_i/∂ξ = Σ_t o_t · ∂ℓ_i/∂o_t,
    read here from the input of the O projection (FFN-out) and its gradient; with ℓ_i the loss of
    example i alone (one backward per example, as in `importance_scores`), the score sums
    |∂ℓ_i/∂ξ| over the examples, so it does not depend on how examples are batched (products and
    sums in float32, for a bfloat16 or float16 model too). This is Michel et al.'s E_x|∂L(x)/∂ξ|;
    the bertology code that Prasanna et al. and the subnetwork papers use takes |·| of each batch's
    gradient instead (terms of opposite sign in a batch cancel first) and divides by the token
    count, so its scores depend on the batching; here they do not. An example
    whose loss is NaN (no labelled token) adds nothing; an infinite loss raises ValueError. On a
    converted model the subnetwork layers run unmasked (the whole network, in training mode too). The model's gradients are
    left cleared. Under torch.distributed, as `importance_scores`: each process scores its own
    examples on its unwrapped model (a DDP wrapper or an FSDP2-sharded model raises ValueError).
    """
    _check_batches("structured_importance", "batches", batches)
    _refuse_distributed_model("structured_importance", model, dict(model.named_parameters()))
    _, layers = block_layout(model)
    heads, _ = _heads(model)
    modules = dict(model.named_modules())
    loss_fn = loss_fn or (lambda m, b: m(**b).loss)
    head_scores = [None] * len(layers)
    neuron_scores = [None] * len(layers)
    captured = {}

    def keep_input(key):
        def hook(module, args):
            x = args[0]
            replaced = None
            if not x.requires_grad and torch.is_grad_enabled():
                # nothing before this layer trains (a model converted in its FFN only, or its upper
                # layers only): the gate's gradient needs none of that, only ∂ℓ/∂x, which a leaf gets
                x = replaced = x.detach().requires_grad_()
            # (input, its gradient) from the run the backward goes through: under gradient
            # checkpointing the forward runs again in the backward, and with use_reentrant=False
            # that input gets no gradient (it replaced the first one's), with True only it does
            if x.requires_grad:
                x.register_hook(lambda grad, x=x.detach(): captured.__setitem__(key, (x, grad)))
            return None if replaced is None else (replaced, *args[1:])
        return hook

    hooks = []
    for i, layer in enumerate(layers):
        hooks.append(modules[layer["o"]].register_forward_pre_hook(keep_input(("o", i))))
        hooks.append(modules[layer["ffn_out"]].register_forward_pre_hook(keep_input(("ffn", i))))
    try:
        examples = (x for batch in batches for x in _examples(batch, "structured_importance"))
        for example in _progress("structured_importance", examples, "head/neuron importance", progress):
            model.zero_grad(set_to_none=True)
            captured.clear()
            # one example per backward: a batch's mean loss would weight its examples by 1/B (or by
            # their share of its labelled tokens), so the ranking would depend on the batching.
            # Unmasked, as in importance_scores: the whole network's heads, and no route needed.
            with _unmasked(model):
                loss = loss_fn(model, example)
                if not _scored("structured_importance", loss, ""):
                    continue
                loss.backward()  # unmasked, as the forward ran: gradient checkpointing recomputes it here
            with torch.no_grad():
                for i in range(len(layers)):
                    for key, store, groups in ((("o", i), head_scores, heads), (("ffn", i), neuron_scores, None)):
                        if key not in captured:
                            raise RuntimeError("structured_importance: no gradient reached a head/neuron input; "
                                               "does the model require grad?")
                        x, grad = captured[key]
                        # widened before the product, as in importance_scores
                        per_unit = (x.float() * grad.float()).reshape(x.shape[0], -1, x.shape[-1]).sum(1)  # [B, width]
                        if groups is not None:
                            per_unit = per_unit.reshape(x.shape[0], groups, -1).sum(2)
                        score = per_unit.abs().sum(0)
                        store[i] = score if store[i] is None else store[i] + score
    finally:
        for h in hooks:
            h.remove()
        model.zero_grad(set_to_none=True)
    if head_scores[0] is None:
        raise ValueError("structured_importance: no batches (or no example with a labelled token)")
    return torch.stack(head_scores), torch.stack(neuron_scores)


def _lines(shape, keep: torch.Tensor, width: int, axis: int, offset: int = 0, device=None) -> torch.Tensor:
    """A bool mask of a [out, in] weight opening, along `axis` (0: rows, 1: columns), the blocks
    of `width` lines whose `keep` is True (block j covers lines offset + j·width ... + width)."""
    lines = torch.zeros(shape[axis], dtype=torch.bool, device=device)
    lines[offset: offset + keep.numel() * width] = keep.to(device).repeat_interleave(width)
    return (lines[:, None] if axis == 0 else lines[None, :]).expand(shape).clone()


def _linear_shape(module: nn.Module) -> tuple[tuple[int, int], bool]:
    """The module's weight shape as an nn.Linear's [out, in], and whether the parameter itself is
    stored [in, out] (a GPT-2 Conv1D, converted or not, keeps that layout in its diffs and masks)."""
    from .model import _conv1d_type

    conv1d = _conv1d_type()
    stored_in_out = (conv1d is not None and isinstance(module, conv1d)) or getattr(module, "transposed", False)
    rows, cols = module.weight.shape
    return ((cols, rows) if isinstance(module, conv1d or ()) else (rows, cols)), stored_in_out


@accepts_compiled
def structured_masks(model: nn.Module, head_scores: torch.Tensor, neuron_scores: torch.Tensor, heads_density: float,
                     neurons_density: float, normalize_heads_by_layer: bool = True) -> dict[str, torch.Tensor]:
    """{parameter name: BoolTensor}: the subnetwork of the top `heads_density` share of attention
    heads and the top `neurons_density` share of FFN neurons, each chosen globally over the
    layers (ties to the lowest position), expanded to whole weight lines: a head opens its
    Q/K/V rows and its O columns, a neuron its FFN-in rows and its FFN-out column.

    With `normalize_heads_by_layer` (the default), each layer's head scores are divided by their
    ℓ2 norm before the global ranking, as Michel et al. (2019) do and as the bertology code that
    Prasanna et al. (2020) and the subnetwork papers build on does by default
    (`--dont_normalize_importance_by_layer` turns it off there); a layer of large gradients then
    does not take every head (that code's further global min-max rescaling changes no ranking,
    so it is left out). Neuron scores are ranked raw: that code prunes whole MLPs, so it has no
    per-neuron rule to follow. As there, no layer is promised a head: a layer whose heads all
    rank low keeps none, its Q/K/V/O masks empty. The selection is one shot at the given
    densities; Prasanna et al. prune 10% of the heads at a time, re-scoring after each round,
    until the dev metric falls below 90% of the unpruned model's; that loop, if wanted, is the caller's.

    `head_scores` [L, H] and `neuron_scores` [L, F], e.g. from `structured_importance`. Masks
    are in the model's own parameter layout (GPT-2's Conv1D [in, out]: the same lines
    transposed), as `convert(kind="subnetwork")` takes them; scores must be finite and >= 0. With
    grouped-query attention a K/V head opens when any of its query heads does. Biases are not included.
    """
    arch, layers = block_layout(model)
    heads, kv_heads = _heads(model)
    modules = dict(model.named_modules())
    head_scores, neuron_scores = torch.as_tensor(head_scores), torch.as_tensor(neuron_scores)
    _check_importances("structured_masks", "the scores", {"head_scores": head_scores, "neuron_scores": neuron_scores})
    if head_scores.shape != (len(layers), heads):
        raise ValueError(f"structured_masks: head_scores must be [{len(layers)}, {heads}], got {tuple(head_scores.shape)}")
    width = _linear_shape(modules[layers[0]["ffn_out"]])[0][1]
    if neuron_scores.shape != (len(layers), width):
        raise ValueError(f"structured_masks: neuron_scores must be [{len(layers)}, {width}], got {tuple(neuron_scores.shape)}")
    ranked = head_scores.float()
    if checks.flag("structured_masks", "normalize_heads_by_layer", normalize_heads_by_layer):  # "False" is truthy
        ranked = ranked / ranked.norm(dim=1, keepdim=True).clamp_min(torch.finfo(ranked.dtype).tiny)
    keep_heads = topk_mask([ranked], budget("structured_masks", head_scores.numel(), density=heads_density))[0]
    keep_neurons = topk_mask([neuron_scores.float()], budget("structured_masks", neuron_scores.numel(),
                                                              density=neurons_density))[0]
    masks = {}

    def put(name: str, *blocks):  # blocks: (keep, width, axis, offset), OR-ed in [out, in] orientation
        module = modules[name]
        shape, stored_in_out = _linear_shape(module)
        m = torch.zeros(shape, dtype=torch.bool, device=module.weight.device)
        for keep, w, axis, offset in blocks:
            m |= _lines(shape, keep, w, axis, offset, module.weight.device)
        masks[f"{name}.weight"] = m.t().contiguous() if stored_in_out else m

    for i, layer in enumerate(layers):
        h, n = keep_heads[i], keep_neurons[i]
        kv = h.reshape(kv_heads, heads // kv_heads).any(1)
        d = _linear_shape(modules[layer["o"]])[0][1] // heads
        if arch == "gpt2":  # Q, K, V are the three row blocks of the fused c_attn
            hidden = heads * d
            put(layer["qkv"], (h, d, 0, 0), (h, d, 0, hidden), (h, d, 0, 2 * hidden))
        else:
            put(layer["q"], (h, d, 0, 0))
            put(layer["k"], (kv, d, 0, 0))
            put(layer["v"], (kv, d, 0, 0))
        put(layer["o"], (h, d, 1, 0))
        for name in (layer["ffn_in"] if isinstance(layer["ffn_in"], tuple) else (layer["ffn_in"],)):
            put(name, (n, 1, 0, 0))
        put(layer["ffn_out"], (n, 1, 1, 0))
    return masks


# --- first-order MAML inside the subnetworks ---

def _as_list(batches) -> list:
    return list(batches) if isinstance(batches, (list, tuple)) else [batches]


def _lr_by_name(op: str, arg: str, names: Iterable[str], lr) -> dict[str, float]:
    """Each parameter's learning rate: `lr` itself, or from a {regex: lr} map the value of the
    first pattern that `re.search`es the name (udify-metalearning's BERT and decoder lrs: e.g.
    {r"classifier": 1e-4, r".": 1e-5}). A name that no pattern matches is refused: it would
    otherwise take some default silently."""
    if not isinstance(lr, Mapping):
        return dict.fromkeys(names, lr)
    found = {n: next((v for pattern, v in lr.items() if re.search(pattern, n)), None) for n in names}
    unmatched = [n for n, v in found.items() if v is None]
    if unmatched:
        raise ValueError(f"{op}: no pattern of {arg} matches {unmatched[:3]}{' ...' if len(unmatched) > 3 else ''}; "
                         "add one (r'.' last matches the rest)")
    return found


def _groups_by_lr(groups: list[dict], lrs: Mapping[torch.Tensor, float]) -> list[dict]:
    """`groups` split so that each holds one learning rate (`lrs`: {parameter: lr})."""
    split = []
    for group in groups:
        for lr in dict.fromkeys(lrs[p] for p in group["params"]):
            split.append({**group, "params": [p for p in group["params"] if lrs[p] == lr], "lr": lr})
    return split


def _refuse_unused_batches(op: str, what: str, batches: Mapping, inner_steps: int) -> None:
    """A list of more batches than inner steps: the ones after the first `inner_steps` would
    never be seen (an iterator is read only as far as the steps go, so it may be endless)."""
    long = {lang: len(b) for lang, b in batches.items() if isinstance(b, (list, tuple)) and len(b) > inner_steps}
    if long:
        raise ValueError(f"{op}: {what} lists more batches than inner_steps={inner_steps} for {long}; only the first "
                         f"{inner_steps} would be used: raise inner_steps or pass fewer batches")
    # An unshuffled DataLoader starts again at its first batch in every call: each meta-step trained
    # on the same first inner_steps batches, and the others never
    restarted = [lang for lang, b in batches.items() if isinstance(b, DataLoader)
                 and isinstance(b.sampler, SequentialSampler) and len(b) > inner_steps]
    if restarted:
        raise ValueError(f"{op}: {what} for {restarted} is a DataLoader without shuffle, which every call reads from its "
                         f"first batch: only its first {inner_steps} would ever train; pass iter(loader), kept across "
                         "steps, or shuffle=True")


@accepts_compiled
def fomaml_step(model: nn.Module, support: Mapping, query: Mapping, masks: Mapping[str, Mapping[str, torch.Tensor]],
                inner_lr: float | Mapping[str, float], inner_steps: int, outer_optimizer,
                loss_fn: Callable | None = None) -> dict[str, float]:
    """One first-order MAML step over languages (the udify-metalearning loop), each confined to
    its subnetwork.

    For each language l of `support` ({language: batch or list of batches}) and `query`
    ({language: batch}): starting from θ, `inner_steps` masked SGD steps (lr `inner_lr`, or
    {regex: lr} by parameter name, first match: udify-metalearning's inner loop takes one lr for
    BERT and another for the decoder) on the support batches change only `masks[l]` ({parameter
    name: BoolTensor} in the model's own layout, naming parameters that require grad; parameters
    it does not name stay fixed, but for convert's `modules_to_save`, which train whole; masks
    that open no entry are refused); the gradient of the query loss at the adapted θ'_l, masked
    to `masks[l]`, is the language's outer gradient; θ is restored. The outer gradient is the
    mean over the languages (summed in float32 at least, rounded once into θ's dtype); it is left in `.grad` and `outer_optimizer` (an xlsparse MaskedAdamW
    over the union of the masks, e.g. from `fomaml_optimizer`, so that nothing outside the
    subnetworks moves, weight decay included) takes one step. On a converted model each language's batches
    are routed to it. A step that fails leaves θ as it was; so does a loss that is not finite at
    an inner or query step (NaN: a batch with no labelled token), or a finite one whose gradient
    is inf/NaN on the language's entries (a half-precision backward that overflowed), which raises
    (under DDP on every process) before the outer step. Returns each language's query loss
    at θ'_l. Support batches fewer than `inner_steps` are cycled (udify-metalearning reuses one
    support batch for every inner step); more are refused. The model's train/eval mode is the
    caller's: HF's `from_pretrained` returns it in eval mode (no dropout). Under DDP (a model
    wrapped by DistributedDataParallel, masks named as it names the parameters) the inner steps'
    gradients and the outer gradient are averaged over the processes: one process over the
    processes' batches concatenated (every process must be given the same languages and masks,
    else ValueError on every process before any step; the languages are taken in sorted order).
    """
    from ..optim import _MaskedOptimizer

    if not isinstance(outer_optimizer, _MaskedOptimizer):
        raise TypeError("fomaml_step: outer_optimizer must be an xlsparse masked optimizer (MaskedAdamW) over the "
                        "subnetworks' union (see fomaml_optimizer); a plain optimizer would move entries outside them")
    if checks.count("fomaml_step", "inner_steps", inner_steps) < 1:  # 1.5 failed in range(), unnamed
        raise ValueError(f"fomaml_step: inner_steps must be at least 1, got {inner_steps}")
    _check_by_language("fomaml_step", "support", support, "its batch or batches, {language: [batch, ...]}")
    _check_by_language("fomaml_step", "query", query, "its batch, {language: batch}")
    _check_by_language("fomaml_step", "masks", masks, "its masks, {language: {name: mask}}")
    if set(support) != set(query):
        raise ValueError(f"fomaml_step: support languages {sorted(support)} differ from query languages {sorted(query)}")
    missing = [lang for lang in support if lang not in masks]
    if missing:
        raise ValueError(f"fomaml_step: no masks for languages {missing}")
    # checked before any inner step: a bad batch once failed after the language's weights had moved;
    # and before the batch count, whose advice for a DataLoader (iter(loader)) is reptile_step's
    for lang in support:
        if not _as_list(support[lang]) or not all(isinstance(b, Mapping) for b in _as_list(support[lang])):
            raise ValueError(f"fomaml_step: support[{lang!r}] must be a batch (a dict of tensors) or a non-empty list of "
                             "batches")
        if not isinstance(query[lang], Mapping):
            raise ValueError(f"fomaml_step: query[{lang!r}] must be one batch (a dict of tensors), got "
                             f"{type(query[lang]).__name__}")
    _refuse_unused_batches("fomaml_step", "support", support, inner_steps)
    loss_fn = loss_fn or (lambda m, b: m(**b).loss)
    # trainable=True: a frozen parameter gets no gradient, so the query gradient would fail only
    # after the inner steps had moved the weights (as reptile_step, refused before any step)
    stored = {lang: _stored_masks(model, masks[lang], "fomaml_step", lang, trainable=True) for lang in support}
    _refuse_empty_subnetworks("fomaml_step", stored)
    _refuse_max_norm(model, "fomaml_step")
    _check_routed(model, stored, "fomaml_step")
    _refuse_differing_languages("fomaml_step", model, stored)
    named = dict(model.named_parameters())
    # its steps copy θ back and mask whole gradients: on FSDP2's shards it failed with a size
    # mismatch naming nothing
    refuse_sharded("fomaml_step", named, "Run it on an unsharded model; under DDP the inner and query gradients are "
                   "averaged over the processes")
    _check_confined(outer_optimizer, named, stored)  # before any forward: a refused step costs nothing
    lrs = _lr_by_name("fomaml_step", "inner_lr", sorted({n for m in stored.values() for n in m}), inner_lr)
    outer = {}
    losses, bad = {}, {}  # bad: the languages with a non-finite loss, in order
    for lang in sorted(support, key=str):  # one order on every process (`_refuse_differing_languages`)
        lang_masks = {n: m for n, m in stored[lang].items() if bool(m.any())}
        params = [named[n] for n in lang_masks]
        start = [p.detach().clone() for p in params]
        groups = _groups_by_lr([{"params": params}], {named[n]: lrs[n] for n in lang_masks})
        inner = MaskedSGD(groups, {named[n]: m for n, m in lang_masks.items()}, lr=groups[0]["lr"])
        batches = _as_list(support[lang])
        try:  # θ is restored even when a forward fails after the inner steps moved it
            for step in range(inner_steps):
                inner.zero_grad(set_to_none=True)
                batch = batches[step % len(batches)]
                with _in_language("fomaml_step", model, lang, batch):
                    loss = loss_fn(model, batch)
                    loss.backward()
                if not _finite_step(float(loss.detach()), inner):  # θ is restored, refused below
                    bad[lang] = None
                inner.step()
            model.zero_grad(set_to_none=True)
            with _in_language("fomaml_step", model, lang, query[lang]):
                loss = loss_fn(model, query[lang])
                # backward, not autograd.grad: under reentrant gradient checkpointing the parameters of
                # the checkpointed layers are off the graph autograd.grad walks, and their outer gradients
                # came out None (skipped) silently; and DDP's hooks, which average the query gradient
                # over the processes, never saw it (each replica stepped with its own and drifted)
                loss.backward()
            losses[lang] = float(loss.detach())
            if not _finite_step(losses[lang], inner):  # inner's masks are lang_masks: the entries outer takes
                bad[lang] = None
            with torch.no_grad():
                for n, g in zip(lang_masks, (p.grad for p in params)):
                    if g is not None:
                        # summed in float32 at least (as reptile_step), rounded once into .grad's dtype below
                        g = torch.where(lang_masks[n], g, torch.zeros((), dtype=g.dtype, device=g.device))
                        g = g.to(torch.promote_types(g.dtype, torch.float32))
                        outer[n] = g if n not in outer else outer[n] + g
        finally:
            with torch.no_grad():
                for p, p0 in zip(params, start):
                    p.copy_(p0)
            model.zero_grad(set_to_none=True)  # a failed backward's partial gradients too
    model.zero_grad(set_to_none=True)
    _refuse_nonfinite_losses("fomaml_step", model, bad)
    for n, g in outer.items():
        named[n].grad = (g / len(support)).to(named[n].dtype)
    outer_optimizer.step()
    return {lang: losses[lang] for lang in support}  # in the caller's order, not the steps' sorted one


def _opened(optimizer, p: torch.Tensor) -> torch.Tensor:
    """The entries of `p` that a masked `optimizer` steps, as a bool tensor of p's shape."""
    selector = optimizer._selector_of(p)
    if selector is None:
        return torch.ones_like(p, dtype=torch.bool)
    if selector.dtype == torch.bool:
        return selector
    opened = torch.zeros(p.numel(), dtype=torch.bool, device=p.device)
    opened[selector.long()] = True
    return opened.view(p.shape)


def _layer_unions(model: nn.Module):
    """(weight name, weight, union of its layer's masks) of every SubnetworkLinear in `model`."""
    return [(f"{name}.weight", layer.weight, layer.trainable_mask()) for name, layer in _converted(model, SubnetworkLinear)]


def _refuse_unconfined(op: str, optimizer, unions=()) -> None:
    """A caller's optimizer (`optimizers=`) must keep the converted weights inside their subnetworks:
    a plain one (torch's AdamW), or a masked one that opens more than a layer's masks, moved every
    entry outside them by its weight decay, silently (extract_diff refused only afterwards, and
    merge_and_unload kept the moved weights). `unions`: (name, weight, the entries it may open);
    without them, only the optimizer's kind is checked. One that opens fewer entries is warned of:
    a subset may be meant, but the entries left out take gradients and never train."""
    from ..optim import _MaskedOptimizer

    if optimizer is None:
        return
    optimizer = _unwrap(optimizer)
    if not isinstance(optimizer, _MaskedOptimizer):
        raise TypeError(f"{op}: optimizers= must hold an xlsparse masked optimizer (MaskedAdamW, MaskedSGD) over the "
                        f"subnetworks, got {type(optimizer).__name__}, whose weight decay would move every entry of "
                        "the converted weights outside them; pass a MaskedAdamW, or leave the optimizer to the trainer")
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for name, weight, union in unions:
        if id(weight) in held:
            opened, union = _opened(optimizer, weight), union.to(weight.device)
            outside = opened & ~union
            if bool(outside.any()):
                raise ValueError(f"{op}: the optimizer steps {int(outside.sum())} entries of {name} that no "
                                 "language's mask opens; mask it by the layers' trainable_mask() (the union of their "
                                 "masks), or leave the optimizer to the trainer")
            left_out = int((union & ~opened).sum())
            if left_out:
                warnings.warn(f"{op}: the optimizer leaves out {left_out} entries of {name} that a language's mask "
                              "opens: they take gradients and never train (mask it by the layers' trainable_mask() "
                              "to train them)", stacklevel=3)


def _check_confined(optimizer, named: dict, masks: Mapping) -> None:
    """The outer optimizer must move exactly the entries of this step's languages: AdamW's momentum
    would otherwise move another language's entries on a step without its gradient, and an entry
    it does not hold would have its outer gradient dropped. (For one language per step, keep one
    `fomaml_optimizer(model, {lang: masks[lang]})` per language.)"""
    names = {id(p): n for n, p in named.items()}
    covered = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            n = names.get(id(p))
            allowed = None
            for lang_masks in masks.values():
                if n in lang_masks:
                    allowed = lang_masks[n] if allowed is None else allowed | lang_masks[n]
            opened = _opened(optimizer, p)
            if allowed is None or bool((opened & ~allowed.to(opened.device)).any()):
                raise ValueError(f"fomaml_step: outer_optimizer may update {n!r} outside the subnetworks of this "
                                 f"step's languages {list(masks)}; build it with fomaml_optimizer over those languages")
            covered[n] = opened
    for n in dict.fromkeys(n for lang_masks in masks.values() for n in lang_masks):
        wanted = None
        for lang_masks in masks.values():
            if n in lang_masks:
                wanted = lang_masks[n] if wanted is None else wanted | lang_masks[n]
        if not bool(wanted.any()):
            continue
        missed = wanted if n not in covered else wanted & ~covered[n].to(wanted.device)
        if bool(missed.any()):  # the outer gradient there would be computed and dropped
            raise ValueError(f"fomaml_step: outer_optimizer does not update {int(missed.sum())} entries of {n!r} that "
                             f"the subnetworks of this step's languages {list(masks)} open; build it with "
                             "fomaml_optimizer over those languages")


@accepts_compiled
def fomaml_optimizer(model: nn.Module, masks: Mapping[str, Mapping[str, torch.Tensor]],
                     lr: float | Mapping[str, float] = 1e-4, **kwargs) -> MaskedAdamW:
    """The outer optimizer of `fomaml_step`: MaskedAdamW over the parameters the masks name,
    each confined to the union of the languages' masks (in the model's own layout; outer lr
    `lr`, kept apart from the inner lr of `fomaml_step`; or {regex: lr} by parameter name, first
    match, as udify-metalearning's meta_lr_bert and meta_lr_decoder), and over convert's
    `modules_to_save` whole. No weight decay unless `weight_decay=` is given: udify-metalearning's outer optimizer
    is Adam without it (AdamW's default 0.01 would decay the subnetworks every outer step). A
    weight decay given skips biases and norms, as SubnetworkTrainer's does (the Trainer's rule).
    udify-metalearning also schedules the outer lr (cosine, after a linear warmup); a scheduler
    over the returned optimizer is the caller's."""
    _check_by_language("fomaml_optimizer", "masks", masks, "its masks, {language: {name: mask}}")
    weight_decay = kwargs.pop("weight_decay", 0.0)
    named = dict(model.named_parameters())
    union = {}
    for lang in masks:
        for n, m in _stored_masks(model, masks[lang], "fomaml_optimizer", lang).items():
            union[n] = m.clone() if n not in union else union[n] | m
    # every parameter by the Trainer's rule: masks may name biases and norms too (importance_scores scores them)
    groups = _decay_groups(model, {n: named[n] for n in union}, (), weight_decay)
    lrs = _lr_by_name("fomaml_optimizer", "lr", union, lr)
    groups = _groups_by_lr(groups, {named[n]: v for n, v in lrs.items()})
    default = lr if not isinstance(lr, Mapping) else groups[0]["lr"] if groups else 1e-4  # for groups added later
    return MaskedAdamW(groups, {named[n]: m for n, m in union.items()}, lr=default, **kwargs)


# --- Trainer-facing entry points: mixed-language training, static or dynamic masks ---

try:
    from transformers import Trainer, TrainerCallback
except ImportError:  # transformers is the optional `hf` extra
    Trainer = TrainerCallback = object


def _covered_mask(layer: SubnetworkLinear, covered: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros(layer.weight.numel(), dtype=torch.bool)
    mask[covered] = True
    return mask.view(layer.weight.shape)


def _unwrap(optimizer):
    """The xlsparse optimizer behind accelerate's wrapper, if any."""
    return getattr(optimizer, "optimizer", optimizer)


def _decay_groups(model: nn.Module, params: Mapping[str, torch.Tensor], masked, weight_decay: float,
                  decay_names=None) -> list[dict]:
    """`params` (by name) as param groups decayed as the transformers Trainer's own optimizer
    decays them: the `masked` weights (linear weights) at `weight_decay`; the others (convert's
    modules_to_save) too, but for their biases and norms, at 0. transformers' rule is asked for
    only when a parameter beyond the masked ones decays. `decay_names` (a Trainer's own
    `get_decay_parameter_names`, which a subclass may override) replaces that rule for every
    parameter, the masked ones included, as the Trainer's create_optimizer applies it."""
    others = params.keys() - set(masked) if decay_names is None else params.keys()
    if weight_decay and others:
        if decay_names is None:
            if Trainer is object:
                raise ImportError("weight decay as the Trainer applies it needs transformers (the hf extra)")
            decay_names = Trainer.get_decay_parameter_names(None, model)  # the method reads only `model`
        plain = others - set(decay_names)
    else:
        plain = set()
    groups = [{"params": [p for n, p in params.items() if n not in plain], "weight_decay": weight_decay},
              {"params": [p for n, p in params.items() if n in plain], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _check_adamw(args, what: str) -> None:
    """create_optimizer always builds MaskedAdamW (the Trainer's lr, betas, eps and weight decay):
    another `TrainingArguments.optim` (sgd, adafactor, ...) would train with AdamW's rule unasked."""
    from .lt_sft import _ADAMW_OPTIMS

    optim = str(getattr(args.optim, "value", args.optim))
    if optim not in _ADAMW_OPTIMS:
        raise ValueError(f"{what}: TrainingArguments.optim = {optim!r}, but {what} trains with AdamW (MaskedAdamW); "
                         f"use one of {sorted(_ADAMW_OPTIMS)}, or pass optimizers=(optimizer, scheduler)")


def _check_own_optimizer(trainer, what: str, builds: str) -> None:
    """A trainer whose create_optimizer builds `builds` itself: refuse the Trainer options it
    would ignore (another `optim`, unless the caller passed an optimizer; optimizer_cls_and_kwargs)."""
    # an optimizer of the caller's own (optimizers=) is used as given; no args: the Trainer's default AdamW
    if trainer.optimizer is None and trainer.args is not None:
        _check_adamw(trainer.args, what)
    if getattr(trainer, "optimizer_cls_and_kwargs", None) is not None:
        raise ValueError(f"{what} builds its optimizer itself ({builds}): optimizer_cls_and_kwargs would be "
                         "ignored; pass optimizers=(optimizer, scheduler) instead")


# SubnetworkTrainer's (and continual_trainer's, checked before it converts the model)
_SUBNETWORK_HOLDS = "a MaskedAdamW whose masks are keyed by the parameters, found by name, and re-selected in place"


class SubnetworkTrainer(Trainer):
    """A transformers `Trainer` for a model converted with `convert(kind="subnetwork")`: each
    batch carries `language_ids` [B] (indices into the model's languages), every example's
    gradient lands only in its language's subnetwork in one backward (`SubnetworkLinear`
    routing), and the optimizer is a MaskedAdamW over the union of the masks (the Trainer's lr,
    betas, eps and weight decay) plus, whole, whatever else convert left trainable (its
    `modules_to_save`, e.g. a new classifier head; weight decay skips biases and norms, as the
    Trainer's own optimizer does). Nothing else trains: an optimizer of the caller's own
    (`optimizers=`) must be an xlsparse masked optimizer that opens no entry of a converted weight
    outside the union of its masks (a ValueError or TypeError at construction). Static masks as
    given; add a `DynamicMasksCallback` for dynamic ones.

    Every saved model folder (checkpoints included) holds `subnetwork_masks.pt`: the layers'
    current masks and per-language bias masks, the entries that re-selections added to the exported diff (with their values
    from convert) and the state of each DynamicMasksCallback. Resuming from a checkpoint restores
    them before the optimizer is built, so a resumed run routes and steps by the masks it had and
    its diff still covers every entry it trained; `load_best_model_at_end` restores the best
    checkpoint's masks and coverage with its weights. A checkpoint whose run started from another base
    model (its weights differ from this model's at convert where that run did not train) is
    refused before any weight is loaded, and so are one written with `save_only_model=True` (it
    holds no optimizer state to continue from) and one of the run's last step (`max_steps`).

    Accelerate's FSDP plugin (`TrainingArguments.fsdp`, or `accelerate launch` with an FSDP
    config) and DeepSpeed (`TrainingArguments.deepspeed`, or `accelerate launch` with DeepSpeed)
    are refused with a ValueError at construction: they replace the parameters or the optimizer
    that the masks are keyed by. Under DDP, masks that differ between the processes are refused
    at construction too. `TrainingArguments.torch_compile` compiles the run also on a
    model that an earlier compiled run trained. A model whose loss is a mean that ignores
    `num_items_in_batch` (BERT's and XLM-R's masked-LM heads) has it divided by the gradient
    accumulation steps and not multiplied by the processes (`lt_sft.settle_loss_kwargs`), where
    transformers 5.25 adds the micro-batch means.
    """

    MASKS_FILE = "subnetwork_masks.pt"
    # {layer: masks} the caller asked this run to train with (continual_trainer's `masks`): a static
    # run's checkpoint must hold them. None: the checkpoint's masks are the run's (a model rebuilt by hand)
    _asked_masks = None

    def __init__(self, *args, **kwargs):
        if Trainer is object:
            raise ImportError("SubnetworkTrainer needs transformers (the hf extra)")
        from .lt_sft import _refuse_compiled, _refuse_replaced_parameters, _training_args, _unmark_prepared

        _refuse_replaced_parameters("SubnetworkTrainer", _SUBNETWORK_HOLDS, _training_args(args, kwargs))
        _refuse_compiled("SubnetworkTrainer", args, kwargs)
        super().__init__(*args, **kwargs)
        if not languages(self.model):
            raise ValueError("SubnetworkTrainer: convert the model with kind='subnetwork' first")
        _refuse_max_norm(self.model, "SubnetworkTrainer")
        _refuse_liger_on_converted_head(self.model, self.args, "SubnetworkTrainer")
        _check_own_optimizer(self, "SubnetworkTrainer", "MaskedAdamW over the subnetworks")
        _refuse_unconfined("SubnetworkTrainer", self.optimizer, _layer_unions(self.model))
        if self.accelerator.num_processes > 1:
            # DDP averages gradients that each process masks by its own layers' masks, and each
            # process's optimizer steps its own union: masks selected from each process's own
            # scores trained other entries on each process, and the replicas drifted apart silently
            masks = {}
            for name, layer in _converted(self.model, SubnetworkLinear):
                masks[name] = layer.masks
                if layer.bias_masks is not None:
                    masks[f"{name}.bias"] = layer.bias_masks
            if not same_on_all_ranks(masks):
                raise ValueError("SubnetworkTrainer: the model's subnetwork masks differ between the processes; select "
                                 "them from importance scores summed over the processes (xlsparse.distributed."
                                 "all_reduce_scores, or xlsparse.distributed.topk_mask), or draw them from one seed")
        _unmark_prepared(self)  # a model an earlier compiled run trained

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if "language_ids" not in self._signature_columns:  # keep the column the model's forward does not name
            self._signature_columns = [*self._signature_columns, "language_ids"]

    def create_optimizer(self, *args, **kwargs):
        if self.optimizer is None:
            layers = {f"{n}.weight": layer for n, layer in _converted(self.model, SubnetworkLinear)}
            # What else convert left trainable (modules_to_save) trains whole; a part the user froze
            # (a converted layer included) trains nothing.
            params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
            masks = {p: layers[n].trainable_mask() if n in layers else None for n, p in params.items()}
            a = self.args
            # this trainer's own rule: a subclass may override get_decay_parameter_names
            decay = self.get_decay_parameter_names(self.model) if a.weight_decay else None
            self.optimizer = MaskedAdamW(_decay_groups(self.model, params, layers, a.weight_decay, decay), masks,
                                         lr=a.learning_rate, betas=(a.adam_beta1, a.adam_beta2), eps=a.adam_epsilon)
        return self.optimizer

    def _load_optimizer_and_scheduler(self, checkpoint):
        try:
            super()._load_optimizer_and_scheduler(checkpoint)
        except ValueError as exc:
            if "parameter group" not in str(exc):
                raise
            raise ValueError(f"SubnetworkTrainer: the optimizer state in {checkpoint} has another layout ({exc}). A "
                             "checkpoint written before xlsparse trained modules_to_save (one group of the converted "
                             "weights; the saved modules never trained) cannot be resumed: start from its model") from exc

    def _dynamic_callbacks(self) -> list:
        return [cb for cb in self.callback_handler.callbacks if isinstance(cb, DynamicMasksCallback)]

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:  # the masks are non-persistent buffers: the model's own files lack them
            converted = list(_converted(self.model, SubnetworkLinear))
            layers = {name: layer.masks.cpu() for name, layer in converted}
            # None: a shared bias (or none); a resume must not turn a per-language bias into a shared one
            bias = {name: None if layer.bias_masks is None else layer.bias_masks.cpu() for name, layer in converted}
            torch.save({"languages": languages(self.model), "masks": layers, "bias_masks": bias,
                        "covered": _subnet_coverage(self.model),
                        "callbacks": [cb.state_dict() for cb in self._dynamic_callbacks()]},
                       os.path.join(output_dir or self.args.output_dir, self.MASKS_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        from .lt_sft import _refuse_finished, _refuse_model_only

        _refuse_model_only(resume_from_checkpoint)
        _refuse_finished(resume_from_checkpoint, self.args)
        saved = self._checked_masks(resume_from_checkpoint)
        for cb, state in zip(self._dynamic_callbacks(), saved["callbacks"]):  # one it refuses: no weight loaded yet
            cb.load_state_dict(state)
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        self._restore_masks(saved)

    def _load_best_model(self):
        # the Trainer's own load gave the best checkpoint's weights the masks and coverage of the
        # last re-selection: a model no checkpoint held, routing and exporting its diff silently wrong
        saved = self._checked_masks(self.state.best_model_checkpoint)
        super()._load_best_model()
        self._restore_masks(saved)
        optimizer = _unwrap(self.optimizer)
        if hasattr(optimizer, "update_masks"):  # a later train() of this trainer steps by these masks
            _follow_masks(optimizer, [layer for _, layer in _converted(self.model, SubnetworkLinear)])

    def _checked_masks(self, checkpoint) -> dict:
        """The checkpoint's masks file, checked against this run before the Trainer loads its
        weights: a refused checkpoint must leave the model as it was, not holding its weights
        under this run's masks. Its `covered` is filled in for files written before it was saved."""
        path = os.path.join(checkpoint, self.MASKS_FILE)
        if not os.path.isfile(path):
            raise ValueError(f"SubnetworkTrainer: checkpoint {checkpoint!r} has no "
                             f"{self.MASKS_FILE}; the masks it was trained with cannot be restored")
        saved = torch.load(path, weights_only=True)
        layers = dict(_converted(self.model, SubnetworkLinear))
        if saved["languages"] != languages(self.model) or set(saved["masks"]) != set(layers) \
                or len(saved["callbacks"]) != len(self._dynamic_callbacks()):
            raise ValueError(f"SubnetworkTrainer: {path} was saved from another setup (languages, converted layers or "
                             "DynamicMasksCallbacks differ)")
        if self._asked_masks is not None and not self._dynamic_callbacks():
            # restoring the checkpoint's masks trained other subsets than the ones given, silently
            other = [n for n in layers if not torch.equal(saved["masks"][n], self._asked_masks[n])]
            if other:
                raise ValueError(f"SubnetworkTrainer: {path} holds other masks than this run was given (e.g. for "
                                 f"{other[0]!r}): its run trained other subsets; give the masks it was trained with")
        if saved.get("covered") is None:  # written before re-selections were recorded: fine if the masks never grew
            covered = _subnet_coverage(self.model)
            if any(bool((saved["masks"][n].any(0) & ~_covered_mask(layers[n], covered[n][0])).any()) for n in covered):
                raise ValueError(f"SubnetworkTrainer: {path} was written by an older xlsparse after a re-selection "
                                 "opened new entries, and it lacks their values from convert; it cannot be resumed")
            saved["covered"] = covered
        self._refuse_another_base(checkpoint, saved["covered"])
        return saved

    def _restore_masks(self, saved: dict) -> None:
        """Give the layers the masks, bias masks and coverage of a `_checked_masks` file."""
        bias = saved.get("bias_masks")  # absent from files written before it was saved: the layers keep theirs
        for name, layer in _converted(self.model, SubnetworkLinear):
            masks = dict(zip(saved["languages"], saved["masks"][name]))
            if bias is None:
                layer.set_masks(masks)
            else:
                b = bias[name]
                layer.set_masks(masks, None if b is None else dict(zip(saved["languages"], b)))
        _restore_subnet_coverage(self.model, saved["covered"])

    def _refuse_another_base(self, checkpoint, covered: dict) -> None:
        """LT-SFT's rule (`lt_sft._refuse_another_base`): the checkpoint's run started from this
        run's θ0, the model at convert. Frozen parameters are θ0 whole. A converted layer's θ0 is
        its weight with the values from convert put back on the entries its diff covers; the
        checkpoint's is its saved weight with its own `covered` values from convert put back.
        What trains whole (modules_to_save) is not checked, nor a layer built by hand (no record
        of convert: nothing tells its θ0 on the trained entries)."""
        from .lt_sft import _load_weights, _refuse_another_base

        weights = _load_weights(checkpoint)
        rec = getattr(self.model, "_xlsparse_record", None)
        layers = {f"{n}.weight": n for n, _ in _converted(self.model, SubnetworkLinear)}
        theta0 = {}
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                lname = layers.get(name)
                if lname is None:
                    if not p.requires_grad:
                        theta0[name] = p.detach()
                    continue
                if rec is None or lname not in rec.subnet_base or lname not in covered or name not in weights:
                    continue
                union, base = _subnet_base(rec, lname, self.model.get_submodule(lname))
                theta0[name] = p.detach().reshape(-1).clone().index_copy_(0, union.long(), base)
                saved = weights[name]
                if saved.numel() == p.numel():  # in the model's own layout: a Conv1D's [in, out]
                    transposed = self.model.get_submodule(lname).transposed
                    saved = (saved.t() if transposed else saved).reshape(-1).clone()
                    saved[covered[lname][0].long()] = covered[lname][1].to(saved)
                    weights[name] = saved.view(p.shape).t() if transposed else saved.view(p.shape)
        _refuse_another_base(checkpoint, self.model, weights, theta0, {})

    @staticmethod
    def _batch_ids(inputs: Mapping):
        if "language_ids" not in inputs:
            raise ValueError("SubnetworkTrainer: every batch must carry language_ids (one per example)")
        return inputs["language_ids"]

    def training_step(self, model, inputs, num_items_in_batch=None):
        # the backward runs routed too: gradient checkpointing (TrainingArguments.gradient_checkpointing)
        # recomputes the layers there, after compute_loss's route has ended
        from .lt_sft import settle_loss_kwargs

        with route(model, self._batch_ids(inputs)):
            settle_loss_kwargs(self, inputs, num_items_in_batch)
            return super().training_step(model, inputs, num_items_in_batch)

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        inputs = dict(inputs)
        ids = self._batch_ids(inputs)
        del inputs["language_ids"]
        with route(model, ids):
            return super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)


class DynamicMasksCallback(TrainerCallback):
    """Dynamic subnetworks: scores accumulate during training and the masks are re-selected from
    them every `every` steps (with `SubnetworkTrainer`).

    After each optimizer step one probe batch per language (cycling through
    `probe_batches[language]`) is scored, with head/neuron importance (`structured_importance`)
    by default, or, with `heads_density=None`, per-entry Σ_examples |∂ℓ_i/∂θ · θ| of the converted weights
    (`importance_scores`: the full gradient, so entries outside the current masks compete too).
    Every `every` steps each language's masks are re-selected from its scores accumulated since
    the last re-selection in this run (`structured_masks`, or `select_masks` with `density`; a
    fresh run starts with none, a resumed one with its checkpoint's), given to the layers
    (`set_masks`), and the optimizer follows `MaskedAdamW.update_masks`' semantics: kept
    entries keep their state, new ones start from zero state, dropped ones stop changing.
    Scoring runs in eval mode (no dropout, no routing needed) and leaves gradients cleared. Under
    DDP each step's scores are averaged over the processes, so all select the same masks. A run
    of fewer optimizer steps than `every` (it would never re-select), or in structured mode a
    converted layer that holds no head or neuron of the blocks (its masks would be emptied),
    raises before its first step.
    """

    def __init__(self, probe_batches: Mapping[str, list], every: int, heads_density: float | None = None,
                 neurons_density: float | None = None, density: float | None = None, loss_fn: Callable | None = None):
        if checks.count("DynamicMasksCallback", "every", every) < 1:  # 2.5 re-selected at steps 5, 10, ...
            raise ValueError(f"DynamicMasksCallback: every must be at least 1, got {every}")
        if (heads_density is None) != (neurons_density is None):
            raise ValueError("DynamicMasksCallback: give heads_density and neurons_density together")
        if (heads_density is None) == (density is None):
            raise ValueError("DynamicMasksCallback: give heads_density/neurons_density (structured) or density (entries)")
        for name, d in (("heads_density", heads_density), ("neurons_density", neurons_density), ("density", density)):
            if d is not None:  # budget's rule at each re-selection, now: it raised after `every` steps had trained
                budget(f"DynamicMasksCallback: {name}", 0, density=d)
        # one batch (a dict) was read as a list of its field names, which failed after the first step
        _check_language_batches("DynamicMasksCallback", probe_batches, "probe_batches")
        self.probe = {lang: list(b) for lang, b in probe_batches.items()}
        empty = [lang for lang, b in self.probe.items() if not b]
        if empty:  # the first re-scoring would divide by zero, after a step had been taken
            raise ValueError(f"DynamicMasksCallback: probe_batches for {empty} are empty")
        self.every, self.heads_density, self.neurons_density, self.density = every, heads_density, neurons_density, density
        self.loss_fn = loss_fn
        self.scores: dict = {}
        self.reselections = 0

    def state_dict(self) -> dict:
        """What a resumed run needs (SubnetworkTrainer saves it with each checkpoint): the scores
        accumulated since the last re-selection and the number of re-selections, with the settings
        that decide the re-selections (checked on load)."""
        return {"scores": self.scores, "reselections": self.reselections, "settings": self._settings()}

    def _settings(self) -> dict:
        return {"every": self.every, "heads_density": self.heads_density, "neurons_density": self.neurons_density,
                "density": self.density}

    def load_state_dict(self, state: Mapping) -> None:
        """Take a `state_dict`, whose scores must be of this callback's kind: head/neuron scores
        (`heads_density`) or per-entry ones (`density`), made with this callback's settings."""
        # another schedule or density re-selected the resumed steps' masks another run's way, silently
        # (a state saved before the settings were: not known, so not checked)
        saved, mine = state.get("settings", self._settings()), self._settings()
        differs = [f"{k} = {saved.get(k)!r} (this callback: {v!r})" for k, v in mine.items() if saved.get(k) != v]
        if differs:
            raise ValueError(f"DynamicMasksCallback: the saved state's run re-selected with {', '.join(differs)}; "
                             "resume with a callback made as the saving run's was")
        structured = self.density is None
        other = [lang for lang, score in state["scores"].items() if isinstance(score, tuple) != structured]
        if other:  # the first step's sum of the two kinds failed with a bare TypeError, after a step had trained
            saved, own = ("per-entry", "heads and neurons") if structured else ("head/neuron", "entries")
            raise ValueError(f"DynamicMasksCallback: the saved scores of {other} are {saved} scores, this callback "
                             f"selects {own}; resume with a callback made as the saving run's was")
        self.scores, self.reselections = dict(state["scores"]), int(state["reselections"])

    def _score(self, model, lang: str, batch):
        # on the model's device, as the Trainer moves its own batches: a collator's CPU tensors met a
        # CUDA model only here, after a step had trained (not yet run on a GPU)
        device = next(model.parameters()).device
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        if self.density is None:
            return structured_importance(model, [batch], self.loss_fn)
        # a converted layer the user froze trains nothing: it takes no share of the masks
        names = [f"{n}.weight" for n, layer in _converted(model, SubnetworkLinear) if layer.weight.requires_grad]
        return importance_scores(model, {lang: [batch]}, params=names, loss_fn=self.loss_fn, progress=False)[lang]

    def _add(self, lang: str, score) -> None:
        old = self.scores.get(lang)
        if old is None:
            self.scores[lang] = score
        elif isinstance(score, tuple):
            self.scores[lang] = tuple(a + b for a, b in zip(old, score))
        else:
            self.scores[lang] = {n: old[n] + score[n] for n in score}

    def _check_languages(self, model) -> list:
        order = languages(model)
        if set(self.probe) != set(order):
            raise ValueError(f"DynamicMasksCallback: probe batches for {sorted(self.probe)}, the model has {order}")
        return order

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._check_languages(model)  # before the first step, not after it
        # optimizers=(torch AdamW, ...) was refused by set_masks only at the first re-selection
        _check_remaskable("DynamicMasksCallback", optimizer)
        if self.density is None:
            # structured_masks opens no entry of any other layer: a re-selection gave it empty masks for
            # every language, and it stopped training, silently
            parts = {n for block in block_layout(model)[1] for v in block.values()
                     for n in (v if isinstance(v, tuple) else (v,))}
            outside = [n for n, _ in _converted(model, SubnetworkLinear) if n not in parts]
            if outside:
                raise ValueError(f"DynamicMasksCallback: {outside[:3]} are converted but hold no attention head or FFN "
                                 "neuron of the blocks (heads_density/neurons_density), so a re-selection would give "
                                 "them empty masks and stop their training; give density= (per-entry masks) instead, "
                                 "or leave them out of convert's target_modules")
        if 0 < state.max_steps < self.every:
            # no step of the run is a multiple of `every`: it trained with the masks it started with,
            # static, while every step paid for scoring the probe batches
            raise ValueError(f"DynamicMasksCallback: every={self.every} is more than the run's {state.max_steps} "
                             "optimizer steps, so the masks would never be re-selected; give every <= "
                             f"{state.max_steps}, or train with static masks without the callback")
        if state.global_step == 0:
            # a fresh run (a resume starts at its checkpoint's step, with the checkpoint's state): an earlier
            # run's scores after its last re-selection (hyperparameter_search's previous trial, another
            # model) were added into this run's first re-selection, silently
            self.scores, self.reselections = {}, 0

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        order = self._check_languages(model)
        was_training = model.training
        model.eval()
        try:
            step = {lang: self._score(model, lang, self.probe[lang][(state.global_step - 1) % len(self.probe[lang])])
                    for lang in order}
        finally:
            model.train(was_training)
        # Under DDP each process may probe batches of its own: average the step's scores over the
        # processes (a no-op with one), or each would select other masks from its local scores and
        # the replicas drift apart; every process then also holds the scores a checkpoint saves.
        all_reduce_scores(step, op="mean")
        for lang in order:
            self._add(lang, step[lang])
        if state.global_step % self.every:
            return
        if self.density is None:
            routed = {f"{name}.weight" for name, _ in _converted(model, SubnetworkLinear)}
            masks = {lang: {n: m for n, m in structured_masks(model, *self.scores[lang], self.heads_density,
                                                              self.neurons_density).items() if n in routed}
                     for lang in order}  # the blocks' layers that were converted (all, or e.g. attention only)
        else:
            masks = select_masks({lang: self.scores[lang] for lang in order}, self.density)
        set_masks(model, masks, _unwrap(optimizer))
        self.scores = {}
        self.reselections += 1
