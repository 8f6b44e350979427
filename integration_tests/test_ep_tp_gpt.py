"""Layouts ``["tp", "ep"]`` on a gpt with moe layers: equal to one process over 3 AdamW steps (fp32, rel 1e-5):
the loss, every gradient, the global gradient norm and the routers' aux-loss-free bias.

``tp`` splits attention, the dense MLP and the moe block's shared experts as declared and, with expert TP = 1,
runs each moe block on a tp rank's share of the tokens (with and without sequence parallelism); ``ep`` shards
the routed experts over ``ep`` (their gradients summed over tp by ``tp``), or, folded (``[parallel.ep] borrow =
["tp"]``), over ``ep x tp`` with the tokens dispatched over that group. With expert TP = attention TP
(``[parallel.tp] expert_tp``) every tp rank computes every token through its slice of the experts' FFN. The
``ep`` ranks train different micro-batches (two each, the first under ``no_grad_sync``), the tp ranks the same
ones. Dropless routing with no auxiliary loss: the moe block is then token-wise, so splitting its tokens changes
nothing (capacity and auxiliary losses are per tp rank, as Megatron defines them; ``mcore-moe``'s
``test_token_split`` checks those).

Fast: tp2 x ep2 on 4 gloo ranks (unfolded with sequence parallelism; folded without it, built on the meta device;
expert TP), a checkpoint saved folded loaded unfolded, and the refusals. Slow: tp2 alone (``ep = 1``) folded
(expert parallelism with no data-parallel factor) and with tp's communication overlap; a moe block without
shared experts, the hash router (its token ids narrowed to a rank's tokens), allgatherv, expert TP with
sequence parallelism; ``["tp", "ep", "fsdp"]`` (dp_shard 2 x tp 2: unfolded, folded, expert TP)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from mcore.construct import init_params
from mcore.errors import UserError
from mcore.mesh import ParallelMesh
from mcore.train.grads import global_grad_norm
from mcore.train.step_hooks import after_optimizer_step, post_step_modules
from mcore_fsdp.layout import FSDPLayout
from mcore_models.gpt import GPT, GPTConfig
from mcore_moe.ep import EPLayout
from mcore_parallel.tp import TPLayout
from mcore_testing.dist import run_distributed
from mcore_testing.hosts import isolated_host
from mcore_testing.numerics import assert_rel_close, seeded_tokens

VOCAB, STEPS, MICRO = 64, 3, 2  # micro-batches per ep rank per step


def model_config(*, shared: int = 1) -> GPTConfig:
    """``shared`` shared experts; ``-1``: one, and the hash router (token ids narrowed to a rank's tokens)."""
    moe: dict[str, Any] = {
        "num_experts": 4,
        "top_k": 2,
        "moe_ffn_hidden_size": 16,
        "num_shared_experts": abs(shared),
        "score_function": "sigmoid",
        "expert_bias": True,
        "bias_update_rate": 0.01,
    }
    if shared < 0:
        moe |= {"router": "hash", "hash_vocab_size": VOCAB, "expert_bias": False}
    return GPTConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_layers=2,
        layers=["attention/swiglu", "attention/moe"],
        max_position_embeddings=64,
        blocks={"attention": {"num_heads": 4, "num_kv_heads": 2}, "swiglu": {"ffn_hidden_size": 48}, "moe": moe},
    )


def _lookup(name: str) -> Any:
    return isolated_host("mcore_models.plugin", "mcore_moe.plugin").load("block", name)


def _batches(step: int, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for j in range(count):
        tokens = seeded_tokens((2, 9), vocab_size=VOCAB, seed=100 * step + j)
        out.append((tokens[:, :-1], tokens[:, 1:]))
    return out


def _train(
    model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], layouts: list[Any]
) -> torch.Tensor:
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


