"""``tp`` on the real ``gpt`` model: tp2 equals one process (loss and every gradient, fp32 rel 1e-5).

One spawned group of 2 gloo ranks runs ``gpt`` ``tiny`` variants built from the blocks' own
``ParamSpec.tp`` declarations: GQA with kv heads split (2 kv heads, tp2) and with one kv head for
two ranks (kept whole, summed) plus qkv biases, tied embeddings with an MTP head, and
packed documents (``cu_seqlens``). The loss head is swapped for the model's vocab-parallel
one, so the output weight (the head, or the tied embedding) is split by rows.

Each case runs again with sequence parallelism (``sequence_parallel = true``: norms on a rank's
tokens, their scales' gradients summed).

QK-norm (its scales declared ``partial``: summed over the ranks) and MLA (its rope key, read by
every head, summed through ``BlockContext.share_across_heads``) are covered too. The model is
called with the context the layout's ``shard_batch`` makes, as the run loop does.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch.distributed.tensor import DTensor, Shard

from mcore.mesh import build_mesh
from mcore.protocols import BlockContext
from mcore.train.recompute import apply_recompute
from mcore_models.gpt import GPT
from mcore_models.presets import preset_config
from mcore_parallel.tp import TPLayout
from mcore_parallel.tp_modules import HeadSliceLinear
from mcore_testing import run_distributed
from mcore_testing.numerics import assert_rel_close

VARIANTS: dict[str, dict[str, Any]] = {
    "gqa-split": {},
    "gqa-shared-kv": {"attention": {"num_heads": 4, "num_kv_heads": 1, "qkv_bias": True}},
    "tied-mtp": {"tie_embeddings": True, "mtp_num_layers": 1},
    "qk-norm": {"attention": {"qk_norm": True}},  # partial scales, summed over the heads' ranks
    "mla": {"mixer": "mla", "mla": {"num_heads": 4}},  # the shared rope key: ctx.share_across_heads
}


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _check(
    name: str,
    overrides: dict[str, Any],
    packed: bool,
    sequence_parallel: bool = False,
    recompute: str = "none",
    overlap_chunks: int = 1,
) -> None:
    torch.manual_seed(0)
    reference = GPT(preset_config("tiny", vocab_size=128, max_position_embeddings=64, **overrides))
    layout = TPLayout(TPLayout.Config(sequence_parallel=sequence_parallel, overlap_chunks=overlap_chunks))
    name = f"{name}{' +sp' if sequence_parallel else ''}{f' +recompute {recompute}' if recompute != 'none' else ''}"
    name += f" +overlap {overlap_chunks}" if overlap_chunks > 1 else ""
    model = copy.deepcopy(reference)
    apply_recompute(model, recompute)  # the core's order: recompute wraps the blocks, then the layouts apply
    model = layout.apply(model, build_mesh(("tp",), {}, fill="tp", device_type="cpu"))
    output = model.output_weight
    assert isinstance(output, DTensor) and output.placements == (Shard(0),), name
    if name == "gqa-shared-kv":
        assert isinstance(model.layers[0].attention.k, HeadSliceLinear)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 128, (2, 16), generator=g)
    labels = torch.randint(0, 128, (2, 16), generator=g)
    labels[0, :3] = -100

    def ctx() -> BlockContext | None:
        return BlockContext(cu_seqlens=torch.tensor([0, 5, 16, 27, 32], dtype=torch.int32)) if packed else None

    ref_loss = reference(tokens, labels=labels, ctx=ctx())
    ref_loss.backward()
    norm_inputs: list[int] = []  # tokens per row the first norm sees: a rank's share under sequence parallelism
    model.layers[0].attn_norm.register_forward_pre_hook(lambda m, args: norm_inputs.append(args[0].shape[1]))
    tokens, labels, view = layout.shard_batch(tokens, labels, ctx() or BlockContext())
    assert view.head_group is not None and view.loss_group is None
    loss = model(tokens, labels=labels, ctx=view)
    loss.backward()
    layout.finish_grad_sync()
    want = 16 // 2 if sequence_parallel else 16  # recompute runs the norm again in backward
    assert norm_inputs and set(norm_inputs) == {want}, f"{name}: the first norm saw {norm_inputs} tokens"
    assert_rel_close(loss.detach(), ref_loss.detach(), 1e-5, name=f"{name}: loss")
    ref = dict(reference.named_parameters())
    for pname, p in model.named_parameters():
        want = ref[pname].grad
        assert p.grad is not None and want is not None, f"{name}: {pname} has no gradient"
        assert_rel_close(_full(p.grad), want, 1e-5, name=f"{name}: grad of {pname}")


def _all() -> None:
    for name, overrides in VARIANTS.items():
        _check(name, overrides, packed=False)
    _check("packed", {}, packed=True)
    for name, overrides in VARIANTS.items():  # sequence parallelism: the residual stream split by tokens
        _check(name, overrides, packed=False, sequence_parallel=True)
    _check("packed", {}, packed=True, sequence_parallel=True)
    for recompute in ("full", "selective"):  # the gathers run again in backward
        _check("mla", VARIANTS["mla"], packed=True, sequence_parallel=True, recompute=recompute)
    for sp in (False, True):  # row-parallel reductions overlapped with their chunked GEMMs (MTP's too)
        _check("tied-mtp", VARIANTS["tied-mtp"], packed=True, sequence_parallel=sp, overlap_chunks=3)


def test_tp2_gpt_variants_equal_one_process() -> None:
    run_distributed(_all, 2, timeout=240)
