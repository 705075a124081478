"""Continual multilingual updates (LAFT-URIEL, Badola et al. 2023): update an already fine-tuned
model on new multilingual data, each language changing only a language-aware subset of the
parameters chosen with URIEL typological similarity, and report per-language gains and losses,
not only the mean.

What follows the paper, as far as its abstract states it (its full text was not available to
us, so nothing below has been checked against its method section): the setting (a fine-tuned
multilingual model updated with new data in a subset of its languages), a parameter-efficient
update that uses linguistic knowledge (URIEL), and its two numbers, reported by
`LanguageReport`: the share of languages that improve and the mean size of the losses on the
others. What is xlsparse's own: restricting each language's update to its own subset of
entries, the subset formula of `language_aware_masks` (importance minus the URIEL-distance-
weighted importance of the other languages), the URIEL distance (1 − the mean cosine over the
five feature sets, skipping a set that is all zero for either language), and the mechanics: one
backward per mixed batch in which every example's gradient lands only in its language's subset
(`SubnetworkLinear` routing, the multi-mask kernel), then one MaskedAdamW step over the union of
the subsets. Where two languages' subsets overlap their gradients add, as in one joint step.

URIEL comes from the PyPI package `lang2vec` 1.1.2 (its data ships in the wheel: no network).
We use it rather than `urielplus` because it is the package URIEL was published with and the
one these papers used, it is small, and it gives the five feature sets we need (syntax_knn,
phonology_knn, inventory_knn, fam, geo); urielplus adds newer sources that would change the
distances the method was defined with. Its one cost: it imports pkg_resources (setuptools<81).
"""
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .. import routing
from ..diff import budget
from ..functional import topk_mask
from ..ops import checks
from ..optim import MaskedAdamW
from .model import _language_ids as route_ids
from .model import _refuse_max_norm, accepts_compiled
from .subnetworks import _check_batches, _check_importances, _finite_step, _progress, _refuse_unscored


URIEL_FEATURES = ("syntax_knn", "phonology_knn", "inventory_knn", "fam", "geo")


def _lang2vec():
    """lang2vec.lang2vec, imported with the scripts folder off sys.path: lang2vec's wheel also
    installs a script bin/lang2vec.py, which shadows the package under a console command such as
    `xlsparse` (whose sys.path[0] is bin/), and then the data files are looked for in bin/data."""
    import sys
    import sysconfig
    import warnings

    shadow = sys.modules.get("lang2vec")
    if shadow is not None and not hasattr(shadow, "__path__"):  # the script, imported as a module
        del sys.modules["lang2vec"]
    scripts = os.path.realpath(sysconfig.get_path("scripts"))
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != scripts]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # lang2vec imports the deprecated pkg_resources
            import lang2vec.lang2vec as l2v
    except ImportError as exc:
        raise ImportError("URIEL distances need `pip install lang2vec \"setuptools<81\"` (the hf extra)") from exc
    finally:
        sys.path[:] = saved
    return l2v


def _refuse_unknown_uriel_codes(l2v, codes, feature: str, what: str) -> None:
    """Refuse codes lang2vec's database lacks. Its `LANGUAGES` lists individual languages only, but
    its files also hold macrolanguages, 'ara' and 'swa' among them, which X-ELM's clustering
    reads (its codes come from `Lang(code).pt3`); refused, they were replaced by 'arb'/'swh',
    whose features differ (66 known syntax_average values against ara's 98): other clusters."""
    def known(code):
        if code in l2v.LANGUAGES:
            return True
        try:
            l2v.get_features([code], feature)
        except Exception:  # lang2vec raises a bare Exception for a code it does not know
            return False
        return True

    unknown = [c for c in dict.fromkeys(codes) if not known(c)]
    if unknown:
        raise ValueError(f"{what}: unknown ISO 639-3 codes {unknown} (e.g. 'eng', 'deu', 'jpn')")


_URIEL_CACHE: dict[tuple[str, str], torch.Tensor] = {}  # (feature set, language) -> normalised block


