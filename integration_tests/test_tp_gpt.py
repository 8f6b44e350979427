"""``tp`` on the real ``gpt`` model: tp2 and tp4 equal one process over 3 optimizer steps (the loss,
every gradient and the global gradient norm at each step, fp32 rel 1e-5).

One spawned group of 2 gloo ranks runs ``gpt`` ``tiny`` variants built from the blocks' own
``ParamSpec.tp`` declarations: GQA with kv heads split (2 kv heads, tp2) and with one kv head for
two ranks (kept whole, summed) plus qkv biases, tied embeddings with an MTP head, and
packed documents (``cu_seqlens``). The loss head is swapped for the model's vocab-parallel
one, so the output weight (the head, or the tied embedding) is split by rows. Each case trains 3
steps of mcore-optim's ``adamw`` (on the tp DTensors here, on plain tensors for the one-process
run), each on a new batch. Under ``slow``, 4 ranks (tp4, no sequence parallelism) run every
variant with kv heads split (4 kv heads) and kept whole (2 kv heads, and 1, for 4 ranks).

Each case runs again with sequence parallelism (``sequence_parallel = true``: norms on a rank's
tokens, their scales' gradients summed).

With ``overlap_chunks`` under sequence parallelism each block's input is gathered in chunks and
the linears reading it (q, k, v or MLA's q / latent projections; gate, up) computed chunk by chunk
(``tp_overlap_gather``): every such linear's output comes from the chunked GEMMs, and loss and
gradients still equal one process (GQA split and shared, MLA, packed documents, recompute: one step
each in the default run; the cross product on 2 and 4 ranks, 3 steps each, under ``slow``).

QK-norm (its scales declared ``partial``: summed over the ranks) and MLA (its rope key, read by
every head, summed through ``BlockContext.share_across_heads``) are covered too. The model is
called with the context the layout's ``shard_batch`` makes, as the run loop does.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch.distributed.tensor import DTensor, Shard

from mcore.mesh import build_mesh
from mcore.protocols import BlockContext
from mcore.train.grads import global_grad_norm
from mcore.train.recompute import apply_recompute
from mcore_models.gpt import GPT
from mcore_models.presets import preset_config
from mcore_optim.adamw import AdamWFactory
from mcore_parallel.tp import TPLayout
from mcore_parallel.tp_modules import HeadSliceLinear
from mcore_parallel.tp_overlap_gather import GatheredInputLinear, GatherRegion
from mcore_testing import run_distributed
from mcore_testing.numerics import assert_rel_close

VARIANTS: dict[str, dict[str, Any]] = {
    "gqa-split": {},
    "gqa-shared-kv": {"attention": {"num_heads": 4, "num_kv_heads": 1, "qkv_bias": True}},
    "tied-mtp": {"tie_embeddings": True, "mtp_num_layers": 1},
    "qk-norm": {"attention": {"qk_norm": True}},  # partial scales, summed over the heads' ranks
    "mla": {"mixer": "mla", "mla": {"num_heads": 4}},  # the shared rope key: ctx.share_across_heads
}
STEPS = 3
#: Adam's first steps divide each gradient element by its own size, so an element near zero turns the
#: float noise of another summation order (~1e-8 here) into an update difference of up to lr * noise / eps,
#: which the next steps' gradients amplify. With eps = 1e-6 (test_tp_fsdp_gpt's) QK-norm's gradients drift
#: to 5e-5 from one process by step 3 (and one fp32 process from an fp64 one to 8e-6); with 1e-4 every
#: variant stays at the noise of one process against fp64 (~1e-6), on either tp size.
ADAMW = AdamWFactory.Config(lr=1e-3, eps=1e-4)
#: kv heads split on 4 ranks too (tiny's 4 heads, one kv head each): with VARIANTS, the tp4 cases
MHA: dict[str, Any] = {"attention": {"num_kv_heads": 4}}


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _served(model: torch.nn.Module) -> list[bool]:
    """For each call of a linear that may read a gathered block input: whether its output came from
    the region's chunked GEMMs (filled as the model runs)."""
    calls: list[bool] = []
    regions = {id(m.tp_gather): m.tp_gather for m in model.modules() if isinstance(m, GatheredInputLinear)}
    for region in regions.values():

        def take(linear: Any, x: torch.Tensor, region: GatherRegion = region) -> Any:
            out = GatherRegion.take(region, linear, x)
            calls.append(out is not None)
            return out

        region.take = take  # type: ignore[method-assign]
    return calls


