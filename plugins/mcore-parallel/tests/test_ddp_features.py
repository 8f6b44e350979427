"""``ddp``'s own promises, checked on 2 gloo ranks in one spawned group (each case a function below),
plus what needs no process group: config errors, registration, world size 1.

On two ranks: buckets issued during backward (and not with ``overlap = false``), accumulation under
``no_grad_sync`` equal to one big batch across ``zero_grad`` (both kinds), a bf16 reduction within
bf16 tolerance, ``reduce_dtype = "auto"`` reducing in the precision recipe's ``reduce_dtype``,
parameters without gradient (on every rank, or on one) reduced as zeros without a hang, frozen
parameters skipped, a model on the meta device initialised after ``apply``, a second synchronised
backward refused, a DTensor parameter over ``dp_replicate`` refused.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

from mcore.construct import init_params
from mcore.errors import UserError
from mcore.mesh import build_mesh
from mcore.precision.basic import FP32, PlainRecipe
from mcore_parallel import plugin
from mcore_parallel.ddp import DDPLayout
from mcore_testing import run_distributed
from mcore_testing.hosts import isolated_host
from mcore_testing.numerics import assert_rel_close
from mcore_testing.reference import TinyConfig, TinyTransformer, tiny_batches

CFG = TinyConfig(vocab_size=61, hidden_size=36, num_heads=4, ffn_size=50, num_layers=3)
SMALL = 0.005  # MiB: about a parameter per bucket at this size


def _layout(model: nn.Module, precision: PlainRecipe | None = None, **config: Any) -> tuple[DDPLayout, nn.Module]:
    layout = DDPLayout(DDPLayout.Config(**config))
    mesh = build_mesh(layout.mesh_dims, {}, fill="dp_replicate", device_type="cpu")
    return layout, layout.apply(model, mesh, precision or FP32())


def _rows(t: torch.Tensor) -> torch.Tensor:
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    rows = t.shape[0] // world
    return t[rank * rows : (rank + 1) * rows]


def _reference_grads(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    model = TinyTransformer(CFG, seed=0)
    for tokens, labels in batches:
        (model(tokens, labels=labels) / len(batches)).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# -- cases run on both ranks -------------------------------------------------------------------------
def case_overlap() -> None:
    """With small buckets, some bucket's all-reduce is issued before backward reaches the first layer."""
    seen: dict[bool, int] = {}
    for overlap in (True, False):
        layout, model = _layout(TinyTransformer(CFG, seed=0), bucket_mb=SMALL, overlap=overlap)
        assert len(layout.buckets) > 4

        def record(*_: Any, key: bool = overlap, layout: DDPLayout = layout) -> None:
            seen[key] = layout.buckets_issued

        model.layers[0].register_full_backward_pre_hook(record)
        tokens, labels = tiny_batches(1, batch_size=4, vocab_size=CFG.vocab_size, seed=1)[0]
        model(_rows(tokens), labels=_rows(labels)).backward()
        layout.finish_grad_sync()
        assert layout.buckets_issued == 0
    assert seen[True] > 0, "no bucket was reduced before backward reached the first layer"
    assert seen[False] == 0


def case_accumulation_equals_big_batch() -> None:
    """Two steps of two micro-batches (the first under no_grad_sync) equal one whole batch per step,
    across zero_grad(set_to_none=True) and zero_grad(set_to_none=False)."""
    reference = TinyTransformer(CFG, seed=0)
    layout, model = _layout(copy.deepcopy(reference), bucket_mb=SMALL)
    opts = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (reference, model)]
    for step, set_to_none in enumerate((True, False, True)):
        micro = tiny_batches(2, batch_size=4, vocab_size=CFG.vocab_size, seed=10 + step)
        for opt in opts:
            opt.zero_grad(set_to_none=set_to_none)
        whole = torch.cat([t for t, _ in micro]), torch.cat([y for _, y in micro])
        reference(*whole[:1], labels=whole[1]).backward()
        with layout.no_grad_sync():
            (model(_rows(micro[0][0]), labels=_rows(micro[0][1])) / 2).backward()
        assert layout.buckets_issued == 0, "a bucket was reduced under no_grad_sync"
        (model(_rows(micro[1][0]), labels=_rows(micro[1][1])) / 2).backward()
        layout.finish_grad_sync()
        ref = dict(reference.named_parameters())
        for name, p in model.named_parameters():
            grad = ref[name].grad
            assert grad is not None and p.grad is not None
            assert_rel_close(p.grad, grad, 1e-5, name=f"step {step}: grad of {name}")
        assert all(p.grad is v for b in layout.buckets for p, v in zip(b.params, b.views)), "grads are not views"
        for opt in opts:
            opt.step()


