"""Counter-based initial values: any shard of a parameter can be filled alone, identically.

Why: a model built on the meta device and sharded by layouts materialises only each rank's
own part of every parameter and initialises it there. For the full weights to be
bit-identical for every layout and world size, a shard must get exactly the values that the
same elements of the whole tensor would get. A torch CPU ``Generator`` cannot skip ahead, and
DTensor's RNG is CUDA-only and offset-based, so neither lets a shard be filled alone. Here a
value is a pure function of ``(key, element index)``, where ``key = key_for(seed, name)``
and the element index counts the flattened FULL tensor in row-major order.

Generator: Philox-4x32 with 10 rounds (Salmon et al., SC'11; the generator of cuRAND, JAX
and numpy's ``Philox``), written with plain int64 torch ops (32-bit words held in int64,
masked after every shift and product), so it gives the same bits on CPU and CUDA. Block
``j`` (counter ``(j mod 2**32, j // 2**32, 0, 0)``, key ``(key mod 2**32, key // 2**32)``)
gives four 32-bit words ``w0..w3`` and serves elements ``2j`` and ``2j + 1``:

* uniform: element ``2j`` uses ``(w0, w1)``, element ``2j + 1`` uses ``(w2, w3)``; fp32 takes
  the top 24 bits of the first word, fp64 53 bits of both (so the fp64 value truncated to
  24 bits is the fp32 one);
* normal: Box-Muller with ``u1`` from ``(w0, w1)`` and ``u2`` from ``(w2, w3)``; element ``2j``
  is ``r cos(2 pi u2)``, element ``2j + 1`` is ``r sin(2 pi u2)``;
* truncated normal: the inverse CDF of element ``2j``/``2j + 1``'s uniform, in fp64.

Values are computed in fp32 (fp64 for fp64 outputs; fp64 always for the truncated normal)
and rounded once to ``out``'s dtype, so a bf16 fill is the fp32 fill rounded. The integer
bits and uniforms are exact and device independent; the normals go through ``log``, ``sqrt``,
``cos``/``sin`` (and ``ndtri``), which CPU and CUDA round differently in the last bit (checked
on an H200: bits, uniforms and fp32/bf16 truncated normals identical; fp32 normals differ by
at most 1 ulp in ~20% of elements), so bit-identity across layouts holds on one device type.

Shapes (legend):

* ``out``: any shape, contiguous: the shard, elements ``start .. start + out.numel() - 1``
  of the flattened full tensor;
* a row shard of a full ``(d0, d1, ...)`` parameter holding rows ``r0 .. r1 - 1``:
  ``start = r0 * d1 * ...`` (see ``row_start``); for a DTensor, fill its local tensor;
* any other set of elements (a column shard ``Shard(1)``, a block of a 2-D mesh): ``index=``,
  an int64 tensor of flat element indices, one per element of ``out``; ``fill_box_`` fills a
  shard that is a box ``offsets .. offsets + out.shape`` of the full tensor, with ``start``
  runs where the box is contiguous in the full tensor and ``index`` chunks where it is not;
* work is done in chunks of ``CHUNK`` elements on CPU (``DEVICE_CHUNK`` elsewhere, about
  48 bytes of temporaries per element), so memory stays bounded for any size.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence

import torch

__all__ = [
    "CHUNK",
    "DEVICE_CHUNK",
    "fill_box_",
    "key_for",
    "normal_",
    "philox4x32",
    "row_start",
    "trunc_normal_",
    "uniform_",
]

CHUNK = 1 << 16  # elements per chunk of work on CPU: its int64 temporaries stay in cache
DEVICE_CHUNK = 1 << 22  # on accelerators (CUDA): few kernel launches, ~200 MiB of temporaries

_M32 = 0xFFFFFFFF
_MUL0, _MUL1 = 0xD2511F53, 0xCD9E8D57  # Philox multipliers
_WEYL0, _WEYL1 = 0x9E3779B9, 0xBB67AE85  # key bumps
_ROUNDS = 10
_FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def key_for(seed: int, name: str) -> int:
    """A 64-bit key from ``seed`` (0 <= seed < 2**64) and a parameter's fully qualified name.

    blake2b keyed by the seed: stable across processes and Python versions (unlike ``hash()``).
    """
    if not 0 <= seed < 1 << 64:
        raise ValueError(f"seed = {seed}: must be an integer in [0, 2**64)")
    digest = hashlib.blake2b(name.encode("utf-8"), digest_size=8, key=seed.to_bytes(8, "little")).digest()
    return int.from_bytes(digest, "little")


def row_start(full_shape: Sequence[int], row: int) -> int:
    """The flat element index where row ``row`` (along dim 0) of a ``full_shape`` tensor begins."""
    return row * math.prod(full_shape[1:])


def philox4x32(counter: Sequence[torch.Tensor], key: int) -> list[torch.Tensor]:
    """Philox-4x32-10 of four int64 tensors of 32-bit words ``(c0, c1, c2, c3)``: four words out."""
    c0, c1, c2, c3 = (c.clone() for c in counter)  # updated in place below: no allocation per round
    p0, p1 = torch.empty_like(c0), torch.empty_like(c0)
    k0, k1 = key & _M32, (key >> 32) & _M32
    for r in range(_ROUNDS):
        if r:
            k0, k1 = (k0 + _WEYL0) & _M32, (k1 + _WEYL1) & _M32
        torch.mul(c0, _MUL0, out=p0)  # < 2**64: wraps in int64, the low 64 bits stay right
        torch.mul(c2, _MUL1, out=p1)
        torch.bitwise_right_shift(p1, 32, out=c0).bitwise_and_(_M32).bitwise_xor_(c1)  # `>>` is arithmetic: mask
        torch.bitwise_right_shift(p0, 32, out=c2).bitwise_and_(_M32).bitwise_xor_(c3)
        c0.bitwise_xor_(k0)
        c2.bitwise_xor_(k1)
        torch.bitwise_and(p1, _M32, out=c1)
        torch.bitwise_and(p0, _M32, out=c3)
    return [c0, c1, c2, c3]


def _words(key: int, block0: int, blocks: int, device: torch.device) -> list[torch.Tensor]:
    """Philox words of blocks ``block0 .. block0 + blocks - 1``: four int64 tensors of shape (blocks,)."""
    j = torch.arange(block0, block0 + blocks, dtype=torch.int64, device=device)
    zero = torch.zeros_like(j)
    return philox4x32((j & _M32, j >> 32, zero, zero), key)


def _unit(hi: torch.Tensor, lo: torch.Tensor, dtype: torch.dtype, *, open_low: bool = False) -> torch.Tensor:
    """Uniform in [0, 1) (in (0, 1] with ``open_low``) from two words: 24 bits for fp32, 53 for fp64."""
    if dtype == torch.float64:
        bits = ((hi >> 6) << 27) | (lo >> 5)  # 26 + 27 bits
        scale = 2.0**-53
    else:
        bits = hi >> 8
        scale = 2.0**-24
    if open_low:
        bits = bits + 1
    return bits.to(dtype) * scale


def _interleave(even: torch.Tensor, odd: torch.Tensor) -> torch.Tensor:
    """(blocks,), (blocks,) -> (2 * blocks,): elements 2j, 2j + 1."""
    return torch.stack((even, odd), dim=1).reshape(-1)


def _check(out: torch.Tensor, key: int, start: int) -> None:
    if out.dtype not in _FLOATS:
        raise ValueError(f"out.dtype = {out.dtype}: must be one of float32, float64, bfloat16, float16")
    if not out.is_contiguous():
        raise ValueError("out is not contiguous: fill a contiguous tensor (a shard's local tensor) and copy it")
    if not 0 <= key < 1 << 64:
        raise ValueError(f"key = {key}: must be an integer in [0, 2**64) (use key_for)")
    if start < 0 or start + out.numel() > 1 << 62:
        raise ValueError(f"start = {start}: elements start .. start + numel - 1 must lie in [0, 2**62)")


def _check_index(out: torch.Tensor, start: int, index: torch.Tensor) -> None:
    if start:
        raise ValueError(f"start = {start} and index given: give one of them")
    if index.dtype != torch.int64 or index.numel() != out.numel() or index.device != out.device:
        raise ValueError(
            f"index: {index.dtype} with {index.numel()} elements on {index.device}; allowed: int64 with "
            f"out.numel() = {out.numel()} elements on {out.device}"
        )
    if index.numel() and not (index.min() >= 0 and index.max() < 1 << 62):
        raise ValueError("index: element indices must lie in [0, 2**62)")


def _fill(out: torch.Tensor, key: int, start: int, draw, index: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """Fill ``out`` chunk by chunk with ``draw(w0, w1, w2, w3) -> (even, odd)`` values of each block:
    elements ``start ..`` of the full tensor, or the elements ``index`` names."""
    _check(out, key, start)
    if index is not None and not out.is_meta:
        _check_index(out, start, index)
    if out.is_meta or out.numel() == 0:
        return out
    flat = out.view(-1)
    chunk = CHUNK if out.device.type == "cpu" else DEVICE_CHUNK
    with torch.no_grad():
        if index is not None:
            where = index.reshape(-1)
            for pos in range(0, flat.numel(), chunk):
                idx = where[pos : pos + chunk]
                block = idx >> 1  # elements 2j and 2j + 1 share block j: draw it, keep the half asked for
                zero = torch.zeros_like(block)
                even, odd = draw(*philox4x32((block & _M32, block >> 32, zero, zero), key))
                flat[pos : pos + idx.numel()] = torch.where((idx & 1).bool(), odd, even)
            return out
        for pos in range(0, flat.numel(), chunk):
            end = min(pos + chunk, flat.numel())
            first, last = start + pos, start + end  # element range [first, last) of the full tensor
            block0 = first // 2
            blocks = (last + 1) // 2 - block0
            even, odd = draw(*_words(key, block0, blocks, out.device))
            values = _interleave(even, odd)  # elements 2 * block0 ..
            flat[pos:end] = values[first - 2 * block0 : last - 2 * block0]
    return out


def _compute_dtype(out: torch.Tensor) -> torch.dtype:
    return torch.float64 if out.dtype == torch.float64 else torch.float32


def uniform_(
    out: torch.Tensor,
    key: int,
    *,
    start: int = 0,
    index: torch.Tensor | None = None,
    low: float = 0.0,
    high: float = 1.0,
) -> torch.Tensor:
    """Fill ``out`` with U[low, high) values of elements ``start ..`` of the full tensor keyed ``key``
    (or, with ``index``, of the elements it names: int64, one flat index per element of ``out``).

    A value that rounds up to ``high`` in ``out``'s dtype is replaced by the largest value below it.
    """
    if not low < high:
        raise ValueError(f"low = {low}, high = {high}: need low < high")
    dtype = _compute_dtype(out)

    def draw(w0, w1, w2, w3):  # type: ignore[no-untyped-def]
        pair = []
        for hi, lo in ((w0, w1), (w2, w3)):
            v = (_unit(hi, lo, dtype) * (high - low) + low).to(out.dtype)
            below = torch.nextafter(torch.tensor(high, dtype=out.dtype), torch.tensor(low, dtype=out.dtype))
            pair.append(torch.where(v >= high, below.to(v.device), v))
        return pair

    return _fill(out, key, start, draw, index)


def normal_(
    out: torch.Tensor,
    key: int,
    *,
    start: int = 0,
    index: torch.Tensor | None = None,
    mean: float = 0.0,
    std: float = 1.0,
) -> torch.Tensor:
    """Fill ``out`` with N(mean, std**2) values of elements ``start ..`` of the full tensor keyed ``key``
    (or of the elements ``index`` names, as ``uniform_``)."""
    dtype = _compute_dtype(out)

    def draw(w0, w1, w2, w3):  # type: ignore[no-untyped-def]
        r = torch.sqrt(-2.0 * torch.log(_unit(w0, w1, dtype, open_low=True)))
        theta = _unit(w2, w3, dtype) * (2.0 * math.pi)
        return [(r * torch.cos(theta) * std + mean).to(out.dtype), (r * torch.sin(theta) * std + mean).to(out.dtype)]

    return _fill(out, key, start, draw, index)


def _ndtr(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def trunc_normal_(
    out: torch.Tensor,
    key: int,
    *,
    start: int = 0,
    index: torch.Tensor | None = None,
    mean: float = 0.0,
    std: float = 1.0,
    a: float = -2.0,
    b: float = 2.0,
) -> torch.Tensor:
    """Fill ``out`` with N(mean, std**2) truncated to [a, b] (absolute bounds, as ``torch.nn.init``),
    elements ``start ..`` of the full tensor (or those ``index`` names, as ``uniform_``).

    Inverse-CDF sampling in fp64 (one uniform per element), rounded to ``out``'s dtype.
    """
    if not (std > 0 and a < b):
        raise ValueError(f"std = {std}, a = {a}, b = {b}: need std > 0 and a < b")
    alpha, beta = (a - mean) / std, (b - mean) / std
    flip = alpha > 0  # both bounds in the upper tail: sample the mirror image, where the CDF is precise
    if flip:
        alpha, beta = -beta, -alpha
    lo_p, hi_p = _ndtr(alpha), _ndtr(beta)
    if not hi_p > lo_p:
        raise ValueError(f"a = {a}, b = {b}: the interval has no probability under N({mean}, {std}**2)")
    sign = -1.0 if flip else 1.0

    def one(hi: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
        p = _unit(hi, lo, torch.float64) * (hi_p - lo_p) + lo_p
        z = torch.special.ndtri(p).clamp_(alpha, beta) * sign
        return (z * std + mean).clamp_(a, b).to(out.dtype)

    def draw(w0, w1, w2, w3):  # type: ignore[no-untyped-def]
        return [one(w0, w1), one(w2, w3)]

    return _fill(out, key, start, draw, index)


#: A fill with its key and distribution bound: ``fill(out, start=...)`` or ``fill(out, index=...)``.
Fill = Callable[..., torch.Tensor]


def fill_box_(out: torch.Tensor, fill: Fill, full_shape: Sequence[int], offsets: Sequence[int]) -> torch.Tensor:
    """Fill ``out``, the box ``offsets[d] .. offsets[d] + out.shape[d]`` of a ``full_shape`` tensor.

    ``fill`` is one of this module's fills with its key and parameters bound (e.g.
    ``functools.partial(normal_, key=k, std=0.02)``). The box is cut into runs that are contiguous
    in the full tensor (a row shard is one run: one ``start`` fill); runs of at least ``CHUNK``
    elements are filled with ``start``, shorter ones (a column shard's pieces of rows) in chunks
    through ``index``. Every element gets the full tensor's value, whatever the box.
    """
    shape, local = tuple(full_shape), tuple(out.shape)
    if len(offsets) != len(shape) or len(local) != len(shape):
        raise ValueError(
            f"out.shape = {list(local)}, offsets = {list(offsets)}: need {len(shape)} dims like {list(shape)}"
        )
    for d, (o, n, full) in enumerate(zip(offsets, local, shape)):
        if o < 0 or o + n > full:
            raise ValueError(f"dim {d}: rows {o} .. {o + n} do not lie in the full tensor's {full}")
    if not out.is_contiguous():
        raise ValueError("out is not contiguous: fill a contiguous tensor (a shard's local tensor) and copy it")
    if out.numel() == 0 or out.is_meta:
        return out
    strides = [math.prod(shape[d + 1 :]) for d in range(len(shape))]
    # runs: dims after ``last`` are whole, so each index of dims ..last is one contiguous run
    last = max((d for d in range(len(shape)) if local[d] != shape[d]), default=-1)
    base = sum(o * s for o, s in zip(offsets, strides))
    if last <= 0:  # the whole tensor, or a row range: one run
        return fill(out, start=base)
    run = local[last] * strides[last]
    lead = local[:last]
    runs = out.view(-1, run)  # (prod(lead), run)
    if run >= CHUNK:
        for r in range(runs.shape[0]):
            pos, rest = base, r
            for d in reversed(range(last)):
                rest, i = divmod(rest, lead[d])
                pos += i * strides[d]
            fill(runs[r], start=pos)
        return out
    per = max(1, (CHUNK if out.device.type == "cpu" else DEVICE_CHUNK) // run)
    within = torch.arange(run, dtype=torch.int64, device=out.device)
    for r0 in range(0, runs.shape[0], per):
        r1 = min(r0 + per, runs.shape[0])
        which = torch.arange(r0, r1, dtype=torch.int64, device=out.device)  # (runs,) run numbers
        starts = torch.full_like(which, base)
        for d in reversed(range(last)):  # unravel the run number over the box's leading dims
            starts += (which % lead[d]) * strides[d]
            which = which // lead[d]
        fill(runs[r0:r1], index=starts[:, None] + within)  # (runs, run) flat indices
    return out
