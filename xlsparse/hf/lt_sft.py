"""LT-SFT (Ansell et al. 2022) as a Hugging Face `Trainer`: full fine-tuning, top-K of
|θ1 − θ0|, rewind to θ0, then training only those K entries with compact `MaskedAdamW`.

The arguments mirror composable-sft's `SftArguments` so its scripts translate one to one.
"""
import re
from dataclasses import dataclass

import torch
from transformers import Trainer

from ..diff import SparseDelta, SparseDiff, index_dtype
from ..optim import MaskedAdamW


@dataclass
class SftArguments:
    """The knobs of a lottery-ticket sparse fine-tuning (names as in composable-sft)."""

    ft_params_num: int | None = None
    """How many entries the SFT may change (global over the maskable parameters)."""
    ft_params_proportion: float = 0.01
    """Used when ft_params_num is None: the share of maskable entries the SFT may change."""
    full_l1_reg: float = 0.0
    """L1 pull toward θ0 during phase 1 (added to the loss: full_l1_reg · Σ|θ − θ0| / N)."""
    sparse_l1_reg: float = 0.0
    """L1 pull toward θ0 during phase 2 (fused into the optimizer step)."""
    freeze_embeddings: bool = False
    freeze_head: bool = False
    freeze_layer_norm: bool = False
    full_ft_max_steps_per_iteration: int | None = None
    sparse_ft_max_steps_per_iteration: int | None = None
    full_ft_max_epochs_per_iteration: float | None = None
    sparse_ft_max_epochs_per_iteration: float | None = None
    embedding_patterns: tuple[str, ...] = (r"embed", r"(^|\.)wte\.", r"(^|\.)wpe\.")
    head_patterns: tuple[str, ...] = (r"classifier", r"(^|\.)score\.", r"qa_outputs", r"lm_head", r"(^|\.)cls\.", r"pooler")
    """Heads are trained densely (not masked) unless frozen, and stored whole in the diff."""
    layer_norm_patterns: tuple[str, ...] = (r"LayerNorm|layer_norm|layernorm|(^|\.)ln_|norm\.weight|norm\.bias",)


def _matches(name: str, patterns) -> bool:
    return any(re.search(p, name) for p in patterns)


class LotteryTicketSparseFineTuner(Trainer):
    """`Trainer` that runs LT-SFT and leaves the result in `self.sft` (a `SparseDiff`).

    `trainer.train()` runs phase 1 (full fine-tuning, `full_ft_max_steps_per_iteration` steps),
    selects the top-K entries of |θ1 − θ0| with `SparseDiff.from_models`, rewinds every trainable
    parameter to θ0, and runs phase 2 (`sparse_ft_max_steps_per_iteration` steps) with a compact
    `MaskedAdamW` that updates only those entries. Heads are trained densely and stored in the
    diff's `absolute` part. Afterwards `trainer.sft` composes with other diffs
    (`xlsparse.apply([lang_sft, task_sft], model)`).
    """

    def __init__(self, *args, sft_args: SftArguments | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.sft_args = sft_args or SftArguments()
        self.sft: SparseDiff | None = None
        self._phase = "full"
        self._masks: dict[str, torch.Tensor] = {}
        self._theta0: dict[str, torch.Tensor] = {}

    # --- which parameters do what ---
    def _freeze(self) -> None:
        a = self.sft_args
        for name, p in self.model.named_parameters():
            if ((a.freeze_embeddings and _matches(name, a.embedding_patterns))
                    or (a.freeze_head and _matches(name, a.head_patterns))
                    or (a.freeze_layer_norm and _matches(name, a.layer_norm_patterns))):
                p.requires_grad_(False)

    def _trainable(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def _maskable(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self._trainable().items() if not _matches(n, self.sft_args.head_patterns)}

    def num_tunable(self) -> int:
        """K: the number of entries the SFT may change."""
        if self.sft_args.ft_params_num is not None:
            return self.sft_args.ft_params_num
        return int(self.sft_args.ft_params_proportion * sum(p.numel() for p in self._maskable().values()))

    # --- Trainer hooks ---
    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, **kwargs)
        if self._phase == "full" and self.sft_args.full_l1_reg > 0:
            maskable = self._maskable()
            n = sum(p.numel() for p in maskable.values())
            l1 = sum((p - self._theta0[name]).abs().sum() for name, p in maskable.items())
            loss = loss + self.sft_args.full_l1_reg * l1 / n
        return (loss, outputs) if return_outputs else loss

    def create_optimizer(self, model=None):
        if self._phase != "sparse":
            return super().create_optimizer(model)
        if self.optimizer is None:
            decay = set(self.get_decay_parameter_names(self.model))
            groups = {True: [], False: []}
            masks = {}
            for name, p in self._trainable().items():
                groups[name in decay].append(p)
                masks[p] = self._masks.get(name)  # None: a head, trained densely
            param_groups = [{"params": groups[True], "weight_decay": self.args.weight_decay},
                            {"params": groups[False], "weight_decay": 0.0}]
            self.optimizer = MaskedAdamW(
                [g for g in param_groups if g["params"]],
                masks, lr=self.args.learning_rate, betas=(self.args.adam_beta1, self.args.adam_beta2),
                eps=self.args.adam_epsilon, mode="compact", l1_to_init=self.sft_args.sparse_l1_reg,
            )
        return self.optimizer

    def _run_phase(self, phase: str, max_steps: int | None, max_epochs: float | None, **kwargs):
        self._phase = phase
        self.optimizer, self.lr_scheduler = None, None
        # Set in place: a new TrainingArguments would reset accelerate's shared state.
        if max_steps is not None:
            self.args.max_steps = max_steps
        if max_epochs is not None:
            self.args.num_train_epochs, self.args.max_steps = max_epochs, -1
        return super().train(**kwargs)

    def train(self, **kwargs):
        """Phase 1, selection, rewind, phase 2; returns phase 2's `TrainOutput`."""
        a = self.sft_args
        self._freeze()
        with torch.no_grad():
            self._theta0 = {n: p.detach().clone() for n, p in self._trainable().items()}
        self._run_phase("full", a.full_ft_max_steps_per_iteration, a.full_ft_max_epochs_per_iteration, **kwargs)

        maskable = self._maskable()
        selected = SparseDiff.from_models({n: self._theta0[n] for n in maskable},
                                          {n: p.detach() for n, p in maskable.items()}, k=self.num_tunable())
        self._masks = {n: d.indices for n, d in selected.deltas.items()}
        with torch.no_grad():
            for n, p in self._trainable().items():
                p.copy_(self._theta0[n])

        result = self._run_phase("sparse", a.sparse_ft_max_steps_per_iteration, a.sparse_ft_max_epochs_per_iteration, **kwargs)
        self.sft = self.sparse_diff()
        return result

    def sparse_diff(self) -> SparseDiff:
        """θ − θ0 on the selected entries, plus whole heads, as a SparseDiff."""
        deltas, absolute = {}, {}
        with torch.no_grad():
            for n, p in self._trainable().items():
                if n in self._masks:
                    idx = self._masks[n].long()
                    values = (p.detach().reshape(-1)[idx] - self._theta0[n].reshape(-1)[idx])
                    deltas[n] = SparseDelta._trusted(idx.to(index_dtype(p.numel())), values, p.shape)
                else:
                    absolute[n] = p.detach().clone()
        return SparseDiff._trusted(deltas, absolute=absolute,
                                   base_model=getattr(self.model.config, "_name_or_path", None) or None)
