"""Injection of xlsparse layers into a Hugging Face model (PEFT's `model.py` role).

`convert` swaps `nn.Linear` and GPT-2's `Conv1D` for `SparseDeltaLinear`, `MultiDeltaLinear` or
`SubnetworkLinear`, freezes everything else (PEFT's rule), and records what it did in
`model.xlsparse_config`. The layers know nothing of models; this module knows names, targets,
tied weights and how a GPT-2 `Conv1D` ([in, out] weight) maps to a linear ([out, in]).

Persistence and unloading follow PEFT: `save_pretrained` writes the diff and the config, never
the base weights; `from_pretrained` redoes the conversion on a fresh base; `merge_and_unload`
returns plain layers; `disable` runs the base model.
"""
import contextlib
import dataclasses
import functools
import inspect
import math
import os
import re
import shutil
import tempfile
import threading
import warnings
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import routing
from .._paths import made_folder, path_arg
from ..distributed import fingerprint
from ..diff import (SparseDelta, SparseDiff, _is_dtensor, _storage_key, _transpose_delta, applies_on, budget,
                    holding_applies, index_dtype, refuse_sharded)
from ..nn import ExpertEmbedding, MultiDeltaLinear, SparseDeltaLinear, SubnetworkLinear, _own_forward
from ..ops.matmul import merged_weight
from .config import CONFIG_NAME, KINDS, XlsparseConfig

_CONVERTED = (SparseDeltaLinear, MultiDeltaLinear, SubnetworkLinear)
_ROUTED = (MultiDeltaLinear, SubnetworkLinear)
DIFF_NAME = "xlsparse_diff.safetensors"


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


