"""LT-SFT (Ansell et al. 2022, composable-sft) as a Hugging Face `Trainer`.

What composable-sft's `LotteryTicketSparseFineTuner` does, and so what this one does (read from
its `sft_args.py`, `trainer.py`, `lt_sft.py`, `multisource.py` and `run_mlm.py`; no code copied):

- θ0 is the value of every trainable parameter when the trainer is built (after the freezing
  and untying below). The SFT is θ − θ0 on the selected ("maskable") entries, plus every
  trainable non-maskable parameter (the head) stored whole ("absolute").
- Maskable parameters: the `maskable_params` names given to the trainer; by default (as its
  example scripts) every trainable parameter under the model's `base_model_prefix`, so heads are
  trained densely (its trainer itself, given None, masks every parameter, heads included); a model
  with no attribute of that name ((m)T5) masks every parameter but untied output embeddings.
  `SftArguments.maskable_exclude` removes names matching a pattern.
- K = `ft_params_num`, else int(`ft_params_proportion` × number of maskable entries).
- `n_ft_iterations` rounds. Each round: remember the parameters (the round's start); full
  fine-tuning; select K // n_ft_iterations more entries, the largest |θ − θ0| among entries not
  selected yet (masks accumulate; |θ − θ0| is against θ0, not the round start); rewind every
  parameter to the round's start; sparse fine-tuning of all entries selected so far. The last
  round's sparse result is the SFT (K % n_ft_iterations entries are never selected, as there).
  composable-sft picks by a threshold, so ties at the threshold may add more; here exactly K
  entries are selected (ties to the lowest position).
- Phase length: `*_max_epochs_per_iteration` is converted to the optimizer steps the HF Trainer
  runs for that many epochs, ceil(epochs × ceil(batches per epoch / gradient accumulation)) (it
  steps on an epoch's leftover micro-batches too, and composable-sft hands it the epochs when they
  decide); the smaller of that and `*_max_steps_per_iteration` is run;
  when the epochs give fewer steps than `*_min_steps_per_iteration`, the min steps are run. With
  no epochs, the max steps are run and the min is ignored (composable-sft's `set_training_len`).
- L1: once per optimizer step, λ × G × Σ|θ − θ0| / N is back-propagated, with λ =
  `full_l1_reg` in full phases and `sparse_l1_reg` in sparse ones, G the gradient accumulation
  steps, N the number of all model parameters (frozen ones included; the trainer's
  `_num_params`), the sum over trainable parameters (only maskable ones when
  `apply_reg_to_sparse_only`). In sparse phases the gradient is then masked, so only selected
  entries and heads feel it. Its running mean is logged as `l1_reg_loss`, unrounded and per phase
  (composable-sft rounds it to 4 decimals, and carries a phase's unlogged steps into the next
  phase's first value). composable-sft's latest `trainer.py` has this term commented out (the
  two coefficients do nothing there); this is the term of its earlier releases.
- `freeze_head`: the output embeddings get their own copy of the (tied) input embeddings and
  every parameter outside the base model is frozen (the output embeddings, when the model has no
  attribute named by its `base_model_prefix`, as (m)T5; with neither it raises); the input embeddings stay trainable.
  `untie_embeddings`: the output embeddings get their own trainable copy (a head, so stored
  whole; with `freeze_head` too, the rest of the head stays frozen). `freeze_decoder`: the
  output embeddings get their own frozen copy. Untied already, a model keeps its own decoder under
  these flags (frozen or trained as they say); composable-sft overwrites it with a copy of the
  input embeddings, which would discard a trained decoder.
  `freeze_embeddings`: the input word embeddings are frozen. The SFT itself does not untie
  anything: applied to a tied base, an input-embedding delta moves the tied decoder too (as in
  composable-sft, whose task models have no decoder), and the whole decoder that
  `untie_embeddings` stores is refused until the base is untied (it would replace the input
  embeddings). `freeze_layer_norm`: parameters
  matching `layer_norm_patterns` are frozen (composable-sft matches "LayerNorm"; the default here
  matches any module named with "norm", so Llama/GPT-2/T5/Qwen3/MPT/Mamba norms and XLM-R's
  `lm_head.layer_norm` too).
- A tied decoder (transformers 5 names XLM-R's tied matrix `lm_head.decoder.weight`) is the
  word-embedding matrix: it is named by its base-model name and masked like any body parameter,
  never trained whole as a head.

Differences, by design: in sparse phases weight decay (decoupled, AdamW) reaches only the
selected entries and heads (composable-sft's AdamW over masked gradients also decays every
unselected entry; its scripts use weight decay 0). The sparse phase keeps O(K) training state:
selected linear layers become `SparseDeltaLinear` and embeddings `SparseDeltaEmbedding`, whose
backward never builds a dense gradient (but for a bfloat16 matrix on a CPU where one dense dYᵀX and a
gather was timed faster, `ops.matmul.dense_dw_pays`); other maskable parameters (biases, norms) train through
compact `MaskedAdamW` (so do GPT-2's `Conv1D` weights, which are not converted, a matrix that
another kind of module holds too, as XGLM's scaled word embedding shares its Linear head's, and a
weight the model reads itself outside its module's call, as DeBERTa reads `rel_embeddings.weight`:
one forward of a training batch, before phase 2, finds them). At the end the
deltas fold back into the model's own parameters. Weight decay stays AdamW's on θ = θ0 + Δ (a
post-step term adds the −lr·wd·θ0 the optimizer of Δ alone would miss). Under multi-source
training the L1 term is taken after the source SFT is reverted, on |θ − θ0| as the paper defines
it (composable-sft's plugin order would take it with the source SFT applied, |θ + φ − θ0|, and
pull each entry the source SFT moved towards θ0 − φ). Runs under DDP (the L1
gradient is added to the gradients directly, the same on every rank). Phase 2's layers and
optimizer also train under FSDP2 (`fully_shard`, tested by hand on gloo), but this trainer refuses
Accelerate's FSDP plugin and DeepSpeed, which replace the parameters and optimizer it holds, and a
model already sharded with `fully_shard` (θ0 and the global selection read whole tensors).
"""
import contextlib
import functools
import hashlib
import inspect
import json
import math
import os
import re
import warnings
from collections.abc import MutableMapping
from dataclasses import dataclass, field, fields

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import has_length, seed_worker

from ..diff import (SparseDelta, SparseDiff, _is_dtensor, _refuse_unrankable, _storage_key, _transposed_weights,
                    _untied, apply, index_dtype, refuse_sharded)
from ..distributed import all_reduce_scores
from ..functional import topk_mask
from ..nn import SparseDeltaEmbedding, SparseDeltaLinear
from ..ops._common import acc_dtype
from ..ops.checks import flag, is_real, is_whole
from ..ops.compose import sparse_axpy_
from ..ops.matmul import ensemble_nll_op
from ..optim import MaskedAdamW, _bool_mask, _local, _shard_of, decay_the_base_
from .model import _fingerprint, _output_head, _refuse_max_norm, _swap_module, _uncompiled

SOURCE_KEY = "_source"
"""The batch key naming a multi-source batch's source (composable-sft's `BATCH_SOURCE_KEY`)."""
SFT_FILE = "sft.safetensors"
"""The SFT written into every checkpoint and by `save_model` (`SparseDiff.save` format)."""
SPARSE_PHASE_FILE = "sparse_phase.json"
"""Written beside the SFT: the settings its sparse phase ran with, which a resume must share, how
many processes saved gradient sums (`GRADIENT_SUMS_FILE`), and the fingerprints of the heads' θ0
(the L1 term's anchor for what trains whole, which the checkpoint's weights do not hold)."""
GRADIENT_SUMS_FILE = "reselection_gradients_{}.safetensors"
"""A dynamic sparse-phase checkpoint inside a gradient window: each process's sums so far (by
process index; each process tapped its own batches)."""


@dataclass
class SftArguments:
    """The knobs of lottery-ticket sparse fine-tuning: composable-sft's `SftArguments` names,
    defaults and units (see the module docstring for what each does). Validated on creation."""

    ft_params_proportion: float | None = 0.01
    """Share of the maskable entries the SFT may change (used when ft_params_num is None)."""
    ft_params_num: int | None = None
    """Number of entries the SFT may change (global over the maskable parameters)."""
    n_ft_iterations: int = 1
    """Selection rounds; each selects K // n_ft_iterations more entries."""
    full_ft_min_steps_per_iteration: int | None = None
    sparse_ft_min_steps_per_iteration: int | None = None
    full_ft_max_steps_per_iteration: int | None = None
    sparse_ft_max_steps_per_iteration: int | None = None
    full_ft_max_epochs_per_iteration: float | None = None
    sparse_ft_max_epochs_per_iteration: float | None = None
    full_l1_reg: float = 0.0
    """λ of the L1 pull toward θ0 in full phases: λ·G·Σ|θ − θ0| / N (module docstring)."""
    sparse_l1_reg: float = 0.0
    """λ of the same term in sparse phases."""
    apply_reg_to_sparse_only: bool = False
    """Sum the L1 term over maskable parameters only (else over every trainable one)."""
    freeze_embeddings: bool = False
    freeze_head: bool = False
    untie_embeddings: bool = False
    freeze_decoder: bool = False
    freeze_layer_norm: bool = False
    # list[str], not tuple[str, ...]: HfArgumentParser (composable-sft's scripts parse SftArguments
    # with it) read `--maskable_exclude bias` as ('b', 'i', 'a', 's'), excluding every name holding
    # one of those letters, and took no second pattern
    layer_norm_patterns: list[str] = field(default_factory=lambda: [r"(?i)(^|\.)[^.]*norm[^.]*\.|(^|\.)ln_"])
    """Regular expressions (searched in parameter names) that `freeze_layer_norm` freezes. The
    default: every module whose name holds "norm" (any case), and GPT-2's `ln_*` (an exact
    `norm.` or `layer_norm` left Qwen3's `q_norm`/`k_norm`, MPT's `norm_1` and Mamba's `norm_f` trainable)."""
    maskable_exclude: list[str] = field(default_factory=list)
    """Regular expressions: matching parameters are not maskable (trained whole if trainable)."""

    def __post_init__(self):
        def check(name, ok, rule):
            if not ok:
                raise ValueError(f"SftArguments.{name} = {getattr(self, name)!r}: {rule}")

        # numbers as Python's own (numpy's from a sweep, say; a subclass's fields too): the sparse phase's
        # settings are written as JSON at each checkpoint, where an np.int64 stopped the run with a TypeError
        for f in fields(self):
            value = getattr(self, f.name)
            if is_whole(value):
                setattr(self, f.name, int(value))
            elif is_real(value):
                setattr(self, f.name, float(value))

        # as composable-sft, the proportion may be None beside a count (it is read only without one)
        check("ft_params_proportion", (self.ft_params_proportion is None and self.ft_params_num is not None)
              or (is_real(self.ft_params_proportion) and 0.0 <= self.ft_params_proportion <= 1.0),
              "must be a number in [0, 1] (None only beside ft_params_num)")
        # counts are whole numbers: a float K failed only after a whole full phase, float steps were truncated
        check("ft_params_num", self.ft_params_num is None or is_whole(self.ft_params_num), "must be an int")
        check("ft_params_num", self.ft_params_num is None or self.ft_params_num >= 0, "must be >= 0")
        check("n_ft_iterations", is_whole(self.n_ft_iterations) and self.n_ft_iterations >= 1, "must be an int >= 1")
        for phase in ("full", "sparse"):
            lo, hi, ep = (f"{phase}_ft_min_steps_per_iteration", f"{phase}_ft_max_steps_per_iteration",
                          f"{phase}_ft_max_epochs_per_iteration")
            for name in (lo, hi):
                check(name, getattr(self, name) is None or is_whole(getattr(self, name)), "must be an int")
            check(lo, getattr(self, lo) is None or getattr(self, lo) >= 0, "must be >= 0")
            # 0 would make the HF Trainer fall back to num_train_epochs
            check(hi, getattr(self, hi) is None or getattr(self, hi) >= 1, "must be >= 1")
            # True passed as 1 epoch; inf failed at train(), converting epochs to steps (None: no cap)
            check(ep, getattr(self, ep) is None or (is_real(getattr(self, ep)) and 0 < getattr(self, ep) < math.inf),
                  "must be a finite number > 0")
            check(hi, getattr(self, hi) is not None or getattr(self, ep) is not None,
                  f"the {phase} phase has no length: give it or {ep}")
            check(lo, getattr(self, lo) is None or getattr(self, hi) is None or getattr(self, lo) <= getattr(self, hi),
                  f"must not exceed {hi} = {getattr(self, hi)}")
        for name in ("full_l1_reg", "sparse_l1_reg"):  # inf passed: the term and its gradients were NaN (inf · 0 at θ0)
            check(name, is_real(getattr(self, name)) and math.isfinite(getattr(self, name)) and getattr(self, name) >= 0,
                  "must be a finite number >= 0")
        for name in ("apply_reg_to_sparse_only", "freeze_embeddings", "freeze_head", "untie_embeddings",
                     "freeze_decoder", "freeze_layer_norm"):  # "false" from a config file is truthy: it turned the option on
            check(name, isinstance(getattr(self, name), bool), "must be a bool")
        for name in ("layer_norm_patterns", "maskable_exclude"):
            # a bare string was read one character at a time: "bias" excluded every name holding an a or an s
            check(name, isinstance(getattr(self, name), (tuple, list))
                  and all(isinstance(p, str) for p in getattr(self, name)),
                  "must be a list of regular expressions (strings), e.g. [r\"LayerNorm\"]")
            for p in getattr(self, name):
                try:
                    re.compile(p)
                except re.error as exc:
                    raise ValueError(f"SftArguments.{name}: {p!r} is not a regular expression: {exc}") from exc


