"""``pp`` on the real ``gpt`` model: pp2, pp4, interleaved, zero bubble, with tp and fsdp, equal one process.

One spawned group of 4 gloo ranks runs each case: ``pp4`` over all of them, ``pp2`` twice side by side
(a ``dp_replicate`` dimension of 2 that nothing reads), ``pp2 x tp2`` (``pp`` applied first, as
``parallel.layouts = ["pp", "tp"]`` does), ``pp2 x fsdp2`` (``["pp", "fsdp"]``: each data-parallel
rank reads its half of every micro-batch, fsdp reduce-scatters after each stage's last micro-batch)
``pp2 x cp2`` (``["pp", "cp"]``: every micro-batch zig-zag split by ``shard_batch`` before the
schedule, the loss group in its context; the ranks' losses summed over ``cp``) and ``pp2 x ddp2``
(``["pp", "ddp"]``: buckets all-reduced once, after each stage's last micro-batch).
Each case trains 3 SGD steps of a ``gpt`` ``tiny`` variant through the layout's ``forward_backward``
with 4 to 8 micro-batches, calls the layouts' ``finish_grad_sync`` in the run loop's order, and checks
the loss (on every rank), every gradient and the global gradient norm against one process (fp32,
rel 1e-5) at every step: 1F1B, interleaved (v = 2), ZB-H1; uneven stages (``first_stage_layers``,
an explicit split with an embedding-only first stage); tied embeddings and MTP on the last stage
(the embedding held by the first and the last stage, its gradient summed and counted once); packed
documents with micro-batches of different lengths (shapes sent ahead of each activation). After the
steps, ``forward_only`` (evaluation) on 3 micro-batches gives the one-process loss. The fast test runs
a representative set; the whole cross product is ``slow``.

The run loop: ``["pp", "fsdp"]`` (pp2 x fsdp2) on 4 processes trains ``tiny`` (tied embeddings, AdamW,
two micro-batches per data-parallel rank, clipping active) like one process (loss and gradient
norm of 5 steps); its step-3 checkpoint resumes under pp2 x fsdp2 bit for bit, and under fsdp4 and pp4
(the same 4 ranks) and on one process (pp1) with the one-process losses.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from run_helpers import merged, metrics, run_update
from torch.distributed.tensor import DTensor

from mcore.config import resolve_config
from mcore.data.shards import prepare
from mcore.data.sources import iter_documents
from mcore.mesh import ParallelMesh, build_mesh
from mcore.protocols import BlockContext
from mcore.train import run
from mcore.train.grads import global_grad_norm
from mcore_fsdp.layout import FSDPLayout
from mcore_models.gpt import GPT
from mcore_models.presets import preset_config
from mcore_parallel.cp import CPLayout
from mcore_parallel.ddp import DDPLayout
from mcore_parallel.pp import PPLayout, StageChunks
from mcore_parallel.tp import TPLayout
from mcore_testing import run_distributed
from mcore_testing.hosts import isolated_host
from mcore_testing.numerics import assert_rel_close

VOCAB, STEPS = 128, 3
VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {},
    "tied": {"tie_embeddings": True},
    "mtp": {"mtp_num_layers": 1},
    "tied-mtp": {"tie_embeddings": True, "mtp_num_layers": 1},
}


class _FP32:
    """The default recipe's behaviour: no autocast, the loss unscaled."""

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss


