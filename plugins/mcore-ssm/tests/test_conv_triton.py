"""The fused Triton conv1d + SiLU (+ per-head L2 norm) of the training call (``mcore_ssm.conv_triton``) against the
torch path (``conv.causal_conv1d``, then ``gdn.l2_normalize``).

CPU: in Triton's interpreter (a child process, ``mcore_testing.interpreted``, the bounds checker on), fp32: the
output and the gradients of ``x``, the filter and the bias within 1e-5 of the torch path's autograd, on packed
documents with boundaries inside a token tile (of the ``da`` kernel and of the ``dx`` kernel), documents and rows
shorter than the kernel, a partial last tile, channels not a multiple of the channel block (and more than one block),
K 2, 3 and 4, inputs that are split views of one wider projection (the gradient of the whole projection compared,
zeros outside the view included), one backward program walking every tile (the partial ``dweight`` sums), a program
whose last tile lies wholly past the tokens; each with both backwards (``MCORE_SSM_CONV_BWD`` one and two: the ``da``
and ``dx`` kernels' tiles). GPU (``-m gpu``): bf16 at ``hybrid-bench``'s shapes (B 2, T 4096,
4 documents a row, q/k 8 heads of 128, v 16 heads of 128) within 1e-2 of the fp32 torch path.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from ssm_cases import needs_triton, raises_value_error

from mcore_testing.interpreted import interpreted_records

# (name, B, T, C, K, cu_seqlens or None, norm head or None, bias, backward programs or None)
CASES: list[tuple[str, int, int, int, int, list[int] | None, int | None, bool, int | None]] = [
    ("rows-bias", 2, 37, 24, 4, None, None, True, None),
    ("packed-norm", 2, 37, 24, 4, [0, 2, 3, 20, 37, 40, 74], 8, False, None),
    ("packed-wide-bias-k3", 1, 70, 136, 3, [0, 1, 33, 35, 70], None, True, None),
    ("packed-norm-one-program", 2, 40, 32, 4, [0, 5, 6, 7, 45, 80], 16, True, 1),
    ("packed-norm-k2-empty-tile", 1, 70, 256, 2, [0, 1, 33, 35, 70], 64, False, 8),
    ("rows-shorter-than-k", 3, 3, 24, 4, None, None, True, None),
]
#: Both backwards (``MCORE_SSM_CONV_BWD``): the one-kernel default and the two-kernel opt-in.
BACKWARDS = ("one", "two")


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in fp64; NaN where either is not finite (NaN never passes)."""
    a, b = out.detach().double(), ref.detach().double()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return float("nan")
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _torch_path(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cu: torch.Tensor | None, norm: int | None
) -> torch.Tensor:
    from mcore_ssm.conv import causal_conv1d
    from mcore_ssm.gdn import l2_normalize

    y, _ = causal_conv1d(x, weight, bias, cu_seqlens=cu)  # (B, T, C)
    return l2_normalize(y.unflatten(-1, (-1, norm))).flatten(-2) if norm is not None else y


def compare(
    batch: int,
    seq: int,
    channels: int,
    width: int,
    cu_list: list[int] | None,
    norm: int | None,
    with_bias: bool,
    *,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    seed: int = 0,
) -> list[float]:
    """The relative errors of the output and the gradients of the whole projection, the filter (and the bias) of
    ``conv1d_silu_train`` on a split view of a wider projection, against the torch path in fp32."""
    from mcore_ssm.conv_triton import conv1d_silu_train
    from mcore_ssm.packing import documents

    gen = torch.Generator().manual_seed(seed)
    wide = torch.randn(batch, seq, channels + 11, generator=gen)  # the fused projection; x is columns 5 .. 5 + C
    weight = torch.randn(channels, width, generator=gen) * 0.7
    bias = torch.randn(channels, generator=gen) if with_bias else None
    probe = torch.randn(batch, seq, channels, generator=gen)
    cu = torch.tensor(cu_list, dtype=torch.int32, device=device) if cu_list is not None else None
    pos = documents(batch, seq, cu, torch.device(device)).pos if cu is not None else None
    results = []
    for fused in (True, False):
        kind = dtype if fused else torch.float32
        given = (wide, weight, *([bias] if bias is not None else []))
        leaves = [t.to(device=device, dtype=kind).clone().requires_grad_() for t in given]  # fresh leaves
        x = leaves[0][..., 5 : 5 + channels]  # (B, T, C) strided view
        b = leaves[2] if with_bias else None
        if fused:
            y = conv1d_silu_train(x, leaves[1], b, pos=pos, norm_head=norm)
        else:
            y = _torch_path(x, leaves[1], b, cu, norm)
        (y.float() * probe.to(device)).sum().backward()
        results.append([y, *(leaf.grad for leaf in leaves)])
    return [_rel(a, b) for a, b in zip(*results, strict=True)]


def _last_stride() -> list[float]:
    """``x`` whose channels have a stride (a transposed tensor): copied, then as a contiguous ``x``."""
    from mcore_ssm.conv_triton import conv1d_silu_train

    gen = torch.Generator().manual_seed(4)
    base = torch.randn(1, 12, 9, generator=gen)  # (B, C, T)
    weight = torch.randn(12, 4, generator=gen)
    strided = conv1d_silu_train(base.transpose(1, 2), weight)  # (B, T, C), channel stride T
    return [_rel(strided, conv1d_silu_train(base.transpose(1, 2).contiguous(), weight))]


