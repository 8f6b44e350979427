"""The experts' SwiGLU on the one gate-and-up GEMM's output: ``silu(gate) * up`` of ``(M, 2F)`` rows ``[gate | up]``.

Why a module: the experts run gate and up as ONE grouped GEMM (``mcore_moe.gate_up``) whose ``(M, 2F)`` output this
activation reads in place; on CUDA a Triton kernel (``mcore_moe.swiglu_triton``) computes it and its gradients in
one pass each (bf16 in and out, fp32 math, the backward writing one ``(M, 2F)`` gradient), elsewhere the torch
reference below (``kernel_choice``). The clamped variant (``limit``: ``silu(min(gate, a)) * clamp(up, -a, a)``, the
gradient zero where a clamp bites) runs the same way.

Shape legend: M routed rows, F expert FFN size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mcore_moe.kernel_choice import use_triton


def swiglu_reference(gate_up: torch.Tensor, limit: float | None = None) -> torch.Tensor:
    """``(M, 2F)`` rows ``[gate | up]`` -> ``silu(gate) * up`` ``(M, F)`` (clamped to ``limit`` when given)."""
    gate, up = gate_up.chunk(2, dim=-1)  # (M, F) views each
    if limit is not None:
        gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
    return F.silu(gate) * up  # (M, F)


def swiglu(gate_up: torch.Tensor, limit: float | None = None, *, kernel: str = "auto") -> torch.Tensor:
    """``swiglu_reference``'s result, by the Triton kernel where ``kernel_choice.use_triton`` says so."""
    if gate_up.shape[-1] % 2:
        raise ValueError(f"moe: swiglu input has {gate_up.shape[-1]} features; must be even ([gate | up])")
    if use_triton(gate_up, kernel):
        from mcore_moe.swiglu_triton import swiglu_triton

        return swiglu_triton(gate_up, limit)
    return swiglu_reference(gate_up, limit)
