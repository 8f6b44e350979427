"""The compiled quantisation kernels on CUDA against their torch references on the same card, byte for byte:
large and ragged shapes, bf16 and fp32, row- and column-wise (transposed views), NaN/inf; the dispatch picks
them for CUDA tensors; the schemes' quantised operands through them read back as the references'."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from quant_cases import assert_bits, assert_codes, fp8_edges, inputs

from mcore_precision import kernels
from mcore_precision.formats import E4M3, E5M2, FP8Format
from mcore_precision.kernels import reference as ref
from mcore_precision.mx import Rounding

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed"),
]

FMTS = pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=["e4m3", "e5m2"])


@pytest.fixture(autouse=True)
def _opted_in(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MCORE_PRECISION_KERNELS", "triton")  # the default; explicit against a caller's environment


DTYPES = pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])


def _x(m: int, k: int, dtype: torch.dtype, special: bool = True, seed: int = 0) -> torch.Tensor:
    return inputs(m, k, dtype, seed=seed, special=special, device="cuda")


@FMTS
def test_fp8_codes_on_every_edge(fmt: FP8Format) -> None:
    from mcore_precision.kernels.tensorwise import quantize_tensorwise

    x = fp8_edges(fmt).cuda()
    one = torch.tensor(1.0, device="cuda")
    out, want = quantize_tensorwise(x, fmt, scale=one), ref.quantize_tensorwise(x, fmt, scale=one)
    assert_codes(out[0], want[0], "codes")
    assert_bits(out[3], want[3], "amax")


@FMTS
@DTYPES
@pytest.mark.parametrize("shape", [(8192, 2048), (4096, 14336), (37, 70), (1000, 1003)])
def test_tensorwise(fmt: FP8Format, dtype: torch.dtype, shape: tuple[int, int]) -> None:
    from mcore_precision.kernels.tensorwise import quantize_tensorwise

    x = _x(*shape, dtype, special=False)
    for margin in (0, 1):
        out, want = quantize_tensorwise(x, fmt, margin, None, True), ref.quantize_tensorwise(x, fmt, margin, None, True)
        assert_codes(out[0], want[0], "q")
        assert_codes(out[1], want[1], "q.T")
        assert_bits(out[2], want[2], "scale")
        assert_bits(out[3], want[3], "amax")
        assert_bits(out[4], want[4], "1 / scale")
    scale = want[2] * 8  # saturates the largest values; the amax is answered from the same pass
    out, want = (
        quantize_tensorwise(x.t(), fmt, scale=scale, transpose=True),
        ref.quantize_tensorwise(x.t(), fmt, scale=scale, transpose=True),
    )
    assert_codes(out[0], want[0], "q given scale")
    assert_codes(out[1], want[1], "q.T given scale")
    assert_bits(out[3], want[3], "amax given scale")
    assert_bits(out[4], want[4], "1 / scale given scale")


@FMTS
def test_tensorwise_nan_inf(fmt: FP8Format) -> None:
    from mcore_precision.kernels.tensorwise import quantize_tensorwise

    x = _x(300, 257, torch.bfloat16)
    for scale in (None, torch.tensor(4.0, device="cuda")):
        out, want = quantize_tensorwise(x, fmt, scale=scale), ref.quantize_tensorwise(x, fmt, scale=scale)
        assert_codes(out[0], want[0], "q")
        assert_bits(out[2], want[2], "scale")
        assert_bits(out[3], want[3], "amax")
        assert_bits(out[4], want[4], "1 / scale")


@FMTS
@DTYPES
@pytest.mark.parametrize("layout", ["rows", "columns", "long-rows", "ragged"])
def test_rowwise(fmt: FP8Format, dtype: torch.dtype, layout: str) -> None:
    from mcore_precision.kernels.rowwise import quantize_rowwise

    x = {
        "rows": lambda: _x(8192, 2048, dtype),
        "columns": lambda: _x(8192, 2048, dtype).t(),
        "long-rows": lambda: _x(64, 20000, dtype),
        "ragged": lambda: _x(999, 77, dtype).t(),
    }[layout]()
    out, want = quantize_rowwise(x, fmt, 0), ref.quantize_rowwise(x, fmt, 0)
    assert_codes(out[0], want[0], "q")
    assert_bits(out[1], want[1], "scale")


@FMTS
@DTYPES
@pytest.mark.parametrize("block", [(1, 128), (128, 128)], ids=["1x128", "128x128"])
def test_blockwise(fmt: FP8Format, dtype: torch.dtype, block: tuple[int, int]) -> None:
    from mcore_precision.kernels.blockwise import quantize_blockwise

    for x in (_x(4096, 4096, dtype), _x(4096, 2048, dtype).t(), _x(1000, 1100, dtype)):
        out, want = quantize_blockwise(x, fmt, block), ref.quantize_blockwise(x, fmt, block)
        assert_codes(out[0], want[0], f"q {tuple(x.shape)}")
        assert_bits(out[1], want[1], f"scale {tuple(x.shape)}")


@FMTS
@DTYPES
@pytest.mark.parametrize("rounding", ["up", "floor"])
def test_mx(fmt: FP8Format, dtype: torch.dtype, rounding: Rounding) -> None:
    from mcore_precision.kernels.mx import quantize_mx

    g = torch.Generator().manual_seed(1)
    spread = torch.randn(64, 96, generator=g) * torch.exp2(torch.randint(-149, 128, (64, 1), generator=g).float())
    cases = (_x(8192, 2048, dtype), _x(4096, 2048, dtype).t(), _x(1000, 1001, dtype), spread.cuda())
    for x in cases:
        out, want = quantize_mx(x, fmt, rounding), ref.quantize_mx(x, fmt, rounding)
        assert_codes(out[0], want[0], f"q {tuple(x.shape)}")
        assert_bits(out[1], want[1], f"scale {tuple(x.shape)}")


@DTYPES
@pytest.mark.parametrize("block", [(1, 16), (16, 16)], ids=["1x16", "16x16"])
@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
def test_nvfp4(dtype: torch.dtype, block: tuple[int, int], stochastic: bool) -> None:
    from mcore_precision.kernels.nvfp4 import quantize_nvfp4

    for x in (_x(4096, 2048, dtype), _x(2048, 1000, dtype).t(), _x(300, 50, dtype)):
        gens = [torch.Generator(device="cuda").manual_seed(3) if stochastic else None for _ in range(2)]
        out, want = quantize_nvfp4(x, block, gens[0]), ref.quantize_nvfp4(x, block, gens[1])
        assert_bits(out[0], want[0], f"values {tuple(x.shape)}")
        assert_codes(out[1], want[1], f"block scales {tuple(x.shape)}")
        assert_bits(out[2], want[2], "tensor scale")


def test_dispatch_picks_the_kernels_on_cuda() -> None:
    assert kernels.triton_usable()
    assert kernels.quantize_tensorwise.implementation("cuda").__module__ == "mcore_precision.kernels.tensorwise"
    assert kernels.quantize_mx.implementation("cuda").__module__ == "mcore_precision.kernels.mx"
    assert kernels.quantize_nvfp4.implementation("cuda").__module__ == "mcore_precision.kernels.nvfp4"


def test_schemes_quantise_through_the_kernels_as_the_references() -> None:
    from mcore_precision.fp8 import CurrentScaler
    from mcore_precision.scaling import BlockwiseScheme, MXScheme, Operand, RowwiseScheme, TensorScheme

    x = _x(512, 384, torch.bfloat16, special=False)
    tensor = TensorScheme(input=CurrentScaler(E4M3, 0), weight=CurrentScaler(E4M3, 0), grad=CurrentScaler(E5M2, 0))
    q = tensor.quantize(x, "input", "fprop")
    want = ref.quantize_tensorwise(x, E4M3)
    assert_codes(q.data, want[0], "tensor q")
    assert q.data_t is not None and torch.equal(q.t().data.view(torch.uint8), want[0].t().view(torch.uint8))
    for scheme, want_q in (
        (RowwiseScheme(E4M3), ref.quantize_rowwise(x.t(), E4M3)[0]),
        (BlockwiseScheme(E4M3), ref.quantize_blockwise(x, E4M3, (128, 128))[0]),
        (MXScheme(E4M3), ref.quantize_mx(x.t(), E4M3)[0]),
    ):
        operand: Operand = "weight" if isinstance(scheme, BlockwiseScheme) else "input"
        t = x if isinstance(scheme, BlockwiseScheme) else x.t()
        got = scheme.quantize(t, operand, "fprop" if operand == "weight" else "wgrad")
        assert_codes(got.data, want_q, type(scheme).__name__)  # type: ignore[attr-defined]