def _edges() -> dict[str, Any]:
    """Found by review: strided ``pos`` / ``bias`` (read with stride 1 by the kernels: silently wrong before), zero
    tokens (the backward divided by zero programs)."""
    from mcore_ssm.conv_triton import conv1d_silu_train
    from mcore_ssm.packing import documents

    gen = torch.Generator().manual_seed(5)
    x = torch.randn(1, 20, 12, generator=gen, requires_grad=True)
    weight = torch.randn(12, 4, generator=gen, requires_grad=True)
    bias = torch.randn(12, generator=gen, requires_grad=True)
    pos = documents(1, 20, torch.tensor([0, 7, 20], dtype=torch.int32), torch.device("cpu")).pos
    probe = torch.randn(1, 20, 12, generator=gen)

    def grads(p: torch.Tensor, b: torch.Tensor) -> list[torch.Tensor]:
        out = conv1d_silu_train(x, weight, b, pos=p)
        return [out, *torch.autograd.grad((out * probe).sum(), (x, weight, bias))]

    plain = grads(pos, bias)
    strided = grads(torch.stack([pos, pos], 1)[:, 0], torch.stack([bias, bias], 1)[:, 0])
    empty_x = torch.randn(1, 0, 12, requires_grad=True)
    empty = conv1d_silu_train(empty_x, weight)
    (dx_empty,) = torch.autograd.grad(empty.sum(), empty_x)
    return {"strided": [_rel(a, b) for a, b in zip(strided, plain)], "empty": [list(empty.shape), list(dx_empty.shape)]}


def _bad_calls() -> list[bool]:
    """Each malformed call raises a ``ValueError``."""
    from mcore_ssm.conv_triton import conv1d_silu_train

    x = torch.randn(1, 8, 12)
    bad = [
        lambda: conv1d_silu_train(x, torch.randn(12)),
        lambda: conv1d_silu_train(x, torch.randn(10, 4)),
        lambda: conv1d_silu_train(x, torch.randn(12, 4), norm_head=5),
        lambda: conv1d_silu_train(x, torch.randn(12, 4), pos=torch.zeros(7, dtype=torch.int64)),
    ]
    return raises_value_error(bad)


def interpreted_main() -> None:
    """(Child process, ``TRITON_INTERPRET=1``.) One JSON line per case."""
    import os

    import mcore_ssm.conv_triton as conv_triton

    for backward in BACKWARDS:  # read by each backward call
        os.environ["MCORE_SSM_CONV_BWD"] = backward
        for name, batch, seq, channels, width, cu, norm, with_bias, programs in CASES:
            conv_triton._BWD_PROGRAMS = programs or 1024
            rels = compare(batch, seq, channels, width, cu, norm, with_bias)
            print(json.dumps({"name": f"{backward}/{name}", "rels": rels}))
        print(json.dumps({"name": f"{backward}/edges", **_edges()}))
    print(json.dumps({"name": "bad-calls", "raised": _bad_calls()}))
    print(json.dumps({"name": "last-stride", "rels": _last_stride()}))


@pytest.fixture(scope="module")
def records() -> dict[str, dict[str, Any]]:
    return interpreted_records(__file__)


@needs_triton
@pytest.mark.parametrize("backward", BACKWARDS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_fused_conv_equals_the_torch_path_in_interpreter(
    records: dict[str, dict[str, Any]], case: tuple, backward: str
) -> None:
    """Output, d(projection), d(filter) (and d(bias)) within 1e-5 of the torch path (fp32; NaN fails), with either
    backward (``MCORE_SSM_CONV_BWD``)."""
    rels = records[f"{backward}/{case[0]}"]["rels"]
    assert len(rels) == (4 if case[7] else 3), rels
    assert all(r < 1e-5 for r in rels), rels


@needs_triton
def test_malformed_calls_raise(records: dict[str, dict[str, Any]]) -> None:
    """A filter not ``(C, K)``, a filter of other channels, a head not dividing them, ``pos`` of other tokens."""
    assert records["bad-calls"]["raised"] == [True, True, True, True]


@needs_triton
def test_channels_with_a_stride_are_copied(records: dict[str, dict[str, Any]]) -> None:
    assert records["last-stride"]["rels"] == [0.0], records["last-stride"]


@needs_triton
@pytest.mark.parametrize("backward", BACKWARDS)
def test_strided_pos_and_bias_and_zero_tokens(records: dict[str, dict[str, Any]], backward: str) -> None:
    edges = records[f"{backward}/edges"]
    assert edges["strided"] == [0.0] * 4, edges
    assert edges["empty"] == [[1, 0, 12], [1, 0, 12]]


@pytest.mark.gpu
@pytest.mark.parametrize("channels, norm", [(1024, 128), (2048, None)], ids=["qk-l2norm", "v"])
def test_bf16_at_the_hybrid_bench_shape_within_1e2(channels: int, norm: int | None) -> None:
    """bf16 on CUDA, B 2 x T 4096 with 4 documents a row, split views: output and every gradient within 1e-2 of the
    fp32 torch path (Mamba2's case, with a bias, as ``v`` with one)."""
    cu = list(range(0, 2 * 4096 + 1, 1024))
    for backward in BACKWARDS:
        with pytest.MonkeyPatch.context() as env:
            env.setenv("MCORE_SSM_CONV_BWD", backward)
            for with_bias in (False, True):
                rels = compare(2, 4096, channels, 4, cu, norm, with_bias, dtype=torch.bfloat16, device="cuda")
                assert all(r < 1e-2 for r in rels), (backward, with_bias, rels)
