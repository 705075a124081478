"""The anchors' ways, in plain PyTorch: what users do today without xlsparse."""
import torch


def index_add_axpy(dense: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, alpha: float) -> None:
    """A plain scatter-add: dense.view(-1).index_add_(0, indices, values, alpha=alpha)."""
    dense.view(-1).index_add_(0, indices, values, alpha=alpha)
