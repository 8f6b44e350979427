"""Static protocol conformance of mcore-moe's router, dispatchers and block (mypy in ``nox -s lint``)."""

from mcore.protocols import ModelBlock, Router, TokenDispatcher
from mcore.protocols.step import AfterOptimizerStep
from mcore_moe.block import MoE
from mcore_moe.dispatcher import AllGatherDispatcher, AllToAllDispatcher
from mcore_moe.router import TopKRouter


def routers(r: TopKRouter) -> list[Router]:
    return [r]


def post_step(r: TopKRouter) -> list[AfterOptimizerStep]:
    return [r]


def dispatchers(a: AllGatherDispatcher, b: AllToAllDispatcher) -> list[TokenDispatcher]:
    return [a, b]


def blocks(m: MoE) -> list[ModelBlock]:
    return [m]