def _matches(name: str, patterns) -> bool:
    """PEFT's rule: a list matches a name exactly or as a dotted suffix; a string is a regular
    expression that must match the whole name."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == t or name.endswith("." + t) for t in patterns)


# transformers models whose layers see [S, B, H] activations: language ids cannot be routed in them
# (Longformer's and LED's encoder self-attention transposes to [S, B, H] before query/key/value)
_SEQUENCE_FIRST = {"xlnet", "fsmt", "longformer", "led"}
# ... and transformers heads that run on the encoder's output transposed to [S, B, H], by the class that holds
# them: BROS's SPADE heads (`initial_token_classifier` is a default target, `Sequential` children 1 and 3)
_SEQUENCE_FIRST_HEADS = {"BrosSpadeEEForTokenClassification": ("initial_token_classifier", "subsequent_token_classifier"),
                         "BrosSpadeELForTokenClassification": ("entity_linker",)}


# transformers modules that pass these children's weights to a functional call and never call the
# children (WavLM: F.multi_head_attention_forward): a converted child would be bypassed
_READS_CHILD_WEIGHTS = {"WavLMAttention": ("q_proj", "k_proj", "v_proj", "out_proj"),
                        # Mamba's mixers compute `dt_proj.weight @ time_step` (its bias goes to the scan):
                        # a converted dt_proj's delta changed no output and got no gradient
                        "FalconMambaMixer": ("dt_proj",), "JambaMambaMixer": ("dt_proj",),
                        # ... and in training on CUDA with mamba_ssm or the hub's kernels, Mamba's mixer hands
                        # x_proj's and out_proj's weights to the fused mamba_inner_fn, and the Mamba2 family's
                        # out_proj's to mamba_split_conv1d_scan_combined: bypassed on a GPU, run on a CPU,
                        # so refused everywhere rather than train on only one of them
                        "MambaMixer": ("dt_proj", "x_proj", "out_proj"),
                        **{mixer: ("out_proj",) for mixer in
                           ("Mamba2Mixer", "BambaMixer", "FalconH1Mixer", "GraniteMoeHybridMambaLayer",
                            "NemotronHMamba2Mixer", "Zamba2MambaMixer")},
                        # an x-vector head's TDNN layers run F.conv1d on kernel.weight; MobileBERT's LM head
                        # multiplies by [decoder.weightᵀ; dense.weight]; LongCat-Flash's router runs F.linear
                        # on classifier.weight
                        "TDNNLayer": ("kernel",), "MobileBertLMPredictionHead": ("dense", "decoder"),
                        "LongcatFlashTopkRouter": ("classifier",),
                        # LayoutLMv2/v3 (LayoutXLM) and PP-DocLayoutV2 index the relative-position bias tables
                        # rel_pos_bias.weight, rel_pos_x_bias.weight and rel_pos_y_bias.weight by bucket
                        **{encoder: ("rel_pos_bias", "rel_pos_x_bias", "rel_pos_y_bias") for encoder in
                           ("LayoutLMv2Encoder", "LayoutLMv3Encoder", "PPDocLayoutV2ReadingOrderEncoder")},
                        # DETR's segmentation head (and Conditional DETR's, MaskFormer's) runs F.conv2d on k_proj.weight
                        **{attention_map: ("k_proj",) for attention_map in
                           ("DetrMHAttentionMap", "ConditionalDetrMHAttentionMap", "MaskFormerDetrMHAttentionMap")}}
# ... and those that do so under a config: BLOOM with pretraining_tp > 1 and slow_but_exact=True
# runs F.linear on column slices of these children's weights
_TP_SLICED = {"BloomAttention": ("dense",), "BloomMLP": ("dense_4h_to_h",)}


def _reads_child_weights(module: nn.Module) -> tuple:
    names = _READS_CHILD_WEIGHTS.get(type(module).__name__, ())
    if getattr(module, "pretraining_tp", 1) > 1 and getattr(module, "slow_but_exact", False):
        names += _TP_SLICED.get(type(module).__name__, ())
    return names


def _uncompiled(model):
    """The module torch.compile wrapped (its wrapper names every parameter `_orig_mod.<name>`,
    which convert's record does not know), else `model`. Read from the submodules: importing
    torch._dynamo to test the wrapper's type costs 2 s."""
    inner = getattr(model, "_modules", {}).get("_orig_mod")
    return inner if type(model).__name__ == "OptimizedModule" and isinstance(inner, nn.Module) else model


def accepts_compiled(fn):
    """A public function of a model (its first argument) also takes `torch.compile(model)`: it runs
    on the model inside, whose names carry no `_orig_mod.` prefix, and where it returns that
    model, the wrapper is returned. Unwrapped in some functions only, the others wrote scores and
    masks under prefixed names, and merge_and_unload deleted the wrapper's compiled forward."""
    first = next(iter(inspect.signature(fn).parameters))

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if args:
            given, args = args[0], args[1:]
        elif first in kwargs:
            given = kwargs.pop(first)
        else:
            return fn(*args, **kwargs)  # Python names the missing argument
        inner = _uncompiled(given)
        out = fn(inner, *args, **kwargs)
        return given if out is inner and inner is not given else out

    return wrapper


@accepts_compiled
def target_names(model: nn.Module, target_modules=None) -> list[str]:
    """Names of the linear layers `convert` replaces.

    `target_modules`: None for every linear layer of the encoder/decoder blocks; a list of names
    matched exactly or as a dotted suffix (PEFT's rule, e.g. ["query", "value"]), each of which
    must match some linear layer; or a string used as a regular expression that must match the
    whole name. The `out_proj` of an `nn.MultiheadAttention` is never a target: that module reads
    its weight directly and never calls the layer, so a replacement would be bypassed (None
    skips it, a pattern that names it raises); so are linear subclasses with a forward of their
    own (`_own_forward`).
    """
    bypassed = {f"{n}.out_proj" if n else "out_proj" for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}
    bypassed |= {f"{n}.{c}" if n else c for n, m in model.named_modules()
                 for c in _reads_child_weights(m)}
    own = {name for name, module in model.named_modules() if _own_forward(module)}
    linears = [name for name, module in model.named_modules() if _is_linear(module)]
    if target_modules is None:
        convertible = [name for name in linears if name not in bypassed | own]
        names = [name for name in convertible if _in_block(name)]
        if not names:
            raise ValueError("convert: the model has no linear layer in encoder/decoder blocks; name the layers "
                             f"with target_modules (it has {convertible[:12]})")
        return names
    if not isinstance(target_modules, str):
        target_modules = list(target_modules)
    if not target_modules:
        raise ValueError("convert: target_modules is empty; give layer names, a pattern, or None for every block "
                         "linear layer (converting nothing would only freeze the model)")
    names = [name for name in linears if _matches(name, target_modules)]
    if own & set(names):
        raise ValueError(f"convert: target_modules matches {sorted(own & set(names))[:3]}, a linear subclass with a "
                         "forward of its own (a mixture-of-experts router, a grouped or quantised linear): a "
                         "converted layer would compute x W^T + b instead")
    if bypassed & set(names):
        raise ValueError(f"convert: target_modules matches {sorted(bypassed & set(names))[:3]}, whose weight its parent "
                         "reads without calling it (the out_proj of an nn.MultiheadAttention, WavLM's attention "
                         "projections, Mamba's dt_proj, BLOOM's dense and dense_4h_to_h under pretraining_tp > 1 with "
                         "slow_but_exact=True): a converted layer would never run")
    # each entry on its own (a string is one full-match regex, as PEFT's), reported as given
    entries = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    pattern = (lambda t: t) if isinstance(target_modules, str) else (lambda t: [t])
    unmatched = [t for t in entries if not any(_matches(name, pattern(t)) for name in linears)]
    if unmatched:
        raise ValueError(f"convert: target_modules {unmatched} matched no linear layer; the model has "
                         f"{linears[:12]}" + (" ..." if len(linears) > 12 else ""))
    return names


# --- tied weights ---

@accepts_compiled
def tied_parameters(model: nn.Module) -> dict[str, list[str]]:
    """{parameter name: the other names of the same storage} for every tied parameter (GPT-2's
    `lm_head.weight` and `transformer.wte.weight`, XLM-R's decoder and word embeddings, ...)."""
    by_storage: dict[tuple, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_storage.setdefault(_storage_key(p), []).append(name)
    return {n: [m for m in names if m != n] for names in by_storage.values() if len(names) > 1 for n in names}


def _refuse_tied(what: str, module_name: str, module: nn.Module, tied: dict) -> None:
    """A module whose parameter is shared with a parameter outside it cannot be converted or
    trained apart: its other use would not see the change (or would see it twice)."""
    prefix = module_name + "."
    for pname, _ in module.named_parameters(prefix=module_name, remove_duplicate=False):
        outside = [o for o in tied.get(pname, []) if not o.startswith(prefix)]
        if outside:
            # transformers 5's tie_weights() ties and never unties: config.tie_word_embeddings=False then
            # model.tie_weights(), the advice this gave, left them one tensor
            owner, attr = pname.rsplit(".", 1)
            # every other use is named: a module the forward never calls (T5's `shared`, reached through
            # the encoder's and decoder's own `embed_tokens`) given its own copy trained nothing, silently
            raise ValueError(f"{what}: {pname!r} is tied to {', '.join(map(repr, outside))} (one tensor, "
                             f"{len(outside) + 1} uses); changing it here would change only some of them. Untie "
                             f"them first by giving it its own copy (m = model.get_submodule({owner!r}); m.{attr} = "
                             f"nn.Parameter(m.{attr}.detach().clone())) where the model calls {owner!r} itself (a "
                             "module it only holds beside those it calls, as T5's `shared`, would then train "
                             f"nothing), or leave {module_name!r} out")


# --- layout helpers ---

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
    return linear, True


def _to_original_layout(weight: torch.Tensor, bias, transposed: bool) -> nn.Module:
    """A plain nn.Linear, or a GPT-2 Conv1D when the converted layer replaced one."""
    out_f, in_f = weight.shape
    if transposed:
        layer = _conv1d_type()(out_f, in_f)
        layer.weight = nn.Parameter(weight.detach().t().contiguous(), requires_grad=False)
    else:
        layer = nn.Linear(in_f, out_f, bias=bias is not None, device=weight.device, dtype=weight.dtype)
        layer.weight = nn.Parameter(weight.detach(), requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach(), requires_grad=False)
    elif transposed:
        layer.bias = None
    return layer


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
                             f"(targets: {list(shapes)[:6]}{' ...' if len(shapes) > 6 else ''}); a routed or delta "
                             "layer holds only linear weights: build the diff with SparseDiff.from_models(..., "
                             "include=r'weight$', exclude=[r'embeddings', r'LayerNorm', r'classifier|lm_head|pooler']), "
                             "or keep the other entries for xlsparse.apply")
        if tuple(t.shape) != shapes[pname]:
            raise ValueError(f"convert: {what} entry {pname!r} has shape {tuple(t.shape)}, the weight has {shapes[pname]}")


# --- what convert remembers: fingerprints of frozen tensors, the originals of saved modules ---

def _fingerprint(t: torch.Tensor) -> tuple:
    """(dtype, checksum of the bits): a cast changes the bits, and the dtype says that it was one."""
    return (str(t.dtype), *fingerprint(t).tolist())


# the casts of a float32 model after convert that the checks recognise (`model.to(torch.bfloat16)`,
# PEFT's usual order): each frozen tensor must then be its value from convert cast, bit for bit.
# Recording them costs a float32 convert 2.0 s at XLM-R-base size on 2 Xeon cores (its own
# fingerprints: 0.9 s); a model loaded in half precision pays nothing
_CASTS = (torch.bfloat16, torch.float16)


def _remember_frozen(rec: "_Record", name: str, t: torch.Tensor) -> None:
    """Record frozen tensor `name`: its fingerprint, and for a float32 one those of its casts."""
    rec.frozen[name] = _fingerprint(t)
    casts = [_fingerprint(t.to(d)) for d in _CASTS] if t.dtype == torch.float32 else []
    rec.cast[name] = {fp[0]: fp for fp in casts}


def _cast_error(what: str, names: str) -> ValueError:
    """The error for frozen tensors `names` cast since convert to a dtype whose cast was not recorded."""
    return ValueError(f"{what}: {names} changed dtype since convert, so nothing can tell a cast from training there; "
                      f"cast the model before convert (or from float32 to {' or '.join(map(str, _CASTS))} after it)")


def _frozen_change(rec: "_Record", name: str, now: tuple) -> str | None:
    """None when frozen tensor `name` (its fingerprint `now`) holds its value from convert, or that
    value cast exactly; "cast" for a dtype whose cast was not recorded; "changed" otherwise."""
    then = rec.frozen[name]
    if now[0] != then[0]:
        then = rec.cast.get(name, {}).get(now[0])
        if then is None:
            return "cast"
    return None if now == then else "changed"


@dataclass
class _Record:
    """Private bookkeeping of `convert`, kept on the model as `_xlsparse_record`."""

    frozen: dict = field(default_factory=dict)  # name -> fingerprint of a tensor that must not change
    cast: dict = field(default_factory=dict)  # name -> {dtype: fingerprint of its value at convert cast to it}
    saved_originals: dict = field(default_factory=dict)  # modules_to_save param name -> its value at convert
    subnet_base: dict = field(default_factory=dict)  # SubnetworkLinear name -> (union indices, base values)
    outside: set = field(default_factory=set)  # names a recipe trains and saves itself (`train_outside_diff`)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __getstate__(self):  # deepcopy and pickle: a copy gets a lock of its own
        if self.lock.locked():  # held by `disable` only
            # the model is in its base state (deltas off, modules to save and subnetworks at their
            # values from convert), and the copy would stay in it: it would run the base for good
            raise RuntimeError("copying or pickling a model inside `with xlsparse.hf.disable(model):` would give a "
                               "copy stuck in the base state; copy it outside the block")
        return {k: v for k, v in self.__dict__.items() if k != "lock"}

    def __setstate__(self, state):  # a record pickled before `outside` or `cast` existed has none
        self.__dict__.update({"outside": set(), "cast": {}, **state}, lock=threading.Lock())


def _record(model: nn.Module) -> _Record:
    rec = getattr(model, "_xlsparse_record", None)
    if rec is None:
        raise ValueError("the model was not converted with xlsparse.hf.convert (or was unloaded)")
    return rec


def _refuse_disabled(rec: _Record, what: str) -> None:
    """Inside `disable` the modules to save and the subnetworks' trained entries hold their values
    from convert: what is read or saved there would be the base's, not what trained."""
    if rec.lock.locked() and (rec.saved_originals or rec.subnet_base):
        raise RuntimeError(f"{what}: the model is inside `with hf.disable(model):`, where its modules to save and "
                           "subnetworks hold their values from convert, not the trained ones; call it after the block")


def _subnet_weight_outside(layer: SubnetworkLinear, union: torch.Tensor) -> torch.Tensor:
    """The weight with the trainable entries zeroed: what must stay as it was at convert."""
    w = layer.weight.detach().reshape(-1).clone()
    w[union.long()] = 0
    return w


# --- routing through the batch: model(**batch) with a `language_ids` field ---

class _OnInstance:
    """Base of the objects `convert` puts on a model instance (`forward`, `save_pretrained`,
    `__getstate__`), bound to that model. A deep copy or pickle copies them with the model, bound
    to the copy; `copy.copy` would share them, and the copy's forward and save would act on the
    original (its config, its attributes): `_InstanceState` gives a shallow copy fresh objects
    marked `shallow`, which raise when used."""

    shallow = False

    def __getstate__(self):  # deepcopy and pickle: copied with its model, so bound to the copy
        return {k: v for k, v in self.__dict__.items() if k != "shallow"}

    def _check_bound(self) -> None:
        if self.shallow:
            raise RuntimeError("a copy.copy of a model converted by xlsparse.hf.convert shares its forward and "
                               "save_pretrained with the original, and would run or save the original: use "
                               "copy.deepcopy(model)")


class _InstanceState(_OnInstance):
    """`model.__getstate__` of a converted model, which copy.copy, copy.deepcopy and pickle call:
    the class's state, with fresh `_OnInstance` objects marked `shallow` (a deep copy and pickle
    copy them, which clears the mark; a shallow copy keeps them as they are)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self):
        self._check_bound()
        state = type(self.model).__getstate__(self.model)
        for key, value in state.items():
            if isinstance(value, _OnInstance):
                fresh = object.__new__(type(value))
                fresh.__dict__.update(value.__dict__, shallow=True)
                state[key] = fresh
        return state


def _with_language_ids(function) -> inspect.Signature:
    """The signature of the method `function` as bound, with a `language_ids` keyword added."""
    sig = inspect.signature(function)
    params = [p for name, p in sig.parameters.items() if name != "self"]
    extra = inspect.Parameter("language_ids", inspect.Parameter.KEYWORD_ONLY, default=None)
    at = next((i for i, p in enumerate(params) if p.kind == inspect.Parameter.VAR_KEYWORD), len(params))
    return sig.replace(parameters=[*params[:at], extra, *params[at:]])


class _RoutingForward(_OnInstance):
    """`model.forward` of a routed model: the class's forward with a `language_ids` keyword that
    routes the call, under a signature that shows it, so `model(**batch)` routes by the batch's
    field and HF's Trainer keeps the column (`remove_unused_columns` keeps what the forward's
    signature names). An object of a module-level class, not a bound method of a local function:
    pickle rebuilt such a method as the class's own forward, and the unpickled model ran the
    base model for every language without a word."""

    def __init__(self, model: nn.Module, owner: nn.Module | None = None):
        self.model = model
        self.owner = owner  # the converted model whose languages route `model` (its encoder), or None: itself
        self.__doc__ = type(model).forward.__doc__

    @property
    def __signature__(self) -> inspect.Signature:
        return _with_language_ids(type(self.model).forward)

    def __call__(self, *args, language_ids=None, **kwargs):
        self._check_bound()
        if args and args[0] is self.model:  # accelerate's unwrap binds the original forward as a method again
            args = args[1:]
        cls_forward = type(self.model).forward
        if language_ids is None:
            return cls_forward(self.model, *args, **kwargs)
        with route(self.model if self.owner is None else self.owner, language_ids):
            return cls_forward(self.model, *args, **kwargs)


class _KeepLanguageIds(_OnInstance):
    """`model.prepare_inputs_for_generation` of a routed model: the class's, with `language_ids`
    kept in the step's inputs. `generate(ids, language_ids=...)` routes each step's forward by
    what this returns, and a class whose own version builds its inputs afresh (Flaubert's) dropped
    them: every step ran the base model for every language, silently."""

    def __init__(self, model: nn.Module):
        self.model = model

    @property
    def __signature__(self) -> inspect.Signature:  # generate reads it to accept the forward's kwargs
        sig = inspect.signature(type(self.model).prepare_inputs_for_generation)
        return sig.replace(parameters=[p for name, p in sig.parameters.items() if name != "self"])

    def __call__(self, *args, **kwargs):
        self._check_bound()
        inputs = type(self.model).prepare_inputs_for_generation(self.model, *args, **kwargs)
        # any mutable mapping, not only a dict: generate unpacks a UserDict (a BatchEncoding) alike
        if kwargs.get("language_ids") is not None and isinstance(inputs, MutableMapping):
            inputs.setdefault("language_ids", kwargs["language_ids"])
        return inputs


class _RoutingGenerate(_OnInstance):
    """`model.generate` of a routed model: `language_ids` checked up front and passed on as a
    tensor of ids (generate repeats tensors only, for each beam and returned sequence: a list of
    names did not follow the rows). `guidance_scale` is refused beside them: transformers'
    classifier-free guidance runs the model a second time without the generate kwargs, so that
    pass ran the base model for every language, silently. Per-token ids (given, or those of an
    enclosing `route`) are refused before the first step."""

    def __init__(self, model: nn.Module):
        self.model = model

    @property
    def __signature__(self) -> inspect.Signature:
        return _with_language_ids(type(self.model).generate)

    def __call__(self, *args, language_ids=None, **kwargs):
        self._check_bound()
        if language_ids is not None:
            config = kwargs.get("generation_config", args[1] if len(args) > 1 else None)
            config = config if config is not None else getattr(self.model, "generation_config", None)
            scale = kwargs.get("guidance_scale", getattr(config, "guidance_scale", None))
            if scale is not None and scale != 1:
                raise ValueError(f"generate: guidance_scale={scale} runs the model a second time without language_ids "
                                 "(classifier-free guidance), so that pass would run the base model; route the call "
                                 "instead: `with xlsparse.hf.route(model, language_ids): model.generate(...)`")
            kwargs["language_ids"] = _language_ids(languages(self.model), language_ids)
        active = routing.current()
        given = kwargs.get("language_ids")
        if given is None and active is not None and (active.modules is None or id(self.model) in active.modules):
            given = active.ids  # `with route(model, ids): model.generate(...)`
        if given is not None and given.dim() > 1:
            # per-token ids cover the prompt only: the first step ran, the second (the generated
            # token) raised on their shape, after the prompt's whole forward
            raise ValueError(f"generate: language_ids of shape {list(given.shape)} give one id per prompt token, but "
                             "the tokens generate adds have none; give one id per example [B]")
        return type(self.model).generate(self.model, *args, **kwargs)


class _SavePretrainedWithDiff(_OnInstance):
    """`model.save_pretrained` of a converted model: refused inside `disable`; else, for a 'delta' or
    'multi' model, transformers' own save (the whole model, base included: the Trainer's
    checkpoints resume from it), then this module's `save_pretrained` files beside it, so that `from_pretrained(base, folder)` reads what the
    Trainer's `save_model` and checkpoints write. Without them such a folder kept the deltas only
    under names the model's class does not know: the class's `from_pretrained` dropped them and
    returned the base weights with the trained head. An object, not a bound method, so that pickle
    keeps it (as `_RoutingForward`)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, save_directory, *args, **kwargs):
        self._check_bound()
        main_process = kwargs.get("is_main_process", args[0] if args else True)
        if kwargs.pop("push_to_hub", False):
            # transformers uploads inside its own save, before this module's files exist: save the
            # folder first, then push it whole through push_to_hub (which saves through this object)
            hub = {k: kwargs.pop(k) for k in ("repo_id", "commit_message", "create_pr", "token", "private")
                   if k in kwargs}
            hub.setdefault("repo_id", os.path.basename(os.path.normpath(os.fspath(save_directory))))
            self(save_directory, *args, **kwargs)
            if main_process:
                self.model.push_to_hub(**hub)
            return
        rec = getattr(self.model, "_xlsparse_record", None)
        if rec is not None:  # transformers' files would hold the base's heads too
            _refuse_disabled(rec, "save_pretrained")
        type(self.model).save_pretrained(self.model, save_directory, *args, **kwargs)
        if not main_process:
            return
        if _sharded(self.model):
            # FSDP2: gathering the diff is a collective, and transformers saves on the main process
            # alone: the others would never join it (rank 0 would wait for good)
            _remove_saved_files(save_directory)
            warnings.warn(f"save_pretrained: {save_directory} holds transformers' files only, no xlsparse diff: the "
                          "model is sharded with FSDP2 (fully_shard); call xlsparse.hf.save_pretrained(model, "
                          "directory) on every process to write it", stacklevel=2)
            return
        if getattr(getattr(self.model, "xlsparse_config", None), "kind", None) == "subnetwork":
            # transformers' files hold the trained weights; there is no diff file (hf.save_pretrained refuses)
            _remove_saved_files(save_directory)
            return
        try:
            save_pretrained(self.model, save_directory)
        except BaseException as exc:
            # transformers' files are this model's now: an earlier save's diff left beside them (the
            # staged write keeps it whole when this one fails: a full disk) loaded as this model's
            _remove_saved_files(save_directory)
            if not isinstance(exc, ValueError):
                raise
            # a checkpoint must not stop training; the folder still resumes
            warnings.warn(f"save_pretrained: {save_directory} holds transformers' files only, no xlsparse diff: {exc}",
                          stacklevel=2)


def _remove_saved_files(directory) -> None:
    """Remove what an earlier `save_pretrained` wrote into `directory`, for a save that writes no
    diff: `from_pretrained` would load the earlier diff as if it were this model's."""
    for name in os.listdir(directory):
        if _saved_file(name):
            os.remove(os.path.join(directory, name))


