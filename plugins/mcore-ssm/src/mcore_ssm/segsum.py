"""Sums of log-decays over the tokens between two positions, for both scans' chunked forms (``mamba2_reference``,
``gdn_reference``, ``gdn_triton_bwd``).

A chunked scan weighs token ``j``'s contribution at token ``i >= j`` by ``exp(sum_{j < k <= i} a_k)``. Forming the
exponent as a difference of running sums ``cum_i - cum_j`` loses it to rounding once ``|cum|`` is large (strong
decay: fp32 ``cum`` near -2000 holds only ~1e-4 absolutely), and its gradient, a reverse cumulative sum of the
row sums minus the column sums, cancels terms of order one to leave a tiny result. ``segsum`` builds each sum from
the ``a_k`` it covers (a cumulative sum of masked repeats), so autograd sums the pairs a token lies between instead.
"""

from __future__ import annotations

import math

import torch


def segsum(a: torch.Tensor) -> torch.Tensor:
    """``a (..., m)`` -> ``(..., m, m)`` with ``[i, j] = sum_{j < k <= i} a_k`` (``0`` on the diagonal, ``-inf``
    above it, so that its exp is the masked decay), by a cumulative sum of the masked repeats."""
    m = a.shape[-1]
    lower = torch.tril(torch.ones(m, m, dtype=torch.bool, device=a.device), diagonal=-1)  # (m, m) j < i
    rep = a[..., None, :].expand(*a.shape, m).transpose(-1, -2)  # (..., m, m): [i, j] = a_i
    sums = torch.cumsum(rep.masked_fill(~lower, 0.0), dim=-2)  # (..., m, m): [i, j] = sum_{j < k <= i} a_k
    keep = torch.tril(torch.ones(m, m, dtype=torch.bool, device=a.device))  # (m, m) j <= i
    return sums.masked_fill(~keep, -math.inf)