@dataclass
class DynamicSftArguments(SftArguments):
    """LT-SFT whose sparse phase re-selects its support as SpIEL does (Ansell et al. 2024,
    AlanAnsell/peft): every `reselection_steps` optimizer steps, in each converted matrix or
    embedding (K_t entries), the int(rate × K_t) entries of smallest |Δ| are dropped and
    as many are regrown: the largest |Σ gradient| (the magnitude of the signed sum, as SpIEL) over
    the last `selection_accumulation_steps` steps among entries not kept. Dropped entries go back
    to θ0 and lose their optimizer state; regrown ones start at θ0 with zero state and their own
    step count. An entry both dropped and regrown stays as it was (as SpIEL). The rate
    (`drop_rate`) follows `reselection_rate_policy`, SpIEL's name: "constant" (the default) keeps
    `drop_fraction` at every reselection; "linear" (SpIEL's default) and "cosine" decay it as SpIEL
    does, drop_fraction · (1 − s/T) or drop_fraction · (1 + cos(π s/T)) / 2 at the reselection
    after step s of a sparse phase of T steps, `drop_fraction` taking the role of SpIEL's
    initial_reselection_rate (0.2 there). A matrix that is
    not converted (GPT-2's `Conv1D` weights) keeps its support, with a warning; with no matrix
    maskable at all (only biases and norms), the trainer refuses these arguments. Differences from SpIEL (its `SftSelector`, selection "rigl"; R =
    `reselection_steps`, A = `selection_accumulation_steps`): the initial support is LT-SFT's
    phase-1 selection (SpIEL starts from a random one, and under "linear" replaces all of it, at
    rate 1, after steps 1..A; under "cosine" that first reselection takes the cosine rate); every
    non-kept entry is a candidate (SpIEL tracks the K_t entries of largest |gradient| in its
    window's first backward); regrown entries start with zero moments and step count, so their
    first update is Adam's first step (SpIEL seeds them from the window: Adam's per-entry age =
    its backward passes / gradient_accumulation_steps, the moments its mean gradient and mean
    squared gradient, scaled so that Adam's bias correction at that age gives them back); the
    window is the A steps k·R − A + 1..k·R (each step's micro-batches, as SpIEL's hooks sum every
    backward) and the reselection follows step k·R (SpIEL's later windows run from step k·R to
    k·R + A, A + 1 steps, and reselect after the last: the same cadence, shifted); embeddings (and
    a tied decoder) reselect too (SpIEL converts linear layers only); a tensor whose window
    gradient is all zero (a layer no batch of it reached) keeps its support, as in SpIEL, whose
    hooks on it never fired; weight decay stays AdamW's on θ0 + Δ (SpIEL's SftAdamW decays Δ
    toward 0). During the accumulation window each converted layer adds its
    dense weight gradient at each backward (dYᵀX as one GEMM with β = 1, or a row scatter for
    embeddings) into one dense buffer per parameter that drops entries (float32 for a bf16/fp16
    model; under fp16's GradScaler a second one holds the step's own part until the scaler has not skipped the step), freed after
    the reselection; outside the window training stays O(K). Under DDP the buffers are averaged over the processes before a
    reselection, so every process selects the same support (SpIEL's hooks see each process's
    own gradients). Biases and norms keep their support, and so does a
    tensor whose int(rate × K_t) at the first reselection is 0 (with a warning; a decaying rate
    reaches 0 for more tensors later). No reselection follows the phase's last step (SpIEL's
    decayed rate is 0 there), so train() refuses a sparse phase of at
    most `reselection_steps` steps (it would be static LT-SFT)."""

    reselection_steps: int = 20
    drop_fraction: float = 0.1
    selection_accumulation_steps: int = 5
    reselection_rate_policy: str = "constant"

    RATE_POLICIES = ("constant", "linear", "cosine")

    def __post_init__(self):
        super().__post_init__()
        if not is_whole(self.reselection_steps) or self.reselection_steps < 1:
            raise ValueError(f"DynamicSftArguments.reselection_steps = {self.reselection_steps!r}: must be an int >= 1")
        if not is_real(self.drop_fraction) or not 0.0 <= self.drop_fraction <= 1.0:  # True dropped the whole support
            raise ValueError(f"DynamicSftArguments.drop_fraction = {self.drop_fraction!r}: must be a number in [0, 1]")
        a = self.selection_accumulation_steps
        if not is_whole(a) or not 1 <= a <= self.reselection_steps:
            raise ValueError(f"DynamicSftArguments.selection_accumulation_steps = {self.selection_accumulation_steps!r}: "
                             "must be an int in [1, reselection_steps]")
        if not isinstance(self.reselection_rate_policy, str) or self.reselection_rate_policy not in self.RATE_POLICIES:
            raise ValueError(f"DynamicSftArguments.reselection_rate_policy = {self.reselection_rate_policy!r}: must be one "
                             f"of {self.RATE_POLICIES}")

    def drop_rate(self, step: int, total: int) -> float:
        """The share of each tensor's K_t that the reselection after optimizer step `step` of a sparse
        phase of `total` steps drops: `drop_fraction`, or SpIEL's decay of it, drop_fraction ·
        (1 − step/total) ("linear") or drop_fraction · (1 + cos(π · step/total)) / 2 ("cosine")."""
        if self.reselection_rate_policy == "linear":
            return self.drop_fraction * (1 - step / total)
        if self.reselection_rate_policy == "cosine":
            return self.drop_fraction * (1 + math.cos(math.pi * step / total)) / 2
        return self.drop_fraction


class _Reselection(TrainerCallback):
    """SpIEL's drop-and-regrow during a dynamic trainer's sparse phase (DynamicSftArguments).

    Under fp16's GradScaler a step can overflow in one layer and leave the dY of the layers above
    it finite; the scaler skips that step, so it must add nothing to any buffer. Each step then
    taps into buffers of its own (`pending`), added to `grads` at the step's end unless the
    scaler lowered its scale (it skipped the step)."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.hooks, self.grads, self.pending, self.scale = [], {}, {}, None

    def _in_window(self, step: int) -> bool:
        """Whether optimizer step `step` (1-based) accumulates gradients for a reselection."""
        a = self.trainer.sft_args
        return (-step) % a.reselection_steps < a.selection_accumulation_steps

    def on_step_begin(self, args, state, control, **kwargs):
        t = self.trainer
        every = t.sft_args.reselection_steps
        step = -(-(state.global_step + 1) // every) * every  # the reselection of the window this step is in
        # none after the last step: a window it would end tapped dense gradients for nothing
        if t._phase == "sparse" and t._converted and not self.hooks and self._in_window(state.global_step + 1) \
                and step < state.max_steps:
            for name, layers in t._converted.items():
                if not t._drop_count(name, step, state.max_steps):  # it keeps its support: a dense buffer and a GEMM a step for nothing
                    continue
                weight = layers[0][2].weight  # summed in float32 for a half-precision model: bf16 sums drop small steps
                if name not in self.grads:  # a resumed window's sums so far come from the checkpoint (`_restore`)
                    self.grads[name] = torch.zeros_like(weight, dtype=acc_dtype(weight.dtype))
                for _, _, layer in layers:
                    self.hooks.append(layer.register_forward_hook(
                        _gradient_tap(lambda name=name: self.pending.get(name, self.grads[name]), t._loss_scale)))
        self.scale = t._loss_scale() if self.hooks else None
        if self.scale is not None:  # this step's taps go to its own buffers until it is known not skipped
            self.pending = {name: torch.zeros_like(acc) for name, acc in self.grads.items()}

    def clear(self) -> None:
        """Remove the taps and drop the accumulated gradients (the end of a sparse phase, however
        it ended: the taps sit in hook dicts that the original modules get back)."""
        for h in self.hooks:
            h.remove()
        self.hooks, self.grads, self.pending = [], {}, {}

    def on_step_end(self, args, state, control, **kwargs):
        t = self.trainer
        if self.pending:
            scale = t._loss_scale()
            if scale is None or scale >= self.scale:  # GradScaler lowers its scale exactly when it skips a step
                for name, acc in self.grads.items():
                    acc.add_(self.pending[name])
            self.pending = {}
        if not self.hooks:
            return
        if state.global_step % t.sft_args.reselection_steps == 0 or state.global_step >= state.max_steps:
            for h in self.hooks:
                h.remove()
            self.hooks = []
            if state.global_step < state.max_steps:  # never after the last step
                # each process tapped only its own batch: average as DDP averages gradients, or the
                # processes would select different supports
                t._reselect(all_reduce_scores(self.grads, op="mean"), state.global_step, state.max_steps)
            self.grads = {}


def _gradient_tap(acc, loss_scale):
    """A forward hook that adds the layer's dense weight gradient of this backward into `acc` (a
    tensor, or a function returning the buffer to add into).
    Under fp16's GradScaler (`loss_scale()` not None) dY is scaled: it is added unscaled, and a
    non-finite dY adds nothing, or an inf would top the regrowth (the other layers' finite parts
    of a skipped step are dropped by `_Reselection`, which gives each step its own buffers)."""
    def hook(layer, inputs, output):
        x = inputs[0]
        if not output.requires_grad:
            return

        def on_grad(dy):
            scale = loss_scale()
            if scale is not None and not bool(torch.isfinite(dy).all()):
                return
            alpha = 1.0 if scale is None else 1.0 / scale
            buf = acc() if callable(acc) else acc
            with torch.no_grad():
                if isinstance(layer, SparseDeltaEmbedding):
                    ids = x.reshape(-1)
                    rows = dy.reshape(-1, buf.shape[1])
                    if layer.padding_idx is not None:
                        rows = rows * (ids != layer.padding_idx).unsqueeze(1).to(rows.dtype)
                    buf.index_add_(0, ids, rows.to(buf.dtype), alpha=alpha)
                else:  # one GEMM with β = 1 in buf's dtype: no per-step O x I product
                    buf.addmm_(dy.reshape(-1, buf.shape[0]).t().to(buf.dtype), x.reshape(-1, buf.shape[1]).to(buf.dtype),
                               alpha=alpha)
        output.register_hook(on_grad)
    return hook


def _drop_and_regrow(indices: torch.Tensor, values: torch.Tensor, grad: torch.Tensor, n: int):
    """SpIEL's step on one tensor: (new sorted indices, their values, for each new entry its old
    position or −1). Drops the n smallest |values| (ties: lowest position), regrows the n
    largest |grad| among entries not kept (ties: lowest position); a dropped entry that is
    regrown keeps its place."""
    idx = indices.long()
    order = torch.sort(values.detach().abs(), stable=True).indices
    dropped = torch.zeros(idx.numel(), dtype=torch.bool, device=idx.device)
    dropped[order[:n]] = True
    kept = torch.zeros(grad.numel(), dtype=torch.bool, device=idx.device)
    kept[idx[~dropped]] = True
    score = grad.detach().abs().reshape(-1).clone()
    candidates = (~kept).nonzero().flatten()
    best = torch.sort(score[candidates], descending=True, stable=True).indices[:n]
    chosen = kept.clone()
    chosen[candidates[best]] = True
    new = chosen.nonzero().flatten()
    old_pos = torch.full((grad.numel(),), -1, dtype=torch.long, device=idx.device)
    old_pos[idx] = torch.arange(idx.numel(), device=idx.device)
    src = old_pos[new]
    new_values = torch.where(src >= 0, values.detach()[src.clamp(min=0)], torch.zeros((), dtype=values.dtype))
    return new.to(indices.dtype), new_values, src


def training_length(min_steps: int | None, max_steps: int | None, max_epochs: float | None, batches_per_epoch: int,
                    accumulation: int = 1) -> int:
    """Optimizer steps of one phase, by composable-sft's rule: epochs give the steps the HF
    Trainer runs for them, ceil(max_epochs × ceil(batches_per_epoch / accumulation)) (an epoch's
    leftover micro-batches make a step; batches // accumulation left them out: 1 epoch of 5
    batches at accumulation 2 trained 4); the smaller of those and max_steps wins, raised to
    min_steps when the epochs give fewer; without epochs, max_steps."""
    if max_epochs is None:
        return int(max_steps)
    steps = math.ceil(max_epochs * max(-(-batches_per_epoch // accumulation), 1))
    if max_steps is not None and steps >= max_steps:
        return int(max_steps)
    if min_steps is not None and steps < min_steps:
        return int(min_steps)
    return steps


_ADAMW_OPTIMS = frozenset({"adamw_torch", "adamw_torch_fused", "adamw_torch_xla", "adamw_torch_npu_fused"})
"""`TrainingArguments.optim` values whose math is torch's AdamW, the sparse phase's MaskedAdamW."""


class _StepBegin(TrainerCallback):
    """Tells the trainer that an optimizer step begins (the L1 term is added once per step)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_step_begin(self, args, state, control, **kwargs):
        self.trainer._l1_pending = True


def _unmark_prepared(trainer) -> None:
    """Under `TrainingArguments.torch_compile`, drop accelerate's "prepared" mark from the trainer's
    bare model before it trains. torch.compile's wrapper passes the mark on to the model it wraps,
    so the next prepare of that model (LT-SFT's next phase, another trainer on the same model or
    on a deepcopy of it) returned the bare model, which then trained uncompiled, silently."""
    if trainer.args.torch_compile:
        trainer.model.__dict__.pop("_is_accelerate_prepared", None)


def settle_loss_kwargs(trainer, inputs, num_items_in_batch) -> None:
    """Before a training step of an xlsparse Trainer: tell, once, whether the model's loss really
    follows `num_items_in_batch`. transformers passes it to any model whose forward takes
    **kwargs and then takes the loss as already summed over the accumulated batch: it neither
    divides it by the gradient accumulation steps G nor averages it over the P processes (it
    multiplies by P). A model whose loss is a mean and ignores it (transformers 5.25's BERT and
    XLM-R masked-LM heads) got G·P times the mean gradient and logged G times its loss, silently;
    LT-SFT's L1 term, added once a step, then pulled G·P times weaker than composable-sft's. The
    model's own loss at num_items_in_batch n and 2n tells: equal, it ignores it and the trainer
    treats it as a model without loss kwargs (the loss divided by G, no ×P); halved, it sums.
    Two no-grad forwards in eval mode, under a forked RNG, at the first step with a nonzero loss.
    Under DDP every process takes the verdict at the same step (summed over the processes): one
    whose first micro-batch had nothing labelled settled a step late, and meanwhile asked
    transformers for the batch's item count, a collective the settled processes no longer joined
    (they waited in DDP's gradient all-reduce: the run hung)."""
    if (getattr(trainer, "_loss_kwargs_settled", False) or not trainer.model_accepts_loss_kwargs
            or num_items_in_batch is None or trainer.compute_loss_func is not None
            or trainer.loss_is_scaled_for_ga is not None):
        return
    model = trainer.model
    training = model.training
    cuda = [d.index for d in {p.device for p in model.parameters()} if d.type == "cuda"]
    losses = []
    with torch.no_grad(), torch.random.fork_rng(devices=cuda), trainer.compute_loss_context_manager():
        model.eval()
        try:
            for n in (num_items_in_batch, 2 * num_items_in_batch):
                losses.append(trainer.compute_loss(model, dict(inputs), num_items_in_batch=n).detach().float())
        finally:
            model.train(training)
    first, second = losses
    told = bool(torch.isfinite(first)) and float(first) != 0  # nothing labelled here: tell at a later step
    ignores = told and torch.allclose(second, first, rtol=1e-3, atol=0)  # a summed loss halves: far outside 1e-3
    verdicts = all_reduce_scores([torch.tensor([float(ignores), float(told and not ignores)], device=first.device)])[0]
    if verdicts.sum() == 0:
        return
    if verdicts.all():
        raise RuntimeError("settle_loss_kwargs: the processes disagree on whether the model's loss follows "
                           "num_items_in_batch")
    trainer.model_accepts_loss_kwargs = bool(verdicts[1])
    trainer._loss_kwargs_settled = True