def _encoder_of(model: nn.Module) -> nn.Module | None:
    """The encoder of an encoder-decoder model (T5, BART, ...), which `generate` runs apart from the
    model's forward; None for other models."""
    if not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return None
    get_encoder = getattr(model, "get_encoder", None)
    encoder = get_encoder() if callable(get_encoder) else None
    return encoder if isinstance(encoder, nn.Module) and encoder is not model else None


def _accept_language_ids(model: nn.Module) -> None:
    """Install `_RoutingForward` as `model.forward`, unless the class's forward names
    `language_ids` itself. An encoder-decoder's encoder gets one too, routed by the model's
    languages: `generate(ids, language_ids=...)` calls the encoder by itself with the generate
    kwargs (`language_ids` among them), and an encoder that ignored them ran the base model only,
    while the decoder steps were routed. So does the model's base model (`model.model`,
    `model.bert`: what gives hidden states), whose forward's **kwargs swallowed `language_ids`."""
    if "language_ids" not in inspect.signature(type(model).forward).parameters:
        model.forward = _RoutingForward(model)
        if callable(getattr(type(model), "prepare_inputs_for_generation", None)):
            model.prepare_inputs_for_generation = _KeepLanguageIds(model)
        if callable(getattr(type(model), "generate", None)):
            model.generate = _RoutingGenerate(model)
    for part in (_encoder_of(model), getattr(model, "base_model", None)):
        if (isinstance(part, nn.Module) and part is not model
                and not isinstance(part.__dict__.get("forward"), _RoutingForward)
                and "language_ids" not in inspect.signature(type(part).forward).parameters):
            part.forward = _RoutingForward(part, owner=model)


# --- convert ---

def _delta_layer(linear, original, transposed, pname, diffs, budget_k, density):
    if diffs is not None:
        delta = diffs.deltas.get(pname) or _empty_delta(original.weight.shape)
        if transposed:
            delta = _transpose_delta(delta, *original.weight.shape)
        layer = SparseDeltaLinear.from_linear(linear, indices=delta.indices)
        with torch.no_grad():
            layer.delta_values.copy_(delta.values.to(layer.delta_values))
        return layer
    if budget_k is not None:
        return SparseDeltaLinear.from_linear(linear, k=budget_k)
    return SparseDeltaLinear.from_linear(linear, density=density)


def _multi_layer(linear, original, transposed, pname, diffs):
    deltas = {}
    for lang, diff in diffs.items():
        delta = diff.deltas.get(pname) or _empty_delta(original.weight.shape)
        deltas[lang] = _transpose_delta(delta, *original.weight.shape) if transposed else delta
    return MultiDeltaLinear.from_linear(linear, deltas)


def _subnetwork_layer(linear, original, transposed, pname, masks):
    per_lang = {}
    for lang, named in masks.items():
        m = named.get(pname)
        if m is None:
            m = torch.zeros(original.weight.shape, dtype=torch.bool, device=original.weight.device)
        per_lang[lang] = m.t() if transposed else m
    return SubnetworkLinear.from_linear(linear, masks=per_lang)


def _refuse_unroutable(kind: str, names: list, modules: dict) -> None:
    """Routed kinds take row t of a layer's 2-D input as token t of the batch (example t // S).
    Refuse layers whose input rows are not that: ids would reach the wrong rows, silently when the
    shapes happen to fit."""
    # the config of every module, not only the model's: a wrapper or an EncoderDecoderModel can hold one
    held = {a: t for a, m in modules.items() if (t := getattr(getattr(m, "config", None), "model_type", None))
            in _SEQUENCE_FIRST}
    hit = [(n, t) for n in names for a, t in held.items() if not a or n.startswith(a + ".")]  # a == "": the model
    if hit:
        raise ValueError(f"convert: kind={kind!r} routes per example along the first dim of each layer's input, but "
                         f"{hit[0][1]} runs its layers sequence-first ([S, B, H]) ({hit[0][0]!r} ...): ids would "
                         "reach the wrong rows")
    heads = [f"{a}.{h}" if a else h for a, m in modules.items() for h in _SEQUENCE_FIRST_HEADS.get(type(m).__name__, ())]
    in_heads = [n for n in names if any(n == h or n.startswith(h + ".") for h in heads)]
    if in_heads:
        raise ValueError(f"convert: kind={kind!r} routes per example along the first dim of each layer's input, but "
                         f"{in_heads[:3]} run on the encoder's output transposed to [S, B, H] (sequence-first): ids "
                         "would reach the wrong rows; leave them out of target_modules")
    # a block that holds an nn.MultiheadAttention built with batch_first=False (torch's default) is
    # sequence-first: torch's nn.Transformer*Layer, BridgeTower's vision blocks (their mlp.c_fc/c_proj)
    blocks = [a for a, m in modules.items()
              if any(isinstance(c, nn.MultiheadAttention) and not c.batch_first for c in m.children())]
    seq_first = [n for n in names for a in blocks if n.startswith(a + ".") or not a]  # a == "": the model itself
    if seq_first:
        raise ValueError(f"convert: kind={kind!r} routes per example along the first dim of each layer's input, "
                         f"but {seq_first[:3]} sit in blocks whose nn.MultiheadAttention was built with "
                         "batch_first=False, which see [S, B, H]: ids would reach the wrong rows; build them with "
                         "batch_first=True, or leave them out of target_modules")
    in_experts = [n for n in names if re.search(r"(^|\.)experts(\.|$)", n)]
    if in_experts:
        raise ValueError(f"convert: kind={kind!r} cannot route {in_experts[:2]}{' ...' if len(in_experts) > 2 else ''}: "
                         "a mixture-of-experts expert runs on the tokens its router picked, flattened and in the "
                         "router's order, so per-token ids would reach the wrong tokens. Leave the experts out of "
                         "target_modules, or use kind='delta'")


@accepts_compiled
def convert(model: nn.Module, target_modules=None, density: float | None = None, k: int | None = None,
            kind: str = "delta", diffs=None, masks=None, modules_to_save=None, *, keep_tied=()) -> nn.Module:
    """Replace the target linear layers of `model` in place, freeze everything else, and return it.

    kind="delta": `SparseDeltaLinear` with a trainable sparse delta per layer; its support comes
      from `diffs` (one SparseDiff: indices and values), or is drawn at random with `density`
      (per layer) or `k` (a global budget split over layers by size).
    kind="multi": `MultiDeltaLinear` with one trainable delta per language from
      `diffs` = {language: SparseDiff}.
    kind="subnetwork": `SubnetworkLinear` with per-language gradient masks from
      `masks` = {language: {parameter name: BoolTensor}}; a missing entry means "no update".

    As in PEFT, every parameter that is not converted is frozen (`requires_grad=False`): base
    weights, biases, embeddings, LayerNorms and heads. `modules_to_save` (names or suffixes, as
    `target_modules`) keeps whole modules trainable, e.g. a new classifier head; they are saved as
    absolute entries of the diff. A target or saved module whose weight is tied to another
    parameter (a decoder tied to the word embeddings) is refused: one use would not see the change.
    `keep_tied` names tied target layers whose other use the caller changes alike (X-ELM's
    ensemble gives a tied embedding and head one delta); they are converted all the same.

    Language ids used by `route` (or a `language_ids` batch field) index the languages in the
    insertion order of `diffs` / `masks`. GPT-2 `Conv1D` layers are converted too; diffs keep the
    model's own parameter layout. What was done is recorded in `model.xlsparse_config`.
    """
    from .._version import __version__

    if kind not in KINDS:
        raise ValueError(f"convert: kind must be one of {KINDS}, got {kind!r}")
    if getattr(model, "xlsparse_config", None) is not None:
        raise ValueError("convert: the model is converted already; merge_and_unload it first or start from the base")
    refuse_sharded("convert", dict(model.named_parameters()), "Convert before fully_shard")
    if target_modules is not None and not isinstance(target_modules, str):
        target_modules = list(target_modules)  # read twice (a generator would give the record nothing)
    names = target_names(model, target_modules)
    # a str was matched by substring ("lm_head" kept "head"), and a name that is no target kept nothing
    if isinstance(keep_tied, str) or not all(isinstance(n, str) for n in keep_tied):
        raise TypeError(f"convert: keep_tied must be a list of target layer names, got {keep_tied!r}")
    if [n for n in keep_tied if n not in names]:
        raise ValueError(f"convert: keep_tied names {[n for n in keep_tied if n not in names]}, which are not among "
                         f"the target layers {names}")
    modules = dict(model.named_modules())
    if kind != "delta":
        _refuse_unroutable(kind, names, modules)
    budgets = None
    if kind == "delta":
        if isinstance(diffs, SparseDiff):
            if density is not None or k is not None:
                raise ValueError("convert: give diffs or density/k for kind='delta', not both")
        elif diffs is not None:
            raise TypeError(f"convert: kind='delta' takes diffs=SparseDiff, got {type(diffs).__name__}")
        elif (density is None) == (k is None):
            raise ValueError("convert: kind='delta' needs exactly one of density, k or diffs")
        if diffs is None:  # the budget's own checks, under the name the user called
            budget("convert", sum(modules[n].weight.numel() for n in names), k, density)
        budgets = _split_k([modules[n].weight.numel() for n in names], k) if k is not None else None
        languages_ = []
    elif kind == "multi":
        if not isinstance(diffs, dict) or not diffs or not all(isinstance(d, SparseDiff) for d in diffs.values()):
            raise TypeError("convert: kind='multi' needs diffs={language: SparseDiff}")
        languages_ = [str(lang) for lang in diffs]
    else:
        if not isinstance(masks, dict) or not masks:
            raise TypeError("convert: kind='subnetwork' needs masks={language: {parameter name: BoolTensor}}")
        languages_ = [str(lang) for lang in masks]
    kind_arg = "diffs" if kind == "multi" else "masks"
    if len(set(languages_)) != len(languages_):  # names are kept as strings: 1 and "1" would be one language
        raise ValueError(f"convert: the {kind_arg} keys {languages_} name a language "
                         "twice once written as strings; give distinct names")
    if kind != "delta":
        routing.check_language_keys(f"convert: {kind_arg}", diffs if kind == "multi" else masks)
    if kind != "delta" and (density is not None or k is not None):
        raise ValueError(f"convert: density and k are for kind='delta'; kind={kind!r} takes its supports from "
                         f"{kind_arg}")
    if kind != "subnetwork" and masks is not None:
        raise ValueError("convert: masks are for kind='subnetwork'")
    if kind == "subnetwork" and diffs is not None:  # it would be ignored: a subnetwork trains the weight itself
        raise ValueError("convert: diffs are for kind='delta' or 'multi'; kind='subnetwork' takes masks only")

    # Everything is checked before the first layer is replaced: an error leaves the model as it was.
    shapes = {f"{n}.weight": tuple(modules[n].weight.shape) for n in names}
    if kind == "delta" and diffs is not None:
        _check_entries("diffs", diffs.deltas, shapes)
        if diffs.dense or diffs.absolute:
            raise ValueError("convert: diffs for kind='delta' may hold sparse deltas only; apply its dense and "
                             "absolute entries with xlsparse.apply, or use from_pretrained")
    elif kind == "multi":
        for lang, diff in diffs.items():
            _check_entries(f"diffs[{lang!r}]", diff.deltas, shapes)
            if diff.dense or diff.absolute:
                raise ValueError(f"convert: diffs[{lang!r}] has dense or absolute entries, which a MultiDeltaLinear "
                                 "cannot route; drop them with diff.without_absolute() or apply them to the base")
    elif kind == "subnetwork":
        for lang, named in masks.items():
            if not isinstance(named, Mapping):
                raise TypeError(f"convert: masks[{lang!r}] must be a dict {{parameter name: BoolTensor}}, got "
                                f"{type(named).__name__}")
            _check_entries(f"masks[{lang!r}]", named, shapes)
            for pname, m in named.items():  # here, not in SubnetworkLinear: earlier layers would be swapped already
                if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
                    raise TypeError(f"convert: masks[{lang!r}][{pname!r}] must be a bool tensor, got "
                                    f"{getattr(m, 'dtype', type(m).__name__)}")
    tied = tied_parameters(model)
    for name in names:
        if name not in keep_tied:
            _refuse_tied("convert", name, modules[name], tied)
    saved = _modules_to_save(model, modules_to_save or [], names)
    for name in saved:
        _refuse_tied("convert: modules_to_save", name, modules[name], tied)
    # a GPT-2 Conv1D becomes a transposed copy: an apply's revert would then write the old tensors,
    # which the model no longer holds, and silently leave its diff in the converted model
    copied = [n for n in names if not isinstance(modules[n], nn.Linear)
              and applies_on([t for t in (modules[n].weight, modules[n].bias) if t is not None])]
    if copied:
        raise RuntimeError(f"convert: an xlsparse.apply that is not reverted changed {copied}, which convert copies "
                           "into a new layout (its revert would then miss them); revert it first, or drop its handle "
                           "to keep the diff in the model for good; nothing was changed")

    for i, name in enumerate(names):
        original = modules[name]
        linear, transposed = _as_linear(original)
        pname = f"{name}.weight"
        if kind == "delta":
            layer = _delta_layer(linear, original, transposed, pname, diffs, budgets[i] if budgets else None, density)
        elif kind == "multi":
            layer = _multi_layer(linear, original, transposed, pname, diffs)
        else:
            layer = _subnetwork_layer(linear, original, transposed, pname, masks)
        layer.transposed = transposed
        layer.train(original.training)  # a new module is in training mode; keep the model's mode
        _swap_module(model, name, layer, original)

    # torch's nn.TransformerEncoderLayer runs in eval mode by one fused op that reads linear1.weight and
    # linear2.weight (W0) without calling the layers, and nn.TransformerEncoder packs the batch into
    # nested tensors for it: both would drop the deltas
    fused = [n for n, m in modules.items() if isinstance(m, nn.TransformerEncoderLayer)
             and any(t in (f"{n}.linear1", f"{n}.linear2") if n else t in ("linear1", "linear2") for t in names)]
    for n in fused:
        modules[n].register_forward_pre_hook(_no_fused_fast_path)
    for n, m in modules.items():
        if isinstance(m, nn.TransformerEncoder) and any(f.startswith(n + ".") or not n for f in fused):
            m.use_nested_tensor = False
    _freeze(model, saved)
    model.xlsparse_config = XlsparseConfig(
        kind=kind, target_modules=names, density=density, k=k, languages=languages_, modules_to_save=saved,
        keep_tied=[n for n in names if n in keep_tied],
        base_model=getattr(getattr(model, "config", None), "_name_or_path", None) or None, xlsparse_version=__version__,
        target_request={"target_modules": target_modules})
    model._xlsparse_record = _remember(model, saved)
    if kind != "delta":
        _accept_language_ids(model)
        for _, layer in _converted(model, _ROUTED):  # `route` on a part (model.bert) finds the model's rules here
            layer._xlsparse_owner = (model.xlsparse_config, model._xlsparse_record)
    if kind == "multi":
        model.register_load_state_dict_pre_hook(_check_language_order)
    if callable(getattr(type(model), "save_pretrained", None)):
        model.save_pretrained = _SavePretrainedWithDiff(model)
    if any(isinstance(v, _OnInstance) for v in model.__dict__.values()):
        model.__getstate__ = _InstanceState(model)
    return model


