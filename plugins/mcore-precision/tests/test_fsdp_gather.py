"""The recipes' quantised FSDP gather (``mcore_precision.fsdp_gather``) without an FSDP: two gloo ranks each hold
a row shard of a linear's weight (a ``DTensor``, zero-padded as FSDP pads it), ask the recipe for its payload,
all-gather it by hand and unpack it: the operands the linear's GEMMs read equal, byte for byte, the whole weight
quantised by one process (per-tensor scales from the global amax); the linear run on the gathered weight gives
the same output and gradients as on the whole weight, without quantising the weight itself; a unit's batch
(``payloads``) gives the same bytes with one amax all-reduce for all its weights. Misaligned blocks
fall back to the plain gather with a warning; FSDP's shape probe leaves ``fp8-delayed``'s state alone; the byte
codecs (E8M0 scales, packed E2M1) round-trip exactly.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

from mcore.params import ParamSpec
from mcore.precision import quantized
from mcore_precision import fsdp_gather
from mcore_precision.fp8 import FP8Blockwise, FP8Current, FP8Delayed, FP8Rowwise
from mcore_precision.fp8_linear import FP8Linear
from mcore_precision.microscaling import MXFP8, NVFP4
from mcore_precision.nvfp4 import E2M1_GRID
from mcore_testing.dist import run_distributed
from mcore_testing.numerics import seeded_randn

FP8 = {"params": "fp32", "gemm": "emulated"}
RECIPES: dict[str, Any] = {
    "fp8-current": lambda: FP8Current(FP8Current.Config(**FP8)),  # type: ignore[arg-type]
    "fp8-delayed": lambda: FP8Delayed(FP8Delayed.Config(**FP8)),  # type: ignore[arg-type]
    "fp8-blockwise": lambda: FP8Blockwise(FP8Blockwise.Config(**FP8)),  # type: ignore[arg-type]
    "mxfp8": lambda: MXFP8(MXFP8.Config(params="fp32")),
    "nvfp4": lambda: NVFP4(NVFP4.Config(params="fp32", stochastic_rounding=False)),
}
# (F, K) per recipe: rows per rank a multiple of the block height; F odd for per tensor (the last rank padded)
SHAPES = {
    "fp8-current": (37, 24),
    "fp8-delayed": (37, 24),
    "fp8-blockwise": (256, 160),
    "mxfp8": (64, 48),
    "nvfp4": (63, 33),
}


class _Net(nn.Module):
    def __init__(self, f: int, k: int) -> None:
        super().__init__()
        self.lin = nn.Linear(k, f, bias=False)

    def param_specs(self) -> dict[str, ParamSpec]:
        return {"lin.weight": ParamSpec("matrix")}


def _same(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.shape == b.shape and torch.equal(a.float().nan_to_num(7.0), b.float().nan_to_num(7.0)), what


def _gathered_weight(name: str, recipe: Any, net: Any, full: torch.Tensor) -> quantized.QuantizedWeight | None:
    """This rank's padded shard -> payload -> all-gather -> unpack, as FSDP does it (``None``: gathered plainly)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    rank, world = dist.get_rank(), dist.get_world_size()
    f = full.shape[0]
    rows = -(-f // world)
    padded = torch.nn.functional.pad(full, (0, 0, 0, rows * world - f))[rank * rows : (rank + 1) * rows]
    sharded = nn.Parameter(distribute_tensor(full, init_device_mesh("cpu", (world,)), [Shard(0)]))
    whole = net.lin.weight
    net.lin.weight = sharded  # as between FSDP's gathers: the sharded DTensor
    payload = recipe.gather_payload(padded.clone(), name="lin.weight", spec=ParamSpec("matrix"))
    net.lin.weight = whole
    if payload is None:
        return None
    outs = []
    for t in payload.tensors:
        pieces = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(pieces, t.contiguous())
        outs.append(torch.cat(pieces))  # (N * rows, ...): rank-major, as FSDP gathers along dim 0
    got = recipe.unpack(tuple(outs), payload.metadata)
    assert isinstance(got, quantized.QuantizedWeight)
    return quantized.QuantizedWeight(got.tensors, got.metadata, torch.Size((f, full.shape[1])), got.dtype)


def _check_recipe(name: str) -> None:
    f, k = SHAPES[name]
    full = seeded_randn(f, k, seed=1) * (1 + torch.arange(f)[:, None])  # rank 1's rows hold the amax
    recipe = RECIPES[name]()
    net = recipe.prepare(_Net(f, k))
    with torch.no_grad():
        net.lin.weight.copy_(full)
    linear = net.lin
    assert isinstance(linear, FP8Linear)
    weight = _gathered_weight(name, recipe, net, full)
    assert weight is not None, name
    mine, mine_t = fsdp_gather.operands(weight)
    one = RECIPES[name]()  # one process: the whole weight quantised by the linear's scheme
    ref_net = one.prepare(_Net(f, k))
    ref = ref_net.lin.scheme.quantize(full, "weight", "fprop")
    for field in ("data", "scale", "block_scale", "global_scale"):
        if hasattr(ref, field):
            _same(getattr(mine, field), getattr(ref, field), f"{name} {field}")
    if mine_t is not None:  # MXFP8's column-wise copy for dgrad
        ref_t = ref_net.lin.scheme.quantize(full.t(), "weight", "dgrad")
        _same(mine_t.dequantize(), ref_t.dequantize(), f"{name} column-wise copy")
    _same(recipe.dequantize(weight), ref.dequantize()[:f], f"{name} dequantize")

    # the linear on the gathered weight: no quantisation of the weight, the same output and gradients
    x = seeded_randn(6, k, seed=2)
    calls: list[str] = []
    original = linear.scheme.quantize

    def counted(t: torch.Tensor, operand: Any, gemm: Any) -> Any:
        calls.append(operand)
        return original(t, operand, gemm)

    linear.scheme.quantize = counted  # type: ignore[method-assign]
    quantized.attach(linear.weight, weight)
    xa = x.clone().requires_grad_()
    out = linear(xa)
    out.square().sum().backward()
    quantized.detach(linear.weight)
    assert "weight" not in calls, (name, calls)
    with torch.no_grad():
        ref_net.lin.weight.copy_(full)
    xb = x.clone().requires_grad_()
    ref_out = ref_net.lin(xb)
    ref_out.square().sum().backward()
    _same(out, ref_out, f"{name} output")
    _same(xa.grad, xb.grad, f"{name} input grad")  # type: ignore[arg-type]
    _same(linear.weight.grad, ref_net.lin.weight.grad, f"{name} weight grad")  # type: ignore[arg-type]


def _misaligned_falls_back() -> None:
    recipe = FP8Blockwise(FP8Blockwise.Config(**FP8))  # type: ignore[arg-type]
    net = recipe.prepare(_Net(200, 128))  # 100 rows per rank: cuts the 128-row blocks
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _gathered_weight("fp8-blockwise", recipe, net, seeded_randn(200, 128, seed=3)) is None
        assert _gathered_weight("fp8-blockwise", recipe, net, seeded_randn(200, 128, seed=3)) is None
    assert [str(w.message) for w in caught] == [
        "fp8-blockwise: lin.weight has 100 rows per rank, which cuts its 128-row blocks; gathered in high precision "
        "(allowed for a quantised gather: rows per rank a multiple of 128, or parallel.fsdp.whole_params)"
    ]
    rowwise = FP8Rowwise(FP8Rowwise.Config(**FP8))  # type: ignore[arg-type]
    rnet = rowwise.prepare(_Net(64, 32))
    assert _gathered_weight("fp8-rowwise", rowwise, rnet, seeded_randn(64, 32, seed=4)) is None


def _batched_payloads_equal_one_by_one() -> None:
    """``fsdp_gather.payloads`` (FSDP's batch for a unit): the same bytes as one ``payload`` per weight, the global
    amaxes of the per-tensor scales (fp8-current, NVFP4's tensor scale) in ONE all-reduce instead of one per weight;
    a NaN on one rank reaches that weight's scale only."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    requests: list[fsdp_gather.Request | None] = [None]  # a weight gathered as is
    per_tensor = 0
    for j, (name, nan) in enumerate(
        [("fp8-current", False), ("fp8-current", True), ("nvfp4", False), ("fp8-blockwise", False), ("mxfp8", False)]
    ):
        f, k = SHAPES[name]
        full = seeded_randn(f, k, seed=40 + j) * (1 + j)
        if nan:
            full[-1, 0] = float("nan")  # on the last rank's rows
        rows = -(-f // world)
        shard = torch.nn.functional.pad(full, (0, 0, 0, rows * world - f))[rank * rows : (rank + 1) * rows]
        weight = distribute_tensor(full, mesh, [Shard(0)])
        lin = RECIPES[name]().prepare(_Net(f, k)).lin
        requests.append(fsdp_gather.Request(lin.scheme, shard.clone(), weight, whole=False))
        per_tensor += name in ("fp8-current", "nvfp4")
    calls: list[int] = []
    original = dist.all_reduce

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return original(*args, **kwargs)

    dist.all_reduce = counted  # type: ignore[assignment]
    try:
        one_by_one = [
            None if r is None else fsdp_gather.payload(r.scheme, r.shard, r.weight, whole=r.whole) for r in requests
        ]
        assert len(calls) == per_tensor == 3, calls
        calls.clear()
        batched = fsdp_gather.payloads(requests)
        assert len(calls) == 1, calls
    finally:
        dist.all_reduce = original  # type: ignore[assignment]
    assert batched[0] is None and one_by_one[0] is None
    for j, (mine, ref) in enumerate(zip(batched[1:], one_by_one[1:])):
        assert mine is not None and ref is not None and mine.metadata == ref.metadata
        assert len(mine.tensors) == len(ref.tensors)
        for a, b in zip(mine.tensors, ref.tensors):
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)), j
    local = [torch.tensor(1.0 + rank), torch.tensor(float("nan") if rank == world - 1 else 2.0)]
    amaxes = fsdp_gather.global_amaxes(local, [weight, weight])  # one all-reduce: the max, a NaN kept NaN
    assert amaxes[0].item() == float(world) and torch.isnan(amaxes[1])


def _ranks() -> None:
    torch.set_num_threads(1)
    for name in RECIPES:
        _check_recipe(name)
    _misaligned_falls_back()
    _batched_payloads_equal_one_by_one()


def test_gathered_payload_equals_whole_weight_quantised() -> None:
    run_distributed(_ranks, 2, timeout=120)


def test_probe_leaves_delayed_state_alone() -> None:
    recipe = FP8Delayed(FP8Delayed.Config(**FP8))  # type: ignore[arg-type]
    net = recipe.prepare(_Net(8, 16))
    probe = recipe.gather_payload(torch.zeros(4, 16), name="lin.weight", spec=ParamSpec("matrix"))
    meta = recipe.gather_payload(torch.empty(8, 16, device="meta"), name="lin.weight", spec=ParamSpec("matrix"))
    assert probe is not None and meta is not None
    assert [t.shape for t in probe.tensors] == [(4, 16), (1,)] and probe.tensors[0].dtype == torch.uint8
    assert [(t.shape, t.dtype) for t in meta.tensors] == [((8, 16), torch.uint8), ((1,), torch.float32)]
    scaler = recipe.scalers["lin.weight"]
    assert not bool(scaler.seen) and float(scaler.history.abs().sum()) == 0.0
    assert isinstance(net.lin, FP8Linear)
    # a weight that is none of its linears' (a head, a bf16 layer's linear): gathered as is
    assert recipe.gather_payload(torch.zeros(4, 16), name="head.weight", spec=ParamSpec("head")) is None


def test_e8m0_bytes_round_trip() -> None:
    k = torch.tensor([-127.0, -126.0, -1.0, 0.0, 1.0, 126.0, 127.0])
    scale = torch.cat([torch.exp2(k), torch.tensor([float("nan")])])
    codes = fsdp_gather._e8m0(scale)
    assert codes.dtype == torch.uint8 and codes.tolist() == [0, 1, 126, 127, 128, 253, 254, 255]
    _same(fsdp_gather._from_e8m0(codes), scale, "e8m0 round trip")


@pytest.mark.parametrize("k", [1, 7, 16])
def test_e2m1_packing_round_trip(k: int) -> None:
    grid = torch.tensor(E2M1_GRID)
    values = torch.cat([grid, -grid])[torch.randint(0, 16, (5, k), generator=torch.Generator().manual_seed(k))]
    packed = fsdp_gather._pack_e2m1(values)
    assert packed.dtype == torch.uint8 and packed.shape == (5, -(-k // 2))
    back = fsdp_gather._unpack_e2m1(packed, k)
    assert torch.equal(back, values) and torch.equal(torch.signbit(back), torch.signbit(values))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["fp8-current", "fp8-blockwise", "mxfp8", "nvfp4"])
def test_gathered_weight_on_cuda(name: str) -> None:
    """On the card (Triton quantisation, native scaled-mm where the scheme has it): a linear given the payload of
    its whole weight (as a rank that keeps it whole gathers it) computes what it computes quantising the weight."""
    make = {
        "fp8-current": lambda: FP8Current(FP8Current.Config(params="bf16")),
        "fp8-blockwise": lambda: FP8Blockwise(FP8Blockwise.Config(params="bf16")),
        "mxfp8": lambda: MXFP8(MXFP8.Config(params="bf16")),
        "nvfp4": lambda: NVFP4(NVFP4.Config(params="bf16", stochastic_rounding=False)),
    }[name]
    f, k = 256, 512
    full = (seeded_randn(f, k, seed=1) * 0.05).to("cuda", torch.bfloat16)
    x = seeded_randn(128, k, seed=2).to("cuda", torch.bfloat16)
    outs = []
    for given in (False, True):
        recipe = make()
        lin = recipe.prepare(_Net(f, k)).cuda().lin
        assert isinstance(lin, FP8Linear)
        with torch.no_grad():
            lin.weight.copy_(full)
        if given:
            # what a rank keeping the weight whole sends (recipe.gather_payload asks it of a sharded weight only)
            payload = fsdp_gather.payload(lin.scheme, lin.weight.detach(), lin.weight, whole=True)
            assert payload.tensors[0].dtype == torch.uint8
            quantized.attach(lin.weight, recipe.unpack(payload.tensors, payload.metadata))
        xa = x.clone().requires_grad_()
        out = lin(xa)
        out.float().square().sum().backward()
        quantized.detach(lin.weight)
        outs.append((out, xa.grad, lin.weight.grad))
    for mine, ref, what in zip(outs[1], outs[0], ("output", "input grad", "weight grad")):
        assert mine is not None and ref is not None and torch.isfinite(mine).all(), (name, what)
        _same(mine, ref, f"{name} {what}")
