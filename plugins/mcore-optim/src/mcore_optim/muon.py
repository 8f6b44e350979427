"""``muon``: Nesterov momentum, then Newton-Schulz orthogonalisation of each whole matrix.

Per ``matrix`` or ``expert`` parameter W (m x n; higher-rank weights are viewed as
``(shape[0], -1)``, an ``expert`` parameter of 3+ dims as one matrix per expert)::

    B <- mu B + G;            U = G + mu B   (Nesterov; U = B without it)
    O = NS(U / ||U||_F)       in bf16, ``ns_coefficients`` (newton_schulz.py)
    W <- W (1 - lr wd) - lr * scale(m, n) * O

``scale``: ``spectral`` = sqrt(max(m, n)), which gives O unit RMS; ``match-adamw`` = 0.2
sqrt(max(m, n)), an RMS of 0.2 like a typical AdamW update, so AdamW's lr carries over
(Moonlight). Separate parameters are separate matrices (``gpt`` keeps Q, K, V and gate, up
apart, so each is orthogonalised on its own with nothing to split); a fused weight is split as the model declares it (``mcore.params.ParamSpec`` ``splits``: a QKV weight laid out
``[all Q | K | V]`` into its Q, K and V rows; ``[gate | up]`` into gate and up), each logical
matrix orthogonalised and scaled on its own (``split_fused``); with ``split_heads`` each
attention head's rows (``head_rows``, declared on a fused or a separate Q/K/V weight) on their
own. Every other role (embedding, head, router, norm, bias) goes to AdamW (``adamw_*``
settings).

Distributed: the momentum is updated where the parameter lives (a replicated matrix whole,
with its gradient already averaged; a ``DTensor`` matrix (FSDP) on its local shard). The
Newton-Schulz work is split over the data-parallel ranks (``distribute_ns``): whole matrices
are bin-packed over the ranks by FLOPs and each rank orthogonalises the ones it owns, never
a shard alone. Under FSDP (row shards on a 1-D mesh) the update's shards are gathered on
the owner only and the result's rows scattered back; under replicated data parallelism
each owner broadcasts its results (in the Newton-Schulz dtype, one buffer per owner). Other
``DTensor`` layouts all-gather the updates (``full_tensor``); on a 1-D mesh the owners then
broadcast as above, on larger meshes every rank orthogonalises every matrix. Matrices of
one block shape are orthogonalised as one batch.

Row splits are read, not assumed (``mcore.ragged``): a layout may give a ``Shard(0)``
matrix uneven row counts, or keep it whole on one rank of its shard group (every other rank
holds none of its rows). Such a matrix held whole is orthogonalised by its holder alone, with
no gather, scatter or broadcast, and its momentum lives there only; the other matrices are
bin-packed over the ranks around the holders' fixed load. Who holds what is read once, at
construction (one batched all-gather of row counts): when every matrix is held whole, the
matrix step communicates nothing.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from mcore.params import ParamSpec, check_spec_shape, logical_blocks, matrix_shape
from mcore.ragged import row_dim
from mcore_optim import state as state_format
from mcore_optim.adamw import (
    IMPLS,
    AdamW,
    AdamWFactory,
    adamw_state_bytes,
    check_betas,
    check_common,
    check_eps,
    check_rate,
)
from mcore_optim.dist import (
    counts_of,
    data_parallel,
    full,
    gather_rows,
    held_whole_by,
    is_dtensor,
    like_param,
    local,
    row_sharded,
    rows_of,
    scatter_rows,
)
from mcore_optim.groups import make_groups, zero_grad
from mcore_optim.newton_schulz import Triple, flops, orthogonalize, resolve
from mcore_optim.packing import assign
from mcore_optim.roles import HIDDEN_ROLES, NamedParam, classify, mup_lr_multiplier

if TYPE_CHECKING:
    from torch import nn

    from mcore.mesh import ParallelMesh
    from mcore.protocols.layout import ParallelLayout

SCALES = ("spectral", "match-adamw")


def update_scale(mode: str, rows: int, cols: int) -> float:
    base = math.sqrt(max(rows, cols))
    return base if mode == "spectral" else 0.2 * base


@dataclass(frozen=True, slots=True)
class BlockPlan:
    """How one parameter's update is cut for Newton-Schulz.

    The update is viewed as ``(rows, cols)`` (an expert stack: its matrices one under the
    other); ``blocks`` are ``(first_row, rows)`` ranges of that view, each orthogonalised on its
    own. ``factor``: the update scale applied through the learning rate when every block has
    the same shape; otherwise 1.0 and each block is scaled by its own (``fold``).
    """

    rows: int
    cols: int
    blocks: tuple[tuple[int, int], ...]
    factor: float
    fold: bool


def block_plan(spec: ParamSpec, shape: Sequence[int], *, scale: str, split_fused: bool, split_heads: bool) -> BlockPlan:
    """The blocks of a matrix or expert parameter: each expert's matrix, then each declared split
    (``split_fused``), then each head (``split_heads``), as ``ParamSpec`` describes them."""
    count, rows, cols = matrix_shape(shape, spec.role)
    if not split_fused:  # heads lie inside the splits: they stay the same blocks
        spec = ParamSpec(spec.role, head_rows=spec.head_rows)
    pieces = logical_blocks(spec, rows, by_head=split_heads)
    blocks = tuple((e * rows + first, n) for e in range(count) for _, first, n in pieces)
    shapes = {n for _, n in blocks}
    if len(shapes) == 1:
        return BlockPlan(count * rows, cols, blocks, update_scale(scale, shapes.pop(), cols), fold=False)
    return BlockPlan(count * rows, cols, blocks, 1.0, fold=True)


class Muon:
    """The ``MeshOptimizer`` of ``muon``: matrices (and experts) here, every other role in ``self.adamw``."""

    algorithm: ClassVar[str] = "muon"

    def __init__(
        self,
        matrices: Sequence[NamedParam],
        adamw: AdamW,
        *,
        settings: Mapping[str, Mapping[str, float]],
        momentum: float,
        nesterov: bool,
        triples: Sequence[Triple],
        scale: str,
        ns_eps: float,
        ns_dtype: torch.dtype,
        plans: Mapping[str, BlockPlan],
        master_weights: bool,
        model_params: Sequence[NamedParam],
        ns_split: tuple[Any, int, int] | None = None,
    ) -> None:
        self._matrices = list(matrices)
        self._model_params = list(model_params)
        self.master_weights = master_weights
        self.adamw = adamw
        self._matrix_groups = make_groups(self._matrices, settings) if self._matrices else []
        self.param_groups = self._matrix_groups + adamw.param_groups
        self.momentum, self.nesterov = momentum, nesterov
        self.triples, self.scale, self.ns_eps, self.ns_dtype = tuple(triples), scale, ns_eps, ns_dtype
        self._plans = dict(plans)  # name -> how its update is cut into blocks
        self._by_name = {n.name: n for n in self._matrices}
        self.ns_group: Any
        self.ns_group, self.ns_rank, self.ns_size = ns_split if ns_split is not None else (None, 0, 1)
        # The real row split of every DTensor matrix (one batched collective; all ranks build the
        # optimizer together). A matrix whose rows one rank holds all of is that rank's alone:
        # it orthogonalises it locally, and no other rank touches it.
        self._counts: dict[str, tuple[int, ...]] = {}
        self._holder: dict[str, int] = {}  # name -> the rank (on its row mesh dimension) holding it whole
        for n, counts in zip(self._matrices, counts_of([n.param for n in self._matrices])):
            if not counts:
                continue
            self._counts[n.name] = counts
            holder = held_whole_by(counts)
            if holder is not None:
                self._holder[n.name] = holder
        #: held whole by this rank: orthogonalised here, with no communication.
        self._here = {name for name, n in self._by_name.items() if name in self._holder and local(n.param).shape[0]}
        #: split over ranks: gathered, orthogonalised by an owner, spread back (every rank takes part).
        self._split = [n for n in self._matrices if n.name not in self._holder]
        # Who orthogonalises what: with a split group (group, rank, size), the split matrices are
        # bin-packed over its ranks by Newton-Schulz FLOPs, around the fixed load of the matrices
        # held whole (their holders); without a group, this rank does all of them.
        self.owners: dict[str, int] = {}
        if self.ns_group is not None:
            loads = [0.0] * self.ns_size
            for name, holder in self._holder.items():
                if holder < self.ns_size and self._row_group(name) is self.ns_group:
                    loads[holder] += self._cost(self._by_name[name])
                    self.owners[name] = holder
            self.owners.update(assign([(n.name, self._cost(n)) for n in self._split], self.ns_size, loads=loads))
        # FSDP rows (Shard(0) on the split group's 1-D mesh): gather to the owner only.
        self._owner_gather = (
            self.ns_group is not None and bool(self._split) and all(row_sharded(n.param) for n in self._split)
        )
        self.state: dict[str, dict[str, torch.Tensor]] = {}
        with torch.no_grad():
            for n in self._matrices:
                p = local(n.param)  # (0, ...) on the ranks that do not hold a matrix held whole
                st = {"momentum": torch.zeros_like(p, dtype=torch.float32 if p.dtype.itemsize < 4 else p.dtype)}
                if master_weights and p.dtype.itemsize < 4:
                    st["master"] = p.detach().to(torch.float32, copy=True)
                self.state[n.name] = st

    def _cost(self, n: NamedParam) -> float:
        plan = self._plans[n.name]
        return float(sum(flops(rows, plan.cols, len(self.triples)) for _, rows in plan.blocks))

    def _row_group(self, name: str) -> Any:
        """The process group that splits matrix ``name``'s rows (None: not a row-split DTensor)."""
        param = self._by_name[name].param
        dim = row_dim(param)
        return param.device_mesh.get_group(dim) if isinstance(param, DTensor) and dim is not None else None

    @torch.no_grad()
    def step(self) -> None:
        if self._matrix_groups:
            self._matrix_step()
        self.adamw.step()

    def _matrix_step(self) -> None:
        # A matrix another rank holds whole has no rows here: nothing to do, nothing to send.
        active = [
            n
            for n in self._matrices
            if n.param.grad is not None and (n.name not in self._holder or n.name in self._here)
        ]
        if not active:
            return
        grads = [local(n.param.grad).to(self.state[n.name]["momentum"].dtype) for n in active]  # type: ignore[arg-type]
        bufs = [self.state[n.name]["momentum"] for n in active]
        torch._foreach_mul_(bufs, self.momentum)
        torch._foreach_add_(bufs, grads)
        updates = torch._foreach_add(grads, bufs, alpha=self.momentum) if self.nesterov else bufs
        split = [(n, u) for n, u in zip(active, updates) if n.name not in self._here]
        # 1. the whole updates this rank orthogonalises: its own matrices as they are, and the split
        #    matrices it owns, gathered
        wholes = {n.name: u for n, u in zip(active, updates) if n.name in self._here}
        if split:
            wholes.update(self._owner_gather_updates(split) if self._owner_gather else self._all_gather_updates(split))
        ortho = self._orthogonalize(wholes)
        # 2. this rank's piece of every result
        pieces = {name: ortho[name].view(wholes[name].shape) for name in self._here if name in ortho}
        if split:
            pieces.update(
                self._owner_scatter(split, ortho, wholes) if self._owner_gather else self._broadcast(split, ortho)
            )
        rates = {name: (float(g["lr"]), float(g["weight_decay"])) for g in self._matrix_groups for name in g["names"]}
        for n in active:
            st = self.state[n.name]
            weight = st.get("master", local(n.param))
            lr, wd = rates[n.name]
            if wd != 0.0:
                weight.mul_(1.0 - lr * wd)
            weight.add_(pieces[n.name], alpha=-lr * self._plans[n.name].factor)
            if "master" in st:
                local(n.param).copy_(weight)

    def _all_gather_updates(self, split: Sequence[tuple[NamedParam, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Every rank gets every whole update (all-gather for DTensors); returns the ones it owns."""
        out = {}
        for n, u in split:
            whole = full(u, n.param, self._counts.get(n.name))
            if self.owners.get(n.name, 0) == self.ns_rank:
                out[n.name] = whole
        return out

    def _broadcast(
        self, split: Sequence[tuple[NamedParam, torch.Tensor]], ortho: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Owners broadcast their results (one buffer per owner, in the Newton-Schulz dtype); every
        rank keeps its rows of each."""
        if self.ns_group is not None:
            for owner in range(self.ns_size):
                names = [n.name for n, _ in split if self.owners[n.name] == owner]
                if not names:
                    continue
                sizes = [self._by_name[name].param.numel() for name in names]
                if owner == self.ns_rank:
                    flat = torch.cat([ortho[name].reshape(-1) for name in names])
                else:
                    flat = torch.empty(sum(sizes), dtype=self.ns_dtype, device=split[0][1].device)
                dist.broadcast(flat, group=self.ns_group, group_src=owner)
                if owner != self.ns_rank:
                    for name, piece in zip(names, flat.split(sizes)):
                        ortho[name] = piece
        return {
            n.name: rows_of(ortho[n.name].view(n.param.shape), n.param, self._counts.get(n.name, ())) for n, _ in split
        }

    def _owner_gather_updates(self, split: Sequence[tuple[NamedParam, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """FSDP: each update's row shards, gathered on its owner only (returns the ones owned here)."""
        out = {}
        for n, u in split:
            owner, counts = self.owners[n.name], self._counts.get(n.name)
            whole = gather_rows(u, n.param.shape[0], owner, self.ns_group, self.ns_rank, self.ns_size, counts)
            if whole is not None:
                out[n.name] = whole
        return out

    def _owner_scatter(
        self,
        split: Sequence[tuple[NamedParam, torch.Tensor]],
        ortho: Mapping[str, torch.Tensor],
        wholes: Mapping[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """FSDP: each owner scatters its results' row shards back."""
        out = {}
        for n, u in split:
            mine = ortho[n.name].view(wholes[n.name].shape) if n.name in ortho else None
            out[n.name] = scatter_rows(
                mine,
                u,
                self.ns_dtype,
                n.param.shape[0],
                self.owners[n.name],
                self.ns_group,
                self.ns_rank,
                self.ns_size,
                self._counts.get(n.name),
            )
        return out

    def _orthogonalize(self, wholes: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Newton-Schulz of each block of each whole update (its ``BlockPlan``), in the Newton-Schulz
        dtype, batched by block shape; returns each update's result as a ``(rows, cols)`` tensor
        (blocks of a plan with several block shapes already scaled)."""
        ortho: dict[str, torch.Tensor] = {}
        # (rows, cols) -> [(source block, result block, scale folded into it or None)]
        buckets: dict[tuple[int, int], list[tuple[torch.Tensor, torch.Tensor, float | None]]] = {}
        for name, whole in wholes.items():
            plan = self._plans[name]
            src = whole.reshape(plan.rows, plan.cols)  # (m, n): experts stacked by rows
            dst = ortho[name] = torch.empty(src.shape, dtype=self.ns_dtype, device=src.device)
            for first, rows in plan.blocks:
                fold = update_scale(self.scale, rows, plan.cols) if plan.fold else None
                buckets.setdefault((rows, plan.cols), []).append(
                    (src[first : first + rows], dst[first : first + rows], fold)
                )
        for (rows, cols), pairs in buckets.items():
            batch = torch.empty((len(pairs), rows, cols), dtype=self.ns_dtype, device=pairs[0][0].device)
            torch._foreach_copy_(list(batch.unbind(0)), [s for s, _, _ in pairs])  # (B, rows, cols), cast once
            result = orthogonalize(batch, self.triples, eps=self.ns_eps, dtype=self.ns_dtype)
            results = list(result.unbind(0))
            folded = [(r, f) for r, (_, _, f) in zip(results, pairs) if f is not None]
            if folded:  # scalars from the host: no device tensor to build (or wait for) each step
                torch._foreach_mul_([r for r, _ in folded], [f for _, f in folded])
            torch._foreach_copy_([d for _, d, _ in pairs], results)
        return ortho

    def zero_grad(self, set_to_none: bool = True) -> None:
        zero_grad(self.param_groups, set_to_none)

    # -- state ----------------------------------------------------------------------------
    def schema(self, n: NamedParam) -> dict[str, torch.dtype | None]:
        """State keys and dtypes for ``n`` (see ``AdamW.schema``): momentum (+ master) for matrices."""
        if n.role not in HIDDEN_ROLES:
            return self.adamw.schema(n)
        low = n.param.dtype.itemsize < 4
        out: dict[str, torch.dtype | None] = {"momentum": torch.float32 if low else n.param.dtype}
        if low and self.master_weights:
            out["master"] = torch.float32
        return out

    def state_entries(self) -> dict[str, dict[str, torch.Tensor]]:
        out = {n.name: {k: like_param(v, n.param) for k, v in self.state[n.name].items()} for n in self._matrices}
        return {**out, **self.adamw.state_entries()}

    def load_entries(self, saved: Mapping[str, Any]) -> None:
        with torch.no_grad():
            wanted = [(n.name, k, v, n.param) for n in self._matrices for k, v in self.state[n.name].items()]
            pieces = state_format.take_all(saved, wanted)
            self.adamw.load_entries(saved)
            for (name, k, _, _), v in zip(wanted, pieces):
                self.state[name][k].copy_(v)

    def state_dict(self) -> dict[str, Any]:
        return {
            **state_format.header(self.algorithm, self._model_params, self.param_groups),
            "state": self.state_entries(),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        state_format.check(state_dict, self.algorithm, self._model_params, self.param_groups)
        self.load_entries(state_dict["state"])
        state_format.restore_groups(self.param_groups, state_dict["groups"])


class MuonFactory:
    """Registered as optimizer ``muon``."""

    @dataclass(kw_only=True, slots=True)
    class Config:
        lr: float = 1e-3
        """Peak lr of matrix parameters, after scale (finite, >= 0); muP scales it by mup_base_width / mup_width."""
        weight_decay: float = 0.1
        """Decoupled weight decay of matrix parameters (finite, >= 0)."""
        momentum: float = 0.95
        """Momentum of the matrix updates, in [0, 1)."""
        nesterov: bool = True
        """Nesterov momentum."""
        ns_coefficients: str | list[list[float]] = "simple"
        """Newton-Schulz coefficients: 'simple', 'polar-express', 'deepseek-v4', or a list of [a, b, c] triples."""
        ns_steps: int | None = None
        """Newton-Schulz iterations (none: the coefficient set's own count; 'simple': 5)."""
        ns_eps: float = 1e-7
        """Added to the norm a matrix is divided by before Newton-Schulz (finite, > 0)."""
        ns_dtype: Literal["bfloat16", "float32", "float64"] = "bfloat16"
        """Newton-Schulz compute dtype: 'bfloat16' (the method's); 'float32'/'float64' for exact comparisons."""
        scale: Literal["spectral", "match-adamw"] = "match-adamw"
        """Update scale: 'match-adamw' (0.2 sqrt(max(m, n)): AdamW's RMS, so its lr carries over) or 'spectral' (unit RMS)."""
        split_fused: bool = True
        """Orthogonalise each logical matrix of a fused weight (declared splits: Q, K, V; gate, up) on its own."""
        split_heads: bool = False
        """Orthogonalise each attention head's rows on its own (weights that declare head_rows)."""
        distribute_ns: bool = True
        """Split Newton-Schulz over data-parallel ranks (each does whole matrices and broadcasts); false: every rank does all."""
        adamw_lr: float | None = None
        """lr of the AdamW for embeddings, head, norms and biases (none: lr; finite, >= 0)."""
        adamw_weight_decay: float | None = None
        """Weight decay of that AdamW (none: weight_decay; finite, >= 0)."""
        adamw_betas: tuple[float, float] = (0.9, 0.95)
        """Betas of that AdamW, each in [0, 1)."""
        adamw_eps: float = 1e-8
        """Eps of that AdamW (finite, > 0)."""
        adamw_impl: Literal["auto", "foreach", "fused", "triton"] = "auto"
        """Implementation of that AdamW: 'auto' (triton, else fused, on CUDA), 'foreach', 'fused' or 'triton'."""
        master_weights: bool = True
        """Keep fp32 master copies of low-precision parameters."""
        no_decay_roles: tuple[str, ...] = ("norm", "bias", "embedding")
        """Parameter roles without weight decay (roles: embedding, matrix, expert, router, head, norm, bias)."""
        role_overrides: dict[str, str] = field(default_factory=dict)
        """Roles that replace the model's declarations: {regex searched in the parameter name: role}; first match wins."""
        mup_base_width: int | None = None
        """muP: matrix lr is multiplied by mup_base_width / mup_width (set both or neither)."""
        mup_width: int | None = None
        """muP: the width of this model (set with mup_base_width)."""

        def __post_init__(self) -> None:
            check_common(self)
            if not 0.0 <= self.momentum < 1.0:
                raise ValueError(f"momentum = {self.momentum!r}; allowed: a number in [0, 1)")
            if self.ns_dtype not in ("bfloat16", "float32", "float64"):
                raise ValueError(f"ns_dtype = {self.ns_dtype!r}; allowed: 'bfloat16', 'float32', 'float64'")
            if self.scale not in SCALES:
                raise ValueError(f"scale = {self.scale!r}; allowed: {list(SCALES)}")
            check_eps("ns_eps", self.ns_eps)
            with warnings.catch_warnings():  # a step count that differs from the set's warns when built
                warnings.simplefilter("ignore")
                triples = resolve(self.ns_coefficients, self.ns_steps)
            if not all(math.isfinite(x) for triple in triples for x in triple):
                raise ValueError(f"ns_coefficients = {self.ns_coefficients!r}; allowed: finite numbers")
            for key in ("adamw_lr", "adamw_weight_decay"):
                if getattr(self, key) is not None:
                    check_rate(key, getattr(self, key))
            check_betas("adamw_betas", self.adamw_betas, "adamw_eps", self.adamw_eps)
            if self.adamw_impl not in IMPLS:
                raise ValueError(f"adamw_impl = {self.adamw_impl!r}; allowed: {list(IMPLS)}")

    def __init__(self, config: MuonFactory.Config | None = None) -> None:
        c = self.config = config if config is not None else MuonFactory.Config()
        self.triples = resolve(c.ns_coefficients, c.ns_steps)
        self._adamw = AdamWFactory(
            AdamWFactory.Config(
                lr=c.lr if c.adamw_lr is None else c.adamw_lr,
                weight_decay=c.weight_decay if c.adamw_weight_decay is None else c.adamw_weight_decay,
                betas=c.adamw_betas,
                eps=c.adamw_eps,
                impl=c.adamw_impl,
                master_weights=c.master_weights,
                no_decay_roles=c.no_decay_roles,
                role_overrides=c.role_overrides,
            )
        )

    def settings(self) -> dict[str, dict[str, float]]:
        c = self.config
        out = self._adamw.settings()
        for role in HIDDEN_ROLES:
            out[role] = {
                "lr": c.lr * mup_lr_multiplier(role, base_width=c.mup_base_width, width=c.mup_width),
                "weight_decay": 0.0 if role in c.no_decay_roles else c.weight_decay,
            }
        return out

    def plans(self, matrices: Sequence[NamedParam]) -> dict[str, BlockPlan]:
        """How each matrix's update is cut for Newton-Schulz (its declared splits and heads)."""
        c = self.config
        for n in matrices:
            check_spec_shape(n.name, n.spec, tuple(n.param.shape))  # a declaration that does not fit: refused
        return {
            n.name: block_plan(
                n.spec, n.param.shape, scale=c.scale, split_fused=c.split_fused, split_heads=c.split_heads
            )
            for n in matrices
        }

    def make(
        self,
        named: Sequence[NamedParam],
        model_params: Sequence[NamedParam] | None = None,
        ns_split: tuple[Any, int, int] | None = None,
    ) -> Muon:
        model_params = list(model_params) if model_params is not None else list(named)
        matrices = [n for n in named if n.role in HIDDEN_ROLES]
        others = [n for n in named if n.role not in HIDDEN_ROLES]
        return Muon(
            matrices,
            self._adamw.make(others, model_params=model_params),
            settings=self.settings(),
            momentum=self.config.momentum,
            nesterov=self.config.nesterov,
            triples=self.triples,
            scale=self.config.scale,
            ns_eps=self.config.ns_eps,
            ns_dtype=getattr(torch, self.config.ns_dtype),
            plans=self.plans(matrices),
            master_weights=self.config.master_weights,
            model_params=model_params,
            ns_split=ns_split,
        )

    def build(self, model: nn.Module, *, mesh: ParallelMesh, layouts: Sequence[ParallelLayout]) -> Muon:
        named = classify(model, role_overrides=self.config.role_overrides)
        return self.make(named, ns_split=self._ns_split([n for n in named if n.role in HIDDEN_ROLES], layouts))

    def _ns_split(
        self, matrices: Sequence[NamedParam], layouts: Sequence[ParallelLayout]
    ) -> tuple[Any, int, int] | None:
        """The group over which to split the Newton-Schulz work, or None (every rank does all).

        FSDP: the 1-D mesh all matrices are sharded over. Replicated data parallelism: the one
        data-parallel layout's group. Anything else (2-D meshes, several DP layouts) stays
        unsplit: correct, only slower.
        """
        if not self.config.distribute_ns or not matrices:
            return None
        if any(is_dtensor(n.param) for n in matrices):
            meshes = [getattr(n.param, "device_mesh", None) for n in matrices]
            mesh = meshes[0]
            if mesh is None or mesh.ndim != 1 or any(m is None or m != mesh for m in meshes):
                return None
            return mesh.get_group(), mesh.get_local_rank(), mesh.size()
        try:
            dp = data_parallel(layouts, optimizer="muon")
        except ValueError:
            return None
        return (dp.group, dp.rank, dp.size) if dp.size > 1 else None

    # -- OptimizerStateSize (read by ``mcore plan``) -----------------------------------------
    def state_bytes(self, shape: tuple[int, ...], spec: ParamSpec, *, param_dtype: torch.dtype) -> int:
        """Matrices and experts: a momentum (fp32 for low-precision parameters) and, with
        ``master_weights``, an fp32 master copy of a low-precision parameter; the rest AdamW's."""
        if spec.role not in HIDDEN_ROLES:
            return adamw_state_bytes(shape, param_dtype, master_weights=self.config.master_weights)
        low = param_dtype.itemsize < 4
        master = 4 if low and self.config.master_weights else 0
        return math.prod(shape) * ((4 if low else param_dtype.itemsize) + master)

    def shards_state_over_dp(self, *, sharded_params: bool) -> bool:
        return False  # the momentum of a replicated matrix lives on every replica
