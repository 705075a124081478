"""Optimizers that train only a subnetwork: `MaskedAdamW` and `MaskedSGD`.

Masks (the `masks` argument and `update_masks`): either a list aligned with the parameters of all
param groups in order, or a dict keyed by the parameter object (parameters missing from the dict
train fully). The parameters of a group added later with `add_param_group` train fully until
`update_masks` says otherwise. Each entry is one of
- `None`: every entry trains (use it for a parameter that is itself the trainable K-vector, such
  as the values of `SparseDeltaLinear`);
- a bool tensor of the parameter's shape: True marks a trainable entry;
- a 1-D int32/int64 tensor of sorted, unique flat (row-major) indices of the trainable entries.

`mode="dense"` keeps the mask as a bool tensor and state (exp_avg, exp_avg_sq) as large as the
parameter; one fused pass over each parameter updates the masked entries. `mode="compact"` keeps
sorted indices and state of size K: a step reads the gradient at K positions and writes K entries.
Either way an entry outside the mask is never written: the parameter and its state stay
bit-identical however many steps run, whatever the gradient holds there (NaN included).

On the selected entries the math is torch.optim.AdamW's / torch.optim.SGD's. A NaN or Inf gradient
on a selected entry propagates into that entry's parameter and state exactly as in torch; use
`torch.amp.GradScaler` (this optimizer takes `grad_scale`/`found_inf` like torch's fused AdamW:
the step is skipped inside the kernel when an inf was found) to skip such steps.

Group keys of torch's optimizers that would change that math, `maximize=True` and torch.optim.Adam's
L2 weight decay (`decoupled_weight_decay=False` with a weight decay), raise ValueError wherever a
group comes in: the constructor's groups, `add_param_group` and `load_state_dict`.

DTensor parameters (FSDP2's `fully_shard`): masks are given for the whole parameter; each process
keeps the part of the mask, and the state, that its shard holds, and steps its shard only.
"""
import math
import numbers
import warnings
import weakref
from collections.abc import Iterable
from itertools import chain

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .diff import _is_dtensor, index_dtype
from .ops import checks
from .ops import optim as optim_ops

_MODES = ("dense", "compact")
# How many times the trainable entries of each SubnetworkLinear weight changed (its set_masks
# counts them). A masked optimizer over such a weight keeps the count it was masked at and refuses
# to step once it moved: it would train the old entries, not the layer's (hf.subnetworks.set_masks
# without optimizer=), silently. Keyed by identity: a tensor's == is elementwise.
LAYER_MASK_CHANGES: WeakIdKeyDictionary = WeakIdKeyDictionary()
# The SubnetworkLinear of each such weight (a weak reference; its set_masks registers it): a state
# that `load_state_dict` brings in must mask the entries the layer trains. The layers' masks are not
# in a model's state dict, so a run resumed without them stepped the entries of the saved masks
# while the layers masked the gradients by others, silently.
SUBNETWORK_LAYERS: WeakIdKeyDictionary = WeakIdKeyDictionary()
_SELECTOR_KEYS = ("mask", "indices")  # state keys torch's loader must not cast to the param's dtype


