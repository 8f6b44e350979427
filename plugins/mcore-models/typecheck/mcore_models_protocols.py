"""Static protocol conformance of mcore-models' registered classes (mypy in ``nox -s lint``)."""

from mcore.protocols import AttentionBackend, DeclaresCache, LossHead, ModelBlock, ModelFactory, StagedModel
from mcore_models.attention_backends.auto import AutoBackend
from mcore_models.attention_backends.flex import FlexBackend
from mcore_models.attention_backends.paged import PagedBackend
from mcore_models.attention_backends.sdpa import SDPABackend
from mcore_models.blocks.attention import Attention
from mcore_models.blocks.mla import MLA
from mcore_models.blocks.mlp import ClampedSwiGLU, GeluMLP, SwiGLU
from mcore_models.blocks.mtp import MTP
from mcore_models.blocks.norms import LayerNorm, RMSNorm
from mcore_models.gpt import GPT
from mcore_models.loss_head import GPTLossHead


def model_factory(factory: type[GPT]) -> ModelFactory:
    return factory


def blocks(
    a: Attention, m: MLA, s: SwiGLU, g: GeluMLP, c: ClampedSwiGLU, t: MTP, ln: LayerNorm, rn: RMSNorm
) -> list[ModelBlock]:
    return [a, m, s, g, c, t, ln, rn]


def staged(m: GPT) -> StagedModel:
    return m


def loss_head(h: GPTLossHead) -> LossHead:
    return h


def attention_backends(s: SDPABackend, f: FlexBackend, a: AutoBackend, p: PagedBackend) -> list[AttentionBackend]:
    return [s, f, a, p]


def caches(a: Attention, m: MLA) -> list[DeclaresCache]:
    return [a, m]
