"""Row-ragged ``Shard(0)`` DTensor parameters (``mcore.ragged``) on 2 and 4 gloo ranks.

Parameters are made DTensors by hand (no FSDP plugin): a parameter "held whole" by rank r is
a ``Shard(0)`` DTensor whose rank r holds every row and the other ranks none; others are
split over several ranks with uneven counts, or evenly (DTensor's own ``Shard(0)``). Each
step, the single-process reference computes the full gradients and every rank cuts them
the same way, so ``muon``, ``adamw`` and ``distributed-adamw`` must reproduce the
single-process optimizer: muon in fp64, adamw in fp32, to 1e-6 (see test_distributed.py for
why muon is checked in fp64). Then: when every matrix is held whole, muon's step issues no
collective; state saved with ``torch.distributed.checkpoint`` loads under another split and
the next step is identical; a ragged state loads into ZeRO-1 and layerwise-distributed.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.distributed.checkpoint as dcp
from helpers import SINGLE, AveragingLayout, batches, tiny_model
from torch import nn
from torch.distributed import distributed_c10d
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from mcore.mesh import ParallelMesh
from mcore.ragged import annotate_for_checkpoint, full_tensor, row_counts
from mcore_optim.adamw import AdamW, AdamWFactory
from mcore_optim.dist import shards_of
from mcore_optim.distributed_adamw import DistributedAdamW, DistributedAdamWFactory
from mcore_optim.layerwise import Layerwise, LayerwiseFactory
from mcore_optim.muon import Muon, MuonFactory
from mcore_testing import run_distributed
from mcore_testing.numerics import assert_rel_close

# As in test_distributed.py.
ADAMW = {"lr": 3e-3, "weight_decay": 0.1, "impl": "foreach"}
MUON = {"lr": 0.01, "weight_decay": 0.1, "ns_dtype": "float64", "split_heads": True, "adamw_impl": "foreach"}

Spec = int | tuple[int, ...] | str  # holder rank, every rank's row count, or "even"

#: Per world size: parameters held whole (an int: the holder) or split unevenly (row counts);
#: every other parameter is split evenly.
SPLITS: dict[int, dict[str, Spec]] = {
    2: {
        "layers.0.attn.qkv.weight": 1,
        "layers.0.attn.proj.weight": 0,
        "layers.0.mlp.gate_up.weight": (40, 88),
        "layers.1.mlp.down.weight": 1,
        "lm_head.weight": 1,
        "layers.0.attn_norm.weight": 0,
    },
    4: {
        "layers.0.attn.qkv.weight": 3,
        "layers.0.attn.proj.weight": 1,
        "layers.0.mlp.gate_up.weight": (0, 50, 0, 78),
        "layers.1.attn.qkv.weight": (30, 0, 66, 0),
        "layers.1.mlp.down.weight": 2,
        "lm_head.weight": 0,
        "embed.weight": (10, 20, 30, 4),
        "norm.weight": 3,
    },
}


def _spec(splits: Mapping[str, Spec], name: str) -> Spec:
    return splits.get(name, "even")


def _counts(spec: Spec, rows: int, world: int) -> tuple[int, ...] | None:
    if isinstance(spec, int):
        return tuple(rows if r == spec else 0 for r in range(world))
    return spec if isinstance(spec, tuple) else None


def split(t: torch.Tensor, mesh: DeviceMesh, spec: Spec) -> DTensor:
    """``t`` (whole, the same on every rank) as a ``Shard(0)`` DTensor split per ``spec``; no communication."""
    counts = _counts(spec, t.shape[0], mesh.size())
    if counts is None:
        return distribute_tensor(t, mesh, [Shard(0)], src_data_rank=None)
    rank = mesh.get_local_rank()
    lo = sum(counts[:rank])
    local = t[lo : lo + counts[rank]].clone()
    return DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=t.shape, stride=t.stride())


def shard_model(model: nn.Module, mesh: DeviceMesh, splits: Mapping[str, Spec]) -> nn.Module:
    """Every parameter of ``model`` replaced by a DTensor split per ``splits`` (in place)."""
    for name, p in list(model.named_parameters()):
        path, _, leaf = name.rpartition(".")
        module = model.get_submodule(path)
        module.register_parameter(leaf, nn.Parameter(split(p.detach(), mesh, _spec(splits, name))))
    return model


def whole_matrices(model: nn.Module, world: int) -> dict[str, Spec]:
    """Every 2-D matrix Muon orthogonalises held whole, round robin over the ranks."""
    names = [n for n, p in model.named_parameters() if p.dim() == 2 and n.startswith("layers.")]
    return {name: i % world for i, name in enumerate(names)}


def other_split(splits: Mapping[str, Spec], model: nn.Module, world: int) -> dict[str, Spec]:
    """Another split of the same parameters: holders move one rank on, ragged splits become even,
    even ones are held whole by the last rank."""
    out: dict[str, Spec] = {}
    for name, _ in model.named_parameters():
        spec = _spec(splits, name)
        out[name] = (spec + 1) % world if isinstance(spec, int) else ("even" if isinstance(spec, tuple) else world - 1)
    return out


def full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: full_tensor(p.detach()) for name, p in model.named_parameters()}


def give_grads(model: nn.Module, ref: nn.Module, mesh: DeviceMesh, splits: Mapping[str, Spec]) -> None:
    grads = {name: p.grad for name, p in ref.named_parameters()}
    for name, p in model.named_parameters():
        grad = grads[name]
        assert grad is not None
        p.grad = split(grad, mesh, _spec(splits, name))


def _mesh_args(size: int) -> dict[str, Any]:
    return {"mesh": ParallelMesh(("dp",), (size,), "cpu"), "layouts": []}


def _factory(algorithm: str) -> Any:
    if algorithm == "muon":
        return MuonFactory(MuonFactory.Config(**MUON))
    if algorithm == "muon-unsplit":  # every rank orthogonalises every split matrix (all-gathered)
        return MuonFactory(MuonFactory.Config(**MUON, distribute_ns=False))
    if algorithm == "distributed-adamw":
        return DistributedAdamWFactory(DistributedAdamWFactory.Config(**ADAMW))
    return AdamWFactory(AdamWFactory.Config(**ADAMW))


def _dtype(algorithm: str) -> torch.dtype:
    return torch.float64 if algorithm.startswith("muon") else torch.float32


def side_by_side(
    algorithm: str, mesh: DeviceMesh, splits: Mapping[str, Spec], steps: int, seed: int = 3
) -> tuple[nn.Module, Any, nn.Module, Any]:
    """The reference (one process, plain model) and the ragged run, ``steps`` steps on the same gradients."""
    ref = tiny_model().to(_dtype(algorithm))
    model = shard_model(copy.deepcopy(ref), mesh, splits)
    ref_opt = _factory(algorithm).build(ref, mesh=SINGLE, layouts=[])
    opt = _factory(algorithm).build(model, **_mesh_args(mesh.size()))
    for tokens, labels in batches(steps, seed=seed):
        step_both(ref, ref_opt, model, opt, mesh, splits, tokens, labels)
    return ref, ref_opt, model, opt


def step_both(
    ref: nn.Module,
    ref_opt: Any,
    model: nn.Module,
    opt: Any,
    mesh: DeviceMesh,
    splits: Mapping[str, Spec],
    tokens: torch.Tensor,
    labels: torch.Tensor,
) -> None:
    ref_opt.zero_grad(set_to_none=True)
    opt.zero_grad(set_to_none=True)
    ref(tokens, labels=labels).backward()
    give_grads(model, ref, mesh, splits)
    ref_opt.step()
    opt.step()


def check_matches(ref: nn.Module, model: nn.Module, label: str) -> None:
    expected = dict(ref.named_parameters())
    for name, value in full_params(model).items():
        assert_rel_close(value, expected[name], tol=1e-6, name=f"{label} {name}")


# -- counting collectives -----------------------------------------------------------------
COLLECTIVES = (
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "all_gather_single",
    "all_reduce",
    "all_to_all",
    "all_to_all_single",
    "barrier",
    "batch_isend_irecv",
    "broadcast",
    "broadcast_object_list",
    "gather",
    "gather_object",
    "irecv",
    "isend",
    "recv",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_single",
    "reduce_scatter_tensor",
    "scatter",
    "scatter_object_list",
    "send",
)
#: what DTensor (``full_tensor``, ``redistribute``) communicates through: every functional collective
FUNCTIONAL = tuple(
    name
    for name in dir(funcol)
    if name.startswith(("all_", "reduce_", "broadcast", "permute_tensor", "gather", "scatter"))
    and not name.endswith(("_backward", "_setup_context"))
    and callable(getattr(funcol, name))
)


@contextmanager
def counted_collectives() -> Iterator[Counter[str]]:
    """Count calls of torch.distributed's collectives and DTensor's functional ones while inside."""
    calls: Counter[str] = Counter()
    patched = []
    for module, names in ((dist, COLLECTIVES), (distributed_c10d, COLLECTIVES), (funcol, FUNCTIONAL)):
        for name in names:
            original = getattr(module, name, None)
            if original is None:
                continue

            def counting(*args: Any, _key: str = f"{module.__name__}.{name}", _fn: Any = original, **kw: Any) -> Any:
                calls[_key] += 1
                return _fn(*args, **kw)

            setattr(module, name, counting)
            patched.append((module, name, original))
    try:
        yield calls
    finally:
        for module, name, original in patched:
            setattr(module, name, original)


# -- the checks ------------------------------------------------------------------------
def _check_matches_single_process(mesh: DeviceMesh) -> None:
    """Mixed splits: whole on one rank, uneven, even. muon, adamw and distributed-adamw match."""
    size, rank = mesh.size(), mesh.get_local_rank()
    splits = SPLITS[size]
    for algorithm in ("muon", "muon-unsplit", "adamw", "distributed-adamw"):
        ref, _, model, opt = side_by_side(algorithm, mesh, splits, steps=3)
        assert type(opt) is (Muon if algorithm.startswith("muon") else AdamW), (algorithm, type(opt))
        check_matches(ref, model, f"{algorithm} on {size} ranks")
        named = dict(model.named_parameters())
        state = {**opt.adamw.state, **opt.state} if isinstance(opt, Muon) else opt.state
        for name, spec in splits.items():  # state lives where the rows live: nothing on other ranks
            if isinstance(spec, int):
                rows = named[name].shape[0] if spec == rank else 0
                assert all(v.shape[0] == rows for k, v in state[name].items() if k != "step"), (algorithm, name)
        if isinstance(opt, Muon):
            held = {name: spec for name, spec in splits.items() if isinstance(spec, int) and name in opt.state}
            assert held and opt._here == {name for name, holder in held.items() if holder == rank}
            if algorithm == "muon":
                assert all(opt.owners[name] == holder for name, holder in held.items())
                assert opt._owner_gather  # the others keep FSDP's path: gathered on their owner only
                assert set(opt.owners.values()) == set(range(size))
            else:
                assert opt.ns_group is None and not opt._owner_gather


def _check_whole_matrices_communicate_nothing(mesh: DeviceMesh) -> None:
    """Every matrix held whole: muon's step issues no collective, and still matches."""
    size = mesh.size()
    splits = whole_matrices(tiny_model(), size)
    ref, ref_opt, model, opt = side_by_side("muon", mesh, splits, steps=1)
    assert isinstance(opt, Muon) and not opt._split and len(opt._here) == len(splits) // size
    for tokens, labels in batches(2, seed=5):
        ref_opt.zero_grad(set_to_none=True)
        ref(tokens, labels=labels).backward()
        give_grads(model, ref, mesh, splits)
        ref_opt.step()
        with counted_collectives() as calls:
            opt.step()
        assert not calls, f"muon's step on matrices held whole communicated: {dict(calls)}"
    check_matches(ref, model, f"muon, every matrix held whole, on {size} ranks")

    # the counter does see communication: the mixed split's step, and DTensor's own gather
    _, _, mixed, mixed_opt = side_by_side("muon", mesh, SPLITS[size], steps=1)
    give_grads(mixed, ref, mesh, SPLITS[size])
    with counted_collectives() as calls:
        mixed_opt.step()
    assert calls["torch.distributed.gather"] and calls["torch.distributed.scatter"], dict(calls)
    with counted_collectives() as calls:
        distribute_tensor(torch.ones(8, 2), mesh, [Shard(0)], src_data_rank=None).full_tensor()
    assert sum(v for k, v in calls.items() if k.startswith(funcol.__name__)), dict(calls)


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a nested state dict (what DCP flattens)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, Mapping):
        for value in obj.values():
            yield from _tensors(value)


