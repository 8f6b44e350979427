"""Attention's q/k/v and the MLPs' gate/up shard by rows (``Shard(0)``) into a working tensor-parallel block.

A tensor-parallel plan cuts each column-parallel projection (q, k, v, gate, up) into contiguous
row blocks, one per rank (``Shard(0)``: ``torch.chunk`` of dim 0), and each row-parallel one
(out, down) into the matching column blocks; every rank runs the unchanged block on its shard
and the partial outputs of out/down are summed (the all-reduce), the bias added once. Here that
is done by hand on one process and compared with the unsharded block, forward and backward.

The fused layouts this replaces failed it: ``qkv`` rows ``[all Q | K | V]`` cut in two gave
rank 0 every query head and no K/V, and ``[gate | up]`` gave rank 0 all of gate and no up.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mcore.params import collect_param_specs
from mcore.protocols.block import BlockContext
from mcore_models.blocks.attention import Attention
from mcore_models.blocks.mlp import ClampedSwiGLU, GeluMLP, SwiGLU
from mcore_testing.numerics import assert_rel_close, seeded_randn

HIDDEN = 32
COLUMN_PARALLEL = ("q", "k", "v", "gate", "up")  # output features split: weight rows and bias, Shard(0)
ROW_PARALLEL = ("out", "down")  # input features split: weight columns, Shard(1); the bias added once


def rank_shard(block: nn.Module, rank: int, tp: int) -> nn.Module:
    """What rank ``rank`` of ``tp`` holds: ``block`` with its projections' local shards, config untouched."""
    shard = copy.deepcopy(block)
    for name, module in shard.named_children():
        if name in COLUMN_PARALLEL:
            module.weight = nn.Parameter(module.weight.detach().chunk(tp, dim=0)[rank].clone())
            if module.bias is not None:
                module.bias = nn.Parameter(module.bias.detach().chunk(tp, dim=0)[rank].clone())
        elif name in ROW_PARALLEL:
            module.weight = nn.Parameter(module.weight.detach().chunk(tp, dim=1)[rank].clone())
            if module.bias is not None and rank > 0:
                module.bias = None
    return shard


def expected_grad(full: torch.Tensor, name: str, rank: int, tp: int) -> torch.Tensor | None:
    """Rank ``rank``'s part of the unsharded gradient ``full`` of parameter ``name`` (None: replicated)."""
    module = name.split(".")[0]
    if module in COLUMN_PARALLEL:
        return full.chunk(tp, dim=0)[rank]
    if module in ROW_PARALLEL:
        return full.chunk(tp, dim=1)[rank] if name.endswith("weight") else full
    return None


def check_tensor_parallel(block: nn.Module, tp: int, ctx: BlockContext | None) -> None:
    """``tp`` shards of ``block``, each run alone, sum to its output; their gradients are its gradients' parts."""
    x = seeded_randn(2, 11, HIDDEN, seed=1)
    weights = seeded_randn(2, 11, HIDDEN, seed=2)  # a loss that weighs every output element differently
    full = block(x, ctx)
    (full * weights).sum().backward()
    shards = [rank_shard(block, rank, tp) for rank in range(tp)]
    summed = torch.stack([shard(x, ctx) for shard in shards]).sum(0)  # the all-reduce of out/down's partial outputs
    assert_rel_close(summed, full, tol=1e-5, name="tensor-parallel output")
    (summed * weights).sum().backward()
    replicated: dict[str, torch.Tensor] = {}
    for rank, shard in enumerate(shards):
        for name, p in shard.named_parameters():
            part = expected_grad(dict(block.named_parameters())[name].grad, name, rank, tp)
            if part is None:  # a replicated parameter (QK-norm): the ranks' gradients add up (their all-reduce)
                replicated[name] = replicated.get(name, 0) + p.grad
            else:
                assert_rel_close(p.grad, part, tol=1e-5, name=f"rank {rank}: {name}.grad")
    for name, grad in replicated.items():
        assert_rel_close(grad, dict(block.named_parameters())[name].grad, tol=1e-5, name=f"{name}.grad")


@pytest.mark.parametrize(
    ("num_heads", "num_kv_heads", "tp"),
    [(4, 2, 2), (4, 4, 2), (8, 2, 2), (8, 4, 4)],
    ids=["gqa-kv2-tp2", "mha-tp2", "gqa-kv2-group4-tp2", "gqa-kv4-tp4"],
)
def test_attention_q_k_v_shard_by_rows(num_heads: int, num_kv_heads: int, tp: int) -> None:
    """Each rank holds whole query heads and the whole KV heads they read (num_kv_heads divisible by tp)."""
    cfg = Attention.Config(
        num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=8, qkv_bias=True, out_bias=True, qk_norm=True,
        sliding_window=6, rotary_fraction=0.5,
    )  # fmt: skip
    block = Attention(cfg, hidden_size=HIDDEN)
    with torch.no_grad():  # non-trivial norms and biases, so their sharding is checked too
        for name, p in block.named_parameters():
            if p.ndim == 1:
                p.add_(seeded_randn(*p.shape, seed=len(name)) * 0.1)
    ctx = BlockContext(cu_seqlens=torch.tensor([0, 7, 15, 22], dtype=torch.int32), max_seqlen=8)
    check_tensor_parallel(block, tp, ctx)


@pytest.mark.parametrize("mlp", [SwiGLU, ClampedSwiGLU, GeluMLP])
@pytest.mark.parametrize("tp", [2, 4])
def test_mlp_gate_and_up_shard_by_rows(mlp: type, tp: int) -> None:
    """Each rank holds matching gate and up rows (its FFN columns) and the same columns of down."""
    config = mlp.Config(ffn_hidden_size=48, mlp_bias=True)
    if mlp is ClampedSwiGLU:
        config = mlp.Config(ffn_hidden_size=48, mlp_bias=True, clamp_limit=0.05)  # the clamps bite
    check_tensor_parallel(mlp(config, hidden_size=HIDDEN), tp, None)


def layouts(module: nn.Module) -> dict[str, tuple[str, tuple[tuple[str, int], ...], int | None]]:
    """Each parameter's declared ``(role, splits, head_rows)`` (how it may be cut; its init is not our business)."""
    return {name: (spec.role, spec.splits, spec.head_rows) for name, spec in collect_param_specs(module).items()}


def test_declarations_say_where_tensor_parallelism_may_cut() -> None:
    """q/k/v (weights and biases) declare their heads; gate/up/out/down are plain matrices; nothing is fused."""
    attention = Attention(Attention.Config(num_heads=4, num_kv_heads=2, head_dim=8, qkv_bias=True), hidden_size=32)
    heads = {
        f"{n}.{kind}": ("matrix" if kind == "weight" else "bias", (), 8) for n in "qkv" for kind in ("weight", "bias")
    }
    assert layouts(attention) == {**heads, "out.weight": ("matrix", (), None)}
    mlp = SwiGLU(SwiGLU.Config(ffn_hidden_size=48), hidden_size=32)
    assert layouts(mlp) == {f"{n}.weight": ("matrix", (), None) for n in ("gate", "up", "down")}
