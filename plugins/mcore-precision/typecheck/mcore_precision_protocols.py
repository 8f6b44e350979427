"""Static protocol conformance of mcore-precision's recipes (mypy in ``nox -s lint``)."""

from mcore.protocols import PrecisionRecipe
from mcore_precision.fp8 import FP8Current, FP8Delayed
from mcore_precision.fp16 import FP16


def recipes(a: FP16, b: FP8Current, c: FP8Delayed) -> list[PrecisionRecipe]:
    return [a, b, c]
