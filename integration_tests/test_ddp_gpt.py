"""``["ddp"]`` and ``["tp", "ddp"]`` on the real ``gpt`` model: 3 optimizer steps equal one process.

``ddp`` (mcore-parallel) buckets the gradients of the parameters ``tp`` left (DTensors over ``tp``,
plain tensors for shared key/value heads and norms) and reduces each bucket over ``dp_replicate``
during backward; ``tp`` then sums its plain gradients over its group. Each data-parallel rank reads
its half of every batch. Over 3 steps of mcore-optim's ``adamw`` (test_tp_gpt's settings: eps large
enough that Adam does not amplify float noise) the loss (averaged over the data-parallel ranks),
every gradient (full tensors, each the bucket's view) and the global gradient norm equal one
process at every step (fp32, rel 1e-5), with the layouts' ``finish_grad_sync`` called in the run
loop's order (``ddp``'s, then ``tp``'s).

The variants are test_tp_fsdp_gpt's ``gpt`` ``tiny`` ones (GQA with kv heads split by tp and kept
whole, qkv biases, tied embeddings with an MTP head, QK-norm, MLA, sizes whose halves are odd) and
packed documents (THD). The default run takes one representative case (``ddp2 x tp2``: a tied,
vocab-parallel embedding and an MTP head in ddp's buckets, packed documents); every variant under
``ddp2 x tp2`` (with and without sequence parallelism) and under ``ddp2`` alone is ``slow``.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.distributed as dist
from test_tp_fsdp_gpt import BATCH, VARIANTS, _batch, _config, _ctx, _full
from test_tp_gpt import ADAMW, STEPS
from torch.distributed.tensor import DTensor

from mcore.mesh import ParallelMesh, build_mesh
from mcore.train.grads import global_grad_norm
from mcore_models.gpt import GPT
from mcore_optim.adamw import AdamWFactory
from mcore_parallel.ddp import DDPLayout
from mcore_parallel.tp import TPLayout
from mcore_testing import run_distributed
from mcore_testing.numerics import assert_rel_close

SMALL = 0.01  # MiB: a few parameters per bucket, so buckets are reduced while backward goes on


def _mesh(tp: int) -> ParallelMesh:
    if tp == 1:
        return build_mesh(("dp_replicate",), {}, fill="dp_replicate", device_type="cpu")
    return build_mesh(("dp_replicate", "tp"), {"tp": tp}, fill="dp_replicate", device_type="cpu")


def _steps_equal_one_process(
    name: str, overrides: dict[str, Any], tp: int, *, packed: bool = False, sp: bool = False
) -> None:
    mesh = _mesh(tp)
    torch.manual_seed(0)
    cfg = _config(overrides)
    reference = GPT(cfg)
    ddp = DDPLayout(DDPLayout.Config(bucket_mb=SMALL))
    tp_layout = TPLayout(TPLayout.Config(sequence_parallel=sp)) if tp > 1 else None
    layouts: list[Any] = [tp_layout, ddp] if tp_layout is not None else [ddp]
    model = copy.deepcopy(reference)
    for layout in layouts:
        model = layout.apply(model, mesh)
    dp = ddp.data_parallel()
    what = f"{name} (ddp{dp.size}{f' x tp{tp}' if tp > 1 else ''}{' +sp' if sp else ''}{' packed' if packed else ''})"
    assert len(ddp.buckets) > 2, what
    assert any(isinstance(p, DTensor) for b in ddp.buckets for p in b.params) == (tp > 1), what
    half = slice(dp.rank * BATCH // dp.size, (dp.rank + 1) * BATCH // dp.size)
    optimizers = [AdamWFactory(ADAMW).build(m, mesh=mesh, layouts=ls) for m, ls in ((reference, []), (model, layouts))]
    for step in range(STEPS):
        tokens, labels = _batch(step, cfg.vocab_size)
        ref_loss = reference(tokens, labels=labels, ctx=_ctx(packed, BATCH))
        ref_loss.backward()
        local = (tokens[half], labels[half], _ctx(packed, BATCH // dp.size))
        local_tokens, local_labels, view = tp_layout.shard_batch(*local) if tp_layout is not None else local
        loss = model(local_tokens, labels=local_labels, ctx=view)
        loss.backward()
        for layout in reversed(layouts):  # the run loop's order: ddp's (final since backward), then tp's sums
            layout.finish_grad_sync()
        mean = loss.detach().clone()
        dist.all_reduce(mean, group=dp.group)
        assert_rel_close(mean / dp.size, ref_loss.detach(), 1e-5, name=f"{what}: loss of step {step}")
        assert all(p.grad is g for b in ddp.buckets for p, g in zip(b.params, b.grads)), f"{what}: not the buckets'"
        ref = dict(reference.named_parameters())
        for pname, p in model.named_parameters():
            want = ref[pname].grad
            assert p.grad is not None and want is not None, f"{what}: {pname} has no gradient"
            assert_rel_close(_full(p.grad), want, 1e-5, name=f"{what}: grad of {pname}, step {step}")
        norm = global_grad_norm(list(model.named_parameters()), mesh, layouts)
        assert_rel_close(norm, global_grad_norm(list(reference.parameters())), 1e-5, name=f"{what}: norm, step {step}")
        for opt in optimizers:
            opt.step()
            opt.zero_grad()


def _representative() -> None:
    _steps_equal_one_process("tied-mtp", VARIANTS["tied-mtp"], 2, packed=True)


def test_ddp2_tp2_gpt_tied_mtp_packed_equals_one_process() -> None:
    run_distributed(_representative, 4, timeout=300)


def _variants(tp: int) -> None:
    for sp in (False, True) if tp > 1 else (False,):
        for name, overrides in VARIANTS.items():
            _steps_equal_one_process(name, overrides, tp, sp=sp)
        _steps_equal_one_process("packed", {}, tp, packed=True, sp=sp)


@pytest.mark.slow
def test_ddp2_tp2_gpt_variants_equal_one_process() -> None:
    run_distributed(_variants, 4, 2, timeout=900)


@pytest.mark.slow
def test_ddp2_gpt_variants_equal_one_process() -> None:
    run_distributed(_variants, 2, 1, timeout=600)
