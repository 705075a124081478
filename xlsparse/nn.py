"""Drop-in replacements for `nn.Linear`: a frozen base plus sparse deltas (`SparseDeltaLinear`,
`MultiDeltaLinear`) and per-language gradient masks (`SubnetworkLinear`); and for `nn.Embedding`
(`SparseDeltaEmbedding`, and `ExpertEmbedding` with one delta per routed expert)."""
import contextlib
import json
import math
import weakref
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import functional, routing
from .diff import ConvertedLayer, EntryWrite, budget, index_dtype
from .ops import checks as op_checks
from .ops import optim as optim_ops
from .ops._common import acc_dtype
from .ops.matmul import restore_entries_, write_delta_
from .optim import LAYER_MASK_CHANGES, SUBNETWORK_LAYERS


def _support(weight: torch.Tensor, k=None, density=None, indices=None, what: str = "from_linear") -> torch.Tensor:
    """Sorted unique flat indices into `weight`: k (or density · numel) drawn at random, or the
    given indices (a tensor of flat indices, or a bool mask of the weight's shape, e.g. from
    `xlsparse.functional.topk_mask`). Errors start with `what`, the caller."""
    if sum(a is not None for a in (k, density, indices)) != 1:
        raise ValueError(f"{what}: give exactly one of k, density or indices")
    n = weight.numel()
    if indices is None:
        k = budget(what, n, k, density)
        picked = torch.randperm(n, device=weight.device)[:k]
        return picked.sort().values.to(index_dtype(n))
    indices = torch.as_tensor(indices, device=weight.device)
    if indices.dtype == torch.bool:
        if indices.shape != weight.shape:
            raise ValueError(f"{what}: mask shape {tuple(indices.shape)} != weight shape {tuple(weight.shape)}")
        return indices.reshape(-1).nonzero().flatten().to(index_dtype(n))
    if indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{what}: indices must be int32, int64 or a bool mask, got {indices.dtype}")
    if indices.dim() != 1:
        raise ValueError(f"{what}: indices must be 1-D flat indices, got {tuple(indices.shape)}")
    op_checks.indices(what, indices, n)
    return indices


# nn.Linear subclasses whose own forward is x Wᵀ + b all the same (Falcon's layers)
_LINEAR_MATH = {"FalconLinear"}


def _own_forward(module: nn.Module) -> bool:
    """An nn.Linear subclass with a forward of its own (a MoE router that returns a tuple, as Llama4's
    and Phimoe's do; a grouped or quantised linear): a layer made from it computes x Wᵀ + b instead.
    The layers of this module (SubnetworkLinear) are not counted."""
    return (isinstance(module, nn.Linear) and not isinstance(module, ConvertedLayer)
            and type(module).forward is not nn.Linear.forward and type(module).__name__ not in _LINEAR_MATH)


def _plain_linear(what: str, linear: nn.Module) -> None:
    """Refuse what a from_linear would silently turn into x Wᵀ + b (hf.convert refuses such targets too)."""
    if not isinstance(linear, nn.Linear):  # an nn.Embedding's [V, H] weight would pass as a linear's
        raise TypeError(f"{what}.from_linear: linear must be an nn.Linear, got {type(linear).__name__}")
    if _own_forward(linear):
        raise TypeError(f"{what}.from_linear: {type(linear).__name__} is an nn.Linear subclass with a forward of its "
                        "own; the converted layer would compute x W^T + b instead")


def _one_value_each(what: str, indices: torch.Tensor, values: torch.Tensor) -> None:
    """A delta's values: a 1-D floating-point tensor, one per index (a [1, K] one read "K indices but
    K values"; int or bool values were cast to the weight's dtype silently, which SparseDelta refuses)."""
    op_checks.float_dtype(what, "values", values)
    if values.shape != indices.shape:
        raise ValueError(f"{what}: {indices.numel()} indices but {values.numel()} values (values of shape "
                         f"{tuple(values.shape)}; one per index, 1-D)")


def _bump_version(weight: torch.Tensor) -> None:
    """merge()/unmerge() write the weight in place under no_grad: a graph that saved it for its
    backward (a forward before the merge) must then refuse, as torch does for any in-place change,
    not compute dX with W0 + 2Δ or W0."""
    if not weight.is_inference():
        torch.autograd.graph.increment_version(weight)


def _check_delta_pairs(state_dict, prefix: str, pairs, numel: int) -> None:
    """A delta's values are one per entry of its indices: a state dict with one of the two (the
    trainable parameters alone, `load_state_dict(strict=False)`) put the values on the layer's own
    support, which a random one (convert with density or k) shares 10% of at density 0.1: the
    layer ran another delta, silently. The indices must be sorted, unique and inside the weight's
    `numel` entries, as at construction: loaded unchecked, a SparseDeltaEmbedding's lookup (a binary
    search) added values to the wrong entries, silently. Raise before anything of the layer loads."""
    for pair in pairs:
        has = [prefix + key for key in pair if prefix + key in state_dict]
        if len(has) == 1:
            lacks = next(prefix + key for key in pair if prefix + key not in state_dict)
            raise ValueError(f"load_state_dict: the state dict has {has[0]} but not {lacks}; a delta's values belong to "
                             "the indices they were trained at: load both (model.state_dict() holds both)")
        key = prefix + pair[0]
        if key in state_dict:
            op_checks.index_dtype("load_state_dict", key, state_dict[key])
            if state_dict[key].dim() == 1 and op_checks.can_read(state_dict[key]):  # other shapes: torch names them
                op_checks.indices(f"load_state_dict: {key}", state_dict[key], numel)


class _DeltaView:
    """A layer's single delta read as a SparseDelta-like object (`.indices`, `.values`)."""

    @property
    def indices(self) -> torch.Tensor:
        return self.delta_indices

    @property
    def values(self) -> torch.Tensor:
        return self.delta_values


