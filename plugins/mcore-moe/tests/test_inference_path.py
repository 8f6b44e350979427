"""The ``moe`` block's inference path (``mcore_moe.inference``), on the CPU in fp32.

Under an inference cache the block's forward equals the training path's (dropless) for random routing with
experts that get no token, with ``torch._grouped_mm`` and with the static reference GEMMs; it never drops a
token whatever the capacity factor and records no aux loss or load. "No host sync, static shapes" is checked
by dynamo: the inference forward compiles with ``fullgraph=True, dynamic=False`` (a ``.item()``, ``.tolist()``,
``nonzero`` or data-dependent shape would break the graph and fail), while the training path does not.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from typing import Any

import pytest
import torch

from mcore.precision.grouped import grouped_linear_reference
from mcore.protocols import AuxLosses, BlockContext
from mcore_moe import inference
from mcore_moe.block import MoE, MoEConfig
from mcore_moe.router import TopKRouter, expert_counts
from mcore_testing.numerics import assert_rel_close, seeded_generator, seeded_randn

H = 16

CONFIGS: dict[str, dict[str, Any]] = {
    "softmax-shared-gate": {"num_shared_experts": 1, "shared_expert_gate": True, "aux_loss_coeff": 0.01},
    "sigmoid-bias-groups": {"score_function": "sigmoid", "expert_bias": True, "num_groups": 4, "topk_groups": 2},
    "mixtral-allgatherv": {"softmax_after_topk": True, "dispatcher": "allgatherv", "z_loss_coeff": 1e-3},
    "hash": {"router": "hash", "hash_vocab_size": 32},
}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _topk(block: MoE) -> TopKRouter:
    assert isinstance(block.router, TopKRouter)
    return block.router


def _block(**kw: Any) -> MoE:
    config = MoEConfig(**({"num_experts": 8, "top_k": 2, "moe_ffn_hidden_size": 16} | kw))
    block = MoE(config, hidden_size=H)
    block.reset_parameters(seeded_generator(0))
    if config.expert_bias:  # a bias that changes the choice
        _topk(block).expert_bias.copy_(seeded_randn(8, seed=5))
    return block.eval()


def _inputs(tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    hidden = seeded_randn(1, tokens, H, seed=1)  # (1, N, H)
    ids = torch.randint(0, 32, (1, tokens), generator=seeded_generator(2))
    return hidden, ids


def _zero_token_experts(block: MoE, hidden: torch.Tensor, ids: torch.Tensor) -> int:
    routing = block.router.route(hidden.reshape(-1, H), ids.reshape(-1), inference=True)
    return int((expert_counts(routing.experts, 8) == 0).sum())


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("grouped_mm", [True, False])
@torch.no_grad()
def test_inference_forward_equals_the_training_path(
    name: str, grouped_mm: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not grouped_mm:
        monkeypatch.setattr(inference, "grouped_mm_fits", lambda x, w: False)
    elif not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no torch._grouped_mm")
    block = _block(**CONFIGS[name])
    assert inference.grouped_mm_fits(seeded_randn(2, H, seed=0), block.experts.gate) == grouped_mm
    for tokens in (3, 11):  # 3 tokens x 2 choices: at least 2 of the 8 experts get no token
        hidden, ids = _inputs(tokens)
        want = block(hidden, BlockContext(token_ids=ids, aux_losses=AuxLosses()))
        losses = AuxLosses()
        got = block(hidden, BlockContext(token_ids=ids, kv_cache=object(), aux_losses=losses))  # type: ignore[arg-type]
        assert_rel_close(got, want, 1e-5, name=f"{name}, {tokens} tokens")
        assert len(losses) == 0, "the inference path added aux losses"
    assert _zero_token_experts(block, *_inputs(3)) >= 2


@torch.no_grad()
def test_inference_is_dropless_and_counts_nothing() -> None:
    capped = _block(capacity_factor=0.25, expert_bias=True, aux_loss_coeff=0.01).train()
    dropless = _block(expert_bias=True)
    dropless.load_state_dict(capped.state_dict())
    hidden, ids = _inputs(12)
    got = capped(hidden, BlockContext(token_ids=ids, kv_cache=object()))  # type: ignore[arg-type]
    want = dropless(hidden, BlockContext(token_ids=ids))
    assert_rel_close(got, want, 1e-5, name="capacity 0.25 served dropless")
    dropped = capped(hidden, BlockContext(token_ids=ids, aux_losses=AuxLosses()))
    assert (dropped - want).norm() > 0.1 * want.norm(), "capacity 0.25 drops nothing here: the check proves nothing"
    router = _topk(capped)
    bias, load = router.expert_bias.clone(), router.step_load.clone()
    counts = capped._counts
    capped(hidden, BlockContext(token_ids=ids, kv_cache=object()))  # type: ignore[arg-type]
    assert torch.equal(router.step_load, load) and torch.equal(router.expert_bias, bias)
    assert capped._counts is counts


@pytest.mark.parametrize("grouped_mm", [True, False])
def test_static_grouped_linear_matches_the_reference_on_the_real_rows(grouped_mm: bool) -> None:
    if grouped_mm and not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no torch._grouped_mm")
    gen = seeded_generator(3)
    x, w = torch.randn(20, 16, generator=gen), torch.randn(5, 8, 16, generator=gen)
    sizes = torch.tensor([4, 0, 7, 0, 3])  # two empty experts, 6 padding rows
    if grouped_mm:
        assert inference.grouped_mm_fits(x, w)
    got = inference.static_grouped_linear(x, w, sizes, grouped_mm=grouped_mm)
    want = grouped_linear_reference(x.double(), w.double(), sizes)
    assert got.shape == (20, 8)
    assert_rel_close(got[:14], want[:14], 1e-5)


@pytest.mark.parametrize("name", ["softmax-shared-gate", "hash"])
def test_inference_forward_compiles_whole_with_static_shapes(name: str) -> None:
    """fp32: the static reference GEMMs, equal to the training path; bf16: ``torch._grouped_mm`` (dynamo traces
    it in bf16 only), equal to the same forward run eagerly."""
    hidden, ids = _inputs(5)
    ctx = BlockContext(token_ids=ids, kv_cache=object())  # type: ignore[arg-type]
    for dtype in (torch.float32, torch.bfloat16):
        block = _block(**CONFIGS[name]).to(dtype)
        x = hidden.to(dtype)
        assert dtype == torch.float32 or inference.grouped_mm_fits(x[0], block.experts.gate)
        torch._dynamo.reset()
        compiled = torch.compile(partial(block, ctx=ctx), fullgraph=True, dynamic=False, backend="aot_eager")
        with torch.no_grad():
            got = compiled(x)
            train = BlockContext(token_ids=ids, aux_losses=AuxLosses())
            want = block(x, train) if dtype == torch.float32 else block(x, ctx)
        assert got.dtype == dtype
        assert_rel_close(got.float(), want.float(), 1e-5, name=f"compiled inference forward, {dtype}")


def test_the_training_path_does_not_compile_whole() -> None:
    """The check above can fail: the training path (``nonzero``, host-side group sizes) breaks the graph."""
    block = _block()
    hidden, _ = _inputs(5)
    torch._dynamo.reset()
    compiled = torch.compile(lambda h: block(h, BlockContext()), fullgraph=True, dynamic=False, backend="eager")
    with torch.no_grad(), pytest.raises(Exception, match="(?i)graph break|data.dependent|item|tolist|nonzero"):
        compiled(hidden)