def _uriel_blocks(langs: Sequence[str], feature: str) -> list[torch.Tensor]:
    """One L2-normalised URIEL block per language; lang2vec reads a whole file per call (4 s for
    `fam`), so the languages not yet cached are fetched together and kept."""
    missing = [lang for lang in dict.fromkeys(langs) if (feature, lang) not in _URIEL_CACHE]
    if missing:
        l2v = _lang2vec()
        _refuse_unknown_uriel_codes(l2v, missing, feature, "uriel")
        table = l2v.get_features(missing, feature)
        for lang in missing:
            if "--" in table[lang]:
                raise ValueError(f"uriel: the feature set {feature!r} has missing values ('--') for {lang!r}; use a "
                                 "set without gaps, such as the kNN-imputed 'syntax_knn'")
            v = torch.tensor([float(x) for x in table[lang]], dtype=torch.float64)
            _URIEL_CACHE[feature, lang] = v / v.norm().clamp_min(1e-12)
    return [_URIEL_CACHE[feature, lang] for lang in langs]


def _feature_sets(what: str, features) -> tuple:
    """`features` as a tuple of URIEL feature-set names: a bare string was read one character at a
    time, and lang2vec then failed on a set named "s"."""
    if not isinstance(features, (tuple, list)) or not all(isinstance(f, str) for f in features):
        raise TypeError(f"{what}: features must be a tuple of URIEL feature-set names such as ('syntax_knn',), "
                        f"got {features!r}")
    return tuple(features)


def _codes(what: str, langs) -> list:
    """`langs` as a list of ISO 639-3 codes: a bare string was read one character at a time, and
    lang2vec then refused the codes 'd', 'e', 'u'."""
    if isinstance(langs, str):
        raise TypeError(f"{what}: langs must be a list of ISO 639-3 codes, got the str {langs!r}; pass [{langs!r}]")
    return list(langs)


def uriel_vectors(langs, features: tuple[str, ...] = URIEL_FEATURES) -> dict[str, torch.Tensor]:
    """{ISO 639-3 code: URIEL vector}: one L2-normalised block per feature set (default: the
    kNN-imputed syntax, phonology and inventory sets, language family and geography), so that
    each set weighs the same although `fam` has 3718 dimensions and `phonology_knn` 28. A set
    that is all zero for a language (e.g. `fam` of an isolate such as Basque) stays zero."""
    langs = list(dict.fromkeys(_codes("uriel_vectors", langs)))
    blocks = [_uriel_blocks(langs, f) for f in _feature_sets("uriel_vectors", features)]
    return {lang: torch.cat([b[i] for b in blocks]) for i, lang in enumerate(langs)}


def uriel_distance(a: str, b: str, features: tuple[str, ...] = URIEL_FEATURES) -> float:
    """URIEL distance of two ISO 639-3 languages (as `distance_matrix`)."""
    return float(distance_matrix([a, b], features)[0, 1])


def distance_matrix(langs: Sequence[str], features: tuple[str, ...] = URIEL_FEATURES) -> torch.Tensor:
    """[L, L] URIEL distances between ISO 639-3 languages: 1 − the mean of the per-set cosines,
    over the feature sets in which both languages have a nonzero vector. A set that is all zero
    for a language (e.g. `fam` of an isolate such as Basque) says nothing about it and is
    skipped; a pair with no such set in common raises."""
    langs = _codes("distance_matrix", langs)
    if not langs:  # torch.stack of no blocks failed, naming no argument
        raise ValueError("distance_matrix: langs must name at least one language, got none")
    features = _feature_sets("distance_matrix", features)
    cosines = torch.zeros(len(langs), len(langs), dtype=torch.float64)
    counted = torch.zeros_like(cosines)
    for feature in features:
        m = torch.stack(_uriel_blocks(langs, feature))  # unit rows, or zero rows where the set is all zero
        present = (m.norm(dim=1) > 0).double()
        cosines += m @ m.T
        counted += present[:, None] * present[None, :]
    if bool((counted == 0).any()):
        i, j = (counted == 0).nonzero()[0].tolist()
        raise ValueError(f"distance_matrix: {langs[i]!r} and {langs[j]!r} share no feature set of {list(features)} "
                         "with nonzero URIEL vectors for both")
    return (1 - cosines / counted).clamp_min(0).fill_diagonal_(0)