class SparseDeltaLinear(_DeltaView, ConvertedLayer, nn.Module):
    """y = x (W0 + Δ)ᵀ + b with a frozen base `weight` W0, a `delta_indices` buffer [K] and a
    trainable `delta_values` parameter [K] (zero at creation, so a fresh layer computes exactly
    what the original linear did).

    The backward never allocates a dense O x I gradient, and no merged O x I copy is made: with
    enough tokens each call writes Δ into W0 and restores it after (`functional.sparse_delta_linear`).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, indices: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight.detach(), requires_grad=False)
        # the given Parameter itself, so that an optimizer built over the wrapped linear goes on
        # training it (a new Parameter over the same storage never got a gradient there)
        self.bias = bias if bias is None or isinstance(bias, nn.Parameter) else nn.Parameter(
            bias.detach(), requires_grad=bias.requires_grad)
        # its own copy: set_support writes it in place, which must not reach the caller's tensor
        self.register_buffer("delta_indices", indices.clone())
        self.delta_values = nn.Parameter(torch.zeros(indices.numel(), dtype=weight.dtype, device=weight.device))
        # base entries overwritten by merge(), for a bit-exact unmerge(); a buffer so that .to()
        # converts it with the weight, not persistent: a state dict holds the unmerged layer
        self.register_buffer("_displaced", None, persistent=False)
        # the merged entries W0 + Δ as merge() wrote them: unmerge() checks that nothing else (an
        # xlsparse.apply or its revert) wrote them since, whose change a restore would drop silently
        self.register_buffer("_merged_entries", None, persistent=False)
        # Δ as merge() wrote it: a later change makes the merge stale (a buffer, so that .to() casts it with Δ)
        self.register_buffer("_merged_delta", None, persistent=False)
        # delta_values' (version counter, storage) at merge(): unchanged on a GPU, Δ is not read back
        self._merged_version = None
        self._merge_write = None  # merge() as an in-place write: an earlier apply's revert over it refuses
        # (the weight merge() wrote into,): in a tuple, not registered; deepcopy and .to() keep it this weight
        self._merged_weight = None
        self.disabled = False  # True: the base layer alone (xlsparse.hf.disable)
        self.transposed = False  # True: replaces a GPT-2 Conv1D, whose weight is stored [in, out]

    @classmethod
    def from_linear(cls, linear: nn.Linear, k=None, density=None, indices=None) -> "SparseDeltaLinear":
        """Wrap `linear`: its weight becomes the frozen base; the delta's support is `k` (or
        `density`) random entries, or `indices` (flat indices or a bool mask of the weight)."""
        _plain_linear("SparseDeltaLinear", linear)
        return cls(linear.weight, linear.bias, _support(linear.weight, k, density, indices))

    @property
    def shape(self) -> torch.Size:
        """The shape of the base weight [out_features, in_features]."""
        return self.weight.shape

    @property
    def merged(self) -> bool:
        """True between `merge()` and `unmerge()`: the base weight holds W0 + Δ."""
        return self._displaced is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            if self.merged:
                raise RuntimeError("SparseDeltaLinear: disabled while merged; unmerge first")
            return nn.functional.linear(x, self.weight, self.bias)
        if not self.merged:
            return functional.sparse_delta_linear(x, self.weight, self.bias, self.delta_indices, self.delta_values)
        if torch.compiler.is_compiling():
            # a graph reads no version counter (it took the one at tracing as a constant, and a
            # compiled merged layer ran a stale Δ silently): it compares the K values instead
            torch._assert_async(self._merge_current(), _STALE_MERGE)
        elif self._merge_is_stale():
            raise RuntimeError(_STALE_MERGE)
        if self.weight is not self._merged_weight[0]:
            # swapped in by torch.func.functional_call or accelerate's hooks: W0 from a state dict (as
            # accelerate's offload takes it), or W0 + Δ from named_parameters(); which one cannot be
            # told, and with W0 the layer dropped Δ silently
            raise RuntimeError("SparseDeltaLinear is merged but runs with another weight than the one merge() wrote "
                               "into (torch.func.functional_call, accelerate's dispatch or offload?); unmerge() "
                               "(xlsparse.hf.unmerge) first: the unmerged layer adds Δ to the weight it is given")
        wants_grad = torch.is_grad_enabled() and self.delta_values.requires_grad
        if wants_grad and self.training:
            # a step would change Δ but not the merged weight (the next forward then refuses)
            raise RuntimeError("SparseDeltaLinear is merged and in training mode: its delta cannot train; call "
                               "unmerge() (xlsparse.hf.unmerge) before training, or model.eval()")
        if wants_grad:
            # W0 + Δ is already in the weight; Δ - Δ adds exactly zero but carries Δ's gradient
            # (an SDDMM), so gradients taken in eval mode (scores without dropout) reach Δ
            return functional.sparse_delta_linear(x, self.weight, self.bias, self.delta_indices,
                                                  self.delta_values - self.delta_values.detach())
        return nn.functional.linear(x, self.weight, self.bias)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold Δ into the base weight's storage; `unmerge` restores the base bit-exactly. The
        storage is the one of the linear the layer was made from: anything else that holds that
        tensor sees W0 + Δ until `unmerge`. A forward refuses once `delta_values` has changed (on a
        GPU, a write in place through `delta_values.data` is not seen: it bumps no version)."""
        if self._displaced is None:
            self._check_merge()
            # an inference tensor (made under torch.inference_mode, as by a `from_pretrained` there)
            # keeps no version counter: reading it raised, after W0 + Δ was written
            values = self.delta_values.detach()
            # (version counter, storage): `p.data = new` and torch's vector_to_parameters swap the
            # storage and keep the counter, which alone let a stale merge run silently
            version = None if values.is_inference() else (values._version, values.data_ptr())
            self._merged_delta = values.clone()
            self._displaced = write_delta_(self.weight, self.delta_indices, self.delta_values)
            self._merged_entries = self.weight.detach().reshape(-1)[self.delta_indices.long()].clone()
            self._merged_version = version
            self._merge_write = EntryWrite.register("weight", self.weight, self.delta_indices)
            self._merged_weight = (self.weight,)
            _bump_version(self.weight)

    def _check_merge(self) -> None:
        """Raise what `merge` would raise, writing nothing (`hf.merge` checks every layer first)."""
        if self._displaced is None and not self.weight.is_contiguous():
            raise ValueError(f"merge: the base weight is not contiguous (strides {self.weight.stride()}), and merge() "
                             "writes Δ into its storage in place; make the weight contiguous before convert "
                             "(`linear.weight = nn.Parameter(linear.weight.detach().contiguous())`), or use "
                             "xlsparse.hf.merge_and_unload, which writes a new weight")

    def _check_unmerge(self) -> None:
        """Raise what `unmerge` would raise, writing nothing (`hf.unmerge` checks every layer first)."""
        if self._displaced is not None:
            # a later apply in place over the entries (even one that wrote the same bits) must be
            # reverted first: its revert would put W0 + Δ back into the restored base
            if self._merge_write is not None and self._merge_write.written_over():
                raise RuntimeError("unmerge: an xlsparse.apply made after merge() changed the merged entries and is "
                                   "still in place; revert it first (reverts go in reverse order)")
            if self._written_since_merge():
                raise RuntimeError("unmerge: the merged weight was changed at the delta's entries since merge() (an "
                                   "xlsparse.apply or a revert on the merged model?); restoring the base there would "
                                   "drop that change. Revert applies made after merge() before unmerge(), and apply "
                                   "diffs to an unmerged model")

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo `merge`: the saved base entries return."""
        if self._displaced is not None:
            self._check_unmerge()
            restore_entries_(self.weight, self.delta_indices, self._displaced)
            _bump_version(self.weight)
            self._displaced = None
            self._merged_entries = None
            self._merged_delta = None
            self._merged_weight = None
            if self._merge_write is not None:
                self._merge_write.release()
                self._merge_write = None

    def _merge_is_stale(self) -> bool:
        """True while merged when delta_values changed since merge(): the merged weight is W0 + an old Δ."""
        if not self.merged:
            return False
        now = self.delta_values.detach()
        # the version says nothing of a write through `delta_values.data` (it has its own counter),
        # so on the CPU the K values are compared every forward: 2·K·4 bytes against the O·I·4 of
        # the product (2% at 1%); on a GPU that read would be a host sync per layer, so an unchanged
        # version and storage are taken as an unchanged Δ there
        if now.device.type != "cpu" and not now.is_inference() \
                and (now._version, now.data_ptr()) == self._merged_version:
            return False
        return not bool(self._merge_current())

    def _merge_current(self) -> torch.Tensor:
        """A bool tensor, True while merged when delta_values holds the bits merge() wrote (a
        tensor, not a Python bool, so that a compiled graph can assert it)."""
        then, now = self._merged_delta, self.delta_values.detach()
        if then.dtype != now.dtype or then.shape != now.shape:
            return torch.zeros((), dtype=torch.bool, device=now.device)
        return (then.view(torch.uint8) == now.view(torch.uint8)).all()  # bits: a NaN Δ is current too

    def _written_since_merge(self) -> bool:
        """True while merged when something other than merge() (an xlsparse.apply, a revert) wrote
        the delta's entries of the merged weight since: the base there is then no longer known."""
        if not self.merged:
            return False
        now = self.weight.detach().reshape(-1)[self.delta_indices.long()]
        return not torch.equal(now.view(torch.uint8), self._merged_entries.view(torch.uint8))  # bits: NaN too

    def base_weight(self) -> torch.Tensor:
        """W0: the weight itself, or while merged a copy with the displaced base entries put back.
        RuntimeError while merged if the delta's entries were written since merge(): putting the
        displaced entries back would drop that write."""
        if not self.merged:
            return self.weight.detach()
        if self._written_since_merge():
            raise RuntimeError("SparseDeltaLinear: the merged weight was changed at the delta's entries since merge() "
                               "(an xlsparse.apply on the merged model?), so its base W0 is not known there; revert "
                               "that apply, or apply diffs to an unmerged model")
        base = self.weight.detach().clone()
        restore_entries_(base, self.delta_indices, self._displaced)
        return base

    def __getstate__(self):
        # deepcopy and pickle give delta_values a new tensor whose version counter starts afresh: the
        # old counter means nothing there, and the copy compares Δ with its `_merged_delta` instead
        state = super().__getstate__()
        state["_merged_version"] = None
        return state

    def _state_weight(self, saved):
        return self.base_weight() if self.merged else saved  # W0, not W0 + Δ: the delta is saved beside it

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        _check_delta_pairs(state_dict, prefix, [("delta_indices", "delta_values")], self.weight.numel())
        self.unmerge()  # the loaded W0 and Δ replace the merged ones; a weight not in the dict gets W0 back
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def set_support(self, indices: torch.Tensor, values: torch.Tensor | None = None) -> None:
        """Move the delta to a new support in place (dynamic sparse fine-tuning): `indices` are
        sorted unique flat indices, `values` the delta there (zeros when None). The module, the
        `delta_values` Parameter and the `delta_indices` buffer stay the same objects (an
        optimizer holding the Parameter keeps it; its per-entry state is the caller's to move);
        with an unchanged K even the storage is reused. Not allowed while merged."""
        if self._displaced is not None:
            raise RuntimeError("set_support: unmerge() first; the merged base would keep the old support")
        _set_support(self, indices, values)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nnz={self.delta_indices.numel()}"