def _refuse_replaced_parameters(what: str, holds: str, args) -> None:
    """One rule for every xlsparse trainer that holds the model's parameters (`holds` says what):
    refuse, before anything is built or converted, the frameworks that replace them when train()
    wraps the model. Accelerate's FSDP plugin (and DeepSpeed's ZeRO-3) swap every parameter for
    a new, sharded one; DeepSpeed's ZeRO 1/2 and its fp16/bf16 optimizers point the optimizer at
    flat fp32 copies, and an `optimizer` in its config replaces ours with a dense one. `args`
    (TrainingArguments, or None for the Trainer's default) holds what TrainingArguments made of
    its fields and of ACCELERATE_USE_DEEPSPEED; `accelerate launch` asks the Accelerator through
    the environment. On a CPU accelerate drops these plugins and trains DDP: refused there too."""
    env = lambda key: os.environ.get(key, "false").lower() == "true"  # as the Accelerator reads them
    for framework, fields, key in (("Accelerate's FSDP plugin", ("fsdp", "fsdp_plugin_args"), "ACCELERATE_USE_FSDP"),
                                   ("DeepSpeed", ("deepspeed", "deepspeed_plugin"), "ACCELERATE_USE_DEEPSPEED")):
        field = next((f for f in fields if getattr(args, f, None)), None)
        if field is not None:
            setting = f"TrainingArguments.{field} = {getattr(args, field)!r:.80}"
        elif env(key):
            setting = f"{key}=true (accelerate launch)"
        else:
            continue
        raise ValueError(f"{setting}: {what} does not run under {framework} ({what} holds {holds}; {framework} "
                         "replaces the parameters or the optimizer when train() wraps the model); train it in one "
                         "process or under DDP")


def _trainer_argument(name: str, args: tuple, kwargs: dict):
    """The value given for `name` to a Trainer's __init__(model, args, data_collator, train_dataset,
    ...), by keyword or by position, before it runs; None when not given."""
    if name in kwargs:
        return kwargs[name]
    at = list(inspect.signature(Trainer.__init__).parameters).index(name) - 1  # less self
    return args[at] if at < len(args) else None


def _training_args(args: tuple, kwargs: dict):
    """The TrainingArguments given to a Trainer's __init__(model, args, ...), before it runs."""
    return _trainer_argument("args", args, kwargs)


def _refuse_compiled(what: str, args: tuple, kwargs: dict) -> None:
    """The model given to a Trainer's __init__(model, ...) must not be torch.compile's wrapper: it
    names every parameter `_orig_mod.<name>`, which none of the trainer's names (maskable
    parameters, masks, converted layers) match; an LT-SFT run found "0 maskable entries"."""
    model = kwargs["model"] if "model" in kwargs else args[0] if args else None
    if model is not None and _uncompiled(model) is not model:
        raise ValueError(f"{what}: the model is wrapped by torch.compile; pass the model itself, and set "
                         "TrainingArguments(torch_compile=True) to have the trainer compile it")