def language_aware_masks(scores: Mapping[str, Mapping[str, torch.Tensor]], uriel_codes: Mapping[str, str],
                         density: float, protect: float = 1.0,
                         features: tuple[str, ...] = URIEL_FEATURES) -> dict[str, dict[str, torch.Tensor]]:
    """The trainable subset of each language for a continual update.

    Each language takes the entries with the highest score_l = s_l − protect · Σ_{m≠l} d(l, m) ·
    s_m / (L − 1): its own importance, discounted by the importance of the other languages
    weighted by their URIEL distance d ∈ [0, 1] (`distance_matrix` over `features`). s are
    importance scores normalised per language, L the number of languages. A close language
    (d near 0) discounts little, so close languages share entries; a distant one discounts
    fully, so an entry that a distant language needs is left to it. The ranking is by the signed
    score: an entry another language needs more than this one ranks last, not first.
    `uriel_codes` maps each language key of `scores` to its ISO 639-3 code. Scores must be
    finite and >= 0; a language whose scores are all zero (none of its examples was scored) raises.
    """
    if isinstance(protect, bool) or not (isinstance(protect, (int, float)) and math.isfinite(protect) and protect >= 0):
        # a negative protect would rank entries that other languages need first: the opposite rule
        raise ValueError(f"language_aware_masks: protect must be a finite number >= 0, got {protect!r}")
    langs = list(scores)
    if not langs:  # next(iter(...)) below raised a bare StopIteration
        raise ValueError("language_aware_masks: scores holds no language")
    missing = [lang for lang in langs if lang not in uriel_codes]
    if missing:
        raise ValueError(f"language_aware_masks: uriel_codes has no ISO 639-3 code for {missing}")
    names = list(next(iter(scores.values())))
    for lang in langs:  # a parameter one language scored and another did not would be skipped or a KeyError
        if set(scores[lang]) != set(names):
            raise ValueError(f"language_aware_masks: scores[{lang!r}] names {sorted(set(scores[lang]) ^ set(names))[:3]} "
                             f"that scores[{langs[0]!r}] does not, or the reverse; score the same parameters")
        shapes = [n for n in names if scores[lang][n].shape != scores[langs[0]][n].shape]
        if shapes:  # the discount below failed on them with a bare broadcasting error
            raise ValueError(f"language_aware_masks: scores[{lang!r}] and scores[{langs[0]!r}] have different shapes "
                             f"for {shapes[:3]}")
        _check_importances("language_aware_masks", f"scores[{lang!r}]", scores[lang])
    k = budget("language_aware_masks", sum(scores[langs[0]][n].numel() for n in names), density=density)
    for lang in langs:  # all zero: its subset was the entries the others need least, ties by position
        _refuse_unscored("language_aware_masks", lang, scores[lang], k)
    dist = distance_matrix([uriel_codes[lang] for lang in langs], features)
    # float64 throughout: the shift by the lowest score below would round float32 scores closer
    # than ulp(|lowest|) together, and topk_mask would then break the tie by position.
    norm = {}
    for lang in langs:
        total = sum(float(scores[lang][n].double().sum()) for n in names) or 1.0
        norm[lang] = {n: scores[lang][n].double() / total for n in names}
    others = max(len(langs) - 1, 1)
    masks = {}
    for i, lang in enumerate(langs):
        adjusted = {}
        for n in names:
            s = norm[lang][n].clone()
            for j, other in enumerate(langs):
                if j != i:
                    s -= protect * float(dist[i, j]) / others * norm[other][n]
            adjusted[n] = s
        # topk_mask ranks by magnitude; shifted to be non-negative, magnitude order is signed order.
        # Parameters in name order: a tie (e.g. entries no language needs, all at 0) went by the
        # first language's dict order, so listing the languages otherwise gave other subsets.
        lowest = min(float(t.min()) for t in adjusted.values())
        keep = dict(zip(sorted(names), topk_mask([adjusted[n] - lowest for n in sorted(names)], k)))
        masks[lang] = {n: keep[n] for n in names}
    return masks


