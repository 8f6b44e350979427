"""Static protocol conformance of mcore-fsdp's layouts (mypy in ``nox -s lint``)."""

from mcore.protocols import ParallelLayout
from mcore_fsdp.layout import FSDPLayout, HSDPLayout


def layouts(f: FSDPLayout, h: HSDPLayout) -> list[ParallelLayout]:
    return [f, h]