class _MaskedOptimizer(torch.optim.Optimizer):
    """What MaskedAdamW and MaskedSGD share: masks, update_masks, state_dict, kernel grouping."""

    # Every per-entry state tensor this optimizer may keep (a group's values may call for fewer now,
    # `_state_keys`); a mask update moves each one there is, zeroed for the entries it adds.
    _STATE_KEYS: tuple[str, ...] = ()
    _step_supports_amp_scaling = True  # GradScaler passes grad_scale / found_inf as attributes

    def __init__(self, params, masks, defaults: dict, mode: str):
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        self.mode = mode
        self._masked_at = {}  # {param: its LAYER_MASK_CHANGES count when it was masked}
        self._built = False  # torch's __init__ adds the groups; their state waits for the masks
        self._stepped_any = False  # until a step updates something, a step with no gradient at all warns
        super().__init__(params, defaults)
        selectors = self._parse_masks(masks)
        for group in self.param_groups:
            for p in group["params"]:
                self._init_state(group, p, selectors[p])
        self._built = True

    def __getstate__(self) -> dict:
        """torch's (defaults, state, param groups) and this optimizer's own attributes: a deep copy
        or pickle kept only torch's, and lost its mode and the layer-mask counts `step` checks."""
        return {**super().__getstate__(), "mode": self.mode, "_masked_at": self._masked_at, "_built": self._built,
                "_stepped_any": self._stepped_any}

    def add_param_group(self, param_group: dict) -> None:
        """torch's add_param_group. Every entry of the params of a group added after construction
        trains (their mask is None; `update_masks` can narrow it), from zero state."""
        self._check_group({**self.defaults, **param_group})
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if not all(_local(p).is_contiguous() for p in group["params"]):
            self.param_groups.pop()  # leave the optimizer as it was
            raise ValueError("masked optimizers need contiguous parameters")
        if len({id(p) for p in group["params"]}) != len(group["params"]):  # torch only warns; one mask each
            self.param_groups.pop()
            raise ValueError("params: a parameter appears twice in one group; give each parameter once")
        if self._built:
            for p in group["params"]:
                self._init_state(group, p, None)

    def _check_group(self, group: dict) -> None:
        """Refuse torch's group keys that change the math the kernels run: a group dict and a loaded
        state keep any key, and the step would silently ignore it."""
        if group.get("maximize"):
            raise ValueError(f"{type(self).__name__} does not support maximize=True; negate the loss instead")
        # torch's implementation switches: the constructor takes none of them, but a group dict kept
        # them and the step ignored them (differentiable=True: the step is never differentiable)
        for key in ("differentiable", "fused", "capturable"):
            if group.get(key):
                raise ValueError(f"{type(self).__name__}: a param group has {key}=True, which it does not support "
                                 "(its steps are fused kernels, never differentiable)")
        for key in ("mask", "masks", "indices"):  # kept in the group and never read: the params trained whole
            if key in group:
                raise ValueError(f"{type(self).__name__}: a param group has a {key!r} key, which is not read; give masks "
                                 "as the `masks` argument (or to update_masks: the params of a group added later "
                                 "train whole until then)")
        if "mode" in group and group["mode"] != self.mode:  # the mode is the optimizer's: a group's would be ignored
            raise ValueError(f"{type(self).__name__}: a param group has mode={group['mode']!r}, but the mode is set for "
                             f"the whole optimizer (mode={self.mode!r}); use one optimizer per mode")

    @torch.no_grad()
    def step(self, closure=None):
        """One step of the masked entries (one fused kernel call per device and dtype). Returns
        the closure's loss, if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Every group is checked before any steps, so that a refusal writes nothing: a scheduler or
        # user may have set a group's values since construction.
        casts = []
        for g, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                if not self.state.get(p):  # its mask is lost: it stopped with KeyError 'step'
                    raise ValueError(f"{type(self).__name__}: param {i} of param group {g} is not a parameter this "
                                     "optimizer was built with (accelerate's FSDP2 prepare swaps the model's parameters "
                                     "for sharded ones in the optimizer's groups); build the optimizer on the sharded "
                                     "model (fully_shard first), with masks for the whole parameters")
                if p.grad is not None and p.grad.is_sparse:  # refused here, not after the groups before it stepped
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients (param {i} of param "
                                       f"group {g}); nothing was stepped")
                # contiguous at construction, strided since: the kernel refused it after the groups before it stepped
                if p.grad is not None and not _local(p).is_contiguous():
                    raise ValueError(f"{type(self).__name__}: param {i} of param group {g} is not contiguous (a model "
                                     "converted to channels_last after this optimizer was built?); masked optimizers "
                                     "need contiguous parameters; nothing was stepped")
            self._check_group(group)
            self._check_state(group)
            casts += self._casts(g, group)
        if LAYER_MASK_CHANGES:  # empty unless a SubnetworkLinear exists
            moved = [i for i, p in enumerate(self._all_params()) if LAYER_MASK_CHANGES.get(p, 0) != self._masked_at[p]]
            if moved:
                raise ValueError(f"{type(self).__name__}.step: the trainable entries of the SubnetworkLinear weights "
                                 f"{moved} (positions in the param groups) changed after this optimizer was masked, "
                                 "so it would step the old ones; pass optimizer= to hf.subnetworks.set_masks (or "
                                 "call update_masks with the layers' trainable_mask()); nothing was stepped")
        if not getattr(self, "_stepped_any", False) and not any(p.grad is not None for p in self._all_params()):
            # torch's optimizers skip such a step in silence; the usual cause is worth a word
            warnings.warn(f"{type(self).__name__}.step: no parameter has a gradient, so nothing was updated. If the "
                          "model was wrapped by fully_shard after this optimizer was built, the optimizer holds the "
                          "replaced parameters and will never step: build it after fully_shard", stacklevel=2)
        for state, key, dtype in casts:
            state[key] = state[key].to(dtype)
        for group in self.param_groups:
            for (device, _), params in self._groups_for_kernel(group):
                self._stepped_any = True
                self._update(group, params, device)
        return loss

    def _update(self, group: dict, params: list, device: torch.device) -> None:
        """Run this optimizer's kernel on `params` (one device and dtype) of `group`."""
        raise NotImplementedError

    def _check_state(self, group: dict) -> None:
        """Refuse a group whose values now need state that was not made at construction."""

    def _casts(self, g: int, group: dict) -> list:
        """The (state, key, dtype) casts that the stepping params of `group` need, made by step()
        once every group is checked. State made before `model.to(torch.bfloat16)` and never stepped
        is zeros and the value at construction: it is cast (torch's optimizers make their state at
        the first step, in the param's dtype, so a cast between construction and the first step
        trains there). A param cast after it stepped is refused: its moments would have to be
        rounded, and torch's step raises there too."""
        keys = (*self._state_keys(group), "init")
        casts = []
        for i, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            state = self.state[p]
            cast = [k for k in keys if k in state and state[k].dtype != p.dtype]
            if cast and bool(state["step"].any()):
                raise ValueError(f"{type(self).__name__}: param {i} of param group {g} is {p.dtype}, but its optimizer "
                                 f"state {cast[0]!r} is {state[cast[0]].dtype}: the parameter was cast after it stepped. "
                                 "Cast the model before building the optimizer, or build one on the cast model and "
                                 "load_state_dict() this one's state_dict() into it (which casts the state); nothing "
                                 "was stepped")
            casts += [(state, k, p.dtype) for k in cast]
        return casts

    # --- masks ---

    def _all_params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _parse_masks(self, masks) -> dict:
        """{param: selector in this mode's form (bool mask, sorted indices or None)}, validated."""
        params = self._all_params()
        if isinstance(masks, dict):
            known = {id(p) for p in params}
            if any(id(k) not in known for k in masks):
                raise ValueError("masks: a dict key is not a parameter of this optimizer")
            entries = [masks.get(p) for p in params]
        else:
            if masks is None or isinstance(masks, torch.Tensor):  # list(None) raised a bare "not iterable";
                # a lone tensor iterated as rows, one per parameter
                raise TypeError(f"masks: expected a list aligned with the parameters or a dict keyed by parameter "
                                f"(an entry None trains that parameter whole), got {type(masks).__name__}")
            entries = list(masks)
            if len(entries) != len(params):
                raise ValueError(f"masks: got {len(entries)} entries for {len(params)} parameters")
        return {p: self._selector(p, m, f"masks[{i}]") for i, (p, m) in enumerate(zip(params, entries))}

    def _selector(self, p: torch.Tensor, mask, name: str):
        """`mask` (given for the whole parameter) validated and put in this mode's form for the part
        of `p` this process holds: the whole tensor, or a DTensor's local shard."""
        selector = self._global_selector(p, mask, name)
        if selector is None or not _is_dtensor(p):
            return selector
        return self._selector(_local(p), _shard_of(p, selector), name)

    def _global_selector(self, p: torch.Tensor, mask, name: str):
        if mask is None:
            return None
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"{name}: expected a bool tensor, an index tensor or None, got {type(mask).__name__}")
        if mask.device != p.device:
            raise ValueError(f"{name}: on {mask.device} but the parameter is on {p.device}")
        if mask.dtype == torch.bool:
            if mask.shape != p.shape:
                raise ValueError(f"{name}: bool mask of shape {tuple(mask.shape)} for a parameter of shape {tuple(p.shape)}")
            if self.mode == "dense":
                return mask.detach().clone()
            return _index_tensor(mask.reshape(-1).nonzero().flatten(), p.numel())
        _check_index_tensor(name, mask, p.numel())
        if self.mode == "compact":
            return mask.detach().clone().contiguous()
        return _bool_mask(mask, p.shape)

    def _selector_of(self, p: torch.Tensor):
        return _selector_in(self.state[p])

    def _set_selector(self, state: dict, selector) -> None:
        """Keep `selector` under this mode's key, None ("every entry") included: a saved state must
        say so itself, or `load_state_dict` would take it for another optimizer's state."""
        for key in _SELECTOR_KEYS:
            state.pop(key, None)
        state["mask" if self.mode == "dense" else "indices"] = selector

    def _init_state(self, group: dict, p: torch.Tensor, selector) -> None:
        self._masked_at[p] = LAYER_MASK_CHANGES.get(p, 0)
        state = self.state[p]
        p = _local(p)
        self._set_selector(state, selector)
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        for key in self._state_keys(group):
            state[key] = torch.zeros(self._state_size(p, selector), dtype=p.dtype, device=p.device)
        if self._needs_init(group):
            flat = p.detach().reshape(-1)
            state["init"] = (flat if selector is None or self.mode == "dense" else flat[selector.long()]).clone()

    def _state_size(self, p: torch.Tensor, selector) -> int:
        """Entries of a per-entry state tensor of local tensor `p`: every entry, or the K selected (compact)."""
        return p.numel() if selector is None or self.mode == "dense" else selector.numel()

    def _state_keys(self, group: dict) -> list[str]:
        return list(self._STATE_KEYS)

    def _needs_init(self, group: dict) -> bool:
        return False

    @torch.no_grad()
    def update_masks(self, masks) -> None:
        """Change which entries train (dynamic masks), in the same forms as the constructor's `masks`,
        except that a dict changes only the parameters it names: the others keep their masks (at
        construction a parameter left out trains whole; here that silently opened it all).

        - Kept entries (in the old and the new mask) keep their value, state and step count.
        - Added entries start with zero state (moments, momentum buffer) and a step count of 0;
          once any entry is added the step count becomes per entry.
        - Dropped entries stop changing and keep their current value: nothing is reset to the
          initial value (a dynamic fine-tuner that wants them back at θ0 writes them itself, as
          `xlsparse.hf.lt_sft` does). Compact mode discards their state; dense mode leaves it in
          the dense state tensors, unused, and zeroes it if the entry is added again.
        - The `l1_to_init` anchor: dense mode keeps every entry's value at construction; compact
          mode keeps it for kept entries and takes the current value for added ones.

        SpIEL initialises regrown entries' moments from the accumulated gradients; this starts
        them at zero.
        """
        selectors = self._parse_masks(masks)
        for p in self._all_params():
            if isinstance(masks, dict) and p not in masks:
                continue
            self._move_state(p, self._selector_of(p), selectors[p])

    def _move_state(self, p: torch.Tensor, old, new) -> None:
        self._masked_at[p] = LAYER_MASK_CHANGES.get(p, 0)
        state = self.state[p]
        p = _local(p)
        # state a group's values call for but the steps have not made yet (SGD momentum turned on since
        # construction: the next step starts it at zero) has nothing to move; it raised KeyError half-way.
        # State the group's values leave unused now moves too (momentum or amsgrad off at this moment,
        # as a scheduler may set): it stayed at the old entries, and once back on, a kept entry read
        # another's momentum buffer or max_exp_avg_sq
        keys = [key for key in self._STATE_KEYS if key in state]
        if self.mode == "dense":
            old_m = torch.ones_like(p, dtype=torch.bool) if old is None else old
            new_m = torch.ones_like(p, dtype=torch.bool) if new is None else new
            added = (new_m & ~old_m).reshape(-1)
            self._set_selector(state, new)
            if not bool(added.any()):
                return
            for key in keys:
                state[key][added] = 0
            state["step"] = _own_steps(state["step"], p.numel(), p.device)
            state["step"][added] = 0
            return
        # compact: state moves to the positions of the new index list
        old_i = torch.arange(p.numel(), device=p.device) if old is None else old.long()
        new_i = torch.arange(p.numel(), device=p.device) if new is None else new.long()
        pos = torch.searchsorted(old_i, new_i).clamp(max=max(old_i.numel() - 1, 0))
        kept = (old_i[pos] == new_i) if old_i.numel() else torch.zeros_like(new_i, dtype=torch.bool)
        _gather_state(state, keys, torch.where(kept, pos, -1), old_i.numel(), p.detach().reshape(-1)[new_i])
        self._set_selector(state, new)

    @torch.no_grad()
    def _move_entries(self, param: torch.Tensor, src: torch.Tensor) -> None:
        """`param`, trained whole (mask None), holds new entries: entry i was entry src[i] before, or
        is added where src[i] < 0 (`xlsparse.hf.lt_sft`'s dynamic reselection lays a SparseDelta's
        values out anew). The state follows its entries by update_masks' rule."""
        state = self.state[param]
        keys = [key for key in self._STATE_KEYS if key in state]
        old_count = next((state[key].numel() for key in keys), int(src.max()) + 1 if src.numel() else 0)
        _gather_state(state, keys, src.long(), old_count, param.detach().reshape(-1))

    # --- state_dict: torch's loader casts every non-step tensor to the param's dtype ---

    def state_dict(self) -> dict:
        """torch.optim.Optimizer.state_dict, plus, for a DTensor (FSDP2) parameter, a `shard` tag
        (this process's mesh coordinates and the mesh shape) beside its state: that state covers
        this process's shard only (plain tensors, not DTensors). torch.distributed.checkpoint
        takes plain tensors for replicated ones and keeps one process's copy, so each rank would
        read another rank's moments back; `load_state_dict` refuses a state tagged with another
        rank, on every rank of the mesh at once (it all-reduces the verdict)."""
        out = super().state_dict()
        for pid, p in enumerate(self._all_params()):
            if _is_dtensor(p) and pid in out["state"]:
                out["state"][pid] = dict(out["state"][pid], shard=_shard_tag(p))
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        """torch.optim.Optimizer.load_state_dict, keeping masks, indices and per-entry step counts exact.

        A param's saved selector wins over the masks given so far, "every entry" (None) included. A
        param whose saved state has no selector key at all (saved by torch's AdamW or SGD, say)
        keeps the masks given so far (and the `l1_to_init` anchors taken at construction). A group
        that `add_param_group` would refuse raises ValueError before anything changes. The other
        way is not supported: this optimizer's state (flat, with its masks) does not load into
        torch's AdamW or SGD."""
        for group in state_dict["param_groups"]:
            self._check_group({**self.defaults, **group})
        saved_ids = list(chain.from_iterable(g["params"] for g in state_dict["param_groups"]))
        wrong_shard = None
        for i, (pid, p) in enumerate(zip(saved_ids, self._all_params())):
            saved = state_dict["state"].get(pid, {})
            tag = saved.get("shard")
            if tag is None and _is_dtensor(p) and any(k in saved for k in _SELECTOR_KEYS):
                # saved over the whole parameter (no FSDP2): its flat indices, all within this
                # shard's size, would pass as this shard's own and train other entries
                wrong_shard = (
                    f"load_state_dict: the state of param {i} was saved for the whole parameter (it has no shard "
                    f"tag), and this process holds the shard {_shard_tag(p).tolist()} (mesh coordinates, then mesh "
                    "shape) of a sharded (FSDP2) parameter. Load it into an optimizer over the unsharded parameter; "
                    "under FSDP2 each process loads the state it saved itself (torch.save of optimizer.state_dict() "
                    "per rank)")
                break
            if tag is not None and (not _is_dtensor(p) or not torch.equal(torch.as_tensor(tag).cpu(), _shard_tag(p))):
                wrong_shard = (
                    f"load_state_dict: the state of param {i} holds the shard {torch.as_tensor(tag).tolist()} "
                    f"(mesh coordinates, then mesh shape) of a sharded (FSDP2) parameter, and this process holds "
                    f"{_shard_tag(p).tolist() if _is_dtensor(p) else 'the whole parameter'}. Each process must load the "
                    "state it saved itself (torch.save of optimizer.state_dict() per rank); "
                    "torch.distributed.checkpoint keeps one process's copy of this per-shard state")
                break
        if _any_rank(wrong_shard is not None, self._all_params()):
            raise ValueError(wrong_shard or "load_state_dict: another process of the mesh was handed the optimizer "
                             "state of a shard it does not hold (see its error); no process loads it")
        in_force = {p: self._selector_of(p) for p in self._all_params()}  # the masks given so far
        # the l1_to_init anchors taken at construction: torch's load replaces the whole state, and a
        # state saved by another optimizer (torch's AdamW) has none
        anchors = {p: self.state[p]["init"] for p in self._all_params() if "init" in self.state.get(p, {})}
        kept = {}
        stripped = dict(state_dict, state={})
        for pid, st in state_dict["state"].items():
            st = dict(st)
            st.pop("shard", None)
            kept[pid] = {k: st.pop(k) for k in list(st) if k in _SELECTOR_KEYS or k == "step"}
            stripped["state"][pid] = st
        before = {"state": self.state, "param_groups": self.param_groups}
        super().load_state_dict(stripped)
        try:
            self._load_kept(state_dict, saved_ids, kept, in_force, anchors)
        except Exception:
            self.__setstate__(before)  # a refused state leaves the optimizer as it was (its lr included)
            raise

    def _load_kept(self, state_dict: dict, saved_ids: list, kept: dict, in_force: dict, anchors: dict) -> None:
        """The second half of `load_state_dict`: the selectors, step counts and missing anchors, then the checks."""
        for group in self.param_groups:  # a state saved by another optimizer lacks our keys
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        for pid, p in zip(saved_ids, self._all_params()):
            state = self.state[p]
            loaded = kept.get(pid, {})
            for key, value in loaded.items():
                if key == "step" and isinstance(value, numbers.Real) and not isinstance(value, (bool, torch.Tensor)):
                    # a count saved as a number (numpy's included), as torch's older optimizers did
                    value = torch.tensor(float(value), dtype=torch.float32)
                state[key] = None if value is None else value.to(p.device, copy=True)
            if not any(k in loaded for k in _SELECTOR_KEYS):
                # Another optimizer's state (torch's AdamW, say) must not make every entry train.
                self._set_selector(state, in_force[p])
                if self.mode == "compact" and in_force[p] is not None:
                    # its state covers every entry (torch's, in the param's shape): compact mode keeps the
                    # selected ones, as dense mode steps them (it refused the state as of another size)
                    for key in self._STATE_KEYS:
                        if isinstance(state.get(key), torch.Tensor) and state[key].numel() == _local(p).numel():
                            state[key] = state[key].reshape(-1)[in_force[p].long()]
                if "init" not in state and p in anchors:
                    state["init"] = anchors[p]
        self._check_loaded_state()
        self._check_layer_masks(in_force)

    def _check_layer_masks(self, in_force: dict) -> None:
        """A SubnetworkLinear weight whose loaded selector replaced the masks given so far must
        select the entries its layer's masks open (their union): the layer masks the gradient, and
        the optimizer would step other entries (moments and weight decay moving entries no language
        trains, and the layer's own entries never stepped). A loaded selector that is the layer's
        union masks the weight as the layer is now, whatever set_masks did before the load."""
        synced = []
        for i, p in enumerate(self._all_params()):
            ref = SUBNETWORK_LAYERS.get(p)
            layer = ref() if ref is not None else None
            if layer is None or layer.weight is not p:
                continue
            loaded = self._selector_of(p)
            if _same_entries(loaded, self._selector(p, layer.trainable_mask(), f"layer of param {i}"), p):
                synced.append(p)
            elif not _same_entries(loaded, in_force[p], p):
                raise ValueError(f"load_state_dict: param {i} is a SubnetworkLinear weight, and the state masks other "
                                 "entries than the union of the layer's masks (the masks of the run that saved it: a "
                                 "model's state_dict does not hold them); give the layers that run's masks first "
                                 "(xlsparse.hf.subnetworks.set_masks, or SubnetworkTrainer's resume), then load "
                                 "the state; nothing was loaded")
        for p in synced:  # after every check: a refused load leaves the counts too
            self._masked_at[p] = LAYER_MASK_CHANGES.get(p, 0)

    def _check_loaded_state(self) -> None:
        """Every param has state that fits its mask: missing state starts at zero (a missing step
        count beside a loaded momentum buffer at 1), a state tensor of another size raises
        ValueError, and so does a mask of the other mode's form (a state saved in the other mode).
        Loaded indices are checked here, once: the steps do not read them again
        (`check_indices=False`)."""
        for group in self.param_groups:
            for i, p in enumerate(group["params"]):
                state, selector = self.state[p], self._selector_of(p)
                if selector is not None and (selector.dtype == torch.bool) != (self.mode == "dense"):
                    saved_mode = "compact" if self.mode == "dense" else "dense"
                    raise ValueError(f"load_state_dict: param {i} has a {saved_mode}-mode selector; load the "
                                     f"state into an optimizer of that mode")
                if selector is not None and self.mode == "compact":
                    _check_index_tensor(f"load_state_dict: the indices of param {i}", selector, _local(p).numel())
                keys = self._state_keys(group)
                # With no per-entry state (SGD without momentum) the step count is all there is to keep.
                if not (any(k in state for k in keys) if keys else "step" in state):
                    self._init_state(group, p, selector)
                    continue
                whole = selector is None or self.mode == "dense"
                n = _local(p).numel() if whole else selector.numel()
                # per-entry state is [n], or the param's shape when it covers every entry (torch's
                # AdamW saves that); another shape of n entries is the state of another parameter
                shapes = {(n,), tuple(_local(p).shape)} if whole else {(n,)}
                for key in [*keys, *(["init"] if "init" in state else [])]:
                    t = state.get(key)
                    if not isinstance(t, torch.Tensor) or t.numel() != n:
                        raise ValueError(f"load_state_dict: state {key!r} of param {i} has "
                                         f"{None if t is None else t.numel()} entries; its mask selects {n}")
                    if tuple(t.shape) not in shapes:
                        raise ValueError(f"load_state_dict: state {key!r} of param {i} has shape {tuple(t.shape)}; "
                                         f"its mask selects {n} entries, so it must be one of {sorted(shapes)} "
                                         "(a state of another shape was saved for another parameter or mask)")
                    # flat, as this optimizer makes it: update_masks indexes it by flat positions (torch's
                    # param-shaped state raised IndexError there)
                    state[key] = t.reshape(-1)
                step = state.get("step")
                if step is not None and (not isinstance(step, torch.Tensor) or step.numel() not in (1, n)):
                    raise ValueError(f"load_state_dict: the step count of param {i} has "
                                     f"{step.numel() if isinstance(step, torch.Tensor) else type(step).__name__} "
                                     f"entries; its mask selects {n}")
                if "step" not in state:
                    # torch's SGD keeps no step count: a momentum buffer it saved means "not the first step"
                    step = 1.0 if "momentum_buffer" in state else 0.0
                    state["step"] = torch.full((), step, dtype=torch.float32, device=p.device)

    # --- stepping ---

    def _groups_for_kernel(self, group: dict):
        """Params of `group` that have a gradient, bucketed by (device, dtype): one kernel call each."""
        buckets: dict = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            buckets.setdefault((p.device, p.dtype), []).append(p)
        return buckets.items()

    def _amp(self, device: torch.device):
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        if grad_scale is not None:
            grad_scale = grad_scale.to(device=device, dtype=torch.float32).reshape(1)
        if found_inf is not None:
            found_inf = found_inf.to(device=device, dtype=torch.float32).reshape(1)
        return grad_scale, found_inf

    def _step_lists(self, params, keys):
        """(params, grads, selectors, steps, {key: state tensors}) for a kernel call, the params and
        grads as the local tensors that the kernels write and read."""
        # each state looked up once: a tensor's hash is a Python call, 5 lookups per param cost 0.1 ms
        # a step over 65 params
        states = [self.state[p] for p in params]
        grads = [_local(p.grad).contiguous() for p in params]
        for p, state in zip(params, states):
            if state["step"].device != p.device:
                state["step"] = state["step"].to(p.device)
        return ([_local(p) for p in params], grads, [_selector_in(s) for s in states], [s["step"] for s in states],
                {k: [s[k] for s in states] for k in keys})