_STALE_MERGE = ("SparseDeltaLinear: delta_values changed after merge(), so the merged weight is stale; unmerge() and "
                "merge() again")


def _routed(active: "routing.Routing", count: int, what: str) -> "routing.Routing":
    """The active routing, checked to have one id per delta, language or expert of the layer."""
    if active.num_ids != count:
        raise ValueError(f"route has {active.num_ids} ids but the layer has {count} {what}")
    return active


def _unrouted(layer: nn.Module, output_uses_ids: bool = True) -> None:
    """A routed layer run with no routing. One whose output depends on the ids (a delta per language
    or expert) would run as the base: in eval mode that was a silent wrong result (a Trainer whose
    collator dropped `language_ids` reported the base's loss as the languages'), so it raises in
    either mode, and the base must be asked for. A SubnetworkLinear's output is the same for every
    language: it raises in training mode only, where it would train nothing. A checkpoint's
    recomputation without the routing of its forward would give wrong gradients silently: an
    error in either mode."""
    how = ("wrap the forward in `with xlsparse.hf.route(model, language_ids):` or put `language_ids` in the batch "
           "(`model(**batch)`)")
    if routing.unrouted_recomputation():
        raise RuntimeError(
            f"{type(layer).__name__} is recomputed by gradient checkpointing without the routing of its forward (the "
            "backward runs after the route has ended): pass use_reentrant=False and "
            "context_fn=xlsparse.routing.checkpoint_context to torch's checkpoint (an HF model takes them as "
            "TrainingArguments(gradient_checkpointing_kwargs={...}) or "
            "model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={...})), or run the backward inside "
            "`with xlsparse.hf.route(model, language_ids):`")
    if layer.training or output_uses_ids:
        problem = "is in training mode but" if layer.training else "would run as the base model, since"
        other = ("for the base model, route ids of -1 (`xlsparse.hf.route(model, [-1] * batch_size)`) or run it under "
                 "`with xlsparse.hf.disable(model):`" if output_uses_ids else
                 "or call model.eval() for inference (its output is the same for every language)")
        raise RuntimeError(f"{type(layer).__name__} {problem} no language routing is active: {how}; {other}")