class LotteryTicketSparseFineTuner(Trainer):
    """`Trainer` that runs LT-SFT as composable-sft does (module docstring) and leaves the result
    in `self.sft` (a `SparseDiff`: deltas of the maskable parameters, heads as absolute entries).

    Args (besides the Trainer's):
        sft_args: `SftArguments` (or `DynamicSftArguments` for SpIEL-style reselection).
        maskable_params: names of the parameters to fine-tune sparsely (default: every trainable
            parameter under `model.base_model_prefix`); names frozen (by the model or the
            SftArguments' freezing) are left out, and count neither in K nor in the selection.
        source_sfts: {source: SparseDiff} for multi-source training: a batch whose `_source` key
            names a source runs its forward and backward with that SFT applied, reverted before
            the L1 term, the gradient masking and the optimizer step (see `MultiSourceDataset`).
            `source_sft_apply_abs` also applies its absolute entries, for the forward and backward
            only: a trainable parameter they replace (a head) gets its own value back and the step
            updates it (composable-sft's apply makes the head the source's own tensor and its
            revert leaves it there, so the steps trained the sources' heads in turn). A
            source with no SFT raises (`SparseDiff({})` trains it on the bare model), and so does,
            at construction, an SFT the model cannot take.
        labelled_positions_only: masked-LM models only (a ValueError otherwise). Each training
            step runs the output embeddings (the vocabulary projection) and the loss on the
            positions whose label is not -100, as the model's own loss would weigh them: the loss
            and every gradient are the same, but a data collator that labels 15% of the positions
            leaves 15% of the projection's and its log-softmax's work (XLM-R: a 250002-way matrix,
            most of a step's FLOPs). Evaluation runs the whole projection (metrics may read the
            logits). A forward that does not pass [batch, sequence, hidden] states to
            `get_output_embeddings()` raises a RuntimeError at the first step; with
            `TrainingArguments.torch_compile` it is a ValueError.
        fused_cross_entropy: masked-LM models only (a ValueError otherwise, and with a
            `label_smoothing_factor` or a `compute_loss_func`). Each training step calls the model
            without labels and computes the cross-entropy of its logits with xlsparse's fused
            log-softmax + NLL (`functional.ensemble_nll` with one expert): no [tokens, vocab]
            log-probabilities and no dense NLL gradient are written (XLM-R at 2048 tokens: three
            2 GB tensors each step). The first step learns which loss the model computes: the mean over
            the labelled positions (`CrossEntropyLoss()`, most models) or their sum over
            `num_items_in_batch` (models that take loss kwargs), by comparing the model's own loss
            with a `num_items_in_batch` that tells the two apart; a model whose loss is neither raises
            a ValueError. Evaluation runs the model's own loss.

    `train()` writes each phase's checkpoints into its own folder under `args.output_dir`
    (`full/`, `sparse/`, or `iteration-<i>/full/` ... with several rounds); every sparse-phase
    checkpoint and `save_model` after a sparse phase also hold the SFT so far as `sft.safetensors`.
    Accelerate's FSDP plugin and DeepSpeed (`TrainingArguments.fsdp` / `.deepspeed`, or `accelerate
    launch` with either) are refused with a ValueError at construction, and so are `model_init` and
    a model holding an `nn.Embedding` with `max_norm`. A trainable parameter stored with other
    strides (a transposed weight) is given row-major storage at construction: the same values in
    the same Parameter. `TrainingArguments.torch_compile` compiles every phase, each sparse phase
    with its SparseDelta layers. A model whose loss is a mean that ignores `num_items_in_batch`
    (BERT's and XLM-R's masked-LM heads) has it divided by the gradient accumulation steps and
    not multiplied by the processes (`settle_loss_kwargs`), where transformers 5.25 adds the
    micro-batch means.
    """

    def __init__(self, *args, sft_args: SftArguments | None = None, maskable_params=None, source_sfts=None,
                 source_sft_apply_abs: bool = False, labelled_positions_only: bool = False,
                 fused_cross_entropy: bool = False, **kwargs):
        # Accelerate's FSDP plugin swaps every parameter for a new, sharded one when train() wraps
        # the model: θ0, the selection and phase 2's layers would read the old, untrained ones
        # (|θ − θ0| = 0 everywhere, so the first K entries were selected); DeepSpeed replaces the
        # parameters (ZeRO-3) or what the optimizer steps
        _refuse_replaced_parameters("LotteryTicketSparseFineTuner", "θ0, the selection and the sparse phase's layers "
                                    "and optimizer", _training_args(args, kwargs))
        _refuse_compiled("LotteryTicketSparseFineTuner", args, kwargs)
        # here, not at the first multi-source step after the full phase has run
        flag("LotteryTicketSparseFineTuner", "source_sft_apply_abs", source_sft_apply_abs)
        self.labelled_positions_only = flag("LotteryTicketSparseFineTuner", "labelled_positions_only",
                                            labelled_positions_only)
        self.fused_cross_entropy = flag("LotteryTicketSparseFineTuner", "fused_cross_entropy", fused_cross_entropy)
        self._loss_rule = None  # fused_cross_entropy's: "mean" or "per item", learnt at the first step
        model = kwargs.get("model", args[0] if args else None)
        for name in ("labelled_positions_only", "fused_cross_entropy"):
            if getattr(self, name) and not (type(model).__name__.endswith("ForMaskedLM")
                                            and _output_head(model) is not None):
                # a causal LM shifts its labels by one position: 1-D labels of the kept positions would not
                raise ValueError(f"{name}: a masked-LM model with output embeddings is needed, got "
                                 f"{type(model).__name__}")
        super().__init__(*args, **kwargs)
        if self.fused_cross_entropy and (self.label_smoother is not None or self.compute_loss_func is not None):
            raise ValueError("fused_cross_entropy: the loss would be label_smoothing_factor's or compute_loss_func's, "
                             "not the model's cross-entropy; set fused_cross_entropy=False")
        if self.labelled_positions_only and self.args.torch_compile:
            # its hook, put on and taken off around each step, made the compiled graphs recompile
            # (a tiny BERT's 12 steps: 28 graphs against 20, 3x the time)
            raise ValueError("labelled_positions_only: not with TrainingArguments.torch_compile")
        if self.model_init is not None:
            # the Trainer's train() builds a fresh model from model_init, and each phase is a train():
            # phase 2 started over from it, and the selection read the first model (an SFT of zeros)
            raise ValueError("model_init: LotteryTicketSparseFineTuner runs each phase as a train(), which would build "
                             "a fresh model from model_init every time; pass model= instead")
        self.sft_args = sft_args or SftArguments()
        if not isinstance(self.sft_args, SftArguments):
            raise TypeError(f"sft_args must be an SftArguments, got {type(self.sft_args).__name__}")
        _refuse_max_norm(self.model, "LotteryTicketSparseFineTuner")
        # θ0, the global top-K selection and the tied-weight lookups read whole tensors: a model
        # sharded with fully_shard failed here with a raw "invalid python storage" error
        refuse_sharded("LotteryTicketSparseFineTuner", dict(self.model.named_parameters()),
                       "Train it unsharded (DDP): phase 2's layers and MaskedAdamW shard, the trainer does not")
        # The sparse phase always steps with compact MaskedAdamW (AdamW's math with args' lr, betas,
        # eps, weight decay): any other optimizer would run in the full phase only
        optim = str(getattr(self.args.optim, "value", self.args.optim))
        if optim not in _ADAMW_OPTIMS:
            raise ValueError(f"TrainingArguments.optim = {optim!r}: LotteryTicketSparseFineTuner's sparse phase trains with "
                             f"AdamW (compact MaskedAdamW); use one of {sorted(_ADAMW_OPTIMS)}")
        # a scheduler given alone too: every phase builds its own from the TrainingArguments (it was dropped)
        if getattr(self, "optimizer_cls_and_kwargs", None) is not None or self.optimizer is not None \
                or self.lr_scheduler is not None:
            raise ValueError("LotteryTicketSparseFineTuner builds each phase's optimizer itself (AdamW from the "
                             "TrainingArguments; compact MaskedAdamW in sparse phases): `optimizers` and "
                             "`optimizer_cls_and_kwargs` would be ignored")
        self.sft: SparseDiff | None = None
        self._sft_at_end: SparseDiff | None = None  # the last sparse phase's deltas, until the model trains again
        self._phase = "full"
        # every name of each tensor as the model came (tied): a maskable list computed on it names the
        # tied matrix as transformers does, which the untying below leaves to the word embeddings alone
        came_as = {}
        for n, p in self.model.named_parameters(remove_duplicate=False):
            came_as.setdefault(id(p), []).append(n)
        self._untie_and_freeze()
        self._names = _canonical_names(self.model)
        params = {name: p for p, name in self._names.values()}
        self.num_params = sum(p.numel() for p in params.values())
        trainable = {n: p for n, p in params.items() if p.requires_grad}
        if maskable_params is None:
            prefix = getattr(self.model, "base_model_prefix", "")
            under = prefix and hasattr(self.model, prefix)
            if under:
                maskable = [n for n in trainable if n.startswith(prefix + ".")]
            else:  # no body under the prefix ((m)T5): an untied output embedding is the head, as freeze_head reads it
                out = _output_head(self.model)
                head = out.weight if out is not None and out.weight is not self.model.get_input_embeddings().weight else None
                maskable = [n for n, p in trainable.items() if p is not head]
        else:
            if isinstance(maskable_params, str):  # read one character at a time: "no parameters ['b', 'e', ...]"
                raise ValueError(f"maskable_params: expected parameter names (a list), got the string {maskable_params!r}")
            # a generator was used up by the check below, leaving no maskable parameter ("0 maskable entries")
            maskable_params = list(maskable_params)
            aliases = {alias: name for p, name in self._names.values() for alias in _aliases(self.model, p)}
            unknown = [n for n in maskable_params if n not in aliases]
            if unknown:
                raise ValueError(f"maskable_params: the model has no parameters {unknown[:5]}")
            maskable = [aliases[n] for n in maskable_params if params[aliases[n]].requires_grad]
            # composable-sft's list (names under the prefix) misses a matrix transformers 5 names by its head first
            prefix = getattr(self.model, "base_model_prefix", "") or ""
            # (by the names the model came with: freeze_decoder, freeze_head and untie_embeddings left the
            # word embeddings no head name, and they were trained whole without a word)
            head_alias = {name: alias for p, name in self._names.values() for alias in came_as.get(id(p), [])
                          if prefix and name.startswith(prefix + ".") and not alias.startswith(prefix + ".")
                          and name not in maskable and p.requires_grad}
            if head_alias:
                name, alias = next(iter(head_alias.items()))
                warnings.warn(f"maskable_params leaves out {list(head_alias)}, tied to a head that transformers names first "
                              f"({alias!r}): it will be trained whole and stored as an absolute entry; add its name to "
                              "maskable_params to fine-tune it sparsely", stacklevel=2)
        self.maskable = [n for n in dict.fromkeys(maskable) if not any(re.search(p, n) for p in self.sft_args.maskable_exclude)]
        self.num_maskable = sum(params[n].numel() for n in self.maskable)
        a = self.sft_args
        if isinstance(a, DynamicSftArguments) and not any(params[n].dim() > 1 for n in self.maskable):
            # biases and norms keep their support: the run was static LT-SFT under the dynamic name
            raise ValueError("DynamicSftArguments: no maskable parameter is a matrix (maskable_params and "
                             "maskable_exclude leave only biases and norms, whose supports are not reselected); "
                             "use SftArguments for static LT-SFT")
        self._num_tunable = a.ft_params_num if a.ft_params_num is not None else int(a.ft_params_proportion * self.num_maskable)
        if self._num_tunable > self.num_maskable:
            raise ValueError(f"SftArguments.ft_params_num = {self._num_tunable} exceeds the {self.num_maskable} maskable entries")
        if self._num_tunable // a.n_ft_iterations == 0:  # an SFT of 0 entries after a whole training run
            raise ValueError(f"SftArguments: K = {self._num_tunable} (ft_params_num, or ft_params_proportion × "
                             f"{self.num_maskable} maskable entries) selects no entry in each of the {a.n_ft_iterations} "
                             "n_ft_iterations rounds (K // n_ft_iterations = 0); raise K or lower n_ft_iterations")
        if self.accelerator.num_processes > 1:
            # DDP trains process 0's model (its first sync broadcasts it), so θ0, the selection, the
            # rewind and the L1 pull must start from it too: a model built from a per-process seed
            # (a new head, say) sent each process's L1 pull and rewind elsewhere, and the replicas drifted
            with torch.no_grad():
                for p in params.values():
                    if not _is_dtensor(p):  # a sharded parameter holds one value for all processes
                        torch.distributed.broadcast(p.data, src=0)
        with torch.no_grad():
            self._theta0 = {n: p.detach().clone() for n, p in trainable.items()}
        self._masks: dict[str, torch.Tensor] = {}  # name: sorted flat indices selected so far
        self._l1_pending, self._l1_sum, self._l1_steps = False, 0.0, 0
        self.add_callback(_StepBegin(self))
        self._reselection = _Reselection(self) if isinstance(self.sft_args, DynamicSftArguments) else None
        if self._reselection is not None:
            self.add_callback(self._reselection)
        if source_sfts is not None and (not isinstance(source_sfts, dict)
                                        or not all(isinstance(d, SparseDiff) for d in source_sfts.values())):
            raise TypeError("source_sfts must be a dict {source: SparseDiff}")
        if self.accelerator.dispatch_batches and self.accelerator.num_processes > 1 \
                and any(isinstance(d, MultiSourceDataset) for d in (self.train_dataset, self.eval_dataset)):
            # the main process would concatenate and broadcast the batches, and accelerate moves
            # tensors only: the batch's source (a string) stopped training with a TypeError
            raise ValueError("TrainingArguments.accelerator_config.dispatch_batches = True: a MultiSourceDataset's "
                             "batches name their source, which accelerate cannot dispatch; leave dispatch_batches "
                             "off (split_batches works)")
        caps = {a.full_ft_max_steps_per_iteration, a.sparse_ft_max_steps_per_iteration}
        unused = []  # each phase sets max_steps itself, which the Trainer reads before num_train_epochs
        if self.args.max_steps > 0 and self.args.max_steps not in caps:
            unused.append(f"max_steps = {self.args.max_steps}")
        epochs = {a.full_ft_max_epochs_per_iteration, a.sparse_ft_max_epochs_per_iteration}
        default_epochs = TrainingArguments.__dataclass_fields__["num_train_epochs"].default
        if self.args.num_train_epochs not in epochs | {default_epochs}:  # the default: nothing was asked
            unused.append(f"num_train_epochs = {self.args.num_train_epochs}")
        if unused:
            warnings.warn(f"TrainingArguments.{' and '.join(unused)} {'is' if len(unused) == 1 else 'are'} not used: "
                          "each LT-SFT phase runs SftArguments' *_ft_max_steps_per_iteration or "
                          "*_ft_max_epochs_per_iteration (the smaller), as in composable-sft", stacklevel=2)
        strategy = self.args.train_sampling_strategy
        if isinstance(self.train_dataset, MultiSourceDataset) and strategy not in ("random", "sequential"):
            # its batches come from SingleSourceBatchSampler, one source each: the Trainer's sampler is not used
            raise ValueError(f"TrainingArguments.train_sampling_strategy = {strategy!r}: a MultiSourceDataset is "
                             "batched one source at a time, shuffled ('random') or in order ('sequential')")
        evals = self.eval_dataset.values() if isinstance(self.eval_dataset, dict) else [self.eval_dataset]
        for dataset in evals:
            self._refuse_sharded_evaluation(dataset)
        self.source_sfts = source_sfts
        self.source_sft_apply_abs = source_sft_apply_abs
        for source, diff in (source_sfts or {}).items():
            # one the model cannot take (a name it lacks, another shape) raised a bare KeyError at its first batch
            try:
                apply([diff], self.model, with_abs=source_sft_apply_abs).revert()
            except (KeyError, ValueError) as e:
                raise ValueError(f"source_sfts[{source!r}]: {e.args[0] if e.args else e}") from e
        for dataset in [self.train_dataset, *evals]:  # here, not at the source's first batch
            self._refuse_unknown_sources(dataset)
        self._converted: dict = {}
        self._anchors: dict = {}
        decay = set(self.get_decay_parameter_names(self.model))
        self._decayed = {name for p, name in self._names.values() if any(a in decay for a in _aliases(self.model, p))}

    def num_tunable(self) -> int:
        """K: the number of entries the SFT may change (over all `n_ft_iterations` rounds)."""
        return self._num_tunable

    # --- model surgery done once, at construction (composable-sft's scripts do it before) ---
    def _untie_and_freeze(self) -> None:
        a, model = self.sft_args, self.model
        inp = model.get_input_embeddings()
        out = _output_head(model)
        tied = out is not None and out.weight is inp.weight
        for flag in ("untie_embeddings", "freeze_decoder"):
            if getattr(a, flag) and out is None:
                raise ValueError(f"SftArguments.{flag}: the model has no output embeddings")
        if a.untie_embeddings and not tied:
            raise ValueError("SftArguments.untie_embeddings: the output embeddings are not tied to the input embeddings")
        flags = [f for f in ("freeze_head", "freeze_decoder") if getattr(a, f)]
        if flags and out is not None and out.weight.shape[0] != inp.weight.shape[0]:
            # not the vocabulary projection (DeBERTa-v2 with legacy=False returns its head's hidden-size dense
            # and projects with the word embeddings themselves): freeze_decoder froze that dense, and the
            # decoder, trained with the input embeddings, had no frozen copy under either flag
            raise ValueError(f"SftArguments.{', '.join(flags)}: {type(model).__name__}.get_output_embeddings() has a "
                             f"weight of shape {tuple(out.weight.shape)}, not one row per token of the input "
                             f"embeddings' {tuple(inp.weight.shape)}: it is not the decoder these flags give a frozen copy")
        if tied and (a.freeze_head or a.untie_embeddings or a.freeze_decoder):
            # the flag set below is read by some forwards (SwitchTransformers and UDOP scale the decoder
            # output by d_model^-0.5 only when tied): untied, the model computed other logits before any step
            try:
                reads_flag = "tie_word_embeddings" in inspect.getsource(type(model).forward)
            except (OSError, TypeError):
                reads_flag = False
            if reads_flag:
                flags = [f for f in ("freeze_head", "untie_embeddings", "freeze_decoder") if getattr(a, f)]
                raise ValueError(f"SftArguments.{', '.join(flags)}: {type(model).__name__}'s forward reads "
                                 "config.tie_word_embeddings, which untying sets to False: the model would compute "
                                 "something else before training; train it with its embeddings tied")
            out.weight = nn.Parameter(inp.weight.detach().clone())
            model.config.tie_word_embeddings = False  # save/load must not tie them again
        if a.freeze_head:
            prefix = getattr(model, "base_model_prefix", "")
            if prefix and hasattr(model, prefix):
                body = {id(p) for p in getattr(model, prefix).parameters()}
                for p in model.parameters():
                    if id(p) not in body:
                        p.requires_grad_(False)
            elif out is not None:  # no body under the prefix ((m)T5's "transformer"): the LM head is the output embeddings
                for p in out.parameters():
                    p.requires_grad_(False)
            else:
                raise ValueError(f"SftArguments.freeze_head: the model has no base model under base_model_prefix "
                                 f"{prefix!r} and no output embeddings: it names no head to freeze")
        if a.untie_embeddings:  # as composable-sft, which unties after freezing the head: the copy trains
            out.weight.requires_grad_(True)
        if a.freeze_decoder:
            out.weight.requires_grad_(False)
        if a.freeze_embeddings:
            inp.weight.requires_grad_(False)
        if a.freeze_layer_norm:
            for name, p in model.named_parameters(remove_duplicate=False):
                if any(re.search(pat, name) for pat in a.layer_norm_patterns):
                    p.requires_grad_(False)
        # The sparse phase's MaskedAdamW steps flat storage and refuses a strided weight it trains
        # (one shared by two linears is not converted), which it found only after phase 1 had run:
        # the same values in row-major storage, in the same Parameter (tied modules keep sharing it).
        # A strided view of another tensor's storage would be untied by the copy: refused.
        strided = [(n, p) for n, p in model.named_parameters() if p.requires_grad and not p.is_contiguous()]
        owners = {}
        for n, t in [*model.named_parameters(), *model.named_buffers()] if strided else ():
            owners.setdefault(t.untyped_storage().data_ptr(), []).append((n, t))
        for name, p in strided:
            views = [n for n, t in owners[p.untyped_storage().data_ptr()] if t is not p]
            if views:
                raise ValueError(f"LotteryTicketSparseFineTuner: parameter {name!r} is a strided view of the storage "
                                 f"of {views}; the sparse phase needs it row-major, and a copy would untie them. "
                                 "Tie them as one Parameter, or give it its own contiguous storage")
        for _, p in strided:
            p.data = p.data.contiguous()

    def _params(self) -> dict[str, torch.nn.Parameter]:
        """Every parameter of the model once, by its canonical name."""
        return {name: p for p, name in self._names.values()}

    def _trainable(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self._params().items() if n in self._theta0}

    # --- training ---
    def train(self, resume_from_checkpoint=None, **kwargs):
        """All rounds of full phase, selection, rewind and sparse phase; returns the last sparse
        phase's `TrainOutput` and sets `self.sft`.

        `resume_from_checkpoint`: a sparse phase's checkpoint folder (`<output_dir>/sparse/
        checkpoint-N`, or `.../iteration-<i>/sparse/checkpoint-N`). The trainer must be built on
        the same base model and arguments (a checkpoint whose SFT has another size or touches
        parameters that are not maskable here raises, and so does one whose frozen parameters, or
        maskable ones off its SFT's entries, differ from this model's, one whose heads started from
        other values when the L1 term pulls them toward θ0, and one whose sparse phase ran with
        other settings: static or dynamic, reselection_steps, drop_fraction,
        selection_accumulation_steps, sparse_l1_reg, apply_reg_to_sparse_only, and for multi-source
        training source_sft_apply_abs); the masks, deltas,
        heads, optimizer, scheduler, RNG and data position come from the checkpoint, and training
        continues bit-exactly (then runs any later rounds; the checkpoint of a sparse phase's last
        step goes on with the next round; if none is left, the phase trains no step and its
        `TrainOutput` holds the checkpoint's global step). Full-phase
        checkpoints cannot be resumed (the round's selection would need the whole phase), nor those written with
        `save_only_model=True` (no optimizer state). With `DynamicSftArguments` a checkpoint
        inside a gradient accumulation window holds the gradients summed so far, one file per
        process, and is resumed with as many processes."""
        if self._masks and resume_from_checkpoint is None:  # composable-sft clears its masks here; kept, they would add K more entries
            raise ValueError("LotteryTicketSparseFineTuner.train() ran already (its masks and θ0 are that run's): "
                             "build a new trainer on the base model to train another SFT")
        a = self.sft_args
        steps = self._phase_steps("sparse")  # here: one it cannot tell raised only after a whole full phase
        if isinstance(a, DynamicSftArguments):  # every round's sparse phase has this length
            if steps <= a.reselection_steps:  # a reselection follows every reselection_steps-th step but the last
                raise ValueError(f"DynamicSftArguments.reselection_steps = {a.reselection_steps}: the sparse phase "
                                 f"runs {steps} optimizer steps, so no reselection would run and the result would be "
                                 f"static LT-SFT; give reselection_steps < {steps}")
        n = a.n_ft_iterations
        root, max_steps = self.args.output_dir, self.args.max_steps  # set per phase; the caller's again at the end
        result, first = None, 0
        try:
            if resume_from_checkpoint is not None:  # new checkpoints go to this run's output_dir, as HF's do
                first, deltas = self._restore(resume_from_checkpoint)
                result = self._run_phase("sparse", first, root, resume_from_checkpoint=resume_from_checkpoint,
                                         resumed_deltas=deltas, **kwargs)
                first += 1
            for it in range(first, n):
                with torch.no_grad():
                    start = {name: p.detach().clone() for name, p in self._trainable().items()}
                self._run_phase("full", it, root, **kwargs)
                self._select(self._num_tunable // n)
                with torch.no_grad():
                    for name, p in self._trainable().items():
                        p.copy_(start[name])
                del start
                result = self._run_phase("sparse", it, root, **kwargs)
        finally:
            self.args.output_dir, self.args.max_steps = root, max_steps
        self.sft = self._sft_at_end
        return result

    def _restore(self, checkpoint) -> tuple[int, dict]:
        """Masks and parameter values of a sparse-phase checkpoint: (round, deltas)."""
        if not isinstance(checkpoint, (str, os.PathLike)) or not os.path.isdir(checkpoint):
            raise ValueError(f"resume_from_checkpoint: expected a checkpoint folder, got {checkpoint!r}")
        phase_dir = os.path.dirname(os.path.abspath(checkpoint))
        if os.path.basename(phase_dir) != "sparse":
            raise ValueError(f"resume_from_checkpoint: {checkpoint} is not a sparse phase's checkpoint "
                             "(<output_dir>/sparse/checkpoint-N); full phases cannot be resumed")
        it = 0
        if self.sft_args.n_ft_iterations > 1:
            found = re.fullmatch(r"iteration-(\d+)", os.path.basename(os.path.dirname(phase_dir)))
            if found is None:
                raise ValueError(f"resume_from_checkpoint: {checkpoint} is not under an iteration-<i> folder")
            it = int(found.group(1))
        n = self.sft_args.n_ft_iterations
        if it >= n:
            raise ValueError(f"resume_from_checkpoint: {checkpoint} is round {it}, but n_ft_iterations = {n}")
        _refuse_model_only(checkpoint)
        sft = SparseDiff.load(os.path.join(checkpoint, SFT_FILE))
        # a run built with other arguments would train on the checkpoint's support and silently
        # leave an SFT with other than K entries
        foreign = sorted(set(sft.deltas) - set(self.maskable))
        if foreign:
            raise ValueError(f"resume_from_checkpoint: {checkpoint}'s SFT changes {foreign[:5]}, which this trainer's "
                             "maskable parameters do not hold (build it with the checkpoint's run's arguments)")
        expected = (it + 1) * (self._num_tunable // n)
        if sft.nnz != expected:
            raise ValueError(f"resume_from_checkpoint: {checkpoint}'s SFT has {sft.nnz} entries, but round {it} of these "
                             f"SftArguments has selected {expected} (K = {self._num_tunable}, n_ft_iterations = {n}): "
                             "build the trainer with the checkpoint's run's arguments")
        path = os.path.join(checkpoint, SPARSE_PHASE_FILE)
        if not os.path.isfile(path):
            raise ValueError(f"resume_from_checkpoint: {checkpoint} holds no {SPARSE_PHASE_FILE}, the settings its "
                             "sparse phase ran with (an older xlsparse did not write it); it cannot be resumed")
        with open(path) as f:
            saved = json.load(f)
        # written before reselection_rate_policy existed: its dynamic runs dropped at a constant rate
        saved.setdefault("reselection_rate_policy", "constant" if saved.get("dynamic") else None)
        mine = self._sparse_phase_settings()
        # written before source_sft_apply_abs or the phase's length were recorded: not known, so not checked
        saved.setdefault("source_sft_apply_abs", mine["source_sft_apply_abs"])
        saved.setdefault("sparse_phase_steps", mine["sparse_phase_steps"])
        saved.setdefault("source_sfts", mine["source_sfts"])
        differs = [f"{k} = {saved.get(k)!r} (this trainer: {v!r})" for k, v in mine.items() if saved.get(k) != v]
        if differs:  # the resumed steps would train another run's way than the one that wrote the checkpoint
            raise ValueError(f"resume_from_checkpoint: {checkpoint}'s run trained its sparse phase with "
                             f"{', '.join(differs)}: build the trainer with the checkpoint's run's arguments "
                             "(dynamic: DynamicSftArguments)")
        if "gradient_sums" not in saved and saved.get("dynamic"):  # a KeyError before
            raise ValueError(f"resume_from_checkpoint: {checkpoint}'s {SPARSE_PHASE_FILE} was written by an older "
                             "xlsparse that did not record whether it lies inside a reselection's gradient window "
                             "(whose sums it did not save); a dynamic run's checkpoint from it cannot be resumed")
        processes = saved.get("gradient_sums", 0)  # static runs keep no sums
        if processes and processes != self.args.world_size:
            raise ValueError(f"resume_from_checkpoint: {checkpoint} lies inside a reselection's gradient window, whose "
                             f"sums each of its run's {processes} processes kept for its own batches; resume it with "
                             f"{processes} processes (this run has {self.args.world_size})")
        sums = {}
        if processes:
            from safetensors.torch import load_file

            path = os.path.join(checkpoint, GRADIENT_SUMS_FILE.format(self.args.process_index))
            if not os.path.isfile(path):
                raise ValueError(f"resume_from_checkpoint: {checkpoint} lies inside a reselection's gradient window "
                                 f"but holds no {os.path.basename(path)}, this process's sums so far")
            sums = load_file(path)
        weights = _load_weights(checkpoint)
        # off the SFT's entries the checkpoint's maskable weights are its run's θ0, and its frozen
        # parameters are that θ0 whole: the resume loads neither, so another frozen part (embeddings
        # under freeze_embeddings, say) silently trained the checkpoint's SFT on another base
        base = {n: self._theta0[n] for n in self.maskable}
        base.update({n: p.detach() for n, p in self._params().items() if n not in self._theta0})
        _refuse_another_base(checkpoint, self.model, weights, base, {n: d.indices for n, d in sft.deltas.items()})
        a = self.sft_args
        if not a.apply_reg_to_sparse_only and (a.sparse_l1_reg or (a.full_l1_reg and it + 1 < n)):
            # the L1 term pulls what trains whole toward its θ0, which the checkpoint holds only as
            # fingerprints (none in one written before them): a head initialised anew (another seed)
            # was pulled toward other values, silently
            heads = saved.get("head_theta0") or {}
            other = [h for h, fp in self._head_fingerprints().items() if h in heads and tuple(heads[h]) != tuple(fp)]
            if other:
                raise ValueError(f"resume_from_checkpoint: {checkpoint}'s run started {other[:3]}, trained whole, from "
                                 "other values than this model's, and the L1 term (full_l1_reg / sparse_l1_reg) pulls "
                                 "them toward those: build the trainer on the checkpoint's run's model (initialise "
                                 "its head with the same seed)")
        masks = {}  # the checkpoint's alone: a run before this one must not leave its own
        with torch.no_grad():
            for name, p in self._trainable().items():
                if name in sft.deltas:
                    masks[name] = sft.deltas[name].indices.to(p.device)
                key = next((a for a in _aliases(self.model, p) if a in weights), None)
                if key is not None:  # exact values of biases, norms and heads
                    p.copy_(weights[key])
                elif name not in sft.deltas:
                    raise ValueError(f"resume_from_checkpoint: {checkpoint} holds no value for {name!r}")
        self._masks = masks
        if sums:
            self._reselection.grads = {name: g.to(self._theta0[name].device) for name, g in sums.items()}
        return it, sft.deltas

    def _head_fingerprints(self) -> dict:
        """{name: fingerprint of θ0} of the trainable parameters that are not maskable (trained whole),
        computed once (θ0 does not change)."""
        if getattr(self, "_heads_theta0", None) is None:
            self._heads_theta0 = {n: list(_fingerprint(t)) for n, t in self._theta0.items() if n not in self.maskable}
        return self._heads_theta0

    def _sparse_phase_settings(self) -> dict:
        """What decides a sparse phase's steps besides K and n_ft_iterations (checked from the SFT),
        the base model and the data (`SPARSE_PHASE_FILE`)."""
        a = self.sft_args
        dynamic = isinstance(a, DynamicSftArguments)
        reselection = {k: getattr(a, k) if dynamic else None
                       for k in ("reselection_steps", "drop_fraction", "selection_accumulation_steps",
                                 "reselection_rate_policy")}
        # multi-source: whether the source SFTs' heads go in changes every step (None: one source)
        heads = self.source_sft_apply_abs if self.source_sfts is not None else None
        # a decaying drop rate reads the phase's length: another length drops other shares at each step
        decays = dynamic and a.reselection_rate_policy != "constant"
        if self.source_sfts is not None and getattr(self, "_source_digests", None) is None:  # the SFTs do not change
            self._source_digests = {s: _diff_digest(d) for s, d in sorted(self.source_sfts.items())}
        return {"dynamic": dynamic, **reselection, "sparse_l1_reg": a.sparse_l1_reg,
                "apply_reg_to_sparse_only": a.apply_reg_to_sparse_only, "source_sft_apply_abs": heads,
                "sparse_phase_steps": self._phase_steps("sparse") if decays else None,
                # a resume with other source SFTs trained on under other ones, silently
                "source_sfts": self._source_digests if self.source_sfts is not None else None}

    def _phase_dir(self, phase: str, it: int, root: str) -> str:
        return os.path.join(root, phase) if self.sft_args.n_ft_iterations == 1 else os.path.join(root, f"iteration-{it}", phase)

    def _phase_steps(self, phase: str) -> int:
        """Optimizer steps of every round's `phase` ("full" or "sparse"): `training_length` of the
        SftArguments and the training batches."""
        a = self.sft_args
        epochs = getattr(a, f"{phase}_ft_max_epochs_per_iteration")
        loader = self.get_train_dataloader() if epochs is not None else None
        if loader is not None and not has_length(loader):  # len() raised a bare TypeError
            raise ValueError(f"SftArguments.{phase}_ft_max_epochs_per_iteration = {epochs}: the training data has no "
                             f"length (an IterableDataset), so epochs give no number of steps; give {phase}_ft_max_"
                             "steps_per_iteration alone")
        steps = training_length(getattr(a, f"{phase}_ft_min_steps_per_iteration"),
                                getattr(a, f"{phase}_ft_max_steps_per_iteration"), epochs,
                                len(loader) if loader is not None else 0, self.args.gradient_accumulation_steps)
        if steps < 1:  # the HF Trainer would train num_train_epochs instead
            raise ValueError(f"SftArguments: the {phase} phase gives no optimizer step ({phase}_ft_max_epochs_per_"
                             f"iteration = {epochs}, {phase}_ft_max_steps_per_iteration = "
                             f"{getattr(a, f'{phase}_ft_max_steps_per_iteration')})")
        return steps

    def _update_auto_batch_size(self, batch_size):
        """The Trainer's, then the phase's length again: auto_find_batch_size retries with a smaller
        batch after an out-of-memory error, and a phase given in epochs then takes more steps (it
        kept the first size's count: half the epochs asked at half the batch)."""
        super()._update_auto_batch_size(batch_size)
        self.args.max_steps = self._phase_steps(self._phase)

    def _run_phase(self, phase: str, it: int, root: str, resume_from_checkpoint=None, resumed_deltas=None, **kwargs):
        a = self.sft_args
        self._phase = phase
        self.optimizer, self.lr_scheduler = None, None
        self.model_wrapped = self.model  # a DDP wrapper of the previous phase holds the wrong parameters
        _unmark_prepared(self)  # the sparse phase, and later rounds, trained uncompiled
        self.args.output_dir = self._phase_dir(phase, it, root)
        self.args.max_steps = self._phase_steps(phase)  # in place: new TrainingArguments would reset accelerate's state
        self._sft_at_end = None
        # the last steps of the previous phase were never logged: their L1 (another λ) must not
        # enter this phase's first l1_reg_loss
        self._l1_sum, self._l1_steps = 0.0, 0
        if phase == "sparse":
            self._convert()
            params = self._params()
            fixed = [n for n in self.maskable if n not in self._converted and params[n].dim() > 1]
            if self._reselection is not None and fixed:  # GPT-2's Conv1D weights: most of its matrices
                warnings.warn(f"DynamicSftArguments: {len(fixed)} matrices train through the compact optimizer, not a "
                              f"SparseDelta layer, and keep their phase-1 support (no reselection): {fixed[:3]}",
                              stacklevel=3)
            if self._reselection is not None:
                sizes = {name: layers[0][2].delta_indices.numel() for name, layers in self._converted.items()}
                first = a.reselection_steps, self.args.max_steps  # a decaying rate is highest at the first
                still = [k for name, k in sizes.items() if k and not self._drop_count(name, *first)]
                if still:  # a tensor without entries has nothing to reselect
                    warnings.warn(f"DynamicSftArguments.drop_fraction = {a.drop_fraction}: {len(still)} of the "
                                  f"{sum(map(bool, sizes.values()))} converted tensors holding entries drop none "
                                  f"(int(rate × K_t) = 0 at the first reselection, rate {a.drop_rate(*first):.4g}; the "
                                  f"smallest holds K_t = {min(still)}) and keep their phase-1 support (no reselection)",
                                  stacklevel=3)
            if resumed_deltas is not None:  # the checkpoint's deltas themselves, not θ − θ0 rounded
                with torch.no_grad():
                    for name, values in self._delta_values().items():
                        if name in resumed_deltas:
                            values.copy_(resumed_deltas[name].values.to(values))
        try:
            state = _checkpoint_state(resume_from_checkpoint) if resume_from_checkpoint is not None else None
            if state is not None and _run_ended(state, self.args.max_steps):
                # the phase ended there: a step more moved θ at a constant lr, and the RNG state the next
                # round starts from at any lr. The deltas are in place already; the phase's end still
                # loads the best model, as it did in the checkpoint's run.
                self.state = state
                self._load_rng_state(resume_from_checkpoint)
                if self.args.load_best_model_at_end and state.best_model_checkpoint is not None:
                    self._load_best_model()
                from transformers.trainer_utils import TrainOutput

                return TrainOutput(state.global_step, 0.0, {})  # the Trainer's own for a call that trains no step
            return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        finally:
            if phase == "sparse":
                if self._reselection is not None:  # a phase stopped early inside a window: its taps go
                    self._reselection.clear()
                self._sft_at_end = self.current_sft()  # the trained deltas themselves, before folding rounds them
                self._round_to_sft(self._sft_at_end)
                self._fold()

    def _round_to_sft(self, sft: SparseDiff) -> None:
        """Give the entries that trained through the compact optimizer (GPT-2's Conv1D weights,
        biases, norms, shared embeddings) the value θ0 + φ that applying the SFT gives: φ = θ − θ0
        is rounded, so θ itself could differ from it by an ulp, and the model would not be θ0 + φ.
        The same rounding as `apply` (sparse_axpy_), as `_fold` does for the converted layers."""
        params = self._params()
        with torch.no_grad():
            for name, delta in sft.deltas.items():
                p = params[name]
                if name in self._converted or _is_dtensor(p):
                    continue
                idx = delta.indices.to(p.device)
                with _flat(p.detach()) as flat:
                    flat[idx.long()] = self._theta0[name].reshape(-1)[idx.long()]
                    sparse_axpy_(flat, idx, delta.values.to(p))

    def _select(self, k: int) -> None:
        """Add the k entries of largest |θ − θ0| not selected yet to the masks."""
        params = self._params()
        with torch.no_grad():
            scores = {name: (params[name].detach() - self._theta0[name]).abs().reshape(-1) for name in self.maskable}
            _refuse_unrankable("LotteryTicketSparseFineTuner", scores, "the full phase left", "maskable parameters",
                               "training diverged: lower learning_rate, or clip with max_grad_norm")
            for name, d in scores.items():
                if name in self._masks:
                    d[self._masks[name].long()] = math.inf  # chosen before: always in the top
            before = sum(m.numel() for m in self._masks.values())
            masks = topk_mask(list(scores.values()), before + k)
            for name, m in zip(self.maskable, masks):
                idx = m.nonzero().flatten()
                if idx.numel():
                    self._masks[name] = idx.to(index_dtype(m.numel()))

    # --- phase 2 with O(K) state ---
    def _convert(self) -> None:
        """Swap selected linear layers for SparseDeltaLinear and embeddings for
        SparseDeltaEmbedding (base θ0, values θ − θ0 on the mask); the originals come back in
        `_fold`. Parameter objects are kept: the converted layers hold the model's own weight
        (frozen meanwhile) and bias."""
        params = self._params()
        # every name of a module registered twice (transformers 4's T5 held `shared` as
        # `encoder.embed_tokens` too): swapped at its first name alone, the module called through
        # the other kept reading θ0, and its selected entries never trained. Two linear names make
        # it shared (the compact optimizer trains it); a tied head's layers are swapped at each name
        modules = dict(self.model.named_modules(remove_duplicate=False))
        owners, held_otherwise = {}, set()
        for mname, module in modules.items():
            for pname, q in module._parameters.items():
                if q is None:
                    continue
                if pname == "weight" and type(module) in (nn.Linear, nn.Embedding):  # exactly: a subclass may compute something else
                    owners.setdefault(id(q), []).append((mname, module))
                else:  # another module holds it (XGLM's scaled embedding tied to its Linear head): it would read θ0
                    held_otherwise.add(id(q))
        self._converted = {}
        once = {id(mod): mod for found in owners.values() for _, mod in found}  # a module under two names, once
        read_directly = self._weights_read_directly(list(once.values()))
        head = _output_head(self.model)
        if self.args.use_liger_kernel and head is not None:
            # Liger's fused linear cross-entropy reads the head's `.weight` itself, in training-mode
            # forwards only (the probe runs in eval mode): a converted head's loss read θ0, its
            # deltas got no gradient, and the tiny Llama's 129 head entries ended at 0 in the SFT
            read_directly.add(id(head))
        for name in self.maskable:
            p = params[name]
            found = owners.get(id(p), [])
            if id(p) in held_otherwise or any(id(mod) in read_directly for _, mod in found):
                # another kind of module holds it too (XGLM's scaled embedding tied to its Linear
                # head), or the model reads `.weight` itself (DeBERTa's rel_embeddings): either
                # would read θ0 without Δ; the compact optimizer trains it
                continue
            embeddings = [(m, mod) for m, mod in found if isinstance(mod, nn.Embedding)]
            linears = [(m, mod) for m, mod in found if isinstance(mod, nn.Linear)]
            if len(embeddings) + len(linears) != len(found) or not found or len(embeddings) > 1 \
                    or (not embeddings and len(linears) > 1):
                continue  # shared in a way we do not convert: trained through the compact optimizer
            # (max_norm is refused at construction)
            if embeddings and any(getattr(embeddings[0][1], o, None) for o in ("scale_grad_by_freq", "sparse")):
                continue
            idx = self._masks.get(name, torch.zeros(0, dtype=index_dtype(p.numel()), device=p.device))
            with torch.no_grad():
                values = (p.detach().reshape(-1)[idx.long()] - self._theta0[name].reshape(-1)[idx.long()]).clone()
                p.copy_(self._theta0[name])
            p.requires_grad_(False)
            layers = []
            shared_values = None
            for mname, mod in embeddings + linears:
                if isinstance(mod, nn.Embedding):
                    layer = SparseDeltaEmbedding(p, idx, mod.padding_idx)
                else:
                    layer = SparseDeltaLinear(p, mod.bias, idx)  # keeps the bias Parameter itself
                layer.weight = p  # the model's own Parameter, frozen for the phase
                if shared_values is None:
                    shared_values = layer.delta_values
                    with torch.no_grad():
                        shared_values.copy_(values)
                else:
                    layer.delta_values = shared_values  # a tied decoder trains the same entries
                _swap_module(self.model, mname, layer, mod)
                layers.append((mname, mod, layer))
            self._converted[name] = layers

    def _weights_read_directly(self, modules: list) -> set:
        """ids of the modules among `modules` whose `.weight` one forward of a training batch reads
        outside the module's own call (DeBERTa reads `rel_embeddings.weight`, and its MLM head
        `word_embeddings.weight`). Such a weight must not become a SparseDelta layer's frozen base:
        that read would see θ0 without Δ, and Δ would get no gradient from it. The forward runs
        in eval mode without gradients on a fork of the RNG, so training sees the same random
        numbers and the same buffers."""
        if not modules or self.train_dataset is None:
            return set()
        seen, inside = set(), set()
        originals, hooks = {}, []

        def probe_class(cls):
            class _Probe(cls):
                def __getattr__(self, attr):
                    if attr == "weight" and id(self) not in inside:
                        seen.add(id(self))
                    return super().__getattr__(attr)
            return _Probe

        classes = {}
        try:
            for mod in modules:
                originals[mod] = type(mod)
                mod.__class__ = classes.setdefault(type(mod), probe_class(type(mod)))
                hooks.append(mod.register_forward_pre_hook(lambda m, args: inside.add(id(m))))
                hooks.append(mod.register_forward_hook(lambda m, args, out: inside.discard(id(m))))
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                inputs = next(iter(self.get_train_dataloader()))
                _pop_source(inputs)
                seen.clear()  # only the forward's reads count
                was_training = self.model.training
                self.model.eval()  # no running statistics change
                try:
                    self.model(**self._prepare_inputs(inputs))
                finally:
                    self.model.train(was_training)
        finally:
            for h in hooks:
                h.remove()
            for mod, cls in originals.items():
                mod.__class__ = cls
        return seen

    def _fold(self) -> None:
        """Fold the deltas into the model's own parameters and put the original modules back."""
        with torch.no_grad():
            for name, layers in self._converted.items():
                _, _, first = layers[0]
                p = first.weight
                _add_at(p, first.delta_indices.long(), first.delta_values.detach().to(p.dtype))
                p.requires_grad_(True)
                for mname, original, layer in layers:
                    _swap_module(self.model, mname, original, layer)
        self._converted = {}

    @torch.no_grad()
    def _reselect(self, grads: dict, step: int, total: int) -> None:
        """Drop and regrow every converted tensor's support (DynamicSftArguments) and move the
        optimizer's per-entry state to the new positions (zero for regrown entries)."""
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate wraps it
        for name, layers in self._converted.items():
            first = layers[0][2]
            n = self._drop_count(name, step, total)
            if n == 0 or not bool(grads[name].any()):
                # no gradient reached it in the window: every score 0 would regrow the lowest positions
                continue
            idx, values, src = _drop_and_regrow(first.delta_indices, first.delta_values, grads[name], n)
            self._set_support(name, idx, values)
            if optimizer.state.get(first.delta_values):
                optimizer._move_entries(first.delta_values, src)

    def _drop_count(self, name: str, step: int, total: int) -> int:
        """Entries the reselection after step `step` (of `total`) drops (and regrows) in converted
        tensor `name`: int(rate × K_t), SpIEL's int(len(values) · p)."""
        return int(self.sft_args.drop_rate(step, total) * self._converted[name][0][2].delta_indices.numel())

    def _set_support(self, name: str, idx: torch.Tensor, values: torch.Tensor) -> None:
        """Give converted tensor `name` the support `idx` with delta `values`: its layers (a tied
        decoder shares the values, so its indices are set too), its weight-decay anchors and its mask."""
        layers = self._converted[name]
        for _, _, layer in layers:
            layer.set_support(idx, values)
        param = layers[0][2].delta_values
        if param in self._anchors:
            self._anchors[param] = self._theta0[name].reshape(-1)[idx.long()].clone()
        self._masks[name] = idx

    def _delta_values(self) -> dict[str, torch.nn.Parameter]:
        """{canonical name: delta_values} of the converted parameters."""
        return {name: layers[0][2].delta_values for name, layers in self._converted.items()}

    def create_optimizer(self, model=None):
        if self._phase != "sparse":
            return super().create_optimizer(model)
        if self.optimizer is None:
            groups = {True: [], False: []}
            masks = {}
            values = self._delta_values()
            self._anchors = {}
            for name, p in self._trainable().items():
                if name in values:
                    p = values[name]
                    masks[p] = None
                    if name in self._decayed and self.args.weight_decay > 0:
                        idx = self._converted[name][0][2].delta_indices.long()
                        self._anchors[p] = self._theta0[name].reshape(-1)[idx].clone()
                else:
                    masks[p] = self._masks.get(name, _no_entries(p)) if name in self.maskable else None
                groups[name in self._decayed].append(p)
            param_groups = [{"params": groups[True], "weight_decay": self.args.weight_decay},
                            {"params": groups[False], "weight_decay": 0.0}]
            self.optimizer = MaskedAdamW(
                [g for g in param_groups if g["params"]], masks, lr=self.args.learning_rate,
                betas=(self.args.adam_beta1, self.args.adam_beta2), eps=self.args.adam_epsilon, mode="compact")
            if self.args.weight_decay > 0 and self._anchors:
                self.optimizer.register_step_post_hook(self._decay_the_base)
        return self.optimizer

    def _decay_the_base(self, optimizer, *args, **kwargs) -> None:
        decay_the_base_(optimizer, self._anchors)  # the anchors change when the support does

    # --- the L1 term, logging, multi-source batches ---
    def _loss_scale(self) -> float | None:
        """fp16 GradScaler's current scale, by which the gradients are multiplied until the
        optimizer step; None without one."""
        scaler = getattr(self.accelerator, "scaler", None)
        return scaler.get_scale() if scaler is not None and scaler.is_enabled() else None

    @torch.no_grad()
    def _add_l1_gradient(self) -> float | None:
        """Add the L1 term's gradient, c·sign(θ − θ0) with c = λ·G / N, straight into the
        gradients (what composable-sft's `reg_loss.backward()` adds, sign(0) = 0 included) and
        return the term's value. No autograd pass: under DDP the term is the same on every rank
        and needs no all-reduce. Under fp16's GradScaler the gradients are still scaled here, so
        the term is scaled alike (composable-sft's unscaled `reg_loss.backward()` shrank it by
        the loss scale, 2^16 at first)."""
        lam = self.sft_args.full_l1_reg if self._phase == "full" else self.sft_args.sparse_l1_reg
        if lam == 0:
            return None
        coef = lam * self.args.gradient_accumulation_steps / self.num_params
        loss_scale = self._loss_scale() or 1.0
        values = self._delta_values()
        total = 0.0
        for name, p in self._trainable().items():
            if self.sft_args.apply_reg_to_sparse_only and name not in self.maskable:
                continue
            if name in values:
                p, distance = values[name], values[name].detach()
            elif p.requires_grad:
                distance = p.detach() - self._theta0[name].to(p.device)
            else:
                continue
            total += float(distance.abs().sum())
            step = distance.sign().mul_(coef * loss_scale).to(p.dtype)
            if p.grad is None:
                p.grad = step
            else:
                p.grad.add_(step)
        return coef * total

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The model's loss, or with `fused_cross_entropy` (where gradients are on: training steps,
        not evaluation) the same cross-entropy of its logits computed by xlsparse's fused op. The
        Trainer's own compute_loss runs either way (its num_items_in_batch and multi-process
        scaling), calling the model through `_fused_loss_forward` in the second case."""
        labels = inputs.get("labels") if isinstance(inputs, MutableMapping) else None
        if self.fused_cross_entropy and torch.is_grad_enabled() and labels is not None:
            model = functools.partial(self._fused_loss_forward, model)
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    def _fused_loss_forward(self, model, labels, **inputs):
        """model(**inputs, labels=labels) with its loss computed by the fused op, under the rule that
        the first call learns (`_loss_rule_of`). That call alone passes the labels to the model, with
        a num_items_in_batch that tells the two rules apart (`_probe_items`)."""
        learning = self._loss_rule is None
        num_items = inputs.get("num_items_in_batch")
        if learning:
            count = int((labels != IGNORED_LABEL).sum())
            probe = {**inputs, "num_items_in_batch": _probe_items(count)} if self.model_accepts_loss_kwargs else inputs
            outputs = model(**probe, labels=labels)
            if count == 0:  # nothing labelled: the model's own loss (0/0); the rule is learnt at a later step
                return outputs
        else:
            outputs = model(**inputs)
        logits, rest = _logits(outputs, with_loss=learning), None if isinstance(outputs, MutableMapping) else outputs
        total, count = _masked_lm_nll(logits, labels)
        if learning:
            own = outputs["loss"] if rest is None else outputs[0]
            self._loss_rule = _loss_rule_of(_uncompiled(model), own.detach(), total.detach(), int(count),
                                            self.model_accepts_loss_kwargs)
            rest = None if rest is None else rest[1:]
        loss = total / (num_items if self._loss_rule == "per item" and num_items is not None else count)
        if rest is not None:
            return (loss, *rest)
        outputs["loss"] = loss
        return outputs

    def training_step(self, model, inputs, num_items_in_batch=None):
        source = _pop_source(inputs)
        handle = self._activate(source, training=True)
        try:
            if self.labelled_positions_only:
                with _labelled_positions(self.model, inputs) as kept:
                    settle_loss_kwargs(self, kept, num_items_in_batch)
                    loss = super().training_step(model, kept, num_items_in_batch)
            else:
                settle_loss_kwargs(self, inputs, num_items_in_batch)
                loss = super().training_step(model, inputs, num_items_in_batch)
        finally:
            if handle is not None:
                handle.revert()
        if self._l1_pending:
            self._l1_pending = False
            reg = self._add_l1_gradient()
            if reg is not None:
                self._l1_sum += reg
                self._l1_steps += 1
        if self._phase == "sparse":  # clipping on or off: the Trainer logs the norm it takes either way
            self._mask_gradients()
        return loss

    @torch.no_grad()
    def _mask_gradients(self) -> None:
        """Zero the gradient entries outside the masks of the maskable tensors that the compact
        optimizer trains whole (biases, norms), before the Trainer clips: the clipping norm, and the
        grad_norm it logs, then count only what trains, as composable-sft's `grad *= mask` before
        any norm does. The converted matrices' deltas have gradients on their support only."""
        for name, p in self._trainable().items():
            if name in self._converted or name not in self.maskable or p.grad is None:
                continue
            idx = self._masks.get(name, _no_entries(p))
            # FSDP2: the gradient is a DTensor; its local shard takes its own part of the mask
            keep = _shard_of(p, idx) if _is_dtensor(p) else _bool_mask(idx, p.shape)
            _local(p.grad).masked_fill_(~keep, 0)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        source = _pop_source(inputs)
        handle = self._activate(source, training=False)
        try:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        finally:
            if handle is not None:
                handle.revert()

    def _activate(self, source, training: bool):
        """Apply the batch's source SFT; the handle's revert keeps training updates (training)
        or restores bit-exactly (evaluation)."""
        if source is None:
            if self.source_sfts is None:
                return None
            raise ValueError(f"source_sfts were given but the batch has no {SOURCE_KEY!r} key (use MultiSourceDataset)")
        if isinstance(source, (list, tuple)):
            if len(set(source)) != 1:
                raise ValueError(f"a multi-source batch mixes sources {sorted(set(source))}")
            source = source[0]
        diff = self._source_sft(source)
        if training:
            return KeepUpdatesHandle(diff, self.model, with_abs=self.source_sft_apply_abs)
        return apply([diff], self.model, with_abs=self.source_sft_apply_abs)

    def _source_sft(self, source) -> SparseDiff:
        # composable-sft trains a source it has no SFT for on the bare model: a misspelt source
        # then trained silently without its SFT; here the bare model is asked for with an empty one
        if self.source_sfts is None:
            raise ValueError("source_sfts: the batches name their source (a MultiSourceDataset) but no source SFTs "
                             "were given")
        if source not in self.source_sfts:
            raise ValueError(f"source_sfts has no SFT for the source {source!r} (it has {list(self.source_sfts)}); "
                             "give it SparseDiff({}) to train that source on the bare model")
        return self.source_sfts[source]

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs and self._l1_steps:
            logs["l1_reg_loss"] = self._l1_sum / self._l1_steps
            self._l1_sum, self._l1_steps = 0.0, 0
        super().log(logs, *args, **kwargs)

    def get_train_dataloader(self):
        if isinstance(self.train_dataset, MultiSourceDataset):
            # under DDP each process takes every num_processes-th batch: one step's batches share a source.
            # The Trainer's batch size: auto_find_batch_size lowers it after an out-of-memory error (the
            # per-device setting retried the same batches until no size was left)
            return self._multisource_loader(self.train_dataset, self._train_batch_size,
                                            shuffle=self.args.train_sampling_strategy != "sequential",
                                            replicas=self.accelerator.num_processes, training=True)
        return super().get_train_dataloader()

    def get_eval_dataloader(self, eval_dataset=None):
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if isinstance(dataset, str) and isinstance(self.eval_dataset, dict):  # the Trainer names a dict's sets
            dataset = self.eval_dataset[dataset]
        if isinstance(dataset, MultiSourceDataset):
            return self._multisource_eval_loader(dataset)
        return super().get_eval_dataloader(eval_dataset)

    def get_test_dataloader(self, test_dataset):
        # predict() asks here, not get_eval_dataloader: a MultiSourceDataset's batches lost their source
        if isinstance(test_dataset, MultiSourceDataset):
            return self._multisource_eval_loader(test_dataset)
        return super().get_test_dataloader(test_dataset)

    def _refuse_unknown_sources(self, dataset) -> None:
        """Each source of a MultiSourceDataset needs its SFT, before its first batch. Without
        source_sfts, a set given to evaluate() or predict() ran on the bare model, silently (and a
        dict of eval sets raised a TypeError)."""
        if isinstance(dataset, MultiSourceDataset):
            for source in dataset.datasets:
                self._source_sft(source)

    def _multisource_eval_loader(self, dataset):
        """Evaluation and prediction batches of a MultiSourceDataset: one source each, in order."""
        self._refuse_sharded_evaluation(dataset)
        self._refuse_unknown_sources(dataset)
        # the Trainer's size: per device × the GPUs that DataParallel splits a batch over
        return self._multisource_loader(dataset, self.args.eval_batch_size, shuffle=False)

    def _refuse_sharded_evaluation(self, dataset) -> None:
        """Multi-source evaluation runs on one process only. Accelerate deals the batches out to the
        processes whole and skips a round whose last batch is short (a source's last batch), then
        cuts the last gathered batch to len(dataset) % (batch size × processes): sources went
        unevaluated and eval_loss was another set's. Padding the sources' batches would count
        padded rows instead."""
        if isinstance(dataset, MultiSourceDataset) and self.accelerator.num_processes > 1:
            raise ValueError(f"eval_dataset: a MultiSourceDataset is evaluated on one process only, this run has "
                             f"{self.accelerator.num_processes} (accelerate would skip some of its batches); "
                             "evaluate it in a run of one process")

    def _multisource_loader(self, dataset, batch_size, shuffle, replicas=1, training=False):
        # the Trainer's data order follows data_seed when it is given
        seed = self.args.seed if self.args.data_seed is None else self.args.data_seed
        sampler = SingleSourceBatchSampler(dataset, batch_size, shuffle=shuffle, seed=seed,
                                           drop_last=self.args.dataloader_drop_last, num_replicas=replicas)
        # remove_unused_columns as the Trainer's loaders apply it (`_source` is taken out before)
        collate = MultiSourceCollator(self._get_collator_with_removed_columns(self.data_collator))
        a = self.args
        # the Trainer's own loader settings: persistent workers, prefetch and worker seeding were
        # accepted from TrainingArguments and not used here
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=sampler, collate_fn=collate, num_workers=a.dataloader_num_workers,
            pin_memory=a.dataloader_pin_memory, persistent_workers=a.dataloader_persistent_workers,
            multiprocessing_context=a.dataloader_multiprocessing_context, prefetch_factor=a.dataloader_prefetch_factor,
            in_order=a.dataloader_in_order,
            worker_init_fn=functools.partial(seed_worker, num_workers=a.dataloader_num_workers, rank=a.process_index)
            if training else None)
        prepared = self.accelerator.prepare(loader)
        shard = getattr(prepared, "batch_sampler", None)
        if shard is not sampler and getattr(shard, "batch_sampler", None) is sampler and not hasattr(shard, "set_epoch"):
            # accelerate's BatchSamplerShard (DDP) has no set_epoch: behind the skip wrapper of a resumed
            # run the Trainer's set_epoch missed the sampler, and the resumed epoch replayed epoch 0's order
            shard.set_epoch = sampler.set_epoch
        return prepared

    # --- results ---
    def current_sft(self) -> SparseDiff:
        """The SFT as the model holds it now: during a sparse phase the converted layers' deltas
        themselves, else θ − θ0 on the masks; trainable non-maskable parameters whole."""
        values = self._delta_values()
        params = self._params()
        deltas, absolute = {}, {}
        with torch.no_grad():
            for name in self._theta0:
                p = params[name]
                if name in values:
                    idx = self._converted[name][0][2].delta_indices
                    if not idx.numel():
                        continue
                    deltas[name] = SparseDelta._trusted(idx.clone(), values[name].detach().clone(), p.shape)
                elif name in self.maskable:
                    if name not in self._masks:
                        continue
                    idx = self._masks[name].long()
                    v = p.detach().reshape(-1)[idx] - self._theta0[name].reshape(-1)[idx]
                    deltas[name] = SparseDelta._trusted(idx.to(index_dtype(p.numel())), v, p.shape)
                else:  # a trainable non-maskable parameter (a head): stored whole
                    absolute[name] = p.detach().clone()
        return SparseDiff._trusted(deltas, absolute=absolute,
                                   base_model=getattr(self.model.config, "_name_or_path", None) or None)

    def sparse_diff(self) -> SparseDiff:
        """θ − θ0 on the selected entries, plus the trained heads whole, as a SparseDiff."""
        return self.current_sft()

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The Trainer's save_model (the model as it is now, converted layers included), plus the
        SFT as `sft.safetensors` (`SparseDiff.save`): after a sparse phase (and after `train()`),
        the trained deltas themselves, `self.sft`; folding them into a bfloat16 model rounds them,
        so θ − θ0 would lose the small ones. During a sparse phase, the SFT as the model holds it.
        A full phase's checkpoints hold no SFT: the model has moved everywhere, and θ − θ0 on an
        earlier round's masks would not be one. Beside the SFT, `sparse_phase.json` holds the
        settings its sparse phase ran with, which a resume checks; inside a dynamic phase's gradient
        window each process also writes its gradient sums so far (`GRADIENT_SUMS_FILE`)."""
        super().save_model(output_dir, _internal_call=_internal_call)
        folder = output_dir if output_dir is not None else self.args.output_dir
        sums = self._reselection.grads if self._reselection is not None else {}
        own = os.path.join(folder, GRADIENT_SUMS_FILE.format(self.args.process_index))
        if sums:  # every process: each summed its own batches' gradients
            from safetensors.torch import save_file

            os.makedirs(folder, exist_ok=True)
            save_file({name: g.detach().cpu() for name, g in sums.items()}, own)
        elif os.path.isfile(own):
            os.remove(own)
        if not self.args.should_save:
            return
        paths = [os.path.join(folder, f) for f in (SFT_FILE, SPARSE_PHASE_FILE)]
        if self._masks and self._phase == "sparse":
            os.makedirs(folder, exist_ok=True)
            sft = self._sft_at_end if self._sft_at_end is not None and not self._converted else self.current_sft()
            sft.save(paths[0])
            with open(paths[1], "w") as f:
                json.dump({**self._sparse_phase_settings(), "gradient_sums": self.args.world_size if sums else 0,
                           "head_theta0": self._head_fingerprints()}, f)
        else:  # an earlier save's SFT in a reused folder would pass for this model's
            for path in paths:
                if os.path.isfile(path):
                    os.remove(path)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """During a sparse phase the weights are saved folded (θ0 + Δ) under the model's own
        names, so a checkpoint loads into the original model class; after untying, under every name."""
        if state_dict is None and self._converted:
            state_dict = self.model.state_dict()
            with torch.no_grad():
                for name, layers in self._converted.items():
                    first = layers[0][2]
                    folded = first.weight.detach().clone()
                    _add_at(folded, first.delta_indices.long(), first.delta_values.detach().to(folded.dtype))
                    for mname, _, _ in layers:
                        state_dict[f"{mname}.weight"] = folded  # one tensor: a tied decoder stays tied
                        state_dict.pop(f"{mname}.delta_indices", None)
                        state_dict.pop(f"{mname}.delta_values", None)
        if getattr(self.model.config, "tie_word_embeddings", True) is False:
            # as untied here, transformers 5 ties nothing on load, yet writes a tensor held under several names
            # once (mBART's shared, encoder and decoder embeddings): every name gets its own copy in the file
            state_dict = dict(self.model.state_dict() if state_dict is None else state_dict)
            seen = set()
            for name, t in state_dict.items():
                key = _storage_key(t)
                if key in seen:
                    state_dict[name] = t.clone()
                seen.add(key)
        super()._save(output_dir, state_dict=state_dict)

    def _load_best_model(self):
        """`load_best_model_at_end` in a sparse phase: the best checkpoint's supports, deltas and
        other trained values, as a resume restores them. The Trainer's own load copies the
        checkpoint's folded θ0 + Δ into the frozen bases, and the fold at the end added Δ again."""
        if not self._converted:
            return super()._load_best_model()
        checkpoint = self.state.best_model_checkpoint
        deltas = SparseDiff.load(os.path.join(checkpoint, SFT_FILE)).deltas
        weights = _load_weights(checkpoint)
        with torch.no_grad():
            for name, p in self._trainable().items():
                if name in self._converted:
                    first = self._converted[name][0][2]
                    if name in deltas:
                        idx, values = deltas[name].indices, deltas[name].values
                    else:  # no entry of this tensor was selected: the SFT does not name it
                        idx, values = first.delta_indices[:0], first.delta_values.detach()[:0]
                    self._set_support(name, idx.to(first.delta_indices), values.to(first.delta_values))
                    continue
                key = next((a for a in _aliases(self.model, p) if a in weights), None)
                if key is None:
                    raise ValueError(f"load_best_model_at_end: {checkpoint} holds no value for {name!r}")
                p.copy_(weights[key])

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """A sparse phase restores its weights itself (`_restore`): the checkpoint's folded
        weights must not overwrite the converted layers' frozen bases."""
        if not self._converted:
            super()._load_from_checkpoint(resume_from_checkpoint, model)