def _case(
    sp: bool,
    dispatcher: str,
    fold: bool,
    on_meta: bool,
    shared: int,
    mesh: ParallelMesh,
    etp: bool = False,
    overlap: int = 1,
) -> None:
    world, ep, tp = dist.get_world_size(), mesh.size("ep"), mesh.size("tp")
    e = mesh.rank("ep")
    config = model_config(shared=shared)
    ref = GPT.build(config, seed=0, block_lookup=_lookup)
    layouts: list[Any] = [
        TPLayout(TPLayout.Config(sequence_parallel=sp, expert_tp=etp, overlap_chunks=overlap)),
        EPLayout(EPLayout.Config(dispatcher=dispatcher, borrow=("tp",) if fold else ())),
    ]
    model = GPT.build(config, seed=0, device="meta" if on_meta else "cpu", block_lookup=_lookup)
    for layout in layouts:
        model = layout.apply(model, mesh)
    if on_meta:
        init_params(model, seed=0, device="cpu")
    moe = model.layers[1].mlp
    gate = moe.experts.gate
    if etp:  # experts over ep, their FFN over tp; every tp rank computes every token
        assert gate.device_mesh.mesh_dim_names == (("ep", "tp") if ep > 1 else ("tp",)), gate.device_mesh
        assert gate.to_local().shape == (4 // ep, 16 // tp, 32) and moe.token_group is None
        assert moe.experts.down.to_local().shape == (4 // ep, 32, 16 // tp)
    else:
        assert isinstance(gate, DTensor) or ep * (tp if fold else 1) == 1
        if isinstance(gate, DTensor):
            assert gate.device_mesh.mesh_dim_names == (("ep_tp",) if fold else ("ep",)), gate.device_mesh
            assert gate.to_local().shape[0] == 4 // (ep * (tp if fold else 1))
        assert moe.token_group is not None and moe.router.token_group is not None
    if shared:
        assert isinstance(moe.shared_experts.gate.weight, DTensor)  # the shared expert is split over tp
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3, foreach=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
    ref_hooks, hooks = post_step_modules(ref), post_step_modules(model)
    ep_group = mesh.group("ep")

    def reduce(t: torch.Tensor) -> torch.Tensor:  # the data-parallel groups: ep's (tp reads the same batch)
        if ep_group is not None:
            dist.all_reduce(t, group=ep_group)
        return t

    name = f"sp {sp}, {dispatcher}, fold {fold}, meta {on_meta}, shared {shared}, expert tp {etp}, overlap {overlap}"
    for step in range(STEPS):
        batches = _batches(step, ep * MICRO)
        ref_loss = _train(ref, batches, [])
        loss = _train(model, batches[e * MICRO : (e + 1) * MICRO], layouts)
        dist.all_reduce(loss)
        assert_rel_close(loss / world, ref_loss, 1e-5, name=f"{name}: step {step} loss")
        named = dict(model.named_parameters())
        for pname, p in ref.named_parameters():
            assert_rel_close(named[pname].grad, p.grad, 1e-5, name=f"{name}: step {step} grad {pname}")
        norm = global_grad_norm(list(model.named_parameters()), mesh, layouts)
        assert_rel_close(norm, global_grad_norm(list(ref.named_parameters())), 1e-5, name=f"{name}: grad norm")
        for optimizer, hook_list, red in ((ref_opt, ref_hooks, lambda t: t), (opt, hooks, reduce)):
            optimizer.step()
            optimizer.zero_grad()
            after_optimizer_step(hook_list, red, applied=True)
        if shared >= 0:  # the topk router's aux-loss-free bias
            bias = moe.router.expert_bias
            assert_rel_close(bias, ref.layers[1].mlp.router.expert_bias, 1e-6, name=f"{name}: expert bias")
    assert shared < 0 or bias.abs().sum() > 0


def _applied(layouts: list[Any], mesh: ParallelMesh) -> torch.nn.Module:
    model = GPT.build(model_config(), seed=0, block_lookup=_lookup)
    for layout in layouts:
        model = layout.apply(model, mesh)
    return model


def _reshard(path: str, mesh: ParallelMesh) -> None:
    """Saved folded (experts over ep x tp) after a step, loaded unfolded (experts over ep): same values."""
    layouts = [TPLayout(TPLayout.Config(sequence_parallel=True)), EPLayout(EPLayout.Config(borrow=("tp",)))]
    folded = _applied(layouts, mesh)
    opt = torch.optim.AdamW(folded.parameters(), lr=1e-2, foreach=False)
    e = mesh.rank("ep")
    _train(folded, _batches(0, mesh.size("ep") * MICRO)[e * MICRO : (e + 1) * MICRO], layouts)
    opt.step()

    def reduce(t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t, group=mesh.group("ep"))
        return t

    after_optimizer_step(post_step_modules(folded), reduce, applied=True)
    dcp.save(folded.state_dict(), checkpoint_id=path)
    unfolded = _applied([TPLayout(), EPLayout()], mesh)
    state = unfolded.state_dict()
    dcp.load(state, checkpoint_id=path)
    unfolded.load_state_dict(state)
    want = folded.state_dict()
    assert unfolded.layers[1].mlp.experts.gate.device_mesh.mesh_dim_names == ("ep",)
    for key, value in unfolded.state_dict().items():
        assert_rel_close(value, want[key], 1e-7, name=f"resharded {key}")
    assert unfolded.layers[1].mlp.router.expert_bias.abs().sum() > 0


def _all_cases(sizes: dict[str, int], cases: list[tuple[Any, ...]], checkpoint: str | None = None) -> None:
    names, shape = tuple(sizes), tuple(sizes.values())
    mesh = ParallelMesh(names, shape, "cpu", init_device_mesh("cpu", shape, mesh_dim_names=names))
    for case in cases:
        _case(*case[:5], mesh, *case[5:])
    if checkpoint is not None:
        _reshard(checkpoint, mesh)
        _refusals(mesh)


def _refusals(mesh: ParallelMesh) -> None:
    with pytest.raises(ValueError, match=r"^ep: parallel.ep.borrow = \['tp'\] with the experts' FFN split over tp"):
        _applied([TPLayout(TPLayout.Config(expert_tp=True)), EPLayout(EPLayout.Config(borrow=("tp",)))], mesh)
    with pytest.raises(ValueError, match=r"^tp: expert weight 'layers.1.mlp.experts.gate' is already sharded by"):
        _applied([EPLayout(), TPLayout(TPLayout.Config(expert_tp=True))], mesh)
    model = _applied([TPLayout(), EPLayout()], mesh)
    tokens = seeded_tokens((2, 7), vocab_size=VOCAB, seed=0)
    with pytest.raises(UserError, match=r"^tp: expert blocks route each tp rank's share of a row's 7 tokens, which"):
        model(tokens)


#: (sequence parallel, dispatcher, fold ep over tp, built on meta, shared experts (-1: one, hash router))
CASES = [
    (True, "alltoall", False, False, 1),
    (False, "allgather", True, True, 1),
    (False, "alltoall", False, False, 1, True),
]
SLOW_CASES = [
    (False, "alltoall", False, True, 1),
    (True, "allgather", True, False, 1),
    (True, "allgatherv", False, False, 0),
    (False, "alltoall", False, False, 0),
    (True, "alltoall", False, False, -1),
    (False, "allgather", True, False, -1),
]
#: expert TP = attention TP (the experts' FFN split over tp, every tp rank computing every token)
EXPERT_TP = [(True, "allgather", False, True, 0, True), (True, "alltoall", False, False, 1, True)]
#: (..., expert TP, overlap_chunks): the last three with tp's communication overlap
TP_ALONE = [
    (True, "alltoall", True, False, 1),
    (False, "allgather", True, True, 0),
    (True, "alltoall", False, False, 1, False, 2),
    (False, "alltoall", False, False, 1, False, 2),
    (True, "alltoall", False, False, 1, True, 2),
]


def test_tp2_x_ep2_equals_one_process_and_reshards(tmp_path: Path) -> None:
    run_distributed(_all_cases, 4, {"ep": 2, "tp": 2}, CASES, str(tmp_path / "folded"), timeout=600)


@pytest.mark.slow
def test_tp2_x_ep2_more_cases() -> None:
    run_distributed(_all_cases, 4, {"ep": 2, "tp": 2}, SLOW_CASES, timeout=600)


@pytest.mark.slow
def test_tp2_alone_runs_expert_parallel_folded() -> None:
    """ep = 1: folded, the experts are sharded over the two tp ranks; unfolded, each keeps all of them; with tp's
    communication overlap (chunked row reductions, and under sequence parallelism the chunked gathers)."""
    run_distributed(_all_cases, 2, {"ep": 1, "tp": 2}, TP_ALONE, timeout=600)


@pytest.mark.slow
def test_tp2_x_ep2_expert_tp_with_sequence_parallel() -> None:
    run_distributed(_all_cases, 4, {"ep": 2, "tp": 2}, EXPERT_TP, timeout=600)


def _with_fsdp(cases: list[tuple[bool, bool]]) -> None:
    """``["tp", "ep", "fsdp"]`` on dp_shard 2 x ep 1 x tp 2 (the dp_shard ranks read different micro-batches):
    loss, gradients and norm equal one process over 2 steps, for each (fold, expert TP)."""
    names, shape = ("dp_shard", "ep", "tp"), (2, 1, 2)
    mesh = ParallelMesh(names, shape, "cpu", init_device_mesh("cpu", shape, mesh_dim_names=names))
    d = mesh.rank("dp_shard")
    for fold, etp in cases:
        ref = GPT.build(model_config(), seed=0, block_lookup=_lookup)
        layouts: list[Any] = [
            TPLayout(TPLayout.Config(sequence_parallel=True, expert_tp=etp)),
            EPLayout(EPLayout.Config(borrow=("tp",) if fold else ())),
            FSDPLayout(),
        ]
        model = _applied(layouts, mesh)
        for step in range(2):
            batches = _batches(step, 2 * MICRO)
            ref_loss = _train(ref, batches, [])
            loss = _train(model, batches[d * MICRO : (d + 1) * MICRO], layouts)
            dist.all_reduce(loss)
            assert_rel_close(loss / 4, ref_loss, 1e-5, name=f"fold {fold}, expert tp {etp}: loss")
            named = dict(model.named_parameters())
            for pname, p in ref.named_parameters():
                assert_rel_close(named[pname].grad, p.grad, 1e-5, name=f"fold {fold}, expert tp {etp}: grad {pname}")
            norm = global_grad_norm(list(model.named_parameters()), mesh, layouts)
            assert_rel_close(norm, global_grad_norm(list(ref.named_parameters())), 1e-5, name="grad norm")
            for module in (ref, model):
                module.zero_grad(set_to_none=True)


@pytest.mark.slow
def test_tp2_x_ep_x_fsdp2_equals_one_process() -> None:
    run_distributed(_with_fsdp, 4, [(False, False), (True, False), (False, True)], timeout=600)
