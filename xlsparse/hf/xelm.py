"""Sparse expert ensembles in the style of X-ELM (Blevins et al. 2024): independent sparse
experts over one shared base, run together in one batched pass (one copy of the batch per
expert, routed through `multi_delta_linear`) and mixed per example with `ensemble_logprobs`.
A new expert branches from its typologically closest parent without touching the others."""
import copy
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from ..diff import SparseDiff
from ..functional import ensemble_logprobs
from ..optim import MaskedAdamW
from .continual import uriel_distance
from .model import convert, extract_diff, route
from .subnetworks import _progress


def train_expert(base: nn.Module, batches: Iterable, k: int | None = None, density: float | None = None,
                 init: SparseDiff | None = None, target_modules=None, lr: float = 1e-3, loss_fn: Callable | None = None,
                 progress: bool = True) -> SparseDiff:
    """Train one sparse expert on `batches` and return it as a SparseDiff; `base` is not changed.

    The expert's support is drawn with `k` / `density`, or taken with its values from `init`
    (a parent expert to branch from). Only the delta values train.
    """
    model = copy.deepcopy(base)
    for p in model.parameters():
        p.requires_grad_(False)
    if init is not None:
        convert(model, target_modules, kind="delta", diffs=init)
    else:
        convert(model, target_modules, kind="delta", k=k, density=density)
    values = [p for n, p in model.named_parameters() if n.endswith("delta_values")]
    for p in values:
        p.requires_grad_(True)
    opt = MaskedAdamW(values, [None] * len(values), lr=lr, weight_decay=0.0, mode="compact")
    loss_fn = loss_fn or (lambda m, b: m(**b).loss)
    model.train()
    for batch in _progress(batches, "expert", progress):
        opt.zero_grad(set_to_none=True)
        loss_fn(model, batch).backward()
        opt.step()
    return extract_diff(model)


def closest_parent(languages: Mapping[str, str], new_language: str) -> str:
    """The expert whose language (ISO 639-3, `languages` = {expert: code}) is closest to
    `new_language` by URIEL distance."""
    if not languages:
        raise ValueError("closest_parent: no experts to branch from")
    return min(languages, key=lambda e: uriel_distance(languages[e], new_language))


class ExpertEnsemble(nn.Module):
    """E sparse experts over one base, run as one batch of E copies and mixed per example.

    `forward(input_ids, attention_mask=None, weights=None, space="prob")` returns log-probabilities
    [B, S, V] of the mixture: with `space="prob"`, log Σ_e w_e · softmax(z_e); with "logit",
    log_softmax(Σ_e w_e · z_e). `weights` [B, E] are per-example expert weights (uniform by default).
    """

    def __init__(self, base: nn.Module, experts: Mapping[str, SparseDiff], target_modules=None):
        super().__init__()
        if not experts:
            raise ValueError("ExpertEnsemble: give at least one expert")
        self._base = base
        self._target_modules = target_modules
        self.experts: dict[str, SparseDiff] = dict(experts)
        self._build()

    def _build(self) -> None:
        self.model = convert(copy.deepcopy(self._base), self._target_modules, kind="multi", diffs=self.experts)
        self.model.eval()

    @property
    def names(self) -> list[str]:
        return list(self.experts)

    def add_expert(self, name: str, diff: SparseDiff) -> None:
        """Add an expert; the others are not changed."""
        if name in self.experts:
            raise ValueError(f"add_expert: an expert named {name!r} exists")
        self.experts[name] = diff
        self._build()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                weights: torch.Tensor | None = None, space: str = "prob") -> torch.Tensor:
        b, s = input_ids.shape
        e = len(self.experts)
        if weights is None:
            weights = torch.full((b, e), 1.0 / e, device=input_ids.device)
        if tuple(weights.shape) != (b, e):
            raise ValueError(f"ExpertEnsemble: weights must have shape [{b}, {e}], got {tuple(weights.shape)}")
        copies = input_ids.repeat(e, 1)
        mask = None if attention_mask is None else attention_mask.repeat(e, 1)
        expert_of_copy = torch.arange(e, device=input_ids.device).repeat_interleave(b)
        with route(self.model, expert_of_copy):
            logits = self.model(input_ids=copies, attention_mask=mask).logits
        logits = logits.reshape(e, b * s, -1)
        log_w = weights.clamp_min(1e-30).log().repeat_interleave(s, dim=0)
        return ensemble_logprobs(logits, log_w.to(logits.dtype), space=space).reshape(b, s, -1)
