"""Small helpers the recurrent blocks share: per-channel parameters, local shards, fused projections, init, checks.

Also ``step_tokens``: a cached step's tokens run one at a time through a block's single-token ``step``, keeping
the state after each token (``RecurrentStateCache.set_recurrent_state(..., per_token=True)``) so the engine can roll
a speculative verify step back to any of its tokens; and ``one_token_each``: a decode step (every sequence brings
one token, known on the host), which a block runs as one ``step`` of all rows and whose final states are the
per-token ones, with no host work (what the engine's static-shape steps and CUDA graphs need).

Why: plugins never import each other, so what ``mcore_models.blocks.base`` gives its blocks (drawing the
declared inits from a CPU generator, one GEMM for several projections) is re-done here in a few lines.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from mcore.params import collect_param_specs
from mcore.protocols.block import BlockContext


class PerChannel(nn.Linear):
    """Parameters with one row per channel or head (a depthwise conv filter ``(C, K)``, a per-head decay
    ``(h, 1)``), held as an ``nn.Linear``'s ``weight`` so the ``tp`` layout splits their rows over the ranks
    exactly like the column-parallel projection they belong to (it splits only ``nn.Linear`` weights).
    Never called as a linear: the block reads ``local_weight()``."""

    def __init__(self, rows: int, cols: int) -> None:
        super().__init__(cols, rows, bias=False)

    def local_weight(self) -> torch.Tensor:
        """``(rows held, cols)``: this rank's rows: its shard of a split weight, or the rows ``[lo, hi)`` of a
        whole one when the layout gives this rank one head of fewer heads than ranks (it then sets ``rows``,
        as on the projection of those heads, and sums the weight's gradients over the group)."""
        weight = local(self.weight)
        rows = getattr(self, "rows", None)
        return weight if rows is None else weight[rows[0] : rows[1]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("PerChannel holds parameters; read its weight instead of calling it")


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a layout's ``DTensor`` (differentiable), else ``tensor`` itself."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def _plain(weight: torch.Tensor) -> bool:
    return type(weight) is nn.Parameter or type(weight) is torch.Tensor


def project(hidden: torch.Tensor, linears: tuple[nn.Linear, ...]) -> list[torch.Tensor]:
    """``[linear(hidden) for linear in linears]`` (``(..., H) -> (..., out_i)``), as one GEMM while every
    weight is a plain tensor (a layout's ``DTensor`` or a quantised weight: one call per linear)."""
    weights = [linear.weight for linear in linears]
    if not all(_plain(w) for w in weights):
        return [linear(hidden) for linear in linears]
    fused = F.linear(hidden, torch.cat(weights))  # (..., sum of out_i)
    outs = list(fused.split([w.shape[0] for w in weights], dim=-1))
    return [out if linear.bias is None else out + linear.bias for out, linear in zip(outs, linears, strict=True)]


def repeat_groups(t: torch.Tensor, groups: int, copies: int, dim: int) -> torch.Tensor:
    """Each of ``groups`` equal runs along ``dim`` repeated ``copies`` times in place (``[g0, g0, g1, g1]``), as
    attention repeats GQA's key/value heads: ``(..., g * n, ...) -> (..., g * copies * n, ...)``. After it a
    contiguous split of the heads over ranks gives each rank the groups its heads read."""
    if copies == 1:
        return t
    return (
        t.unflatten(dim % t.dim(), (groups, -1))
        .repeat_interleave(copies, dim=dim % t.dim())
        .flatten(dim % t.dim(), dim % t.dim() + 1)
    )


@torch.no_grad()
def draw_declared_(module: nn.Module, generator: torch.Generator | None) -> None:
    """Set every parameter under ``module`` from its declared ``init`` (``param_specs``), drawing in fp32 on
    the CPU from ``generator`` (code that builds a block by hand; runs use ``mcore.construct``, whose values
    do not depend on the layout). Parameters on the meta device, sharded, or without a declared init are left alone."""
    for name, spec in collect_param_specs(module).items():
        param, init = module.get_parameter(name), spec.init
        if param.is_meta or init is None or not _plain(param):  # a layout's shard: mcore.construct fills it
            continue
        values = torch.empty(param.shape, dtype=torch.float32)
        if init.kind == "normal":
            values.normal_(init.mean or 0.0, float(init.std or 1.0), generator=generator)
        elif init.kind == "trunc_normal":
            low, high = init.bounds
            nn.init.trunc_normal_(values, init.mean or 0.0, float(init.std or 1.0), low, high, generator=generator)
        elif init.kind == "uniform":
            low, high = init.bounds
            values.uniform_(low, high, generator=generator)
        else:
            values.fill_({"zeros": 0.0, "ones": 1.0}.get(init.kind, init.value or 0.0))
        param.copy_(values)


def check_positive_int(key: str, value: object, *, allow_none: bool = False) -> None:
    """``ValueError`` naming ``key`` unless ``value`` is an int >= 1 (or ``None`` when allowed)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        allowed = "a positive int or None" if allow_none else "a positive int"
        raise ValueError(f"{key} = {value!r}; allowed: {allowed}")


def check_positive_float(key: str, value: object) -> None:
    """``ValueError`` naming ``key`` unless ``value`` is a finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{key} = {value!r}; allowed: a finite number > 0")


PER_TOKEN_MAX_TOKENS = 8
"""A cached step whose sequences bring at most this many tokens each (a speculative verify of a few drafts; a
decode step, one token each, is ``one_token_each``'s single update) runs token by token and sets the state after every token (``per_token=True``): ``KVCacheHandle.rollback``
can then end inside the step. Longer steps (prefill) run the chunked form and set only the final state; the
protocol does not say when the engine means to roll back, so the block decides by this length."""


def one_token_each(hidden: torch.Tensor, ctx: BlockContext) -> bool:
    """Whether every sequence of the cached step of ``hidden (B, T, H)`` brings one token: ``ctx.max_seqlen == 1``
    (a host int: the engine's decode steps, static-shape ones included) under ``ctx.cu_seqlens``, else rows of one
    token. Its tokens are then its sequences (padding rows too)."""
    return ctx.max_seqlen == 1 if ctx.cu_seqlens is not None else hidden.shape[1] == 1


StepFn = Callable[[torch.Tensor, Mapping[str, torch.Tensor]], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def per_token_counts(batch: int, seq: int, cu_seqlens: torch.Tensor | None, max_seqlen: int | None) -> list[int] | None:
    """The tokens of each sequence of a cached step (``cu_seqlens``' differences, else ``seq`` for each of ``batch``
    rows) when none brings more than ``PER_TOKEN_MAX_TOKENS``, else ``None`` (the chunked form, final state only).
    ``max_seqlen`` (a host int) spares the device sync for long steps and for decode (one token each)."""
    longest = max_seqlen if max_seqlen is not None else seq if cu_seqlens is None else None
    if longest is not None and longest > PER_TOKEN_MAX_TOKENS:
        return None
    if longest == 1:
        return [1] * (batch * seq)
    counts: list[int] = [seq] * batch if cu_seqlens is None else (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    return counts if max(counts, default=0) <= PER_TOKEN_MAX_TOKENS else None


def step_tokens(
    step: StepFn, tokens: torch.Tensor, counts: list[int], state: Mapping[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Run ``counts[i]`` tokens of each sequence through ``step`` one token at a time.

    ``tokens (N, H)`` sequence after sequence (``sum(counts) == N``), ``state {name: (S, *shape)}`` before the
    step, ``step(hidden (s, H), state {name: (s, *shape)}) -> (out (s, H), new state)`` a block's single-token
    update. Returns ``(out (N, H), {name: (N, *shape)})``: each token's output and the state after it."""
    if sum(counts) != tokens.shape[0] or len(counts) != next(iter(state.values())).shape[0]:
        raise ValueError(f"step_tokens: counts {counts} for {tokens.shape[0]} tokens and {len(counts)} states")
    if len(counts) == tokens.shape[0]:  # one token each (decode): the step itself
        return step(tokens, state)
    device = tokens.device
    count_t = torch.tensor(counts, device=device)  # (S,)
    starts = torch.cumsum(count_t, 0) - count_t  # (S,)
    current = dict(state)
    outs: torch.Tensor | None = None
    after: dict[str, torch.Tensor] = {}
    for t in range(max(counts, default=0)):
        active = torch.nonzero(count_t > t).flatten()  # (s,) sequences with a t-th token
        rows = starts[active] + t  # (s,) that token's row
        out, new = step(tokens[rows], {name: value[active] for name, value in current.items()})
        if outs is None:
            outs = out.new_zeros(tokens.shape[0], *out.shape[1:])
            after = {name: value.new_zeros(tokens.shape[0], *value.shape[1:]) for name, value in new.items()}
        outs = outs.index_copy(0, rows, out)
        for name, value in new.items():
            after[name] = after[name].index_copy(0, rows, value)
            previous = current[name].to(value.dtype)
            current[name] = previous.index_copy(0, active, value)
    assert outs is not None
    return outs, after
