"""Layout ``ep`` on a gpt with moe layers: ``ep`` gloo ranks, each training its own micro-batches (two, the
first under ``no_grad_sync``), equal one process training all of them over 3 AdamW steps (fp32, rel 1e-5):
the loss, every gradient (dense ones averaged, expert shards against the reference's rows), the global
gradient norm, and the routers' aux-loss-free bias (the load summed over the ranks). Capacity is per rank
and per micro-batch, so the reference runs the same micro-batches one by one. Fast: ep2 with both
dispatchers, dropless and with capacity, the model built whole or on the meta device; the refusals are one
line. Slow: ep4 (with allgatherv too) and ep2 x fsdp2 (fsdp borrowing ep, or sharding over dp_shard only)."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from mcore.construct import init_params
from mcore.mesh import ParallelMesh
from mcore.train.grads import global_grad_norm
from mcore.train.step_hooks import after_optimizer_step, post_step_modules
from mcore_fsdp.layout import FSDPLayout
from mcore_models.gpt import GPT, GPTConfig
from mcore_moe.ep import EPLayout
from mcore_moe.ep_experts import ShardedGroupedSwiGLU
from mcore_testing.dist import run_distributed
from mcore_testing.hosts import isolated_host
from mcore_testing.numerics import assert_rel_close, seeded_tokens

VOCAB, STEPS, MICRO = 64, 3, 2  # micro-batches per rank per step


def model_config(*, experts: int = 4, capacity: float | None = None) -> GPTConfig:
    moe = {
        "num_experts": experts,
        "top_k": 2,
        "moe_ffn_hidden_size": 16,
        "num_shared_experts": 1,
        "score_function": "sigmoid",
        "expert_bias": True,
        "bias_update_rate": 0.01,
        "aux_loss_coeff": 0.01,
        "capacity_factor": capacity,
    }
    return GPTConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_layers=2,
        layers=["attention/swiglu", "attention/moe"],
        max_position_embeddings=64,
        blocks={"attention": {"num_heads": 4, "num_kv_heads": 2}, "swiglu": {"ffn_hidden_size": 48}, "moe": moe},
    )


def _lookup(name: str) -> Any:
    """Blocks by name from a host of mcore-models and this plugin (as the core's run does)."""
    return isolated_host("mcore_models.plugin", "mcore_moe.plugin").load("block", name)


def _batches(step: int, world: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The step's ``world * MICRO`` micro-batches ``(2, 8)``; rank r trains ``r * MICRO ..``."""
    out = []
    for j in range(world * MICRO):
        tokens = seeded_tokens((2, 9), vocab_size=VOCAB, seed=100 * step + j)
        out.append((tokens[:, :-1], tokens[:, 1:]))
    return out


def _train(
    model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], layouts: list[Any]
) -> torch.Tensor:
    """Forward/backward of ``batches`` (mean loss), all but the last under every layout's ``no_grad_sync``;
    then ``finish_grad_sync`` in reverse layout order (as the run loop does)."""
    total = torch.zeros(())
    for i, (tokens, labels) in enumerate(batches):
        with contextlib.ExitStack() as defer:
            if i < len(batches) - 1:
                for layout in layouts:
                    defer.enter_context(layout.no_grad_sync())
            loss = model(tokens, labels=labels) / len(batches)
            loss.backward()
        total += loss.detach()
    for layout in reversed(layouts):
        layout.finish_grad_sync()
    return total


def _layouts(dispatcher: str, fsdp: str) -> list[Any]:
    layouts: list[Any] = [EPLayout(EPLayout.Config(dispatcher=dispatcher))]
    if fsdp:  # "plain": every parameter over dp_shard; "borrow": dense over dp_shard x ep, experts over dp_shard
        layouts.append(FSDPLayout(FSDPLayout.Config(borrow=("ep",) if fsdp == "borrow" else ())))
    return layouts


def _case(dispatcher: str, capacity: float | None, on_meta: bool, fsdp: str, mesh: ParallelMesh) -> None:
    rank, world, ep = dist.get_rank(), dist.get_world_size(), mesh.size("ep")
    config = model_config(capacity=capacity)
    ref = GPT.build(config, seed=0, block_lookup=_lookup)
    layouts = _layouts(dispatcher, fsdp)
    model = GPT.build(config, seed=0, device="meta" if on_meta else "cpu", block_lookup=_lookup)
    for layout in layouts:
        model = layout.apply(model, mesh)
    if on_meta:
        init_params(model, seed=0, device="cpu")
    moe = model.layers[1].mlp
    assert isinstance(moe.experts, ShardedGroupedSwiGLU) and moe.dispatcher.group is not None
    gate = moe.experts.gate
    assert isinstance(gate, DTensor) and "ep" in gate.device_mesh.mesh_dim_names
    if not fsdp:
        assert gate.to_local().shape[0] == 4 // ep
    else:  # experts over (dp_shard, ep); dense parameters over dp_shard x ep (borrowing) or dp_shard
        assert gate.device_mesh.mesh_dim_names == ("dp_shard", "ep")
        dense = model.embed.weight.device_mesh.mesh_dim_names
        assert dense == (("dp_shard_ep",) if fsdp == "borrow" else ("dp_shard",)), dense
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3, foreach=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
    ref_hooks, hooks = post_step_modules(ref), post_step_modules(model)

    def reduce(t: torch.Tensor) -> torch.Tensor:  # the load over every rank: they all read different batches
        dist.all_reduce(t)
        return t

    name = f"{dispatcher}, capacity {capacity}, meta {on_meta}, fsdp {fsdp or 'no'}"
    for step in range(STEPS):
        batches = _batches(step, world)
        ref_loss = _train(ref, batches, [])
        loss = _train(model, batches[rank * MICRO : (rank + 1) * MICRO], layouts)
        dist.all_reduce(loss)
        assert_rel_close(loss / world, ref_loss, 1e-5, name=f"{name}: step {step} loss")
        named = dict(model.named_parameters())
        for pname, p in ref.named_parameters():
            assert_rel_close(named[pname].grad, p.grad, 1e-5, name=f"{name}: step {step} grad {pname}")  # full
        norm = global_grad_norm(list(model.named_parameters()), mesh, layouts)
        assert_rel_close(norm, global_grad_norm(list(ref.named_parameters())), 1e-5, name=f"{name}: grad norm")
        for optimizer, hook_list, red in ((ref_opt, ref_hooks, lambda t: t), (opt, hooks, reduce)):
            optimizer.step()
            optimizer.zero_grad()
            after_optimizer_step(hook_list, red, applied=True)
        bias = moe.router.expert_bias
        assert_rel_close(bias, ref.layers[1].mlp.router.expert_bias, 1e-6, name=f"{name}: expert bias")
    assert bias.abs().sum() > 0


def _all_cases(sizes: dict[str, int], cases: list[tuple[str, float | None, bool, str]]) -> None:
    names, shape = tuple(sizes), tuple(sizes.values())
    mesh = ParallelMesh(names, shape, "cpu", init_device_mesh("cpu", shape, mesh_dim_names=names))
    for case in cases:
        _case(*case, mesh=mesh)


#: (dispatcher, capacity factor, built on meta, fsdp): both dispatchers, dropless and with capacity
CASES = [
    ("alltoall", None, True, ""),
    ("allgather", None, False, ""),
    ("alltoall", 0.75, False, ""),
    ("allgather", 0.75, True, ""),
]
FSDP_CASES = [("alltoall", None, True, "borrow"), ("allgather", 0.75, False, "plain")]
#: the slow cross product adds allgatherv (fixed micro-batch shapes: every rank has the same token count)
SLOW_CASES = [*CASES, ("allgatherv", None, False, ""), ("allgatherv", 0.75, True, "")]


def test_ep2_equals_one_process_both_dispatchers_dropless_and_capacity() -> None:
    run_distributed(_all_cases, 2, {"ep": 2}, CASES, timeout=300)


@pytest.mark.slow
def test_ep4_equals_one_process() -> None:
    run_distributed(_all_cases, 4, {"ep": 4}, SLOW_CASES, timeout=600)


@pytest.mark.slow
def test_ep2_x_fsdp2_equals_one_process() -> None:
    """fsdp borrowing ep (dense over dp_shard x ep, experts over dp_shard) and sharding over dp_shard only."""
    run_distributed(_all_cases, 4, {"dp_shard": 2, "ep": 2}, FSDP_CASES, timeout=600)


def test_refusals_are_one_line() -> None:
    mesh2 = ParallelMesh(("ep",), (2,), "cpu", None)
    with pytest.raises(ValueError, match=r"num_experts = 3 is not divisible by parallel.sizes.ep = 2; allowed: ep in"):
        EPLayout().apply(GPT.build(model_config(experts=3), seed=0, device="meta", block_lookup=_lookup), mesh2)
    dense = GPTConfig(vocab_size=VOCAB, hidden_size=32, num_layers=1, blocks={"attention": {"num_heads": 4}})
    with pytest.raises(ValueError, match=r"has no moe block to split"):
        EPLayout().apply(GPT.build(dense, seed=0, device="meta"), mesh2)
    with pytest.raises(ValueError, match=r"parallel.ep.dispatcher = 'ring'; allowed: 'allgather', 'alltoall'"):
        EPLayout.Config(dispatcher="ring")
    one = ParallelMesh(("dp_shard",), (1,), "cpu", None)
    sharded = FSDPLayout().apply(GPT.build(model_config(), seed=0, device="meta", block_lookup=_lookup), one)
    with pytest.raises(ValueError, match=r"ep: the experts' 'gate' is already sharded by a layout listed before 'ep'"):
        EPLayout().apply(sharded, mesh2)
