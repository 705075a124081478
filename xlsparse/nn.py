"""Drop-in replacements for `nn.Linear` whose weight is a frozen base plus sparse deltas."""
import torch
from torch import nn

from . import functional, routing
from .ops import _common
from .ops.compose import sparse_axpy_
from .ops.matmul import merged_weight


def _index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel < 2**31 else torch.int64


def _support(weight: torch.Tensor, k=None, density=None, indices=None) -> torch.Tensor:
    """Sorted unique flat indices into `weight`: k (or density · numel) drawn at random, or the
    given indices (a tensor of flat indices, or a bool mask of the weight's shape, e.g. from
    `xlsparse.functional.topk_mask`)."""
    if sum(a is not None for a in (k, density, indices)) != 1:
        raise ValueError("from_linear: give exactly one of k, density or indices")
    n = weight.numel()
    if indices is None:
        if density is not None:
            if not 0.0 <= density <= 1.0:
                raise ValueError(f"from_linear: density must lie in [0, 1], got {density}")
            k = round(density * n)
        if not 0 <= k <= n:
            raise ValueError(f"from_linear: k must lie in [0, {n}], got {k}")
        picked = torch.randperm(n, device=weight.device)[:k]
        return picked.sort().values.to(_index_dtype(n))
    indices = torch.as_tensor(indices, device=weight.device)
    if indices.dtype == torch.bool:
        if indices.shape != weight.shape:
            raise ValueError(f"from_linear: mask shape {tuple(indices.shape)} != weight shape {tuple(weight.shape)}")
        return indices.reshape(-1).nonzero().flatten().to(_index_dtype(n))
    if indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"from_linear: indices must be int32, int64 or a bool mask, got {indices.dtype}")
    if indices.dim() != 1:
        raise ValueError(f"from_linear: indices must be 1-D flat indices, got {tuple(indices.shape)}")
    _common.check_indices("from_linear", indices, n)
    return indices


class SparseDeltaLinear(nn.Module):
    """y = x (W0 + Δ)ᵀ + b with a frozen base `weight` W0, a `delta_indices` buffer [K] and a
    trainable `delta_values` parameter [K] (zero at creation, so a fresh layer computes exactly
    what the original linear did).

    The backward never allocates a dense O x I gradient. The merged weight W0 + Δ is cached
    between calls while neither the values nor the base change (a bump of their version counters,
    as an optimizer step does, drops it), so inference multiplies by one dense weight.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, indices: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight.detach(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=bias.requires_grad)
        self.register_buffer("delta_indices", indices)
        self.delta_values = nn.Parameter(torch.zeros(indices.numel(), dtype=weight.dtype, device=weight.device))
        self._cache_key = None
        self._cache = None
        self._displaced = None  # base entries overwritten by merge(), for a bit-exact unmerge()

    @classmethod
    def from_linear(cls, linear: nn.Linear, k=None, density=None, indices=None) -> "SparseDeltaLinear":
        """Wrap `linear`: its weight becomes the frozen base; the delta's support is `k` (or
        `density`) random entries, or `indices` (flat indices or a bool mask of the weight)."""
        return cls(linear.weight, linear.bias, _support(linear.weight, k, density, indices))

    @property
    def indices(self) -> torch.Tensor:
        return self.delta_indices

    @property
    def values(self) -> torch.Tensor:
        return self.delta_values

    @property
    def shape(self) -> torch.Size:
        return self.weight.shape

    def _merged(self, num_tokens: int):
        """The cached W0 + Δ, rebuilt when the values or the base changed; None when merging
        does not pay for this call (few tokens) or under torch.compile (no Python state)."""
        if torch.compiler.is_compiling():
            return None
        w, v = self.weight, self.delta_values
        key = (w.data_ptr(), w._version, v.data_ptr(), v._version, self.delta_indices.data_ptr(), self.delta_indices._version)
        if key != self._cache_key:
            self._cache_key, self._cache = None, None
            if not functional.merge_pays(num_tokens, v.numel(), w.numel()):
                return None
            self._cache = merged_weight(w, self.delta_indices, v)
            self._cache_key = key
        return self._cache

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._displaced is not None:  # merged into the base: a plain linear
            return nn.functional.linear(x, self.weight, self.bias)
        merged = self._merged(x.numel() // max(self.in_features, 1))
        return functional.sparse_delta_linear(x, self.weight, self.bias, self.delta_indices, self.delta_values, merged)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold Δ into the base weight; `unmerge` restores the base bit-exactly."""
        if self._displaced is None:
            idx = self.delta_indices.long()
            self._displaced = self.weight.view(-1)[idx].clone()
            sparse_axpy_(self.weight.data, self.delta_indices, self.delta_values.detach())

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo `merge`: the saved base entries return."""
        if self._displaced is not None:
            self.weight.view(-1)[self.delta_indices.long()] = self._displaced
            self._displaced = None

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nnz={self.delta_indices.numel()}"


class MultiDeltaLinear(nn.Module):
    """y_t = x_t W0ᵀ + b + Σ_e g_{t,e} x_t Δ_eᵀ: one frozen base and one sparse delta per
    language or expert (trainable `delta_values`, buffers `delta_indices_<i>`), in the insertion
    order of the `deltas` dict given to `from_linear` (`names`).

    `forward(x, route=None, gates=None)`: hard `route` ids (−1 = base only) or a TokenGroups, or
    soft `gates` [..., E]; with neither, the routing set by `xlsparse.routing.use` /
    `xlsparse.hf.route` is used (grouped once per batch and shared by every layer), and with no
    routing at all every token uses the base only.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, indices: list, values: list, names: list):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.names = list(names)
        self.weight = nn.Parameter(weight.detach(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        for i, idx in enumerate(indices):
            self.register_buffer(f"delta_indices_{i}", idx)
        self.delta_values = nn.ParameterList(
            [nn.Parameter(v.detach().to(weight.dtype).clone()) for v in values])

    @classmethod
    def from_linear(cls, linear: nn.Linear, deltas: dict) -> "MultiDeltaLinear":
        """Wrap `linear` with `deltas` = {name: delta}; a delta is any object with `.indices`,
        `.values` and `.shape` (e.g. `xlsparse.SparseDelta`) matching the weight."""
        w = linear.weight
        indices, values = [], []
        for name, d in deltas.items():
            if tuple(d.shape) != tuple(w.shape):
                raise ValueError(f"MultiDeltaLinear: delta {name!r} has shape {tuple(d.shape)}, the weight {tuple(w.shape)}")
            idx = _support(w, indices=d.indices.to(w.device))
            if d.values.shape != idx.shape:
                raise ValueError(f"MultiDeltaLinear: delta {name!r} has {idx.numel()} indices but {d.values.numel()} values")
            indices.append(idx)
            values.append(d.values.to(w.device))
        return cls(w, linear.bias, indices, values, list(deltas))

    @property
    def delta_indices(self) -> list[torch.Tensor]:
        return [getattr(self, f"delta_indices_{i}") for i in range(len(self.names))]

    def forward(self, x: torch.Tensor, route=None, gates=None) -> torch.Tensor:
        if route is None and gates is None:
            active = routing.current()
            if active is not None:
                route = active.tokens(x.numel() // max(self.in_features, 1))
        return functional.multi_delta_linear(x, self.weight, self.bias, self.delta_indices, list(self.delta_values),
                                             route=route, gates=gates)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, deltas={self.names}"
