"""``[parallel.tp] async_tp``: torch's async TP, proven as far as a CPU can.

The fused ops (``torch.ops.symm_mem.fused_all_gather_matmul`` / ``fused_matmul_reduce_scatter``) exist only in
CUDA builds and inductor's micro-pipeline pass fuses only over NCCL, so no CPU run can fuse. What a CPU run can
show is everything before the fusion: on 2 gloo processes the ``tp`` layout applies with ``async_tp`` (the CUDA
check bypassed: it is the one line that differs), enabling symmetric memory for the tp group and the pass; the
compiled blocks' graphs, as the pass sees them, are handed to torch's own pattern finders
(``find_all_gather_patterns``, ``find_reduce_scatter_patterns``, and the consumer/producer matmul finders the
fusions use), which must find in forward one token all-gather per block feeding q, k, v (gate, up) and a
reduce-scatter fed by each row-parallel GEMM, and in backward the all-gather of each row-parallel linear's
output gradient feeding its data-gradient GEMM; and the compiled model with the functional gathers gives eager
``tp2`` + SP's loss and every gradient (fp32, rel 1e-5) over 2 SGD steps, with no graph break. Captures:

* ``aot_autograd`` with inductor's decompositions, no-op views dropped and views made reshapes as inductor does
  before its post-grad passes, run as FX graphs (no C++): the gather alone (fast), the model (``slow``, ~30 s;
  key/value heads kept whole, the head-slice path);
* ``slow``: inductor itself, the graphs taken by a post-grad custom pass (which runs right after the
  micro-pipeline pass, a no-op on CPU); its first compile takes minutes on 2 cores.

What only a multi-GPU run shows: that the fusion happens (the ops replaced), its results, and its speed.
"""

from __future__ import annotations

import copy
import functools
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.distributed as dist
from parallel_run_helpers import host as make_host
from parallel_run_helpers import run_config
from torch import nn
from torch.distributed.tensor import DTensor

from mcore.mesh import build_mesh
from mcore.train.compile import apply_compile
from mcore.train.recompute import find_blocks
from mcore_parallel import tp_async
from mcore_parallel.token_comm import all_gather_tokens, fusable_gather
from mcore_parallel.tp import TPLayout
from mcore_testing import run_distributed
from mcore_testing.numerics import assert_rel_close
from mcore_testing.reference import TinyConfig, TinyTransformer, tiny_batches


# -- refusals ---------------------------------------------------------------------------------------------------
def test_config_refusals() -> None:
    assert TPLayout.Config(sequence_parallel=True, async_tp=True).async_tp
    assert not TPLayout.Config().async_tp
    with pytest.raises(ValueError, match=r"^parallel\.tp\.async_tp = 'yes'; allowed: true or false$"):
        TPLayout.Config(sequence_parallel=True, async_tp="yes")  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match=r"^parallel\.tp\.async_tp = true needs parallel\.tp\.sequence_parallel = true .*allowed: "
    ):
        TPLayout.Config(async_tp=True)
    with pytest.raises(
        ValueError, match=r"^parallel\.tp\.async_tp = true with parallel\.tp\.overlap_chunks = 4: .*allowed: one of"
    ):
        TPLayout.Config(sequence_parallel=True, async_tp=True, overlap_chunks=4)


def test_run_refused_without_inductor_blocks() -> None:
    config = TPLayout.Config(sequence_parallel=True, async_tp=True)
    for mode, backend in (("none", "inductor"), ("blocks", "aot_eager")):
        run = SimpleNamespace(
            parallel=SimpleNamespace(sizes={"tp": 2}),
            train=SimpleNamespace(seq_len=16, compile=mode, compile_backend=backend),
        )
        with pytest.raises(ValueError, match=rf"^parallel\.tp\.async_tp = true with train\.compile = '{mode}' ") as e:
            TPLayout.check_run(config, run)
        assert "\n" not in str(e.value) and "allowed: train.compile = 'blocks'" in str(e.value)
    run.train.compile_backend = "inductor"
    TPLayout.check_run(config, run)