def _check_checkpoint_under_another_split(mesh: DeviceMesh, root: str) -> None:
    """Save model and optimizer state with DCP under one split, load it under another (holders
    moved, ragged made even, even made whole); the next step is identical."""
    size = mesh.size()
    splits = SPLITS[size]
    for algorithm in ("muon", "adamw"):
        path = f"{root}/{algorithm}-{size}"
        ref, ref_opt, model, opt = side_by_side(algorithm, mesh, splits, steps=2)
        state = {"model": model.state_dict(), "optim": opt.state_dict()}
        assert annotate_for_checkpoint(list(_tensors(state))) > 0
        dcp.save(state, checkpoint_id=path)

        others = other_split(splits, model, size)
        resumed = shard_model(tiny_model(seed=123).to(_dtype(algorithm)), mesh, others)  # values come from the file
        resumed_opt = _factory(algorithm).build(resumed, **_mesh_args(size))
        target = {"model": resumed.state_dict(), "optim": resumed_opt.state_dict()}
        assert annotate_for_checkpoint(list(_tensors(target))) > 0
        dcp.load(target, checkpoint_id=path)
        resumed.load_state_dict(target["model"])
        resumed_opt.load_state_dict(target["optim"])
        for name, value in full_params(resumed).items():
            assert torch.equal(value, full_tensor(model.get_parameter(name).detach())), f"{algorithm} {name}"
        saved, loaded = opt.state_dict()["state"], resumed_opt.state_dict()["state"]
        for name, entry in saved.items():  # the state, exactly, now split the other way
            for key, value in entry.items():
                assert torch.equal(full_tensor(loaded[name][key]), full_tensor(value)), f"{algorithm} {name}.{key}"

        tokens, labels = batches(1, seed=9)[0]
        ref_opt.zero_grad(set_to_none=True)
        opt.zero_grad(set_to_none=True)
        resumed_opt.zero_grad(set_to_none=True)
        ref(tokens, labels=labels).backward()
        give_grads(model, ref, mesh, splits)
        give_grads(resumed, ref, mesh, others)
        opt.step()
        resumed_opt.step()
        after = full_params(model)
        for name, value in full_params(resumed).items():
            assert torch.equal(value, after[name]), (
                f"{algorithm}: the step after loading under another split differs: {name}"
            )


