"""Bit-exact tests of the MXFP8 and NVFP4 references: E8M0 scale choice under both rules, E2M1's rounding
table, NVFP4's two-level scales, the random Hadamard transform (orthogonal, inverted by its transpose) and
stochastic rounding (unbiased over many draws, deterministic under a seed)."""

from __future__ import annotations

import math

import pytest
import torch

from mcore_precision.formats import E4M3, E5M2
from mcore_precision.mx import e8m0_exponents, mx_quantize
from mcore_precision.nvfp4 import (
    hadamard,
    nvfp4_quantize,
    random_hadamard,
    rht,
    round_e2m1,
    round_e2m1_stochastic,
)


def _k_reference(amax: float, fmax: float, emax: int, rounding: str) -> float:
    """The E8M0 exponent in plain Python floats."""
    if math.isnan(amax) or math.isinf(amax):
        return math.nan
    if amax == 0:
        return 0.0
    k = math.frexp(amax)[1] - 1 - emax
    if rounding == "up" and amax / 2.0**k > fmax:
        k += 1
    return float(min(max(k, -127), 127))


@pytest.mark.parametrize("rounding", ["up", "floor"])
@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=["e4m3", "e5m2"])
def test_e8m0_exponents_equal_the_plain_python_rule(fmt, rounding: str) -> None:
    edges = [fmt.max * 2.0**j for j in (-3, 0, 5)] + [math.nextafter(fmt.max, math.inf) * 2.0**j for j in (-3, 0, 5)]
    randoms = (torch.rand(400, generator=torch.Generator().manual_seed(0)) * 60 - 30).exp2().tolist()
    amaxes = [0.0, 1.0, 256.0, 1e-40, 3e38, 2.0**-140, math.nan, math.inf, *edges, *randoms]
    got = e8m0_exponents(torch.tensor(amaxes, dtype=torch.float32), fmt, rounding)  # type: ignore[arg-type]
    emax = {"e4m3": 8, "e5m2": 15}[fmt.name]
    fp32 = torch.tensor(amaxes, dtype=torch.float32).tolist()  # the values as fp32 holds them
    want = torch.tensor([_k_reference(a, fmt.max, emax, rounding) for a in fp32])
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got[~got.isnan()], want[~want.isnan()])


def test_mx_rules_differ_exactly_where_floor_saturates() -> None:
    x = torch.zeros(1, 64)
    x[0, 0], x[0, 1] = 449.0, 1.0  # block 0: amax just above 448
    x[0, 32], x[0, 33] = 448.0, -0.75  # block 1: amax exactly 448
    up, floor = mx_quantize(x, E4M3, "up"), mx_quantize(x, E4M3, "floor")
    assert up.scale.tolist() == [[2.0, 1.0]] and floor.scale.tolist() == [[1.0, 1.0]]
    assert up.data.float()[0, :2].tolist() == [224.0, 0.5]  # 449 / 2 rounds to 224; nothing saturates
    assert floor.data.float()[0, :2].tolist() == [448.0, 1.0]  # 449 saturates to 448
    assert up.data.float()[0, 32:34].tolist() == [448.0, -0.75] == floor.data.float()[0, 32:34].tolist()
    y = torch.randn(16, 96, generator=torch.Generator().manual_seed(3)) * 100
    q = mx_quantize(y, E4M3, "up")
    scale = q.scale.repeat_interleave(32, dim=1)
    assert ((y / scale).abs() <= 448).all()  # the up rule: no element beyond fmax
    assert torch.equal(q.data, (y / scale).to(torch.float8_e4m3fn))  # elements: plain RNE casts
    assert torch.equal(q.dequantize(), q.data.float() * scale)


def test_mx_non_finite_block_reads_nan_and_zero_block_zero() -> None:
    x = torch.ones(2, 40)
    x[0, 3] = float("inf")
    x[1] = 0.0
    q = mx_quantize(x, E4M3)
    back = q.dequantize()
    assert back[0, :32].isnan().all() and torch.equal(back[0, 32:], torch.ones(8))
    assert torch.equal(back[1], torch.zeros(40))


def test_e2m1_rounding_table() -> None:
    table = {
        0.0: 0.0, 0.2: 0.0, 0.25: 0.0, 0.3: 0.5, 0.5: 0.5, 0.75: 1.0, 1.0: 1.0, 1.25: 1.0, 1.3: 1.5,
        1.75: 2.0, 2.5: 2.0, 2.6: 3.0, 3.5: 4.0, 4.9: 4.0, 5.0: 4.0, 5.1: 6.0, 6.0: 6.0, 7.0: 6.0, 1e9: 6.0,
    }  # fmt: skip
    x = torch.tensor(list(table))
    assert round_e2m1(x).tolist() == list(table.values())
    assert round_e2m1(-x).tolist() == [-v for v in table.values()]
    assert round_e2m1(torch.tensor([float("nan")])).isnan().all()


