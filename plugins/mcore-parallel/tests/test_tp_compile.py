"""``tp`` under ``[train] compile = "blocks"``: the compiled model gives the eager model's loss and gradients.

The core compiles each block's ``forward`` (``mcore.train.compile``) before the layouts apply, so
``tp`` parallelizes linears and swaps module classes inside blocks whose ``forward`` is already a
``torch.compile`` wrapper. Compilation is lazy and the block reaches its submodules by attribute at
run time, so the first call traces the parallelized modules: torch's parallel-style hooks and
DTensor weights, and our autograd functions (``tp_modules``: ``HeadSliceLinear``'s copy-to-group,
``VocabShardEmbedding``'s reduce-from-group). Checked on 2 gloo processes with the ``aot_eager``
backend (fast; no C++ toolchain): GQA with kv heads split (``num_kv_heads=2``) and kept whole
(``num_kv_heads=1``, the head-slice path), and the core's run loop; no graph breaks. The
``inductor`` backend is checked once, under ``slow`` (its first compile takes ~30 s on CPU).
With ``overlap_chunks`` (both sides under sequence parallelism) the overlapped parts run eagerly
(graph breaks, by design) and the results still equal eager; the linears reading a block's input
take their outputs from the chunked gather's GEMMs (none computed twice).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from parallel_run_helpers import corpus as make_corpus
from parallel_run_helpers import host as make_host
from parallel_run_helpers import metrics, run_config
from test_tp_overlap_gather import served_calls
from torch.distributed.tensor import DTensor

from mcore.config import RunConfig
from mcore.mesh import build_mesh
from mcore.train import run
from mcore.train.compile import apply_compile
from mcore_parallel.tp import TPLayout
from mcore_parallel.tp_modules import HeadSliceLinear, VocabShardEmbedding
from mcore_testing import run_distributed
from mcore_testing.numerics import assert_rel_close
from mcore_testing.reference import TinyConfig, TinyTransformer, tiny_batches


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _compiled_equals_eager(
    backend: str, kv_heads: tuple[int, ...], steps: int, sp: bool = False, overlap_chunks: int = 1
) -> None:
    """For each kv-head count: the model as the core builds it (blocks compiled, then ``tp``; the
    embedding compiled too, after ``tp``) and the eager ``tp`` model, ``steps`` SGD steps: equal loss
    and every gradient (each rank's own shard of a split weight), no graph break."""
    from torch._dynamo.utils import counters

    mesh = build_mesh(("tp",), {}, fill="tp", device_type="cpu")
    for kv in kv_heads:
        torch._dynamo.reset()  # each case compiles its own graphs (with graph breaks, pieces would be reused)
        cfg = TinyConfig(fused=False, num_heads=4, num_kv_heads=kv)
        reference = TinyTransformer(cfg, seed=0)
        config = TPLayout.Config(sequence_parallel=sp, overlap_chunks=overlap_chunks)
        eager_layout, compiled_layout = TPLayout(config), TPLayout(config)
        eager = eager_layout.apply(copy.deepcopy(reference), mesh)
        compiled = copy.deepcopy(reference)
        assert apply_compile(compiled, "blocks", backend=backend) == cfg.num_layers
        compiled = compiled_layout.apply(compiled, mesh)
        compiled.embed.forward = torch.compile(compiled.embed.forward, backend=backend)  # type: ignore[method-assign]
        assert isinstance(compiled.embed, VocabShardEmbedding)
        assert isinstance(compiled.layers[0].attn.k, HeadSliceLinear) == (kv == 1), kv
        assert isinstance(compiled.layers[0].attn.q.weight, DTensor)
        counters.clear()
        served = served_calls(compiled)  # the all-gather side: linears reading a block's input take its GEMMs
        opts = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (eager, compiled)]
        for step in range(steps):
            served.clear()
            tokens, labels = tiny_batches(1, batch_size=2, vocab_size=cfg.vocab_size, seed=40 + step)[0]
            losses = []
            for model, layout, opt in ((eager, eager_layout, opts[0]), (compiled, compiled_layout, opts[1])):
                opt.zero_grad()
                loss = model(tokens, labels=labels)
                loss.backward()
                layout.finish_grad_sync()
                losses.append(loss.detach())
            what = f"{backend} kv_heads={kv} step {step}"
            if sp and overlap_chunks > 1:  # q, k, v, gate, up of every layer, served by the chunked gather
                assert len(served) == 5 * cfg.num_layers and all(served), f"{what}: served {served}"
            assert_rel_close(losses[1], losses[0], 1e-5, name=f"{what}: loss")
            want = dict(eager.named_parameters())
            for name, p in compiled.named_parameters():
                assert p.grad is not None, f"{what}: {name} has no gradient (the compiled forward missed it)"
                if isinstance(p, DTensor):  # the compiled forward used the rank's shard, not a whole weight
                    assert isinstance(p.grad, DTensor) and p.grad.to_local().shape == p.to_local().shape, name
                assert_rel_close(_full(p.grad), _full(want[name].grad), 1e-5, name=f"{what}: grad of {name}")  # type: ignore[arg-type]
            for opt in opts:
                opt.step()
        assert counters["stats"]["unique_graphs"] >= 1, f"{backend} kv_heads={kv}: nothing was compiled"
        breaks = dict(counters["graph_break"])
        if overlap_chunks == 1:  # the overlapped linears and gathers run eagerly by design (torch.compiler.disable)
            assert not breaks, f"{backend} kv_heads={kv}: graph breaks {breaks}"


