"""One AdamW step over lists of tensors: a ``foreach`` path written here and torch's fused kernel.

Decoupled weight decay (Loshchilov & Hutter) with bias-corrected moments::

    p <- p (1 - lr wd)
    m <- b1 m + (1 - b1) g;   v <- b2 v + (1 - b2) g^2
    p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

All lists are parallel, fp32 and on one device; ``steps`` holds one 0-d fp32 tensor per
parameter (a parameter that missed a step keeps its own count). The fused path calls
``torch._fused_adamw_``, the kernel behind ``torch.optim.AdamW(fused=True)``, which reads the
same formula; it pairs each tensor's elements in memory order, so where a parameter, its gradient
and moments do not all lie contiguously (a view of a packed buffer, e.g. the MoE experts' gate and
up laid out as one ``(E, 2, F, H)`` buffer) all four are updated as contiguous copies and the
parameter and moments copied back. The ``foreach`` path reads each tensor through its strides.
"""

from __future__ import annotations

import math

import torch


def adamw_step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    steps: list[torch.Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    fused: bool,
) -> None:
    if not params:
        return
    torch._foreach_add_(steps, 1.0)
    if fused:
        # the fused kernel pairs each tensor's elements in memory order: where the parameter, its gradient and
        # moments do not all lie contiguously (a view of a packed buffer; a transposed parameter's own strides
        # are shared by its gradient and moments, a packed view's are not), all four go in as contiguous copies
        # and the parameter and moments are copied back (the same math, no host sync)
        quads = list(zip(params, grads, exp_avgs, exp_avg_sqs, strict=True))
        strided = [i for i, quad in enumerate(quads) if not all(t.is_contiguous() for t in quad)]
        flat = [[t.contiguous() if i in strided else t for t in quad] for i, quad in enumerate(quads)]
        f_params, f_grads, f_avgs, f_sqs = ([row[k] for row in flat] for k in range(4))
        torch._fused_adamw_(
            f_params,
            f_grads,
            f_avgs,
            f_sqs,
            [],
            steps,
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            weight_decay=weight_decay,
            eps=eps,
            amsgrad=False,
            maximize=False,
        )
        if strided:
            targets = [t for i in strided for t in (params[i], exp_avgs[i], exp_avg_sqs[i])]
            torch._foreach_copy_(targets, [t for i in strided for t in (f_params[i], f_avgs[i], f_sqs[i])])
        return
    if weight_decay != 0.0:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1.0 - beta2)
    counts = [float(s) for s in steps]  # host values: the foreach path is the CPU/reference path
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, [math.sqrt(1.0 - beta2**t) for t in counts])
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, [-lr / (1.0 - beta1**t) for t in counts])
