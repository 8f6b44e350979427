"""Newton-Schulz orthogonalisation: the polynomial iteration that Muon applies to its update.

For ``X`` normalised by its Frobenius norm (so every singular value is in (0, 1]) each step is

    A = X X^T;  X = a X + (b A + c A^2) X          # X: (..., m, n), m <= n (else transposed)

which maps each singular value ``s`` to ``a s + b s^3 + c s^5`` and leaves the singular
vectors alone; a few steps push every singular value towards 1 (``U V^T``).

Coefficient sets (ROADMAP, Optimizers) and the band each promises: after all steps, every
singular value whose normalised start lies in ``[min_sigma, 1]`` ends in ``band`` (exact
arithmetic; bf16 arithmetic widens it by ``bf16_slack``, see ``CoefficientSet``):

* ``simple``: (3.4445, -4.7750, 2.0315) every step, 5 steps by default;
* ``polar-express``: five per-step triples (Amsel et al., 2025, "The Polar Express");
* ``deepseek-v4``: (3.4445, -4.7750, 2.0315) x 8 then (2.0, -1.5, 0.5) x 2: ten steps, the
  last two converge to 1 (the quintic 2s - 1.5s^3 + 0.5s^5 has a double fixed point there);
* a user-given list of ``[a, b, c]`` triples, one per step.

Shape legend: ``B`` batch of matrices, ``m`` rows, ``n`` columns.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

Triple = tuple[float, float, float]


@dataclass(frozen=True, slots=True)
class CoefficientSet:
    """Per-step (a, b, c) and the singular-value band the set promises.

    ``band``: where singular values starting in ``[min_sigma, 1]`` end up (exact arithmetic,
    from the scalar polynomials, rounded outwards in the last digit; fp32 runs land inside);
    ``bf16_slack``: how far outside it a bf16 run may land (bf16 keeps 8 bits of mantissa
    and rounding compounds over the steps; 0.005 was the worst seen on 32..256-wide
    matrices).
    """

    name: str
    triples: tuple[Triple, ...]
    min_sigma: float
    band: tuple[float, float]
    bf16_slack: float

    @property
    def steps(self) -> int:
        return len(self.triples)


_QUINTIC: Triple = (3.4445, -4.7750, 2.0315)

COEFFICIENT_SETS: dict[str, CoefficientSet] = {
    "simple": CoefficientSet(
        name="simple", triples=(_QUINTIC,) * 5, min_sigma=1e-2, band=(0.681, 1.135), bf16_slack=0.02
    ),
    "polar-express": CoefficientSet(
        name="polar-express",
        triples=(
            (8.156554524902461, -22.48329292557795, 15.878769915207462),
            (4.042929935166739, -2.808917465908714, 0.5000178451051316),
            (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
            (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
            (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
        ),
        min_sigma=1e-3,
        band=(0.858, 1.142),
        bf16_slack=0.02,
    ),
    "deepseek-v4": CoefficientSet(
        name="deepseek-v4",
        triples=(_QUINTIC,) * 8 + ((2.0, -1.5, 0.5),) * 2,
        min_sigma=1e-3,
        band=(0.9995, 1.001),
        bf16_slack=0.02,
    ),
}


def resolve(coefficients: str | Sequence[Sequence[float]], steps: int | None = None) -> tuple[Triple, ...]:
    """The per-step triples for a set name or a user list, ``steps`` long.

    The number of steps follows the set unless ``steps`` overrides it. ``simple`` is one
    triple, so any count fits it; for a per-step set a different count warns, then truncates
    or repeats the last triple.
    """
    if isinstance(coefficients, str):
        if coefficients not in COEFFICIENT_SETS:
            raise ValueError(
                f"ns_coefficients = {coefficients!r}; allowed: {sorted(COEFFICIENT_SETS)} or a list of [a, b, c] triples"
            )
        triples = COEFFICIENT_SETS[coefficients].triples
        uniform = coefficients == "simple"
    else:
        try:
            triples = tuple((float(a), float(b), float(c)) for a, b, c in coefficients)
        except (TypeError, ValueError):
            raise ValueError(
                f"ns_coefficients = {coefficients!r}; allowed: a set name or a list of [a, b, c] number triples"
            ) from None
        if not triples:
            raise ValueError("ns_coefficients = []; allowed: a non-empty list of [a, b, c] triples")
        uniform = len(set(triples)) == 1
    if steps is None or steps == len(triples):
        return triples
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"ns_steps = {steps!r}; allowed: a positive int, or None to follow the coefficient set")
    if not uniform:
        warnings.warn(
            f"ns_steps = {steps} but coefficient set {coefficients if isinstance(coefficients, str) else 'given'} "
            f"has {len(triples)} per-step triples; "
            + ("using the first ones" if steps < len(triples) else "repeating the last triple"),
            UserWarning,
            stacklevel=2,
        )
    return tuple(triples[min(i, len(triples) - 1)] for i in range(steps))


def orthogonalize(
    update: torch.Tensor, triples: Sequence[Triple], *, eps: float = 1e-7, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Approximately ``U V^T`` of ``update`` (``(..., m, n)``), computed in ``dtype``; returns ``dtype``."""
    x = update.to(dtype)  # (..., m, n)
    transposed = x.size(-2) > x.size(-1)
    if transposed:
        x = x.mT  # (..., n, m): rows <= columns keeps the Gram matrix small
    x = x / (torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True) + eps)
    for a, b, c in triples:
        gram = x @ x.mT  # (..., r, r)
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c) if gram.dim() == 3 else b * gram + c * gram @ gram
        x = torch.baddbmm(x, poly, x, beta=a) if x.dim() == 3 else a * x + poly @ x
    return x.mT if transposed else x


def flops(m: int, n: int, steps: int) -> int:
    """Matmul FLOPs of ``steps`` iterations on one (m, n) matrix (r = min, k = max)."""
    r, k = min(m, n), max(m, n)
    return steps * (2 * r * r * k + 2 * r * r * r + 2 * r * r * k)
