"""Drop-in replacements for nn.Linear used by language-specific subnetworks and sparse deltas."""
import torch
import torch.nn.functional as F

from . import routing
from .ops import optim as optim_ops


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
        if ctx.needs_input_grad[0]:
            grad_x = grad_y @ weight
        if ctx.needs_input_grad[1]:
            grad_w = optim_ops.multi_mask_weight_grad(grad_y, x, masks, order, offsets)
        if ctx.needs_input_grad[2]:
            # per-language sums of grad_y; row 0 collects the id −1 tokens and is dropped
            per_lang = grad_y.new_zeros(masks.shape[0] + 1, grad_y.shape[1]).index_add_(0, ids + 1, grad_y)[1:]
            grad_b = (per_lang * bias_masks).sum(0) if ctx.has_bias_masks else per_lang.sum(0)
        return grad_x, grad_w, grad_b, None, None, None, None, None


def _static_groups(language_ids: torch.Tensor, num_tokens: int, num_ids: int):
    """TokenGroups' (ids, order, offsets) with shapes fixed by T alone: order keeps every token,
    the unrouted ones (id < 0) first, and offsets[0] skips them; ids >= num_ids sort last, in no group."""
    ids = language_ids.reshape(-1).long()
    if ids.numel() != num_tokens:  # one id per example
        ids = ids.repeat_interleave(num_tokens // ids.numel())
    order = torch.sort(ids, stable=True).indices
    counts = (ids.unsqueeze(0) == torch.arange(num_ids, device=ids.device).unsqueeze(1)).sum(1)
    offsets = torch.cat([(ids < 0).sum().reshape(1), counts]).cumsum(0)
    return torch.where((ids >= 0) & (ids < num_ids), ids, -1), order, offsets


class SubnetworkLinear(torch.nn.Linear):
    """nn.Linear whose weight trains a different subnetwork for each language of a mixed batch.

    The forward pass is the dense linear. In the backward pass token t of language l adds its
    gradient only where `masks[l]` is True: dW = Σ_l M_l ⊙ (dY_lᵀ X_l), computed by one fused op
    with no dense gradient per language (`xlsparse.ops.optim.multi_mask_weight_grad`).

    Language ids index `masks` in its insertion order; −1 (and a batch with no routing at all)
    means "no update": such tokens add nothing to the weight or bias gradient. The ids come from
    the `language_ids` argument (per example [B], per token [B, S] or flat [T]) or else from the
    routing set by `xlsparse.hf.route` / `xlsparse.routing.use`, grouped once per batch.

    Bias: with `bias_masks` ({language: bool [out_features]}) the bias gradient is masked per
    language too; without it the bias is shared, and its gradient is the sum over routed tokens
    (id ≠ −1). dX is the ordinary dense gradient.
    """

    def __init__(self, in_features: int, out_features: int, masks: dict[str, torch.Tensor], bias: bool = True,
                 bias_masks: dict[str, torch.Tensor] | None = None, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._set_masks(masks, bias_masks)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, masks: dict[str, torch.Tensor],
                    bias_masks: dict[str, torch.Tensor] | None = None) -> "SubnetworkLinear":
        """Wrap `linear`, sharing its weight and bias Parameters (optimizers that hold them still work)."""
        layer = cls.__new__(cls)
        torch.nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer.weight = linear.weight
        layer.bias = linear.bias
        layer._set_masks(masks, bias_masks)
        return layer

    def _set_masks(self, masks: dict[str, torch.Tensor], bias_masks: dict[str, torch.Tensor] | None) -> None:
        if not isinstance(masks, dict) or not masks:
            raise ValueError("masks must be a non-empty dict {language: bool tensor [out_features, in_features]}")
        shape = (self.out_features, self.in_features)
        for lang, m in masks.items():
            if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
                raise TypeError(f"masks[{lang!r}] must be a bool tensor")
            if tuple(m.shape) != shape:
                raise ValueError(f"masks[{lang!r}] has shape {tuple(m.shape)}, the weight has {shape}")
        self.languages = list(masks)
        device = self.weight.device
        self.register_buffer("masks", torch.stack([masks[k] for k in self.languages]).to(device), persistent=False)
        if bias_masks is None:
            self.bias_masks = None
            return
        if self.bias is None:
            raise ValueError("bias_masks given for a layer without bias")
        if set(bias_masks) != set(masks):
            raise ValueError("bias_masks must name the same languages as masks")
        for lang, m in bias_masks.items():
            if not isinstance(m, torch.Tensor) or m.dtype != torch.bool or tuple(m.shape) != (self.out_features,):
                raise ValueError(f"bias_masks[{lang!r}] must be a bool tensor of shape ({self.out_features},)")
        stacked = torch.stack([bias_masks[k] for k in self.languages]).to(device)
        self.register_buffer("bias_masks", stacked, persistent=False)

    def _groups(self, num_tokens: int, language_ids: torch.Tensor | None):
        """(ids [T], order, offsets): the batch's tokens grouped by language."""
        num_ids = len(self.languages)
        if torch.compiler.is_compiling():
            # TokenGroups checks the ids on the host and drops the −1 tokens (a data-dependent
            # shape); a traced graph needs the static-shape form below. The ContextVar behind
            # routing.current() cannot be traced either, so compiled code passes language_ids.
            if language_ids is None:
                raise ValueError("SubnetworkLinear under torch.compile needs the language_ids argument")
            return _static_groups(language_ids, num_tokens, num_ids)
        if language_ids is not None:
            groups = routing.Routing(language_ids.to(self.weight.device), num_ids).tokens(num_tokens)
        elif routing.current() is not None:
            if routing.current().num_ids != num_ids:
                raise ValueError(f"route has {routing.current().num_ids} ids but the layer has {num_ids} languages")
            groups = routing.current().tokens(num_tokens)
        else:
            groups = routing.TokenGroups.build(torch.full((num_tokens,), -1, device=self.weight.device), num_ids)
        return groups.ids, groups.order, groups.offsets

    def forward(self, x: torch.Tensor, language_ids: torch.Tensor | None = None) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        ids, order, offsets = self._groups(x2.shape[0], language_ids)
        y = _SubnetworkLinearFn.apply(x2, self.weight, self.bias, self.masks, self.bias_masks, ids, order, offsets)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, languages={self.languages}"