def _selector_in(state: dict):
    """The selector a param's state keeps: its bool mask, its flat indices, or None (every entry)."""
    return state.get("mask", state.get("indices"))


def _same_entries(a, b, p: torch.Tensor) -> bool:
    """Whether selectors `a` and `b` of `p` (a bool mask, indices or None: every entry) select the same entries."""
    if a is None or b is None:
        other = b if a is None else a
        return other is None or int(other.sum() if other.dtype == torch.bool else other.numel()) == _local(p).numel()
    if (a.dtype == torch.bool) != (b.dtype == torch.bool):
        return False
    return torch.equal(a, b) if a.dtype == torch.bool else torch.equal(a.long(), b.long().to(a.device))


def _local(t: torch.Tensor) -> torch.Tensor:
    """The part of `t` this process holds: a DTensor's local shard (a view: writes reach the
    parameter), any other tensor itself."""
    return t.to_local() if _is_dtensor(t) else t


def _shard_of(p, selector: torch.Tensor) -> torch.Tensor:
    """A whole-parameter selector (bool mask or flat indices) cut to the shard of DTensor `p` this
    process holds, as a bool mask of the shard's shape. No communication: every rank holds the
    whole mask and keeps its own part, split as `p` is (FSDP2: chunks of dim 0)."""
    from torch.distributed.tensor import distribute_tensor

    if selector.dtype != torch.bool:
        selector = _bool_mask(selector, p.shape)
    return distribute_tensor(selector, p.device_mesh, p.placements, src_data_rank=None).to_local()