def _mesh(key: str) -> ParallelMesh:
    if key == "pp4":
        return build_mesh(("pp",), {}, fill="pp", device_type="cpu")
    if key == "pp2 x tp2":
        return build_mesh(("pp", "tp"), {"tp": 2}, fill="pp", device_type="cpu")
    if key == "pp2 x cp2":
        return build_mesh(("pp", "cp"), {"pp": 2}, fill="cp", device_type="cpu")
    if key == "pp2 x fsdp2":
        return build_mesh(("pp", "dp_shard"), {"pp": 2}, fill="dp_shard", device_type="cpu")
    return build_mesh(("dp_replicate", "pp"), {"pp": 2}, fill="dp_replicate", device_type="cpu")


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _micro_batches(step: int, count: int, rows: int, packed: bool) -> list[tuple[torch.Tensor, torch.Tensor, bool]]:
    """``count`` micro-batches of ``rows`` rows; packed: lengths 16 and 12 alternately, documents across rows."""
    g = torch.Generator().manual_seed(100 + step)
    out = []
    for i in range(count):
        seq = 16 - 4 * (i % 2) if packed else 16
        tokens = torch.randint(0, VOCAB, (rows, seq), generator=g)
        labels = torch.randint(0, VOCAB, (rows, seq), generator=g)
        out.append((tokens, labels, packed))
    return out