def _check_language_order(model: nn.Module, state_dict, prefix, *args) -> None:
    """A load_state_dict pre-hook on a 'multi' model: every layer's language order is checked before
    torch writes any entry. Checked by each layer alone, a refusal came after the modules loaded
    before that layer (the embeddings, earlier layers) had taken the state dict's values."""
    for name, layer in model.named_modules():
        if isinstance(layer, MultiDeltaLinear):
            layer._check_state_names(state_dict, f"{prefix}{name}.")


def _no_fused_fast_path(module: nn.Module, args) -> None:
    """A forward pre-hook that does nothing, put on an nn.TransformerEncoderLayer whose linear1 or
    linear2 convert replaced: torch runs such a layer in eval mode by one fused op that reads
    `linear1.weight` and `linear2.weight` (W0) without calling the layers, so the deltas were
    dropped; a layer with a hook takes the ordinary path. It stays after `merge_and_unload`."""
    return None


def _modules_to_save(model: nn.Module, patterns, targets: list[str]) -> list[str]:
    """The names of the modules `modules_to_save` selects (outermost matches only)."""
    if isinstance(patterns, str):
        patterns = [patterns]
    chosen = []
    for pattern in patterns:
        hits = [n for n, m in model.named_modules() if n and _matches(n, [pattern]) and any(True for _ in m.parameters())]
        if not hits:
            raise ValueError(f"convert: modules_to_save entry {pattern!r} matches no module with parameters")
        chosen += hits
    chosen = [n for n in dict.fromkeys(chosen) if not any(n.startswith(o + ".") for o in chosen if o != n)]
    for n in chosen:
        clash = [t for t in targets if t == n or t.startswith(n + ".") or n.startswith(t + ".")]
        if clash:
            raise ValueError(f"convert: {n!r} is both a target and in modules_to_save ({clash[0]!r})")
    return chosen


def _derived_buffers(module: nn.Module, prefix: str = "") -> set[str]:
    """The names of `module`'s non-persistent buffers, under each of its names. They are no weights:
    state derived at run time (a dynamic RoPE's inv_freq grows with a long batch), which neither the
    diff nor a state dict holds; watched, they made every save after a long batch refuse, and the
    Trainer's checkpoints drop the diff."""
    return {f"{m}.{b}" if m else b for m, mod in module.named_modules(prefix=prefix, remove_duplicate=False)
            for b in mod._non_persistent_buffers_set}


def _saved_state(model: nn.Module, saved: list[str]) -> dict[str, torch.Tensor]:
    """What the modules to save `saved` hold, by name: their parameters and their floating
    persistent buffers (a BatchNorm's running statistics, which its forward updates in training:
    left out, a save refused them as changed outside the diff and `disable` kept the trained ones)."""
    out = {}
    for sname in saved:
        module = model.get_submodule(sname)
        out.update(module.named_parameters(prefix=sname))  # a tensor tied inside the module once, as torch names it
        derived = _derived_buffers(module, sname)
        out.update({n: b for n, b in module.named_buffers(prefix=sname) if b.is_floating_point() and n not in derived})
    return out


def _trainable_names(model: nn.Module, saved: list[str]) -> set[str]:
    """Parameters that train after convert: the sparse values, the subnetworks' weights and the
    modules to save (with their buffers: `_saved_state`)."""
    names = set()
    for lname, layer in model.named_modules():
        if isinstance(layer, (SparseDeltaLinear, MultiDeltaLinear)):
            names |= {f"{lname}.{n}" for n, _ in layer.named_parameters() if n.startswith("delta_values")}
        elif isinstance(layer, SubnetworkLinear):
            names.add(f"{lname}.weight")
    return names | set(_saved_state(model, saved))


def _freeze(model: nn.Module, saved: list[str]) -> None:
    train = _trainable_names(model, saved)
    for name, p in model.named_parameters():
        p.requires_grad_(name in train)


def _frozen_tensors(model: nn.Module, train: set[str]) -> dict[str, torch.Tensor]:
    """The tensors that must not change after convert, by name: every floating parameter and
    buffer but those of `train`, under each of its names (a tied tensor's too: `load_state_dict(
    assign=True)` gives each name a Parameter of its own, which read as added since convert)."""
    derived = _derived_buffers(model)
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    trained = {id(t) for name, t in named if name in train}  # under any of its names
    return {name: t for name, t in named if id(t) not in trained and name not in derived and t.is_floating_point()}


def _remember(model: nn.Module, saved: list[str]) -> _Record:
    rec = _Record()
    with torch.no_grad():
        first = {}  # a tied tensor's first name, whose fingerprints its other names share
        for name, t in _frozen_tensors(model, _trainable_names(model, saved)).items():
            if first.setdefault(id(t), name) == name:
                _remember_frozen(rec, name, t)
            else:
                rec.frozen[name], rec.cast[name] = rec.frozen[first[id(t)]], rec.cast[first[id(t)]]
        for n, t in _saved_state(model, saved).items():
            rec.saved_originals[n] = t.detach().clone()
        for lname, layer in _converted(model, SubnetworkLinear):
            union = layer.trainable_mask().reshape(-1).nonzero().flatten()
            _remember_subnet(rec, lname, layer, union, layer.weight.detach().reshape(-1)[union].clone())
    return rec


def _remember_subnet(rec: _Record, lname: str, layer: SubnetworkLinear, union: torch.Tensor, base: torch.Tensor) -> None:
    """The entries of `layer` that the diff covers (`union`, flat and sorted) with their values at
    convert, and the fingerprint of the rest, which must not change."""
    rec.subnet_base[lname] = (union, base)
    _remember_frozen(rec, f"{lname}.weight", _subnet_weight_outside(layer, union))


def _subnet_base(rec: _Record, lname: str, layer: SubnetworkLinear) -> tuple:
    """What convert recorded of a subnetwork layer (its covered entries, their values then), on the
    layer's device now: the record stays where convert ran, and a model moved since (a Trainer
    moves it to the GPU) would mix devices."""
    union, base = rec.subnet_base[lname]
    return union.to(layer.weight.device), base.to(device=layer.weight.device, dtype=layer.weight.dtype)


def _subnets_unchanged_outside(model: nn.Module, rec: _Record, what: str) -> dict:
    """The SubnetworkLinear layers by name, each checked to hold its values from convert outside
    the entries the diff covers: the base model is known only there and at the covered entries."""
    layers = dict(_converted(model, SubnetworkLinear))
    for lname, layer in layers.items():
        now = _fingerprint(_subnet_weight_outside(layer, _subnet_base(rec, lname, layer)[0]))
        change = _frozen_change(rec, f"{lname}.weight", now)
        if change == "cast":  # a cast changes every bit too: say so, not that an optimizer strayed
            raise _cast_error(what, f"{lname}.weight ({rec.frozen[f'{lname}.weight'][0]} -> {now[0]})")
        if change == "changed":
            raise ValueError(f"{what}: {lname}.weight changed outside its subnetworks since convert, so its values from "
                             "convert there are lost; train it with an optimizer that keeps to the masks (MaskedAdamW; "
                             "a plain optimizer's weight decay or momentum moves every entry)")
    return layers


def _subnet_coverage(model: nn.Module) -> dict:
    """What `_grow_subnetworks` recorded, for a checkpoint: {layer name: (covered entries, their
    values from convert, the fingerprint of the rest)}, on the CPU; {} for layers built by hand."""
    rec = getattr(model, "_xlsparse_record", None)
    if rec is None:
        return {}
    return {n: (u.cpu(), b.cpu(), list(rec.frozen[f"{n}.weight"])) for n, (u, b) in rec.subnet_base.items()}


def _restore_subnet_coverage(model: nn.Module, saved: dict) -> None:
    """Put back what `_subnet_coverage` saved (a resumed run that re-selected masks before)."""
    if not saved:
        return
    rec = _record(model)
    layers = dict(_converted(model, SubnetworkLinear))
    if set(saved) != set(layers):
        raise ValueError(f"the saved subnetwork layers {sorted(saved)[:3]} ... differ from the model's")
    for n, (union, base, fp) in saved.items():
        device = layers[n].weight.device
        rec.subnet_base[n] = (union.to(device), base.to(device=device, dtype=layers[n].weight.dtype))
        rec.frozen[f"{n}.weight"] = tuple(fp)
        rec.cast.pop(f"{n}.weight", None)  # the checkpoint holds no casts of it


def _grow_subnetworks(model: nn.Module, unions: dict) -> None:
    """Before the masks of a converted subnetwork model change (dynamic re-selection); `unions`:
    {layer name: the new union of its masks, bool in the layer's layout}. Every entry some
    language may then update joins the entries that `extract_diff`, `save_pretrained` and
    `disable` cover, with its value from `convert`. Entries that leave every mask stay covered:
    they keep what they learned. A joining entry was frozen until now, so it still holds its
    value from `convert`; that is checked, and a change raises before anything is recorded.
    Layers built by hand (no `convert`, so no diff to export) need nothing."""
    rec = getattr(model, "_xlsparse_record", None)
    if rec is None:
        return
    layers = _subnets_unchanged_outside(model, rec, "set_masks")
    for lname, layer in layers.items():
        union, base = _subnet_base(rec, lname, layer)
        covered = unions[lname].reshape(-1).to(layer.weight.device).clone()
        covered[union] = True
        grown = covered.nonzero().flatten()
        values = layer.weight.detach().reshape(-1)[grown].clone()
        values[torch.searchsorted(grown, union)] = base  # the old entries keep their values from convert
        _remember_subnet(rec, lname, layer, grown, values)


@accepts_compiled
def train_outside_diff(model: nn.Module, names) -> None:
    """Make the named parameters trainable for a recipe that saves them itself (X-ELM's dense
    embedding parts): `extract_diff` then no longer checks that they are unchanged. Tied names
    count once."""
    rec = _record(model)
    named = dict(model.named_parameters(remove_duplicate=False))
    for name in names:
        if name not in named:
            raise KeyError(f"train_outside_diff: the model has no parameter {name!r}")
        named[name].requires_grad_(True)
        rec.outside.add(name)
        for alias in [name, *tied_parameters(model).get(name, [])]:
            rec.frozen.pop(alias, None)
            rec.cast.pop(alias, None)


def _converted(model: nn.Module, types=_CONVERTED):
    for name, module in model.named_modules():
        if isinstance(module, types):
            yield name, module


def _output_head(model: nn.Module) -> nn.Module | None:
    """The model's output embeddings (its LM head), or None where it has none."""
    return model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None


