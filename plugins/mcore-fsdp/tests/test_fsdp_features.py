"""Features beyond plain sharding, on 2 gloo ranks: mixed precision, activation recompute,
torch.compile of blocks, quantized all-gather through a precision recipe, the gradient
divisor, prefetch and overlap, and the FSDP2 ``unshard``/``reshard`` API.
"""

from __future__ import annotations

import copy
import functools

import torch
import torch.distributed as dist
from helpers import UNEVEN, RowInt8Recipe, batches, dequantized, local_rows, reference_trace, shard_model, train
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy as TorchMP
from torch.distributed.fsdp import fully_shard as torch_fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

from mcore_fsdp import FSDPModule, MixedPrecisionPolicy
from mcore_fsdp.runtime import require_state
from mcore_fsdp.unit import State
from mcore_testing import distributed
from mcore_testing.numerics import assert_rel_close
from mcore_testing.reference import TinyTransformer


def _recompute(block: torch.nn.Module) -> None:
    """Wrap a block's forward in non-reentrant checkpointing, as mcore's ``train.recompute`` does."""
    inner = block.forward

    @functools.wraps(inner)
    def forward(*args, **kwargs):
        return checkpoint(inner, *args, use_reentrant=False, **kwargs)

    block.forward = forward


def _fresh() -> TinyTransformer:
    return TinyTransformer(copy.deepcopy(UNEVEN), seed=0)