def case_bf16_reduce() -> None:
    batches = tiny_batches(1, batch_size=4, vocab_size=CFG.vocab_size, seed=3)
    ref = _reference_grads(batches)
    got = {}
    for dtype in ("bf16", "fp32"):
        layout, model = _layout(TinyTransformer(CFG, seed=0), bucket_mb=SMALL, reduce_dtype=dtype)
        model(_rows(batches[0][0]), labels=_rows(batches[0][1])).backward()
        layout.finish_grad_sync()
        got[dtype] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)
    for name, grad in ref.items():
        assert_rel_close(got["bf16"][name], grad, 1e-2, name=f"bf16-reduced grad of {name}")
        assert_rel_close(got["fp32"][name], grad, 1e-5, name=f"fp32-reduced grad of {name}")
    assert any(not torch.equal(got["bf16"][n], got["fp32"][n]) for n in ref), "bf16 reduction changed nothing"


class BF16Reduce(PlainRecipe):
    """fp32 parameters and compute, gradients summed across ranks in bf16 (no recipe of the core does that)."""

    name = "bf16-reduce"
    reduce_dtype = torch.bfloat16


def case_auto_reduce_dtype_is_the_recipes() -> None:
    """``reduce_dtype = "auto"`` sums in the recipe's ``reduce_dtype``: bit for bit what an explicit value gives,
    which overrides the recipe; ZeRO-1's optimizer is told the same dtype."""
    tokens, labels = tiny_batches(1, batch_size=4, vocab_size=CFG.vocab_size, seed=11)[0]

    def grads(reduce_dtype: str, precision: PlainRecipe) -> dict[str, torch.Tensor]:
        layout, model = _layout(TinyTransformer(CFG, seed=0), precision, bucket_mb=SMALL, reduce_dtype=reduce_dtype)
        model(_rows(tokens), labels=_rows(labels)).backward()
        layout.finish_grad_sync()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    auto_bf16, bf16 = grads("auto", BF16Reduce()), grads("bf16", FP32())
    auto_fp32, fp32 = grads("auto", FP32()), grads("fp32", BF16Reduce())
    assert auto_bf16.keys() == bf16.keys() == auto_fp32.keys() == fp32.keys() and bf16
    for name in bf16:
        assert torch.equal(auto_bf16[name], bf16[name]), f"auto under a bf16-reducing recipe: {name}"
        assert torch.equal(auto_fp32[name], fp32[name]), f"auto under fp32: {name}"
    assert any(not torch.equal(bf16[n], fp32[n]) for n in bf16), "the bf16 reduction changed nothing"
    for recipe, want in ((BF16Reduce(), torch.bfloat16), (FP32(), torch.float32)):
        shards = _layout(TinyTransformer(CFG, seed=0), recipe, bucket_mb=SMALL)[0].shard_grads()
        assert shards is not None and shards.reduce_dtype == want, (recipe.name, shards)