def _refuse_liger_on_converted_head(model: nn.Module, args, what: str, converting=()) -> None:
    """`TrainingArguments.use_liger_kernel` makes a causal LM's training forward compute the loss
    from `lm_head.weight` itself (Liger's fused linear cross-entropy), never calling the head: a
    converted head's deltas got no gradient (an ExpertTrainer's tiny Llama head ended at 0, 0.030
    without Liger) and a subnetwork head's gradient skipped its per-language masks (German examples
    moved all 733 head entries open to French alone, 0 without Liger). `converting`: the weight
    names the caller is about to convert, so that it can refuse before converting anything."""
    head = _output_head(model)
    if args is None or not getattr(args, "use_liger_kernel", False) or head is None:
        return
    name = next((n for n, m in model.named_modules() if m is head), None)
    converted = isinstance(head, _CONVERTED)
    if converted or f"{name}.weight" in converting:
        state = f"a converted {type(head).__name__}" if converted else "named by the masks (it would be converted)"
        raise ValueError(f"TrainingArguments.use_liger_kernel: {what}'s output head {name!r} is {state}; Liger's "
                         "fused loss reads its weight directly, bypassing the layer; leave the head out of "
                         "target_modules (or the masks), or turn use_liger_kernel off; nothing was converted here")


def _refuse_expert_embeddings(model: nn.Module, what: str) -> None:
    """An ExpertEmbedding (`xelm.ExpertEnsemble`'s model) holds one embedding delta per expert,
    which no diff or plain layer here carries: saved, extracted or merged, the experts'
    embedding deltas were dropped silently (a reloaded tiny Llama ensemble was 0.52 off)."""
    held = [name for name, _ in _converted(model, ExpertEmbedding)]
    if held:
        raise ValueError(f"{what}: {held[0]!r} is an ExpertEmbedding (an xelm.ExpertEnsemble's model), whose "
                         "per-expert embedding deltas it would drop; keep the ensemble's experts instead "
                         "(ensemble.experts: SparseDiff.save each, and rebuild with ExpertEnsemble)")


_HOOKS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
          "_forward_hooks_always_called", "_backward_pre_hooks", "_backward_hooks", "_is_full_backward_hook")


def _refuse_max_norm(model: nn.Module, who: str) -> None:
    """An nn.Embedding with `max_norm` renormalises the rows it looks up in place, in every forward,
    frozen or not: entries outside any mask or support change, so a trainer's model is no longer
    base + its diff (LT-SFT on a tiny BERT: 1486 entries differed, up to 0.03). Refused before
    anything is changed."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and module.max_norm is not None:
            raise ValueError(f"{who}: {name or 'the model'} is an nn.Embedding with max_norm = {module.max_norm}, "
                             "whose forward rewrites the rows it reads outside any mask; set its max_norm to None "
                             "(renormalising the base once beforehand if wanted)")


def _swap_module(model: nn.Module, name: str, new: nn.Module, old: nn.Module) -> None:
    """Put `new` in place of `old` at `name`, with `old`'s hooks: the same dicts, so that hooks
    registered before the swap keep running (PEFT keeps them by wrapping the original layer; a
    replaced module dropped them silently) and their handles still remove them."""
    for attr in _HOOKS:
        if hasattr(old, attr):
            setattr(new, attr, getattr(old, attr))
    model.set_submodule(name, new)


def _conv1d_weights(model: nn.Module) -> set[str]:
    """Names of the weights that converted GPT-2 Conv1D layers store [out, in], while the model's
    own layout (that of masks, scores and diffs) is [in, out]."""
    return {f"{n}.weight" for n, layer in _converted(model) if layer.transposed}


def _swap_conv1d_layout(model: nn.Module, named: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors keyed by parameter name (masks, scores) between the model's own layout and the
    stored one: those of `_conv1d_weights` transposed, the others as given. Its own inverse."""
    transposed = _conv1d_weights(model)
    return {n: (t.t().contiguous() if n in transposed else t) for n, t in named.items()}


@accepts_compiled
def languages(model: nn.Module) -> list[str]:
    """The languages (or experts) of a routed model in id order: from `convert`'s record, or from
    the routed layers themselves (layers built with `from_linear`), which must agree."""
    config = getattr(model, "xlsparse_config", None)
    if config is not None and config.languages:
        return list(config.languages)
    found = None
    for name, layer in _converted(model, _ROUTED):
        langs = _layer_languages(layer)
        if found is not None and langs != found:
            raise ValueError(f"route: routed layers disagree on the languages: {found} vs {langs} at {name!r}")
        found = langs
    return found or []


def _layer_languages(layer: nn.Module) -> list[str]:
    """A routed layer's languages (or experts) in the order of its ids."""
    return [str(x) for x in (layer.names if isinstance(layer, MultiDeltaLinear) else layer.languages)]


def _language_ids(names: list[str], language_ids) -> torch.Tensor:
    """Integer ids from ints, names (indices into `names`) or None (= −1, base only / no update),
    per example or per token."""
    if isinstance(language_ids, torch.Tensor):
        ids = language_ids
    else:
        def one(x):
            if x is None:
                return -1
            if isinstance(x, bool):  # torch.as_tensor([True, 0]) is int64: True routed to id 1
                raise TypeError(f"route: ids must be integers (or language names), got {x!r}")
            if isinstance(x, str):
                if x not in names:
                    raise ValueError(f"route: unknown language {x!r}; the model has {names}")
                return names.index(x)
            if isinstance(x, (list, tuple)):
                return [one(y) for y in x]
            return x
        ids = torch.as_tensor(one(list(language_ids)) if isinstance(language_ids, (list, tuple)) else one(language_ids))
    if ids.dim() == 0 or ids.numel() == 0:  # before the dtype: an empty list is a float tensor
        raise ValueError(f"route: language_ids must hold one id per example [B] or per token [B, S], got shape "
                         f"{list(ids.shape)}")
    routing.check_id_dtype(ids)
    return ids


def _per_token_misfit(modules: list) -> str | None:
    """Why per-token ids [B, S] cannot route these modules' layers (some run on rows that are not the
    batch's own tokens), or None when they can."""
    # any module's config, not only the model's own: a module holding T5 has no config of its own
    configs = [c for c in (getattr(m, "config", None) for m in modules) if c is not None]
    if any(getattr(c, "is_encoder_decoder", False) for c in configs):
        return ("on an encoder-decoder model fit the source tokens, but the decoder's layers run on the target tokens "
                "(a target of the same length would be routed by source positions); give one id per example [B]")
    if any(getattr(c, "model_type", "").startswith("deberta") and getattr(c, "relative_attention", False)
           for c in configs):
        # the query and key projections also run on the relative-position embeddings [1, 2·span, H]:
        # one example's per-token ids of length 2·span routed those rows by token position, silently
        return ("on DeBERTa with relative attention: its query and key projections also run on the relative-position "
                "embeddings, which no token's language fits; give one id per example [B] (a batch of one example)")
    if any(getattr(c, "add_cross_attention", False) for c in configs):
        # the cross-attention's key and value projections run on the encoder's states [B, S_enc, H]:
        # with S_enc equal to the decoder's length they were routed by the decoder's token positions
        return ("on a decoder with cross-attention: its key and value projections run on the encoder's states, whose "
                "positions are not the tokens'; give one id per example [B]")
    return None


def _owner(modules: list) -> tuple:
    """(xlsparse_config, record) of the converted model that `modules` belong to: held by one of them
    (the model itself, or the model inside a wrapper: DDP), else by its routed layers (a part routed
    alone, `route(model.bert, ...)`, whose modules to save lie outside it); (None, None) for none."""
    held = next((m for m in modules if getattr(m, "xlsparse_config", None) is not None), None)
    if held is not None:
        return held.xlsparse_config, getattr(held, "_xlsparse_record", None)
    return next((m.__dict__["_xlsparse_owner"] for m in modules if "_xlsparse_owner" in m.__dict__), (None, None))


@accepts_compiled
@contextlib.contextmanager
def route(model: nn.Module, language_ids):
    """Route every converted layer run inside the block by language.

    `language_ids`: per example [B] (exactly the batch's length) or per token [B, S] (exactly its
    shape); integers indexing `languages(model)`, or the language names themselves; −1 (or None)
    means base only / no update (a ValueError on a model with `modules_to_save`, which every
    language shares, also when routing a part of it: `route(model.bert, ...)`; run such examples
    under `disable`). A wrong shape is a ValueError that names both shapes. The ids are expanded
    to tokens and grouped once per batch. Works on any module holding routed layers; a layer whose
    languages are in another order than the model's (given by a `SubnetworkLinear.set_masks` since
    convert) raises ValueError. A batch may instead carry a `language_ids` field: `model(**batch)`
    routes by it. With neither, a 'multi' model's forward raises, in eval mode too (it ran as the
    base, so an evaluation whose batches lost the field scored the base as the languages): ask for
    the base with ids of −1 (without `modules_to_save`) or `with xlsparse.hf.disable(model):`. A
    'subnetwork' model's output is the same for every language: it needs ids in training mode, and
    for a backward into its weights in eval mode (which raises without them).
    """
    names = languages(model)
    if not names:
        raise ValueError("route: the model has no routed layers; convert it with kind='multi' or 'subnetwork' first")
    # a layer given its masks in another order since convert (SubnetworkLinear.set_masks) reads id i as
    # another language than the model's i-th: a batch of 'de' trained fr's subnetwork, silently
    reordered = next(((n, own) for n, layer in _converted(model, _ROUTED) if (own := _layer_languages(layer)) != names),
                     None)
    if reordered:
        raise ValueError(f"route: {reordered[0]!r} holds the languages {reordered[1]} in id order, the model's are "
                         f"{names}: its ids would reach another language's masks or deltas; give the layers their "
                         "masks in the model's order (xlsparse.hf.subnetworks.set_masks)")
    num = len(names)
    ids = _language_ids(names, language_ids)
    modules = list(model.modules())
    misfit = _per_token_misfit(modules) if ids.dim() > 1 else None
    if misfit:
        raise ValueError(f"route: per-token language ids {list(ids.shape)} {misfit}")
    for m in modules:
        # a masked LM with `sparse_prediction` (ModernBERT, UltraBERT) runs its head on the labelled tokens
        # only, gathered to [N, H]: per-example ids fit whenever N == B, and labelled token i ran in example
        # i's language, silently. Its attribute, not the config: UltraBERT's is set on the model
        if getattr(m, "sparse_prediction", False) is True:
            body = {id(x) for x in getattr(m, getattr(m, "base_model_prefix", ""), m).modules()}
            head = [n for n, x in m.named_modules() if isinstance(x, _ROUTED) and id(x) not in body]
            if head:
                raise ValueError(f"route: {type(m).__name__} has sparse_prediction=True, so its head {head[:2]} runs "
                                 "on the labelled tokens only, gathered across the examples, which no language id "
                                 "fits; set `sparse_prediction = False` on it or leave its head out of target_modules")
    routing.check_ids(ids, num)  # the one host sync of a routed forward (a graph break under torch.compile)
    config, rec = _owner(modules)
    if (config is not None and config.kind in ("multi", "subnetwork") and config.modules_to_save and rec is not None
            and not rec.lock.locked() and bool((ids == -1).any())):
        # the modules to save are one module shared by every language ('multi' and 'subnetwork'): a
        # −1 ("base only / no update") example ran through their trained values, and in training its
        # loss updated them (inside `disable` they hold their values from convert, the base's)
        raise ValueError(f"route: id -1 means base only / no update, but this model's modules_to_save "
                         f"{config.modules_to_save[:3]} are shared by every language: a -1 example would run "
                         "through their trained values (and train them). Give it a language, or run it under "
                         "`with xlsparse.hf.disable(model):`")
    covered = frozenset(id(m) for m in modules)
    outer = routing.current()
    # inside the route of a batch known to be of one language (subnetworks' meta-steps and scoring), the
    # batch's own `language_ids` field naming that language keeps every row in it: DeBERTa's shared
    # relative rows and OPT's flattened tokens raised on the field's per-example ids
    one = outer is not None and outer.one_id is not None and (outer.modules is None or covered <= outer.modules) \
        and bool((ids == outer.one_id).all())
    # only this model's layers: another routed model run inside the block is not routed by these ids
    with routing.use(ids, num, covered) as active:
        active.one_id = outer.one_id if one else None
        yield active


# --- reading the trained state back ---