def _checkpoint_state(folder: str):
    """The `TrainerState` saved in `folder` (a Trainer checkpoint): its global_step, best model, ..."""
    from transformers import TrainerState
    from transformers.trainer import TRAINER_STATE_NAME

    return TrainerState.load_from_json(os.path.join(folder, TRAINER_STATE_NAME))


def _run_ended(state, max_steps: int) -> bool:
    """Whether a checkpoint's `state` is at or past a run's last step: the Trainer checks max_steps
    only after a step, so resumed there within an epoch it would take one step more."""
    return 0 < max_steps <= state.global_step


def _load_weights(folder: str) -> dict:
    """The tensors of a checkpoint's model weights: model*.safetensors (sharded or not), else the
    pytorch_model*.bin files that transformers 4.x writes with `save_safetensors=False`."""
    from safetensors.torch import load_file

    names = sorted(os.listdir(folder))
    files = [f for f in names if f.startswith("model") and f.endswith(".safetensors")]
    pickled = [f for f in names if f.startswith("pytorch_model") and f.endswith(".bin")]
    if not files and not pickled:
        raise ValueError(f"resume_from_checkpoint: {folder} holds no model*.safetensors or pytorch_model*.bin")
    out = {}
    for f in files or pickled:
        path = os.path.join(folder, f)
        out.update(load_file(path) if files else torch.load(path, map_location="cpu", weights_only=True))
    return out


