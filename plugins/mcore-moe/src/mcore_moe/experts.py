"""Routed SwiGLU experts as grouped GEMMs, and the grouped GEMM backend they use.

Shape legend: M routed rows sorted by expert, H hidden size, F expert FFN size, E_l local experts.

Each expert is ``down(silu(gate(x)) * up(x))`` (``swiglu_limit`` a: ``silu(min(gate(x), a)) * clamp(up(x), -a, a)``);
the weights of all local experts are stacked into ``gate``, ``up`` ``(E_l, F, H)`` and ``down`` ``(E_l, H, F)``
(role ``expert``: dim 0 indexes the experts, so an ``ep`` layout shards dim 0 and expert TP shards ``gate``/``up``
by rows and ``down`` by columns). ``gate`` and ``up`` are views of one ``(E_l, 2, F, H)`` buffer (``pack``: same
names, shapes and values; each parameter is strided, not contiguous), so gate and up run as ONE grouped GEMM
over ``[gate | up]`` read in place, giving ``(M, 2F)`` rows (``mcore_moe.gate_up``); the activation reads those in
place (``mcore_moe.swiglu``: a Triton kernel on CUDA), then the ``down`` GEMM. Under a precision recipe
(``ctx.precision.grouped_linear``) the unfused path runs instead, each weight its own
``mcore.precision.grouped.grouped_linear`` call (the recipe quantises each with its own scales); without one, CUDA
devices with ``torch._grouped_mm`` (bf16, aligned sizes) use it, and everything else the per-expert torch
reference. Whether ``torch._grouped_mm`` works is probed once per device
(a tiny call checked against the reference); where it fails the reference runs, with one warning.
With ``MCORE_MOE_GROUPED_GEMM=triton`` (``kernel_choice.grouped_gemm``, opt-in) gate, up and the SwiGLU run as one
Triton grouped GEMM with the activation in its epilogue (``mcore_moe.grouped_swiglu_triton``) where Triton runs.
``GroupedSwiGLU.forward_reference`` keeps the unfused path (two GEMMs, torch ``silu(gate) * up``) the fused one is
tested against.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from mcore.precision.grouped import grouped_linear, grouped_linear_reference
from mcore_moe.gate_up import gate_up_linear, packed_layout, storage_id
from mcore_moe.kernel_choice import grouped_gemm
from mcore_moe.swiglu import swiglu


def _grouped_mm_fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """``torch._grouped_mm`` takes this call: CUDA bf16 tensors with 16-byte aligned feature sizes."""
    return (
        x.is_cuda
        and hasattr(torch, "_grouped_mm")
        and x.dtype == torch.bfloat16
        and weight.dtype == torch.bfloat16
        and type(weight) in (torch.Tensor, nn.Parameter)
        and weight.shape[1] % 8 == 0
        and weight.shape[2] % 8 == 0
    )


def _grouped_mm(x: torch.Tensor, weight: torch.Tensor, group_sizes: torch.Tensor) -> torch.Tensor:
    offsets = torch.cumsum(group_sizes, 0).to(torch.int32)  # (E_l,) end row of each expert, no host sync
    return torch._grouped_mm(x, weight.transpose(-2, -1), offs=offsets)  # (M, N)


def grouped_mm_works(device: torch.device) -> bool:
    """One small ``torch._grouped_mm`` call on ``device`` agrees with the reference (warns once when not)."""
    try:
        x = torch.randn(48, 32, device=device, dtype=torch.bfloat16)
        w = torch.randn(3, 16, 32, device=device, dtype=torch.bfloat16)
        sizes = torch.tensor([16, 0, 32], device=device)
        ok = torch.allclose(
            _grouped_mm(x, w, sizes).float(), grouped_linear_reference(x.float(), w.float(), sizes), rtol=0.05, atol=0.5
        )
    except RuntimeError as exc:
        warnings.warn(f"moe: torch._grouped_mm failed on {device} ({exc}); experts use the reference", stacklevel=2)
        return False
    if not ok:
        warnings.warn(f"moe: torch._grouped_mm disagrees with the reference on {device}; experts use it", stacklevel=2)
    return ok


def expert_linear(
    x: torch.Tensor, weight: torch.Tensor, group_sizes: torch.Tensor, ctx: Any, *, grouped_mm: bool = False
) -> torch.Tensor:
    """``x (M, K)`` rows of expert ``e`` times ``weight[e].T`` (``weight (E_l, N, K)``) -> ``(M, N)``.

    The precision recipe's grouped GEMM when the context carries one, else ``torch._grouped_mm`` where it
    fits and ``grouped_mm`` (the device's probe passed), else the reference (``grouped_linear``)."""
    takes = getattr(getattr(ctx, "precision", None), "grouped_linear", None) is not None
    if grouped_mm and not takes and _grouped_mm_fits(x, weight):
        return _grouped_mm(x, weight, group_sizes)
    return grouped_linear(x, weight, group_sizes, ctx=ctx)


def storage_less(x: torch.Tensor) -> bool:
    """``x`` has no memory behind it (meta, or a fake tensor of ``mcore plan``'s memory estimate): only shapes.
    Never while dynamo traces (``torch.compile``): its fake tensors stand for real ones."""
    from torch._subclasses.fake_tensor import is_fake

    if torch.compiler.is_compiling():
        return False
    return x.is_meta or is_fake(x)


def _owns_storage(t: torch.Tensor) -> bool:
    """``t`` is the whole of its storage, laid out contiguously (no other tensor's bytes around it)."""
    return (
        t.is_contiguous() and t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size()
    )


def _activation(gate: torch.Tensor, up: torch.Tensor, limit: float | None) -> torch.Tensor:
    """The unfused torch SwiGLU of separate ``(M, F)`` gate and up (clamped to ``limit`` when given)."""
    if limit is not None:
        gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
    return F.silu(gate) * up  # (M, F)


class GroupedSwiGLU(nn.Module):
    """``E_l`` SwiGLU experts run over rows grouped by expert (``tokens_per_expert``); ``swiglu_limit``: clamped."""

    def __init__(
        self, num_experts: int, hidden_size: int, ffn_hidden_size: int, *, swiglu_limit: float | None = None
    ) -> None:
        super().__init__()
        gate_up = torch.empty(num_experts, 2, ffn_hidden_size, hidden_size)  # (E_l, 2, F, H): packed from the start
        self.gate = nn.Parameter(gate_up[:, 0])  # (E_l, F, H), a view of gate_up
        self.up = nn.Parameter(gate_up[:, 1])  # (E_l, F, H), right after each expert's gate
        self.down = nn.Parameter(torch.empty(num_experts, hidden_size, ffn_hidden_size))
        self.swiglu_limit = swiglu_limit
        self._grouped_mm: dict[torch.device, bool] = {}  # the probe's answer, once per CUDA device

    def pack_for_inference(self) -> int:
        """Lay ``gate`` and ``up`` out in one ``(E_l, 2, F, H)`` buffer, each a view of it (the same ``Parameter``
        objects and values), so the one gate/up GEMM reads ``[gate | up]`` in place (``gate_up.stacked_gate_up``)
        instead of concatenating every expert's weights per call (a decode step's largest cost otherwise). Unlike
        ``pack``, moves weights whose storage is shared with other tensors too (an engine's loaded weights are its
        own). Returns 1 when packed (plain tensors of one dtype and device), else 0 (a layout's DTensors: ``ep``
        packs their local tensors itself, other layouts concatenate per call)."""
        return self.pack(owned_only=False)

    def pack(self, *, owned_only: bool = True) -> int:
        """``gate`` and ``up`` as views of one ``(E_l, 2, F, H)`` buffer (the same ``Parameter`` objects, names and
        values), so the gate/up GEMM and its backward read ``[gate | up]`` without a copy. The module is built
        packed and packs itself again after ``.to()``, ``.cuda()``, ``to_empty()`` (``_apply``), which give each
        parameter a tensor of its own. ``owned_only``: move only weights that are the whole of their own storage,
        never a view of someone else's buffer (a layout's flat parameter buffer, FSDP's gathered one). Returns 1
        when packed (already or now, meta tensors included: a model built on meta and converted there, e.g. to
        bf16 by a precision recipe, stays packed through ``init_params``), else 0: DTensors of a layout, fake
        tensors, mismatched weights, weights that are views of another buffer; there the forward concatenates."""
        from torch._subclasses.fake_tensor import is_fake

        gate, up = self.gate, self.up
        if any(type(w) not in (torch.Tensor, nn.Parameter) or is_fake(w) for w in (gate, up)):
            return 0  # a layout's DTensors, a recipe's tensor subclass, fake tensors (meta ones pack: it is free)
        if gate.shape != up.shape or gate.dtype != up.dtype or gate.device != up.device:
            return 0
        if packed_layout(gate, up):
            return 1
        if owned_only and not (_owns_storage(gate) and _owns_storage(up)):
            return 0
        with torch.no_grad():
            buffer = torch.stack([gate.detach(), up.detach()], dim=1)  # (E_l, 2, F, H)
        gate.data, up.data = buffer[:, 0], buffer[:, 1]
        return 1

    def _apply(self, fn: Any, recurse: bool = True) -> GroupedSwiGLU:
        """``nn.Module._apply`` (``.to()``, ``.cuda()``, ``.half()``, ``to_empty()``), then ``pack`` again where the
        weights were packed and the conversion gave them tensors of their own; a no-op conversion, or weights
        someone unpacked on purpose (``distributed-adamw`` gives them contiguous storage), are left as they are."""
        was_packed = packed_layout(self.gate, self.up)  # plain tensors, so they have storages
        before = (storage_id(self.gate), storage_id(self.up)) if was_packed else None
        super()._apply(fn, recurse)
        if before is not None and (storage_id(self.gate), storage_id(self.up)) != before:
            self.pack()
        return self

    def __setstate__(self, state: dict[str, Any]) -> None:
        """``copy.deepcopy`` and unpickling copy each parameter on its own: packed again after."""
        super().__setstate__(state)
        self.pack()

    def _fast(self, rows: torch.Tensor) -> bool:
        """``torch._grouped_mm`` may run on ``rows``' device (probed once per CUDA device)."""
        if not (rows.is_cuda and hasattr(torch, "_grouped_mm")):
            return False
        if rows.device not in self._grouped_mm:
            self._grouped_mm[rows.device] = grouped_mm_works(rows.device)
        return self._grouped_mm[rows.device]

    def _local_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The local rows of weights an ``ep`` layout made DTensors (E_l experts; ``to_local`` is differentiable)."""
        w_gate, w_up, w_down = (w.to_local() if isinstance(w, DTensor) else w for w in (self.gate, self.up, self.down))
        return w_gate, w_up, w_down

    def forward(self, rows: torch.Tensor, tokens_per_expert: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        if storage_less(rows):  # shapes only (``mcore plan``): expert 0's weights give every row its sizes
            gate, up = F.linear(rows, self.gate[0]), F.linear(rows, self.up[0])  # (M, F)
            return F.linear(_activation(gate, up, self.swiglu_limit), self.down[0])  # (M, H)
        if getattr(getattr(ctx, "precision", None), "grouped_linear", None) is not None:
            return self.forward_reference(rows, tokens_per_expert, ctx)  # the recipe's GEMMs, one per weight
        fast = self._fast(rows)
        w_gate, w_up, w_down = self._local_weights()
        one_mm = fast and _grouped_mm_fits(rows, w_gate) and _grouped_mm_fits(rows, w_up)
        if grouped_gemm(rows) == "triton":  # opt-in: gate, up and the SwiGLU in one Triton kernel
            from mcore_moe.grouped_swiglu_triton import grouped_swiglu

            act = grouped_swiglu(rows, w_gate, w_up, tokens_per_expert, self.swiglu_limit, grouped_mm=one_mm)
        else:
            gate_up = gate_up_linear(rows, w_gate, w_up, tokens_per_expert, ctx, grouped_mm=one_mm)  # (M, 2F)
            act = swiglu(gate_up, self.swiglu_limit)  # (M, F)
        return expert_linear(act, w_down, tokens_per_expert, ctx, grouped_mm=fast)  # (M, H)

    def forward_reference(self, rows: torch.Tensor, tokens_per_expert: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        """The unfused path: separate gate and up GEMMs, torch ``silu(gate) * up`` (what ``forward`` must equal)."""
        fast = self._fast(rows)
        w_gate, w_up, w_down = self._local_weights()
        gate = expert_linear(rows, w_gate, tokens_per_expert, ctx, grouped_mm=fast)  # (M, F)
        up = expert_linear(rows, w_up, tokens_per_expert, ctx, grouped_mm=fast)  # (M, F)
        act = _activation(gate, up, self.swiglu_limit)  # (M, F)
        return expert_linear(act, w_down, tokens_per_expert, ctx, grouped_mm=fast)  # (M, H)


class SwiGLU(nn.Module):
    """A dense SwiGLU MLP (the shared experts): ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int) -> None:
        super().__init__()
        self.gate = nn.Linear(hidden_size, ffn_hidden_size, bias=False)
        self.up = nn.Linear(hidden_size, ffn_hidden_size, bias=False)
        self.down = nn.Linear(ffn_hidden_size, hidden_size, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(hidden)) * self.up(hidden))  # (..., F) -> (..., H)