def test_nvfp4_two_level_scales() -> None:
    x = torch.zeros(1, 48)
    x[0, :4] = torch.tensor([12.0, 5.0, 1.0, -3.0])  # block 0, amax 12 (the tensor's)
    x[0, 16:18] = torch.tensor([3.0, 0.25])  # block 1, amax 3
    x[0, 32] = 5.0  # block 2, amax 5: its decode scale rounds in E4M3
    q = nvfp4_quantize(x)
    assert q.global_scale.item() == 448 * 6 / 12  # 224
    # decode scales amax / 6 * 224 in E4M3: 448, 112 exactly; 186.67 rounds to 192
    assert q.block_scale.float().tolist() == [[448.0, 112.0, 192.0]]
    assert q.data[0, :4].tolist() == [6.0, 2.0, 0.5, -1.5] and q.data[0, 16:18].tolist() == [6.0, 0.5]
    back = q.dequantize()
    assert back[0, :4].tolist() == [12.0, 4.0, 1.0, -3.0]  # 5 * 0.5 = 2.5 ties to 2
    assert back[0, 16:18].tolist() == [3.0, 0.25]
    five = torch.tensor(5.0) * (torch.tensor(224.0) / 192.0)  # 5.83 -> 6
    assert five.item() > 5 and back[0, 32].item() == (torch.tensor(6.0) * 192.0 / torch.tensor(224.0)).item()
    w = nvfp4_quantize(torch.randn(40, 40), (16, 16))
    assert w.block_scale.shape == (3, 3)
    assert torch.equal(w.t().dequantize(), w.dequantize().t())  # 16x16 blocks: one copy serves both layouts


def test_nvfp4_non_finite_and_zero_tensors() -> None:
    x = torch.ones(2, 32)
    x[0, 0] = float("nan")
    back = nvfp4_quantize(x).dequantize()
    assert back[0, :16].isnan().all() and back[1].isfinite().all()  # (the step is skipped: no tensor scale fitted)
    assert torch.equal(nvfp4_quantize(torch.ones(2, 32)).dequantize(), torch.ones(2, 32))
    assert torch.equal(nvfp4_quantize(torch.zeros(3, 16)).dequantize(), torch.zeros(3, 16))


def test_random_hadamard_is_orthogonal_and_inverted_by_its_transpose() -> None:
    h = hadamard(16)
    assert torch.equal(h @ h.T, 16 * torch.eye(16))
    signs = torch.randint(0, 2, (16,), generator=torch.Generator().manual_seed(0)).float() * 2 - 1
    q = random_hadamard(signs)
    assert torch.equal(q @ q.T, torch.eye(16))  # entries ±1/4: the products are exact
    x = torch.randn(5, 40)  # 40: padded to 48
    y = rht(x, q)
    assert y.shape == (5, 48)
    back = rht(y, q.T)
    assert torch.allclose(back[:, :40], x, atol=1e-6) and torch.allclose(back[:, 40:], torch.zeros(5, 8), atol=1e-6)
    b = torch.randn(7, 40)
    assert torch.allclose(y @ rht(b, q).T, x @ b.T, atol=1e-5)  # both operands alike: the product is kept
    with pytest.raises(ValueError, match="power of two"):
        hadamard(12)


def test_stochastic_rounding_is_unbiased_and_deterministic_under_a_seed() -> None:
    x = torch.tensor([0.3, 1.1, 2.7, -3.4, 4.5, 5.9]).repeat(40_000, 1)  # (40000, 6)
    draws = round_e2m1_stochastic(x, torch.Generator().manual_seed(0))
    assert ((draws - x).mean(0).abs() < 0.02).all()  # unbiased: the mean error goes to 0
    assert ((round_e2m1(x) - x).mean(0).abs() > 0.09).all()  # round to nearest is not
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    assert torch.isin(draws.abs(), grid).all()
    again = round_e2m1_stochastic(x, torch.Generator().manual_seed(0))
    other = round_e2m1_stochastic(x, torch.Generator().manual_seed(1))
    assert torch.equal(draws, again) and not torch.equal(draws, other)
    on_grid = torch.tensor([0.5, -4.0, 6.0, 9.0])
    assert round_e2m1_stochastic(on_grid, torch.Generator().manual_seed(0)).tolist() == [0.5, -4.0, 6.0, 6.0]
