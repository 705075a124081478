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
    """SpIEL's linear_sd with dense weight grads (its CPU path, and on CUDA the path its weight-grad
    hook asks for on regrowth steps): clone W0, scatter-add the delta into it, a dense linear;
    autograd then builds a dense O x I weight gradient and gathers dvalues from it. (SpIEL merges
    W0 again in its backward; this reuses the merged W autograd saved, a little cheaper.)"""
    full = weight.reshape(-1).scatter_add(0, indices, values).view(weight.shape)
    return torch.nn.functional.linear(x, full, bias)


class _SpielSddmm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, indices, values, support):
        ctx.save_for_backward(x, weight, indices, values)
        ctx.support, ctx.has_bias = support, bias is not None
        full = weight.reshape(-1).scatter_add(0, indices, values).view(weight.shape)
        return torch.nn.functional.linear(x, full, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, indices, values = ctx.saved_tensors
        dx = dv = db = None
        if ctx.needs_input_grad[0]:
            # SpIEL keeps no merged W for the backward: it merges again.
            full = weight.reshape(-1).scatter_add(0, indices, values).view(weight.shape)
            dx = grad_out @ full
        if ctx.needs_input_grad[4]:
            dv = torch_sddmm(grad_out, x, ctx.support)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = grad_out.sum(0)
        return dx, None, db, None, dv, None


def spiel_sddmm_delta_linear(x, weight, bias, indices, values, support):
    """SpIEL's linear_sd on a normal training step on CUDA (no weight-grad hook): the forward as in
    spiel_delta_linear; the backward merges W0 + Δ again for dX = dY (W0 + Δ) and takes dvalues
    from an SDDMM, torch.sparse.sampled_addmm on `support` (support_csr) in place of SpIEL's own
    CUDA kernel. x is [T, I]; W0 is frozen; fp32, as torch_sddmm."""
    return _SpielSddmm.apply(x, weight, bias, indices, values, support)


def support_csr(indices, shape, dtype):
    """The sparse CSR pattern [O, I] of the sorted, unique flat row-major `indices`, zero-valued:
    sampled_addmm with beta=0 still multiplies these values by 0, so they must be finite. Build it
    once, outside the timed call."""
    if indices.numel() > 1 and not bool((indices[1:] > indices[:-1]).all()):
        raise ValueError("support_csr: indices must be sorted and unique (the CSR values follow their order)")
    rows, cols = indices // shape[1], indices % shape[1]
    zeros = torch.zeros(indices.numel(), dtype=dtype, device=indices.device)
    return torch.sparse_coo_tensor(torch.stack([rows, cols]), zeros, shape, check_invariants=True).to_sparse_csr()


def torch_sddmm(grad_out, x, support):
    """torch's SDDMM: dvalues[n] = Σ_t dY[t, r_n] X[t, c_n], as
    torch.sparse.sampled_addmm(support, dYᵀ, X, beta=0), in the order of the sorted indices of
    `support` (support_csr). fp32: torch's CPU kernel takes no bf16 or fp16."""
    return torch.sparse.sampled_addmm(support, grad_out.t(), x, beta=0).values()


def merged_per_language(x, weight, bias, indices: list, values: list, route, merged: list | None = None):
    """Hard routing the usual way (PEFT has no mixed-batch path for sparse deltas): per language,
    W0 with its delta scatter-added, run over that language's tokens only (index_select, linear,
    index_copy_ into the output); tokens routed −1 go through W0 alone. Every token is multiplied
    once; autograd builds each language's dense dW over its own tokens and gathers dvalues.
    `merged`: the languages' merged weights, made once (inference: the deltas do not change
    between calls, so the merged way keeps its merged copies instead of making them per call)."""
    out = x.new_empty(x.shape[0], weight.shape[0])
    if merged is None:
        merged = [weight.reshape(-1).scatter_add(0, idx, val).view(weight.shape) for idx, val in zip(indices, values)]
    for e, w in enumerate([weight, *merged], start=-1):  # route −1: W0 alone
        sel = (route == e).nonzero().flatten()
        out.index_copy_(0, sel, torch.nn.functional.linear(x.index_select(0, sel), w, bias))
    return out


def merged_ensemble(x, merged_weights: list, bias, gates):
    """E dense forward passes, one per merged expert weight, mixed by gates [T, E]: each pass's
    output is scaled into, or accumulated onto, the first one in place, as a user would write it
    (at most two [T, O] tensors alive; `out = out + g * y` made two more per pass and read them
    back, about 15% of this baseline's time at T = 2048, 4096 x 1024, one thread)."""
    out = None
    for e, w in enumerate(merged_weights):
        y = torch.nn.functional.linear(x, w, bias)
        if out is None:
            out = y.mul_(gates[:, e : e + 1])
        else:
            out.addcmul_(gates[:, e : e + 1], y)
        del y  # the next pass's output is allocated while this one would still be held
    return out


def composite_ensemble_logprobs(logits, log_weights):
    """torch in one expression over logits [E, T, V]: logsumexp over E of log_softmax(z) + log w
    (one [E, T, V] log_softmax, added to in place; logsumexp makes its own [E, T, V] temporary)."""
    return torch.logsumexp(torch.log_softmax(logits, -1).add_(log_weights.T[:, :, None]), 0)


def composite_ensemble_nll(logits, log_weights, targets):
    """NLL [T] without the [T, V] mixture: −logsumexp over E of z_e[y] − logsumexp_V(z_e) + log w_e
    (torch.logsumexp over V still makes an [E, T, V] temporary inside)."""
    num, tokens, _ = logits.shape
    picked = logits.gather(2, targets.view(1, tokens, 1).expand(num, tokens, 1)).squeeze(2)
    return -torch.logsumexp(picked - torch.logsumexp(logits, -1) + log_weights.T, 0)


# --- compose ---

def composable_sft_decode(encoding: dict, shape) -> torch.Tensor:
    """composable-sft's load (SFT.__init__ -> decode_sparse_tensor): the cumsum of the index steps
    is a column-major flat index, split into coordinates; a coalesced sparse COO tensor."""
    flat = torch.cumsum(encoding["index_steps"], 0)
    divisor, coords = 1, []
    for size in shape:
        coords.append(flat // divisor % size)
        divisor *= size
    # check_invariants=False is torch's default, said out loud (else torch warns on every call)
    return torch.sparse_coo_tensor(torch.stack(coords), encoding["values"], shape, check_invariants=False).coalesce()


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