class MultiDeltaLinear(ConvertedLayer, nn.Module):
    """y_t = x_t W0ᵀ + b + Σ_e g_{t,e} x_t Δ_eᵀ: one frozen base (W0 and b) and one sparse delta per
    language or expert (trainable `delta_values`, buffers `delta_indices_<i>`), in the insertion
    order of the `deltas` dict given to `from_linear` (`names`).

    `forward(x, route=None, gates=None)`: hard `route` ids (−1 = base only) or a TokenGroups, or
    soft `gates` [..., E]; with neither, the routing set by `xlsparse.routing.use` /
    `xlsparse.hf.route` is used (grouped once per batch and shared by every layer). With no
    routing at all it raises, in eval mode too (it would run the base for every language); ids
    of −1 ask for the base.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, indices: list, values: list, names: list):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.names = list(names)
        self.weight = nn.Parameter(weight.detach(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        for i, idx in enumerate(indices):
            # its own copy: load_state_dict writes buffers in place, which must not reach the caller's
            # diff (nor another model converted from the same diff)
            self.register_buffer(f"delta_indices_{i}", idx.clone())
        self.delta_values = nn.ParameterList(
            [nn.Parameter(v.detach().to(weight.dtype).clone()) for v in values])
        self.disabled = False  # True: the base layer alone (xlsparse.hf.disable)
        self.transposed = False  # True: replaces a GPT-2 Conv1D, whose weight is stored [in, out]

    @classmethod
    def from_linear(cls, linear: nn.Linear, deltas: dict) -> "MultiDeltaLinear":
        """Wrap `linear` with `deltas` = {name: delta}; a delta is any object with `.indices`,
        `.values` and `.shape` (e.g. `xlsparse.SparseDelta`) matching the weight."""
        _plain_linear("MultiDeltaLinear", linear)
        w = linear.weight
        routing.check_language_keys("MultiDeltaLinear", deltas)
        indices, values = [], []
        for name, d in deltas.items():
            if isinstance(d, torch.Tensor):  # its .indices and .values are methods: it failed with an AttributeError
                raise TypeError(f"MultiDeltaLinear: delta {name!r} is a dense tensor; give a SparseDelta "
                                "(xlsparse.SparseDelta.from_dense(t))")
            if tuple(d.shape) != tuple(w.shape):
                raise ValueError(f"MultiDeltaLinear: delta {name!r} has shape {tuple(d.shape)}, the weight {tuple(w.shape)}")
            idx = _support(w, indices=d.indices.to(w.device))
            _one_value_each(f"MultiDeltaLinear: delta {name!r}", idx, d.values)
            indices.append(idx)
            values.append(d.values.to(w.device))
        return cls(w, linear.bias, indices, values, list(deltas))

    @property
    def delta_indices(self) -> list[torch.Tensor]:
        """Each delta's flat indices, in the order of `names`."""
        return [getattr(self, f"delta_indices_{i}") for i in range(len(self.names))]

    def forward(self, x: torch.Tensor, route=None, gates=None) -> torch.Tensor:
        if self.disabled:
            return nn.functional.linear(x, self.weight, self.bias)
        if route is None and gates is None:
            active = routing.current(self)
            if active is not None:
                route = _routed(active, len(self.names), "deltas").tokens(x.shape[:-1], x.device)
            else:
                _unrouted(self)
        return functional.multi_delta_linear(x, self.weight, self.bias, self.delta_indices, list(self.delta_values),
                                             route=route, gates=gates)

    # The state dict holds the languages in id order (utf-8 JSON as uint8): the deltas are stored
    # by id, so a model converted with the languages in another order loaded each language's delta
    # under another's id, silently (a Trainer resume). A state dict without it (older) loads unchecked.
    _NAMES_KEY = "language_names"

    @property
    def language_names(self) -> torch.Tensor:
        """The state dict's `language_names` entry. An attribute too: torch.distributed.checkpoint's
        `get_model_state_dict` looks every state dict key up on its module (it raised AttributeError)."""
        return torch.tensor(list(json.dumps([str(n) for n in self.names]).encode()), dtype=torch.uint8)

    @language_names.setter
    def language_names(self, saved: torch.Tensor) -> None:
        # torch.func.functional_call(model, state_dict) sets every key of a state dict (it raised
        # AttributeError here): the deltas it swaps in must be for the languages in this order
        self._check_state_names({self._NAMES_KEY: saved}, what="functional_call")

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + self._NAMES_KEY] = self.language_names

    def _check_state_names(self, state_dict, prefix: str = "", what: str = "load_state_dict") -> None:
        """ValueError when `state_dict` holds this layer's deltas (at `prefix`) for the languages in
        another order; a state dict without the names (older) passes."""
        key = prefix + self._NAMES_KEY
        if key in state_dict:
            saved = json.loads(bytes(state_dict[key].cpu().tolist()).decode())
            if saved != [str(n) for n in self.names]:
                raise ValueError(f"{what}: the state dict holds {prefix[:-1] or 'the layer'}'s deltas of languages "
                                 f"{saved} (in id order), this layer's are {[str(n) for n in self.names]}: convert the "
                                 "model with the languages in the saved order")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + self._NAMES_KEY
        self._check_state_names(state_dict, prefix)
        _check_delta_pairs(state_dict, prefix, [(f"delta_indices_{i}", f"delta_values.{i}")
                                                    for i in range(len(self.names))], self.weight.numel())
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if key in unexpected_keys:
            unexpected_keys.remove(key)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, deltas={self.names}"