def _language_ids(batch: Mapping, order: list[str]) -> torch.Tensor:
    """The batch's ids, checked against the masks' languages: names, dtype and shape. Not their
    range, a host sync that `route` makes on every step anyway; `continual_update` checks it only
    for listed batches, before the model is converted."""
    if "language_ids" not in batch:
        raise ValueError("continual_update: every batch must carry language_ids (one per example)")
    ids = batch["language_ids"]
    if not isinstance(ids, torch.Tensor):
        unknown = [x for x in ids if isinstance(x, str) and x not in order]
        if unknown:
            raise ValueError(f"continual_update: unknown languages {unknown} in language_ids; the masks have {order}")
    # route's conversion, which refuses float and bool ids: a .long() here routed 0.9 to language 0
    ids = route_ids(order, ids)
    n = batch["input_ids"].shape[0] if "input_ids" in batch else ids.shape[0]
    if ids.dim() != 1 or ids.shape[0] != n:
        raise ValueError(f"continual_update: language_ids must be [{n}] (one per example), got {tuple(ids.shape)}")
    return ids


def _prepare(model: nn.Module, masks: Mapping[str, Mapping[str, torch.Tensor]], what: str,
             before_converting=None) -> dict:
    """Convert the layers the masks name to SubnetworkLinear, or, on a model converted already
    (same languages, e.g. by an earlier update), give its layers these masks; return {parameter
    name: union of the masks} in the converted layers' layout. `before_converting(union)` may
    refuse the masks once they are checked, before the model changes."""
    from ..nn import SubnetworkLinear
    from .model import _converted, _saved_module_params, _swap_conv1d_layout, convert, languages
    from .subnetworks import _stored_masks, set_masks

    _refuse_max_norm(model, what)  # before anything is converted

    order = list(masks)
    if not order:
        raise ValueError(f"{what}: no masks")
    union = {}
    for lang in order:
        _stored_masks(model, masks[lang], what, lang)  # names, dtypes, shapes: a float mask failed in the | below
        for n, m in masks[lang].items():
            union[n] = m.clone() if n not in union else union[n] | m
    if not any(bool(m.any()) for m in union.values()) and not _saved_module_params(model):
        # no entry to train: continual_update failed after converting ("empty parameter list"),
        # continual_trainer ran its steps and changed nothing
        raise ValueError(f"{what}: the masks of every language {order} open no entry (nor does the model have "
                         "modules_to_save), so the update would train nothing")
    if before_converting is not None:
        before_converting(union)
    converted = {f"{n}.weight" for n, _ in _converted(model, SubnetworkLinear)}
    if not converted:
        # cut to a module name, a bias ("query.bias") became "que", and convert's error named that
        other = sorted(n for n in union if not n.endswith(".weight"))
        if other:
            raise ValueError(f"{what}: masks name {other[:5]}, which are not layer weights; only linear layers' "
                             "weights are routed by language")
        targets = sorted({n[: -len(".weight")] for n in union})
        convert(model, targets, kind="subnetwork", masks={lang: dict(masks[lang]) for lang in order})
    else:
        if languages(model) != order:
            raise ValueError(f"{what}: the model's languages {languages(model)} differ from the masks' {order}")
        outside = sorted(n for n in union if n not in converted)
        if outside:
            raise ValueError(f"{what}: masks name parameters of layers the converted model does not route: {outside[:5]}")
        set_masks(model, masks)  # route by these subsets, not by those the layers were converted with
    return _swap_conv1d_layout(model, {n: m for n, m in union.items() if bool(m.any())})