def _any_rank(flag: bool, params) -> bool:
    """`flag` or'ed over every process of the first DTensor parameter's mesh (`flag` itself when
    there is none): a refusal on one rank alone would leave the others waiting in the next
    collective for good."""
    p = next((p for p in params if _is_dtensor(p)), None)
    if p is None:
        return flag
    import torch.distributed as dist

    seen = torch.tensor([int(flag)], device=_local(p).device)
    for dim in range(p.device_mesh.ndim):
        dist.all_reduce(seen, op=dist.ReduceOp.MAX, group=p.device_mesh.get_group(dim))
    return bool(seen.item())


def _shard_tag(p) -> torch.Tensor:
    """This process's coordinates in a DTensor parameter's mesh, then the mesh's shape."""
    mesh = p.device_mesh
    return torch.tensor([*mesh.get_coordinate(), *mesh.shape], dtype=torch.int64)


def _bool_mask(indices: torch.Tensor, shape) -> torch.Tensor:
    """Sorted flat indices as a bool mask of `shape`."""
    dense = torch.zeros(math.prod(shape), dtype=torch.bool, device=indices.device)
    dense[indices.long()] = True
    return dense.view(shape)


def _check_index_tensor(name: str, indices: torch.Tensor, numel: int) -> None:
    """The form every index selector must have, wherever it comes in (a mask argument, a loaded
    state): 1-D int32/int64, sorted, unique, within `numel`."""
    if indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name}: must be bool or int32/int64 indices, got {indices.dtype}")
    if indices.dim() != 1:
        raise ValueError(f"{name}: indices must be 1-D, got shape {tuple(indices.shape)}")
    checks.indices(name, indices, numel)


