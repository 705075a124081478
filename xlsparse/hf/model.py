"""Injection of xlsparse layers into a Hugging Face model (PEFT's `model.py` role).

`convert` swaps `nn.Linear` and GPT-2's `Conv1D` for `SparseDeltaLinear`, `MultiDeltaLinear` or
`SubnetworkLinear`. The layers know nothing of models; this module knows names, targets and how a
GPT-2 `Conv1D` ([in, out] weight) maps to a linear ([out, in]).
"""
import contextlib
import math
import re

import torch
from torch import nn

from .. import routing
from ..diff import SparseDelta, SparseDiff, budget, index_dtype
from ..nn import MultiDeltaLinear, SparseDeltaLinear, SubnetworkLinear

KINDS = ("delta", "multi", "subnetwork")
_CONVERTED = (SparseDeltaLinear, MultiDeltaLinear, SubnetworkLinear)


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is an optional extra
        return None
    return Conv1D


def _is_linear(module: nn.Module) -> bool:
    conv1d = _conv1d_type()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def _in_block(name: str) -> bool:
    """Modules inside a repeated encoder/decoder block have a numeric path component
    (`encoder.layer.3.attention.self.query`, `model.layers.0.mlp.up_proj`, `h.11.attn.c_attn`)."""
    return re.search(r"(^|\.)\d+(\.|$)", name) is not None


def target_names(model: nn.Module, target_modules=None) -> list[str]:
    """Names of the linear layers `convert` replaces.

    `target_modules`: None for every linear layer of the encoder/decoder blocks; a list of names
    matched exactly or as a dotted suffix (PEFT's rule, e.g. ["query", "value"]); or a string used
    as a regular expression that must match the whole name.
    """
    names = []
    for name, module in model.named_modules():
        if not _is_linear(module):
            continue
        if target_modules is None:
            chosen = _in_block(name)
        elif isinstance(target_modules, str):
            chosen = re.fullmatch(target_modules, name) is not None
        else:
            chosen = any(name == t or name.endswith("." + t) for t in target_modules)
        if chosen:
            names.append(name)
    if not names:
        found = [n for n, m in model.named_modules() if _is_linear(m)]
        raise ValueError(f"convert: target_modules={target_modules!r} matched no linear layer; the model has {found[:12]}"
                         + (" ..." if len(found) > 12 else ""))
    return names


