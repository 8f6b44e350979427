"""Precision recipes: number formats for GEMMs, parameters, gradients and the loss."""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch
    from torch import nn

    from mcore.params import ParamSpec


@dataclass(frozen=True, kw_only=True)
class GatherPayload:
    """What a parameter shard becomes before FSDP all-gathers it.

    ``tensors``: the shard's tensors to gather (e.g. fp8 bytes and per-block scales), each
    gathered along dim 0; ``metadata``: anything ``unpack`` needs (original shape, dtype).
    """

    tensors: tuple[torch.Tensor, ...]
    metadata: Any


@runtime_checkable
class PrecisionRecipe(Protocol):
    """Registered under kind ``"precision"`` (``fp32``, ``bf16``, ``fp8-delayed``, ...).

    Contract:
        * ``param_dtype``: dtype the model's parameters are stored in for compute;
          ``master_dtype``: dtype of the optimizer's master copy (fp32 unless documented);
          ``reduce_dtype``: dtype of gradient reduction across ranks.
        * ``prepare(model)``: called before layouts; converts parameters to
          ``param_dtype`` and swaps GEMM modules for quantized ones where the format needs
          it. Returns the model. It must work on a model on the meta device (meta-device
          construction: values are filled after the layouts, ``mcore.construct``), so it reads
          shapes and dtypes, never values; roles (``mcore.params``: embedding, head and router
          stay in high precision) come from the model's declarations.
        * ``autocast()``: context entered around forward (and the loss).
        * ``scale_loss(loss)``: returns the tensor to call ``backward`` on (loss scaling for
          fp16, identity otherwise); ``unscale_grads(model)`` divides gradients by the
          scale and answers whether this rank's gradients are all finite: ``True``/``False``, or
          (better: no host sync) a 0-d bool tensor on the gradients' device, as the built-in
          recipes do (the runtime combines the answer across ranks, inside its one all-reduce of
          the step, before skipping a step). The runtime also skips a step whose global gradient norm
          is NaN or Inf (a NaN or Inf gradient element makes it so): a recipe whose ``unscale_grads``
          takes a keyword ``finite_from_norm`` is called with it ``True`` and may answer ``True``
          without scanning the gradients (the built-in recipes do; fp16 still reports what its
          unscaling finds); ``update()`` adjusts the scale
          after the step; a recipe whose ``update`` takes a ``finite`` keyword is handed the step's
          finiteness as agreed over all ranks (``update(finite=...)``), so every rank moves its scale
          alike without a collective of its own. The recipe owns its scaling state and checkpoints it through
          ``state_dict``/``load_state_dict``.
        * ``gather_payload(param_shard, *, name, spec)``: ``None`` to gather the shard as is, or a
          ``GatherPayload`` for FSDP to all-gather: one or several tensors (quantized bytes and
          scales; MXFP8's row-wise and column-wise copies), each gathered along dim 0. ``name`` is
          the parameter's name in the model and ``spec`` its declared ``ParamSpec`` (or ``None``):
          the recipe decides by role (embedding, head and router stay in high precision), never
          by name patterns. It may be asked with a tensor on the meta device and then answers
          from shape, dtype and role alone. (A recipe whose method takes only the shard is still
          asked, without the two.) ``unpack(gathered, metadata)`` builds what FSDP hands to
          compute: a plain tensor (the weight dequantised, copied into FSDP's buffer), or a
          ``mcore.precision.quantized.QuantizedWeight`` (bytes + scales, never dequantised): FSDP
          attaches it to the gathered parameter and the recipe's own GEMM modules (put in by
          ``prepare``) read it with ``compute_weight`` and run the scaled GEMM on it; the
          parameter's buffer slot is then not written, so a recipe answers this way only for weights
          its modules consume. A recipe that does must also offer ``dequantize(weight) -> Tensor``
          (its rows as the high-precision weight, for checks and tools). Optional
          ``gather_payloads(shards, asks)``: the payloads of a whole FSDP unit at once (``asks`` holds
          each shard's ``gather_payload`` keywords), so state reduced over ranks (per-tensor amaxes) takes
          one collective per unit instead of one per weight; the answers equal one ``gather_payload``
          call each.
        * ``after_step(model)``: re-quantize cached weights from the updated master
          weights (no-op for formats without cached weights).
        * optional ``grouped_linear(x, weight, group_sizes)``: the grouped expert GEMM of an MoE
          block (``x (N, K)`` rows sorted by expert, ``weight (E, F, K)``, ``group_sizes (E,)``)
          in the recipe's format (quantise + scaled grouped GEMM), or ``NotImplemented`` to let
          the plain reference run. Blocks reach it through ``mcore.precision.grouped.grouped_linear``
          and ``BlockContext.precision`` (the run loop sets it), never by importing the recipe's
          plugin. Its result equals the reference within the recipe's forward tolerance.
        * optional ``bind_mesh(mesh)``: the run's ``ParallelMesh``, given once after the mesh is built and
          before ``prepare`` (on every rank: it may create process groups, a collective), so a recipe with
          state reduced over ranks (delayed-scaling amax) picks its groups from the mesh instead of the
          default group. After binding, ``state_dict`` may be a collective (every rank calls it).
    """

    name: ClassVar[str]
    param_dtype: torch.dtype
    master_dtype: torch.dtype
    reduce_dtype: torch.dtype

    def prepare(self, model: nn.Module) -> nn.Module: ...

    def autocast(self) -> AbstractContextManager[Any]: ...

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor: ...

    def unscale_grads(self, model: nn.Module) -> bool | torch.Tensor: ...

    def update(self) -> None: ...

    def gather_payload(
        self, param_shard: torch.Tensor, *, name: str = "", spec: ParamSpec | None = None
    ) -> GatherPayload | None: ...

    def unpack(self, gathered: tuple[torch.Tensor, ...], metadata: Any) -> torch.Tensor: ...

    def after_step(self, model: nn.Module) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...