def _check_ragged_state_into_replicated_optimizers(mesh: DeviceMesh) -> None:
    """A ragged AdamW state (in memory) loads into ZeRO-1 and layerwise-distributed on replicas."""
    _, _, _, opt = side_by_side("adamw", mesh, SPLITS[mesh.size()], steps=2)
    saved = opt.state_dict()
    expected = {name: {k: full_tensor(v) for k, v in entry.items()} for name, entry in saved["state"].items()}
    for factory, kind in (
        (DistributedAdamWFactory(DistributedAdamWFactory.Config(**ADAMW)), DistributedAdamW),
        (LayerwiseFactory(LayerwiseFactory.Config(lr=3e-3, options={"impl": "foreach"})), Layerwise),
    ):
        layout = AveragingLayout()
        replica = layout.apply(tiny_model(seed=7))
        other = factory.build(replica, mesh=ParallelMesh(("dp",), (mesh.size(),), "cpu"), layouts=[layout])
        assert isinstance(other, kind)
        other.load_state_dict(saved)
        for name, entry in other.state_dict()["state"].items():
            for key, value in entry.items():
                assert torch.equal(full_tensor(value), expected[name][key]), f"{kind.__name__} {name}.{key}"


def _check_shards_of_reads_the_real_split(mesh: DeviceMesh) -> None:
    """A saved DTensor whose local shape matches ours on this rank may still hold other rows."""
    size, rank = mesh.size(), mesh.get_local_rank()
    w = torch.arange(8 * 3, dtype=torch.float32).view(8, 3)
    counts = (0, 2, 6, 0) if size == 4 else (2, 6)  # on 4 ranks, rank 1 holds 2 rows as under even chunks
    param = split(torch.zeros_like(w), mesh, counts)
    lo = sum(counts[:rank])
    mine = w[lo : lo + counts[rank]]
    values = [split(w, mesh, "even"), split(w, mesh, size - 1), w, split(w, mesh, counts)]
    assert row_counts([param]) == [counts]
    kinds = ("even", "whole on the last rank", "plain", "split alike")
    for kind, piece in zip(kinds, shards_of(values, [param] * len(values))):
        assert torch.equal(piece, mine), (kind, rank, piece, mine)
    assert shards_of(values[-1:], [param])[0].data_ptr() == values[-1].to_local().data_ptr()  # split alike: kept


def _check_all(root: str) -> None:
    torch.set_num_threads(1)  # several ranks share few cores
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    _check_shards_of_reads_the_real_split(mesh)
    _check_matches_single_process(mesh)
    _check_whole_matrices_communicate_nothing(mesh)
    _check_checkpoint_under_another_split(mesh, root)
    _check_ragged_state_into_replicated_optimizers(mesh)


def test_ragged_params_on_2_ranks(tmp_path: Path) -> None:
    run_distributed(_check_all, 2, str(tmp_path), timeout=240)


def test_ragged_params_on_4_ranks(tmp_path: Path) -> None:
    run_distributed(_check_all, 4, str(tmp_path), timeout=300)