def test_compiled_blocks_equal_eager_under_tp2() -> None:
    run_distributed(_compiled_equals_eager, 2, "aot_eager", (2, 1), 2, timeout=240)


def test_compiled_blocks_equal_eager_under_tp2_with_sequence_parallelism() -> None:
    run_distributed(_compiled_equals_eager, 2, "aot_eager", (2,), 2, True, timeout=240)


@pytest.mark.slow  # CI's time: compiled tp2 and tp2 + SP run in CI, overlap's eager path in test_tp_overlap.py
def test_compiled_blocks_with_overlap_of_both_sides_equal_eager() -> None:
    """Sequence parallelism with overlap: the row side and the chunked gathers, kv heads split and kept whole."""
    run_distributed(_compiled_equals_eager, 2, "aot_eager", (2, 1), 2, True, 2, timeout=240)


@pytest.mark.slow
def test_inductor_compiled_blocks_equal_eager_under_tp2() -> None:
    run_distributed(_compiled_equals_eager, 2, "inductor", (1,), 1, timeout=300)


# -- the core's run loop: train.compile = "blocks" under parallel.layouts = ["tp"] -------------------------------
def _config(host: Any, out_dir: Path, corpus: str, compile: str) -> RunConfig:
    update = {
        "model": {"fused": False, "num_kv_heads": 1},
        "parallel": {"layouts": ["tp"]},
        "train": {"steps": 3, "global_batch_size": 4, "compile": compile, "compile_backend": "aot_eager"},
        "checkpoint": {"save_final": False},
    }
    return run_config(host, out_dir, corpus, update)


def _eager_then_compiled(root: str, corpus: str) -> None:
    from torch._dynamo.utils import counters

    host = make_host()
    run(_config(host, Path(root) / "none", corpus, "none"), host)
    counters.clear()
    run(_config(host, Path(root) / "blocks", corpus, "blocks"), host)
    assert counters["stats"]["unique_graphs"] >= 1, "train.compile = 'blocks' compiled nothing"
    assert not counters["graph_break"], dict(counters["graph_break"])
    dist.barrier()


def test_run_loop_compiled_tp2_equals_eager_tp2(tmp_path: Path) -> None:
    corpus = make_corpus(tmp_path)
    run_distributed(_eager_then_compiled, 2, str(tmp_path), corpus, timeout=240)
    eager, compiled = metrics(tmp_path / "none"), metrics(tmp_path / "blocks")
    assert sorted(compiled) == sorted(eager) == [1, 2, 3]
    for step in eager:
        for key in ("loss", "grad_norm"):
            assert compiled[step][key] == pytest.approx(eager[step][key], rel=1e-5), (step, key)
