"""Counter-based init: shards filled alone equal the whole fill bit for bit; the values are right."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from mcore import init_rng
from mcore.init_rng import key_for, normal_, philox4x32, row_start, trunc_normal_, uniform_

KEY = 0x0123456789ABCDEF
FILLS = {
    "uniform": lambda out, key, start: uniform_(out, key, start=start, low=-0.5, high=0.25),
    "normal": lambda out, key, start: normal_(out, key, start=start, mean=0.1, std=0.02),
    "trunc_normal": lambda out, key, start: trunc_normal_(out, key, start=start, std=0.02, a=-0.04, b=0.04),
}
DTYPES = [torch.float32, torch.bfloat16, torch.float64]


def _whole(kind: str, shape: tuple[int, ...], dtype: torch.dtype, key: int = KEY) -> torch.Tensor:
    return FILLS[kind](torch.empty(shape, dtype=dtype), key, 0)


def _equal(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Bit for bit (NaN-free values; -0.0 != 0.0 would also show in the bits)."""
    return x.dtype == y.dtype and torch.equal(x.view(-1).view(torch.uint8), y.view(-1).view(torch.uint8))


def test_philox_known_answers() -> None:
    """The Random123 known-answer vectors of Philox-4x32-10."""
    vectors = [
        ((0, 0, 0, 0), 0, (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (1 << 64) - 1, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            0xA4093822 | (0x299F31D0 << 32),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ]
    for counter, key, expected in vectors:
        words = philox4x32([torch.tensor([c], dtype=torch.int64) for c in counter], key)
        assert tuple(int(w) for w in words) == expected


def test_known_values() -> None:
    """A change of the generator, the key hash or the float conversion shows here."""
    assert key_for(0, "layers.0.attn.qkv.weight") == key_for(0, "layers.0.attn.qkv.weight")
    assert key_for(1234, "embed.weight") == 0x910FAB5722520044
    u = uniform_(torch.empty(4, dtype=torch.float64), KEY)
    assert u.tolist() == [0.7199727411818204, 0.08068276164817678, 0.678864737171819, 0.39550901498884106]
    z = normal_(torch.empty(4), KEY)
    assert z.tolist() == [0.7086585164070129, 0.3935565948486328, -0.6971778273582458, 0.5372241139411926]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", sorted(FILLS))
def test_shards_equal_whole(kind: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(init_rng, "CHUNK", 7)  # many chunk boundaries, odd and even
    shape = (13, 5)
    whole = _whole(kind, shape, dtype)
    flat = whole.view(-1)
    rng = random.Random(0)
    cuts = sorted({0, flat.numel(), *(rng.randrange(flat.numel() + 1) for _ in range(12))})
    cuts += [cuts[-1]]  # an empty shard at the end
    for lo, hi in itertools.pairwise(cuts):
        shard = FILLS[kind](torch.empty(hi - lo, dtype=dtype), KEY, lo)
        assert _equal(shard, flat[lo:hi]), (lo, hi)
    for i in (0, 1, 2, 31, flat.numel() - 1):  # single elements, even and odd
        assert _equal(FILLS[kind](torch.empty(1, dtype=dtype), KEY, i), flat[i : i + 1])
    for r0, r1 in ((0, 4), (4, 5), (5, 13), (7, 7)):  # row shards
        rows = FILLS[kind](torch.empty(r1 - r0, 5, dtype=dtype), KEY, row_start(shape, r0))
        assert _equal(rows, whole[r0:r1])


def test_chunking_does_not_change_values(monkeypatch: pytest.MonkeyPatch) -> None:
    big = normal_(torch.empty(1000), KEY, start=3)
    monkeypatch.setattr(init_rng, "CHUNK", 64)
    assert _equal(normal_(torch.empty(1000), KEY, start=3), big)


@pytest.mark.parametrize("kind", sorted(FILLS))
def test_row_split_over_four_ranks_reassembles(kind: str) -> None:
    """A (10, 3, 4) parameter split by rows over 4 ranks as Shard(0) does (3, 3, 3, 1), and ragged."""
    shape = (10, 3, 4)
    whole = _whole(kind, shape, torch.float32)
    for counts in ((3, 3, 3, 1), (10, 0, 0, 0), (0, 4, 0, 6)):
        parts, row = [], 0
        for n in counts:  # each "rank" fills only its own rows
            parts.append(FILLS[kind](torch.empty(n, *shape[1:]), KEY, row_start(shape, row)))
            row += n
        assert _equal(torch.cat(parts), whole)


def test_bf16_is_fp32_rounded() -> None:
    normal = _whole("normal", (257,), torch.float32).to(torch.bfloat16)
    assert _equal(_whole("normal", (257,), torch.bfloat16), normal)
    uniform = _whole("uniform", (257,), torch.float32).to(torch.bfloat16).clamp(max=0.2490234375)  # < high = 0.25
    assert _equal(_whole("uniform", (257,), torch.bfloat16), uniform)


def test_fp64_uniform_truncated_is_fp32_uniform() -> None:
    u64 = uniform_(torch.empty(1000, dtype=torch.float64), KEY)
    assert torch.equal(torch.floor(u64 * 2**24) / 2**24, uniform_(torch.empty(1000), KEY).double())


def test_normal_statistics() -> None:
    n = 1 << 20
    z = normal_(torch.empty(n, dtype=torch.float64), KEY, mean=0.5, std=2.0)
    assert abs(z.mean().item() - 0.5) < 4 * 2.0 / math.sqrt(n)
    assert abs(z.std().item() - 2.0) < 4 * 2.0 / math.sqrt(2 * n)
    assert abs(((z - 0.5) / 2.0).pow(4).mean().item() - 3.0) < 4 * math.sqrt(96 / n)  # kurtosis: var(z^4) = 96
    z32 = normal_(torch.empty(n), KEY)
    assert abs(z32.mean().item()) < 4 / math.sqrt(n) and abs(z32.std().item() - 1) < 4 / math.sqrt(2 * n)
    assert abs(torch.corrcoef(torch.stack((z32[0::2], z32[1::2])))[0, 1].item()) < 4 / math.sqrt(n / 2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_uniform_range_and_moments(dtype: torch.dtype) -> None:
    n = 1 << 18
    u = uniform_(torch.empty(n, dtype=dtype), KEY, low=-1.0, high=3.0).double()
    assert u.min().item() >= -1.0 and u.max().item() < 3.0
    assert abs(u.mean().item() - 1.0) < 4 * (4 / math.sqrt(12)) / math.sqrt(n)
    assert abs(u.var().item() - 16 / 12) < 0.02
    counts = torch.histc(u, bins=16, min=-1.0, max=3.0)  # chi-square, 15 dof: P(> 40) < 1e-3
    assert ((counts - n / 16) ** 2 / (n / 16)).sum().item() < 40


def test_uniform_never_reaches_high_after_rounding() -> None:
    u = uniform_(torch.empty(1 << 16, dtype=torch.bfloat16), KEY, low=0.0, high=1.0)
    assert u.max().item() < 1.0  # bf16 rounding of values near 1 would give 1.0


@pytest.mark.parametrize(
    ("mean", "std", "a", "b"), [(0.0, 1.0, -2.0, 2.0), (0.0, 0.02, -0.06, 0.06), (1.0, 2.0, 3.0, 9.0)]
)
def test_trunc_normal_range_and_std(mean: float, std: float, a: float, b: float) -> None:
    n = 1 << 18
    x = trunc_normal_(torch.empty(n, dtype=torch.float64), KEY, mean=mean, std=std, a=a, b=b)
    assert x.min().item() >= a and x.max().item() <= b
    alpha, beta = (a - mean) / std, (b - mean) / std
    pdf = lambda t: math.exp(-t * t / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    mass = 0.5 * (math.erf(beta / math.sqrt(2)) - math.erf(alpha / math.sqrt(2)))
    shift = (pdf(alpha) - pdf(beta)) / mass
    want_mean = mean + std * shift
    want_std = std * math.sqrt(1 + (alpha * pdf(alpha) - beta * pdf(beta)) / mass - shift**2)
    assert abs(x.mean().item() - want_mean) < 4 * want_std / math.sqrt(n)
    assert abs(x.std().item() - want_std) < 4 * want_std * math.sqrt(2 / n)  # loose: kurtosis < 3 here


def test_keys_separate_streams() -> None:
    names = ["embed.weight", "layers.0.mlp.up.weight", "layers.1.mlp.up.weight", "head.weight"]
    keys = {key_for(seed, name) for seed in (0, 1, 2**64 - 1) for name in names}
    assert len(keys) == 12
    draws = [normal_(torch.empty(64), k) for k in sorted(keys)]
    for i, x in enumerate(draws):
        for y in draws[i + 1 :]:
            assert not torch.equal(x, y)
    again = normal_(torch.empty(64), key_for(1, "head.weight"))
    assert _equal(again, normal_(torch.empty(64), key_for(1, "head.weight")))
    assert not torch.equal(normal_(torch.empty(64), KEY, start=64), normal_(torch.empty(64), KEY))


def test_meta_and_bad_arguments() -> None:
    meta = torch.empty(4, 4, device="meta")
    assert normal_(meta, KEY) is meta
    with pytest.raises(ValueError, match="seed"):
        key_for(-1, "w")
    with pytest.raises(ValueError, match="dtype"):
        normal_(torch.empty(3, dtype=torch.int32), KEY)
    with pytest.raises(ValueError, match="contiguous"):
        normal_(torch.empty(4, 4).t(), KEY)
    with pytest.raises(ValueError, match="start"):
        uniform_(torch.empty(3), KEY, start=-1)
    with pytest.raises(ValueError, match="low"):
        uniform_(torch.empty(3), KEY, low=1.0, high=1.0)
    with pytest.raises(ValueError, match="no probability"):
        trunc_normal_(torch.empty(3), KEY, a=100.0, b=101.0)
