"""A moe block whose tokens the tp ranks split (``MoE.split_tokens_over``, as the ``ep`` layout sets it under
``tp``): on 2 gloo ranks, each routing its half of the same micro-batch, the auxiliary losses are the mean of
the ranks' (the same value on both), the router's and experts' gradients summed over the ranks equal one
process routing the halves one by one (capacity per half), the expert bias moves by the whole load and the
step metrics count every token. Also: ``[parallel.ep] borrow`` and its refusals, in one line."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from mcore.protocols import AuxLosses, BlockContext
from mcore_moe.block import MoE, MoEConfig
from mcore_moe.ep import EPLayout
from mcore_testing.dist import run_distributed
from mcore_testing.numerics import assert_rel_close, seeded_generator, seeded_randn

H, E, T = 8, 4, 12


def _block() -> MoE:
    config = MoEConfig(
        num_experts=E,
        top_k=2,
        moe_ffn_hidden_size=12,
        num_shared_experts=1,
        score_function="sigmoid",
        expert_bias=True,
        bias_update_rate=0.01,
        aux_loss_coeff=0.01,
        seq_aux_loss_coeff=0.02,
        z_loss_coeff=0.001,
        capacity_factor=1.0,
    )
    block = MoE(config, hidden_size=H)
    block.reset_parameters(seeded_generator(0))
    return block


def _call(block: MoE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The block's output and the sum of its auxiliary losses."""
    ctx = BlockContext(aux_losses=AuxLosses())
    out = block(x, ctx)
    assert ctx.aux_losses is not None and len(ctx.aux_losses) == 3
    return out, torch.stack(list(ctx.aux_losses.values())).sum()


def _check() -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    x, g = seeded_randn(2, T, H, seed=1), seeded_randn(2, T, H, seed=2)  # the same micro-batch on every rank
    xs, gs = x.chunk(world, dim=1), g.chunk(world, dim=1)  # (2, T / world, H) each rank's tokens

    ref = _block()
    outs, auxes = zip(*(_call(ref, part) for part in xs), strict=True)
    ref_aux = torch.stack(list(auxes)).mean()
    (sum((o * p).sum() for o, p in zip(outs, gs, strict=True)) + ref_aux).backward()

    block = _block()
    block.split_tokens_over(dist.group.WORLD)
    out, aux = _call(block, xs[rank])
    assert_rel_close(out, outs[rank], 1e-6, name="output")
    assert_rel_close(aux, ref_aux, 1e-6, name="aux losses: the ranks' mean")
    ((out * gs[rank]).sum() + aux).backward()
    for name, param in block.named_parameters():
        grad = param.grad.clone()
        if not name.startswith("shared_experts"):  # the shared expert is whole here: no tp split in this test
            dist.all_reduce(grad)
            assert_rel_close(grad, ref.get_parameter(name).grad, 1e-5, name=f"{name} grad summed")

    for router in (ref.router, block.router):  # the block's load: its half, summed over the ranks
        router.after_optimizer_step(lambda t: t, applied=True)
    assert_rel_close(block.router.expert_bias, ref.router.expert_bias, 1e-6, name="expert bias")
    assert block.router.expert_bias.abs().sum() > 0
    for module in (ref, block):
        module.after_optimizer_step(lambda t: t, applied=True)
    want, got = ref.step_metrics(lambda t: t), block.step_metrics(lambda t: t)
    assert want.keys() == got.keys()
    for key, value in want.items():  # aux: the ref's mean over its two calls, the block's over the ranks'
        assert abs(got[key] - value) <= 1e-5 * max(1.0, abs(value)), (key, got[key], value)


def test_two_ranks_splitting_tokens_equal_one_process_routing_the_halves() -> None:
    run_distributed(_check, 2, timeout=120)


def test_borrow_config_and_refusals() -> None:
    assert EPLayout(EPLayout.Config(borrow=["tp"])).borrowed_dims == ("tp",)  # type: ignore[arg-type]
    assert EPLayout.Config(borrow="").borrow == ()  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^parallel.ep.borrow = \['dp_shard'\]; allowed: \[\] or \['tp'\]$"):
        EPLayout.Config(borrow=("dp_shard",))
    moe = {"num_experts": 6}
    run = SimpleNamespace(
        parallel=SimpleNamespace(sizes={"ep": 2, "tp": 2}),
        model=SimpleNamespace(config=SimpleNamespace(blocks={"moe": moe})),
    )
    EPLayout.check_run(EPLayout.Config(), run)  # 6 experts over ep = 2
    with pytest.raises(ValueError, match=r"^model.moe num_experts = 6 is not divisible by parallel.sizes.ep x "):
        EPLayout.check_run(EPLayout.Config(borrow=("tp",)), run)
