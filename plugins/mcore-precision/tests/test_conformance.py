"""The harness's ``PrecisionConformance`` for every recipe of this plugin."""

from __future__ import annotations

from typing import Any

from mcore_precision.fp8 import FP8Current, FP8Delayed
from mcore_precision.fp16 import FP16
from mcore_testing.conformance import PrecisionConformance


class TestFP16(PrecisionConformance):
    def make_recipe(self) -> Any:
        return FP16(FP16.Config(initial_scale=2.0**8))  # the tiny model's scaled gradients stay below fp16's max


class TestFP16Autocast(PrecisionConformance):
    def make_recipe(self) -> Any:
        return FP16(FP16.Config(params="fp32", initial_scale=2.0**8))

    forward_tolerance = 1e-2  # fp32 parameters, fp16 GEMMs


class TestFP8Current(PrecisionConformance):
    def make_recipe(self) -> Any:
        return FP8Current()

    forward_tolerance = 2e-2


class TestFP8CurrentE4M3Gradients(PrecisionConformance):
    def make_recipe(self) -> Any:
        return FP8Current(FP8Current.Config(grad_format="e4m3", margin=1))

    forward_tolerance = 2e-2


class TestFP8Delayed(PrecisionConformance):
    def make_recipe(self) -> Any:
        return FP8Delayed(FP8Delayed.Config(amax_history_len=4, amax_compute_algo="most_recent"))

    forward_tolerance = 2e-2
