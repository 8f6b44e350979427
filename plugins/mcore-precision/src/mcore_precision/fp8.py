"""Recipes ``fp8-current``, ``fp8-delayed``, ``fp8-rowwise`` and ``fp8-blockwise``: FP8 GEMMs for the model's
matrix linears (and the base every quantised recipe shares, ``_QuantizedRecipe``).

``prepare`` casts the model to ``params`` (bf16 by default; the optimizer keeps fp32 masters) and puts an
``FP8Linear`` (``fp8_linear``) in place of every ``nn.Linear`` whose weight's declared role
(``mcore.params``) is ``matrix``: embedding, head, router and expert weights stay in high precision, and
so do the linears of the first ``first_layers_bf16`` and last ``last_layers_bf16`` layers (the entries of
the model's ``layers`` list). Each linear gets the recipe's scaling scheme (``scaling``). Inputs and weights
are quantised to E4M3, output gradients to ``grad_format`` (E5M2 by default for the per-tensor recipes, E4M3
for rowwise and blockwise).

Scales are ``fmax / amax / 2**margin``:

* ``fp8-current``: per tensor, from each tensor's amax at the moment it is quantised (one extra pass, no state);
* ``fp8-delayed``: per tensor, from an amax history of the last ``amax_history_len`` steps per tensor (weights,
  inputs, gradients of every FP8 linear): ``max`` over the window or the ``most_recent`` step. A step records
  each tensor's amax (the max over its micro-batches) in slot 0 and quantises with the scale computed at the
  end of the previous step (``update``); the first time a tensor is seen its current amax is used. The
  histories and scales are the recipe's state (``state_dict``), so a resumed run quantises exactly as the
  first one. With several ranks, ``update`` first reduces each step's amaxes (max) over the ranks that hold
  the same weights with different data (all ranks, or those of one pipeline stage after ``bind_mesh``), so
  they hold the same histories and scales; the checkpoint's one copy holds every stage's.
* ``fp8-rowwise``: one scale per row of each GEMM operand along its reduction dim, from the current amaxes;
* ``fp8-blockwise``: DeepSeek-V3's 1x128 tiles (inputs, gradients) and 128x128 blocks (weights).

A NaN/inf amax is never recorded (the step is skipped by the finiteness check anyway) and never turns
into a scale. Which GEMM path runs (native scaled-mm kernels or the fp32 emulation) is the scheme's choice
(``native``); ``gemm = "emulated"`` forces the emulation. ``fp8-current`` and ``fp8-blockwise`` also take
MoE's grouped expert GEMMs (``grouped_linear``); ``fp8-delayed`` leaves them to the reference (its scales
live per linear).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.distributed as dist
from torch import nn

from mcore.errors import ConfigError
from mcore.mesh import ParallelMesh
from mcore.params import ParamSpec, collect_param_specs
from mcore.precision.basic import PlainRecipe
from mcore.precision.quantized import QuantizedWeight
from mcore.protocols.precision import GatherPayload
from mcore_precision import fsdp_gather, kernels
from mcore_precision.formats import E4M3, FORMATS, FP8Format, amax_to_scale, tensorwise_scale
from mcore_precision.fp8_linear import FP8Linear, storage_less
from mcore_precision.grouped import grouped_quantized_linear
from mcore_precision.scaling import BlockwiseScheme, RowwiseScheme, Scaler, Scheme, TensorScheme

__all__ = [
    "CurrentScaler",
    "DelayedScaler",
    "FP8Blockwise",
    "FP8Current",
    "FP8Delayed",
    "FP8Rowwise",
    "fp8_linear_names",
]

_OPERANDS = ("input", "weight", "grad")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


class CurrentScaler:
    """The scale of a tensor from its own amax, every time."""

    def __init__(self, fmt: FP8Format, margin: int) -> None:
        self.fmt, self.margin = fmt, margin

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        return tensorwise_scale(x, self.fmt, self.margin)

    def scale_of_amax(self, amax: torch.Tensor) -> torch.Tensor:
        """The scale of a tensor whose amax is ``amax`` (a sharded weight's global amax: ``fsdp_gather``)."""
        return amax_to_scale(amax, self.fmt, self.margin)

    def quantize(
        self, x: torch.Tensor, transpose: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """``(q, q.T or None, scale, 1 / scale)`` of ``x (M, K)``: the amax pass and one fused cast (+ transpose)
        pass of ``kernels.quantize_tensorwise`` (``scaling.FusedScaler``)."""
        q, q_t, scale, _, decode = kernels.quantize_tensorwise(x, self.fmt, self.margin, None, transpose)
        return q, q_t, scale, decode


class DelayedScaler:
    """The scale of a tensor from its amax history (module docstring); ``advance`` ends a step."""

    def __init__(self, fmt: FP8Format, margin: int, history_len: int, algo: str) -> None:
        self.fmt, self.margin, self.algo = fmt, margin, algo
        self.history = torch.zeros(history_len, dtype=torch.float32)  # slot 0: this step
        self.current = torch.ones((), dtype=torch.float32)  # the scale used this step
        self.seen = torch.zeros((), dtype=torch.bool)

    def move_to(self, device: torch.device) -> None:
        if self.history.device != device:
            self.history, self.current, self.seen = (t.to(device) for t in (self.history, self.current, self.seen))

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_meta:  # shape-only runs (memory planning): no state to touch
            return torch.ones((), device=x.device)
        return self.scale_of_amax(x.detach().abs().amax().float() if x.numel() else torch.zeros((), device=x.device))

    def scale_of_amax(self, amax: torch.Tensor) -> torch.Tensor:
        """``scale`` of a tensor whose amax is ``amax`` (a sharded weight's global amax: ``fsdp_gather``)."""
        if amax.is_meta:
            return torch.ones((), device=amax.device)
        self.move_to(amax.device)
        amax = amax.float()
        finite = torch.isfinite(amax)
        # the state is updated in place (no attribute rebound): torch.compile traces this inside the quantised
        # linear's autograd function, where rebinding an attribute of this object would break its graph
        self.history[0].copy_(torch.where(finite, torch.maximum(self.history[0], amax), self.history[0]))
        # first sight: this amax; afterwards the scale fixed at the end of the previous step
        fresh = torch.where(finite, amax_to_scale(amax, self.fmt, self.margin), self.current)
        self.current.copy_(torch.where(self.seen, self.current, fresh))
        self.seen.copy_(self.seen | finite)
        return self.current.clone()  # what backward keeps: not the live state, which a later call may change

    def advance(self) -> None:
        amax = self.history.amax() if self.algo == "max" else self.history[0]
        usable = self.seen & (amax > 0)
        self.current = torch.where(usable, amax_to_scale(amax, self.fmt, self.margin), self.current)
        self.history = torch.roll(self.history, 1)
        self.history[0] = 0.0

    def state(self) -> dict[str, torch.Tensor]:
        return {"history": self.history.clone(), "scale": self.current.clone(), "seen": self.seen.clone()}

    def load(self, state: dict[str, torch.Tensor], where: str) -> None:
        history = torch.as_tensor(state["history"], dtype=torch.float32)
        if history.shape != self.history.shape:
            raise ValueError(
                f"{where}: amax history of length {history.shape[0]} in the checkpoint, "
                f"amax_history_len = {self.history.shape[0]} now; allowed: the same length"
            )
        device = self.history.device
        self.history = history.to(device).clone()
        self.current = torch.as_tensor(state["scale"], dtype=torch.float32).to(device).clone()
        self.seen = torch.as_tensor(state["seen"], dtype=torch.bool).to(device).clone()


def _layer_count(model: nn.Module) -> int | None:
    count = getattr(model, "stage_layers", None)
    if callable(count):
        return int(count())
    layers = getattr(model, "layers", None)
    return len(layers) if isinstance(layers, (nn.ModuleList, nn.ModuleDict)) else None


def fp8_linear_names(model: nn.Module, *, first_layers_bf16: int = 0, last_layers_bf16: int = 0) -> list[str]:
    """The module paths of the ``nn.Linear``s an fp8 recipe quantises: those whose weight's declared role is
    ``matrix``, outside the first/last N layers."""
    specs = collect_param_specs(model)
    layers = _layer_count(model)
    if (first_layers_bf16 or last_layers_bf16) and layers is None:
        raise ConfigError(
            "precision.first_layers_bf16 / last_layers_bf16 need a model with a 'layers' list; "
            f"{type(model).__name__} has none (allowed: 0 for such a model)"
        )
    keep = set(range(first_layers_bf16)) | set(range((layers or 0) - last_layers_bf16, layers or 0))
    names = []
    for path, module in model.named_modules():
        if not isinstance(module, nn.Linear) or isinstance(module, FP8Linear):
            continue
        spec = specs.get(f"{path}.weight" if path else "weight")
        if spec is None or spec.role != "matrix":
            continue
        layer = _LAYER.search(path)
        if layer is not None and int(layer.group(1)) in keep:
            continue
        names.append(path)
    return names


class _QuantizedRecipe(PlainRecipe):
    """What every recipe with quantised linears shares: the swap of the matrix linears (each gets the scheme
    ``_scheme`` answers for it), the plain loss and gradients, FSDP's quantised gather of their weights
    (``gather_payload``/``unpack``: ``fsdp_gather``), and the grouped expert GEMM
    (``grouped_linear``) where ``_grouped_scheme`` answers a scheme."""

    name: ClassVar[str] = "quantized"
    master_dtype: torch.dtype = torch.float32
    reduce_dtype: torch.dtype = torch.float32

    @dataclass(kw_only=True, slots=True)
    class Config:
        params: Literal["bf16", "fp32"] = "bf16"
        """dtype of the parameters (and of everything that is not a quantised GEMM); masters are fp32."""
        first_layers_bf16: int = 0
        """The first N layers keep high-precision linears."""
        last_layers_bf16: int = 0
        """The last N layers keep high-precision linears."""

        def __post_init__(self) -> None:
            _choice("params", self.params, ("bf16", "fp32"))
            for key in ("first_layers_bf16", "last_layers_bf16"):
                _count(key, getattr(self, key), 0)

    config: Any

    def __init__(self, config: Any = None) -> None:
        self.config = config if config is not None else type(self).Config()
        self.param_dtype = torch.bfloat16 if self.config.params == "bf16" else torch.float32
        self._linears: dict[str, FP8Linear] = {}  # weight name in the prepared model -> its linear (FSDP gather)
        self._warned: set[str] = set()  # weights told to gather in high precision (blocks cut by shards)

    @staticmethod
    def check_run(config: Any, run: Any) -> None:
        """Before launch: no tensor parallelism (``tp > 1``), whose sharded weights ``FP8Linear`` refuses."""
        tp = run.parallel.sizes.get("tp")
        if "tp" in [layout.name for layout in run.layouts] and isinstance(tp, int) and tp != 1:
            raise ValueError(
                f"precision.recipe = {run.precision.name!r} with parallel.sizes.tp = {tp}: its scales need the global "
                "amax of whole weights; allowed: parallel.sizes.tp = 1, or fsdp (it gathers whole weights) instead of tp"
            )

    def _scheme(self, path: str) -> Scheme:
        raise NotImplementedError

    def _grouped_scheme(self) -> Scheme | None:
        """The scheme of MoE's grouped expert GEMMs, or ``None``: the plain reference runs."""
        return None

    def prepare(self, model: nn.Module) -> nn.Module:
        cfg = self.config
        kernels.load_references()  # before any torch.compile traces a quantisation (it cannot trace the import)
        model = model.to(dtype=self.param_dtype)
        names = fp8_linear_names(model, first_layers_bf16=cfg.first_layers_bf16, last_layers_bf16=cfg.last_layers_bf16)
        for path in names:
            linear = model.get_submodule(path)
            assert isinstance(linear, nn.Linear)
            new = FP8Linear.from_scheme(linear, self._scheme(path))
            self._linears[f"{path}.weight" if path else "weight"] = new
            parent, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, new)
        return model

    def gather_payload(
        self, param_shard: torch.Tensor, *, name: str = "", spec: ParamSpec | None = None
    ) -> GatherPayload | None:
        """The weight of one of this recipe's linears (``prepare``; FSDP names it as the prepared model does)
        gathered in the linear's format (``fsdp_gather``), or ``None``: gathered as is (every other parameter;
        a scheme or a shard whose blocks a shard boundary would cut: warned once per weight)."""
        return fsdp_gather.payloads([self._gather_request(param_shard, name)])[0]

    def gather_payloads(self, shards: list[torch.Tensor], asks: list[dict[str, Any]]) -> list[GatherPayload | None]:
        """FSDP's batch of a unit's row-split shards (each as ``gather_payload(shard, **ask)``): the global amaxes of
        their per-tensor scales in one all-reduce per unit gather (``fsdp_gather.payloads``), the same bytes."""
        return fsdp_gather.payloads([self._gather_request(s, ask.get("name", "")) for s, ask in zip(shards, asks)])

    def _gather_request(self, param_shard: torch.Tensor, name: str) -> fsdp_gather.Request | None:
        """What ``fsdp_gather.payload`` is asked for ``name``'s shard, or ``None``: gathered as is."""
        linear = self._linears.get(name)
        align = fsdp_gather.block_rows(linear.scheme) if linear is not None else None
        if linear is None or align is None or param_shard.dim() != 2:
            return None
        rows = param_shard.shape[0]
        whole = rows >= linear.weight.shape[0]  # kept whole on one rank (or one rank): its own amax is global
        if not whole and rows % align:
            if name not in self._warned:
                self._warned.add(name)
                warnings.warn(
                    f"{self.name}: {name} has {rows} rows per rank, which cuts its {align}-row blocks; gathered in "
                    f"high precision (allowed for a quantised gather: rows per rank a multiple of {align}, or "
                    "parallel.fsdp.whole_params)",
                    stacklevel=2,
                )
            return None
        # before the layout sharded the weight, FSDP probes the payload's shapes on zeros: no scaler state touched
        probe = not hasattr(linear.weight, "device_mesh")
        shard = torch.zeros_like(param_shard, device="cpu") if param_shard.is_meta else param_shard.detach()
        return fsdp_gather.Request(linear.scheme, shard, linear.weight, whole=whole, probe=probe)

    def unpack(self, gathered: tuple[torch.Tensor, ...], metadata: Any) -> Any:
        """The gathered payload as a ``QuantizedWeight`` for the linear's GEMMs (``FP8Linear.forward``)."""
        return fsdp_gather.unpack(gathered, metadata)

    def dequantize(self, weight: QuantizedWeight) -> torch.Tensor:
        """A gathered weight's rows in high precision (checks and tools)."""
        return fsdp_gather.dequantize(weight)

    def grouped_linear(self, x: torch.Tensor, weight: torch.Tensor, group_sizes: torch.Tensor) -> Any:
        """MoE's grouped expert GEMM (``mcore.precision.grouped``) with every expert's GEMMs quantised by the
        recipe's scheme, or ``NotImplemented`` (no grouped scheme, or storage-less tensors: the reference runs)."""
        scheme = self._grouped_scheme()
        if scheme is None or storage_less(x) or storage_less(weight):
            return NotImplemented
        return grouped_quantized_linear(x, weight, group_sizes, scheme)

    def update(self) -> None:
        return None


class _FP8Recipe(_QuantizedRecipe):
    """The FP8 recipes' keys: the gradient format, the margin and the GEMM path."""

    name: ClassVar[str] = "fp8"

    @dataclass(kw_only=True, slots=True)
    class Config(_QuantizedRecipe.Config):
        grad_format: Literal["e5m2", "e4m3"] = "e5m2"
        """Format of the output gradients in backward (inputs and weights are always E4M3)."""
        margin: int = 0
        """Scales are ``fmax / amax / 2**margin``: headroom of ``margin`` binades."""
        gemm: Literal["auto", "emulated"] = "auto"
        """'auto': torch's scaled-mm kernels where the card, torch and shapes allow, else emulated; 'emulated': always emulated."""

        def __post_init__(self) -> None:
            _QuantizedRecipe.Config.__post_init__(self)
            _choice("grad_format", self.grad_format, tuple(FORMATS))
            _choice("gemm", self.gemm, ("auto", "emulated"))
            _count("margin", self.margin, 0)

    def _scaler(self, fmt: FP8Format) -> Scaler:
        raise NotImplementedError

    def _adopt(self, name: str, scalers: dict[str, Scaler]) -> None:
        """Hook for recipes with state: keep the new linear's scalers under its name."""

    def _scheme(self, path: str) -> Scheme:
        scalers = {
            "input": self._scaler(E4M3),
            "weight": self._scaler(E4M3),
            "grad": self._scaler(FORMATS[self.config.grad_format]),
        }
        self._adopt(path, scalers)
        return TensorScheme(**scalers, native=self.config.gemm == "auto")


def _choice(key: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"precision.{key} = {value!r}; allowed: {', '.join(repr(a) for a in allowed)}")


def _count(key: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"precision.{key} = {value!r}; allowed: an int >= {low}")


class FP8Current(_FP8Recipe):
    """Per-tensor FP8 with scales from the current amax (module docstring)."""

    name: ClassVar[str] = "fp8-current"

    @dataclass(kw_only=True, slots=True)
    class Config(_FP8Recipe.Config):
        pass

    def _scaler(self, fmt: FP8Format) -> Scaler:
        return CurrentScaler(fmt, self.config.margin)

    def _grouped_scheme(self) -> Scheme | None:
        cfg = self.config
        scalers = [CurrentScaler(fmt, cfg.margin) for fmt in (E4M3, E4M3, FORMATS[cfg.grad_format])]
        return TensorScheme(input=scalers[0], weight=scalers[1], grad=scalers[2], native=cfg.gemm == "auto")


class FP8Rowwise(_FP8Recipe):
    """FP8 with one scale per row of each GEMM operand along its reduction dim (module docstring)."""

    name: ClassVar[str] = "fp8-rowwise"

    @dataclass(kw_only=True, slots=True)
    class Config(_FP8Recipe.Config):
        grad_format: Literal["e5m2", "e4m3"] = "e4m3"
        """Format of the output gradients (E4M3 by default: torch's rowwise kernel takes E4M3 operands)."""

    def _scheme(self, path: str) -> Scheme:
        cfg = self.config
        return RowwiseScheme(FORMATS[cfg.grad_format], cfg.margin, native=cfg.gemm == "auto")


class FP8Blockwise(_FP8Recipe):
    """DeepSeek-V3 blockwise FP8: 1x128 activation/gradient tiles, 128x128 weight blocks (module docstring)."""

    name: ClassVar[str] = "fp8-blockwise"

    @dataclass(kw_only=True, slots=True)
    class Config(_FP8Recipe.Config):
        grad_format: Literal["e5m2", "e4m3"] = "e4m3"
        """Format of the output gradients (E4M3 by default, as DeepSeek-V3 trains)."""

    def _scheme(self, path: str) -> Scheme:
        cfg = self.config
        return BlockwiseScheme(FORMATS[cfg.grad_format], cfg.margin, native=cfg.gemm == "auto")

    def __init__(self, config: FP8Blockwise.Config | None = None) -> None:
        super().__init__(config)
        self._grouped: Scheme | None = None  # one scheme for every grouped call (it remembers its kernel checks)

    def _grouped_scheme(self) -> Scheme | None:
        if self._grouped is None:
            self._grouped = self._scheme("")
        return self._grouped


class FP8Delayed(_FP8Recipe):
    """Per-tensor FP8 with scales from an amax history (module docstring)."""

    name: ClassVar[str] = "fp8-delayed"

    @dataclass(kw_only=True, slots=True)
    class Config(_FP8Recipe.Config):
        amax_history_len: int = 16
        """Steps of amax history kept per tensor."""
        amax_compute_algo: Literal["max", "most_recent"] = "max"
        """'max': the largest amax of the window; 'most_recent': the last step's."""

        def __post_init__(self) -> None:
            _FP8Recipe.Config.__post_init__(self)
            _count("amax_history_len", self.amax_history_len, 1)
            _choice("amax_compute_algo", self.amax_compute_algo, ("max", "most_recent"))

    def __init__(self, config: FP8Delayed.Config | None = None) -> None:
        super().__init__(config)
        self.scalers: dict[str, DelayedScaler] = {}  # "<linear path>.<operand>"
        self._pending: dict[str, dict[str, torch.Tensor]] = {}  # loaded before prepare
        self._checked = False  # the ranks' scaler counts compared (several ranks only)
        self._group: dist.ProcessGroup | None = None  # the ranks whose amaxes are combined (None: all)
        self._stages = False  # bound to a mesh with pipeline stages
        self._home: torch.device | None = None  # the mesh's device: where the scalers' state lives

    def _scaler(self, fmt: FP8Format) -> Scaler:
        cfg = self.config
        return DelayedScaler(fmt, cfg.margin, cfg.amax_history_len, cfg.amax_compute_algo)

    def _adopt(self, name: str, scalers: dict[str, Scaler]) -> None:
        for operand, scaler in scalers.items():
            assert isinstance(scaler, DelayedScaler)
            key = f"{name}.{operand}"
            if key in self._pending:
                scaler.load(self._pending.pop(key), f"recipe 'fp8-delayed', {key}")
            if self._home is not None:  # there before the first forward, which torch.compile may trace
                scaler.move_to(self._home)
            self.scalers[key] = scaler

    def update(self) -> None:
        self._agree_over_ranks()
        for scaler in self.scalers.values():
            scaler.advance()

    def bind_mesh(self, mesh: ParallelMesh) -> None:
        """Reduce each step's amaxes over the ranks that hold the same weights with different data only.

        Those are the ranks of this rank's pipeline stage: every mesh dimension but ``pp`` (data-parallel
        replicas and shards, context-parallel sequence parts and expert-parallel ranks read different tokens
        through the same non-expert weights; tensor-parallel ranks read the same ones, which the max leaves
        unchanged). Without a ``pp`` dimension that is every rank, as unbound. A collective: every rank calls
        it once, after the mesh is built and before the first step. The scalers made afterwards (``prepare``) keep
        their state on the mesh's device from the start: moved at the first forward instead, inside a compiled
        block, the move would be a side effect that breaks its graph."""
        self._home = mesh.device
        self._group = None
        self._stages = mesh.size("pp") > 1 and mesh.device_mesh is not None
        if not self._stages:
            return
        assert mesh.device_mesh is not None
        ranks = mesh.device_mesh.mesh.movedim(mesh.dim_names.index("pp"), 0)  # (pp, ...) the global ranks
        per_stage = ranks.reshape(mesh.size("pp"), -1).tolist()  # the ranks of each stage
        self._group, _ = dist.new_subgroups_by_enumeration(per_stage)

    def _device(self) -> torch.device:
        scalers = self.scalers.values()
        device = next((s.history.device for s in scalers if s.history.device.type != "cpu"), torch.device("cpu"))
        if dist.get_backend() == "nccl" and device.type != "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
        return device

    def _agree_over_ranks(self) -> None:
        """Every rank of the group (``bind_mesh``; all ranks when unbound) ends the step with the same histories:
        this step's amax of each tensor is the max over the ranks that saw it, in one all-reduce.

        Then every rank quantises with the same scales from the next step on. Every rank prepared the same whole
        model (``prepare`` runs before the layouts), so every rank holds the same scalers, in the same order; the
        first call checks that once. A single process needs none of it.
        """
        if not (dist.is_available() and dist.is_initialized()) or not self.scalers:
            return
        if dist.get_world_size(self._group) < 2:
            return
        scalers = list(self.scalers.values())
        device = self._device()
        if not self._checked:
            counts = torch.tensor([len(scalers), -len(scalers)], dtype=torch.float64, device=device)
            dist.all_reduce(counts, op=dist.ReduceOp.MAX, group=self._group)
            if counts[0].item() != -counts[1].item():
                raise RuntimeError(
                    "fp8-delayed: the ranks hold different numbers of FP8 linears; every rank must prepare the same "
                    "whole model before the layouts"
                )
            self._checked = True
        for scaler in scalers:
            scaler.move_to(device)
        packed = torch.stack([torch.stack([s.history[0], s.seen.float()]) for s in scalers])  # (scalers, 2)
        dist.all_reduce(packed, op=dist.ReduceOp.MAX, group=self._group)
        for scaler, (amax, seen) in zip(scalers, packed.unbind(0)):
            scaler.history[0] = amax
            scaler.seen = seen > 0

    def _combine_stages(self) -> None:
        """With pipeline stages (``bind_mesh``), each stage holds the histories of its own linears only; the
        checkpoint keeps one copy of the state, so before it is read every rank takes each linear's state from
        the stage that ran it (one all-reduce over all ranks; a linear no stage saw keeps scale 1)."""
        if not self._stages or not self.scalers:
            return
        scalers = list(self.scalers.values())
        device = self._device()
        for scaler in scalers:
            scaler.move_to(device)
        histories = torch.stack([s.history for s in scalers])  # (scalers, len): 0 where not seen
        seen_scales = torch.stack([torch.where(s.seen, s.current, 0.0) for s in scalers])  # (scalers,)
        dist.all_reduce(histories, op=dist.ReduceOp.MAX)
        dist.all_reduce(seen_scales, op=dist.ReduceOp.MAX)
        for scaler, history, scale in zip(scalers, histories.unbind(0), seen_scales.unbind(0)):
            scaler.history, scaler.seen = history.clone(), scale > 0
            scaler.current = torch.where(scale > 0, scale, torch.ones_like(scale))

    def state_dict(self) -> dict[str, Any]:
        """The histories, scales and first-sight flags of every FP8 linear (a collective after ``bind_mesh`` of a
        mesh with pipeline stages: ``_combine_stages``)."""
        self._combine_stages()
        return {f"{key}.{field}": t for key, s in self.scalers.items() for field, t in s.state().items()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        for full, value in state_dict.items():
            key, _, field = full.rpartition(".")
            if field not in ("history", "scale", "seen") or key.rpartition(".")[2] not in _OPERANDS:
                raise ValueError(f"recipe 'fp8-delayed' state has an unknown key {full!r}")
            grouped.setdefault(key, {})[field] = value
        if self.scalers:  # prepared already: the state must be for these linears
            unknown = sorted(set(grouped) - set(self.scalers))
            if unknown:
                raise ValueError(
                    f"recipe 'fp8-delayed' state names {unknown[0]!r}, which is no FP8 linear of this model "
                    "(allowed: the same model and first/last_layers_bf16 as the checkpoint)"
                )
            for key, state in grouped.items():
                self.scalers[key].load(state, f"recipe 'fp8-delayed', {key}")
        else:
            self._pending = grouped
