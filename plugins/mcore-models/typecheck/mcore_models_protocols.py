"""Static protocol conformance of mcore-models' registered classes (mypy in ``nox -s lint``)."""

from mcore.protocols import ModelBlock, ModelFactory
from mcore_models.blocks.attention import Attention
from mcore_models.blocks.mla import MLA
from mcore_models.blocks.mlp import ClampedSwiGLU, GeluMLP, SwiGLU
from mcore_models.blocks.mtp import MTP
from mcore_models.blocks.norms import LayerNorm, RMSNorm
from mcore_models.gpt import GPT


def model_factory(factory: type[GPT]) -> ModelFactory:
    return factory


def blocks(
    a: Attention, m: MLA, s: SwiGLU, g: GeluMLP, c: ClampedSwiGLU, t: MTP, ln: LayerNorm, rn: RMSNorm
) -> list[ModelBlock]:
    return [a, m, s, g, c, t, ln, rn]
