"""mcore-precision's per-tensor scales under mcore-fsdp on 2 gloo ranks: the global amaxes of all the matrix weights
of a layer (``fp8-current``, ``fp8-delayed``, NVFP4's tensor scale) are all-reduced ONCE per layer gather (the
recipe's ``gather_payloads``, FSDP's batch of a unit), not once per weight; formats without a per-tensor scale
(``mxfp8``, ``fp8-blockwise``) need none. Counted by wrapping ``torch.distributed.all_reduce``; that the gathered
bytes and the training are unchanged, bit for bit, is ``test_precision_fsdp_gather``'s check.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from mcore_fsdp import fully_shard
from mcore_fsdp.layout import describe_params
from mcore_precision.fp8 import FP8Current, FP8Delayed
from mcore_precision.microscaling import MXFP8, NVFP4
from mcore_testing import distributed
from mcore_testing.reference import TinyConfig, TinyTransformer

CFG = TinyConfig(hidden_size=64, ffn_size=256, num_heads=4)
FP8 = {"params": "fp32", "gemm": "emulated"}
# recipe -> all-reduces per layer gather (4 quantised linears a layer: one batch for the per-tensor formats)
RECIPES: dict[str, tuple[Callable[[], Any], int]] = {
    "fp8-current": (lambda: FP8Current(FP8Current.Config(**FP8)), 1),  # type: ignore[arg-type]
    "fp8-delayed": (lambda: FP8Delayed(FP8Delayed.Config(**FP8)), 1),  # type: ignore[arg-type]
    "nvfp4": (lambda: NVFP4(NVFP4.Config(params="fp32")), 1),
    "mxfp8": (lambda: MXFP8(MXFP8.Config(params="fp32")), 0),
}


@distributed(2, timeout=180)
def test_one_amax_all_reduce_per_layer_gather() -> None:
    torch.set_num_threads(1)
    world = dist.get_world_size()
    for name, (make, expected) in RECIPES.items():
        recipe = make()
        model = recipe.prepare(TinyTransformer(CFG, seed=0))
        shard = {"mesh": init_device_mesh("cpu", (world,)), "gather_recipe": recipe}
        shard["describe_param"] = describe_params(model)
        for block in model.layers:
            fully_shard(block, **shard)
        fully_shard(model, **shard)
        model(torch.randint(0, CFG.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0)))  # lazy init
        original, calls = dist.all_reduce, []

        def counted(*args: Any, original: Any = original, calls: list[int] = calls, **kwargs: Any) -> Any:
            calls.append(1)
            return original(*args, **kwargs)

        for layer in model.layers:
            dist.all_reduce = counted
            try:
                layer.unshard()
            finally:
                dist.all_reduce = original
            assert len(calls) == expected, (name, len(calls))
            calls.clear()
            layer.reshard()