@distributed(2, timeout=300)
def test_features() -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    ref = reference_trace(steps=2)

    # -- activation recompute and torch.compile of blocks: same numbers as one process --------
    model = _fresh()
    for i, block in enumerate(model.layers):
        if i % 2 == 0:
            _recompute(block)
        else:
            block.compile(backend="aot_eager")
    shard_model(model, mesh)
    trace = train(model, dp_rank=rank, dp_size=world, steps=2)
    for step in range(2):
        assert_rel_close(torch.tensor(trace.losses[step]), torch.tensor(ref.losses[step]), 1e-5, name="loss")
        for name, g in trace.grads[step].items():
            assert_rel_close(g, ref.grads[step][name], 1e-5, name=f"recompute/compile grad {name}")

    # -- mixed precision: bf16 compute, fp32 reduce and fp32 master; matches torch FSDP2 -------
    ours = shard_model(
        _fresh(), mesh, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    )
    theirs = _fresh()
    for block in theirs.layers:
        torch_fully_shard(block, mesh=mesh, mp_policy=TorchMP(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
    torch_fully_shard(theirs, mesh=mesh, mp_policy=TorchMP(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
    seen: list[torch.dtype] = []
    ours.layers[0].mlp.down.register_forward_pre_hook(lambda m, a: seen.append(m.weight.dtype))
    a = train(ours, dp_rank=rank, dp_size=world, steps=2)
    b = train(theirs, dp_rank=rank, dp_size=world, steps=2)
    assert seen and set(seen) == {torch.bfloat16}, seen
    for p in ours.parameters():
        assert p.dtype == torch.float32 and (p.grad is None or p.grad.dtype == torch.float32)
    for step in range(2):
        assert_rel_close(torch.tensor(a.losses[step]), torch.tensor(b.losses[step]), 1e-2, name="bf16 loss vs FSDP2")
        for name, g in a.grads[step].items():
            assert g.dtype == torch.float32
            assert_rel_close(g, b.grads[step][name], 1e-2, name=f"bf16 grad {name} vs FSDP2")

    # -- quantized all-gather: the recipe's payload is gathered and unpacked ----------------------
    recipe = RowInt8Recipe()
    model = shard_model(_fresh(), mesh, gather_recipe=recipe)
    single = dequantized(_fresh())
    tokens, labels = batches()[0]
    single(tokens, labels=labels).backward()
    loss = model(local_rows(tokens, rank, world), labels=local_rows(labels, rank, world))
    loss.backward()
    value = loss.detach().clone()
    dist.all_reduce(value)
    assert_rel_close(value / world, single(tokens, labels=labels).detach(), 1e-5, name="int8-gather loss")
    for (name, p), q in zip(model.named_parameters(), single.parameters()):
        assert_rel_close(p.grad.full_tensor(), q.grad, 1e-5, name=f"int8-gather grad {name}")

    # -- gradient divisor: sum instead of mean ------------------------------------------------------
    model = shard_model(_fresh(), mesh)
    model.set_gradient_divide_factor(1.0)
    loss = model(local_rows(tokens, rank, world), labels=local_rows(labels, rank, world))
    loss.backward()
    for (name, p), grad in zip(model.named_parameters(), ref.grads[0].values()):
        assert_rel_close(p.grad.full_tensor(), grad * world, 1e-5, name=f"summed grad {name}")

    # -- overlap: the next unit is gathered while one computes; reductions stay in flight ------
    model = shard_model(_fresh(), mesh)
    seen_fwd, seen_bwd, in_flight = [], [], []

    def gathered_or_gathering(unit) -> bool:
        return unit._gather is not None or unit.state is State.UNSHARDED

    units = [require_state(block).unit for block in model.layers]
    for i, block in enumerate(model.layers):
        if i + 1 < len(units):
            block.attn.register_forward_pre_hook(lambda m, a, u=units[i + 1]: seen_fwd.append(gathered_or_gathering(u)))
        if i > 0:
            block.attn.register_full_backward_pre_hook(
                lambda m, g, u=units[i - 1]: seen_bwd.append(gathered_or_gathering(u))
            )
        block.attn_norm.register_full_backward_pre_hook(
            lambda m, g: in_flight.append(len(require_state(model).ctx.pending))
        )
    train(model, dp_rank=rank, dp_size=world, steps=2)
    n = len(units) - 1
    assert seen_fwd[n:] == [True] * n, f"forward prefetch of the next unit (step 2): {seen_fwd}"
    assert seen_bwd == [True] * (2 * n), f"backward prefetch of the previous unit: {seen_bwd}"
    assert max(in_flight) >= 1, f"no reduce-scatter was in flight during backward compute: {in_flight}"

    # -- state dicts after a forward without backward (the root stays gathered) ---------------
    with torch.no_grad():
        model(local_rows(tokens, rank, world))
    assert not isinstance(model.lm_head.weight, DTensor)
    state = model.state_dict()
    assert all(isinstance(v, DTensor) for v in state.values()), [
        k for k, v in state.items() if not isinstance(v, DTensor)
    ]
    with torch.no_grad():
        before = model(local_rows(tokens, rank, world))
    saved = {k: v.clone() for k, v in state.items()}  # state's tensors alias the shards
    zeros = {k: torch.zeros_like(v) for k, v in state.items()}
    model.load_state_dict(zeros)
    with torch.no_grad():
        after = model(local_rows(tokens, rank, world))
    assert before.abs().sum() > 0 and after.abs().sum() == 0, "a gathered copy outlived load_state_dict"
    model.load_state_dict(saved)
    assert model.lm_head.weight.full_tensor().abs().sum() > 0

    # -- unshard / reshard ----------------------------------------------------------------------------
    assert isinstance(model, FSDPModule) and type(model).__name__ == "FSDPTinyTransformer"
    expected = model.lm_head.weight.full_tensor()
    model.unshard()
    head = model.lm_head.weight
    assert not isinstance(head, DTensor) and head.shape == (UNEVEN.vocab_size, UNEVEN.hidden_size)
    assert_rel_close(head.detach(), expected, 1e-7, name="unsharded lm_head")
    model.reshard()
    assert isinstance(model.lm_head.weight, DTensor)
    handle = model.layers[0].unshard(async_op=True)
    handle.wait()
    assert not isinstance(model.layers[0].mlp.down.weight, DTensor)
    model.layers[0].reshard()