def _ctx(tokens: torch.Tensor, packed: bool) -> BlockContext:
    """Two documents per pair of rows, one across the row end."""
    if not packed:
        return BlockContext()
    rows, seq = tokens.shape
    bounds = [0] + [b + 2 * seq * k for k in range(rows // 2) for b in (5, seq + 3, 2 * seq)]
    return BlockContext(cu_seqlens=torch.tensor(bounds, dtype=torch.int32))


def _shard(layouts: list[Any], tokens: torch.Tensor, labels: torch.Tensor, ctx: BlockContext) -> Any:
    """A micro-batch through the batch-sharding layouts, the loss group in its context (the run loop's ``shard``)."""
    for layout in layouts:
        if callable(getattr(layout, "shard_batch", None)):
            tokens, labels, ctx = layout.shard_batch(tokens, labels, ctx)
            group = layout.loss_group()
            if group is not None:
                ctx = dataclasses.replace(ctx, loss_group=group)
    return tokens, labels, ctx


@contextlib.contextmanager
def _all(layouts: list[Any]) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for layout in layouts:
            stack.enter_context(layout.no_grad_sync())
        yield


def _check(key: str, schedule: str, variant: str, packed: bool, cut: dict[str, Any], mesh: ParallelMesh) -> None:
    name = f"{key} {schedule} {variant}{' packed' if packed else ''} {cut or ''}"
    layers = cut.pop("num_layers", 4)
    virtual = 2 if schedule == "interleaved" else 1
    torch.manual_seed(0)
    cfg = preset_config("tiny", vocab_size=VOCAB, max_position_embeddings=64, num_layers=layers, **VARIANTS[variant])
    reference = GPT(cfg)
    pp = PPLayout(PPLayout.Config(schedule=schedule, virtual_stages=virtual, **cut))
    layouts: list[Any] = [pp]
    model = pp.apply(copy.deepcopy(reference), mesh)
    if virtual > 1:
        assert isinstance(model, StageChunks) and not any("chunk" in n for n, _ in model.named_parameters()), name
    if "tp" in key:
        layouts.append(TPLayout())
    if "fsdp" in key:
        layouts.append(FSDPLayout())
    if "cp" in key:
        layouts.append(CPLayout())
    if "ddp" in key:
        layouts.append(DDPLayout())
    for layout in layouts[1:]:
        model = layout.apply(model, mesh)
    dp = layouts[-1].data_parallel()
    opts = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (reference, model)]
    count = 8 if schedule == "interleaved" and key == "pp4" else 4
    part = slice(2 * dp.rank, 2 * dp.rank + 2)  # this data-parallel rank's rows of every micro-batch
    for step in range(STEPS):
        batches = _micro_batches(step, count, 2 * dp.size, packed)
        for opt in opts:
            opt.zero_grad()
        want = torch.zeros(())
        for tokens, labels, _ in batches:
            loss = reference(tokens, labels=labels, ctx=_ctx(tokens, packed))
            (loss / count).backward()
            want += loss.detach() / count
        local = []
        for tokens, labels, _ in batches:
            view = _ctx(tokens[part], packed)
            local.append(_shard(layouts, tokens[part], labels[part], view))
        got = pp.forward_backward(model, local, precision=_FP32(), no_grad_sync=lambda: _all(layouts))
        for layout in reversed(layouts):
            layout.finish_grad_sync()
        if dp.size > 1:
            dist.all_reduce(got, group=dp.group)
            got /= dp.size
        if "cp" in key:
            dist.all_reduce(got, group=layouts[1].loss_group())
        assert_rel_close(got, want, 1e-5, name=f"{name} step {step}: loss")
        ref = dict(reference.named_parameters())
        for pname, p in model.named_parameters():
            assert p.grad is not None and ref[pname].grad is not None, f"{name}: {pname} has no gradient"
            assert_rel_close(_full(p.grad), ref[pname].grad, 1e-5, name=f"{name} step {step}: grad of {pname}")
        norm = global_grad_norm(list(model.named_parameters()), mesh, layouts)
        assert_rel_close(norm, global_grad_norm(list(reference.parameters())), 1e-5, name=f"{name}: norm {step}")
        for opt in opts:
            opt.step()
    with torch.no_grad():  # evaluation: forwards only, any micro-batch count (3 is no multiple of pp)
        want = sum(reference(t, labels=y, ctx=_ctx(t, packed)) for t, y, _ in batches[:3]) / 3
    local = [_shard(layouts, t[part], y[part], _ctx(t[part], packed)) for t, y, _ in batches[:3]]
    got = pp.forward_only(model, local, precision=_FP32())
    if "cp" in key:  # each cp rank's loss is its tokens' share
        dist.all_reduce(got, group=layouts[1].loss_group())
    if dp.size > 1:
        dist.all_reduce(got, group=dp.group)
        got /= dp.size
    assert_rel_close(got, want, 1e-5, name=f"{name}: evaluation loss")


def _run(cases: list[tuple[str, str, str, bool, dict[str, Any]]]) -> None:
    meshes = {key: _mesh(key) for key in sorted({c[0] for c in cases})}
    for key, schedule, variant, packed, cut in cases:
        _check(key, schedule, variant, packed, dict(cut), meshes[key])


FAST: list[tuple[str, str, str, bool, dict[str, Any]]] = [
    ("pp4", "1f1b", "plain", True, {}),
    ("pp2", "interleaved", "tied", False, {}),
    ("pp4", "zb-h1", "mtp", False, {"num_layers": 5}),
    ("pp2", "1f1b", "tied-mtp", True, {"num_layers": 3, "first_stage_layers": 1}),
    ("pp4", "1f1b", "tied", False, {"split": [0, 2, 1, 1]}),  # an embedding-only first stage
    ("pp2 x tp2", "1f1b", "tied-mtp", False, {}),
    ("pp2 x fsdp2", "1f1b", "tied", False, {}),
    ("pp2 x cp2", "zb-h1", "tied", True, {}),
    ("pp2 x ddp2", "1f1b", "tied", True, {}),
]
ALL = [
    (key, schedule, variant, packed, cut)
    for key in ("pp2", "pp4", "pp2 x tp2", "pp2 x fsdp2", "pp2 x cp2", "pp2 x ddp2")
    for schedule in ("1f1b", "interleaved", "zb-h1")
    for variant in VARIANTS
    for packed in (False, True)
    for cut in ({"num_layers": 8} if schedule == "interleaved" and key == "pp4" else {},)
    # refused: zero bubble with data-parallel layouts, interleaved with ddp; MTP under cp is in test_cp_gpt.py
    if not (schedule == "zb-h1" and ("fsdp" in key or "ddp" in key))
    and not (schedule == "interleaved" and "ddp" in key)
    and not ("cp" in key and "mtp" in variant)
]


def test_pp_gpt_equals_one_process() -> None:
    run_distributed(_run, 4, FAST, timeout=400)


@pytest.mark.slow
def test_pp_gpt_every_case_equals_one_process() -> None:
    run_distributed(_run, 4, [c for c in ALL if c not in FAST], timeout=1800)


# -- the run loop: pp2 x fsdp2 on 4 processes, resumed bit for bit, resharded onto pp1, pp4 and fsdp4 ------------
CUT, TOTAL = 3, 5
RUN_BASE: dict[str, Any] = {
    "model": {"name": "gpt", "preset": "tiny", "max_position_embeddings": 64, "tie_embeddings": True, "num_layers": 4},
    "optimizer": {"name": "adamw", "lr": 3e-3, "eps": 1e-6},
    "train": {
        "steps": TOTAL,
        "seq_len": 32,
        "global_batch_size": 8,
        "micro_batch_size": 2,  # 2 micro-batches per data-parallel rank under pp2 x fsdp2
        "warmup_steps": 1,
        "grad_clip": 0.5,
        "deterministic": True,
        "cpu_threads": 1,
        "resume": "none",
    },
    "data": {"workers": 0, "packing": "concat"},
    "log": {"progress": "none", "tensorboard": False, "plot": False, "every": 1},
    "checkpoint": {"async_save": False, "save_final": True},
}
PP_FSDP = {"layouts": ["pp", "fsdp"], "sizes": {"pp": 2}}


def _host() -> Any:
    plugins = ("mcore_models.plugin", "mcore_optim.plugin", "mcore_parallel.plugin", "mcore_fsdp.plugin")
    return isolated_host(*plugins)


def _run_config(out_dir: Path, corpus: str, parallel: dict[str, Any], train: dict[str, Any] | None = None) -> Any:
    return resolve_config(merged(RUN_BASE, run_update(out_dir, corpus, parallel, train, every=CUT)), _host())


def _four_ranks(root: str, corpus: str) -> None:
    root_path, host = Path(root), _host()
    run(_run_config(root_path / "pp_fsdp", corpus, PP_FSDP), host)
    ckpt = str(root_path / "pp_fsdp" / "checkpoints" / f"step_{CUT:08d}")
    again = run(_run_config(root_path / "again", corpus, PP_FSDP, {"resume": ckpt}), host)
    assert again.start_step == CUT
    fsdp4 = run(_run_config(root_path / "fsdp4", corpus, {"layouts": ["fsdp"]}, {"resume": ckpt}), host)
    assert fsdp4.start_step == CUT  # the same 4 ranks, each now holding every stage's parameters
    pp4 = run(_run_config(root_path / "pp4", corpus, {"layouts": ["pp"], "sizes": {"pp": 4}}, {"resume": ckpt}), host)
    assert pp4.start_step == CUT  # one layer per rank, the tied embedding on ranks 0 and 3
    dist.barrier()


def test_run_pp2_fsdp2_equals_one_process_resumes_and_reshards_onto_pp1_pp4_fsdp4(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    prepare(iter_documents("stdlib"), corpus, tokenizer_spec="byte", workers=0, max_tokens=30_000)
    run_distributed(_four_ranks, 4, str(tmp_path), str(corpus), timeout=600)
    run(_run_config(tmp_path / "one", str(corpus), {"layouts": ["single"]}), _host())
    ckpt = str(tmp_path / "pp_fsdp" / "checkpoints" / f"step_{CUT:08d}")
    pp1 = run(_run_config(tmp_path / "pp1", str(corpus), {"layouts": ["single"]}, {"resume": ckpt}), _host())
    assert pp1.start_step == CUT
    ref, four, again, fsdp4, pp4 = (metrics(tmp_path / n) for n in ("one", "pp_fsdp", "again", "fsdp4", "pp4"))
    for step in range(1, TOTAL + 1):
        for key in ("loss", "grad_norm"):
            assert four[step][key] == pytest.approx(ref[step][key], rel=1e-5), (step, key)
    for step in range(CUT + 1, TOTAL + 1):
        assert again[step]["loss"] == four[step]["loss"], step  # resumed bit for bit
        assert pp1.losses[step] == pytest.approx(ref[step]["loss"], rel=1e-5), step  # resharded onto pp1
        assert fsdp4[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-5), step  # resharded onto fsdp4
        assert pp4[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-5), step  # resharded onto pp4