class _SubnetworkLinearFn(torch.autograd.Function):
    """y = x Wᵀ + b; dW = Σ_l M_l ⊙ (dY_lᵀ X_l) through multi_mask_weight_grad, one pass."""

    @staticmethod
    def forward(x, weight, bias, masks, bias_masks, ids, order, offsets):
        return F.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, masks, bias_masks, ids, order, offsets = inputs
        ctx.has_bias_masks = bias_masks is not None
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight if ctx.needs_input_grad[0] else None,
                              masks, bias_masks, ids, order, offsets)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, masks, bias_masks, ids, order, offsets = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0] and torch.is_grad_enabled() and weight.requires_grad:
            # create_graph (a gradient penalty on dX, second-order MAML): dX = dY W carries a gradient
            # into W too, which as a plain product reached every entry, outside every mask and from the
            # −1 tokens; this function on Wᵀ masks it per language as the first-order dW
            grad_x = _SubnetworkLinearFn.apply(grad_y, weight.t(), None, masks.transpose(1, 2), None, ids, order,
                                               offsets)
        elif ctx.needs_input_grad[0]:
            grad_x = grad_y @ weight
        if ctx.needs_input_grad[1]:
            grad_w = optim_ops.multi_mask_weight_grad(grad_y, x, masks, order, offsets)
        if ctx.needs_input_grad[2]:
            # per-language sums of grad_y; row 0 collects the id −1 tokens and is dropped. Summed in
            # float32 for half types, as nn.Linear's dy.sum(0): CUDA's index_add_ adds each token by an
            # atomic in the buffer's dtype, and a bf16 sum of 4096 ones stops at 256 (256 + 1 rounds to 256).
            acc = acc_dtype(grad_y.dtype)
            per_lang = grad_y.new_zeros(masks.shape[0] + 1, grad_y.shape[1], dtype=acc).index_add_(
                0, ids + 1, grad_y.to(acc))[1:]
            grad_b = ((per_lang * bias_masks).sum(0) if ctx.has_bias_masks else per_lang.sum(0)).to(grad_y.dtype)
        return grad_x, grad_w, grad_b, None, None, None, None, None


class _NoUnroutedGrad(torch.autograd.Function):
    """Identity on a SubnetworkLinear's weight or bias in a forward with no routing (eval mode): a
    backward that reaches it raises. Every token's id is −1 there, so the parameter's gradient was
    all zeros, silently (`loss.backward()` in eval mode trained nothing). The autograd engine runs
    this only when the parameter's gradient is asked for: `autograd.grad(y, x)` still works."""

    @staticmethod
    def forward(t):
        return t

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("SubnetworkLinear ran in eval mode with no language routing, so no language owns its "
                           "tokens and its weight's gradient would be all zeros: wrap the forward and backward in "
                           "`with xlsparse.hf.route(model, language_ids):` or put `language_ids` in the batch (ids "
                           "of -1 for no update), or set requires_grad_(False) on the weights")


_KEEP_BIAS_MASKS = object()  # set_masks without bias_masks: keep the layer's own


