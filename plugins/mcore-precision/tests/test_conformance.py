"""The harness's ``PrecisionConformance`` for every recipe of this plugin.

The suite checks the loss and the grouped expert GEMM against fp32 with one tolerance; a GEMM's relative error
(two operands rounded to 3 mantissa bits, ~4%) exceeds the loss's (2%), so the recipes that take the grouped
GEMM check it with ``grouped_tolerance`` (their GEMMs are checked bit-exactly against the same format in
``test_schemes``)."""

from __future__ import annotations

from typing import Any

from mcore_precision.fp8 import FP8Blockwise, FP8Current, FP8Delayed, FP8Rowwise
from mcore_precision.fp16 import FP16
from mcore_precision.microscaling import MXFP8, NVFP4
from mcore_testing.conformance import PrecisionConformance


class _GroupedTolerance(PrecisionConformance):
    grouped_tolerance = 6e-2

    def test_grouped_linear_matches_reference(self) -> None:
        self.forward_tolerance = self.grouped_tolerance  # this test's instance only
        super().test_grouped_linear_matches_reference()


class TestFP16(PrecisionConformance):
    def make_recipe(self) -> Any:
        return FP16(FP16.Config(initial_scale=2.0**8))  # the tiny model's scaled gradients stay below fp16's max


class TestFP16Autocast(PrecisionConformance):
    def make_recipe(self) -> Any:
        return FP16(FP16.Config(params="fp32", initial_scale=2.0**8))

    forward_tolerance = 1e-2  # fp32 parameters, fp16 GEMMs


class TestFP8Current(_GroupedTolerance):
    def make_recipe(self) -> Any:
        return FP8Current()

    forward_tolerance = 2e-2


class TestFP8CurrentE4M3Gradients(_GroupedTolerance):
    def make_recipe(self) -> Any:
        return FP8Current(FP8Current.Config(grad_format="e4m3", margin=1))

    forward_tolerance = 2e-2


class TestFP8Delayed(PrecisionConformance):
    def make_recipe(self) -> Any:
        return FP8Delayed(FP8Delayed.Config(amax_history_len=4, amax_compute_algo="most_recent"))

    forward_tolerance = 2e-2


class TestFP8Rowwise(PrecisionConformance):
    def make_recipe(self) -> Any:
        return FP8Rowwise()

    forward_tolerance = 2e-2


class TestFP8Blockwise(_GroupedTolerance):
    def make_recipe(self) -> Any:
        return FP8Blockwise()

    forward_tolerance = 2e-2


class TestMXFP8(_GroupedTolerance):
    def make_recipe(self) -> Any:
        return MXFP8()

    forward_tolerance = 2e-2


class TestMXFP8Floor(_GroupedTolerance):
    def make_recipe(self) -> Any:
        return MXFP8(MXFP8.Config(scale_rounding="floor", grad_format="e5m2"))

    forward_tolerance = 2e-2
    grouped_tolerance = 0.1  # E5M2 gradients: 2 mantissa bits


class TestNVFP4(PrecisionConformance):
    def make_recipe(self) -> Any:
        return NVFP4()

    forward_tolerance = 1e-2