def _as_linear(module: nn.Module) -> tuple[nn.Linear, bool]:
    """The module as an nn.Linear (a GPT-2 Conv1D's [in, out] weight is transposed), and whether it was."""
    if isinstance(module, nn.Linear):
        return module, False
    in_features, out_features = module.weight.shape
    linear = nn.Linear(in_features, out_features, bias=module.bias is not None,
                       device=module.weight.device, dtype=module.weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(module.weight.t())
        if module.bias is not None:
            linear.bias.copy_(module.bias)
    linear.weight.requires_grad_(module.weight.requires_grad)
    return linear, True


def _transpose_delta(delta, rows: int, cols: int) -> SparseDelta:
    """A delta of an [rows, cols] tensor re-indexed for its [cols, rows] transpose."""
    idx = delta.indices.long()
    flat = (idx % cols) * rows + idx // cols
    order = torch.argsort(flat)
    return SparseDelta._trusted(flat[order].to(index_dtype(rows * cols)), delta.values[order], (cols, rows))


def _empty_delta(shape) -> SparseDelta:
    return SparseDelta._trusted(torch.zeros(0, dtype=index_dtype(math.prod(shape))), torch.zeros(0), shape)


def _split_k(sizes: list[int], k: int) -> list[int]:
    """Split a global budget k over layers in proportion to their size (largest remainders)."""
    total = sum(sizes)
    k = budget("convert", total, k)
    exact = [k * s / total for s in sizes]
    out = [int(e) for e in exact]
    for i in sorted(range(len(sizes)), key=lambda i: out[i] - exact[i])[: k - sum(out)]:
        out[i] += 1
    return out


def _check_entries(what: str, entries, shapes: dict) -> None:
    """Every entry ({parameter name: delta or mask}) must name a target layer's weight, with its
    shape: checked before any layer is replaced, so a bad diff leaves the model untouched."""
    for pname, t in entries.items():
        if pname not in shapes:
            raise ValueError(f"convert: {what} names {pname!r}, which is not the weight of a target linear layer "
                             f"(targets: {list(shapes)[:6]}{' ...' if len(shapes) > 6 else ''})")
        if tuple(t.shape) != shapes[pname]:
            raise ValueError(f"convert: {what} entry {pname!r} has shape {tuple(t.shape)}, the weight has {shapes[pname]}")


def convert(model: nn.Module, target_modules=None, density: float | None = None, k: int | None = None,
            kind: str = "delta", diffs=None, masks=None) -> nn.Module:
    """Replace the target linear layers of `model` in place and return it.

    kind="delta": `SparseDeltaLinear` with a trainable sparse delta per layer; its support comes
      from `diffs` (one SparseDiff: indices and values), or is drawn at random with `density`
      (per layer) or `k` (a global budget split over layers by size). Base weights are frozen.
    kind="multi": `MultiDeltaLinear` with one delta per language from `diffs` = {language: SparseDiff}.
    kind="subnetwork": `SubnetworkLinear` with per-language gradient masks from
      `masks` = {language: {parameter name: BoolTensor}}; a missing entry means "no update".

    Language ids used by `route` index the languages in the insertion order of `diffs` / `masks`.
    GPT-2 `Conv1D` layers are converted too; diffs keep the model's own parameter layout.
    """
    if kind not in KINDS:
        raise ValueError(f"convert: kind must be one of {KINDS}, got {kind!r}")
    names = target_names(model, target_modules)
    modules = dict(model.named_modules())
    if kind == "delta":
        if isinstance(diffs, SparseDiff):
            if density is not None or k is not None:
                raise ValueError("convert: give diffs or density/k for kind='delta', not both")
        elif diffs is not None:
            raise TypeError(f"convert: kind='delta' takes diffs=SparseDiff, got {type(diffs).__name__}")
        elif (density is None) == (k is None):
            raise ValueError("convert: kind='delta' needs exactly one of density, k or diffs")
        budgets = _split_k([modules[n].weight.numel() for n in names], k) if k is not None else None
    elif kind == "multi":
        if not isinstance(diffs, dict) or not diffs or not all(isinstance(d, SparseDiff) for d in diffs.values()):
            raise TypeError("convert: kind='multi' needs diffs={language: SparseDiff}")
        languages_ = list(diffs)
    else:
        if not isinstance(masks, dict) or not masks:
            raise TypeError("convert: kind='subnetwork' needs masks={language: {parameter name: BoolTensor}}")
        languages_ = list(masks)
    shapes = {f"{n}.weight": tuple(modules[n].weight.shape) for n in names}
    if kind == "delta" and diffs is not None:
        _check_entries("diffs", diffs.deltas, shapes)
    elif kind == "multi":
        for lang, diff in diffs.items():
            _check_entries(f"diffs[{lang!r}]", diff.deltas, shapes)
    elif kind == "subnetwork":
        for lang, named in masks.items():
            _check_entries(f"masks[{lang!r}]", named, shapes)
    for i, name in enumerate(names):
        original = modules[name]
        linear, transposed = _as_linear(original)
        pname = f"{name}.weight"
        out_f, in_f = linear.weight.shape
        if kind == "delta":
            if diffs is not None:
                delta = diffs.deltas.get(pname) or _empty_delta(original.weight.shape)
                if transposed:
                    delta = _transpose_delta(delta, *original.weight.shape)
                layer = SparseDeltaLinear.from_linear(linear, indices=delta.indices)
                with torch.no_grad():
                    layer.delta_values.copy_(delta.values.to(layer.delta_values))
            elif budgets is not None:
                layer = SparseDeltaLinear.from_linear(linear, k=budgets[i])
            else:
                layer = SparseDeltaLinear.from_linear(linear, density=density)
        elif kind == "multi":
            deltas = {}
            for lang, diff in diffs.items():
                delta = diff.deltas.get(pname) or _empty_delta(original.weight.shape)
                deltas[lang] = _transpose_delta(delta, *original.weight.shape) if transposed else delta
            layer = MultiDeltaLinear.from_linear(linear, deltas)
        else:
            per_lang = {}
            for lang, named in masks.items():
                m = named.get(pname)
                if m is None:
                    m = torch.zeros(original.weight.shape, dtype=torch.bool, device=original.weight.device)
                per_lang[lang] = m.t() if transposed else m
            layer = SubnetworkLinear.from_linear(linear, masks=per_lang)
        layer._xlsparse_transposed = transposed
        model.set_submodule(name, layer)
    model._xlsparse_languages = list(languages_) if kind != "delta" else []
    return model


def _converted(model: nn.Module, types=_CONVERTED):
    for name, module in model.named_modules():
        if isinstance(module, types):
            yield name, module


def languages(model: nn.Module) -> list[str]:
    """The languages of a model converted with kind="multi" or "subnetwork", in id order."""
    return list(getattr(model, "_xlsparse_languages", []))


@contextlib.contextmanager
def route(model: nn.Module, language_ids):
    """Route every converted layer run inside the block by language.

    `language_ids`: per example [B] or per token [B, S], integers indexing `languages(model)`;
    −1 means base only / no update. The ids are expanded to tokens and grouped once per batch.
    """
    ids = torch.as_tensor(language_ids)
    if ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"route: language_ids must be integers, got {ids.dtype}")
    num = len(languages(model))
    if num == 0:
        raise ValueError("route: the model has no languages; convert it with kind='multi' or 'subnetwork' first")
    with routing.use(ids, num) as active:
        yield active