class SubnetworkLinear(ConvertedLayer, torch.nn.Linear):
    """nn.Linear whose weight trains a different subnetwork for each language of a mixed batch.

    The forward pass is the dense linear. In the backward pass token t of language l adds its
    gradient only where `masks[l]` is True: dW = Σ_l M_l ⊙ (dY_lᵀ X_l), computed by one fused op
    with no dense gradient per language (`xlsparse.ops.optim.multi_mask_weight_grad`).

    Language ids index `masks` in its insertion order; −1 means "no update": such tokens add
    nothing to the weight or bias gradient. With no routing at all an eval-mode layer's output is
    a plain linear's (a backward into its weight or bias raises: it would train nothing), and a
    training-mode layer raises (it would train nothing). The ids come from the `language_ids`
    argument (per example [B], per token [B, S], or [T] for an input of flat [T] tokens) or else
    from the routing set by `xlsparse.hf.route` / `xlsparse.routing.use`, grouped once per batch.

    Bias: with `bias_masks` ({language: bool [out_features]}) the bias gradient is masked per
    language too; without it the bias is shared, and its gradient is the sum over routed tokens
    (id ≠ −1). dX is the ordinary dense gradient.

    `unmasked = True` makes the layer a plain nn.Linear, routed or not: dW = dYᵀX over every
    token, no mask. Importance scoring sets it, because a subnetwork's next masks are chosen by
    the true ∂L/∂W, which is nonzero outside its current mask.
    """

    def __init__(self, in_features: int, out_features: int, masks: dict[str, torch.Tensor], bias: bool = True,
                 bias_masks: dict[str, torch.Tensor] | None = None, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.set_masks(masks, bias_masks)
        self.transposed = False  # True: replaces a GPT-2 Conv1D, whose weight is stored [in, out]
        self.unmasked = False

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, masks: dict[str, torch.Tensor],
                    bias_masks: dict[str, torch.Tensor] | None = None) -> "SubnetworkLinear":
        """Wrap `linear`, sharing its weight and bias Parameters (optimizers that hold them still work)."""
        _plain_linear("SubnetworkLinear", linear)
        layer = cls.__new__(cls)
        torch.nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer.weight = linear.weight
        layer.bias = linear.bias
        layer.set_masks(masks, bias_masks)
        layer.transposed = False
        layer.unmasked = False
        return layer

    def set_masks(self, masks: dict[str, torch.Tensor], bias_masks=_KEEP_BIAS_MASKS) -> None:
        """Replace the per-language masks ({language: bool [out, in]}, ids in insertion order);
        dynamic re-selection calls this between steps.

        `bias_masks`: {language: bool [out_features]} masks the bias gradient per language, None
        makes the bias shared. Not given, the layer keeps what it has: a shared bias stays shared,
        and per-language bias masks stay when `masks` names the same languages in the same order;
        for other languages they must be given (or None), else ValueError (dropping them silently
        turned the bias into one that every language trains)."""
        if not isinstance(masks, dict) or not masks:
            raise ValueError("masks must be a non-empty dict {language: bool tensor [out_features, in_features]}")
        routing.check_language_keys("SubnetworkLinear", masks)
        if bias_masks is _KEEP_BIAS_MASKS:
            kept = getattr(self, "bias_masks", None)
            if kept is not None and list(masks) != self.languages:
                raise ValueError(f"set_masks: the layer has per-language bias_masks for {self.languages}, and masks "
                                 f"names {list(masks)}: pass bias_masks for these languages, or bias_masks=None for "
                                 "a bias shared by every language")
            bias_masks = None if kept is None else dict(zip(self.languages, kept.unbind(0)))
        shape = (self.out_features, self.in_features)
        for lang, m in masks.items():
            if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
                raise TypeError(f"masks[{lang!r}] must be a bool tensor")
            if tuple(m.shape) != shape:
                raise ValueError(f"masks[{lang!r}] has shape {tuple(m.shape)}, the weight has {shape}")
        if bias_masks is not None:  # checked before anything changes: a call that raises leaves the old masks
            if self.bias is None:
                raise ValueError("bias_masks given for a layer without bias")
            if set(bias_masks) != set(masks):
                raise ValueError("bias_masks must name the same languages as masks")
            for lang, m in bias_masks.items():
                if not isinstance(m, torch.Tensor) or m.dtype != torch.bool or tuple(m.shape) != (self.out_features,):
                    raise ValueError(f"bias_masks[{lang!r}] must be a bool tensor of shape ({self.out_features},)")
        device = self.weight.device
        stacked = torch.stack([masks[k] for k in masks]).to(device)
        before = getattr(self, "masks", None)
        if before is not None and not torch.equal(before.any(0), stacked.any(0)):
            LAYER_MASK_CHANGES[self.weight] = LAYER_MASK_CHANGES.get(self.weight, 0) + 1
        self.languages = list(masks)
        self.register_buffer("masks", stacked, persistent=False)
        self._register_weight()
        # a buffer either way (None: a shared bias), so that a later call with bias_masks can set it
        stacked = None if bias_masks is None else torch.stack([bias_masks[k] for k in self.languages]).to(device)
        self.register_buffer("bias_masks", stacked, persistent=False)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        # load_state_dict(assign=True) made the state dict's tensor the weight: an optimizer's load
        # finds this layer by it, and missed it until the next set_masks
        self._register_weight()

    def __setstate__(self, state):
        super().__setstate__(state)
        # copy.deepcopy and pickle give the copy a new weight tensor, unknown to an optimizer's load
        # check until the copy's next set_masks
        if getattr(self, "masks", None) is not None:
            self._register_weight()

    def _register_weight(self) -> None:
        """Let a masked optimizer's load find this layer by its weight (SUBNETWORK_LAYERS)."""
        SUBNETWORK_LAYERS[self.weight] = weakref.ref(self)

    def trainable_mask(self) -> torch.Tensor:
        """The entries some language may update: the union of the masks [out, in]."""
        return self.masks.any(0)

    def _groups(self, lead_shape, language_ids: torch.Tensor | None):
        """(ids [T], order, offsets, routed): the batch's tokens grouped by language; routed is
        False when no routing was given (every id −1)."""
        num_ids = len(self.languages)
        if language_ids is not None:
            # a list or a numpy array too, as `route=` and routing.use take them (`.to` raised AttributeError)
            ids = torch.as_tensor(language_ids, device=self.weight.device)
            groups = routing.Routing(ids, num_ids).tokens(lead_shape)
        elif routing.current(self) is not None:
            groups = _routed(routing.current(self), num_ids, "languages").tokens(lead_shape, self.weight.device)
        else:
            _unrouted(self, output_uses_ids=False)
            groups = routing.TokenGroups.build(torch.full((math.prod(lead_shape),), -1, device=self.weight.device), num_ids)
            return groups.ids, groups.order, groups.offsets, False
        return groups.ids, groups.order, groups.offsets, True

    def forward(self, x: torch.Tensor, language_ids: torch.Tensor | None = None) -> torch.Tensor:
        if self.unmasked:
            return F.linear(x, self.weight, self.bias)
        lead = x.shape[:-1]
        ids, order, offsets, routed = self._groups(lead, language_ids)
        x2, weight, bias = x.reshape(lead.numel(), self.in_features), self.weight, self.bias
        if not routed and torch.is_grad_enabled():  # eval mode, no ids: a backward into them would train nothing
            weight = _NoUnroutedGrad.apply(weight) if weight.requires_grad else weight
            bias = _NoUnroutedGrad.apply(bias) if bias is not None and bias.requires_grad else bias
        dtype = functional.autocast_dtype(x)
        if dtype is not None:
            x2, weight, bias = functional.cast_for_autocast(dtype, x2, weight, bias)
        with torch.autocast(x.device.type, enabled=False) if dtype is not None else contextlib.nullcontext():
            y = _SubnetworkLinearFn.apply(x2, weight, bias, self.masks, self.bias_masks, ids, order, offsets)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, languages={self.languages}"


