"""What mcore-precision's quantised FSDP gather costs a unit of mcore-fsdp, on 2 gloo ranks: a matrix weight that
reaches its linear as a ``QuantizedWeight`` (codes + scales) takes no room in the unit's high-precision
un-sharded buffer, so the buffer a layer borrows for its gather holds only the parameters gathered plainly (the
norms, and the weights a recipe cannot gather quantised). Measured by wrapping the root pool's ``acquire``: the
bytes of the un-sharded buffer ("param") for a layer gathered quantised against the same layer gathered in high
precision (``gather_recipe=None``), its matrices split by rows or kept whole on one rank; the payload bytes come on top (1 byte per element for FP8, about 2 for MXFP8's
two copies, about 1/2 for NVFP4).
"""

from __future__ import annotations

from collections.abc import Callable
from math import prod
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from mcore_fsdp import fully_shard
from mcore_fsdp.layout import describe_params, keep_whole
from mcore_precision.fp8 import FP8Blockwise, FP8Current
from mcore_precision.microscaling import MXFP8, NVFP4
from mcore_testing import distributed
from mcore_testing.reference import TinyConfig, TinyTransformer

CFG = TinyConfig(hidden_size=64, ffn_size=256, num_heads=4)
GATHERED = ("qkv", "proj", "gate_up", "down")  # every matrix linear of a layer: rows per rank align for these


def _recipes() -> dict[str, Callable[[], Any]]:
    fp8 = {"params": "fp32", "gemm": "emulated"}
    return {
        "fp8-current": lambda: FP8Current(FP8Current.Config(**fp8)),  # type: ignore[arg-type]
        "fp8-current-bf16": lambda: FP8Current(FP8Current.Config(params="bf16", gemm="emulated")),
        "mxfp8": lambda: MXFP8(MXFP8.Config(params="fp32")),
        "nvfp4": lambda: NVFP4(NVFP4.Config(params="fp32")),
    }


def _param_bytes(make: Callable[[], Any], quantised: bool, whole: bool = False) -> tuple[int, int, int]:
    """Bytes of layer 0's un-sharded buffer for one gather, and the padded bytes its plain and its quantised
    parameters take in high precision (worked out from the shapes); ``whole``: matrices kept whole on one rank."""
    world = dist.get_world_size()
    recipe = make()
    model = recipe.prepare(TinyTransformer(CFG, seed=0))
    layer = model.layers[0]
    itemsize = next(layer.parameters()).element_size()
    plain = gathered = 0
    for name, p in layer.named_parameters():
        padded = world * -(-p.shape[0] // world) * prod(p.shape[1:]) * itemsize
        if name.endswith(".weight") and name.rsplit(".", 2)[-2] in GATHERED:
            gathered += p.numel() * itemsize if whole else padded
        else:
            plain += padded
    shard: dict[str, Any] = {"mesh": init_device_mesh("cpu", (world,))}
    if whole:
        shard["keep_whole"] = keep_whole(model, "matrices")
    if quantised:
        shard.update(gather_recipe=recipe, describe_param=describe_params(model))
    for block in model.layers:
        fully_shard(block, **shard)
    fully_shard(model, **shard)
    tokens = torch.randint(0, CFG.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    model(tokens)  # lazy init; every unit gathered and re-sharded once
    pool = model._ensure_init().pool
    original, seen = pool.acquire, []

    def acquire(kind: str, dtype: torch.dtype, numel: int, stream: Any = None) -> Any:
        seen.append((kind, numel * dtype.itemsize))
        return original(kind, dtype, numel, stream)

    pool.acquire = acquire  # type: ignore[method-assign]
    layer.unshard()
    pool.acquire = original  # type: ignore[method-assign]
    layer.reshard()
    return sum(b for kind, b in seen if kind == "param"), plain, gathered


@distributed(2, timeout=180)
def test_quantised_weights_take_no_unsharded_buffer_room() -> None:
    torch.set_num_threads(1)
    for name, make in _recipes().items():
        after, plain, gathered = _param_bytes(make, quantised=True)
        before, _, _ = _param_bytes(make, quantised=False)
        assert before == plain + gathered, (name, before, plain, gathered)
        assert after == plain, (name, after, plain)
        if dist.get_rank() == 0:
            print(f"{name}: layer un-sharded buffer {after} bytes gathered quantised, {before} in high precision")
    # kept whole on one rank (parallel.fsdp.whole_params = "matrices"): fp8-blockwise's 128x128 blocks are never cut
    blockwise = lambda: FP8Blockwise(FP8Blockwise.Config(params="fp32", gemm="emulated"))  # type: ignore[arg-type]  # noqa: E731
    after, plain, gathered = _param_bytes(blockwise, quantised=True, whole=True)
    before, _, _ = _param_bytes(blockwise, quantised=False, whole=True)
    assert (after, before) == (plain, plain + gathered), (after, before, plain, gathered)