def extract_diff(model: nn.Module, base_model: str | None = None) -> SparseDiff:
    """The trained deltas of every `SparseDeltaLinear` as a SparseDiff named like the original
    model's parameters (GPT-2 Conv1D weights in their own [in, out] layout)."""
    deltas = {}
    for name, layer in _converted(model, SparseDeltaLinear):
        delta = SparseDelta._trusted(layer.delta_indices, layer.delta_values.detach().clone(), layer.weight.shape)
        if getattr(layer, "_xlsparse_transposed", False):
            delta = _transpose_delta(delta, *layer.weight.shape)
        deltas[f"{name}.weight"] = delta
    if not deltas:
        raise ValueError("extract_diff: the model has no SparseDeltaLinear layer; convert it with kind='delta'")
    return SparseDiff._trusted(deltas, base_model=base_model)


def merge(model: nn.Module) -> nn.Module:
    """Fold every SparseDeltaLinear's delta into its base weight (the layer then runs as a plain
    linear); `unmerge` restores the base weights bit-exactly."""
    layers = list(_converted(model, SparseDeltaLinear))
    if not layers:
        raise ValueError("merge: the model has no SparseDeltaLinear layer")
    for _, layer in layers:
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo `merge`: the base weights return bit-exactly and the deltas act again."""
    for _, layer in _converted(model, SparseDeltaLinear):
        layer.unmerge()
    return model


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a SubnetworkLinear counts the entries its masks open."""
    total = trainable = 0
    subnet = {id(m.weight): m for _, m in _converted(model, SubnetworkLinear)}
    for p in model.parameters():
        total += p.numel()
        if p.requires_grad:
            layer = subnet.get(id(p))
            trainable += int(layer.trainable_mask().sum()) if layer is not None else p.numel()
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> None:
    """Print trainable and total parameter counts, as PEFT does."""
    trainable, total = trainable_parameters(model)
    print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / max(total, 1):.4f}")
