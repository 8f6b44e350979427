"""``distributed-adamw`` through the core's ZeRO-1 handshake (``mcore.protocols.sharded_grads``), gloo.

* The handshake's conformance suite with ``distributed-adamw`` and the harness's reference layout
  (``mcore_testing.zero.FlatZeroLayout``: one flat bucket, a parameter split between ranks): trained as the
  run loop does on 2 ranks it equals one process, holds state for its own elements only, and its checkpoint
  resumes on 3 ranks and on one process (there ``distributed-adamw`` is plain ``adamw``, which reads the flat
  state).
* On 2 ranks: bf16 parameters with fp32 masters through torch's fused kernel, fed the same gradients, are
  bit-equal to plain AdamW; ``reduce_grads`` is ignored with a warning; a layout that declines gets the flat
  ``DistributedAdamW``, one that leaves a parameter out is refused; the state moves between the pieces, ``DistributedAdamW``, ``adamw`` and
  ``layerwise-distributed`` both ways; a state dict of the wrong shape is refused before any collective.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
import torch.distributed as dist
from helpers import SINGLE, AveragingLayout, tiny_model
from torch.distributed.tensor import DTensor, Shard

from mcore.mesh import ParallelMesh, build_mesh
from mcore.ragged import full_tensor
from mcore_optim.adamw import AdamW, AdamWFactory
from mcore_optim.distributed_adamw import DistributedAdamW, DistributedAdamWFactory
from mcore_optim.layerwise import Layerwise, LayerwiseFactory
from mcore_optim.zero_pieces import PiecesAdamW
from mcore_testing import distributed
from mcore_testing.conformance import ShardedGradsConformance
from mcore_testing.numerics import seeded_randn
from mcore_testing.reference import tiny_batches
from mcore_testing.zero import FlatZeroLayout

ADAMW = {"lr": 3e-3, "weight_decay": 0.1, "impl": "foreach"}


class TestDistributedAdamWShardedGrads(ShardedGradsConformance):
    def make_layout(self) -> FlatZeroLayout:
        return FlatZeroLayout()

    def make_factory(self) -> DistributedAdamWFactory:
        hp = self.adamw
        config = DistributedAdamWFactory.Config(
            lr=hp["lr"],
            weight_decay=hp["weight_decay"],
            betas=(hp["beta1"], hp["beta2"]),
            eps=hp["eps"],
            impl="foreach",
            no_decay_roles=(),  # the suite's reference decays every parameter
        )
        return DistributedAdamWFactory(config)


class DecliningLayout(FlatZeroLayout):
    """Offers the handshake but declines it (as ``ddp`` does for ``DTensor`` parameters): it keeps all-reducing."""

    def shard_grads(self) -> Any:
        return None


class PartialLayout(FlatZeroLayout):
    """Hands out pieces of every parameter but the first."""

    def shard_grads(self) -> Any:
        shards = super().shard_grads()
        return dataclasses.replace(shards, pieces=shards.pieces[1:])


def _zero(model: torch.nn.Module, layout: Any = None, **config: Any) -> tuple[Any, Any]:
    """``model`` under ``layout`` (default ``FlatZeroLayout``) over every rank, with ``distributed-adamw`` on it."""
    layout = layout if layout is not None else FlatZeroLayout()
    mesh = build_mesh(layout.mesh_dims, {}, fill="dp_replicate", device_type="cpu")
    model = layout.apply(model, mesh)
    factory = DistributedAdamWFactory(DistributedAdamWFactory.Config(**{**ADAMW, **config}))
    return factory.build(model, mesh=mesh, layouts=[layout]), layout


def _whole(sd: dict[str, Any], shapes: dict[str, torch.Size]) -> dict[str, dict[str, torch.Tensor]]:
    """Every state tensor of ``sd`` whole (gathered: a collective) and in its parameter's shape."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name in sorted(sd["state"]):
        entry = sd["state"][name]
        out[name] = {k: full_tensor(v).reshape(shapes[name] if k != "step" else ()) for k, v in sorted(entry.items())}
    return out


def _assert_same_state(a: dict[str, Any], b: dict[str, Any], shapes: dict[str, torch.Size], label: str) -> None:
    wa, wb = _whole(a, shapes), _whole(b, shapes)
    assert wa.keys() == wb.keys(), label
    for name in wa:
        assert wa[name].keys() == wb[name].keys(), (label, name)
        for key in wa[name]:
            assert torch.equal(wa[name][key], wb[name][key]), f"{label}: {name}.{key}"


def _train(model: torch.nn.Module, layout: Any, optimizer: Any, steps: int) -> None:
    """Every rank the same batch (so the averaged gradient is each rank's own), one step each."""
    for tokens, labels in tiny_batches(steps, batch_size=4, seed=7):
        optimizer.zero_grad(set_to_none=True)
        model(tokens, labels=labels).backward()
        layout.finish_grad_sync()
        optimizer.step()