def _index_tensor(indices: torch.Tensor, numel: int) -> torch.Tensor:
    """Flat indices in the narrowest dtype the kernels take."""
    return indices.to(index_dtype(numel))


def _gather_state(state: dict, keys: list, src: torch.Tensor, old_count: int, current: torch.Tensor) -> None:
    """Per-entry state for a new list of entries (update_masks' rule): entry i takes entry
    src[i]'s state of the `old_count` before it; an added entry (src[i] < 0) starts with zero
    moments, a step count of 0 and its `current` value as its l1_to_init anchor. The state keeps
    its dtype: after a cast of the param, the step refuses it as it would have unmoved."""
    kept = src >= 0
    at = src[kept]
    for key in keys:
        moved = torch.zeros(src.numel(), dtype=state[key].dtype, device=current.device)
        moved[kept] = state[key][at]
        state[key] = moved
    if "init" in state:
        init = current.to(state["init"].dtype, copy=True)
        init[kept] = state["init"][at]
        state["init"] = init
    if not (bool(kept.all()) and state["step"].dtype == torch.float32):  # else all carry on with the shared count
        steps = _own_steps(state["step"], old_count, current.device)
        moved = torch.zeros(src.numel(), dtype=torch.int32, device=current.device)
        moved[kept] = steps[at]
        state["step"] = moved


