"""Static protocol conformance of mcore-precision's recipes (mypy in ``nox -s lint``)."""

from mcore.protocols import PrecisionRecipe
from mcore_precision.fp8 import FP8Blockwise, FP8Current, FP8Delayed, FP8Rowwise
from mcore_precision.fp16 import FP16
from mcore_precision.microscaling import MXFP8, NVFP4


def recipes(
    a: FP16, b: FP8Current, c: FP8Delayed, d: FP8Rowwise, e: FP8Blockwise, f: MXFP8, g: NVFP4
) -> list[PrecisionRecipe]:
    return [a, b, c, d, e, f, g]