class SparseDeltaEmbedding(_DeltaView, nn.Module):
    """An `nn.Embedding` whose table is a frozen base W0 [V, H] plus a sparse delta: flat
    row-major `delta_indices` [K] (a buffer) and trainable `delta_values` [K] (zero at creation).

    out[t] = W0[ids[t]] + Δ[ids[t]]. The forward looks up, for each token, the delta entries of
    its row (a binary search into the sorted indices) and adds them, so the backward is a
    gather of dOut into a [K] gradient: only the batch's token rows are touched and no [V, H]
    gradient exists. Tokens equal to `padding_idx` get the delta in the forward but pass no
    gradient, as nn.Embedding does. `max_norm`, `scale_grad_by_freq` and `sparse` are not
    supported, nor subclasses with a forward of their own (scaled embeddings): from_embedding raises.
    """

    def __init__(self, weight: torch.Tensor, indices: torch.Tensor, padding_idx: int | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight.shape
        if padding_idx is not None and not -self.num_embeddings <= padding_idx < self.num_embeddings:
            raise ValueError(f"SparseDeltaEmbedding: padding_idx {padding_idx} is out of range for "
                             f"{self.num_embeddings} rows")
        # a negative padding_idx counts from the end, as nn.Embedding's: compared as given, no token
        # matched it and the padding row's entries trained
        self.padding_idx = None if padding_idx is None else padding_idx % self.num_embeddings
        self.weight = nn.Parameter(weight.detach(), requires_grad=False)
        # checked as from_embedding, set_support and load_state_dict check them: the lookup is a binary
        # search, and unsorted, repeated or out-of-range indices put values on other entries or none, silently
        indices = _support(weight, indices=indices, what="SparseDeltaEmbedding")
        self.register_buffer("delta_indices", indices.clone())  # its own: set_support writes it in place
        self.delta_values = nn.Parameter(torch.zeros(indices.numel(), dtype=weight.dtype, device=weight.device))

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, k=None, density=None, indices=None) -> "SparseDeltaEmbedding":
        """Wrap `embedding` (its weight becomes the frozen base, sharing storage); the support is
        `k` / `density` random entries or `indices` (flat indices or a bool mask of the table)."""
        # max_norm=0.0 renormalises too (to zero rows): tested for None, not for truth
        if getattr(embedding, "max_norm", None) is not None:
            raise ValueError("SparseDeltaEmbedding: nn.Embedding.max_norm is not supported")
        for option in ("scale_grad_by_freq", "sparse"):
            if getattr(embedding, option, None):
                raise ValueError(f"SparseDeltaEmbedding: nn.Embedding.{option} is not supported")
        if type(embedding).forward is not nn.Embedding.forward:
            # a subclass computing more than the lookup (XGLM's, BART's, Gemma's scaled word
            # embeddings multiply by embed_scale): the converted layer would drop that silently
            raise TypeError(f"SparseDeltaEmbedding.from_embedding: {type(embedding).__name__} has a forward of its own "
                            "(a scaled embedding?); only a plain nn.Embedding lookup can be converted")
        support = _support(embedding.weight, k, density, indices, "from_embedding")
        return cls(embedding.weight, support, embedding.padding_idx)

    def _entries(self, ids: torch.Tensor):
        """(token position, column, entry number) of every delta entry in the batch's rows."""
        width = self.embedding_dim
        idx = self.delta_indices.long()
        ids = ids.long()  # int32 ids times the width wrap past 2**31 entries (the rows' deltas were dropped)
        start = torch.searchsorted(idx, ids * width)
        count = torch.searchsorted(idx, (ids + 1) * width) - start
        token = torch.repeat_interleave(torch.arange(ids.numel(), device=ids.device), count)
        # entry number: the token's first entry plus the offset inside its run
        offset = torch.arange(token.numel(), device=ids.device) - (count.cumsum(0) - count)[token]
        entry = start[token] + offset
        return token, idx[entry] % width, entry

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.delta_values.dtype != self.weight.dtype:
            # as sparse_delta_linear refuses it (index_put raised "Index put requires the source and
            # destination dtypes match"): an fp32 delta over a bf16 base (a load with assign=True)
            raise TypeError(f"SparseDeltaEmbedding: delta_values dtype {self.delta_values.dtype} does not match weight "
                            f"dtype {self.weight.dtype}; cast the layer with .to(dtype)")
        ids = input_ids.reshape(-1)
        out = F.embedding(ids, self.weight, self.padding_idx)  # a base made trainable: no padding-row gradient
        token, column, entry = self._entries(ids)
        # Gathered from a float32 copy for half types: the gather's backward sums the gradient of an
        # entry over every occurrence of its token, and on the CPU it adds them one at a time in the
        # values' dtype (a token seen 4096 times with dOut = 1 got 256 in bf16, where 256 + 1 rounds
        # to 256; nn.Embedding's CPU backward does the same). The copy is K values, once per forward.
        values = self.delta_values.to(acc_dtype(self.delta_values.dtype))[entry].to(self.delta_values.dtype)
        if self.padding_idx is not None:
            values = torch.where(ids[token] == self.padding_idx, values.detach(), values)
        out = out.index_put((token, column), values, accumulate=True)
        return out.reshape(*input_ids.shape, self.embedding_dim)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        _check_delta_pairs(state_dict, prefix, [("delta_indices", "delta_values")], self.weight.numel())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def set_support(self, indices: torch.Tensor, values: torch.Tensor | None = None) -> None:
        """As `SparseDeltaLinear.set_support`: a new support, same module and Parameter."""
        _set_support(self, indices, values)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, nnz={self.delta_indices.numel()}"