def _check(
    name: str,
    overrides: dict[str, Any],
    packed: bool,
    sequence_parallel: bool = False,
    recompute: str = "none",
    overlap_chunks: int = 1,
    steps: int = STEPS,
) -> None:
    torch.manual_seed(0)
    reference = GPT(preset_config("tiny", vocab_size=128, max_position_embeddings=64, **overrides))
    layout = TPLayout(TPLayout.Config(sequence_parallel=sequence_parallel, overlap_chunks=overlap_chunks))
    mesh = build_mesh(("tp",), {}, fill="tp", device_type="cpu")
    tp = mesh.size("tp")
    name = f"{name} (tp{tp}){' +sp' if sequence_parallel else ''}"
    name += f" +recompute {recompute}" if recompute != "none" else ""
    name += f" +overlap {overlap_chunks}" if overlap_chunks > 1 else ""
    model = copy.deepcopy(reference)
    apply_recompute(model, recompute)  # the core's order: recompute wraps the blocks, then the layouts apply
    model = layout.apply(model, mesh)
    output = model.output_weight
    assert isinstance(output, DTensor) and output.placements == (Shard(0),), name
    if overrides.get("mixer") != "mla":  # kv heads fewer than ranks: kept whole, each rank slicing its head
        kv_heads = reference.get_submodule("layers.0.attention").num_kv_heads
        assert isinstance(model.get_submodule("layers.0.attention.k"), HeadSliceLinear) == (kv_heads < tp), name
    optimizers = [AdamWFactory(ADAMW).build(m, mesh=mesh, layouts=ls) for m, ls in ((reference, []), (model, [layout]))]
    norm_inputs: list[int] = []  # tokens per row the first norm sees: a rank's share under sequence parallelism
    model.layers[0].attn_norm.register_forward_pre_hook(lambda m, args: norm_inputs.append(args[0].shape[1]))
    served = _served(model)

    def ctx() -> BlockContext | None:
        return BlockContext(cu_seqlens=torch.tensor([0, 5, 16, 27, 32], dtype=torch.int32)) if packed else None

    for step in range(steps):  # a new batch each step, the same on every rank
        what = f"{name}, step {step}"
        g = torch.Generator().manual_seed(1 + step)
        tokens = torch.randint(0, 128, (2, 16), generator=g)
        labels = torch.randint(0, 128, (2, 16), generator=g)
        labels[0, :3] = -100
        ref_loss = reference(tokens, labels=labels, ctx=ctx())
        ref_loss.backward()
        norm_inputs.clear()
        served.clear()
        local_tokens, local_labels, view = layout.shard_batch(tokens, labels, ctx() or BlockContext())
        assert view.head_group is not None and view.loss_group is None
        loss = model(local_tokens, labels=local_labels, ctx=view)
        loss.backward()
        kept = [m.tp_gather._calls for m in model.modules() if isinstance(m, GatheredInputLinear)]
        assert not any(kept), f"{what}: outputs of the chunked GEMMs kept after backward"
        layout.finish_grad_sync()
        if sequence_parallel and overlap_chunks > 1:  # q, k, v (MLA: q, latent); gate, up: from the chunked GEMMs
            attention = 2 if overrides.get("mixer") == "mla" else 3
            # recompute calls the linears again in backward: full the layer (pre-hook included), selective the
            # attention (its outputs kept from forward)
            per_layer = {"none": attention + 2, "full": 2 * (attention + 2), "selective": 2 * attention + 2}[recompute]
            assert served.count(True) == per_layer * len(model.layers), f"{what}: served {served}"
        want = 16 // tp if sequence_parallel else 16  # recompute runs the norm again in backward
        assert norm_inputs and set(norm_inputs) == {want}, f"{what}: the first norm saw {norm_inputs} tokens"
        assert_rel_close(loss.detach(), ref_loss.detach(), 1e-5, name=f"{what}: loss")
        ref = dict(reference.named_parameters())
        for pname, p in model.named_parameters():
            grad = ref[pname].grad
            assert p.grad is not None and grad is not None, f"{what}: {pname} has no gradient"
            assert_rel_close(_full(p.grad), grad, 1e-5, name=f"{what}: grad of {pname}")
        norm = global_grad_norm(list(model.named_parameters()), mesh, [layout])
        assert_rel_close(norm, global_grad_norm(list(reference.parameters())), 1e-5, name=f"{what}: norm")
        for opt in optimizers:
            opt.step()
            opt.zero_grad()