def _own_steps(step: torch.Tensor, n: int, device) -> torch.Tensor:
    """A step count per entry: the shared count repeated, or the per-entry counts as they are."""
    if step.dtype == torch.int32:
        return step
    return torch.full((n,), int(step), dtype=torch.int32, device=device)


class MaskedAdamW(_MaskedOptimizer):
    """AdamW that updates only the masked entries of each parameter (see the module docstring).

    Args:
        params: parameters or param groups, as for torch.optim.AdamW.
        masks: which entries train (module docstring).
        lr, betas, eps, weight_decay, amsgrad: as torch.optim.AdamW (decoupled weight decay).
        mode: "dense" (bool masks, state as large as the param) or "compact" (indices, state of
            size K, O(K) steps).
        l1_to_init: LT-SFT's L1 pull toward the initial weights: `l1_to_init * sign(p - p0)` is added
            to the gradient inside the step, as if `l1_to_init * |p - p0|.sum()` were added to the
            loss, but after any `clip_grad_norm_` (which neither sees nor clips it). p0 is the value
            at construction (compact mode keeps only the K selected values).
        maximize: torch's argument; True is a ValueError (negate the loss instead).

    `step()` runs one fused multi-tensor kernel per param group (and device/dtype) that reads p, g,
    the state and the mask and writes only the selected entries.
    """

    def __init__(self, params: Iterable, masks, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, mode: str = "dense", l1_to_init: float = 0.0,
                 amsgrad: bool = False, maximize: bool = False):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, l1_to_init=l1_to_init, amsgrad=amsgrad,
                        maximize=maximize)
        super().__init__(params, masks, defaults, mode)

    _STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")

    def _state_keys(self, group):
        return ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if group["amsgrad"] else [])

    def _needs_init(self, group):
        return group["l1_to_init"] != 0

    def _check_group(self, group):
        """Each group's hyper-parameters (the defaults' included): when it is added or loaded, and at each step."""
        super()._check_group(group)
        betas = group["betas"]
        try:
            count = len(betas)
        except TypeError:  # betas=0.9 raised a bare "object of type 'float' has no len()"
            raise TypeError(f"MaskedAdamW: betas must be a pair (beta1, beta2), got {betas!r}") from None
        # a third beta was ignored (amsgrad="no", truthy, is refused in checks.adamw_hyperparameters)
        if count != 2:
            raise ValueError(f"betas must be (beta1, beta2), got {betas!r}")
        checks.adamw_hyperparameters("MaskedAdamW", group["lr"], betas[0], betas[1], group["eps"],
                                     group["weight_decay"], group["l1_to_init"], group["amsgrad"])
        if not group.get("decoupled_weight_decay", True) and group["weight_decay"] != 0:
            raise ValueError("MaskedAdamW's weight decay is decoupled (AdamW's): decoupled_weight_decay=False "
                             "(torch.optim.Adam's L2 weight decay) is not supported")

    def _check_state(self, group: dict) -> None:
        stepped = [p for p in group["params"] if p.grad is not None]
        if group["l1_to_init"] != 0 and any("init" not in self.state[p] for p in stepped):
            raise RuntimeError("l1_to_init was turned on after construction: the initial values were not kept")
        # without this check the step stopped with KeyError in this group, after the groups before it had stepped
        if group["amsgrad"] and any("max_exp_avg_sq" not in self.state[p] for p in stepped):
            raise RuntimeError("amsgrad was turned on after construction: there is no max_exp_avg_sq state to "
                               "continue; build the optimizer with amsgrad=True")

    def _update(self, group: dict, params: list, device: torch.device) -> None:
        l1 = group["l1_to_init"]
        local, grads, selectors, steps, st = self._step_lists(params, self._state_keys(group))
        grad_scale, found_inf = self._amp(device)
        optim_ops.masked_adamw_(
            local, grads, selectors, st["exp_avg"], st["exp_avg_sq"], st.get("max_exp_avg_sq", []), steps,
            [self.state[p]["init"] for p in params] if l1 != 0 else [],
            lr=group["lr"], beta1=group["betas"][0], beta2=group["betas"][1], eps=group["eps"],
            weight_decay=group["weight_decay"], l1_to_init=l1, amsgrad=group["amsgrad"],
            grad_scale=grad_scale, found_inf=found_inf, check_indices=False)


