"""Static protocol conformance of the core's built-ins (checked by mypy in ``nox -s lint``)."""

from mcore.layouts.single import SingleLayout
from mcore.precision.basic import BF16, FP32
from mcore.protocols import ParallelLayout, PrecisionRecipe

single: ParallelLayout = SingleLayout()
fp32: PrecisionRecipe = FP32()
bf16: PrecisionRecipe = BF16()
