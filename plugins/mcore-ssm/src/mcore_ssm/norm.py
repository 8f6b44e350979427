"""Gated RMSNorm: the output norm of GDN and Mamba2, ``rmsnorm(x) * weight * silu(gate)``.

Shape legend: ``(..., N)`` features, normalised in groups of ``G`` (``G`` divides ``N``; default the whole ``N``).

Both recurrent mixers gate their output with a learned projection of the input (``z``) and normalise it:
Qwen3-Next (GDN) normalises first and gates after (``norm_before_gate=True``, per value head: call it on
``(..., heads, head_dim)`` with a ``(head_dim,)`` weight); Mamba2 gates first and normalises after
(``norm_before_gate=False``, in ``ngroups`` groups of the inner width: ``group_size = d_inner // ngroups``).
Statistics are fp32 (or fp64 for fp64 inputs); the result has ``x``'s dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mcore.params import Init, ParamSpec


def gated_rms_norm(
    x: torch.Tensor,
    gate: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    *,
    norm_before_gate: bool = True,
    group_size: int | None = None,
) -> torch.Tensor:
    """``x``, ``gate (..., N)``, ``weight (N,)`` -> ``(..., N)`` in ``x``'s dtype.

    ``norm_before_gate``: ``rmsnorm(x) * weight * silu(gate)``; else ``rmsnorm(x * silu(gate)) * weight``.
    ``group_size``: the mean square is taken over each run of ``group_size`` features (none: all ``N``).
    """
    features = x.shape[-1]
    size = group_size or features
    if features % size or gate.shape != x.shape or weight.shape != (features,):
        raise ValueError(
            f"gated_rms_norm: x {tuple(x.shape)}, gate {tuple(gate.shape)}, weight {tuple(weight.shape)}, "
            f"group_size {group_size}: gate must match x, weight be ({features},), group_size divide {features}"
        )
    compute = torch.promote_types(x.dtype, torch.float32)  # fp32 statistics (fp64 stays fp64)
    xf, gf = x.to(compute), F.silu(gate.to(compute))  # (..., N)
    if not norm_before_gate:
        xf = xf * gf
    grouped = xf.unflatten(-1, (features // size, size))  # (..., N / G, G)
    normed = (grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + eps)).flatten(-2)  # (..., N)
    out = normed * weight.to(compute)
    if norm_before_gate:
        out = out * gf
    return out.to(x.dtype)


class GatedRMSNorm(nn.Module):
    """``gated_rms_norm`` with its ``weight (N,)`` (ones at init); ``forward(x, gate) -> (..., N)``."""

    @dataclass(kw_only=True, slots=True)
    class Config:
        norm_eps: float = 1e-6
        """Epsilon added to the mean square (finite, > 0)."""
        norm_before_gate: bool = True
        """Normalise, then gate (GDN); False: gate, then normalise (Mamba2)."""
        group_size: int | None = None
        """Features per normalisation group (none: the whole last dim)."""

        def __post_init__(self) -> None:
            if not self.norm_eps > 0 or self.norm_eps == float("inf"):
                raise ValueError(f"norm_eps = {self.norm_eps!r}: must be a finite number > 0")
            if self.group_size is not None and self.group_size < 1:
                raise ValueError(f"group_size = {self.group_size!r}: must be a positive int or None")

    def __init__(self, config: Config | None = None, *, hidden_size: int) -> None:
        super().__init__()
        self.config = config or self.Config()
        if self.config.group_size is not None and hidden_size % self.config.group_size:
            raise ValueError(f"group_size = {self.config.group_size}: must divide the normalised size {hidden_size}")
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def param_specs(self) -> dict[str, ParamSpec]:
        """The scale, ones. ``tp`` is the owner's call (a per-head scale shared by all heads is ``partial``,
        one spanning the heads' channels is ``column``), so it is left undeclared here (``replicate`` by role)."""
        return {"weight": ParamSpec("norm", init=Init("ones"))}

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        return gated_rms_norm(
            x, gate, self.weight, cfg.norm_eps, norm_before_gate=cfg.norm_before_gate, group_size=cfg.group_size
        )
