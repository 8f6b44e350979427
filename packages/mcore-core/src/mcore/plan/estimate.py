"""Estimate a run's per-rank memory before launch: parameters, gradients, optimizer state,
and activations per layer, with the chosen layouts, precision and recompute.

What is modelled, and how:

* Activations are *measured*, not guessed: the model is built under ``FakeTensorMode`` (tensors
  with shapes, dtypes and a device but no storage, so the same kernels are chosen as in the
  real run, e.g. CPU flash attention) and one micro-batch goes forward under
  ``saved_tensors_hooks``; every tensor autograd saves for
  backward is counted once (by storage, parameters excluded) and attributed to the block
  running when it was saved (and to its attention child, for selective recompute). This is
  exact for the model's own code on any architecture, and costs no memory.
* Recompute: ``full`` keeps only each block's input; ``selective`` replaces each attention's
  activations by its input. In backward, block (or attention) ``i`` is re-run after the blocks
  above it were freed: its activations + the incoming gradient + the gradients so far + the
  largest transient; the peak is the larger of that and the start of backward.
* Parameters, gradients: element counts times the recipe's ``param_dtype`` size. Optimizer
  state: what the optimizer reports (``mcore.protocols.optimizer.OptimizerStateSize``: bytes per
  parameter, from its shape, declared role and dtype, and whether the state is split over
  ``dp_replicate``); an optimizer that does not report it is assumed AdamW-like (2 fp32 tensors
  per parameter plus an fp32 master copy when parameters are not fp32, not split), and the plan
  says so.
* Layouts are plugins, so their effect is an assumption stated in the plan: parameters,
  gradients and optimizer state are divided by the product of the sizes of the mesh dims
  ``dp_shard``, ``pp``, ``ep``, and by ``tp`` only for the parameters a ``tp`` layout splits (their
  declared ``ParamSpec.tp`` is ``column``, ``row`` or ``vocab``; norms and other ``replicate`` or
  ``partial`` parameters stay whole on every tensor-parallel rank); optimizer state also by
  ``dp_replicate`` when the optimizer says it splits its state over data-parallel replicas;
  activations by ``cp`` (sequence split) and, under ``tp``, not at all: an upper bound (``tp``
  splits the heads' and the MLP's inner activations, and with sequence parallelism the hidden
  states between blocks too), so the plan is on the safe side there.
* The peak is taken at the start of backward: parameters + optimizer state + activations +
  the gradient of the largest saved tensor (the backward's first transient); gradients
  replace activations as backward proceeds, so ``max(activations, gradients)`` is used.
  Not modelled: allocator fragmentation and caching (GPU: add ~5-10%), communication
  buffers of layouts, CUDA context, the data pipeline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from mcore.config import RunConfig
from mcore.errors import ConfigError, UserError
from mcore.mesh import order_dims, resolve_sizes
from mcore.params import collect_param_specs, tp_style
from mcore.plan.stages import StageMemory, StageNumels, stage_memory, stage_numels
from mcore.protocols.block import BlockContext
from mcore.protocols.layout import StagePlan
from mcore.protocols.optimizer import OptimizerStateSize
from mcore.train.build import DATA_DIMS, build_model
from mcore.train.recompute import ATTENTION_NAMES, find_blocks

SHARDING_DIMS = ("dp_shard", "tp", "pp")  # and ep, which splits the experts only (``ep_fraction``)

#: ``ParamSpec.tp`` styles a ``tp`` layout splits over its ranks (the others stay whole).
TP_SPLIT_STYLES = ("column", "row", "vocab")


@dataclass
class LayerMemory:
    name: str
    activations: int  # bytes saved for backward by this block, without recompute
    attention: int  # of which the attention child's
    block_input: int  # bytes of the block's input (what full recompute keeps)
    attention_input: int


@dataclass
class MemoryPlan:
    world_size: int
    shard_factor: int
    params: int
    grads: int
    optimizer: int
    activations: int
    transient: int
    peak: int
    layers: list[LayerMemory] = field(default_factory=list)
    other_activations: int = 0
    recompute: str = "none"
    device_memory: int | None = None
    assumptions: list[str] = field(default_factory=list)
    #: per pipeline rank (``pp``), when a layout gives a stage plan; the peak above is the largest
    stages: list[StageMemory] = field(default_factory=list)

    @property
    def fits(self) -> bool | None:
        return None if self.device_memory is None else self.peak <= self.device_memory


def _dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def measure_activations(
    model: torch.nn.Module, tokens: torch.Tensor, labels: torch.Tensor, ctx: BlockContext | None
) -> tuple[list[LayerMemory], int, int]:
    """Per-block saved bytes of one forward on ``meta`` tensors; returns (layers, other, largest)."""
    blocks = find_blocks(model)
    param_storages = {p.untyped_storage()._cdata for p in model.parameters()}
    seen: set[int] = set()
    current: dict[str, Any] = {"block": None, "attn": False}
    act = [0] * len(blocks)
    attn = [0] * len(blocks)
    inputs = [0] * len(blocks)
    attn_inputs = [0] * len(blocks)
    other = [0]
    largest = [0]
    handles = []

    def block_pre(i: int) -> Any:
        def hook(module: Any, args: Any) -> None:
            current["block"] = i
            if args and torch.is_tensor(args[0]):
                inputs[i] = args[0].numel() * args[0].element_size()

        return hook

    def block_post(module: Any, args: Any, out: Any) -> None:
        current["block"] = None

    def attn_pre(i: int) -> Any:
        def hook(module: Any, args: Any) -> None:
            current["attn"] = True
            if args and torch.is_tensor(args[0]):
                attn_inputs[i] = args[0].numel() * args[0].element_size()

        return hook

    def attn_post(module: Any, args: Any, out: Any) -> None:
        current["attn"] = False

    for i, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(block_pre(i)))
        handles.append(block.register_forward_hook(block_post))
        for name in ATTENTION_NAMES:
            child = getattr(block, name, None)
            if isinstance(child, torch.nn.Module):
                handles.append(child.register_forward_pre_hook(attn_pre(i)))
                handles.append(child.register_forward_hook(attn_post))
                break

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in seen and key not in param_storages:
            seen.add(key)
            nbytes = storage.nbytes()
            largest[0] = max(largest[0], nbytes)
            b = current["block"]
            if b is None:
                other[0] += nbytes
            else:
                act[b] += nbytes
                if current["attn"]:
                    attn[b] += nbytes
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(tokens, labels=labels, ctx=ctx)
    finally:
        for h in handles:
            h.remove()
    layers = [
        LayerMemory(
            name=f"layers.{i}",
            activations=act[i],
            attention=attn[i],
            block_input=inputs[i],
            attention_input=attn_inputs[i],
        )
        for i in range(len(blocks))
    ]
    return layers, other[0], largest[0]


def to_fake(model: torch.nn.Module, device: str) -> None:
    """Replace a meta-built model's parameters and buffers by storage-less tensors on ``device``
    (call inside ``FakeTensorMode``); tied parameters stay tied."""
    done: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                if id(p) not in done:
                    done[id(p)] = torch.nn.Parameter(
                        torch.empty(p.shape, dtype=p.dtype, device=device), requires_grad=p.requires_grad
                    )
                module._parameters[name] = done[id(p)]
        for name, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[name] = torch.empty(b.shape, dtype=b.dtype, device=device)


class StorageAccessError(RuntimeError):
    """The model read the memory of a storage-less tensor (a kernel that is not a torch op)."""


def fake_forward(
    config: RunConfig, host: Any, precision: Any, device: str, batch: int, seq_len: int
) -> tuple[int, list[LayerMemory], int, int]:
    """Build the model on storage-less ``device`` tensors and run one micro-batch forward.

    Returns ``(trainable parameter count, layers, other activations, largest saved tensor)``.
    Reading a tensor's memory (``data_ptr``, as a Triton kernel launched from Python does) raises
    ``StorageAccessError`` instead of handing the kernel a pointer to nothing, which on CUDA would
    be an illegal memory access that ends the process.
    """
    import torch._functorch.config as functorch_config
    from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException, FakeTensorMode

    model, _ = build_model(config, host, "meta")
    if precision.param_dtype != torch.float32:
        # cast while the parameters are still plain meta tensors: ``Module.to`` cannot swap the
        # storage-less fake parameters made below (``_apply(): Couldn't swap Embedding.weight``)
        model = model.to(dtype=precision.param_dtype)
    with functorch_config.patch(fake_tensor_allow_unsafe_data_ptr_access=False):  # read when the mode is made
        fake = FakeTensorMode(allow_non_fake_inputs=True)
    with fake:
        to_fake(model, device)
    numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
    B, T = batch, seq_len
    thd = config.data.packing == "thd"  # as the run will call the model: one document per row
    try:
        with fake:
            tokens = torch.zeros((B, T), dtype=torch.long, device=device)  # (B, T)
            ctx = BlockContext(
                positions=torch.arange(T, device=device).repeat(B, 1),  # (B, T)
                cu_seqlens=torch.arange(0, B * T + 1, T, dtype=torch.int32, device=device) if thd else None,  # (B+1,)
                max_seqlen=T if thd else None,
            )
            with precision.autocast():
                layers, other, largest = measure_activations(model, tokens, tokens, ctx)
    except (DynamicOutputShapeException, DataDependentOutputException) as exc:
        raise UserError(
            f"mcore plan: model {config.model.name!r} computes a shape from tensor values ({exc.func}) in its forward, "
            "which the estimate on storage-less tensors cannot follow; the block must give a static-shape path "
            "for such tensors (see mcore_moe.experts.storage_less)"
        ) from None
    except RuntimeError as exc:
        if "data pointer" not in str(exc):
            raise
        raise StorageAccessError("a kernel read tensor memory (it is not registered as a torch op)") from None
    return numel, layers, other, largest


@dataclass
class OptimizerState:
    """The optimizer state of the whole model, before any sharding, as the planner models it."""

    bytes: int
    shards_over_dp: bool  # each dp_replicate replica keeps only its share
    assumption: str


def optimizer_state(
    config: RunConfig, host: Any, param_dtype: torch.dtype, numel: int, *, sharded_params: bool
) -> OptimizerState:
    """Ask the run's optimizer factory for its state size (``OptimizerStateSize``), parameter by
    parameter with their declared specs (the model built on ``meta``); AdamW-like if it cannot say."""
    name = config.optimizer.name
    factory = config.optimizer.instantiate()
    if not isinstance(factory, OptimizerStateSize):
        master = 4 if param_dtype != torch.float32 else 0
        return OptimizerState(
            numel * (8 + master),
            False,
            f"optimizer state: {name!r} does not report its size, assumed AdamW-like: 2 fp32 tensors per parameter"
            + (" + fp32 master copy" if master else "")
            + ", not split over dp_replicate",
        )
    model, _ = build_model(config, host, "meta")
    specs = collect_param_specs(model)
    total = 0
    for param_name, p in model.named_parameters():
        if p.requires_grad:
            total += int(factory.state_bytes(tuple(p.shape), specs[param_name], param_dtype=param_dtype))
    split = bool(factory.shards_state_over_dp(sharded_params=sharded_params))
    per_element = total / max(1, numel)
    return OptimizerState(
        total,
        split,
        f"optimizer state: {per_element:.2f} bytes per parameter as {name!r} reports it"
        + (", split over dp_replicate" if split else ", not split over dp_replicate"),
    )


def tp_split_numel(config: RunConfig, host: Any) -> tuple[int, int]:
    """``(split, whole)``: trainable parameter elements a ``tp`` layout splits over its ranks (declared
    ``column``/``row``/``vocab``; the output weight only when the model's loss head has
    ``vocab_parallel``) and those it keeps whole, from the model built on ``meta``."""
    model, _ = build_model(config, host, "meta")
    specs = collect_param_specs(model)
    # the output weight splits only when the model's loss head can compute a vocab-parallel loss
    vocab_loss = callable(getattr(getattr(model, "loss_head", None), "vocab_parallel", None))
    tied = not any(spec.role == "head" for spec in specs.values())
    # routed experts stay whole on each tp rank (left to ``ep``) unless the tp layout splits them (``expert_tp``)
    tp_layout = next((sel for sel in config.layouts if sel.name == "tp"), None)
    expert_tp = bool(getattr(getattr(tp_layout, "config", None), "expert_tp", False))
    split = whole = 0
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        spec = specs[name]
        output = spec.role == "head" or (tied and spec.role == "embedding")
        expert_whole = spec.role == "expert" and not expert_tp
        if tp_style(spec) in TP_SPLIT_STYLES and (vocab_loss or not output) and not expert_whole:
            split += p.numel()
        else:
            whole += p.numel()
    return split, whole


def ep_fraction(config: RunConfig, host: Any, ep: int) -> tuple[float, str]:
    """The fraction of the parameters a rank holds under expert parallelism of size ``ep``, and why: parameters
    of role ``expert`` split over ``ep``; the others too when a layout borrows ``ep`` (fsdp sharding dense
    parameters over ``dp_shard x ep``), else whole."""
    model, _ = build_model(config, host, "meta")
    specs = collect_param_specs(model)
    total = experts = 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            total += p.numel()
            experts += p.numel() if specs[name].role == "expert" else 0
    borrowed = any("ep" in (getattr(sel.config, "borrow", ()) or ()) for sel in config.layouts)
    dense = (total - experts) / (ep if borrowed else 1)
    why = f"expert parameters ({experts / max(total, 1):.1%}) divided by ep {ep}" + (
        ", the others too (borrowed by a sharding layout)" if borrowed else ", the others whole"
    )
    return (dense + experts / ep) / max(total, 1), why


def plan_memory(
    config: RunConfig, host: Any, *, world_size: int | None = None, device_memory_gb: float | None = None
) -> MemoryPlan:
    owned = [d for sel in config.layouts for d in sel.implementation.load().mesh_dims]
    world = world_size or math.prod(v for v in config.parallel.sizes.values() if v > 0) or 1
    fill = next((d for d in DATA_DIMS if d in owned), owned[0] if owned else None)
    try:
        sizes = resolve_sizes(order_dims(owned), config.parallel.sizes, world, fill=fill)
    except ValueError as exc:
        raise ConfigError(f"parallel: {exc} (plan for another --world-size?)") from None
    tp = sizes.get("tp", 1)
    shard = math.prod(sizes.get(d, 1) for d in SHARDING_DIMS)
    ep = sizes.get("ep", 1)
    dp = math.prod(sizes.get(d, 1) for d in DATA_DIMS) * ep  # ep ranks read different micro-batches
    seq_split = sizes.get("cp", 1)

    device = (
        "cuda"
        if config.parallel.device == "cuda" or (config.parallel.device == "auto" and torch.cuda.is_available())
        else "cpu"
    )
    precision = config.precision.instantiate()
    B, T = config.train.micro_batch_size or max(1, config.train.global_batch_size // dp), config.train.seq_len
    notes = []
    try:
        numel, layers, other, largest = fake_forward(config, host, precision, device, B, T)
    except StorageAccessError as exc:
        if device == "cpu":
            raise UserError(
                f"mcore plan cannot run model {config.model.name!r} on storage-less tensors: {exc}"
            ) from None
        # e.g. a Triton kernel launched from Python: measure with the kernels the CPU would use
        numel, layers, other, largest = fake_forward(config, host, precision, "cpu", B, T)
        notes.append(f"activations measured with the CPU kernels: on {device}, {exc}")
    pbytes = _dtype_bytes(precision.param_dtype)
    # the fraction of the parameters a rank of the tp group holds (1 without tp)
    held = 1.0
    if tp > 1:
        split, whole = tp_split_numel(config, host)
        held = (split / tp + whole) / max(1, split + whole)
    ep_note = ""
    if ep > 1:
        fraction, why = ep_fraction(config, host, ep)
        held *= fraction
        ep_note = f"; {why}"
    other_shard = shard // tp
    params = int(numel * pbytes * held) // other_shard
    grads = params
    state = optimizer_state(config, host, precision.param_dtype, numel, sharded_params=shard > 1)
    opt_shard = other_shard * (sizes.get("dp_replicate", 1) if state.shards_over_dp else 1)
    optimizer = int(state.bytes * held) // opt_shard

    mode = config.train.recompute
    transient = largest // seq_split
    if mode in ("full", "selective") and layers:
        # what each block keeps through forward: its input (full) or everything but its
        # attention's internals (selective)
        if mode == "full":
            kept = [layer.block_input for layer in layers]
            rerun = [layer.activations + layer.block_input for layer in layers]  # + incoming gradient
        else:
            kept = [layer.activations - layer.attention + layer.attention_input for layer in layers]
            rerun = [layer.attention_input + layer.attention for layer in layers]
        # start of backward: everything kept + head/loss activations + the first transient; when
        # block i is re-run in backward, the blocks above it are already freed
        start = sum(kept) + other + transient
        during = max(sum(kept[:i]) + rerun[i] + grads + transient for i in range(len(layers)))
        acts = sum(kept) + other + max(rerun)
        peak_acts = max(start, during)
    else:
        acts = sum(layer.activations for layer in layers) + other
        peak_acts = max(acts + transient, grads + transient)
    acts //= seq_split
    peak_acts //= seq_split
    peak = params + optimizer + peak_acts
    stages = pipeline_stages(config, host, sizes, layers)
    if stages is not None:
        layout, numels, plans = stages
        kept_per_layer = [
            layer.block_input
            if mode == "full"
            else layer.activations - layer.attention + layer.attention_input
            if mode == "selective"
            else layer.activations
            for layer in layers
        ]
        size = sizes.get(layout.mesh_dims[0], 1)
        per_stage = stage_memory(
            plans,
            numels,
            bytes_per_param=pbytes * held / (other_shard // size),
            optimizer_bytes_per_param=state.bytes / max(1, numel) * held / max(1, opt_shard // size),
            kept_per_layer=kept_per_layer,
            head_activations=other,
            transient=transient,
            seq_split=seq_split,
        )
        peak = max(stage.peak for stage in per_stage)
        notes.append(
            f"per pipeline rank from layout {layout.name!r}'s stage plan (its schedule's in-flight micro-batches "
            "x its largest chunk's activations; the peak is the largest rank's)"
        )
    tp_note = (
        f"; under tp {tp} a rank holds {held:.1%} of them (the declared column/row/vocab parameters split, the rest whole)"
        if tp > 1
        else ""
    )
    assumptions = [
        f"parameters, gradients and optimizer state divided by {other_shard} (product of dp_shard, pp sizes){tp_note}"
        f"{ep_note}",
        f"activations of one micro-batch ({B} x {T} tokens) measured on fake (storage-less) tensors, divided by {seq_split} (cp)"
        + (
            "; not divided by tp (an upper bound: tp splits the heads' and MLP's inner activations, and with "
            "sequence parallelism the hidden states between blocks too)"
            if tp > 1
            else ""
        ),
        state.assumption,
        "not modelled: allocator fragmentation/caching, layout communication buffers, CUDA context",
        *notes,
    ]
    return MemoryPlan(
        world_size=world,
        shard_factor=shard,
        params=params,
        grads=grads,
        optimizer=optimizer,
        activations=acts,
        transient=transient,
        peak=peak,
        layers=layers,
        other_activations=other,
        recompute=mode,
        device_memory=int(device_memory_gb * 2**30) if device_memory_gb else None,
        assumptions=assumptions,
        stages=per_stage if stages is not None else [],
    )


def pipeline_stages(
    config: RunConfig, host: Any, sizes: dict[str, int], layers: list[LayerMemory]
) -> tuple[Any, StageNumels, list[StagePlan]] | None:
    """The layout with a ``stage_plan`` (``pp``), the model's stage sizes and the ranks' plans, or ``None``
    (no such layout, a size of 1, or a model that cannot be cut)."""
    for sel in config.layouts:
        if not callable(getattr(sel.implementation.load(), "stage_plan", None)):
            continue
        layout = sel.instantiate()
        size = sizes.get(layout.mesh_dims[0], 1)
        numels = stage_numels(config, host) if size > 1 else None
        if numels is None or len(numels.layers) != len(layers):
            return None
        dp = math.prod(sizes.get(d, 1) for d in DATA_DIMS) * sizes.get("ep", 1)
        rows = config.train.micro_batch_size or max(1, config.train.global_batch_size // dp)
        micro_batches = max(1, config.train.global_batch_size // (rows * dp))
        return layout, numels, list(layout.stage_plan(size, len(layers), micro_batches))
    return None


def format_plan(plan: MemoryPlan) -> str:
    def gb(n: int) -> str:
        return f"{n / 2**30:9.3f} GiB" if n >= 2**24 else f"{n / 2**20:9.3f} MiB"

    lines = [
        f"per-rank memory plan (world size {plan.world_size}, recompute {plan.recompute})",
        f"  parameters        {gb(plan.params)}",
        f"  gradients         {gb(plan.grads)}",
        f"  optimizer state   {gb(plan.optimizer)}",
        f"  activations       {gb(plan.activations)}",
        f"  backward transient{gb(plan.transient)}",
        f"  peak              {gb(plan.peak)}",
    ]
    if plan.device_memory is not None:
        verdict = "fits" if plan.fits else "does NOT fit"
        lines.append(f"  device memory     {gb(plan.device_memory)}  -> {verdict}")
    lines.append("  activations per layer (no recompute; attention share; block input):")
    for layer in plan.layers:
        lines.append(
            f"    {layer.name:<12} {gb(layer.activations)}  attn {gb(layer.attention)}  input {gb(layer.block_input)}"
        )
    lines.append(f"    {'other':<12} {gb(plan.other_activations)}  (embedding, head, loss)")
    if plan.stages:
        lines.append(
            "  per pipeline rank (layers; micro-batch chunks in flight; params; optimizer; activations; peak):"
        )
        for st in plan.stages:
            lines.append(
                f"    rank {st.rank:<3} layers {st.layers:<12} in flight {st.in_flight:<3} {gb(st.params)} "
                f"{gb(st.optimizer)} {gb(st.activations)}  peak {gb(st.peak)}"
            )
    lines.append("  assumptions: " + "; ".join(plan.assumptions))
    return "\n".join(lines)
