"""The anchors' ways, in plain PyTorch: what users do today without xlsparse."""
import torch


def index_add_axpy(dense: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, alpha: float) -> None:
    """A plain scatter-add: dense.view(-1).index_add_(0, indices, values, alpha=alpha)."""
    dense.view(-1).index_add_(0, indices, values, alpha=alpha)


# --- optim ---

def ltsft_masked_adamw_step(params, masks, optimizer) -> None:
    """The LT-SFT way: zero the gradient outside the mask, then a full (fused) AdamW step.

    `optimizer` is a torch.optim.AdamW(fused=True) over `params`; its weight decay still moves the
    entries outside the mask, and it keeps state for every parameter."""
    for p, m in zip(params, masks):
        p.grad.mul_(m)
    optimizer.step()


def indexed_adamw_step(params, indices, exp_avgs, exp_avg_sqs, step: int, lr: float = 1e-3,
                       betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2) -> None:
    """A torch composite of a compact AdamW step: index_select the K entries, lerp/addcmul the
    K-sized state, index_add_ the change back."""
    beta1, beta2 = betas
    step_size = lr / (1 - beta1**step)
    bias2_sqrt = (1 - beta2**step) ** 0.5
    for p, idx, m, v in zip(params, indices, exp_avgs, exp_avg_sqs):
        g = p.grad.view(-1).index_select(0, idx)
        w = p.detach().view(-1).index_select(0, idx)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        change = w.mul_(-lr * weight_decay).sub_(m / (v.sqrt() / bias2_sqrt + eps), alpha=step_size)
        p.detach().view(-1).index_add_(0, idx, change)


def dense_weight_grad(grad_out, x):
    """One dense dW = dYᵀ X, what an unmasked nn.Linear computes."""
    return grad_out.t() @ x
