"""Parameters kept whole on one rank (``keep_whole``): placement, numerics equal to one process,
mixed precision, quantized gathers, HSDP, and DCP checkpoints that reload under a row split
and into a plain model. Gloo, 2 and 4 processes.
"""

from __future__ import annotations

import copy
import gc
import weakref
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from helpers import UNEVEN, RowInt8Recipe, batches, dequantized, full, local_rows, reference_trace, shard_model, train
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from mcore.params import collect_param_specs
from mcore.ragged import annotate_for_checkpoint, row_counts
from mcore_fsdp import MixedPrecisionPolicy
from mcore_fsdp.api import local_shard_numel
from mcore_fsdp.geometry import plan
from mcore_fsdp.layout import FSDPLayout
from mcore_fsdp.runtime import require_state, state_of
from mcore_testing import distributed, run_distributed
from mcore_testing.numerics import assert_rel_close
from mcore_testing.reference import TinyTransformer


def _matrices(p: torch.nn.Parameter) -> bool:
    return p.dim() >= 2


def _fresh(seed: int = 0) -> TinyTransformer:
    return TinyTransformer(copy.deepcopy(UNEVEN), seed=seed)


def test_plan_packs_whole_parameters_onto_the_least_loaded_rank() -> None:
    # a row-split vector, then three whole matrices (largest first, as Unit orders them)
    g = plan([(5,), (4, 4), (3, 3), (2, 2)], 2, whole=[False, True, True, True])
    vec, big, mid, small = g.slots
    assert vec.owner is None and (vec.rows, vec.offset) == (3, 0)  # ranks hold 3 and 2 of its rows
    assert (big.owner, big.offset) == (1, 3)  # rank 1 was lighter (2 < 3)
    assert (mid.owner, mid.offset) == (0, 3) and (small.owner, small.offset) == (0, 12)
    assert g.loads == (3 + 9 + 4, 2 + 16) and g.shard_numel == 3 + 16 == g.plain_numel
    assert g.whole_padding == ((0, 16, 19),)
    assert [sl.full_offset for sl in g.slots] == [0, 6, 22, 31] and g.full_numel == 35
    assert [big.local_rows(r) for r in (0, 1)] == [0, 4] and vec.row_start(1) == 3


