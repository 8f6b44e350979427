"""``["tp", "ddp"]``: tensor parallel inside, replicated data parallel outside, on 4 gloo processes
(``dp_replicate = 2`` x ``tp = 2``) in one spawned group.

In that group: a ``TinyTransformer`` (GQA: kv heads split by tp, and one kv head kept whole by tp
with its gradient summed over tp in ``tp``'s ``finish_grad_sync``, called after ``ddp``'s as the
run loop does or before it, in alternate steps: ``ddp``'s buckets were reduced during backward)
built on the meta device, split by ``tp``, bucketed by ``ddp`` and initialised afterwards, each
data-parallel rank reading half of every batch: 3 SGD steps (the second with two micro-batches, the first under both layouts'
``no_grad_sync``; ``.grad`` dropped and kept between steps) give the single-process loss, every
gradient (full tensors) and the global gradient norm (fp32, rel 1e-5), with the DTensor
parameters' ``.grad`` DTensors over the bucket views. ZeRO-1 is declined (``shard_grads`` is
``None``) and a DTensor over the whole mesh is refused. Then the core's run loop with
``parallel.layouts = ["tp", "ddp"]`` trains 3 steps; in the parent process one process trains the
same (loss and gradient norm equal) and the 4 processes' checkpoint resumes on one process.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from parallel_run_helpers import corpus as make_corpus
from parallel_run_helpers import host as make_host
from parallel_run_helpers import metrics, run_config
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from mcore.config import RunConfig
from mcore.construct import init_params
from mcore.mesh import ParallelMesh, build_mesh
from mcore.train import run
from mcore.train.grads import global_grad_norm
from mcore_parallel.ddp import DDPLayout
from mcore_parallel.tp import TPLayout
from mcore_testing import run_distributed
from mcore_testing.numerics import assert_rel_close
from mcore_testing.reference import TinyConfig, TinyTransformer, tiny_batches

GQA = TinyConfig(fused=False, num_heads=4, num_kv_heads=2)
SHARED_KV = TinyConfig(fused=False, num_heads=4, num_kv_heads=1)  # kept whole by tp, gradients summed over tp
SMALL = 0.004  # MiB: a few parameters per bucket
STEPS, TOTAL = 3, 5  # run loop: compared on 4 processes; the resumed run trains steps 4 and 5


def _mesh() -> ParallelMesh:
    return build_mesh(("dp_replicate", "tp"), {"dp_replicate": 2, "tp": 2}, device_type="cpu")


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _check_grads(model: nn.Module, reference: nn.Module, ddp: DDPLayout, what: str) -> None:
    for bucket in ddp.buckets:  # every gradient is the bucket's: autograd accumulated into the views
        for name, p, grad, view in zip(bucket.names, bucket.params, bucket.grads, bucket.views):
            assert p.grad is grad, f"{what}: {name}'s .grad is not its bucket's"
            if isinstance(p, DTensor):  # a DTensor over the view, laid out like the parameter
                assert isinstance(grad, DTensor) and grad.placements == p.placements, (name, grad)
                assert grad.device_mesh == p.device_mesh and grad.to_local().data_ptr() == view.data_ptr(), name
    ref = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        assert p.grad is not None and ref[name].grad is not None, f"{what}: {name} has no gradient"
        assert_rel_close(_full(p.grad), ref[name].grad, 1e-5, name=f"{what}: grad of {name}")  # type: ignore[arg-type]


def _sgd_steps_equal_one_process(mesh: ParallelMesh, cfg: TinyConfig) -> None:
    with torch.device("meta"):
        meta = TinyTransformer(cfg, seed=0)
    reference = copy.deepcopy(meta)
    init_params(reference, seed=5, device="cpu")
    tp, ddp = TPLayout(), DDPLayout(DDPLayout.Config(bucket_mb=SMALL))
    model = ddp.apply(tp.apply(meta, mesh), mesh)
    assert ddp.buckets == (), "buckets built on the meta device"
    init_params(model, seed=5, device="cpu")
    layouts: list[TPLayout | DDPLayout] = [tp, ddp]
    assert ddp.shard_grads() is None, "ZeRO-1 over tensor-parallel shards is declined"
    layer: Any = model.get_submodule("layers.0")
    assert isinstance(layer.attn.k.weight, DTensor) == (cfg.num_kv_heads == 2)
    assert ddp.data_parallel().size == 2 and tp.data_parallel().size == 1
    dp_rank, dp_group = mesh.rank("dp_replicate"), mesh.group("dp_replicate")
    rows = slice(2 * dp_rank, 2 * dp_rank + 2)  # this data-parallel rank's half of each batch of 4
    opts = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (reference, model)]
    for step in range(3):
        micro = tiny_batches(2 if step == 1 else 1, batch_size=4, vocab_size=cfg.vocab_size, seed=40 + step)
        opts[0].zero_grad()
        opts[1].zero_grad(set_to_none=step != 2)  # dropped .grad (copied into the views), then kept
        ref_loss = sum(reference(t, labels=y) for t, y in micro) / len(micro)
        ref_loss.backward()  # type: ignore[union-attr]
        loss = torch.zeros(())
        for i, (t, y) in enumerate(micro):
            with contextlib.ExitStack() as stack:
                if i < len(micro) - 1:
                    for layout in layouts:
                        stack.enter_context(layout.no_grad_sync())
                part = model(t[rows], labels=y[rows]) / len(micro)
                part.backward()
                loss += part.detach()
            issued = ddp.buckets_issued
            assert issued == (0 if i < len(micro) - 1 else len(ddp.buckets)), (step, i, issued)
        # the run loop's order (ddp's, then tp's sums of the shared kv gradients in ddp's buckets), and the other
        for layout in reversed(layouts) if step % 2 == 0 else layouts:
            layout.finish_grad_sync()
        dist.all_reduce(loss, group=dp_group)
        what = f"kv heads {cfg.num_kv_heads}, step {step}"
        assert_rel_close(loss / 2, ref_loss.detach(), 1e-5, name=f"{what}: loss")  # type: ignore[union-attr]
        _check_grads(model, reference, ddp, what)
        norm = global_grad_norm(list(model.named_parameters()), mesh, layouts)
        assert_rel_close(norm, global_grad_norm(list(reference.parameters())), 1e-5, name=f"{what}: norm")
        for opt in opts:
            opt.step()
    assert len(ddp.buckets) > 2 and any(isinstance(p, DTensor) for b in ddp.buckets for p in b.params)


def _dtensor_over_the_whole_mesh_refused(mesh: ParallelMesh) -> None:
    model = nn.Linear(4, 4, bias=False)
    device_mesh = mesh.submesh(["dp_replicate", "tp"])
    weight = distribute_tensor(model.weight.detach(), device_mesh, [Replicate(), Shard(0)])
    model.weight = nn.Parameter(weight)
    with pytest.raises(ValueError, match=r"^parameter 'weight' is a DTensor over mesh dims \('dp_replicate', 'tp'\)"):
        DDPLayout().apply(model, mesh)


def _config(
    host: Any, out_dir: Path, corpus: str, *, layouts: list[str], sizes: dict[str, int], resume: str = "none"
) -> RunConfig:
    parallel = {"layouts": layouts, "sizes": sizes, **({"ddp": {"bucket_mb": 0.01}} if "ddp" in layouts else {})}
    # 2 micro-batches per data-parallel rank on 4 processes, 4 on one
    train = {"steps": TOTAL, "global_batch_size": 8, "resume": resume}
    return run_config(host, out_dir, corpus, {"model": {"fused": False}, "parallel": parallel, "train": train})


def _four_ranks(root: str, corpus: str) -> None:
    torch.manual_seed(0)
    mesh = _mesh()
    for cfg in (GQA, SHARED_KV):
        _sgd_steps_equal_one_process(mesh, cfg)
    _dtensor_over_the_whole_mesh_refused(mesh)
    host = make_host()
    config = _config(host, Path(root) / "tp2_ddp2", corpus, layouts=["tp", "ddp"], sizes={"tp": 2, "dp_replicate": 2})
    run(config, host, stop_at_step=STEPS)
    dist.barrier()


def test_tp2_ddp2_equals_one_process_and_resumes_on_one(tmp_path: Path) -> None:
    corpus = make_corpus(tmp_path)
    run_distributed(_four_ranks, 4, str(tmp_path), corpus, timeout=300)
    host = make_host()
    one = run(_config(host, tmp_path / "one", corpus, layouts=["single"], sizes={}), host)
    four, ref = metrics(tmp_path / "tp2_ddp2"), metrics(tmp_path / "one")
    for step in range(1, STEPS + 1):
        for key in ("loss", "grad_norm"):
            assert four[step][key] == pytest.approx(ref[step][key], rel=1e-5), (step, key)
    ckpt = tmp_path / "tp2_ddp2" / "checkpoints" / f"step_{STEPS:08d}"
    resumed = run(_config(host, tmp_path / "resumed", corpus, layouts=["tp", "ddp"], sizes={}, resume=str(ckpt)), host)
    assert resumed.start_step == STEPS
    for step in range(STEPS + 1, TOTAL + 1):
        assert resumed.losses[step] == pytest.approx(one.losses[step], rel=1e-5), step
