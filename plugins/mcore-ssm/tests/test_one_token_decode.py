"""The decode path of both recurrent blocks (``gdn``, ``mamba2``) under a cache: a step where every sequence brings
one token (``ctx.max_seqlen == 1``, as in the inference engine's static-shape steps, padding rows included) is one
``step`` of every row with the final states written once (no per-token loop, no host work): the full forward's
outputs and states, the same as a one-token step under the per-token path, and it traces as one graph."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
import torch

from mcore.protocols.block import BlockContext
from mcore_ssm import block_utils, gdn, mamba2
from mcore_ssm.gdn import GatedDeltaNet
from mcore_ssm.mamba2 import Mamba2
from mcore_testing.numerics import rel_error

HIDDEN = 16
LAYER = 3


def make(kind: str) -> torch.nn.Module:
    if kind == "gdn":
        config = GatedDeltaNet.Config(num_qk_heads=2, num_v_heads=4, head_k_dim=4, head_v_dim=3, chunk_size=4)
        block: torch.nn.Module = GatedDeltaNet(config, hidden_size=HIDDEN)
    else:
        block = Mamba2(Mamba2.Config(d_state=8, headdim=4, ngroups=2, chunk_size=4), hidden_size=HIDDEN)
    block.reset_parameters(torch.Generator().manual_seed(0))  # type: ignore[operator]
    return block.eval()


class SlotCache:
    """A static step's view of a recurrent cache: ``rows`` state rows, read and written as whole tensors; records
    each ``set_recurrent_state`` call."""

    def __init__(self, states: Mapping[str, torch.Tensor]) -> None:
        self.states = {name: t.clone() for name, t in states.items()}
        self.calls: list[tuple[dict[str, tuple[int, ...]], bool]] = []

    @property
    def seq_lens(self) -> torch.Tensor:
        raise AssertionError("a recurrent block needs no lengths")

    def recurrent_state(self, layer_index: int) -> dict[str, torch.Tensor]:
        assert layer_index == LAYER
        return {name: t.clone() for name, t in self.states.items()}

    def set_recurrent_state(
        self, layer_index: int, states: Mapping[str, torch.Tensor], *, per_token: bool = False
    ) -> None:
        assert layer_index == LAYER
        self.calls.append(({n: tuple(t.shape) for n, t in states.items()}, per_token))
        for name, value in states.items():
            self.states[name].copy_(value)


def _prefix_states(block: torch.nn.Module, prefix: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{name: (S, *shape)}`` after each row of ``prefix (S, T, H)``, in the cache's dtypes."""
    if isinstance(block, GatedDeltaNet):
        _, final = block.forward_with_state(prefix, BlockContext(), None)
        assert final is not None
        return final
    assert isinstance(block, Mamba2)
    _, conv, ssm = block.forward_with_state(prefix, BlockContext())
    return {"conv": conv, "ssm": ssm}


@pytest.mark.parametrize("kind", ["gdn", "mamba2"])
def test_a_one_token_step_is_one_update_of_every_row_with_the_final_states(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    block = make(kind)
    rows = 5
    gen = torch.Generator().manual_seed(1)
    prefix = torch.randn(rows, 6, HIDDEN, generator=gen)  # (S, T, H): each row a sequence's tokens so far
    new = torch.randn(rows, 1, HIDDEN, generator=gen)  # (S, 1, H): its next token
    with torch.no_grad():
        full = block(torch.cat([prefix, new], dim=1), BlockContext())[:, -1]  # (S, H): the full forward's last
        cache = SlotCache(_prefix_states(block, prefix))
        want_states = _prefix_states(block, torch.cat([prefix, new], dim=1))
        module = gdn if kind == "gdn" else mamba2

        def forbidden(*args: object, **kwargs: object) -> None:
            raise AssertionError("a one-token step runs no per-token loop")

        monkeypatch.setattr(module, "step_tokens", forbidden)
        monkeypatch.setattr(module, "per_token_counts", forbidden)
        cu = torch.arange(rows + 1, dtype=torch.int32)
        ctx = BlockContext(cu_seqlens=cu, max_seqlen=1, kv_cache=cache, layer_index=LAYER)
        out = block(new.reshape(1, rows, HIDDEN), ctx)  # (1, S, H): packed, one token each
    assert out.shape == (1, rows, HIDDEN) and rel_error(out[0], full) < 1e-5
    assert len(cache.calls) == 1 and cache.calls[0][1] is False  # the final states, once
    for name, value in want_states.items():
        assert cache.calls[0][0][name] == (rows, *value.shape[1:])
        assert torch.isfinite(cache.states[name]).all() and rel_error(cache.states[name], value) < 1e-5, name


@pytest.mark.parametrize("kind", ["gdn", "mamba2"])
def test_the_one_token_step_traces_as_one_graph(kind: str) -> None:
    block = make(kind)
    rows = 4
    cache = SlotCache(_prefix_states(block, torch.randn(rows, 3, HIDDEN, generator=torch.Generator().manual_seed(2))))
    ctx = BlockContext(
        cu_seqlens=torch.arange(rows + 1, dtype=torch.int32), max_seqlen=1, kv_cache=cache, layer_index=LAYER
    )
    torch._dynamo.reset()
    with torch.no_grad():
        explained = torch._dynamo.explain(block)(torch.randn(1, rows, HIDDEN), ctx)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1


def test_one_token_each_reads_the_host_length_only() -> None:
    hidden = torch.zeros(1, 3, HIDDEN)
    assert block_utils.one_token_each(hidden, BlockContext(cu_seqlens=torch.tensor([0, 1, 2, 3]), max_seqlen=1))
    assert not block_utils.one_token_each(hidden, BlockContext(cu_seqlens=torch.tensor([0, 2, 3]), max_seqlen=2))
    assert not block_utils.one_token_each(hidden, BlockContext(cu_seqlens=torch.tensor([0, 2, 3])))  # unknown
    assert block_utils.one_token_each(torch.zeros(3, 1, HIDDEN), BlockContext())  # rows of one token
    assert not block_utils.one_token_each(hidden, BlockContext())