def test_run_config_refused_at_config_time(tmp_path: Path) -> None:
    """Through the core's config resolution (``mcore config``): nothing is built."""
    tp: dict[str, Any] = {"sequence_parallel": True, "async_tp": True}
    update: dict[str, Any] = {"model": {"fused": False}, "parallel": {"layouts": ["tp"], "tp": tp}}

    def resolve() -> Any:
        return run_config(make_host(), tmp_path / "out", str(tmp_path / "corpus"), update)

    with pytest.raises(ValueError, match=r"parallel\.tp\.async_tp = true with train\.compile = 'none'") as info:
        resolve()
    assert "\n" not in str(info.value)
    update["train"] = {"compile": "blocks"}
    assert resolve().layouts[0].config.async_tp
    tp["overlap_chunks"] = 2
    with pytest.raises(ValueError, match=r"async_tp = true with parallel\.tp\.overlap_chunks = 2") as info:
        resolve()
    assert "\n" not in str(info.value)


def test_refused_at_apply_off_cuda_before_anything_changes() -> None:
    from mcore.mesh import ParallelMesh

    model = TinyTransformer(TinyConfig(fused=False), seed=0)
    before = dict(model.named_parameters())
    layout = TPLayout(TPLayout.Config(sequence_parallel=True, async_tp=True))
    mesh = ParallelMesh(dim_names=("tp",), dim_sizes=(2,), device_type="cpu")  # sizes only: no process group
    with pytest.raises(
        ValueError, match=r"^parallel\.tp\.async_tp = true, but the mesh's devices are 'cpu', .*allowed: "
    ) as info:
        layout.apply(model, mesh)
    assert "\n" not in str(info.value)
    assert all(before[n] is p for n, p in model.named_parameters()), "a parameter changed before the error"
    size_one = ParallelMesh(dim_names=("tp",), dim_sizes=(1,), device_type="cpu")
    TPLayout(TPLayout.Config(sequence_parallel=True, async_tp=True)).apply(model, size_one)  # tp 1: nothing to fuse


