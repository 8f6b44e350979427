"""Numerical assertions with the project's standard: relative error ``||out-ref|| / ||ref||``.

Default tolerances by the output dtype: fp64/fp32 1e-5, bf16/fp16 1e-2. NaN or Inf in the
output never passes. DTensors are compared through their full tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mcore.ragged import full_tensor as ragged_full_tensor

DEFAULT_TOLERANCE: dict[torch.dtype, float] = {
    torch.float64: 1e-5,
    torch.float32: 1e-5,
    torch.bfloat16: 1e-2,
    torch.float16: 1e-2,
}


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor; a DTensor is gathered (a row-ragged split too: ``mcore.ragged``)."""
    return ragged_full_tensor(t) if hasattr(t, "device_mesh") else t


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in fp64 (absolute norm of the difference when ``ref`` is 0)."""
    out64, ref64 = _full(out).detach().double().cpu(), _full(ref).detach().double().cpu()
    diff = (out64 - ref64).norm().item()
    denom = ref64.norm().item()
    return diff / denom if denom > 0 else diff


def assert_finite(t: torch.Tensor, name: str = "tensor") -> None:
    t = _full(t).detach()
    bad = (~torch.isfinite(t)).sum().item()
    if bad:
        raise AssertionError(f"{name} has {bad} non-finite values (NaN/Inf) out of {t.numel()}")


def assert_rel_close(out: torch.Tensor, ref: torch.Tensor, tol: float | None = None, *, name: str = "output") -> None:
    """Fail unless ``out`` is finite, has ``ref``'s shape, and its relative error is below ``tol``."""
    out_t, ref_t = _full(out), _full(ref)
    if tuple(out_t.shape) != tuple(ref_t.shape):
        raise AssertionError(f"{name}: shape {tuple(out_t.shape)} != reference shape {tuple(ref_t.shape)}")
    assert_finite(out_t, name)
    if tol is None:
        tol = DEFAULT_TOLERANCE.get(out_t.dtype, 1e-5)
    err = rel_error(out_t, ref_t)
    if not err < tol:
        raise AssertionError(f"{name}: relative error {err:.3e} >= tolerance {tol:.1e} (dtype {out_t.dtype})")


def seeded_generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def seeded_randn(
    *shape: int, seed: int, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", scale: float = 1.0
) -> torch.Tensor:
    """Normal random tensor reproducible from ``seed`` (drawn in fp32 on CPU, then cast and moved)."""
    g = seeded_generator(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype=dtype, device=device)


def seeded_tokens(shape: Sequence[int], *, vocab_size: int, seed: int) -> torch.Tensor:
    """Random token ids ``(shape)`` int64 in ``[0, vocab_size)``."""
    return torch.randint(0, vocab_size, tuple(shape), generator=seeded_generator(seed))