def _refuse_model_only(checkpoint) -> None:
    """Every trainer's resume continues its run bit-exactly. A checkpoint written with
    `save_only_model=True` holds no optimizer, scheduler or RNG state, which the Trainer then
    silently started afresh (new AdamW moments: 0.039 off after 2 more steps of a tiny run)."""
    from transformers.trainer import OPTIMIZER_NAME

    if not os.path.isfile(os.path.join(checkpoint, OPTIMIZER_NAME)):
        raise ValueError(f"resume_from_checkpoint: {checkpoint} holds no {OPTIMIZER_NAME} (TrainingArguments."
                         "save_only_model=True writes none): the run cannot continue from it; resume from a checkpoint "
                         "saved without save_only_model")


def _refuse_finished(checkpoint, args) -> None:
    """A checkpoint of a run's last step (`_run_ended`) has nothing left to train under the same
    max_steps; the step more would be saved as the result, silently. (LT-SFT goes on with its next
    round instead.)"""
    state = _checkpoint_state(checkpoint)
    if _run_ended(state, args.max_steps):
        raise ValueError(f"resume_from_checkpoint: {checkpoint} is at step {state.global_step} and TrainingArguments.max_steps = "
                         f"{args.max_steps}: its run ended there, and the Trainer would take a step more; raise "
                         "max_steps to train on")


