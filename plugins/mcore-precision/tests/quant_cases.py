"""What the quantisation kernels' tests share (CPU interpreter and GPU): inputs that reach every edge of the
formats, and byte / bit comparisons against the references."""

from __future__ import annotations

import torch

from mcore_precision.formats import FP8Format


def inputs(
    m: int, k: int, dtype: torch.dtype = torch.float32, seed: int = 0, special: bool = True, device: str = "cpu"
) -> torch.Tensor:
    """Normal values over 2**±20 (saturating and subnormal ones once scaled), exact zeros, values at 1e-30 (fp32
    and bf16 subnormals), and with ``special`` a NaN, -NaN, inf and -inf."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.exp2(torch.randint(-20, 21, (m, k), generator=g).float())
    flat = x.view(-1)
    flat[::7] *= 1e-30
    flat[3::11] = 0.0
    if special and flat.numel() > 40:
        flat[[5, 17, 29, 40]] = torch.tensor([float("nan"), -float("nan"), float("inf"), -float("inf")])
    return x.to(device=device, dtype=dtype)


def _bytes(q: torch.Tensor) -> torch.Tensor:
    """The FP8 bytes with every NaN code written 0x7F."""
    b = q.view(torch.uint8).clone()
    low = b & 0x7F
    nan = low == 0x7F if q.dtype == torch.float8_e4m3fn else low > 0x7C
    b[nan] = 0x7F
    return b


def assert_codes(out: torch.Tensor | None, want: torch.Tensor | None, what: str) -> None:
    assert out is not None and want is not None, f"{what}: missing"
    assert out.dtype == want.dtype and out.shape == want.shape, f"{what}: {out.dtype} {out.shape} vs {want.shape}"
    bad = (_bytes(out) != _bytes(want)).nonzero()
    assert bad.numel() == 0, f"{what}: {bad.shape[0]} bytes differ, first at {bad[:3].tolist()}"


def assert_bits(out: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Same shape, dtype, NaN places and bits elsewhere (signed zeros included)."""
    assert out.dtype == want.dtype and out.shape == want.shape, f"{what}: {out.dtype} {out.shape} vs {want.shape}"
    assert torch.equal(out.isnan(), want.isnan()), f"{what}: NaN places differ"
    o, w = out.float().nan_to_num(0.0), want.float().nan_to_num(0.0)
    bad = (o.view(torch.int32) != w.view(torch.int32)).nonzero()
    assert bad.numel() == 0, f"{what}: {bad.shape[0]} values differ, first at {bad[:3].tolist()}"


def fp8_edges(fmt: FP8Format) -> torch.Tensor:
    """Every finite value of ``fmt``, the midpoints between neighbours (ties), one fp32 ulp either side of
    them, values past the max, tiny fp32 subnormals, ±inf and NaN, both signs: ``(1, N)`` fp32."""
    values = torch.arange(256, dtype=torch.uint8).view(fmt.dtype).float()
    values = values[torch.isfinite(values) & (values >= 0)].unique()  # (V,) sorted
    mids = (values[1:] + values[:-1]) / 2
    ulp = torch.tensor(float("inf"))
    near = torch.cat([torch.nextafter(mids, -ulp), mids, torch.nextafter(mids, ulp)])
    extra = torch.tensor([fmt.max * 1.03, fmt.max * 1.2, 1e30, 1e-44, 1e-40, float("inf"), float("nan")])
    pos = torch.cat([values, near, extra])
    return torch.cat([pos, -pos]).view(1, -1)
