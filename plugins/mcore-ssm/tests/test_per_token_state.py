"""Per-token recurrent states for speculative rollback (``block_utils.step_tokens``): a cached step of at most
``PER_TOKEN_MAX_TOKENS`` tokens per sequence sets the state after every token, so the engine's reference cache
(``mcore_testing.reference_kv``) can roll back inside the step; rollback then re-append equals a cache that never
had the rejected tokens. Both blocks (``gdn``, ``mamba2``)."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
import torch

from mcore.errors import UserError
from mcore.protocols.block import BlockContext
from mcore_ssm.block_utils import PER_TOKEN_MAX_TOKENS, per_token_counts, step_tokens
from mcore_ssm.gdn import GatedDeltaNet
from mcore_ssm.mamba2 import Mamba2
from mcore_testing.reference_kv import ReferenceKVCache

HIDDEN = 16
LAYER = 1


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def make(kind: str) -> torch.nn.Module:
    if kind == "gdn":
        config = GatedDeltaNet.Config(num_qk_heads=2, num_v_heads=4, head_k_dim=4, head_v_dim=3)
        gdn = GatedDeltaNet(config, hidden_size=HIDDEN)
        gdn.reset_parameters(torch.Generator().manual_seed(0))
        return gdn
    mamba = Mamba2(Mamba2.Config(d_state=8, headdim=4, ngroups=2, chunk_size=4), hidden_size=HIDDEN)
    mamba.reset_parameters(torch.Generator().manual_seed(0))
    with torch.no_grad():  # larger steps than at init: the state matters over a few tokens
        mamba.dt_proj.bias.add_(2.0)
    return mamba


class Driver:
    """One block under one ``ReferenceKVCache``: ``run({seq: tokens})`` schedules, runs and returns each output."""

    def __init__(self, block: torch.nn.Module, seqs: dict[int, torch.Tensor]) -> None:
        self.block, self.seqs = block, seqs
        self.cache = ReferenceKVCache({LAYER: block.cache_spec()}, max_seqs=4)  # type: ignore[operator]
        self.done = dict.fromkeys(seqs, 0)

    def run(self, plan: dict[int, int]) -> dict[int, torch.Tensor]:
        ids, counts = list(plan), list(plan.values())
        self.cache.schedule(ids, counts)
        step = torch.cat([self.seqs[s][:, self.done[s] : self.done[s] + n] for s, n in plan.items()], dim=1)
        cu = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32)
        ctx = BlockContext(cu_seqlens=cu, max_seqlen=max(counts), kv_cache=self.cache, layer_index=LAYER)
        with torch.no_grad():
            out = self.block(step, ctx)  # (1, N, H)
        result = {}
        for (s, n), lo in zip(plan.items(), cu[:-1].tolist(), strict=True):
            result[s] = out[0, lo : lo + n]
            self.done[s] += n
        return result

    def rollback(self, seq: int, k: int) -> None:
        self.cache.rollback(seq, k)
        self.done[seq] -= k

    def states(self, plan: dict[int, int]) -> dict[str, torch.Tensor]:
        """The states the next step ``plan`` starts from (schedules it)."""
        self.cache.schedule(list(plan), list(plan.values()))
        return self.cache.recurrent_state(LAYER)


@pytest.mark.parametrize("kind", ["gdn", "mamba2"])
def test_rollback_inside_a_verify_step_then_reappend_equals_never_having_the_tokens(kind: str) -> None:
    block = make(kind)
    gen = torch.Generator().manual_seed(3)
    # sequence 10: a 12-token prefill (chunked), 5 tokens verified, 2 kept; sequence 11: all 3 rejected
    accepted = {
        10: torch.randn(1, 12 + 2 + 4 + 1, HIDDEN, generator=gen),
        11: torch.randn(1, 5 + 3 + 1, HIDDEN, generator=gen),
    }
    drafts = {10: torch.randn(1, 3, HIDDEN, generator=gen), 11: torch.randn(1, 3, HIDDEN, generator=gen)}
    verified = {  # the tokens the verify step brings: the prefill, then kept and rejected drafts
        10: torch.cat([accepted[10][:, :14], drafts[10]], dim=1),
        11: torch.cat([accepted[11][:, :5], drafts[11]], dim=1),
    }
    speculative, plain = Driver(block, verified), Driver(block, accepted)
    speculative.run({10: 12, 11: 5})
    plain.run({10: 12, 11: 5})
    verify = speculative.run({10: 5, 11: 3})  # at most PER_TOKEN_MAX_TOKENS each: per-token states
    speculative.rollback(10, 3)
    speculative.rollback(11, 3)
    speculative.seqs = accepted  # from here on the accepted tokens
    kept = plain.run({10: 2})
    assert rel(verify[10][:2], kept[10]) < 1e-5
    for plan in ({10: 4, 11: 3}, {11: 1, 10: 1}):  # re-append, then a decode step: the same states and outputs
        before_spec, before_plain = speculative.states(plan), plain.states(plan)
        for name, value in before_plain.items():
            assert rel(before_spec[name], value) < 1e-5, name
        got, want = speculative.run(plan), plain.run(plan)
        for seq in plan:
            assert rel(got[seq], want[seq]) < 1e-5


@pytest.mark.parametrize("kind", ["gdn", "mamba2"])
def test_long_step_sets_only_the_final_state(kind: str) -> None:
    """Above ``PER_TOKEN_MAX_TOKENS`` tokens a step runs the chunked form: a rollback inside it is refused by the
    cache (one to the step's start is fine)."""
    block = make(kind)
    tokens = PER_TOKEN_MAX_TOKENS + 1
    seqs = {7: torch.randn(1, tokens + 1, HIDDEN, generator=torch.Generator().manual_seed(4))}
    driver = Driver(block, seqs)
    driver.run({7: tokens})
    with pytest.raises(UserError, match="per_token"):
        driver.rollback(7, 1)
    driver.rollback(7, tokens)
    assert driver.done[7] == 0


def test_step_tokens_runs_ragged_sequences_in_order() -> None:
    """``step_tokens`` on a toy cumulative-sum step: every token's output and state is its running sum."""

    def step(x: torch.Tensor, state: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        total = state["sum"] + x
        return total * 2, {"sum": total}

    counts = [3, 1, 2]
    tokens = torch.arange(1.0, 7.0)[:, None]  # (6, 1)
    start = torch.tensor([[10.0], [20.0], [30.0]])
    out, after = step_tokens(step, tokens, counts, {"sum": start})
    want = torch.tensor([[11.0], [13.0], [16.0], [24.0], [35.0], [41.0]])
    assert torch.equal(after["sum"], want) and torch.equal(out, want * 2)
    with pytest.raises(ValueError, match="counts"):
        step_tokens(step, tokens, [3, 3], {"sum": start})


def test_per_token_counts_decides_by_the_longest_sequence() -> None:
    cu = torch.tensor([0, 3, 4, 6], dtype=torch.int32)
    assert per_token_counts(1, 6, cu, None) == [3, 1, 2] == per_token_counts(1, 6, cu, 3)
    assert per_token_counts(1, 3, torch.tensor([0, 1, 2, 3]), 1) == [1, 1, 1]  # decode: no device read
    assert per_token_counts(2, 4, None, None) == [4, 4]
    long = PER_TOKEN_MAX_TOKENS + 1
    assert per_token_counts(1, long + 1, torch.tensor([0, 1, long + 1]), None) is None
    assert per_token_counts(1, long + 1, cu, long) is None  # max_seqlen decides without reading cu_seqlens
    assert per_token_counts(2, long, None, None) is None