def _check_unchanged(model: nn.Module, rec: _Record, what: str) -> None:
    # a merged layer's weight holds W0 + Δ: check its base, the weight with the displaced entries put back
    merged = {f"{n}.weight": layer for n, layer in _converted(model, SparseDeltaLinear) if layer.merged}
    named = dict(model.named_parameters(remove_duplicate=False))  # every name, as convert recorded them
    named.update(model.named_buffers(remove_duplicate=False))
    read = {}  # id of a tensor -> its fingerprint: a tied tensor is read once
    subnets = dict(_converted(model, SubnetworkLinear))
    changed, cast, gone = [], [], []
    for name, fp in rec.frozen.items():
        if name not in named:
            gone.append(name)
            continue
        lname = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and lname in subnets:
            now = _fingerprint(_subnet_weight_outside(subnets[lname], _subnet_base(rec, lname, subnets[lname])[0]))
        elif name in merged:
            if merged[name]._written_since_merge():  # an apply over the merged entries: not in the diff
                changed.append(name)
                continue
            now = _fingerprint(merged[name].base_weight())
        else:
            if id(named[name]) not in read:
                read[id(named[name])] = _fingerprint(named[name])
            now = read[id(named[name])]
        change = _frozen_change(rec, name, now)
        if change == "cast":
            cast.append(f"{name} ({fp[0]} -> {now[0]})")
        elif change == "changed":
            changed.append(name)
    if cast:
        raise _cast_error(what, f"{cast[:3]}{' ...' if len(cast) > 3 else ''}")
    if changed:
        raise ValueError(f"{what}: {changed[:5]}{' ...' if len(changed) > 5 else ''} changed since convert but "
                         "are not part of the diff, so the diff would not reproduce the model. Keep them frozen, or "
                         "convert with modules_to_save=[...] to train and save them")
    # a module swapped in since convert has parameters under new names, which the record above does
    # not know: they trained and were missing from the diff, with nothing said
    train = rec.outside | _trainable_names(model, model.xlsparse_config.modules_to_save)
    added = [n for n, p in model.named_parameters() if p.requires_grad and n not in rec.frozen and n not in train]
    if added:
        raise ValueError(f"{what}: {added[:5]}{' ...' if len(added) > 5 else ''} train but did not exist at convert "
                         "(a module added or swapped in since), so the diff would not hold them; add the module "
                         "before convert (modules_to_save=[...]) or freeze it")
    # frozen, such a module (or one removed) changes the outputs all the same, and neither the diff
    # nor the base it is loaded onto holds the change
    moved = [f"{n} (added)" for n in _frozen_tensors(model, train) if n not in rec.frozen]
    moved += [f"{n} (gone)" for n in gone]
    if moved:
        raise ValueError(f"{what}: {moved[:5]}{' ...' if len(moved) > 5 else ''} since convert (a module swapped in, "
                         "renamed or removed), so base + diff would not be this model; change the model before "
                         "convert, or undo the change")


def _delta_of(name: str, layer: SparseDeltaLinear) -> SparseDelta:
    # copies: set_support and load_state_dict write the layer's buffers in place, which must not
    # move the entries of a diff extracted before
    delta = SparseDelta._trusted(layer.delta_indices.clone(), layer.delta_values.detach().clone(), layer.weight.shape)
    return _transpose_delta(delta, *layer.weight.shape) if layer.transposed else delta


def _language_deltas(model: nn.Module, e: int) -> dict[str, SparseDelta]:
    """The deltas of language (or expert) id e of every MultiDeltaLinear, by parameter name."""
    deltas = {}
    for n, layer in _converted(model, MultiDeltaLinear):
        d = SparseDelta._trusted(layer.delta_indices[e].clone(), layer.delta_values[e].detach().clone(), layer.weight.shape)
        deltas[f"{n}.weight"] = _transpose_delta(d, *layer.weight.shape) if layer.transposed else d
    return deltas


def _saved_module_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters of convert's `modules_to_save`, by name (none on a model not converted)."""
    config = getattr(model, "xlsparse_config", None)
    return {f"{sname}.{n}": p for sname in (config.modules_to_save if config else [])
            for n, p in model.get_submodule(sname).named_parameters()}


def _saved_modules(model: nn.Module) -> dict[str, torch.Tensor]:
    config = getattr(model, "xlsparse_config", None)
    return {n: t.detach().clone() for n, t in _saved_state(model, config.modules_to_save if config else []).items()}


def _sharded(model: nn.Module) -> bool:
    return any(_is_dtensor(p) for p in model.parameters())


# What to do instead of a write into an FSDP2-sharded model: extract_diff and save_pretrained read one
_UNSHARDED = ("Call xlsparse.hf.extract_diff or save_pretrained on every process, then load the diff onto an "
              "unsharded model (xlsparse.hf.from_pretrained before fully_shard) and do this there")


@contextlib.contextmanager
def _unsharded(model: nn.Module):
    """FSDP2 (`fully_shard`): every parameter whole inside the block (an all-gather, so every process
    must enter it), sharded again after. Yields whether the model was sharded; a model that holds
    no DTensor parameter (never sharded, or already gathered by an enclosing block) is left alone."""
    if not _sharded(model):
        yield False
        return
    from torch.distributed.fsdp import FSDPModule

    fsdp = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in fsdp:
        m.unshard()
    try:
        if _sharded(model):  # tensor parallelism, say: its DTensors are not FSDP2's to gather
            raise ValueError("the model holds DTensor parameters that FSDP2's fully_shard does not manage; "
                             "xlsparse reads sharded parameters of fully_shard only")
        yield True
    finally:
        for m in fsdp:
            m.reshard()


@accepts_compiled
def extract_diff(model: nn.Module, base_model: str | None = None, language: str | None = None) -> SparseDiff:
    """Everything the converted model trained, as a SparseDiff named like the original model's
    parameters (GPT-2 Conv1D weights in their own [in, out] layout):

    - kind="delta": every SparseDeltaLinear's delta;
    - kind="multi": the deltas of one `language`;
    - kind="subnetwork": θ − θ0 of every SubnetworkLinear on the entries its masks open;
    - the `modules_to_save` as absolute entries (their buffers too: a BatchNorm's running statistics).

    Raises ValueError, naming it, when a parameter outside the diff changed since `convert`, or one
    added since (a module swapped in) trains: base + diff would not equal the trained model. A model
    assembled by hand (layers from `from_linear`) has no record of `convert`; then every trainable
    parameter must be a SparseDeltaLinear's delta. A `torch.compile`d model gives the diff of the
    model it wraps (as `save_pretrained` saves it).

    FSDP2 (`fully_shard`): call it on every process; each gathers the whole parameters (a
    collective) and returns the whole diff.
    """
    with _unsharded(model):
        return _extract_diff(model, base_model, language)


def _extract_diff(model: nn.Module, base_model: str | None, language: str | None, reconverted: bool = False) -> SparseDiff:
    """`reconverted`: for `save_pretrained`, whose files `from_pretrained` converts with keep_tied again."""
    config = getattr(model, "xlsparse_config", None)
    _refuse_expert_embeddings(model, "extract_diff")
    # a keep_tied layer's twin (GPT-2's word embeddings) never saw its Δ, but the diff applied to a base
    # writes the one tensor both read: the result was not this model (tiny GPT-2: logits 7.3 off)
    tied = {} if reconverted else tied_parameters(model)
    shared = [(n, tied[f"{n}.weight"][0]) for n, _ in _converted(model, (SparseDeltaLinear, MultiDeltaLinear))
              if tied.get(f"{n}.weight")]
    if shared:
        raise ValueError(f"extract_diff: {shared[0][0]!r} shares its weight with {shared[0][1]!r} (convert's "
                         "keep_tied), which runs without its Δ here but would take it wherever the diff is applied; "
                         "use save_pretrained and from_pretrained (which convert it so again) or merge_and_unload")
    if config is None:
        # only SparseDeltaLinear deltas are read below: matched by name, a SparseDeltaEmbedding's
        # delta_values passed as a delta and its trained entries were left out of the diff
        read = {f"{n}.delta_values".lstrip(".") for n, _ in _converted(model, SparseDeltaLinear)}
        stray = [n for n, p in model.named_parameters() if p.requires_grad and n not in read]
        if stray:
            raise ValueError(f"extract_diff: {stray[:5]} are trainable but would not be in the diff; convert the model "
                             "with xlsparse.hf.convert (modules_to_save=[...]) or freeze them")
        kind = "delta"
    else:
        kind = config.kind
        _refuse_disabled(_record(model), "extract_diff")
        _check_unchanged(model, _record(model), "extract_diff")
    deltas = {}
    if kind == "delta":
        deltas = {f"{n}.weight": _delta_of(n, layer) for n, layer in _converted(model, SparseDeltaLinear)}
        if not deltas:
            raise ValueError("extract_diff: the model has no SparseDeltaLinear layer; convert it with kind='delta'")
    elif kind == "multi":
        names = languages(model)
        if language not in names:
            raise ValueError(f"extract_diff: a 'multi' model holds one delta per language; give language= one of {names}")
        deltas = _language_deltas(model, names.index(language))
    else:
        rec = _record(model)
        for n, layer in _converted(model, SubnetworkLinear):
            union, base = _subnet_base(rec, n, layer)
            values = layer.weight.detach().reshape(-1)[union] - base
            d = SparseDelta._trusted(union.to(index_dtype(layer.weight.numel())), values, layer.weight.shape)
            deltas[f"{n}.weight"] = _transpose_delta(d, *layer.weight.shape) if layer.transposed else d
    if language is not None and kind != "multi":
        raise ValueError("extract_diff: language= is for kind='multi'")
    base_model = base_model or (config.base_model if config else None)
    return SparseDiff._trusted(deltas, absolute=_saved_modules(model), base_model=base_model)


@accepts_compiled
def merge(model: nn.Module) -> nn.Module:
    """Fold every SparseDeltaLinear's delta into its base weight (the layer then runs as a plain
    linear, for inference: a forward with grad in training mode raises, since the deltas would
    get no gradient); `unmerge` restores the base weights bit-exactly. Every layer is checked before
    the first is merged, and a failure part way unmerges those merged: the model is merged whole or
    not at all."""
    refuse_sharded("merge", dict(model.named_parameters()), _UNSHARDED)
    layers = list(_converted(model, SparseDeltaLinear))
    if not layers:
        raise ValueError("merge: the model has no SparseDeltaLinear layer")
    for _, layer in layers:  # every layer checked first: a refusal leaves the model unmerged
        layer._check_merge()
    # a tied layer (keep_tied: GPT-2's lm_head and the word embeddings) writes W0 + Δ into the tensor its
    # twin reads too: the embeddings took the head's Δ, and the merged model's outputs moved silently
    tied = tied_parameters(model)
    shared = [(n, tied[f"{n}.weight"][0]) for n, layer in layers if not layer.merged and tied.get(f"{n}.weight")]
    if shared:
        raise ValueError(f"merge: {shared[0][0]!r} shares its weight with {shared[0][1]!r} (convert's keep_tied), which "
                         "would see the merged W0 + Δ too; use merge_and_unload, which gives the layer a weight of "
                         "its own, or run the model unmerged; nothing was merged")
    _each_or_none([layer for _, layer in layers if not layer.merged], "merge", "unmerge")
    return model


@accepts_compiled
def unmerge(model: nn.Module) -> nn.Module:
    """Undo `merge`: the base weights return bit-exactly and the deltas act again. Every layer is
    checked before the first is unmerged, and a failure part way merges those unmerged again: a
    refusal or failure leaves the model as it was."""
    refuse_sharded("unmerge", dict(model.named_parameters()), _UNSHARDED)
    layers = [layer for _, layer in _converted(model, SparseDeltaLinear)]
    for layer in layers:
        layer._check_unmerge()
    _each_or_none([layer for layer in layers if layer.merged], "unmerge", "merge")
    return model


def _each_or_none(layers: list, do: str, undo: str) -> None:
    """`layer.<do>()` for every layer; when one fails (out of memory, an interrupt) after the checks,
    the layers done are undone, so that the model is never left half merged."""
    done = []
    try:
        for layer in layers:
            getattr(layer, do)()
            done.append(layer)
    except BaseException:
        for layer in reversed(done):
            getattr(layer, undo)()
        raise


# --- persistence and unloading, PEFT-style ---

def _lang_file(i: int) -> str:
    return f"xlsparse_diff.lang{i}.safetensors"


def _saved_file(name: str) -> bool:
    """True for the name of a file that `save_pretrained` writes (the per-language files' pattern is
    `_lang_file`'s, with any number for the 0)."""
    return name in (CONFIG_NAME, DIFF_NAME) or re.fullmatch(re.escape(_lang_file(0)).replace("0", r"\d+"), name) is not None


