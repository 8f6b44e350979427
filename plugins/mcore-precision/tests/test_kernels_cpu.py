"""The quantisation kernels against their torch references, byte for byte, in Triton's interpreter on CPU; and
the dispatch (CPU tensors get the references, never Triton).

The interpreter runs each program as numpy code: slow, so the shapes are a few hundred to a few thousand
elements, chosen to be ragged against every block and tile. Every case compares the FP8 bytes (NaN codes as
"NaN": the sign a NaN gets is the device's arithmetic, not the format's), the scales' bits and NaN places.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
import torch
from quant_cases import assert_bits, assert_codes, fp8_edges, inputs

from mcore.errors import UserError
from mcore_precision import kernels
from mcore_precision.formats import E4M3, E5M2, FP8Format
from mcore_precision.kernels import reference as ref
from mcore_precision.mx import Rounding

_OWN_PROCESS = "MCORE_PRECISION_INTERPRETER_PROCESS"  # set in the process test_interpreter_in_its_own_process starts
_HAS_TRITON = importlib.util.find_spec("triton") is not None


def _shared_process() -> str:
    """Why the interpreter tests cannot run in this process ('' when they can): Triton's language is built in
    one mode per process, so not beside compiled Triton (imported already, by ``torch.compile`` say, or to
    come: CUDA present); ``test_interpreter_in_its_own_process`` runs them in a fresh one then."""
    if os.environ.get(_OWN_PROCESS) == "1":
        return ""
    if torch.cuda.is_available():
        return "CUDA present: compiled Triton shares this process (the interpreter tests run in their own)"
    lang = sys.modules.get("triton.language")
    if lang is not None:
        from triton.runtime.interpreter import InterpretedFunction

        if not isinstance(lang.max, InterpretedFunction):
            return "Triton was imported in compiled mode in this process (the interpreter tests run in their own)"
    return ""


needs_triton = pytest.mark.skipif(not _HAS_TRITON, reason="triton is not installed")
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's overflow notes in the interpreter

FMTS = pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=["e4m3", "e5m2"])
_MODULES = ("_common", "tensorwise", "rowwise", "blockwise", "mx", "nvfp4")


@pytest.fixture(scope="module")
def interp() -> Iterator[SimpleNamespace]:
    """Fresh copies of the kernel modules built in interpreter mode (``TRITON_INTERPRET`` is read when a kernel
    is decorated); the modules of the session (compiled mode) are put back afterwards."""
    why = _shared_process()
    if why:
        pytest.skip(why)
    names = [f"mcore_precision.kernels.{m}" for m in _MODULES]
    saved = {n: sys.modules.pop(n) for n in names if n in sys.modules}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "1")  # while the tests run too: Triton reads it at launches
        from mcore_testing.interpreter_bounds import install

        install()  # every interpreted load and store is bounds-checked (only interpreted launches are affected)
        try:
            mods = SimpleNamespace(**{m: importlib.import_module(f"mcore_precision.kernels.{m}") for m in _MODULES})
        finally:
            for n in names:
                sys.modules.pop(n, None)
            sys.modules.update(saved)
        yield mods


@needs_triton
def test_interpreter_in_its_own_process() -> None:
    """Where this process cannot host the interpreter (``_shared_process``), the interpreter tests of this file
    run in a fresh one (CUDA hidden) and must all pass there."""
    if not _shared_process():
        pytest.skip("the interpreter tests run in this process")
    env = {**os.environ, _OWN_PROCESS: "1", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("TRITON_INTERPRET", None)
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:logging", __file__]
    done = subprocess.run([*argv, "-k", "not own_process"], env=env, capture_output=True, text=True, timeout=600)
    tail = (done.stdout + done.stderr)[-3000:]
    assert done.returncode == 0, tail
    passed = re.search(r"(\d+) passed", tail)
    assert passed is not None and int(passed.group(1)) >= 35, tail  # every interpreter case ran


@needs_triton
@FMTS
def test_fp8_code_rounds_and_saturates_every_edge(interp: SimpleNamespace, fmt: FP8Format) -> None:
    x = fp8_edges(fmt)  # cast with scale 1: the codes alone
    out = interp.tensorwise.quantize_tensorwise(x, fmt, scale=torch.tensor(1.0))
    want = ref.quantize_tensorwise(x, fmt, scale=torch.tensor(1.0))
    assert_codes(out[0], want[0], "codes")
    assert_bits(out[3], want[3], "amax")


@needs_triton
@FMTS
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("special", [False, True], ids=["finite", "nan-inf"])
def test_tensorwise_current_and_transpose(interp: SimpleNamespace, fmt: FP8Format, dtype, special: bool) -> None:
    x = inputs(37, 70, dtype, special=special)
    for margin in (0, 2):
        out = interp.tensorwise.quantize_tensorwise(x, fmt, margin, None, True)
        want = ref.quantize_tensorwise(x, fmt, margin, None, True)
        assert_codes(out[0], want[0], f"q margin {margin}")
        assert_codes(out[1], want[1], f"q.T margin {margin}")
        assert_bits(out[2], want[2], "scale")
        assert_bits(out[3], want[3], "amax")
        assert_bits(out[4], want[4], "1 / scale")


@needs_triton
@FMTS
def test_tensorwise_given_scale_saturates_and_answers_the_amax(interp: SimpleNamespace, fmt: FP8Format) -> None:
    x = inputs(45, 29, torch.bfloat16).t()  # strided (K, M) view
    for scale in (torch.tensor(3e3), torch.tensor(2.0**-3)):  # the first saturates many values
        out = interp.tensorwise.quantize_tensorwise(x, fmt, scale=scale, transpose=True)
        want = ref.quantize_tensorwise(x, fmt, scale=scale, transpose=True)
        assert_codes(out[0], want[0], "q")
        assert_codes(out[1], want[1], "q.T")
        assert_bits(out[2], want[2], "scale")
        assert_bits(out[3], want[3], "amax")
        assert_bits(out[4], want[4], "1 / scale")
        assert (out[0].view(torch.uint8) & 0x7F).eq(0x7E if fmt is E4M3 else 0x7B).any()  # saturated codes


@needs_triton
def test_tensorwise_empty_and_zero(interp: SimpleNamespace) -> None:
    for x in (torch.zeros(0, 5), torch.zeros(3, 4)):
        out = interp.tensorwise.quantize_tensorwise(x, E4M3)
        want = ref.quantize_tensorwise(x, E4M3)
        assert_codes(out[0], want[0], "q")
        assert_bits(out[2], want[2], "scale")
        assert_bits(out[3], want[3], "amax")
        assert_bits(out[4], want[4], "1 / scale")
        assert out[2].item() == 1.0


@needs_triton
@FMTS
@pytest.mark.parametrize(
    "case", ["contiguous", "transposed", "long-rows", "bf16"], ids=lambda c: c
)  # one chunk in registers; strided bands; rows longer than a chunk; bf16 subnormals
def test_rowwise(interp: SimpleNamespace, fmt: FP8Format, case: str) -> None:
    x = {
        "contiguous": lambda: inputs(9, 100),
        "transposed": lambda: inputs(150, 37).t(),
        "long-rows": lambda: inputs(2, 8200, special=False),
        "bf16": lambda: inputs(33, 66, torch.bfloat16).t(),
    }[case]()
    out = interp.rowwise.quantize_rowwise(x, fmt, 1)
    want = ref.quantize_rowwise(x, fmt, 1)
    assert_codes(out[0], want[0], "q")
    assert_bits(out[1], want[1], "scale")


@needs_triton
@FMTS
@pytest.mark.parametrize("block", [(1, 128), (128, 128), (3, 20)], ids=["1x128", "128x128", "3x20"])
def test_blockwise(interp: SimpleNamespace, fmt: FP8Format, block: tuple[int, int]) -> None:
    for x in (inputs(130, 150), inputs(140, 10, torch.bfloat16).t(), inputs(5, 300)):
        out = interp.blockwise.quantize_blockwise(x, fmt, block, 0)
        want = ref.quantize_blockwise(x, fmt, block, 0)
        assert_codes(out[0], want[0], f"q {tuple(x.shape)}")
        assert_bits(out[1], want[1], f"scale {tuple(x.shape)}")


@needs_triton
@FMTS
@pytest.mark.parametrize("rounding", ["up", "floor"])
def test_mx(interp: SimpleNamespace, fmt: FP8Format, rounding: Rounding) -> None:
    # blocks whose amax spans 2**-149 .. 2**127: every E8M0 exponent, both clamps, ragged R, NaN/inf blocks
    g = torch.Generator().manual_seed(1)
    spread = torch.randn(32, 70, generator=g) * torch.exp2(torch.randint(-149, 128, (32, 1), generator=g).float())
    for x in (inputs(9, 100), spread, inputs(70, 33, torch.bfloat16).t()):
        out = interp.mx.quantize_mx(x, fmt, rounding)
        want = ref.quantize_mx(x, fmt, rounding)
        assert_codes(out[0], want[0], f"q {tuple(x.shape)}")
        assert_bits(out[1], want[1], f"scale {tuple(x.shape)}")


@needs_triton
@pytest.mark.parametrize("block", [(1, 16), (16, 16)], ids=["1x16", "16x16"])
@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
def test_nvfp4(interp: SimpleNamespace, block: tuple[int, int], stochastic: bool) -> None:
    cases = (inputs(37, 70), inputs(33, 40).t(), inputs(20, 50, torch.bfloat16, special=False) * 1e-3)
    for x in cases:
        gens = [torch.Generator().manual_seed(5) if stochastic else None for _ in range(2)]
        out = interp.nvfp4.quantize_nvfp4(x, block, gens[0])
        want = ref.quantize_nvfp4(x, block, gens[1])
        assert_bits(out[0], want[0], f"values {tuple(x.shape)}")
        assert_codes(out[1], want[1], f"block scales {tuple(x.shape)}")
        assert_bits(out[2], want[2], "tensor scale")
        if gens[0] is not None and gens[1] is not None:  # both drew the same numbers: the same place now
            assert torch.equal(gens[0].get_state(), gens[1].get_state())


def test_dispatch_runs_the_reference_on_cpu_without_importing_triton_kernels() -> None:
    x = inputs(8, 40, special=False)
    for entry in (kernels.quantize_tensorwise, kernels.quantize_rowwise, kernels.quantize_mx):
        assert entry.implementation("cpu").__module__ == "mcore_precision.kernels.reference"
    q, _, scale, _, decode = kernels.quantize_tensorwise(x, E4M3)
    want_q, _, want_scale, _, _ = ref.quantize_tensorwise(x, E4M3)
    assert_codes(q, want_q, "q")
    assert_bits(scale, want_scale, "scale")
    assert_bits(decode, want_scale.reciprocal(), "1 / scale")
    assert "mcore_precision.kernels.tensorwise" not in sys.modules or os.environ.get("TRITON_INTERPRET")


def test_dispatch_honours_the_reference_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MCORE_PRECISION_KERNELS", "reference")
    assert not kernels.triton_usable()
    fresh = kernels.Dispatched("t", "mcore_precision.kernels.reference:quantize_mx", "no.such.module:f")
    assert fresh.implementation("cuda") is ref.quantize_mx  # never imports the kernel module


def test_dispatch_refuses_an_unknown_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MCORE_PRECISION_KERNELS", "fast")
    with pytest.raises(UserError, match="MCORE_PRECISION_KERNELS = 'fast'; allowed: triton, reference"):
        kernels.triton_usable()
    monkeypatch.setenv("MCORE_PRECISION_KERNELS", "")  # unset or empty: the kernels where CUDA and Triton are
    assert kernels.triton_usable() == (torch.cuda.is_available() and importlib.util.find_spec("triton") is not None)


def test_kernels_refuse_bad_shapes() -> None:
    with pytest.raises(ValueError, match="allowed: a 2-D"):
        kernels.quantize_tensorwise(torch.zeros(2, 3, 4), E4M3)
    with pytest.raises(ValueError, match="allowed: a 2-D"):
        kernels.quantize_mx(torch.zeros(4), E4M3)


def test_fp8_tensor_transpose_swaps_the_stored_layouts() -> None:
    from mcore_precision.scaling import FP8Tensor

    q, q_t, scale, _, decode = ref.quantize_tensorwise(inputs(6, 10, special=False), E4M3, transpose=True)
    assert q_t is not None
    t = FP8Tensor(q, scale, None, q_t, decode).t()
    assert t.data is q_t and t.data_t is q and t.t().data is q
    assert t.decode is decode and t.t().decode is decode  # the GEMM's decode scale follows either layout
    assert torch.equal(t.dequantize(), FP8Tensor(q, scale, None).t().dequantize())