def _refuse_another_base(checkpoint, model: nn.Module, weights: dict, theta0: dict, support: dict) -> None:
    """Every trainer's resume rule, checked before any weight is loaded: wherever its run did not
    train, a checkpoint holds the base model that run started from, which must be this run's θ0.
    Another base of the same shapes would silently take over the checkpoint's training (and its
    diff, a difference from the other base). `weights`: the checkpoint's tensors (`_load_weights`);
    `theta0`: {parameter name: this run's θ0} of the parameters to check (leave out those trained
    whole), in the layout the parameter is stored in; `support`: {name: flat indices its run may
    have trained}, in that layout. A parameter the checkpoint does not hold under any of its (tied)
    names is not checked."""
    named = dict(model.named_parameters(remove_duplicate=False))
    flipped = _transposed_weights(model, theta0)  # a converted Conv1D's state dict holds [in, out]
    for name, base in theta0.items():
        key = next((a for a in _aliases(model, named[name]) if a in weights), None)
        if key is None or _is_dtensor(base):
            continue
        base = base.reshape(-1)
        saved = weights[key].t() if name in flipped else weights[key]
        saved = saved.reshape(-1).to(base.device)
        off = torch.ones(base.numel(), dtype=torch.bool, device=base.device)
        if name in support:
            off[support[name].long().to(base.device)] = False
        if saved.shape != base.shape:
            differs = f"has {saved.numel()} entries, this run's {base.numel()}"
        elif not torch.equal(saved[off], base[off]):
            differs = f"differs from this run's in {int((saved[off] != base[off]).sum())} entries outside those its run trained"
        else:
            continue
        raise ValueError(f"resume_from_checkpoint: {checkpoint} was trained from another base model (or with other "
                         f"trainable parameters): its {key!r} {differs}; build the trainer on the checkpoint's run's "
                         "base model and arguments")


