"""``["tp", "fsdp"]`` and ``["tp", "hsdp"]`` on the real ``gpt`` model: 4 gloo ranks equal one process.

``fsdp`` (mcore-fsdp) accepts the DTensor parameters ``tp`` (mcore-parallel) leaves, as FSDP2 does:
each tp-local tensor is split by rows over ``dp_shard`` and the parameter becomes one DTensor over
``(dp_shard, tp)`` (``hsdp``: ``(dp_replicate, dp_shard, tp)``); rows tp already splits take FSDP2's
``_StridedShard(0, split_factor=tp)``, so ``full_tensor()`` is the one-process parameter. Plain
parameters (norm scales, key/value heads shared by ranks, QK-norm scales) are sharded over the dp
dims only.

One spawned group of 4 ranks (``tp2 x fsdp2``, and ``tp2 x hsdp 2x1``) runs ``gpt`` ``tiny`` variants:
GQA with kv heads split by tp and with one kv head kept whole by tp (qkv biases in both), tied embeddings
with an MTP head, QK-norm, MLA, packed documents, and sizes whose tp-local rows do not divide by
``dp_shard`` (the last rank holds fewer). Over 3 steps of mcore-optim's ``adamw`` (on the 2-D
DTensors here, on plain tensors for the one-process run) the loss, every gradient (full tensors)
and the global gradient norm equal one process at every step (fp32, rel 1e-5), with each rank
reading its data-parallel half of every batch and the layouts' ``finish_grad_sync`` called in the
run loop's order (fsdp's, then tp's). Also: ``bf16`` gathers with fp32 reductions (bf16 tolerance);
a precision recipe's own gather format (int8 rows) on tp-local rows; meta-device construction
through ``build_parts`` gives the one-process weights bit for bit; keeping tp parameters whole
(``whole_params``) is a one-line error. The full cross product (every variant under hsdp
2x1 and 1x2, with sequence parallelism) is ``slow``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard

from mcore.config import resolve_config
from mcore.mesh import ParallelMesh, build_mesh
from mcore.protocols import BlockContext, GatherPayload
from mcore.train.build import build_parts, builds_on_meta
from mcore.train.grads import global_grad_norm
from mcore_fsdp.layout import FSDPLayout, HSDPLayout
from mcore_models.gpt import GPT
from mcore_models.presets import preset_config
from mcore_optim.adamw import AdamWFactory
from mcore_parallel.tp import TPLayout
from mcore_parallel.tp_modules import HeadSliceLinear
from mcore_testing import run_distributed
from mcore_testing.hosts import isolated_host
from mcore_testing.numerics import assert_rel_close

VOCAB, SEQ, BATCH, STEPS = 128, 16, 4, 3
#: tp-local rows that do not divide by dp_shard = 2: vocab 130 -> 65 rows, ffn 178 -> 89 (the last rank one fewer)
UNEVEN: dict[str, Any] = {"vocab_size": 130, "swiglu": {"ffn_hidden_size": 178}}
VARIANTS: dict[str, dict[str, Any]] = {
    "gqa-split": {"attention": {"qkv_bias": True}},  # biases: 1-D rows split by tp, then by fsdp
    "gqa-shared-kv": {"attention": {"num_heads": 4, "num_kv_heads": 1, "qkv_bias": True}},
    "tied-mtp": {"tie_embeddings": True, "mtp_num_layers": 1},
    "qk-norm": {"attention": {"qk_norm": True}},
    "mla": {"mixer": "mla", "mla": {"num_heads": 4}},
    "uneven": UNEVEN,
}
#: eps well above the float noise of near-zero gradients (a tiny model has some of ~1e-9, whose rounding
#: under another summation order Adam's normalisation would turn into a visible update difference)
ADAMW = AdamWFactory.Config(lr=1e-3, eps=1e-6)
#: what CI runs under hsdp 2x1 (the rest of the cross product is slow)
HSDP_CI = ("gqa-shared-kv", "tied-mtp")
#: the variants CI runs under tp2 x fsdp2 (CI's time); the others run in the slow cross product
FSDP_CI = ("gqa-shared-kv", "tied-mtp", "mla", "uneven")


def _config(overrides: dict[str, Any]) -> Any:
    return preset_config("tiny", **{"vocab_size": VOCAB, "max_position_embeddings": 64, **overrides})


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _mesh(kind: str) -> ParallelMesh:
    if kind == "fsdp":
        return build_mesh(("dp_shard", "tp"), {"tp": 2}, fill="dp_shard", device_type="cpu")
    replicate = 2 if kind == "hsdp2x1" else 1
    sizes = {"dp_replicate": replicate, "dp_shard": 2 // replicate, "tp": 2}
    return build_mesh(("dp_replicate", "dp_shard", "tp"), sizes, device_type="cpu")


def _batch(step: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, vocab, (BATCH, SEQ), generator=g), torch.randint(0, vocab, (BATCH, SEQ), generator=g)


def _ctx(packed: bool, rows: int) -> BlockContext:
    """Documents of 5, 11, 11 and 5 tokens per two rows (none crosses a data-parallel half)."""
    if not packed:
        return BlockContext()
    bounds = [0] + [b + 32 * k for k in range(rows // 2) for b in (5, 16, 27, 32)]
    return BlockContext(cu_seqlens=torch.tensor(bounds, dtype=torch.int32))


def _check_placements(name: str, model: nn.Module, kind: str) -> None:
    """Column rows strided over the dp dim (FSDP2's), row linears (Shard(0), Shard(1)), plain ones over dp only."""
    strided = _StridedShard(0, split_factor=2)  # FSDP2's placement for rows tp already splits over 2 ranks
    lead: tuple[Any, ...] = () if kind == "fsdp" else (Replicate(),)
    dims = ("dp_shard", "tp") if kind == "fsdp" else ("dp_replicate", "dp_shard", "tp")
    layer: Any = model.get_submodule("layers.0")
    mlp = layer.mlp
    assert mlp.gate.weight.placements == (*lead, strided, Shard(0)), (name, mlp.gate.weight.placements)
    assert mlp.down.weight.placements == (*lead, Shard(0), Shard(1)), (name, mlp.down.weight.placements)
    assert mlp.gate.weight.device_mesh.mesh_dim_names == dims, name
    norm = layer.mlp_norm.weight
    assert norm.placements == (*lead, Shard(0)) and norm.device_mesh.mesh_dim_names == dims[:-1], name


def _steps_equal_one_process(
    name: str, overrides: dict[str, Any], kind: str, *, packed: bool = False, sp: bool = False, overlap: int = 1
) -> None:
    mesh = _mesh(kind)
    torch.manual_seed(0)
    cfg = _config(overrides)
    reference = GPT(cfg)
    tp = TPLayout(TPLayout.Config(sequence_parallel=sp, overlap_chunks=overlap))
    dp_layout = FSDPLayout() if kind == "fsdp" else HSDPLayout()
    model = dp_layout.apply(tp.apply(copy.deepcopy(reference), mesh), mesh)
    layouts: list[Any] = [tp, dp_layout]
    what = f"{name} ({'tp2 x ' + kind}{' +sp' if sp else ''}{' packed' if packed else ''}"
    what += f" +overlap {overlap})" if overlap > 1 else ")"
    _check_placements(what, model, kind)
    if "num_kv_heads" in overrides.get("attention", {}):
        assert isinstance(model.get_submodule("layers.0.attention.k"), HeadSliceLinear), what
    if overrides is UNEVEN and kind == "fsdp":  # 89 tp-local rows: 45 on dp_shard rank 0, 44 on rank 1
        rows = model.get_submodule("layers.0.mlp.gate").weight.to_local().shape[0]
        assert rows == (45 if mesh.rank("dp_shard") == 0 else 44), (what, rows)
    vocab = cfg.vocab_size
    dp = dp_layout.data_parallel()
    half = slice(dp.rank * BATCH // dp.size, (dp.rank + 1) * BATCH // dp.size)
    optimizers = [AdamWFactory(ADAMW).build(m, mesh=mesh, layouts=ls) for m, ls in ((reference, []), (model, layouts))]
    for step in range(STEPS):
        tokens, labels = _batch(step, vocab)
        ref_loss = reference(tokens, labels=labels, ctx=_ctx(packed, BATCH))
        ref_loss.backward()
        local_tokens, local_labels, view = tp.shard_batch(tokens[half], labels[half], _ctx(packed, BATCH // dp.size))
        loss = model(local_tokens, labels=local_labels, ctx=view)
        loss.backward()
        for layout in reversed(layouts):  # the run loop's order: fsdp's reductions, then tp's sums over them
            layout.finish_grad_sync()
        mean = loss.detach().clone()
        dist.all_reduce(mean, group=dp.group)
        assert_rel_close(mean / dp.size, ref_loss.detach(), 1e-5, name=f"{what}: loss of step {step}")
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
    ref = dict(reference.named_parameters())
    for pname, p in model.named_parameters():  # the last update (Adam's steps of ~lr from zero-initialised biases)
        assert_rel_close(_full(p.detach()), ref[pname].detach(), 1e-4, name=f"{what}: {pname} after {STEPS} steps")


# -- precision -------------------------------------------------------------------------------------
def _bf16_gathers(kind: str) -> None:
    """bf16 gathers and compute on tp-local rows, fp32 reductions: the one-process fp32 loss and gradients
    to bf16 tolerance, gradients and shards in fp32."""
    mesh = _mesh(kind)
    torch.manual_seed(0)
    reference = GPT(_config({}))
    tp, fsdp = TPLayout(), FSDPLayout(FSDPLayout.Config(param_dtype="bf16", reduce_dtype="fp32"))
    model = fsdp.apply(tp.apply(copy.deepcopy(reference), mesh), mesh)
    dp = fsdp.data_parallel()
    tokens, labels = _batch(0, VOCAB)
    half = slice(dp.rank * BATCH // dp.size, (dp.rank + 1) * BATCH // dp.size)
    reference(tokens, labels=labels).backward()
    loss = model(tokens[half], labels=labels[half])
    loss.backward()
    fsdp.finish_grad_sync()
    tp.finish_grad_sync()
    ref = dict(reference.named_parameters())
    for pname, p in model.named_parameters():
        assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32, pname
        assert_rel_close(_full(p.grad), ref[pname].grad, 2e-2, name=f"bf16 gathers: grad of {pname}")  # type: ignore[arg-type]


class RowInt8:
    """A precision recipe gathering 2-D weights as int8 rows with one fp32 scale each (per-row, so tp-local
    rows give the same values as whole rows)."""

    param_dtype = torch.float32
    reduce_dtype = torch.float32

    def __init__(self) -> None:
        self.shapes: dict[str, tuple[int, ...]] = {}  # the last shard each parameter was gathered from

    def gather_payload(self, shard: torch.Tensor, *, name: str = "", spec: Any = None) -> GatherPayload | None:
        if shard.dim() != 2:
            return None
        self.shapes[name] = tuple(shard.shape)
        q, scale = _quantize_rows(shard)
        return GatherPayload(tensors=(q, scale), metadata=shard.dtype)

    def unpack(self, gathered: tuple[torch.Tensor, ...], metadata: Any) -> torch.Tensor:
        q, scale = gathered
        return (q.float() * scale).to(metadata)


def _quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = w.detach().float().abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127.0  # (rows, 1)
    return torch.round(w.detach().float() / scale).to(torch.int8), scale


def _int8_gathers() -> None:
    """The recipe's payload is made from this rank's rows of the tp-local tensor (a row-parallel weight's
    rows hold half the columns): the loss equals one process on weights round-tripped through int8 rows
    of the same pieces."""
    mesh = _mesh("fsdp")
    torch.manual_seed(0)
    cfg = _config(UNEVEN)
    reference = GPT(cfg)
    tp, fsdp, recipe = TPLayout(), FSDPLayout(), RowInt8()
    model = fsdp.apply(tp.apply(copy.deepcopy(reference), mesh), mesh, recipe)  # type: ignore[arg-type]
    column_halves = {f"{path}.weight" for path in tp.plan.rowwise}
    with torch.no_grad():
        for name, p in reference.named_parameters():
            for piece in p.chunk(2, dim=1) if name in column_halves else [p] if p.dim() == 2 else []:
                q, scale = _quantize_rows(piece)
                piece.copy_(q.float() * scale)
    dp = fsdp.data_parallel()
    tokens, labels = _batch(0, cfg.vocab_size)
    half = slice(dp.rank * BATCH // dp.size, (dp.rank + 1) * BATCH // dp.size)
    loss = model(tokens[half], labels=labels[half]).detach()
    assert recipe.shapes["layers.0.mlp.gate.weight"] == (45, 64)  # ceil(89 / 2) tp-local rows (padded chunk)
    assert recipe.shapes["layers.0.mlp.down.weight"] == (32, 89)  # 64 rows of the 89 tp-local columns
    dist.all_reduce(loss, group=dp.group)
    assert_rel_close(loss / dp.size, reference(tokens, labels=labels).detach(), 1e-5, name="int8 row gathers")


# -- meta-device construction ------------------------------------------------------------------------
META_MODEL: dict[str, Any] = {"name": "gpt", "preset": "tiny", "max_position_embeddings": 64, **UNEVEN}
META_CASES: dict[str, dict[str, Any]] = {
    "tp2 x fsdp2": {"layouts": ["tp", "fsdp"], "sizes": {"tp": 2}},
    "tp2 x hsdp 2x1": {"layouts": ["tp", "hsdp"], "sizes": {"tp": 2, "dp_replicate": 2, "dp_shard": 1}},
}


def _meta_host() -> Any:
    return isolated_host("mcore_models.plugin", "mcore_fsdp.plugin", "mcore_parallel.plugin", "mcore_testing.plugin")


def _meta_config(parallel: dict[str, Any] | None = None) -> Any:
    raw = {
        "model": META_MODEL,
        "optimizer": {"name": "reference-adamw"},
        "train": {"seed": 5, "seq_len": SEQ},
        "parallel": {"device": "cpu", **(parallel or {})},
    }
    return resolve_config(raw, _meta_host())


def _meta_init(ref_path: str) -> None:
    ref = torch.load(ref_path, weights_only=True)
    for name, parallel in META_CASES.items():
        config = _meta_config(parallel)
        assert builds_on_meta(config.model.implementation.load(), [s.instantiate() for s in config.layouts]), name
        model = build_parts(config, _meta_host()).model
        state = {k: _full(v) for k, v in model.state_dict().items()}
        assert state.keys() == ref.keys(), name
        for key, value in state.items():
            assert torch.equal(value, ref[key]), f"{name}: {key}"  # bit for bit


# -- one-line errors ----------------------------------------------------------------------------------
def _errors() -> None:
    mesh = _mesh("fsdp")
    cfg = _config({})
    model = TPLayout().apply(GPT(cfg), mesh)
    whole = FSDPLayout(FSDPLayout.Config(whole_params="matrices"))
    with pytest.raises(ValueError, match=r"^fully_shard: keep_whole chose .* already a DTensor") as info:
        whole.apply(model, mesh)
    assert "\n" not in str(info.value)


# -- the groups ---------------------------------------------------------------------------------------
def _ci(ref_path: str) -> None:
    _errors()
    for name in FSDP_CI:
        _steps_equal_one_process(name, VARIANTS[name], "fsdp")
    _steps_equal_one_process("packed", {}, "fsdp", packed=True)
    for name in HSDP_CI:
        _steps_equal_one_process(name, VARIANTS[name], "hsdp2x1")
    _steps_equal_one_process("packed", {}, "fsdp", packed=True, sp=True, overlap=2)  # fsdp gathers, tp overlaps
    _bf16_gathers("fsdp")
    _int8_gathers()
    _meta_init(ref_path)


def _cross_product() -> None:
    for name, overrides in VARIANTS.items():
        if name not in FSDP_CI:
            _steps_equal_one_process(name, overrides, "fsdp")
    for kind in ("hsdp2x1", "hsdp1x2"):
        for name, overrides in VARIANTS.items():
            _steps_equal_one_process(name, overrides, kind)
        _steps_equal_one_process("packed", {}, kind, packed=True)
    for name, overrides in VARIANTS.items():  # sequence parallelism inside each tp group
        _steps_equal_one_process(name, overrides, "fsdp", sp=True)
    _steps_equal_one_process("packed", {}, "fsdp", packed=True, sp=True)


def test_tp2_fsdp2_gpt_variants_equal_one_process(tmp_path: Path) -> None:
    config = _meta_config()
    model = build_parts(config, _meta_host()).model  # one process, layout 'single', built on meta too
    ref_path = tmp_path / "ref.pt"
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, ref_path)
    run_distributed(_ci, 4, str(ref_path), timeout=400)


@pytest.mark.slow
def test_tp2_hsdp_and_sequence_parallel_cross_product() -> None:
    run_distributed(_cross_product, 4, timeout=900)