class MaskedSGD(_MaskedOptimizer):
    """SGD (optional momentum, dampening, Nesterov, weight decay) on the masked entries only.

    Meant for the inner loops of meta-learning over language subnetworks. Masks and modes as in
    `MaskedAdamW`; the math on the selected entries is torch.optim.SGD's, also when a group's
    momentum changes between steps (OneCycleLR and CyclicLR cycle it): the step count counts the
    steps taken with momentum, so the first of them starts the buffer at the gradient. A
    torch.optim.SGD state (momentum buffers, no step count) loads and continues as torch's would.
    """

    def __init__(self, params: Iterable, masks, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, mode: str = "dense", maximize: bool = False):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                        maximize=maximize)
        super().__init__(params, masks, defaults, mode)

    def _check_group(self, group):
        """Each group's hyper-parameters (the defaults' included): when it is added or loaded, and at each step."""
        super()._check_group(group)
        if group.get("l1_to_init"):  # MaskedAdamW's key: a group kept it and the steps never pulled toward θ0
            raise ValueError("MaskedSGD: a param group has l1_to_init, which only MaskedAdamW runs; use MaskedAdamW "
                             "for an L1 pull toward the initial weights")
        checks.sgd_hyperparameters("MaskedSGD", group["lr"], group["momentum"], group["dampening"],
                                   group["weight_decay"], group["nesterov"])

    _STATE_KEYS = ("momentum_buffer",)

    def _state_keys(self, group):
        return ["momentum_buffer"] if group["momentum"] != 0 else []

    def _check_state(self, group: dict) -> None:
        if group["momentum"] != 0:  # turned on since construction: buffers start now, as torch's do
            for p in group["params"]:
                state = self.state[p]
                if p.grad is not None and "momentum_buffer" not in state:
                    n = self._state_size(_local(p), self._selector_of(p))
                    state["momentum_buffer"] = torch.zeros(n, dtype=p.dtype, device=p.device)

    def _update(self, group: dict, params: list, device: torch.device) -> None:
        keys = self._state_keys(group)
        local, grads, selectors, steps, st = self._step_lists(params, keys)
        if group["momentum"] == 0:  # the count is of momentum steps: a later first one must start the buffer
            steps = [s.clone() for s in steps]
        grad_scale, found_inf = self._amp(device)
        optim_ops.masked_sgd_(
            local, grads, selectors, st.get("momentum_buffer", []), steps, lr=group["lr"],
            momentum=group["momentum"], dampening=group["dampening"], weight_decay=group["weight_decay"],
            nesterov=group["nesterov"], grad_scale=grad_scale, found_inf=found_inf, check_indices=False)