def _check_fused_bf16_masters() -> None:
    """bf16 parameters, fp32 masters, torch's fused kernel on the pieces (some of no element): fed the same
    gradients, plain AdamW's parameters, moments and masters to the bit."""
    ref = tiny_model().to(torch.bfloat16)
    opt_ref = AdamWFactory(AdamWFactory.Config(**{**ADAMW, "impl": "fused"})).build(ref, mesh=SINGLE, layouts=[])
    opt, layout = _zero(tiny_model().to(torch.bfloat16), impl="fused")
    assert isinstance(opt, PiecesAdamW) and opt.fused
    assert any(p.numel == 0 for p in opt.shards.pieces), "no piece without elements: a case left untested"
    model = layout.model
    for step in range(3):
        for i, (p, q) in enumerate(zip(model.parameters(), ref.parameters())):
            g = seeded_randn(*p.shape, seed=100 * step + i, scale=1e-2, dtype=torch.bfloat16)
            p.grad, q.grad = g.clone(), g.clone()
        layout.finish_grad_sync()  # reduce-scatter: the average of equal gradients is each one
        opt.step()
        opt_ref.step()
    shapes = {n: p.shape for n, p in model.named_parameters()}
    _assert_same_state(opt.state_dict(), opt_ref.state_dict(), shapes, "fused bf16 pieces vs adamw")
    for name, p in model.named_parameters():
        assert torch.equal(p, dict(ref.named_parameters())[name]), name


def _check_build_paths() -> None:
    with pytest.warns(UserWarning, match=r"reduce_grads = True is ignored: layout 'test-zero' reduce-scatters"):
        opt, layout = _zero(tiny_model(), reduce_grads=True)
    assert isinstance(opt, PiecesAdamW) and layout.shards is not None
    opt, layout = _zero(tiny_model(), DecliningLayout())
    assert isinstance(opt, DistributedAdamW) and layout.shards is None  # declined: the flat ZeRO-1, all-reduce
    with pytest.raises(ValueError, match=r"layout 'test-zero' hands distributed-adamw no piece of .*'embed.weight'"):
        _zero(tiny_model(), PartialLayout())


def _check_state_moves_both_ways() -> None:
    """The pieces' flat state loads into DistributedAdamW, adamw and layerwise-distributed, and theirs into the pieces."""
    size = dist.get_world_size()
    mesh = ParallelMesh(("dp",), (size,), "cpu")
    opt, layout = _zero(tiny_model())
    _train(layout.model, layout, opt, 2)
    saved = opt.state_dict()
    for name, value in saved["state"].items():  # flat, row-ragged over the data-parallel mesh
        assert isinstance(value["exp_avg"], DTensor) and value["exp_avg"].placements == (Shard(0),), name
        assert value["exp_avg"].dim() == 1 and value["exp_avg"].to_local().numel() == opt.pieces[name].numel, name
    shapes = {n: p.shape for n, p in layout.model.named_parameters()}
    averaging = AveragingLayout()
    others = {
        "distributed-adamw (flat layout)": DistributedAdamWFactory(DistributedAdamWFactory.Config(**ADAMW)),
        "adamw": AdamWFactory(AdamWFactory.Config(**ADAMW)),
        "layerwise-distributed": LayerwiseFactory(LayerwiseFactory.Config(lr=3e-3, options={"impl": "foreach"})),
    }
    for label, factory in others.items():
        other = factory.build(averaging.apply(tiny_model(seed=9)), mesh=mesh, layouts=[averaging])
        assert isinstance(other, (DistributedAdamW, AdamW, Layerwise)) and not isinstance(other, PiecesAdamW)
        other.load_state_dict(saved)
        _assert_same_state(other.state_dict(), saved, shapes, f"pieces -> {label}")
        back, _ = _zero(tiny_model(seed=5))  # and back: parameter-shaped (row-sharded or whole) into the pieces
        back.load_state_dict(other.state_dict())
        _assert_same_state(back.state_dict(), saved, shapes, f"{label} -> pieces")


def _check_refuses_wrong_shape() -> None:
    opt, _ = _zero(tiny_model())
    saved = opt.state_dict()
    saved["state"]["lm_head.weight"]["exp_avg"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"'lm_head.weight'.'exp_avg' has shape 3, expected .*refusing to load"):
        opt.load_state_dict(saved)


@distributed(world_size=2, timeout=240)
def test_pieces_on_2_ranks() -> None:
    torch.set_num_threads(1)
    _check_build_paths()
    _check_fused_bf16_masters()
    _check_state_moves_both_ways()
    _check_refuses_wrong_shape()
