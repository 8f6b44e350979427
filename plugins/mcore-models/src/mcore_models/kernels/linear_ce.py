"""Fused linear + cross-entropy: the loss of ``hidden @ weight.T`` without ``[tokens, vocab]`` logits.

Tokens are processed in chunks of ``chunk_size``. For each chunk the logits ``(n, V)`` are formed,
turned in place into their gradient ``scale * (softmax(scale * z) - onehot)`` by ``ce_chunk`` (the
Triton kernel on CUDA, the reference elsewhere), and the gradients of the hidden states and of the
weight are accumulated right away, so forward and backward together do the same three matmuls as
the unfused loss while holding one chunk of logits at a time. The returned loss is the *sum* over
non-ignored tokens (fp32); the caller divides by the count.

With ``vocab_chunk_size`` the vocabulary is split too, for vocabularies so large that even one
``(chunk, V)`` block is too much: a first pass over the vocabulary blocks gathers each row's
log-sum-exp online, a second recomputes each block's logits to form its gradient (four matmuls
instead of three; plain PyTorch ops on every device).
"""

from __future__ import annotations

import torch

from mcore_models.kernels.dispatch import Dispatched

IGNORE_INDEX = -100


def ce_chunk_reference(logits: torch.Tensor, labels: torch.Tensor, scale: float) -> torch.Tensor:
    """Per-row loss ``(n,)`` fp32 of ``scale * logits``; ``logits`` is overwritten with d loss / d logits."""
    z = logits.float() * scale  # (n, V)
    lse = torch.logsumexp(z, dim=-1)  # (n,)
    valid = labels != IGNORE_INDEX
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    target = z.gather(1, safe[:, None]).squeeze(1)
    loss = torch.where(valid, lse - target, torch.zeros_like(lse))
    grad = torch.softmax(z, dim=-1)
    grad.scatter_add_(1, safe[:, None], torch.full_like(target, -1.0)[:, None])
    grad.mul_((valid.float() * scale)[:, None])
    logits.copy_(grad)
    return loss


ce_chunk = Dispatched("ce_chunk", ce_chunk_reference, "mcore_models.kernels.linear_ce_triton:ce_chunk")


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size: int, scale: float):  # type: ignore[override]
        # hidden (N, H), weight (V, H), labels (N,). Under autocast the matmuls run in the autocast
        # dtype; the gradients are returned in the inputs' own dtypes.
        device_type = hidden.device.type
        compute = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        h_all, w = hidden.to(compute), weight.to(compute)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(h_all) if need_h else None
        grad_w = None  # the first chunk's product; fp32 from the second chunk on
        with torch.autocast(device_type, enabled=False):
            for start in range(0, hidden.shape[0], chunk_size):
                h = h_all[start : start + chunk_size]  # (n, H)
                logits = h @ w.t()  # (n, V)
                total += ce_chunk(logits, labels[start : start + chunk_size], scale).sum()
                if grad_h is not None:
                    torch.mm(logits, w, out=grad_h[start : start + chunk_size])
                if need_w:
                    partial = logits.t() @ h  # (V, H)
                    grad_w = partial if grad_w is None else grad_w.float().add_(partial)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        grad_h, grad_w = ctx.saved_tensors
        dh = (grad_h * grad_out.to(grad_h.dtype)).to(ctx.dtypes[0]) if grad_h is not None else None
        dw = (grad_w * grad_out.to(grad_w.dtype)).to(ctx.dtypes[1]) if grad_w is not None else None
        return dh, dw, None, None, None


class _VocabBlockedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size: int, vocab_chunk_size: int, scale: float):  # type: ignore[override]
        # hidden (N, H), weight (V, H), labels (N,)
        device_type = hidden.device.type
        compute = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        h_all, w = hidden.to(compute), weight.to(compute)
        vocab = w.shape[0]
        blocks = [(v0, min(v0 + vocab_chunk_size, vocab)) for v0 in range(0, vocab, vocab_chunk_size)]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(h_all) if need_h else None
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else None
        with torch.autocast(device_type, enabled=False):
            for start in range(0, hidden.shape[0], chunk_size):
                h = h_all[start : start + chunk_size]  # (n, H)
                y = labels[start : start + chunk_size]
                valid = y != IGNORE_INDEX
                row_max = torch.full(y.shape, float("-inf"), dtype=torch.float32, device=h.device)
                row_sum = torch.zeros(y.shape, dtype=torch.float32, device=h.device)
                target = torch.zeros(y.shape, dtype=torch.float32, device=h.device)
                for v0, v1 in blocks:  # pass 1: online log-sum-exp and the target logit
                    z = (h @ w[v0:v1].t()).float() * scale  # (n, Vb)
                    new_max = torch.maximum(row_max, z.amax(dim=-1))
                    row_sum = row_sum * torch.exp(row_max - new_max) + torch.exp(z - new_max[:, None]).sum(-1)
                    row_max = new_max
                    inside = valid & (y >= v0) & (y < v1)
                    picked = z.gather(1, (y - v0).clamp(0, v1 - v0 - 1)[:, None]).squeeze(1)
                    target = torch.where(inside, picked, target)
                lse = row_max + torch.log(row_sum)  # (n,)
                total += torch.where(valid, lse - target, torch.zeros_like(lse)).sum()
                if not (need_h or need_w):
                    continue
                dh = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
                row_scale = (valid.float() * scale)[:, None]
                for v0, v1 in blocks:  # pass 2: each block's gradient scale * (softmax - onehot)
                    z = (h @ w[v0:v1].t()).float() * scale  # (n, Vb)
                    grad = torch.exp(z - lse[:, None])
                    inside = valid & (y >= v0) & (y < v1)
                    rows = inside.nonzero().squeeze(1)
                    grad[rows, y[rows] - v0] -= 1.0
                    grad = (grad * row_scale).to(compute)
                    if need_h:
                        dh += (grad @ w[v0:v1]).float()
                    if grad_w is not None:
                        grad_w[v0:v1] += (grad.t() @ h).float()
                if grad_h is not None:
                    grad_h[start : start + chunk_size] = dh.to(compute)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        grad_h, grad_w = ctx.saved_tensors
        dh = (grad_h * grad_out.to(grad_h.dtype)).to(ctx.dtypes[0]) if grad_h is not None else None
        dw = (grad_w * grad_out).to(ctx.dtypes[1]) if grad_w is not None else None
        return dh, dw, None, None, None, None


def linear_cross_entropy_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_size: int = 4096,
    vocab_chunk_size: int | None = None,
    scale: float = 1.0,
) -> torch.Tensor:
    """Sum over non-ignored tokens of ``cross_entropy(scale * hidden @ weight.T, labels)``, 0-d fp32.

    ``vocab_chunk_size`` (None: the whole vocabulary at once) also splits the vocabulary.
    """
    if vocab_chunk_size is None or vocab_chunk_size >= weight.shape[0]:
        return _LinearCrossEntropy.apply(hidden, weight, labels, chunk_size, scale)
    return _VocabBlockedLinearCrossEntropy.apply(hidden, weight, labels, chunk_size, vocab_chunk_size, scale)


def linear_cross_entropy_unfused(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, scale: float = 1.0
) -> torch.Tensor:
    """The oracle: full logits, then ``F.cross_entropy`` (sum); for tests only."""
    logits = (hidden @ weight.t()).float() * scale  # (N, V)
    return torch.nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