@accepts_compiled
def continual_trainer(model: nn.Module, masks: Mapping[str, Mapping[str, torch.Tensor]], **trainer_kwargs):
    """The Trainer-facing entry point of a LAFT-URIEL update: converts `model` like
    `continual_update` and returns a `SubnetworkTrainer` (transformers Trainer) whose batches
    carry `language_ids` and whose optimizer is MaskedAdamW over the union of the subsets; the
    same update as `continual_update`, with the Trainer's schedule, logging and checkpoints.
    Refuses what SubnetworkTrainer refuses (another `optim`, `optimizer_cls_and_kwargs`,
    Accelerate's FSDP plugin, DeepSpeed, `use_liger_kernel` over a masked output head, an
    `optimizers=` optimizer that is not a masked one or that opens entries outside the masks'
    union), and `model_init`, before it converts the model; a resume from a checkpoint trained
    with other masks than `masks` is refused (without a DynamicMasksCallback)."""
    from types import SimpleNamespace

    from .lt_sft import _refuse_replaced_parameters
    from ..nn import SubnetworkLinear
    from .model import _converted, _refuse_liger_on_converted_head, _swap_conv1d_layout
    from .subnetworks import _SUBNETWORK_HOLDS, SubnetworkTrainer, _check_own_optimizer, _refuse_unconfined

    # what SubnetworkTrainer refuses, before _prepare converts the caller's model
    if trainer_kwargs.get("model_init") is not None:
        raise ValueError("continual_trainer: model_init: the model to update is `model` (converted here); "
                         "pass no model_init")
    given = SimpleNamespace(args=trainer_kwargs.get("args"), optimizer=(trainer_kwargs.get("optimizers") or (None,))[0],
                            optimizer_cls_and_kwargs=trainer_kwargs.get("optimizer_cls_and_kwargs"))
    _check_own_optimizer(given, "continual_trainer", "MaskedAdamW over the subnetworks")
    _refuse_replaced_parameters("continual_trainer", _SUBNETWORK_HOLDS, trainer_kwargs.get("args"))
    args = trainer_kwargs.get("args")
    if args is not None:  # MaskedAdamW checks them only at train(), long after the model was converted
        checks.adamw_hyperparameters("continual_trainer", args.learning_rate, args.adam_beta1, args.adam_beta2,
                                     args.adam_epsilon, args.weight_decay, 0.0, False)
    _refuse_liger_on_converted_head(model, args, "continual_trainer",
                                    converting={n for subset in masks.values() for n in subset})
    named = dict(model.named_parameters())
    # the masks in the weights' stored layout: a converted GPT-2 Conv1D weight is [out, in]
    _prepare(model, masks, "continual_trainer", before_converting=lambda union: _refuse_unconfined(
        "continual_trainer", given.optimizer,
        [(n, named[n], m) for n, m in _swap_conv1d_layout(model, union).items() if n in named]))
    trainer = SubnetworkTrainer(model=model, **trainer_kwargs)
    # a resume must continue an update with these masks, not silently with its checkpoint's
    trainer._asked_masks = {n: layer.masks.detach().cpu().clone() for n, layer in _converted(model, SubnetworkLinear)}
    return trainer