def _pop_source(inputs):
    """The batch's source, taken out of the batch (None if it names none). Any mutable mapping:
    DataCollatorWithPadding's BatchEncoding is not a dict, and its source stayed in."""
    return inputs.pop(SOURCE_KEY, None) if isinstance(inputs, MutableMapping) else None


# the label a masked-LM loss skips (transformers' CrossEntropyLoss and LabelSmoother default)
IGNORED_LABEL = -100


def _logits(outputs, with_loss: bool) -> torch.Tensor:
    """A masked-LM's logits: a ModelOutput's, or a tuple's first after the loss, if any."""
    return outputs["logits"] if isinstance(outputs, MutableMapping) else outputs[1 if with_loss else 0]


def _masked_lm_nll(logits, labels):
    """(Σ of the labelled positions' cross-entropy, their count) for logits [..., V] and labels
    [...] (-100: not labelled), in float32: the fused log-softmax + NLL of one expert of weight 1
    (the mixture of one is itself). An unlabelled position reads class 0 and adds exactly 0."""
    flat = logits.reshape(-1, logits.shape[-1])
    y = labels.reshape(-1).to(flat.device)
    keep = y != IGNORED_LABEL
    nll, _ = ensemble_nll_op(flat[None], flat.new_zeros(flat.shape[0], 1, dtype=torch.float32),
                             torch.where(keep, y, 0), False)
    return torch.where(keep, nll, 0).sum(), keep.sum()


def _probe_items(count: int) -> int:
    """The num_items_in_batch that fused_cross_entropy's first step gives the model beside `count`
    labelled positions: twice the count, so a per-item loss is half the mean at any count (count + 1
    put the two 1/(count + 1) apart, inside float32's tolerance past 1e5 positions: a per-item model
    was read as "mean", and under gradient accumulation its loss was G times the model's own)."""
    return 2 * count


def _loss_rule_of(model, own: torch.Tensor, total: torch.Tensor, count: int, takes_loss_kwargs: bool) -> str:
    """The rule `model`'s own loss `own` follows, given the summed cross-entropy `total` of its
    `count` labelled positions (count >= 1) and, when it takes loss kwargs, a num_items_in_batch of
    `_probe_items(count)`: "mean" (total / count) or "per item" (total / num_items_in_batch). Any
    other loss is a ValueError."""
    candidates = {"mean": total / count} | ({"per item": total / _probe_items(count)} if takes_loss_kwargs else {})
    tol = 1e-5 if own.dtype == torch.float32 else 1e-2
    rule = next((r for r, v in candidates.items() if torch.allclose(own.float(), v, rtol=tol, atol=0)), None)
    if rule is None:
        raise ValueError(f"fused_cross_entropy: {type(model).__name__}'s loss ({float(own):.6g}) is neither "
                         "the mean cross-entropy of its logits over the labelled positions nor their sum over "
                         f"num_items_in_batch ({', '.join(f'{r}: {float(v):.6g}' for r, v in candidates.items())}); "
                         "set fused_cross_entropy=False")
    return rule


@contextlib.contextmanager
def _labelled_positions(model, inputs):
    """`inputs` with only the labels of the labelled positions (1-D), while a hook hands the
    model's output embeddings those positions' hidden states only: a masked-LM loss, mean or sum
    over the labelled positions, is then the same, and so is every gradient (an unlabelled
    position's logits get none). Raises when the output embeddings are not called on the batch's
    [batch, sequence, hidden] states: the 1-D labels would not match the logits."""
    labels = inputs.get("labels")
    if labels is None:  # no loss to compute: the Trainer says so
        yield inputs
        return
    keep = labels != IGNORED_LABEL
    called = []

    def select(module, args):
        h = args[0] if args else None
        if h is None or tuple(h.shape[:-1]) != tuple(keep.shape):
            raise RuntimeError(f"labelled_positions_only: the output embeddings got input of shape "
                               f"{None if h is None else tuple(h.shape)}, not the labels' {tuple(keep.shape)} positions "
                               "and a hidden size; set labelled_positions_only=False for this model")
        called.append(True)
        return (h[keep.to(h.device)], *args[1:])

    hook = _output_head(model).register_forward_pre_hook(select)
    never_called = ("labelled_positions_only: the model's forward never called its output embeddings "
                    "(get_output_embeddings()); set labelled_positions_only=False for this model")
    try:
        yield {**inputs, "labels": labels[keep]}
    except Exception as e:
        # the loss met 1-D labels beside whole-sequence logits, or the body raised first: told with
        # its own message; running out of memory is told as itself (this option's advice misled)
        if not called and not isinstance(e, (torch.OutOfMemoryError, MemoryError)):
            raise RuntimeError(f"{never_called} (it raised {type(e).__name__}: {e})") from e
        raise
    finally:
        hook.remove()
    if not called:  # every position labelled: nothing failed, and nothing was saved either
        raise RuntimeError(never_called)


@contextlib.contextmanager
def _flat(t: torch.Tensor):
    """t.view(-1) to write through, whatever t's strides: a transposed (non-contiguous) weight has
    no flat view, so it is a contiguous copy, written back on exit (phase 2 failed at its very end
    on such a weight, the deltas not folded back)."""
    flat = t.contiguous().view(-1)
    yield flat
    if flat.data_ptr() != t.data_ptr():
        t.copy_(flat.view(t.shape))


def _add_at(t: torch.Tensor, idx: torch.Tensor, values: torch.Tensor) -> None:
    """t.view(-1)[idx] += values in place, whatever t's strides."""
    with _flat(t) as flat:
        flat.index_add_(0, idx, values)


def _no_entries(p: torch.Tensor) -> torch.Tensor:
    return torch.zeros(0, dtype=index_dtype(p.numel()), device=p.device)


def _diff_digest(diff: SparseDiff) -> str:
    """A short digest that tells one SparseDiff from another: each entry's kind and name, and the
    fingerprints of its tensors."""
    entries = [("delta", n, (d.indices, d.values)) for n, d in diff.deltas.items()]
    entries += [(kind, n, (t,)) for kind, table in (("dense", diff.dense), ("absolute", diff.absolute))
                for n, t in table.items()]
    text = json.dumps(sorted([kind, n, [list(_fingerprint(t)) for t in tensors]] for kind, n, tensors in entries))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _aliases(model: nn.Module, p: torch.Tensor) -> list[str]:
    return [n for n, q in model.named_parameters(remove_duplicate=False) if q is p]


def _canonical_names(model: nn.Module) -> dict[int, tuple[torch.nn.Parameter, str]]:
    """{id(param): (param, name)} with each shared parameter named once, preferring a name
    under the base model (a tied decoder is the word-embedding matrix, not a head)."""
    named = dict(model.named_parameters(remove_duplicate=False))
    return {id(p): (p, name) for name, p in _untied(named, getattr(model, "base_model_prefix", "") or "").items()}


class KeepUpdatesHandle:
    """Applies `diff` (without absolute entries unless `with_abs`) like `xlsparse.apply`, but its
    `revert()` keeps what changed meanwhile: every displaced value is restored bit-exactly and
    then every entry of a trainable parameter (requires_grad) that the diff touched gets back
    the change it underwent while applied. So an update u made under the diff survives
    (θ + φ + u → θ + u, i.e. the diff is subtracted from trained entries), and entries nobody
    changed return bit-exactly. The multi-source trainer reverts with this before the optimizer
    step; evaluation uses the plain bit-exact `apply` handle."""

    def __init__(self, diff: SparseDiff, model: nn.Module, with_abs: bool = False):
        named = dict(model.named_parameters(remove_duplicate=False))
        self._watch = []  # (param, flat positions or None for all, value right after apply)
        self._handle = apply([diff], model, with_abs=with_abs)
        with torch.no_grad():
            for name, delta in diff.deltas.items():
                p = named.get(name)
                if p is not None and p.requires_grad:
                    pos = delta.indices.to(p.device).long()
                    self._watch.append((p, pos, p.detach().reshape(-1)[pos].clone()))
            for name in [*diff.dense, *(diff.absolute if with_abs else {})]:
                p = named.get(name)
                if p is not None and p.requires_grad:
                    self._watch.append((p, None, p.detach().reshape(-1).clone()))

    def revert(self) -> None:
        """Subtract the diff from the entries that trained while it was applied (their updates
        stay) and restore every other entry it changed bit-exactly."""
        with torch.no_grad():
            nows = [p.detach().reshape(-1)[pos] if pos is not None else p.detach().reshape(-1).clone()
                    for p, pos, _ in self._watch]
            self._handle.revert()
            for (p, pos, after), now in zip(self._watch, nows):
                with _flat(p.detach()) as flat:
                    at = pos if pos is not None else slice(None)
                    restored = flat[at]
                    # an entry that did not change keeps the restored bits: adding its zero change
                    # made -0.0 +0.0, and an unchanged inf NaN (inf - inf)
                    flat[at] = torch.where(now == after, restored, restored + (now - after))


class MultiSourceDataset(torch.utils.data.Dataset):
    """Several sources' datasets as one (composable-sft's `MultiSourceDataset`): items in
    sorted-source order, each source repeated `upsampling[source]` times; each item is its
    source's item with `_source` added. Batches come from `SingleSourceBatchSampler`, so each
    batch holds one source. A source without items has no batches; datasets without any item
    are a ValueError."""

    def __init__(self, datasets: dict, upsampling: dict | None = None):
        if not isinstance(datasets, dict) or not datasets:
            raise ValueError("MultiSourceDataset: datasets must be a non-empty dict {source: dataset}")
        self.datasets = dict(datasets)
        self.upsampling = dict(upsampling or {})
        unknown = set(self.upsampling) - set(self.datasets)
        if unknown:
            raise ValueError(f"MultiSourceDataset: upsampling names unknown sources {sorted(unknown)}")
        bad = {s: f for s, f in self.upsampling.items() if not is_whole(f) or f < 1}
        if bad:  # int() made 0.5 drop a source and 1.5 count once
            raise ValueError(f"MultiSourceDataset: upsampling factors must be whole numbers >= 1, got {bad}")
        self.order = [(source, i) for source in sorted(self.datasets)
                      for _ in range(self.upsampling.get(source, 1)) for i in range(len(self.datasets[source]))]
        if not self.order:  # no batch: the full phase ran no step and phase 2 began on the first K entries
            raise ValueError("MultiSourceDataset: the datasets hold no items")

    def __len__(self):
        return len(self.order)

    def __getitem__(self, index):
        source, i = self.order[index]
        item = dict(self.datasets[source][i])
        item[SOURCE_KEY] = source
        return item


class SingleSourceBatchSampler(torch.utils.data.Sampler):
    """Batches of one source each (composable-sft's `MultiSourceDataLoader`): each source's items
    are cut into batches, once per upsampling repetition (a pass of their own, so no item twice in
    a batch), and with `shuffle` the items within a pass and the batch order are shuffled with
    seed + epoch. The epoch counts this sampler's passes unless `set_epoch` names
    it, as the Trainer does each epoch: a run resumed in a later epoch then sees that epoch's
    order, not epoch 0's.

    `num_replicas` > 1 (data-parallel processes, which take consecutive batches in turn, as
    Accelerate shards a batch sampler): each source pass is cut into global batches of
    batch_size × num_replicas items, each yielded as num_replicas consecutive batches, so all
    processes train on one source in each step, as one process on the global batch does (and as
    composable-sft's loaders, which follow one seeded source order on every process). A pass's
    last, short global batch is filled up by wrapping around the pass (as DistributedSampler
    pads), unless `drop_last`."""

    def __init__(self, dataset: MultiSourceDataset, batch_size: int, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False, num_replicas: int = 1):
        self.dataset, self.batch_size, self.shuffle, self.seed, self.drop_last = dataset, batch_size, shuffle, seed, drop_last
        self.num_replicas = num_replicas
        self.epoch = 0
        self.by_source = {}
        for pos, (source, _) in enumerate(dataset.order):
            self.by_source.setdefault(source, []).append(pos)

    def _batches(self, g):
        out = []
        for source, all_positions in self.by_source.items():
            n = len(self.dataset.datasets[source])  # the order holds each repetition as a block of n
            for r in range(0, len(all_positions), n):
                positions = list(all_positions[r:r + n])
                if self.shuffle:
                    positions = [positions[i] for i in torch.randperm(len(positions), generator=g).tolist()]
                size = self.batch_size * self.num_replicas
                for i in range(0, len(positions), size):
                    chunk = positions[i:i + size]
                    if len(chunk) < size and self.drop_last:
                        continue
                    if len(chunk) < size and self.num_replicas > 1:  # every process needs a full share
                        chunk = (chunk + positions * size)[:size]
                    out.append([chunk[j:j + self.batch_size] for j in range(0, len(chunk), self.batch_size)])
        if self.shuffle:  # the global batches, so a step's share stays together
            out = [out[i] for i in torch.randperm(len(out), generator=g).tolist()]
        return [batch for group in out for batch in group]

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose order the next pass yields (later passes count on from it)."""
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1
        yield from self._batches(g)

    def __len__(self):
        return len(self._batches(torch.Generator().manual_seed(0)))


class MultiSourceCollator:
    """Wraps a collator: drops `_source` from the items, collates them, and puts the batch's
    one source back under `_source` (a batch mixing sources raises)."""

    def __init__(self, collator=None):
        from transformers import default_data_collator

        self.collator = collator or default_data_collator

    def __call__(self, features):
        sources = {f[SOURCE_KEY] for f in features}
        if len(sources) != 1:
            raise ValueError(f"MultiSourceCollator: one batch holds sources {sorted(sources)}")
        batch = self.collator([{k: v for k, v in f.items() if k != SOURCE_KEY} for f in features])
        batch[SOURCE_KEY] = sources.pop()
        return batch
