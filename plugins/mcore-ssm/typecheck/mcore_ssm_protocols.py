"""Static protocol conformance of mcore-ssm's blocks (mypy in ``nox -s lint``): model blocks that declare their
inference state (``DeclaresCache``) and map to Hugging Face checkpoints (``HFBlockMapping``)."""

from mcore.hf import HFBlockMapping
from mcore.protocols import ModelBlock
from mcore.protocols.block import DeclaresCache
from mcore_ssm.gdn import GatedDeltaNet
from mcore_ssm.mamba2 import Mamba2


def blocks(g: GatedDeltaNet, m: Mamba2) -> list[ModelBlock]:
    return [g, m]


def caches(g: GatedDeltaNet, m: Mamba2) -> list[DeclaresCache]:
    return [g, m]


def hf_mappings() -> list[HFBlockMapping]:
    return [GatedDeltaNet.hf, Mamba2.hf]