@accepts_compiled
def continual_update(model: nn.Module, batches: Iterable[Mapping], masks: Mapping[str, Mapping[str, torch.Tensor]],
                     lr: float = 1e-4, weight_decay: float = 0.0, epochs: int = 1, loss_fn=None,
                     progress: bool = True) -> list[float]:
    """Update a fine-tuned model on mixed multilingual `batches`, each example changing only its
    language's subset (`masks` = {language: {parameter name: BoolTensor}}, e.g. from
    `language_aware_masks`).

    Every batch carries `language_ids` [B] (indices into `masks`' order, or language names).
    The loss is the batch mean (`model(**batch).loss` by default); one backward routes each
    example's gradient into its own subset, and one compact `MaskedAdamW` step over the union
    of the subsets follows. Only the weights the masks name train, and, whole, the
    `modules_to_save` of a model converted with them (as `continual_trainer` trains them); every
    other entry (biases included) stays bit-identical. With `epochs` > 1 `batches` is iterated once per epoch, so it
    must be re-iterable (a one-shot iterator raises). The model's named linear layers are
    converted to `SubnetworkLinear` in place (sharing their parameters) if it is not converted yet.
    Every argument, and the `language_ids` of batches given as a list, is checked before that; an
    error raised after it (a later batch of an iterator) carries a note that the model changed.
    A step whose loss is not finite, or whose loss is finite but a gradient entry the step reads
    is not (a half-precision backward that overflowed), raises before its update: the weights and
    the optimizer state stay as after the step before. Returns the loss of every step.
    """
    from .model import _saved_module_params, route
    from .subnetworks import _decay_groups

    # MaskedAdamW checks lr and weight_decay too, but only after _prepare has converted the model
    # and frozen its other parameters: a bad value raised with the model changed. Only these two
    # come from the caller; the other arguments are valid placeholders.
    checks.adamw_hyperparameters("continual_update", lr, 0.0, 0.0, 0.0, weight_decay, 0.0, False)
    if isinstance(model, nn.parallel.DistributedDataParallel):
        # it freezes the parameters outside the masks after DDP registered them: their gradient
        # buckets never became ready, so DDP left those buckets' gradients local, and each process
        # stepped its own (the second step's forward then raised inside DDP)
        raise ValueError("continual_update: model is wrapped by DistributedDataParallel; continual_update trains in "
                         "one process. For data-parallel updates use continual_trainer, whose Trainer wraps the model")
    if checks.count("continual_update", "epochs", epochs) < 1:  # 0 converted the model and trained nothing
        raise ValueError(f"continual_update: epochs must be >= 1, got {epochs}")
    checks.flag("continual_update", "progress", progress)  # _progress checks it too, but after the conversion
    _check_batches("continual_update", "batches", batches)
    if epochs > 1 and iter(batches) is batches:  # a generator or iterator: the second epoch would see no batches
        raise ValueError(f"continual_update: epochs={epochs} needs batches that can be iterated again (a list or a "
                         f"DataLoader), got a one-shot {type(batches).__name__}")
    order = list(masks)
    if isinstance(batches, Sequence):  # ids given up front: a bad one raised only after the model was converted
        if not batches:  # as epochs=0: the model was converted, nothing trained, and [] came back
            raise ValueError("continual_update: batches is empty, so the update would train nothing")
        for batch in batches:
            routing.check_ids(_language_ids(batch, order), len(order))
    union = _prepare(model, masks, "continual_update")
    loss_fn = loss_fn or (lambda m, b: m(**b).loss)
    was_training, frozen, losses = model.training, [], []
    try:
        masks_union = set(union)
        union.update({n: None for n in _saved_module_params(model) if n not in union})  # trained whole
        named = dict(model.named_parameters())
        # Weight decay as continual_trainer applies it: not on the saved modules' biases and norms.
        # Built before anything is frozen: a failure here left the other parameters frozen.
        opt = MaskedAdamW(_decay_groups(model, {n: named[n] for n in union}, masks_union, weight_decay),
                          {named[n]: m for n, m in union.items()}, lr=lr, mode="compact")
        trainable = {id(named[n]) for n in union}
        frozen = [p for p in model.parameters() if id(p) not in trainable and p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        model.train()
        for _ in range(epochs):
            for batch in _progress("continual_update", batches, "continual update", progress):
                ids = _language_ids(batch, order)
                inputs = {k: v for k, v in batch.items() if k != "language_ids"}
                opt.zero_grad(set_to_none=True)
                with route(model, ids):
                    loss = loss_fn(model, inputs)
                    loss.backward()
                value = float(loss.detach())
                # the step moved the subsets on no data (momentum, decay), or wrote inf/NaN into them and the state
                if not _finite_step(value, opt):
                    why = ("(NaN: a batch with no labelled token, or a diverged update)" if not math.isfinite(value) else
                           "but a gradient entry it would read is inf/NaN (e.g. a half-precision backward that "
                           "overflowed)")
                    raise ValueError(f"continual_update: the loss of step {len(losses) + 1} is {value} {why}; that step "
                                     "was not taken")
                opt.step()
                losses.append(value)
        if not losses:  # an iterator or DataLoader that yielded no batch: nothing trained
            raise ValueError("continual_update: batches yielded no batch, so the update trained nothing")
    except BaseException as exc:  # nothing undoes the conversion and the steps taken (an interrupt too): say so
        exc.add_note(f"continual_update: this error came after the model was converted (or given these masks) in "
                     f"place and {len(losses)} update step(s) were taken; the model is not restored")
        raise
    finally:
        for p in frozen:
            p.requires_grad_(True)
        model.train(was_training)
        model.zero_grad(set_to_none=True)
    return losses


@dataclass
class LanguageReport:
    """Per-language metric before and after an update, and the spread of the changes."""

    before: dict[str, float]
    after: dict[str, float]
    higher_is_better: bool = True

    @property
    def change(self) -> dict[str, float]:
        """Per language, after − before, signed so that a positive change is an improvement."""
        sign = 1.0 if self.higher_is_better else -1.0
        return {lang: sign * (self.after[lang] - self.before[lang]) for lang in self.before}

    @property
    def improved(self) -> int:
        """Number of languages whose metric improved."""
        return sum(c > 0 for c in self.change.values())

    @property
    def share_improved(self) -> float:
        """The share of languages that improved (the paper's first number)."""
        return self.improved / max(len(self.change), 1)

    @property
    def worsened(self) -> int:
        """Number of languages whose metric got worse."""
        return sum(c < 0 for c in self.change.values())

    @property
    def mean_change(self) -> float:
        """Mean of `change` over the languages (positive: better on average)."""
        return sum(self.change.values()) / max(len(self.change), 1)

    @property
    def mean_loss(self) -> float:
        """Mean size of the losses over the languages that got worse (0 if none did)."""
        losses = [-c for c in self.change.values() if c < 0]
        return sum(losses) / len(losses) if losses else 0.0

    def table(self) -> str:
        """A markdown table: one row per language, then the summary."""
        rows = ["| language | before | after | change |", "|---|---|---|---|"]
        for lang in self.before:
            rows.append(f"| {lang} | {self.before[lang]:.4f} | {self.after[lang]:.4f} | {self.change[lang]:+.4f} |")
        rows.append(f"\nimproved {self.improved} of {len(self.change)} (share {self.share_improved:.3f}), worse "
                    f"{self.worsened}, mean change {self.mean_change:+.4f}, mean loss where worse {self.mean_loss:.4f}")
        return "\n".join(rows)


def per_language_report(before: Mapping[str, float], after: Mapping[str, float], higher_is_better: bool = True) -> LanguageReport:
    """Compare a metric per language before and after an update (same languages in both)."""
    checks.flag("per_language_report", "higher_is_better", higher_is_better)  # "no" is truthy: every sign flipped
    if set(before) != set(after):
        raise ValueError(f"per_language_report: languages differ: {sorted(before)} vs {sorted(after)}")
    if not before:  # the report read "improved 0 of 0 (share 0.000)": a share of no language is not 0
        raise ValueError("per_language_report: before and after hold no language")
    for what, metric in (("before", before), ("after", after)):
        for lang, v in metric.items():  # True read as 1.0; a NaN counted as neither improved nor worse
            checks.finite("per_language_report", **{f"{what}[{lang!r}]": v})
    return LanguageReport({lang: float(before[lang]) for lang in before}, {lang: float(after[lang]) for lang in before},
                          higher_is_better)
