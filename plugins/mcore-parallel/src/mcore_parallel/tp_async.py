"""``[parallel.tp] async_tp``: torch's async TP (inductor's micro-pipeline TP) for the compiled blocks.

Under sequence parallelism each block split over heads all-gathers its input by tokens before its
column-parallel GEMMs, and reduce-scatters the outputs of its row-parallel ones. With
``train.compile = "blocks"`` (inductor) and this option, inductor's post-grad pass
(``torch/_inductor/fx_passes/micro_pipeline_tp.py``) rewrites each compiled block's graphs:

* an all-gather whose result feeds matmuls becomes ``symm_mem.fused_all_gather_matmul``: in forward one per
  block input, shared by q, k, v (or gate, up); in backward the gathered output gradient of each row-parallel
  linear feeding its data-gradient GEMM;
* a matmul feeding a reduce-scatter becomes ``symm_mem.fused_matmul_reduce_scatter``: each row-parallel
  linear's output in forward.

The fused ops split the collective into per-rank steps over symmetric memory (CUDA peer-to-peer), each step's
GEMM running while the next shard travels: the compiled counterpart of the chunked overlap (``overlap_chunks``,
``tp_overlap.py`` and ``tp_overlap_gather.py``, which run eagerly under compile). Pick one: both are refused
together.

What it takes here:

* the pass matches functional collectives only. The row side already is one (``RowwiseParallel(output_layouts=
  Shard(1))``: DTensor's reduce-scatter, and its backward's all-gather); the token gather before each block is
  traced in the functional form once symmetric memory is enabled for its group (``token_comm.fusable_gather``);
* ``enable`` enables symmetric memory for the tp group (torch 2.13's pass fuses only for such groups; newer
  torches deprecate the call, made only while it exists) and turns the pass on. The pass is switched by
  ``torch._inductor.config._micro_pipeline_tp``, a process-wide setting (torchtitan sets it the same way): every
  graph inductor compiles in this process afterwards goes through it. The core's ``apply_compile`` takes no
  inductor options from a layout, so nothing narrower is possible;
* refused where it cannot work (``unavailable``): devices other than CUDA, a torch without NCCL, the
  ``symm_mem`` fused ops or the inductor switch.

Not fused: in backward each column-parallel linear's input gradient is all-reduced by itself
(``ColwiseParallel``) and the block's gather keeps this rank's tokens of the sum, so there is no reduce-scatter
after a matmul to fuse there (the chunked ``overlap_all_gather`` makes that one reduce-scatter per block). With
one row per micro-batch, DTensor's backward gathers are views (funcol's shortcut) behind which torch 2.13's pass
finds no GEMM; the forward's token gathers are not (``token_comm``).

Checked on CPU (``tests/test_tp_async.py``): torch's own pattern finders find all of the above in the graphs
the pass sees, and results equal eager; the fusion itself needs CUDA and is for the multi-GPU run.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["enable", "unavailable"]

#: the ops the pass inserts (``torch.ops.symm_mem``), present in CUDA builds of torch
FUSED_OPS = ("fused_all_gather_matmul", "fused_matmul_reduce_scatter")


def unavailable(device_type: str) -> str | None:
    """Why async TP cannot run on a mesh of ``device_type`` with this torch (feature-detected), or ``None``."""
    if device_type != "cuda":
        return f"the mesh's devices are {device_type!r}, and symmetric memory needs CUDA"
    if not dist.is_nccl_available():
        return f"torch {torch.__version__} has no NCCL, and inductor fuses only with it"
    try:
        from torch.distributed import _symmetric_memory  # noqa: F401
    except ImportError:
        return f"torch {torch.__version__} has no torch.distributed._symmetric_memory"
    missing = [op for op in FUSED_OPS if not hasattr(torch.ops.symm_mem, op)]
    if missing:
        return f"torch {torch.__version__} has no symmetric-memory op torch.ops.symm_mem.{missing[0]}"
    import torch._inductor.config as inductor_config

    if not hasattr(inductor_config, "_micro_pipeline_tp"):
        return f"torch {torch.__version__}'s inductor has no micro-pipeline pass (_micro_pipeline_tp)"
    return None


def enable(group: Any) -> None:
    """Enable symmetric memory for ``group`` (where this torch still asks for it) and inductor's micro-pipeline
    pass (process-wide: module docstring)."""
    import torch._inductor.config as inductor_config
    from torch.distributed import _symmetric_memory

    register = getattr(_symmetric_memory, "enable_symm_mem_for_group", None)
    if register is not None:
        with warnings.catch_warnings():  # deprecated in newer torches, still what torch 2.13's pass checks
            warnings.simplefilter("ignore", FutureWarning)
            register(group.group_name)
    inductor_config._micro_pipeline_tp = True