@torch.no_grad()
def decay_the_base_(optimizer: torch.optim.Optimizer, anchors: dict) -> None:
    """The part of AdamW's decoupled weight decay that an optimizer over a delta alone misses: it
    decays Δ, while AdamW on the weights θ = θ0 + Δ decays θ. Subtracts lr·wd·θ0 from each Δ
    parameter in `anchors` ({Δ: θ0 at Δ's entries}) that stepped. Call after each step (as a
    step post hook); with a masked optimizer, only at the entries its mask selects. A step that
    GradScaler skipped (its `found_inf`, still set on the optimizer while the post hooks run)
    decays nothing, as AdamW on θ then changes nothing (one host read of found_inf, and only
    under GradScaler)."""
    found_inf = getattr(optimizer, "found_inf", None)
    if found_inf is not None and float(found_inf) != 0:
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p in anchors and p.grad is not None and group["weight_decay"] > 0:
                alpha = group["lr"] * group["weight_decay"]
                # a masked optimizer steps only its selected entries of Δ: the others must stay
                # bit-identical, so θ0's share of the decay reaches only those
                selector = _selector_in(optimizer.state[p]) if isinstance(optimizer, _MaskedOptimizer) else None
                if selector is None:
                    p.sub_(anchors[p], alpha=alpha)
                else:
                    idx = selector.reshape(-1).nonzero().flatten() if selector.dtype == torch.bool else selector.long()
                    p.view(-1).index_add_(0, idx, anchors[p].reshape(-1)[idx], alpha=-alpha)
