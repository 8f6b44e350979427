"""Bit-exact checks of the FP8 formats against an independent reference: every code of E4M3 and E5M2
decoded from its bits, nearest value with ties to the even code, saturation, NaN/inf, zero tensors, and
the per-tensor, per-row and blockwise scales."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from mcore_precision.formats import (
    E4M3,
    E5M2,
    FP8Format,
    amax_to_scale,
    blockwise_scales,
    dequantize,
    expand_block_scales,
    quantize,
    rowwise_scales,
    tensorwise_scale,
)

_BITS = {"e4m3": (4, 3, 7), "e5m2": (5, 2, 15)}  # exponent bits, mantissa bits, bias


def decode(code: int, fmt: FP8Format) -> float:
    """The value of an 8-bit code, from the OCP FP8 definition (E4M3: no inf, only S.1111.111 is NaN)."""
    e_bits, m_bits, bias = _BITS[fmt.name]
    sign = -1.0 if code >> 7 else 1.0
    exp = (code >> m_bits) & ((1 << e_bits) - 1)
    man = code & ((1 << m_bits) - 1)
    if fmt.name == "e4m3" and exp == 15 and man == 7:
        return math.nan
    if fmt.name == "e5m2" and exp == 31:
        return sign * math.inf if man == 0 else math.nan
    if exp == 0:
        return sign * man * 2.0 ** (1 - bias - m_bits)
    return sign * (1 + man / (1 << m_bits)) * 2.0 ** (exp - bias)


def finite_codes(fmt: FP8Format) -> list[tuple[float, int]]:
    return sorted((decode(c, fmt), c) for c in range(128) if math.isfinite(decode(c, fmt)))  # non-negative


def reference_quantize(v: float, fmt: FP8Format) -> float:
    """Nearest representable value, ties to the even code, finite values beyond max saturate."""
    if math.isnan(v):
        return math.nan
    if math.isinf(v):
        return v if fmt.has_inf else math.nan
    sign, a = (-1.0 if v < 0 else 1.0), abs(v)
    if a >= fmt.max:
        return sign * fmt.max
    table = finite_codes(fmt)
    for (lo, lo_code), (hi, _) in itertools.pairwise(table):
        if lo <= a <= hi:
            if a - lo < hi - a or (a - lo == hi - a and lo_code % 2 == 0):
                return sign * lo
            return sign * hi
    raise AssertionError(f"{v} not bracketed")


@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=["e4m3", "e5m2"])
def test_max_and_codes_match_the_definition(fmt: FP8Format) -> None:
    codes = torch.arange(256, dtype=torch.uint8).view(fmt.dtype).float()
    for c in range(256):
        expected = decode(c, fmt)
        got = codes[c].item()
        assert (math.isnan(expected) and math.isnan(got)) or got == expected, (c, got, expected)
    assert fmt.max == max(v for v, _ in finite_codes(fmt))


@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=["e4m3", "e5m2"])
def test_every_midpoint_and_random_value_rounds_like_the_reference(fmt: FP8Format) -> None:
    table = [v for v, _ in finite_codes(fmt)]
    mids = [(a + b) / 2 for a, b in itertools.pairwise(table)]  # exact ties: ties go to the even code
    g = torch.Generator().manual_seed(0)
    rand = (
        torch.randn(2000, generator=g, dtype=torch.float64) * torch.exp2(torch.randint(-12, 12, (2000,), generator=g))
    ).tolist()
    values = mids + [-m for m in mids] + table + rand + [fmt.max * 1.01, -fmt.max * 3, 1e30, 0.0]
    got = quantize(torch.tensor(values, dtype=torch.float32), 1.0, fmt).float().tolist()
    for v, q in zip(values, got):
        want = reference_quantize(float(torch.tensor(v, dtype=torch.float32)), fmt)
        assert q == want, (v, q, want)


def test_ties_go_to_the_even_mantissa() -> None:
    q = quantize(torch.tensor([1.0625, 1.1875, 1.5625 * 2**-6]), 1.0, E4M3).float()
    assert q.tolist() == [1.0, 1.25, 1.5 * 2**-6]
    assert quantize(torch.tensor([1.125, 1.375]), 1.0, E5M2).float().tolist() == [1.0, 1.5]


def test_saturation_nan_and_infinity() -> None:
    x = torch.tensor([500.0, -1e6, float("nan"), float("inf"), -float("inf"), 0.0])
    e4 = quantize(x, 1.0, E4M3).float()
    assert e4[:2].tolist() == [448.0, -448.0] and e4[5].item() == 0.0
    assert torch.isnan(e4[2:5]).all()  # E4M3 has no infinity: an overflow to inf shows as NaN, never as 448
    e5 = quantize(x * 1000, 1.0, E5M2).float()
    assert e5[:2].tolist() == [57344.0, -57344.0]
    assert torch.isnan(e5[2]) and e5[3].item() == math.inf and e5[4].item() == -math.inf
    big = quantize(torch.tensor([60000.0]), 1.0, E5M2).float()  # finite beyond max: saturates, not inf
    assert big.item() == 57344.0


def test_scale_from_amax_margin_and_degenerate_amax() -> None:
    s = amax_to_scale(torch.tensor([2.0, 0.0, math.inf, math.nan, 1e-45]), E4M3, margin=1)
    assert s[0].item() == 448.0 / 2.0 / 2.0
    assert s[1:4].tolist() == [1.0, 1.0, 1.0]
    assert s[4].item() == torch.finfo(torch.float32).max
    x = torch.tensor([[0.5, -3.0], [0.25, 0.0]])
    assert tensorwise_scale(x, E5M2).item() == pytest.approx(57344.0 / 3.0)
    assert quantize(x, tensorwise_scale(x, E4M3), E4M3).float().abs().max().item() == 448.0  # amax lands on max
    assert rowwise_scales(x, E4M3).flatten().tolist() == pytest.approx([448.0 / 3.0, 448.0 / 0.25])


def test_zero_tensors() -> None:
    z = torch.zeros(3, 130)
    for scale in (tensorwise_scale(z, E4M3), rowwise_scales(z, E4M3), blockwise_scales(z, E4M3, (1, 128))):
        assert torch.all(scale == 1.0)
    assert torch.equal(dequantize(quantize(z, 1.0, E4M3), 1.0), z)
    assert tensorwise_scale(torch.zeros(0, 4), E4M3).item() == 1.0


def test_blockwise_scales_tiles_and_blocks() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(130, 260, generator=g)  # ragged in both dims
    tiles = blockwise_scales(x, E4M3, (1, 128))
    assert tiles.shape == (130, 3)
    assert tiles[5, 2].item() == amax_to_scale(x[5, 256:].abs().amax(), E4M3).item()
    blocks = blockwise_scales(x, E4M3, (128, 128))
    assert blocks.shape == (2, 3)
    assert blocks[1, 1].item() == amax_to_scale(x[128:, 128:256].abs().amax(), E4M3).item()
    per_element = expand_block_scales(blocks, (130, 260), (128, 128))
    assert per_element.shape == x.shape and per_element[129, 259] == blocks[1, 2]
    q = quantize(x, per_element, E4M3)
    assert q.float().abs().amax().item() == 448.0
    back = dequantize(q, per_element)
    # E4M3: 3 mantissa bits (half an ulp: 2^-4 relative), subnormals spaced 2^-9 (half: 2^-10 absolute, scaled)
    assert ((back - x).abs() <= x.abs() * 2**-4 + 2**-10 / per_element).all()
    with pytest.raises(ValueError, match="2-D"):
        blockwise_scales(x[0], E4M3)
