"""The ``moe`` block's inference path: static shapes, no device-to-host sync, dropless (CUDA-graph capturable).

Why it exists: the training path sizes its buffers from the routing (``nonzero``, host-side group sizes in the
reference grouped GEMM, capacity drops), which a CUDA graph cannot capture and which syncs the host every layer.
Under an inference cache (``BlockContext.kv_cache`` set: the engine's calls) the block runs this instead:

* routing without capacity (never drops a token, whatever the training ``capacity_factor``), without aux
  losses and without counting load (no bias update); the expert bias still chooses;
* the ``allgatherv`` dispatcher (``mcore_moe.dispatcher.AllGatherVDispatcher``): a fixed buffer of
  ``R = W * C * min(K, E_l)`` rows, the real ones first grouped by local expert, counts on the device; over the
  ep group of the block's dispatcher when a layout set one (every rank brings the same ``N``, or ``max_tokens``);
* the experts as grouped GEMMs of static shapes (``static_grouped_linear``): ``torch._grouped_mm`` with offsets
  computed on the device where it takes the call, else a masked per-expert reference (static too, E times the
  FLOPs); gate and up as one GEMM over ``[gate | up]`` (a view of the weights once the engine packed them,
  ``GroupedSwiGLU.pack_for_inference``; else a concatenated copy per call) and the SwiGLU on its ``(R, 2F)`` output
  (``mcore_moe.swiglu``: Triton on CUDA), or with ``MCORE_MOE_GROUPED_GEMM=triton`` the Triton grouped GEMM with
  the SwiGLU in its epilogue (``mcore_moe.grouped_swiglu_triton``: no host sync; its autotuning runs on the first
  call of a shape, which must come before a graph capture); rows past the last offset are padding, which
  ``combine`` ignores.

Shape legend: N tokens, H hidden size, F expert FFN size, E_l local experts, R rows of the dispatch buffer.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from mcore.protocols.dispatcher import RoutingDecision
from mcore_moe.dispatcher import AllGatherVDispatcher
from mcore_moe.experts import GroupedSwiGLU, grouped_mm_works
from mcore_moe.gate_up import stacked_gate_up
from mcore_moe.kernel_choice import grouped_gemm
from mcore_moe.swiglu import swiglu


def _grouped_mm_dtypes(device: torch.device) -> tuple[torch.dtype, ...]:
    """What ``torch._grouped_mm`` takes: bf16 on CUDA and the CPU; fp32 too on the CPU (its fallback), but not
    while dynamo traces (its shape function accepts bf16 only)."""
    if device.type == "cpu" and not torch.compiler.is_compiling():
        return (torch.bfloat16, torch.float32)
    return (torch.bfloat16,) if device.type in ("cpu", "cuda") else ()


def grouped_mm_fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """``torch._grouped_mm`` takes ``x (R, K)`` times ``weight (E_l, F, K)``: it exists, the dtypes match one it
    serves on the device, and both feature sizes are 16-byte aligned (decided from shapes: no call, no sync)."""
    size = x.element_size()
    return (
        hasattr(torch, "_grouped_mm")
        and x.dtype == weight.dtype
        and x.dtype in _grouped_mm_dtypes(x.device)
        and type(weight) in (torch.Tensor, nn.Parameter)  # no tensor subclass (quantised weights)
        and (weight.shape[1] * size) % 16 == 0
        and (weight.shape[2] * size) % 16 == 0
    )


def static_grouped_linear(
    x: torch.Tensor, weight: torch.Tensor, group_sizes: torch.Tensor, *, grouped_mm: bool
) -> torch.Tensor:
    """``x (R, K)`` rows grouped by expert (``group_sizes (E_l,)`` on the device, summing to at most R) times
    ``weight[e].T`` (``weight (E_l, F, K)``) -> ``(R, F)``; rows past the groups are padding and may hold anything.

    ``grouped_mm``: one ``torch._grouped_mm`` with the groups' end rows as offsets; else the reference: each row's
    expert found from the cumulative sizes, every expert's GEMM over all rows, each row keeping its own expert's."""
    ends = torch.cumsum(group_sizes, 0)  # (E_l,) end row of each expert, on the device
    if grouped_mm:
        return torch._grouped_mm(x, weight.transpose(-2, -1), offs=ends.to(torch.int32))  # (R, F)
    rows = torch.arange(x.shape[0], device=x.device, dtype=ends.dtype)  # (R,)
    expert = torch.searchsorted(ends, rows, right=True)  # (R,) E_l on padding rows
    out = x.new_zeros((x.shape[0], weight.shape[1]))  # (R, F)
    for e in range(weight.shape[0]):
        out = torch.where((expert == e).unsqueeze(-1), x @ weight[e].T, out)
    return out


def _local(weight: torch.Tensor) -> torch.Tensor:
    """The local experts of a weight an ``ep`` layout made a DTensor (``(E_l, ...)``), as a plain tensor."""
    return weight.to_local() if isinstance(weight, DTensor) else weight


def static_experts(experts: GroupedSwiGLU, rows: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """``experts`` (SwiGLU ``down(silu(gate x) * up x)`` per expert) over ``rows (R, H)`` -> ``(R, H)``, static shapes.

    ``torch._grouped_mm`` on the CPU where it fits, on CUDA where it fits and the device's probe
    (``mcore_moe.experts.grouped_mm_works``, run on the first call: before any graph capture) passed."""
    gate, up, down = (_local(w) for w in (experts.gate, experts.up, experts.down))
    fast = all(grouped_mm_fits(rows, w) for w in (gate, up, down))
    if fast and rows.is_cuda:
        if rows.device not in experts._grouped_mm:
            experts._grouped_mm[rows.device] = grouped_mm_works(rows.device)
        fast = experts._grouped_mm[rows.device]
    if grouped_gemm(rows) == "triton":  # opt-in: one kernel, device-side tile map (autotuned on the first call)
        from mcore_moe.grouped_swiglu_triton import grouped_swiglu

        act = grouped_swiglu(rows, gate, up, tokens_per_expert, experts.swiglu_limit, grouped_mm=fast)  # (R, F)
    else:
        stacked = stacked_gate_up(gate, up)  # a view once the engine packed the experts, else a copy per call
        stacked = stacked if stacked is not None else torch.cat([gate, up], dim=1)  # (E_l, 2F, H)
        gate_up = static_grouped_linear(rows, stacked, tokens_per_expert, grouped_mm=fast)
        act = swiglu(gate_up, experts.swiglu_limit)  # (R, F) from (R, 2F)
    return static_grouped_linear(act, down, tokens_per_expert, grouped_mm=fast)  # (R, H)


def inference_dispatcher(dispatcher: Any, num_experts: int) -> AllGatherVDispatcher:
    """The block's dispatcher when it is ``allgatherv``, else one over the same ep group (``None``: local)."""
    if isinstance(dispatcher, AllGatherVDispatcher):
        return dispatcher
    return AllGatherVDispatcher(getattr(dispatcher, "group", None), num_experts)


def static_moe(
    dispatcher: AllGatherVDispatcher, experts: GroupedSwiGLU, x: torch.Tensor, routing: RoutingDecision
) -> torch.Tensor:
    """The routed experts' weighted sum for ``x (N, H)`` -> ``(N, H)``: static-shape dispatch, experts, combine."""
    result = dispatcher.dispatch(x, routing)  # R rows, counts on the device
    return dispatcher.combine(static_experts(experts, result.tokens, result.tokens_per_expert), result)
