"""The core's own implementations pass the same conformance suites as any plugin."""

from __future__ import annotations

from mcore.layouts.single import SingleLayout
from mcore.precision.basic import BF16, FP32
from mcore_testing.conformance import LayoutConformance, OptimizerConformance, PrecisionConformance
from mcore_testing.reference_optim import ReferenceAdamW


class TestSingleLayout(LayoutConformance):
    world_size = 1

    def make_layout(self):
        return SingleLayout()


class TestFP32(PrecisionConformance):
    def make_recipe(self):
        return FP32()


class TestBF16(PrecisionConformance):
    def make_recipe(self):
        return BF16()


class TestBF16Autocast(PrecisionConformance):
    def make_recipe(self):
        return BF16(BF16.Config(params="fp32"))


class TestReferenceAdamW(OptimizerConformance):
    def make_factory(self):
        return ReferenceAdamW(ReferenceAdamW.Config(lr=1e-2))