class ExpertEmbedding(nn.Module):
    """An input embedding with one delta per expert, routed per token by the active
    `xlsparse.hf.route` ids (−1: the base only; no routing: an error, in eval mode too). Each
    delta is a dense [V, H] tensor, a SparseDelta of the weight, or None (the input embedding of
    `xlsparse.hf.xelm.ExpertEnsemble`). A token adds only its own row
    of its expert's delta: sparse deltas are read through row pointers, never densified. A base
    module that scales its output (`embed_scale`: XGLM, Gemma, mBART) scales the added rows alike, so a
    token's embedding is (W0 + Δ_e)[id] · scale, as with the expert applied to the weight. A base
    with `max_norm` is refused: it would renormalise the base row, not the expert's."""

    def __init__(self, embedding: nn.Embedding, deltas: Sequence):
        super().__init__()
        if getattr(embedding, "max_norm", None) is not None:
            # the base lookup renormalises (in place) the base row W0[id], not the expert's (W0 + Δ_e)[id]
            raise ValueError(f"ExpertEmbedding: the base embedding has max_norm = {embedding.max_norm}, which would "
                             "renormalise the base rows only, not each expert's rows; set its max_norm to None")
        self.base = embedding
        self.num_experts = len(deltas)
        self.disabled = False  # True: the base embedding alone (xlsparse.hf.disable)
        v, h = embedding.weight.shape
        self._kinds = []
        for e, d in enumerate(deltas):
            if d is None:
                self._kinds.append("none")
            elif isinstance(d, torch.Tensor):
                if tuple(d.shape) != (v, h):
                    raise ValueError(f"ExpertEmbedding: dense delta {e} has shape {tuple(d.shape)}, the weight {(v, h)}")
                self.register_buffer(f"dense_{e}", d.to(embedding.weight), persistent=False)
                self._kinds.append("dense")
            else:
                if tuple(d.shape) != (v, h):
                    raise ValueError(f"ExpertEmbedding: delta {e} has shape {tuple(d.shape)}, the weight {(v, h)}")
                what = f"ExpertEmbedding: delta {e}"
                idx = _support(embedding.weight, indices=d.indices.to(embedding.weight.device), what=what).long()
                _one_value_each(what, idx, d.values)
                rows = torch.arange(v + 1, device=idx.device) * h
                self.register_buffer(f"row_ptr_{e}", torch.searchsorted(idx, rows), persistent=False)
                self.register_buffer(f"cols_{e}", idx % h, persistent=False)
                self.register_buffer(f"values_{e}", d.values.to(embedding.weight), persistent=False)
                self._kinds.append("sparse")

    @property
    def weight(self) -> torch.Tensor:
        """The shared base embedding matrix (what a tied output layer reads)."""
        return self.base.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.base(input_ids)
        if self.disabled:
            return out
        active = routing.current(self)
        if active is None:
            _unrouted(self)
            return out
        flat = input_ids.reshape(-1)
        ids = _routed(active, self.num_experts, "experts").tokens(input_ids.shape, flat.device).ids
        add = torch.zeros(flat.numel(), out.shape[-1], dtype=out.dtype, device=out.device)
        for e, kind in enumerate(self._kinds):
            tokens = (ids == e).nonzero().squeeze(1)
            if kind == "none" or not tokens.numel():
                continue
            rows = flat[tokens]
            if kind == "dense":
                add[tokens] += getattr(self, f"dense_{e}")[rows]
                continue
            ptr = getattr(self, f"row_ptr_{e}")
            start, count = ptr[rows], ptr[rows + 1] - ptr[rows]
            first = torch.cumsum(count, 0) - count  # where each token's run starts in the gathered list
            at = torch.arange(int(count.sum()), device=flat.device) - first.repeat_interleave(count)
            at = at + start.repeat_interleave(count)
            add.index_put_((tokens.repeat_interleave(count), getattr(self, f"cols_{e}")[at]),
                           getattr(self, f"values_{e}")[at], accumulate=True)
        return out + add.view_as(out) * getattr(self.base, "embed_scale", 1.0)


@torch.no_grad()
def _set_support(layer: nn.Module, indices: torch.Tensor, values: torch.Tensor | None) -> None:
    """Give `layer` (delta_indices buffer, delta_values Parameter, weight) a new support in place."""
    indices = _support(layer.weight, indices=indices.to(layer.weight.device), what="set_support")
    if values is None:
        values = torch.zeros(indices.numel(), dtype=layer.delta_values.dtype, device=layer.weight.device)
    _one_value_each("set_support", indices, values)
    values = values.to(layer.delta_values)
    if indices.numel() == layer.delta_indices.numel() and indices.dtype == layer.delta_indices.dtype:
        layer.delta_indices.copy_(indices)
        layer.delta_values.copy_(values)
    else:  # a new K: new storage, same Parameter object
        layer.delta_indices = indices.clone()
        # set_, not `.data =`: that kept the Parameter's gradient accumulator, whose old [K] shape the
        # last step's graph (a `loss` still referenced) holds alive, and the next backward raised
        layer.delta_values.set_(values.clone())
    layer.delta_values.grad = None