class Partly(nn.Module):
    """The tiny model plus a parameter no rank uses and one that only rank 0 uses."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.ones(300))
        self.inner = TinyTransformer(CFG, seed=0)
        self.rank0 = nn.Parameter(torch.ones(5))

    def forward(self, tokens: torch.Tensor, *, labels: torch.Tensor) -> torch.Tensor:
        loss = self.inner(tokens, labels=labels)
        return loss + self.rank0.sum() if dist.get_rank() == 0 else loss


def case_missing_gradients_do_not_hang() -> None:
    layout, model = _layout(Partly(), bucket_mb=SMALL)
    tokens, labels = tiny_batches(1, batch_size=4, vocab_size=CFG.vocab_size, seed=4)[0]
    for _ in range(2):  # stale values of the first step must not leak into the second
        for p in model.parameters():
            p.grad = None
        model(_rows(tokens), labels=_rows(labels)).backward()
        layout.finish_grad_sync()
        assert model.unused.grad is not None and torch.equal(model.unused.grad, torch.zeros(300))
        assert model.rank0.grad is not None and torch.equal(model.rank0.grad, torch.full((5,), 0.5))


def case_frozen_parameters_skipped() -> None:
    model = TinyTransformer(CFG, seed=0)
    model.pos.weight.requires_grad_(False)
    layout, model = _layout(model, bucket_mb=SMALL)
    assert all(p is not model.pos.weight for b in layout.buckets for p in b.params)
    tokens, labels = tiny_batches(1, batch_size=4, vocab_size=CFG.vocab_size, seed=5)[0]
    model(_rows(tokens), labels=_rows(labels)).backward()
    layout.finish_grad_sync()
    assert model.pos.weight.grad is None


def case_meta_init() -> None:
    """Built on meta, applied, then init_params: the same values as without ddp, and it trains."""
    with torch.device("meta"):
        meta = TinyTransformer(CFG, seed=0)
    plain = copy.deepcopy(meta)
    init_params(plain, seed=7, device="cpu")
    layout, model = _layout(meta, bucket_mb=SMALL)
    assert layout.buckets == ()  # nothing allocated on meta
    init_params(model, seed=7, device="cpu")
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        assert torch.equal(p, q), name
    batches = tiny_batches(1, batch_size=4, vocab_size=CFG.vocab_size, seed=6)
    plain(*batches[0][:1], labels=batches[0][1]).backward()
    model(_rows(batches[0][0]), labels=_rows(batches[0][1])).backward()
    layout.finish_grad_sync()
    assert layout.buckets
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        assert p.grad is not None and q.grad is not None
        assert_rel_close(p.grad, q.grad, 1e-5, name=f"grad of {name}")


def case_second_synchronised_backward_refused() -> None:
    layout, model = _layout(TinyTransformer(CFG, seed=0), bucket_mb=SMALL)
    tokens, labels = tiny_batches(1, batch_size=4, vocab_size=CFG.vocab_size, seed=8)[0]
    model(_rows(tokens), labels=_rows(labels)).backward()
    with pytest.raises(RuntimeError, match="after its bucket was reduced in this step") as info:
        model(_rows(tokens), labels=_rows(labels)).backward()
    assert "\n" not in str(info.value)
    layout.finish_grad_sync()  # the collectives issued are still waited for: the group stays usable


def case_dtensor_over_dp_replicate_refused() -> None:
    """A DTensor already spread over dp_replicate is refused (DTensors over tp are accepted: test_tp_ddp)."""
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = build_mesh(("dp_replicate",), {}, fill="dp_replicate", device_type="cpu")
    model = nn.Linear(4, 4, bias=False)
    model.weight = nn.Parameter(distribute_tensor(model.weight.detach(), mesh.submesh(["dp_replicate"]), [Shard(0)]))
    with pytest.raises(
        ValueError,
        match=r"^parameter 'weight' is a DTensor over mesh dims \('dp_replicate',\) \(placements \(Shard\(dim=0\),\)\), "
        r"which span ranks of 'dp_replicate'; allowed: plain parameters or DTensors over dims other than "
        r"'dp_replicate' \(list 'ddp' after 'tp': \['tp', 'ddp'\]\)$",
    ) as info:
        DDPLayout().apply(model, mesh)
    assert "\n" not in str(info.value)


CASES: list[Callable[[], None]] = [
    case_overlap,
    case_accumulation_equals_big_batch,
    case_bf16_reduce,
    case_auto_reduce_dtype_is_the_recipes,
    case_missing_gradients_do_not_hang,
    case_frozen_parameters_skipped,
    case_meta_init,
    case_second_synchronised_backward_refused,
    case_dtensor_over_dp_replicate_refused,
]


def _run_cases(names: list[str]) -> None:
    torch.manual_seed(0)
    for case in CASES:
        if case.__name__ in names:
            case()


def test_cases_on_two_ranks() -> None:
    run_distributed(_run_cases, 2, [c.__name__ for c in CASES], timeout=120)


# -- no process group ----------------------------------------------------------------------------------
def test_one_process_without_a_group_is_plain() -> None:
    batches = tiny_batches(1, batch_size=4, vocab_size=CFG.vocab_size, seed=9)
    ref = _reference_grads(batches)
    layout, model = _layout(TinyTransformer(CFG, seed=0), bucket_mb=SMALL)
    assert not dist.is_initialized() and layout.data_parallel().size == 1
    model(batches[0][0], labels=batches[0][1]).backward()
    layout.finish_grad_sync()
    for name, p in model.named_parameters():
        assert p.grad is not None
        assert torch.equal(p.grad, ref[name]), name
    shards = layout.shard_grads()
    assert shards is not None and shards.size == 1 and shards.device_mesh is None
    assert all(p.start == 0 and p.stop == p.param.numel() for p in shards.pieces)
    assert layout.grad_norm_replicas("embed.weight", model.embed.weight) == 1


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [
        ("bucket_mb", 0, "a finite number of MiB > 0"),
        ("bucket_mb", float("nan"), "a finite number of MiB > 0"),
        ("reduce_dtype", "fp16", "auto, fp32, bf16"),
        ("overlap", "yes", "true or false"),
    ],
)
def test_config_errors_are_one_line(key: str, value: Any, allowed: str) -> None:
    with pytest.raises(ValueError) as info:
        DDPLayout.Config(**{key: value})
    message = str(info.value)
    assert f"parallel.ddp.{key} = {value!r}" in message and allowed in message and "\n" not in message


def test_registered_as_layout_ddp() -> None:
    host = isolated_host(plugin)
    assert host.registry.names("layout").count("ddp") == 1
    assert host.registry.load("layout", "ddp") is DDPLayout
    assert DDPLayout.mesh_dims == ("dp_replicate",) and DDPLayout.supports_meta_init


def test_meta_parameters_refused_at_first_use() -> None:
    with torch.device("meta"):
        meta = TinyTransformer(CFG, seed=0)
    layout, _ = _layout(meta)
    with pytest.raises(UserError, match="still on the meta device"):
        layout.finish_grad_sync()
