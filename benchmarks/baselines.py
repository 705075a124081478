"""The anchors' ways, in plain PyTorch: what users do today without xlsparse."""
import torch


def index_add_axpy(dense: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, alpha: float) -> None:
    """A plain scatter-add: dense.view(-1).index_add_(0, indices, values, alpha=alpha)."""
    dense.view(-1).index_add_(0, indices, values, alpha=alpha)


# --- compose ---

def composable_sft_apply(params: dict, encoded: list[dict], alphas: list[float]) -> None:
    """composable-sft's apply, per diff and tensor: decode the delta-encoded column-major index
    steps, build the dense diff, add it. Steps are held as int64 tensors (the file keeps a Python
    list, which would make this baseline slower still)."""
    for diff, alpha in zip(encoded, alphas):
        for name, enc in diff.items():
            param = params[name]
            column = torch.cumsum(enc["index_steps"], 0)
            rows = param.shape[0]
            # column-major flat -> (row, col); parameters are 1-D or 2-D here
            flat = column if param.dim() == 1 else (column % rows) * param.shape[1] + column // rows
            dense = torch.zeros(param.numel(), dtype=param.dtype)
            dense[flat] = enc["values"]
            param.add_(dense.view(param.shape), alpha=alpha)


def index_add_apply(params: dict, deltas: list[dict], alphas: list[float]) -> None:
    """A plain loop: one index_add_ per diff and tensor."""
    for diff, alpha in zip(deltas, alphas):
        for name, (idx, vals) in diff.items():
            params[name].view(-1).index_add_(0, idx, vals, alpha=alpha)


def topk_cat(tensors: list, k: int) -> torch.Tensor:
    """torch.topk of |x| over torch.cat of every tensor: the usual global selection."""
    return torch.topk(torch.cat([t.reshape(-1).abs() for t in tensors]), k, sorted=False).indices


def composable_sft_threshold(tensors: list, k: int) -> float:
    """composable-sft's LT-SFT selection: every |diff| into a Python list, then np.partition for
    the k-th largest."""
    import numpy as np

    values = []
    for t in tensors:
        values += t.reshape(-1).abs().tolist()
    return float(np.partition(np.array(values), len(values) - k)[len(values) - k])