@accepts_compiled
def save_pretrained(model: nn.Module, directory: str) -> None:
    """Write what the converted model trained, and how to redo the conversion, to `directory`:
    `xlsparse_config.json` (kind, target_modules, density / k, languages, modules_to_save, keep_tied,
    base_model, model_class, xlsparse_version, target_request, and the base_fingerprint of every base parameter
    the diff does not hold, which `from_pretrained` checks the base against) and the diff as safetensors
    (`xlsparse_diff.safetensors`; a 'multi' model adds `xlsparse_diff.lang<i>.safetensors` per
    language). Never the base weights. The files are written into a staging folder inside
    `directory` and then moved in: a save that fails while writing (a full disk) leaves an earlier
    save there as it was; one that fails while moving leaves no save rather than a mix of two.

    FSDP2 (`fully_shard`): call it on every process; each gathers the whole parameters (a
    collective), and process 0 alone writes.
    """
    # "" wrote into the working folder's name and failed in os.makedirs, naming no argument
    directory = path_arg("save_pretrained: directory", directory, "folder")
    config = getattr(model, "xlsparse_config", None)
    if config is None:
        raise ValueError("save_pretrained: the model was not converted with xlsparse.hf.convert")
    _refuse_expert_embeddings(model, "save_pretrained")
    if config.kind == "subnetwork":
        raise ValueError("save_pretrained: kind='subnetwork' trains the base weights themselves, so θ0 + (θ − θ0) "
                         "would not reload bit-exactly; use merge_and_unload(model) and transformers' save_pretrained, "
                         "or extract_diff(model) for the (rounded) difference")
    _refuse_disabled(_record(model), "save_pretrained")
    outside = _record(model).outside
    if outside:
        raise ValueError(f"save_pretrained: {sorted(outside)[:3]} train outside the diff "
                         "(train_outside_diff), and these files cannot hold them: save the recipe's own diff "
                         "(X-ELM: ExpertTrainer.expert())")
    with _unsharded(model) as sharded:
        if config.kind == "delta":
            # checks that nothing outside the diff changed; from_pretrained converts keep_tied layers so again
            files = {DIFF_NAME: _extract_diff(model, None, None, reconverted=True)}
        else:
            _check_unchanged(model, _record(model), "save_pretrained")
            files = {DIFF_NAME: SparseDiff._trusted({}, absolute=_saved_modules(model), base_model=config.base_model)}
            for i in range(len(config.languages)):
                files[_lang_file(i)] = SparseDiff._trusted(_language_deltas(model, i), base_model=config.base_model)
        bases = {f"{n}.weight": _weight_fingerprint(layer.base_weight() if isinstance(layer, SparseDeltaLinear)
                                                    else layer.weight, layer.transposed)
                 for n, layer in _converted(model, (SparseDeltaLinear, MultiDeltaLinear))}
        # every other base parameter the files do not hold too: a head drawn at random when the base
        # is built, or embeddings of another vocabulary, changed the outputs of a reload silently
        held = _trainable_names(model, config.modules_to_save)
        named = list(model.named_parameters(remove_duplicate=False))
        # a held tensor under each of its names: tied inside a saved module, its second name was fingerprinted
        # with the trained value, and the base it was trained from was refused at reload
        held = {id(p) for n, p in named if n in held}
        # under every name of a tied tensor (read once): a base that ties or unties it (a head of its own
        # drawn at random, or the embeddings in place of a head trained apart) differs under one name only
        read = {}
        for n, p in named:
            if id(p) not in held and n not in bases:
                if id(p) not in read:
                    read[id(p)] = _weight_fingerprint(p)
                bases[n] = read[id(p)]
    if sharded and torch.distributed.get_rank() != 0:
        return  # every process gathered the same values; one writes them
    with made_folder(directory):
        # written into a folder beside them first, then moved in: a full disk half way leaves an
        # earlier save whole (removing it lost the user's files), never mixed with this one's
        staging = tempfile.mkdtemp(prefix=".xlsparse_save.", dir=directory)
        try:
            for name, diff in files.items():
                diff.save(os.path.join(staging, name))
            dataclasses.replace(config, base_fingerprint=bases, model_class=type(model).__name__).save(staging)
            try:
                for name in os.listdir(directory):  # an earlier save's per-language files would pass for this model's
                    if _saved_file(name) and name not in files:
                        os.remove(os.path.join(directory, name))
                for name in [*files, CONFIG_NAME]:
                    os.replace(os.path.join(staging, name), os.path.join(directory, name))
            except BaseException:  # half moved: this save's files beside an earlier one's would load as one
                _remove_saved_files(directory)
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)


_SAMPLES = 16  # entries of each base weight that a fingerprint holds


def _weight_fingerprint(weight: torch.Tensor, transposed: bool = False) -> dict:
    """A cheap record of a base weight in the model's own layout (`transposed`: a converted GPT-2
    Conv1D's stored [out, in]): its dtype, the float64 sums of its entries and of their magnitudes
    (one pass), and `_SAMPLES` entries at fixed scattered positions, which a transposed or other
    weight of the same shape does not hold."""
    w = weight.detach()
    # the sums in chunks: a float64 sum copies its input in float64 (a 250002 × 768 embedding, now
    # fingerprinted too, took 1.5 GB more on every save); their order moves them by about 1e-16
    sums = torch.stack([torch.stack((torch.sum(c, dtype=torch.float64), torch.linalg.vector_norm(c, 1, dtype=torch.float64)))
                        for c in w.reshape(-1).split(1 << 22)]).sum(0).tolist()
    w = w.t() if transposed else w
    n = w.numel()
    pos = torch.tensor([(j * 2654435761 + 12345) % n for j in range(min(_SAMPLES, n))], dtype=torch.long,
                       device=w.device)
    return {"dtype": str(w.dtype).removeprefix("torch."), "sum": sums[0], "abs_sum": sums[1],
            "sample": (w[torch.unravel_index(pos, w.shape)] if w.dim() else w.reshape(1)[pos]).double().tolist()}


def _fingerprint_mismatch(saved: dict, now: dict) -> str | None:
    """Why `now` is not the fingerprint of the weight `saved` was taken from, or None. In one dtype
    the sampled entries must be equal; across dtypes (a bf16 load of an fp32 save) within the
    coarser one's rounding, and the sums within that rounding of the sum of magnitudes."""
    dtypes = {saved["dtype"], now["dtype"]}
    coarse = [torch.finfo(getattr(torch, d)) for d in dtypes] if len(dtypes) > 1 else []
    eps = max((f.eps for f in coarse), default=0.0)
    tiny = max((f.tiny for f in coarse), default=0.0)  # the rounding step of subnormal values is at most this

    def close(a, b, rel, atol):
        return a == b or (math.isnan(a) and math.isnan(b)) or abs(a - b) <= rel * max(abs(a), abs(b)) + atol

    if len(saved["sample"]) != len(now["sample"]):
        return f"{len(saved['sample'])} sampled entries saved, {len(now['sample'])} here (another size)"
    for j, (a, b) in enumerate(zip(saved["sample"], now["sample"])):
        if not close(a, b, eps, tiny):
            return f"sampled entry {j}: {a!r} saved, {b!r} here"
    scale = max(saved["abs_sum"], now["abs_sum"])
    for key in ("sum", "abs_sum"):  # float64 sums differ by their summation order only: 1e-9
        if not close(saved[key], now[key], 0.0, max(eps, 1e-9) * scale):
            return f"{key} of the entries: {saved[key]!r} saved, {now[key]!r} here"
    return None


def _check_same_base(base_model: nn.Module, config: XlsparseConfig, directory, what: str = "from_pretrained") -> None:
    """The weights the diff goes on must be those it was trained with: a base of the same shapes
    with other weights (another checkpoint, a head drawn at random) took it silently. Saves written
    before the fingerprints were recorded cannot be checked: a warning says so. `what` begins the
    messages (`xlsparse compose` checks the files it is given too)."""
    if config.base_fingerprint is None:
        warnings.warn(f"{what}: {directory} was saved before xlsparse recorded the base weights' "
                      "fingerprint, so the base model given cannot be checked; the outputs match only if it holds "
                      "the weights the diff was trained from (save it again to record them)", stacklevel=3)
        return
    modules = dict(base_model.named_modules())
    named = dict(base_model.named_parameters(remove_duplicate=False))  # a tied tensor under each name, as saved
    # read from the layers (convert names the others): a parametrized one's weight (weight_norm) is
    # computed, and no parameter has its name (a bare KeyError)
    targets = {f"{n}.weight": modules[n].weight for n in config.target_modules if _is_linear(modules.get(n))}
    # the other parameters are fingerprinted by saves since they were recorded; one the base lacks
    # (another head class: an MLM's decoder on a token classifier) cannot change its outputs
    read = {}  # a tied tensor is read once
    for name in dict.fromkeys([*targets, *(n for n in config.base_fingerprint if n in named)]):
        saved = config.base_fingerprint.get(name)
        t = targets.get(name, named.get(name))
        if isinstance(saved, dict) and id(t) not in read:
            read[id(t)] = _weight_fingerprint(t)
        why = ("the file has no fingerprint of it" if not isinstance(saved, dict)
               else _fingerprint_mismatch(saved, read[id(t)]))
        if why:
            raise ValueError(f"{what}: {name} of the base model given differs from the one {directory} "
                             f"was trained on ({why}): the diff would go onto other weights. Load it onto the base "
                             "it was trained from" + ("" if name in targets else "; a module the base draws at random "
                                                      "when it is built (a new head) must be in convert's modules_to_save"))


def _check_same_targets(base_model: nn.Module, config: XlsparseConfig, directory) -> None:
    """The saved `convert` request must select on `base_model` the layers it selected on the saved
    model: a deeper base (more layers, the first ones named alike) took the deltas on the recorded
    layers and left its other layers base-only, silently. Saves written before the request was
    recorded cannot be checked here."""
    if config.target_request is None:
        return
    asked = config.target_request.get("target_modules")
    try:
        here = target_names(base_model, asked)
    except ValueError as exc:
        raise ValueError(f"from_pretrained: {directory} was converted with target_modules={asked!r}, which does not "
                         f"fit the base model given ({exc}); it is another model than the one saved") from None
    extra = [n for n in here if n not in config.target_modules]
    missing = [n for n in config.target_modules if n not in here]
    if extra or missing:
        raise ValueError(f"from_pretrained: {directory} was converted with target_modules={asked!r}, which selected "
                         f"{len(config.target_modules)} layers there and {len(here)} on the base model given"
                         + (f" (the base has {extra[:3]}{' ...' if len(extra) > 3 else ''} besides)" if extra else "")
                         + (f" (the base lacks {missing[:3]}{' ...' if len(missing) > 3 else ''})" if missing else "")
                         + ": it is another model than the one saved (a deeper one?), whose other layers would run "
                         "without their deltas; load it onto the base it was trained from")