def test_unavailable_names_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA the remaining checks are feature detections; this CPU build lacks NCCL and the fused ops."""
    assert "symmetric memory needs CUDA" in (tp_async.unavailable("cpu") or "")
    if not dist.is_nccl_available():
        assert "has no NCCL" in (tp_async.unavailable("cuda") or "")
    monkeypatch.setattr(tp_async.dist, "is_nccl_available", lambda: True)
    if all(hasattr(torch.ops.symm_mem, op) for op in tp_async.FUSED_OPS):  # a CUDA build
        assert tp_async.unavailable("cuda") is None
    else:
        assert "torch.ops.symm_mem.fused_all_gather_matmul" in (tp_async.unavailable("cuda") or "")


# -- the graphs torch's pass sees, and equal results -----------------------------------------------------------
def _summary(graph: torch.fx.Graph) -> dict[str, Any]:
    """What torch's micro-pipeline pass finds in ``graph``: each all-gather (dim, group, the B operands' shapes
    of the matmuls it would fuse) and each reduce-scatter (dim, group, its producer matmul's B shape or None)."""
    from torch._inductor.fx_passes import micro_pipeline_tp as mp

    def shape(node: Any) -> tuple[int, ...]:
        return tuple(mp._get_tensor(node).shape)

    gathers = [
        (g.gather_dim, g.group_name, [shape(m.B_node) for m in mp._find_consumer_matmuls(g.res_node)])
        for g in mp.find_all_gather_patterns(graph)
    ]
    scatters = []
    for s in mp.find_reduce_scatter_patterns(graph):
        producer = mp._find_producer_matmul(s.input_node)
        scatters.append((s.scatter_dim, s.group_name, None if producer is None else shape(producer.B_node)))
    ops = Counter(str(n.target).split(".")[-2] for n in graph.nodes if "_c10d_functional" in str(n.target))
    return {"backward": mp._is_backward(graph), "gathers": gathers, "scatters": scatters, "ops": dict(ops)}


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _record(summaries: list[dict[str, Any]], graph: torch.fx.Graph) -> None:
    summaries.append(_summary(graph))


def _aot_capture_backend(summaries: list[dict[str, Any]]) -> Any:
    """``aot_autograd`` with inductor's decompositions; each graph, no-op views dropped and the rest made
    reshapes as inductor does before its micro-pipeline pass, summarised and run as it is."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    from torch._inductor.decomposition import select_decomp_table
    from torch._inductor.fx_passes.post_grad import remove_noop_ops, view_to_reshape

    def compiler(gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
        remove_noop_ops(gm.graph)
        view_to_reshape(gm)
        summaries.append(_summary(gm.graph))
        return make_boxed_func(gm.forward)

    return aot_autograd(fw_compiler=compiler, bw_compiler=compiler, decompositions=select_decomp_table())


def _check_graphs(summaries: list[dict[str, Any]], group_name: str, cfg: TinyConfig, *, backward_gemms: bool) -> None:
    """Every forward and backward graph (one each, or one per layer where a layer recompiles) holds what the pass
    needs (module docstring)."""
    tp, kv_heads = 2, cfg.num_kv_heads or cfg.num_heads
    hd, h, f = cfg.hidden_size // cfg.num_heads, cfg.hidden_size, cfg.ffn_size
    # B operands: local weights transposed; key/value heads split, or one head each (head slices)
    q, kv = (h, cfg.num_heads * hd // tp), (h, max(kv_heads // tp, 1) * hd)
    forward = [s for s in summaries if not s["backward"]]
    backward = [s for s in summaries if s["backward"]]
    assert 1 <= len(forward) <= cfg.num_layers and 1 <= len(backward) <= cfg.num_layers, summaries
    for fw in forward:
        assert fw["gathers"] == [(1, group_name, [q, kv, kv]), (1, group_name, [(h, f // tp)] * 2)], fw
        assert fw["scatters"] == [(1, group_name, (h // tp, h)), (1, group_name, (f // tp, h))], fw
        assert fw["ops"] == {"all_gather_into_tensor": 2, "reduce_scatter_tensor": 2, "wait_tensor": 4}, fw
    for bw in backward:  # the row-parallel linears' output gradients gathered (down's first) for their data gradients
        assert len(bw["gathers"]) == 2 and all(g[1] == group_name for g in bw["gathers"]), bw
        if backward_gemms:
            assert bw["gathers"] == [(1, group_name, [(h, f // tp)]), (1, group_name, [(h, h // tp)])], bw
        assert bw["scatters"] == [], bw  # the column-parallel input gradients are all-reduced (tp_async docstring)


def _async_tp_equals_eager(backend: str, kv_heads: int, batch_sizes: tuple[int, ...], steps: int) -> None:
    from torch._dynamo.utils import counters

    cfg = TinyConfig(fused=False, num_heads=4, num_kv_heads=kv_heads)
    mesh = build_mesh(("tp",), {}, fill="tp", device_type="cpu")
    group = mesh.group("tp")
    assert group is not None
    setattr(tp_async, "unavailable", lambda device_type: None)  # noqa: B010  # the CPU stands in for CUDA
    import torch._inductor.config as inductor_config

    for batch in batch_sizes:
        torch._dynamo.reset()
        summaries: list[dict[str, Any]] = []
        reference = TinyTransformer(cfg, seed=0)
        eager_layout = TPLayout(TPLayout.Config(sequence_parallel=True))
        eager = eager_layout.apply(copy.deepcopy(reference), mesh)
        blocks: nn.Module = copy.deepcopy(reference)
        if backend == "inductor":
            assert apply_compile(blocks, "blocks", backend="inductor") == cfg.num_layers
        else:
            capture = _aot_capture_backend(summaries)
            for block in find_blocks(blocks):
                block.forward = torch.compile(block.forward, backend=capture)  # type: ignore[method-assign]
        async_layout = TPLayout(TPLayout.Config(sequence_parallel=True, async_tp=True))
        compiled = async_layout.apply(blocks, mesh)
        assert inductor_config._micro_pipeline_tp, "apply did not switch the micro-pipeline pass on"
        local = torch.randn(batch, 4, 3)
        assert not fusable_gather(group), "eager gathers take the functional form"
        assert torch.equal(all_gather_tokens(local, group, 2).chunk(2, dim=1)[mesh.rank("tp")], local)
        counters.clear()
        opts = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (eager, compiled)]
        record = {"fx_graph_cache": False, "post_grad_custom_post_pass": functools.partial(_record, summaries)}
        for step in range(steps):
            tokens, labels = tiny_batches(1, batch_size=batch, vocab_size=cfg.vocab_size, seed=40 + step)[0]
            losses = []
            for model, layout, opt in ((eager, eager_layout, opts[0]), (compiled, async_layout, opts[1])):
                opt.zero_grad()
                with inductor_config.patch(record if backend == "inductor" and model is compiled else {}):
                    loss = model(tokens, labels=labels)
                    loss.backward()
                layout.finish_grad_sync()
                losses.append(loss.detach())
            what = f"{backend} batch {batch} step {step}"
            assert_rel_close(losses[1], losses[0], 1e-5, name=f"{what}: loss")
            want = dict(eager.named_parameters())
            for name, p in compiled.named_parameters():
                got, ref = p.grad, want[name].grad
                assert got is not None and ref is not None, f"{what}: {name} has no gradient"
                assert_rel_close(_full(got), _full(ref), 1e-5, name=f"{what}: grad of {name}")
            for opt in opts:
                opt.step()
        assert not counters["graph_break"], dict(counters["graph_break"])
        # with one row, funcol's DTensor gathers in backward are views that torch 2.13's pass finds no GEMM behind
        _check_graphs(summaries, group.group_name, cfg, backward_gemms=batch > 1)


def _gather_form() -> None:
    """``all_gather_tokens`` alone, compiled with symmetric memory enabled for its group: torch's finder sees one
    gather feeding both GEMMs, for one row and two; equal to eager."""
    mesh = build_mesh(("tp",), {}, fill="tp", device_type="cpu")
    group = mesh.group("tp")
    assert group is not None
    weights = torch.randn(2, 6, 5, generator=torch.Generator().manual_seed(0))  # (2, H, O): the same on both ranks

    def gemms(local: torch.Tensor) -> tuple[torch.Tensor, ...]:
        whole = all_gather_tokens(local, group, 2)  # (B, T, H)
        return whole, whole @ weights[0], whole @ weights[1]

    tp_async.enable(group)
    for batch in (1, 2):
        torch._dynamo.reset()
        summaries: list[dict[str, Any]] = []
        local = torch.randn(batch, 4, 6, generator=torch.Generator().manual_seed(1 + mesh.rank("tp")))
        compiled = torch.compile(gemms, backend=_aot_capture_backend(summaries))(local)
        for got, want in zip(compiled, gemms(local), strict=True):
            assert_rel_close(got, want, 1e-6, name=f"batch {batch}")
        (graph,) = summaries
        assert graph["gathers"] == [(1, group.group_name, [(6, 5), (6, 5)])], graph


def test_gather_form_under_compile() -> None:
    run_distributed(_gather_form, 2, timeout=120)


@pytest.mark.slow
def test_async_tp_graphs_match_torch_patterns_and_equal_eager() -> None:
    """aot_autograd with inductor's decompositions, one row per batch (where funcol's own token gather would be a
    view with its GEMMs out of the pass's sight, ``token_comm``), key/value heads kept whole (head slices)."""
    run_distributed(_async_tp_equals_eager, 2, "aot", 1, (1,), 2, timeout=300)


@pytest.mark.slow
def test_inductor_async_tp_graphs_match_torch_patterns_and_equal_eager() -> None:
    """inductor itself: the post-grad graphs the micro-pipeline pass works on, two rows (backward GEMMs found
    too) and one."""
    run_distributed(_async_tp_equals_eager, 2, "inductor", 2, (2, 1), 2, timeout=900)
