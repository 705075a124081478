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
    K-sized state, index_add_ the change back. `indices` are the int32 tensors of MaskedAdamW's
    compact state, as ours gets (torch takes int32 in index_select and index_add_)."""
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


# --- matmul ---


def spiel_delta_linear(x, weight, bias, indices, values):
    """SpIEL's way: clone W0, scatter-add the delta into it, a dense linear; autograd then builds a
    dense O x I weight gradient and gathers dvalues from it."""
    full = weight.reshape(-1).scatter_add(0, indices, values).view(weight.shape)
    return torch.nn.functional.linear(x, full, bias)


def gather_sddmm(grad_out, x, indices, step=16384):
    """The torch SDDMM: gather both operands' columns per entry and reduce over tokens (in chunks
    of `step` entries, so that the [T, step] temporaries stay bounded)."""
    cols = x.shape[1]
    rows, cols_of = indices // cols, indices % cols
    out = torch.empty(indices.numel(), dtype=x.dtype, device=x.device)
    for i in range(0, indices.numel(), step):
        out[i : i + step] = (grad_out[:, rows[i : i + step]] * x[:, cols_of[i : i + step]]).sum(0)
    return out


def peft_mixed_batch(x, weight, bias, indices: list, values: list, route):
    """PEFT's mixed-batch way: per language, merge its weight, index_select its tokens, run the
    linear and index_copy the rows back (autograd builds each language's dense dW)."""
    out = torch.nn.functional.linear(x, weight, bias)
    for e, (idx, val) in enumerate(zip(indices, values)):
        sel = (route == e).nonzero().flatten()
        full = weight.reshape(-1).scatter_add(0, idx, val).view(weight.shape)
        out = out.index_copy(0, sel, torch.nn.functional.linear(x.index_select(0, sel), full, bias))
    return out


def merged_ensemble(x, merged_weights: list, bias, gates):
    """E dense forward passes, one per merged expert weight, mixed by gates [T, E]."""
    out = 0
    for e, w in enumerate(merged_weights):
        out = out + gates[:, e : e + 1] * torch.nn.functional.linear(x, w, bias)
    return out


def composite_ensemble_logprobs(logits, log_weights):
    """The torch composite: a stack of E log_softmax, plus the log-weights, logsumexp over E."""
    stacked = torch.stack([torch.log_softmax(z, -1) for z in logits])
    return torch.logsumexp(stacked + log_weights.T[:, :, None], 0)


# --- compose ---

def composable_sft_decode(encoding: dict, shape) -> torch.Tensor:
    """composable-sft's load (SFT.__init__ -> decode_sparse_tensor): the cumsum of the index steps
    is a column-major flat index, split into coordinates; a coalesced sparse COO tensor."""
    flat = torch.cumsum(encoding["index_steps"], 0)
    divisor, coords = 1, []
    for size in shape:
        coords.append(flat // divisor % size)
        divisor *= size
    return torch.sparse_coo_tensor(torch.stack(coords), encoding["values"], shape).coalesce()


def composable_sft_apply(params: dict, diffs: list[dict]) -> None:
    """composable-sft's SFT.apply per diff: `param += diff` for each tensor, diff a coalesced sparse
    COO tensor decoded once at load (composable_sft_decode); it has no scaling."""
    for diff in diffs:
        for name, coo in diff.items():
            params[name].add_(coo)


def composable_sft_revert(params: dict, diffs: list[dict]) -> None:
    """composable-sft's SFT.revert per diff: `param -= diff` (not bit-exact)."""
    for diff in diffs:
        for name, coo in diff.items():
            params[name].sub_(coo)


def index_add_apply(params: dict, deltas: list[dict], alphas: list[float]) -> None:
    """A plain loop: one index_add_ per diff and tensor, with the diffs' own int32 indices."""
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