def _all() -> None:
    for name, overrides in VARIANTS.items():
        _check(name, overrides, packed=False)
    _check("packed", {}, packed=True)
    for name, overrides in VARIANTS.items():  # sequence parallelism: the residual stream split by tokens
        _check(name, overrides, packed=False, sequence_parallel=True)
    _check("packed", {}, packed=True, sequence_parallel=True)
    # recompute and overlap change how a step communicates, not what it computes: one step each here (3 in the
    # slow cross products)
    for recompute in ("full", "selective"):  # the gathers run again in backward
        _check("mla", VARIANTS["mla"], packed=True, sequence_parallel=True, recompute=recompute, steps=1)
    for sp in (False, True):  # row-parallel reductions overlapped with their chunked GEMMs (MTP's too)
        _check("tied-mtp", VARIANTS["tied-mtp"], packed=True, sequence_parallel=sp, overlap_chunks=3, steps=1)
    # and under sequence parallelism the gathers before the column-parallel GEMMs, chunked alike
    _check("gqa-shared-kv", VARIANTS["gqa-shared-kv"], packed=True, sequence_parallel=True, overlap_chunks=3, steps=1)
    _check("mla", VARIANTS["mla"], packed=True, sequence_parallel=True, recompute="full", overlap_chunks=3, steps=1)
    _check(  # warned
        "gqa-split", {}, packed=False, sequence_parallel=True, recompute="selective", overlap_chunks=3, steps=1
    )


def test_tp2_gpt_variants_equal_one_process() -> None:
    run_distributed(_all, 2, timeout=240)


def _overlap_cross_product() -> None:
    """Every variant, packed or not, each recompute mode, with both sides of the overlap."""
    for name, overrides in VARIANTS.items():
        for packed in (False, True):
            for recompute in ("none", "full", "selective"):
                _check(name, overrides, packed, sequence_parallel=True, recompute=recompute, overlap_chunks=3)


@pytest.mark.slow
def test_tp2_gpt_overlap_cross_product() -> None:
    run_distributed(_overlap_cross_product, 2, timeout=600)


@pytest.mark.slow
def test_tp4_gpt_overlap_cross_product() -> None:
    run_distributed(_overlap_cross_product, 4, timeout=600)


def _tp4() -> None:
    """Every variant on 4 ranks without sequence parallelism: kv heads split (4) and kept whole (2, 1)."""
    for name, overrides in {**VARIANTS, "mha": MHA}.items():
        _check(name, overrides, packed=False)
    _check("packed", {}, packed=True)


@pytest.mark.slow
def test_tp4_gpt_variants_equal_one_process() -> None:
    run_distributed(_tp4, 4, timeout=600)