@distributed(2, timeout=300)
def test_whole_parameters_two_ranks(tmp_path: Path) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    ref = reference_trace()

    # -- placement: each matrix on exactly one rank, vectors split by rows -----------------------
    plain = _fresh()
    original = weakref.ref(plain.lm_head.weight)
    model = shard_model(plain, mesh, keep_whole=_matrices)
    del plain
    gc.collect()
    assert original() is None, "fully_shard kept the original (un-sharded) parameter alive"
    params = dict(model.named_parameters())
    counts = dict(zip(params, row_counts(list(params.values()))))
    for name, p in params.items():
        if p.dim() >= 2:
            assert sorted(counts[name]) == [0, p.shape[0]], f"{name} is not whole on one rank: {counts[name]}"
        else:
            assert max(counts[name]) < p.shape[0], f"{name} should be split by rows: {counts[name]}"
    owners = {counts[n].index(p.shape[0]) for n, p in params.items() if p.dim() >= 2}
    assert owners == {0, 1}, f"whole matrices should spread over both ranks: {owners}"
    held = torch.tensor([float(sum(p.to_local().numel() for p in params.values())), float(local_shard_numel(model))])
    dist.all_reduce(held)
    total = sum(p.numel() for p in params.values())
    assert held[0].item() == total, f"ranks hold {held[0].item()} elements of {total}"
    assert held[1].item() <= 1.2 * total, f"flat shards with padding: {held[1].item()} elements for {total}"

    # -- numerics: 3 AdamW steps equal one process ------------------------------------------------
    trace = train(model, dp_rank=rank, dp_size=world)
    for step in range(len(ref.losses)):
        assert_rel_close(torch.tensor(trace.losses[step]), torch.tensor(ref.losses[step]), 1e-5, name="loss")
        for name, g in trace.grads[step].items():
            assert_rel_close(g, ref.grads[step][name], 1e-5, name=f"whole grad {name} step {step}")
    for name, p in trace.params.items():
        assert_rel_close(p, ref.params[name], 1e-5, name=f"whole param {name}")
    # the optimizer dropped the grads (set_to_none): the next forward frees their buffers
    units = [require_state(m).unit for m in model.modules() if state_of(m) is not None]
    assert all(u.grad_flat is not None for u in units)
    with torch.no_grad():
        model(local_rows(batches()[0][0], rank, world))
    assert all(u.grad_flat is None for u in units), "gradient buffers outlived zero_grad(set_to_none=True)"
    for u in units:  # nothing of ours (nor a view's base) still holds the freed buffer
        for dt in u._grad_dtensors:
            local = dt._local_tensor
            assert local.untyped_storage().nbytes() == 0
            assert local._base is None or local._base.untyped_storage().nbytes() == 0

    # -- without resharding after forward, and every parameter whole --------------------------------
    trace = train(
        shard_model(_fresh(), mesh, keep_whole=True, reshard_after_forward=False), dp_rank=rank, dp_size=world
    )
    for name, p in trace.params.items():
        assert_rel_close(p, ref.params[name], 1e-5, name=f"all-whole param {name}")

    # -- bf16 compute with fp32 reduction: as the row-split layout does ----------------------------
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    a = train(shard_model(_fresh(), mesh, mp_policy=mp, keep_whole=_matrices), dp_rank=rank, dp_size=world, steps=2)
    b = train(shard_model(_fresh(), mesh, mp_policy=mp), dp_rank=rank, dp_size=world, steps=2)
    for step in range(2):
        assert_rel_close(torch.tensor(a.losses[step]), torch.tensor(b.losses[step]), 1e-2, name="bf16 whole loss")
        for name, g in a.grads[step].items():
            assert_rel_close(g, b.grads[step][name], 1e-2, name=f"bf16 whole grad {name}")

    # -- quantized gather: the owner quantizes the whole weight, the others receive its payload ---
    model = shard_model(_fresh(), mesh, gather_recipe=RowInt8Recipe(), keep_whole=_matrices)
    single = dequantized(_fresh())
    tokens, labels = batches()[0]
    expected = single(tokens, labels=labels)
    expected.backward()
    loss = model(local_rows(tokens, rank, world), labels=local_rows(labels, rank, world))
    loss.backward()
    value = loss.detach().clone()
    dist.all_reduce(value)
    assert_rel_close(value / world, expected.detach(), 1e-5, name="int8-gather loss (whole)")
    for (name, p), q in zip(model.named_parameters(), single.parameters()):
        assert_rel_close(full(p.grad), q.grad, 1e-5, name=f"int8-gather grad {name} (whole)")

    # -- checkpoint: saved whole, loaded split by rows and into a plain model ---------------------
    layout = FSDPLayout(FSDPLayout.Config(whole_params="matrices"))
    from mcore.mesh import build_mesh

    model = layout.apply(_fresh(), build_mesh(layout.mesh_dims, fill="dp_shard", device_type="cpu"))
    # "matrices" keeps whole what the model declares matrix (Muon's), not its embeddings or head
    roles = {name: spec.role for name, spec in collect_param_specs(_fresh()).items()}
    for name, p in model.named_parameters():
        whole_here = p.to_local().shape[0] in (0, p.shape[0])
        assert whole_here == (roles[name] == "matrix"), (name, roles[name], tuple(p.to_local().shape))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tokens, labels = batches()[1]
    model(local_rows(tokens, rank, world), labels=local_rows(labels, rank, world)).backward()
    opt.step()
    state = {"model": model.state_dict(), "optim": get_optimizer_state_dict(model, opt)}
    assert annotate_for_checkpoint(_flat(state)) > 0
    path = str(tmp_path / "ckpt")
    dcp.save(state, checkpoint_id=path)
    saved = {n: full(v) for n, v in model.state_dict().items()}
    moments = {n: full(opt.state[p]["exp_avg"]) for n, p in model.named_parameters()}

    split = shard_model(_fresh(seed=1), mesh)
    opt2 = torch.optim.AdamW(split.parameters(), lr=1e-2)
    split(local_rows(tokens, rank, world), labels=local_rows(labels, rank, world)).backward()
    opt2.step()  # optimizer state to load into
    target = {"model": split.state_dict(), "optim": get_optimizer_state_dict(split, opt2)}
    assert annotate_for_checkpoint(_flat(target)) == 0  # row split: DTensor's own chunks
    dcp.load(target, checkpoint_id=path)
    split.load_state_dict(target["model"])
    set_optimizer_state_dict(split, opt2, target["optim"])
    for name, value in split.state_dict().items():
        assert_rel_close(full(value), saved[name], 1e-7, name=f"reloaded {name}")
    for name, p in split.named_parameters():
        assert_rel_close(full(opt2.state[p]["exp_avg"]), moments[name], 1e-7, name=f"reloaded exp_avg {name}")
    if rank == 0:
        plain = {"model": _fresh(seed=2).state_dict()}
        dcp.load(plain, checkpoint_id=path, no_dist=True)
        for name, value in plain["model"].items():
            assert_rel_close(value, saved[name], 1e-7, name=f"plain {name}")
    dist.barrier()


def _flat(state: dict) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    for value in state.values():
        if isinstance(value, dict):
            out += _flat(value)
        elif isinstance(value, torch.Tensor):
            out.append(value)
    return out


def _hsdp_whole() -> None:
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp_replicate", "dp_shard"))
    model = shard_model(_fresh(), mesh, keep_whole=_matrices)
    assert all(isinstance(p, DTensor) for p in model.parameters())
    trace = train(model, dp_rank=rank, dp_size=4)
    ref = reference_trace()
    for step in range(len(ref.losses)):
        assert_rel_close(torch.tensor(trace.losses[step]), torch.tensor(ref.losses[step]), 1e-5, name="hsdp loss")
    for name, p in trace.params.items():
        assert_rel_close(p, ref.params[name], 1e-5, name=f"hsdp whole param {name}")
    # fsdp on 4 ranks: whole matrices spread over all of them
    flat = init_device_mesh("cpu", (4,))
    model = shard_model(_fresh(), flat, keep_whole=_matrices)
    params = [p for p in model.parameters() if p.dim() >= 2]
    owners = {c.index(p.shape[0]) for p, c in zip(params, row_counts(params))}
    assert owners == {0, 1, 2, 3}, owners
    trace = train(model, dp_rank=rank, dp_size=4)
    for name, p in trace.params.items():
        assert_rel_close(p, ref.params[name], 1e-5, name=f"fsdp-4 whole param {name}")


def test_whole_parameters_hsdp_four_ranks() -> None:
    run_distributed(_hsdp_whole, 4, timeout=300)
