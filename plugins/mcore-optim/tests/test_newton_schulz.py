"""Newton-Schulz: singular values land in each coefficient set's promised band; step counts."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from mcore_optim.newton_schulz import COEFFICIENT_SETS, orthogonalize, resolve

SHAPES = [(64, 128), (128, 64), (96, 96), (32, 256), (200, 40)]


def spectrum_matrix(rows: int, cols: int, min_sigma: float, seed: int) -> torch.Tensor:
    """A random (rows, cols) matrix whose Frobenius-normalised singular values all lie in [min_sigma, 1].

    Singular values are log-uniform in [min_sigma * sqrt(r), 1] (one of each end): the
    Frobenius norm is at most sqrt(r), so normalised they stay >= min_sigma.
    """
    g = torch.Generator().manual_seed(seed)
    r = min(rows, cols)
    lo = min_sigma * math.sqrt(r)
    s = torch.exp(torch.empty(r, dtype=torch.float64).uniform_(math.log(lo), 0.0, generator=g))
    s[0], s[-1] = 1.0, lo
    u, _ = torch.linalg.qr(torch.randn(rows, r, dtype=torch.float64, generator=g))
    v, _ = torch.linalg.qr(torch.randn(cols, r, dtype=torch.float64, generator=g))
    return (u * s) @ v.T


@pytest.mark.parametrize("name", sorted(COEFFICIENT_SETS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_singular_values_in_promised_band(name: str, dtype: torch.dtype) -> None:
    cs = COEFFICIENT_SETS[name]
    slack = cs.bf16_slack if dtype == torch.bfloat16 else 0.0
    lo, hi = cs.band[0] - slack, cs.band[1] + slack
    batch = [spectrum_matrix(r, c, cs.min_sigma, seed=i) for i, (r, c) in enumerate(SHAPES)]
    for g in batch:
        out = orthogonalize(g[None].float(), cs.triples, dtype=dtype)[0]
        assert out.dtype == dtype and out.shape == g.shape
        sv = torch.linalg.svdvals(out.double())
        assert lo <= sv.min().item() and sv.max().item() <= hi, (name, tuple(g.shape), sv.min(), sv.max())


def test_orthogonalize_keeps_singular_vectors() -> None:
    g = spectrum_matrix(48, 96, 1e-2, seed=7)
    out = orthogonalize(g[None].float(), COEFFICIENT_SETS["deepseek-v4"].triples, dtype=torch.float32)[0].double()
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    torch.testing.assert_close(out, u @ vh, atol=2e-3, rtol=0)


def test_batched_equals_one_by_one() -> None:
    mats = torch.stack([spectrum_matrix(32, 64, 1e-2, seed=i).float() for i in range(3)])
    triples = COEFFICIENT_SETS["simple"].triples
    batched = orthogonalize(mats, triples, dtype=torch.float32)
    for i in range(3):
        torch.testing.assert_close(batched[i], orthogonalize(mats[i], triples, dtype=torch.float32))


def test_step_counts_follow_the_set() -> None:
    assert len(resolve("simple")) == 5
    assert len(resolve("polar-express")) == 5
    deepseek = resolve("deepseek-v4")
    assert len(deepseek) == 10
    assert deepseek[:8] == ((3.4445, -4.7750, 2.0315),) * 8
    assert deepseek[8:] == ((2.0, -1.5, 0.5),) * 2
    assert resolve([[3.0, -3.2, 1.2], [2.0, -1.5, 0.5]]) == ((3.0, -3.2, 1.2), (2.0, -1.5, 0.5))


def test_overriding_steps() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(resolve("simple", 7)) == 7  # one triple: any count fits, no warning
    with pytest.warns(UserWarning, match="deepseek-v4 has 10 per-step triples"):
        assert len(resolve("deepseek-v4", 6)) == 6
    with pytest.warns(UserWarning, match="repeating the last triple"):
        out = resolve("polar-express", 7)
    assert out[5] == out[6] == out[4]


@pytest.mark.parametrize(
    ("coefficients", "steps", "match"),
    [
        ("cubic", None, "ns_coefficients = 'cubic'"),
        ([[1.0, 2.0]], None, "ns_coefficients"),
        ("simple", 0, "ns_steps = 0"),
    ],
)
def test_bad_coefficients(coefficients: object, steps: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        resolve(coefficients, steps)  # type: ignore[arg-type]