@accepts_compiled
def from_pretrained(base_model: nn.Module, directory: str, is_trainable: bool = True) -> nn.Module:
    """Rebuild a model saved by `save_pretrained` on `base_model` (the same base it was trained
    from: a base where the recorded request selects other layers, or whose converted weights differ
    from the recorded fingerprints, is refused before anything changes): convert it as recorded,
    then load the trained values. Its outputs equal the saved model's bit for bit.

    `is_trainable=True` (the default): the deltas and saved modules train on, as after `convert`.
    `is_trainable=False` (PEFT's default, unlike ours): every parameter is frozen and the model put
    in eval mode, for inference."""
    if not isinstance(is_trainable, bool):
        raise TypeError(f"from_pretrained: is_trainable must be a bool, got {is_trainable!r}")
    # "" (an unset variable) read the working folder's save as if it were the one asked for
    directory = path_arg("from_pretrained: directory", directory, "folder")
    refuse_sharded("from_pretrained", dict(base_model.named_parameters()),
                   "Load onto the unsharded base model, then fully_shard the result")
    if getattr(base_model, "xlsparse_config", None) is not None:  # before the checks below, which read its layers
        raise ValueError("from_pretrained: the base model is converted already; give a fresh base model")
    config = XlsparseConfig.load(directory)
    diff = SparseDiff.load(os.path.join(directory, DIFF_NAME))
    # save_pretrained never writes these; a file that has them (made by hand) would lose them
    unused = [*diff.dense, *(diff.deltas if config.kind == "multi" else ())]
    if unused:
        raise ValueError(f"from_pretrained: {DIFF_NAME} has entries a {config.kind!r} model does not take: {unused[:3]} "
                         "(dense entries, or deltas outside the per-language files)")
    if config.kind not in ("delta", "multi"):
        raise ValueError(f"from_pretrained: kind {config.kind!r} cannot be reloaded from a diff")
    # every name, a tied one's too: a saved head untied for training (as convert's refusal advises) is tied
    # again in a fresh base, under the name its twin hides; convert then says so, not that the base lacks it
    named = dict(base_model.named_parameters(remove_duplicate=False))
    named = {**dict(base_model.named_buffers(remove_duplicate=False)), **named}  # saved modules' buffers too
    missing = [n for n in diff.absolute if n not in named]
    if missing:
        raise ValueError(f"from_pretrained: the saved modules name {missing[:3]}, which the base model lacks")
    if diff.absolute and config.model_class not in (None, type(base_model).__name__):
        # a head of another class fits a module of the same name and shape (a sequence classifier's
        # `classifier` in a token classifier) and loaded silently; a language SFT without saved
        # modules goes onto a task model's body, as composable-sft composes them
        warnings.warn(f"from_pretrained: {directory} saved {config.model_class}'s modules {config.modules_to_save}, "
                      f"loaded here into a {type(base_model).__name__}, where they may do another job",
                      stacklevel=3)
    # the absolute entries are the saved modules' parameters, all of them: a module without its entries kept the
    # base's values, and entries outside the modules were loaded into frozen parameters (a hand-edited file)
    modules = dict(base_model.named_modules())
    wanted = {f"{m}.{n}" for m in config.modules_to_save if m in modules for n, _ in modules[m].named_parameters()}
    # their buffers may be absent: a save from before they were saved held them unchanged since convert
    allowed = wanted | set(_saved_state(base_model, [m for m in config.modules_to_save if m in modules]))
    lacks, besides = sorted(wanted - set(diff.absolute)), sorted(set(diff.absolute) - allowed)
    if lacks or besides:
        raise ValueError(f"from_pretrained: {CONFIG_NAME} names modules_to_save {config.modules_to_save}, but "
                         f"{DIFF_NAME} " + (f"lacks their {lacks[:3]}" if lacks else f"has {besides[:3]} besides")
                         + "; the two files do not belong together")
    for name, t in diff.absolute.items():  # checked before convert changes the model
        if tuple(t.shape) != tuple(named[name].shape):
            raise ValueError(f"from_pretrained: {name!r} has shape {tuple(t.shape)} in the file, "
                             f"{tuple(named[name].shape)} in the model")
    _check_same_targets(base_model, config, directory)
    _check_same_base(base_model, config, directory)
    own_name = getattr(getattr(base_model, "config", None), "_name_or_path", None) or None
    if config.base_model and own_name and own_name != config.base_model:
        warnings.warn(f"from_pretrained: {directory} was trained from {config.base_model!r}, the base model given is "
                      f"{own_name!r}; the outputs match only if they hold the same weights", stacklevel=2)
    if config.kind == "multi" and len(set(config.languages)) != len(config.languages):  # a dict would keep one
        raise ValueError(f"from_pretrained: {CONFIG_NAME} names a language twice: {config.languages}")
    names = [DIFF_NAME] if config.kind == "delta" else [_lang_file(i) for i in range(len(config.languages))]
    files = {name: diff if name == DIFF_NAME else SparseDiff.load(os.path.join(directory, name)) for name in names}
    for name, loaded in files.items():
        # save_pretrained writes every converted layer's delta, an empty one too; convert would give
        # a layer the file lacks an empty delta, so it ran as the base, silently
        lacks = [f"{n}.weight" for n in config.target_modules if f"{n}.weight" not in loaded.deltas]
        if lacks:
            raise ValueError(f"from_pretrained: {os.path.join(directory, name)} has no delta for {lacks[:3]}"
                             f"{' ...' if len(lacks) > 3 else ''}, which {CONFIG_NAME} names as converted; the file "
                             "was edited, or the two files do not belong together")
    # the recorded names exactly: as a list they were suffixes too, and a regex request's layer `layers.0.fc`
    # also converted `extra.layers.0.fc` (an empty delta), whose next save then refused to reload
    exact = "|".join(map(re.escape, config.target_modules))
    try:  # convert checks the deltas' shapes against the base: say which folder they came from
        if config.kind == "delta":
            convert(base_model, exact, kind="delta", diffs=SparseDiff._trusted(diff.deltas),
                    modules_to_save=config.modules_to_save, keep_tied=config.keep_tied)
        else:
            convert(base_model, exact, kind="multi", diffs=dict(zip(config.languages, files.values())),
                    modules_to_save=config.modules_to_save, keep_tied=config.keep_tied)
    except ValueError as exc:
        raise ValueError(f"from_pretrained: {directory}: {exc}") from exc
    with torch.no_grad():
        for name, t in diff.absolute.items():
            named[name].copy_(t)
    loaded = base_model.xlsparse_config
    loaded.density, loaded.k = config.density, config.k  # the budget it was trained with, for the next save
    # what was asked, not the names (a save older than the request: the names, as they were given before)
    loaded.target_request = config.target_request or {"target_modules": list(config.target_modules)}
    loaded.base_model = own_name or config.base_model
    if not is_trainable:
        base_model.requires_grad_(False)
        base_model.eval()
    return base_model


@accepts_compiled
def merge_and_unload(model: nn.Module, language: str | None = None) -> nn.Module:
    """Replace every converted layer by a plain `nn.Linear` (or GPT-2 `Conv1D`, in its own layout)
    holding the trained weight, drop xlsparse's bookkeeping and return the model, which
    transformers' own `save_pretrained` / `from_pretrained` then round-trip. A 'multi' model
    merges the delta of one `language`. The modules to save keep their trained values."""
    config = getattr(model, "xlsparse_config", None)
    if config is None:
        raise ValueError("merge_and_unload: the model was not converted with xlsparse.hf.convert")
    # inside `disable` the subnetworks' trained entries hold their values from convert: the plain
    # layers took them (GPT-2's transposed copies kept them for good; BERT's shared storage did not)
    if getattr(model, "_xlsparse_record", None) is not None:
        _refuse_disabled(model._xlsparse_record, "merge_and_unload")
    refuse_sharded("merge_and_unload", dict(model.named_parameters()), _UNSHARDED)
    _refuse_expert_embeddings(model, "merge_and_unload")
    if config.kind == "multi" and language not in config.languages:
        raise ValueError(f"merge_and_unload: a 'multi' model holds one delta per language; give language= one of "
                         f"{config.languages}")
    if config.kind != "multi" and language is not None:
        raise ValueError(f"merge_and_unload: language= is for kind='multi'; this model is {config.kind!r}")
    # the plain layers get new weight tensors: an apply's revert would then write the old ones,
    # which the model no longer holds, and silently leave its diff in the model
    held = [name for name, layer in _converted(model) if applies_on([layer.weight])
            and (isinstance(layer, (SparseDeltaLinear, MultiDeltaLinear)) or layer.transposed)]
    if held:
        raise RuntimeError(f"merge_and_unload: an xlsparse.apply that is not reverted changed the weights of {held}, "
                           "which the plain layers replace (its revert would then miss them); revert it first, or "
                           "drop its handle to keep the diff in the model for good; nothing was changed")
    with torch.no_grad():
        plains = []  # every plain layer first: a refusal below leaves the model as it was
        for name, layer in list(_converted(model)):
            if isinstance(layer, SparseDeltaLinear):
                if layer.merged and not layer._merge_is_stale():
                    # W0 + Δ as merge() wrote it, Δ unchanged since; a copy of its own, laid out row-major
                    weight = layer.weight.detach().clone(memory_format=torch.contiguous_format)
                else:
                    # a merged layer whose Δ changed since merge() (a step on gradients taken in eval
                    # mode) holds a stale W0 + Δ: the trained weight is W0 + the current Δ
                    # W0, merged or not, plus Δ in W0's dtype (float32 Δ over a bfloat16 base, as PEFT upcasts)
                    weight = merged_weight(layer.base_weight(), layer.delta_indices, layer.delta_values)
            elif isinstance(layer, MultiDeltaLinear):
                e = config.languages.index(language)
                weight = merged_weight(layer.weight, layer.delta_indices[e], layer.delta_values[e])
            else:
                weight = layer.weight.detach()
            plains.append((name, layer, _to_original_layout(weight, layer.bias, layer.transposed)))
        for name, layer, plain in plains:
            _swap_module(model, name, plain.train(layer.training), layer)
    for attr in ("xlsparse_config", "_xlsparse_record"):
        if hasattr(model, attr):
            delattr(model, attr)
    for attr in ("forward", "prepare_inputs_for_generation", "generate", "save_pretrained", "__getstate__"):
        if attr in model.__dict__:
            delattr(model, attr)
    for module in model.modules():  # an encoder-decoder's encoder, the base model (`_accept_language_ids`)
        if isinstance(module.__dict__.get("forward"), _RoutingForward):
            del module.forward
    for key, hook in list(model._load_state_dict_pre_hooks.items()):  # torch keeps it wrapped, as `.hook`
        if getattr(hook, "hook", hook) is _check_language_order:
            del model._load_state_dict_pre_hooks[key]
    return model


@accepts_compiled
@contextlib.contextmanager
def disable(model: nn.Module):
    """Run the base model inside the block: every delta off, every routed layer base-only, the
    modules to save and the subnetworks' trained entries at their values from `convert`. On exit
    the trained state returns bit-exactly (changes made inside the block are not kept: an
    `xlsparse.apply` made inside and still in place is reverted on exit, so that its handle
    cannot later write the base values it displaced over the trained ones). An `xlsparse.apply`
    made before the block and still in place is part of the weights, not an adapter: it stays on
    inside (revert it first for the pristine base). A tensor frozen at convert that trains since
    (unfrozen by hand) is refused while it requires grad; frozen again, it is not read (a full
    check is a fingerprint of the whole model, about 0.4 s per 1e8 entries, at every `disable`),
    but `extract_diff` and `save_pretrained` still refuse it."""
    refuse_sharded("disable", dict(model.named_parameters()), "Run the base model unsharded, or as its own sharded "
                   "model (the base without xlsparse.hf.convert)")
    rec = _record(model)
    if not rec.lock.acquire(blocking=False):
        raise RuntimeError("disable: the model is disabled already (nested or from another thread)")
    try:
        layers = [layer for _, layer in _converted(model, (SparseDeltaLinear, MultiDeltaLinear, ExpertEmbedding))]
        if any(isinstance(layer, SparseDeltaLinear) and layer.merged for layer in layers):
            raise RuntimeError("disable: unmerge the model first (hf.unmerge)")
        named = {**dict(model.named_buffers()), **dict(model.named_parameters())}  # saved modules' buffers too
        subnets = _subnets_unchanged_outside(model, rec, "disable")
        # a tensor frozen at convert that was unfrozen and trained since: its value from convert is
        # lost, and the block ran its trained value as the base's, silently. Only those that train
        # now are read (an apply made before the block is part of the weights, and stays)
        trained = [n for n, p in model.named_parameters(remove_duplicate=False)
                   if p.requires_grad and n in rec.frozen and not (n.endswith(".weight") and n[:-7] in subnets)
                   and _frozen_change(rec, n, _fingerprint(p)) is not None]
        if trained:
            raise ValueError(f"disable: {trained[:5]}{' ...' if len(trained) > 5 else ''} were frozen at convert and "
                             "changed since (unfrozen and trained?), so their base values are lost; keep them frozen, "
                             "or convert with modules_to_save=[...] to train them")
        moved = {n: (tuple(named[n].shape) if n in named else None, tuple(t.shape))
                 for n, t in rec.saved_originals.items() if n not in named or named[n].shape != t.shape}
        if moved:  # (now, at convert)
            raise ValueError(f"disable: modules_to_save parameters changed shape since convert (now, then): {moved} "
                             "(resize_token_embeddings after convert?); their base values do not fit them any more")
        with torch.no_grad():
            kept = {n: named[n].detach().clone() for n in rec.saved_originals}
            covered = {n: _subnet_base(rec, n, subnets[n]) for n in rec.subnet_base}
            kept_subnet = {n: subnets[n].weight.detach().reshape(-1)[u].clone() for n, (u, _) in covered.items()}
            for n, original in rec.saved_originals.items():
                named[n].copy_(original)
            for n, (union, base) in covered.items():
                subnets[n].weight.view(-1)[union] = base
        # applies made before the block over the tensors it swaps (modules to save, subnetworks'
        # trained entries): a revert inside would restore trained values into the base state, and
        # the exit would copy the kept values, diff included, back over it: refused until the exit
        pinned = applies_on([*(named[n] for n in kept), *(subnets[n].weight for n in kept_subnet)])
        for handle in pinned:
            handle._pinned = "hf.disable"
        for layer in layers:
            layer.disabled = True
        with holding_applies() as made:  # an apply made inside whose handle is dropped is reverted on exit too
            try:
                yield model
            finally:
                for handle in pinned:
                    handle._pinned = None
                for layer in layers:
                    layer.disabled = False
                on_model = {id(h) for h in applies_on([*named.values(), *model.buffers()])}  # diffs may name buffers
                try:
                    for handle in reversed(made):  # newest first
                        if id(handle) in on_model:
                            handle.revert()
                finally:  # a refused revert (a merge made in the block over its entries) left the base head in
                    with torch.no_grad():
                        for n, value in kept.items():
                            named[n].copy_(value)
                        for n, (union, _) in covered.items():
                            subnets[n].weight.view(-1)[union] = kept_subnet[n]
    finally:
        rec.lock.release()


@accepts_compiled
def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total): the entries an optimizer over the `requires_grad` parameters would
    change, and all parameters (tied ones once). A SubnetworkLinear's weight counts the entries
    its masks open, since its gradient is zero elsewhere."""
    total = trainable = 0
    subnet = {id(m.weight): m for _, m in _converted(model, SubnetworkLinear)}
    for p in model.parameters():
        total += p.numel()
        if p.requires_grad:
            layer = subnet.get(id(p))
            trainable += int(layer.trainable_mask().sum()) if layer is not None else p.numel()
    return trainable, total


@accepts_compiled
def print_trainable_parameters(model: nn.Module) -> None:
    """Print trainable and total parameter counts in PEFT's format."""
    trainable, total = trainable_parameters(model)
    print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / max(total, 1):.4f}")
